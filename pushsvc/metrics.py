"""Prometheus metrics, read from the router's counters at scrape time.

The hot path counts in plain C integers inside the router; nothing on it takes
a lock or calls into prometheus-client. A scrape turns those counters into
metric families. Only the connection-duration histogram is observed directly,
once per closed connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._router import Connection, Router, monotonic
from .consumer import BREAKER_STATES

if TYPE_CHECKING:
    from ._router import BatchHandoff
    from .consumer import KafkaConsumerThread

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Connection lifetimes run from seconds (a page reload) to a trading day.
_DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400)


# Router counters exported as they are: (family, name, help, stats key).
_ROUTER_SCALARS: tuple[
    tuple[type[GaugeMetricFamily] | type[CounterMetricFamily], str, str, str], ...
] = (
    (
        GaugeMetricFamily,
        "websocket_connections_total",
        "Open WebSocket connections.",
        "connections",
    ),
    (
        GaugeMetricFamily,
        "websocket_assessments_connected",
        "Assessments with at least one open connection.",
        "rooms",
    ),
    (
        CounterMetricFamily,
        "websocket_messages_sent_total",
        "Messages written to clients (events, pings and control messages).",
        "messages_sent",
    ),
    (
        CounterMetricFamily,
        "websocket_messages_received_total",
        "Data frames received from clients.",
        "messages_received",
    ),
    (
        CounterMetricFamily,
        "websocket_kafka_messages_processed_total",
        "Kafka records processed (routed or dropped).",
        "kafka_processed",
    ),
    (
        CounterMetricFamily,
        "websocket_heartbeat_failures_total",
        "Connections closed because nothing arrived within CONNECTION_TIMEOUT.",
        "heartbeat_failures",
    ),
    (
        CounterMetricFamily,
        "websocket_conflated_messages_total",
        "State-like messages replaced by a newer one while their client was "
        "behind (market_price per market, pnl_update, rule_status per rule).",
        "conflated",
    ),
    (
        CounterMetricFamily,
        "websocket_slow_client_closes_total",
        "Connections closed with 1013 because their outbound buffer passed "
        "MAX_CONNECTION_BUFFER.",
        "slow_client_closes",
    ),
    (
        GaugeMetricFamily,
        "websocket_slow_clients",
        "Connections whose transport is over its high watermark right now.",
        "paused_connections",
    ),
    (
        CounterMetricFamily,
        "websocket_rate_limit_closes_total",
        "Connections closed with 1008 for sending more than "
        "MAX_CLIENT_MESSAGES_PER_SEC frames in a second.",
        "rate_limit_closes",
    ),
    (
        CounterMetricFamily,
        "websocket_token_expiry_closes_total",
        "Connections closed with 4001 because their token expired.",
        "token_expiry_closes",
    ),
    (
        CounterMetricFamily,
        "websocket_token_refreshes_total",
        "Tokens refreshed in place by a refresh message.",
        "refreshes",
    ),
    (
        GaugeMetricFamily,
        "websocket_resume_buffer_entries",
        "Assessment messages held in memory for resume.",
        "resume_buffer_entries",
    ),
    (
        GaugeMetricFamily,
        "websocket_resume_buffer_bytes",
        "Bytes of assessment messages held in memory for resume.",
        "resume_buffer_bytes",
    ),
    (
        CounterMetricFamily,
        "websocket_resume_buffer_evictions_total",
        "Messages dropped from the resume buffers (count, age or byte limits).",
        "resume_buffer_evictions",
    ),
    (
        GaugeMetricFamily,
        "websocket_state_assessments",
        "Assessments whose latest state is kept for the snapshot on connect.",
        "state_assessments",
    ),
    (
        CounterMetricFamily,
        "websocket_state_evictions_total",
        "Assessments whose state was dropped (STATE_MAX_ASSESSMENTS).",
        "state_evictions",
    ),
    (
        CounterMetricFamily,
        "websocket_router_batches_total",
        "Batches routed (each flushed with at most one write per connection).",
        "batches",
    ),
)


# Router counters kept per label value: (name, help, label, stats key).
_ROUTER_BY_LABEL: tuple[tuple[str, str, str, str], ...] = (
    (
        "websocket_resumes_total",
        "Reconnects with since=<pos>: served from memory, read back from "
        "Kafka, or refused (resync_required).",
        "source",
        "resumes",
    ),
    (
        "websocket_kafka_events_dropped_total",
        "Kafka records dropped without reaching a client, by reason.",
        "reason",
        "dropped",
    ),
    (
        "websocket_client_frames_ignored_total",
        "Client frames ignored (not JSON, not an object, unknown type, "
        "binary, fragmented), by reason.",
        "reason",
        "ignored",
    ),
    (
        "websocket_connections_closed_total",
        "Closed connections by WebSocket close code (1006: no close frame).",
        "code",
        "closed",
    ),
)


class _ServiceCollector(Collector):
    def __init__(
        self,
        router: Router,
        consumer: KafkaConsumerThread | None,
        handoff: BatchHandoff | None,
    ) -> None:
        self._router = router
        self._consumer = consumer
        self._handoff = handoff

    def collect(self) -> Iterator[Metric]:
        stats = self._router.stats()
        for family, name, documentation, key in _ROUTER_SCALARS:
            yield family(name, documentation, value=stats[key])
        for name, documentation, label, key in _ROUTER_BY_LABEL:
            counter = CounterMetricFamily(name, documentation, labels=[label])
            for value, count in sorted(stats[key].items(), key=lambda kv: str(kv[0])):
                counter.add_metric([str(value)], count)
            yield counter
        if self._handoff is not None:
            yield CounterMetricFamily(
                "websocket_kafka_loop_wakeups_total",
                "Wake-ups of the event loop by the consumer thread.",
                value=self._handoff.wakeups,
            )
        lag = GaugeMetricFamily(
            "websocket_kafka_consumer_lag",
            "Records behind the high watermark, per topic and partition.",
            labels=["topic", "partition"],
        )
        if self._consumer is not None:
            for topic, partition, behind in self._consumer.lag():
                lag.add_metric([topic, str(partition)], behind)
            yield GaugeMetricFamily(
                "websocket_kafka_consumer_ready",
                "1 when the consumer holds all its partitions, else 0.",
                value=1 if self._consumer.ready else 0,
            )
            breaker = GaugeMetricFamily(
                "websocket_kafka_breaker_state",
                "Kafka circuit breaker: 1 for the current state (closed: brokers "
                "answer; open: unreachable, partitions paused; half_open: "
                "probing, recovering), 0 for the others.",
                labels=["state"],
            )
            current = self._consumer.breaker
            for state in BREAKER_STATES:
                breaker.add_metric([state], 1 if state == current else 0)
            yield breaker
            yield CounterMetricFamily(
                "websocket_kafka_consumer_restarts_total",
                "Kafka consumer threads found dead and restarted by the watchdog.",
                value=self._consumer.restarts,
            )
        yield lag


class Metrics:
    """The service's metric registry.

    :param router: the router whose counters are exported.
    :param consumer: the Kafka consumer (for lag and readiness), if any.
    :param handoff: the batch hand-off (for loop wake-ups), if any.
    """

    def __init__(
        self,
        router: Router,
        consumer: KafkaConsumerThread | None = None,
        handoff: BatchHandoff | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_ServiceCollector(router, consumer, handoff))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.connection_duration = Histogram(
            "websocket_connection_duration_seconds",
            "How long WebSocket connections stayed open.",
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )

    def on_connection_closed(self, connection: Connection, code: int) -> None:
        """Router callback: observe the closed connection's lifetime."""
        self.connection_duration.observe(monotonic() - connection.connected_at)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
