"""The wire test server's framing, byte for byte, for what PyMongo itself no longer sends.

PyMongo 4.20 opens connections with OP_MSG, so the legacy OP_QUERY handshake (still sent by
older drivers and tools) and OP_MSG's checksum and moreToCome flags are exercised here with raw
sockets.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import bson
import pytest

from tests.mongo_wire import MongoWireServer
from tests.mongo_wire.wire import CHECKSUM_PRESENT, MORE_TO_COME, OP_MSG, OP_QUERY, OP_REPLY

pytestmark = pytest.mark.mongodb
WAIT = 5.0


async def roundtrip(
    server: MongoWireServer, op_code: int, body: bytes, request_id: int = 7
) -> tuple[int, int, bytes]:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(struct.pack("<iiii", 16 + len(body), request_id, 0, op_code) + body)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            length, _, response_to, reply_op = struct.unpack("<iiii", await reader.readexactly(16))
            payload = await reader.readexactly(length - 16)
        assert response_to == request_id
        return reply_op, response_to, payload
    finally:
        writer.close()


def op_msg(
    doc: dict[str, Any], flags: int = 0, sequences: dict[str, list[Any]] | None = None
) -> bytes:
    body = struct.pack("<I", flags) + b"\x00" + bson.encode(doc)
    for name, docs in (sequences or {}).items():
        section = name.encode() + b"\x00" + b"".join(bson.encode(d) for d in docs)
        body += b"\x01" + struct.pack("<i", 4 + len(section)) + section
    if flags & CHECKSUM_PRESENT:
        body += b"\x00\x00\x00\x00"  # not verified by the test server
    return body


async def test_legacy_op_query_handshake_gets_op_reply() -> None:
    async with MongoWireServer() as server:
        query = bson.encode({"isMaster": 1, "helloOk": True})
        body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + query
        op, _, payload = await roundtrip(server, OP_QUERY, body)
    assert op == OP_REPLY
    flags, cursor_id, start, returned = struct.unpack_from("<iqii", payload)
    doc = bson.decode(payload[20:])
    assert (flags, cursor_id, start, returned) == (0, 0, 0, 1)
    assert doc["ismaster"] is True and doc["setName"] == "rs0" and doc["ok"] == 1.0


async def test_op_msg_with_document_sequence_and_checksum() -> None:
    async with MongoWireServer() as server:
        body = op_msg(
            {"insert": "c", "$db": "d"}, CHECKSUM_PRESENT, {"documents": [{"_id": 1}, {"_id": 2}]}
        )
        op, _, payload = await roundtrip(server, OP_MSG, body)
        assert op == OP_MSG and payload[4] == 0
        assert bson.decode(payload[5:])["n"] == 2
        collection = server.store.collection("d", "c")
        assert collection is not None, "the insert created d.c"
        found = [d["_id"] for d in collection.docs()]
    assert found == [1, 2]


async def test_more_to_come_gets_no_reply_but_is_applied() -> None:
    async with MongoWireServer() as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            quiet = op_msg({"insert": "c", "$db": "d", "documents": [{"_id": 1}]}, MORE_TO_COME)
            ping = op_msg({"ping": 1, "$db": "admin"})
            for request_id, body in ((1, quiet), (2, ping)):
                writer.write(struct.pack("<iiii", 16 + len(body), request_id, 0, OP_MSG) + body)
            await writer.drain()
            async with asyncio.timeout(WAIT):
                header = struct.unpack("<iiii", await reader.readexactly(16))
                await reader.readexactly(header[0] - 16)
        finally:
            writer.close()
        stored = server.store.collection("d", "c")
    assert header[2] == 2  # the first reply answers the ping: the quiet insert got none
    assert stored is not None and [d["_id"] for d in stored.docs()] == [1]
