// The dashboard: connectors and their status, subscriptions kept in the page address, a bounded
// live table of changes, and a resume after every reconnect that says whether anything was lost.
import {
  OPERATORS,
  clip,
  conditionText,
  diffImages,
  imagesNote,
  isAuthRefusal,
  queryFromSubscriptions,
  roomFor,
  showValue,
  subscriptionKey,
  subscriptionsFromQuery,
} from "./view.js";
import { FeedClient } from "./dbfeed-client.js";
import { io } from "socket.io-client";

// The page's own socket.io-client (index.html's import map), for a raw connection from the
// browser console.
window.io = io;

const TOKEN_KEY = "dbfeed.token";
const MAX_ROWS_KEY = "dbfeed.maxRows";
const RATE_SAMPLES = 60;
// How much of one value the page draws before "Show all": a whole document of megabytes would make
// the page hundreds of thousands of pixels tall. A key in the table is cut shorter (CSS ellipsis).
const VALUE_SHOWN = 10000;
// The most rows "Keep last" keeps: Chromium lays the whole table out on every redraw (70 to 120 ms
// at 10,000 rows), so under a flood of changes a longer table stalled the page for seconds.
const MAX_ROWS_LIMIT = 2000;
const KEY_SHOWN = 500;
// A refusal that says "not now" (the identity holds its most connections, the server is at its
// connection limit, the server cannot check tokens right now) is tried again after this many
// seconds, doubled each time it is refused again.
const RETRY_FIRST_S = 2;
const RETRY_MAX_S = 60;
// Those refusals, from the server (Socket.IO) or from the client library (HTTP 503). Not one of
// them is about the token: it is kept, and the token dialog stays closed.
const NOT_NOW = new Set(["too_many_connections", "server_busy", "auth_unavailable"]);
const $ = (id) => document.getElementById(id);

const state = {
  feed: null, // the FeedClient (dbfeed-client)
  connectors: new Map(), // name -> {name, type, status, targets, gap, rates: number[]}
  unconfigured: [], // {type, detail}: sources this server leaves out, and how to get them
  subs: [], // {room, filter, canonical, status, message, handle: the library's Subscription}
  epoch: null, // the server run the shown changes come from
  rows: [], // changes shown, newest first, never more than maxRows
  byId: new Map(), // id -> change, for rows shown or waiting: one row per change, whatever rooms
  incoming: [], // changes not yet drawn (while paused, or until the next frame)
  missedWhilePaused: 0,
  paused: false,
  maxRows: 500,
  selected: null,
  drawScheduled: false,
  everConnected: false,
  resuming: false, // connected again, some subscriptions not yet answered
  identityChanged: false, // a token was given or forgotten: refusals may not hold for the new one
  retry: { timer: null, at: 0, refusals: 0 }, // the next try after a "not now" refusal
  metrics: { mode: "source", last: null, timer: null, received: new Map() },
};

// -- connection ---------------------------------------------------------------------------------
//
// dbfeed-client (clients/js) keeps the connection and resumes every subscription after a
// reconnect; this page shows what it reports.

function connect() {
  const path = new URL("socket.io", window.location.href).pathname;
  const feed = new FeedClient(window.location.origin, {
    path,
    transports: ["websocket", "polling"],
    reconnectionDelay: 500,
    reconnectionDelayMax: 4000,
    // A function, so every reconnect sends the token the user most recently gave; a refused
    // token waits for the user rather than being retried.
    token: () => sessionStorage.getItem(TOKEN_KEY),
    retryRefused: false,
  });
  state.feed = feed;
  feed.on("connect", onConnect);
  feed.on("disconnect", onDisconnect);
  feed.on("error", onFeedError);
  feed.socket.on("connect_error", () => {
    // The transport failed; the client library retries with backoff. (Refusals: onFeedError.)
    if (feed.socket.active) setConnection("reconnecting", "Server unreachable; retrying…");
  });
  feed.socket.io.on("reconnect_attempt", (attempt) => {
    setConnection("reconnecting", `Reconnecting (attempt ${attempt})…`);
  });
  feed.on("status", onStatus);
  feed.on("gap", onGap);
}

function setConnection(kind, text) {
  $("enter-token").hidden = kind !== "auth";
  const box = $("connection");
  box.dataset.state = kind;
  $("connection-text").textContent = text;
}

