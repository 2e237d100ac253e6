"""Resume after reconnect (``since=<pos>``) and the snapshot on connect (issue
"No gaps").

Real broker, real ``pushsvc serve`` processes, real WebSocket clients. The contract
under test:

* every assessment-scoped message carries ``pos`` as its last field; ``connected``
  (with an assessmentId) carries ``pos`` and ``resumed``;
* ``since=<pos>`` replays exactly the missed assessment-scoped messages, once, in
  per-partition order, then the live stream with no gap or overlap, and no snapshot;
  from the in-memory buffer, or from Kafka when the buffer no longer covers the gap;
* a malformed or too old ``pos`` gives ``resumed: false``, ``resync_required`` and
  the snapshot; no ``since`` gives the snapshot;
* the snapshot holds the latest state, and a replica started later (warm-up from
  Kafka) serves the same snapshot as an old one.

"Has the server consumed these records yet?" is answered by an *observer*: a second
connection on the same assessment and server that stays open and receives them live.
Its copies are also the reference for what a replayed message must look like.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from utils import (
    STANDARD_TOPICS,
    TIMEOUT,
    Broker,
    KafkaProducer,
    PushClient,
    Server,
    ascrape,
    create_topics,
    is_ping,
    make_token,
    parse_iso_utc,
    produce_many,
    run_server,
    uid,
    ws_connect,
)

from pushsvc._router import decode_pos

SCOPED_TOPIC_TYPES = {
    "trading.pnl": "pnl_update",
    "trading.positions": "position_update",
    "risk.rule-status": "rule_status",
    "risk.violations": "violation",
    "assessment.status": "assessment_update",
}
SCOPED_TYPES = frozenset(SCOPED_TOPIC_TYPES.values())
# The topics the gap tests spread their records over (one partition each, keyed by
# the assessment): order is only promised per partition.
GAP_TOPICS = ("trading.pnl", "trading.positions", "risk.violations")

RESUMES = "websocket_resumes_total"
RESUME_METRICS = (
    "websocket_resumes_total",
    "websocket_resume_buffer_entries",
    "websocket_resume_buffer_bytes",
    "websocket_resume_buffer_evictions_total",
)

Record = tuple[str, Any, str | bytes | None]


@pytest.fixture(scope="module")
def server(broker: Broker) -> Iterator[Server]:
    """The default server (default RESUME_* and SNAPSHOT_WARMUP settings)."""
    create_topics(broker.bootstrap, STANDARD_TOPICS)
    with run_server(broker) as s:
        yield s


@pytest.fixture(scope="module")
def small_buffer_server(broker: Broker, server: Server) -> Iterator[Server]:
    """A server whose resume buffer keeps only 4 events per assessment, so a
    longer gap must be read back from Kafka."""
    with run_server(broker, RESUME_BUFFER_SIZE=4) as s:
        yield s


# --------------------------------------------------------------------------- helpers


def ws_url(
    server: Server, token: str, assessment: str | None, since: str | None = None
) -> str:
    query = {"token": token}
    if assessment is not None:
        query["assessmentId"] = assessment
    if since is not None:
        query["since"] = since
    return f"ws://{server.host}:{server.port}/ws?{urllib.parse.urlencode(query)}"


async def connect(
    server: Server, assessment: str | None, since: str | None = None
) -> PushClient:
    """Open a connection (optionally resuming) and read its first message, which
    must be ``connected``. Nothing after it is consumed."""
    ws = await ws_connect(ws_url(server, make_token(uid("u")), assessment, since))
    try:
        raw = await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert isinstance(raw, str), f"first frame not text: {raw!r:.200}"
        hello = json.loads(raw)
        assert isinstance(hello, dict) and hello.get("type") == "connected", hello
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), TIMEOUT)
        raise
    return PushClient(ws, hello)


@contextlib.asynccontextmanager
async def session(
    server: Server, assessment: str | None, since: str | None = None
) -> AsyncIterator[PushClient]:
    c = await connect(server, assessment, since)
    try:
        yield c
    finally:
        await c.close()


async def next_messages(
    c: PushClient, count: int, timeout: float = TIMEOUT
) -> list[dict[str, Any]]:
    """The next ``count`` messages that are not pings, whatever they are."""
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    for _ in range(count + 10_000):
        if len(got) >= count:
            return got
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            msg = await c.recv_json(timeout=remaining)
        except TimeoutError:
            break
        if not is_ping(msg):
            got.append(msg)
    if len(got) >= count:
        return got
    raise AssertionError(
        f"got {len(got)}/{count} non-ping messages within {timeout}s: {got!r}"
    )


async def next_message(c: PushClient, timeout: float = TIMEOUT) -> dict[str, Any]:
    return (await next_messages(c, 1, timeout))[0]


def tagged(tag: str) -> Any:
    return lambda m: m.get("tag") == tag


def gap_records(
    assessment: str, tag: str, start: int, count: int, topics: tuple[str, ...]
) -> list[Record]:
    """``count`` records for ``assessment`` with seq start.., round-robin over
    ``topics``, keyed by the assessment (so one partition per topic)."""
    out: list[Record] = []
    for seq in range(start, start + count):
        topic = topics[seq % len(topics)]
        value: dict[str, Any] = {"assessmentId": assessment, "tag": tag, "seq": seq}
        if topic == "trading.positions":
            value.update(positionId=f"p-{seq}", quantity=seq + 1)
        if topic == "risk.violations":
            value.update(rule=f"rule-{seq}", value=seq, threshold=1)
        out.append((topic, value, assessment))
    return out


def ident(m: dict[str, Any]) -> tuple[str, int]:
    """(type, seq) of a test event; seq -1 for anything else (a snapshot, ...)."""
    seq = m.get("seq")
    return (str(m.get("type")), seq if isinstance(seq, int) else -1)


def without_pos(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "pos"}


def assert_has_pos(m: dict[str, Any]) -> str:
    """An assessment-scoped message carries ``pos``, a short string, as its last
    field."""
    pos = m.get("pos")
    assert isinstance(pos, str) and pos, f"no pos string in {m!r}"
    assert len(pos) <= 200, f"pos is not short ({len(pos)} chars): {m!r}"
    assert list(m)[-1] == "pos", f"pos is not the last field: {list(m)}"
    return pos


def assert_exact_replay(
    got: list[dict[str, Any]], expected: list[dict[str, Any]], what: str
) -> None:
    """``got`` is exactly ``expected`` (the observer's copies): each event once,
    none missing or extra, per-type (= per-partition) order kept, each message
    identical to the live one apart from ``pos``, and each with a ``pos``."""
    got_ids = [ident(m) for m in got]
    exp_ids = [ident(m) for m in expected]
    dups = sorted({i for i in got_ids if got_ids.count(i) > 1})
    assert not dups, f"{what}: duplicated {dups}; got {got_ids}"
    assert sorted(got_ids) == sorted(exp_ids), (
        f"{what}: missing {sorted(set(exp_ids) - set(got_ids))}, "
        f"extra {sorted(set(got_ids) - set(exp_ids))}; got {got_ids}"
    )
    for ty in {t for t, _ in exp_ids}:
        assert [s for t, s in got_ids if t == ty] == [
            s for t, s in exp_ids if t == ty
        ], f"{what}: {ty} out of order: got {got_ids}, produced {exp_ids}"
    by_id = {ident(m): m for m in expected}
    for m in got:
        assert_has_pos(m)
        assert without_pos(m) == without_pos(by_id[ident(m)]), (
            f"{what}: replayed message differs from the live one:\n"
            f"  replayed {m!r}\n  live     {by_id[ident(m)]!r}"
        )


def assert_snapshot_shape(snap: dict[str, Any], *, with_pos: bool) -> None:
    assert snap.get("type") == "snapshot", f"expected a snapshot, got {snap!r:.500}"
    parse_iso_utc(snap["timestamp"])
    assert isinstance(snap["marketPrices"], list), snap
    assert all(m.get("type") == "market_price" for m in snap["marketPrices"]), snap
    assert snap["pnl"] is None or snap["pnl"].get("type") == "pnl_update", snap
    assert isinstance(snap["rules"], list), snap
    assert all(m.get("type") == "rule_status" for m in snap["rules"]), snap
    assert (
        snap["assessment"] is None
        or snap["assessment"].get("type") == "assessment_update"
    ), snap
    assert isinstance(snap["positions"], list), snap
    assert all(m.get("type") == "position_update" for m in snap["positions"]), snap
    if with_pos:
        assert isinstance(snap.get("pos"), str) and snap["pos"], snap
        assert list(snap)[-1] == "pos", f"pos is not the last field: {list(snap)}"
    else:
        assert "pos" not in snap, snap


def assert_connected(hello: dict[str, Any], *, resumed: bool) -> None:
    assert hello.get("resumed") is resumed, f"expected resumed={resumed}: {hello!r}"
    assert isinstance(hello.get("pos"), str) and hello["pos"], (
        f"connected without a pos: {hello!r}"
    )


async def expect_fresh_start(c: PushClient) -> dict[str, Any]:
    """A connection without ``since``: resumed false, then the snapshot."""
    assert_connected(c.hello, resumed=False)
    snap = await next_message(c)
    assert_snapshot_shape(snap, with_pos=True)
    return snap


async def resumes(server: Server) -> dict[str, float]:
    m = await ascrape(server)
    return {s: m.value(RESUMES, source=s) for s in ("memory", "kafka", "refused")}


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def produce_in_sequence(broker: Broker, records: list[Record]) -> None:
    """Each record acknowledged before the next, in distinct milliseconds."""
    producer = KafkaProducer(broker.bootstrap)
    for topic, value, key in records:
        time.sleep(0.002)
        producer.send(topic, value, key=key)
        producer.flush()


async def produce_async(broker: Broker, records: list[Record]) -> None:
    await asyncio.to_thread(produce_many, broker.bootstrap, records)


async def disconnect_then_resume(
    server: Server,
    broker: Broker,
    *,
    seen: int,
    missed: int,
    resume_on: Server | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], PushClient, PushClient, str]:
    """Common flow of the gap tests (the caller closes the returned clients).

    A client of a fresh assessment receives ``seen`` events, disconnects; ``missed``
    events are produced and an observer on ``server`` receives them; the client
    resumes with the pos of the last message it received (or of ``connected`` when
    ``seen`` is 0) on ``resume_on`` (default ``server``).

    Returns (replayed messages, observer copies, resumed client, observer, tag).
    """
    assessment, tag = uid(), uid("tag")
    observer = await connect(server, assessment)
    try:
        await expect_fresh_start(observer)
        c1 = await connect(server, assessment)
        try:
            last_pos = c1.hello.get("pos")
            if seen:
                await produce_async(
                    broker, gap_records(assessment, tag, 0, seen, GAP_TOPICS)
                )
                got = await c1.collect(tagged(tag), seen)
                live = await observer.collect(tagged(tag), seen)
                for a, b in zip(got, live, strict=True):
                    assert_has_pos(a)
                    assert a == b, (
                        f"same event, same replica, different message:\n{a}\n{b}"
                    )
                last_pos = got[-1]["pos"]
        finally:
            await c1.close()
        assert isinstance(last_pos, str), c1.hello
        await produce_async(
            broker, gap_records(assessment, tag, seen, missed, GAP_TOPICS)
        )
        expected = await observer.collect(tagged(tag), missed)
        c2 = await connect(resume_on or server, assessment, since=last_pos)
        try:
            assert_connected(c2.hello, resumed=True)
            replay = await next_messages(c2, missed)
        except BaseException:
            await c2.close()
            raise
    except BaseException:
        await observer.close()
        raise
    return replay, expected, c2, observer, tag


async def assert_live_exactly_once(
    broker: Broker, c: PushClient, assessment: str, tag: str, seq: int
) -> dict[str, Any]:
    """Produce one live event; it is the next message, and nothing follows."""
    await produce_async(broker, gap_records(assessment, tag, seq, 1, ("trading.pnl",)))
    live = await next_message(c)
    assert ident(live) == ("pnl_update", seq) and live.get("tag") == tag, (
        f"expected the live event seq={seq} next, got {live!r}"
    )
    assert_has_pos(live)
    extra = await c.collect_for(0.5)
    assert extra == [], f"unexpected messages after the live event: {extra!r}"
    return live


# --------------------------------------------------------------------------- tests


async def test_resume_metrics_are_exported(server: Server) -> None:
    m = await ascrape(server)
    missing = [name for name in RESUME_METRICS if not m.mentions(name)]
    assert not missing, f"metrics not exported: {missing}\n{m.text}"


async def test_resume_after_reconnect_gets_exactly_the_missed_events(
    server: Server, broker: Broker
) -> None:
    """Events seen, disconnect, 9 events on 3 topics, resume with the last pos:
    resumed true, exactly the 9 once in order, no snapshot, then a live event once;
    served from memory. Resuming again from the live event's pos replays nothing."""
    before = await resumes(server)
    replay, expected, c2, observer, tag = await disconnect_then_resume(
        server, broker, seen=3, missed=9
    )
    try:
        assert_exact_replay(replay, expected, "resume from memory")
        assessment = c2.hello["assessmentId"]
        live = await assert_live_exactly_once(broker, c2, assessment, tag, 100)
        observed_live = await observer.recv_until(tagged(tag))
        assert live == observed_live, (live, observed_live)
    finally:
        await c2.close()
        await observer.close()
    assert diff(await resumes(server), before) == {
        "memory": 1,
        "kafka": 0,
        "refused": 0,
    }
    # The pos of the newest message is a complete position: nothing is missed.
    async with session(server, assessment, since=live["pos"]) as c3:
        assert_connected(c3.hello, resumed=True)
        assert await c3.collect_for(0.5) == []


async def test_resume_on_a_replica_started_after_the_disconnect(
    server: Server, broker: Broker
) -> None:
    """The pos from server 1 resumes on a server 2 started after the disconnect
    (warmed up from Kafka): exactly the missed events, then live, once; the live
    event has the same pos on both replicas."""
    assessment, tag = uid(), uid("tag")
    async with session(server, assessment) as observer:
        await expect_fresh_start(observer)
        c1 = await connect(server, assessment)
        try:
            await produce_async(broker, gap_records(assessment, tag, 0, 3, GAP_TOPICS))
            seen = await c1.collect(tagged(tag), 3)
        finally:
            await c1.close()
        await observer.collect(tagged(tag), 3)
        await produce_async(broker, gap_records(assessment, tag, 3, 9, GAP_TOPICS))
        expected = await observer.collect(tagged(tag), 9)
        with run_server(broker) as server2:
            async with session(server2, assessment, since=seen[-1]["pos"]) as c2:
                assert_connected(c2.hello, resumed=True)
                replay = await next_messages(c2, 9)
                assert_exact_replay(replay, expected, "resume on a new replica")
                live = await assert_live_exactly_once(broker, c2, assessment, tag, 100)
        observed_live = await observer.recv_until(tagged(tag))
    assert without_pos(live) == without_pos(observed_live)
    assert live["pos"] == observed_live["pos"], (
        "the same event has different positions on two replicas that consumed the "
        f"same records: new replica {live['pos']!r}, old {observed_live['pos']!r}"
    )


async def test_resume_with_the_pos_of_connected(server: Server, broker: Broker) -> None:
    """A client that leaves right after `connected` resumes with that pos and gets
    everything produced meanwhile, then nothing else."""
    replay, expected, c2, observer, tag = await disconnect_then_resume(
        server, broker, seen=0, missed=6
    )
    try:
        assert_exact_replay(replay, expected, "resume from connected's pos")
        extra = await c2.collect_for(0.5)
        assert extra == [], f"unexpected messages after the replay: {extra!r}"
    finally:
        await c2.close()
        await observer.close()


async def test_gap_older_than_the_buffer_is_read_from_kafka(
    small_buffer_server: Server, broker: Broker
) -> None:
    """RESUME_BUFFER_SIZE=4, 10 events missed: all 10 once and in order (from
    Kafka, counted as source="kafka"), then live once."""
    server = small_buffer_server
    before = await resumes(server)
    evictions_before = (await ascrape(server)).value(
        "websocket_resume_buffer_evictions_total"
    )
    replay, expected, c2, observer, tag = await disconnect_then_resume(
        server, broker, seen=1, missed=10
    )
    try:
        assert_exact_replay(replay, expected, "resume from Kafka")
        assessment = c2.hello["assessmentId"]
        await assert_live_exactly_once(broker, c2, assessment, tag, 100)
    finally:
        await c2.close()
        await observer.close()
    m = await ascrape(server)
    assert diff(await resumes(server), before) == {
        "memory": 0,
        "kafka": 1,
        "refused": 0,
    }
    assert m.value("websocket_resume_buffer_evictions_total") > evictions_before


@pytest.mark.parametrize("kind", ["memory", "kafka"])
async def test_resume_while_events_keep_flowing(
    server: Server, small_buffer_server: Server, broker: Broker, kind: str
) -> None:
    """Events keep being produced (every ~10 ms) while the client reconnects: the
    replay and the live stream together hold every event exactly once, per-topic in
    order: no gap and no overlap at the seam."""
    srv = server if kind == "memory" else small_buffer_server
    assessment, tag = uid(), uid("tag")
    total = 60
    records = gap_records(assessment, tag, 1, total, GAP_TOPICS)
    async with session(srv, assessment) as observer:
        await expect_fresh_start(observer)
        c1 = await connect(srv, assessment)
        try:
            await produce_async(broker, gap_records(assessment, tag, 0, 1, GAP_TOPICS))
            first = await c1.recv_until(tagged(tag))
        finally:
            await c1.close()
        await observer.recv_until(tagged(tag))

        stop = threading.Event()

        def feed() -> None:
            p = KafkaProducer(broker.bootstrap)
            for topic, value, key in records:
                if stop.is_set():
                    break
                p.send(topic, value, key=key)
                p.flush()
                time.sleep(0.01)
            p.flush()

        before = await resumes(srv)
        feeder = asyncio.ensure_future(asyncio.to_thread(feed))
        try:
            # Let enough records pass that the gap exceeds the small buffer.
            await observer.collect(tagged(tag), 8)
            async with session(srv, assessment, since=first["pos"]) as c2:
                assert_connected(c2.hello, resumed=True)
                got = await c2.collect(
                    lambda m: not is_ping(m), total, timeout=TIMEOUT + 5
                )
                extra = await c2.collect_for(0.5)
        finally:
            stop.set()
            await asyncio.wait_for(feeder, TIMEOUT)
        # The observer has had seq 0 and 8 more; it gets the rest too.
        await observer.collect(tagged(tag), total - 8)
    counted = diff(await resumes(srv), before)
    assert extra == [], f"messages beyond the {total} produced: {extra!r}"
    bad = [m for m in got if m.get("tag") != tag]
    assert not bad, f"unexpected messages on the resumed connection: {bad!r}"
    observed = [m for m in observer.received if m.get("tag") == tag][1:]
    assert len(observed) == total, len(observed)
    assert_exact_replay(got, observed, f"resume ({kind}) while events flow")
    # 8+ events were missed: more than the small buffer's 4, within the default's.
    want = {"memory": 0, "kafka": 0, "refused": 0}
    want[kind] = 1
    assert counted == want, counted


@pytest.mark.parametrize("since", ["garbage", "not-a-pos!", "AAAA"])
async def test_garbage_pos_gives_resync_and_snapshot(
    server: Server, since: str
) -> None:
    """A malformed pos: resumed false, resync_required with a reason, the
    snapshot; counted as source="refused"."""
    before = await resumes(server)
    async with session(server, uid(), since=since) as c:
        assert_connected(c.hello, resumed=False)
        resync, snap = await next_messages(c, 2)
    assert resync.get("type") == "resync_required", resync
    assert isinstance(resync.get("reason"), str) and resync["reason"], resync
    assert_snapshot_shape(snap, with_pos=True)
    assert diff(await resumes(server), before) == {
        "memory": 0,
        "kafka": 0,
        "refused": 1,
    }


async def test_pos_older_than_max_age_gives_resync_and_snapshot(
    server: Server, broker: Broker
) -> None:
    """RESUME_MAX_AGE=1000: a pos 2.5 s old is refused: resumed false,
    resync_required, then the snapshot (which holds the event produced)."""
    assessment, tag = uid(), uid("tag")
    with run_server(broker, RESUME_MAX_AGE=1000) as short:
        async with session(short, assessment) as c1:
            await expect_fresh_start(c1)
            await produce_async(
                broker, gap_records(assessment, tag, 0, 1, ("trading.pnl",))
            )
            event = await c1.recv_until(tagged(tag))
        await asyncio.sleep(2.5)
        before = await resumes(short)
        async with session(short, assessment, since=event["pos"]) as c2:
            assert_connected(c2.hello, resumed=False)
            resync, snap = await next_messages(c2, 2)
            extra = await c2.collect_for(0.3)
        after = await resumes(short)
    assert resync.get("type") == "resync_required", resync
    assert isinstance(resync.get("reason"), str) and resync["reason"], resync
    assert_snapshot_shape(snap, with_pos=True)
    assert snap["pnl"] is not None and without_pos(snap["pnl"]) == without_pos(event)
    assert extra == [], f"the event was replayed after the refusal: {extra!r}"
    assert diff(after, before) == {"memory": 0, "kafka": 0, "refused": 1}


def state_records(assessment: str, tag: str, markets: tuple[str, str]) -> list[Record]:
    m1, m2 = markets
    a = assessment
    return [
        ("market-data.prices", {"market": m1, "price": 1.0, "tag": tag}, m1),
        ("market-data.prices", {"market": m2, "price": 10.0, "tag": tag}, m2),
        ("market-data.prices", {"market": m1, "price": 2.0, "tag": tag}, m1),
        ("market-data.prices", {"market": m2, "price": 20.0, "tag": tag}, m2),
        ("market-data.prices", {"market": m1, "price": 3.0, "tag": tag}, m1),
        ("trading.pnl", {"assessmentId": a, "unrealizedPnl": 1, "tag": tag}, a),
        ("trading.pnl", {"assessmentId": a, "unrealizedPnl": 2, "tag": tag}, a),
        (
            "risk.rule-status",
            {"assessmentId": a, "rule": "max_loss", "status": "ok", "tag": tag},
            a,
        ),
        (
            "risk.rule-status",
            {"assessmentId": a, "rule": "daily_loss", "status": "ok", "tag": tag},
            a,
        ),
        (
            "risk.rule-status",
            {"assessmentId": a, "rule": "max_loss", "status": "warning", "tag": tag},
            a,
        ),
        ("assessment.status", {"assessmentId": a, "status": "active", "tag": tag}, a),
        (
            "trading.positions",
            {"assessmentId": a, "positionId": "p1", "quantity": 2, "tag": tag},
            a,
        ),
        (
            "trading.positions",
            {"assessmentId": a, "positionId": "p2", "quantity": 5, "tag": tag},
            a,
        ),
        (
            "trading.positions",
            {"assessmentId": a, "positionId": "p1", "quantity": 0, "tag": tag},
            a,
        ),
    ]


async def produce_state(
    server: Server, broker: Broker, assessment: str, markets: tuple[str, str]
) -> list[dict[str, Any]]:
    """Produce the state records and return them as an observer received them."""
    tag = uid("tag")
    records = state_records(assessment, tag, markets)
    async with session(server, assessment) as observer:
        await expect_fresh_start(observer)
        await produce_async(broker, records)
        return await observer.collect(tagged(tag), len(records))


def latest(msgs: list[dict[str, Any]], ty: str, key: str | None) -> Any:
    out: dict[Any, dict[str, Any]] = {}
    for m in msgs:
        if m["type"] == ty:
            out[m.get(key) if key else None] = m
    return out


async def test_snapshot_holds_the_latest_state(server: Server, broker: Broker) -> None:
    """A new client gets, right after `connected`, one snapshot with the latest
    price per market, the latest pnl, the latest status per rule, the assessment's
    status and the open positions (p1 closed at quantity 0 is absent); a client
    without assessmentId gets the prices only; the snapshot's pos resumes with
    nothing missed."""
    assessment = uid()
    markets = (uid("M1"), uid("M2"))
    observed = await produce_state(server, broker, assessment, markets)
    async with session(server, assessment) as c:
        snap = await expect_fresh_start(c)
    prices = {m["market"]: m for m in snap["marketPrices"] if m["market"] in markets}
    assert prices == latest(observed, "market_price", "market"), snap["marketPrices"]
    assert prices[markets[0]]["price"] == 3.0 and prices[markets[1]]["price"] == 20.0
    want_pnl = latest(observed, "pnl_update", None)[None]
    assert snap["pnl"] is not None and snap["pnl"]["unrealizedPnl"] == 2, snap["pnl"]
    assert without_pos(snap["pnl"]) == without_pos(want_pnl)
    rules = {m["rule"]: without_pos(m) for m in snap["rules"]}
    want_rules = latest(observed, "rule_status", "rule")
    assert rules == {k: without_pos(v) for k, v in want_rules.items()}, snap["rules"]
    assert rules["max_loss"]["status"] == "warning"
    want_asm = latest(observed, "assessment_update", None)[None]
    assert snap["assessment"] is not None
    assert without_pos(snap["assessment"]) == without_pos(want_asm)
    positions = {m["positionId"]: without_pos(m) for m in snap["positions"]}
    want_p2 = without_pos(latest(observed, "position_update", "positionId")["p2"])
    assert positions == {"p2": want_p2}, snap["positions"]
    assert all(m["assessmentId"] == assessment for m in snap["rules"])

    async with session(server, None) as anon:
        plain = await next_message(anon)
    assert_snapshot_shape(plain, with_pos=False)
    assert plain["pnl"] is None and plain["assessment"] is None, plain
    assert plain["rules"] == [] and plain["positions"] == [], plain
    anon_prices = {
        m["market"]: m for m in plain["marketPrices"] if m["market"] in markets
    }
    assert anon_prices == prices

    async with session(server, assessment, since=snap["pos"]) as c2:
        assert_connected(c2.hello, resumed=True)
        assert await c2.collect_for(0.5) == []


def canonical_snapshot(snap: dict[str, Any]) -> dict[str, Any]:
    """The snapshot without its own timestamp, with its lists in a fixed order
    (the contract gives them no order), and its pos as the Kafka position it
    stands for (partition key -> offset) plus the token's age."""
    out = {k: v for k, v in snap.items() if k != "timestamp"}
    if "pos" in snap:
        issued, vector = decode_pos(snap["pos"])
        assert abs(time.time() - issued) < 5, "a snapshot's pos is issued now"
        out["pos"] = vector
    out["marketPrices"] = sorted(snap["marketPrices"], key=lambda m: str(m["market"]))
    out["rules"] = sorted(snap["rules"], key=lambda m: str(m["rule"]))
    out["positions"] = sorted(snap["positions"], key=lambda m: str(m["positionId"]))
    return out


@pytest.mark.xfail(
    strict=False,
    reason="known gap (issue 5 blocked): Kafka orders records within a partition "
    "only; two consumers can receive an assessment's records from different "
    "partitions in a different order even milliseconds apart (about 1 run in 3 "
    "here), and a position must describe what its client received, so the "
    "vectors differ. Resume stays exact across replicas either way.",
)
async def test_two_live_replicas_give_each_event_the_same_pos(
    server: Server, broker: Broker
) -> None:
    """The same events, consumed live by two server processes, carry the same
    pos on both: positions come from Kafka, not from the replica. The events
    are written in sequence a few milliseconds apart, as one producer of an
    assessment's events would; records on different partitions that share a
    millisecond have no order in Kafka (see the README's "Positions")."""
    assessment, tag = uid(), uid("tag")
    with run_server(broker) as server2:
        async with (
            session(server, assessment) as c1,
            session(server2, assessment) as c2,
        ):
            await expect_fresh_start(c1)
            await expect_fresh_start(c2)
            await asyncio.to_thread(
                produce_in_sequence,
                broker,
                gap_records(assessment, tag, 0, 12, GAP_TOPICS),
            )
            got1 = await c1.collect(tagged(tag), 12)
            got2 = await c2.collect(tagged(tag), 12)
    assert sorted(m["seq"] for m in got1) == list(range(12))
    assert [(m["seq"], m["pos"]) for m in got1] == [(m["seq"], m["pos"]) for m in got2]


async def test_fresh_replica_serves_the_same_snapshot(
    server: Server, broker: Broker
) -> None:
    """State produced while server 1 runs; server 2 started afterwards warms up
    from Kafka; a client on each gets the same snapshot (timestamp aside), and
    the same position in it (the time inside the token is when it was issued)."""
    assessment = uid()
    markets = (uid("M1"), uid("M2"))
    await produce_state(server, broker, assessment, markets)
    with run_server(broker) as server2:
        async with (
            session(server, assessment) as c1,
            session(server2, assessment) as c2,
        ):
            snap1 = canonical_snapshot(await expect_fresh_start(c1))
            snap2 = canonical_snapshot(await expect_fresh_start(c2))
    assert snap1["positions"] and snap1["rules"] and snap1["pnl"], snap1
    # First the content (every pos stripped), field by field, then the positions.
    content1, content2 = strip_positions(snap1), strip_positions(snap2)
    for key in content1:
        assert content1[key] == content2.get(key), (
            f"snapshot field {key!r} differs:\n  old replica {content1[key]!r}\n"
            f"  new replica {content2.get(key)!r}"
        )
    assert content1 == content2
    differing = {
        path: (a, b)
        for path, a in positions_of(snap1).items()
        if (b := positions_of(snap2).get(path)) != a
    }
    assert not differing, (
        "the snapshots hold the same messages, but these pos differ "
        f"(path: (old replica, new replica)): {differing}"
    )
    assert snap1 == snap2


def strip_positions(snap: dict[str, Any]) -> dict[str, Any]:
    """The snapshot without its pos and without the pos of the messages in it."""

    def strip(v: Any) -> Any:
        if isinstance(v, list):
            return [strip(x) for x in v]
        if isinstance(v, dict):
            return without_pos(v)
        return v

    return {k: strip(v) for k, v in snap.items() if k != "pos"}


def positions_of(snap: dict[str, Any]) -> dict[str, Any]:
    """Every pos in a snapshot by its path, e.g. "rules[max_loss]"."""
    out: dict[str, Any] = {"pos": snap.get("pos")}
    for key, name in (("marketPrices", "market"), ("rules", "rule")):
        for m in snap[key]:
            out[f"{key}[{m[name]}]"] = m.get("pos")
    for m in snap["positions"]:
        out[f"positions[{m['positionId']}]"] = m.get("pos")
    for key in ("pnl", "assessment"):
        if snap[key] is not None:
            out[key] = snap[key].get("pos")
    return out
