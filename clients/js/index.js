// dbfeed-client: subscriptions to a dbfeed server that resume by themselves and keep rows live.
//
// The hard part of a realtime client, written once: `change` and `changes` unpacked, each
// room's last `seq` and `epoch` remembered and sent back after every reconnect, duplicates
// dropped by `id`, a hole in `seq` turned into a reload (never passed on silently), snapshots
// assembled from their chunks and fetched again by themselves when a reload is needed, and the
// current rows kept right through all of it. See docs/clients.md for the API and the states.
//
// An ES module with no build step; its one dependency is socket.io-client. In a browser without
// a bundler, map "socket.io-client" to its ESM build with an import map (the dashboard does).

import { io } from "socket.io-client";

// Subscribe refusals the server means as "try again": retried with backoff, not reported.
const RETRYABLE = new Set([
  "rate_limited",
  "internal",
  "snapshot_failed",
  "cluster_unavailable",
  "server_busy",
  "not_connected",
  "timeout",
]);
// Ops after which the row's key is gone (a Redis key renamed or moved away included).
const REMOVALS = new Set([
  "delete",
  "del",
  "expired",
  "evicted",
  "unlink",
  "rename_from",
  "move_from",
  "getdel",
]);
const CLEARS = new Set(["truncate", "drop", "dropDatabase", "rename", "invalidate"]);
const MAX_IDS = 4096; // recent change ids kept per subscription to drop duplicates
const MAX_ORPHANS = 10000; // changes held for a room whose first subscribe ack has not come yet
// Requests that may wait for their answers at once. The server refuses requests beyond its
// `[limits] subscribe_burst` with `rate_limited` and cuts off a client after 100 refusals in a
// row: a client with more rooms than that must not send them all at once.
const MAX_IN_FLIGHT = 16;
// Bytes a request takes on the wire besides its JSON: Engine.IO's and Socket.IO's packet types
// and the answer's id (up to 10 digits).
const FRAMING = 12;
const utf8 = new TextEncoder();

// -- numbers past what a double holds exactly ---------------------------------------------------
//
// The server sends a Postgres `bigint` (a snowflake id, say) and a MongoDB Int64 as JSON numbers
// with every digit; JSON.parse reads 9007199254740993 as 9007199254740992. Every frame is read
// by `parseFrame` instead (the socket's decoder is given it): a frame without a number of 16 or
// more digits (nearly all) is plain JSON.parse after one regular expression test; in one with
// such a number, the numbers a double would change are kept exact, per the `bigNumbers` option.

const BIG_NUMBER_MODES = new Set(["string", "bigint", "number"]);
// A run of 16 digits (dots among them or not): a number with 15 digits or fewer always reads back
// as it was written. Spelled out: V8 runs it at about 0.3 ns a byte, `[\d.]{16}` ten times slower.
const MANY_DIGITS = new RegExp("[\\d.]".repeat(16));
const NUMBER = String.raw`-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?`;
// A string, or an unterminated one up to the end (a text JSON.parse then refuses): a string that
// could fail to match made the search start again inside it at every later character, and an
// unterminated string of 300 KB took 100 s.
const STRING = String.raw`"[^"\\]*(?:\\[\s\S]?[^"\\]*)*"?`;
// A JSON text as runs of what stays as it is (structure, strings, numbers under 16 digits), each
// run one match, and numbers of 16 digits or more between them: only digits outside strings are
// numbers, and a number too short is skipped whole, never matched in part. One match per run
// rather than per string: the replacement's callback ran for every string and cost 3 to 5 times
// a JSON.parse; this way 2 times, on frames that hold such numbers only.
const RUNS = new RegExp(String.raw`(?:[^"\d-]+|${STRING}|-?(?![\d.]{16})${NUMBER.slice(2)})+|${NUMBER}`, "g");
const LONG_NUMBER = new RegExp(String.raw`^${NUMBER}$`);
const INTEGER = /^-?\d+$/;
// One token per string or number of 16 digits or more: for a bigint frame that holds \u0000
// itself (see `parseFrame`).
const TOKENS = new RegExp(String.raw`${STRING}|-?(?=[\d.]{16})${NUMBER.slice(2)}`, "g");

/** A number's value as its digits (no leading or trailing zeros) and a power of ten: equal for equal values. */
function decimalForm(text) {
  const [mantissa, exponent = "0"] = text.replace("-", "").toLowerCase().split("e");
  const [whole, fraction = ""] = mantissa.split(".");
  const digits = (whole + fraction).replace(/^0+/, "");
  const kept = digits.replace(/0+$/, "");
  if (kept === "") return "0";
  const power = Number(exponent) - fraction.length + (digits.length - kept.length);
  return `${text.startsWith("-") ? "-" : ""}${kept}e${power}`;
}

/** Whether the number `text` reads as a double without losing what it says (an integer: safely). */
function exactAsNumber(text) {
  const value = Number(text);
  if (INTEGER.test(text)) return Number.isSafeInteger(value);
  return Number.isFinite(value) && decimalForm(String(value)) === decimalForm(text);
}

// In bigint mode a kept number is marked as a string that begins with U+0000, turned back
// after JSON.parse by `revive`: `"\u00009007199254740993"` is 9007199254740993n, and a string
// of the frame's own that began with U+0000 has a second one (TOKENS path), taken off.
function unmark(text) {
  const rest = text.slice(1);
  if (rest.charCodeAt(0) === 0) return rest;
  return INTEGER.test(rest) ? BigInt(rest) : rest;
}

/**
 * `value` with every marked string turned back (`unmark`), in place. A walk of the result rather
 * than JSON.parse's reviver, which made the parse 5 times slower than without one (this: 1.2
 * times); with a stack of its own, as a jsonb column may nest deeper than the call stack goes.
 */
function revive(value) {
  const stack = [value];
  while (stack.length) {
    const node = stack.pop();
    for (const name of Array.isArray(node) ? node.keys() : Object.keys(node)) {
      const item = node[name];
      if (typeof item === "object" && item !== null) stack.push(item);
      else if (typeof item === "string" && item.charCodeAt(0) === 0) node[name] = unmark(item);
    }
  }
  return value;
}

const COLON = /\s*:/y;

/** Whether the string that ends at `end` of a JSON text is a member's name (`revive` leaves names alone). */
function isName(text, end) {
  COLON.lastIndex = end;
  return COLON.test(text);
}

/**
 * A JSON text read as JSON.parse reads it, except that a number a double would change (an
 * integer past ±(2^53 - 1), a decimal with more digits than a double keeps) is, with `mode`
 * "string" (the default), its text: `"9007199254740993"`; with "bigint" an integer is a BigInt
 * (`9007199254740993n`) and a decimal its text; with "number", as JSON.parse reads it (rounded).
 */
export function parseFrame(text, mode = "string") {
  if (mode === "number" || !MANY_DIGITS.test(text)) return JSON.parse(text);
  let kept = 0;
  const bigint = mode === "bigint";
  // A frame whose own strings may begin with U+0000 (`\u0000` in its text, rare): each string
  // is looked at, and a value that does gets a second, so that no string of its own reads as a
  // mark (names are never marks).
  const own = bigint && text.includes("\\u0000");
  const marked = text.replace(own ? TOKENS : RUNS, (token, at) => {
    const first = token.charCodeAt(0);
    if (first === 34) return own && token.startsWith('"\\u0000') && !isName(text, at + token.length) ? `"\\u0000${token.slice(1)}` : token;
    if (first !== 45 && (first < 48 || first > 57)) return token; // a run that is no number
    if (!LONG_NUMBER.test(token) || exactAsNumber(token)) return token;
    kept += 1;
    return bigint ? `"\\u0000${token}"` : `"${token}"`;
  });
  if (kept === 0 && !own) return JSON.parse(text);
  const value = JSON.parse(marked);
  return bigint && typeof value === "object" && value !== null ? revive(value) : value;
}

