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
read from their latest offset, or, with ``SNAPSHOT_WARMUP`` > 0, from the first
offset of that window (warm-up: the records go through ``on_batch`` like any
other, so the router builds its state from them, and :attr:`ready` waits until
every such partition reached the end it had at start); partitions that appear
afterwards are read from their beginning, since everything in them was produced
after we started. Only the first assignment warms up: a rebuilt consumer
resumes where the last one was.

Latency: ``consume(n, timeout)`` waits out its whole timeout unless n records
arrive, so the thread blocks in ``poll()`` for the first record only and then
drains what librdkafka already holds with a zero timeout. The batch goes to
the loop in one hand-off (see ``BatchHandoff``): one wake-up per batch.

Broker faults: a circuit breaker (:data:`CLOSED`, :data:`OPEN`,
:data:`HALF_OPEN`) says whether the brokers answer. The metadata refresh is its
probe: librdkafka's ``_ALL_BROKERS_DOWN`` and ``_TRANSPORT`` errors bring the
next one forward, and a probe that fails opens the breaker. While it is open
every held partition is paused and probes follow each other with a growing
pause; the first one the brokers answer half-opens it, and it closes once the
assignment is re-synced and the partition leaders answer a ListOffsets.
Readiness fails once the brokers have been unreachable for
``KAFKA_UNAVAILABLE_GRACE`` ms, counted from the first sign of it; clients stay
connected throughout.

A broker may come back without the data it had: a memory-only broker (Tansu in
the demo and tests) restarts with no topics, and a topic may be deleted and
re-created. Offsets then restart at 0 under positions we still hold, and (Tansu
does this) a fetch beyond the new end may simply wait instead of failing as out
of range, so the first records of the new log would be skipped silently. Topic
ids tell one incarnation of a topic from the next: a partition whose topic id
changed, or whose topic vanished, is dropped and read again from its beginning
(everything in a new log was produced after we lost the old one). A topic that
vanishes and returns with the *same* id carries on where it was.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from .config import Settings

if TYPE_CHECKING:
    from confluent_kafka.admin._metadata import ClusterMetadata

log = logging.getLogger("pushsvc.consumer")

CLOSED = "closed"
"""Breaker state: the brokers answer; records flow."""
HALF_OPEN = "half_open"
"""Breaker state: probing; the brokers answered metadata, recovery not done yet
(also the state before the first metadata answer)."""
OPEN = "open"
"""Breaker state: the brokers are unreachable; partitions are paused."""
BREAKER_STATES = (CLOSED, HALF_OPEN, OPEN)

_POLL_TIMEOUT_S = 0.1
_METADATA_TIMEOUT_S = 2.0
_BACKOFF_MIN_S = 0.2
_BACKOFF_MAX_S = 5.0
_ERROR_LOG_INTERVAL_S = 10.0
_LAG_INTERVAL_S = 1.0
# The watchdog restarts a dead thread at most this often in this window, then
# gives up and fails liveness: a thread that dies on every start needs a new
# process, not a restart loop.
_MAX_RESTARTS = 5
_RESTART_WINDOW_S = 60.0
# Nothing the thread does blocks for more than a few metadata timeouts; one
# that has not come round its loop for this long is stuck in the client library.
_STALL_S = 60.0
# librdkafka errors that mean "a connection failed": a probe finds out whether
# the cluster as a whole is gone. With one broker of several down they recur
# with every reconnect attempt, hence a probe at most this often for them.
_SUSPECT_PROBE_S = 1.0
_SUSPECT = frozenset(
    {KafkaError._TRANSPORT, KafkaError._RESOLVE, KafkaError._TIMED_OUT}
)
_IDS_UNSUPPORTED = frozenset(
    {KafkaError._UNSUPPORTED_FEATURE, KafkaError.UNSUPPORTED_VERSION}
)


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
        # Every partition starts at an explicit offset, so this applies only
        # when a position we hold falls outside the log: the log was truncated
        # or re-created under us (a memory-only broker restarted, a topic was
        # re-created, retention passed a lagging reader). Everything left in
        # such a log is newer than what we last read, so read it all rather
        # than skip to the end. (Leader-epoch truncation in a real cluster is
        # resolved by librdkafka itself, to the divergence point.)
        "auto.offset.reset": "earliest",
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


