"""The compiled router: decode once, normalize, frame; drops have reasons."""

import orjson
import pytest

import pushsvc._router as router_module
from pushsvc._router import Router, camel, iso_utc, make_frame

TS = 1_795_690_747_123  # 2026-11-26T10:59:07.123Z


@pytest.fixture
def router():
    return Router()


def normalize(router, value, topic, key=None):
    raw = orjson.dumps(value) if isinstance(value, (dict, list, int, str)) else value
    kind, room, payload = router.normalize(raw, topic, key, TS)
    return kind, room, orjson.loads(payload)


def test_the_compiled_router_is_loaded():
    assert router_module.__file__.endswith(".so")


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("market-data.prices", "market_price"),
        ("trading.pnl", "pnl_update"),
        ("trading.positions", "position_update"),
        ("risk.rule-status", "rule_status"),
        ("risk.violations", "violation"),
        ("assessment.status", "assessment_update"),
    ],
)
def test_topic_names_the_type_when_the_value_does_not(router, topic, kind):
    got_kind, _, message = normalize(router, {"assessmentId": "a1"}, topic)
    assert got_kind == kind
    assert message["type"] == kind


def test_explicit_type_wins_over_the_topic(router):
    kind, room, message = normalize(
        router, {"type": "violation", "assessmentId": "a1"}, "trading.pnl"
    )
    assert (kind, room, message["type"]) == ("violation", "a1", "violation")


def test_top_level_snake_case_becomes_camel_case(router):
    _, _, message = normalize(
        router,
        {
            "assessment_id": "a1",
            "unrealized_pnl": 1.5,
            "realized_pnl": -2,
            "current_balance": 100,
            "nested": {"keep_me": 1},
        },
        "trading.pnl",
    )
    assert message == {
        "type": "pnl_update",
        "assessmentId": "a1",
        "unrealizedPnl": 1.5,
        "realizedPnl": -2,
        "currentBalance": 100,
        "nested": {"keep_me": 1},
        "timestamp": "2026-11-26T10:59:07.123Z",
    }


def test_present_timestamp_is_kept(router):
    _, _, message = normalize(
        router, {"market": "BTC", "price": 1, "timestamp": "T"}, "market-data.prices"
    )
    assert message["timestamp"] == "T"


def test_routing_key_falls_back_to_the_record_key(router):
    kind, room, message = normalize(
        router, {"status": "passed"}, "assessment.status", b"a-9"
    )
    assert (kind, room) == ("assessment_update", "a-9")
    assert message["assessmentId"] == "a-9"


def test_numeric_assessment_id_routes_as_a_string(router):
    _, room, message = normalize(router, {"assessmentId": 42}, "trading.pnl")
    assert room == "42"
    assert message["assessmentId"] == 42


def test_market_price_has_no_room(router):
    kind, room, _ = normalize(
        router, {"market": "ETH", "price": 2}, "market-data.prices"
    )
    assert (kind, room) == ("market_price", None)


@pytest.mark.parametrize(
    ("raw", "topic", "reason"),
    [
        (b"{not json", "trading.pnl", "invalid_json"),
        (b"\xff\xfe", "trading.pnl", "invalid_json"),
        (b"[1, 2]", "trading.pnl", "not_object"),
        (b'"text"', "trading.pnl", "not_object"),
        (b'{"assessmentId": "a"}', "trading.unknown", "unknown_type"),
        (b'{"type": "bogus", "assessmentId": "a"}', "trading.pnl", "unknown_type"),
        (b'{"type": 5, "assessmentId": "a"}', "trading.pnl", "unknown_type"),
        (b'{"unrealized_pnl": 1}', "trading.pnl", "missing_assessment"),
        (b'{"assessmentId": null}', "trading.pnl", "missing_assessment"),
        (b'{"assessmentId": ""}', "trading.pnl", "missing_assessment"),
        (b"", "trading.pnl", "invalid_json"),
        (None, "trading.pnl", "invalid_json"),
    ],
)
def test_invalid_records_are_dropped_with_a_reason(router, raw, topic, reason):
    with pytest.raises(ValueError, match=reason):
        router.normalize(raw, topic, None, TS)


def test_route_counts_drops_by_reason(router):
    assert router.route(b"nope", "trading.pnl") == "invalid_json"
    assert router.route(b'{"assessmentId": "a"}', "trading.pnl") is None
    stats = router.stats()
    assert stats["dropped"]["invalid_json"] == 1
    assert stats["kafka_processed"] == 2


def test_camel():
    assert camel("unrealized_pnl") == "unrealizedPnl"
    assert camel("entry_price") == "entryPrice"
    assert camel("already") == "already"
    assert camel("_private_key") == "_privateKey"


def test_iso_utc():
    assert iso_utc(TS) == "2026-11-26T10:59:07.123Z"
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_make_frame_writes_a_valid_server_text_header(size):
    payload = b"x" * size
    frame = make_frame(payload)
    assert frame[0] == 0x81
    if size < 126:
        assert frame[1] == size and frame[2:] == payload
    elif size < 65536:
        assert frame[1] == 126
        assert int.from_bytes(frame[2:4], "big") == size and frame[4:] == payload
    else:
        assert frame[1] == 127
        assert int.from_bytes(frame[2:10], "big") == size and frame[10:] == payload
