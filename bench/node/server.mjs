// The reference Node.js Socket.IO server for the fan-out benchmark (bench/fanout.py, kind "node").
//
// It does what the Python baselines do, the Socket.IO way: clients `subscribe` to a room (acked),
// and on the harness's "emit" command the server makes paced changes itself (the same dict as
// the raw websockets baseline: id, connector, source, target, op, key, before, after {id, t},
// ts, room, seq) and sends each with `io.to(room).emit("change", payload)`.
//
// The harness talks to it over stdin/stdout, one JSON object per line:
//   {"op": "emit", "targets": [...], "count": N, "rate": R}  ->  {"op": "emitted", "seconds": s}
//   {"op": "clients"}                                         ->  {"op": "clients", "count": n}
// and reads its CPU time from the operating system by PID, as for every other server.

import { createServer } from "node:http";
import { createInterface } from "node:readline";
import { Server } from "socket.io";

const port = Number(process.argv[2]);
const httpServer = createServer();
const io = new Server(httpServer, {
  serveClient: false,
  perMessageDeflate: false, // the load clients do not offer it (nor do the other baselines)
  maxHttpBufferSize: 1e6,
});
const seqs = new Map();
let nextKey = 0;

io.on("connection", (socket) => {
  socket.on("subscribe", (body, ack) => {
    const room = body && body.room;
    socket.join(room);
    if (typeof ack === "function") {
      ack({ ok: true, room, seq: seqs.get(room) || 0, recovered: null });
    }
  });
});

function reply(message) {
  process.stdout.write(JSON.stringify(message) + "\n");
}

function emit(targets, count, rate) {
  const n = targets.length;
  const start = performance.now();
  let i = 0;
  return new Promise((resolve) => {
    const tick = () => {
      const now = performance.now();
      // Each write is due at its own time; writes that fell due while the loop was busy are made
      // at once, as bench/procs.py `paced` does for the Python servers.
      while (i < count && start + (i * 1000) / rate <= now) {
        const target = targets[i % n];
        const room = `mem:${target}`;
        const seq = (seqs.get(room) || 0) + 1;
        seqs.set(room, seq);
        const key = nextKey++;
        io.to(room).emit("change", {
          id: `mem:${key + 1}`,
          connector: "mem",
          source: "memory",
          target,
          op: "insert",
          key,
          before: null,
          after: { id: key, t: Date.now() / 1000 },
          ts: new Date().toISOString().replace("Z", "000Z"),
          room,
          seq,
        });
        i += 1;
      }
      if (i < count) {
        setTimeout(tick, Math.max(0, start + (i * 1000) / rate - performance.now()));
      } else {
        resolve((performance.now() - start) / 1000);
      }
    };
    tick();
  });
}

httpServer.listen(port, "127.0.0.1", () => {
  reply({ op: "ready", port });
  const lines = createInterface({ input: process.stdin });
  lines.on("line", async (line) => {
    const request = JSON.parse(line);
    if (request.op === "emit") {
      const seconds = await emit(request.targets, request.count, request.rate);
      reply({ op: "emitted", seconds });
    } else if (request.op === "clients") {
      reply({ op: "clients", count: io.engine.clientsCount });
    } else if (request.op === "stop") {
      io.close();
      process.exit(0);
    } else {
      reply({ op: "error", message: `unknown request ${request.op}` });
    }
  });
  lines.on("close", () => process.exit(0));
});
