"""docs/asyncapi.yaml against the running service.

* Every message a real server sends (connected, ping, pong, the six routed
  types, refreshed, refresh_failed) validates against the document's schema
  for its type, and every server message the document describes is seen.
* The client messages and the Kafka events the test sends validate against
  their schemas too.
* The document is structurally sound (references resolve, operations name
  messages of their channel, the Kafka channels match the topic table), and
  parses with ``@asyncapi/parser`` (installed from npm into a cache directory;
  skipped with the reason when node or npm cannot provide it).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7
from utils import (
    EVENTS_TOPIC,
    REPO_ROOT,
    TIMEOUT,
    TOPIC_TYPES,
    WRONG_SECRET,
    Broker,
    Server,
    client,
    make_token,
    produce,
    uid,
    ws_connect,
)

DOC_PATH = REPO_ROOT / "docs" / "asyncapi.yaml"
DOC_URI = "urn:pushsvc:asyncapi"
WS_CHANNEL = "ws"
PARSER_PACKAGE = "@asyncapi/parser@3"
NODE_CACHE = Path(
    os.environ.get(
        "PUSHSVC_NODE_CACHE", Path.home() / ".cache" / "pushsvc-tests" / "asyncapi"
    )
)


@pytest.fixture(scope="module")
def server_env() -> dict[str, Any]:
    # Pings every 300 ms, so a ping is among the collected messages.
    return {"HEARTBEAT_INTERVAL": 300, "CONNECTION_TIMEOUT": 10_000}


# -- the document ----------------------------------------------------------------


def load_doc() -> dict[str, Any]:
    doc = yaml.safe_load(DOC_PATH.read_text())
    assert isinstance(doc, dict)
    return doc


DOC = load_doc()


def _checker() -> FormatChecker:
    checker = FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def is_iso_utc(value: object) -> bool:
        if not isinstance(value, str):
            return True
        if not value.endswith("Z"):
            raise ValueError(f"not UTC with Z: {value!r}")
        dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return True

    @checker.checks("uuid", raises=ValueError)
    def is_uuid(value: object) -> bool:
        if isinstance(value, str):
            uuid.UUID(value)
        return True

    return checker


REGISTRY: Registry[Any] = Registry().with_resource(
    DOC_URI, Resource.from_contents(DOC, default_specification=DRAFT7)
)
FORMATS = _checker()


def resolve(ref: str) -> Any:
    """A local ``#/...`` reference inside the document."""
    assert ref.startswith("#/"), ref
    node: Any = DOC
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(node: Any) -> Any:
    for _ in range(10):
        if isinstance(node, dict) and set(node) == {"$ref"}:
            node = resolve(node["$ref"])
        else:
            return node
    raise AssertionError(f"reference loop at {node!r}")


def schema_ref(message: dict[str, Any]) -> str:
    """The schema reference of a message's payload (``#/components/...``)."""
    payload = message["payload"]
    assert set(payload) == {"$ref"}, "payloads are references to named schemas"
    return str(payload["$ref"])


def validator(ref: str) -> Draft7Validator:
    return Draft7Validator(
        {"$ref": DOC_URI + ref}, registry=REGISTRY, format_checker=FORMATS
    )


def payload_type(message: dict[str, Any]) -> str:
    schema = deref(resolve(schema_ref(message)))
    return str(schema["properties"]["type"]["const"])


def ws_messages(direction: str) -> dict[str, str]:
    """``type`` -> schema reference of the WebSocket messages the server
    sends (``"send"``: its send operations and replies) or receives."""
    out: dict[str, str] = {}
    for op in DOC["operations"].values():
        if op["channel"]["$ref"] != f"#/channels/{WS_CHANNEL}":
            continue
        refs: list[dict[str, str]] = []
        if op["action"] == direction:
            refs += op["messages"]
        if direction == "send" and "reply" in op:
            refs += op["reply"]["messages"]
        for ref in refs:
            message = deref(resolve(ref["$ref"]))
            kind = payload_type(message)
            ref_to = schema_ref(message)
            assert out.setdefault(kind, ref_to) == ref_to, kind
    return out


