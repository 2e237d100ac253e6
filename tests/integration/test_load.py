"""Fan-out under load: 500+ connections over 50 assessments; every client gets
exactly its events, in order, none lost or duplicated."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from utils import (
    TIMEOUT,
    Broker,
    KafkaProducer,
    PushClient,
    Server,
    ascrape,
    create_topics,
    open_client,
    run_server,
    uid,
    wait_for_metric,
)

ASSESSMENTS = 50
PER_ASSESSMENT = 10  # connections per assessment
UNSCOPED = 20  # connections without assessmentId
EVENTS_PER_ASSESSMENT = 20
PRICES = 20
CONNECT_CONCURRENCY = 50
DELIVERY_DEADLINE = 30.0


@pytest.fixture(scope="module")
def server(broker: Broker) -> Iterator[Server]:
    create_topics(broker.bootstrap, {"trading.pnl": 3, "market-data.prices": 3})
    with run_server(broker) as s:
        yield s


async def _receive_all(
    c: PushClient, scoped: int, prices: int, symbol: str, deadline: float
) -> list[dict[str, Any]]:
    """Read until the expected count of relevant messages arrived (or the deadline),
    then a short extra window to catch duplicates/strays."""
    relevant: list[dict[str, Any]] = []
    want = scoped + prices
    for _ in range(want * 10 + 100):
        remaining = deadline - time.monotonic()
        if len(relevant) >= want or remaining <= 0:
            break
        try:
            msg = await c.recv_json(timeout=remaining)
        except TimeoutError:
            break
        if msg.get("type") != "ping":
            relevant.append(msg)
    relevant += await c.collect_for(0.5)
    return relevant


@pytest.mark.time_limit(120)
async def test_fan_out_exact_and_ordered(server: Server, broker: Broker) -> None:
    """50 assessments x 10 connections + 20 unscoped connections. Produce 10 events
    per assessment (keyed by assessment: one partition each) interleaved with 10
    market prices (one key). Each scoped client receives exactly its assessment's
    10 events in order plus the 10 prices in order; unscoped clients receive only
    the prices; nothing is lost, duplicated or misrouted; the open-connection gauge
    shows every connection."""
    run = uid("load")
    symbol = f"{run}-SYM"
    assessments = [f"{run}-a{i:02d}" for i in range(ASSESSMENTS)]
    plan: list[str | None] = [a for a in assessments for _ in range(PER_ASSESSMENT)]
    plan += [None] * UNSCOPED

    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect(i: int, assessment: str | None) -> PushClient:
        async with sem:
            return await open_client(server, f"{run}-u{i}", assessment)

    t0 = time.monotonic()
    results = await asyncio.gather(
        *(connect(i, a) for i, a in enumerate(plan)), return_exceptions=True
    )
    clients = [r for r in results if isinstance(r, PushClient)]
    try:
        errors = [r for r in results if not isinstance(r, PushClient)]
        assert not errors, f"{len(errors)} connections failed, first: {errors[0]!r}"
        connect_s = time.monotonic() - t0
        await wait_for_metric(
            server,
            lambda m: m.value("websocket_connections_total") == len(plan),
            what=f"{len(plan)} open connections",
        )
        processed0 = (await ascrape(server)).value(
            "websocket_kafka_messages_processed_total"
        )

        producer = KafkaProducer(broker.bootstrap, **{"linger.ms": 5})
        for seq in range(EVENTS_PER_ASSESSMENT):
            for a in assessments:
                producer.send(
                    "trading.pnl",
                    {
                        "assessmentId": a,
                        "run": run,
                        "seq": seq,
                        "unrealized_pnl": seq * 1.5,
                    },
                    key=a,
                )
            if seq < PRICES:
                producer.send(
                    "market-data.prices",
                    {"symbol": symbol, "seq": seq, "price": 100 + seq},
                    key=symbol,
                )
        for seq in range(EVENTS_PER_ASSESSMENT, PRICES):
            producer.send(
                "market-data.prices",
                {"symbol": symbol, "seq": seq, "price": 100 + seq},
                key=symbol,
            )
        await asyncio.to_thread(producer.flush, TIMEOUT)
        t_produced = time.monotonic()

        deadline = t_produced + DELIVERY_DEADLINE
        received = await asyncio.gather(
            *(
                _receive_all(
                    c, EVENTS_PER_ASSESSMENT if a else 0, PRICES, symbol, deadline
                )
                for c, a in zip(clients, plan, strict=True)
            )
        )
        delivery_s = time.monotonic() - t_produced
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    problems: list[str] = []
    for i, (assessment, msgs) in enumerate(zip(plan, received, strict=True)):
        prices = [
            m
            for m in msgs
            if m.get("type") == "market_price" and m.get("symbol") == symbol
        ]
        scoped = [m for m in msgs if m.get("type") == "pnl_update"]
        others = [m for m in msgs if m not in prices and m not in scoped]
        want_scoped = (
            [(assessment, s) for s in range(EVENTS_PER_ASSESSMENT)]
            if assessment
            else []
        )
        got_scoped = [(m.get("assessmentId"), m.get("seq")) for m in scoped]
        if got_scoped != want_scoped:
            problems.append(
                f"client {i} ({assessment}): scoped {got_scoped} != {want_scoped}"
            )
        if [m.get("seq") for m in prices] != list(range(PRICES)):
            problems.append(
                f"client {i} ({assessment}): prices {[m.get('seq') for m in prices]}"
            )
        if others:
            problems.append(f"client {i} ({assessment}): unexpected {others[:3]}")
        if any(m.get("run") != run or "unrealizedPnl" not in m for m in scoped):
            problems.append(f"client {i}: malformed scoped message {scoped[:1]}")
    assert not problems, (
        f"{len(problems)} problems (connect {connect_s:.1f}s, "
        f"delivery {delivery_s:.1f}s):\n" + "\n".join(problems[:20])
    )

    total_records = ASSESSMENTS * EVENTS_PER_ASSESSMENT + PRICES
    await wait_for_metric(
        server,
        lambda m: (
            m.value("websocket_kafka_messages_processed_total")
            >= processed0 + total_records
        ),
        what="records processed",
    )
    assert (await ascrape(server)).value(
        "websocket_kafka_messages_processed_total"
    ) == processed0 + total_records
    await wait_for_metric(
        server,
        lambda m: m.value("websocket_connections_total") == 0,
        what="all connections closed",
    )
