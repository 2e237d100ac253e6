"""Handshake policy: everything refused before the upgrade, with an HTTP status and
a JSON reason: assessment claims (403), Origin (403), per-user (429) and process
(503) connection limits, tokens in ``Sec-WebSocket-Protocol``, JWT algorithm and
key-confusion attacks (401), the handshake timeout, and tokens kept out of logs.

These servers need no broker: upgrades do not wait for Kafka, so each starts in
a fraction of a second with ``KAFKA_BROKERS`` pointing at a closed port.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from utils import (
    JWT_SECRET,
    LOOPBACK,
    TIMEOUT,
    Server,
    ahttp_get,
    ascrape,
    expect_rejected,
    make_token,
    open_client,
    run_server,
    uid,
    wait_for_metric,
    ws_connect,
)

from pushsvc.config import Settings
from pushsvc.server import PushServer

ORIGIN = "https://app.example.com"
MAX_CONNECTIONS = 4
MAX_PER_USER = 2
HANDSHAKE_TIMEOUT_MS = 500

pytestmark = pytest.mark.time_limit(30)


@pytest.fixture(scope="module")
def limited() -> Iterator[Server]:
    """Origins, both connection limits and a short handshake timeout."""
    with run_server(
        None,
        wait="health",
        ALLOWED_ORIGINS=f"{ORIGIN}, https://Admin.Example.com/",
        MAX_CONNECTIONS=MAX_CONNECTIONS,
        MAX_CONNECTIONS_PER_USER=MAX_PER_USER,
        HANDSHAKE_TIMEOUT=HANDSHAKE_TIMEOUT_MS,
        REQUIRE_ASSESSMENT_CLAIM="false",
    ) as s:
        yield s


@pytest.fixture(scope="module")
def strict() -> Iterator[Server]:
    """REQUIRE_ASSESSMENT_CLAIM=true."""
    with run_server(None, wait="health", REQUIRE_ASSESSMENT_CLAIM="true") as s:
        yield s


async def _idle(server: Server) -> None:
    """Wait until the server holds no connection (earlier tests' closes landed)."""
    await wait_for_metric(
        server,
        lambda m: m.value("websocket_connections_total") == 0,
        what="no open connections",
    )


async def _refused(server: Server, reason: str) -> float:
    metrics = await ascrape(server)
    return metrics.value("websocket_handshakes_refused_total", reason=reason)


async def _expect_status(
    url: str, status: int, error: str, **kwargs: Any
) -> dict[str, Any]:
    """The handshake is refused with ``status`` and a JSON ``error``/``reason``."""
    try:
        ws = await ws_connect(url, **kwargs)
    except Exception as exc:  # InvalidStatus carries the response
        response = getattr(exc, "response", None)
        assert response is not None, f"expected HTTP {status}, got {exc!r}"
    else:
        await asyncio.wait_for(ws.close(), TIMEOUT)
        raise AssertionError(f"handshake to {url} was accepted, expected {status}")
    assert response.status_code == status, (response.status_code, response.body)
    assert response.headers.get("Content-Type") == "application/json"
    body = json.loads(bytes(response.body))
    assert body["error"] == error, body
    assert isinstance(body["reason"], str) and body["reason"], body
    return body


# --------------------------------------------------------------------- assessments


async def test_assessment_outside_claim_is_403(limited: Server) -> None:
    await _idle(limited)
    allowed, other = uid(), uid()
    token = make_token("claims-user", assessments=[allowed, uid()])
    before = await _refused(limited, "assessment_forbidden")
    body = await _expect_status(limited.ws_url(token, other), 403, "forbidden")
    assert "assessment" in body["reason"]
    assert await _refused(limited, "assessment_forbidden") == before + 1
    c = await open_client(limited, token=token, assessment_id=allowed)
    assert c.hello["assessmentId"] == allowed
    await c.close()
    # Without assessmentId: market data only, which any authenticated user gets.
    c = await open_client(limited, token=token)
    assert "assessmentId" not in c.hello
    await c.close()


async def test_empty_claim_allows_market_data_only(limited: Server) -> None:
    await _idle(limited)
    token = make_token("no-assessments", assessments=[])
    await _expect_status(limited.ws_url(token, uid()), 403, "forbidden")
    c = await open_client(limited, token=token)
    await c.close()


@pytest.mark.parametrize("claim", ["asm-1", {"asm-1": True}, None, 7])
async def test_malformed_claim_is_403(limited: Server, claim: object) -> None:
    """A claim that is there but not a list fails closed, even for its own id."""
    token = make_token("odd-claim", assessments=claim)
    await _expect_status(limited.ws_url(token, "asm-1"), 403, "forbidden")


async def test_no_claim_allows_any_assessment_when_not_required(
    limited: Server,
) -> None:
    await _idle(limited)
    c = await open_client(limited, "unscoped", uid())
    await c.close()


async def test_required_claim_missing_is_403(strict: Server) -> None:
    """REQUIRE_ASSESSMENT_CLAIM=true refuses tokens without the claim, with or
    without assessmentId; with the claim, no assessmentId means market data."""
    token = make_token("unscoped")
    for assessment in (uid(), None):
        body = await _expect_status(strict.ws_url(token, assessment), 403, "forbidden")
        assert "claim" in body["reason"]
    allowed = uid()
    scoped = make_token("scoped", assessments=[allowed])
    for assessment in (allowed, None):
        c = await open_client(strict, token=scoped, assessment_id=assessment)
        await c.close()
    await _expect_status(strict.ws_url(scoped, uid()), 403, "forbidden")


# -------------------------------------------------------------------------- origin


@pytest.mark.parametrize(
    "origin", [ORIGIN, "https://admin.example.com", "HTTPS://APP.EXAMPLE.COM", None]
)
async def test_allowed_or_absent_origin_accepted(
    limited: Server, origin: str | None
) -> None:
    """Listed origins (compared case-insensitively, trailing slash ignored in
    the setting) and requests without Origin (non-browser clients) connect."""
    await _idle(limited)
    c = await open_client(limited, "origin-user", origin=origin)
    await c.close()


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.com",
        "http://app.example.com",  # other scheme
        "https://app.example.com:8443",  # other port
        "https://app.example.com.evil.test",
        "null",
    ],
)
async def test_other_origin_is_403(limited: Server, origin: str) -> None:
    before = await _refused(limited, "origin_not_allowed")
    body = await _expect_status(
        limited.ws_url(make_token("origin-user")), 403, "forbidden", origin=origin
    )
    assert "origin" in body["reason"]
    assert await _refused(limited, "origin_not_allowed") == before + 1


