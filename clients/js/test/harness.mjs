// Drives tests/support/client_harness.py: a real feed server (FeedApp under uvicorn, the memory
// connector) behind a proxy the tests can cut, restartable on the same port.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import { FeedClient } from "../index.js";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const WAIT = 20000;

function python() {
  if (process.env.FEED_PYTHON) return process.env.FEED_PYTHON;
  const venv = join(ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

export class Harness {
  /**
   * A harness with one feed server (`config`: extra TOML, `auth`: tokens required), or with
   * `cluster` a two-node cluster instead (`cluster: { server: "<[server] TOML>" }` or `true`),
   * whose nodes' addresses are `urls`.
   */
  static async start(options = {}) {
    const h = new Harness();
    try {
      if (options.cluster) {
        h.urls = (await h.send({ cmd: "cluster_start", server: options.cluster.server ?? "" })).urls;
      } else {
        const reply = await h.send({ cmd: "start", config: options.config || "", auth: Boolean(options.auth) });
        h.url = reply.url;
        h.direct = reply.direct;
      }
    } catch (err) {
      // Nobody holds a harness that failed to start: end it, or its process would keep the
      // test file's process (and `node --test`) waiting forever.
      h.child.kill();
      throw err;
    }
    return h;
  }

  /** `count` harnesses started side by side; if one fails, the others are stopped. */
  static async startMany(count, options = {}) {
    const started = await Promise.allSettled(Array.from({ length: count }, () => Harness.start(options)));
    const failed = started.find((r) => r.status === "rejected");
    if (!failed) return started.map((r) => r.value);
    await Promise.all(started.filter((r) => r.status === "fulfilled").map((r) => r.value.stop()));
    throw failed.reason;
  }

  constructor() {
    this.clients = [];
    this.child = spawn(python(), ["-m", "tests.support.client_harness"], {
      cwd: ROOT,
      stdio: ["pipe", "pipe", "inherit"],
      env: { ...process.env, PYTHONPATH: ROOT },
    });
    this.waiting = [];
    this.exited = false;
    createInterface({ input: this.child.stdout }).on("line", (line) => {
      const next = this.waiting.shift();
      if (next) next.resolve(JSON.parse(line));
    });
    this.child.on("exit", (code) => {
      this.exited = true;
      for (const w of this.waiting.splice(0)) w.reject(new Error(`the harness exited (${code})`));
    });
  }

  send(command) {
    return new Promise((resolve, reject) => {
      if (this.exited) {
        reject(new Error("the harness has exited"));
        return;
      }
      const timer = setTimeout(() => reject(new Error(`no answer to ${JSON.stringify(command)}`)), WAIT);
      this.waiting.push({
        resolve: (reply) => {
          clearTimeout(timer);
          if (reply.ok) resolve(reply);
          else reject(new Error(`harness: ${reply.error}`));
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      });
      this.child.stdin.write(`${JSON.stringify(command)}\n`);
    });
  }

  write(op, row, target = "public.orders", movedFrom = undefined) {
    // movedFrom: the key fields the row had, for an update that changes its key
    return this.send({ cmd: "write", target, op, row, moved_from: movedFrom });
  }

  burst(start, count, pad = 0, target = "public.orders") {
    return this.send({ cmd: "burst", target, start, count, pad });
  }

  async rows(target = "public.orders") {
    return (await this.send({ cmd: "rows", target })).rows;
  }

  /** A FeedClient closed when the harness stops (first), so a test need not close it itself. */
  client(url, options) {
    const feed = new FeedClient(url, options);
    this.clients.push(feed);
    return feed;
  }

  async stop() {
    for (const feed of this.clients.splice(0)) feed.close();
    if (this.exited) return;
    await this.send({ cmd: "stop" }).catch(() => {});
    this.child.stdin.end();
  }
}

/**
 * Run `body(h)` with a harness started with `options` (see `Harness.start`), and stop it however
 * the body ends (the clients made with `h.client` first): a harness left running keeps the test
 * file's process, and `node --test`, waiting forever.
 */
export async function withHarness(options, body) {
  const h = await Harness.start(options);
  try {
    return await body(h);
  } finally {
    await h.stop();
  }
}

/** Resolve when `predicate()` holds, checked on every event of `emitter`; fail after `ms`. */
export function until(predicate, what, ms = WAIT) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const tick = () => {
      let done = false;
      try {
        done = predicate();
      } catch (err) {
        reject(err);
        return;
      }
      if (done) resolve();
      else if (Date.now() - started > ms) reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
      else setTimeout(tick, 10);
    };
    tick();
  });
}

/** Everything a subscription reports, in order, for assertions. */
export function record(sub) {
  const log = { changes: [], states: [], snapshots: [] };
  sub.on("change", (c) => log.changes.push(c));
  sub.on("state", (state, info) => log.states.push({ state, info }));
  sub.on("snapshot", (rows) => log.snapshots.push(rows));
  return log;
}

export function plainRows(map) {
  return Object.fromEntries([...map.entries()].sort(([a], [b]) => a.localeCompare(b)));
}