function onConnect() {
  stopRetrying();
  state.retry.refusals = 0;
  const again = state.everConnected;
  state.everConnected = true;
  state.resuming = again;
  setConnection("connected", again ? "Connected again: resuming subscriptions" : "Connected");
  if (state.identityChanged) {
    // The server refused those subscriptions to the identity before (`forbidden`, or a target its
    // catalog hid): ask again as the one the user just signed in as, rather than leave the old
    // refusal, naming the old identity, on show until they think of pressing Retry.
    state.identityChanged = false;
    for (const sub of state.subs) if (sub.status === "error") reloadSubscription(sub);
  }
  settleConnection();
  $("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
  state.feed.catalog().then(onCatalog, () => {});
  startMetrics();
}

// After a reconnect the line says subscriptions are resuming until each has its answer, and then
// plain "Connected" again: left as it was, it would say "resuming" for as long as the page stays.
function settleConnection() {
  if (!state.resuming || !state.feed.connected) return;
  if (state.subs.some((s) => s.status === "pending" || s.status === "offline")) return;
  state.resuming = false;
  setConnection("connected", "Connected");
}

function onDisconnect(reason) {
  stopMetrics();
  if (reason === "io server disconnect") {
    // The server closed this connection on purpose (a restart, say): the client library
    // connects again after a backoff.
    setConnection("reconnecting", "Disconnected by the server; reconnecting…");
  } else {
    setConnection("reconnecting", `Disconnected (${reason}); reconnecting…`);
  }
}

function onFeedError(error) {
  if (!error.refused) {
    // The server ends the connection next; the reconnect will ask for a new token.
    if (error.code === "token_expired") setConnection("auth", error.message || "The token expired");
    return; // otherwise a failed refresh, say: the connection goes on
  }
  stopRetrying();
  if (error.code === "auth_unavailable") {
    // The server cannot check tokens right now (its identity provider's keys could not be
    // fetched): the token may well be good, so it is not asked for again.
    setConnection("refused", `Authentication is unavailable on the server: ${error.message}`);
    retryLater();
  } else if (NOT_NOW.has(error.code)) {
    setConnection("refused", `Refused by the server: ${error.message}`);
    retryLater();
  } else if (isAuthRefusal(error)) {
    // The server refused this connection: retrying with the same credentials would not help.
    setConnection("auth", "Access token needed");
    askForToken(error.message);
  } else {
    setConnection("refused", `Refused by the server: ${error.message}`);
  }
}

// The client library is told not to retry refusals (retryRefused: false), so that a refused token
// waits for the user; a "not now" one is tried again here, where the page can show when.
function retryLater() {
  const retry = state.retry;
  retry.refusals += 1;
  retry.at = Date.now() + Math.min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (retry.refusals - 1)) * 1000;
  const tick = () => {
    const left = Math.ceil((retry.at - Date.now()) / 1000);
    if (left <= 0) retryNow();
    else $("retry-in").textContent = `Trying again in ${left} s`;
  };
  tick();
  retry.timer = setInterval(tick, 1000);
  $("retry-in").hidden = false;
  $("retry-now").hidden = false;
}

function retryNow() {
  stopRetrying();
  setConnection("connecting", "Connecting…");
  state.feed.reconnect();
}

function stopRetrying() {
  clearInterval(state.retry.timer);
  state.retry.timer = null;
  $("retry-in").hidden = true;
  $("retry-now").hidden = true;
}

let lastRefusal = "";
function askForToken(reason) {
  lastRefusal = reason;
  const dialog = $("token-dialog");
  const had = sessionStorage.getItem(TOKEN_KEY);
  $("token-reason").textContent = had
    ? `The server did not accept the token: ${reason}`
    : `The server requires a token: ${reason}`;
  $("token-input").value = "";
  if (!dialog.open) dialog.showModal();
  $("token-input").focus();
}

function submitToken(event) {
  const token = $("token-input").value.trim();
  if (!token) {
    event.preventDefault();
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  state.identityChanged = true;
  stopRetrying();
  setConnection("connecting", "Connecting with the token…");
  state.feed.reconnect();
}

function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  state.identityChanged = true;
  stopRetrying();
  $("forget-token").hidden = true;
  state.feed.reconnect(true);
}

// -- catalog and connector status ---------------------------------------------------------------

function onCatalog(reply) {
  if (!reply || !reply.ok) return;
  const known = state.connectors;
  state.connectors = new Map();
  for (const item of reply.connectors) {
    const old = known.get(item.name);
    state.connectors.set(item.name, {
      ...item,
      gap: old ? old.gap : null,
      rates: old ? old.rates : [],
    });
  }
  state.unconfigured = reply.unconfigured || [];
  drawConnectors();
  fillConnectorChoices();
  drawSubscriptions(); // a page opened during an outage: its subscriptions say so from the start
}

