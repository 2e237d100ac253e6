"""The package type-checks under ``mypy --strict`` and passes ruff."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.skipif(
    importlib.util.find_spec("ruff") is None, reason="ruff is not installed"
)
def test_ruff_is_clean():
    result = _run("ruff", "check", "pushsvc", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean():
    pytest.importorskip("mypy")
    result = _run("mypy", "--strict", "pushsvc")
    assert result.returncode == 0, result.stdout + result.stderr
