"""Read a range of Kafka records back, for resume (docs/design-resume.md).

A short-lived librdkafka consumer, assigned by hand at the first offset of each
range (no group is joined, nothing is committed), that reads until every range
is complete or a deadline passes. It blocks: the caller runs it in an executor
thread, never on the event loop.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from .config import Settings

Record = tuple[str, int, int, bytes | None, bytes | None, int]
"""``(topic, partition, offset, value, key, timestamp_ms)``."""

# consume() returns early once it holds this many records (it is asked for the
# number still missing, so it rarely waits at all); otherwise after this long,
# so the deadline and positions are looked at often.
_MAX_BATCH = 10_000
_SLICE_S = 0.1
# librdkafka's own default (500 ms) would add up to half a second per fetch.
_FETCH_WAIT_MAX_MS = 10


def readback_config(settings: Settings) -> dict[str, Any]:
    """The configuration of a read-back consumer."""
    return {
        "bootstrap.servers": settings.kafka_brokers,
        "client.id": f"{settings.kafka_client_id}-readback",
        # Required by the client, never joined: partitions are assigned by hand.
        "group.id": f"{settings.kafka_group_id}.readback.{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": False,
        # A start offset outside the log (retention passed it, the log was
        # re-created) must not be silently moved: the range would come back
        # with a hole. The reset error is reported instead, and the read ends
        # with TimeoutError naming it.
        "auto.offset.reset": "error",
        "fetch.wait.max.ms": min(settings.kafka_fetch_wait_max_ms, _FETCH_WAIT_MAX_MS),
        "fetch.min.bytes": 1,
        "socket.nagle.disable": True,
        "log_level": 2,
    }


def read_back(
    settings: Settings,
    ranges: list[tuple[str, int, int, int]],
    *,
    timeout_s: float = 5.0,
) -> list[Record]:
    """Records [start, end) of each (topic, partition, start, end), as
    (topic, partition, offset, value, key, timestamp_ms), in per-partition offset order.

    Partitions come out in the order of ``ranges``, each one's records in
    offset order. A range with ``start >= end`` reads nothing (and opens no
    connection if no range has anything to read). Offsets missing inside a
    range (compaction, transaction markers) are simply absent. ``timestamp_ms``
    is the record's timestamp in epoch milliseconds, 0 when it has none.

    Blocking: call it from an executor thread.

    :param timeout_s: the whole read must finish within this many seconds.
    :raises ValueError: a negative start offset, or a partition given twice.
    :raises TimeoutError: not every range was complete within ``timeout_s``
        (the message names the incomplete partitions and the last error seen).
    :raises KafkaException: librdkafka reported a fatal error.
    """
    wanted: dict[tuple[str, int], tuple[int, int]] = {}
    for topic, partition, start, end in ranges:
        key = (topic, partition)
        if start < 0:
            raise ValueError(f"{topic}[{partition}]: start offset {start} is negative")
        if key in wanted:
            raise ValueError(f"{topic}[{partition}] is given more than once")
        wanted[key] = (start, end)
    # Next offset expected, per partition still to read.
    pending = {key: start for key, (start, end) in wanted.items() if start < end}
    if not pending:
        return []
    ends = {key: wanted[key][1] for key in pending}
    found: dict[tuple[str, int], list[Record]] = {key: [] for key in pending}
    errors: list[KafkaError] = []
    fatal: list[KafkaError] = []

    def on_error(error: KafkaError) -> None:
        (fatal if error.fatal() else errors).append(error)

    config = readback_config(settings)
    config["error_cb"] = on_error
    deadline = time.monotonic() + timeout_s
    consumer = Consumer(config)
    try:
        consumer.assign(
            [TopicPartition(t, p, start) for (t, p), start in pending.items()]
        )
        while pending:
            if fatal:
                raise KafkaException(fatal[0])
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(_timeout_message(timeout_s, pending, ends, errors))
            missing = sum(ends[key] - at for key, at in pending.items())
            batch = consumer.consume(
                max(1, min(missing, _MAX_BATCH)), min(remaining, _SLICE_S)
            )
            done: list[tuple[str, int]] = []
            for msg in batch:
                error = msg.error()
                if error is not None:
                    if error.fatal():
                        raise KafkaException(error)
                    errors.append(error)
                    continue
                name, number, offset = msg.topic(), msg.partition(), msg.offset()
                if name is None or number is None or offset is None:
                    continue
                key = (name, number)
                at = pending.get(key)
                if at is None or offset < at:
                    continue  # a partition already complete, or a re-fetch
                end = ends[key]
                if offset < end:
                    ts_type, ts = msg.timestamp()
                    found[key].append(
                        (
                            key[0],
                            key[1],
                            offset,
                            msg.value(),
                            msg.key(),
                            ts if ts_type != TIMESTAMP_NOT_AVAILABLE else 0,
                        )
                    )
                pending[key] = offset + 1
                if offset + 1 >= end:
                    done.append(key)
            if not batch:
                # The last offsets of a range may hold no record the client
                # sees (a transaction marker): the position moves past them.
                try:
                    positions = consumer.position(
                        [TopicPartition(t, p) for t, p in pending]
                    )
                except KafkaException:
                    positions = []
                for tp in positions:
                    key = (tp.topic, tp.partition)
                    if tp.offset >= ends[key]:
                        done.append(key)
            if done:
                for key in done:
                    pending.pop(key, None)
                if pending:
                    # Stop fetching past the end of the finished ones.
                    consumer.pause([TopicPartition(t, p) for t, p in done])
    finally:
        consumer.close()
    out: list[Record] = []
    for key in wanted:
        out.extend(found.get(key, ()))
    return out


def _timeout_message(
    timeout_s: float,
    pending: dict[tuple[str, int], int],
    ends: dict[tuple[str, int], int],
    errors: list[KafkaError],
) -> str:
    parts = ", ".join(
        f"{t}[{p}] at {at} of {ends[(t, p)]}" for (t, p), at in sorted(pending.items())
    )
    last = f"; last error: {errors[-1]}" if errors else ""
    return f"read-back incomplete after {timeout_s:g}s: {parts}{last}"
