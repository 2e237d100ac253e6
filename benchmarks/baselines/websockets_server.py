"""The pushsvc contract written the ordinary way: ``websockets`` + confluent-kafka.

This is the comparison point for pushsvc's benchmarks: what a competent Python
developer would write for the same README contract without pushsvc's compiled
router and picows. It speaks the same client protocol, reads the same Kafka
topics with the same consumer strategy and settings, and is configured by the
same environment variables, so a benchmark measures the server code and nothing
else. It deliberately has no special tricks:

* an asyncio server from ``websockets.asyncio.server.serve``, run on uvloop
  (as pushsvc is, so the loop is not what gets compared);
* a confluent-kafka consumer on a background thread, manually assigned every
  partition of every matching topic (latest offset at start, new topics from the
  beginning), blocking in ``poll()`` for the first record and draining with
  ``consume(n, 0)``, handing each batch over with one ``call_soon_threadsafe``;
* plain-Python normalization (one ``orjson.loads`` and one ``orjson.dumps`` per
  event) and routing through a dict of sets, fanned out with
  ``websockets.broadcast``;
* prometheus-client metrics incremented as things happen.

Run it from the repository root with ``python -m
benchmarks.baselines.websockets_server``. Only ``pushsvc.config`` (reading the
environment, ``ConfigError``) and ``pushsvc.logs`` (log format) are borrowed from
pushsvc; nothing here touches the compiled router.

Where it differs from pushsvc, it is because the library does it its own way:
fragmented client messages are reassembled by ``websockets`` and accepted, not
ignored; ``broadcast`` writes to slow clients without backpressure instead of
closing them with 1011; a failed consumer thread is not restarted (``/ready``
turns 503); counters also export prometheus-client's ``_created`` samples.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import orjson
import prometheus_client as prom
import uvloop
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaException,
    Message,
    TopicPartition,
)
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from pushsvc.config import Settings
from pushsvc.errors import ConfigError
from pushsvc.logs import configure_logging

log = logging.getLogger("baseline")

TOPIC_TYPES = {
    "market-data.prices": "market_price",
    "trading.pnl": "pnl_update",
    "trading.positions": "position_update",
    "risk.rule-status": "rule_status",
    "risk.violations": "violation",
    "assessment.status": "assessment_update",
}
EVENT_TYPES = frozenset(TOPIC_TYPES.values())

# Names as in the README; prometheus-client appends "_total" to counters.
CONNECTIONS = prom.Gauge("websocket_connections_total", "Open connections.")
SENT = prom.Counter("websocket_messages_sent", "Messages written to clients.")
RECEIVED = prom.Counter("websocket_messages_received", "Frames from clients.")
PROCESSED = prom.Counter("websocket_kafka_messages_processed", "Records processed.")
LAG = prom.Gauge("websocket_kafka_consumer_lag", "Lag.", ["topic", "partition"])
HEARTBEAT_FAILURES = prom.Counter("websocket_heartbeat_failures", "Timed out.")
DURATION = prom.Histogram(
    "websocket_connection_duration_seconds",
    "Connection lifetimes.",
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 86400),
)
DROPPED = prom.Counter("websocket_kafka_events_dropped", "Dropped.", ["reason"])
CLOSED = prom.Counter("websocket_connections_closed", "Closed.", ["code"])
IGNORED = prom.Counter("websocket_client_frames_ignored", "Ignored.", ["reason"])
READY = prom.Gauge("websocket_kafka_consumer_ready", "1 when partitions assigned.")
BATCHES = prom.Counter("websocket_router_batches", "Batches routed.")
WAKEUPS = prom.Counter("websocket_kafka_loop_wakeups", "Loop wake-ups.")


class Dropped(Exception):
    """A Kafka record that cannot be delivered; ``args[0]`` is the reason."""


def epoch_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_utc(ms: int) -> str:
    """Epoch milliseconds as ``2026-11-26T10:58:11.123Z``."""
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))
        + f".{ms % 1000:03d}Z"
    )


@functools.lru_cache(maxsize=4096)
def camel(key: str) -> str:
    """``unrealized_pnl`` -> ``unrealizedPnl``; leading underscores are kept."""
    stripped = key.lstrip("_")
    head, *rest = stripped.split("_")
    return (
        key[: len(key) - len(stripped)]
        + head
        + "".join(w[:1].upper() + w[1:] for w in rest)
    )


def room_of(value: Any) -> str | None:
    """An assessment id is a non-empty string or an integer; anything else is none."""
    if type(value) is str:
        return value or None
    if type(value) is int:
        return str(value)
    return None


def normalize(
    raw: bytes | None, topic: str, key: bytes | None, ts_ms: int
) -> tuple[str, str | None, bytes]:
    """Decode one record into ``(type, assessment id or None, JSON payload)``.

    :raises Dropped: with one of the contract's drop reasons.
    """
    if not raw:  # a null or empty value is not JSON either
        raise Dropped("invalid_json")
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Dropped("invalid_json") from None
    if type(event) is not dict:
        raise Dropped("not_object")
    kind = event.get("type")
    if kind is None:
        kind = TOPIC_TYPES.get(topic)
    if type(kind) is not str or kind not in EVENT_TYPES:
        raise Dropped("unknown_type")
    out = {"type": kind}
    for name, value in event.items():
        if name != "type":
            out[camel(name)] = value
    room = None
    if kind != "market_price":
        room = room_of(event.get("assessmentId")) or room_of(event.get("assessment_id"))
        if room is None and key is not None:
            try:
                room = room_of(key.decode())
            except UnicodeDecodeError:
                pass
        if room is None:
            raise Dropped("missing_assessment")
        if room_of(out.get("assessmentId")) is None:
            out["assessmentId"] = room
    if "timestamp" not in out:
        out["timestamp"] = iso_utc(ts_ms)
    return kind, room, orjson.dumps(out)


class KafkaReader(threading.Thread):
    """Reads every partition of the matching topics; hands batches to the loop."""

    def __init__(
        self,
        settings: Settings,
        loop: asyncio.AbstractEventLoop,
        on_batch: Callable[[list[Message]], None],
    ) -> None:
        super().__init__(name="baseline-kafka", daemon=True)
        self.settings = settings
        self.loop = loop
        self.on_batch = on_batch
        self.pattern = settings.topic_pattern
        self.names = frozenset(settings.topic_names)
        self.stopping = threading.Event()
        self.ready = False
        self.assigned: set[tuple[str, int]] = set()
        self.last_error_log = 0.0

    def run(self) -> None:
        s = self.settings
        instance = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        consumer = Consumer(
            {
                "bootstrap.servers": s.kafka_brokers,
                "client.id": s.kafka_client_id,
                # Required by librdkafka, never joined: partitions are assigned by hand.
                "group.id": f"{s.kafka_group_id}.{instance}",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "fetch.wait.max.ms": s.kafka_fetch_wait_max_ms,
                "fetch.min.bytes": 1,
                "socket.nagle.disable": True,
                "log_level": 2,
                "error_cb": lambda err: self.log_error("kafka: %s", err),
            }
        )
        refresh_s = s.kafka_topic_refresh_interval_ms / 1000
        next_refresh = next_lag = 0.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if now >= next_refresh:
                    next_refresh = now + refresh_s
                    try:
                        self.refresh(consumer)
                    except KafkaException as exc:
                        self.log_error("kafka metadata unavailable: %s", exc)
                if not self.ready:
                    self.stopping.wait(0.2)
                    continue
                if now >= next_lag:
                    next_lag = now + 1.0
                    self.measure_lag(consumer)
                first = consumer.poll(0.1)
                if first is None:
                    continue
                batch = [first]
                if s.kafka_batch_size > 1:
                    batch += consumer.consume(s.kafka_batch_size - 1, 0)
                self.loop.call_soon_threadsafe(self.on_batch, batch)
        except Exception:
            log.exception("kafka consumer thread failed")
        finally:
            self.ready = False
            READY.set(0)
            consumer.close()

    def matches(self, topic: str) -> bool:
        if topic.startswith("__"):
            return False
        return bool(self.pattern.search(topic)) if self.pattern else topic in self.names

    def refresh(self, consumer: Consumer) -> None:
        """Assign new partitions: at the latest offset on the first pass, from
        the beginning afterwards (everything in them came after our start)."""
        metadata = consumer.list_topics(timeout=2.0)
        new = sorted(
            (name, p)
            for name, topic in metadata.topics.items()
            if topic.error is None and self.matches(name)
            for p in topic.partitions
            if (name, p) not in self.assigned
        )
        if new:
            if self.ready:
                offsets = [OFFSET_BEGINNING] * len(new)
            else:  # resolved now, so /ready means "everything from here is delivered"
                offsets = [
                    consumer.get_watermark_offsets(TopicPartition(t, p), timeout=2.0)[1]
                    for t, p in new
                ]
            consumer.incremental_assign(
                [TopicPartition(t, p, o) for (t, p), o in zip(new, offsets)]
            )
            self.assigned.update(new)
            log.info("assigned %d partition(s): %s", len(new), new)
        self.ready = True
        READY.set(1)

    def measure_lag(self, consumer: Consumer) -> None:
        if not self.assigned:
            return
        try:
            positions = consumer.position(
                [TopicPartition(t, p) for t, p in self.assigned]
            )
        except KafkaException:
            return
        for tp in positions:
            _, high = consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                LAG.labels(tp.topic, str(tp.partition)).set(
                    max(high - (tp.offset if tp.offset >= 0 else high), 0)
                )

    def log_error(self, fmt: str, *args: object) -> None:
        if time.monotonic() - self.last_error_log >= 10.0:
            self.last_error_log = time.monotonic()
            log.warning(fmt, *args)


class PushConnection(ServerConnection):
    """A ``ServerConnection`` that remembers who it is and when it last heard
    from its client: any bytes at all, WebSocket PING/PONG frames included."""

    user_id = ""
    assessment_id: str | None = None
    last_seen = 0.0

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        super().data_received(data)


class BaselineServer:
    """Routing state, the HTTP endpoints, the WebSocket handler and the heartbeat."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients: set[PushConnection] = set()
        self.rooms: dict[str, set[PushConnection]] = {}
        self.kafka: KafkaReader | None = None
        self.stopping = False
        self.closing: set[asyncio.Task[None]] = set()
        self.drops_since_log = 0
        self.last_drop_log = 0.0

    # -- Kafka records in (on the loop) -------------------------------------

    def on_batch(self, batch: list[Message]) -> None:
        WAKEUPS.inc()
        BATCHES.inc()
        for msg in batch:
            PROCESSED.inc()
            try:
                if msg.error() is not None:
                    raise Dropped("kafka_error")
                ts_type, ts = msg.timestamp()
                kind, room, payload = normalize(
                    msg.value(), msg.topic(), msg.key(), ts if ts_type else epoch_ms()
                )
            except Dropped as exc:
                self.count_drop(exc.args[0], msg)
                continue
            targets = (
                self.clients if kind == "market_price" else self.rooms.get(room, ())
            )
            if targets:
                broadcast(targets, payload, text=True)
                SENT.inc(len(targets))

    def count_drop(self, reason: str, msg: Message) -> None:
        DROPPED.labels(reason).inc()
        self.drops_since_log += 1
        if time.monotonic() - self.last_drop_log >= 1.0:
            self.last_drop_log = time.monotonic()
            log.warning(
                "dropped kafka record from %s: %s (%d since the last report)",
                msg.topic(),
                reason,
                self.drops_since_log,
            )
            self.drops_since_log = 0

    # -- HTTP, before any upgrade ----------------------------------------------

    def process_request(
        self, connection: PushConnection, request: Request
    ) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/ws":
            return self.authenticate(connection, url.query)
        if url.path == "/health":
            return respond(connection, 200, status="ok")
        if url.path == "/ready":
            if self.stopping:
                return respond(connection, 503, status="not ready", reason="stopping")
            if self.kafka is None or not self.kafka.ready:
                reason = "kafka partitions not assigned yet"
                return respond(connection, 503, status="not ready", reason=reason)
            return respond(connection, 200, status="ready")
        if url.path == "/metrics":
            response = connection.respond(200, prom.generate_latest().decode())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = prom.CONTENT_TYPE_LATEST
            return response
        reason = "try /ws, /health, /ready or /metrics"
        return respond(connection, 404, error="not_found", reason=reason)

    def authenticate(self, connection: PushConnection, query: str) -> Response | None:
        try:
            params = parse_qs(query, max_num_fields=20)
        except ValueError:
            return bad_request(connection, "malformed query string")
        token = params.get("token", [""])[0]
        try:
            claims = jwt.decode(
                token,
                self.settings.jwt_secret,
                algorithms=["HS256"],  # pinned: refuses alg=none and all others
                options={"verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            return unauthorized(connection, "token expired")
        except jwt.InvalidTokenError as exc:
            return unauthorized(connection, f"invalid token ({type(exc).__name__})")
        user = claims.get("userId") or claims.get("sub")
        if user is None or isinstance(user, (dict, list, bool)):
            return unauthorized(connection, "token has no userId or sub claim")
        assessment = params.get("assessmentId", [None])[0]
        if assessment is not None and (
            len(assessment) > 128 or not assessment.isprintable()
        ):
            reason = "assessmentId must be 1-128 printable characters"
            return bad_request(connection, reason)
        connection.user_id = str(user)
        connection.assessment_id = assessment
        return None

    # -- WebSocket connections ------------------------------------------------

    async def handler(self, ws: PushConnection) -> None:
        opened = ws.last_seen = time.monotonic()
        hello: dict[str, Any] = {
            "type": "connected",
            "connectionId": str(uuid.uuid4()),
            "userId": ws.user_id,
        }
        if ws.assessment_id is not None:
            hello["assessmentId"] = ws.assessment_id
        hello["timestamp"] = iso_utc(epoch_ms())
        invalid: list[float] = []
        try:
            await ws.send(orjson.dumps(hello), text=True)
            SENT.inc()
            self.clients.add(ws)
            if ws.assessment_id is not None:
                self.rooms.setdefault(ws.assessment_id, set()).add(ws)
            CONNECTIONS.inc()
            async for message in ws:
                RECEIVED.inc()
                reason = await self.on_client_message(ws, message)
                if reason is None:
                    continue
                IGNORED.labels(reason).inc()
                now = time.monotonic()
                invalid = [t for t in invalid if now - t < 10.0] + [now]
                if len(invalid) > self.settings.max_invalid_frames:
                    await ws.close(1008, "too many invalid frames")
        except ConnectionClosed:
            pass
        finally:
            if ws in self.clients:
                CONNECTIONS.dec()
            self.forget(ws)
            DURATION.observe(time.monotonic() - opened)
            frame = ws.protocol.close_sent or ws.protocol.close_rcvd
            CLOSED.labels(str(frame.code if frame else 1006)).inc()

    async def on_client_message(
        self, ws: PushConnection, message: str | bytes
    ) -> str | None:
        """Answer a client frame; return why it was ignored, or None."""
        if isinstance(message, bytes):
            return "binary"
        try:
            msg = orjson.loads(message)
        except orjson.JSONDecodeError:
            return "invalid_json"
        if type(msg) is not dict:
            return "not_object"
        if msg.get("type") == "ping":
            pong = orjson.dumps({"type": "pong", "timestamp": epoch_ms()})
            await ws.send(pong, text=True)
            SENT.inc()
            return None
        return None if msg.get("type") == "pong" else "unknown_type"

    def forget(self, ws: PushConnection) -> None:
        self.clients.discard(ws)
        room = self.rooms.get(ws.assessment_id) if ws.assessment_id else None
        if room is not None:
            room.discard(ws)
            if not room:
                del self.rooms[ws.assessment_id]

    async def heartbeat(self) -> None:
        """One periodic task for every connection: JSON pings and timeouts."""
        interval_s = self.settings.heartbeat_interval_ms / 1000
        timeout_s = self.settings.connection_timeout_ms / 1000
        # A quarter of the shorter period keeps both within 25 % of their setting.
        tick_s = min(max(min(interval_s, timeout_s) / 4, 0.02), 1.0)
        next_ping = time.monotonic() + interval_s
        while True:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            for ws in [c for c in self.clients if now - c.last_seen > timeout_s]:
                HEARTBEAT_FAILURES.inc()
                CONNECTIONS.dec()
                self.forget(ws)
                task = asyncio.create_task(ws.close(4000, "heartbeat timeout"))
                self.closing.add(task)
                task.add_done_callback(self.closing.discard)
            if now >= next_ping:
                next_ping = now + interval_s
                ping = orjson.dumps({"type": "ping", "timestamp": epoch_ms()})
                broadcast(self.clients, ping, text=True)
                SENT.inc(len(self.clients))


def respond(connection: ServerConnection, code: int, /, **body: str) -> Response:
    """A JSON response in place of the WebSocket handshake."""
    response = connection.respond(code, orjson.dumps(body).decode())
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response


def unauthorized(connection: ServerConnection, reason: str) -> Response:
    return respond(connection, 401, error="unauthorized", reason=reason)


def bad_request(connection: ServerConnection, reason: str) -> Response:
    return respond(connection, 400, error="bad_request", reason=reason)


async def main(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    app = BaselineServer(settings)
    app.kafka = KafkaReader(settings, loop, app.on_batch)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        app.handler,
        settings.host,
        settings.port,
        create_connection=PushConnection,
        process_request=app.process_request,
        # pushsvc negotiates no compression either; with it, broadcast would
        # compress every message once per connection.
        compression=None,
        ping_interval=None,  # the JSON heartbeat below replaces keepalive pings
        open_timeout=settings.handshake_timeout_ms / 1000,
        close_timeout=2,
        max_size=settings.max_frame_size_bytes,
        backlog=settings.listen_backlog,
    ) as server:
        app.kafka.start()
        beat = asyncio.create_task(app.heartbeat())
        log.info("websockets baseline listening on %s:%d", settings.host, settings.port)
        await stop.wait()
        log.info("signal received, shutting down")
        app.stopping = True
        beat.cancel()
        server.close(code=1001, reason="server shutting down")
        await server.wait_closed()  # bounded by close_timeout
    app.kafka.stopping.set()
    await asyncio.to_thread(app.kafka.join, 5)


def run() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"websockets baseline: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    uvloop.run(main(settings))
    return 0


if __name__ == "__main__":
    sys.exit(run())
