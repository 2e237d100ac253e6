"""The end-to-end load tool keeps working: ``python -m benchmarks.load --smoke``.

The tool is not part of the service, so nothing else would notice when a change to
pushsvc (or to the tool) breaks it. The smoke preset (50 connections over 10
assessments, 2 s of traffic, one worker, one round) runs in well under 30 s.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_TIMEOUT = 120.0
"""Upper bound (seconds) for the whole smoke run, broker and server included."""

FIGURES = (
    "connections_open",
    "connect_failures",
    "connects_per_s",
    "server_cpu_us_per_connect",
    "rss_kib_per_connection",
    "delivered_per_s",
    "expected",
    "delivered",
    "lost",
    "duplicates",
    "unexpected",
    "reordered",
    "server_cpu_us_per_message",
    "server_cpu_vs_floor",
    "server_cpu_vs_floor_coalesced",
    "client_cpu_us_per_message",
    "latency_assessment_p50_ms",
    "latency_assessment_p90_ms",
    "latency_assessment_p99_ms",
    "latency_assessment_max_ms",
    "latency_market_p50_ms",
    "latency_market_p90_ms",
    "latency_market_p99_ms",
    "latency_market_max_ms",
    "mean_frame_bytes",
)


def _run_smoke(json_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.load",
            "--smoke",
            "--server",
            "pushsvc",
            "--json",
            str(json_path),
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def test_load_smoke(tmp_path: Path) -> None:
    """One smoke round against pushsvc: every connection opens, every message
    arrives exactly once, and the report holds every figure of the tool."""
    report_path = tmp_path / "load.json"
    proc = _run_smoke(report_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "server CPU us/message" in proc.stdout  # the table reached stdout

    report = json.loads(report_path.read_text())
    (round_,) = report["rounds"]
    assert "error" not in round_, round_.get("error")
    assert round_["server"] == "pushsvc"

    storm, traffic = round_["storm"], round_["traffic"]
    assert storm["open"] == storm["requested"] == 50
    assert storm["failed"] == 0
    assert traffic["lost"] == 0
    assert traffic["duplicates"] == 0
    assert traffic["unexpected"] == 0
    assert traffic["reordered"] == 0
    assert traffic["delivered"] == traffic["expected"] > 0
    assert traffic["latency_assessment_ms"]["n"] > 0
    assert traffic["latency_market_ms"]["n"] > 0

    figures = round_["figures"]
    missing = [key for key in FIGURES if not _is_number(figures.get(key))]
    assert not missing, f"figures missing or not numbers: {missing}"
    assert figures["server_cpu_us_per_message"] > 0
    assert figures["latency_market_p50_ms"] <= figures["latency_market_max_ms"]

    summary = report["summary"]["servers"]["pushsvc"]
    assert summary["lost"]["max"] == 0
    assert summary["duplicates"]["max"] == 0
    assert report["correctness"] == {
        "lost": 0,
        "duplicates": 0,
        "unexpected": 0,
        "reordered": 0,
    }

    floor = report["floor"]
    assert floor["connections"] == 50
    assert floor["single"]["cpu_us_per_message"] > 0
    assert floor["coalesced"]["cpu_us_per_message"] > 0
    assert floor["single"]["broadcast_ms_median"] > 0
