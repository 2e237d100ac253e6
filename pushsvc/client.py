"""An asyncio client for pushsvc, on picows.

::

    async with PushClient(url, token, assessment_id="a-1") as client:
        async for message in client:
            if isinstance(message, PnlUpdate):
                print(message.unrealized_pnl)

The client answers the server's JSON pings, reconnects with exponential
backoff and jitter, resumes from the last ``pos`` it saw (``since=<pos>``
on the reconnect URL), and turns each message into a dataclass of its type.
It keeps going until :meth:`PushClient.close`, or until the server ends the
session in a way a reconnect cannot fix (see :data:`TERMINAL_CLOSE_CODES`);
then the iterator raises :class:`ClientClosedError`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from picows import (
    WSCloseCode,
    WSError,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)
from picows.common import WSInvalidStatusError

from .errors import PushError

log = logging.getLogger("pushsvc.client")

CLOSE_TOKEN_EXPIRED = 4001
"""Close code for an expired token: get a new one, then reconnect."""

TERMINAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009}) | frozenset(
    range(4400, 4500)
)
"""Close codes after which reconnecting cannot help (policy violation, frame
too big, protocol errors, and 4400-4499 refusals such as 4401 and 4403)."""

TERMINAL_HTTP_STATUSES = frozenset({400, 403, 404})
"""Handshake refusals that a retry cannot fix. 401 is retried only with a
``get_token`` callback; 429 and 5xx are retried with backoff."""

State = Literal["connecting", "open", "reconnecting", "closed"]


class ClientClosedError(PushError):
    """The server ended the session for good (or refused it).

    :param code: the WebSocket close code, or 0 for a refused handshake.
    :param reason: the close reason or the refusal's body.
    :param status: the HTTP status of a refused handshake, else None.
    """

    def __init__(self, code: int, reason: str, status: int | None = None) -> None:
        what = f"http {status}" if status is not None else f"close code {code}"
        super().__init__(f"pushsvc session ended ({what}): {reason or 'no reason'}")
        self.code = code
        self.reason = reason
        self.status = status


# -- messages ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    """Fields every message may carry.

    :param pos: the resume position, when the server sends one.
    :param extra: fields this client does not declare, as sent (camelCase).
    """

    TYPE: ClassVar[str] = ""
    type: str = ""
    timestamp: str | int | None = None
    pos: int | str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class Connected(Message):
    """First message of every connection."""

    TYPE: ClassVar[str] = "connected"
    type: str = TYPE
    connection_id: str = ""
    user_id: str = ""
    assessment_id: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Ping(Message):
    """A server heartbeat (answered by the client; yielded only on request)."""

    TYPE: ClassVar[str] = "ping"
    type: str = TYPE


@dataclass(frozen=True, kw_only=True, slots=True)
class Pong(Message):
    """The answer to a ``{"type": "ping"}`` this client sent."""

    TYPE: ClassVar[str] = "pong"
    type: str = TYPE


@dataclass(frozen=True, kw_only=True, slots=True)
class MarketPrice(Message):
    TYPE: ClassVar[str] = "market_price"
    type: str = TYPE
    market: str | None = None
    price: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PnlUpdate(Message):
    TYPE: ClassVar[str] = "pnl_update"
    type: str = TYPE
    assessment_id: str | None = None
    unrealized_pnl: float | None = None
    realized_pnl: float | None = None
    current_balance: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class PositionUpdate(Message):
    TYPE: ClassVar[str] = "position_update"
    type: str = TYPE
    assessment_id: str | None = None
    position_id: str | None = None
    market: str | None = None
    side: str | None = None
    quantity: float | None = None
    entry_price: float | None = None
    unrealized_pnl: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RuleStatus(Message):
    TYPE: ClassVar[str] = "rule_status"
    type: str = TYPE
    assessment_id: str | None = None
    rule: str | None = None
    value: float | None = None
    threshold: float | None = None
    status: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Violation(Message):
    TYPE: ClassVar[str] = "violation"
    type: str = TYPE
    assessment_id: str | None = None
    rule: str | None = None
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class AssessmentUpdate(Message):
    TYPE: ClassVar[str] = "assessment_update"
    type: str = TYPE
    assessment_id: str | None = None
    status: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Refreshed(Message):
    """A ``refresh`` was accepted; ``expires_at`` is the new token's exp."""

    TYPE: ClassVar[str] = "refreshed"
    type: str = TYPE
    expires_at: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RefreshFailed(Message):
    """A ``refresh`` was refused; the old token's expiry stays in force."""

    TYPE: ClassVar[str] = "refresh_failed"
    type: str = TYPE
    reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class UnknownMessage(Message):
    """A message of a type this client does not know (all fields in ``extra``)."""


