"""client.js's connection logic under node's test runner (client.test.mjs):
pongs, backoff, resume position, close-code policy, token renewal, idle
detection, with a scripted WebSocket. Skips when node is not installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NODE = shutil.which("node")
SUITE = Path(__file__).with_name("client.test.mjs")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_client_js() -> None:
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--test", str(SUITE)],
        cwd=SUITE.parent,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "# fail 0" in result.stdout, result.stdout[-3000:]
