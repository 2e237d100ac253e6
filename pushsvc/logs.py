"""Logging setup: readable lines in development, one JSON object per line in
production (``NODE_ENV=production``), so log shippers need no parser."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from .config import Settings


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(settings: Settings) -> None:
    """Send every log record to stderr in the format ``NODE_ENV`` calls for."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.is_production:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
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
