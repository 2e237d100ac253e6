"""deploy/grafana-dashboard.json: a well-formed dashboard whose queries name
only metrics a running server exports, covering what operators watch."""

from __future__ import annotations

import json
import re
from typing import Any

from utils import REPO_ROOT, Server, ascrape

DASHBOARD = REPO_ROOT / "deploy" / "grafana-dashboard.json"
_METRIC = re.compile(r"\b((?:websocket|process)_[a-z0-9_]+)\b")

# What the issue asks operators to see, by the metric that shows it.
REQUIRED = {
    "connections": "websocket_connections_total",
    "messages out": "websocket_messages_sent_total",
    "messages in": "websocket_messages_received_total",
    "kafka records in": "websocket_kafka_messages_processed_total",
    "consumer lag": "websocket_kafka_consumer_lag",
    "connection durations": "websocket_connection_duration_seconds_bucket",
    "slow-client closes": "websocket_slow_client_closes_total",
    "breaker state": "websocket_kafka_breaker_state",
    "refused handshakes": "websocket_handshakes_refused_total",
}


def load() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_is_well_formed() -> None:
    dashboard = load()
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= names
    for expr in exprs(dashboard):
        assert expr.count("(") == expr.count(")"), expr
        assert expr.count("{") == expr.count("}"), expr
        if "websocket_" in expr:
            assert 'instance=~"$instance"' in expr, expr


def test_dashboard_covers_what_operators_watch() -> None:
    used = {m for e in exprs(load()) for m in _METRIC.findall(e)}
    missing = {what: name for what, name in REQUIRED.items() if name not in used}
    assert not missing, missing


async def test_every_queried_metric_is_exported(server: Server) -> None:
    metrics = await ascrape(server)
    used = {m for e in exprs(load()) for m in _METRIC.findall(e)}
    unknown = sorted(name for name in used if not metrics.mentions(name))
    assert not unknown, f"the dashboard queries metrics the server lacks: {unknown}"
