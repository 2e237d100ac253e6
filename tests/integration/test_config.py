"""Start-up configuration: required and invalid environment variables, defaults.

These run ``python -m pushsvc serve`` as a real process; each run is bounded by
``TIMEOUT`` (a server that starts instead of exiting fails the test)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from utils import JWT_SECRET, LOOPBACK, free_port, http_get, run_cli, run_server


def _base_env(**overrides: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "PORT": free_port(),
        "HOST": LOOPBACK,
        "JWT_SECRET": JWT_SECRET,
        # nothing listens here: start-up must fail on configuration alone
        "KAFKA_BROKERS": f"{LOOPBACK}:{free_port()}",
        "LOG_LEVEL": "WARNING",
    }
    env.update(overrides)
    return env


def test_missing_jwt_secret_exits_2() -> None:
    """Without JWT_SECRET the process exits with code 2 and stderr names JWT_SECRET."""
    result = run_cli(**_base_env(JWT_SECRET=None))
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "JWT_SECRET" in result.stderr, result.stderr[-2000:]


def test_empty_jwt_secret_exits_2() -> None:
    """An empty JWT_SECRET is as good as missing: exit code 2, stderr names it."""
    result = run_cli(**_base_env(JWT_SECRET=""))
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "JWT_SECRET" in result.stderr, result.stderr[-2000:]


INVALID_VALUES = [
    ("PORT", "abc"),
    ("PORT", "70000"),
    ("PORT", "-1"),
    ("HEARTBEAT_INTERVAL", "-5"),
    ("HEARTBEAT_INTERVAL", "often"),
    ("CONNECTION_TIMEOUT", "abc"),
    ("CONNECTION_TIMEOUT", "-1"),
    ("KAFKA_TOPIC_REFRESH_INTERVAL", "soon"),
    ("MAX_FRAME_SIZE", "big"),
    ("MAX_FRAME_SIZE", "-1"),
    ("MAX_INVALID_FRAMES", "many"),
    ("KAFKA_TOPICS", "^(unclosed"),
]


@pytest.mark.parametrize(
    ("name", "value"), INVALID_VALUES, ids=[f"{n}={v}" for n, v in INVALID_VALUES]
)
def test_invalid_value_exits_2_naming_variable(name: str, value: str) -> None:
    """An invalid value for a variable makes the process exit with code 2 and
    stderr names the offending variable."""
    result = run_cli(**_base_env(**{name: value}))
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert name in result.stderr, result.stderr[-2000:]


def test_default_port_is_3003() -> None:
    """Without PORT the server listens on 3003 (here on loopback)."""
    with socket.socket() as probe:
        # SO_REUSEADDR: only a live listener (not TIME_WAIT leftovers) blocks us
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, 3003))
            probe.listen(1)
        except OSError:
            pytest.skip("port 3003 is in use on this machine")
    with run_server(None, wait="health", PORT=None) as server:
        assert server.port == 3003
        status, _, _ = http_get(f"http://{LOOPBACK}:3003/health")
        assert status == 200