SERVER_MESSAGES = ws_messages("send")
CLIENT_MESSAGES = ws_messages("receive")


def kafka_schemas() -> dict[str, str]:
    """Topic -> schema reference of its events."""
    out: dict[str, str] = {}
    for channel in DOC["channels"].values():
        servers = [s["$ref"] for s in channel.get("servers", [])]
        if servers != ["#/servers/kafka"] or "{" in channel["address"]:
            continue
        (message,) = channel["messages"].values()
        out[channel["address"]] = schema_ref(deref(message))
    return out


KAFKA_SCHEMAS = kafka_schemas()


def check(ref: str, instance: Any) -> None:
    errors = sorted(validator(ref).iter_errors(instance), key=str)
    assert not errors, f"{instance!r} against {ref}:\n" + "\n".join(
        f"- {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
    )


# -- structure -------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_document_structure() -> None:
    """What the AsyncAPI parser checks that matters here, without node."""
    assert DOC["asyncapi"].startswith("3.")
    for ref in _refs(DOC):
        resolve(ref)  # raises KeyError if dangling
    for name, op in DOC["operations"].items():
        assert op["action"] in ("send", "receive"), name
        channel = op["channel"]["$ref"]
        for message in op["messages"] + op.get("reply", {}).get("messages", []):
            assert message["$ref"].startswith(channel + "/messages/"), (name, message)
    for name in DOC["components"]["schemas"]:
        Draft7Validator.check_schema(DOC["components"]["schemas"][name])


def test_document_covers_the_protocol() -> None:
    assert set(SERVER_MESSAGES) == {
        "connected",
        "ping",
        "pong",
        "refreshed",
        "refresh_failed",
        "snapshot",
        "resync_required",
        *TOPIC_TYPES.values(),
    }
    assert set(CLIENT_MESSAGES) == {"ping", "pong", "refresh"}
    assert set(KAFKA_SCHEMAS) == set(TOPIC_TYPES)
    for topic, ref in KAFKA_SCHEMAS.items():
        schema = deref(resolve(ref))
        assert schema["properties"]["type"]["const"] == TOPIC_TYPES[topic]
        assert all(key == key.lower() for key in schema["properties"]), topic


