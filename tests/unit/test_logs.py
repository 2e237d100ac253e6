"""pushsvc.logs: JSON lines in production, readable lines in development,
connection ids on per-connection records, and no token in any output."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator

import pytest

from pushsvc.config import Settings
from pushsvc.logs import (
    REDACTED,
    JsonFormatter,
    configure_logging,
    connection_logger,
    redact,
)

SECRET = "s" * 40
TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJ1c2VySWQiOiJ1LTEiLCJleHAiOjk5OTk5OTk5OTl9"
    ".c2lnbmF0dXJlLXRoYXQtbG9va3MtcmVhbA"
)
OPAQUE = "opaque-token-value-1234"


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    """configure_logging into a buffer; the logging globals are put back after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    ws = logging.getLogger("pushsvc.ws")
    ws_level = ws.level
    buffer = io.StringIO()
    try:
        yield buffer, logging.getLogger("pushsvc.test")
    finally:
        root.handlers[:], root.level, sys.excepthook, threading.excepthook = saved
        ws.setLevel(ws_level)
        logging.captureWarnings(False)


def lines(buffer: io.StringIO) -> list[str]:
    return [line for line in buffer.getvalue().splitlines() if line]


def test_production_lines_are_json(capture: tuple[io.StringIO, logging.Logger]) -> None:
    buffer, log = capture
    configure_logging(Settings(jwt_secret=SECRET, node_env="production"), buffer)
    log.info("listening on %s:%d", "0.0.0.0", 3003)
    connection_logger(log, "c-42").warning("closed with %d", 1013, extra={"code": 1013})
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        log.exception("write failed", extra={"connection_id": "c-43"})
    out = lines(buffer)
    assert len(out) == 3, out  # a traceback stays inside its one line
    first, second, third = (json.loads(line) for line in out)
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["level"] == "info" and first["logger"] == "pushsvc.test"
    assert first["message"] == "listening on 0.0.0.0:3003"
    assert first["time"].endswith("Z") and "T" in first["time"]
    assert second["connectionId"] == "c-42" and second["code"] == 1013
    assert third["connectionId"] == "c-43"
    assert "RuntimeError: boom" in third["exception"]


def test_development_lines_are_readable(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    buffer, log = capture
    configure_logging(Settings(jwt_secret=SECRET), buffer)
    connection_logger(log, "c-42").warning("heartbeat timeout")
    (line,) = lines(buffer)
    assert "WARNING pushsvc.test: heartbeat timeout [connectionId=c-42]" in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


@pytest.mark.parametrize("node_env", ["production", "development"])
def test_no_token_reaches_the_output(
    capture: tuple[io.StringIO, logging.Logger], node_env: str
) -> None:
    buffer, log = capture
    configure_logging(Settings(jwt_secret=SECRET, node_env=node_env), buffer)
    log.warning("GET /ws?token=%s&assessmentId=a HTTP/1.1", TOKEN)
    log.warning("GET /ws?assessmentId=a&token=%s", OPAQUE)
    log.warning("Sec-WebSocket-Protocol: bearer, %s", TOKEN)
    log.warning("Authorization: Bearer %s", OPAQUE)
    log.warning("refresh with %r", {"type": "refresh", "token": TOKEN})
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        log.exception("verification failed")
    text = buffer.getvalue()
    assert TOKEN not in text and OPAQUE not in text
    assert TOKEN.split(".")[2] not in text, "a signature survived"
    assert text.count(REDACTED) >= 6
    assert "assessmentId=a" in text, "only the token goes"


def test_warnings_are_log_records(capture: tuple[io.StringIO, logging.Logger]) -> None:
    buffer, _ = capture
    configure_logging(Settings(jwt_secret=SECRET, node_env="production"), buffer)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("weak key", UserWarning, stacklevel=1)
    (line,) = lines(buffer)
    assert "weak key" in json.loads(line)["message"]


def test_uncaught_exceptions_are_json_in_production(
    capture: tuple[io.StringIO, logging.Logger],
) -> None:
    buffer, _ = capture
    configure_logging(Settings(jwt_secret=SECRET, node_env="production"), buffer)
    try:
        raise KeyError(TOKEN)
    except KeyError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    thread = threading.Thread(target=lambda: 1 / 0, name="worker")
    thread.start()
    thread.join()
    records = [json.loads(line) for line in lines(buffer)]
    assert [r["level"] for r in records] == ["critical", "critical"]
    assert "KeyError" in records[0]["exception"] and TOKEN not in buffer.getvalue()
    assert "worker" in records[1]["message"]
    assert "ZeroDivisionError" in records[1]["exception"]


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "closed connection 3f2a with 1001 (server shutting down), eyJ not a token"
    assert redact(text) == text


def test_json_formatter_never_breaks_on_odd_extras() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.payload = object()
    assert json.loads(JsonFormatter().format(record))["payload"].startswith("<object")
