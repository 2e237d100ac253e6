"""End-to-end load tool: a real broker, a real server, real WebSocket clients.

Each round starts a fresh embedded broker (Tansu) and a fresh server process
(``python -m pushsvc serve`` or the ``websockets`` baseline,
``python -m benchmarks.baselines.websockets_server``), then

1. **connection storm**: ``--connections`` picows clients (uvloop, in
   ``--workers`` spawned processes, at most ``--inflight`` handshakes in flight
   per worker), spread round-robin over ``--assessments``, each with a freshly
   minted JWT, each waiting for its ``connected`` message: connects per second,
   failures by reason, server CPU per accepted connection;
2. **idle memory**: server RSS before the storm and once the connections are
   open and idle: KiB per connection;
3. **traffic**: a paced producer sends ``--market-rate`` ``market_price`` ticks
   per second (to every connection) and ``--rate`` per-assessment events per
   second (to the connections of one assessment) for ``--duration`` seconds.
   Each event carries ``seq`` and ``sent_ns``; clients record sequence numbers
   and latencies (``time.time_ns() - sentNs``). Reported: loss, duplicates,
   misrouted messages and messages out of order within one topic and key (all
   must be 0; order across topics is not promised by Kafka and only counted),
   delivered messages per second, latency percentiles per kind, server and
   client CPU per message.

Before the storm, one probe connection waits until an event on every topic has
reached it, so nothing is timed while the server's consumer is still starting.
Server CPU is user + system time of all its threads from ``/proc/<pid>/stat``
(clock-tick resolution, 10 ms on most kernels: small runs give coarse
per-connect figures). Every phase also records the CPU of the broker, the
clients, this process and the whole machine; ``foreign`` CPU is what none of
them used, i.e. other work on the machine disturbing the figures.

After the rounds, :mod:`benchmarks.floor` measures raw ``send()`` of the run's
mean frame size over as many loopback connections: the kernel floor under any
fan-out. Examples::

    python -m benchmarks.load --server pushsvc --connections 1000 --rate 2000
    python -m benchmarks.load --server both --rounds 3 --json load.json
    python -m benchmarks.load --smoke --server pushsvc --json /tmp/smoke.json

Progress goes to stderr, the table to stdout, everything to ``--json``. The exit
status is 1 when any message was lost, duplicated, misrouted or reordered.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import uvloop
from picows import (
    WSCloseCode,
    WSError,
    WSFrame,
    WSInvalidStatusError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

from benchmarks import data, floor
from pushsvc.auth import mint_token
from pushsvc.broker import EmbeddedBroker, free_port
from pushsvc.config import env_names

LOOPBACK = "127.0.0.1"
BASELINE_MODULE = "benchmarks.baselines.websockets_server"
SERVER_COMMANDS: dict[str, list[str]] = {
    "pushsvc": [sys.executable, "-m", "pushsvc", "serve"],
    "baseline": [sys.executable, "-m", BASELINE_MODULE],
}
SERVICE_ENV_VARS = env_names()
"""Every variable the service reads: a server started here inherits none of them."""

READY_TIMEOUT_S = 30.0
"""Upper bound (seconds) for a server to answer ``GET /ready`` with 200."""
WORKER_START_TIMEOUT_S = 60.0
"""Upper bound (seconds) for a worker process to start and mint its tokens."""
PROBE_TIMEOUT_S = 20.0
"""Upper bound (seconds) for a probe event on every topic to reach a client."""
FLUSH_TIMEOUT_S = 15.0
"""Upper bound (seconds) for the producer to hand its queue to the broker."""
STOP_TIMEOUT_S = 10.0
"""Grace (seconds) for a process to exit on SIGTERM before SIGKILL."""
CONTROL_IDLE_TIMEOUT_S = 1800.0
"""A worker that hears nothing from the tool for this long (seconds) exits."""

PROBE_ASSESSMENT = "asm-probe"
_PROBE_TYPES = frozenset(("market_price", *data.ASSESSMENT_TYPES))
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _log(message: str) -> None:
    print(f"[load] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def host_cpu_s() -> tuple[float, float]:
    """(busy, softirq) CPU seconds of the whole machine so far, all CPUs."""
    with open("/proc/stat", "rb") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]; guest
    # time is already inside user, so only the first eight count.
    total = sum(fields[:8])
    return (total - fields[3] - fields[4]) / _CLK_TCK, fields[6] / _CLK_TCK


class CpuLedger:
    """Who used the machine's CPUs between two :meth:`snapshot` calls.

    The machine is shared (broker, server, clients, producer; and maybe other
    people's work), so each phase records the CPU of every process of the run
    and the whole machine's busy time: ``foreign`` is what nobody of the run
    used, a sign that the phase's figures are disturbed. It is approximate:
    loopback networking runs partly in softirq context, which the kernel does
    not always charge to the process that caused it (``host_softirq`` shows how
    much there was).
    """

    def __init__(self, pids: dict[str, Callable[[], list[int]]]) -> None:
        self._pids = pids

    def snapshot(self) -> dict[str, float]:
        busy, softirq = host_cpu_s()
        shot = {
            "host": busy,
            "host_softirq": softirq,
            "tool": _self_cpu_s(),
            "wall": time.monotonic(),
        }
        for name, pids in self._pids.items():
            total = 0.0
            for pid in pids():
                try:
                    total += proc_cpu_s(pid)
                except OSError:
                    pass
            shot[name] = total
        return shot

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        d = {k: after[k] - before[k] for k in before}
        ours = sum(v for k, v in d.items() if not k.startswith("host") and k != "wall")
        d["foreign"] = max(0.0, d["host"] - ours)
        d["foreign_pct_of_one_cpu"] = d["foreign"] / d["wall"] * 100 if d["wall"] else 0
        return d


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- server


class ServerProcess:
    """One server under test, started by :meth:`start`, stopped by :meth:`stop`.

    :param kind: ``"pushsvc"`` or ``"baseline"``.
    :param bootstrap: the broker's ``bootstrap.servers``.
    :param workdir: where the server's output goes (``<kind>.log``).
    """

    def __init__(self, kind: str, bootstrap: str, workdir: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.log_path = workdir / f"{kind}-{self.port}.log"
        self.env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV_VARS}
        self.env.update(
            PORT=str(self.port),
            HOST=LOOPBACK,
            JWT_SECRET=data.JWT_SECRET,
            KAFKA_BROKERS=bootstrap,
            HEARTBEAT_INTERVAL="600000",
            CONNECTION_TIMEOUT="1200000",
            LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "server not started"
        return self.process.pid

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}/ws"

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Start the process and wait for ``GET /ready`` == 200.

        :returns: seconds from start to ready.
        """
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                SERVER_COMMANDS[self.kind],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = t0 + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with code {self.process.returncode} at "
                    f"start:\n{self.log_tail()}"
                )
            status, body = http_get(f"{self.http_url}/ready", 1.0)
            if status == 200:
                return time.monotonic() - t0
            last = f"{status} {body[:200]!r}"
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.kind} not ready within {timeout_s:.0f} s (last: {last}):\n"
            f"{self.log_tail()}"
        )

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`; the exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        return process.returncode

    def metric(self, name: str) -> float | None:
        """The unlabelled sample ``name`` from ``/metrics``, or None."""
        status, body = http_get(f"{self.http_url}/metrics", 5.0)
        if status != 200:
            return None
        prefix = name.encode() + b" "
        for line in body.splitlines():
            if line.startswith(prefix):
                try:
                    return float(line.split()[1])
                except (IndexError, ValueError):
                    return None
        return None

    def log_tail(self, limit: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def log_problems(self, limit: int = 20) -> list[str]:
        """Lines of the server output that look like errors or tracebacks."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        keys = ("Traceback", "ERROR", "Error", "CRITICAL", "Exception")
        return [line[:300] for line in lines if any(k in line for k in keys)][:limit]


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout_s: float) -> tuple[int, bytes]:
    """GET ``url`` directly (never through a proxy); (0, b"") if unreachable."""
    try:
        with _OPENER.open(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()
    except (OSError, ValueError):
        return 0, b""


def _wait_for_topics(bootstrap: str, topics: Iterable[str], partitions: int) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    wanted = set(topics)
    deadline = time.monotonic() + READY_TIMEOUT_S
    for _ in range(1000):
        md = admin.list_topics(timeout=5.0)
        if all(
            name in md.topics and len(md.topics[name].partitions) == partitions
            for name in wanted
        ):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"topics {sorted(wanted)} not visible in the broker's metadata")


# --------------------------------------------------------------------------- workers


class _Client(WSListener):
    """One client connection: records the ``seq`` and latency of each message.

    The per-message work is one ``orjson.loads``, two appends and a few counter
    updates; everything else (accounting, percentiles) happens after the run.
    """

    def __init__(self, worker: _Worker, assessment: str) -> None:
        super().__init__()
        self.worker = worker
        self.assessment = assessment
        self.seqs = array("q")
        self.connected: asyncio.Future[dict[str, Any] | None] = (
            worker.loop.create_future()
        )
        self.transport: WSTransport | None = None
        self.closed = False
        self.close_code: int | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            if frame.msg_type == WSMsgType.CLOSE:
                self.close_code = int(frame.get_close_code())
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        now = time.time_ns()
        payload = frame.get_payload_as_bytes()
        w = self.worker
        try:
            msg = orjson.loads(payload)
            seq = msg.get("seq")
        except (orjson.JSONDecodeError, AttributeError):
            w.bad_json += 1
            return
        if seq is None:
            self._on_control(transport, msg)
            return
        if seq < 0:
            w.probe_seen.add(msg.get("type"))
            return
        self.seqs.append(seq)
        w.received += 1
        w.payload_bytes += len(payload)
        w.last_rx_ns = now
        sent = msg.get("sentNs")
        if sent is None:
            w.missing_sent_ns += 1
        elif msg.get("type") == "market_price":
            w.market_latency.append(now - sent)
        else:
            w.assessment_latency.append(now - sent)

    def _on_control(self, transport: WSTransport, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "connected":
            if not self.connected.done():
                self.connected.set_result(msg)
        elif kind == "ping":
            self.worker.pings += 1
            pong = {"type": "pong", "timestamp": msg.get("timestamp")}
            transport.send(WSMsgType.TEXT, orjson.dumps(pong))
        else:
            self.worker.other_messages[str(kind)] += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        if not self.connected.done():
            # A result, not an exception: a future nobody awaits any more (after a
            # timeout) must not log "exception was never retrieved".
            self.connected.set_result(None)


class _Worker:
    """The client side of the run in one process, driven over a pipe.

    Requests (tuples) and replies: ``("probe", timeout_s)``, ``("connect",)``,
    ``("traffic",)``, ``("drain", plan)``, ``("close",)``. Every reply is a tuple
    whose first item names it; ``("error", traceback)`` on failure.
    """

    def __init__(
        self, control: multiprocessing.connection.Connection, spec: dict[str, Any]
    ) -> None:
        self.control = control
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.clients: list[_Client] = []
        self.tokens: list[tuple[str, str]] = []
        self.probe_seen: set[Any] = set()
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.received = 0
        self.payload_bytes = 0
        self.last_rx_ns = 0
        self.missing_sent_ns = 0
        self.bad_json = 0
        self.pings = 0
        self.other_messages: Counter[str] = Counter()
        self.market_latency = array("q")
        self.assessment_latency = array("q")

    async def run(self) -> None:
        secret = self.spec["secret"]
        for index, assessment in self.spec["connections"]:
            token = mint_token(data.user_id(index), secret, ttl_s=3600.0)
            self.tokens.append((token, assessment))
        self.control.send(("ready", os.getpid()))
        handlers: dict[str, Callable[..., Any]] = {
            "probe": self._probe,
            "connect": self._storm,
            "traffic": self._traffic,
            "drain": self._drain,
            "close": self._close,
        }
        for _ in range(1000):  # a run sends a handful of requests
            request = await self._receive(CONTROL_IDLE_TIMEOUT_S)
            if request is None:
                await self._close()
                return
            op = request[0]
            try:
                reply = await handlers[op](*request[1:])
            except Exception:
                reply = (
                    "error",
                    f"worker {os.getpid()} {op}: {traceback.format_exc()}",
                )
            self.control.send(reply)
            if op == "close":
                return

    async def _receive(self, timeout_s: float) -> tuple[Any, ...] | None:
        """The next request; None if the tool went away or stayed silent."""
        if not self.control.poll(0):
            readable = self.loop.create_future()

            def wake() -> None:
                if not readable.done():
                    readable.set_result(None)

            fd = self.control.fileno()
            self.loop.add_reader(fd, wake)
            try:
                await asyncio.wait_for(readable, timeout_s)
            except TimeoutError:
                return None
            finally:
                self.loop.remove_reader(fd)
                # uvloop made the pipe non-blocking; recv()/send() of a message
                # larger than the pipe buffer would then fail half-way.
                os.set_blocking(fd, True)
        try:
            request: tuple[Any, ...] = self.control.recv()
        except (EOFError, OSError):
            return None
        return request

    async def _connect_one(
        self, token: str, assessment: str, timeout_s: float
    ) -> tuple[_Client | None, str]:
        """Open one connection and wait for ``connected``; (client, "") or reason."""
        made: list[_Client] = []

        def factory() -> _Client:
            client = _Client(self, assessment)
            made.append(client)
            return client

        url = f"{self.spec['url']}?token={token}&assessmentId={assessment}"
        reason = ""
        try:
            async with asyncio.timeout(timeout_s):
                await ws_connect(
                    factory,
                    url,
                    websocket_handshake_timeout=timeout_s,
                    logger_name="load.client",
                )
                welcome = await made[0].connected
            if welcome is None:
                reason = "closed_before_connected"
        except WSInvalidStatusError as exc:
            status = getattr(exc.response, "status", None)
            reason = f"http_{int(status)}" if status is not None else "http_error"
        except WSError as exc:
            reason = f"ws_{type(exc).__name__}"
        except TimeoutError:
            reason = "timeout"
        except ConnectionRefusedError:
            reason = "refused"
        except ConnectionResetError:
            reason = "reset"
        except OSError as exc:
            reason = f"os_{exc.errno}"
        if reason:
            if made and made[0].transport is not None:
                made[0].transport.disconnect(graceful=False)
            return None, reason
        return made[0], ""

    async def _probe(self, timeout_s: float) -> tuple[Any, ...]:
        """One extra connection that waits for a probe event from every topic."""
        token = mint_token("probe-user", self.spec["secret"], ttl_s=600.0)
        client, reason = await self._connect_one(token, PROBE_ASSESSMENT, 10.0)
        if client is None:
            return ("probe", False, f"probe connection failed: {reason}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not _PROBE_TYPES <= self.probe_seen:
            await asyncio.sleep(0.02)
        ok = _PROBE_TYPES <= self.probe_seen
        assert client.transport is not None
        client.transport.send_close(WSCloseCode.OK)
        client.transport.disconnect()
        return ("probe", ok, sorted(map(str, self.probe_seen)))

    async def _storm(self) -> tuple[Any, ...]:
        timeout_s = float(self.spec["connect_timeout_s"])
        gate = asyncio.Semaphore(int(self.spec["inflight"]))
        failures: Counter[str] = Counter()
        connect_ns = array("q")
        first_ns = last_ns = 0

        async def one(token: str, assessment: str) -> None:
            nonlocal first_ns, last_ns
            async with gate:
                t0 = time.monotonic_ns()
                client, reason = await self._connect_one(token, assessment, timeout_s)
                if client is None:
                    failures[reason] += 1
                    return
                now = time.time_ns()
                connect_ns.append(time.monotonic_ns() - t0)
                first_ns = first_ns or now
                last_ns = now
                self.clients.append(client)

        cpu0 = _self_cpu_s()
        await asyncio.gather(*(one(t, a) for t, a in self.tokens))
        self.tokens = []
        return (
            "connected",
            {
                "open": len(self.clients),
                "failures": dict(failures),
                "first_connected_ns": first_ns,
                "last_connected_ns": last_ns,
                "connect_ns": connect_ns.tobytes(),
                "cpu_s": _self_cpu_s() - cpu0,
            },
        )

    async def _traffic(self) -> tuple[Any, ...]:
        self._reset_counters()
        self._traffic_cpu0 = _self_cpu_s()
        self._open_at_traffic = sum(1 for c in self.clients if not c.closed)
        return ("traffic", self._open_at_traffic)

    async def _drain(self, plan: dict[str, Any]) -> tuple[Any, ...]:
        """Wait for the tail (quiet for ``quiet_s``, at most ``max_s``), then count."""
        quiet_ns = int(float(self.spec["drain_quiet_s"]) * 1e9)
        max_s = float(self.spec["drain_max_s"])
        t0 = time.monotonic()
        start_ns = time.time_ns()
        for _ in range(int(max_s / 0.02) + 10):
            if time.time_ns() - max(self.last_rx_ns, start_ns) >= quiet_ns:
                break
            if time.monotonic() - t0 >= max_s:
                break
            await asyncio.sleep(0.02)
        drain_s = time.monotonic() - t0
        cpu_s = _self_cpu_s() - self._traffic_cpu0
        counts = self._account(plan)
        counts.update(
            drain_s=drain_s,
            cpu_s=cpu_s,
            received=self.received,
            payload_bytes=self.payload_bytes,
            last_rx_ns=self.last_rx_ns,
            missing_sent_ns=self.missing_sent_ns,
            bad_json=self.bad_json,
            pings=self.pings,
            other_messages=dict(self.other_messages),
            open_at_traffic=self._open_at_traffic,
            closed_after_traffic=sum(1 for c in self.clients if c.closed),
            close_codes=dict(
                Counter(str(c.close_code) for c in self.clients if c.closed)
            ),
            market_latency=self.market_latency.tobytes(),
            assessment_latency=self.assessment_latency.tobytes(),
        )
        return ("drained", counts)

    def _account(self, plan: dict[str, Any]) -> dict[str, Any]:
        """Compare what each connection got with what it should have got."""
        market_seqs = array("q")
        market_seqs.frombytes(plan["market_seqs"])
        market_index = array("q")
        market_index.frombytes(plan["market_index"])
        market_of = dict(zip(market_seqs, market_index))
        # Kafka orders records per partition, so order is owed per (topic, key):
        # per market for prices, per event type (= topic) within an assessment.
        by_assessment: dict[str, dict[int, int]] = {}
        for assessment, (raw_seqs, raw_kinds) in plan["assessment_seqs"].items():
            seqs, kinds = array("q"), array("q")
            seqs.frombytes(raw_seqs)
            kinds.frombytes(raw_kinds)
            by_assessment[assessment] = dict(zip(seqs, kinds))
        empty: dict[int, int] = {}
        expected = delivered = lost = duplicates = unexpected = reordered = 0
        crossed = 0
        for client in self.clients:
            own = by_assessment.get(client.assessment, empty)
            seen: set[int] = set()
            last_any = -1
            last_kind: dict[int, int] = {}
            last_market: dict[int, int] = {}
            stray = 0
            for seq in client.seqs:
                if seq in seen:
                    duplicates += 1
                    continue
                seen.add(seq)
                if seq in own:
                    kind = own[seq]
                    if seq < last_kind.get(kind, -1):
                        reordered += 1
                    last_kind[kind] = seq
                    if seq < last_any:
                        crossed += 1
                    last_any = seq
                elif seq in market_of:
                    market = market_of[seq]
                    if seq < last_market.get(market, -1):
                        reordered += 1
                    last_market[market] = seq
                else:
                    stray += 1
            want = len(own) + len(market_of)
            expected += want
            delivered += len(client.seqs)
            lost += want - (len(seen) - stray)
            unexpected += stray
        return {
            "connections": len(self.clients),
            "expected": expected,
            "delivered": delivered,
            "lost": lost,
            "duplicates": duplicates,
            "unexpected": unexpected,
            "reordered": reordered,
            "reordered_across_topics": crossed,
        }

    async def _close(self) -> tuple[Any, ...]:
        for client in self.clients:
            if client.transport is not None and not client.closed:
                client.transport.send_close(WSCloseCode.OK)
                client.transport.disconnect()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not all(c.closed for c in self.clients):
            await asyncio.sleep(0.02)
        return ("closed", sum(1 for c in self.clients if c.closed))


def _worker_main(
    control: multiprocessing.connection.Connection, spec: dict[str, Any]
) -> None:
    """Entry point of a worker process (spawned)."""
    import logging

    floor.raise_nofile_limit()
    # Keep picows' per-connection failure lines out of the progress output:
    # failures are counted by reason and reported.
    logging.getLogger("picows").setLevel(logging.CRITICAL)

    async def main() -> None:
        await _Worker(control, spec).run()

    try:
        uvloop.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        control.close()


class WorkerPool:
    """``count`` spawned worker processes sharing the connections of a round."""

    def __init__(self, specs: list[dict[str, Any]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._children: list[multiprocessing.connection.Connection] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(child, spec), daemon=True)
            self._pipes.append(parent)
            self._children.append(child)
            self._processes.append(process)
        self.pids: list[int] = []

    def start(self) -> None:
        for process in self._processes:
            process.start()
        for child in self._children:
            child.close()  # the worker holds its end; EOF reaches us if it dies
        replies = self.gather(WORKER_START_TIMEOUT_S)
        self.pids = [int(r[1]) for r in replies]

    def request(self, request: tuple[Any, ...], timeout_s: float) -> list[Any]:
        """Send ``request`` to every worker; their replies' payloads, in order."""
        self.send(request)
        return [reply[1] for reply in self.gather(timeout_s)]

    def request_each(
        self, requests: list[tuple[Any, ...]], timeout_s: float
    ) -> list[Any]:
        """Send ``requests[i]`` to worker ``i``; their replies' payloads, in order."""
        for pipe, request in zip(self._pipes, requests, strict=True):
            pipe.send(request)
        return [reply[1] for reply in self.gather(timeout_s)]

    def send(self, request: tuple[Any, ...], only: int | None = None) -> None:
        for i, pipe in enumerate(self._pipes):
            if only is None or i == only:
                pipe.send(request)

    def poll(self, index: int, timeout_s: float) -> tuple[Any, ...] | None:
        """One worker's reply if it comes within ``timeout_s``."""
        pipe = self._pipes[index]
        if not pipe.poll(timeout_s):
            return None
        return self._check(pipe.recv())

    def gather(
        self, timeout_s: float, only: int | None = None
    ) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout_s
        replies = []
        for i, pipe in enumerate(self._pipes):
            if only is not None and i != only:
                continue
            remaining = max(0.0, deadline - time.monotonic())
            if not pipe.poll(remaining):
                raise TimeoutError(
                    f"worker {i} did not answer within {timeout_s:.0f} s"
                )
            replies.append(self._check(pipe.recv()))
        return replies

    @staticmethod
    def _check(reply: tuple[Any, ...]) -> tuple[Any, ...]:
        if reply[0] == "error":
            raise RuntimeError(reply[1])
        return reply

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += proc_cpu_s(pid)
            except OSError:
                pass
        return total

    def stop(self) -> None:
        """Close every connection, then end the processes (bounded)."""
        for pipe, process in zip(self._pipes, self._processes):
            if process.is_alive():
                try:
                    pipe.send(("close",))
                except OSError:
                    pass
        for pipe, process in zip(self._pipes, self._processes):
            if process.is_alive() and pipe.poll(10.0):
                try:
                    pipe.recv()
                except (EOFError, OSError):
                    pass
            process.join(5.0)
            if process.is_alive():
                process.terminate()
                process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
            pipe.close()


# --------------------------------------------------------------------------- traffic


class Traffic:
    """The paced producer of one round, and the plan of what it sent.

    :param bootstrap: the broker's ``bootstrap.servers``.
    :param linger_ms: librdkafka ``linger.ms`` (milliseconds).
    """

    def __init__(self, bootstrap: str, *, linger_ms: float, seed: int) -> None:
        from confluent_kafka import Producer

        self.producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "linger.ms": linger_ms,
                "acks": 1,
                "socket.nagle.disable": True,
                "queue.buffering.max.messages": 2_000_000,
                "log_level": 3,
            }
        )
        self.rng = random.Random(seed)
        self.errors = 0
        self.market_seqs = array("q")
        self.market_index = array("q")
        self.assessment_seqs: dict[str, array[int]] = {}
        self.assessment_kinds: dict[str, array[int]] = {}
        self.produced = 0
        self.first_ns = 0

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors += 1

    def _produce(self, topic: str, key: str, event: dict[str, Any]) -> None:
        event["sent_ns"] = time.time_ns()
        value = orjson.dumps(event)
        for _ in range(1000):  # bounded retry while librdkafka's queue is full
            try:
                self.producer.produce(
                    topic, value, key.encode(), on_delivery=self._on_delivery
                )
                return
            except BufferError:
                self.producer.poll(0.005)
        raise RuntimeError("the producer queue stayed full")

    def probe(self) -> None:
        """One event per topic, negative ``seq``, for the probe connection."""
        market = data.market_name(0)
        self._produce(
            data.MARKET_TOPIC,
            market,
            {**data.market_price(market, self.rng), "seq": -1},
        )
        for i, (kind, topic) in enumerate(data.ASSESSMENT_TOPICS.items()):
            event = data.ASSESSMENT_BUILDERS[kind](PROBE_ASSESSMENT, self.rng)
            self._produce(topic, PROBE_ASSESSMENT, {**event, "seq": -2 - i})
        self.producer.flush(5.0)

    def run(
        self,
        *,
        assessments: list[str],
        markets: int,
        rate: float,
        market_rate: float,
        duration_s: float,
        tick_s: float,
    ) -> dict[str, Any]:
        """Produce for ``duration_s`` seconds, a burst every ``tick_s`` seconds."""
        total_events = int(round(rate * duration_s))
        total_ticks = int(round(market_rate * duration_s))
        names = [data.market_name(i) for i in range(markets)]
        builders = data.ASSESSMENT_BUILDERS
        types = data.ASSESSMENT_TYPES
        topics = data.ASSESSMENT_TOPICS
        for assessment in assessments:
            self.assessment_seqs[assessment] = array("q")
            self.assessment_kinds[assessment] = array("q")
        seq = 0
        sent_events = sent_ticks = 0
        bursts = 0
        self.first_ns = time.time_ns()
        t0 = time.perf_counter()
        max_iterations = int(duration_s / tick_s) * 4 + 1000
        for _ in range(max_iterations):
            elapsed = time.perf_counter() - t0
            due_ticks = min(total_ticks, int(elapsed * market_rate) + 1)
            due_events = min(total_events, int(elapsed * rate) + 1)
            while sent_ticks < due_ticks:
                index = sent_ticks % markets
                name = names[index]
                event = data.market_price(name, self.rng)
                event["seq"] = seq
                self.market_seqs.append(seq)
                self.market_index.append(index)
                self._produce(data.MARKET_TOPIC, name, event)
                seq += 1
                sent_ticks += 1
            while sent_events < due_events:
                assessment = assessments[sent_events % len(assessments)]
                kind_index = self.rng.randrange(len(types))
                kind = types[kind_index]
                event = builders[kind](assessment, self.rng)
                event["seq"] = seq
                self.assessment_seqs[assessment].append(seq)
                self.assessment_kinds[assessment].append(kind_index)
                self._produce(topics[kind], assessment, event)
                seq += 1
                sent_events += 1
            self.producer.poll(0)
            bursts += 1
            if sent_ticks >= total_ticks and sent_events >= total_events:
                break
            if elapsed > duration_s * 3 + 10:
                break  # far behind schedule: stop rather than run forever
            next_at = t0 + bursts * tick_s
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        produce_s = time.perf_counter() - t0
        left = self.producer.flush(FLUSH_TIMEOUT_S)
        self.produced = seq
        return {
            "assessment_events": sent_events,
            "market_ticks": sent_ticks,
            "produced": seq,
            "produce_s": produce_s,
            "bursts": bursts,
            "unflushed": left,
            "produce_errors": self.errors,
            "first_produce_ns": self.first_ns,
        }

    def plan_for(self, assessments: Iterable[str]) -> dict[str, Any]:
        """What a worker holding connections of ``assessments`` should receive."""
        empty = array("q")
        return {
            "market_seqs": self.market_seqs.tobytes(),
            "market_index": self.market_index.tobytes(),
            "assessment_seqs": {
                a: (
                    self.assessment_seqs.get(a, empty).tobytes(),
                    self.assessment_kinds.get(a, empty).tobytes(),
                )
                for a in set(assessments)
            },
        }

    def close(self) -> None:
        """Flush and destroy the producer before its broker goes away (otherwise
        librdkafka logs failed reconnects until the object is collected)."""
        if self.producer is not None:
            self.producer.flush(1.0)
            self.producer = None  # type: ignore[assignment]


# --------------------------------------------------------------------------- a round


def _percentiles_ms(values: array[int]) -> dict[str, float | int]:
    """p50/p90/p99/p99.9/max (nearest rank) of nanosecond values, in ms."""
    n = len(values)
    if n == 0:
        return {"n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1e6

    return {
        "n": n,
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p999": rank(0.999),
        "max": ordered[-1] / 1e6,
        "mean": sum(ordered) / n / 1e6,
    }


def _merge(chunks: Iterable[bytes]) -> array[int]:
    merged = array("q")
    for chunk in chunks:
        merged.frombytes(chunk)
    return merged


def _frame_bytes(payload: float) -> float:
    """Bytes on the wire of an unmasked server frame with ``payload`` bytes."""
    if payload < 126:
        return payload + 2
    if payload < 65536:
        return payload + 4
    return payload + 10


def run_round(
    kind: str,
    label: str,
    args: argparse.Namespace,
    workdir: Path,
    result: dict[str, Any],
) -> None:
    """One fresh broker + server + clients run, its raw results put in ``result``
    as they come (a failed round keeps what it measured before failing)."""
    assessments = [data.assessment_id(i) for i in range(args.assessments)]
    plan = [(i, assessments[i % len(assessments)]) for i in range(args.connections)]
    workers = max(1, min(args.workers, args.connections))
    per_assessment = Counter(a for _, a in plan)
    broker = EmbeddedBroker()
    server: ServerProcess | None = None
    pool: WorkerPool | None = None
    traffic: Traffic | None = None
    try:
        broker.start()
        broker.create_topics(list(data.TOPICS), partitions=args.partitions)
        _wait_for_topics(broker.bootstrap, data.TOPICS, args.partitions)
        server = ServerProcess(kind, broker.bootstrap, workdir)
        ready_s = server.start()
        result.update(server_pid=server.pid, server_ready_s=ready_s)
        _log(
            f"{label}: broker {broker.bootstrap}, server pid {server.pid} "
            f"ready in {ready_s:.2f} s"
        )

        specs = [
            {
                "url": server.ws_url,
                "secret": data.JWT_SECRET,
                "connections": plan[w::workers],
                "inflight": args.inflight,
                "connect_timeout_s": args.connect_timeout,
                "drain_quiet_s": args.drain_quiet,
                "drain_max_s": args.drain_max,
            }
            for w in range(workers)
        ]
        pool = WorkerPool(specs)
        pool.start()
        broker_process = getattr(broker, "_process", None)
        ledger = CpuLedger(
            {
                "server": lambda: [server.pid] if server and server.process else [],
                "broker": lambda: [broker_process.pid] if broker_process else [],
                "clients": lambda: pool.pids if pool else [],
            }
        )
        traffic = Traffic(broker.bootstrap, linger_ms=args.linger_ms, seed=args.seed)

        # Probe: an event on every topic reaches a client before anything is timed.
        pool.send(("probe", PROBE_TIMEOUT_S), only=0)
        probe_reply = None
        deadline = time.monotonic() + PROBE_TIMEOUT_S + 15.0
        while probe_reply is None and time.monotonic() < deadline:
            traffic.probe()
            probe_reply = pool.poll(0, 0.5)
        if probe_reply is None or not probe_reply[1]:
            raise RuntimeError(f"probe events did not reach a client: {probe_reply}")

        # 1 + 2: connection storm, idle memory.
        time.sleep(0.3)  # let the probe connection's close settle
        rss0 = proc_rss_kib(server.pid)
        cpu0 = proc_cpu_s(server.pid)
        storm_ledger = ledger.snapshot()
        t0_ns = time.time_ns()
        storm_timeout = 30.0 + args.connections / 20.0
        storms = pool.request(("connect",), storm_timeout)
        cpu1 = proc_cpu_s(server.pid)
        storm_cpu_use = CpuLedger.delta(storm_ledger, ledger.snapshot())
        last_ns = max((s["last_connected_ns"] for s in storms), default=0)
        opened = sum(s["open"] for s in storms)
        failures: Counter[str] = Counter()
        for s in storms:
            failures.update(s["failures"])
        storm_s = (last_ns - t0_ns) / 1e9 if last_ns else float("nan")
        storm_cpu = cpu1 - cpu0
        connect_lat = _percentiles_ms(_merge(s["connect_ns"] for s in storms))
        result["storm"] = {
            "requested": args.connections,
            "open": opened,
            "failed": sum(failures.values()),
            "failures": dict(failures),
            "wall_s": storm_s,
            "connects_per_s": opened / storm_s if opened and storm_s > 0 else 0.0,
            "server_cpu_s": storm_cpu,
            "server_cpu_us_per_connect": storm_cpu / opened * 1e6 if opened else None,
            "client_cpu_s": sum(s["cpu_s"] for s in storms),
            "connect_latency_ms": connect_lat,
            "cpu_use_s": storm_cpu_use,
        }
        _log(
            f"{label}: storm {opened}/{args.connections} open in {storm_s:.2f} s "
            f"({result['storm']['connects_per_s']:.0f}/s), {sum(failures.values())} "
            f"failed{' ' + str(dict(failures)) if failures else ''}, "
            f"server CPU {storm_cpu:.2f} s"
        )
        if opened == 0:
            raise RuntimeError(f"no connection opened: {dict(failures)}")
        idle_ledger = ledger.snapshot()
        idle_cpu0, idle_t0 = proc_cpu_s(server.pid), time.monotonic()
        time.sleep(args.idle)
        rss1 = proc_rss_kib(server.pid)
        idle_cpu = proc_cpu_s(server.pid) - idle_cpu0
        idle_s = time.monotonic() - idle_t0
        idle_cpu_use = CpuLedger.delta(idle_ledger, ledger.snapshot())
        result["memory"] = {
            "rss_before_kib": rss0,
            "rss_idle_kib": rss1,
            "rss_kib_per_connection": (rss1 - rss0) / opened,
            "server_gauge_connections": server.metric("websocket_connections_total"),
            "server_idle_cpu_s": idle_cpu,
            "server_idle_cpu_pct": idle_cpu / idle_s * 100.0 if idle_s > 0 else None,
            "idle_cpu_use_s": idle_cpu_use,
        }
        _log(
            f"{label}: RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB "
            f"({(rss1 - rss0) / opened:.2f} KiB/connection)"
        )

        # 3: traffic.
        sent_metric0 = server.metric("websocket_messages_sent_total")
        pool.request(("traffic",), 30.0)
        traffic_ledger = ledger.snapshot()
        cpu2 = proc_cpu_s(server.pid)
        client_cpu2 = pool.cpu_s()
        produced = traffic.run(
            assessments=assessments,
            markets=args.markets,
            rate=args.rate,
            market_rate=args.market_rate,
            duration_s=args.duration,
            tick_s=args.tick_ms / 1000.0,
        )
        _log(
            f"{label}: produced {produced['assessment_events']} assessment events + "
            f"{produced['market_ticks']} market ticks in "
            f"{produced['produce_s']:.2f} s; draining"
        )
        drain_timeout = args.drain_max + 60.0
        drains = pool.request_each(
            [
                ("drain", traffic.plan_for(a for _, a in spec["connections"]))
                for spec in specs
            ],
            drain_timeout,
        )
        cpu3 = proc_cpu_s(server.pid)
        client_cpu3 = pool.cpu_s()
        traffic_cpu_use = CpuLedger.delta(traffic_ledger, ledger.snapshot())
        sent_metric1 = server.metric("websocket_messages_sent_total")
        result["traffic"] = _summarize_traffic(
            args,
            produced,
            drains,
            per_assessment,
            opened,
            server_cpu_s=cpu3 - cpu2,
            client_cpu_proc_s=client_cpu3 - client_cpu2,
            server_sent=(
                sent_metric1 - sent_metric0
                if sent_metric0 is not None and sent_metric1 is not None
                else None
            ),
        )
        result["traffic"]["cpu_use_s"] = traffic_cpu_use
        t = result["traffic"]
        _log(
            f"{label}: delivered {t['delivered']}/{t['expected']} (lost {t['lost']}, "
            f"dup {t['duplicates']}, stray {t['unexpected']}, reordered "
            f"{t['reordered']}), {t['delivered_per_s']:.0f} msg/s, server "
            f"{t['server_cpu_us_per_message']:.2f} us/msg, p99 "
            f"{t['latency_assessment_ms'].get('p99', float('nan')):.1f} ms "
            f"(assessment) {t['latency_market_ms'].get('p99', float('nan')):.1f} ms "
            "(market)"
        )
        _log(
            f"{label}: CPU s during traffic ({traffic_cpu_use['wall']:.1f} s wall, "
            f"{os.cpu_count()} CPUs): "
            + ", ".join(
                f"{k} {traffic_cpu_use[k]:.2f}"
                for k in ("server", "broker", "clients", "tool", "foreign")
            )
        )
        for phase, use in (("storm", storm_cpu_use), ("traffic", traffic_cpu_use)):
            if use["foreign_pct_of_one_cpu"] > 20.0:
                _log(
                    f"{label}: WARNING: {use['foreign_pct_of_one_cpu']:.0f}% of a CPU "
                    f"used by processes outside this run during the {phase}: its "
                    "figures are disturbed"
                )
        result["figures"] = _figures(result)
    finally:
        if pool is not None:
            pool.stop()
        if traffic is not None:
            traffic.close()
        if server is not None:
            result["server_exit_code"] = server.stop()
            result["server_log_problems"] = server.log_problems()
        broker.stop()


def _summarize_traffic(
    args: argparse.Namespace,
    produced: dict[str, Any],
    drains: list[dict[str, Any]],
    per_assessment: Counter[str],
    opened: int,
    *,
    server_cpu_s: float,
    client_cpu_proc_s: float,
    server_sent: float | None,
) -> dict[str, Any]:
    def total(key: str) -> int:
        return sum(int(d[key]) for d in drains)

    delivered = total("delivered")
    received = total("received")
    payload_bytes = total("payload_bytes")
    last_rx_ns = max((d["last_rx_ns"] for d in drains), default=0)
    first_ns = produced["first_produce_ns"]
    wall_s = (last_rx_ns - first_ns) / 1e9 if last_rx_ns > first_ns else float("nan")
    client_cpu_s = sum(float(d["cpu_s"]) for d in drains)
    mean_payload = payload_bytes / received if received else 0.0
    others: Counter[str] = Counter()
    close_codes: Counter[str] = Counter()
    for d in drains:
        others.update(d["other_messages"])
        close_codes.update(d["close_codes"])
    mean_fanout = sum(per_assessment.values()) / max(1, args.assessments)
    offered = (
        args.rate * mean_fanout + args.market_rate * opened if args.duration else 0.0
    )
    return {
        **{k: v for k, v in produced.items() if k != "first_produce_ns"},
        "offered_messages_per_s": offered,
        "connections": total("connections"),
        "expected": total("expected"),
        "delivered": delivered,
        "lost": total("lost"),
        "duplicates": total("duplicates"),
        "unexpected": total("unexpected"),
        "reordered": total("reordered"),
        "reordered_across_topics": total("reordered_across_topics"),
        "missing_sent_ns": total("missing_sent_ns"),
        "bad_json": total("bad_json"),
        "pings": total("pings"),
        "other_messages": dict(others),
        "closed_during_run": total("closed_after_traffic"),
        "close_codes": dict(close_codes),
        "wall_s": wall_s,
        "drain_s": max(float(d["drain_s"]) for d in drains),
        "delivered_per_s": delivered / wall_s if wall_s > 0 else 0.0,
        "mean_payload_bytes": mean_payload,
        "mean_frame_bytes": _frame_bytes(mean_payload) if received else 0.0,
        "latency_assessment_ms": _percentiles_ms(
            _merge(d["assessment_latency"] for d in drains)
        ),
        "latency_market_ms": _percentiles_ms(
            _merge(d["market_latency"] for d in drains)
        ),
        "server_cpu_s": server_cpu_s,
        "server_cpu_us_per_message": server_cpu_s / delivered * 1e6
        if delivered
        else 0.0,
        "server_reported_messages_sent": server_sent,
        "client_cpu_s": client_cpu_s,
        "client_cpu_proc_s": client_cpu_proc_s,
        "client_cpu_us_per_message": client_cpu_s / delivered * 1e6
        if delivered
        else 0.0,
    }


# --------------------------------------------------------------------------- report

FIGURES: list[tuple[str, str, str]] = [
    ("connections_open", "connections open", "{:.0f}"),
    ("connect_failures", "failed connects", "{:.0f}"),
    ("connects_per_s", "connects/s (storm)", "{:.0f}"),
    ("server_cpu_us_per_connect", "server CPU us/connect", "{:.0f}"),
    ("connect_p99_ms", "connect p99 ms", "{:.1f}"),
    ("rss_kib_per_connection", "server RSS KiB/connection", "{:.2f}"),
    ("server_idle_cpu_pct", "server CPU % while idle", "{:.1f}"),
    ("offered_per_s", "offered msg/s", "{:.0f}"),
    ("delivered_per_s", "delivered msg/s", "{:.0f}"),
    ("expected", "messages expected", "{:.0f}"),
    ("delivered", "messages delivered", "{:.0f}"),
    ("lost", "lost", "{:.0f}"),
    ("duplicates", "duplicates", "{:.0f}"),
    ("unexpected", "misrouted", "{:.0f}"),
    ("reordered", "reordered (same topic+key)", "{:.0f}"),
    ("server_cpu_us_per_message", "server CPU us/message", "{:.2f}"),
    ("server_cpu_vs_floor", "server CPU/msg / floor 1 frame/send", "{:.2f}"),
    ("server_cpu_vs_floor_coalesced", "server CPU/msg / floor 4 frames/send", "{:.2f}"),
    ("client_cpu_us_per_message", "client CPU us/message", "{:.2f}"),
    ("latency_assessment_p50_ms", "assessment latency p50 ms", "{:.2f}"),
    ("latency_assessment_p90_ms", "assessment latency p90 ms", "{:.2f}"),
    ("latency_assessment_p99_ms", "assessment latency p99 ms", "{:.2f}"),
    ("latency_assessment_max_ms", "assessment latency max ms", "{:.2f}"),
    ("latency_market_p50_ms", "market latency p50 ms", "{:.2f}"),
    ("latency_market_p90_ms", "market latency p90 ms", "{:.2f}"),
    ("latency_market_p99_ms", "market latency p99 ms", "{:.2f}"),
    ("latency_market_max_ms", "market latency max ms", "{:.2f}"),
    ("mean_frame_bytes", "mean frame bytes", "{:.0f}"),
    ("foreign_cpu_pct", "foreign CPU % during traffic", "{:.0f}"),
]
"""Figure key, table label, number format."""

CORRECTNESS = ("lost", "duplicates", "unexpected", "reordered")


def _figures(result: dict[str, Any]) -> dict[str, float | None]:
    storm, memory, traffic = result["storm"], result["memory"], result["traffic"]
    figures: dict[str, float | None] = {
        "connections_open": storm["open"],
        "connect_failures": storm["failed"],
        "connects_per_s": storm["connects_per_s"],
        "server_cpu_us_per_connect": storm["server_cpu_us_per_connect"],
        "connect_p99_ms": storm["connect_latency_ms"].get("p99"),
        "rss_kib_per_connection": memory["rss_kib_per_connection"],
        "server_idle_cpu_pct": memory["server_idle_cpu_pct"],
        "foreign_cpu_pct": traffic["cpu_use_s"]["foreign_pct_of_one_cpu"],
        "offered_per_s": traffic["offered_messages_per_s"],
        "delivered_per_s": traffic["delivered_per_s"],
        "server_cpu_us_per_message": traffic["server_cpu_us_per_message"],
        "client_cpu_us_per_message": traffic["client_cpu_us_per_message"],
        "mean_frame_bytes": traffic["mean_frame_bytes"],
    }
    for key in ("expected", "delivered", *CORRECTNESS):
        figures[key] = traffic[key]
    for kind in ("assessment", "market"):
        lat = traffic[f"latency_{kind}_ms"]
        for q in ("p50", "p90", "p99", "max"):
            figures[f"latency_{kind}_{q}_ms"] = lat.get(q)
    return figures


def summarize(rounds: list[dict[str, Any]], kinds: list[str]) -> dict[str, Any]:
    """Per server and figure: min/median/max over the rounds; baseline/pushsvc."""
    per_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in kinds:
        done = [r["figures"] for r in rounds if r["server"] == kind and "figures" in r]
        stats: dict[str, dict[str, Any]] = {}
        for key, _, _ in FIGURES:
            values = [f[key] for f in done if f.get(key) is not None]
            values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            if values:
                stats[key] = {
                    "min": min(values),
                    "median": statistics.median(values),
                    "max": max(values),
                    "values": values,
                }
        per_kind[kind] = stats
    ratios: dict[str, float] = {}
    if {"pushsvc", "baseline"} <= set(per_kind):
        ours, theirs = per_kind["pushsvc"], per_kind["baseline"]
        for key, _, _ in FIGURES:
            if key in ours and key in theirs and ours[key]["median"]:
                ratios[key] = theirs[key]["median"] / ours[key]["median"]
    return {"servers": per_kind, "ratio_baseline_over_pushsvc": ratios}


def format_table(summary: dict[str, Any], kinds: list[str], rounds: int) -> str:
    servers = summary["servers"]
    ratios = summary["ratio_baseline_over_pushsvc"]
    header = ["figure", *kinds]
    if ratios:
        header.append("baseline/pushsvc")
    rows = [header]
    for key, label, fmt in FIGURES:
        row = [label]
        for kind in kinds:
            stats = servers.get(kind, {}).get(key)
            if stats is None:
                row.append("-")
            elif rounds > 1:
                row.append(
                    f"{fmt.format(stats['median'])} "
                    f"({fmt.format(stats['min'])}..{fmt.format(stats['max'])})"
                )
            else:
                row.append(fmt.format(stats["median"]))
        if ratios:
            row.append(f"{ratios[key]:.2f}" if key in ratios else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if rounds > 1:
        lines.append(f"(median over {rounds} rounds, min..max in parentheses)")
    return "\n".join(lines)


def plot(
    summary: dict[str, Any], kinds: list[str], floor_us: float | None, path: str
) -> bool:
    """Latency percentiles and CPU per message per server, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not importable: --plot skipped")
        return False
    servers = summary["servers"]
    keys = [
        f"latency_{kind}_{q}_ms"
        for kind in ("assessment", "market")
        for q in ("p50", "p90", "p99", "max")
    ]
    labels = [k.removeprefix("latency_").removesuffix("_ms") for k in keys]
    fig, (lat_ax, cpu_ax) = plt.subplots(
        1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]}
    )
    width = 0.8 / max(1, len(kinds))
    for i, kind in enumerate(kinds):
        stats = servers.get(kind, {})
        xs = [j + i * width for j in range(len(keys))]
        med = [stats.get(k, {}).get("median", 0.0) for k in keys]
        low = [m - stats.get(k, {}).get("min", m) for m, k in zip(med, keys)]
        high = [stats.get(k, {}).get("max", m) - m for m, k in zip(med, keys)]
        lat_ax.bar(xs, med, width, yerr=[low, high], label=kind, capsize=2)
        cpu = stats.get("server_cpu_us_per_message", {})
        cpu_ax.bar(
            [i],
            [cpu.get("median", 0.0)],
            0.6,
            yerr=[
                [cpu.get("median", 0.0) - cpu.get("min", 0.0)],
                [cpu.get("max", 0.0) - cpu.get("median", 0.0)],
            ],
            label=kind,
            capsize=3,
        )
    lat_ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(keys))])
    lat_ax.set_xticklabels(labels, rotation=30, ha="right")
    lat_ax.set_ylabel("ms (produce to client)")
    lat_ax.set_yscale("log")
    lat_ax.legend()
    lat_ax.set_title("end-to-end latency")
    cpu_ax.set_xticks(range(len(kinds)))
    cpu_ax.set_xticklabels(kinds)
    cpu_ax.set_ylabel("server CPU us per delivered message")
    if floor_us:
        cpu_ax.axhline(floor_us, color="grey", linestyle="--", label="send() floor")
        cpu_ax.legend()
    cpu_ax.set_title("server CPU per message")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main

SMOKE = {
    "connections": 50,
    "assessments": 10,
    "duration": 2.0,
    "rounds": 1,
    "workers": 1,
    "rate": 200.0,
    "market_rate": 10.0,
    "idle": 0.5,
    "floor_sends": 20_000,
}
"""``--smoke``: small enough for the test suite (well under 30 s)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description="End-to-end load test of pushsvc (and its websockets baseline): "
        "connection storm, idle memory, fan-out traffic, kernel floor.",
    )
    add = parser.add_argument
    add(
        "--server",
        choices=("pushsvc", "baseline", "both"),
        default="pushsvc",
        help="server(s) under test; both alternates them each round (pushsvc)",
    )
    add("--rounds", type=int, default=1, help="rounds per server (1)")
    add("--connections", type=int, default=1000, help="client connections (1000)")
    add(
        "--assessments",
        type=int,
        default=200,
        help="assessments the connections are spread over, round-robin (200)",
    )
    add("--workers", type=int, default=2, help="client worker processes (2)")
    add(
        "--inflight",
        type=int,
        default=200,
        help="handshakes in flight per worker during the storm (200)",
    )
    add(
        "--rate",
        type=float,
        default=1000.0,
        help="per-assessment events per second, all assessments together (1000)",
    )
    add(
        "--market-rate",
        type=float,
        default=20.0,
        help="market_price ticks per second, each to every connection (20)",
    )
    add("--markets", type=int, default=20, help="distinct markets (20)")
    add("--duration", type=float, default=10.0, help="seconds of traffic (10)")
    add("--partitions", type=int, default=3, help="partitions per topic (3)")
    add("--linger-ms", type=float, default=1.0, help="producer linger.ms (1.0)")
    add(
        "--tick-ms",
        type=float,
        default=2.0,
        help="the producer sends a burst every this many ms (2.0)",
    )
    add(
        "--idle",
        type=float,
        default=1.0,
        help="seconds the open connections stay idle before RSS is read (1.0)",
    )
    add(
        "--connect-timeout",
        type=float,
        default=10.0,
        help="seconds for one connect, handshake and connected message (10)",
    )
    add(
        "--drain-quiet",
        type=float,
        default=1.0,
        help="the tail is drained after this many seconds without messages (1.0)",
    )
    add(
        "--drain-max",
        type=float,
        default=15.0,
        help="at most this many seconds of draining (15)",
    )
    add(
        "--floor-sends",
        type=int,
        default=200_000,
        help="messages per kernel-floor measurement (200000)",
    )
    add("--no-floor", action="store_true", help="skip the kernel floor")
    add("--seed", type=int, default=1, help="random seed of the event values (1)")
    add("--json", metavar="PATH", help="write raw and summarized results as JSON")
    add("--plot", metavar="PATH", help="draw a PNG (needs matplotlib)")
    add(
        "--smoke",
        action="store_true",
        help="small preset for the test suite: "
        + ", ".join(f"{k}={v}" for k, v in SMOKE.items())
        + " (explicit flags win)",
    )
    first, _ = parser.parse_known_args(argv)
    if first.smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args(argv)
    problems = [
        f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}"
        for name in (
            "rounds",
            "connections",
            "assessments",
            "workers",
            "inflight",
            "markets",
            "duration",
            "partitions",
            "tick_ms",
            "connect_timeout",
            "drain_quiet",
            "drain_max",
            "floor_sends",
        )
        if getattr(args, name) <= 0
    ]
    problems += [
        f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}"
        for name in ("rate", "market_rate", "linger_ms", "idle")
        if getattr(args, name) < 0
    ]
    if problems:
        parser.error("; ".join(problems))
    return args


def _baseline_available() -> bool:
    try:
        return importlib.util.find_spec(BASELINE_MODULE) is not None
    except ModuleNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = ["pushsvc", "baseline"] if args.server == "both" else [args.server]
    if "baseline" in kinds and not _baseline_available():
        _log(f"the baseline server {BASELINE_MODULE} does not exist (yet)")
        return 2
    nofile = floor.raise_nofile_limit()
    _log(
        f"{args.connections} connections over {args.assessments} assessments, "
        f"{args.workers} worker(s), {args.rate:g} events/s + {args.market_rate:g} "
        f"ticks/s for {args.duration:g} s, {args.rounds} round(s) of {', '.join(kinds)}"
        f" (RLIMIT_NOFILE {nofile})"
    )
    workdir = Path(tempfile.mkdtemp(prefix="pushsvc-load-"))
    started = dt.datetime.now(dt.timezone.utc).isoformat()
    rounds: list[dict[str, Any]] = []
    failed = False
    floor_result: dict[str, Any] | None = None
    try:
        for r in range(args.rounds):
            for kind in kinds:
                label = f"round {r + 1}/{args.rounds} {kind}"
                result: dict[str, Any] = {"server": kind, "label": label}
                rounds.append(result)
                try:
                    run_round(kind, label, args, workdir, result)
                except Exception as exc:
                    failed = True
                    _log(f"{label}: FAILED: {exc}")
                    result["error"] = traceback.format_exc()
        frames = [
            r["traffic"]["mean_frame_bytes"]
            for r in rounds
            if "traffic" in r and r["traffic"]["mean_frame_bytes"]
        ]
        if not args.no_floor and frames:
            frame_bytes = int(round(statistics.median(frames)))
            _log(
                f"kernel floor: {args.connections} connections, "
                f"{frame_bytes}-byte frames"
            )
            floor_result = floor.measure_floor(
                args.connections, frame_bytes, sends=args.floor_sends
            )
            floor_us = floor_result["single"]["cpu_us_per_message"]
            floor_many_us = floor_result["coalesced"]["cpu_us_per_message"]
            for r in rounds:
                if "figures" in r and floor_us > 0 and floor_many_us > 0:
                    per_message = r["figures"]["server_cpu_us_per_message"]
                    r["figures"]["server_cpu_vs_floor"] = per_message / floor_us
                    r["figures"]["server_cpu_vs_floor_coalesced"] = (
                        per_message / floor_many_us
                    )
    finally:
        if failed:
            _log(f"server logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = summarize(rounds, kinds)
    print(format_table(summary, kinds, args.rounds))
    if floor_result is not None:
        print()
        print(floor.format_floor(floor_result))
    bad = {
        key: sum(r["traffic"][key] for r in rounds if "traffic" in r)
        for key in CORRECTNESS
    }
    if args.json:
        report = {
            "tool": "benchmarks.load",
            "started": started,
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "rlimit_nofile": nofile,
                "cpu_clock_resolution_s": 1.0 / _CLK_TCK,
            },
            "config": vars(args),
            "rounds": rounds,
            "summary": summary,
            "floor": floor_result,
            "correctness": bad,
        }
        with open(args.json, "wb") as fh:
            fh.write(
                orjson.dumps(
                    report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY
                )
            )
        _log(f"results written to {args.json}")
    if args.plot:
        floor_us = (
            floor_result["single"]["cpu_us_per_message"] if floor_result else None
        )
        if plot(summary, kinds, floor_us, args.plot):
            _log(f"plot written to {args.plot}")
    if failed:
        return 2
    if any(bad.values()):
        _log(f"correctness problems: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
