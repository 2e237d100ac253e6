"""The HTTP/WebSocket front: one port for `/ws`, `/health`, `/ready`, `/metrics`.

picows answers every request through one factory call, before the upgrade is
validated: that is where the path is routed, the token checked, and plain HTTP
endpoints answered with a status and body (picows then closes the socket). A
refused client therefore gets an HTTP status, never a half-open WebSocket.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import math
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator
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
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from ._router import BatchHandoff, Connection, Router
from .assets import static_response
from .auth import Identity, TokenVerifier
from .config import Settings
from .consumer import KafkaConsumerThread
from .errors import AuthError
from .metrics import CONTENT_TYPE, Metrics
from .readback import read_back

log = logging.getLogger("pushsvc.server")

CLOSE_GOING_AWAY = 1001
EXIT_SHUTDOWN_DEADLINE = 1
"""Exit status when shutdown overran ``SHUTDOWN_TIMEOUT`` and was cut short."""

_MAX_ASSESSMENT_ID = 128
_JSON = {"Content-Type": "application/json"}
_BEARER = "bearer"
_BEARER_101 = {"Sec-WebSocket-Protocol": _BEARER}
# The drain closes one batch per tick: 20 batches a second spread a deploy's
# reconnects finely enough without a timer per connection.
_DRAIN_TICK_S = 0.05
# A closed client answers with its close frame within a round trip; the router
# waits up to a second for it. The drain ends early enough to allow for that.
_CLOSE_WAIT_S = 1.0


def _json_response(status: int, body: dict[str, Any]) -> WSUpgradeResponseWithListener:
    payload = orjson.dumps(body)
    if status < 400:
        response = WSUpgradeResponse.create_ok_response(payload, _JSON)
    else:
        response = WSUpgradeResponse.create_error_response(status, payload, _JSON)
    return WSUpgradeResponseWithListener(response, None)


@dataclass
class _Refusals:
    """Requests answered with an HTTP error, by reason (exported as
    ``websocket_handshakes_refused_total{reason}``; field names are the labels)."""

    unauthorized: int = 0  # 401: bad, expired or missing token
    bad_request: int = 0  # 400: malformed query or assessmentId
    origin_not_allowed: int = 0  # 403: Origin not in ALLOWED_ORIGINS
    assessment_forbidden: int = 0  # 403: assessments claim does not allow it
    user_connection_limit: int = 0  # 429: MAX_CONNECTIONS_PER_USER reached
    connection_limit: int = 0  # 503: MAX_CONNECTIONS reached
    shutting_down: int = 0  # 503: the server is draining
    not_found: int = 0  # 404: a path other than /ws and the HTTP endpoints


class _RefusalCollector(Collector):
    """Exports :class:`_Refusals`; every reason is present, zero or not."""

    def __init__(self, refusals: _Refusals) -> None:
        self._refusals = refusals

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "websocket_handshakes_refused",
            "Requests refused with an HTTP status before any upgrade, by reason.",
            labels=["reason"],
        )
        for field in dataclasses.fields(self._refusals):
            family.add_metric([field.name], getattr(self._refusals, field.name))
        yield family


def _offered_protocols(request: WSUpgradeRequest) -> list[str]:
    """Every ``Sec-WebSocket-Protocol`` entry, in order (the header may repeat)."""
    offered: list[str] = []
    for value in request.headers.getall("Sec-WebSocket-Protocol", ()):
        offered.extend(p.strip() for p in value.split(",") if p.strip())
    return offered


def _bearer_token(offered: list[str]) -> str | None:
    """The entry after ``bearer``: browsers cannot set an Authorization header
    on a WebSocket, so ``new WebSocket(url, ["bearer", token])`` carries it."""
    try:
        index = offered.index(_BEARER)
    except ValueError:
        return None
    return offered[index + 1] if index + 1 < len(offered) else None


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
            max_messages_per_s=settings.max_client_messages_per_s,
            max_buffer_bytes=settings.max_connection_buffer_bytes,
            socket_send_buffer=settings.socket_send_buffer_bytes,
            require_assessment_claim=settings.require_assessment_claim,
            resume_buffer_size=settings.resume_buffer_size,
            resume_buffer_max_bytes=settings.resume_buffer_max_bytes,
            resume_max_age_ms=settings.resume_max_age_ms,
            state_max_assessments=settings.state_max_assessments,
        )
        self._consume = consume
        self.handoff: BatchHandoff | None = None
        self.consumer: KafkaConsumerThread | None = None
        self.metrics = Metrics(self.router)
        self.refusals = _Refusals()
        self._verifier = TokenVerifier(settings.jwt_secret)
        # Per-connection debug lines cost one branch when DEBUG is off.
        self._log_debug = log.isEnabledFor(logging.DEBUG)
        self.router.token_verifier = self._verifier.verify
        self.router.on_readback = self._read_back
        self._server: asyncio.Server | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._stopping = False
        self._stopping_since = 0.0
        # Origins are case-insensitive in scheme and host; browsers send them
        # lower-case, operators may not write them so.
        self._origins = frozenset(o.lower() for o in settings.allowed_origins)
        # user id -> connections accepted and not yet closed (see _on_ws).
        self.user_connections: dict[str, int] = {}
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
            if settings.snapshot_warmup_ms > 0:
                # Records read back at start build state and resume buffers;
                # they are history, so nobody is pushed them as live.
                self.router.live_check = lambda: (
                    self.consumer is not None and (self.consumer.ready)
                )
        self.metrics = Metrics(self.router, self.consumer, self.handoff)
        self.metrics.registry.register(_RefusalCollector(self.refusals))
        self.router.on_closed = self._on_connection_closed
        ws_logger = logging.getLogger("pushsvc.ws")
        # picows logs the raw request bytes (query token, Sec-WebSocket-Protocol
        # token) at its own level 9, below DEBUG; LOG_LEVEL=DEBUG must not turn
        # that on, nor any lower level, so its logger never goes below INFO.
        if ws_logger.getEffectiveLevel() < logging.INFO:
            ws_logger.setLevel(logging.INFO)
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

    def begin_shutdown(self) -> None:
        """Turn ``/ready`` to 503 and refuse new upgrades with 503, at once.

        Safe to call more than once; :meth:`stop` calls it too. Existing
        connections are left alone until :meth:`stop` drains them.
        """
        if self._stopping:
            return
        self._stopping = True
        self._stopping_since = time.monotonic()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    async def stop(
        self,
        reason: str = "server shutting down",
        *,
        drain_ms: int | None = None,
        timeout_ms: int | None = None,
    ) -> bool:
        """Shut down gracefully: refuse new work, close every client with 1001
        (in batches over the drain window), stop the Kafka consumer.

        The listener stays open during the drain, so load balancers and clients
        get ``/ready`` 503 and upgrades 503 rather than refused connections.

        :param reason: the close reason sent with 1001.
        :param drain_ms: window over which the clients are closed, milliseconds
            (default ``SHUTDOWN_DRAIN``; 0 closes all at once). Shortened when
            needed so the last batch still has a second to close in time.
        :param timeout_ms: the whole shutdown, counted from
            :meth:`begin_shutdown`, takes at most this long, milliseconds
            (default ``SHUTDOWN_TIMEOUT`` less a reserve for process exit).
        :return: True if every connection closed and the consumer stopped in
            time; False if some were still closing at the deadline (they are
            then left to the process exit).
        """
        self.begin_shutdown()
        loop = asyncio.get_running_loop()
        settings = self.settings
        if drain_ms is None:
            drain_ms = settings.shutdown_drain_ms
        if timeout_ms is None:
            timeout_ms = settings.shutdown_timeout_ms - _exit_reserve_ms(
                settings.shutdown_timeout_ms
            )
        deadline = self._stopping_since + timeout_ms / 1000.0
        count = self.router.connection_count
        log.info(
            "shutting down: closing %d connections with %d over %d ms",
            count,
            CLOSE_GOING_AWAY,
            drain_ms,
        )
        await self._drain(reason, drain_ms / 1000.0, deadline - _CLOSE_WAIT_S)
        if self._server is not None:
            self._server.close()
        consumer_stopped: asyncio.Future[None] | None = None
        if self.consumer is not None:
            # The consumer fed the clients until the last batch was closed;
            # its join is bounded, so this thread cannot outlive the deadline.
            join_s = max(deadline - time.monotonic(), 0.05)
            consumer_stopped = loop.run_in_executor(None, self.consumer.stop, join_s)
        for _ in range(100_000):
            if self.router.connection_count == 0 or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.01)
        if consumer_stopped is not None:
            try:
                await asyncio.wait_for(
                    consumer_stopped, max(deadline - time.monotonic(), 0.05)
                )
            except TimeoutError:
                pass
        left = self.router.connection_count
        consumer_alive = self.consumer is not None and self.consumer.alive
        elapsed_ms = (time.monotonic() - self._stopping_since) * 1000.0
        if left or consumer_alive:
            log.warning(
                "shutdown deadline reached after %.0f ms: %d connections still "
                "closing%s; exiting anyway",
                elapsed_ms,
                left,
                ", kafka consumer not stopped" if consumer_alive else "",
            )
            return False
        log.info("shutdown complete in %.0f ms", elapsed_ms)
        return True

    async def _drain(self, reason: str, window_s: float, last_at: float) -> None:
        """Close every connection with 1001, batch by batch, over ``window_s``
        seconds but starting no batch after ``last_at`` (monotonic seconds)."""
        conns = self.router.connections()
        window_s = max(0.0, min(window_s, last_at - time.monotonic()))
        batches = max(1, min(len(conns), int(window_s / _DRAIN_TICK_S)))
        size = math.ceil(len(conns) / batches) if conns else 0
        start = time.monotonic()
        for i in range(batches):
            delay = start + window_s * i / batches - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for conn in conns[i * size : (i + 1) * size]:
                # A connection already gone or closing ignores this; one whose
                # transport fails is dropped by close() and must not end the
                # drain for the others.
                try:
                    conn.close(CLOSE_GOING_AWAY, reason)
                except Exception:
                    log.debug("closing a connection failed", exc_info=True)
        # Upgrades were refused since begin_shutdown, so this finds none in
        # practice; it is the guarantee that nobody is left open.
        try:
            self.router.close_all(CLOSE_GOING_AWAY, reason)
        except Exception:
            log.debug("closing a connection failed", exc_info=True)

    def _read_back(
        self,
        connection: Connection,
        ranges: list[tuple[str, int, int, int]],
        vector: dict[int, int],
        events: list[Any],
    ) -> None:
        """Router callback: a resume needs records the memory buffer no longer
        holds. Read them in a worker thread; the connection holds its live
        frames meanwhile."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, read_back, self.settings, ranges)

        def done(result: asyncio.Future[Any]) -> None:
            try:
                records = result.result()
            except Exception as exc:  # any failure: resync, never a stall
                log.warning("resume read-back failed: %s", exc)
                connection.finish_resume([], vector, events, str(exc) or "error")
                return
            connection.finish_resume(records, vector, events)

        future.add_done_callback(done)

    def _on_connection_closed(self, connection: Connection, code: int) -> None:
        """Router callback after a connection is gone: metrics, per-user count."""
        if self._log_debug:
            log.debug(
                "connection closed with %d",
                code,
                extra={"connection_id": connection.connection_id},
            )
        try:
            self.metrics.on_connection_closed(connection, code)
        finally:
            self._release_user(connection.user_id)

    def _release_user(self, user_id: str) -> None:
        count = self.user_connections.get(user_id, 0)
        if count > 1:
            self.user_connections[user_id] = count - 1
        elif count == 1:
            del self.user_connections[user_id]

    def _confirm_upgrade(self, connection: Connection) -> None:
        # Runs right after the handshake call that returned ``connection``.
        # picows validates the upgrade headers only after the factory returned,
        # and a connection refused there (400) never connects nor disconnects:
        # its per-user slot is given back here. A connected one has a start
        # time, and on_closed gives its slot back when it goes.
        if connection.connected_at == 0.0:
            self._release_user(connection.user_id)

    def _sweep(self) -> None:
        try:
            self.router.sweep()
        except Exception:
            log.exception("heartbeat sweep failed")
        finally:
            if not self._stopping:
                loop = asyncio.get_running_loop()
                self._sweep_handle = loop.call_later(self._sweep_s, self._sweep)
                if self.consumer is not None:
                    # Restarts a dead consumer thread, or fails /health (it
                    # never raises; and the next sweep is already scheduled).
                    self.consumer.watchdog()

    # -- request routing -----------------------------------------------------

    def _on_request(
        self, request: WSUpgradeRequest
    ) -> Connection | WSUpgradeResponseWithListener:
        path, _, query = request.path.partition(b"?")
        if path == b"/ws":
            return self._on_ws(request, query)
        if path == b"/health":
            if self.consumer is not None and not self.consumer.healthy:
                return _json_response(
                    503,
                    {"status": "unhealthy", "reason": self.consumer.health_reason},
                )
            return _json_response(200, {"status": "ok"})
        if path == b"/ready":
            if self.ready:
                return _json_response(200, {"status": "ready"})
            reason = self._not_ready_reason()
            if not self._stopping and self.consumer is not None:
                reason = self.consumer.not_ready_reason()
            return _json_response(503, {"status": "not ready", "reason": reason})
        if path == b"/metrics":
            response = WSUpgradeResponse.create_ok_response(
                self.metrics.render(), {"Content-Type": CONTENT_TYPE}
            )
            return WSUpgradeResponseWithListener(response, None)
        static = static_response(path, dashboard=self.settings.serve_dashboard)
        if static is not None:
            return static
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

    def _on_ws(
        self, request: WSUpgradeRequest, query: bytes
    ) -> Connection | WSUpgradeResponseWithListener:
        # The cheap refusals come first: during a drain or at capacity, a storm
        # of reconnects must not cost a token verification each.
        if self._stopping:
            return self._refuse("shutting_down", 503, "unavailable", "shutting down")
        if self._origins:
            origin = request.headers.get("Origin")
            # Browsers always send Origin with an upgrade, and cross-site
            # WebSocket hijacking needs a browser; a client without Origin is
            # a server or a script, which could forge any Origin anyway.
            if origin is not None and origin.rstrip("/").lower() not in self._origins:
                return self._refuse(
                    "origin_not_allowed", 403, "forbidden", "origin not allowed"
                )
        if self.router.connection_count >= self.settings.max_connections:
            return self._refuse(
                "connection_limit", 503, "unavailable", "server at its connection limit"
            )
        try:
            params = parse_qs(query.decode("utf-8"), max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            return self._refuse(
                "bad_request", 400, "bad_request", "malformed query string"
            )
        offered = _offered_protocols(request)
        # A token in Sec-WebSocket-Protocol wins over one in the query.
        token = _bearer_token(offered)
        if token is None:
            tokens = params.get("token")
            token = tokens[0] if tokens else None
        try:
            identity = self._verifier.verify(token)
        except AuthError as exc:
            return self._refuse("unauthorized", 401, "unauthorized", exc.reason)
        assessments = params.get("assessmentId")
        assessment = assessments[0] if assessments else None
        if assessment is not None and (
            len(assessment) > _MAX_ASSESSMENT_ID or not assessment.isprintable()
        ):
            return self._refuse(
                "bad_request",
                400,
                "bad_request",
                f"assessmentId must be 1-{_MAX_ASSESSMENT_ID} printable characters",
            )
        denied = self._assessment_denied(identity, assessment)
        if denied is not None:
            return self._refuse("assessment_forbidden", 403, "forbidden", denied)
        user = identity.user_id
        open_now = self.user_connections.get(user, 0)
        limit = self.settings.max_connections_per_user
        if open_now >= limit:
            return self._refuse(
                "user_connection_limit",
                429,
                "too_many_connections",
                f"at most {limit} connections per user",
            )
        since = params.get("since")
        connection = Connection(
            self.router,
            user,
            assessment,
            expires_at=identity.expires_at or 0.0,
            since=since[0] if since else None,
        )
        # Counted now, not when connected: the next handshake, even in the
        # same read, must see this one. _confirm_upgrade undoes it if picows
        # refuses the upgrade after this returns.
        self.user_connections[user] = open_now + 1
        asyncio.get_running_loop().call_soon(self._confirm_upgrade, connection)
        if self._log_debug:
            # The id the client sees in its connected message, never the token.
            log.debug(
                "connection accepted for user %s, assessment %s",
                user,
                assessment,
                extra={"connection_id": connection.connection_id},
            )
        if _BEARER in offered:
            # A browser that offered subprotocols fails the connection unless
            # the 101 selects exactly one of them.
            response = WSUpgradeResponse.create_101_response(_BEARER_101)
            return WSUpgradeResponseWithListener(response, connection)
        return connection

    def _assessment_denied(
        self, identity: Identity, assessment: str | None
    ) -> str | None:
        """Why the token may not open ``assessment``, or None if it may.

        A token with an ``assessments`` claim (a list of id strings) may open
        only those; without ``assessmentId`` it gets market data only, which
        every authenticated user may have. With ``REQUIRE_ASSESSMENT_CLAIM``
        a token without the claim is refused outright.
        """
        claims = identity.claims
        if "assessments" not in claims:
            if self.settings.require_assessment_claim:
                return "token has no assessments claim"
            return None
        allowed = claims["assessments"]
        if not isinstance(allowed, list):
            return "assessments claim is not a list"
        if assessment is None or assessment in allowed:
            return None
        return "assessmentId not allowed by this token"

    def _refuse(
        self, counter: str, status: int, error: str, reason: str
    ) -> WSUpgradeResponseWithListener:
        setattr(self.refusals, counter, getattr(self.refusals, counter) + 1)
        # Never the path or the headers here: they may carry the token.
        log.debug("upgrade refused with %d: %s", status, reason)
        return _json_response(status, {"error": error, "reason": reason})


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


def _exit_reserve_ms(timeout_ms: int) -> int:
    """Of ``SHUTDOWN_TIMEOUT``, the part kept for the process exit itself
    (loop teardown, librdkafka destruction): a second, or a quarter."""
    return min(1000, timeout_ms // 4)


def _arm_exit_deadline(timeout_ms: int) -> threading.Timer:
    """Exit the process with :data:`EXIT_SHUTDOWN_DEADLINE` if it is still
    alive shortly before ``timeout_ms`` from now.

    A thread, not a loop timer: what overruns may be the loop itself (a
    blocking call, a hung executor join at teardown).
    """
    timeout_s = (timeout_ms - min(250, timeout_ms // 20)) / 1000.0

    def expire() -> None:
        log.error(
            "shutdown did not finish within SHUTDOWN_TIMEOUT (%d ms); exiting "
            "with status %d",
            timeout_ms,
            EXIT_SHUTDOWN_DEADLINE,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_SHUTDOWN_DEADLINE)

    timer = threading.Timer(timeout_s, expire)
    timer.name = "pushsvc-exit-deadline"
    timer.daemon = True
    timer.start()
    return timer


async def serve(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully.

    On the signal ``/ready`` turns 503 and new upgrades get 503 at once; the
    clients are closed with 1001 in batches over ``SHUTDOWN_DRAIN``; the Kafka
    consumer is stopped; the function returns (exit status 0) within
    ``SHUTDOWN_TIMEOUT``. Should anything hang past that deadline, the process
    exits with :data:`EXIT_SHUTDOWN_DEADLINE` instead.
    """
    limit = raise_fd_limit()
    log.info("open-file limit %d (about that many clients)", limit)
    loop = asyncio.get_running_loop()
    server = PushServer(settings)
    stop = asyncio.Event()
    deadline: list[threading.Timer] = []

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.info("%s received again; the shutdown is under way", sig.name)
            return
        log.info(
            "%s received: shutting down (drain %d ms, deadline %d ms)",
            sig.name,
            settings.shutdown_drain_ms,
            settings.shutdown_timeout_ms,
        )
        server.begin_shutdown()
        deadline.append(_arm_exit_deadline(settings.shutdown_timeout_ms))
        stop.set()

    # Before start(): a signal during start-up then still drains, not kills.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.start()
    # Everything alive now lives as long as the process: keep it out of the
    # cyclic collector's scans, and let young generations grow larger, so a
    # connection storm (many short-lived objects per handshake) does not pay
    # for a full scan of the heap over and over.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    try:
        await stop.wait()
    finally:
        if not deadline:  # leaving for another reason than a signal
            server.begin_shutdown()
            deadline.append(_arm_exit_deadline(settings.shutdown_timeout_ms))
        await server.stop()
