"""Settings: the environment, read once into one frozen :class:`Settings`.

Every knob the service has is a field here with its unit in the name (``_ms`` for
milliseconds, ``_bytes`` for sizes). Nothing else in the package reads
``os.environ``; the settings object travels as an argument.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

DEFAULT_TOPICS = r"^(market-data|trading|risk|assessment)\..*"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The effective configuration of one pushsvc process.

    :param host: interface to listen on (``HOST``, default ``0.0.0.0``).
    :param port: TCP port for WebSocket and HTTP (``PORT``, default 3003).
    :param jwt_secret: HS256 secret for client tokens (``JWT_SECRET``, required).
    :param heartbeat_interval_ms: period of the JSON ``ping`` to every client
        (``HEARTBEAT_INTERVAL``, milliseconds, default 30000).
    :param connection_timeout_ms: a connection silent this long is closed
        (``CONNECTION_TIMEOUT``, milliseconds, default 60000).
    :param node_env: ``development`` or ``production`` (``NODE_ENV``).
    :param log_level: ``LOG_LEVEL``, a :mod:`logging` level name (default INFO).
    :param kafka_brokers: bootstrap servers (``KAFKA_BROKERS``, comma separated).
    :param kafka_client_id: ``KAFKA_CLIENT_ID`` (default ``websocket-service``).
    :param kafka_group_id: ``KAFKA_GROUP_ID``; only a label, see consumer.py.
    :param kafka_topics: ``KAFKA_TOPICS``: a regex when it starts with ``^``,
        else a comma-separated list of topic names.
    :param kafka_topic_refresh_interval_ms: how often topic metadata is re-read
        to pick up new topics and partitions (``KAFKA_TOPIC_REFRESH_INTERVAL``,
        milliseconds, default 5000).
    :param kafka_batch_size: most records handed to the loop in one batch
        (``KAFKA_BATCH_SIZE``, default 1000).
    :param kafka_fetch_wait_max_ms: librdkafka ``fetch.wait.max.ms``
        (``KAFKA_FETCH_WAIT_MAX_MS``, milliseconds, default 5; librdkafka's own
        default of 500 would add up to half a second to every event).
    :param max_frame_size_bytes: larger client frames close with 1009
        (``MAX_FRAME_SIZE``, bytes, default 65536).
    :param max_invalid_frames: more invalid client frames than this within 10 s
        close the connection with 1008 (``MAX_INVALID_FRAMES``, default 20).
    :param handshake_timeout_ms: a socket that has not completed its upgrade
        request by then is dropped (``HANDSHAKE_TIMEOUT``, milliseconds, 5000).
    :param listen_backlog: ``listen()`` backlog, sized for reconnect storms
        (``LISTEN_BACKLOG``, default 4096).
    :param kafka_unavailable_grace_ms: how long the brokers may be unreachable
        before ``/ready`` turns 503 (``KAFKA_UNAVAILABLE_GRACE``, milliseconds,
        default 10000).
    :param snapshot_warmup_ms: on start, partitions are read back from this
        far in the past (by record timestamp) to build state, and ``/ready``
        waits until that window is read (``SNAPSHOT_WARMUP``, milliseconds,
        default 300000; 0 starts at the latest offset).
    :param shutdown_timeout_ms: after SIGTERM/SIGINT the process exits within
        this (``SHUTDOWN_TIMEOUT``, milliseconds, default 15000).
    :param shutdown_drain_ms: window over which clients are closed with 1001,
        in batches, so they do not all reconnect at once (``SHUTDOWN_DRAIN``,
        milliseconds, default 5000; capped below ``SHUTDOWN_TIMEOUT``).
    :param allowed_origins: ``ALLOWED_ORIGINS``, comma separated; when set, an
        upgrade from any other ``Origin`` gets 403. Empty: any origin.
    :param max_connections: open connections per process; more get 503
        (``MAX_CONNECTIONS``, default 50000).
    :param max_connections_per_user: open connections per user id; more get
        429 (``MAX_CONNECTIONS_PER_USER``, default 20).
    :param require_assessment_claim: refuse (403) tokens without an
        ``assessments`` claim (``REQUIRE_ASSESSMENT_CLAIM``, default false).
    :param max_client_messages_per_s: inbound frames per second per client
        before a 1008 close (``MAX_CLIENT_MESSAGES_PER_SEC``, default 50).
    :param max_connection_buffer_bytes: outbound bytes a slow client may have
        queued before it is closed with 1013 (``MAX_CONNECTION_BUFFER``, bytes,
        default 1048576).
    :param socket_send_buffer_bytes: ``SO_SNDBUF`` of each client socket
        (``SOCKET_SEND_BUFFER``, bytes; default 0 keeps the kernel's
        autotuning). Smaller values bound the kernel memory a stalled client
        can hold and make backpressure (conflation, 1013) start sooner.
    :param serve_dashboard: serve the live page at ``/`` (``SERVE_DASHBOARD``,
        default false; ``pushsvc demo`` turns it on). ``/client.js`` is served
        either way.
    """

    host: str = "0.0.0.0"
    port: int = 3003
    jwt_secret: str = field(repr=False)
    heartbeat_interval_ms: int = 30_000
    connection_timeout_ms: int = 60_000
    node_env: str = "development"
    log_level: str = "INFO"
    kafka_brokers: str = "localhost:9092"
    kafka_client_id: str = "websocket-service"
    kafka_group_id: str = "websocket-service-group"
    kafka_topics: str = DEFAULT_TOPICS
    kafka_topic_refresh_interval_ms: int = 5_000
    kafka_batch_size: int = 1_000
    kafka_fetch_wait_max_ms: int = 5
    max_frame_size_bytes: int = 65_536
    max_invalid_frames: int = 20
    handshake_timeout_ms: int = 5_000
    listen_backlog: int = 4_096
    kafka_unavailable_grace_ms: int = 10_000
    snapshot_warmup_ms: int = 300_000
    shutdown_timeout_ms: int = 15_000
    shutdown_drain_ms: int = 5_000
    allowed_origins: tuple[str, ...] = ()
    max_connections: int = 50_000
    max_connections_per_user: int = 20
    require_assessment_claim: bool = False
    max_client_messages_per_s: int = 50
    max_connection_buffer_bytes: int = 1_048_576
    socket_send_buffer_bytes: int = 0
    resume_buffer_size: int = 256
    resume_buffer_max_bytes: int = 64 * 1024 * 1024
    resume_max_age_ms: int = 300_000
    state_max_assessments: int = 100_000
    serve_dashboard: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``).

        :raises ConfigError: naming the first variable that is missing or bad.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = _ENV_NAMES[f.name]
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            parse = _PARSERS.get(f.name, _text)
            try:
                values[f.name] = parse(raw.strip())
            except ValueError as exc:
                raise ConfigError(f"{var}={raw!r} is invalid: {exc}") from None
        if "jwt_secret" not in values:
            raise ConfigError(
                "JWT_SECRET is not set: set it to the HS256 secret that signs "
                "client tokens (for a local try, run `pushsvc demo`)"
            )
        settings = cls(**values)
        if settings.shutdown_drain_ms >= settings.shutdown_timeout_ms:
            raise ConfigError(
                f"SHUTDOWN_DRAIN={settings.shutdown_drain_ms} must be shorter than "
                f"SHUTDOWN_TIMEOUT={settings.shutdown_timeout_ms}: the drain has to "
                "finish before the process must exit"
            )
        return settings

    @property
    def topic_pattern(self) -> re.Pattern[str] | None:
        """The compiled ``KAFKA_TOPICS`` regex, or None for a plain list."""
        if self.kafka_topics.startswith("^"):
            return re.compile(self.kafka_topics)
        return None

    @property
    def topic_names(self) -> tuple[str, ...]:
        """The ``KAFKA_TOPICS`` list when it is not a regex."""
        if self.kafka_topics.startswith("^"):
            return ()
        return tuple(t.strip() for t in self.kafka_topics.split(",") if t.strip())

    @property
    def is_production(self) -> bool:
        return self.node_env == "production"

    def masked(self) -> dict[str, Any]:
        """Every setting by environment name, secrets masked, for display."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[_ENV_NAMES[f.name]] = "****" if f.name in _SECRETS else value
        return out


def _text(raw: str) -> str:
    return raw


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ValueError(f"expected a number {bound}")
        return value

    return parse


def _log_level(raw: str) -> str:
    level = raw.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    return level


def _topics(raw: str) -> str:
    if raw.startswith("^"):
        try:
            re.compile(raw)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
    elif not any(t.strip() for t in raw.split(",")):
        raise ValueError("expected a regex starting with ^ or topic names")
    return raw


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if "://" not in origin and origin != "null":
            raise ValueError("expected origins like https://app.example.com")
    return origins


def _bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _brokers(raw: str) -> str:
    for part in raw.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("expected host:port[,host:port...]")
    return raw


_ENV_NAMES = {
    "host": "HOST",
    "port": "PORT",
    "jwt_secret": "JWT_SECRET",
    "heartbeat_interval_ms": "HEARTBEAT_INTERVAL",
    "connection_timeout_ms": "CONNECTION_TIMEOUT",
    "node_env": "NODE_ENV",
    "log_level": "LOG_LEVEL",
    "kafka_brokers": "KAFKA_BROKERS",
    "kafka_client_id": "KAFKA_CLIENT_ID",
    "kafka_group_id": "KAFKA_GROUP_ID",
    "kafka_topics": "KAFKA_TOPICS",
    "kafka_topic_refresh_interval_ms": "KAFKA_TOPIC_REFRESH_INTERVAL",
    "kafka_batch_size": "KAFKA_BATCH_SIZE",
    "kafka_fetch_wait_max_ms": "KAFKA_FETCH_WAIT_MAX_MS",
    "max_frame_size_bytes": "MAX_FRAME_SIZE",
    "max_invalid_frames": "MAX_INVALID_FRAMES",
    "handshake_timeout_ms": "HANDSHAKE_TIMEOUT",
    "listen_backlog": "LISTEN_BACKLOG",
    "kafka_unavailable_grace_ms": "KAFKA_UNAVAILABLE_GRACE",
    "snapshot_warmup_ms": "SNAPSHOT_WARMUP",
    "shutdown_timeout_ms": "SHUTDOWN_TIMEOUT",
    "shutdown_drain_ms": "SHUTDOWN_DRAIN",
    "allowed_origins": "ALLOWED_ORIGINS",
    "max_connections": "MAX_CONNECTIONS",
    "max_connections_per_user": "MAX_CONNECTIONS_PER_USER",
    "require_assessment_claim": "REQUIRE_ASSESSMENT_CLAIM",
    "max_client_messages_per_s": "MAX_CLIENT_MESSAGES_PER_SEC",
    "max_connection_buffer_bytes": "MAX_CONNECTION_BUFFER",
    "socket_send_buffer_bytes": "SOCKET_SEND_BUFFER",
    "resume_buffer_size": "RESUME_BUFFER_SIZE",
    "resume_buffer_max_bytes": "RESUME_BUFFER_MAX_BYTES",
    "resume_max_age_ms": "RESUME_MAX_AGE",
    "state_max_assessments": "STATE_MAX_ASSESSMENTS",
    "serve_dashboard": "SERVE_DASHBOARD",
}

_SECRETS = frozenset({"jwt_secret"})

_PARSERS: dict[str, Callable[[str], Any]] = {
    "port": _int_in(0, 65535),
    "heartbeat_interval_ms": _int_in(10),
    "connection_timeout_ms": _int_in(10),
    "log_level": _log_level,
    "kafka_brokers": _brokers,
    "kafka_topics": _topics,
    "kafka_topic_refresh_interval_ms": _int_in(100),
    "kafka_batch_size": _int_in(1, 1_000_000),
    "kafka_fetch_wait_max_ms": _int_in(0, 60_000),
    "max_frame_size_bytes": _int_in(125, 16 * 1024 * 1024),
    "max_invalid_frames": _int_in(1),
    "handshake_timeout_ms": _int_in(100),
    "listen_backlog": _int_in(1, 65535),
    "kafka_unavailable_grace_ms": _int_in(0),
    "snapshot_warmup_ms": _int_in(0),
    "shutdown_timeout_ms": _int_in(100),
    "shutdown_drain_ms": _int_in(0),
    "allowed_origins": _origins,
    "max_connections": _int_in(1),
    "max_connections_per_user": _int_in(1),
    "require_assessment_claim": _bool,
    "max_client_messages_per_s": _int_in(1),
    "max_connection_buffer_bytes": _int_in(4096),
    "socket_send_buffer_bytes": _int_in(0, 64 * 1024 * 1024),
    "resume_buffer_size": _int_in(0, 1_000_000),
    "resume_buffer_max_bytes": _int_in(0),
    "resume_max_age_ms": _int_in(0),
    "state_max_assessments": _int_in(1),
    "serve_dashboard": _bool,
}


def env_names() -> frozenset[str]:
    """Every environment variable pushsvc reads."""
    return frozenset(_ENV_NAMES.values())
