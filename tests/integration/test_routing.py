"""Kafka -> WebSocket routing: type inference, explicit types, camelCase, timestamps,
routing keys, isolation between assessments, broadcast of market prices, topic
discovery, and starting from the latest offset."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from utils import (
    EVENTS_TOPIC,
    STANDARD_TOPICS,
    TOPIC_TYPES,
    Broker,
    Server,
    client,
    create_topics,
    epoch_ms,
    open_client,
    parse_iso_utc,
    produce,
    produce_many,
    run_server,
    uid,
)

SCOPED_TYPES = {t: ty for t, ty in TOPIC_TYPES.items() if ty != "market_price"}
ALL_TYPES = sorted(TOPIC_TYPES.values())

# Records produced before the server starts; the server must not deliver them.
PRESTART_ASSESSMENT = uid("prestart")
PRESTART_SYMBOL = uid("PRESTART")


def seed_prestart_records(broker: Broker) -> None:
    """Create the topics and put records in them that a server started
    afterwards must not push to anyone."""
    create_topics(broker.bootstrap, STANDARD_TOPICS)
    produce_on_prestart_partitions(broker, old=True)


def produce_on_prestart_partitions(broker: Broker, **fields: Any) -> None:
    """A pnl_update of the pre-start assessment and a price of the pre-start
    symbol, on the partitions the records seeded before start went to."""
    produce(
        broker.bootstrap,
        "trading.pnl",
        {"assessmentId": PRESTART_ASSESSMENT, **fields},
        key=PRESTART_ASSESSMENT,
    )
    produce(
        broker.bootstrap,
        "market-data.prices",
        {"symbol": PRESTART_SYMBOL, **fields},
        key=PRESTART_SYMBOL,
    )


@pytest.fixture(scope="module")
def server(broker: Broker) -> Iterator[Server]:
    """Topics exist and already hold records before the server starts."""
    seed_prestart_records(broker)
    with run_server(broker) as s:
        yield s


def tagged(tag: str) -> Any:
    return lambda m: m.get("tag") == tag


@pytest.mark.parametrize("topic", sorted(SCOPED_TYPES))
async def test_scoped_type_inferred_from_topic(
    server: Server, broker: Broker, topic: str
) -> None:
    """A record without `type` on a topic that names one gets that type, reaches
    the connection of its assessment and carries "assessmentId"."""
    assessment, tag = uid(), uid("tag")
    async with client(server, uid("u"), assessment) as c:
        produce(
            broker.bootstrap,
            topic,
            {"assessmentId": assessment, "tag": tag, "value": 7},
            key=assessment,
        )
        msg = await c.recv_until(tagged(tag))
    assert msg["type"] == SCOPED_TYPES[topic]
    assert msg["assessmentId"] == assessment
    assert msg["value"] == 7


async def test_market_price_type_inferred_from_topic(
    server: Server, broker: Broker
) -> None:
    """A record without `type` on market-data.prices is a market_price."""
    symbol = uid("SYM")
    async with client(server, uid("u"), uid()) as c:
        produce(
            broker.bootstrap,
            "market-data.prices",
            {"symbol": symbol, "price": 101.25},
            key=symbol,
        )
        msg = await c.recv_until(lambda m: m.get("symbol") == symbol)
    assert msg["type"] == "market_price"
    assert msg["price"] == 101.25


@pytest.mark.parametrize("event_type", ALL_TYPES)
async def test_explicit_type_on_neutral_topic(
    server: Server, broker: Broker, event_type: str
) -> None:
    """On a matching topic that implies no type, an explicit `type` is used."""
    assessment, tag = uid(), uid("tag")
    async with client(server, uid("u"), assessment) as c:
        value = {"type": event_type, "tag": tag, "assessmentId": assessment}
        produce(broker.bootstrap, EVENTS_TOPIC, value, key=assessment)
        msg = await c.recv_until(tagged(tag))
    assert msg["type"] == event_type
    if event_type != "market_price":
        assert msg["assessmentId"] == assessment


async def test_snake_case_keys_become_camel_case(
    server: Server, broker: Broker
) -> None:
    """Top-level snake_case keys arrive camelCased with their values intact;
    `assessment_id` routes like `assessmentId` and arrives as "assessmentId"."""
    assessment, tag = uid(), uid("tag")
    value = {
        "assessment_id": assessment,
        "tag": tag,
        "unrealized_pnl": -12.5,
        "realized_pnl": 3,
        "account_balance_usd": 100000.25,
        "open_position_count": 2,
        "symbol_list": ["ES", "NQ"],
        "last_fill": {"qty": 1, "px": 4500.5},
        "currency": "USD",
    }
    async with client(server, uid("u"), assessment) as c:
        produce(broker.bootstrap, "trading.pnl", value, key=assessment)
        msg = await c.recv_until(tagged(tag))
    assert msg["type"] == "pnl_update"
    assert msg["assessmentId"] == assessment
    assert msg["unrealizedPnl"] == -12.5
    assert msg["realizedPnl"] == 3
    assert msg["accountBalanceUsd"] == 100000.25
    assert msg["openPositionCount"] == 2
    assert msg["symbolList"] == ["ES", "NQ"]
    assert msg["lastFill"]["qty"] == 1 and msg["lastFill"]["px"] == 4500.5
    assert msg["currency"] == "USD"
    snake = [k for k in msg if "_" in k]
    assert not snake, f"snake_case keys left: {snake} in {msg}"


async def test_missing_timestamp_filled_from_record_timestamp(
    server: Server, broker: Broker
) -> None:
    """Without `timestamp` the message gets the Kafka record timestamp as ISO-8601
    UTC ending in "Z"."""
    assessment, tag = uid(), uid("tag")
    record_ms = 1_700_000_000_123
    async with client(server, uid("u"), assessment) as c:
        produce(
            broker.bootstrap,
            "trading.positions",
            {"assessmentId": assessment, "tag": tag},
            key=assessment,
            timestamp=record_ms,
        )
        msg = await c.recv_until(tagged(tag))
    ts = msg["timestamp"]
    assert isinstance(ts, str) and ts.endswith("Z"), ts
    assert epoch_ms(parse_iso_utc(ts)) == record_ms, ts


async def test_missing_timestamp_filled_for_market_price(
    server: Server, broker: Broker
) -> None:
    """The fill also applies to market prices (record time = now here)."""
    symbol = uid("SYM")
    async with client(server, uid("u")) as c:
        before = time.time() * 1000
        produce(
            broker.bootstrap,
            "market-data.prices",
            {"symbol": symbol, "price": 1},
            key=symbol,
        )
        msg = await c.recv_until(lambda m: m.get("symbol") == symbol)
        after = time.time() * 1000
    ts = msg["timestamp"]
    assert isinstance(ts, str) and ts.endswith("Z"), ts
    assert before - 5000 <= epoch_ms(parse_iso_utc(ts)) <= after + 5000, ts


async def test_present_timestamp_passed_through(server: Server, broker: Broker) -> None:
    """A `timestamp` in the record is kept as it is."""
    assessment, tag = uid(), uid("tag")
    stamp = "2024-01-02T03:04:05.678Z"
    async with client(server, uid("u"), assessment) as c:
        produce(
            broker.bootstrap,
            "risk.violations",
            {"assessmentId": assessment, "tag": tag, "timestamp": stamp},
            key=assessment,
        )
        msg = await c.recv_until(tagged(tag))
    assert msg["timestamp"] == stamp


async def test_record_key_routes_when_value_has_no_assessment(
    server: Server, broker: Broker
) -> None:
    """Without assessmentId/assessment_id in the value the record key is the
    routing key, and the message carries it as "assessmentId"."""
    assessment, tag = uid(), uid("tag")
    async with client(server, uid("u"), assessment) as c:
        produce(
            broker.bootstrap,
            "risk.rule-status",
            {"tag": tag, "rule": "max_loss", "status": "ok"},
            key=assessment,
        )
        msg = await c.recv_until(tagged(tag))
    assert msg["type"] == "rule_status"
    assert msg["assessmentId"] == assessment
    assert msg["rule"] == "max_loss"


async def test_value_assessment_wins_over_record_key(
    server: Server, broker: Broker
) -> None:
    """assessmentId in the value takes precedence over the record key."""
    target, decoy, tag = uid(), uid(), uid("tag")
    async with (
        client(server, uid("u"), target) as ct,
        client(server, uid("u"), decoy) as cd,
    ):
        produce(
            broker.bootstrap,
            "assessment.status",
            {"assessmentId": target, "tag": tag, "status": "passed"},
            key=decoy,
        )
        msg = await ct.recv_until(tagged(tag))
        assert msg["type"] == "assessment_update" and msg["assessmentId"] == target
        assert await cd.collect_for(0.5, tagged(tag)) == []


async def test_assessments_are_isolated(server: Server, broker: Broker) -> None:
    """Scoped events reach only connections opened with their assessmentId:
    not other assessments, not connections without an assessmentId."""
    a, b, tag = uid(), uid(), uid("tag")
    async with (
        client(server, uid("ua"), a) as ca,
        client(server, uid("ub"), b) as cb,
        client(server, uid("un")) as cn,
    ):
        records = []
        for seq in range(3):
            # One record key for all: one partition, so a total order.
            records.append(
                ("trading.pnl", {"assessmentId": a, "tag": tag, "seq": seq}, tag)
            )
            records.append(
                ("trading.pnl", {"assessmentId": b, "tag": tag, "seq": seq}, tag)
            )
        produce_many(broker.bootstrap, records)
        got_a = await ca.collect(tagged(tag), 3)
        got_b = await cb.collect(tagged(tag), 3)
        extra_a = await ca.collect_for(0.3, tagged(tag))
        extra_b = await cb.collect_for(0.3, tagged(tag))
        extra_n = await cn.collect_for(0.3, tagged(tag))
    assert [(m["assessmentId"], m["seq"]) for m in got_a + extra_a] == [
        (a, 0),
        (a, 1),
        (a, 2),
    ]
    assert [(m["assessmentId"], m["seq"]) for m in got_b + extra_b] == [
        (b, 0),
        (b, 1),
        (b, 2),
    ]
    assert extra_n == []


async def test_every_connection_of_an_assessment_receives(
    server: Server, broker: Broker
) -> None:
    """Several connections (different users) on one assessment all get its event."""
    assessment, tag = uid(), uid("tag")
    async with (
        client(server, uid("u1"), assessment) as c1,
        client(server, uid("u2"), assessment) as c2,
        client(server, uid("u3"), assessment) as c3,
    ):
        produce(
            broker.bootstrap,
            "trading.pnl",
            {"assessmentId": assessment, "tag": tag},
            key=assessment,
        )
        msgs = [await c.recv_until(tagged(tag)) for c in (c1, c2, c3)]
    assert all(m == msgs[0] for m in msgs), msgs


async def test_market_price_reaches_every_connection(
    server: Server, broker: Broker
) -> None:
    """market_price goes to all connections, with or without assessmentId."""
    symbol = uid("SYM")
    async with (
        client(server, uid("u"), uid()) as ca,
        client(server, uid("u"), uid()) as cb,
        client(server, uid("u")) as cn,
    ):
        produce(
            broker.bootstrap,
            "market-data.prices",
            {"symbol": symbol, "bid": 1.1, "ask": 1.2},
            key=symbol,
        )
        msgs = [
            await c.recv_until(lambda m: m.get("symbol") == symbol)
            for c in (ca, cb, cn)
        ]
    for m in msgs:
        assert m["type"] == "market_price" and m["bid"] == 1.1 and m["ask"] == 1.2, m
    assert msgs[0] == msgs[1] == msgs[2]


async def test_events_of_one_partition_arrive_in_order(
    server: Server, broker: Broker
) -> None:
    """Records of one assessment (one key, one partition) arrive in produce order,
    each exactly once."""
    assessment, tag = uid(), uid("tag")
    async with client(server, uid("u"), assessment) as c:
        produce_many(
            broker.bootstrap,
            [
                (
                    "trading.pnl",
                    {"assessmentId": assessment, "tag": tag, "seq": i},
                    assessment,
                )
                for i in range(20)
            ],
            one_batch_each=False,
        )
        got = await c.collect(tagged(tag), 20)
        got += await c.collect_for(0.3, tagged(tag))
    assert [m["seq"] for m in got] == list(range(20))


async def test_topic_created_after_start_is_picked_up_from_beginning(
    server: Server, broker: Broker
) -> None:
    """A matching topic that appears after start is discovered (refresh 500 ms)
    and read from its beginning: records produced before discovery arrive."""
    assessment, tag = uid(), uid("tag")
    topic = f"trading.late-{uid('t')}"
    async with client(server, uid("u"), assessment) as c:
        # Auto-created on produce (4 partitions); all records before discovery.
        produce_many(
            broker.bootstrap,
            [
                (
                    topic,
                    {
                        "type": "pnl_update",
                        "assessmentId": assessment,
                        "tag": tag,
                        "seq": i,
                    },
                    assessment,
                )
                for i in range(3)
            ],
        )
        got = await c.collect(tagged(tag), 3)
        got += await c.collect_for(0.3, tagged(tag))
    assert [m["seq"] for m in got] == [0, 1, 2]
    assert all(
        m["type"] == "pnl_update" and m["assessmentId"] == assessment for m in got
    )


async def test_late_topic_with_several_partitions_fully_delivered(
    server: Server, broker: Broker
) -> None:
    """A late topic whose records name their type via `type`, created explicitly
    with several partitions: every record of every partition arrives."""
    topic = f"risk.late-{uid('t')}"
    create_topics(broker.bootstrap, {topic: 3})
    assessments = [uid() for _ in range(6)]
    tag = uid("tag")
    async with client(server, uid("u")) as watcher:
        clients = [await open_client(server, uid("u"), a) for a in assessments]
        try:
            produce_many(
                broker.bootstrap,
                [
                    (topic, {"type": "violation", "tag": tag, "rule": "r1"}, a)
                    for a in assessments
                ],
            )
            for a, c in zip(assessments, clients, strict=True):
                msg = await c.recv_until(tagged(tag))
                assert msg["type"] == "violation" and msg["assessmentId"] == a
        finally:
            for c in clients:
                await c.close()
        assert await watcher.collect_for(0.2, tagged(tag)) == []


async def test_non_matching_topic_is_ignored(server: Server, broker: Broker) -> None:
    """Topics outside KAFKA_TOPICS (default pattern) are not consumed."""
    symbol = uid("SYM")
    async with client(server, uid("u")) as c:
        produce(
            broker.bootstrap,
            f"audit.{uid('t')}",
            {"type": "market_price", "symbol": symbol},
            key=symbol,
        )
        # give discovery (every 500 ms) several chances to pick it up wrongly
        await asyncio.sleep(1.5)
        marker = uid("MARK")
        produce(broker.bootstrap, "market-data.prices", {"symbol": marker}, key=marker)
        await c.recv_until(lambda m: m.get("symbol") == marker)
        late = await c.collect_for(0.3, lambda m: m.get("symbol") == symbol)
    assert all(m.get("symbol") != symbol for m in c.received), c.received
    assert late == []


async def test_records_from_before_start_are_not_delivered(
    server: Server, broker: Broker
) -> None:
    """The server starts at the latest offset: records produced before it started
    are not delivered; new ones on the same partitions are."""
    tag = uid("tag")
    async with client(server, uid("u"), PRESTART_ASSESSMENT) as c:
        produce_on_prestart_partitions(broker, tag=tag)
        await c.collect(tagged(tag), 2)
        await c.collect_for(0.2)
    old = [m for m in c.received if m.get("old")]
    assert old == [], old


async def test_kafka_topics_setting_selects_topics(
    server: Server, broker: Broker
) -> None:
    """KAFKA_TOPICS (a regex) decides what is consumed: a second server with
    KAFKA_TOPICS=^custom\\..* delivers records of custom.* topics and not those of
    the default topics."""
    feed = f"custom.{uid('feed')}"
    create_topics(broker.bootstrap, {feed: 2})
    with run_server(broker, KAFKA_TOPICS=r"^custom\..*") as custom:
        symbol, ignored = uid("SYM"), uid("SYM")
        async with client(custom, uid("u")) as c:
            produce(
                broker.bootstrap, "market-data.prices", {"symbol": ignored}, key=ignored
            )
            produce(
                broker.bootstrap,
                feed,
                {"type": "market_price", "symbol": symbol},
                key=symbol,
            )
            msg = await c.recv_until(lambda m: m.get("symbol") == symbol)
            await c.collect_for(0.5)
        assert msg["type"] == "market_price"
        assert all(m.get("symbol") != ignored for m in c.received), c.received
