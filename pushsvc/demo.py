"""``pushsvc demo``: the whole service with no setup.

Starts the embedded broker, a synthetic feed and the server in one process, and
prints a WebSocket URL with a freshly minted token.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time

import orjson
from confluent_kafka import Producer

from .auth import mint_token
from .broker import EmbeddedBroker
from .config import Settings
from .server import serve

log = logging.getLogger("pushsvc.demo")

TOPICS = [
    "market-data.prices",
    "trading.pnl",
    "trading.positions",
    "risk.rule-status",
    "risk.violations",
    "assessment.status",
]
MARKETS = {"BTC-USD": 64000.0, "ETH-USD": 3400.0, "SOL-USD": 150.0, "EUR-USD": 1.08}
RULES = {"max_daily_loss": 5000.0, "max_drawdown": 10000.0, "max_position_size": 5.0}


class DemoFeed:
    """A random walk of prices, and P&L, positions and risk for a few assessments.

    :param bootstrap: Kafka bootstrap servers.
    :param assessments: ids of the demo assessments.
    :param ticks_per_s: market-price ticks per second (all markets together).
    """

    def __init__(
        self, bootstrap: str, assessments: list[str], *, ticks_per_s: float = 8.0
    ) -> None:
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
        self._assessments = assessments
        self._interval_s = 1.0 / ticks_per_s
        self._prices = dict(MARKETS)
        self._rng = random.Random(7)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-feed", daemon=True)
        self._positions: dict[str, dict[str, float]] = {a: {} for a in assessments}
        self._realized: dict[str, float] = {a: 0.0 for a in assessments}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._producer.flush(5)

    def _send(
        self, topic: str, value: dict[str, object], key: str | None = None
    ) -> None:
        self._producer.produce(topic, orjson.dumps(value), key=key)
        self._producer.poll(0)

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(self._interval_s):
            if tick % 80 == 0:
                for assessment in self._assessments:
                    self._send(
                        "assessment.status",
                        {"assessment_id": assessment, "status": "active"},
                    )
            tick += 1
            market = self._rng.choice(list(self._prices))
            price = self._prices[market] * (1 + self._rng.gauss(0, 0.0008))
            self._prices[market] = price
            self._send(
                "market-data.prices", {"market": market, "price": round(price, 6)}
            )
            if tick % 4 == 0:
                for assessment in self._assessments:
                    self._trade_and_mark(assessment)
            if tick % 40 == 0:
                assessment = self._rng.choice(self._assessments)
                self._send(
                    "risk.violations",
                    {
                        "assessment_id": assessment,
                        "rule": "max_position_size",
                        "value": 6.0,
                        "threshold": RULES["max_position_size"],
                    },
                )

    def _trade_and_mark(self, assessment: str) -> None:
        positions = self._positions[assessment]
        if self._rng.random() < 0.25:
            market = self._rng.choice(list(self._prices))
            qty = round(self._rng.uniform(-1, 1), 3)
            positions[market] = round(positions.get(market, 0.0) + qty, 3)
            held = positions[market]
            self._send(
                "trading.positions",
                {
                    "assessment_id": assessment,
                    "position_id": f"{assessment}:{market}",
                    "market": market,
                    "side": "long" if held >= 0 else "short",
                    "quantity": abs(held),
                    "entry_price": round(self._prices[market], 6),
                    "unrealized_pnl": 0.0,
                },
            )
        unrealized = sum(
            qty * (self._prices[m] - MARKETS[m]) for m, qty in positions.items()
        )
        self._realized[assessment] += self._rng.gauss(0, 5)
        realized = self._realized[assessment]
        self._send(
            "trading.pnl",
            {
                "assessment_id": assessment,
                "unrealized_pnl": round(unrealized, 2),
                "realized_pnl": round(realized, 2),
                "current_balance": round(100000 + realized + unrealized, 2),
            },
        )
        loss = max(0.0, -(realized + unrealized))
        limit = RULES["max_daily_loss"]
        self._send(
            "risk.rule-status",
            {
                "assessment_id": assessment,
                "rule": "max_daily_loss",
                "value": round(loss, 2),
                "threshold": limit,
                "status": "breached"
                if loss >= limit
                else ("warning" if loss >= 0.8 * limit else "ok"),
            },
        )


def run_demo(*, port: int = 3003, host: str = "127.0.0.1", assessments: int = 3) -> int:
    """Run broker, feed and server until interrupted; returns the exit code."""
    names = [f"demo-{i}" for i in range(1, assessments + 1)]
    secret = secrets.token_urlsafe(32)
    with EmbeddedBroker() as broker:
        broker.create_topics(TOPICS, partitions=3)
        settings = Settings(
            host=host,
            port=port,
            jwt_secret=secret,
            kafka_brokers=broker.bootstrap,
            kafka_topic_refresh_interval_ms=1000,
            heartbeat_interval_ms=30_000,
            serve_dashboard=True,
        )
        feed = DemoFeed(broker.bootstrap, names)
        token = mint_token("demo-trader", secret, ttl_s=24 * 3600)
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        print(
            "pushsvc demo: broker on %s, %d assessments (%s)\n"
            "live page:\n  http://%s:%d/?token=%s&assessmentId=%s\n"
            "connect with:\n  ws://%s:%d/ws?token=%s&assessmentId=%s\n"
            "health: http://%s:%d/health  metrics: http://%s:%d/metrics\n"
            "Ctrl-C stops it."
            % (
                broker.bootstrap,
                len(names),
                ", ".join(names),
                shown,
                port,
                token,
                names[0],
                shown,
                port,
                token,
                names[0],
                shown,
                port,
                shown,
                port,
            ),
            flush=True,
        )
        feed.start()
        try:
            import uvloop

            uvloop.run(serve(settings))
        except KeyboardInterrupt:
            pass
        finally:
            feed.stop()
            time.sleep(0.05)
    return 0
