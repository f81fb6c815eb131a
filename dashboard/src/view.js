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
      if (mark > 0) subs.push({ room: value.slice(0, mark), filter: value.slice(mark + 1) || null });
      else subs.push({ room: value, filter: null });
    } else if (name === "filter" && current && value) {
      current.filter = current.filter ? `${current.filter}&${value}` : value;
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
    const items = value.trim().replace(/^\(|\)$/g, "").split(",").map((v) => v.trim());
    return `${name}=in.(${items.filter((v) => v !== "").map(quote).join(",")})`;
  }
  return `${name}=${op}.${quote(value.trim())}`;
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

export function isAuthRefusal(error) {
  const code = error && error.data && error.data.code;
  if (typeof code === "string") return AUTH_CODES.has(code) || /auth|token/i.test(code);
  const message = (error && error.message) || "";
  return /auth|token|unauthori[sz]ed|forbidden|credential/i.test(message);
}
