// dbfeed-client's `rows` on tables not keyed by `id` (the server sends each snapshot row's key),
// and its bounded queue for a `for await` loop slower than the feed. Against the real server
// (tests/support/client_harness.py): `skus` is keyed by `sku`, `lines` by (order_id, line).
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { FeedClient } from "../index.js";
import { Harness, plainRows, record, until, withHarness } from "./harness.mjs";

const WS = { transports: ["websocket"], reconnectionDelay: 100, reconnectionDelayMax: 1000 };

const product = (sku, price) => ({ sku, name: `product ${sku}`, price });
const line = (order_id, number, qty) => ({ order_id, line: number, qty });

function writer(h, connector, target) {
  return (op, row) => h.send({ cmd: "write", connector, target, op, row });
}

async function serverRows(h, connector, target) {
  return (await h.send({ cmd: "rows", connector, target })).rows;
}

describe("rows keyed by the server's keys", () => {
  let h;
  before(async () => {
    h = await Harness.start({ config: "[server]\nreplay_buffer = 5000\nsnapshot_chunk_bytes = 1024\n" });
  });
  after(async () => {
    await h.stop();
  });

  test("a table keyed by `sku`: snapshot, insert, update, delete", async () => {
    const write = writer(h, "skus", "public.products");
    for (let i = 1; i <= 5; i += 1) await write("insert", product(`A-${i}`, i));
    await h.send({ cmd: "delivered", connector: "skus" });
    const feed = new FeedClient(h.url, WS);
    try {
      const sub = feed.subscribe("skus:public.products", { snapshot: true });
      const log = record(sub);
      await sub.ready;
      assert.deepEqual([...sub.rows.keys()].sort(), ["A-1", "A-2", "A-3", "A-4", "A-5"]);
      assert.deepEqual(plainRows(sub.rows), await serverRows(h, "skus", "public.products"));
      await write("insert", product("B-1", 10));
      await write("update", { sku: "A-2", price: 99 });
      await write("delete", { sku: "A-3" });
      await until(() => log.changes.length === 3, "insert, update, delete");
      assert.deepEqual(plainRows(sub.rows), await serverRows(h, "skus", "public.products"));
      assert.equal(sub.rows.get("A-2").price, 99);
      assert.ok(!sub.rows.has("A-3") && sub.rows.has("B-1"));
    } finally {
      feed.close();
    }
  });

  test("a composite key (order_id, line), its snapshot in chunks: snapshot, insert, update, delete", async () => {
    const write = writer(h, "lines", "public.lines");
    for (let order = 1; order <= 20; order += 1) {
      for (const number of [1, 2]) await write("insert", line(order, number, order * number));
    }
    await h.send({ cmd: "delivered", connector: "lines" });
    const feed = new FeedClient(h.url, WS);
    const chunks = [];
    feed.socket.on("snapshot", (chunk) => chunks.push(chunk));
    try {
      const sub = feed.subscribe("lines:public.lines", { snapshot: true });
      const log = record(sub);
      await sub.ready;
      assert.ok(chunks.length > 0, "the server sent the snapshot in chunks");
      assert.ok(chunks.every((c) => c.keys.length === c.rows.length), "each chunk carries its rows' keys");
      assert.equal(sub.rows.size, 40);
      assert.deepEqual(sub.rows.get("7,2"), line(7, 2, 14));
      assert.deepEqual(plainRows(sub.rows), await serverRows(h, "lines", "public.lines"));
      await write("insert", line(21, 1, 5));
      await write("update", { order_id: 7, line: 2, qty: 0 });
      await write("delete", { order_id: 3, line: 1 });
      await until(() => log.changes.length === 3, "insert, update, delete");
      assert.deepEqual(plainRows(sub.rows), await serverRows(h, "lines", "public.lines"));
      assert.equal(sub.rows.get("7,2").qty, 0);
      assert.ok(!sub.rows.has("3,1"));
    } finally {
      feed.close();
    }
  });
});

