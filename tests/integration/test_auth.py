"""WebSocket authentication: JWT checked before the upgrade; the connected message."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Callable

import pytest
from utils import (
    WRONG_SECRET,
    Server,
    client,
    expect_rejected,
    make_token,
    parse_iso_utc,
    uid,
    unsigned_token,
)


def _tampered() -> str:
    """A validly signed token whose payload was swapped for another user's."""
    header, _, signature = make_token("mallory").split(".")
    forged = (
        base64.urlsafe_b64encode(
            json.dumps({"userId": "admin", "exp": 4_000_000_000}).encode()
        )
        .rstrip(b"=")
        .decode()
    )
    return f"{header}.{forged}.{signature}"


BAD_TOKENS: dict[str, Callable[[], str | None]] = {
    "missing": lambda: None,
    "empty": lambda: "",
    "malformed": lambda: "not-a-jwt",
    "garbage-segments": lambda: "aaaa.bbbb.cccc",
    "bad-signature": lambda: make_token("mallory", WRONG_SECRET),
    "tampered-payload": _tampered,
    "alg-none": lambda: unsigned_token(userId="mallory", exp=4_000_000_000),
    "alg-none-sub-only": lambda: unsigned_token(sub="mallory"),
    "expired": lambda: make_token("late-user", expires_in=-120),
    "no-userId-no-sub": lambda: make_token(None, role="trader", name="nobody"),
    "not-hs256": lambda: make_token("user-512", algorithm="HS512"),
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_bad_token_rejected_with_401_json(server: Server, kind: str) -> None:
    """Missing, malformed, badly signed, alg=none, expired, subject-less or
    non-HS256 tokens get HTTP 401 before any upgrade, with a JSON body
    {"error": "unauthorized", "reason": "<non-empty string>"}."""
    token = BAD_TOKENS[kind]()
    exc = await expect_rejected(server.ws_url(token, assessment_id=uid()))
    response = exc.response
    assert response.status_code == 401, (response.status_code, response.body)
    body = json.loads(response.body)
    assert isinstance(body, dict), body
    assert body.get("error") == "unauthorized", body
    assert isinstance(body.get("reason"), str) and body["reason"], body


async def test_connected_message_fields(server: Server) -> None:
    """A valid token gets the upgrade and, first, {"type": "connected",
    "connectionId": <uuid4>, "userId": <claim userId>, "timestamp": <ISO-8601 UTC>};
    if "assessmentId" is present it echoes the query parameter."""
    user, assessment = uid("alice"), uid()
    before = dt.datetime.now(dt.timezone.utc)
    async with client(server, user, assessment) as c:
        hello = c.hello
    after = dt.datetime.now(dt.timezone.utc)
    assert hello["type"] == "connected"
    assert hello["userId"] == user
    conn_id = uuid.UUID(hello["connectionId"])
    assert conn_id.version == 4 and str(conn_id) == hello["connectionId"].lower(), hello
    ts = parse_iso_utc(hello["timestamp"])
    slack = dt.timedelta(seconds=5)
    assert before - slack <= ts <= after + slack, (before, ts, after)
    if "assessmentId" in hello:
        assert hello["assessmentId"] == assessment


async def test_user_id_falls_back_to_sub(server: Server) -> None:
    """Without a userId claim the user id is the `sub` claim."""
    subject = uid("sub-user")
    async with client(server, token=make_token(None, sub=subject)) as c:
        assert c.hello["userId"] == subject


async def test_user_id_claim_preferred_over_sub(server: Server) -> None:
    """With both claims present the user id is `userId`, not `sub`."""
    user, subject = uid("uid-user"), uid("sub-user")
    async with client(server, token=make_token(user, sub=subject)) as c:
        assert c.hello["userId"] == user


async def test_token_without_exp_is_accepted(server: Server) -> None:
    """`exp` is only enforced when present: a signed token without it is accepted."""
    user = uid("forever")
    async with client(server, token=make_token(user, expires_in=None)) as c:
        assert c.hello["userId"] == user


async def test_token_with_future_exp_is_accepted(server: Server) -> None:
    """A token whose `exp` lies in the future is accepted."""
    user = uid("soon")
    async with client(server, token=make_token(user, expires_in=30)) as c:
        assert c.hello["userId"] == user


async def test_connection_without_assessment_is_accepted(server: Server) -> None:
    """assessmentId is optional in the query string."""
    user = uid("watcher")
    async with client(server, user) as c:
        assert c.hello["userId"] == user
        await c.assert_alive()


async def test_connection_ids_are_unique(server: Server) -> None:
    """Every connection, even for the same user and assessment, gets its own id."""
    assessment = uid()
    ids = []
    for _ in range(4):
        async with client(server, "same-user", assessment) as c:
            ids.append(c.hello["connectionId"])
    assert len(set(ids)) == len(ids), ids


async def test_rejection_does_not_disturb_server(server: Server) -> None:
    """After a burst of rejected handshakes a valid client still connects."""
    for _ in range(10):
        exc = await expect_rejected(server.ws_url(make_token("x", WRONG_SECRET)))
        assert exc.response.status_code == 401
    async with client(server, uid("after")) as c:
        await c.assert_alive()