/**
 * Gives socket.io-client's decoder `parseFrame` (socket.io-parser's Decoder reads every packet's
 * JSON through its `tryParse`; the test bignum.test.mjs fails should that ever change).
 */
function exactNumbers(socket, mode) {
  const decoder = socket.io?.decoder;
  if (mode === "number") return;
  if (!decoder || typeof decoder.tryParse !== "function") {
    // A socket made by another `io` (or another socket.io-client): say so rather than let
    // numbers past 2^53 be rounded without a word.
    console.warn("dbfeed-client: this socket's decoder cannot be given parseFrame: numbers past 2^53 will be rounded (bigNumbers)");
    return;
  }
  decoder.tryParse = (text) => {
    try {
      return parseFrame(text, mode);
    } catch {
      return false; // as socket.io-parser: a packet that is not JSON is refused
    }
  };
}

/** What `data` takes on the wire as one Socket.IO packet (its JSON in UTF-8, and the framing). */
function packetBytes(data) {
  return utf8.encode(JSON.stringify(data)).length + FRAMING;
}

/**
 * Whether a websocket close or a long-polling error says that what the client sent was larger
 * than the server takes: a close with code 1009 (message too big), a POST answered 413.
 */
function cutAsTooLarge(details) {
  return details?.context?.code === 1009 || details?.description === 413;
}

/**
 * How long to wait before retry number `attempt` (0, 1, ...) that the library makes itself: the
 * delay doubles from `reconnectionDelay` up to `reconnectionDelayMax`, and is spread by ±50% at
 * random, as socket.io-client spreads its own (randomizationFactor 0.5). Without the spread,
 * every client of a node that restarts would come back at the same instant, and the next node
 * would take all their handshakes as one burst (about 1.2 ms of server CPU each).
 */
export function retryDelay(attempt, options = {}) {
  const base = (options.reconnectionDelay ?? 500) * 2 ** attempt;
  const max = options.reconnectionDelayMax ?? 5000;
  return Math.min(base, max) * (0.5 + Math.random());
}

/**
 * Paces one client's requests, so that the server's rate limit slows them down rather than
 * failing them or cutting the connection: at most MAX_IN_FLIGHT wait for answers at once; after
 * a `rate_limited` answer every request waits out a pause (`retryDelay`, doubling while the
 * refusals go on) and then only one goes at a time until the server takes one again.
 */
class Pacer {
  constructor(options) {
    this.options = options;
    this.busy = 0; // requests waiting for their answers
    this.waiting = []; // resolvers of requests waiting for their turn, first come first served
    this.limited = 0; // pauses in a row: refusals since the server last took a request
    this.resumeAt = 0;
    this.timer = null;
  }

  /**
   * Resolves when the request may go; `give()` once its answer is in. `first`: ahead of the
   * others waiting (a token refresh, which must not wait for a client's hundreds of subscribes
   * and arrive after the token expired).
   */
  take(first = false) {
    if (this.waiting.length === 0 && this._free()) {
      this.busy += 1;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      if (first) this.waiting.unshift(resolve);
      else this.waiting.push(resolve);
      this._wake();
    });
  }

  /** A new connection: the server's rate limit starts afresh (a full burst), so does the pace. */
  reset() {
    this.limited = 0;
    this.resumeAt = 0;
    clearTimeout(this.timer);
    this.timer = null;
    this._wake();
  }

  give() {
    this.busy -= 1;
    this._wake();
  }

  /** The server refused a request as too fast: pause (once per round of refusals). */
  refused() {
    if (Date.now() < this.resumeAt) return; // a request of the round already paused
    this.limited += 1;
    this.resumeAt = Date.now() + retryDelay(this.limited - 1, this.options);
  }

  /** The server took a request: back to the full pace. */
  accepted() {
    this.limited = 0;
    this._wake();
  }

  /** Lets every waiting request go (they find the client closed). */
  close() {
    clearTimeout(this.timer);
    this.timer = null;
    this.resumeAt = 0;
    for (const resolve of this.waiting.splice(0)) {
      this.busy += 1;
      resolve();
    }
  }

  // `now` is read once per decision: read twice, a pause could end between the two reads,
  // and a request left waiting for the pause's end would find no timer set to wake it.
  _free(now = Date.now()) {
    return now >= this.resumeAt && this.busy < (this.limited ? 1 : MAX_IN_FLIGHT);
  }

  _wake() {
    const now = Date.now();
    while (this.waiting.length && this._free(now)) {
      this.busy += 1;
      this.waiting.shift()();
    }
    if (this.waiting.length && now < this.resumeAt && !this.timer) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this._wake();
      }, this.resumeAt - now);
    }
  }
}

/** Refusals that say "not now" rather than "not this token": the identity holds its most
 * connections (another may close), the identity provider's keys could not be fetched, the
 * server is at its connection limit (HTTP 503). A client retries them with backoff whatever its
 * token, so a fixed token does not end every subscription for good over a moment's refusal. */
const TRANSIENT_REFUSALS = new Set(["too_many_connections", "auth_unavailable", "server_busy"]);

/** Refusals no token can change (the name the feed is reached by, the page's origin): final. */
const UNTOKENED_REFUSALS = new Set(["handshake_refused"]);

// What the server's HTTP refusals of a handshake mean (docs/clients.md, "Refused connections").
const HTTP_REFUSALS = {
  400: ["handshake_refused", "the feed does not accept the name it is reached by (its Host: [server] allowed_hosts) or this page's origin ([server] cors_allowed_origins)"],
  403: ["handshake_refused", "the feed does not accept the name it is reached by (its Host: [server] allowed_hosts) or this page's origin ([server] cors_allowed_origins)"],
  413: ["too_large", "the connection's first message (its token) is larger than the server's [server] max_message_bytes"],
  503: ["server_busy", "the server is at its connection limit ([limits] max_connections)"],
};

/**
 * The server's refusal of a handshake in HTTP, from socket.io-client's `connect_error`: a
 * FeedError (`handshake_refused`, `too_large`, `server_busy`) with `data.status`, or null for
 * a failure that says nothing of the kind (the server down, a network error, a status hidden).
 *
 * What engine.io-client lets through: over long-polling, its TransportError carries the status
 * as `description` (0 where the browser hides it: a cross-origin answer without CORS headers,
 * which the server's refusals are) and the XMLHttpRequest as `context`, whose `responseText`
 * is the server's own explanation; over a websocket, Node's `ws` says "Unexpected server
 * response: 403" and a browser says nothing at all (an `error` event, then close code 1006).
 */
function httpRefusal(err) {
  if (!err || err.type !== "TransportError") return null;
  let status = typeof err.description === "number" ? err.description : null;
  if (status === null) {
    const text = String(err.description?.message ?? err.description?.error?.message ?? "");
    const found = /Unexpected server response: (\d{3})/.exec(text);
    status = found ? Number(found[1]) : null;
  }
  const known = status !== null && HTTP_REFUSALS[status];
  if (!known) return null;
  const [code, hint] = known;
  let said = "";
  try {
    said = typeof err.context?.responseText === "string" ? err.context.responseText.trim().split("\n")[0].slice(0, 300) : "";
    if (/^".*"$/.test(said)) said = JSON.parse(said); // Engine.IO's own refusals are JSON strings
  } catch {
    said = ""; // a responseText that cannot be read (a binary responseType): say what is known
  }
  // A poll's 400 is a refusal only when it says so: Engine.IO answers 400 "Invalid session" to
  // a poll or post that a balancer without sticky sessions sent to another node than the
  // handshake's, which may well work at the next attempt (and without a readable body, there
  // is no telling).
  if (status === 400 && !/is not allowed|not an accepted origin/.test(said)) return null;
  const error = new FeedError(code, `the server refused the connection with HTTP ${status}: ${said || hint}`, { code, status });
  error.refused = true;
  return error;
}