def admin_config(settings: Settings) -> dict[str, Any]:
    """The admin client's configuration (it only describes topics, for ids)."""
    return {
        "bootstrap.servers": settings.kafka_brokers,
        "client.id": f"{settings.kafka_client_id}-admin",
        "socket.nagle.disable": True,
        "reconnect.backoff.ms": 100,
        "reconnect.backoff.max.ms": 2000,
        # Its failures surface in the futures it returns; the consumer's
        # error_cb already reports the cluster's state.
        "error_cb": _ignore_error,
        "log_level": 2,
    }


def _ignore_error(error: KafkaError) -> None:
    pass


class KafkaConsumerThread:
    """Read every partition of the configured topics; hand batches to a callback.

    :param settings: the service settings (Kafka fields, batch size,
        ``kafka_unavailable_grace_ms``).
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
        self._grace_s = settings.kafka_unavailable_grace_ms / 1000.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        # (topic, partition) -> the offset it was assigned at (>= 0, or
        # OFFSET_BEGINNING): where to resume when nothing was read from it yet.
        self._assigned: dict[tuple[str, int], int] = {}
        self._started_at_live_edge = False
        self._warmup_ms = settings.snapshot_warmup_ms
        # Warm-up: (topic, partition) -> its high watermark at start, for the
        # partitions not yet read up to it. Kept across a rebuilt consumer
        # (which resumes where the last one was); empty once warm.
        self._warming: dict[tuple[str, int], int] = {}
        self._warmup_began = 0.0
        self._resume_at: dict[tuple[str, int], int] = {}
        self._topic_ids: dict[str, str] = {}
        self._vanished: set[str] = set()
        self._ids_supported = True
        self._ready = False
        self._lag: list[tuple[str, int, int]] = []
        self._last_error_log = 0.0
        # Written by error_cb (which runs inside poll(), on this thread).
        self._all_down = False
        self._suspect = False
        self._fatal: KafkaError | None = None
        # Written on the consumer thread, read anywhere.
        self._breaker = HALF_OPEN
        self._down_since: float | None = None
        self._beat = time.monotonic()
        # Written by the watchdog, on the loop thread.
        self._restart_times: collections.deque[float] = collections.deque()
        self._failed: str | None = None
        self.restarts = 0
        self.batches = 0
        self.records = 0

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the consumer thread (returns at once; see :attr:`ready`)."""
        self._spawn()

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._run, name="pushsvc-kafka", daemon=True)
        self._beat = time.monotonic()
        thread.start()
        self._thread = thread

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop consuming and close the consumer (waits up to ``timeout_s``
        seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def watchdog(self) -> None:
        """Restart the consumer thread if it died; call it periodically.

        Loop thread only. The thread is built never to end before :meth:`stop`,
        so a dead one is a bug or a ``BaseException``: it is restarted, at most
        ``_MAX_RESTARTS`` times in ``_RESTART_WINDOW_S`` seconds. Past that, or
        when no thread can be started, or when the thread is stuck, the
        consumer is failed for good and :attr:`healthy` turns False (liveness
        fails, so the process gets replaced) rather than stall silently.
        """
        thread = self._thread
        if self._stop.is_set() or self._failed is not None or thread is None:
            return
        now = time.monotonic()
        if thread.is_alive():
            stuck = now - self._beat
            if stuck >= _STALL_S:
                self._fail(f"kafka consumer thread stuck for {stuck:.0f}s")
            return
        while self._restart_times and now - self._restart_times[0] > _RESTART_WINDOW_S:
            self._restart_times.popleft()
        if len(self._restart_times) >= _MAX_RESTARTS:
            self._fail(
                f"kafka consumer thread died {len(self._restart_times) + 1} times "
                f"within {_RESTART_WINDOW_S:.0f}s"
            )
            return
        log.error("kafka consumer thread died; restarting it")
        try:
            self._spawn()
        except Exception as exc:  # RuntimeError: can't start new thread
            self._fail(f"cannot restart the kafka consumer thread: {exc}")
            return
        self._restart_times.append(now)
        self.restarts += 1

    def _fail(self, reason: str) -> None:
        self._failed = reason
        self._ready = False
        log.critical("%s: failing liveness (/health 503)", reason)

    @property
    def healthy(self) -> bool:
        """False once the watchdog gave up on the thread (see :meth:`watchdog`)."""
        return self._failed is None

    @property
    def health_reason(self) -> str | None:
        """Why :attr:`healthy` is False, else None."""
        return self._failed

    @property
    def ready(self) -> bool:
        """True while every matching partition is assigned at a known offset,
        the warm-up window has been read, and the brokers have not been
        unreachable for longer than the grace."""
        if not (self._ready and self.alive and self._failed is None) or self._warming:
            return False
        down = self._down_since
        return down is None or time.monotonic() - down < self._grace_s

    def not_ready_reason(self) -> str:
        """Why :attr:`ready` is False (meaningless while it is True)."""
        if self._failed is not None:
            return self._failed
        if not self.alive:
            return "kafka consumer stopped"
        down = self._down_since
        if down is not None:
            return f"kafka brokers unreachable for {time.monotonic() - down:.1f}s"
        if self._ready and self._warming:
            return (
                f"warming up: reading back the last {self._warmup_ms} ms "
                f"({len(self._warming)} partition(s) to go)"
            )
        return "kafka partitions not assigned yet"

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def breaker(self) -> str:
        """The circuit breaker's state: one of :data:`BREAKER_STATES`."""
        return self._breaker

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
        admin = AdminClient(admin_config(settings))
        consumer = Consumer(config)
        self._consumer = consumer
        self._assigned = {}
        self._fatal = None
        refresh_s = settings.kafka_topic_refresh_interval_ms / 1000.0
        # While the breaker is open a probe is sent at most this far apart.
        probe_max_s = min(_BACKOFF_MAX_S, max(refresh_s, _BACKOFF_MIN_S))
        batch_size = settings.kafka_batch_size
        backoff = _BACKOFF_MIN_S
        next_probe = 0.0
        last_probe = 0.0
        next_lag = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self._beat = now
                if self._fatal is not None:
                    raise KafkaException(self._fatal)
                if self._all_down or self._suspect:
                    # Error events may be stale: librdkafka queues them while
                    # a blocking call (a probe) runs and serves them in the
                    # next poll(). So they only bring the next probe forward,
                    # and a failed probe opens the breaker; the grace counts
                    # from the first "all brokers down".
                    if self._breaker == CLOSED:
                        if self._all_down:
                            if self._down_since is None:
                                self._down_since = now
                            soonest = last_probe + _BACKOFF_MIN_S
                        else:
                            soonest = last_probe + _SUSPECT_PROBE_S
                        next_probe = min(next_probe, soonest)
                    self._all_down = self._suspect = False
                if now >= next_probe:
                    last_probe = now
                    if self._probe(consumer, admin):
                        backoff = _BACKOFF_MIN_S
                        next_probe = time.monotonic() + refresh_s
                    else:
                        next_probe = time.monotonic() + backoff
                        backoff = min(backoff * 2, probe_max_s)
                if not self._started_at_live_edge:
                    self._stop.wait(max(next_probe - time.monotonic(), 0.01))
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
                if self._breaker != CLOSED and any(m.error() is None for m in batch):
                    # Records flow again before a probe saw it: probe now.
                    next_probe = 0.0
                self.batches += 1
                self.records += len(batch)
                self._on_batch(batch)
                if self._warming:
                    self._check_warmup(consumer)
        finally:
            self._ready = False
            self._consumer = None
            self._remember_positions(consumer)
            try:
                consumer.close()
            except Exception:  # closing a broken consumer must not mask why
                log.debug("closing the kafka consumer failed", exc_info=True)
            # The admin client has no close(); it is destroyed with its last
            # reference, here.
            del admin

    # -- the breaker ---------------------------------------------------------

    def _probe(self, consumer: Consumer, admin: AdminClient) -> bool:
        """Refresh metadata and the assignment; drive the breaker. True if the
        brokers answered everything asked."""
        recovering = self._breaker != CLOSED
        try:
            metadata = consumer.list_topics(timeout=_METADATA_TIMEOUT_S)
            if recovering:
                self._breaker = HALF_OPEN
            self._sync(consumer, admin, metadata)
            if recovering:
                self._confirm_leaders(consumer)
                self._pause(consumer, resume=True)
        except KafkaException as exc:
            self._open(consumer, str(exc.args[0] if exc.args else exc))
            return False
        down, self._down_since = self._down_since, None
        if recovering:
            self._breaker = CLOSED
            if down is not None:
                log.warning(
                    "kafka reachable again after %.1fs: breaker closed, "
                    "%d partition(s) resumed",
                    time.monotonic() - down,
                    len(self._assigned),
                )
        return True

    def _open(self, consumer: Consumer, why: str) -> None:
        if self._breaker == OPEN:
            self._log_error("kafka still unreachable: %s", why)
            return
        if self._down_since is None:
            self._down_since = time.monotonic()
        self._breaker = OPEN
        # Nothing is fetched until the assignment has been checked against
        # what the brokers hold when they come back (see the module docstring).
        self._pause(consumer, resume=False)
        log.warning(
            "kafka unreachable (%s): breaker open, partitions paused, "
            "/ready 503 after %d ms; clients stay connected",
            why,
            self._settings.kafka_unavailable_grace_ms,
        )

    def _pause(self, consumer: Consumer, *, resume: bool) -> None:
        held = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
        if not held:
            return
        try:
            if resume:
                consumer.resume(held)
            else:
                consumer.pause(held)
        except KafkaException as exc:
            log.warning("kafka %s failed: %s", "resume" if resume else "pause", exc)

    def _confirm_leaders(self, consumer: Consumer) -> None:
        """One ListOffsets to every partition leader: metadata answered by
        one broker does not prove the leaders serve. Raises if none does."""
        held = [TopicPartition(t, p, OFFSET_END) for t, p in sorted(self._assigned)]
        if held:
            consumer.offsets_for_times(held, timeout=_METADATA_TIMEOUT_S)

    # -- the assignment ------------------------------------------------------

    def _matches(self, topic: str) -> bool:
        if topic.startswith("__"):
            return False
        if self._pattern is not None:
            return self._pattern.search(topic) is not None
        return topic in self._names

    def _sync(
        self, consumer: Consumer, admin: AdminClient, metadata: ClusterMetadata
    ) -> None:
        """Make the assignment match the cluster: drop partitions that vanished
        or whose topic was re-created, assign the new ones."""
        present: dict[str, frozenset[int]] = {}
        listed: set[str] = set()
        for name, topic in metadata.topics.items():
            if not self._matches(name):
                continue
            listed.add(name)
            # A topic listed with an error (leader election, say) is left as it
            # is: only a topic the brokers no longer list at all has vanished.
            if topic.error is None:
                present[name] = frozenset(topic.partitions)
        ids = self._describe(admin, sorted(present))
        reborn: set[str] = set()
        for name in present:
            was, now = self._topic_ids.get(name), ids.get(name)
            if (was is not None and now is not None and was != now) or (
                name in self._vanished and (was is None or now is None)
            ):
                reborn.add(name)
        stale = sorted(
            (t, p)
            for t, p in self._assigned
            if t in reborn
            or (t not in listed)
            or (t in present and p not in present[t])
        )
        if stale:
            positions = self._positions(consumer, stale)
            dropped = [TopicPartition(t, p) for t, p in stale]
            # librdkafka keeps a partition's pause flag across unassign and
            # assign: resumed first, so it does not come back paused for good.
            consumer.resume(dropped)
            consumer.incremental_unassign(dropped)
            for key in stale:
                del self._assigned[key]
                self._warming.pop(key, None)
                if key[0] not in reborn:
                    # Vanished: resume here if it comes back as the same topic.
                    self._resume_at[key] = positions[key]
                    self._vanished.add(key[0])
            gone = [f"{t}[{p}]" for t, p in stale if t not in reborn]
            if gone:
                log.warning(
                    "%d partition(s) vanished from the brokers: %s; re-read from "
                    "the beginning if they come back as a new topic",
                    len(gone),
                    ", ".join(gone),
                )
        for name in reborn:
            for key in [k for k in self._resume_at if k[0] == name]:
                del self._resume_at[key]
        for name, topic_id in ids.items():
            self._topic_ids[name] = topic_id
        self._vanished.difference_update(present)
        new = sorted(
            (t, p)
            for t, partitions in present.items()
            for p in partitions
            if (t, p) not in self._assigned
        )
        if new:
            self._assign(consumer, new, reborn)
        self._started_at_live_edge = True
        self._ready = True

    def _assign(
        self, consumer: Consumer, new: list[tuple[str, int]], reborn: set[str]
    ) -> None:
        at_start = not self._started_at_live_edge
        partitions: list[TopicPartition] = []
        latest: list[TopicPartition] = []
        resumed = 0
        for name, partition in new:
            resume = self._resume_at.get((name, partition))
            if resume is not None:
                # A rebuilt consumer, or a topic back with the same id,
                # carries on where the last one was.
                partitions.append(TopicPartition(name, partition, resume))
                resumed += 1
            elif at_start:
                latest.append(TopicPartition(name, partition, OFFSET_END))
            else:
                partitions.append(TopicPartition(name, partition, OFFSET_BEGINNING))
        warming: dict[tuple[str, int], int] = {}
        if latest:
            # An explicit offset, resolved now, rather than OFFSET_END:
            # readiness then means "everything produced from here on is
            # delivered", with no window while librdkafka resolves it. One
            # ListOffsets per leader (a timestamp of OFFSET_END asks for the
            # end), not a round trip per partition.
            ends = consumer.offsets_for_times(latest, timeout=_METADATA_TIMEOUT_S)
            starts = self._warmup_starts(consumer, ends)
            for tp in ends:
                key = (tp.topic, tp.partition)
                offset = (
                    tp.offset if tp.error is None and tp.offset >= 0 else OFFSET_END
                )
                start = starts.get(key, offset)
                if start != offset:
                    warming[key] = offset
                partitions.append(TopicPartition(tp.topic, tp.partition, start))
        consumer.incremental_assign(partitions)
        if warming:
            self._warmup_began = time.monotonic()
            self._warming.update(warming)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._resume_at.pop(key, None)
            # OFFSET_END (an unresolved end) resumes from the beginning: the
            # rare partition whose end was unknown has nothing read from it.
            self._assigned[key] = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
        log.info(
            "assigned %d partition(s) (%d resumed, %d from the %s%s): %s",
            len(partitions),
            resumed,
            len(partitions) - resumed,
            (
                f"warm-up window of {self._warmup_ms} ms "
                f"({len(warming)} with records to read back)"
                if warming
                else "latest offset"
            )
            if at_start
            else "beginning",
            f"; re-created topics: {', '.join(sorted(reborn))}" if reborn else "",
            ", ".join(f"{t}[{p}]" for t, p in new),
        )

    def _warmup_starts(
        self, consumer: Consumer, ends: list[TopicPartition]
    ) -> dict[tuple[str, int], int]:
        """Where the warm-up starts, for each partition whose end (high
        watermark) is known: the first offset whose record is at most
        ``SNAPSHOT_WARMUP`` ms old, else its end (nothing that new).

        Tansu (the embedded broker of the demo and the tests) accepts a
        timestamp ListOffsets but answers its log start for any timestamp,
        even one in the future: there the warm-up reads the whole log, which
        is short since Tansu keeps it in memory. A partition the brokers
        answer with an error is read from its beginning for the same reason.
        Raises KafkaException if the brokers do not answer (the probe fails
        and the assignment is retried).
        """
        if self._warmup_ms <= 0:
            return {}
        known = {
            (tp.topic, tp.partition): tp.offset
            for tp in ends
            if tp.error is None and tp.offset > 0
        }
        if not known:
            return {}
        since_ms = int(time.time() * 1000) - self._warmup_ms
        query = [TopicPartition(t, p, since_ms) for t, p in known]
        starts: dict[tuple[str, int], int] = {}
        for tp in consumer.offsets_for_times(query, timeout=_METADATA_TIMEOUT_S):
            key = (tp.topic, tp.partition)
            end = known[key]
            if tp.error is not None:
                starts[key] = OFFSET_BEGINNING
            elif tp.offset < 0:  # OFFSET_END: no record that new
                starts[key] = end
            else:
                starts[key] = min(tp.offset, end)
        return starts

    def _check_warmup(self, consumer: Consumer) -> None:
        """Drop the partitions whose position reached their end at start from
        the warm-up; log once it is over (consumer thread only)."""
        try:
            positions = consumer.position(
                [TopicPartition(t, p) for t, p in sorted(self._warming)]
            )
        except (KafkaException, RuntimeError):
            return
        for tp in positions:
            key = (tp.topic, tp.partition)
            end = self._warming.get(key)
            if end is not None and tp.offset >= end:
                del self._warming[key]
        if not self._warming:
            log.info(
                "warm-up done: the last %d ms read back in %.2fs",
                self._warmup_ms,
                time.monotonic() - self._warmup_began,
            )

    def _describe(self, admin: AdminClient, names: list[str]) -> dict[str, str]:
        """Topic ids by name (topics without one, or brokers without topic
        ids, are left out). Raises KafkaException if the brokers do not answer."""
        if not names or not self._ids_supported:
            return {}
        futures = admin.describe_topics(
            TopicCollection(names), request_timeout=_METADATA_TIMEOUT_S
        )
        ids: dict[str, str] = {}
        for name, future in futures.items():
            try:
                description = future.result(timeout=_METADATA_TIMEOUT_S + 1.0)
            except FutureTimeout:
                raise KafkaException(
                    KafkaError(KafkaError._TIMED_OUT, "describe_topics timed out")
                ) from None
            except KafkaException as exc:
                code = exc.args[0].code() if exc.args else None
                if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    continue  # deleted since the metadata listed it
                if code in _IDS_UNSUPPORTED:
                    self._ids_supported = False
                    log.warning(
                        "the brokers do not describe topics (%s): re-created "
                        "topics are only noticed when they vanish for a while",
                        exc,
                    )
                    return {}
                raise
            topic_id = description.topic_id
            if topic_id is None or (
                topic_id.get_most_significant_bits() == 0
                and topic_id.get_least_significant_bits() == 0
            ):
                continue
            ids[name] = str(topic_id)
        return ids

    def _positions(
        self, consumer: Consumer, keys: list[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        """Where to resume each partition: after the last record read, else
        the offset it was assigned at."""
        out = {key: self._assigned[key] for key in keys}
        try:
            positions = consumer.position([TopicPartition(t, p) for t, p in keys])
        except (KafkaException, RuntimeError):
            return out
        for tp in positions:
            if tp.offset >= 0:
                out[(tp.topic, tp.partition)] = tp.offset
        return out

    def _remember_positions(self, consumer: Consumer) -> None:
        self._resume_at.update(self._positions(consumer, sorted(self._assigned)))

    def _on_error(self, error: KafkaError) -> None:
        code = error.code()
        if error.fatal():
            self._fatal = error
        elif code == KafkaError._ALL_BROKERS_DOWN:
            self._all_down = True
        elif code in _SUSPECT:
            self._suspect = True
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
