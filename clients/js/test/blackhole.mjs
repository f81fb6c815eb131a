// A TCP proxy that can be switched into a network partition that drops packets (a blackhole),
// as tests/support/proxy.py's `Blackhole` for the Python tests: while it lasts nothing is
// forwarded either way and no connection is closed (no RST, no FIN reaches either side); what
// is sent meanwhile waits (in the sockets' buffers, as TCP would retransmit it), and so does a
// side's close; a new connection is accepted (the kernel would retry its SYN) but reaches the
// target only once the partition lifts. A client behind it sees a half-open connection: its
// handshakes hang, its live connection goes silent.
import { connect, createServer } from "node:net";

class Link {
  constructor(hole, client) {
    this.hole = hole;
    this.client = client;
    this.upstream = null;
    this.ended = false; // a side closed: the other is closed too once no partition holds it
    client.on("error", () => this._end());
    client.on("close", () => this._end());
    client.pause(); // nothing is read before the link to the target is up
  }

  connect() {
    if (this.upstream || this.ended) return;
    const upstream = (this.upstream = connect(this.hole.targetPort, "127.0.0.1"));
    upstream.on("error", () => this._end());
    upstream.on("close", () => this._end());
    upstream.on("data", (data) => this.client.write(data));
    this.client.on("data", (data) => upstream.write(data));
    if (this.hole.blocked) upstream.pause();
    else this.client.resume();
  }

  block() {
    this.client.pause();
    this.upstream?.pause();
  }

  unblock() {
    if (!this.upstream) this.connect();
    this.client.resume();
    this.upstream?.resume();
    if (this.ended) this.destroy();
  }

  _end() {
    this.ended = true;
    if (!this.hole.blocked) this.destroy();
  }

  destroy() {
    this.client.destroy();
    this.upstream?.destroy();
    this.hole.links.delete(this);
  }
}

export class Blackhole {
  /** A proxy to 127.0.0.1:`targetPort`, listening on a free port (`url` once started). */
  static async start(targetPort) {
    const hole = new Blackhole(targetPort);
    await new Promise((resolve, reject) => {
      hole.server.once("error", reject);
      hole.server.listen(0, "127.0.0.1", resolve);
    });
    hole.url = `http://127.0.0.1:${hole.server.address().port}`;
    return hole;
  }

  constructor(targetPort) {
    this.targetPort = targetPort;
    this.blocked = false;
    this.links = new Set();
    this.server = createServer((client) => {
      const link = new Link(this, client);
      this.links.add(link);
      if (!this.blocked) link.connect();
    });
  }

  /** The partition begins: nothing more gets through, nothing is closed. */
  blackhole() {
    this.blocked = true;
    for (const link of this.links) link.block();
  }

  /**
   * Reset every connection through it now; the partition, if any, stays: after `blackhole()`,
   * a client's connection is lost at once and its new attempts hang (a node whose host went
   * down: the reset reached the client, SYNs go unanswered).
   */
  drop() {
    for (const link of [...this.links]) link.destroy();
  }

  /** The partition lifts: what waited is delivered, the closes that waited happen. */
  heal() {
    this.blocked = false;
    for (const link of [...this.links]) link.unblock();
  }

  /** Stop listening and drop every connection. */
  async close() {
    this.blocked = false;
    for (const link of [...this.links]) link.destroy();
    await new Promise((resolve) => this.server.close(() => resolve()));
  }
}
