// Subscribe to dbfeed rooms and print every change, resuming where it stopped after a reconnect.
//
//   cd examples/node && npm ci
//   node client.mjs --room main:public.orders
//   node client.mjs --room main:public.orders --filter 'status=eq.paid'
//   node client.mjs --url http://127.0.0.1:8000 --room 'cache:session:*' --count 5
//
// The resume logic (both `change` and `changes`, the last `seq` and `epoch` of each room, the
// resubscribe after every reconnect, duplicates, `recovered` or `reload`) lives in the client
// library, dbfeed-client (clients/js, docs/clients.md); this file only prints what it reports.

import { parseArgs } from "node:util";
import { FeedClient } from "dbfeed-client";

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
let printed = 0;

const feed = new FeedClient(args.url, { token: args.token, transports: ["websocket"] });

let closing = false; // set when this script closes the connection itself

function finish(code) {
  closing = true;
  feed.close();
  process.exitCode = code;
}

feed.on("disconnect", () => {
  if (!closing) console.log("disconnected; reconnecting ...");
});
let refused = false;
feed.on("error", (err) => {
  if (err.refused) {
    // The server refused the connection (a bad token, say): every subscription ends with it.
    refused = true;
    console.error(`cannot connect to ${args.url}: ${err.code}: ${err.message}`);
  } else {
    console.error(`${err.code}: ${err.message}`);
  }
});
feed.on("status", (s) => console.log(`status  ${s.connector} is ${s.state} ${s.detail}`));
feed.on("gap", (gap) => console.log(`gap     ${gap.room}: ${gap.reason}`));

for (const room of wanted) {
  const sub = feed.subscribe(room, args.filter ? { filter: args.filter } : {});
  sub.on("state", (state, info) => {
    if (state === "live") console.log(`live    ${sub.room} at seq ${sub.seq}`);
    else if (state === "recovered") console.log(`resumed ${sub.room}: ${info.replayed} missed change(s) replayed`);
    else if (state === "reload") console.log(`reload  ${sub.room}: ${info.reason} (reload your data)`);
    else if (state === "error" && !refused) console.log(`subscribe ${room}: ${info.code}: ${info.message}`);
  });
  sub.on("change", (change) => {
    const image = change.after ?? change.before; // a delete has only its before image
    const left = change.left ? " (left the filter)" : ""; // no longer matches: drop it
    console.log(
      `${change.op.padEnd(7)} ${change.room} #${change.seq} key=${JSON.stringify(change.key)} ${JSON.stringify(image)}${left}`,
    );
    printed += 1;
    if (count !== null && printed >= count) finish(0);
  });
  sub.ready.catch(() => finish(1)); // refused: the "error" state above said why
}

process.on("SIGINT", () => finish(130));
