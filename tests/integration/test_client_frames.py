"""Frames sent by clients: junk is ignored, oversize frames close with 1009, a
flood of invalid frames closes with 1008."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import pytest
from utils import (
    OP_BINARY,
    OP_TEXT,
    Broker,
    Metrics,
    PushClient,
    RawWebSocket,
    Server,
    ascrape,
    client,
    make_token,
    produce,
    run_server,
    uid,
    wait_for_metric,
)
from websockets.exceptions import ConnectionClosed

DEFAULT_MAX_FRAME = 65536
DEFAULT_MAX_INVALID = 20


@pytest.fixture(scope="module")
def limited_server(server: Server, broker: Broker) -> Iterator[Server]:
    """A second server on the same broker with small limits."""
    with run_server(broker, MAX_FRAME_SIZE=1024, MAX_INVALID_FRAMES=3) as s:
        yield s


async def _still_delivers(server: Server, broker: Broker, c: PushClient) -> None:
    """The connection still gets events: a market price produced now arrives."""
    symbol = uid("SYM")
    produce(broker.bootstrap, "market-data.prices", {"symbol": symbol}, key=symbol)
    await c.recv_until(lambda m: m.get("symbol") == symbol)


async def test_junk_frames_are_ignored(server: Server, broker: Broker) -> None:
    """Non-JSON text, JSON that is not an object, unknown types, and binary frames
    are ignored: the connection stays open and keeps receiving events."""
    async with client(server, uid("u"), uid()) as c:
        for frame in [
            "hello",
            "{",
            "[1,2]",
            "42",
            "null",
            '{"type":"subscribe","x":1}',
            '{"no":"type"}',
        ]:
            await c.ws.send(frame)
        await c.ws.send(b"\x00\x01\x02binary")
        await c.ws.send('{"type":"pong","timestamp":%d}' % int(time.time() * 1000))
        await c.assert_alive()
        await _still_delivers(server, broker, c)
        assert c.ws.close_code is None


async def test_frame_at_limit_is_accepted(server: Server, broker: Broker) -> None:
    """A frame of exactly MAX_FRAME_SIZE bytes (default 65536) does not close."""
    async with client(server, uid("u"), uid()) as c:
        await c.ws.send("x" * DEFAULT_MAX_FRAME)
        await c.assert_alive()
        await _still_delivers(server, broker, c)


@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_oversize_frame_closes_1009(server: Server, kind: str) -> None:
    """A frame over MAX_FRAME_SIZE (default 65536) closes the connection with 1009."""
    async with client(server, uid("u"), uid()) as c:
        size = DEFAULT_MAX_FRAME + 1
        await c.ws.send("y" * size if kind == "text" else b"\x01" * size)
        code, _ = await c.wait_closed()
    assert code == 1009


async def test_oversize_frame_raw_closes_1009(server: Server) -> None:
    """Byte-level: the server answers an oversize frame with a close frame 1009."""
    raw = await RawWebSocket.connect_server(server, make_token(uid("raw")), uid())
    try:
        await raw.send_frame(OP_TEXT, b"z" * (DEFAULT_MAX_FRAME * 2))
        code, _, _ = await raw.recv_close()
    finally:
        await raw.close()
    assert code == 1009


async def test_invalid_frames_up_to_limit_tolerated_then_1008(server: Server) -> None:
    """MAX_INVALID_FRAMES (default 20) invalid frames within 10 s are tolerated;
    one more closes the connection with 1008."""
    async with client(server, uid("u"), uid()) as c:
        for i in range(DEFAULT_MAX_INVALID):
            await c.ws.send(f"junk {i}")
        await c.assert_alive()
        assert c.ws.close_code is None
        await c.ws.send("one junk too many")
        code, _ = await c.wait_closed()
    assert code == 1008


def _junk_frames(count: int) -> list[bytes]:
    frames = []
    for i in range(count):
        if i % 3 == 0:
            frames.append(RawWebSocket.encode_frame(OP_TEXT, b"not json"))
        elif i % 3 == 1:
            frames.append(RawWebSocket.encode_frame(OP_TEXT, b'{"type":"bogus"}'))
        else:
            frames.append(RawWebSocket.encode_frame(OP_BINARY, b"\xde\xad\xbe\xef"))
    return frames


async def test_flood_burst_closes_1008(server: Server) -> None:
    """A burst of 60 invalid frames (text junk, unknown types, binary) in one write
    gets a close frame with code 1008."""
    raw = await RawWebSocket.connect_server(server, make_token(uid("flood")), uid())
    try:
        await raw.send_raw(b"".join(_junk_frames(60)))
        code, _, _ = await raw.recv_close()
    finally:
        await raw.close()
    assert code == 1008


async def test_continuous_flood_closes_1008(server: Server) -> None:
    """A client that keeps flooding invalid frames (one every 2 ms, reading as it
    goes, like any real client) is closed and sees close code 1008."""
    async with client(server, uid("flooder"), uid()) as c:
        sent = 0
        with contextlib.suppress(ConnectionClosed):
            for sent in range(1, 201):
                await c.ws.send(f"junk {sent}")
                await asyncio.sleep(0.002)
        code, _ = await c.wait_closed()
    assert sent <= 100, f"still open after {sent} invalid frames"
    assert code == 1008, (code, c.ws.close_exc)


async def test_valid_pongs_are_not_invalid_frames(server: Server) -> None:
    """Well-formed pong messages never count toward the invalid-frame limit."""
    async with client(server, uid("u"), uid()) as c:
        for _ in range(DEFAULT_MAX_INVALID * 2):
            await c.ws.send('{"type":"pong","timestamp":%d}' % int(time.time() * 1000))
        await c.assert_alive()
        assert c.ws.close_code is None


async def test_configured_max_frame_size(limited_server: Server) -> None:
    """MAX_FRAME_SIZE=1024: 1024 bytes pass, 1025 bytes close with 1009."""
    async with client(limited_server, uid("u"), uid()) as c:
        await c.ws.send("a" * 1024)
        await c.assert_alive()
        await c.ws.send("a" * 1025)
        code, _ = await c.wait_closed()
    assert code == 1009


async def test_configured_max_invalid_frames(limited_server: Server) -> None:
    """MAX_INVALID_FRAMES=3: three invalid frames pass, the fourth closes with 1008."""
    async with client(limited_server, uid("u"), uid()) as c:
        for i in range(3):
            await c.ws.send(f"bad {i}")
        await c.assert_alive()
        await c.ws.send("bad 3")
        code, _ = await c.wait_closed()
    assert code == 1008


# Metric checks last: the behaviour above does not depend on /metrics.


async def test_protocol_closes_counted_by_code(server: Server) -> None:
    """Closes for oversize frames and floods are counted in
    websocket_connections_closed_total with code="1009" and code="1008"."""
    before = await ascrape(server)
    async with client(server, uid("big"), uid()) as c:
        await c.ws.send("q" * (DEFAULT_MAX_FRAME + 1))
        assert (await c.wait_closed())[0] == 1009
    async with client(server, uid("junk"), uid()) as c:
        for i in range(DEFAULT_MAX_INVALID + 1):
            await c.ws.send(f"junk {i}")
        assert (await c.wait_closed())[0] == 1008

    def counted(m: Metrics) -> bool:
        return all(
            m.value("websocket_connections_closed_total", code=code)
            >= before.value("websocket_connections_closed_total", code=code) + 1
            for code in ("1008", "1009")
        )

    await wait_for_metric(server, counted, what="closes with 1008 and 1009 counted")
