// client.js under node's test runner with a scripted WebSocket: URLs, pongs,
// backoff, resume position, close-code policy, token renewal, idle detection.
// Run by tests/browser/test_client_js.py (or `node --test tests/browser/`).

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  PushClient, backoffDelay, isTerminalCloseCode,
} from "../../pushsvc/static/client.js";

class FakeSocket {
  static all = [];
  constructor(url, protocols) {
    this.url = new URL(url);
    this.protocols = protocols;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code, reason) { this.closedWith = { code, reason }; this.readyState = 3; }
  // server side
  accept() { this.readyState = 1; this.onopen?.({}); }
  push(msg) { this.onmessage?.({ data: JSON.stringify(msg) }); }
  drop(code, reason = "") { this.readyState = 3; this.onclose?.({ code, reason }); }
  static last() { return FakeSocket.all[FakeSocket.all.length - 1]; }
  static reset() { FakeSocket.all = []; }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(check, what, timeoutMs = 2000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (check()) return;
    await sleep(5);
  }
  throw new Error(`timed out waiting for ${what}`);
}

function makeClient(options = {}) {
  FakeSocket.reset();
  return new PushClient({
    url: "ws://127.0.0.1:1/ws",
    token: "t0",
    assessmentId: "a-1",
    WebSocket: FakeSocket,
    backoff: { initialMs: 20, maxMs: 40 },
    ...options,
  });
}

test("connects with token and assessmentId, answers pings, dispatches by type", async () => {
  const client = makeClient();
  const statuses = [];
  const prices = [];
  const all = [];
  client.on("status", (s) => statuses.push(s.status));
  client.on("market_price", (m) => prices.push(m));
  client.on("message", (m) => all.push(m.type));
  client.connect();
  await until(() => FakeSocket.all.length === 1, "a socket");
  const ws = FakeSocket.last();
  assert.equal(ws.url.searchParams.get("token"), "t0");
  assert.equal(ws.url.searchParams.get("assessmentId"), "a-1");
  assert.equal(ws.url.searchParams.has("since"), false);
  ws.accept();
  ws.push({ type: "connected", connectionId: "c-1", userId: "u" });
  ws.push({ type: "ping", timestamp: 1234 });
  ws.push({ type: "market_price", market: "BTC-USD", price: 1 });
  assert.deepEqual(ws.sent, [{ type: "pong", timestamp: 1234 }]);
  assert.deepEqual(prices.map((m) => m.market), ["BTC-USD"]);
  assert.deepEqual(all, ["connected", "ping", "market_price"]);
  assert.deepEqual(statuses, ["connecting", "open"]);
  assert.equal(client.connectionId, "c-1");
  client.close();
  assert.equal(client.status, "closed");
});

test("reconnects with backoff and resumes from the last pos", async () => {
  const client = makeClient();
  const statuses = [];
  client.on("status", (s) => statuses.push(s));
  client.connect();
  await until(() => FakeSocket.all.length === 1, "a socket");
  FakeSocket.last().accept();
  FakeSocket.last().push({ type: "pnl_update", pos: 17 });
  FakeSocket.last().push({ type: "pnl_update" });
  FakeSocket.last().drop(1001, "server shutting down");
  const reconnecting = statuses.find((s) => s.status === "reconnecting");
  assert.ok(reconnecting && reconnecting.code === 1001);
  assert.ok(reconnecting.delayMs >= 10 && reconnecting.delayMs <= 20, reconnecting.delayMs);
  await until(() => FakeSocket.all.length === 2, "a reconnect");
  assert.equal(FakeSocket.last().url.searchParams.get("since"), "17");
  // A socket that never opens (a refused handshake) is retried too.
  FakeSocket.last().drop(1006);
  await until(() => FakeSocket.all.length === 3, "a second reconnect");
  client.close();
});

for (const code of [1008, 1009, 4401, 4403]) {
  test(`does not reconnect after close code ${code}`, async () => {
    const client = makeClient();
    let last;
    client.on("status", (s) => { last = s; });
    client.connect();
    await until(() => FakeSocket.all.length === 1, "a socket");
    FakeSocket.last().accept();
    FakeSocket.last().drop(code, "policy");
    await sleep(120);
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(client.status, "closed");
    assert.equal(last.terminal, true);
    assert.equal(last.code, code);
  });
}

test("4001 asks getToken for a new token before reconnecting", async () => {
  let calls = 0;
  const client = makeClient({ getToken: async () => `t${++calls}` });
  client.connect();
  await until(() => FakeSocket.all.length === 1, "a socket");
  FakeSocket.last().accept();
  FakeSocket.last().push({ type: "connected", connectionId: "c" });
  FakeSocket.last().drop(4001, "token expired");
  await until(() => FakeSocket.all.length === 2, "a reconnect");
  assert.equal(calls, 1);
  assert.equal(FakeSocket.last().url.searchParams.get("token"), "t1");
  client.close();
});

test("4001 without getToken ends the session", async () => {
  const client = makeClient();
  client.connect();
  await until(() => FakeSocket.all.length === 1, "a socket");
  FakeSocket.last().accept();
  FakeSocket.last().drop(4001, "token expired");
  await sleep(80);
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(client.status, "closed");
});

test("the token may travel in Sec-WebSocket-Protocol instead of the URL", async () => {
  const client = makeClient({ tokenIn: "protocol" });
  client.connect();
  await until(() => FakeSocket.all.length === 1, "a socket");
  assert.deepEqual(FakeSocket.last().protocols, ["bearer", "t0"]);
  assert.equal(FakeSocket.last().url.searchParams.has("token"), false);
  client.close();
});

test("a silent connection is replaced after idleTimeoutMs", async () => {
  const client = makeClient({ idleTimeoutMs: 60 });
  client.connect();
  await until(() => FakeSocket.all.length === 1, "a socket");
  const first = FakeSocket.last();
  first.accept();
  await until(() => FakeSocket.all.length === 2, "a replacement", 1000);
  assert.ok(first.closedWith, "the silent socket is closed");
  client.close();
});

test("close() stops reconnecting", async () => {
  const client = makeClient();
  client.connect();
  await until(() => FakeSocket.all.length === 1, "a socket");
  FakeSocket.last().accept();
  FakeSocket.last().drop(1006);
  client.close();
  await sleep(100);
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(client.status, "closed");
});

test("backoffDelay doubles up to its cap, jittered in the upper half", () => {
  const opts = { initialMs: 500, maxMs: 8000, factor: 2 };
  for (const [attempt, cap] of [[0, 500], [1, 1000], [3, 4000], [4, 8000], [40, 8000]]) {
    assert.equal(backoffDelay(attempt, opts, () => 0), cap / 2);
    assert.equal(backoffDelay(attempt, opts, () => 1), cap);
  }
});

test("terminal close codes", () => {
  for (const code of [1008, 1009, 4400, 4401, 4403, 4499]) assert.ok(isTerminalCloseCode(code), code);
  for (const code of [1000, 1001, 1006, 1011, 1013, 4000, 4001]) assert.ok(!isTerminalCloseCode(code), code);
});
