// Pure helpers: what the page address says, how a filter is written, how two images differ.
// Nothing here touches the DOM or the socket, so the rules are easy to read in one place.

export const OPERATORS = ["eq", "neq", "lt", "lte", "gt", "gte", "in"];
const CONDITION_VALUE = new RegExp(`^(${OPERATORS.join("|")})\\.`);

// Subscriptions from a query string: `?room=main:public.orders&filter=status=eq.paid&room=...`.
// A `filter` belongs to the `room` before it. A hand-typed filter with several conditions
// (`&filter=status=eq.paid&amount=gt.100`) splits into extra parameters; any parameter whose
// value starts with an operator (`amount=gt.100`) is read as one more condition of that filter.
export function subscriptionsFromQuery(search) {
  const subs = [];
  for (const [name, value] of new URLSearchParams(search)) {
    const current = subs[subs.length - 1];
    if (name === "room") {
      if (!value) continue;
      // A canonical filter-room name (`main:public.orders?status=eq.paid`) also works.
      const mark = value.indexOf("?");
      if (mark > 0) subs.push({ room: value.slice(0, mark), filter: value.slice(mark + 1) || null, snapshot: false });
      else subs.push({ room: value, filter: null, snapshot: false });
    } else if (name === "filter" && current && value) {
      current.filter = current.filter ? `${current.filter}&${value}` : value;
    } else if (name === "snapshot" && current && !CONDITION_VALUE.test(value)) {
      // `&snapshot=1` (or `true`, or bare `&snapshot`): start with the room's current rows.
      current.snapshot = !["0", "false", "no"].includes(value.toLowerCase());
    } else if (current && current.filter !== null && CONDITION_VALUE.test(value)) {
      current.filter = `${current.filter}&${name}=${value}`;
    }
  }
  return dedupe(subs);
}

export function queryFromSubscriptions(subs) {
  const params = new URLSearchParams();
  for (const sub of subs) {
    params.append("room", sub.room);
    if (sub.filter) params.append("filter", sub.filter);
    if (sub.snapshot) params.append("snapshot", "1");
  }
  // Readable and still unambiguous: only `&` inside a filter has to stay escaped (%26).
  const text = params.toString().replace(/%3A/gi, ":").replace(/%2C/gi, ",").replace(/%3D/gi, "=")
    .replace(/%28/gi, "(").replace(/%29/gi, ")");
  return text ? `?${text}` : "";
}

export function subscriptionKey(sub) {
  return `${sub.room}\n${sub.filter || ""}`;
}

