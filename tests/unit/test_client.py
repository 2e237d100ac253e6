"""pushsvc.client without sockets: message parsing, backoff bounds, URLs."""

from __future__ import annotations

import pytest

from pushsvc.client import (
    MESSAGE_CLASSES,
    TERMINAL_CLOSE_CODES,
    Connected,
    PositionUpdate,
    PushClient,
    UnknownMessage,
    parse_message,
)


def test_every_type_parses_to_its_class() -> None:
    for kind, cls in MESSAGE_CLASSES.items():
        message = parse_message({"type": kind, "timestamp": "t"})
        assert type(message) is cls
        assert message.type == kind


def test_fields_are_snake_cased_and_extra_kept() -> None:
    message = parse_message(
        {
            "type": "position_update",
            "assessmentId": "a",
            "positionId": "p",
            "entryPrice": 10,
            "unrealizedPnl": -1,
            "pos": 7,
            "venue": "x",
        }
    )
    assert isinstance(message, PositionUpdate)
    assert (message.assessment_id, message.position_id) == ("a", "p")
    assert (message.entry_price, message.unrealized_pnl, message.pos) == (10, -1, 7)
    assert message.extra == {"venue": "x"}


def test_connected() -> None:
    message = parse_message(
        {"type": "connected", "connectionId": "c", "userId": "u", "timestamp": "t"}
    )
    assert message == Connected(connection_id="c", user_id="u", timestamp="t")


@pytest.mark.parametrize("kind", ["future_type", None, 5])
def test_unknown_type(kind: object) -> None:
    message = parse_message({"type": kind, "a": 1})
    assert isinstance(message, UnknownMessage)
    assert message.extra == {"a": 1}
    assert message.type == (kind if isinstance(kind, str) else "")


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    client = PushClient("ws://h/ws", "t", backoff_initial_s=0.5, backoff_max_s=8)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (50, 8.0)]:
        delays = {client.backoff_delay(attempt) for _ in range(200)}
        assert all(cap / 2 <= d <= cap for d in delays), (attempt, delays)
        assert len(delays) > 100  # jittered, not one value


def test_connect_url_carries_token_assessment_and_since() -> None:
    client = PushClient("ws://h:1/ws?token=old&x=1", "new.tok-en_", assessment_id="a 1")
    assert client.connect_url() == "ws://h:1/ws?x=1&token=new.tok-en_&assessmentId=a+1"
    client.last_pos = 42
    assert client.connect_url().endswith("&since=42")


def test_terminal_close_codes() -> None:
    assert {1008, 1009, 4401, 4403} <= TERMINAL_CLOSE_CODES
    assert not {1000, 1001, 1006, 1011, 1013, 4000, 4001} & TERMINAL_CLOSE_CODES


def test_needs_a_token_source() -> None:
    with pytest.raises(ValueError):
        PushClient("ws://h/ws")
