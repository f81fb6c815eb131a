// Subscribe to dbfeed rooms and print every change, resuming where it stopped after a reconnect.
//
//   cd examples/node && npm ci
//   node client.mjs --room main:public.orders
//   node client.mjs --room main:public.orders --filter 'status=eq.paid'
//   node client.mjs --url http://127.0.0.1:8000 --room 'cache:session:*' --count 5
//
// The parts worth copying: handle both `change` and `changes` (a list, in order), remember the
// last `seq` per room and the server's `epoch`, and on every (re)connect subscribe again with
// `since` and `epoch`. The server then re-sends what was missed (`recovered: true`) or says that
// it cannot (`recovered: false`: reload your data). Duplicates are dropped by `seq`.

import { parseArgs } from "node:util";
import { io } from "socket.io-client";

const { values: args } = parseArgs({
  options: {
    url: { type: "string", default: process.env.FEED_URL ?? "http://127.0.0.1:8000" },
    room: { type: "string", multiple: true },
    filter: { type: "string" },
    token: { type: "string", default: process.env.FEED_TOKEN },
    count: { type: "string" },
  },
});
const wanted = args.room ?? ["main:public.orders"];
const count = args.count === undefined ? null : Number(args.count);

const canonical = new Map(); // requested room -> the server's canonical name
const lastSeq = new Map(); // canonical room -> last seq printed
let epoch = null;
let printed = 0;
let done = false;

const socket = io(args.url, {
  transports: ["websocket"],
  auth: args.token ? { token: args.token } : undefined,
  reconnectionDelay: 500,
});

function finish(code) {
  done = true;
  socket.disconnect();
  process.exitCode = code;
}

async function subscribeAll() {
  let ack;
  for (const room of wanted) {
    const request = { room };
    if (args.filter) request.filter = args.filter;
    const known = canonical.get(room);
    if (known && lastSeq.has(known) && epoch) {
      request.since = lastSeq.get(known);
      request.epoch = epoch;
    }
    try {
      ack = await socket.timeout(10000).emitWithAck("subscribe", request);
    } catch (err) {
      console.log(`subscribe ${room}: no answer (${err.message})`);
      return;
    }
    if (!ack.ok) {
      console.log(`subscribe ${room}: ${ack.error?.code}: ${ack.error?.message}`);
      finish(1);
      return;
    }
    const name = ack.room;
    canonical.set(room, name);
    if (ack.recovered !== true) {
      if ("since" in request) console.log(`resume ${name}: missed changes, reload your data`);
      // A new server run numbers afresh; the same run never goes back.
      lastSeq.set(name, ack.epoch !== epoch ? ack.seq : Math.max(lastSeq.get(name) ?? 0, ack.seq));
    }
    const state = { null: "subscribed", true: "resumed", false: "subscribed again" }[String(ack.recovered)];
    console.log(`${state} ${name} at seq ${ack.seq}`);
  }
  epoch = ack.epoch; // one server run for all rooms
}

function onChange(change) {
  const { room, seq } = change;
  if (seq <= (lastSeq.get(room) ?? -1)) return; // already printed (a resend after a resume)
  lastSeq.set(room, seq);
  const image = change.after ?? change.before;
  console.log(
    `${change.op.padEnd(7)} ${room} #${seq} key=${JSON.stringify(change.key)} ${JSON.stringify(image)}`,
  );
  printed += 1;
  if (count !== null && printed >= count) finish(0);
}

socket.on("connect", () => {
  subscribeAll();
});
socket.on("disconnect", () => {
  if (!done) console.log("disconnected; reconnecting ...");
});
socket.on("connect_error", (err) => {
  if (!socket.active) {
    // The server refused us (e.g. authentication): no retry will help.
    console.error(`cannot connect to ${args.url}: ${err.message}`);
    finish(1);
  }
});
socket.on("change", onChange);
socket.on("changes", (list) => list.forEach(onChange));
socket.on("gap", (gap) => console.log(`gap     ${gap.room}: ${gap.reason} (reload your data)`));
socket.on("status", (s) => console.log(`status  ${s.connector} is ${s.state} ${s.detail}`));

process.on("SIGINT", () => finish(130));
