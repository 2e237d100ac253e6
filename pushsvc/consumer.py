"""The Kafka side: one librdkafka consumer on its own thread, batches to the loop.

Why manual assignment and no consumer group: every replica must deliver every
event to the clients connected to *it*. A group shared by the replicas would
split the partitions between them, and a client on replica B would miss what
replica A read. A group per instance would work too, but each join costs
seconds and buys nothing, since nothing is committed: a push service has no
use for a stored offset (a restarted replica starts at the live edge).
So the thread lists the topics, assigns every partition of every matching topic
itself, and re-reads the metadata every ``KAFKA_TOPIC_REFRESH_INTERVAL`` ms to
pick up topics and partitions created later. Partitions present at start are
read from their latest offset; partitions that appear afterwards are read from
their beginning, since everything in them was produced after we started.

Latency: ``consume(n, timeout)`` waits out its whole timeout unless n records
arrive, so the thread blocks in ``poll()`` for the first record only and then
drains what librdkafka already holds with a zero timeout. The batch goes to
the loop in one hand-off (see ``BatchHandoff``): one wake-up per batch.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from .config import Settings

log = logging.getLogger("pushsvc.consumer")

_POLL_TIMEOUT_S = 0.1
_METADATA_TIMEOUT_S = 2.0
_BACKOFF_MIN_S = 0.2
_BACKOFF_MAX_S = 5.0
_ERROR_LOG_INTERVAL_S = 10.0
_LAG_INTERVAL_S = 1.0


def consumer_config(settings: Settings) -> dict[str, Any]:
    """The librdkafka configuration, tuned for latency over throughput."""
    instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return {
        "bootstrap.servers": settings.kafka_brokers,
        "client.id": settings.kafka_client_id,
        # Required by the client, never joined: partitions are assigned by hand.
        "group.id": f"{settings.kafka_group_id}.{instance}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        # librdkafka waits up to 500 ms for fetch.min.bytes by default.
        "fetch.wait.max.ms": settings.kafka_fetch_wait_max_ms,
        "fetch.min.bytes": 1,
        "fetch.error.backoff.ms": 100,
        "socket.nagle.disable": True,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 2000,
        "topic.metadata.refresh.interval.ms": max(
            settings.kafka_topic_refresh_interval_ms, 1000
        ),
        # Connection failures reach error_cb (rate-limited there); librdkafka's
        # own log would repeat each one per broker thread and retry.
        "log_level": 2,
    }


class KafkaConsumerThread:
    """Read every partition of the configured topics; hand batches to a callback.

    :param settings: the service settings (Kafka fields, batch size).
    :param on_batch: called on the consumer thread with each batch (a list of
        confluent-kafka messages); it must be quick and thread safe.
    """

    def __init__(
        self, settings: Settings, on_batch: Callable[[list[Message]], None]
    ) -> None:
        self._settings = settings
        self._on_batch = on_batch
        self._pattern: re.Pattern[str] | None = settings.topic_pattern
        self._names = frozenset(settings.topic_names)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self._assigned: set[tuple[str, int]] = set()
        self._started_at_live_edge = False
        self._resume_at: dict[tuple[str, int], int] = {}
        self._ready = False
        self._lag: list[tuple[str, int, int]] = []
        self._last_error_log = 0.0
        self.batches = 0
        self.records = 0

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the consumer thread (returns at once; see :attr:`ready`)."""
        self._thread = threading.Thread(
            target=self._run, name="pushsvc-kafka", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop consuming and close the consumer (waits up to ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def ready(self) -> bool:
        """True once every matching partition is assigned at a known offset."""
        return self._ready and self.alive

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def assigned(self) -> frozenset[tuple[str, int]]:
        return frozenset(self._assigned)

    # -- the thread ----------------------------------------------------------

    def _run(self) -> None:
        backoff = _BACKOFF_MIN_S
        while not self._stop.is_set():
            try:
                self._consume_until_stopped()
                return
            except Exception:
                # Nothing may end this thread but stop(): log, back off, retry
                # with a fresh consumer.
                log.exception("kafka consumer failed; restarting in %.1fs", backoff)
                self._ready = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _consume_until_stopped(self) -> None:
        settings = self._settings
        config = consumer_config(settings)
        config["error_cb"] = self._on_error
        consumer = Consumer(config)
        self._consumer = consumer
        self._assigned = set()
        refresh_s = settings.kafka_topic_refresh_interval_ms / 1000.0
        batch_size = settings.kafka_batch_size
        backoff = _BACKOFF_MIN_S
        next_refresh = 0.0
        next_lag = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_refresh:
                    try:
                        self._refresh_assignment(consumer)
                        backoff = _BACKOFF_MIN_S
                        next_refresh = now + refresh_s
                    except KafkaException as exc:
                        self._log_error("kafka metadata unavailable: %s", exc)
                        next_refresh = now + backoff
                        backoff = min(backoff * 2, _BACKOFF_MAX_S)
                if not self._started_at_live_edge:
                    self._stop.wait(min(backoff, max(next_refresh - now, 0.01)))
                    continue
                if now >= next_lag:
                    next_lag = now + _LAG_INTERVAL_S
                    self._measure_lag(consumer)
                first = consumer.poll(_POLL_TIMEOUT_S)
                if first is None:
                    continue
                batch = [first]
                if batch_size > 1:
                    batch += consumer.consume(batch_size - 1, 0)
                self.batches += 1
                self.records += len(batch)
                self._on_batch(batch)
        finally:
            self._ready = False
            self._consumer = None
            self._remember_positions(consumer)
            try:
                consumer.close()
            except Exception:  # closing a broken consumer must not mask why
                log.debug("closing the kafka consumer failed", exc_info=True)

    def _matches(self, topic: str) -> bool:
        if topic.startswith("__"):
            return False
        if self._pattern is not None:
            return self._pattern.search(topic) is not None
        return topic in self._names

    def _refresh_assignment(self, consumer: Consumer) -> None:
        metadata = consumer.list_topics(timeout=_METADATA_TIMEOUT_S)
        new: list[tuple[str, int]] = []
        for name, topic in metadata.topics.items():
            if topic.error is not None or not self._matches(name):
                continue
            for partition in topic.partitions:
                if (name, partition) not in self._assigned:
                    new.append((name, partition))
        if new:
            at_start = not self._started_at_live_edge
            partitions = []
            for name, partition in sorted(new):
                resume = self._resume_at.pop((name, partition), -1)
                if resume >= 0:
                    # A restarted consumer carries on where the last one was.
                    partitions.append(TopicPartition(name, partition, resume))
                elif at_start:
                    # An explicit offset, resolved now, rather than OFFSET_END:
                    # readiness then means "everything produced from here on
                    # is delivered", with no window while librdkafka resolves.
                    _, high = consumer.get_watermark_offsets(
                        TopicPartition(name, partition), timeout=_METADATA_TIMEOUT_S
                    )
                    partitions.append(TopicPartition(name, partition, high))
                else:
                    partitions.append(TopicPartition(name, partition, OFFSET_BEGINNING))
            consumer.incremental_assign(partitions)
            self._assigned.update(new)
            log.info(
                "assigned %d partition(s) from %s: %s",
                len(partitions),
                "the latest offset" if at_start else "the beginning",
                ", ".join(f"{t}[{p}]" for t, p in sorted(new)),
            )
        self._started_at_live_edge = True
        self._ready = True

    def _remember_positions(self, consumer: Consumer) -> None:
        try:
            positions = consumer.position(
                [TopicPartition(t, p) for t, p in sorted(self._assigned)]
            )
        except (KafkaException, RuntimeError):
            return
        for tp in positions:
            if tp.offset >= 0:
                self._resume_at[(tp.topic, tp.partition)] = tp.offset

    def _on_error(self, error: KafkaError) -> None:
        self._log_error("kafka: %s", error)

    def _log_error(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.warning(fmt, *args)

    def _measure_lag(self, consumer: Consumer) -> None:
        """Snapshot the lag of every assigned partition (consumer thread only).

        librdkafka's handle is used from this thread alone: confluent-kafka
        calls made from another thread while ``poll()`` runs can block.
        """
        assigned = sorted(self._assigned)
        if not assigned:
            self._lag = []
            return
        positions = consumer.position([TopicPartition(t, p) for t, p in assigned])
        out = []
        for tp in positions:
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                continue
            at = tp.offset if tp.offset >= 0 else high
            out.append((tp.topic, tp.partition, max(high - at, 0)))
        self._lag = out

    def lag(self) -> list[tuple[str, int, int]]:
        """``(topic, partition, lag)`` per assigned partition, at most about
        a second old (measured on the consumer thread)."""
        return list(self._lag)