/** An error from the server (its `code` and `message`) or from the client itself. */
export class FeedError extends Error {
  constructor(code, message, data) {
    super(message);
    this.name = "FeedError";
    this.code = code;
    if (data !== undefined) this.data = data;
  }
}

/** The row key as it appears in row room names: `42`, `abc`, `7,2` for a composite key. */
/**
 * A copy of `row` with a MongoDB update description applied, as the server applied it: arrays
 * truncated, fields removed, then fields set (dotted paths; a number steps into an array, which
 * grows with nulls as MongoDB's does).
 */
export function patched(row, description) {
  const doc = structuredClone(row);
  for (const cut of description.truncatedArrays || []) {
    const found = walk(doc, String(cut.field ?? "").split("."), false);
    const items = found && child(found[0], found[1]);
    if (Array.isArray(items)) items.length = Math.min(items.length, Number(cut.newSize));
  }
  for (const path of description.removedFields || []) {
    const found = walk(doc, String(path).split("."), false);
    if (!found) continue;
    const [parent, last] = found;
    if (Array.isArray(parent)) {
      if (/^\d+$/.test(last) && Number(last) < parent.length) parent[Number(last)] = null;
    } else {
      delete parent[last];
    }
  }
  for (const [path, value] of Object.entries(description.updatedFields || {})) {
    const found = walk(doc, path.split("."), true);
    if (!found) continue;
    const [parent, last] = found;
    if (Array.isArray(parent)) {
      if (!/^\d+$/.test(last)) continue;
      while (parent.length < Number(last)) parent.push(null);
      parent[Number(last)] = value;
    } else {
      parent[last] = value;
    }
  }
  return doc;
}

function isContainer(value) {
  return value !== null && typeof value === "object";
}

function child(parent, part) {
  if (Array.isArray(parent)) return /^\d+$/.test(part) && Number(part) < parent.length ? parent[Number(part)] : null;
  return Object.hasOwn(parent, part) ? parent[part] : null;
}

// The container holding the path's last part, and that part (null: the path leads through
// something else than documents and arrays, or, unless `create`, through nothing).
function walk(doc, parts, create) {
  let node = doc;
  for (const part of parts.slice(0, -1)) {
    let next = child(node, part);
    if (next === null || next === undefined) {
      if (!create || Array.isArray(node)) return null;
      next = node[part] = {};
    }
    if (!isContainer(next)) return null;
    node = next;
  }
  return [node, parts[parts.length - 1]];
}

/**
 * The key as in a row room name: `42`, `abc`, `7,2` for a composite key, null for none.
 *
 * The server's rule (docs/protocol.md, "Row keys as text"), shared with the Python library:
 * text is itself; an array, or an object that is not one BSON value, its values joined by
 * commas; `{"$oid": ..}` and `{"$numberDecimal": ..}` their text (a Decimal128 `_id` is
 * `9.90`, as on the server); numbers as `String` writes them; a value inside a key that is an
 * object or array as `JSON.stringify` writes it.
 */
export function keyText(key) {
  if (key === null || key === undefined) return null;
  if (typeof key === "string") return key;
  if (Array.isArray(key)) return key.map(scalarText).join(",");
  if (typeof key === "object") {
    const wrapped = wrappedText(key);
    if (wrapped !== null) return wrapped;
    return Object.values(key).map(scalarText).join(",");
  }
  return scalarText(key);
}

// The text of an extended JSON object that is one value (an ObjectId, a Decimal128), else null.
function wrappedText(value) {
  const names = Object.keys(value);
  if (names.length !== 1) return null;
  const text = value[names[0]];
  return (names[0] === "$oid" || names[0] === "$numberDecimal") && typeof text === "string" ? text : null;
}

function scalarText(value) {
  if (value === null || value === undefined) return "null";
  if (typeof value === "string") return value;
  if (typeof value === "object") {
    const wrapped = Array.isArray(value) ? null : wrappedText(value);
    return wrapped !== null ? wrapped : jsonText(value);
  }
  return String(value);
}

/** JSON.stringify, but a BigInt (`bigNumbers: "bigint"`) written as the number it is, not refused. */
function jsonText(value) {
  let big = false;
  const text = JSON.stringify(value, (_key, item) => {
    if (typeof item !== "bigint") return item;
    big = true;
    return `\u0000${item}`;
  });
  return big ? text.replace(/"\\u0000(-?\d+)"/g, "$1") : text;
}

/** Whether `keys` holds one key per row, as a server with snapshot keys sends them. */
function paired(keys, rows) {
  return Array.isArray(keys) && Array.isArray(rows) && keys.length === rows.length;
}

/**
 * The key of a snapshot row from a server that does not send keys: `_id` (MongoDB), else `id`,
 * else `key` (Redis), unless told.
 */
function rowKeyOf(spec, row) {
  if (typeof spec === "function") return keyText(spec(row));
  if (typeof spec === "string") return keyText(row[spec]);
  if (Array.isArray(spec)) return spec.map((f) => scalarText(row[f])).join(",");
  for (const field of ["_id", "id", "key"]) {
    if (row && row[field] !== undefined) return keyText(row[field]);
  }
  return null;
}

/** Seconds until a JWT's `exp`, or null when the token is not a JWT with one. */
function jwtSecondsLeft(token) {
  if (typeof token !== "string") return null;
  const parts = token.replace(/^Bearer /, "").split(".");
  if (parts.length !== 3) return null;
  try {
    const text = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = text + "=".repeat((4 - (text.length % 4)) % 4);
    const json = typeof atob === "function" ? atob(padded) : Buffer.from(padded, "base64").toString("binary");
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" ? exp - Date.now() / 1000 : null;
  } catch {
    return null;
  }
}

class Emitter {
  constructor() {
    this._handlers = new Map();
  }

