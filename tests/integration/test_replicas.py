"""Many replicas: three ``pushsvc serve`` processes against one broker.

This is the deployment model of k8s/ on loopback: replicas with the same
configuration (the same KAFKA_GROUP_ID included), a load balancer spreading
clients over them. Every replica reads every partition, so a client receives
exactly its events whichever replica it landed on. When a replica dies
(SIGKILL: no drain, no close frame), its clients reconnect to the others with
the last position they saw (since=<pos>) and get the assessment events produced
while they were away exactly once, then every later event exactly once; the
clients on the surviving replicas miss nothing at all.

Round-robin with 300 clients over 3 replicas and 100 assessments puts one
client of every assessment on every replica (3 and 100 are coprime), so each
replica must deliver every assessment's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from utils import (
    TIMEOUT,
    Broker,
    PushClient,
    Server,
    ascrape,
    create_topics,
    make_token,
    open_client,
    produce_many,
    run_server,
    wait_for_metric,
)
from websockets.exceptions import ConnectionClosed

REPLICAS = 3
CLIENTS = 300
ASSESSMENTS = 100
TOPICS = {"trading.pnl": 6, "market-data.prices": 3}
CONNECT_CONCURRENCY = 50
READ_BOUND_S = 60.0
"""Bound on one read of a client's pump: the test's own time limit."""
RUN_TAG = f"replicas-{time.monotonic_ns()}"
"""Marks this run's events, so nothing produced elsewhere can be counted."""

SERVER_ENV: dict[str, Any] = {
    # The same identity for every replica, as one Deployment gives them: no
    # consumer group is joined, so it must not split the partitions.
    "KAFKA_CLIENT_ID": "pushsvc-replica",
    "KAFKA_GROUP_ID": "pushsvc-replicas",
    # The clients here never answer JSON pings; nothing may time them out.
    "HEARTBEAT_INTERVAL": 30_000,
    "CONNECTION_TIMEOUT": 120_000,
}

pytestmark = pytest.mark.time_limit(READ_BOUND_S)


@dataclasses.dataclass
class Subscriber:
    """One client: its assessment, the replica it is on, what it received
    (everything but pings, across reconnects, in arrival order)."""

    index: int
    assessment: str
    replica: int
    client: PushClient | None = None
    received: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    closed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    reconnected: bool = False

    def events(self, kind: str, phase: str) -> list[int]:
        """Sequence numbers of this run's ``kind`` messages of ``phase``."""
        return [
            m["seq"]
            for m in self.received
            if m.get("type") == kind
            and m.get("tag") == RUN_TAG
            and m.get("phase") == phase
        ]


async def _pump(sub: Subscriber) -> None:
    """Read until the connection closes (each read bounded by the test)."""
    assert sub.client is not None
    ws = sub.client.ws
    try:
        for _ in range(100_000):
            raw = await asyncio.wait_for(ws.recv(), READ_BOUND_S)
            msg = json.loads(raw)
            if msg.get("type") != "ping":
                sub.received.append(msg)
    except ConnectionClosed:
        pass
    finally:
        sub.closed.set()


def _last_pos(sub: Subscriber) -> str:
    """The latest resume position the client saw (its connected message's,
    if no assessment message came after it)."""
    for message in reversed(sub.received):
        if "pos" in message and message.get("type") != "snapshot":
            return str(message["pos"])
    assert sub.client is not None
    return str(sub.client.hello["pos"])


async def _connect(
    sub: Subscriber, server: Server, limit: asyncio.Semaphore, since: str | None = None
) -> None:
    async with limit:
        token = make_token(f"user-{sub.index}", assessments=[sub.assessment])
        sub.client = await open_client(
            server, assessment_id=sub.assessment, token=token, since=since
        )
    assert sub.client.hello["assessmentId"] == sub.assessment
    sub.closed = asyncio.Event()
    sub.task = asyncio.create_task(_pump(sub), name=f"pump-{sub.index}")


async def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    for _ in range(10_000):
        if check():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not within {TIMEOUT}s")


def _records(phase: str, per_assessment: int, ticks: int) -> list[Any]:
    """``per_assessment`` pnl updates for every assessment (keyed by it, so
    spread over the partitions) and ``ticks`` prices of one market."""
    records: list[Any] = []
    for seq in range(per_assessment):
        for a in range(ASSESSMENTS):
            asm = _assessment(a)
            value = {"assessmentId": asm, "unrealizedPnl": seq, "seq": seq}
            records.append(("trading.pnl", {**value, **_tags(phase)}, asm))
    market = f"MKT-{phase}"
    for seq in range(ticks):
        value = {"market": market, "price": 100 + seq, "seq": seq, **_tags(phase)}
        records.append(("market-data.prices", value, market))
    return records


def _tags(phase: str) -> dict[str, str]:
    return {"tag": RUN_TAG, "phase": phase}


def _assessment(a: int) -> str:
    return f"asm-replicas-{a:03d}"


async def _produce(records: list[Any], broker: Broker) -> None:
    await asyncio.to_thread(
        produce_many, broker.bootstrap, records, one_batch_each=False
    )


def _complete(
    subs: list[Subscriber], phase: str, per_assessment: int, ticks: int
) -> bool:
    return all(
        len(s.events("pnl_update", phase)) >= per_assessment
        and len(s.events("market_price", phase)) >= ticks
        for s in subs
    )


def _assert_exactly(
    sub: Subscriber, phase: str, per_assessment: int, ticks: int
) -> None:
    """Every event of the phase once, in the order produced."""
    assert sub.events("pnl_update", phase) == list(range(per_assessment)), (
        f"client {sub.index} ({sub.assessment}, replica {sub.replica}) phase {phase}: "
        f"{sub.events('pnl_update', phase)}"
    )
    assert sub.events("market_price", phase) == list(range(ticks)), (
        f"client {sub.index} phase {phase}: {sub.events('market_price', phase)}"
    )


