// Several nodes: the attempts go round them in turn, and the backoff waits per round of them
// all, as in the Python library (tests/test_client_cluster.py).
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { test } from "node:test";

import { Blackhole } from "./blackhole.mjs";
import { record, until, withHarness } from "./harness.mjs";

const ROOM = "mem:public.orders";

function portOf(url) {
  return Number(new URL(url).port);
}

/** The URL of a port nobody listens on: connections to it are refused at once. */
async function downUrl() {
  const server = createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return `http://127.0.0.1:${port}`;
}

test("after losing its node the client tries the other nodes before that one", () =>
  withHarness({ cluster: true }, async (h) => {
    const { urls } = h;
    const hole = await Blackhole.start(portOf(urls[1]));
    try {
      const options = { transports: ["websocket"], reconnectionDelay: 100, reconnectionDelayMax: 1000, timeout: 8000 };
      const feed = h.client([hole.url, urls[0]], options);
      const sub = feed.subscribe(ROOM);
      const log = record(sub);
      await sub.ready;
      for (let i = 1; i <= 5; i += 1) await h.send({ cmd: "cluster_write", op: "insert", row: { id: i } });
      await until(() => log.changes.length === 5, "5 changes on the first node");

      // The node's host goes down: the connection is reset, new ones are never answered.
      hole.blackhole();
      hole.drop();
      await until(() => sub.state === "pending", "the drop");
      const lostAt = Date.now();
      for (let i = 6; i <= 10; i += 1) await h.send({ cmd: "cluster_write", op: "insert", row: { id: i } });
      await until(() => log.changes.length === 10, "the changes made while away", 15000);
      const took = Date.now() - lostAt;
      assert.equal(hole.links.size, 0, "the client tried the lost node again first");
      // Well within the 8 s an attempt on the lost node waits for its answer.
      assert.ok(took < 4000, `live again on the other node ${took} ms after the loss`);
      assert.equal(feed.url, urls[0]);
      assert.deepEqual(log.changes.map((c) => c.seq), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
      assert.ok(log.states.some((s) => s.state === "recovered" && s.info.replayed === 5), JSON.stringify(log.states));
    } finally {
      await hole.close();
    }
  }));

test("nodes [down, down, up]: the backoff waits after a round of every node, not after each one", () =>
  withHarness({}, async (h) => {
    const urls = [await downUrl(), await downUrl(), h.url];
    const started = Date.now();
    // socket.io-client waited 1 to 3 s, then 2 to 6 s, before it tried the third node.
    const feed = h.client(urls, { transports: ["websocket"], reconnectionDelay: 2000, reconnectionDelayMax: 8000 });
    await until(() => feed.connected, "connected", 15000);
    const took = Date.now() - started;
    assert.equal(feed.url, h.url);
    assert.ok(took < 1000, `connected after ${took} ms`);
  }));