  /** Call `fn` on every `event`; returns this, so calls chain. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return this;
  }

  off(event, fn) {
    this._handlers.get(event)?.delete(fn);
    return this;
  }

  _emit(event, ...args) {
    for (const fn of [...(this._handlers.get(event) || [])]) {
      try {
        fn(...args);
      } catch (err) {
        // One failing handler must not break the stream for the others; report it.
        if (event !== "handler_error" && this._handlers.get("handler_error")?.size) {
          this._emit("handler_error", err, event);
        } else {
          console.error(`dbfeed-client: a "${event}" handler failed:`, err);
        }
      }
    }
  }
}

/** One connection to a feed server, shared by any number of subscriptions. */
export class FeedClient extends Emitter {
  constructor(url, options = {}) {
    super();
    // One URL, or several nodes of one feed, tried in turn (see `_nextUrl`).
    this.urls = Array.isArray(url) ? [...url] : [url];
    if (this.urls.length === 0) throw new FeedError("bad_url", "no URL given");
    this._urlIndex = 0;
    this._failed = 0; // attempts failed since the last connection (a round: one per URL)
    this._attemptFailed = false; // this attempt's failure was handled by `_onConnectError`
    this._cutAt = null; // a request this large got the connection cut (`_onDisconnect`)
    this.options = options;
    // How numbers a double would change reach the application (`parseFrame`): never rounded
    // unless asked for with "number".
    this.bigNumbers = options.bigNumbers ?? "string";
    if (!BIG_NUMBER_MODES.has(this.bigNumbers)) {
      throw new FeedError("bad_option", `bigNumbers is ${JSON.stringify(this.bigNumbers)}: "string" (the default), "bigint" or "number"`);
    }
    this.subscriptions = new Set();
    this._byRoom = new Map(); // canonical room -> Set<Subscription>
    this._orphans = []; // changes for rooms no subscription knows yet (first acks pending)
    this._closed = false;
    this._serverCloses = 0;
    this._tokenFailures = 0; // token function failures in a row (`_tokenFailed`'s backoff)
    this._failingSince = null; // when the attempts of this outage began to fail (`_unreachable`)
    this._saidUnreachable = false;
    this._connectedAt = 0;
    this._refreshTimer = null;
    this._retryTimer = null;
    this._token = typeof options.token === "string" ? options.token : null;
    this._pacer = new Pacer(options);
    this._requests = new Set(); // requests waiting for their answers (see _request)
    this._connections = 0; // connections that ended: a request asked on an earlier one is stale
    this.connected = false;
    const ioOptions = {
      forceNew: true, // a connection of its own, never one shared with other code on the page
      transports: options.transports || ["websocket", "polling"],
      reconnectionDelay: options.reconnectionDelay ?? 500,
      reconnectionDelayMax: options.reconnectionDelayMax ?? 5000,
      ...(options.path ? { path: options.path } : {}),
      // Every connection attempt is given up after `timeout` (socket.io-client's own bound is
      // 20 s), and the next node is tried (`_onConnectError`): an attempt to a node behind a
      // network partition that drops packets without closing (a blackhole: the TCP connect may
      // even succeed, through a balancer or a proxy) hangs until then, with the other nodes
      // untried. The Python library bounds its attempts by the same `timeout`.
      timeout: options.timeout ?? 10000,
      ...(options.socketOptions || {}),
      // A function, so that every reconnect asks for the current token.
      auth: (send) => {
        this._currentToken().then(
          (token) => {
            const auth = token ? { token } : {};
            const large = this._tooLarge("the token", auth);
            if (large) this._tokenTooLarge(large);
            else send(auth);
          },
          (err) => this._tokenFailed(err),
        );
      },
    };
    const factory = options.io || io;
    this.socket = factory(this.urls[0], ioOptions);
    exactNumbers(this.socket, this.bigNumbers);
    this._perRound();
    this._wire();
  }

  /**
   * The backoff applies per round of every node, not per attempt (as in the Python library):
   * a failed attempt is followed at once by one to the next node, and only a round in which
   * every node failed waits, socket.io-client's delay doubling per round. The wait before the
   * first attempt after a loss stays, so that the clients of a node that died reach the next
   * one spread over time. With one URL each attempt is a round: socket.io-client's own backoff.
   */
  _perRound() {
    const backoff = this.socket.io?.backoff;
    if (this.urls.length < 2 || typeof backoff?.duration !== "function") return;
    const duration = backoff.duration.bind(backoff);
    backoff.duration = () => (this._failed % this.urls.length ? 0 : duration());
  }

  /**
   * Round robin: the next attempt goes to the next node. After a lost connection the lost
   * node is the last one tried (it was tried first, and a dead or blackholed node held the
   * reconnect for up to `timeout`), and a node that did not answer is not tried again before
   * the others.
   */
  _nextUrl() {
    if (this.urls.length < 2 || !this.socket.io) return;
    this._urlIndex = (this._urlIndex + 1) % this.urls.length;
    this.socket.io.uri = this.urls[this._urlIndex];
  }

  /** The URL of the node this client is connected to (or trying). */
  get url() {
    return this.urls[this._urlIndex];
  }

  /**
   * The token to send: the token function's answer, when the token is a function. A function
   * that throws (its identity provider is down, say) is a FeedError `token_failed`, as in the
   * Python library, with its error as `cause`.
   */
  async _currentToken() {
    const source = this.options.token;
    if (typeof source === "function") {
      let value;
      try {
        value = await source();
      } catch (err) {
        const error = new FeedError("token_failed", `the token function raised ${err?.name || "an error"}: ${err?.message ?? err}`);
        error.cause = err;
        throw error;
      }
      this._token = typeof value === "string" && value ? value : null;
    }
    return this._token;
  }

  /**
   * The token function failed while connecting: say so, end this attempt, and try again with
   * backoff (the function may answer next time). The attempt went on without a token before,
   * as `token_unavailable`: refused by a server that requires one (an `error` more, and a
   * refusal that a fixed token never retries), and let in as `anonymous` by one that does not
   * (a client connected under another identity than its own, without a word). The Python
   * library never connects without the token it was given either.
   */
  _tokenFailed(err) {
    if (this._closed) return;
    this._emit("error", err instanceof FeedError ? err : new FeedError("token_failed", String(err)));
    if (this.socket.connected) return; // a stale call: this attempt is over already
    this.socket.disconnect(); // the engine is open, the Socket.IO connect not sent: close it
    clearTimeout(this._retryTimer);
    const delay = retryDelay(this._tokenFailures, this.options);
    this._tokenFailures += 1;
    this._retryTimer = setTimeout(() => {
      if (!this._closed) this.socket.connect();
    }, delay);
  }

  /**
   * The most bytes one message may have: the server's `maxPayload` from its Engine.IO
   * handshake ([server] max_message_bytes; socket.io-client keeps it on the engine, unexposed),
   * and less once a request of `_cutAt` bytes got the connection cut. Null when unknown.
   */
  _maxBytes() {
    const announced = this.socket.io?.engine?._maxPayload;
    const limits = [typeof announced === "number" && announced > 0 ? announced : null, this._cutAt].filter((n) => n !== null);
    return limits.length ? Math.min(...limits) : null;
  }

  /**
   * A FeedError `too_large` when `data` (with `what` it is, for the message) is larger than the
   * server takes, else null. Sent anyway, the server would cut the connection, and the client
   * would send it again after the reconnect, for ever.
   */
  _tooLarge(what, data) {
    const limit = this._maxBytes();
    const size = packetBytes(data);
    if (limit === null || size <= limit) return null;
    const message = `${what} is ${size} bytes, more than the ${limit} the server takes in one message ([server] max_message_bytes): not sent`;
    return new FeedError("too_large", message, { code: "too_large", size, limit });
  }

  /**
   * The token does not fit in a message: it was not sent. A token function may give a smaller
   * one next time: as when it fails (`_tokenFailed`), retried with backoff. A fixed token never
   * will: as a refused one, final, every subscription ends with the error.
   */
  _tokenTooLarge(error) {
    error.refused = true;
    if (typeof this.options.token === "function") {
      this._tokenFailed(error);
      return;
    }
    this._emit("error", error);
    this.socket.disconnect();
    for (const sub of [...this.subscriptions]) sub._fail(error);
  }

  _wire() {
    const socket = this.socket;
    // A new attempt's engine is open: the failure of an earlier one is no longer this one's.
    socket.io?.on?.("open", () => {
      this._attemptFailed = false;
    });
    socket.on("connect", () => this._onConnect());
    socket.on("disconnect", (reason, details) => this._onDisconnect(reason, details));
    socket.on("connect_error", (err) => this._onConnectError(err));
    socket.on("change", (change) => this._route([change]));
    socket.on("changes", (list) => this._route(Array.isArray(list) ? list : []));
    socket.on("snapshot", (chunk) => this._onChunk(chunk));
    socket.on("gap", (gap) => this._onGap(gap));
    socket.on("status", (status) => this._emit("status", status));
    socket.on("auth_expired", (notice) => {
      // The server closes this connection next; the reconnect asks for a fresh token.
      this._emit("error", new FeedError(notice?.code || "token_expired", notice?.message || "the token expired"));
    });
  }

