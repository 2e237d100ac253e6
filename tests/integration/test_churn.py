"""Churn: thousands of connects and disconnects, clean and abrupt, while events
flow. Afterwards the registry is empty, the connection gauge reads 0, and the
server's memory is back near where it was before the churn."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from picows import WSCloseCode, WSListener, ws_connect
from utils import Broker, KafkaProducer, Server, make_token, rss_kib, scrape, uid

ROUNDS = 10
PER_ROUND = 200


@pytest.fixture(scope="module")
def kafka_topics() -> dict[str, int]:
    return {"market-data.prices": 1, "trading.pnl": 1}


class _Quiet(WSListener):
    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        pass


async def _churn_round(server: Server, count: int) -> None:
    transports = await asyncio.gather(
        *(
            ws_connect(
                _Quiet,
                server.ws_url(make_token(uid("churner")), f"churn-{i % 20}"),
                use_aiofastnet=False,
            )
            for i in range(count)
        )
    )
    await asyncio.sleep(0.05)
    for i, (transport, _) in enumerate(transports):
        if i % 2:
            transport.underlying_transport.abort()  # abrupt: no close frame
        else:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
    await asyncio.gather(
        *(asyncio.wait_for(t.wait_disconnected(), 10) for t, _ in transports)
    )


def _flow(broker: Broker, stop: threading.Event) -> None:
    producer = KafkaProducer(broker.bootstrap, **{"linger.ms": 5})
    i = 0
    while not stop.is_set() and i < 20_000:
        producer.send("market-data.prices", {"market": "BTC", "price": i})
        producer.send("trading.pnl", {"assessment_id": f"churn-{i % 20}", "pnl": i})
        i += 1
        time.sleep(0.005)
    producer.flush()


@pytest.mark.time_limit(120)
async def test_churn_leaves_no_connection_and_no_memory_behind(
    server: Server, broker: Broker
):
    await _churn_round(server, PER_ROUND)  # warm-up: allocator pools, caches
    rss_before = rss_kib(server.process.pid)
    stop = threading.Event()
    flow = threading.Thread(target=_flow, args=(broker, stop))
    flow.start()
    try:
        for _ in range(ROUNDS):
            await _churn_round(server, PER_ROUND)
    finally:
        stop.set()
        flow.join(30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if scrape(server).value("websocket_connections_total") == 0:
            break
        await asyncio.sleep(0.1)
    metrics = scrape(server)
    assert metrics.value("websocket_connections_total") == 0
    assert metrics.value("websocket_assessments_connected") == 0
    closed = metrics.value("websocket_connections_closed_total")
    assert closed >= (ROUNDS + 1) * PER_ROUND
    assert metrics.value("websocket_connections_closed_total", code="1006") > 0
    growth = rss_kib(server.process.pid) - rss_before
    assert growth < 8 * 1024, f"RSS grew by {growth} KiB over the churn"
