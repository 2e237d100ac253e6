"""Graceful shutdown of ``pushsvc serve`` on SIGTERM and SIGINT.

/ready turns 503 at once, new upgrades get 503, the clients are closed with 1001
and a reason in batches spread over SHUTDOWN_DRAIN (a deploy must not turn into
a reconnect storm on the other replicas), the Kafka consumer is stopped, and the
process exits 0 within SHUTDOWN_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from utils import (
    JWT_SECRET,
    LOOPBACK,
    REPO_ROOT,
    SERVER_CMD,
    STANDARD_TOPICS,
    STARTUP_TIMEOUT,
    TIMEOUT,
    Broker,
    PushClient,
    RawWebSocket,
    Server,
    ahttp_get,
    ascrape,
    create_topics,
    free_port,
    http_get,
    make_token,
    open_client,
    service_env,
    uid,
    ws_connect,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus

CLIENTS = 40
DRAIN_MS = 1000
TIMEOUT_MS = 5000

pytestmark = pytest.mark.time_limit(30)


@contextlib.contextmanager
def spawned(broker: Broker | None, **env: Any) -> Iterator[Server]:
    """``pushsvc serve``, ready; unlike utils.run_server it may exit on its own
    (the tests stop it), and it is killed on the way out if it did not."""
    port = free_port()
    settings: dict[str, Any] = {
        "PORT": port,
        "HOST": LOOPBACK,
        "JWT_SECRET": JWT_SECRET,
        "KAFKA_BROKERS": broker.bootstrap if broker else f"{LOOPBACK}:{free_port()}",
        "KAFKA_GROUP_ID": f"pushsvc-it-{uuid.uuid4().hex[:8]}",
        "KAFKA_TOPIC_REFRESH_INTERVAL": 500,
        "NODE_ENV": "test",
        "LOG_LEVEL": "INFO",
        **env,
    }
    logdir = Path(tempfile.mkdtemp(prefix="pushsvc-it-shutdown-"))
    log_path = logdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            SERVER_CMD,
            cwd=REPO_ROOT,
            env=service_env(**settings),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(port=port, process=proc, log_path=log_path, env=settings)
    try:
        path = "/ready" if broker else "/health"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for _ in range(10_000):
            assert proc.poll() is None, f"server exited early:\n{server.output()}"
            with contextlib.suppress(OSError):
                if http_get(server.url(path), timeout=1.0)[0] == 200:
                    break
            assert time.monotonic() < deadline, f"{path} not 200:\n{server.output()}"
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        shutil.rmtree(logdir, ignore_errors=True)


@pytest.fixture(scope="module")
def topics(broker: Broker) -> Broker:
    create_topics(broker.bootstrap, STANDARD_TOPICS)
    return broker


async def _close_of(c: PushClient) -> tuple[float, int | None, str | None]:
    """Read until the server closes; (arrival time, close code, reason)."""
    for _ in range(10_000):
        try:
            await asyncio.wait_for(c.ws.recv(), TIMEOUT)
        except ConnectionClosed:
            break
    return time.monotonic(), c.ws.close_code, c.ws.close_reason


async def _exit_code(server: Server, timeout: float) -> int:
    return await asyncio.to_thread(server.process.wait, timeout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_signal_drains_in_batches_and_exits_0(
    topics: Broker, sig: signal.Signals
) -> None:
    with spawned(
        topics, SHUTDOWN_DRAIN=DRAIN_MS, SHUTDOWN_TIMEOUT=TIMEOUT_MS
    ) as server:
        clients = [
            await open_client(server, uid("user"), uid()) for _ in range(CLIENTS)
        ]
        watchers = [asyncio.create_task(_close_of(c)) for c in clients]
        signalled = time.monotonic()
        server.process.send_signal(sig)

        # At once: not ready, and no new upgrades, while the drain runs. (A
        # request may still overtake the signal inside the server's loop, so
        # /ready gets a few tries, all well within the drain.)
        for _ in range(10):
            status, _, body = await ahttp_get(server.url("/ready"))
            if status == 503 or time.monotonic() - signalled > 0.3:
                break
            await asyncio.sleep(0.02)
        assert status == 503, body
        assert json.loads(body)["reason"] == "shutting down"
        try:
            ws = await ws_connect(server.ws_url(make_token("late-comer")))
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            assert json.loads(bytes(exc.response.body))["error"] == "unavailable"
        else:
            await ws.close()
            raise AssertionError("an upgrade was accepted during the drain")
        metrics = await ascrape(server)
        assert (
            metrics.value("websocket_handshakes_refused_total", reason="shutting_down")
            >= 1
        )
        assert metrics.value("websocket_connections_total") > 0, "drained at once"

        closes = await asyncio.wait_for(asyncio.gather(*watchers), TIMEOUT)
        code = await _exit_code(server, TIMEOUT)
        exited = time.monotonic() - signalled
        output = server.output()

    assert {c[1] for c in closes} == {1001}, closes
    assert all(c[2] for c in closes), "every 1001 carries a reason"
    times = sorted(c[0] for c in closes)
    spread = times[-1] - times[0]
    assert spread >= 0.5, f"closes not spread over the drain: {spread:.3f}s"
    assert spread <= DRAIN_MS / 1000 + 0.5, spread
    early = sum(1 for t in times if t - times[0] < 0.1)
    assert early <= CLIENTS // 4, f"{early} of {CLIENTS} closed in the first 0.1 s"
    assert code == 0, output
    assert exited < TIMEOUT_MS / 1000, exited
    assert "shutdown complete" in output, output


async def test_unresponsive_clients_do_not_hold_the_exit(topics: Broker) -> None:
    """Clients that never answer the close frame are cut off; the process still
    exits 0 within SHUTDOWN_TIMEOUT."""
    timeout_ms = 3000
    with spawned(topics, SHUTDOWN_DRAIN=500, SHUTDOWN_TIMEOUT=timeout_ms) as server:
        raws = [
            await RawWebSocket.connect_server(server, make_token(uid("user")))
            for _ in range(5)
        ]
        try:
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = await _exit_code(server, TIMEOUT)
            exited = time.monotonic() - signalled
            output = server.output()
        finally:
            for raw in raws:
                await raw.close()
    assert code == 0, output
    assert exited < timeout_ms / 1000, exited


async def test_signal_without_clients_or_broker_exits_0() -> None:
    """Nothing to drain and a consumer that never reached a broker: exit 0 in time."""
    with spawned(None, SHUTDOWN_DRAIN=1000, SHUTDOWN_TIMEOUT=4000) as server:
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = await _exit_code(server, TIMEOUT)
        exited = time.monotonic() - signalled
        output = server.output()
    assert code == 0, output
    assert exited < 4.0, exited


def test_exit_deadline_forces_exit_1() -> None:
    """If shutdown hangs (here: the thread sleeps), the deadline thread ends the
    process with status 1 shortly before SHUTDOWN_TIMEOUT."""
    script = (
        "import time\n"
        "from pushsvc.server import _arm_exit_deadline\n"
        "_arm_exit_deadline(600)\n"
        "time.sleep(10)\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done
    assert elapsed < 5.0, elapsed
    assert "SHUTDOWN_TIMEOUT" in done.stderr, done.stderr
