// Connections the server refuses in HTTP, before Socket.IO: a host name it does not accept
// ([server] allowed_hosts), a page's origin it does not accept (cors_allowed_origins), its
// connection limit (503). socket.io-client takes them for transport failures and retries for
// ever: the client emitted no `error`, and an application showed "connecting" with no reason.
// As the Python library does (tests/test_client_refusals.py): a FeedError with the reason,
// final for a name or an origin (the same request would be refused again), retried for a 503.
import assert from "node:assert/strict";
import { connect, createServer } from "node:net";
import { test } from "node:test";

import { FeedClient } from "../index.js";
import { Harness, record, until } from "./harness.mjs";

const ROOM = "mem:public.orders";
const FAST = { reconnectionDelay: 100, reconnectionDelayMax: 500 };
const ORIGINS = '[server]\nreplay_buffer = 5000\ncors_allowed_origins = ["http://app.example"]\n';

for (const [transport, status] of [["websocket", 403], ["polling", 400]]) {
  test(`a host name the feed does not accept (${transport}): an error at once, the subscription ends, no more attempts`, async () => {
    const h = await Harness.start(); // no auth: only IP addresses and localhost by default
    await h.send({ cmd: "rename", headers: { Host: "feed.internal" } });
    const feed = new FeedClient(h.url, { ...FAST, transports: [transport] });
    const errors = [];
    feed.on("error", (err) => errors.push(err));
    try {
      const sub = feed.subscribe(ROOM);
      await until(() => sub.state === "error", "the subscription ended");
      await assert.rejects(sub.ready, (err) => err.code === "handshake_refused");
      assert.equal(sub.state, "error");
      assert.deepEqual(errors.map((e) => [e.code, e.refused, e.data.status]), [["handshake_refused", true, status]]);
      assert.match(errors[0].message, new RegExp(`HTTP ${status}: .*allowed_hosts`));
      assert.equal(feed.socket.active, false, "socket.io-client no longer retrying");
    } finally {
      feed.close();
      await h.stop();
    }
  });
}

test("a host name refused at a reconnect ends the live subscription with the reason", async () => {
  const h = await Harness.start();
  const feed = new FeedClient(h.url, { ...FAST, transports: ["polling"] });
  const errors = [];
  feed.on("error", (err) => errors.push(err.code));
  try {
    const sub = feed.subscribe(ROOM);
    const log = record(sub);
    await until(() => sub.state === "live", "live");
    // A balancer now passes the name clients reach it by, which the feed does not accept.
    await h.send({ cmd: "rename", headers: { Host: "feed.internal" } });
    await h.send({ cmd: "cut" });
    await h.send({ cmd: "restore" });
    await until(() => sub.state === "error", "the subscription ended");
    assert.deepEqual(errors, ["handshake_refused"]);
    assert.deepEqual(log.states.at(-1).info.code, "handshake_refused");
    assert.match(log.states.at(-1).info.message, /host 'feed.internal' is not allowed/);
  } finally {
    feed.close();
    await h.stop();
  }
});

test("a page origin the feed does not accept: the server's reason, over long-polling", async () => {
  const h = await Harness.start({ config: ORIGINS });
  await h.send({ cmd: "rename", headers: { Origin: "http://other.example" } });
  const feed = new FeedClient(h.url, { ...FAST, transports: ["polling"] });
  try {
    const sub = feed.subscribe(ROOM);
    await until(() => sub.state === "error", "the subscription ended");
    await assert.rejects(sub.ready, (err) => {
      assert.equal(err.code, "handshake_refused");
      assert.match(err.message, /HTTP 400: http:\/\/other\.example is not an accepted origin/);
      return true;
    });
  } finally {
    feed.close();
    await h.stop();
  }
});

// Two connections the server takes (a long-polling client needs two: its poll and its posts),
// both held by websocket clients.
const BUSY = "[limits]\nmax_connections = 2\n";

async function holders(h) {
  const held = [0, 1].map(() => new FeedClient(h.direct, { transports: ["websocket"] }));
  const subs = held.map((c) => c.subscribe(ROOM));
  await until(() => subs.every((s) => s.state === "live"), "the connections held");
  return held;
}

