"""pushsvc.client against a real server and broker: typed messages, answers to
JSON pings, reconnect after a server restart with ``since=<pos>``, a new token
after a 4001 close, and no reconnect after a policy close or a refused
handshake."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import pytest
from utils import (
    TIMEOUT,
    WRONG_SECRET,
    Broker,
    Server,
    free_port,
    make_token,
    produce,
    run_server,
    uid,
)

from pushsvc.client import (
    AssessmentUpdate,
    ClientClosedError,
    Connected,
    MarketPrice,
    Message,
    PnlUpdate,
    PositionUpdate,
    PushClient,
    RuleStatus,
    Violation,
)

M = TypeVar("M", bound=Message)

# Pings every 200 ms and a 1 s timeout: a client that did not answer pings
# would be closed (4000) within a second and a half.
HEARTBEAT_MS = 200
CONNECTION_TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def server_env() -> dict[str, Any]:
    return {
        "HEARTBEAT_INTERVAL": HEARTBEAT_MS,
        "CONNECTION_TIMEOUT": CONNECTION_TIMEOUT_MS,
    }


def ws_base(server: Server) -> str:
    return f"ws://{server.host}:{server.port}/ws"


async def next_of(client: PushClient, cls: type[M], timeout: float = TIMEOUT) -> M:
    """The next message of class ``cls``; others are skipped."""
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        message = await client.next(timeout=remaining)
        if isinstance(message, cls):
            return message
    raise AssertionError(f"no {cls.__name__} within {timeout}s")


async def aproduce(broker: Broker, topic: str, value: dict[str, Any], key: str) -> None:
    await asyncio.to_thread(produce, broker.bootstrap, topic, value, key)


@contextlib.asynccontextmanager
async def restartable_server(broker: Broker, port: int) -> AsyncIterator[list[Any]]:
    """Start ``pushsvc serve`` on ``port`` off the loop (the client keeps
    running meanwhile); yields a one-element list holding the context manager,
    which the test may stop and replace. Stops whatever is there at the end."""
    holder: list[Any] = []

    async def start() -> Server:
        cm = run_server(broker, PORT=port, SHUTDOWN_DRAIN=0)
        server = await asyncio.to_thread(cm.__enter__)
        holder[:] = [cm, server]
        return server

    async def stop() -> None:
        if holder:
            cm, _ = holder
            holder.clear()
            await asyncio.to_thread(cm.__exit__, None, None, None)

    await start()
    try:
        yield [start, stop, holder]
    finally:
        await stop()


async def test_typed_messages(server: Server, broker: Broker) -> None:
    """Each routed type arrives as its dataclass, fields snake_cased, unknown
    fields in ``extra``."""
    assessment, market = uid(), uid("MKT")
    async with PushClient(
        ws_base(server), make_token(uid("u")), assessment_id=assessment
    ) as client:
        hello = await next_of(client, Connected)
        assert hello.assessment_id == assessment
        assert hello.connection_id == client.connection_id
        await aproduce(
            broker,
            "market-data.prices",
            {"market": market, "price": 101.5, "venue": "x"},
            market,
        )
        price = await next_of(client, MarketPrice)
        for _ in range(100):  # other tests' prices reach every connection
            if price.market == market:
                break
            price = await next_of(client, MarketPrice)
        assert (price.market, price.price, price.extra) == (
            market,
            101.5,
            {"venue": "x"},
        )
        assert isinstance(price.timestamp, str) and price.timestamp.endswith("Z")

        records: list[tuple[str, dict[str, Any], type[Message]]] = [
            (
                "trading.pnl",
                {"unrealized_pnl": -5.5, "realized_pnl": 2, "current_balance": 99996.5},
                PnlUpdate,
            ),
            (
                "trading.positions",
                {
                    "position_id": "p1",
                    "market": market,
                    "side": "long",
                    "quantity": 2,
                    "entry_price": 100,
                    "unrealized_pnl": 3,
                },
                PositionUpdate,
            ),
            (
                "risk.rule-status",
                {
                    "rule": "max_daily_loss",
                    "value": 4100,
                    "threshold": 5000,
                    "status": "warning",
                },
                RuleStatus,
            ),
            (
                "risk.violations",
                {"rule": "max_position_size", "value": 6, "threshold": 5},
                Violation,
            ),
            ("assessment.status", {"status": "failed"}, AssessmentUpdate),
        ]
        for topic, value, cls in records:
            await aproduce(
                broker, topic, {"assessment_id": assessment, **value}, assessment
            )
            message = await next_of(client, cls)
            assert message.assessment_id == assessment  # type: ignore[attr-defined]
            for key, want in value.items():
                assert getattr(message, key) == want, (cls.__name__, key)
            assert message.extra == {}


async def test_answers_json_pings(server: Server) -> None:
    """The server pings every 200 ms and closes silent clients after 1 s; the
    client stays on one connection for 2.5 s, answering with pong."""
    pings = 0
    client = PushClient(ws_base(server), make_token(uid("u")), yield_pings=True)
    async with client:
        first = await next_of(client, Connected)
        deadline = time.monotonic() + 2.5 * CONNECTION_TIMEOUT_MS / 1000
        for _ in range(10_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                message = await client.next(timeout=remaining)
            except TimeoutError:
                break
            pings += message.type == "ping"
            assert not isinstance(message, Connected), "reconnected: pings unanswered"
        assert pings >= 5
        assert client.connections == 1
        assert client.state == "open"
        assert client.connection_id == first.connection_id


async def test_reconnects_after_restart_and_resumes(broker: Broker) -> None:
    """The server process is stopped (clients get 1001) and a new one starts
    on the same port: the client reconnects with backoff, on its own, and
    passes the last ``pos`` it saw as ``since``."""
    port = free_port()
    states: list[str] = []
    market = uid("MKT")
    async with restartable_server(broker, port) as (start, stop, _):
        client = PushClient(
            f"ws://127.0.0.1:{port}/ws",
            make_token(uid("u")),
            backoff_initial_s=0.2,
            backoff_max_s=1.0,
            on_status=lambda state, detail: states.append(state),
        )
        async with client:
            first = await next_of(client, Connected)
            assert "since=" not in (client.url or "")
            await aproduce(
                broker,
                "market-data.prices",
                {"market": market, "price": 1.0, "pos": 41},
                market,
            )
            await next_of(client, MarketPrice)
            assert client.last_pos == 41

            await stop()
            await start()
            second = await next_of(client, Connected, timeout=TIMEOUT * 2)
            assert second.connection_id != first.connection_id
            assert client.connections == 2
            assert "since=41" in (client.url or "")
            assert "reconnecting" in states and states[-1] == "open"

            await aproduce(
                broker, "market-data.prices", {"market": market, "price": 2.0}, market
            )
            price = await next_of(client, MarketPrice)
            assert price.price == 2.0


async def test_expired_token_is_replaced(server: Server) -> None:
    """A 4001 close (token expired) makes the client ask get_token for a new
    token and reconnect with it."""
    user = uid("u")
    calls: list[float] = []

    async def get_token() -> str:
        calls.append(time.monotonic())
        return make_token(user)

    client = PushClient(
        ws_base(server),
        make_token(user, expires_in=1.5),
        get_token=get_token,
        backoff_initial_s=0.1,
    )
    async with client:
        first = await next_of(client, Connected)
        second = await next_of(client, Connected, timeout=TIMEOUT)
        assert second.connection_id != first.connection_id
        assert len(calls) == 1
        assert client.token is not None and "token=" + client.token in (
            client.url or ""
        )


async def test_expired_token_without_get_token_ends(server: Server) -> None:
    """Without get_token a 4001 close ends the session: the same token would
    only be refused."""
    client = PushClient(ws_base(server), make_token(uid("u"), expires_in=1.5))
    async with client:
        await next_of(client, Connected)
        with pytest.raises(ClientClosedError) as info:
            await next_of(client, Connected, timeout=TIMEOUT)
    assert info.value.code == 4001
    assert client.connections == 1


async def test_policy_close_is_not_retried(server: Server) -> None:
    """1008 (too many invalid frames) ends the session instead of a
    reconnect loop."""
    client = PushClient(ws_base(server), make_token(uid("u")), backoff_initial_s=0.05)
    async with client:
        await next_of(client, Connected)
        for _ in range(25):
            assert client.send({"type": "no_such_type"})
        with pytest.raises(ClientClosedError) as info:
            await next_of(client, Connected, timeout=TIMEOUT)
        await asyncio.sleep(0.3)
        assert client.connections == 1
    assert info.value.code == 1008
    assert client.state == "closed"


@pytest.mark.parametrize(
    ("token_kwargs", "status"),
    [
        ({"secret": WRONG_SECRET}, 401),
        ({"assessments": ["another"]}, 403),
    ],
    ids=["bad-signature", "assessment-forbidden"],
)
async def test_refused_handshake_ends(
    server: Server, token_kwargs: dict[str, Any], status: int
) -> None:
    """A 401 without get_token, or a 403, is final: no reconnect loop."""
    client = PushClient(
        ws_base(server), make_token(uid("u"), **token_kwargs), assessment_id="mine"
    )
    async with client:
        with pytest.raises(ClientClosedError) as info:
            await client.next(timeout=TIMEOUT)
    assert info.value.status == status
    assert client.connections == 0


async def test_refresh_in_place(server: Server) -> None:
    """refresh_token sends a refresh; the server's answer arrives typed."""
    user = uid("u")
    async with PushClient(ws_base(server), make_token(user)) as client:
        await next_of(client, Connected)
        assert await client.refresh_token(make_token(user, expires_in=600))
        message = await client.next(timeout=TIMEOUT)
        for _ in range(100):
            if message.type in ("refreshed", "refresh_failed"):
                break
            message = await client.next(timeout=TIMEOUT)
        assert message.type == "refreshed", message
        assert getattr(message, "expires_at", None)