def test_document_parses_with_asyncapi_parser() -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for @asyncapi/parser")
    package = NODE_CACHE / "node_modules" / "@asyncapi" / "parser" / "package.json"
    if not package.exists():
        NODE_CACHE.mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run(
                [
                    npm,
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    "--prefix",
                    str(NODE_CACHE),
                    PARSER_PACKAGE,
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm install {PARSER_PACKAGE} timed out")
        if result.returncode != 0 or not package.exists():
            pytest.skip(f"npm install {PARSER_PACKAGE} failed: {result.stderr[-500:]}")
    # ESM resolves packages from the script's own folder (not NODE_PATH), so
    # the script sits next to the node_modules it imports from.
    script = NODE_CACHE / "parse.mjs"
    script.write_text(
        "import { Parser, fromFile } from '@asyncapi/parser';\n"
        "const { document, diagnostics } = "
        "await fromFile(new Parser(), process.argv[2]).parse();\n"
        "console.log(JSON.stringify({ parsed: !!document, diagnostics: "
        "diagnostics.map(d => ({ severity: d.severity, code: d.code, "
        "message: d.message, path: d.path.join('/') })) }));\n"
    )
    result = subprocess.run(
        [node, str(script), str(DOC_PATH)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # Severity 0 is an error, 1 a warning; 2 and 3 are hints (such as "a
    # newer AsyncAPI version exists").
    serious = [d for d in report["diagnostics"] if d["severity"] <= 1]
    assert report["parsed"] and not serious, json.dumps(serious, indent=1)


# -- against the server ----------------------------------------------------------


def kafka_events(assessment: str, market: str) -> list[tuple[str, dict[str, Any]]]:
    """One valid event per topic, snake_case as producers write them."""
    return [
        ("market-data.prices", {"market": market, "price": 64000.5}),
        (
            "trading.pnl",
            {
                "assessment_id": assessment,
                "unrealized_pnl": -12.5,
                "realized_pnl": 3,
                "current_balance": 99990.5,
            },
        ),
        (
            "trading.positions",
            {
                "assessment_id": assessment,
                "position_id": "p-1",
                "market": market,
                "side": "long",
                "quantity": 1.5,
                "entry_price": 63990,
                "unrealized_pnl": 15.75,
            },
        ),
        (
            "risk.rule-status",
            {
                "assessment_id": assessment,
                "rule": "max_daily_loss",
                "value": 4100,
                "threshold": 5000,
                "status": "warning",
            },
        ),
        (
            "risk.violations",
            {
                "assessment_id": assessment,
                "rule": "max_position_size",
                "value": 6,
                "threshold": 5,
                "timestamp": "2026-11-26T10:58:11.123Z",
            },
        ),
        ("assessment.status", {"assessment_id": assessment, "status": "active"}),
    ]


async def test_every_server_message_validates(server: Server, broker: Broker) -> None:
    assessment, market, user = uid(), uid("MKT"), uid("u")
    events = kafka_events(assessment, market)
    for topic, value in events:
        check(KAFKA_SCHEMAS[topic], value)
    seen: dict[str, list[dict[str, Any]]] = {}

    async with client(server, user, assessment) as c:
        seen["connected"] = [c.hello]
        for topic, value in events:
            produce(broker.bootstrap, topic, value, key=assessment)
        # The same events with an explicit type on a topic that names none.
        for topic, value in events:
            typed = {"type": TOPIC_TYPES[topic], **value}
            produce(broker.bootstrap, EVENTS_TOPIC, typed, key=assessment)
        sent = [
            {"type": "ping"},
            {"type": "pong", "timestamp": 1},
            {"type": "refresh", "token": make_token(user, expires_in=600)},
            {"type": "refresh", "token": make_token(user, WRONG_SECRET)},
        ]
        for message in sent:
            check(CLIENT_MESSAGES[message["type"]], message)
            await c.ws.send(json.dumps(message))

        seen["snapshot"] = [c.snapshot]
        # resync_required needs a position that cannot be served: seen below.
        expected_here = set(SERVER_MESSAGES) - {"resync_required"}

        def complete() -> bool:
            routed = sum(len(seen.get(t, [])) for t in TOPIC_TYPES.values())
            return expected_here <= set(seen) and routed >= 2 * len(events)

        for _ in range(10_000):
            if complete():
                break
            msg = await c.recv_json(timeout=TIMEOUT)
            if msg.get("type") == "market_price" and msg.get("market") != market:
                continue  # another test's price
            seen.setdefault(str(msg.get("type")), []).append(msg)

    async with client(server, uid("u")) as c:  # no assessmentId
        seen["connected"].append(c.hello)
        seen["snapshot"].append(c.snapshot)

    # A position that cannot be served: resync_required, then the snapshot.
    url = server.ws_url(make_token(uid("u")), assessment) + "&since=not-a-position"
    ws = await ws_connect(url)
    try:
        for _ in range(3):
            msg = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
            if msg.get("type") == "connected":
                check(SERVER_MESSAGES["connected"], msg)
                assert msg["resumed"] is False
            else:
                seen.setdefault(str(msg.get("type")), []).append(msg)
    finally:
        await ws.close()

    unknown = set(seen) - set(SERVER_MESSAGES)
    assert not unknown, f"messages the document does not describe: {unknown}"
    missing = set(SERVER_MESSAGES) - set(seen)
    assert not missing, f"described but never seen: {missing}"
    for kind, messages in seen.items():
        for message in messages:
            check(SERVER_MESSAGES[kind], message)
    assert seen["refreshed"][0].get("expiresAt")
    assert "assessmentId" not in seen["connected"][-1]