  /** Follow a room; see docs/clients.md for the options. */
  subscribe(room, options = {}) {
    if (this._closed) throw new FeedError("closed", "this FeedClient is closed");
    if (options.since != null && options.epoch == null) {
      // Without its epoch a position cannot be resumed safely (numbers from another server run
      // mean nothing), and dropping it would miss every change after it without a word.
      throw new FeedError("bad_request", "`since` needs the `epoch` it was saved with (sub.seq and sub.epoch)");
    }
    const sub = new Subscription(this, room, options);
    this.subscriptions.add(sub);
    if (this.connected) sub._send();
    return sub;
  }

  /** The server's connectors, their targets and status. */
  async catalog() {
    const ack = await this._call("catalog", undefined);
    if (!ack || !ack.ok) throw ackError(ack);
    return ack;
  }

  /** Send a fresh token now (from the `token` function unless one is given). */
  async refresh(token) {
    const fresh = token ?? (await this._currentToken());
    const ack = await this._call("refresh", { token: fresh });
    if (!ack || !ack.ok) throw ackError(ack);
    this._token = fresh;
    this._scheduleRefresh(typeof ack.expires_in === "number" ? ack.expires_in : null);
    return ack;
  }

  /** Connect again now (after the user gave a new token, say); `force` drops a live connection. */
  reconnect(force = false) {
    if (this._closed) return;
    clearTimeout(this._retryTimer);
    if (force && this.socket.connected) this.socket.disconnect();
    if (!this.socket.connected) this.socket.connect();
  }

  close() {
    this._closed = true;
    clearTimeout(this._refreshTimer);
    clearTimeout(this._retryTimer);
    for (const sub of [...this.subscriptions]) sub._close();
    this._pacer.close();
    this._failRequests(new FeedError("closed", "this FeedClient is closed"), false);
    this.socket.disconnect();
  }

  /** Send a request and wait for its answer, paced (Pacer): `rate_limited` is retried here. */
  async _call(event, payload) {
    const timeout = this.options.timeout ?? 10000;
    const connection = this._connections;
    for (;;) {
      await this._pacer.take(event === "refresh");
      let ack;
      try {
        if (this._closed) throw new FeedError("closed", "this FeedClient is closed");
        if (this._connections !== connection) {
          // Asked on a connection that dropped while it waited for its turn: not sent, as it
          // would be on the new connection, stale (each subscription asks again for itself),
          // taking the server's rate from the requests that count. Waiting requests piled up
          // this way at every reconnect of a client with more rooms than the server's burst.
          throw new FeedError("not_connected", `the connection closed before ${event} was sent`);
        }
        ack = await this._request(event, payload, timeout);
      } catch (err) {
        this._pacer.give();
        throw err;
      }
      const limited = ack?.ok === false && ack.error?.code === "rate_limited";
      if (limited) this._pacer.refused();
      else if (ack?.ok) this._pacer.accepted();
      this._pacer.give();
      if (!limited || this._closed || !this.connected) return ack;
    }
  }

  /**
   * Emit `event` and wait for its answer. The wait is the library's own (not socket.io-client's
   * `timeout()`), so that close() ends it at once: socket.io-client keeps a request made while
   * disconnected, with its timer, to send after a reconnect, and that timer kept Node alive
   * for `timeout` ms after close(), which then failed it as a timeout. A request that went out
   * on a connection that then dropped fails with `not_connected` (the new connection knows
   * nothing of it); one made while disconnected goes out when the connection is back.
   */
  _request(event, payload, timeout) {
    return new Promise((resolve, reject) => {
      const data = payload === undefined ? [event] : [event, payload];
      const large = this._tooLarge(event, data);
      if (large) {
        reject(large);
        return;
      }
      const request = {
        event,
        size: packetBytes(data),
        sent: this.socket.connected,
        fail: (error) => {
          clearTimeout(timer);
          this._requests.delete(request);
          reject(error);
        },
      };
      const timer = setTimeout(
        () => request.fail(new FeedError("timeout", `the server did not answer ${event} within ${timeout} ms`)),
        timeout,
      );
      this._requests.add(request);
      const answer = (ack) => {
        if (!this._requests.delete(request)) return; // failed already (timeout, closed)
        clearTimeout(timer);
        resolve(ack);
      };
      if (payload === undefined) this.socket.emit(event, answer);
      else this.socket.emit(event, payload, answer);
    });
  }

  /** Fail the requests waiting for answers: all of them, or those sent on the connection that dropped. */
  _failRequests(error, sentOnly) {
    for (const request of [...this._requests]) {
      if (!sentOnly || request.sent) request.fail(new FeedError(error.code, `${request.event}: ${error.message}`));
    }
  }

  /**
   * Leave `room` on the server. A subscribe of the same room still on its way (another
   * subscription, whose canonical name is not known yet) may be answered before or after the
   * server handles this, so it may end up outside the room: it is sent again when answered.
   */
  async _leave(room) {
    for (const sub of this.subscriptions) {
      if (sub._phase === "subscribing") sub._leftWhileAsking.add(room);
    }
    return this._call("unsubscribe", { room });
  }

  _onConnect() {
    this.connected = true;
    this._failed = 0;
    this._failingSince = null;
    this._saidUnreachable = false;
    this._tokenFailures = 0;
    this._connectedAt = Date.now();
    this._pacer.reset();
    this._emit("connect");
    this._scheduleRefresh(jwtSecondsLeft(this._token));
    for (const sub of this.subscriptions) sub._send();
  }

  _onDisconnect(reason, details) {
    const was = this.connected; // socket.io-client says "disconnect" after a failed attempt too
    this.connected = false;
    this._connections += 1;
    clearTimeout(this._refreshTimer);
    if (was && cutAsTooLarge(details)) this._learnCut();
    this._failRequests(new FeedError("not_connected", "the connection closed before the server answered"), true);
    this._emit("disconnect", reason);
    for (const sub of this.subscriptions) sub._offline();
    this._orphans = [];
    if (this._closed) return;
    // Lost (not dropped by `reconnect`): the next node. A failed attempt moves on once: after
    // an engine that opened and then failed, socket.io-client says `connect_error` (which moved
    // on already) and then `disconnect`; moving on twice went back to the same node of two.
    const handled = !was && this._attemptFailed;
    this._attemptFailed = false;
    if (reason !== "io client disconnect" && !handled) {
      if (!was) this._failed += 1;
      this._nextUrl();
    }
    if (was) this._failingSince = Date.now(); // the outage begins (`_unreachable`)
    if (reason === "io server disconnect") {
      // The server closed the connection on purpose (a restart, an expired token):
      // socket.io-client does not retry that by itself, so do it with a backoff.
      this._serverCloses = Date.now() - this._connectedAt > 30000 ? 1 : this._serverCloses + 1;
      const delay = retryDelay(this._serverCloses - 1, this.options);
      this._retryTimer = setTimeout(() => {
        if (!this._closed) this.socket.connect();
      }, delay);
    }
  }

  /**
   * The server cut the connection for a message too large, though the requests were checked
   * against its limit (one it did not announce: a proxy's, say): the largest request waiting
   * for its answer is that message. From now on a request that large is not sent (it fails
   * with `too_large`), or the reconnect would send it again and be cut again, for ever.
   */
  _learnCut() {
    const sizes = [...this._requests].filter((r) => r.sent).map((r) => r.size);
    if (sizes.length === 0) return;
    this._cutAt = Math.min(this._cutAt ?? Infinity, Math.max(...sizes) - 1);
  }

