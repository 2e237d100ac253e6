"""HTTP endpoints on the WebSocket port: /health, /ready, /metrics, 404."""

from __future__ import annotations

import asyncio
import time

import pytest
from utils import (
    ALL_METRICS,
    Broker,
    Server,
    ahttp_get,
    client,
    http_get,
    open_client,
    produce,
    run_server,
    scrape,
    uid,
    wait_for_metric,
)


def test_health_ok(server: Server) -> None:
    """GET /health returns 200."""
    status, _, _ = http_get(server.url("/health"))
    assert status == 200


def test_ready_ok_once_consumer_has_partitions(server: Server) -> None:
    """GET /ready returns 200 once the server consumes (the fixture waited for it;
    it must stay 200)."""
    for _ in range(3):
        status, _, body = http_get(server.url("/ready"))
        assert status == 200, body


@pytest.mark.parametrize("path", ["/does-not-exist", "/healthz", "/metrics/extra", "/"])
def test_unknown_path_404(server: Server, path: str) -> None:
    """Any path other than /health, /ready, /metrics and /ws is 404."""
    status, _, _ = http_get(server.url(path))
    assert status == 404


def test_metrics_is_prometheus_text(server: Server) -> None:
    """GET /metrics is 200 with a text/plain (Prometheus exposition) body."""
    status, headers, body = http_get(server.url("/metrics"))
    assert status == 200
    assert headers.get("content-type", "").startswith("text/plain"), headers
    assert body.decode().strip(), "empty /metrics body"


async def test_metrics_exposes_every_metric(server: Server, broker: Broker) -> None:
    """After some activity (a connection opened and closed, an event delivered, an
    invalid record dropped) /metrics names every metric of the contract, and the
    histogram has _bucket, _sum and _count samples."""
    assessment, symbol = uid(), uid("SYM")
    async with client(server, uid("m"), assessment) as c:
        produce(broker.bootstrap, "trading.pnl", b"{broken", key=assessment)
        produce(
            broker.bootstrap,
            "market-data.prices",
            {"symbol": symbol, "price": 1.5},
            key=symbol,
        )
        await c.recv_until(lambda m: m.get("symbol") == symbol)
    metrics = await wait_for_metric(
        server,
        lambda m: m.value("websocket_connection_duration_seconds_count") >= 1,
        what="connection duration observed",
    )
    missing = [name for name in ALL_METRICS if not metrics.mentions(name)]
    assert not missing, f"metrics missing from /metrics: {missing}\n{metrics.text}"
    for suffix in ("_bucket", "_sum", "_count"):
        assert metrics.has_samples(f"websocket_connection_duration_seconds{suffix}"), (
            suffix
        )
    buckets = metrics.labels_of("websocket_connection_duration_seconds_bucket")
    assert any(lab.get("le") == "+Inf" for lab in buckets), buckets


async def test_connections_gauge_tracks_open_connections(server: Server) -> None:
    """websocket_connections_total is the number of open connections: +3 while
    three clients are connected, back to the baseline once they closed."""
    # every earlier test of this module closed its clients: wait for the gauge to settle
    base = 0.0
    await wait_for_metric(
        server, lambda m: m.value("websocket_connections_total") == base, what="gauge 0"
    )
    clients = []
    try:
        for i in range(3):
            clients.append(await open_client(server, f"g{i}", uid()))
        await wait_for_metric(
            server,
            lambda m: m.value("websocket_connections_total") == base + 3,
            what=f"gauge == {base + 3}",
        )
    finally:
        for c in clients:
            await c.close()
    await wait_for_metric(
        server,
        lambda m: m.value("websocket_connections_total") == base,
        what=f"gauge back to {base}",
    )


async def test_normal_close_is_counted_with_code_and_duration(server: Server) -> None:
    """A client closing with 1000 adds one to websocket_connections_closed_total
    {code="1000"} and one observation to websocket_connection_duration_seconds."""
    before = scrape(server)
    closed0 = before.value("websocket_connections_closed_total", code="1000")
    count0 = before.value("websocket_connection_duration_seconds_count")
    async with client(server, uid("closer"), uid()) as c:
        await asyncio.sleep(0.2)
        await c.assert_alive()
    after = await wait_for_metric(
        server,
        lambda m: (
            m.value("websocket_connections_closed_total", code="1000") >= closed0 + 1
            and m.value("websocket_connection_duration_seconds_count") >= count0 + 1
        ),
        what="close counted",
    )
    sum0 = before.value("websocket_connection_duration_seconds_sum")
    assert after.value("websocket_connection_duration_seconds_sum") - sum0 >= 0.15


async def test_message_counters_move(server: Server, broker: Broker) -> None:
    """websocket_messages_sent_total grows when the server sends (connected message,
    events); websocket_messages_received_total grows when a client sends a frame;
    websocket_kafka_messages_processed_total grows by the records consumed."""
    before = scrape(server)
    assessment = uid()
    async with client(server, uid("counter"), assessment) as c:
        await c.ws.send('{"type":"pong","timestamp":%d}' % int(time.time() * 1000))
        for seq in range(3):
            produce(
                broker.bootstrap,
                "trading.pnl",
                {"assessmentId": assessment, "seq": seq},
                key=assessment,
            )
        await c.collect(lambda m: m.get("assessmentId") == assessment and "seq" in m, 3)
        await wait_for_metric(
            server,
            lambda m: (
                m.value("websocket_messages_sent_total")
                >= before.value("websocket_messages_sent_total") + 4
                and m.value("websocket_messages_received_total")
                >= before.value("websocket_messages_received_total") + 1
                and m.value("websocket_kafka_messages_processed_total")
                >= before.value("websocket_kafka_messages_processed_total") + 3
            ),
            what="sent/received/processed counters",
        )


async def test_consumer_lag_labelled_by_topic_and_partition(
    server: Server, broker: Broker
) -> None:
    """websocket_kafka_consumer_lag has samples labelled topic and partition for the
    consumed topics once records flowed."""
    assessment = uid()
    async with client(server, uid("lag"), assessment) as c:
        produce(
            broker.bootstrap,
            "trading.pnl",
            {"assessmentId": assessment},
            key=assessment,
        )
        await c.recv_until(
            lambda m: (
                m.get("assessmentId") == assessment and m.get("type") == "pnl_update"
            )
        )
    metrics = await wait_for_metric(
        server,
        lambda m: any(
            lab.get("topic") == "trading.pnl" and "partition" in lab
            for lab in m.labels_of("websocket_kafka_consumer_lag")
        ),
        what="consumer lag sample for trading.pnl",
    )
    for lab in metrics.labels_of("websocket_kafka_consumer_lag"):
        assert lab.get("partition", "").isdigit(), lab


async def test_ready_503_when_broker_unreachable_health_still_200() -> None:
    """With KAFKA_BROKERS pointing at a closed port the server still serves:
    /health is 200 while /ready stays 503."""
    with run_server(None, wait="health") as server:
        deadline = time.monotonic() + 2.0
        polls = 0
        while time.monotonic() < deadline and polls < 100:
            status, _, body = await ahttp_get(server.url("/ready"))
            assert status == 503, body
            polls += 1
            await asyncio.sleep(0.1)
        status, _, _ = await ahttp_get(server.url("/health"))
        assert status == 200
        status, _, _ = await ahttp_get(server.url("/metrics"))
        assert status == 200