function onStatus(status) {
  const connector = state.connectors.get(status.connector);
  if (!connector) {
    state.feed.catalog().then(onCatalog, () => {}); // one this page has not heard of yet
    return;
  }
  connector.status = status;
  if ("reader" in status) connector.reader = status.reader; // a cluster's, for operators
  drawConnectors();
  drawSubscriptions();
}

function onGap(gap) {
  const connector = state.connectors.get(gap.connector);
  if (connector) {
    connector.gap = { reason: gap.reason, at: new Date() };
    drawConnectors();
  }
  // Each subscription of that room reports the gap itself, as a "reload" state.
}

function drawConnectors() {
  const list = $("connector-list");
  list.replaceChildren();
  for (const c of state.connectors.values()) {
    const item = document.createElement("li");
    item.className = "connector";
    item.dataset.name = c.name;
    const head = document.createElement("div");
    head.className = "connector-head";
    const name = document.createElement("strong");
    name.textContent = c.name;
    const type = document.createElement("span");
    type.className = "hint";
    type.textContent = c.type;
    const badge = document.createElement("span");
    badge.className = "badge state";
    badge.dataset.state = c.status.state;
    badge.textContent = c.status.state;
    const rate = document.createElement("span");
    rate.className = "rate";
    rate.textContent = `${formatRate(c.rates.length ? c.rates[c.rates.length - 1] : 0)}/s`;
    head.append(name, type, badge);
    if (c.reader) {
      const reader = document.createElement("span");
      reader.className = "hint reader";
      reader.textContent = `read by ${c.reader}`;
      head.append(reader);
    }
    if (c.gap) {
      const gap = document.createElement("span");
      gap.className = "badge state";
      gap.dataset.state = "gap";
      gap.textContent = "gap";
      gap.title = `${c.gap.reason} at ${c.gap.at.toLocaleTimeString()}`;
      head.append(gap);
    }
    head.append(rate);
    item.append(head);
    // A gap stays on show until the page reloads: it often comes with a down/up that would
    // otherwise hide it within a second.
    const detail = c.gap ? `gap at ${c.gap.at.toLocaleTimeString()}: ${c.gap.reason}` : c.status.detail;
    if (detail) {
      const p = document.createElement("p");
      p.className = "connector-detail";
      p.textContent = detail;
      item.append(p);
    }
    item.append(sparkline(c.rates));
    list.append(item);
  }
  for (const u of state.unconfigured) {
    const item = document.createElement("li");
    item.className = "connector unconfigured";
    item.dataset.type = u.type;
    const head = document.createElement("div");
    head.className = "connector-head";
    const type = document.createElement("strong");
    type.textContent = u.type;
    const badge = document.createElement("span");
    badge.className = "badge state";
    badge.dataset.state = "unconfigured";
    badge.textContent = "not configured";
    head.append(type, badge);
    item.append(head);
    if (u.detail) {
      const p = document.createElement("p");
      p.className = "connector-detail";
      p.textContent = u.detail;
      item.append(p);
    }
    list.append(item);
  }
}

function sparkline(rates) {
  const width = 240;
  const height = 30;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "sparkline");
  svg.setAttribute("role", "img");
  const now = rates.length ? rates[rates.length - 1] : 0;
  const peak = Math.max(1, ...rates);
  const label = `${formatRate(now)} changes per second now, peak ${formatRate(Math.max(0, ...rates))}`;
  svg.setAttribute("aria-label", label);
  const title = document.createElementNS(ns, "title");
  title.textContent = label;
  const line = document.createElementNS(ns, "polyline");
  const step = width / (RATE_SAMPLES - 1);
  const offset = RATE_SAMPLES - rates.length;
  const points = rates.map(
    (r, i) => `${((offset + i) * step).toFixed(1)},${(height - 2 - (r / peak) * (height - 4)).toFixed(1)}`,
  );
  line.setAttribute("points", points.join(" "));
  svg.setAttribute("preserveAspectRatio", "none");
  svg.append(title, line);
  return svg;
}

function formatRate(rate) {
  return rate >= 10 ? String(Math.round(rate)) : rate.toFixed(1).replace(/\.0$/, "");
}

// Rates come from the server's /metrics (changes in per connector, whatever is subscribed). If
// the server does not expose them to this page, the page counts what it receives instead.
function startMetrics() {
  stopMetrics();
  state.metrics.timer = setInterval(sampleRates, 1000);
}

function stopMetrics() {
  clearInterval(state.metrics.timer);
  state.metrics.timer = null;
  state.metrics.last = null;
}