  _onConnectError(err) {
    this._attemptFailed = true;
    const http = this.socket.active ? httpRefusal(err) : null;
    if (this.socket.active && !http) {
      // A transport failure: socket.io-client retries by itself, at the next node if several.
      this._failed += 1;
      this._nextUrl();
      this._unreachable(err);
      return;
    }
    // Refused by the server: in HTTP, before Socket.IO (a host name or an origin it does not
    // accept, its connection limit), or by Socket.IO (authentication, too many connections).
    let error = http;
    if (!error) {
      error = new FeedError(err?.data?.code || "refused", err?.message || "connection refused", err?.data);
      error.refused = true;
    }
    this._emit("error", error);
    const again = TRANSIENT_REFUSALS.has(error.code) || (typeof this.options.token === "function" && !UNTOKENED_REFUSALS.has(error.code));
    if (again) {
      // A token provider may have a better token next time, and a refusal that says "not now"
      // passes whatever the token: retry (unless told to wait for `reconnect()`, as the
      // dashboard does while it asks the user); keep the subscriptions.
      if (this.options.retryRefused === false || this._closed) {
        if (http) this.socket.disconnect(); // socket.io-client would retry an HTTP refusal itself
        return;
      }
      if (http) {
        // socket.io-client retries it with its backoff, at the next node if several.
        this._failed += 1;
        this._nextUrl();
        return;
      }
      // A refusal that says "not now, here" (the identity at its connections on this node,
      // a node that cannot check tokens right now): the next node at once, the backoff only
      // once a round of them all failed, as for an HTTP refusal. A refusal of the token itself
      // is the same on every node: retried where it was said, after the backoff.
      // (socket.io-client closed the engine with the refusal: `connect()` opens a new one, at
      // the manager's `uri`.)
      let delay;
      if (TRANSIENT_REFUSALS.has(error.code) && this.urls.length > 1) {
        this._failed += 1;
        this._nextUrl();
        if (this._failed % this.urls.length) delay = 0;
      }
      if (delay === undefined) {
        this._serverCloses += 1;
        delay = retryDelay(this._serverCloses, this.options);
      }
      clearTimeout(this._retryTimer);
      this._retryTimer = setTimeout(() => {
        if (!this._closed) this.socket.connect();
      }, delay);
      return;
    }
    // The same request would be refused again: stop (socket.io-client retries an HTTP refusal
    // for ever by itself, an application showed "connecting" with no reason), and end every
    // subscription with the reason. `reconnect()` tries again.
    if (http) this.socket.disconnect();
    for (const sub of [...this.subscriptions]) sub._fail(error);
  }

  /**
   * Attempts have failed for `timeout` ms without a refusal the library could read (the server
   * down, a network cut, or a refusal whose status the browser hides: see docs/clients.md,
   * "Refused connections"): say so once per outage, with the last failure, as the Python
   * library's `unreachable`; socket.io-client goes on retrying.
   */
  _unreachable(err) {
    const now = Date.now();
    if (this._failingSince === null) this._failingSince = now;
    const timeout = this.options.timeout ?? 10000;
    if (this._saidUnreachable || now - this._failingSince < timeout) return;
    this._saidUnreachable = true;
    const detail = err?.description?.message || (typeof err?.description === "number" && err.description ? `HTTP ${err.description}` : "");
    const why = [err?.message || "connection failed", detail].filter(Boolean).join(": ");
    const seconds = Math.round((now - this._failingSince) / 1000);
    this._emit("error", new FeedError("unreachable", `${this.urls.join(", ")}: no connection for ${seconds} s (${why}); still trying`));
  }

  _scheduleRefresh(secondsLeft) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    const wanted = this.options.refreshTokens !== false && typeof this.options.token === "function";
    if (secondsLeft === null || !wanted || this._closed) return;
    // Refresh with a quarter of the lifetime to spare, so a slow answer is still in time.
    const delay = Math.max(0.2, secondsLeft * 0.75) * 1000;
    this._refreshTimer = setTimeout(() => {
      this.refresh().catch((err) => {
        this._emit("error", err instanceof FeedError ? err : new FeedError("refresh_failed", String(err)));
        // Try again shortly; if the token does expire, the server closes and we reconnect.
        if (this.connected) this._scheduleRefresh(Math.max(1, secondsLeft * 0.25));
      });
    }, delay);
  }

  _register(sub, room) {
    if (!this._byRoom.has(room)) this._byRoom.set(room, new Set());
    this._byRoom.get(room).add(sub);
    const mine = this._orphans.filter((c) => c.room === room);
    if (mine.length) this._orphans = this._orphans.filter((c) => c.room !== room);
    return mine;
  }

  _unregister(sub) {
    if (sub.room && this._byRoom.get(sub.room)?.delete(sub) && this._byRoom.get(sub.room).size === 0) {
      this._byRoom.delete(sub.room);
    }
  }

  _route(changes) {
    const framed = new Set(); // those told that this frame begins (`_frame`)
    for (const change of changes) {
      if (!change || typeof change !== "object") continue;
      const subs = this._byRoom.get(change.room);
      if (subs) {
        for (const sub of subs) {
          if (!framed.has(sub)) {
            framed.add(sub);
            sub._frame();
          }
          sub._receive(change);
        }
      } else if ([...this.subscriptions].some((s) => s.room === null)) {
        // An answer to a first subscribe is on its way; the change is for that room.
        this._orphans.push(change);
        if (this._orphans.length > MAX_ORPHANS) this._orphans.shift();
      }
    }
  }

  _onChunk(chunk) {
    const subs = chunk && this._byRoom.get(chunk.room);
    if (subs) for (const sub of subs) sub._chunk(chunk);
  }

  _onGap(gap) {
    const subs = gap && this._byRoom.get(gap.room);
    if (subs) for (const sub of subs) sub._gap(gap);
    this._emit("gap", gap);
  }
}

function ackError(ack) {
  const error = (ack && ack.error) || { code: "bad_answer", message: "the server sent no valid answer" };
  return new FeedError(error.code, error.message);
}

/**
 * One followed room. Events: "snapshot" (rows, info), "change" (change), "state" (state, info),
 * "error" (FeedError). `ready` settles on the first answer: it rejects on a refused subscribe.
 */
