// Compiled by `tsc --noEmit` only: the README's and docs/clients.md's usage, type-checked.
import { FeedClient, FeedError, parseFrame, type BigNumbers, type ClientErrorCode, type Change, type Row, type State } from "dbfeed-client";

const feed = new FeedClient("http://127.0.0.1:8000", { token: async () => "a token" });
const sub = feed.subscribe("main:public.orders", { filter: "status=eq.paid", snapshot: true, key: "id" });
sub.on("snapshot", (rows: Row[]) => console.log(rows.length));
sub.on("change", (change: Change) => console.log(change.op, change.key, change.after ?? change.before));
sub.on("state", (state: State, info) => console.log(state, info.replayed, info.reason, info.code));
feed.on("error", (err: FeedError) => console.log(err.code, err.message));
// The library's own connection codes (docs/clients.md, "Refused connections"); the server's
// stay plain strings.
const own: ClientErrorCode[] = ["handshake_refused", "server_busy", "too_large", "unreachable", "token_failed"];
feed.on("error", (err: FeedError) => {
  if (err.code === "unreachable" || err.code === "server_busy") console.log("still trying");
  else if ((own as string[]).includes(err.code)) console.log("the library's:", err.code, err.data);
  else console.log("the server's:", err.code);
});
async function main(): Promise<void> {
  try {
    await sub.ready;
  } catch (err) {
    if (err instanceof FeedError) console.log(err.code);
  }
  const rows: Map<string, Row> | null = sub.rows;
  const slow = feed.subscribe("main:public.orders", { maxQueue: 500 });
  for await (const change of slow) {
    console.log(change.seq);
    break;
  }
  console.log(rows?.get("42")?.status, sub.seq, sub.epoch);
  // A position saved as the docs say (sub.seq, sub.epoch: null before the first answer).
  const resumed = feed.subscribe("main:public.orders", { since: sub.seq, epoch: sub.epoch });
  await resumed.unsubscribe();
  await sub.unsubscribe();
  feed.close();
}
void main();

// Snowflake ids past 2^53: their exact text by default, BigInt when asked for.
const exact = new FeedClient("http://127.0.0.1:8000", { bigNumbers: "bigint" });
const mode: BigNumbers = exact.bigNumbers;
const id = parseFrame('{"id":9007199254740993}', mode);
if (id && typeof id === "object" && !Array.isArray(id) && typeof id.id === "bigint") console.log(id.id + 1n);