async function sampleRates() {
  const m = state.metrics;
  const now = performance.now();
  let totals = null;
  if (m.mode === "source") {
    try {
      const response = await fetch("metrics", { cache: "no-store" });
      if (!response.ok) throw new Error(String(response.status));
      totals = parseChangesIn(await response.text());
    } catch {
      m.mode = "received";
      m.last = null;
      $("rate-source").textContent = "Changes per second received by this page, last minute.";
    }
  }
  if (m.mode === "received") totals = new Map(m.received);
  if (!totals || !state.feed.connected) return;
  if (m.last) {
    const seconds = Math.max(0.001, (now - m.last.at) / 1000);
    for (const c of state.connectors.values()) {
      const delta = (totals.get(c.name) || 0) - (m.last.totals.get(c.name) || 0);
      c.rates.push(Math.max(0, delta / seconds));
      if (c.rates.length > RATE_SAMPLES) c.rates.shift();
    }
    drawConnectors();
  }
  m.last = { at: now, totals };
}

function parseChangesIn(text) {
  const totals = new Map();
  const pattern = /^feed_changes_in_total\{connector="([^"]*)"\}\s+([0-9.eE+-]+)/gm;
  for (const match of text.matchAll(pattern)) totals.set(match[1], Number(match[2]));
  return totals;
}

// -- subscriptions ------------------------------------------------------------------------------

function subscribe(sub) {
  const options = {};
  if (sub.filter) options.filter = sub.filter;
  if (sub.snapshot) options.snapshot = true;
  sub.handle = state.feed.subscribe(sub.room, options);
  sub.handle.on("state", (name, info) => onSubState(sub, name, info));
  sub.handle.on("snapshot", (rows, info) => onSnapshot(sub, info));
  sub.handle.on("change", (change) => receive([change]));
}

// The room's current rows, before its live changes (and again after a reload: the library reads
// them afresh by itself). Each goes in the table as a row of op "snapshot", oldest first, so the
// changes that follow sit above them; the table's bound applies to them as to changes.
let snapshotCount = 0;
function onSnapshot(sub, info) {
  const room = sub.handle.room || sub.room;
  const connector = room.slice(0, room.indexOf(":"));
  const target = room.slice(connector.length + 1).replace(/\?.*$/, "");
  snapshotCount += 1;
  const rows = [];
  for (const [key, row] of info.rows) {
    rows.push({
      id: `snapshot ${snapshotCount} ${room} ${key}`,
      room,
      connector,
      target,
      op: "snapshot",
      key,
      before: null,
      after: row,
      ts: null,
      snapshot: true,
    });
  }
  const n = info.rows.size;
  sub.snapshotNote = `started from ${n} current row${n === 1 ? "" : "s"}${
    info.truncated ? " (cut short: the server's snapshot_limit or its connector's snapshot_scan_limit)" : ""
  }`;
  receive(rows);
}

function onSubState(sub, name, info) {
  const handle = sub.handle;
  if (handle.room) sub.canonical = handle.room;
  if (handle.epoch && handle.epoch !== state.epoch) {
    // Another server process: change ids from a source that started over may repeat.
    if (state.epoch) state.byId.clear();
    state.epoch = handle.epoch;
  }
  if (name === "pending") {
    if (info.reason === "disconnected") setSubStatus(sub, "offline", "waiting for the connection");
    else if (!sub.reloading && sub.status !== "gap") {
      setSubStatus(sub, "pending", info.resuming ? "resuming…" : "subscribing…");
    }
  } else if (name === "live") {
    // A reload the user has not asked for stays on show until they do.
    if (sub.status !== "gap" || sub.reloading) setSubStatus(sub, "live", sub.snapshotNote || "live");
    sub.reloading = false;
  } else if (name === "recovered") {
    const n = info.replayed;
    setSubStatus(sub, "recovered", `resumed: ${n} missed change${n === 1 ? "" : "s"} recovered`);
  } else if (name === "reload") {
    if (sub.reloading) return;
    if (sub.snapshot) {
      // Nothing to ask of the user: the library reads the current rows again by itself.
      setSubStatus(sub, "pending", `missed changes (${info.reason}): reading the current rows again`);
      return;
    }
    const lost = info.reason === "the server could not replay what was missed";
    setSubStatus(
      sub,
      "gap",
      lost ? "missed changes could not be replayed: reload needed" : `missed changes (${info.reason}): reload needed`,
    );
  } else if (name === "error") {
    setSubStatus(sub, "error", `${info.code}: ${info.message}`);
  }
}