for (const transport of ["websocket", "polling"]) {
  test(`a server at its connection limit (${transport}): server_busy errors, retried until it has room`, async () => {
    const h = await Harness.start({ config: BUSY });
    const held = await holders(h);
    const feed = new FeedClient(h.direct, { ...FAST, transports: [transport] });
    const errors = [];
    feed.on("error", (err) => errors.push(err));
    try {
      const sub = feed.subscribe(ROOM);
      const log = record(sub);
      await until(() => errors.length >= 2, "two refusals");
      assert.ok(errors.every((e) => e.code === "server_busy" && e.data.status === 503 && e.refused), JSON.stringify(errors));
      assert.match(errors[0].message, /HTTP 503: .*connection limit/);
      assert.equal(sub.state, "pending");
      for (const c of held) c.close(); // room again
      await until(() => sub.state === "live", "live once the server has room");
      await h.write("insert", { id: 1, status: "new" });
      await until(() => log.changes.length === 1, "a change");
      assert.ok(!log.states.some((s) => s.state === "error"), JSON.stringify(log.states));
    } finally {
      for (const c of held) c.close();
      feed.close();
      await h.stop();
    }
  });
}

test("retryRefused: false: a 503 is reported once and the client waits for reconnect()", async () => {
  const h = await Harness.start({ config: BUSY });
  const held = await holders(h);
  const feed = new FeedClient(h.direct, { ...FAST, transports: ["websocket"], retryRefused: false });
  const errors = [];
  feed.on("error", (err) => errors.push(err.code));
  try {
    const sub = feed.subscribe(ROOM);
    await until(() => errors.length === 1, "the refusal");
    assert.equal(feed.socket.active, false, "no retry of its own");
    assert.equal(sub.state, "pending");
    for (const c of held) c.close();
    feed.reconnect();
    await until(() => sub.state === "live", "live after reconnect()");
    assert.deepEqual(errors, ["server_busy"]);
  } finally {
    for (const c of held) c.close();
    feed.close();
    await h.stop();
  }
});

test("a server unreachable for `timeout`: one `unreachable` error per outage, retried, and back by itself", async () => {
  // What a refusal whose status the browser hides looks like too (a websocket's, a cross-origin
  // poll's): before, nothing at all was said, for as long as it lasted.
  const h = await Harness.start();
  const feed = new FeedClient(h.url, { ...FAST, transports: ["websocket"], timeout: 1000 });
  const errors = [];
  feed.on("error", (err) => errors.push(err));
  try {
    const sub = feed.subscribe(ROOM);
    const log = record(sub);
    await until(() => sub.state === "live", "live");
    await h.send({ cmd: "cut" }); // connections dropped, new ones refused
    await until(() => errors.length === 1, "an unreachable error");
    assert.equal(errors[0].code, "unreachable");
    assert.match(errors[0].message, new RegExp(`${h.url}: no connection for \\d+ s \\(websocket error.*\\); still trying`));
    assert.ok(!errors[0].refused);
    await h.send({ cmd: "restore" });
    await until(() => log.states.at(-1).state === "recovered", "back by itself");
    assert.deepEqual(errors.map((e) => e.code), ["unreachable"], "once for the outage");
    assert.equal(sub.state, "recovered");
  } finally {
    feed.close();
    await h.stop();
  }
});

