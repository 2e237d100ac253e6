// The live page: one PushClient, and a view of what it delivers.
// Token and assessmentId come from the page's query string; the token is then
// taken out of the address bar (kept in sessionStorage for a reload).

import { PushClient } from "./client.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "pushsvc.token";
const MAX_VIOLATIONS = 20;

const money = new Intl.NumberFormat(undefined, {
  minimumFractionDigits: 2, maximumFractionDigits: 2,
});
const qty = new Intl.NumberFormat(undefined, { maximumFractionDigits: 6 });

function formatPrice(value) {
  const n = Number(value);
  if (!Number.isFinite(n)) return String(value);
  const digits = Math.abs(n) >= 100 ? 2 : Math.abs(n) >= 1 ? 4 : 6;
  return n.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

function formatSigned(value) {
  const n = Number(value);
  if (!Number.isFinite(n)) return String(value ?? "–");
  return (n > 0 ? "+" : "") + money.format(n);
}

function formatTime(iso) {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? "–" : d.toLocaleTimeString(undefined, { hour12: false });
}

function setSign(el, value) {
  const n = Number(value);
  el.dataset.sign = n > 0 ? "pos" : n < 0 ? "neg" : "zero";
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function readParams() {
  const url = new URL(location.href);
  const params = url.searchParams;
  let token = params.get("token");
  const assessmentId = params.get("assessmentId") || null;
  if (token) {
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch { /* storage off */ }
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", url.pathname + (rest ? "?" + rest : "") + url.hash);
  } else {
    try { token = sessionStorage.getItem(TOKEN_KEY); } catch { token = null; }
  }
  return { token, assessmentId };
}

// -- views -------------------------------------------------------------------

const prices = new Map(); // market -> {row, price}

function onPrice(msg) {
  const market = String(msg.market);
  let entry = prices.get(market);
  if (!entry) {
    const row = document.createElement("tr");
    row.dataset.market = market;
    row.append(cell(market), cell("", "num price"), cell("", "num change"), cell("", "num time"));
    const body = $("prices").tBodies[0];
    const after = [...body.rows].find((r) => r.dataset.market > market);
    body.insertBefore(row, after || null);
    entry = { row, price: null };
    prices.set(market, entry);
    $("prices-empty").hidden = true;
  }
  const price = Number(msg.price);
  const [, priceCell, changeCell, timeCell] = entry.row.cells;
  const dir = entry.price === null || price === entry.price ? "flat" : price > entry.price ? "up" : "down";
  priceCell.textContent = formatPrice(msg.price);
  if (entry.price !== null) {
    const pct = entry.price ? ((price - entry.price) / entry.price) * 100 : 0;
    changeCell.textContent = (dir === "up" ? "▲ " : dir === "down" ? "▼ " : "") + pct.toFixed(3) + "%";
  }
  timeCell.textContent = formatTime(msg.timestamp);
  entry.row.dataset.dir = dir;
  // Restart the flash animation on every tick.
  entry.row.classList.remove("tick");
  void entry.row.offsetWidth;
  entry.row.classList.add("tick");
  entry.price = price;
}

function onPnl(msg) {
  for (const [id, value] of [
    ["pnl-unrealized", msg.unrealizedPnl],
    ["pnl-realized", msg.realizedPnl],
  ]) {
    const el = $(id);
    el.textContent = formatSigned(value);
    setSign(el, value);
  }
  const balance = Number(msg.currentBalance);
  $("pnl-balance").textContent = Number.isFinite(balance) ? money.format(balance) : "–";
  $("pnl-time").textContent = formatTime(msg.timestamp);
}

const positions = new Map(); // positionId -> latest position_update

function onPosition(msg) {
  const id = String(msg.positionId ?? `${msg.market}`);
  if (Number(msg.quantity) === 0) positions.delete(id);
  else positions.set(id, msg);
  const body = $("positions").tBodies[0];
  const rows = [...positions.keys()].sort().map((key) => {
    const p = positions.get(key);
    const row = document.createElement("tr");
    row.dataset.positionId = key;
    const pnl = cell(formatSigned(p.unrealizedPnl), "num");
    setSign(pnl, p.unrealizedPnl);
    row.append(
      cell(key), cell(String(p.market ?? "–")), cell(String(p.side ?? "–"), "side"),
      cell(qty.format(Number(p.quantity)), "num"), cell(formatPrice(p.entryPrice), "num"), pnl,
    );
    return row;
  });
  body.replaceChildren(...rows);
  $("positions-empty").hidden = rows.length > 0;
}

const rules = new Map(); // rule -> li

function onRule(msg) {
  const name = String(msg.rule);
  let li = rules.get(name);
  if (!li) {
    li = document.createElement("li");
    li.dataset.rule = name;
    const head = document.createElement("div");
    head.className = "rule-head";
    const label = document.createElement("span");
    label.className = "rule-name";
    label.textContent = name.replace(/_/g, " ");
    const badge = document.createElement("span");
    badge.className = "badge rule-status";
    head.append(label, badge);
    const figures = document.createElement("div");
    figures.className = "rule-figures small";
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.append(document.createElement("span"));
    li.append(head, bar, figures);
    const list = $("rules");
    const after = [...list.children].find((el) => el.dataset.rule > name);
    list.insertBefore(li, after || null);
    rules.set(name, li);
    $("rules-empty").hidden = true;
  }
  const status = ["ok", "warning", "breached"].includes(msg.status) ? msg.status : "unknown";
  li.dataset.status = status;
  li.querySelector(".rule-status").textContent = String(msg.status ?? "–");
  li.querySelector(".rule-figures").textContent =
    `${money.format(Number(msg.value))} of ${money.format(Number(msg.threshold))}`;
  const ratio = Number(msg.threshold) ? Number(msg.value) / Number(msg.threshold) : 0;
  li.querySelector(".bar > span").style.width = `${Math.max(0, Math.min(1, ratio)) * 100}%`;
}

function onViolation(msg) {
  const li = document.createElement("li");
  li.setAttribute("role", "alert");
  const title = document.createElement("strong");
  title.textContent = String(msg.rule ?? "violation").replace(/_/g, " ");
  const text = document.createElement("span");
  text.textContent = ` ${msg.value} over ${msg.threshold}`;
  const time = document.createElement("time");
  time.textContent = formatTime(msg.timestamp);
  li.append(title, text, time);
  const list = $("violations");
  list.prepend(li);
  while (list.children.length > MAX_VIOLATIONS) list.lastElementChild.remove();
  $("violations-empty").hidden = true;
}

function onAssessment(msg) {
  const badge = $("assessment-status");
  badge.textContent = String(msg.status ?? "–");
  badge.dataset.status = String(msg.status ?? "");
}

function showNotice(text) {
  const el = $("notice");
  el.textContent = text;
  el.hidden = !text;
}

// -- start -------------------------------------------------------------------

function start() {
  const { token, assessmentId } = readParams();
  $("assessment-id").textContent = assessmentId || "none (market data only)";
  if (!token) {
    showNotice("Open this page with ?token=<jwt>&assessmentId=<id>; `pushsvc demo` prints such a link.");
    return null;
  }
  const client = new PushClient({ token, assessmentId });
  let count = 0;
  client.on("message", () => {
    count += 1;
    $("counter").textContent = `${count} messages`;
  });
  client.on("status", (s) => {
    const el = $("status");
    el.textContent = s.status === "reconnecting" && s.delayMs !== undefined
      ? `reconnecting (${(s.delayMs / 1000).toFixed(1)} s)` : s.status;
    el.dataset.status = s.status;
    if (s.status === "open") showNotice("");
    else if (s.terminal) showNotice(`Disconnected for good (${s.code}${s.reason ? ": " + s.reason : ""}).`);
    if (s.status !== "open") $("connection-id").textContent = "–";
  });
  client.on("connected", (m) => { $("connection-id").textContent = m.connectionId; });
  client.on("market_price", onPrice);
  client.on("pnl_update", onPnl);
  client.on("position_update", onPosition);
  client.on("rule_status", onRule);
  client.on("violation", onViolation);
  client.on("assessment_update", onAssessment);
  client.connect();
  return client;
}

window.pushsvc = { client: start() };
