// pushsvc browser client: a dependency-free ES module.
//
//   import { PushClient } from "/client.js";
//   const client = new PushClient({ token, assessmentId });
//   client.on("market_price", (m) => console.log(m.market, m.price));
//   client.on("status", (s) => console.log(s.status));
//   client.connect();
//
// It answers the server's JSON pings, reconnects with exponential backoff and
// jitter, resumes from the last `pos` it saw (`since=<pos>`), and dispatches
// every message by its `type`. See the README, "Browser client".

/** Message types the server sends. */
export const MESSAGE_TYPES = Object.freeze([
  "connected", "ping", "pong",
  "market_price", "pnl_update", "position_update",
  "rule_status", "violation", "assessment_update",
  "refreshed", "refresh_failed",
]);

/** Values of the `status` event. */
export const STATUS = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

/** Close code for an expired token: get a new one, then reconnect. */
export const CLOSE_TOKEN_EXPIRED = 4001;

/**
 * Close codes after which reconnecting cannot help: the client (or its
 * token) has to change first. 1008 policy violation, 1009 frame too big,
 * 1002/1003/1007 protocol errors, and 4400-4499 (HTTP-like refusals such as
 * 4401 unauthorized and 4403 forbidden).
 */
export function isTerminalCloseCode(code) {
  return code === 1002 || code === 1003 || code === 1007 || code === 1008 ||
    code === 1009 || (code >= 4400 && code <= 4499);
}

/**
 * The delay before reconnect attempt `attempt` (0 for the first): the cap
 * doubles from `initialMs` up to `maxMs`; the delay is drawn from the upper
 * half of it, so a crowd of clients spreads out but none retries at once.
 */
export function backoffDelay(attempt, { initialMs = 500, maxMs = 30000, factor = 2 } = {},
                             random = Math.random) {
  const cap = Math.min(maxMs, initialMs * Math.pow(factor, Math.min(attempt, 30)));
  return Math.round(cap / 2 + random() * (cap / 2));
}

function defaultUrl() {
  if (typeof location === "undefined") {
    throw new Error("pushsvc: no url given and no page location to derive it from");
  }
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
}