async def test_origin_checked_before_token(limited: Server) -> None:
    """A foreign page learns nothing about tokens: 403, not 401."""
    await _expect_status(
        limited.ws_url("not-a-jwt"), 403, "forbidden", origin="https://evil.test"
    )


# ---------------------------------------------------------------------- the limits


async def test_per_user_limit_is_429(limited: Server) -> None:
    await _idle(limited)
    user = uid("user")
    clients = [await open_client(limited, user) for _ in range(MAX_PER_USER)]
    try:
        before = await _refused(limited, "user_connection_limit")
        body = await _expect_status(
            limited.ws_url(make_token(user)), 429, "too_many_connections"
        )
        assert str(MAX_PER_USER) in body["reason"]
        assert await _refused(limited, "user_connection_limit") == before + 1
        # Another user is not affected.
        other = await open_client(limited, uid("user"))
        await other.close()
        # A closed connection gives its slot back.
        await clients.pop().close()
        await wait_for_metric(
            limited,
            lambda m: m.value("websocket_connections_total") == MAX_PER_USER - 1,
            what="closed connection unregistered",
        )
        clients.append(await open_client(limited, user))
    finally:
        for c in clients:
            await c.close()


async def test_refused_upgrade_gives_user_slot_back(limited: Server) -> None:
    """A request the factory accepted but picows then refused (400: not an
    upgrade) must not keep a per-user slot."""
    await _idle(limited)
    user = uid("user")
    path = "/ws?token=" + make_token(user)
    for _ in range(MAX_PER_USER + 1):
        status, _ = await _raw_request(limited, path, upgrade=False)
        assert status == 400
    clients = [await open_client(limited, user) for _ in range(MAX_PER_USER)]
    for c in clients:
        await c.close()