MESSAGE_CLASSES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Connected,
        Ping,
        Pong,
        MarketPrice,
        PnlUpdate,
        PositionUpdate,
        RuleStatus,
        Violation,
        AssessmentUpdate,
        Refreshed,
        RefreshFailed,
    )
}
"""Message type on the wire -> dataclass."""


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


# For each class: wire name -> attribute name, for the declared fields.
_WIRE_NAMES: dict[type[Message], dict[str, str]] = {
    cls: {
        _camel(f.name): f.name
        for f in dataclasses.fields(cls)
        if f.name not in ("type", "extra")
    }
    for cls in (*MESSAGE_CLASSES.values(), UnknownMessage)
}


def parse_message(data: Mapping[str, Any]) -> Message:
    """The dataclass for one decoded message (a JSON object).

    Values are taken as sent: producers decide what a ``price`` is, and the
    client does not coerce it.
    """
    kind = data.get("type")
    cls: type[Message] = UnknownMessage
    if isinstance(kind, str):
        cls = MESSAGE_CLASSES.get(kind, UnknownMessage)
    names = _WIRE_NAMES[cls]
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        attr = names.get(key)
        if attr is not None:
            values[attr] = value
        elif key != "type":
            extra[key] = value
    if cls is UnknownMessage:
        values["type"] = kind if isinstance(kind, str) else ""
    return cls(extra=extra, **values)


# -- connection ----------------------------------------------------------------


class _Listener(WSListener):
    """picows callbacks for one connection; hands messages to the client."""

    def __init__(self, client: PushClient) -> None:
        self._client = client
        self.close_code = 1006
        self.close_reason = ""
        self.last_seen = time.monotonic()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.last_seen = time.monotonic()
        if frame.msg_type == WSMsgType.TEXT:
            try:
                data = orjson.loads(frame.get_payload_as_memoryview())
            except orjson.JSONDecodeError:
                return
            if isinstance(data, dict):
                self._client._on_message(transport, data)
        elif frame.msg_type == WSMsgType.CLOSE:
            # An empty close payload carries no code (1005 on the receiving end).
            self.close_code = frame.get_close_code().value or 1005
            self.close_reason = frame.get_close_reason() or ""
            # Echo the close, as RFC 6455 asks; 1005/1006 may not be sent.
            echo = self.close_code
            if echo < 1000 or echo in (1004, 1005, 1006) or echo >= 5000:
                echo = WSCloseCode.OK.value
            transport.send_close(WSCloseCode(echo))
            transport.disconnect()


