// dbfeed-client's requests against the real feed server: many rooms on one client, and rooms
// left and joined at once (the same scenarios as tests/test_client_requests.py).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import { FeedError } from "../index.js";
import { until, withHarness } from "./harness.mjs";

const ROOM = "mem:public.orders";
const WS = { transports: ["websocket"], reconnectionDelay: 100, reconnectionDelayMax: 1000 };
// A small burst, so that a client with a hundred-odd rooms goes past it.
const LIMITED =
  "[server]\nreplay_buffer = 5000\nmax_subscriptions = 300\n" +
  "[limits]\nsubscribe_burst = 10\nsubscribe_rate = 50.0\n";
const ROOMS = 130; // past the burst, and refusals in a row enough to be cut off (100) if all went at once

function timeLimit(promise, ms, what) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

test("more rooms than the server's burst: paced, never cut off, and unsubscribes do not throw", () =>
  withHarness({ config: LIMITED }, async (h) => {
    const feed = h.client(h.url, WS);
    const disconnects = [];
    feed.on("disconnect", (reason) => disconnects.push(reason));
    const subs = Array.from({ length: ROOMS }, (_, i) => feed.subscribe(`${ROOM}:${i + 1}`));
    await timeLimit(Promise.all(subs.map((sub) => sub.ready)), 30000, "every subscription");
    assert.deepEqual(disconnects, []);
    assert.ok(subs.every((sub) => sub.state === "live"));

    let got = 0;
    subs[ROOMS - 1].on("change", () => (got += 1));
    await h.write("insert", { id: ROOMS, status: "paid" });
    await until(() => got === 1, "a change in the last row room");

    await timeLimit(Promise.all(subs.map((sub) => sub.unsubscribe())), 30000, "every unsubscribe");
    assert.deepEqual(disconnects, []);
    assert.equal(feed.subscriptions.size, 0);
  }));

test("a room left while another subscribe to it is answered still delivers to the new one", () =>
  withHarness({}, async (h) => {
    const feed = h.client(h.url, WS);
    const first = feed.subscribe(ROOM);
    await first.ready;
    const second = feed.subscribe(ROOM, { snapshot: true }); // sent at once, before the unsubscribe
    await first.unsubscribe();
    await second.ready;
    let got = 0;
    second.on("change", () => (got += 1));
    await h.write("insert", { id: 1, status: "new" });
    await until(() => got === 1, "the change, in the room the first subscription left");
    assert.equal(second.rows.get("1").status, "new");
  }));

test("a position without its epoch is refused rather than dropped; with it, the client resumes", () =>
  withHarness({}, async (h) => {
    const feed = h.client(h.url, WS);
    const first = feed.subscribe(ROOM);
    await first.ready;
    const seen = [];
    first.on("change", (change) => seen.push(change.seq));
    for (const id of [1, 2, 3]) await h.write("insert", { id, status: "new" });
    await until(() => seen.length === 3, "three changes");
    const epoch = first.epoch;
    await first.unsubscribe();
    assert.throws(
      () => feed.subscribe(ROOM, { since: 1 }),
      (err) => err instanceof FeedError && err.code === "bad_request" && /epoch/.test(err.message),
    );
    const resumed = feed.subscribe(ROOM, { since: 1, epoch });
    const replayed = [];
    resumed.on("change", (change) => replayed.push(change.seq));
    await resumed.ready;
    assert.equal(resumed.state, "recovered");
    await until(() => replayed.length === 2, "the two changes after 1");
    assert.deepEqual(replayed, [2, 3]);
  }));

test("a change sent again by a restarted server (a new epoch) is dropped by its id", () =>
  withHarness({}, async (h) => {
    const feed = h.client(h.url, WS);
    const sub = feed.subscribe(ROOM);
    const got = [];
    const states = [];
    sub.on("change", (change) => got.push(change.id));
    sub.on("state", (state) => states.push(state));
    await sub.ready;
    const first = (await h.write("insert", { id: 1, status: "new" })).change;
    await until(() => got.length === 1, "the first change");
    const epoch = sub.epoch;
    await h.send({ cmd: "restart" });
    await until(() => sub.epoch !== epoch && sub.state === "live", "the restarted server's answer");
    await h.send({ cmd: "redeliver", id: first.id }); // the new run reads it again
    const second = (await h.write("insert", { id: 2, status: "new" })).change;
    await until(() => got.includes(second.id), "the second change");
    assert.deepEqual(got, [first.id, second.id]);
    assert.ok(states.includes("reload"));
  }));

/** Run `script` in a Node process of its own, which prints "closed" when it closes its client:
 * the process must then end, with 0, within 2 s (nothing left keeping Node up). Its output. */