test("on a cluster node that does not read the connector, rows use the keys it relays", () =>
  withHarness({ cluster: true }, async (h) => {
    const write = (op, row) => h.send({ cmd: "cluster_write", connector: "lines", target: "public.lines", op, row });
    const rows = async () => (await h.send({ cmd: "cluster_rows", connector: "lines", target: "public.lines" })).rows;
    for (let n = 1; n <= 3; n += 1) await write("insert", line(5, n, n));
    const { url } = await h.send({ cmd: "cluster_follower", connector: "lines" });
    const feed = h.client(url, WS);
    const sub = feed.subscribe("lines:public.lines", { snapshot: true });
    const log = record(sub);
    await sub.ready;
    assert.deepEqual([...sub.rows.keys()].sort(), ["5,1", "5,2", "5,3"]);
    await write("insert", line(6, 1, 1));
    await write("update", { order_id: 5, line: 2, qty: 20 });
    await write("delete", { order_id: 5, line: 3 });
    await until(() => log.changes.length === 3, "insert, update, delete");
    assert.deepEqual(plainRows(sub.rows), await rows());
    assert.equal(sub.rows.get("5,2").qty, 20);
  }));

describe("a `for await` loop slower than the feed", () => {
  let h;
  before(async () => {
    h = await Harness.start();
  });
  after(async () => {
    await h.stop();
  });

  test("beyond maxQueue it is told to reload (nothing lost silently) and its rows stay right", async () => {
    await h.send({ cmd: "truncate", target: "public.orders" });
    const feed = new FeedClient(h.url, WS);
    try {
      const sub = feed.subscribe("mem:public.orders", { snapshot: true, maxQueue: 50 });
      const log = record(sub);
      const seen = [];
      let stop = false;
      const consumer = (async () => {
        for await (const change of sub) {
          seen.push(change);
          if (stop) break;
          await new Promise((resolve) => setTimeout(resolve, 5)); // a consumer slower than the feed
        }
      })();
      await sub.ready;
      await h.burst(1, 500);
      await until(() => log.snapshots.length >= 2 && sub.rows.size === 500 && sub.state === "live", "the reload's fresh snapshot");
      const reasons = log.states.filter((s) => s.state === "reload").map((s) => s.info.reason);
      assert.ok(reasons.some((r) => /fell behind/.test(r)), JSON.stringify(log.states));
      assert.deepEqual(plainRows(sub.rows), await h.rows());
      await h.write("update", { id: 7, status: "paid" });
      await until(() => seen.some((c) => c.key === 7), "the next change, in the loop");
      assert.equal(sub.rows.get("7").status, "paid");
      const seqs = seen.map((c) => c.seq);
      assert.deepEqual(seqs, [...new Set(seqs)].sort((a, b) => a - b), "in order, nothing twice");
      assert.ok(seen.length < 500, "what waited when it fell behind was dropped, and said so");
      stop = true;
      await h.write("update", { id: 8, status: "paid" });
      await consumer;
    } finally {
      feed.close();
    }
  });

  test("without a snapshot, a loop that fell behind gets `reload` then `live`, and the changes go on", async () => {
    // As in Python (docs/clients.md, States: "without snapshot, reload is followed by live and the
    // changes go on"). The library subscribed afresh instead: `pending`, and every change that
    // came meanwhile (the rest of the frame included) was dropped as older than the new answer,
    // from the handlers and `seq` too, not only from the loop that fell behind.
    const feed = new FeedClient(h.url, WS);
    try {
      const sub = feed.subscribe("mem:public.orders", { maxQueue: 10 });
      const log = record(sub);
      await sub.ready;
      const first = sub.seq;
      const loop = sub[Symbol.asyncIterator](); // a loop that never gets to take a change
      await h.burst(5001, 300); // frames of up to 59 changes
      const resubscribed = () => log.states.slice(1).some((s) => s.state === "pending"); // after the first answer's
      await until(() => sub.seq === first + 300 || resubscribed(), "the 300 changes");
      const states = log.states.map((s) => s.state);
      const reasons = log.states.filter((s) => s.state === "reload").map((s) => s.info.reason);
      assert.ok(reasons.length > 0 && reasons.every((r) => /fell behind/.test(r)), JSON.stringify(log.states));
      assert.ok(!resubscribed(), JSON.stringify(log.states));
      assert.equal(states[states.length - 1], "live");
      await until(() => log.changes.length === 300, "every change to the handlers");
      assert.deepEqual(
        log.changes.map((c) => c.seq),
        Array.from({ length: 300 }, (_, i) => first + 1 + i),
      );
      assert.equal(sub.seq, first + 300);
      // Its position is kept: a drop afterwards resumes, what came meanwhile replayed (the
      // Python library, which marked it to subscribe afresh, skipped those without a word).
      await h.send({ cmd: "cut" });
      await until(() => sub.state === "pending", "the drop");
      for (let i = 0; i < 5; i += 1) await h.write("insert", { id: 6001 + i, status: "new" });
      await h.send({ cmd: "restore" });
      await until(() => log.changes.length === 305, "the changes made while away");
      assert.ok(log.states.some((s) => s.state === "recovered" && s.info.replayed === 5), JSON.stringify(log.states));
      assert.deepEqual(
        log.changes.map((c) => c.seq),
        Array.from({ length: 305 }, (_, i) => first + 1 + i),
      );
      await loop.return();
    } finally {
      feed.close();
    }
  });

  test("one frame longer than maxQueue is not a consumer falling behind", async () => {
    // The loop cannot run in the middle of a frame, and the catch-up after a snapshot sends
    // all the room had meanwhile in one: counted change by change it always "fell behind".
    await h.send({ cmd: "truncate", target: "public.orders" });
    const feed = new FeedClient(h.url, WS);
    try {
      const sub = feed.subscribe("mem:public.orders", { snapshot: true, maxQueue: 5 });
      const log = record(sub);
      const seen = [];
      const consumer = (async () => {
        for await (const change of sub) {
          seen.push(change);
          if (seen.length === 60) break;
        }
      })();
      await sub.ready;
      await h.burst(1001, 60); // frames of up to 59 changes
      const reloaded = () => log.states.some((s) => s.state === "reload");
      await until(() => seen.length === 60 || reloaded(), "the 60 changes, in the loop");
      assert.ok(!reloaded(), JSON.stringify(log.states));
      await consumer;
      assert.deepEqual(
        seen.map((c) => c.seq),
        Array.from({ length: 60 }, (_, i) => seen[0].seq + i),
      );
      assert.deepEqual(plainRows(sub.rows), await h.rows());
    } finally {
      feed.close();
    }
  });

  test("within maxQueue it gets every change, once, in order", async () => {
    const feed = new FeedClient(h.url, WS);
    try {
      const sub = feed.subscribe("mem:public.customers");
      await sub.ready;
      await h.burst(1, 300, 0, "public.customers");
      const seen = [];
      for await (const change of sub) {
        seen.push(change);
        await new Promise((resolve) => setTimeout(resolve, 1));
        if (seen.length === 300) break;
      }
      assert.deepEqual(
        seen.map((c) => c.seq),
        Array.from({ length: 300 }, (_, i) => i + 1),
      );
    } finally {
      feed.close();
    }
  });

  test("handlers only (no loop): no backlog and no reload however small maxQueue is", async () => {
    const feed = new FeedClient(h.url, WS);
    try {
      const sub = feed.subscribe("mem:public.orders", { maxQueue: 10 });
      const log = record(sub);
      await sub.ready;
      const before = sub.seq;
      await h.burst(1001, 100);
      await until(() => log.changes.length === 100, "100 changes to the handler");
      assert.ok(!log.states.some((s) => s.state === "reload"), JSON.stringify(log.states));
      assert.equal(sub.seq, before + 100);
      assert.equal(sub._queue.length - sub._head, 0, "nothing kept for a loop nobody runs");
    } finally {
      feed.close();
    }
  });

  test("the loop ends when the subscription is closed", async () => {
    const feed = new FeedClient(h.url, WS);
    try {
      const sub = feed.subscribe("mem:public.orders");
      await sub.ready;
      const loop = (async () => {
        let count = 0;
        for await (const _ of sub) count += 1;
        return count;
      })();
      await sub.unsubscribe();
      assert.equal(await loop, 0);
    } finally {
      feed.close();
    }
  });
});
