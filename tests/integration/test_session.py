"""A connection's life after the handshake: its token expires (4001) unless the
client refreshes it in place, and a client that floods frames is closed (1008).

The module's server sweeps every 50 ms (HEARTBEAT_INTERVAL=200) with a long
CONNECTION_TIMEOUT, and allows 20 client frames per second."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from utils import Server, client, make_token, scrape, uid


@pytest.fixture(scope="module")
def server_env() -> dict[str, Any]:
    return {
        "HEARTBEAT_INTERVAL": 200,
        "CONNECTION_TIMEOUT": 600_000,
        "MAX_CLIENT_MESSAGES_PER_SEC": 20,
    }


def _not_ping(message: dict[str, Any]) -> bool:
    return message.get("type") != "ping"


async def test_connection_is_closed_with_4001_when_its_token_expires(server: Server):
    user = uid("user")
    async with client(server, user, token=make_token(user, expires_in=1.5)) as c:
        code, reason = await c.wait_closed(timeout=5)
    assert code == 4001
    assert "expired" in (reason or "")


async def test_a_refreshed_token_keeps_the_connection_open(server: Server):
    user = uid("user")
    async with client(server, user, token=make_token(user, expires_in=1.5)) as c:
        await c.ws.send(json.dumps({"type": "refresh", "token": make_token(user)}))
        reply = await c.recv_until(_not_ping)
        assert reply["type"] == "refreshed"
        assert reply["expiresAt"].endswith("Z")
        await asyncio.sleep(2.5)  # past the first token's exp
        await c.assert_alive()
        assert c.ws.close_code is None


async def test_a_refresh_for_another_user_is_refused_and_the_old_expiry_stands(
    server: Server,
):
    user = uid("user")
    async with client(server, user, token=make_token(user, expires_in=1.5)) as c:
        other = make_token(uid("intruder"), expires_in=3600)
        await c.ws.send(json.dumps({"type": "refresh", "token": other}))
        reply = await c.recv_until(_not_ping)
        assert reply == {**reply, "type": "refresh_failed"}
        assert "another user" in reply["reason"]
        code, _ = await c.wait_closed(timeout=5)
    assert code == 4001


async def test_a_refresh_with_a_bad_token_is_refused(server: Server):
    user = uid("user")
    async with client(server, user) as c:
        await c.ws.send(json.dumps({"type": "refresh", "token": "not.a.token"}))
        reply = await c.recv_until(_not_ping)
        assert reply["type"] == "refresh_failed"
        await c.assert_alive()


async def test_a_refresh_must_still_allow_the_connections_assessment(server: Server):
    user, assessment = uid("user"), uid()
    token = make_token(user, assessments=[assessment])
    async with client(server, user, assessment, token=token) as c:
        narrower = make_token(user, assessments=["somewhere-else"])
        await c.ws.send(json.dumps({"type": "refresh", "token": narrower}))
        reply = await c.recv_until(_not_ping)
        assert reply["type"] == "refresh_failed"


async def test_a_client_flooding_frames_is_closed_with_1008(server: Server):
    async with client(server, uid("flooder")) as c:
        for _ in range(60):
            await c.ws.send(json.dumps({"type": "pong", "timestamp": 0}))
        code, reason = await c.wait_closed(timeout=5)
    assert code == 1008
    assert "too many messages" in (reason or "")


async def test_a_client_within_the_rate_stays_open(server: Server):
    async with client(server, uid("polite")) as c:
        for _ in range(10):
            await c.ws.send(json.dumps({"type": "pong", "timestamp": 0}))
            await asyncio.sleep(0.1)
        await c.assert_alive()


def test_session_closes_are_counted(server: Server):
    metrics = scrape(server)
    assert metrics.value("websocket_token_expiry_closes_total") >= 2
    assert metrics.value("websocket_rate_limit_closes_total") >= 1
    assert metrics.value("websocket_token_refreshes_total") >= 1
    assert metrics.value("websocket_connections_closed_total", code="4001") >= 2