test("a 400 that is no refusal (Invalid session, from nodes behind a balancer without sticky sessions) is retried", async () => {
  // Engine.IO answers 400 to a poll that reaches another node than its handshake: taken for a
  // refused host name, it stopped the client for good, where a later attempt may land well.
  const nodes = await Harness.startMany(2);
  const ports = nodes.map((h) => Number(new URL(h.direct).port));
  let next = 0;
  const links = new Set();
  const balancer = createServer((client) => {
    const upstream = connect(ports[next++ % 2], "127.0.0.1"); // round robin, per connection
    for (const s of [client, upstream]) {
      links.add(s);
      s.on("error", () => {});
      s.on("close", () => links.delete(s));
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise((resolve) => balancer.listen(0, "127.0.0.1", resolve));
  const feed = new FeedClient(`http://127.0.0.1:${balancer.address().port}`, { ...FAST, transports: ["polling"], timeout: 1000 });
  const errors = [];
  feed.on("error", (err) => errors.push(err.code));
  try {
    const sub = feed.subscribe(ROOM);
    await until(() => errors.includes("unreachable"), "the attempts still going after `timeout`");
    assert.deepEqual(errors, ["unreachable"]);
    assert.equal(sub.state, "pending");
    assert.equal(feed.socket.active, true, "still retrying");
  } finally {
    feed.close();
    for (const s of links) s.destroy();
    await new Promise((resolve) => balancer.close(resolve));
    await Promise.all(nodes.map((h) => h.stop()));
  }
});

// One connection per identity on each node: a second one there is `too_many_connections`, which
// says "not now, here". With several nodes the client goes on to the next one, as it does for an
// HTTP 503 (tests/test_client_refusals.py has the same for the Python library).
const PER_IDENTITY = { auth: true, config: "[limits]\nconnections_per_identity = 1\n" };
const WS = { ...FAST, transports: ["websocket"] };

async function nodesWithToken() {
  const nodes = await Harness.startMany(2, PER_IDENTITY);
  const { token } = await nodes[0].send({ cmd: "token", ttl: 300 }); // one secret: valid on both
  return { nodes, token };
}

/** A client of `token`'s identity straight to `url`, live: it holds that node's one slot. */
async function holder(h, url, token) {
  const held = h.client(url, { ...WS, token });
  const sub = held.subscribe(ROOM);
  await until(() => sub.state === "live", "the identity's connection held");
  return held;
}

test("nodes [A, B], A refusing too_many_connections: the client connects to B at once", async () => {
  // Before, A was retried alone, for ever (the backoff doubling to reconnectionDelayMax).
  const { nodes, token } = await nodesWithToken();
  const [a, b] = nodes;
  try {
    await holder(a, a.direct, token);
    const errors = [];
    const started = Date.now();
    const feed = a.client([a.url, b.url], { ...WS, token });
    feed.on("error", (err) => errors.push(err.code));
    const sub = feed.subscribe(ROOM);
    await until(() => sub.state === "live", "live on B", 10000);
    const took = Date.now() - started;
    console.log(`connected and live on B ${took} ms after the start, A refusing`);
    assert.equal(feed.url, b.url);
    assert.deepEqual(errors, ["too_many_connections"]);
    assert.ok(took < 2000, `live after ${took} ms`);
  } finally {
    await Promise.all(nodes.map((h) => h.stop()));
  }
});

test("nodes [A, B]: a reconnect refused too_many_connections by B goes back to A once A is back", async () => {
  // Before, B was retried alone until its other connection closed.
  const { nodes, token } = await nodesWithToken();
  const [a, b] = nodes;
  try {
    const errors = [];
    const feed = a.client([a.url, b.url], { ...WS, token });
    feed.on("error", (err) => errors.push(err.code));
    const sub = feed.subscribe(ROOM);
    const log = record(sub);
    await until(() => sub.state === "live", "live on A");
    await holder(b, b.direct, token);
    await a.send({ cmd: "cut" }); // A's connections dropped, new ones refused for now
    await until(() => errors.includes("too_many_connections"), "B's refusal");
    await a.send({ cmd: "restore" });
    const restored = Date.now();
    await until(() => log.states.at(-1)?.state === "recovered", "recovered on A", 10000);
    console.log(`back on A ${Date.now() - restored} ms after it came back`);
    assert.equal(feed.url, a.url);
    await a.write("insert", { id: 1, status: "new" });
    await until(() => log.changes.length === 1, "a change on A");
  } finally {
    await Promise.all(nodes.map((h) => h.stop()));
  }
});

test("nodes [A, B], a bad token: final, as with one node", async () => {
  const nodes = await Harness.startMany(2, PER_IDENTITY);
  try {
    const errors = [];
    const feed = nodes[0].client(nodes.map((h) => h.url), { ...WS, token: "not-a-valid-token" });
    feed.on("error", (err) => errors.push(err.code));
    const sub = feed.subscribe(ROOM);
    await until(() => sub.state === "error", "the subscription ended");
    assert.deepEqual(errors, ["invalid_token"]);
    assert.equal(feed.socket.active, false, "no more attempts");
    assert.equal(feed.url, nodes[0].url);
  } finally {
    await Promise.all(nodes.map((h) => h.stop()));
  }
});