function addSubscription(room, filter, snapshot) {
  const sub = { room, filter: filter || null, snapshot: !!snapshot, canonical: null, status: "pending", message: "" };
  if (state.subs.some((s) => subscriptionKey(s) === subscriptionKey(sub))) return false;
  state.subs.push(sub);
  writeAddress();
  drawSubscriptions();
  subscribe(sub);
  return true;
}

function removeSubscription(sub) {
  state.subs = state.subs.filter((s) => s !== sub);
  if (sub.handle) sub.handle.unsubscribe().catch(() => {});
  writeAddress();
  drawSubscriptions();
  settleConnection();
}

// Start the subscription afresh: the user has seen that changes were missed (or an error).
function reloadSubscription(sub) {
  if (sub.status === "error" || !sub.handle) {
    if (sub.handle) sub.handle.unsubscribe().catch(() => {});
    sub.canonical = null;
    setSubStatus(sub, "pending", "subscribing…");
    subscribe(sub);
    return;
  }
  sub.reloading = true;
  setSubStatus(sub, "pending", "subscribing…");
  sub.handle.reload();
}

function setSubStatus(sub, status, message) {
  sub.status = status;
  sub.message = message;
  drawSubscriptions();
  settleConnection();
}

// What a subscription shows: its own state, unless its connector is not up. A subscription the
// server answered says `live` (or `recovered`) as far as the library knows, but nothing arrives
// while its connector is down, and changes come late while it lags: the badge then names the
// connector's state, and the message starts with the connector's reason. Its own state is kept
// (sub.status), so it comes back as it was when the connector is up again; a `reload needed`
// keeps its badge and its Reload button, with the connector's state in front of its message.
// `pending`, `offline` and `error` are about the subscription or the page's own connection, and
// say nothing of the connector.
const CONNECTOR_TROUBLE = new Set(["down", "lagging", "starting", "stopped"]);

function shownStatus(sub) {
  const own = {
    status: sub.status,
    badge: sub.status === "gap" ? "reload needed" : sub.status,
    message: sub.message === sub.status ? "" : sub.message,
  };
  if (!["live", "recovered", "gap"].includes(sub.status)) return own;
  const room = sub.canonical || sub.room;
  const connector = state.connectors.get(room.slice(0, room.indexOf(":")));
  const trouble = connector && connector.status && connector.status.state;
  if (!CONNECTOR_TROUBLE.has(trouble)) return own;
  const detail = connector.status.detail && connector.status.detail !== trouble ? connector.status.detail : "";
  const note = `connector ${trouble}${detail ? `: ${detail}` : ""}`;
  const message = own.message ? `${note} · ${own.message}` : note;
  if (sub.status === "gap") return { ...own, message };
  return { status: `connector-${trouble}`, badge: `connector ${trouble}`, message };
}

