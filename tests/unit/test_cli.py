"""``pushsvc check-config``: the effective configuration with secrets masked,
every problem named by its variable (exit 2), warnings for likely mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pushsvc.cli import EXIT_CONFIG, check_config, main
from pushsvc.config import env_names

SECRET = "a-long-enough-secret-for-hs256-" + "x" * 16
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An environment with no pushsvc variable but JWT_SECRET; tests add more
    through the returned dict, which main() sees as os.environ. Whatever a
    test adds is taken back afterwards (a leaked MAX_CONNECTIONS=0 once broke
    every server started later in the same run)."""
    for name in env_names():
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith(("KAFKA_", "MAX_", "SHUTDOWN_")):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JWT_SECRET", SECRET)
    saved = dict(os.environ)
    try:
        yield os.environ  # type: ignore[misc]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["check-config", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_valid_configuration(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    env["PORT"] = "4000"
    code, out, err = run(capsys)
    assert code == 0, out + err
    assert out.rstrip().endswith("configuration OK")
    assert SECRET not in out and SECRET not in err
    assert f"**** ({len(SECRET)} bytes)" in out
    assert "* PORT" in out and "4000" in out
    for name in env_names():  # every setting is shown
        assert name in out, name


def test_every_problem_is_named(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    env.update(PORT="http", HEARTBEAT_INTERVAL="-5", LOG_LEVEL="loud")
    code, out, err = run(capsys)
    assert code == EXIT_CONFIG == 2
    assert "configuration INVALID (3 problem(s))" in out
    for var, value in (("PORT", "http"), ("HEARTBEAT_INTERVAL", "-5"),
                       ("LOG_LEVEL", "loud")):  # fmt: skip
        assert f"pushsvc: configuration error: {var}='{value}' is invalid" in err
        assert f"{value} (invalid)" in out


def test_missing_secret(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    del env["JWT_SECRET"]
    code, out, err = run(capsys)
    assert code == 2
    assert "JWT_SECRET is not set" in err
    assert "(not set)" in out


def test_rules_over_several_variables(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    env.update(SHUTDOWN_DRAIN="20000", SHUTDOWN_TIMEOUT="15000", PORT="x")
    code, _, err = run(capsys)
    assert code == 2
    assert "SHUTDOWN_DRAIN=20000 must be shorter than SHUTDOWN_TIMEOUT=15000" in err
    assert "PORT='x' is invalid" in err  # found together, not one per run


def test_warnings_do_not_fail(
    env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    env.update(JWT_SECRET="short", KAFKA_BROKER="kafka:9092",
               HEARTBEAT_INTERVAL="60000", CONNECTION_TIMEOUT="30000")  # fmt: skip
    code, out, _ = run(capsys)
    assert code == 0
    assert "JWT_SECRET is 5 bytes" in out
    assert "KAFKA_BROKER is set but pushsvc does not read it" in out
    assert "did you mean KAFKA_BROKERS?" in out
    assert "CONNECTION_TIMEOUT (30000 ms) is not longer than HEARTBEAT_INTERVAL" in out


def test_json_output(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    env.update(MAX_CONNECTIONS="0", SERVE_DASHBOARD="yes")
    code, out, _ = run(capsys, "--json")
    report = json.loads(out)
    assert code == 2 and report["ok"] is False
    assert report["errors"] == [
        "MAX_CONNECTIONS='0' is invalid: expected a number >= 1"
    ]
    assert report["settings"]["SERVE_DASHBOARD"] is True
    assert report["settings"]["JWT_SECRET"].startswith("****")
    assert set(report["settings"]) == env_names()


def test_check_config_function_reads_a_mapping() -> None:
    report = check_config({"JWT_SECRET": SECRET, "NODE_ENV": "production"})
    assert report.ok
    assert report.from_env == {"JWT_SECRET", "NODE_ENV"}
    assert any("KAFKA_BROKERS is not set" in w for w in report.warnings)


def test_command_line_exit_code() -> None:
    """The installed entry point: exit 2 and the variable on stderr."""
    env = {k: v for k, v in os.environ.items() if k not in env_names()}
    env.update(JWT_SECRET=SECRET, KAFKA_BROKERS="no-port")
    result = subprocess.run(
        [sys.executable, "-m", "pushsvc", "check-config"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "KAFKA_BROKERS='no-port' is invalid" in result.stderr
    assert SECRET not in result.stdout + result.stderr