export class Subscription extends Emitter {
  constructor(client, room, options) {
    super();
    this.client = client;
    this.requested = room;
    this.filter = options.filter || null;
    this.snapshot = Boolean(options.snapshot);
    this.keySpec = options.key;
    this.room = null; // the canonical name, from the first ack
    this.state = "pending";
    this.seq = options.since ?? null;
    this.epoch = options.epoch ?? null;
    this.rows = this.snapshot ? new Map() : null;
    this.truncated = false;
    // Changes waiting for an async iterator (`for await (const change of sub)`): at most
    // `maxQueue`; beyond that a consumer that fell behind is told so with a reload.
    this.maxQueue = options.maxQueue ?? 10000;
    this._queue = [];
    this._head = 0; // index of the next change to hand out in _queue
    this._queueing = true; // false once it overflowed with no iterator: nobody reads it
    this._waited = 0; // changes waiting when the frame being delivered arrived (`_frame`)
    this._iterated = false; // an iterator is open
    this._waiters = []; // next() calls waiting for a change
    this._error = null;
    this._attempt = 0;
    this._phase = "idle"; // idle | subscribing | chunks | ready
    this._buffer = [];
    this._chunks = null;
    this._skipOk = false;
    this._skipUpto = null; // after a snapshot: numbers up to it may be missing (`_maySkip`)
    this._fresh = false; // the next subscribe must not resume (a reload asked for new rows)
    this._ids = new Set();
    this._idOrder = [];
    this._closed = false;
    this._everReady = false;
    this._retries = 0;
    this._reloading = false;
    this._gapWhileSubscribing = null;
    this._leftWhileAsking = new Set(); // rooms left while the subscribe was on its way
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {}); // a refusal also arrives as the "error" state
  }

  /** Stop following the room. */
  async unsubscribe() {
    const room = this.room;
    const wasSubscribed = this._phase !== "idle" || this._everReady;
    this._close();
    this.client.subscriptions.delete(this);
    if (room && wasSubscribed && this.client.connected && ![...this.client.subscriptions].some((s) => s.room === room)) {
      let ack;
      try {
        ack = await this.client._leave(room);
      } catch (err) {
        // The connection dropped, or the client was closed, before the answer: either way this
        // client is out of the room (a new connection starts in none), as was asked.
        if (err instanceof FeedError && (err.code === "not_connected" || err.code === "closed")) return;
        throw err;
      }
      // `not_subscribed`: the server has this client outside the room already (its subscribe
      // since the last reconnect was refused for now and waits to be retried, or is still on
      // its way): what was asked.
      if (!ack || (!ack.ok && ack.error?.code !== "not_subscribed")) throw ackError(ack);
    }
  }

  /** Start afresh: forget the position (and rows) and subscribe again, with a new snapshot. */
  reload(reason = "asked by the application") {
    this._setState("reload", { reason });
    this._fresh = true;
    if (this.client.connected) this._send();
  }

  _close() {
    this._closed = true;
    clearTimeout(this._retryTimer); // a pending retry would keep Node alive after close()
    for (const waiter of this._waiters.splice(0)) {
      if (this._error) waiter.reject(this._error);
      else waiter.resolve({ value: undefined, done: true });
    }
    this._attempt += 1;
    this._phase = "idle";
    this.client._unregister(this);
    if (!this._everReady) this._rejectReady(new FeedError("closed", "unsubscribed before the server answered"));
  }

  _setState(state, info = {}) {
    this.state = state;
    if (state === "reload") this._reloading = true;
    else if (state !== "pending") this._reloading = false;
    this._emit("state", state, info);
  }

  _send() {
    if (this._closed) return;
    // The room as asked (with its filter), not the canonical name: older servers refuse a
    // canonical filter room passed back as `room`, and the answer names the same room anyway.
    const request = { room: this.requested };
    if (this.filter) request.filter = this.filter;
    const resuming = !this._fresh && this.seq !== null && this.epoch !== null;
    if (resuming) {
      request.since = this.seq;
      request.epoch = this.epoch;
    }
    if (this.snapshot) request.snapshot = true;
    const attempt = ++this._attempt;
    this._phase = "subscribing";
    this._buffer = [];
    this._chunks = null;
    this._skipUpto = null;
    this._gapWhileSubscribing = null;
    this._leftWhileAsking.clear();
    if (this.state !== "pending") this._setState("pending", { resuming });
    this.client._call("subscribe", request).then(
      (ack) => this._onAck(attempt, request, ack),
      (err) => this._onAck(attempt, request, { ok: false, error: { code: err.code || "timeout", message: err.message } }),
    );
  }

  _onAck(attempt, request, ack) {
    if (this._closed && ack && ack.ok && !this.client._byRoom.has(ack.room) && this.client.connected) {
      // Unsubscribed while the answer was on its way: leave the room the server put us in.
      this.client._leave(ack.room).catch(() => {});
      return;
    }
    if (attempt !== this._attempt || this._closed) return; // stale: asked again since
    if (!ack || !ack.ok) {
      const error = ackError(ack);
      if (RETRYABLE.has(error.code) && this.client.connected) {
        this._retries += 1;
        const delay = Math.min(250 * 2 ** this._retries, 10000);
        clearTimeout(this._retryTimer);
        this._retryTimer = setTimeout(() => {
          if (attempt === this._attempt && this.client.connected) this._send();
        }, delay);
        return;
      }
      this._fail(error);
      return;
    }
    this._retries = 0;
    if (this._leftWhileAsking.has(ack.room)) {
      // This client left the room (another subscription's unsubscribe) while this answer was
      // on its way: the server may have taken us out after putting us in. Ask again.
      this._send();
      return;
    }
    this.client._unregister(this);
    this.room = ack.room;
    const early = this.client._register(this, ack.room);
    this._buffer = [...early, ...this._buffer];
    // Change ids are kept whatever the epoch: they belong to the source, not to the server run,
    // so a change a restarted server reads again from its source carries the id seen before.
    this.epoch = ack.epoch ?? null;
    if (ack.recovered === true) {
      const replayed = ack.seq - request.since;
      this._finish("recovered", { replayed });
      return;
    }
    if (ack.recovered === false && !this._reloading) {
      this._setState("reload", { reason: "the server could not replay what was missed" });
    }
    this._fresh = false;
    if (Array.isArray(ack.snapshot)) {
      const total = Number.isInteger(ack.snapshot_chunks) ? ack.snapshot_chunks : 1;
      // `snapshot_keys`: each row's key as its changes carry it (absent from older servers).
      const keys = paired(ack.snapshot_keys, ack.snapshot) ? [...ack.snapshot_keys] : null;
      const upto = Number.isInteger(ack.snapshot_upto) ? ack.snapshot_upto : null; // older servers: none
      this._chunks = { rows: [...ack.snapshot], keys, next: 2, of: total, seq: ack.seq, upto, truncated: Boolean(ack.snapshot_truncated) };
      if (total > 1) {
        this._phase = "chunks";
        return;
      }
      this._applySnapshot();
      return;
    }
    this.seq = ack.seq;
    this._skipOk = false;
    this._finish("live", {});
  }

  _chunk(chunk) {
    if (this._phase !== "chunks" || !this._chunks) return;
    if (chunk.chunk !== this._chunks.next || !Array.isArray(chunk.rows)) {
      this._reloadNow(`snapshot chunk ${chunk.chunk} arrived where ${this._chunks.next} was due`);
      return;
    }
    if (this._chunks.keys && paired(chunk.keys, chunk.rows)) this._chunks.keys.push(...chunk.keys);
    else this._chunks.keys = null; // not the server's keys for every row: guess them all
    this._chunks.rows.push(...chunk.rows);
    this._chunks.next += 1;
    if (this._chunks.next > this._chunks.of) this._applySnapshot();
  }

  _applySnapshot() {
    const { rows, keys, seq, upto, truncated } = this._chunks;
    this._chunks = null;
    this.rows = new Map();
    rows.forEach((row, index) => {
      // The server's key when it sends them (exactly what its changes carry); else a guess.
      const key = keys ? (typeof keys[index] === "string" ? keys[index] : null) : rowKeyOf(this.keySpec, row);
      if (key !== null) this.rows.set(key, row);
    });
    this.truncated = truncated;
    this.seq = seq;
    // Changes the rows already reflect are not sent: numbers up to `snapshot_upto` may be
    // missing, anywhere among them (docs/protocol.md). A server older than that field: the first
    // change alone may jump.
    this._skipOk = true;
    this._skipUpto = upto;
    this._emit("snapshot", rows, { truncated, rows: this.rows });
    this._finish("live", {});
  }

  _finish(state, info) {
    this._phase = "ready";
    const first = !this._everReady;
    this._everReady = true;
    this._setState(state, info);
    if (first) this._resolveReady(this);
    const buffered = this._buffer;
    this._buffer = [];
    this._frame(); // what came while the answer or the snapshot was awaited: one frame
    for (const change of buffered) {
      if (this._phase !== "ready") break;
      this._receive(change);
    }
    const gap = this._gapWhileSubscribing;
    this._gapWhileSubscribing = null;
    if (gap && this._phase === "ready") this._gap(gap);
  }

  _receive(change) {
    if (this._closed) return;
    if (this._phase !== "ready") {
      this._buffer.push(change);
      return;
    }
    if (change.id !== undefined && this._ids.has(change.id)) return;
    const seq = change.seq;
    if (typeof seq === "number" && this.seq !== null) {
      if (seq <= this.seq) return; // already delivered (a resend after a resume)
      if (seq !== this.seq + 1 && !this._maySkip(seq)) {
        const missed = `changes ${this.seq + 1}..${seq - 1} never arrived`;
        if (this.snapshot) {
          this._reloadNow(missed);
          return;
        }
        this._setState("reload", { reason: missed });
        this._setState("live", {});
      }
    }
    if (typeof seq === "number") this.seq = seq;
    this._skipOk = false;
    this._remember(change.id);
    if (this.rows) this._apply(change);
    this._emit("change", change);
    this._enqueue(change);
  }

  /**
   * Whether `seq` may follow a hole: the holes a snapshot leaves are the changes its rows
   * reflect, all numbered up to the ack's `snapshot_upto`. They need not come first: in commit
   * order a Postgres transaction the snapshot saw as still running can come before one it saw
   * committed (a commit is written, then made visible), and counting only the first jump made
   * such a snapshot a reload ("changes a..b never arrived") with nothing missing.
   */
  _maySkip(seq) {
    if (this._skipUpto !== null) return seq <= this._skipUpto + 1;
    return this._skipOk;
  }

  /**
   * A frame of changes begins (a `change`, a `changes` batch, or what waited for the
   * subscribe's answer and snapshot): an iterating consumer has fallen behind when `maxQueue`
   * changes waited before it, not when this frame alone is longer. The consumer cannot run in
   * the middle of a frame, and the catch-up after a snapshot sends everything the room had
   * meanwhile in one (22,000 changes after a 500,000-row snapshot under 300 transactions a
   * second): counted change by change it always "fell behind", and the reload's snapshot did
   * the same for as long as the writes went on. Memory stays bounded: `maxQueue` plus a frame.
   */
  _frame() {
    this._waited = this._queue.length - this._head;
  }

  _enqueue(change) {
    const waiter = this._waiters.shift();
    if (waiter) {
      waiter.resolve({ value: change, done: false });
      return;
    }
    if (!this._queueing) return;
    const waiting = this._queue.length - this._head;
    if ((this._iterated ? this._waited : waiting) >= this.maxQueue) {
      this._queue = [];
      this._head = 0;
      this._waited = 0; // the rest of this frame starts a new backlog
      if (!this._iterated) {
        // Handlers only, no iterator yet: keep no backlog (an iterator opened later starts
        // with the changes that come after it).
        this._queueing = false;
        return;
      }
      // The consumer is too slow: drop what waits rather than grow without bound, and say so.
      this._reloadNow(`the consumer fell behind: ${waiting} waiting changes dropped`);
      return;
    }
    this._queue.push(change);
  }

  /**
   * The changes, one at a time, for `for await (const change of sub)`: handed out as fast as
   * the loop asks, at most `maxQueue` waiting (then a reload, see docs/clients.md). The loop
   * ends when the subscription is closed; it throws the error of one that failed.
   */
  [Symbol.asyncIterator]() {
    this._iterated = true;
    this._queueing = true;
    const iterator = {
      next: () => this._next(),
      return: () => {
        this._iterated = false;
        this._queueing = false;
        this._queue = [];
        this._head = 0;
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return iterator;
      },
    };
    return iterator;
  }

  _next() {
    if (this._head < this._queue.length) {
      const value = this._queue[this._head];
      this._queue[this._head] = undefined;
      this._head += 1;
      if (this._head >= 1024 && this._head * 2 >= this._queue.length) {
        this._queue = this._queue.slice(this._head); // compact now and then, not per change
        this._head = 0;
      }
      return Promise.resolve({ value, done: false });
    }
    if (this._closed) return this._error ? Promise.reject(this._error) : Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  _apply(change) {
    if (CLEARS.has(change.op)) {
      this.rows.clear();
      return;
    }
    const key = keyText(change.key);
    if (key === null) return;
    const meta = change.meta;
    const oldKey = meta && typeof meta === "object" && "old_key" in meta ? keyText(meta.old_key) : null;
    // An update that changed the row's key (a Postgres primary key): the old one is gone.
    if (oldKey !== null && oldKey !== key) this.rows.delete(oldKey);
    if (REMOVALS.has(change.op) || change.left === true) {
      this.rows.delete(key);
    } else if (change.after !== null && change.after !== undefined) {
      this.rows.set(key, change.after);
    } else if (meta && typeof meta === "object" && meta.updateDescription && typeof meta.updateDescription === "object") {
      // A MongoDB update without the document (`full_document = "off"`): what it changed.
      if (this.rows.has(key)) this.rows.set(key, patched(this.rows.get(key), meta.updateDescription));
    } else if (change.before === null || change.before === undefined) {
      // A Redis event without the value: the key exists; keep what is known of it.
      if (!this.rows.has(key)) this.rows.set(key, { key });
    } else {
      // An image withheld by the server (a row moved out of what this identity may see).
      this.rows.delete(key);
    }
  }

  _gap(gap) {
    const reason = gap.reason || "the source may have lost changes";
    if (this._phase !== "ready") {
      // Mid-subscribe: act on it once the answer (and snapshot) is in.
      this._gapWhileSubscribing = gap;
      return;
    }
    if (this.snapshot) {
      this._reloadNow(reason);
      return;
    }
    if (typeof gap.epoch === "string" && this.epoch !== null && gap.epoch !== this.epoch) {
      // The room's numbering began again (a cluster whose Redis lost the history): its next
      // change is `seq + 1` of the new epoch, and a resume must name that epoch.
      this.epoch = gap.epoch;
      if (typeof gap.seq === "number") this.seq = gap.seq;
    } else if (typeof gap.seq === "number" && (this.seq === null || gap.seq > this.seq)) {
      this.seq = gap.seq;
    }
    this._setState("reload", { reason });
    this._setState("live", {});
  }

  /**
   * Changes were, or may have been, missed: say so, and start afresh where that brings the
   * rows back (a fresh snapshot) or where no answer is in yet (a snapshot cut short). A
   * subscription without a snapshot that is answered and live (its loop fell behind) goes on
   * from where it is, `reload` then `live`, as docs/clients.md says and as the Python library
   * does: subscribing afresh instead dropped every change that came before the new answer (the
   * rest of the frame included) from the handlers too, and left `seq` to jump.
   */
  _reloadNow(reason) {
    this._setState("reload", { reason });
    if (!this.snapshot && this._phase === "ready") {
      this._setState("live", {});
      return;
    }
    this._fresh = true;
    if (this.client.connected) this._send();
  }

  _offline() {
    if (this._closed || this.state === "error") return;
    if (this._phase === "chunks") this._fresh = true; // half a snapshot: start again
    this._phase = "idle";
    this._attempt += 1;
    this._buffer = [];
    this._chunks = null;
    this._setState("pending", { reason: "disconnected" });
  }

  _fail(error) {
    if (this._closed) return;
    this._error = error;
    this._phase = "idle";
    this._setState("error", { code: error.code, message: error.message });
    this._emit("error", error);
    this._rejectReady(error);
    this._close();
    this.client.subscriptions.delete(this);
  }

  _remember(id) {
    if (id === undefined || id === null) return;
    this._ids.add(id);
    this._idOrder.push(id);
    if (this._idOrder.length > MAX_IDS) this._ids.delete(this._idOrder.shift());
  }
}
