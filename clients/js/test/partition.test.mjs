// Nodes behind a network partition that drops packets and closes nothing (a blackhole): the
// client must give up on such a node within its `timeout` and use another one, as the Python
// library does (tests/test_client_cluster.py).
import assert from "node:assert/strict";
import { test } from "node:test";

import { FeedClient } from "../index.js";
import { Blackhole } from "./blackhole.mjs";
import { record, until, withHarness } from "./harness.mjs";

const ROOM = "mem:public.orders";
// `timeout` bounds each connection attempt as well as each request: socket.io-client's own
// bound (20 s) was in use before, whatever `timeout` said.
const OPTIONS = { transports: ["websocket"], reconnectionDelay: 100, reconnectionDelayMax: 1000, timeout: 2000 };

function portOf(url) {
  return Number(new URL(url).port);
}

function assertOnceInOrder(changes, from, to) {
  const seqs = changes.map((c) => c.seq);
  assert.deepEqual(seqs, Array.from({ length: to - from + 1 }, (_, i) => from + i), "every change once, in seq order");
  assert.equal(new Set(changes.map((c) => c.id)).size, changes.length, "no id twice");
}

test("nodes [blackholed, good]: the first attempt gives up after `timeout` and the client goes live on the good one", () =>
  withHarness({}, async (h) => {
    const hole = await Blackhole.start(portOf(h.direct));
    hole.blackhole(); // TCP connects are accepted, nothing is ever answered
    const feed = new FeedClient([hole.url, h.url], OPTIONS);
    try {
      const sub = feed.subscribe(ROOM);
      const log = record(sub);
      // A 2 s timeout and a short backoff: well within 8 s (socket.io-client's default bound of
      // 20 s held the first attempt, and the good node was never tried in that time).
      await until(() => feed.connected && sub.state === "live", "live on the good node", 8000);
      assert.equal(feed.url, h.url);
      await h.write("insert", { id: 1, status: "new" });
      await until(() => log.changes.length === 1, "a change from the good node");
    } finally {
      feed.close();
      await hole.close();
    }
  }));

test("a live connection whose node is blackholed: the heartbeat notices, the client resumes on another node, `recovered`", () =>
  withHarness({ cluster: { server: "ping_interval = 1\nping_timeout = 1\n" } }, async (h) => {
    const { urls } = h;
    const hole = await Blackhole.start(portOf(urls[1]));
    const feed = new FeedClient([hole.url, urls[0]], OPTIONS);
    try {
      const sub = feed.subscribe(ROOM, { snapshot: true });
      const log = record(sub);
      await sub.ready;
      assert.equal(feed.url, hole.url);
      for (let i = 1; i <= 5; i += 1) await h.send({ cmd: "cluster_write", op: "insert", row: { id: i } });
      await until(() => log.changes.length === 5, "5 changes on the first node");

      hole.blackhole(); // half-open: neither side is told anything
      for (let i = 6; i <= 10; i += 1) await h.send({ cmd: "cluster_write", op: "insert", row: { id: i } });
      // ping_interval + ping_timeout (2 s) to notice the silence, then the other node (the lost
      // one is tried last; before, a reconnect to it gave up after `timeout` first): within 12 s.
      await until(() => log.changes.length === 10, "the changes made while cut off", 12000);
      assert.equal(feed.url, urls[0]);
      assertOnceInOrder(log.changes, 1, 10);
      assert.ok(log.states.some((s) => s.state === "recovered" && s.info.replayed === 5), JSON.stringify(log.states));
      assert.ok(!log.states.some((s) => s.state === "reload"), JSON.stringify(log.states));
      assert.equal(sub.rows.size, 10);
    } finally {
      feed.close();
      await hole.close();
    }
  }));