function drawSubscriptions() {
  const list = $("subscriptions");
  const focused = document.activeElement && document.activeElement.closest("#subscriptions li");
  const focusKey = focused ? focused.dataset.key : null;
  list.replaceChildren();
  $("no-subscriptions").hidden = state.subs.length > 0;
  for (const sub of state.subs) {
    const item = document.createElement("li");
    item.className = "subscription";
    item.dataset.key = subscriptionKey(sub);
    item.dataset.room = sub.canonical || (sub.filter ? `${sub.room}?${sub.filter}` : sub.room);
    const shown = shownStatus(sub);
    item.dataset.status = shown.status;
    const name = document.createElement("code");
    name.textContent = sub.canonical || (sub.filter ? `${sub.room}?${sub.filter}` : sub.room);
    const badge = document.createElement("span");
    badge.className = "badge sub-status";
    badge.dataset.status = shown.status;
    badge.textContent = shown.badge;
    const message = document.createElement("span");
    message.className = "sub-message";
    message.textContent = shown.message;
    message.hidden = !shown.message;
    item.append(name, badge);
    if (sub.status === "gap" || sub.status === "error") {
      const again = document.createElement("button");
      again.type = "button";
      again.className = "quiet";
      again.textContent = sub.status === "gap" ? "Reload" : "Retry";
      again.setAttribute("aria-label", `${again.textContent} ${name.textContent}`);
      again.addEventListener("click", () => reloadSubscription(sub));
      item.append(again);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove subscription ${name.textContent}`);
    remove.addEventListener("click", () => removeSubscription(sub));
    item.append(remove, message);
    list.append(item);
    if (focusKey === item.dataset.key) remove.focus();
  }
}

function writeAddress() {
  const url = `${window.location.pathname}${queryFromSubscriptions(state.subs)}${window.location.hash}`;
  window.history.replaceState(null, "", url);
}

// -- the subscribe form -------------------------------------------------------------------------

function fillConnectorChoices() {
  const select = $("sub-connector");
  const chosen = select.value;
  select.replaceChildren();
  for (const c of state.connectors.values()) {
    const option = new Option(`${c.name} (${c.type})`, c.name);
    select.append(option);
  }
  if (chosen && state.connectors.has(chosen)) select.value = chosen;
  fillTargetChoices();
}

function fillTargetChoices() {
  const select = $("sub-target");
  const chosen = select.value;
  const connector = state.connectors.get($("sub-connector").value);
  select.replaceChildren();
  for (const target of connector ? connector.targets : []) select.append(new Option(target, target));
  if (chosen && connector && connector.targets.includes(chosen)) select.value = chosen;
}

function addCondition() {
  const index = $("conditions").children.length + 1;
  const row = document.createElement("div");
  row.className = "condition";
  const field = labelled("input", `Field ${index}`, { type: "text", placeholder: "status", autocomplete: "off" });
  const op = labelled("select", `Operator ${index}`);
  for (const name of OPERATORS) op.control.append(new Option(name, name));
  const value = labelled("input", `Value ${index}`, { type: "text", placeholder: "paid", autocomplete: "off" });
  field.control.classList.add("cond-field");
  op.control.classList.add("cond-op");
  value.control.classList.add("cond-value");
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "remove";
  remove.textContent = "×";
  remove.setAttribute("aria-label", `Remove condition ${index}`);
  remove.addEventListener("click", () => {
    row.remove();
    $("add-condition").focus();
  });
  row.append(field.wrap, op.wrap, value.wrap, remove);
  $("conditions").append(row);
  field.control.focus();
}

let controlCount = 0;
function labelled(tag, text, attributes = {}) {
  const wrap = document.createElement("div");
  wrap.className = "field";
  const label = document.createElement("label");
  const control = document.createElement(tag);
  controlCount += 1;
  control.id = `control-${controlCount}`;
  label.htmlFor = control.id;
  label.textContent = text;
  for (const [name, value] of Object.entries(attributes)) control.setAttribute(name, value);
  wrap.append(label, control);
  return { wrap, control };
}

function submitSubscription(event) {
  event.preventDefault();
  const error = $("subscribe-error");
  error.textContent = "";
  const name = $("sub-connector").value;
  const target = $("sub-target").value;
  const connector = state.connectors.get(name);
  if (!connector || !target) {
    error.textContent = "Pick a connector and a target first.";
    return;
  }
  const conditions = [];
  for (const row of $("conditions").querySelectorAll(".condition")) {
    const field = row.querySelector(".cond-field").value;
    const op = row.querySelector(".cond-op").value;
    const value = row.querySelector(".cond-value").value;
    if (!field.trim() && !value.trim()) continue;
    if (!field.trim()) {
      error.textContent = "Each filter condition needs a field name.";
      row.querySelector(".cond-field").focus();
      return;
    }
    conditions.push(conditionText(field, op, value));
  }
  const room = roomFor(name, connector.type, target, $("sub-key").value.trim());
  if (!addSubscription(room, conditions.join("&") || null, $("sub-snapshot").checked)) {
    error.textContent = "Already subscribed to that.";
  }
}

// -- the change table ---------------------------------------------------------------------------

function receive(changes) {
  for (const change of changes) {
    if (!change || typeof change !== "object") continue;
    // The same change reaches every subscribed room it matches: show it once, note the rooms.
    const known = state.byId.get(change.id);
    if (known) {
      known.rooms.add(change.room);
      if (state.selected === known) drawDetail(known);
      continue;
    }
    change.rooms = new Set([change.room]);
    state.byId.set(change.id, change);
    const received = state.metrics.received;
    if (!change.snapshot) received.set(change.connector, (received.get(change.connector) || 0) + 1);
    state.incoming.push(change);
    if (state.paused) state.missedWhilePaused += 1;
  }
  // Bounded whatever happens: nothing older than the last maxRows can ever be shown.
  dropOldIncoming();
  if (state.paused) {
    drawPausedNote();
  } else {
    scheduleDraw();
  }
}

function dropOldIncoming() {
  if (state.incoming.length <= state.maxRows) return;
  const dropped = state.incoming.splice(0, state.incoming.length - state.maxRows);
  for (const change of dropped) state.byId.delete(change.id);
}

function scheduleDraw() {
  if (state.drawScheduled) return;
  state.drawScheduled = true;
  requestAnimationFrame(() => {
    state.drawScheduled = false;
    drawIncoming();
  });
}

function drawIncoming() {
  if (state.paused || state.incoming.length === 0) return;
  const batch = state.incoming;
  state.incoming = [];
  const body = $("change-rows");
  const fragment = document.createDocumentFragment();
  for (let i = batch.length - 1; i >= 0; i -= 1) fragment.append(changeRow(batch[i]));
  body.prepend(fragment);
  state.rows = batch.reverse().concat(state.rows);
  trimRows();
}

function trimRows() {
  const body = $("change-rows");
  while (state.rows.length > state.maxRows) {
    const dropped = state.rows.pop();
    state.byId.delete(dropped.id);
    body.lastElementChild.remove();
  }
  $("change-count").textContent = `${state.rows.length} shown`;
  rovingFocus();
}

// One row at a time is in the Tab order (the selected one, else the newest); arrows move.
function rovingFocus() {
  const body = $("change-rows");
  const want = body.querySelector("tr[aria-selected='true']") || body.firstElementChild;
  for (const row of body.querySelectorAll("tr[tabindex='0']")) {
    if (row !== want) row.tabIndex = -1;
  }
  if (want) want.tabIndex = 0;
}

function changeRow(change) {
  const row = document.createElement("tr");
  row.tabIndex = -1;
  row.dataset.id = change.id;
  row.dataset.op = change.op;
  row.change = change;
  const ts = change.ts ? new Date(change.ts) : null;
  const cells = [
    ts ? timeText(ts) : "",
    change.connector,
    change.target,
    change.op,
    keyText(change.key),
  ];
  cells.forEach((text, index) => {
    const cell = document.createElement("td");
    if (index === 3) {
      const op = document.createElement("span");
      op.className = "badge op";
      op.dataset.op = change.op;
      op.textContent = text;
      cell.append(op);
    } else {
      cell.textContent = text;
    }
    if (index === 0 && ts) cell.title = change.ts;
    if (index === 4) {
      cell.className = "key";
      cell.title = text;
    }
    row.append(cell);
  });
  if (state.selected && state.selected.id === change.id) row.setAttribute("aria-selected", "true");
  return row;
}

function keyText(key) {
  const { text, omitted } = clip(showValue(key), KEY_SHOWN);
  return omitted ? `${text}… (${omitted} more characters)` : text;
}

function timeText(date) {
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

function markSelected(row) {
  for (const other of $("change-rows").querySelectorAll("tr[aria-selected='true']")) {
    other.setAttribute("aria-selected", "false");
    other.tabIndex = -1;
  }
  row.setAttribute("aria-selected", "true");
  rovingFocus();
}

function select(row, focus) {
  if (!row || !row.change) return;
  state.selected = row.change;
  markSelected(row);
  if (focus) row.focus();
  drawDetail(row.change);
}

function onTableKey(event) {
  const row = event.target.closest("tr");
  if (!row || !row.change) return;
  if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    select(row, true);
  } else if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    event.preventDefault();
    const next = event.key === "ArrowDown" ? row.nextElementSibling : row.previousElementSibling;
    if (next) select(next, true);
  }
}

function drawDetail(change) {
  const body = $("detail-body");
  body.replaceChildren();
  const summary = document.createElement("p");
  summary.className = "detail-summary";
  const op = document.createElement("span");
  op.className = "badge op";
  op.dataset.op = change.op;
  op.textContent = change.op;
  const where = document.createElement("code");
  where.textContent = `${change.connector}:${change.target} key ${keyText(change.key)}`;
  summary.append(op, " ", where);
  const facts = document.createElement("p");
  facts.className = "hint";
  facts.textContent = change.snapshot
    ? `current row, read when ${change.room} was subscribed`
    : `${change.ts || "no commit time"} · id ${change.id}`;
  const rooms = document.createElement("p");
  rooms.id = "change-rooms";
  rooms.className = "hint";
  rooms.textContent = `Matched: ${[...change.rooms].join(", ")}`;
  body.append(summary, facts, rooms);

  const fields = diffImages(change.before, change.after);
  const changed = fields.filter((f) => f.changed).map((f) => f.field);
  const note = document.createElement("p");
  note.id = "changed-fields";
  note.textContent = imagesNote(change.op, change.before, change.after, changed);
  body.append(note);

  const table = document.createElement("table");
  table.className = "diff";
  table.innerHTML =
    '<thead><tr><th scope="col">Field</th><th scope="col">Before</th><th scope="col">After</th></tr></thead>';
  const rows = document.createElement("tbody");
  for (const f of fields) {
    const row = document.createElement("tr");
    row.dataset.field = f.field;
    if (f.changed) row.className = "changed";
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = f.field;
    if (f.changed) {
      const mark = document.createElement("span");
      mark.className = "visually-hidden";
      mark.textContent = " (changed)";
      name.append(mark);
    }
    row.append(name, valueCell(f.before, f.hasBefore, "before"), valueCell(f.after, f.hasAfter, "after"));
    rows.append(row);
  }
  table.append(rows);
  if (fields.length) body.append(table);
  if (change.meta) {
    const meta = document.createElement("pre");
    meta.className = "meta";
    showClipped(meta, `meta: ${JSON.stringify(change.meta, null, 2)}`);
    body.append(meta);
  }
}

function valueCell(value, present, side) {
  const cell = document.createElement("td");
  cell.className = side;
  if (present) {
    // A box of bounded height that scrolls: even a value shown whole keeps the page short.
    const box = document.createElement("div");
    box.className = "value";
    showClipped(box, showValue(value));
    cell.append(box);
  } else {
    cell.classList.add("absent");
    cell.textContent = "—";
  }
  return cell;
}

// The first VALUE_SHOWN characters of a long text, and a button that draws the rest on request.
function showClipped(element, full) {
  const { text, omitted } = clip(full, VALUE_SHOWN);
  element.textContent = text;
  if (!omitted) return;
  const more = document.createElement("button");
  more.type = "button";
  more.className = "quiet show-all";
  more.textContent = `Show all (${omitted.toLocaleString("en")} more characters)`;
  more.addEventListener("click", () => {
    element.textContent = full;
  });
  element.append("… ", more);
}

function setPaused(paused) {
  state.paused = paused;
  const button = $("pause");
  button.setAttribute("aria-pressed", String(paused));
  button.textContent = paused ? "Resume" : "Pause";
  if (!paused) {
    state.missedWhilePaused = 0;
    drawIncoming();
  }
  drawPausedNote();
}

function drawPausedNote() {
  const note = $("paused-note");
  note.hidden = !state.paused;
  const n = state.missedWhilePaused;
  note.textContent = `Paused: ${n} new change${n === 1 ? "" : "s"} waiting${
    n > state.maxRows ? ` (the newest ${state.maxRows} will be shown)` : ""
  }.`;
}

function clearRows() {
  state.rows = [];
  state.incoming = [];
  state.byId.clear();
  state.missedWhilePaused = 0;
  state.selected = null;
  $("change-rows").replaceChildren();
  $("change-count").textContent = "0 shown";
  $("detail-body").innerHTML = '<p class="hint">No change selected.</p>';
  drawPausedNote();
}

// The box always shows the bound in force: one typed out of range (0, 99999) is brought into
// 10..MAX_ROWS_LIMIT (the box's own min and max) rather than left on show while another number applies.
function setMaxRows() {
  const input = $("max-rows");
  const value = Math.round(Number(input.value));
  if (Number.isFinite(value) && input.value.trim() !== "") {
    state.maxRows = Math.min(MAX_ROWS_LIMIT, Math.max(10, value));
  }
  input.value = String(state.maxRows);
  localStorage.setItem(MAX_ROWS_KEY, String(state.maxRows));
  dropOldIncoming();
  trimRows();
}

// -- start --------------------------------------------------------------------------------------

function start() {
  const saved = Number(localStorage.getItem(MAX_ROWS_KEY));
  if (saved >= 1) {
    state.maxRows = Math.min(MAX_ROWS_LIMIT, Math.max(10, saved));
    $("max-rows").value = String(state.maxRows);
  }
  $("subscribe-form").addEventListener("submit", submitSubscription);
  $("sub-connector").addEventListener("change", fillTargetChoices);
  $("add-condition").addEventListener("click", addCondition);
  $("pause").addEventListener("click", () => setPaused(!state.paused));
  $("clear").addEventListener("click", clearRows);
  $("max-rows").addEventListener("change", setMaxRows);
  $("token-form").addEventListener("submit", submitToken);
  $("forget-token").addEventListener("click", forgetToken);
  $("enter-token").addEventListener("click", () => askForToken(lastRefusal));
  $("retry-now").addEventListener("click", retryNow);
  const rows = $("change-rows");
  rows.addEventListener("click", (event) => select(event.target.closest("tr"), true));
  rows.addEventListener("keydown", onTableKey);
  for (const sub of subscriptionsFromQuery(window.location.search)) {
    state.subs.push({ ...sub, canonical: null, status: "pending", message: "waiting for the connection" });
  }
  writeAddress();
  drawSubscriptions();
  connect();
  for (const sub of state.subs) subscribe(sub);
}

start();
