"""Slow consumers: a client that stops reading never slows the others down and
never grows the server's memory without bound.

While a connection is behind, the newest ``market_price`` per market (and the
newest ``pnl_update`` and ``rule_status`` per rule) replaces older copies; a
``violation`` is never conflated, and past MAX_CONNECTION_BUFFER the client is
closed with 1013. The stalled client is a plain socket with a tiny receive
buffer; the server runs with a small SOCKET_SEND_BUFFER so the kernel stops
absorbing data after a few kilobytes and the test stays small. The 100 clients
reading at full rate are picows clients (fast enough not to fall behind
themselves on a shared 2-core machine).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from typing import Any

import orjson
import pytest
from picows import WSListener, WSMsgType, ws_connect
from utils import Broker, KafkaProducer, Server, make_token, rss_kib, scrape, uid

READERS = 100
TICKS = 1500
TICKS_PER_S = 500


@pytest.fixture(scope="module")
def kafka_topics() -> dict[str, int]:
    return {"market-data.prices": 1, "risk.violations": 1}


@pytest.fixture(scope="module")
def server_env() -> dict[str, Any]:
    return {
        "SOCKET_SEND_BUFFER": 4096,
        "MAX_CONNECTION_BUFFER": 262_144,
        "HEARTBEAT_INTERVAL": 600_000,
        "CONNECTION_TIMEOUT": 900_000,
    }


class _Stalled:
    """A WebSocket client that completes the handshake and then stops reading."""

    def __init__(self, server: Server, assessment_id: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect((server.host, server.port))
        key = base64.b64encode(os.urandom(16)).decode()
        token = make_token(uid("stalled"))
        self.sock.sendall(
            (
                f"GET /ws?token={token}&assessmentId={assessment_id} HTTP/1.1\r\n"
                f"Host: {server.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def read_all(
        self, quiet_s: float = 2.0, limit_s: float = 20.0
    ) -> list[tuple[int, bytes]]:
        """Resume reading: every frame until EOF or ``quiet_s`` of silence."""
        data = bytearray()
        self.sock.settimeout(quiet_s)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
        self.sock.close()
        return _frames(bytes(data))


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, size = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if size == 126:
            (size,) = struct.unpack_from("!H", data, i)
            i += 2
        elif size == 127:
            (size,) = struct.unpack_from("!Q", data, i)
            i += 8
        if i + size > len(data):
            break
        frames.append((opcode, data[i : i + size]))
        i += size
    return frames


class _Reader(WSListener):
    """Counts market prices and keeps their produce-to-receive latency."""

    def __init__(self) -> None:
        self.prices = 0
        self.last_price: float | None = None
        self.latencies: list[float] = []

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        message = orjson.loads(frame.get_payload_as_bytes())
        if message.get("type") == "market_price":
            self.prices += 1
            self.last_price = message["price"]
            self.latencies.append((time.time_ns() - message["sentNs"]) / 1e6)


def _produce_paced(
    broker: Broker, topic: str, values: list[dict[str, Any]], rate: float
) -> None:
    """Produce ``values`` at ``rate`` per second, stamping ``sent_ns`` on each."""
    producer = KafkaProducer(broker.bootstrap, **{"linger.ms": 2})
    start = time.monotonic()
    for i, value in enumerate(values):
        value["sent_ns"] = time.time_ns()
        producer.send(topic, value)
        lag = start + i / rate - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    producer.flush()


@pytest.mark.time_limit(90)
async def test_a_stalled_client_slows_nobody_and_gets_the_newest_price(
    server: Server, broker: Broker
):
    stalled = _Stalled(server, uid())
    readers, transports = [], []
    try:
        for _ in range(READERS):
            transport, listener = await ws_connect(
                _Reader,
                server.ws_url(make_token(uid("reader")), uid()),
                use_aiofastnet=False,
            )
            readers.append(listener)
            transports.append(transport)
        await _stall_and_check(server, broker, stalled, readers)
    finally:
        for transport in transports:
            transport.disconnect()
        for transport in transports:
            await asyncio.wait_for(transport.wait_disconnected(), 10)


async def _stall_and_check(
    server: Server, broker: Broker, stalled: _Stalled, readers: list[_Reader]
) -> None:
    rss_before = rss_kib(server.process.pid)
    ticks = [{"market": "BTC-USD", "price": i} for i in range(TICKS)]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        None, _produce_paced, broker, "market-data.prices", ticks, TICKS_PER_S
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(r.prices < TICKS for r in readers):
        await asyncio.sleep(0.05)

    # Everyone who reads got every tick, in time, whatever the stalled one does.
    assert [r.prices for r in readers] == [TICKS] * READERS
    latencies = sorted(x for r in readers for x in r.latencies)
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 500, f"readers' p99 latency {p99:.1f} ms"
    assert rss_kib(server.process.pid) - rss_before < 64 * 1024

    metrics = scrape(server)
    assert metrics.value("websocket_conflated_messages_total") > 0
    frames = await loop.run_in_executor(None, stalled.read_all)
    prices = [
        orjson.loads(payload)
        for opcode, payload in frames
        if opcode == 0x1 and b'"market_price"' in payload
    ]
    assert prices, "the stalled client got no price at all"
    assert prices[-1]["price"] == TICKS - 1, "the newest price was not delivered last"
    assert len(prices) < TICKS, "nothing was conflated for the stalled client"


@pytest.mark.time_limit(60)
async def test_a_stalled_client_past_the_buffer_limit_is_closed_with_1013(
    server: Server, broker: Broker
):
    """Violations are never conflated: once they overflow the limit, 1013."""
    assessment = uid()
    stalled = _Stalled(server, assessment)
    violations = [
        {
            "assessment_id": assessment,
            "rule": "max_loss",
            "value": i,
            "threshold": 1,
            "note": "x" * 200,
        }
        for i in range(4000)
    ]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(
        None, _produce_paced, broker, "risk.violations", violations, 20_000
    )
    frames = await loop.run_in_executor(None, stalled.read_all)
    assert frames, "nothing arrived"
    opcode, payload = frames[-1]
    assert opcode == 0x8, f"last frame is not a close: {frames[-1]!r:.200}"
    code = struct.unpack("!H", payload[:2])[0]
    assert code == 1013
    assert b"too slow" in payload[2:]
    metrics = scrape(server)
    assert metrics.value("websocket_slow_client_closes_total") >= 1
