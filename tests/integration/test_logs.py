"""A real server with NODE_ENV=production and LOG_LEVEL=DEBUG: every line it
writes is one JSON object, and no token appears in its output, whichever way
the token came (query, subprotocol header, refresh, refused, expired, on a
path that is not /ws)."""

from __future__ import annotations

import asyncio
import json

from utils import (
    WRONG_SECRET,
    Broker,
    RawWebSocket,
    client,
    create_topics,
    expect_rejected,
    http_get,
    make_token,
    produce,
    run_server,
    uid,
    ws_connect,
)


async def test_production_logs_are_json_and_token_free(broker: Broker) -> None:
    create_topics(broker.bootstrap, {"trading.pnl": 1})
    user = uid("u")
    tokens = {
        "query": make_token(user),
        "subprotocol": make_token(user),
        "wrong_secret": make_token(user, WRONG_SECRET),
        "expired": make_token(user, expires_in=-60),
        "refresh_ok": make_token(user, expires_in=600),
        "refresh_bad": make_token(user, WRONG_SECRET),
        "not_found": make_token(user),
        "policy": make_token(user),
    }
    with run_server(broker, NODE_ENV="production", LOG_LEVEL="DEBUG") as server:
        async with client(server, token=tokens["query"]) as c:
            for name in ("refresh_ok", "refresh_bad"):
                await c.ws.send(json.dumps({"type": "refresh", "token": tokens[name]}))
            await c.recv_until(lambda m: m.get("type") == "refresh_failed")
        ws = await ws_connect(
            server.ws_url(None), subprotocols=["bearer", tokens["subprotocol"]]
        )
        await ws.close()
        for name in ("wrong_secret", "expired"):
            await expect_rejected(server.ws_url(tokens[name]))
        status, _, _ = await asyncio.to_thread(
            http_get, server.url(f"/nowhere?token={tokens['not_found']}")
        )
        assert status == 404
        raw = await RawWebSocket.connect_server(server, tokens["policy"])
        for _ in range(30):
            await raw.send_text("not json")
        code, _, _ = await raw.recv_close()
        await raw.close()
        assert code == 1008
        produce(broker.bootstrap, "trading.pnl", b"{broken json")
        await asyncio.sleep(0.5)  # let the last records reach the file
        output = server.log_path.read_text()

    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, "the server logged nothing"
    records = []
    for line in lines:
        record = json.loads(line)  # fails the test on any non-JSON line
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        records.append(record)
    messages = " | ".join(r["message"] for r in records)
    assert any(r["level"] == "debug" for r in records), "LOG_LEVEL=DEBUG had no effect"
    assert "dropped kafka record" in messages
    for name, token in tokens.items():
        signature = token.rsplit(".", 1)[1]
        assert token not in output and signature not in output, f"{name} token logged"
