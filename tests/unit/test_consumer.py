"""The Kafka consumer's bookkeeping without a broker: the watchdog, the circuit
breaker, readiness, and how the assignment follows topics that vanish or are
re-created. A fake stands in for librdkafka; nothing here opens a socket."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    KafkaError,
    KafkaException,
    TopicPartition,
    Uuid,
)

import pushsvc.consumer as consumer_module
from pushsvc.config import Settings
from pushsvc.consumer import CLOSED, HALF_OPEN, OPEN, KafkaConsumerThread

SECRET = "x" * 32


def make(grace_ms: int = 1000, warmup_ms: int = 300_000) -> KafkaConsumerThread:
    settings = Settings(
        jwt_secret=SECRET,
        kafka_brokers="127.0.0.1:9",
        kafka_unavailable_grace_ms=grace_ms,
        snapshot_warmup_ms=warmup_ms,
    )
    return KafkaConsumerThread(settings, lambda batch: None)


# -- the watchdog ------------------------------------------------------------


class FakeRun:
    """Stands in for the thread's body: the first ``deaths`` runs end at once
    (a thread that died), later ones live until released."""

    def __init__(self, deaths: int) -> None:
        self.deaths = deaths
        self.runs = 0
        self.release = threading.Event()

    def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self.deaths:
            return
        self.release.wait(5)


def start_dead(c: KafkaConsumerThread, run: FakeRun) -> None:
    c._run = run  # type: ignore[method-assign]
    c.start()
    assert c._thread is not None
    c._thread.join(2)
    assert not c.alive


def test_watchdog_restarts_a_dead_thread_and_counts_it() -> None:
    c, run = make(), FakeRun(deaths=1)
    start_dead(c, run)
    try:
        c.watchdog()
        assert c.alive
        assert c.restarts == 1
        assert c.healthy and c.health_reason is None
        c.watchdog()  # alive: nothing to do
        assert c.restarts == 1
    finally:
        run.release.set()
        c.stop(2)


def test_watchdog_gives_up_on_a_thread_that_keeps_dying() -> None:
    """Regression: a thread that dies on every start must fail liveness, not
    be restarted forever behind a /health that says ok."""
    c, run = make(), FakeRun(deaths=100)
    start_dead(c, run)
    for _ in range(consumer_module._MAX_RESTARTS):
        c.watchdog()
        assert c._thread is not None
        c._thread.join(2)
        assert c.healthy
    c.watchdog()
    assert not c.healthy
    assert c.health_reason is not None and "died" in c.health_reason
    assert c.restarts == consumer_module._MAX_RESTARTS
    assert not c.ready
    c.watchdog()  # failed for good: no further restarts
    assert c.restarts == consumer_module._MAX_RESTARTS


def test_watchdog_fails_liveness_when_no_thread_can_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, run = make(), FakeRun(deaths=1)
    start_dead(c, run)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    c.watchdog()
    assert not c.healthy
    assert "can't start new thread" in (c.health_reason or "")
    assert c.restarts == 0


def test_watchdog_fails_liveness_when_the_thread_is_stuck() -> None:
    c, run = make(), FakeRun(deaths=0)
    c._run = run  # type: ignore[method-assign]
    c.start()
    try:
        c.watchdog()
        assert c.healthy
        c._beat = time.monotonic() - consumer_module._STALL_S - 1
        c.watchdog()
        assert not c.healthy
        assert "stuck" in (c.health_reason or "")
    finally:
        run.release.set()
        c.stop(2)


def test_watchdog_leaves_a_stopped_consumer_alone() -> None:
    c, run = make(), FakeRun(deaths=1)
    start_dead(c, run)
    c.stop(1)
    c.watchdog()
    assert not c.alive
    assert c.restarts == 0
    assert c.healthy


# -- readiness and the breaker ---------------------------------------------------


def test_ready_survives_an_outage_shorter_than_the_grace() -> None:
    c, run = make(grace_ms=1000), FakeRun(deaths=0)
    c._run = run  # type: ignore[method-assign]
    c.start()
    try:
        c._ready = True
        assert c.ready
        c._down_since = time.monotonic() - 0.5
        assert c.ready
        c._down_since = time.monotonic() - 1.5
        assert not c.ready
        assert c.not_ready_reason().startswith("kafka brokers unreachable for 1.")
        c._down_since = None
        assert c.ready
    finally:
        run.release.set()
        c.stop(2)


@dataclass
class Topic:
    partitions: dict[int, None]
    error: KafkaError | None = None


@dataclass
class Metadata:
    topics: dict[str, Topic]


def uuid_of(n: int) -> Uuid:
    return Uuid(n, n)


@dataclass
class Description:
    topic_id: Uuid


@dataclass
class FakeCluster:
    """What the brokers hold: topic -> (partition count, id, end offset)."""

    topics: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    errored: set[str] = field(default_factory=set)
    down: bool = False
    ids_supported: bool = True
    # Timestamp ListOffsets: topic -> the offset answered (default -1, "no
    # record that new", as a real broker answers for an idle partition), or
    # topics answered with an error.
    by_time: dict[str, int] = field(default_factory=dict)
    by_time_errors: set[str] = field(default_factory=set)


@dataclass
class Answer:
    """A ListOffsets answer with an error (TopicPartition.error is read-only)."""

    topic: str
    partition: int
    offset: int
    error: KafkaError | None = None


class FakeConsumer:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.assigned: dict[tuple[str, int], int] = {}
        self.consumed: dict[tuple[str, int], int] = {}
        self.paused: set[tuple[str, int]] = set()
        self.time_queries: list[int] = []

    def _check(self) -> None:
        if self.cluster.down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "down"))

    def list_topics(self, timeout: float) -> Metadata:
        self._check()
        topics = {
            name: Topic(
                {p: None for p in range(n)},
                KafkaError(KafkaError.LEADER_NOT_AVAILABLE)
                if name in self.cluster.errored
                else None,
            )
            for name, (n, _, _) in self.cluster.topics.items()
        }
        return Metadata(topics)

    def offsets_for_times(
        self, partitions: list[TopicPartition], timeout: float
    ) -> list[TopicPartition]:
        self._check()
        out = []
        for tp in partitions:
            if tp.offset < 0:  # OFFSET_END: the high watermark
                out.append(
                    TopicPartition(
                        tp.topic, tp.partition, self.cluster.topics[tp.topic][2]
                    )
                )
                continue
            self.time_queries.append(tp.offset)  # a timestamp
            if tp.topic in self.cluster.by_time_errors:
                error = KafkaError(KafkaError.UNSUPPORTED_VERSION)
                out.append(Answer(tp.topic, tp.partition, -1, error))  # type: ignore[arg-type]
            else:
                offset = self.cluster.by_time.get(tp.topic, -1)
                out.append(TopicPartition(tp.topic, tp.partition, offset))
        return out

    def incremental_assign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned[(tp.topic, tp.partition)] = tp.offset

    def incremental_unassign(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            del self.assigned[(tp.topic, tp.partition)]
            self.consumed.pop((tp.topic, tp.partition), None)

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(
                tp.topic,
                tp.partition,
                self.consumed.get((tp.topic, tp.partition), -1001),
            )
            for tp in partitions
        ]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.update((tp.topic, tp.partition) for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update((tp.topic, tp.partition) for tp in partitions)


class FakeAdmin:
    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    def describe_topics(self, topics: Any, request_timeout: float) -> dict[str, Future]:
        out: dict[str, Future] = {}
        for name in topics.topic_names:
            future: Future = Future()
            if not self.cluster.ids_supported:
                future.set_exception(
                    KafkaException(KafkaError(KafkaError._UNSUPPORTED_FEATURE))
                )
            elif name not in self.cluster.topics:
                future.set_exception(
                    KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART))
                )
            else:
                future.set_result(Description(uuid_of(self.cluster.topics[name][1])))
            out[name] = future
        return out


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster(
        topics={"trading.pnl": (2, 1, 10), "market-data.prices": (1, 2, 5)}
    )


@pytest.fixture
def kafka(cluster: FakeCluster) -> tuple[KafkaConsumerThread, FakeConsumer, FakeAdmin]:
    return make(), FakeConsumer(cluster), FakeAdmin(cluster)


def probe(kafka: tuple[KafkaConsumerThread, FakeConsumer, FakeAdmin]) -> bool:
    c, consumer, admin = kafka
    return c._probe(consumer, admin)  # type: ignore[arg-type]


def test_partitions_present_at_start_are_read_from_the_end(kafka, cluster) -> None:
    c, consumer, _ = kafka
    assert c.breaker == HALF_OPEN  # nothing confirmed yet
    assert probe(kafka)
    assert c.breaker == CLOSED
    assert consumer.assigned == {
        ("trading.pnl", 0): 10,
        ("trading.pnl", 1): 10,
        ("market-data.prices", 0): 5,
    }
    cluster.topics["risk.violations"] = (1, 3, 7)
    assert probe(kafka)
    assert consumer.assigned[("risk.violations", 0)] == OFFSET_BEGINNING


def test_breaker_opens_pauses_and_closes_after_recovery(kafka, cluster) -> None:
    c, consumer, _ = kafka
    assert probe(kafka)
    cluster.down = True
    assert not probe(kafka)
    assert c.breaker == OPEN
    assert c._down_since is not None
    assert consumer.paused == set(consumer.assigned)
    assert not probe(kafka)  # still down: stays open, no flapping
    assert c.breaker == OPEN
    cluster.down = False
    assert probe(kafka)
    assert c.breaker == CLOSED
    assert c._down_since is None
    assert consumer.paused == set()


def test_recreated_topic_is_read_from_its_beginning(kafka, cluster) -> None:
    """Regression: a memory-only broker that restarts re-creates topics with
    offsets from 0 under the positions we hold; the first records of the new
    log were skipped until the new log grew past the old position."""
    c, consumer, _ = kafka
    assert probe(kafka)
    consumer.consumed[("trading.pnl", 0)] = 12
    cluster.down = True
    assert not probe(kafka)
    cluster.down = False
    cluster.topics["trading.pnl"] = (2, 99, 1)  # a new incarnation, new id
    assert probe(kafka)
    assert consumer.assigned[("trading.pnl", 0)] == OFFSET_BEGINNING
    assert consumer.assigned[("trading.pnl", 1)] == OFFSET_BEGINNING
    assert consumer.assigned[("market-data.prices", 0)] == 5  # untouched


def test_vanished_topic_back_with_a_new_id_starts_over(kafka, cluster) -> None:
    c, consumer, _ = kafka
    assert probe(kafka)
    consumer.consumed[("trading.pnl", 0)] = 12
    del cluster.topics["trading.pnl"]
    assert probe(kafka)
    assert ("trading.pnl", 0) not in consumer.assigned
    cluster.topics["trading.pnl"] = (2, 99, 0)
    assert probe(kafka)
    assert consumer.assigned[("trading.pnl", 0)] == OFFSET_BEGINNING


def test_partitions_paused_in_an_outage_come_back_unpaused(kafka, cluster) -> None:
    """Regression: librdkafka keeps a partition's pause flag across unassign
    and assign (the fake does too); a topic that vanished while the breaker
    was open came back paused, and its events were never delivered."""
    c, consumer, _ = kafka
    assert probe(kafka)
    cluster.down = True
    assert not probe(kafka)
    assert ("trading.pnl", 0) in consumer.paused
    cluster.down = False
    saved = cluster.topics.pop("trading.pnl")
    assert probe(kafka)
    assert c.breaker == CLOSED
    cluster.topics["trading.pnl"] = (saved[0], 42, 0)
    assert probe(kafka)
    assert consumer.assigned[("trading.pnl", 0)] == OFFSET_BEGINNING
    assert not consumer.paused


def test_vanished_topic_back_with_the_same_id_resumes(kafka, cluster) -> None:
    """A topic missing from one metadata answer but the same topic afterwards
    (same id) carries on where it was instead of replaying its history."""
    c, consumer, _ = kafka
    assert probe(kafka)
    consumer.consumed[("trading.pnl", 0)] = 12
    saved = cluster.topics.pop("trading.pnl")
    assert probe(kafka)
    cluster.topics["trading.pnl"] = saved
    assert probe(kafka)
    assert consumer.assigned[("trading.pnl", 0)] == 12
    assert consumer.assigned[("trading.pnl", 1)] == 10  # its start offset


def test_topic_listed_with_an_error_keeps_its_partitions(kafka, cluster) -> None:
    c, consumer, _ = kafka
    assert probe(kafka)
    cluster.errored.add("trading.pnl")
    assert probe(kafka)
    assert consumer.assigned[("trading.pnl", 0)] == 10


def test_without_topic_ids_a_vanished_topic_starts_over(kafka, cluster) -> None:
    c, consumer, _ = kafka
    cluster.ids_supported = False
    assert probe(kafka)
    assert not c._ids_supported
    consumer.consumed[("trading.pnl", 0)] = 12
    saved = cluster.topics.pop("trading.pnl")
    assert probe(kafka)
    cluster.topics["trading.pnl"] = saved
    assert probe(kafka)
    assert consumer.assigned[("trading.pnl", 0)] == OFFSET_BEGINNING


def test_a_rebuilt_consumer_resumes_where_the_last_one_was(kafka, cluster) -> None:
    c, consumer, admin = kafka
    assert probe(kafka)
    consumer.consumed[("trading.pnl", 0)] = 12
    c._remember_positions(consumer)  # type: ignore[arg-type]
    c._assigned = {}
    fresh = FakeConsumer(cluster)
    assert c._probe(fresh, admin)  # type: ignore[arg-type]
    assert fresh.assigned[("trading.pnl", 0)] == 12
    # nothing read yet: where it was assigned, not the beginning
    assert fresh.assigned[("trading.pnl", 1)] == 10


def test_error_events_only_bring_a_probe_forward() -> None:
    """librdkafka queues error events during a blocking probe and serves them
    in the next poll(): a stale _ALL_BROKERS_DOWN must not open the breaker."""
    c = make()
    c._breaker = CLOSED
    c._on_error(KafkaError(KafkaError._ALL_BROKERS_DOWN))
    assert c._all_down
    assert c.breaker == CLOSED
    c._on_error(KafkaError(KafkaError._TRANSPORT))
    assert c._suspect


# -- warm-up (SNAPSHOT_WARMUP) ---------------------------------------------------


def started(c: KafkaConsumerThread) -> FakeRun:
    """A live (fake) thread, so readiness depends on the bookkeeping only."""
    run = FakeRun(deaths=0)
    c._run = run  # type: ignore[method-assign]
    c.start()
    return run


def test_warmup_starts_at_the_window_and_is_ready_once_read(cluster) -> None:
    c = make(warmup_ms=60_000)
    consumer, admin = FakeConsumer(cluster), FakeAdmin(cluster)
    cluster.by_time["trading.pnl"] = 4  # first record of the last minute
    run = started(c)
    try:
        before = int(time.time() * 1000)
        assert c._probe(consumer, admin)  # type: ignore[arg-type]
        after = int(time.time() * 1000)
        # One timestamp query per partition with records, at now - window.
        assert len(consumer.time_queries) == 3
        assert all(
            before - 60_000 <= ts <= after - 60_000 for ts in consumer.time_queries
        )
        assert consumer.assigned == {
            ("trading.pnl", 0): 4,
            ("trading.pnl", 1): 4,
            ("market-data.prices", 0): 5,  # nothing that new: at its end
        }
        assert c._ready and not c.ready
        assert c.not_ready_reason() == (
            "warming up: reading back the last 60000 ms (2 partition(s) to go)"
        )
        consumer.consumed[("trading.pnl", 0)] = 10
        consumer.consumed[("trading.pnl", 1)] = 9
        c._check_warmup(consumer)  # type: ignore[arg-type]
        assert not c.ready
        assert "1 partition(s) to go" in c.not_ready_reason()
        consumer.consumed[("trading.pnl", 1)] = 10
        c._check_warmup(consumer)  # type: ignore[arg-type]
        assert c.ready
    finally:
        run.release.set()
        c.stop(2)


def test_warmup_off_starts_at_the_latest_offset_as_before(cluster) -> None:
    c = make(warmup_ms=0)
    consumer, admin = FakeConsumer(cluster), FakeAdmin(cluster)
    cluster.by_time["trading.pnl"] = 4
    run = started(c)
    try:
        assert c._probe(consumer, admin)  # type: ignore[arg-type]
        assert consumer.time_queries == []
        assert consumer.assigned == {
            ("trading.pnl", 0): 10,
            ("trading.pnl", 1): 10,
            ("market-data.prices", 0): 5,
        }
        assert c.ready
    finally:
        run.release.set()
        c.stop(2)


def test_warmup_with_nothing_in_the_window_is_ready_at_once(kafka) -> None:
    c, consumer, _ = kafka
    run = started(c)
    try:
        assert probe(kafka)
        assert consumer.assigned[("trading.pnl", 0)] == 10
        assert c.ready
    finally:
        run.release.set()
        c.stop(2)


def test_warmup_skips_empty_partitions_and_reads_from_the_beginning_on_error(
    cluster,
) -> None:
    """A partition without records asks nothing; one whose timestamp lookup
    fails is read back from its beginning (the log of a memory-only broker is
    short), never from a guess."""
    cluster.topics["risk.violations"] = (1, 3, 0)  # empty
    cluster.by_time_errors.add("trading.pnl")
    c = make()
    consumer, admin = FakeConsumer(cluster), FakeAdmin(cluster)
    assert c._probe(consumer, admin)  # type: ignore[arg-type]
    assert len(consumer.time_queries) == 3  # not the empty partition
    assert consumer.assigned[("risk.violations", 0)] == 0
    assert consumer.assigned[("trading.pnl", 0)] == OFFSET_BEGINNING
    assert c._warming == {("trading.pnl", 0): 10, ("trading.pnl", 1): 10}


def test_only_partitions_present_at_start_warm_up(kafka, cluster) -> None:
    c, consumer, _ = kafka
    cluster.by_time["trading.pnl"] = 4
    assert probe(kafka)
    cluster.topics["risk.violations"] = (1, 3, 7)
    assert probe(kafka)
    assert consumer.assigned[("risk.violations", 0)] == OFFSET_BEGINNING
    assert set(c._warming) == {("trading.pnl", 0), ("trading.pnl", 1)}


def test_a_rebuilt_consumer_resumes_inside_the_warmup_not_at_its_start(
    kafka, cluster
) -> None:
    """The breaker/restart path is unchanged: a consumer rebuilt during the
    warm-up carries on where the last one was, and readiness still waits for
    the end captured at the first start, not a new one."""
    c, consumer, admin = kafka
    cluster.by_time["trading.pnl"] = 4
    assert probe(kafka)
    consumer.consumed[("trading.pnl", 0)] = 7
    c._remember_positions(consumer)  # type: ignore[arg-type]
    c._assigned = {}
    cluster.topics["trading.pnl"] = (2, 1, 20)  # the log grew meanwhile
    fresh = FakeConsumer(cluster)
    assert c._probe(fresh, admin)  # type: ignore[arg-type]
    assert fresh.time_queries == []  # no second warm-up window
    assert fresh.assigned[("trading.pnl", 0)] == 7
    assert fresh.assigned[("trading.pnl", 1)] == 4
    assert c._warming == {("trading.pnl", 0): 10, ("trading.pnl", 1): 10}
    fresh.consumed[("trading.pnl", 0)] = 10
    fresh.consumed[("trading.pnl", 1)] = 12
    c._check_warmup(fresh)  # type: ignore[arg-type]
    assert c._warming == {}


def test_a_partition_dropped_during_warmup_does_not_hold_readiness(
    kafka, cluster
) -> None:
    c, consumer, _ = kafka
    cluster.by_time["trading.pnl"] = 4
    assert probe(kafka)
    assert c._warming
    cluster.topics["trading.pnl"] = (2, 99, 1)  # re-created: read from the start
    assert probe(kafka)
    assert consumer.assigned[("trading.pnl", 0)] == OFFSET_BEGINNING
    assert c._warming == {}


def test_warmup_failure_to_answer_opens_the_breaker_and_retries(cluster) -> None:
    """The timestamp lookup is part of the first assignment: if the brokers
    do not answer it, nothing is assigned and the next probe tries again."""
    c = make()
    consumer, admin = FakeConsumer(cluster), FakeAdmin(cluster)
    cluster.by_time["trading.pnl"] = 4
    calls = {"n": 0}
    real = consumer.offsets_for_times

    def flaky(partitions: list[TopicPartition], timeout: float) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # the timestamp query of the first assignment
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "slow"))
        return real(partitions, timeout)

    consumer.offsets_for_times = flaky  # type: ignore[method-assign]
    assert not c._probe(consumer, admin)  # type: ignore[arg-type]
    assert c.breaker == OPEN and consumer.assigned == {}
    assert c._probe(consumer, admin)  # type: ignore[arg-type]
    assert consumer.assigned[("trading.pnl", 0)] == 4
    assert set(c._warming) == {("trading.pnl", 0), ("trading.pnl", 1)}
