"""Resume positions in the compiled router: the token's format, the vector each
message carries, its independence from how records were cut into batches, and
the bounded memory behind resume and the snapshot."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from picows.picows import WSTransport

from pushsvc._router import Connection, Router, decode_pos, encode_pos

from .fakes import FakeClients, FakeRecord, RecordingTransport

# Record times a minute ago: positions carry them, and resume refuses old ones.
T0 = int(time.time() * 1000) - 60_000
TOPICS = ("trading.pnl", "trading.positions", "risk.rule-status")


def reference_token(vector: dict[int, int], issued_s: int) -> str:
    """The documented format: version 1, varint seconds, then (varint partition
    key, varint offset) pairs in key order, base64url without padding."""
    out = bytearray([1])

    def varint(value: int) -> None:
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)

    varint(max(issued_s, 0))
    for key in sorted(vector):
        varint(key)
        varint(max(vector[key], 0))
    return base64.urlsafe_b64encode(bytes(out)).rstrip(b"=").decode()


def pkey(topic: str, partition: int) -> int:
    return ((zlib.crc32(topic.encode()) & 0xFFFFFF) << 20) | partition


def frames(raw: RecordingTransport) -> Iterator[dict[str, Any]]:
    """Every server frame written to ``raw`` (writes may hold several)."""
    data = b"".join(raw.written)
    at = 0
    while at < len(data):
        size = data[at + 1] & 0x7F
        head = 2
        if size == 126:
            size, head = int.from_bytes(data[at + 2 : at + 4], "big"), 4
        elif size == 127:
            size, head = int.from_bytes(data[at + 2 : at + 10], "big"), 10
        yield orjson.loads(data[at + head : at + head + size])
        at += head + size


def assessment_messages(raw: RecordingTransport) -> list[dict[str, Any]]:
    skip = {"connected", "snapshot", "resync_required", "market_price"}
    return [m for m in frames(raw) if m["type"] not in skip]


def record(
    topic: str, partition: int, offset: int, ts_ms: int, room: str = "a1"
) -> FakeRecord:
    value = orjson.dumps(
        {"assessment_id": room, "seq": f"{topic}/{partition}/{offset}"}
    )
    return FakeRecord(value, topic, partition, offset, ts_ms)


def as_fetched(records: list[FakeRecord]) -> list[FakeRecord]:
    """A batch as librdkafka hands it over: in runs of one partition."""
    return sorted(records, key=lambda r: (r.topic(), r.partition(), r.offset()))


def stream(count: int, partitions: int = 2) -> list[FakeRecord]:
    """``count`` records of assessment a1 over three topics, one per ms."""
    offsets: dict[tuple[str, int], int] = {}
    out = []
    for i in range(count):
        where = (TOPICS[i % 3], (i // 3) % partitions)
        offsets[where] = offsets.get(where, -1) + 1
        out.append(record(*where, offsets[where], T0 + i))
    return out


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def clients(loop: asyncio.AbstractEventLoop) -> Iterator[FakeClients]:
    made = FakeClients(Router(), loop)
    yield made
    made.close()


@settings(max_examples=300, deadline=None)
@given(
    vector=st.dictionaries(
        st.integers(0, 2**44 - 1), st.integers(-5, 2**62), max_size=40
    ),
    issued=st.integers(-5, 2**40),
)
def test_the_token_is_the_documented_format_and_decodes_back(
    vector: dict[int, int], issued: int
) -> None:
    token = encode_pos(vector, issued)
    assert token == reference_token(vector, issued)
    assert decode_pos(token) == (
        max(issued, 0),
        {key: max(offset, 0) for key, offset in vector.items()},
    )


def test_every_assessment_message_carries_the_vector_after_it_as_its_last_field(
    clients: FakeClients,
) -> None:
    _, _, raw = clients.connect("u1", "a1")
    records = stream(12)
    clients.router.deliver(as_fetched(records))
    received = assessment_messages(raw)
    # Routed in record-time order across partitions, not in fetch order.
    assert [m["seq"] for m in received] == [
        orjson.loads(r.value())["seq"] for r in records
    ]
    vector: dict[int, int] = {}
    for message, rec in zip(received, records):
        vector[pkey(rec.topic(), rec.partition())] = rec.offset()
        assert list(message)[-1] == "pos"
        assert message["pos"] == encode_pos(vector, rec.timestamp()[1] // 1000)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cuts=st.lists(st.integers(1, 29), max_size=6, unique=True))
def test_positions_do_not_depend_on_where_batches_were_cut(
    loop: asyncio.AbstractEventLoop, cuts: list[int]
) -> None:
    """Two replicas whose fetches cut the same stream at different times give
    every message the same pos."""
    records = stream(30, partitions=3)
    seen = []
    for bounds in ([], sorted(cuts)):
        made = FakeClients(Router(), loop)
        try:
            _, _, raw = made.connect("u1", "a1")
            start = 0
            for end in [*bounds, len(records)]:
                made.router.deliver(as_fetched(records[start:end]))
                start = end
            seen.append([(m["seq"], m["pos"]) for m in assessment_messages(raw)])
        finally:
            made.close()
    assert seen[0] == seen[1]
    assert len(seen[0]) == 30


def test_a_replica_warmed_from_history_positions_messages_as_a_live_one(
    clients: FakeClients, loop: asyncio.AbstractEventLoop
) -> None:
    records = stream(20, partitions=2)
    _, _, live_raw = clients.connect("u1", "a1")
    clients.router.deliver(as_fetched(records))
    live = [(m["seq"], m["pos"]) for m in assessment_messages(live_raw)]

    warm = FakeClients(Router(), loop)
    try:
        ready = False
        warm.router.live_check = lambda: ready
        for part in (records[:7], records[7:]):  # read back in two fetches
            warm.router.deliver(as_fetched(part))
        ready = True
        # A client that saw nothing yet resumes from the empty position: the
        # replay from memory carries the positions a live replica gave.
        empty = encode_pos({}, T0 // 1000)
        raw = connect_with_since(warm, "a1", empty)
        replayed = [(m["seq"], m["pos"]) for m in assessment_messages(raw)]
    finally:
        warm.close()
    assert replayed == live


def test_a_partition_whose_times_go_backwards_keeps_its_offset_order(
    clients: FakeClients,
) -> None:
    _, _, raw = clients.connect("u1", "a1")
    batch = [
        record("trading.pnl", 0, 0, T0 + 50),
        record("trading.pnl", 0, 1, T0 + 10),  # a producer clock stepped back
        record("trading.positions", 0, 0, T0 + 20),
        record("trading.positions", 0, 1, T0 + 60),
    ]
    clients.router.deliver(batch)
    order = [m["seq"] for m in assessment_messages(raw)]
    assert order.index("trading.pnl/0/0") < order.index("trading.pnl/0/1")
    assert order.index("trading.positions/0/0") < order.index("trading.positions/0/1")
    assert sorted(order) == sorted(orjson.loads(r.value())["seq"] for r in batch)


def connect_with_since(made: FakeClients, room: str, since: str) -> RecordingTransport:
    raw = RecordingTransport(made._fd)
    transport = WSTransport(
        False, raw, logging.LoggerAdapter(logging.getLogger("t"), {}), made._loop
    )
    Connection(made.router, "u-resume", room, since=since).on_ws_connected(transport)
    return raw


def test_the_resume_buffer_is_bounded_and_counted(
    loop: asyncio.AbstractEventLoop,
) -> None:
    made = FakeClients(Router(resume_buffer_size=4), loop)
    readbacks: list[Any] = []
    made.router.on_readback = lambda conn, ranges, vector, events: readbacks.append(
        ranges
    )
    try:
        _, _, raw = made.connect("u1", "a1")
        records = [record("trading.pnl", 0, i, T0 + i) for i in range(10)]
        made.router.deliver(records)
        sent = assessment_messages(raw)
        stats = made.router.stats()
        assert stats["resume_buffer_entries"] == 4
        assert stats["resume_buffer_evictions"] == 6
        # Kept as sent; orjson writes these messages back byte for byte.
        kept = [orjson.dumps(m) for m in sent[6:]]
        assert stats["resume_buffer_bytes"] == sum(len(p) for p in kept)

        # After message 7 of 10: the last three come from memory, exactly.
        raw_back = connect_with_since(made, "a1", sent[6]["pos"])
        messages = list(frames(raw_back))
        assert messages[0]["type"] == "connected" and messages[0]["resumed"] is True
        assert [m["seq"] for m in messages[1:]] == [m["seq"] for m in sent[7:]]
        assert [m["pos"] for m in messages[1:]] == [m["pos"] for m in sent[7:]]
        assert made.router.stats()["resumes"]["memory"] == 1

        # After message 2: the buffer no longer has 3..6, so Kafka is asked
        # for the partition from offset 2 up to the live position.
        connect_with_since(made, "a1", sent[1]["pos"])
        assert readbacks == [[("trading.pnl", 0, 2, 10)]]
    finally:
        made.close()


def test_snapshot_state_keeps_the_recently_updated_assessments(
    loop: asyncio.AbstractEventLoop,
) -> None:
    made = FakeClients(Router(state_max_assessments=4), loop)
    try:
        offset = 0

        def update(room: str) -> None:
            nonlocal offset
            made.router.deliver([record("trading.pnl", 0, offset, T0 + offset, room)])
            offset += 1

        for room in ("a1", "a2", "a3", "a4", "a1", "a5"):
            update(room)
        assert made.router.stats()["state_assessments"] == 4
        assert made.router.stats()["state_evictions"] == 1

        def snapshot_pnl(room: str) -> Any:
            _, _, raw = made.connect("u", room)
            snap = [m for m in frames(raw) if m["type"] == "snapshot"][0]
            return snap["pnl"]

        # a1 was updated again just before a5 arrived: a2 is the one dropped.
        assert snapshot_pnl("a2") is None
        for room in ("a1", "a3", "a4", "a5"):
            assert snapshot_pnl(room)["assessmentId"] == room
            assert "pos" not in snapshot_pnl(room)
    finally:
        made.close()
