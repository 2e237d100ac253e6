"""Inputs shared by the benchmarks: topics, event shapes, ids and secrets.

Every builder returns a plain ``dict`` in the snake_case shape upstream services
produce (the contract of the README, "Kafka event contract"); pushsvc camelCases
the top-level keys on the way out. The load tool adds two keys to every event:
``seq`` (a unique sequence number, for loss and duplicate accounting) and
``sent_ns`` (``time.time_ns()`` at produce time, seen by clients as ``sentNs``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

JWT_SECRET = "pushsvc-benchmark-secret-" + "b" * 40
"""HS256 secret for the servers under test (>= 32 bytes: no PyJWT warning)."""

MARKET_TOPIC = "market-data.prices"

ASSESSMENT_TOPICS: dict[str, str] = {
    "pnl_update": "trading.pnl",
    "position_update": "trading.positions",
    "rule_status": "risk.rule-status",
    "violation": "risk.violations",
    "assessment_update": "assessment.status",
}
"""Per-assessment event type -> the topic that implies it."""

ASSESSMENT_TYPES: tuple[str, ...] = tuple(ASSESSMENT_TOPICS)

TOPICS: tuple[str, ...] = (MARKET_TOPIC, *ASSESSMENT_TOPICS.values())
"""Every topic the load tool creates before the server starts."""

_RULES = ("max_daily_loss", "max_drawdown", "max_position_size", "min_trading_days")
_STATUSES = ("active", "passed", "failed", "suspended")


def assessment_id(index: int) -> str:
    """The id of assessment ``index`` (``asm-00042``)."""
    return f"asm-{index:05d}"


def market_name(index: int) -> str:
    """The symbol of market ``index`` (``MKT-007-USD``)."""
    return f"MKT-{index:03d}-USD"


def user_id(index: int) -> str:
    """The user of connection ``index`` (one user per connection)."""
    return f"user-{index:06d}"


def market_price(market: str, rng: random.Random) -> dict[str, Any]:
    return {"market": market, "price": round(rng.uniform(10.0, 70000.0), 2)}


def pnl_update(assessment: str, rng: random.Random) -> dict[str, Any]:
    return {
        "assessment_id": assessment,
        "unrealized_pnl": round(rng.uniform(-5000.0, 5000.0), 2),
        "realized_pnl": round(rng.uniform(-5000.0, 5000.0), 2),
        "current_balance": round(rng.uniform(90000.0, 110000.0), 2),
    }


def position_update(assessment: str, rng: random.Random) -> dict[str, Any]:
    return {
        "assessment_id": assessment,
        "position_id": f"pos-{rng.randrange(1_000_000):06d}",
        "market": market_name(rng.randrange(20)),
        "side": rng.choice(("long", "short")),
        "quantity": round(rng.uniform(0.01, 10.0), 4),
        "entry_price": round(rng.uniform(10.0, 70000.0), 2),
        "unrealized_pnl": round(rng.uniform(-2000.0, 2000.0), 2),
    }


def rule_status(assessment: str, rng: random.Random) -> dict[str, Any]:
    return {
        "assessment_id": assessment,
        "rule": rng.choice(_RULES),
        "value": round(rng.uniform(0.0, 5000.0), 2),
        "threshold": 5000.0,
        "status": rng.choice(("ok", "warning", "breached")),
    }


def violation(assessment: str, rng: random.Random) -> dict[str, Any]:
    return {
        "assessment_id": assessment,
        "rule": rng.choice(_RULES),
        "value": round(rng.uniform(5000.0, 9000.0), 2),
        "threshold": 5000.0,
    }


def assessment_update(assessment: str, rng: random.Random) -> dict[str, Any]:
    return {"assessment_id": assessment, "status": rng.choice(_STATUSES)}


ASSESSMENT_BUILDERS: dict[str, Callable[[str, random.Random], dict[str, Any]]] = {
    "pnl_update": pnl_update,
    "position_update": position_update,
    "rule_status": rule_status,
    "violation": violation,
    "assessment_update": assessment_update,
}
"""Per-assessment event type -> a builder of one random event of that type."""
