"""read_back against a real (embedded Tansu) broker: exact ranges, empty ranges,
two partitions, the timeout."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer

from pushsvc.broker import EmbeddedBroker
from pushsvc.config import Settings
from pushsvc.readback import read_back

SECRET = "x" * 32
TOPIC = "trading.readback"
BASE_TS = 1_700_000_000_000


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        b.create_topics([TOPIC], partitions=2)
        producer = Producer({"bootstrap.servers": b.bootstrap, "linger.ms": 0})
        # One flush per record: Tansu's high watermark is unreliable for
        # multi-record batches.
        for partition, count in ((0, 10), (1, 4)):
            for i in range(count):
                producer.produce(
                    TOPIC,
                    value=f"v{partition}-{i}".encode(),
                    key=f"k{i}".encode() if i % 2 == 0 else None,
                    partition=partition,
                    timestamp=BASE_TS + partition * 1000 + i,
                )
                assert producer.flush(10) == 0
        yield b


@pytest.fixture(scope="module")
def settings(broker: EmbeddedBroker) -> Settings:
    return Settings(jwt_secret=SECRET, kafka_brokers=broker.bootstrap)


def test_exact_range(settings: Settings) -> None:
    got = read_back(settings, [(TOPIC, 0, 3, 7)])
    assert got == [
        (
            TOPIC,
            0,
            i,
            f"v0-{i}".encode(),
            f"k{i}".encode() if i % 2 == 0 else None,
            BASE_TS + i,
        )
        for i in range(3, 7)
    ]


def test_whole_partition_and_single_record(settings: Settings) -> None:
    assert [r[2] for r in read_back(settings, [(TOPIC, 0, 0, 10)])] == list(range(10))
    assert read_back(settings, [(TOPIC, 0, 9, 10)]) == [
        (TOPIC, 0, 9, b"v0-9", None, BASE_TS + 9)
    ]


def test_empty_ranges_read_nothing(settings: Settings) -> None:
    assert read_back(settings, []) == []
    assert read_back(settings, [(TOPIC, 0, 5, 5)]) == []
    assert read_back(settings, [(TOPIC, 0, 7, 3)]) == []
    # Mixed with a non-empty one: only that one is read.
    got = read_back(settings, [(TOPIC, 0, 4, 4), (TOPIC, 1, 1, 2)])
    assert [(r[1], r[2]) for r in got] == [(1, 1)]


def test_two_partitions_each_in_offset_order(settings: Settings) -> None:
    got = read_back(settings, [(TOPIC, 1, 0, 4), (TOPIC, 0, 8, 10)])
    assert [(r[1], r[2], r[3]) for r in got] == [
        (1, 0, b"v1-0"),
        (1, 1, b"v1-1"),
        (1, 2, b"v1-2"),
        (1, 3, b"v1-3"),
        (0, 8, b"v0-8"),
        (0, 9, b"v0-9"),
    ]
    assert [r[5] for r in got[:4]] == [BASE_TS + 1000 + i for i in range(4)]


def test_timeout_when_the_range_is_not_there(settings: Settings) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"trading\.readback\[1\] at 4 of 9"):
        read_back(settings, [(TOPIC, 1, 2, 9)], timeout_s=0.5)
    assert time.monotonic() - started < 3.0


def test_bad_ranges_are_refused(settings: Settings) -> None:
    with pytest.raises(ValueError, match="negative"):
        read_back(settings, [(TOPIC, 0, -1, 3)])
    with pytest.raises(ValueError, match="more than once"):
        read_back(settings, [(TOPIC, 0, 0, 3), (TOPIC, 0, 5, 6)])