async def test_max_connections_is_503(limited: Server) -> None:
    await _idle(limited)
    clients = [await open_client(limited, uid("user")) for _ in range(MAX_CONNECTIONS)]
    try:
        before = await _refused(limited, "connection_limit")
        await _expect_status(
            limited.ws_url(make_token(uid("user"))), 503, "unavailable"
        )
        assert await _refused(limited, "connection_limit") == before + 1
        status, _, _ = await ahttp_get(limited.url("/health"))
        assert status == 200, "plain HTTP is not subject to the connection limit"
        await clients.pop().close()
        await wait_for_metric(
            limited,
            lambda m: m.value("websocket_connections_total") == MAX_CONNECTIONS - 1,
            what="closed connection unregistered",
        )
        clients.append(await open_client(limited, uid("user")))
    finally:
        for c in clients:
            await c.close()


async def test_bad_token_still_401(limited: Server) -> None:
    await _expect_status(limited.ws_url("not-a-jwt"), 401, "unauthorized")


# ------------------------------------------------------------- subprotocol tokens


async def test_token_in_subprotocol_is_accepted_and_echoed(limited: Server) -> None:
    """``new WebSocket(url, ["bearer", token])``: no token in the URL, and the
    101 selects ``bearer`` (a browser fails a connection whose 101 selects
    none of the offered subprotocols)."""
    await _idle(limited)
    user = uid("user")
    ws = await ws_connect(
        limited.ws_url(None, "asm-x"), subprotocols=["bearer", make_token(user)]
    )
    try:
        assert ws.subprotocol == "bearer"
        hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert hello["type"] == "connected" and hello["userId"] == user
        assert hello["assessmentId"] == "asm-x"
    finally:
        await asyncio.wait_for(ws.close(), TIMEOUT)


async def test_subprotocol_response_header_is_exactly_bearer(limited: Server) -> None:
    await _idle(limited)
    token = make_token(uid("user"))
    status, headers = await _raw_request(
        limited, "/ws", headers=[("Sec-WebSocket-Protocol", f"bearer, {token}")]
    )
    assert status == 101
    assert headers.get("sec-websocket-protocol") == ["bearer"], headers
    # The header may also be split over several lines.
    status, headers = await _raw_request(
        limited,
        "/ws",
        headers=[
            ("Sec-WebSocket-Protocol", "bearer"),
            ("Sec-WebSocket-Protocol", token),
        ],
    )
    assert status == 101
    assert headers.get("sec-websocket-protocol") == ["bearer"], headers


async def test_query_token_selects_no_subprotocol(limited: Server) -> None:
    await _idle(limited)
    ws = await ws_connect(limited.ws_url(make_token(uid("user"))))
    try:
        assert ws.subprotocol is None
    finally:
        await asyncio.wait_for(ws.close(), TIMEOUT)
    status, headers = await _raw_request(
        limited,
        "/ws?token=" + make_token(uid("user")),
        headers=[("Sec-WebSocket-Protocol", "graphql-ws")],
    )
    assert status == 101 and "sec-websocket-protocol" not in headers, headers


@pytest.mark.parametrize(
    "offered",
    [
        ["bearer", "not-a-jwt"],
        ["bearer", make_token("someone", secret="another-secret-" + "x" * 40)],
        ["bearer"],
    ],
    ids=["malformed", "bad-signature", "no-token"],
)
async def test_bad_subprotocol_token_is_401(
    limited: Server, offered: list[str]
) -> None:
    await _expect_status(
        limited.ws_url(None), 401, "unauthorized", subprotocols=offered
    )


async def test_subprotocol_token_wins_over_query(limited: Server) -> None:
    await _idle(limited)
    user = uid("user")
    ws = await ws_connect(
        limited.ws_url("not-a-jwt"), subprotocols=["bearer", make_token(user)]
    )
    try:
        hello = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        assert hello["userId"] == user
    finally:
        await asyncio.wait_for(ws.close(), TIMEOUT)


