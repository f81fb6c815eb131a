// What reading frames through `parseFrame` costs against plain JSON.parse, per frame, on the
// frames a feed sends: one `change`, a `changes` batch of 50, a snapshot answer of 1,000 rows;
// each with ids that fit a double (the fast path: one regular expression test) and with
// snowflake ids past 2^53 (every id kept exact). `node clients/js/bench/parse.mjs` (docs/clients.md).
import { parseFrame } from "../index.js";

const SNOWFLAKE = 1234567890123456789n;

function row(i, big) {
  const id = big ? (SNOWFLAKE + BigInt(i)).toString() : String(1000 + i);
  return `{"id":${id},"customer":"customer-${i % 97}","status":"${i % 3 ? "paid" : "new"}","total":"${(i * 7.31).toFixed(2)}","items":${i % 9},"created_at":"2026-12-07T19:22:56.${String(i % 1e6).padStart(6, "0")}Z","note":"order ${i} of the day, left at the door"}`;
}

function change(i, big) {
  const r = row(i, big);
  const key = JSON.parse(r.replace(/"id":(\d+)/, '"id":"$1"')).id;
  return `{"room":"main:public.orders","seq":${i + 1},"id":"main:0/1A${i.toString(16)}","connector":"main","source":"postgres","target":"public.orders","op":"update","key":${key},"before":${r},"after":${r.replace("paid", "shipped")},"ts":"2026-12-07T19:22:56.137083Z"}`;
}

function frames(big) {
  const rows = Array.from({ length: 1000 }, (_, i) => row(i, big));
  const keys = rows.map((_, i) => `"${big ? SNOWFLAKE + BigInt(i) : 1000 + i}"`);
  return {
    "one change": `["change",${change(1, big)}]`,
    "changes x50": `["changes",[${Array.from({ length: 50 }, (_, i) => change(i, big)).join(",")}]]`,
    "snapshot 1,000 rows": `[{"ok":true,"room":"main:public.orders","seq":0,"epoch":"5e4759e770969fd9","snapshot":[${rows.join(",")}],"snapshot_keys":[${keys.join(",")}],"snapshot_truncated":false,"snapshot_chunks":1,"snapshot_upto":0}]`,
  };
}

/**
 * µs per call of each of `fns` on `text`: the fastest of 15 rounds of about 100 ms each, the
 * functions taking turns round by round (a machine shared with other work slows some rounds;
 * the fastest is the one least disturbed).
 */
function measure(fns, text) {
  let n = 1;
  for (;;) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) fns[0](text);
    if (Number(process.hrtime.bigint() - t0) > 1e7) break;
    n *= 2;
  }
  n *= 10;
  const best = fns.map(() => Infinity);
  for (let r = 0; r < 15; r++) {
    fns.forEach((fn, k) => {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < n; i++) fn(text);
      best[k] = Math.min(best[k], Number(process.hrtime.bigint() - t0) / 1000 / n);
    });
  }
  return best;
}

const plain = (text) => JSON.parse(text);
const asText = (text) => parseFrame(text, "string");
const asBigint = (text) => parseFrame(text, "bigint");
console.log(`node ${process.version}; µs per frame, the fastest of 15 rounds`);
console.log("| frame | bytes | ids | JSON.parse | parseFrame string | parseFrame bigint |");
console.log("|---|---:|---|---:|---:|---:|");
for (const big of [false, true]) {
  for (const [name, text] of Object.entries(frames(big))) {
    const [base, ...times] = measure([plain, asText, asBigint], text);
    const cells = times.map((t) => `${t.toFixed(1)} (${(t / base).toFixed(2)}x)`);
    console.log(`| ${name} | ${text.length} | ${big ? "past 2^53" : "small"} | ${base.toFixed(1)} | ${cells.join(" | ")} |`);
  }
}
