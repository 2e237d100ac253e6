"""Anything a producer or a client sends: no exception out of the hot path, and
every drop counted."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from picows.picows import WSMsgType, _make_test_ws_frame

from pushsvc._router import DROP_REASONS, Router

from .fakes import FakeClients

TOPICS = [
    "market-data.prices",
    "trading.pnl",
    "trading.positions",
    "risk.rule-status",
    "risk.violations",
    "assessment.status",
    "trading.other",
    "",
]

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "assessmentId",
                    "assessment_id",
                    "market",
                    "price",
                    "rule",
                    "timestamp",
                    "unrealized_pnl",
                    "_x",
                    "a__b",
                    "x",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=6,
        )
    ),
    max_leaves=12,
)
_types = st.sampled_from(
    [
        "market_price",
        "pnl_update",
        "position_update",
        "rule_status",
        "violation",
        "assessment_update",
        "bogus",
        7,
        None,
    ]
)


@st.composite
def records(draw):
    kind = draw(st.integers(0, 2))
    if kind == 0:
        raw = draw(st.binary(max_size=64))
    elif kind == 1:
        raw = orjson.dumps(draw(_json))
    else:
        event = draw(st.dictionaries(st.text(max_size=8), _json, max_size=4))
        event["type"] = draw(_types)
        if draw(st.booleans()):
            event["assessmentId"] = draw(st.sampled_from(["a1", "a2", 3, "", None]))
        raw = orjson.dumps(event)
    key = draw(st.none() | st.binary(max_size=8) | st.sampled_from([b"a1", b"a2"]))
    return raw, draw(st.sampled_from(TOPICS)), key


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(records(), max_size=20))
def test_any_record_is_routed_or_dropped_and_counted(loop, batch):
    router = Router()
    clients = FakeClients(router, loop)
    try:
        a1, _, raw_a1 = clients.connect("u1", "a1")
        clients.connect("u2", "a2")
        clients.connect("u3")
        routed = 0
        for raw, topic, key in batch:
            reason = router.route(raw, topic, key)
            assert reason is None or reason in DROP_REASONS
            routed += reason is None
        stats = router.stats()
        assert stats["kafka_processed"] == len(batch)
        assert sum(stats["dropped"].values()) + routed == len(batch)
        for frame in raw_a1.written[2:]:  # after "connected" and "snapshot"
            message = orjson.loads(frame[2:] if frame[1] < 126 else frame[4:])
            routed_to_a1 = str(message.get("assessmentId")) == "a1"
            assert message["type"] == "market_price" or routed_to_a1
    finally:
        clients.close()


_frames = st.tuples(
    st.sampled_from(
        [WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.PONG]
    ),
    st.one_of(
        st.binary(max_size=64),
        st.builds(orjson.dumps, _json),
        st.sampled_from(
            [
                b'{"type":"pong"}',
                b'{"type":"ping"}',
                b'{"type":"refresh"}',
                b'{"type":"subscribe"}',
                b"[]",
                b"\xff",
            ]
        ),
    ),
    st.booleans(),
)


def _expected_ignored(opcode, payload, fin) -> int:
    if opcode in (WSMsgType.BINARY, WSMsgType.CONTINUATION):
        return 1
    if opcode != WSMsgType.TEXT:
        return 0
    if not fin:
        return 1
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return 1
    if not isinstance(message, dict):
        return 1
    return 0 if message.get("type") in ("pong", "ping", "refresh") else 1


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(frames=st.lists(_frames, max_size=30))
def test_any_client_frame_is_handled_or_ignored_and_counted(loop, frames):
    router = Router(max_invalid_frames=10_000, max_messages_per_s=10_000)
    clients = FakeClients(router, loop)
    try:
        conn, transport, _ = clients.connect("u1", "a1")
        expected = 0
        for opcode, payload, fin in frames:
            conn.on_ws_frame(
                transport, _make_test_ws_frame(opcode, payload, fin, False)
            )
            expected += _expected_ignored(opcode, payload, fin)
        assert sum(router.stats()["ignored"].values()) == expected
        assert router.connection_count == 1
    finally:
        clients.close()


def test_routing_does_not_leak(loop):
    """Regression guard for reference leaks in the decode/fan-out/flush loop."""
    router = Router()
    clients = FakeClients(router, loop)
    try:
        for i in range(50):
            clients.connect(f"u{i}", f"a{i % 5}", record=False)
        pnl = orjson.dumps({"assessment_id": "a1", "unrealized_pnl": 1.5})
        price = orjson.dumps({"market": "BTC", "price": 1})

        def churn(n: int) -> None:
            for _ in range(n):
                router.route(pnl, "trading.pnl")
                router.route(price, "market-data.prices")
                router.route(b"nope", "trading.pnl")

        churn(2_000)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            churn(20_000)
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        # 20k rounds of 3 records fanned out to 50 connections: a leak of
        # one object per delivery would be tens of megabytes.
        assert after - before < 256 * 1024
    finally:
        clients.close()
