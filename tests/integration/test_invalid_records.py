"""Invalid Kafka records are dropped, counted by reason, and do not block the
records after them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from utils import (
    EVENTS_TOPIC,
    Broker,
    Server,
    ascrape,
    client,
    produce_many,
    uid,
    wait_for_metric,
)

DROPPED = "websocket_kafka_events_dropped_total"

# reason -> invalid record values (topic, value); the record key is the test's
# assessment so that the valid record after them lands on the same partition.
INVALID: dict[str, list[tuple[str, Any]]] = {
    "invalid_json": [
        ("trading.pnl", b"{not json"),
        ("trading.pnl", b"\xff\xfe\x00garbage"),
        ("trading.pnl", b'{"assessmentId": "@KEY", '),
    ],
    "not_object": [
        ("trading.pnl", b"[1, 2, 3]"),
        ("trading.pnl", b"42"),
        ("trading.pnl", b'"a string"'),
        ("trading.pnl", b"null"),
    ],
    "unknown_type": [
        (EVENTS_TOPIC, {"type": "no_such_type", "assessmentId": "@KEY"}),
        (EVENTS_TOPIC, {"assessmentId": "@KEY", "note": "no type, topic names none"}),
    ],
}


def _fill(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {k: (key if v == "@KEY" else v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("reason", sorted(INVALID))
async def test_invalid_record_not_delivered_next_one_is(
    server: Server, broker: Broker, reason: str
) -> None:
    """Invalid records (bad JSON, non-objects, unknown types) are not delivered,
    and a valid record produced after them (same partition) still arrives."""
    assessment, tag = uid(), uid("tag")
    async with client(server, uid("u"), assessment) as c:
        records = [
            (topic, _fill(value, assessment), assessment)
            for topic, value in INVALID[reason]
        ]
        records.append(
            ("trading.pnl", {"assessmentId": assessment, "tag": tag}, assessment)
        )
        produce_many(broker.bootstrap, records)
        msg = await c.recv_until(lambda m: m.get("tag") == tag)
        await c.collect_for(0.2)
    assert msg["type"] == "pnl_update" and msg["assessmentId"] == assessment
    assert [m for m in c.received if m.get("type") != "ping"] == [msg]


async def test_scoped_record_without_assessment_not_delivered(
    server: Server, broker: Broker
) -> None:
    """Assessment-scoped records with no assessmentId/assessment_id and no key
    reach nobody (neither scoped nor unscoped connections); a valid record after
    them still arrives."""
    assessment, tag, valid_tag = uid(), uid("tag"), uid("tag")
    async with (
        client(server, uid("u"), assessment) as c,
        client(server, uid("n")) as cn,
    ):
        produce_many(broker.bootstrap, _keyless_scoped(tag))
        produce_many(
            broker.bootstrap,
            [
                (
                    "trading.pnl",
                    {"assessmentId": assessment, "tag": valid_tag},
                    assessment,
                )
            ],
        )
        await c.recv_until(lambda m: m.get("tag") == valid_tag)
        await c.collect_for(0.3)
        await cn.collect_for(0.1)
    assert [m for m in c.received + cn.received if m.get("tag") == tag] == []


def _keyless_scoped(tag: str) -> list[tuple[str, Any, str | None]]:
    return [
        ("trading.pnl", {"unrealized_pnl": 1.0, "tag": tag}, None),
        ("risk.violations", {"rule": "x", "tag": tag}, None),
        (EVENTS_TOPIC, {"type": "position_update", "tag": tag}, None),
    ]


async def test_market_stream_survives_invalid_records(
    server: Server, broker: Broker
) -> None:
    """Invalid records interleaved with market prices on one partition: every
    valid price arrives, in order, exactly once."""
    symbol = uid("SYM")
    records: list[tuple[str, Any, str | None]] = []
    for i in range(5):
        records.append(("market-data.prices", {"symbol": symbol, "seq": i}, symbol))
        records.append(("market-data.prices", b"<<not json>>", symbol))
        records.append(("market-data.prices", b"[]", symbol))
    async with client(server, uid("u")) as c:
        produce_many(broker.bootstrap, records)
        got = await c.collect(lambda m: m.get("symbol") == symbol, 5)
        got += await c.collect_for(0.3, lambda m: m.get("symbol") == symbol)
    assert [m["seq"] for m in got] == list(range(5))
    assert all(m["type"] == "market_price" for m in got)


# Metric checks last: the behaviour above does not depend on /metrics.


@pytest.mark.parametrize("reason", sorted(INVALID))
async def test_dropped_records_counted_by_reason(
    server: Server, broker: Broker, reason: str
) -> None:
    """Each dropped record adds exactly one to
    websocket_kafka_events_dropped_total{reason=...}."""
    assessment, tag = uid(), uid("tag")
    before = (await ascrape(server)).value(DROPPED, reason=reason)
    invalid = INVALID[reason]
    async with client(server, uid("u"), assessment) as c:
        records = [
            (topic, _fill(value, assessment), assessment) for topic, value in invalid
        ]
        records.append(
            ("trading.pnl", {"assessmentId": assessment, "tag": tag}, assessment)
        )
        produce_many(broker.bootstrap, records)
        await c.recv_until(lambda m: m.get("tag") == tag)
    want = before + len(invalid)
    await wait_for_metric(
        server,
        lambda m: m.value(DROPPED, reason=reason) >= want,
        what=f"{reason} >= {want}",
    )
    await asyncio.sleep(0.2)
    assert (await ascrape(server)).value(DROPPED, reason=reason) == want


async def test_empty_value_counted_as_invalid_json(
    server: Server, broker: Broker
) -> None:
    """An empty record value is not JSON: it is dropped and counted with
    reason="invalid_json" (one of the four reasons of the contract)."""
    assessment, tag = uid(), uid("tag")
    scraped = await ascrape(server)
    before, before_all = (
        scraped.value(DROPPED, reason="invalid_json"),
        scraped.value(DROPPED),
    )
    async with client(server, uid("u"), assessment) as c:
        produce_many(
            broker.bootstrap,
            [
                ("trading.pnl", b"", assessment),
                ("trading.pnl", {"assessmentId": assessment, "tag": tag}, assessment),
            ],
        )
        await c.recv_until(lambda m: m.get("tag") == tag)
    assert [m for m in c.received if m.get("type") != "ping"][0]["tag"] == tag
    metrics = await wait_for_metric(
        server, lambda m: m.value(DROPPED) >= before_all + 1, what="empty value counted"
    )
    reasons = {lab.get("reason") for lab in metrics.labels_of(DROPPED)}
    assert metrics.value(DROPPED, reason="invalid_json") == before + 1, (
        f"empty value not counted as invalid_json; reasons exposed: {sorted(reasons)}"
    )


async def test_missing_assessment_counted(server: Server, broker: Broker) -> None:
    """Each scoped record without an assessment adds one to
    websocket_kafka_events_dropped_total{reason="missing_assessment"}."""
    before = (await ascrape(server)).value(DROPPED, reason="missing_assessment")
    produce_many(broker.bootstrap, _keyless_scoped(uid("tag")))
    want = before + 3
    await wait_for_metric(
        server,
        lambda m: m.value(DROPPED, reason="missing_assessment") >= want,
        what=f"missing_assessment >= {want}",
    )
    await asyncio.sleep(0.2)
    assert (await ascrape(server)).value(DROPPED, reason="missing_assessment") == want