@contextlib.contextmanager
def _replica(broker: Broker) -> Iterator[Server]:
    """``run_server``; a replica that the test SIGKILLed on purpose having
    exited is expected, not an error."""
    server: Server | None = None
    try:
        with run_server(broker, **SERVER_ENV) as server:
            yield server
    except RuntimeError as exc:
        killed = server is not None and server.process.returncode == -signal.SIGKILL
        if not (killed and "exited during the tests" in str(exc)):
            raise


@pytest.fixture(scope="module")
def replicas(broker: Broker) -> Iterator[list[Server]]:
    create_topics(broker.bootstrap, TOPICS)
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(_replica(broker)) for _ in range(REPLICAS)]


def _partitions(metrics: Any, topic: str) -> set[int]:
    return {
        int(labels["partition"])
        for labels in metrics.labels_of("websocket_kafka_consumer_lag")
        if labels.get("topic") == topic
    }


async def test_replicas_deliver_every_event_and_survive_losing_one(
    broker: Broker, replicas: list[Server]
) -> None:
    # Each replica has assigned every partition, under the same group id.
    for server in replicas:
        await wait_for_metric(
            server,
            lambda m: all(
                _partitions(m, t) == set(range(n)) for t, n in TOPICS.items()
            ),
            what=f"replica :{server.port} holding every partition",
        )

    # 300 clients round-robin over the replicas, 100 assessments.
    subs = [
        Subscriber(i, _assessment(i % ASSESSMENTS), i % REPLICAS)
        for i in range(CLIENTS)
    ]
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    try:
        await asyncio.gather(*(_connect(s, replicas[s.replica], limit) for s in subs))
        assert {(s.assessment, s.replica) for s in subs} == {
            (_assessment(a), r) for a in range(ASSESSMENTS) for r in range(REPLICAS)
        }
        await _run_scenario(broker, replicas, subs)
    finally:
        for s in subs:
            if s.client is not None:
                await s.client.close()
        for s in subs:
            if s.task is not None:
                s.task.cancel()
        await asyncio.gather(*(s.task for s in subs if s.task), return_exceptions=True)


async def _run_scenario(
    broker: Broker, replicas: list[Server], subs: list[Subscriber]
) -> None:
    # Phase "before": every client gets exactly its assessment's events and
    # every market price, whichever replica it is on.
    before = (3, 4)
    await _produce(_records("before", *before), broker)
    await _wait_until(
        lambda: _complete(subs, "before", *before), "every client has its events"
    )
    await asyncio.sleep(0.5)  # room for a duplicate or a stray event to show
    for s in subs:
        _assert_exactly(s, "before", *before)
    produced = ASSESSMENTS * before[0] + before[1]
    for server in replicas:
        metrics = await ascrape(server)
        assert metrics.value("websocket_kafka_messages_processed_total") >= produced

    # Replica 0 dies without a word: its clients see the TCP connection drop.
    victim = replicas[0]
    victim.process.send_signal(signal.SIGKILL)
    await asyncio.to_thread(victim.process.wait, TIMEOUT)
    dropped = [s for s in subs if s.replica == 0]
    survivors = [s for s in subs if s.replica != 0]
    await asyncio.wait_for(asyncio.gather(*(s.closed.wait() for s in dropped)), TIMEOUT)
    assert not any(s.closed.is_set() for s in survivors)

    # Events while the dropped clients are away reach every survivor.
    gap = (1, 1)
    await _produce(_records("gap", *gap), broker)
    await _wait_until(
        lambda: _complete(survivors, "gap", *gap), "survivors get events after a loss"
    )

    # The dropped clients reconnect, spread over the two survivors.
    started = time.monotonic()
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)
    for j, s in enumerate(dropped):
        s.replica = 1 + j % (REPLICAS - 1)
        s.reconnected = True
    # Each resumes from the last position it saw, on whichever replica.
    resume_from = {s.index: _last_pos(s) for s in dropped}
    await asyncio.gather(
        *(
            _connect(s, replicas[s.replica], limit, since=resume_from[s.index])
            for s in dropped
        )
    )
    assert all(s.client is not None and s.client.hello["resumed"] for s in dropped)
    reconnect_s = time.monotonic() - started
    assert reconnect_s < TIMEOUT, reconnect_s
    expected_each = CLIENTS // (REPLICAS - 1)
    for server in replicas[1:]:
        await wait_for_metric(
            server,
            lambda m: m.value("websocket_connections_total") == expected_each,
            what=f"{expected_each} connections on :{server.port}",
        )

    # Phase "after": produced once everyone is back; every client, moved or
    # not, gets each event exactly once.
    after = (2, 3)
    await _produce(_records("after", *after), broker)
    await _wait_until(
        lambda: _complete(subs, "after", *after), "every client has the new events"
    )
    await asyncio.sleep(0.5)
    for s in subs:
        _assert_exactly(s, "after", *after)
        _assert_exactly(s, "before", *before)
        if s.reconnected:
            # Resumed: the assessment's events produced while it was away
            # arrive exactly once. Market prices are for everyone and are not
            # resumed (the next tick replaces them): at most once.
            assert s.events("pnl_update", "gap") == list(range(gap[0])), s.index
            seqs = s.events("market_price", "gap")
            assert seqs == list(range(len(seqs))) and len(seqs) <= gap[1], seqs
        else:
            _assert_exactly(s, "gap", *gap)
        foreign = [
            m
            for m in s.received
            if m.get("type") == "pnl_update" and m.get("assessmentId") != s.assessment
        ]
        assert not foreign, f"client {s.index} got another assessment's events"
    assert all(not s.closed.is_set() for s in subs)