function tokenExpiry(token) {
  // The `exp` claim (epoch seconds) of a JWT, or null. Read only to schedule
  // a refresh; the server alone verifies tokens.
  try {
    const part = token.split(".")[1];
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/"));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

export class PushClient {
  /**
   * @param {object} options
   * @param {string} options.token - the JWT for the connection.
   * @param {string} [options.assessmentId] - the assessment to follow; without
   *   it only market prices arrive.
   * @param {string} [options.url] - the WebSocket endpoint (default: `/ws` on
   *   the page's own host, ws: or wss: to match the page).
   * @param {() => (string|Promise<string>)} [options.getToken] - returns a
   *   fresh token. Called after a 4001 close (token expired), after a
   *   connection attempt that failed before opening (the token may be the
   *   reason), and shortly before the token's `exp` to refresh it in place.
   * @param {"query"|"protocol"} [options.tokenIn="query"] - send the token in
   *   the query string, or as `Sec-WebSocket-Protocol: bearer, <token>`.
   * @param {object} [options.backoff] - `initialMs` (500), `maxMs` (30000),
   *   `factor` (2), all milliseconds.
   * @param {number} [options.idleTimeoutMs=75000] - milliseconds without any
   *   message (pings included) after which the connection is taken as dead and
   *   replaced; keep it above the server's HEARTBEAT_INTERVAL. 0 disables it.
   * @param {number} [options.refreshBeforeMs=60000] - how long before the
   *   token's `exp` to refresh it in place (needs `getToken`).
   * @param {number|string} [options.since] - a resume position to start from.
   * @param {typeof WebSocket} [options.WebSocket] - a WebSocket implementation
   *   (default: the global one).
   */
  constructor(options = {}) {
    if (!options.token && !options.getToken) {
      throw new Error("pushsvc: a token (or getToken) is required");
    }
    this.url = options.url || defaultUrl();
    this.token = options.token || null;
    this.assessmentId = options.assessmentId || null;
    this.getToken = options.getToken || null;
    this.tokenIn = options.tokenIn || "query";
    this.backoff = { initialMs: 500, maxMs: 30000, factor: 2, ...(options.backoff || {}) };
    this.idleTimeoutMs = options.idleTimeoutMs ?? 75000;
    this.refreshBeforeMs = options.refreshBeforeMs ?? 60000;
    this.lastPos = options.since ?? null;
    this.status = STATUS.CLOSED;
    this.connectionId = null;
    this.attempt = 0;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._handlers = new Map();
    this._ws = null;
    this._stopped = true;
    this._opened = false;
    this._reconnectTimer = null;
    this._idleTimer = null;
    this._refreshTimer = null;
    this._lastReceivedAt = 0;
    this._needToken = !this.token;
  }

  /**
   * Subscribe to a message type (`market_price`, ...), to `message` (every
   * message), `status` ({status, code, reason, delayMs, attempt}) or `error`.
   * Returns a function that unsubscribes.
   */
  on(type, handler) {
    let set = this._handlers.get(type);
    if (!set) {
      set = new Set();
      this._handlers.set(type, set);
    }
    set.add(handler);
    return () => this.off(type, handler);
  }

  off(type, handler) {
    const set = this._handlers.get(type);
    if (set) set.delete(handler);
  }

  /** Open the connection (and keep it open until `close()`). */
  connect() {
    if (!this._stopped) return this;
    this._stopped = false;
    this.attempt = 0;
    this._open(STATUS.CONNECTING);
    if (typeof addEventListener === "function") {
      this._onOnline = () => {
        if (this.status === STATUS.RECONNECTING && this._reconnectTimer) {
          clearTimeout(this._reconnectTimer);
          this._reconnectTimer = null;
          this._open(STATUS.RECONNECTING);
        }
      };
      addEventListener("online", this._onOnline);
    }
    return this;
  }

  /** Close for good: no reconnect. */
  close(code = 1000, reason = "client closed") {
    this._stopped = true;
    this._clearTimers();
    if (this._onOnline && typeof removeEventListener === "function") {
      removeEventListener("online", this._onOnline);
      this._onOnline = null;
    }
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try { ws.close(code, reason); } catch { /* already closing */ }
    }
    this._setStatus(STATUS.CLOSED, { code, reason });
  }

  /** Send a JSON message; false if the connection is not open. */
  send(message) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  /**
   * Replace the connection's token without reconnecting (`refresh`
   * message); the server answers `refreshed` or `refresh_failed`. Without an
   * argument the token comes from `getToken`.
   */
  async refreshToken(token) {
    const fresh = token || (this.getToken ? await this.getToken() : null);
    if (!fresh) return false;
    this.token = fresh;
    this._scheduleRefresh();
    return this.send({ type: "refresh", token: fresh });
  }

  // -- internals -------------------------------------------------------------

  _emit(type, data) {
    const set = this._handlers.get(type);
    if (!set) return;
    for (const handler of [...set]) {
      try {
        handler(data);
      } catch (err) {
        // A failing handler must not stop the others or the connection;
        // the error still reaches the console as uncaught.
        queueMicrotask(() => { throw err; });
      }
    }
  }

  _setStatus(status, detail = {}) {
    const changed = status !== this.status;
    this.status = status;
    if (changed || detail.code !== undefined) {
      this._emit("status", { status, attempt: this.attempt, ...detail });
    }
  }

  _buildUrl() {
    const url = new URL(this.url, typeof location !== "undefined" ? location.href : undefined);
    if (this.tokenIn !== "protocol") url.searchParams.set("token", this.token);
    else url.searchParams.delete("token");
    if (this.assessmentId) url.searchParams.set("assessmentId", this.assessmentId);
    if (this.lastPos !== null && this.lastPos !== undefined) {
      url.searchParams.set("since", String(this.lastPos));
    }
    return url.toString();
  }

  async _open(status) {
    this._setStatus(status);
    if (this._needToken && this.getToken) {
      try {
        this.token = await this.getToken();
        this._needToken = false;
      } catch (err) {
        this._emit("error", { error: err, where: "getToken" });
        this._scheduleReconnect({ code: 0, reason: "getToken failed" });
        return;
      }
      if (this._stopped) return;
    }
    let ws;
    try {
      const protocols = this.tokenIn === "protocol" ? ["bearer", this.token] : undefined;
      ws = new this._WebSocket(this._buildUrl(), protocols);
    } catch (err) {
      this._emit("error", { error: err, where: "connect" });
      this._scheduleReconnect({ code: 0, reason: String(err) });
      return;
    }
    this._ws = ws;
    this._opened = false;
    ws.onopen = () => {
      this._opened = true;
      this._lastReceivedAt = Date.now();
      this._startIdleWatch();
      this._setStatus(STATUS.OPEN);
    };
    ws.onmessage = (event) => this._onMessage(event);
    ws.onclose = (event) => this._onClose(ws, event.code, event.reason);
    // An error is always followed by a close event, which does the work.
    ws.onerror = () => {};
  }

  _onMessage(event) {
    this._lastReceivedAt = Date.now();
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object") return;
    if (msg.pos !== undefined && msg.pos !== null) this.lastPos = msg.pos;
    switch (msg.type) {
      case "ping":
        this.send({ type: "pong", timestamp: msg.timestamp ?? Date.now() });
        break;
      case "connected":
        // The connection is good: the next failure starts the backoff anew.
        this.connectionId = msg.connectionId ?? null;
        this.attempt = 0;
        this._scheduleRefresh();
        break;
      default:
        break;
    }
    this._emit("message", msg);
    if (typeof msg.type === "string") this._emit(msg.type, msg);
    if (msg.type === "snapshot") {
      // The state on connect, as the typed events a page already handles.
      const items = [
        ...(msg.marketPrices ?? []),
        msg.pnl,
        ...(msg.rules ?? []),
        msg.assessment,
        ...(msg.positions ?? []),
      ];
      for (const item of items) {
        if (item && typeof item.type === "string") this._emit(item.type, item);
      }
    }
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._detach(ws);
    this._ws = null;
    this._clearTimers();
    this.connectionId = null;
    if (this._stopped) return;
    if (isTerminalCloseCode(code)) {
      this._stopped = true;
      this._setStatus(STATUS.CLOSED, { code, reason, terminal: true });
      return;
    }
    if (code === CLOSE_TOKEN_EXPIRED) {
      if (!this.getToken) {
        // The same token would only be refused again.
        this._stopped = true;
        this._setStatus(STATUS.CLOSED, { code, reason, terminal: true });
        return;
      }
      this._needToken = true;
    } else if (!this._opened && this.getToken) {
      // A refused handshake reaches a browser as 1006 with no status: an
      // expired token looks the same as a server that is down.
      this._needToken = true;
    }
    this._scheduleReconnect({ code, reason });
  }

  _scheduleReconnect(detail) {
    if (this._stopped) return;
    const delayMs = backoffDelay(this.attempt, this.backoff);
    this.attempt += 1;
    this._setStatus(STATUS.RECONNECTING, { ...detail, delayMs });
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._stopped) this._open(STATUS.RECONNECTING);
    }, delayMs);
  }

  _startIdleWatch() {
    clearInterval(this._idleTimer);
    if (!this.idleTimeoutMs) return;
    const every = Math.max(250, Math.floor(this.idleTimeoutMs / 4));
    this._idleTimer = setInterval(() => {
      const ws = this._ws;
      if (!ws || Date.now() - this._lastReceivedAt <= this.idleTimeoutMs) return;
      // A half-open TCP connection may take minutes to report its close:
      // drop it and reconnect without waiting for that.
      this._detach(ws);
      this._ws = null;
      try { ws.close(4000, "no message from the server"); } catch { /* gone */ }
      this._clearTimers();
      this._scheduleReconnect({ code: 4000, reason: "no message from the server" });
    }, every);
  }

  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (!this.getToken || !this.token) return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const inMs = exp * 1000 - Date.now() - this.refreshBeforeMs;
    // Timers past 2^31 ms overflow; a day-long token is refreshed later on.
    if (inMs > 2 ** 31 - 1) return;
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      this.refreshToken().catch((err) => this._emit("error", { error: err, where: "refresh" }));
    }, Math.max(0, inMs));
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  _clearTimers() {
    clearInterval(this._idleTimer);
    clearTimeout(this._refreshTimer);
    this._idleTimer = this._refreshTimer = null;
    if (this._stopped) {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
    }
  }
}

/** Create a client and connect it: `connect({ token, assessmentId })`. */
export function connect(options) {
  return new PushClient(options).connect();
}
