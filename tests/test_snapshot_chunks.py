"""Snapshots in bounded chunks (docs/protocol.md, "Snapshots"): a 20 MB snapshot reaches a
python-socketio client over a websocket and over long-polling in frames of at most
`snapshot_chunk_bytes` of rows, exactly, and the live changes follow it with nothing lost or
doubled in between."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
import socketio

from feed.app.config import parse_config
from feed.core.snapshots import (
    chunk_event,
    json_size,
    snapshot_ack,
    split_rows,
    split_snapshot,
    visible,
)
from feed.errors import ConfigError
from tests.auth_helpers import BASE, source
from tests.support.server import WAIT, running_feed

ROWS = 2000
BLOB = 10_000  # hex characters: 10 KB per row, 20 MB in all
CHUNK = 256 * 1024


def test_split_rows_keeps_every_row_in_order_and_bounds_each_chunk() -> None:
    rows = [{"id": i, "blob": "x" * (i % 700)} for i in range(3000)]
    chunks = split_rows(rows, 10_000)
    assert [r for chunk in chunks for r in chunk] == rows
    assert all(sum(json_size(r) + 1 for r in chunk) <= 10_000 for chunk in chunks)
    assert split_rows([], 10_000) == [[]]
    big = {"id": 0, "blob": "y" * 50_000}  # a row larger than a chunk goes alone
    assert split_rows([rows[1], big, rows[2]], 10_000) == [[rows[1]], [big], [rows[2]]]


def test_keys_stay_beside_their_rows_through_masks_and_chunks() -> None:
    rows = [{"id": i, "blob": "x" * 600} for i in range(40)]
    keys: list[str | None] = [f"k{i}" for i in range(40)]
    shown, shown_keys = visible(rows, keys, lambda r: None if r["id"] % 3 == 0 else r)
    assert shown_keys == [f"k{r['id']}" for r in shown] and len(shown) == 26
    chunks = split_snapshot(shown, shown_keys, 2048)
    assert len(chunks) > 1
    assert all(ks == [f"k{r['id']}" for r in rs] for rs, ks in chunks)
    assert chunk_event("mem:t", 2, 5, chunks[1])["keys"] == chunks[1][1]
    # A connector that sends no keys: no keys in the frames (clients then guess).
    assert all(ks is None for _, ks in split_snapshot(rows, None, 2048))
    assert "keys" not in chunk_event("mem:t", 2, 5, (rows, None))
    assert visible(rows, keys[:3], None)[1] is None  # keys not one per row are not sent


def test_the_ack_carries_the_first_chunk_and_counts_the_rest() -> None:
    rows: list[dict[str, Any]] = [{"id": i, "blob": "x" * 600} for i in range(40)]
    keys: list[str | None] = [f"k{i}" for i in range(40)]
    masked: list[Any] = []

    def hide(row: Any) -> Any:
        masked.append(row)
        return None if row["id"] % 3 == 0 else row

    def encode(row: Any) -> Any:
        return {**row, "blob": row["blob"].upper()}

    fields, rest = snapshot_ack(rows, keys, hide, True, 2048, encode=encode)
    assert masked == rows  # the mask sees the rows before `encode` (the hub's reads source values)
    shown = fields["snapshot"] + [r for chunk, _ in rest for r in chunk]
    assert shown == [encode(r) for r in rows if r["id"] % 3]
    assert fields["snapshot_keys"] == [f"k{r['id']}" for r in fields["snapshot"]]
    assert all(ks == [f"k{r['id']}" for r in rs] for rs, ks in rest)
    assert fields["snapshot_truncated"] is True
    assert fields["snapshot_chunks"] == 1 + len(rest) > 1
    empty, none = snapshot_ack([], None, None, False, 2048)
    assert empty == {"snapshot": [], "snapshot_truncated": False, "snapshot_chunks": 1}
    assert none == []


def test_chunk_size_is_validated_and_kept_under_the_outbound_limit() -> None:
    with pytest.raises(
        ConfigError, match=r"server\.snapshot_chunk_bytes: must be from 1024 to 16777216"
    ):
        parse_config(BASE.replace("[server]", "[server]\nsnapshot_chunk_bytes = 10"), "f", {})
    too_big = BASE.replace("[server]", "[server]\nsnapshot_chunk_bytes = 1048576")
    small_queue = parse_config(too_big + "[limits]\noutbound_queue_bytes = 1048576\n", "f", {})
    assert small_queue.server.snapshot_chunk_bytes == 262144  # a quarter of the outbound limit
    assert parse_config(BASE, "f", {}).server.snapshot_chunk_bytes == CHUNK


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_20_mb_snapshot_arrives_in_chunks_then_live_changes(transport: str) -> None:
    config = BASE.replace("replay_buffer = 50", "snapshot_limit = 5000\nreplay_buffer = 5000")
    async with running_feed(config) as feed:
        db = source(feed)
        for i in range(ROWS):
            db.write(
                "public.orders", "insert", {"id": i, "v": 0, "blob": os.urandom(BLOB // 2).hex()}
            )
        client = socketio.AsyncClient(reconnection=False)
        events: list[tuple[str, Any]] = []
        done = asyncio.Event()
        last_chunk = asyncio.Event()
        final_key = 10_000_000

        def record(name: str) -> Any:
            async def handler(data: Any) -> None:
                events.append((name, data))
                if name == "snapshot" and data["chunk"] == data["of"]:
                    last_chunk.set()
                items = data if name == "changes" else [data] if name == "change" else []
                if any(c["key"] == final_key for c in items):
                    done.set()

            return handler

        for name in ("snapshot", "change", "changes"):
            client.on(name, record(name))
        await client.connect(feed.url, transports=[transport], wait_timeout=WAIT)
        written_after_ack: list[str] = []
        acked = asyncio.Event()
        stop = asyncio.Event()

        async def writer() -> None:
            """Updates, inserts and deletes all through the snapshot and after it."""
            n = 0
            while not stop.is_set():
                n += 1
                if n % 7 == 0:
                    change = db.write("public.orders", "delete", {"id": n % ROWS})
                elif n % 5 == 0:
                    change = db.write("public.orders", "insert", {"id": ROWS + n, "v": n})
                else:
                    change = db.write("public.orders", "update", {"id": n % ROWS, "v": n})
                if acked.is_set():
                    written_after_ack.append(change.id)
                await asyncio.sleep(0.002)  # a steady stream of writes, not a wait

        writing = asyncio.create_task(writer())
        ack_box: list[dict[str, Any]] = []

        def on_ack(ack: dict[str, Any]) -> None:
            acked.set()
            ack_box.append(ack)
            events.append(("ack", ack))

        try:
            await client.emit(
                "subscribe", {"room": "mem:public.orders", "snapshot": True}, callback=on_ack
            )
            await asyncio.wait_for(acked.wait(), 30)
            ack = ack_box[0]
            assert ack["ok"] and ack["snapshot_truncated"] is False, ack
            total = ack["snapshot_chunks"]
            assert total > 60  # 20 MB in chunks of 256 KiB
            # Chunks all in, and the live stream flowing behind them.
            await asyncio.wait_for(last_chunk.wait(), 60)
            stop.set()
            await writing
            db.write("public.orders", "insert", {"id": final_key, "v": -1})
            await asyncio.wait_for(done.wait(), 30)
        finally:
            stop.set()
            await writing
            await client.disconnect()

    # Order: the ack, then chunks 2..N in order, then (only then) changes for the room.
    kinds = [name for name, _ in events]
    assert kinds[0] == "ack"
    chunk_events = [data for name, data in events if name == "snapshot"]
    assert kinds[1:total] == ["snapshot"] * (total - 1)
    assert [c["chunk"] for c in chunk_events] == list(range(2, total + 1))
    assert all(c["of"] == total and c["room"] == "mem:public.orders" for c in chunk_events)
    assert set(kinds[total:]) <= {"change", "changes"}
    # Bounded frames: each chunk's rows are at most the chunk size (rows are ~10 KB each).
    for rows in [ack["snapshot"], *(c["rows"] for c in chunk_events)]:
        assert len(json.dumps(rows, separators=(",", ":"))) <= CHUNK + 16
    # Exact: the assembled snapshot, then the changes, give the table as it ends.
    rows = [*ack["snapshot"], *(r for c in chunk_events for r in c["rows"])]
    assert len({r["id"] for r in rows}) == len(rows)
    state = {r["id"]: r for r in rows}
    changes = [c for name, data in events[total:] for c in (data if name == "changes" else [data])]
    ids = [c["id"] for c in changes]
    assert len(ids) == len(set(ids)), "a change arrived twice"
    seqs = [c["seq"] for c in changes]
    assert seqs == sorted(seqs) and seqs[0] > ack["seq"]
    for c in changes:
        if c["op"] == "delete":
            state.pop(c["key"], None)
        else:
            state[c["key"]] = c["after"]
    table = [dict(r) for r in db._tables["public.orders"].values()]
    assert state == {r["id"]: r for r in table}, "snapshot + changes differ from the table"
    assert set(written_after_ack) <= set(ids), "a change written after the ack was lost"