# -------------------------------------------------------------- JWT attack tokens


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(
    header: dict[str, Any], key: bytes | None = None, *, sig: bytes = b""
) -> str:
    """A token with any header, HMAC-SHA256-signed with ``key`` if given."""
    claims = {"userId": "mallory", "exp": int(time.time()) + 3600}
    signing_input = (
        f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    )
    if key is not None:
        sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


_SECRET = JWT_SECRET.encode()
_ATTACKER_KEY = os.urandom(32)
ATTACK_TOKENS: dict[str, Callable[[], str]] = {
    "alg-none": lambda: _forge({"alg": "none", "typ": "JWT"}),
    "alg-None": lambda: _forge({"alg": "None"}),
    "alg-NONE": lambda: _forge({"alg": "NONE"}),
    "alg-none-with-valid-hmac": lambda: _forge({"alg": "none"}, _SECRET),
    "alg-missing-valid-hmac": lambda: _forge({"typ": "JWT"}, _SECRET),
    "alg-lowercase-hs256-valid-hmac": lambda: _forge({"alg": "hs256"}, _SECRET),
    "alg-as-list": lambda: _forge({"alg": ["HS256"]}, _SECRET),
    # Key confusion: an asymmetric algorithm in the header, signed with the
    # HMAC secret as if it were the "public key", or with junk.
    "rs256-hmac-with-secret": lambda: _forge({"alg": "RS256"}, _SECRET),
    "rs256-random-signature": lambda: _forge({"alg": "RS256"}, sig=os.urandom(256)),
    "es256-hmac-with-secret": lambda: _forge({"alg": "ES256"}, _SECRET),
    "ps256-hmac-with-secret": lambda: _forge({"alg": "PS256"}, _SECRET),
    # Other HMAC sizes, correctly signed with the real secret: still refused.
    "hs512-with-secret": lambda: make_token("mallory", algorithm="HS512"),
    "hs384-with-secret": lambda: make_token("mallory", algorithm="HS384"),
    # Keys the attacker supplies in the header are never used.
    "embedded-jwk": lambda: _forge(
        {"alg": "HS256", "jwk": {"kty": "oct", "k": _b64(_ATTACKER_KEY)}},
        _ATTACKER_KEY,
    ),
    "kid-empty-key": lambda: _forge({"alg": "HS256", "kid": "/dev/null"}, b""),
}


@pytest.mark.parametrize("kind", list(ATTACK_TOKENS))
async def test_jwt_attack_is_401(limited: Server, kind: str) -> None:
    token = ATTACK_TOKENS[kind]()
    exc = await expect_rejected(limited.ws_url(token, "asm-1"))
    assert exc.response.status_code == 401, (kind, exc.response.body)
    body = json.loads(bytes(exc.response.body))
    assert body["error"] == "unauthorized" and body["reason"], body
    assert token not in body["reason"]


async def test_jwt_attack_in_subprotocol_is_401(limited: Server) -> None:
    await _expect_status(
        limited.ws_url(None),
        401,
        "unauthorized",
        subprotocols=["bearer", ATTACK_TOKENS["rs256-hmac-with-secret"]()],
    )


# ------------------------------------------------------------- handshake timeout


