"""Logging setup: readable lines in development, one JSON object per line in
production (``NODE_ENV=production``), so log shippers need no parser.

Per-connection log records carry the connection id (the ``connectionId`` the
client got in its ``connected`` message): pass ``extra={"connection_id": id}``
or log through :func:`connection_logger`. Tokens never reach the output:
every formatted line, exceptions included, is scrubbed of anything that looks
like a JWT or a ``token=`` query value, whatever logged it (picows, PyJWT,
librdkafka callbacks, our own code).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any

import orjson

from .config import Settings

REDACTED = "[redacted]"

# A JWT: three base64url segments, the header starting with '{"' encoded.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
# A token in a query string or a header-like "token: value"/"bearer, value".
_TOKEN_PARAM = re.compile(r"(?i)((?:\b|_)token=)[^&\s'\"]+")
_BEARER = re.compile(r"(?i)(\bbearer[,:\s]\s*)[A-Za-z0-9._~+/=-]{8,}")

# Attributes every LogRecord has; anything else on a record came in `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def redact(text: str) -> str:
    """``text`` with JWTs, ``token=`` values and bearer tokens replaced."""
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    lowered = text.lower()
    if "token=" in lowered:
        text = _TOKEN_PARAM.sub(r"\1" + REDACTED, text)
    if "bearer" in lowered:
        text = _BEARER.sub(r"\1" + REDACTED, text)
    return text


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then
    ``connectionId`` and any other ``extra`` fields (camelCased), then
    ``exception`` and ``stack`` when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(_camel(key), value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # orjson escapes newlines inside strings: one record, one line.
        return redact(orjson.dumps(entry, default=str).decode())


class TextFormatter(logging.Formatter):
    """``2026-11-26 10:58:11,123 INFO    pushsvc.server: message [key=value]``:
    the development format, with ``extra`` fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            pairs = " ".join(f"{_camel(k)}={v}" for k, v in extras.items())
            head, sep, tail = line.partition("\n")
            line = f"{head} [{pairs}]{sep}{tail}"
        return redact(line)


class ConnectionLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose records carry ``connection_id``."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def connection_logger(logger: logging.Logger, connection_id: str) -> ConnectionLogger:
    """``logger``, with every record tagged with ``connection_id``.

    :param logger: the module's logger.
    :param connection_id: the connection's id (never its token).
    """
    return ConnectionLogger(logger, {"connection_id": connection_id})


def make_handler(settings: Settings, stream: Any = None) -> logging.Handler:
    """A stream handler (default stderr) in the format ``NODE_ENV`` calls for."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if settings.is_production:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    return handler


def configure_logging(settings: Settings, stream: Any = None) -> None:
    """Send every log record to ``stream`` (default stderr) in the format
    ``NODE_ENV`` calls for, at ``LOG_LEVEL``.

    In production, uncaught exceptions (main thread and other threads) are
    logged as records too, so even a crash is a JSON line.
    """
    handler = make_handler(settings, stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # Library warnings (e.g. PyJWT's weak-key warning) go through the same
    # handler and format instead of bare stderr lines.
    logging.captureWarnings(True)
    # picows logs every accepted socket at INFO; that is noise past a few
    # hundred clients, so it speaks only at DEBUG.
    if settings.log_level != "DEBUG":
        logging.getLogger("pushsvc.ws").setLevel(logging.WARNING)
    if settings.is_production:
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_uncaught


_crash_log = logging.getLogger("pushsvc")


def _log_uncaught(
    kind: type[BaseException],
    value: BaseException,
    tb: TracebackType | None,
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    _crash_log.critical("uncaught exception", exc_info=(kind, value, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    _crash_log.critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread is not None else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
