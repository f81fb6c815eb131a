// Integers past 2^53 (Postgres `bigint` snowflake ids) against a real Postgres and the real
// server: JSON.parse rounds 9007199254740993 to 9007199254740992, so a change's key named
// another row than the snapshot's (one id became two rows, two ids one) without a word.
import assert from "node:assert/strict";
import { test } from "node:test";

import { FeedClient, keyText, parseFrame } from "../index.js";
import { Harness, WAIT, record, until } from "./harness.mjs";

const SETUP = `CREATE TABLE public.t (id bigint PRIMARY KEY, n numeric, note text);
INSERT INTO public.t VALUES (9007199254740993, 12345678901234567890.5, 'odd'),
                            (9007199254740992, 1.5, 'even'), (7, 2, 'small');`;

/** A harness whose feed follows `public.t` on a real Postgres (tests/support/pg_harness.py). */
async function withPostgres(mode, body) {
  const h = new Harness();
  try {
    const { url } = await h.send({ cmd: "pg_start", setup: SETUP, tables: ["public.t"], mode });
    h.url = url;
    return await body(h);
  } finally {
    await h.stop();
  }
}

async function follow(h, options) {
  const feed = h.client(h.url, { transports: ["websocket"], ...options });
  const sub = feed.subscribe("pg:public.t", { snapshot: true });
  const log = record(sub);
  await sub.ready;
  await h.send({ cmd: "pg_sql", sql: "INSERT INTO public.t VALUES (9007199254740995, 0, 'new')" });
  await h.send({ cmd: "pg_sql", sql: "UPDATE public.t SET note = 'changed' WHERE id = 9007199254740993" });
  await until(() => log.changes.length >= 2, "the insert and the update", WAIT);
  return { sub, log };
}

for (const mode of ["notify", "logical"]) {
  test(`a bigint id past 2^53 keeps every digit: rows, keys and changes (default: text; ${mode} mode)`, async () => {
    await withPostgres(mode, async (h) => {
      const { sub, log } = await follow(h, {});
      assert.deepEqual([...sub.rows.keys()].sort(), ["7", "9007199254740992", "9007199254740993", "9007199254740995"]);
      assert.equal(sub.rows.get("9007199254740993").note, "changed");
      assert.equal(sub.rows.get("9007199254740992").note, "even");
      assert.equal(sub.rows.get("9007199254740993").id, "9007199254740993");
      assert.equal(sub.rows.get("7").id, 7); // a safe integer stays a number
      const [insert, update] = log.changes;
      assert.equal(insert.key, "9007199254740995");
      assert.equal(insert.after.id, "9007199254740995");
      assert.equal(update.key, "9007199254740993");
      // numeric is text on the wire already: every digit
      assert.equal(sub.rows.get("9007199254740993").n, "12345678901234567890.5");
    });
  });
}

test("bigNumbers: 'bigint' gives BigInt values, the rows keyed by their exact text", async () => {
  await withPostgres("notify", async (h) => {
    const { sub, log } = await follow(h, { bigNumbers: "bigint" });
    assert.deepEqual([...sub.rows.keys()].sort(), ["7", "9007199254740992", "9007199254740993", "9007199254740995"]);
    assert.equal(sub.rows.get("9007199254740993").id, 9007199254740993n);
    assert.equal(log.changes[0].key, 9007199254740995n);
    assert.equal(log.changes[0].after.id, 9007199254740995n);
    assert.equal(sub.rows.get("7").id, 7);
  });
});

