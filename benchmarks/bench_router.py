"""Micro-benchmarks of the compiled router alone, no broker, no kernel.

Connections here are real ``Connection`` listeners on real picows
``WSTransport`` objects, but the transport underneath reports a non-empty
write buffer, so picows skips ``send()`` and hands the bytes to a no-op
``write``: what is timed is decode + normalize + serialize + frame + fan-out +
per-connection coalescing, i.e. everything pushsvc adds above the kernel.
The kernel's share is measured end to end by ``python -m benchmarks.load``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading

import orjson
import pytest
from picows.picows import WSTransport

from pushsvc._router import BatchHandoff, Connection, Router

PNL = orjson.dumps(
    {
        "assessment_id": "a-0",
        "unrealized_pnl": 1250.5,
        "realized_pnl": -310.25,
        "current_balance": 100940.25,
        "timestamp": "2026-11-26T10:58:11.123Z",
    }
)
PRICE = orjson.dumps({"market": "BTC-USD", "price": 64000.5})


class _NullSocket:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


class _NullTransport:
    """Looks like a uvloop transport with data already queued, so picows'
    direct ``send()`` is skipped; ``write`` drops the bytes."""

    def __init__(self, fd: int) -> None:
        self._sock = _NullSocket(fd)
        self.write = collections.deque(maxlen=1).append
        self.get_write_buffer_size = (1).bit_length  # a C callable returning 1

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._sock if name == "socket" else default


class _Message:
    """The confluent-kafka ``Message`` methods the router calls."""

    __slots__ = ("_value", "_topic", "_key", "_offset")
    _next_offset = 0

    def __init__(self, value: bytes, topic: str, key: bytes | None = None) -> None:
        self._value, self._topic, self._key = value, topic, key
        _Message._next_offset += 1
        self._offset = _Message._next_offset

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_795_690_691_123)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def null_fd():
    fd = os.open(os.devnull, os.O_WRONLY)
    yield fd
    os.close(fd)


def _router_with(loop, fd: int, connections: int, room: str = "a-0") -> Router:
    router = Router()
    logger = logging.LoggerAdapter(logging.getLogger("bench"), {})
    for i in range(connections):
        transport = WSTransport(False, _NullTransport(fd), logger, loop)
        conn = Connection(router, f"user-{i}", room)
        conn.on_ws_connected(transport)
    return router


@pytest.mark.parametrize("connections", [1, 100, 10_000])
@pytest.mark.benchmark(
    group="router: one pnl_update to N connections of its assessment"
)
def bench_route_one_event(benchmark, loop, null_fd, connections):
    router = _router_with(loop, null_fd, connections)
    benchmark(router.route, PNL, "trading.pnl")
    assert router.stats()["messages_sent"] >= connections


@pytest.mark.parametrize("connections", [1, 100, 10_000])
@pytest.mark.benchmark(group="router: one market_price broadcast to N connections")
def bench_broadcast_one_price(benchmark, loop, null_fd, connections):
    router = _router_with(loop, null_fd, connections)
    benchmark(router.route, PRICE, "market-data.prices")


@pytest.mark.benchmark(
    group="router: batch of 100 records (80 pnl, 20 prices), 100 conns"
)
def bench_deliver_batch(benchmark, loop, null_fd):
    router = _router_with(loop, null_fd, 100)
    batch = [_Message(PNL, "trading.pnl") for _ in range(80)]
    batch += [_Message(PRICE, "market-data.prices") for _ in range(20)]
    benchmark(router.deliver, batch)


@pytest.mark.benchmark(group="handoff: consumer thread -> loop, 100 batches of 10")
def bench_batch_handoff(benchmark, null_fd):
    """A thread pushes 100 batches; the loop drains them. Wake-ups are counted:
    never more than one per batch, usually far fewer."""
    loop = asyncio.new_event_loop()
    try:
        router = _router_with(loop, null_fd, 10)
        handoff = BatchHandoff(router, loop)
        batch = [_Message(PNL, "trading.pnl") for _ in range(10)]

        def run() -> None:
            done = loop.create_future()
            target = handoff.batches + 100

            def producer() -> None:
                for _ in range(100):
                    handoff.push(batch)
                loop.call_soon_threadsafe(check)

            def check() -> None:
                if handoff.batches >= target:
                    done.set_result(None)
                else:
                    loop.call_later(0.0005, check)

            thread = threading.Thread(target=producer)
            thread.start()
            loop.run_until_complete(asyncio.wait_for(done, 10))
            thread.join()

        benchmark.pedantic(run, rounds=20, iterations=1)
        assert handoff.wakeups <= handoff.batches
    finally:
        loop.close()


_SPREAD_TOPICS = (
    "trading.pnl",
    "trading.positions",
    "risk.rule-status",
    "risk.violations",
    "assessment.status",
)


class _Record(_Message):
    """A record of a given partition and time, for traffic over many partitions."""

    __slots__ = ("_partition", "_ts")

    def __init__(
        self, value: bytes, topic: str, partition: int, offset: int, ts: int
    ) -> None:
        super().__init__(value, topic)
        self._partition, self._offset, self._ts = partition, offset, ts

    def partition(self) -> int:
        return self._partition

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)


def _spread_batches(
    assessments: int, batches: int, size: int = 100
) -> list[list[_Record]]:
    """Assessment events over 5 topics x 4 partitions, each batch in runs of one
    partition (as librdkafka hands them over)."""
    out = []
    for b in range(batches):
        batch = []
        for i in range(size):
            n = b * size + i
            event = {
                "assessment_id": f"a-{n % assessments}",
                "unrealized_pnl": 1.5 * n,
                "realized_pnl": -310.25,
                "rule": f"r{n % 3}",
                "position_id": f"p{n % 4}",
                "quantity": n % 3,
                "timestamp": "2026-11-26T10:58:11.123Z",
            }
            batch.append(
                _Record(
                    orjson.dumps(event),
                    _SPREAD_TOPICS[n % 5],
                    n % 4,
                    n,
                    1_795_690_691_123 + n,
                )
            )
        batch.sort(key=lambda r: (r.topic(), r.partition(), r.offset()))
        out.append(batch)
    return out


@pytest.mark.parametrize("resume", [False, True], ids=["resume-off", "resume-on"])
@pytest.mark.benchmark(
    group="router: spread traffic, 10 batches of 100 records, 200 assessments x 5"
)
def bench_spread_with_and_without_resume(benchmark, loop, null_fd, resume):
    """What positions, resume buffers and snapshot state add to the hot path:
    the same traffic through a router with them (as the service runs) and one
    without, side by side in one run."""
    router = Router(resume=resume)
    logger = logging.LoggerAdapter(logging.getLogger("bench"), {})
    for i in range(1000):
        transport = WSTransport(False, _NullTransport(null_fd), logger, loop)
        Connection(router, f"user-{i}", f"a-{i % 200}").on_ws_connected(transport)
    batches = _spread_batches(200, 60)
    for batch in batches[:50]:  # buffers full and state warm, as in steady state
        router.deliver(batch)
    rounds = iter(range(10**9))

    def ten_batches() -> None:
        start = next(rounds) % 5 * 2
        for batch in batches[50 + start : 52 + start] * 5:
            router.deliver(batch)

    benchmark(ten_batches)