function dedupe(subs) {
  const seen = new Set();
  return subs.filter((sub) => {
    const key = subscriptionKey(sub);
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
}

// One PostgREST-style condition, quoting the value the way the server unquotes it.
export function conditionText(field, op, value) {
  const name = encodeURIComponent(field.trim());
  if (op === "in") {
    const items = listItems(value.trim().replace(/^\(|\)$/g, ""));
    return `${name}=in.(${items.filter((v) => v !== "").map(quote).join(",")})`;
  }
  return `${name}=${op}.${quote(value.trim())}`;
}

// The items of a typed `in` list: split at commas, except inside double quotes, which (as in
// PostgREST) hold an item that has commas of its own: `"Smith, John", Ada`. `\"` and `\\` stand
// for a quote and a backslash inside quotes. Each item is then percent-encoded whole, so its
// commas reach the server as part of the value.
export function listItems(text) {
  const items = [];
  let item = "";
  let quoted = false;
  let wasQuoted = false;
  for (let i = 0; i < text.length; i += 1) {
    const ch = text[i];
    if (quoted) {
      if (ch === "\\" && i + 1 < text.length) {
        i += 1;
        item += text[i];
      } else if (ch === '"') quoted = false;
      else item += ch;
    } else if (ch === '"' && item.trim() === "") {
      quoted = true;
      wasQuoted = true;
      item = "";
    } else if (ch === ",") {
      items.push(wasQuoted ? item : item.trim());
      item = "";
      wasQuoted = false;
    } else if (!(wasQuoted && ch.trim() === "")) {
      item += ch;
    }
  }
  items.push(wasQuoted ? item : item.trim());
  return items;
}

function quote(value) {
  return encodeURIComponent(value).replace(/%3A/gi, ":").replace(/%40/gi, "@").replace(/%2B/gi, "+");
}

// The room a form asks for. Redis row rooms are the key itself (`cache:session:abc`), every
// other source names the target and then the key (`main:public.orders:42`).
export function roomFor(connector, type, target, key) {
  if (!key) return `${connector}:${target}`;
  if (type === "redis") return `${connector}:${key}`;
  return `${connector}:${target}:${key}`;
}

// Field-by-field comparison of a change's before and after images, for the detail view.
export function diffImages(before, after) {
  const fields = [];
  const seen = new Set();
  for (const image of [after, before]) {
    if (!image || typeof image !== "object") continue;
    for (const field of Object.keys(image)) {
      if (!seen.has(field)) {
        seen.add(field);
        fields.push(field);
      }
    }
  }
  return fields.map((field) => {
    const hasBefore = !!before && Object.hasOwn(before, field);
    const hasAfter = !!after && Object.hasOwn(after, field);
    const b = hasBefore ? before[field] : undefined;
    const a = hasAfter ? after[field] : undefined;
    // Only an update has two images to compare; an insert or delete is new or gone as a whole.
    const both = !!before && !!after;
    const changed = both && (hasBefore !== hasAfter || JSON.stringify(b) !== JSON.stringify(a));
    return { field, before: b, after: a, hasBefore, hasAfter, changed };
  });
}

export function showValue(value) {
  if (value === undefined) return "";
  if (typeof value === "string") return value;
  return JSON.stringify(value);
}

// At most `limit` characters of a text, and how many were left out: a field of megabytes drawn
// whole makes the page hundreds of thousands of pixels tall and selecting its row take seconds.
export function clip(text, limit) {
  if (text.length <= limit) return { text, omitted: 0 };
  return { text: text.slice(0, limit), omitted: text.length - limit };
}

// What the detail view says about a change's images. Only an insert is new and only a delete
// is gone: an update from a source that sends no before image (Redis: `set`, `expire`, ...)
// is neither, and saying "New" of a key that has existed for hours would be wrong.
export function imagesNote(op, before, after, changed) {
  if (op === "snapshot") return "The row as it was when the subscription began (snapshot), not a change.";
  const hasBefore = !!before;
  const hasAfter = !!after;
  if (!hasBefore && !hasAfter) return "The source sent no row images.";
  if (!hasBefore) return op === "insert" ? "New: no before image." : "The source sent no before image.";
  if (!hasAfter) return op === "delete" ? "Gone: no after image." : "The source sent no after image.";
  return changed.length ? `Changed: ${changed.join(", ")}` : "No field changed.";
}

// Refusals that mean "give me a (different) token", as opposed to "the server is unreachable" or
// "too many connections". The server sends a machine-readable code with each refusal.
const AUTH_CODES = new Set([
  "auth_required",
  "invalid_token",
  "bad_auth",
  "token_expired",
  "token_not_yet_valid",
  "wrong_audience",
  "wrong_issuer",
  "bad_signature",
]);

// Refusals about authentication that no other token would change: the server cannot check
// tokens right now. Not a reason to ask the user for one.
const NOT_THE_TOKEN = new Set(["auth_unavailable"]);

export function isAuthRefusal(error) {
  const code = error && error.data && error.data.code;
  if (typeof code === "string") {
    return !NOT_THE_TOKEN.has(code) && (AUTH_CODES.has(code) || /auth|token/i.test(code));
  }
  const message = (error && error.message) || "";
  return /auth|token|unauthori[sz]ed|forbidden|credential/i.test(message);
}
