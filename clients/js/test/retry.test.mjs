// The library's own retries (after the server closed the connection, or refused a token) are
// spread at random, so that the clients of a node that restarts do not all come back at once.
import assert from "node:assert/strict";
import { test } from "node:test";

import { retryDelay } from "../index.js";

test("retry delays double, stop at the maximum, and are spread by half either way", () => {
  const options = { reconnectionDelay: 100, reconnectionDelayMax: 1000 };
  for (const [attempt, base] of [[0, 100], [1, 200], [3, 800], [4, 1000], [9, 1000]]) {
    const delays = Array.from({ length: 400 }, () => retryDelay(attempt, options));
    assert.ok(Math.min(...delays) >= base * 0.5, `attempt ${attempt}: ${Math.min(...delays)}`);
    assert.ok(Math.max(...delays) <= base * 1.5, `attempt ${attempt}: ${Math.max(...delays)}`);
    // Spread over the range: 400 draws leave neither end of it empty.
    assert.ok(Math.min(...delays) < base * 0.6 && Math.max(...delays) > base * 1.4);
  }
  const defaults = Array.from({ length: 400 }, () => retryDelay(0));
  assert.ok(Math.min(...defaults) >= 250 && Math.max(...defaults) <= 750);
});
