"""The HTTP/WebSocket front: one port for ``/ws``, ``/health``, ``/ready``, ``/metrics``.

picows answers every request through one factory call, before the upgrade is
validated: that is where the path is routed, the token checked, and plain HTTP
endpoints answered with a status and body (picows then closes the socket). A
refused client therefore gets an HTTP status, never a half-open WebSocket.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson
from picows import (
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from ._router import BatchHandoff, Connection, Router
from .auth import TokenVerifier
from .config import Settings
from .consumer import KafkaConsumerThread
from .errors import AuthError
from .metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("pushsvc.server")

CLOSE_GOING_AWAY = 1001
_MAX_ASSESSMENT_ID = 128
_JSON = {"Content-Type": "application/json"}


def _json_response(status: int, body: dict[str, Any]) -> WSUpgradeResponseWithListener:
    payload = orjson.dumps(body)
    if status < 400:
        response = WSUpgradeResponse.create_ok_response(payload, _JSON)
    else:
        response = WSUpgradeResponse.create_error_response(status, payload, _JSON)
    return WSUpgradeResponseWithListener(response, None)


@dataclass
class _Refusals:
    """Handshakes answered with an HTTP error, by reason (read by tests/metrics)."""

    unauthorized: int = 0
    bad_request: int = 0
    not_found: int = 0


class PushServer:
    """pushsvc in one object: router, Kafka consumer, metrics and the listener.

    :param settings: the service settings.
    :param consume: start the Kafka consumer (False for a server fed by hand,
        e.g. in benchmarks that call :meth:`Router.deliver` directly).
    """

    def __init__(self, settings: Settings, *, consume: bool = True) -> None:
        self.settings = settings
        self.router = Router(
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            connection_timeout_ms=settings.connection_timeout_ms,
            max_invalid_frames=settings.max_invalid_frames,
        )
        self._consume = consume
        self.handoff: BatchHandoff | None = None
        self.consumer: KafkaConsumerThread | None = None
        self.metrics = Metrics(self.router)
        self.refusals = _Refusals()
        self._verifier = TokenVerifier(settings.jwt_secret)
        self._server: asyncio.Server | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._stopping = False
        hb = settings.heartbeat_interval_ms
        timeout = settings.connection_timeout_ms
        # One periodic sweep serves every connection; a quarter of the shorter
        # period keeps pings and timeouts within 25% of their settings.
        self._sweep_s = min(max(min(hb, timeout) / 4000.0, 0.02), 1.0)
        if len(settings.jwt_secret.encode()) < 32:
            log.warning(
                "JWT_SECRET is shorter than 32 bytes: HS256 wants at least 32 "
                "random bytes (e.g. `openssl rand -base64 48`)"
            )
        if timeout <= hb:
            log.warning(
                "CONNECTION_TIMEOUT (%d ms) is not longer than HEARTBEAT_INTERVAL "
                "(%d ms): clients that only answer pings will be timed out",
                timeout,
                hb,
            )

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``PORT=0``)."""
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def ready(self) -> bool:
        if self._stopping:
            return False
        return self.consumer.ready if self.consumer is not None else True

    async def start(self) -> None:
        """Bind the port and start consuming; returns once listening."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        if self._consume:
            self.handoff = BatchHandoff(self.router, loop)
            self.consumer = KafkaConsumerThread(settings, self.handoff.push)
        self.metrics = Metrics(self.router, self.consumer, self.handoff)
        self.router.on_closed = self.metrics.on_connection_closed
        ws_logger = logging.getLogger("pushsvc.ws")
        self._server = await ws_create_server(
            self._on_request,
            settings.host,
            settings.port,
            websocket_handshake_timeout=settings.handshake_timeout_ms / 1000.0,
            enable_auto_ping=False,
            enable_auto_pong=True,
            max_frame_size=settings.max_frame_size_bytes,
            read_buffer_init_size=2048,
            # An adapter, not a Logger: picows makes a child Logger per
            # connection from a Logger, and those are never freed.
            logger_name=logging.LoggerAdapter(ws_logger, {}),
            backlog=settings.listen_backlog,
            reuse_address=True,
            use_aiofastnet=False,
        )
        if self.consumer is not None:
            self.consumer.start()
        self._sweep_handle = loop.call_later(self._sweep_s, self._sweep)
        log.info(
            "pushsvc listening on %s:%d (topics %s, brokers %s)",
            settings.host,
            self.port,
            settings.kafka_topics,
            settings.kafka_brokers,
        )

    async def stop(self, reason: str = "server shutting down") -> None:
        """Refuse new work, close every client with 1001, stop the consumer."""
        self._stopping = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
        if self._server is not None:
            self._server.close()
        self.router.close_all(CLOSE_GOING_AWAY, reason)
        if self.consumer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.consumer.stop)
        # Give the close frames a moment to leave before the loop goes away.
        for _ in range(50):
            if self.router.connection_count == 0:
                break
            await asyncio.sleep(0.02)

    def _sweep(self) -> None:
        try:
            self.router.sweep()
        except Exception:
            log.exception("heartbeat sweep failed")
        finally:
            if not self._stopping:
                loop = asyncio.get_running_loop()
                self._sweep_handle = loop.call_later(self._sweep_s, self._sweep)

    # -- request routing -----------------------------------------------------

    def _on_request(
        self, request: WSUpgradeRequest
    ) -> Connection | WSUpgradeResponseWithListener:
        path, _, query = request.path.partition(b"?")
        if path == b"/ws":
            return self._on_ws(query)
        if path == b"/health":
            return _json_response(200, {"status": "ok"})
        if path == b"/ready":
            if self.ready:
                return _json_response(200, {"status": "ready"})
            return _json_response(
                503, {"status": "not ready", "reason": self._not_ready_reason()}
            )
        if path == b"/metrics":
            response = WSUpgradeResponse.create_ok_response(
                self.metrics.render(), {"Content-Type": CONTENT_TYPE}
            )
            return WSUpgradeResponseWithListener(response, None)
        self.refusals.not_found += 1
        return _json_response(
            404,
            {"error": "not_found", "reason": "try /ws, /health, /ready or /metrics"},
        )

    def _not_ready_reason(self) -> str:
        if self._stopping:
            return "shutting down"
        if self.consumer is not None and not self.consumer.alive:
            return "kafka consumer stopped"
        return "kafka partitions not assigned yet"

    def _on_ws(self, query: bytes) -> Connection | WSUpgradeResponseWithListener:
        if self._stopping:
            return _json_response(
                503, {"error": "unavailable", "reason": "shutting down"}
            )
        try:
            params = parse_qs(query.decode("utf-8"), max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            self.refusals.bad_request += 1
            return _json_response(
                400, {"error": "bad_request", "reason": "malformed query string"}
            )
        tokens = params.get("token")
        try:
            identity = self._verifier.verify(tokens[0] if tokens else None)
        except AuthError as exc:
            self.refusals.unauthorized += 1
            return _json_response(401, {"error": "unauthorized", "reason": exc.reason})
        assessments = params.get("assessmentId")
        assessment = assessments[0] if assessments else None
        if assessment is not None and (
            len(assessment) > _MAX_ASSESSMENT_ID or not assessment.isprintable()
        ):
            self.refusals.bad_request += 1
            return _json_response(
                400,
                {
                    "error": "bad_request",
                    "reason": f"assessmentId must be 1-{_MAX_ASSESSMENT_ID} "
                    "printable characters",
                },
            )
        return Connection(self.router, identity.user_id, assessment)


def raise_fd_limit() -> int:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit: one descriptor per
    client, and the default soft limit (often 1024) would refuse connections
    long before memory or CPU run out. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or (hard == resource.RLIM_INFINITY and soft != hard):
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    return int(soft)


async def serve(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully."""
    limit = raise_fd_limit()
    log.info("open-file limit %d (about that many clients)", limit)
    loop = asyncio.get_running_loop()
    server = PushServer(settings)
    await server.start()
    # Everything alive now lives as long as the process: keep it out of the
    # cyclic collector's scans, and let young generations grow larger, so a
    # connection storm (many short-lived objects per handshake) does not pay
    # for a full scan of the heap over and over.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        await server.stop()