test("parseFrame: plain JSON.parse unless a number would lose digits", () => {
  const text = '{"a":"12345678901234567890","b":9007199254740993,"c":-9223372036854775808,"d":7,' +
    '"e":0.1,"f":0.30000000000000004,"g":12345678901234567.5,"h":[1e300,9007199254740991],' +
    '"i":"x\\"12345678901234567\\\\","j":1.50000000000000000000,"k":-0.0000000000000000001}';
  assert.deepEqual(parseFrame(text, "string"), {
    a: "12345678901234567890",
    b: "9007199254740993",
    c: "-9223372036854775808",
    d: 7,
    e: 0.1,
    f: 0.30000000000000004,
    g: "12345678901234567.5",
    h: [1e300, 9007199254740991],
    i: 'x"12345678901234567\\',
    j: 1.5,
    k: -1e-19,
  });
  const big = parseFrame(text, "bigint");
  assert.equal(big.b, 9007199254740993n);
  assert.equal(big.c, -9223372036854775808n);
  assert.equal(big.g, "12345678901234567.5"); // no BigInt has a fraction
  assert.equal(big.a, "12345678901234567890");
  // A string that begins with U+0000 is still itself in bigint mode.
  assert.deepEqual(parseFrame('["\\u000012345678901234567890",12345678901234567890]', "bigint"), [
    "\u000012345678901234567890",
    12345678901234567890n,
  ]);
  assert.equal(parseFrame("[9007199254740993]", "number")[0], 9007199254740992);
  assert.throws(() => parseFrame("[9007199254740993", "string"), SyntaxError);
  // Not JSON, refused in linear time: an unterminated string of 300 KB took 100 s when the
  // search started again inside it at every character.
  const started = performance.now();
  assert.throws(() => parseFrame(`["${'a\\"'.repeat(100000)}1234567890123456789`, "bigint"), SyntaxError);
  assert.ok(performance.now() - started < 2000, `${performance.now() - started} ms`);
  assert.throws(() => new FeedClient("http://127.0.0.1:1", { bigNumbers: "float" }), /bigNumbers/);
  // A key that holds a BigInt, even inside a document (a MongoDB _id): the server's text.
  const key = parseFrame('{"_id":{"shard":{"n":9007199254740993},"at":1}}', "bigint")._id;
  assert.equal(keyText(key), '{"n":9007199254740993},1');
  assert.equal(keyText(parseFrame("[9007199254740993,7]", "bigint")), "9007199254740993,7");
});

// Random documents: strings full of digits, quotes, backslashes and U+0000, numbers of every
// size: parseFrame gives what JSON.parse gives, but for the numbers a double would change.
test("parseFrame on random documents: every number exact, every string itself", () => {
  let seed = 7;
  const random = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
  const pick = (list) => list[Math.floor(random() * list.length)];
  const PIECES = ["7", "12345678901234567", '"', "\\", "\u0000", "é", "\n", ".", "-", " ", "9007199254740993"];
  function value(depth) {
    const kind = depth > 3 ? pick(["int", "big", "string", "float"]) : pick(["int", "big", "string", "float", "list", "object"]);
    if (kind === "int") { const n = Math.floor((random() - 0.5) * 2 ** 53); return [String(n), n, n]; }
    if (kind === "float") {
      // As Python writes a float: a whole one past 2^53 with an exponent, never as an integer
      const n = (random() - 0.5) * 10 ** Math.floor(random() * 40 - 20);
      return [Math.abs(n) >= 2 ** 53 ? n.toExponential() : String(n), n, n];
    }
    if (kind === "big") {
      const digits = String(2n ** 53n + BigInt(Math.floor(random() * 2 ** 53)) * BigInt(1 + Math.floor(random() * 100000)));
      const text = random() < 0.5 ? `-${digits}` : digits;
      return [text, text, BigInt(text)];
    }
    if (kind === "string") {
      const s = Array.from({ length: Math.floor(random() * 6) }, () => pick(PIECES)).join("");
      return [JSON.stringify(s), s, s];
    }
    const items = Array.from({ length: Math.floor(random() * 4) }, () => value(depth + 1));
    if (kind === "list") return [`[${items.map((i) => i[0]).join(",")}]`, items.map((i) => i[1]), items.map((i) => i[2])];
    const names = items.map(() => Array.from({ length: 3 }, () => pick(PIECES)).join(""));
    const entries = (k) => Object.fromEntries(items.map((item, i) => [names[i], item[k]]));
    return [`{${items.map((item, i) => `${JSON.stringify(names[i])}:${item[0]}`).join(",")}}`, entries(1), entries(2)];
  }
  for (let i = 0; i < 2000; i++) {
    const [text, asText, asBigint] = value(0);
    const wrapped = `[${text}]`;
    assert.deepEqual(parseFrame(wrapped, "string"), [asText], wrapped);
    assert.deepEqual(parseFrame(wrapped, "bigint"), [asBigint], wrapped);
  }
});
