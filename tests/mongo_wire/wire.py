"""Message framing for the MongoDB wire protocol: just OP_QUERY (handshake), OP_REPLY and OP_MSG.

Layouts follow the MongoDB Wire Protocol reference
(https://www.mongodb.com/docs/manual/reference/mongodb-wire-protocol/): a 16-byte little-endian
header (messageLength, requestID, responseTo, opCode), then OP_MSG's flagBits and sections (kind 0
is the command body, kind 1 a named document sequence such as an insert's `documents`), with an
optional CRC-32C checksum when flag bit 0 is set (skipped, not verified). Older drivers and tools
send the first `hello`/`isMaster` of a connection as a legacy OP_QUERY on `admin.$cmd`, answered
with OP_REPLY (PyMongo 4.20 already uses OP_MSG there); everything after that is OP_MSG.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.binary import UuidRepresentation
from bson.codec_options import CodecOptions

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16

HEADER = struct.Struct("<iiii")
CODEC: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=True, uuid_representation=UuidRepresentation.STANDARD
)


class WireError(Exception):
    """The peer sent bytes this server cannot frame; the connection is closed."""


@dataclass
class Request:
    request_id: int
    op_code: int
    command: dict[str, Any]
    more_to_come: bool = False
    sequences: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _doc_at(data: bytes, offset: int) -> tuple[dict[str, Any], int]:
    (length,) = struct.unpack_from("<i", data, offset)
    if length < 5 or offset + length > len(data):
        raise WireError("truncated BSON document")
    return bson.decode(data[offset : offset + length], CODEC), offset + length


def _cstring_at(data: bytes, offset: int) -> tuple[str, int]:
    end = data.index(b"\x00", offset)
    return data[offset:end].decode("utf-8"), end + 1


def parse(request_id: int, op_code: int, body: bytes) -> Request:
    """Decode one message body (the bytes after the header) into a command document."""
    if op_code == OP_QUERY:
        offset = 4  # flags
        collection, offset = _cstring_at(body, offset)
        offset += 8  # numberToSkip, numberToReturn
        query, offset = _doc_at(body, offset)
        if "$query" in query:  # the legacy wrapped form
            query = dict(query["$query"])
        db = collection.split(".", 1)[0]
        query.setdefault("$db", db)
        return Request(request_id, op_code, query)
    if op_code == OP_MSG:
        (flags,) = struct.unpack_from("<I", body, 0)
        end = len(body) - (4 if flags & CHECKSUM_PRESENT else 0)
        offset = 4
        command: dict[str, Any] | None = None
        sequences: dict[str, list[dict[str, Any]]] = {}
        while offset < end:
            kind = body[offset]
            offset += 1
            if kind == 0:
                command, offset = _doc_at(body, offset)
            elif kind == 1:
                (size,) = struct.unpack_from("<i", body, offset)
                section_end = offset + size
                name, cursor = _cstring_at(body, offset + 4)
                docs = []
                while cursor < section_end:
                    doc, cursor = _doc_at(body, cursor)
                    docs.append(doc)
                sequences[name] = docs
                offset = section_end
            else:
                raise WireError(f"unknown OP_MSG section kind {kind}")
        if command is None:
            raise WireError("OP_MSG without a body section")
        for name, docs in sequences.items():
            command[name] = docs
        return Request(request_id, op_code, command, bool(flags & MORE_TO_COME), sequences)
    raise WireError(f"unsupported opCode {op_code}")


def reply(request: Request, response_id: int, doc: dict[str, Any]) -> bytes:
    """Frame a reply in the form the request came in (OP_REPLY for OP_QUERY, else OP_MSG)."""
    payload = bson.encode(doc, codec_options=CODEC)
    if request.op_code == OP_QUERY:
        body = struct.pack("<iqii", 0, 0, 0, 1) + payload
        op_code = OP_REPLY
    else:
        body = struct.pack("<I", 0) + b"\x00" + payload
        op_code = OP_MSG
    return HEADER.pack(HEADER.size + len(body), response_id, request.request_id, op_code) + body
