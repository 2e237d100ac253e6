"""Heartbeat: JSON pings every HEARTBEAT_INTERVAL, and connections from which
nothing arrived for CONNECTION_TIMEOUT are closed with 4000 "heartbeat timeout".

The module's server runs with HEARTBEAT_INTERVAL=200 and CONNECTION_TIMEOUT=600.
"Silent" clients use the raw client in utils, which never sends anything (not even
automatic WebSocket pongs) unless the test tells it to. The metrics check runs
last so that the behaviour tests do not depend on /metrics."""

from __future__ import annotations

import time
from typing import Any

import pytest
from utils import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWebSocket,
    Server,
    ascrape,
    client,
    json_frames,
    make_token,
    uid,
    wait_for_metric,
)

INTERVAL_S = 0.2
TIMEOUT_S = 0.6


@pytest.fixture(scope="module")
def server_env() -> dict[str, Any]:
    return {
        "HEARTBEAT_INTERVAL": int(INTERVAL_S * 1000),
        "CONNECTION_TIMEOUT": int(TIMEOUT_S * 1000),
    }


async def _silent_until_closed(
    server: Server,
) -> tuple[int | None, str, list[Any], float]:
    raw = await RawWebSocket.connect_server(server, make_token(uid("silent")), uid())
    start = time.monotonic()
    try:
        code, reason, frames = await raw.recv_close(timeout=5)
    finally:
        await raw.close()
    return code, reason, frames, time.monotonic() - start


async def _keep_sending(
    raw: RawWebSocket, opcode: int, payload: bytes, duration: float, every: float = 0.15
) -> None:
    """Send a frame every ``every`` s for ``duration`` s, reading in between; fail
    on close; finally prove the connection is open with a ping/pong round trip."""
    start = time.monotonic()
    sends = int(duration / every) + 1
    for i in range(sends):
        await raw.send_frame(opcode, payload)
        next_send = start + (i + 1) * every
        for _ in range(1000):  # read until the next send is due
            remaining = next_send - time.monotonic()
            if remaining <= 0:
                break
            try:
                op, data = await raw.recv_frame(timeout=remaining)
            except TimeoutError:
                break
            assert op != OP_CLOSE, f"closed while sending keep-alive frames: {data!r}"
    await raw.send_frame(OP_PING, b"probe")
    for _ in range(50):
        op, data = await raw.recv_frame(timeout=2)
        assert op != OP_CLOSE, f"closed: {data!r}"
        if op == OP_PONG and data == b"probe":
            return
    raise AssertionError("no pong for the probe ping")


async def test_json_ping_with_int_timestamp(server: Server) -> None:
    """Every HEARTBEAT_INTERVAL the server sends {"type": "ping", "timestamp":
    <epoch ms int>}; timestamps are current and non-decreasing."""
    async with client(server, uid("hb"), uid()) as c:
        pings = []
        for _ in range(3):
            msg = await c.recv_until(lambda m: m.get("type") == "ping", timeout=3)
            pings.append(msg)
            await c.ws.send('{"type":"pong","timestamp":%d}' % msg["timestamp"])
    now_ms = time.time() * 1000
    stamps = [p["timestamp"] for p in pings]
    for ts in stamps:
        assert isinstance(ts, int) and not isinstance(ts, bool), pings
        assert abs(now_ms - ts) < 10_000, (now_ms, ts)
    assert stamps == sorted(stamps), stamps


async def test_silent_client_closed_with_4000(server: Server) -> None:
    """A client that sends nothing at all is closed with code 4000 and reason
    "heartbeat timeout", not before CONNECTION_TIMEOUT (600 ms) and within a few
    intervals after it; before that it got JSON text pings."""
    code, reason, frames, elapsed = await _silent_until_closed(server)
    assert code == 4000, (code, reason)
    assert reason == "heartbeat timeout"
    assert TIMEOUT_S - 0.1 <= elapsed <= TIMEOUT_S + 2.0, elapsed
    msgs = json_frames(frames)
    assert msgs and msgs[0]["type"] == "connected", msgs
    assert any(m["type"] == "ping" for m in msgs[1:]), msgs


async def test_silent_websockets_client_closed_with_4000(server: Server) -> None:
    """A websockets-library client that ignores the JSON pings is closed with 4000
    (the library only auto-answers WebSocket-level pings)."""
    async with client(server, uid("ignorer"), uid()) as c:
        code, reason = await c.wait_closed(timeout=5)
    assert code == 4000 and reason == "heartbeat timeout", (code, reason)


async def test_client_answering_pongs_stays_open(server: Server) -> None:
    """A client answering each JSON ping with {"type": "pong"} stays open well past
    CONNECTION_TIMEOUT and keeps getting pings."""
    async with client(server, uid("ponger"), uid()) as c:
        deadline = time.monotonic() + TIMEOUT_S * 3
        pings = 0
        for _ in range(100):
            if time.monotonic() >= deadline:
                break
            msg = await c.recv_until(lambda m: m.get("type") == "ping", timeout=2)
            pings += 1
            await c.ws.send('{"type":"pong","timestamp":%d}' % msg["timestamp"])
        assert c.ws.close_code is None
        await c.assert_alive()
    assert pings >= 3


async def test_websocket_level_pongs_keep_alive(server: Server) -> None:
    """Unsolicited WebSocket PONG frames (no JSON at all) count as alive."""
    raw = await RawWebSocket.connect_server(server, make_token(uid("wspong")), uid())
    try:
        await _keep_sending(raw, OP_PONG, b"", TIMEOUT_S * 3)
    finally:
        await raw.close()


async def test_any_frame_keeps_alive(server: Server) -> None:
    """Any frame counts as alive, e.g. a JSON text frame of an unknown type sent
    every 250 ms (few enough not to trip the invalid-frame limit)."""
    raw = await RawWebSocket.connect_server(server, make_token(uid("chatty")), uid())
    try:
        await _keep_sending(
            raw, OP_TEXT, b'{"type":"hello"}', TIMEOUT_S * 3, every=0.25
        )
    finally:
        await raw.close()


async def test_heartbeat_timeout_counted_in_metrics(server: Server) -> None:
    """A heartbeat timeout adds to websocket_heartbeat_failures_total and to
    websocket_connections_closed_total{code="4000"}."""
    before = await ascrape(server)
    code, _, _, _ = await _silent_until_closed(server)
    assert code == 4000
    await wait_for_metric(
        server,
        lambda m: (
            m.value("websocket_heartbeat_failures_total")
            >= before.value("websocket_heartbeat_failures_total") + 1
            and m.value("websocket_connections_closed_total", code="4000")
            >= before.value("websocket_connections_closed_total", code="4000") + 1
        ),
        what="heartbeat failure and close code 4000 counted",
    )