async function endsSoonAfterClose(script) {
  const child = spawn(process.execPath, ["--input-type=module", "-e", script], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  let closedAt = null;
  child.stdout.on("data", (d) => {
    out += d;
    if (closedAt === null && out.includes("closed")) closedAt = Date.now();
  });
  child.stderr.on("data", (d) => (out += d));
  const exited = new Promise((resolve) => child.on("exit", (code) => resolve(code)));
  try {
    const code = await timeLimit(exited, 20000, `the script to end:\n${out}`);
    assert.equal(code, 0, out);
    assert.ok(closedAt !== null, out);
    assert.ok(Date.now() - closedAt < 2000, `exited ${Date.now() - closedAt} ms after close()`);
    return out;
  } finally {
    child.kill();
  }
}

test("close() ends a subscription's pending retry, so Node can exit at once", () =>
  withHarness({ config: "[limits]\nmax_rooms = 1\n" }, async (h) => {
    // The server's one row or filter room is taken and followed: a subscribe to another is
    // refused as server_busy, a refusal the library retries after a doubling delay. A retry
    // timer left behind by close() kept the process alive for up to that delay (10 s at most).
    const holder = h.client(h.url, WS);
    await holder.subscribe(`${ROOM}:99`).ready;
    const library = fileURLToPath(new URL("../index.js", import.meta.url));
    const script = `
      const { FeedClient } = await import(${JSON.stringify(library)});
      const feed = new FeedClient(${JSON.stringify(h.url)}, { transports: ["websocket"] });
      const sub = feed.subscribe("${ROOM}:1");
      sub.ready.catch(() => {});
      let refused = 0;
      const original = sub._onAck.bind(sub);
      sub._onAck = (attempt, request, ack) => {
        if (ack && ack.ok === false && ack.error.code === "server_busy") refused += 1;
        original(attempt, request, ack);
        if (refused === 4) {
          feed.close();
          console.log("closed");
        }
      };
    `;
    // The fifth retry would have waited 8 s; the process ends as soon as the client is closed.
    await endsSoonAfterClose(script);
  }));

test("close() ends the requests waiting for an answer at once (`closed`), so Node can exit", () =>
  withHarness({}, async (h) => {
    // A request made while the connection is down waits for it (socket.io-client keeps it, to
    // send after a reconnect). Its wait, socket.io-client's own timer, outlived close(): Node
    // stayed up for `timeout` ms, and the request then failed as a timeout, not as closed.
    await h.send({ cmd: "cut" }); // connections refused: the client never connects
    const library = fileURLToPath(new URL("../index.js", import.meta.url));
    const script = `
      const { FeedClient } = await import(${JSON.stringify(library)});
      const feed = new FeedClient(${JSON.stringify(h.url)}, { transports: ["websocket"], timeout: 15000 });
      const answer = feed.catalog().then(() => "answered", (err) => err.code);
      setTimeout(async () => {
        feed.close();
        console.log("closed");
        console.log("catalog: " + (await answer));
      }, 300);
    `;
    assert.match(await endsSoonAfterClose(script), /catalog: closed/);
  }));

test("requests cut off by a dropped connection: unsubscribe resolves (the room is left), others fail as not_connected", () =>
  withHarness({}, async (h) => {
    const feed = h.client(h.url, WS);
    const gone = feed.subscribe(`${ROOM}:1`);
    const kept = feed.subscribe(`${ROOM}:2`);
    await Promise.all([gone.ready, kept.ready]);
    const heard = [];
    gone.on("change", (c) => heard.push(c));
    // The connection drops just as the request goes out, before any answer can come.
    let cut = null;
    feed.socket.onAnyOutgoing((event) => {
      if (cut === null && (event === "unsubscribe" || event === "catalog")) {
        cut = event;
        feed.socket.io.engine.close();
      }
    });
    await timeLimit(gone.unsubscribe(), 5000, "the unsubscribe"); // threw FeedError "timeout"
    assert.equal(cut, "unsubscribe");
    await until(() => kept.state === "recovered", "the other subscription to resume");
    cut = null;
    const error = await timeLimit(
      feed.catalog().then(
        () => null,
        (err) => err,
      ),
      5000,
      "the catalog",
    );
    assert.equal(cut, "catalog");
    assert.ok(error instanceof FeedError);
    assert.equal(error.code, "not_connected"); // was "timeout": "did not answer within 10000 ms"
    await until(() => kept.state === "recovered", "the other subscription to resume again");
    const seqs = [];
    kept.on("change", (c) => seqs.push(c.key));
    await h.write("insert", { id: 1, status: "new", amount: 1 });
    await h.write("insert", { id: 2, status: "new", amount: 2 });
    await until(() => seqs.length === 1, "the change to the room still followed");
    assert.deepEqual(heard, []);
  }));

test("unsubscribe() of a room whose resubscribe waits for a retry resolves (the server says not_subscribed)", () =>
  withHarness({ config: "[server]\nfilter_room_grace = 30\n[limits]\nmax_rooms = 1\n" }, async (h) => {
    // One row or filter room at most: after a cut, another client's room takes the slot of this
    // one's (idle meanwhile), so its resubscribe is refused as server_busy and waits to be
    // retried. Leaving it then is answered not_subscribed, which unsubscribe() threw.
    const feed = h.client(h.url, WS);
    const holder = h.client(h.direct, WS);
    const sub = feed.subscribe(`${ROOM}:1`);
    await sub.ready;
    const refusals = [];
    const original = sub._onAck.bind(sub);
    sub._onAck = (attempt, request, ack) => {
      if (ack && ack.ok === false) refusals.push(ack.error.code);
      original(attempt, request, ack);
    };
    await h.send({ cmd: "cut" });
    await until(() => sub.state === "pending", "the subscription to notice the cut");
    await holder.subscribe(`${ROOM}:2`).ready; // the idle room 1 makes way for room 2
    await h.send({ cmd: "restore" });
    await until(() => refusals.includes("server_busy"), "the resubscribe to be refused as server_busy");
    assert.equal(sub.state, "pending");
    await timeLimit(sub.unsubscribe(), 5000, "the unsubscribe"); // threw FeedError not_subscribed
    assert.equal(feed.subscriptions.size, 0);
  }));

test("a reconnect while subscribes wait their turn: each room is asked for once on the new connection", () =>
  withHarness({ config: LIMITED }, async (h) => {
    // The subscribes still waiting for their turn (past the burst) when the connection dropped
    // used to be sent on the new one as well, beside each subscription's own new subscribe: the
    // rooms were asked for twice, at the server's rate, and every further reconnect in the middle
    // added more (a client that also had to refresh a token never caught up).
    const feed = h.client(h.url, WS);
    const subs = Array.from({ length: ROOMS }, (_, i) => feed.subscribe(`${ROOM}:${i + 1}`));
    const answers = subs.map(() => 0); // subscribe answers taken (not rate_limited) after the cut
    let cut = false;
    subs.forEach((sub, i) => {
      const original = sub._onAck.bind(sub);
      sub._onAck = (attempt, request, ack) => {
        if (cut && ack && ack.ok) answers[i] += 1;
        original(attempt, request, ack);
      };
    });
    await until(() => subs.filter((sub) => sub.state === "live").length >= 30, "30 rooms subscribed");
    assert.ok(subs.some((sub) => sub.state === "pending"), "some still wait their turn");
    await h.send({ cmd: "cut" });
    await until(() => !feed.connected, "the client to notice the cut");
    // Counted from here: an answer the old connection brought before the client saw it go was
    // an answer to that connection's subscribe (and the room is asked for again on the new one).
    cut = true;
    await h.send({ cmd: "restore" });
    await timeLimit(
      until(() => subs.every((sub) => sub.state === "live" || sub.state === "recovered"), "every room again", 30000),
      31000,
      "every room again",
    );
    assert.deepEqual(
      answers.map((n, i) => [i + 1, n]).filter(([, n]) => n !== 1),
      [],
      "rooms answered other than once after the reconnect",
    );
  }));

test("a token refresh goes ahead of the subscribes waiting their turn, so the token does not expire", () => {
  // 130 rooms at 20 a second past a burst of 10 take about 6 s; the token lasts 4 s and is
  // refreshed at 3 s. Behind the subscribes, the refresh came after the token expired: the
  // server closed the connection, the client subscribed everything again, and so on for ever.
  const config = "[server]\nmax_subscriptions = 300\n[limits]\nsubscribe_burst = 10\nsubscribe_rate = 20.0\n";
  return withHarness({ config, auth: true }, async (h) => {
    const feed = h.client(h.url, { ...WS, token: async () => (await h.send({ cmd: "token", ttl: 4 })).token });
    const disconnects = [];
    feed.on("disconnect", (reason) => disconnects.push(reason));
    const subs = Array.from({ length: ROOMS }, (_, i) => feed.subscribe(`${ROOM}:${i + 1}`));
    await timeLimit(Promise.all(subs.map((sub) => sub.ready)), 30000, "every subscription");
    assert.deepEqual(disconnects, []);
    assert.ok(subs.every((sub) => sub.state === "live"));
  });
});
