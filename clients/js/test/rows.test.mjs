// A MongoDB update without the document (`full_document = "off"`) carries what it changed in
// `meta.updateDescription`; the library applies it to the row it keeps. The same description
// and document as tests/test_mongodb_e2e.py, where the Python client does it against a server.
import assert from "node:assert/strict";
import { test } from "node:test";

import { keyText, patched } from "../index.js";

test("an update description applied to a row gives the document the server has", () => {
  const row = { _id: 1, status: "new", lines: [1, 2, 3], ship: { city: "Oslo", zip: "0150" } };
  const first = patched(row, {
    updatedFields: { status: "paid", "ship.city": "Bergen", "lines.4": 9, "note.a": 1 },
    removedFields: ["ship.zip"],
  });
  assert.deepEqual(first, {
    _id: 1,
    status: "paid",
    lines: [1, 2, 3, null, 9],
    ship: { city: "Bergen" },
    note: { a: 1 },
  });
  assert.deepEqual(row.ship, { city: "Oslo", zip: "0150" }); // the kept row is not changed in place
  const second = patched(first, { updatedFields: {}, removedFields: [], truncatedArrays: [{ field: "lines", newSize: 2 }] });
  assert.deepEqual(second.lines, [1, 2]);
  // A path through a value that is neither a document nor an array changes nothing.
  assert.deepEqual(patched(second, { updatedFields: { "status.x": 1 } }), second);
});

// The server's table of key texts (tests/support/key_text.json, checked by the server and the
// Python library too): one row has one key in `rows`, whichever side names it.
test("keyText follows the server's rule for every kind of key", async () => {
  const { readFile } = await import("node:fs/promises");
  const table = JSON.parse(await readFile(new URL("../../../tests/support/key_text.json", import.meta.url), "utf8"));
  for (const [key, text] of table.cases) assert.equal(keyText(key), text, JSON.stringify(key));
});