class PushClient:
    """A reconnecting pushsvc connection, iterated for typed messages.

    :param url: the WebSocket endpoint, e.g. ``ws://host:3003/ws``; a
        ``token``, ``assessmentId`` or ``since`` already in its query is
        replaced by the client's own.
    :param token: the JWT; may be None when ``get_token`` supplies it.
    :param assessment_id: the assessment to follow (None: market data only).
    :param get_token: returns a fresh token (plain or async callable). Called
        after a 4001 close (token expired) and after a 401 refusal; without it
        both end the session.
    :param since: a resume position to start from (sent as ``since``).
    :param backoff_initial_s: first reconnect delay cap, seconds (default 0.5).
    :param backoff_max_s: largest reconnect delay, seconds (default 30).
    :param backoff_factor: growth of the delay cap per failed attempt (2).
    :param idle_timeout_s: seconds without any frame from the server (pings
        included) after which the connection is taken as dead and replaced
        (default 75; keep it above the server's ``HEARTBEAT_INTERVAL``; 0 turns
        it off).
    :param max_queued: messages held for a slow reader; past this the client
        stops reading the socket until half are consumed, so the server sees
        the backpressure (default 10000).
    :param yield_pings: also yield :class:`Ping` messages (default False).
    :param handshake_timeout_s: seconds for the upgrade to complete (5).
    :param on_status: called with ``(state, detail)`` on every state change:
        ``connecting``, ``open``, ``reconnecting`` (detail has ``delay_s``,
        ``code``, ``reason``) and ``closed``.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        assessment_id: str | None = None,
        get_token: Callable[[], str | Awaitable[str]] | None = None,
        since: int | str | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        backoff_factor: float = 2.0,
        idle_timeout_s: float = 75.0,
        max_queued: int = 10_000,
        yield_pings: bool = False,
        handshake_timeout_s: float = 5.0,
        on_status: Callable[[State, dict[str, Any]], None] | None = None,
    ) -> None:
        if token is None and get_token is None:
            raise ValueError("a token or get_token is required")
        if max_queued < 2:
            raise ValueError(f"max_queued must be at least 2, got {max_queued}")
        self.base_url = url
        self.token = token
        self.assessment_id = assessment_id
        self.get_token = get_token
        self.last_pos: int | str | None = since
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.backoff_factor = backoff_factor
        self.idle_timeout_s = idle_timeout_s
        self.max_queued = max_queued
        self.yield_pings = yield_pings
        self.handshake_timeout_s = handshake_timeout_s
        self.on_status = on_status
        self.state: State = "closed"
        self.connection_id: str | None = None
        self.url: str | None = None
        """The URL of the latest connection attempt (carries the token)."""
        self.attempt = 0
        self.connections = 0
        """Connections opened so far (a reconnect adds one)."""
        self._queue: collections.deque[Message] = collections.deque()
        self._wakeup = asyncio.Event()
        self._paused: WSTransport | None = None
        self._transport: WSTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: ClientClosedError | None = None
        self._closed = False
        self._need_token = token is None
        self._rng = random.Random()

    # -- public ----------------------------------------------------------------

    async def connect(self) -> PushClient:
        """Start connecting (and reconnecting) in the background."""
        if self._task is None:
            self._closed = False
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="pushsvc-client"
            )
        return self

    async def close(self) -> None:
        """Close the connection for good; the iterator then ends."""
        self._closed = True
        transport = self._transport
        if transport is not None and not transport.is_disconnected:
            transport.send_close(WSCloseCode.OK, b"client closed")
            transport.disconnect()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._set_state("closed")
        self._wakeup.set()

    async def __aenter__(self) -> PushClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> PushClient:
        return self

    async def __anext__(self) -> Message:
        for _ in range(1_000_000_000):
            if self._queue:
                message = self._queue.popleft()
                if (
                    self._paused is not None
                    and len(self._queue) <= self.max_queued // 2
                ):
                    if not self._paused.is_disconnected:
                        self._paused.underlying_transport.resume_reading()
                    self._paused = None
                return message
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        raise StopAsyncIteration  # pragma: no cover - unreachable bound

    async def next(self, timeout: float | None = None) -> Message:
        """The next message, waiting at most ``timeout`` seconds."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    def send(self, message: Mapping[str, Any]) -> bool:
        """Send a JSON message; False if no connection is open."""
        transport = self._transport
        if (
            transport is None
            or transport.is_disconnected
            or transport.is_close_frame_sent
        ):
            return False
        transport.send(WSMsgType.TEXT, orjson.dumps(message))
        return True

    async def refresh_token(self, token: str | None = None) -> bool:
        """Replace the connection's token in place (a ``refresh`` message);
        the server answers :class:`Refreshed` or :class:`RefreshFailed`.
        Without ``token`` it comes from ``get_token``."""
        if token is None:
            token = await self._fetch_token()
        self.token = token
        return self.send({"type": "refresh", "token": token})

    def backoff_delay(self, attempt: int) -> float:
        """Seconds before reconnect attempt ``attempt`` (0 first): the cap
        doubles from ``backoff_initial_s`` to ``backoff_max_s``; the delay is
        drawn from its upper half, so clients spread out yet none retries at
        once."""
        cap = min(
            self.backoff_max_s,
            self.backoff_initial_s * self.backoff_factor ** min(attempt, 60),
        )
        return cap / 2 + self._rng.random() * cap / 2

    def connect_url(self) -> str:
        """The URL the next connection attempt uses."""
        parts = urlsplit(self.base_url)
        ours = {"token", "assessmentId", "since"}
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ours]
        if self.token is not None:
            query.append(("token", self.token))
        if self.assessment_id is not None:
            query.append(("assessmentId", self.assessment_id))
        if self.last_pos is not None:
            query.append(("since", str(self.last_pos)))
        return urlunsplit(parts._replace(query=urlencode(query)))

    # -- internals -------------------------------------------------------------

    def _set_state(self, state: State, **detail: Any) -> None:
        if state == self.state and not detail:
            return
        self.state = state
        if self.on_status is not None:
            try:
                self.on_status(state, detail)
            except Exception:
                log.exception("on_status callback failed")

    def _push(self, message: Message, transport: WSTransport | None) -> None:
        self._queue.append(message)
        self._wakeup.set()
        if (
            transport is not None
            and self._paused is None
            and len(self._queue) >= self.max_queued
        ):
            # Stop reading: the kernel buffers fill and the server sees a slow
            # client, rather than this process growing without bound.
            transport.underlying_transport.pause_reading()
            self._paused = transport

    def _on_message(self, transport: WSTransport, data: dict[str, Any]) -> None:
        pos = data.get("pos")
        if pos is not None:
            self.last_pos = pos
        kind = data.get("type")
        if kind == "ping":
            pong = {"type": "pong", "timestamp": data.get("timestamp")}
            transport.send(WSMsgType.TEXT, orjson.dumps(pong))
            if not self.yield_pings:
                return
        elif kind == "connected":
            # The connection is good: the next failure starts the backoff anew.
            self.attempt = 0
            connection_id = data.get("connectionId")
            self.connection_id = (
                connection_id if isinstance(connection_id, str) else None
            )
        self._push(parse_message(data), transport)

    async def _fetch_token(self) -> str:
        if self.get_token is None:
            raise ValueError("no get_token callback to fetch a token with")
        result = self.get_token()
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str) or not result:
            raise ValueError("get_token returned no token")
        return result

    def _fail(self, error: ClientClosedError) -> None:
        self._error = error
        self._closed = True
        self._set_state("closed", code=error.code, reason=error.reason)
        self._wakeup.set()

    async def _run(self) -> None:
        state: State = "connecting"
        for _ in range(1 << 62):  # until closed; every pass waits or connects
            if self._closed:
                return
            self._set_state(state)
            state = "reconnecting"
            if self._need_token:
                try:
                    self.token = await self._fetch_token()
                    self._need_token = False
                except Exception as exc:
                    log.warning("get_token failed: %s", exc)
                    await self._backoff(0, "get_token failed")
                    continue
            code, reason = await self._session()
            if self._closed:
                return
            if code in TERMINAL_CLOSE_CODES:
                self._fail(ClientClosedError(code, reason))
                return
            if code == CLOSE_TOKEN_EXPIRED:
                if self.get_token is None:
                    self._fail(ClientClosedError(code, reason))
                    return
                self._need_token = True
            await self._backoff(code, reason)

    async def _backoff(self, code: int, reason: str) -> None:
        delay = self.backoff_delay(self.attempt)
        self.attempt += 1
        self._set_state("reconnecting", delay_s=delay, code=code, reason=reason)
        await asyncio.sleep(delay)

    async def _session(self) -> tuple[int, str]:
        """One connection, from handshake to close: (close code, reason).

        A refused or failed handshake gives code 0 (or ends the session for
        good through :meth:`_fail`).
        """
        self.url = url = self.connect_url()
        listener: _Listener | None = None

        def factory() -> _Listener:
            nonlocal listener
            listener = _Listener(self)
            return listener

        try:
            transport, _ = await ws_connect(
                factory,
                url,
                websocket_handshake_timeout=self.handshake_timeout_s,
                enable_auto_pong=True,
                max_redirects=0,
                use_aiofastnet=False,
            )
        except WSInvalidStatusError as exc:
            status = int(exc.response.status) if exc.response is not None else 0
            body = (exc.raw_body or b"").decode("utf-8", "replace")[:200]
            if status in TERMINAL_HTTP_STATUSES or (
                status == 401 and self.get_token is None
            ):
                self._fail(ClientClosedError(0, body, status))
            elif status == 401:
                self._need_token = True
            return 0, f"http {status}"
        except (OSError, asyncio.TimeoutError, WSError) as exc:
            return 0, f"connect failed: {type(exc).__name__}"
        assert listener is not None
        self._transport = transport
        self.connections += 1
        self._set_state("open")
        try:
            await self._wait_closed(transport, listener)
        finally:
            self._transport = None
            self.connection_id = None
            if self._paused is transport:
                self._paused = None
        return listener.close_code, listener.close_reason

    async def _wait_closed(self, transport: WSTransport, listener: _Listener) -> None:
        closed = asyncio.ensure_future(transport.wait_disconnected())
        try:
            if not self.idle_timeout_s:
                await closed
                return
            check_s = max(self.idle_timeout_s / 4, 0.05)
            for _ in range(1 << 62):
                done, _ = await asyncio.wait({closed}, timeout=check_s)
                if done:
                    return
                silent = time.monotonic() - listener.last_seen
                if silent > self.idle_timeout_s and self._paused is None:
                    # Half-open TCP may take minutes to report: drop it now.
                    listener.close_code = 1006
                    listener.close_reason = "no message from the server"
                    transport.disconnect(graceful=False)
                    await closed
                    return
        finally:
            closed.cancel()
