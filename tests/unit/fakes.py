"""Connections without sockets, for tests of the compiled router.

A real ``Connection`` on a real picows ``WSTransport`` whose underlying
transport reports queued data, so picows never calls ``send()`` and hands the
bytes to ``write`` instead, where the test can read them.
"""

from __future__ import annotations

import asyncio
import logging
import os

from picows.picows import WSTransport

from pushsvc._router import Connection, Router


class _Socket:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


class RecordingTransport:
    """The parts of a uvloop transport that picows uses; writes are kept."""

    def __init__(self, fd: int, *, record: bool = True) -> None:
        self._sock = _Socket(fd)
        self.written: list[bytes] = []
        self.closed = False
        self._record = record

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._sock if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return 1

    def write(self, data: bytes) -> None:
        if self._record:
            self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class FakeClients:
    """Open ``Connection`` objects on a router, each with a recording transport."""

    def __init__(self, router: Router, loop: asyncio.AbstractEventLoop) -> None:
        self.router = router
        self._loop = loop
        self._fd = os.open(os.devnull, os.O_WRONLY)
        self._logger = logging.LoggerAdapter(logging.getLogger("tests.fake"), {})

    def connect(
        self, user: str = "u", assessment: str | None = None, *, record: bool = True
    ) -> tuple[Connection, WSTransport, RecordingTransport]:
        raw = RecordingTransport(self._fd, record=record)
        transport = WSTransport(False, raw, self._logger, self._loop)
        conn = Connection(self.router, user, assessment)
        conn.on_ws_connected(transport)
        return conn, transport, raw

    def close(self) -> None:
        os.close(self._fd)


class FakeRecord:
    """The confluent-kafka ``Message`` methods the router calls."""

    __slots__ = ("_value", "_topic", "_partition", "_offset", "_ts", "_key")

    def __init__(
        self,
        value: bytes,
        topic: str,
        partition: int,
        offset: int,
        ts_ms: int,
        key: bytes | None = None,
    ) -> None:
        self._value, self._topic, self._partition = value, topic, partition
        self._offset, self._ts, self._key = offset, ts_ms, key

    def error(self) -> None:
        return None

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def timestamp(self) -> tuple[int, int]:
        return (1, self._ts)