async def _closed_after(writer_data: bytes, server: Server) -> float:
    """Open a socket, send ``writer_data`` (maybe nothing), and return how long
    the server took to close it."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(server.host, server.port), TIMEOUT
    )
    try:
        start = time.monotonic()
        if writer_data:
            writer.write(writer_data)
            await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), TIMEOUT)
        elapsed = time.monotonic() - start
        assert data == b"", f"expected the server to close, got {data!r:.200}"
        return elapsed
    finally:
        writer.close()


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /ws?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
    ids=["silent", "partial-request"],
)
async def test_handshake_timeout_closes_idle_socket(
    limited: Server, sent: bytes
) -> None:
    """A socket that opens and sends nothing (or never finishes its request)
    is closed after HANDSHAKE_TIMEOUT, not held forever."""
    elapsed = await _closed_after(sent, limited)
    timeout_s = HANDSHAKE_TIMEOUT_MS / 1000.0
    assert timeout_s * 0.8 <= elapsed <= timeout_s + 1.5, elapsed


# ------------------------------------------------------------------- log hygiene


@pytest.mark.parametrize("level", ["DEBUG", "NOTSET"])
async def test_tokens_never_logged(level: str) -> None:
    """Not at LOG_LEVEL=DEBUG, nor at NOTSET, where picows would log the raw
    request bytes (its level 9) if its logger were allowed that low."""
    with run_server(None, wait="health", LOG_LEVEL=level, ALLOWED_ORIGINS=ORIGIN) as s:
        query_token = make_token(uid("leak"))
        c = await open_client(s, token=query_token, assessment_id="asm-1")
        await c.close()
        header_token = make_token(uid("leak"))
        ws = await ws_connect(s.ws_url(None), subprotocols=["bearer", header_token])
        await asyncio.wait_for(ws.close(), TIMEOUT)
        bad_token = make_token("leak", secret="another-secret-" + "y" * 40)
        await _expect_status(s.ws_url(bad_token), 401, "unauthorized")
        origin_token = make_token(uid("leak"))
        await _expect_status(
            s.ws_url(origin_token), 403, "forbidden", origin="https://evil.test"
        )
        # The last request's DEBUG line proves debug logging is on; wait for it.
        text = ""
        deadline = time.monotonic() + TIMEOUT
        for _ in range(200):
            text = s.log_path.read_text(errors="replace")
            if "upgrade refused with 403" in text or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert "upgrade refused with 401" in text, text[-3000:]
        assert "upgrade refused with 403" in text, text[-3000:]
        for token in (query_token, header_token, bad_token, origin_token):
            signature = token.rsplit(".", 1)[1]
            assert signature not in text, (
                f"a token leaked into the log:\n{text[-3000:]}"
            )
        assert "token=" not in text, text[-3000:]


async def test_picows_logger_held_at_info(caplog: pytest.LogCaptureFixture) -> None:
    """picows logs raw request bytes, the query token included, at its level 9.
    Even with every logger opened to level 1, the server keeps its picows
    logger at INFO (in process: the subprocess tests above cannot lower it)."""
    ws_logger = logging.getLogger("pushsvc.ws")
    saved = ws_logger.level
    ws_logger.setLevel(logging.NOTSET)
    caplog.set_level(1)
    server = PushServer(
        Settings(jwt_secret=JWT_SECRET, host=LOOPBACK, port=0), consume=False
    )
    try:
        await server.start()
        token = make_token(uid("leak"))
        ws = await ws_connect(f"ws://{LOOPBACK}:{server.port}/ws?token={token}")
        await asyncio.wait_for(ws.recv(), TIMEOUT)
        await asyncio.wait_for(ws.close(), TIMEOUT)
        assert ws_logger.getEffectiveLevel() == logging.INFO
        assert any(r.name == "pushsvc.ws" for r in caplog.records), "no picows logs"
        # (The test's own websockets client logs its request line: not ours.)
        server_lines = "\n".join(
            r.getMessage() for r in caplog.records if r.name.startswith("pushsvc")
        )
        assert token.rsplit(".", 1)[1] not in server_lines
    finally:
        await server.stop(drain_ms=0, timeout_ms=2000)
        ws_logger.setLevel(saved)


# ------------------------------------------------------------------------ helpers


async def _raw_request(
    server: Server,
    path: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    upgrade: bool = True,
) -> tuple[int, dict[str, list[str]]]:
    """Send one request by hand; return the status and the response headers
    (lower-case names, every value). Closes the socket right after."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(LOOPBACK, server.port), TIMEOUT
    )
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: {LOOPBACK}:{server.port}"]
        if upgrade:
            key = base64.b64encode(os.urandom(16)).decode()
            lines += [
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
            ]
        lines += [f"{k}: {v}" for k, v in headers or ()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    finally:
        writer.close()
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found: dict[str, list[str]] = {}
    for line in header_lines:
        if ":" in line:
            name, value = line.split(":", 1)
            found.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status_line.split(" ")[1]), found
