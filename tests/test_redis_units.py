"""Redis connector pieces that need no server: config errors, glob rules, flags, RESP parsing."""

from __future__ import annotations

import orjson
import pytest

from connectors.redis import RedisConnector
from connectors.redis_events import (
    KeyspaceEvent,
    RespStream,
    merged_flags,
    missing_flags,
)
from connectors.redis_glob import PatternError, compile_glob, matches
from connectors.redis_values import decode_value
from feed.errors import ConfigError
from feed.options import Options


def make(**table: object) -> RedisConnector:
    raw = {"url": "redis://127.0.0.1:6379/0", "patterns": ["session:*"], **table}
    return RedisConnector("cache", Options(raw, "connectors[0]"))


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "http://x"}, "connectors[0].url: is not a Redis URL"),
        ({"url": "redis://"}, "connectors[0].url: names no host"),
        # Reported when connecting, as "Error 2 connecting to 127.0.0.1:6379. No such file or
        # directory": an unreachable server, it read, and `feed serve` retried it forever.
        (
            {"url": "rediss://h:6379/0?ssl_ca_certs=/nonexistent/ca.pem"},
            "connectors[0].url: ssl_ca_certs=/nonexistent/ca.pem: no such file",
        ),
        (
            {"url": "rediss://h:6379/0?ssl_certfile=/nonexistent/me.crt"},
            "connectors[0].url: ssl_certfile=/nonexistent/me.crt: no such file",
        ),
        (
            {"url": "rediss://h:6379/0?ssl_cert_reqs=strict"},
            "connectors[0].url: ssl_cert_reqs=strict is not one of none, optional, required",
        ),
        ({"patterns": []}, "connectors[0].patterns: must list at least one entry"),
        ({"patterns": ["session:[ab"]}, "unclosed '['"),
        ({"patterns": [" a*"]}, "leading or trailing whitespace"),
        ({"patterns": ["a*", "a*"]}, "lists the same pattern twice"),
        ({"db": 2}, "connectors[0].db: is 2 but url selects database 0"),
        # redis-py ignores a path that is not a number: database 0 was read in silence.
        (
            {"url": "redis://h:6379/cache"},
            "connectors[0].url: names database 'cache' in its path, which is not a number",
        ),
        ({"url": "redis://h:6379/1a"}, "names database '1a' in its path, which is not a number"),
        ({"url": "redis://h:6379/-1"}, "names database '-1' in its path, which is not a number"),
        # ?db= won over the path, in silence.
        ({"url": "redis://h:6379/1?db=2"}, "selects database 1 in its path and 2 in ?db="),
        ({"mode": "streams", "patterns": ["s:*"]}, "in streams mode list stream keys"),
        ({"mode": "pubsub"}, "connectors[0].mode: must be one of"),
        ({"fetch_value": True}, "connectors[0].fetch_value: is not a known setting"),
    ],
)
def test_config_mistakes_get_one_line(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(**table)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_password_never_appears_in_descriptions() -> None:
    connector = make(url="redis://user:s3cret@db.example:6380/4")
    assert connector.where == "db.example:6380/4"
    assert connector.db == 4


def test_db_from_option_when_url_has_none() -> None:
    assert make(url="redis://localhost", db=3).db == 3


def test_rooms_resolve_to_the_first_matching_pattern() -> None:
    connector = make(patterns=["session:*", "user:[0-9]*", "*"])
    pattern = connector.resolve("session:*")
    assert pattern is not None and pattern.target == "session:*"
    address = connector.resolve("session:abc")
    assert address is not None and (address.target, address.key) == ("session:*", "session:abc")
    address = connector.resolve("user:7")
    assert address is not None and address.target == "user:[0-9]*"
    address = connector.resolve("user:x")
    assert address is not None and address.target == "*"
    assert make().resolve("other:1") is None


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("h?llo", ["hello", "hallo"], ["hllo", "heello"]),
        ("h*llo", ["hllo", "heeeello", "h:x:llo"], ["hell"]),
        ("h[ae]llo", ["hello", "hallo"], ["hillo"]),
        ("h[^e]llo", ["hallo", "hbllo"], ["hello"]),
        ("h[a-b]llo", ["hallo", "hbllo"], ["hcllo"]),
        ("h[b-a]llo", ["hallo"], ["hcllo"]),  # Redis accepts reversed ranges
        (r"h\*llo", ["h*llo"], ["hello"]),
        ("a.b", ["a.b"], ["axb"]),  # regex characters are literal
    ],
)
def test_glob_matches_like_redis(pattern: str, yes: list[str], no: list[str]) -> None:
    for key in yes:
        assert matches(pattern, key), (pattern, key)
    for key in no:
        assert not matches(pattern, key), (pattern, key)


def test_unclosed_bracket_is_refused() -> None:
    with pytest.raises(PatternError):
        compile_glob("a[bc")


def test_flags_merge_never_removes() -> None:
    assert missing_flags("") == "Kg$lshzxet"
    assert missing_flags("AKE") == ""
    assert missing_flags("KEA") == ""
    assert missing_flags("Ex") == "Kg$lshzet"
    merged = merged_flags("Ex")
    assert merged.startswith("Ex") and missing_flags(merged) == ""


def test_resp_stream_handles_split_frames_and_binary() -> None:
    frame = (
        b"*4\r\n$8\r\npmessage\r\n$17\r\n__keyspace@0__:a*\r\n"
        b"$19\r\n__keyspace@0__:a\xff\r\n\r\n$3\r\nset\r\n"
    )
    pong = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    data = frame + pong + frame
    for cut in range(1, len(data)):
        stream = RespStream()
        replies = stream.feed(data[:cut]) + stream.feed(data[cut:])
        assert len(replies) == 3, cut
    event = KeyspaceEvent.from_message(RespStream().feed(frame)[0])
    assert event is not None
    assert (event.key, event.op, event.db, event.pattern) == (
        b"a\xff\r\n",
        "set",
        0,
        b"__keyspace@0__:a*",
    )


def _pmessage(pattern: bytes, channel: bytes, op: bytes) -> bytes:
    parts = [b"pmessage", pattern, channel, op]
    return b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def test_fast_event_parser_agrees_with_the_exact_parser_at_every_cut() -> None:
    """feed_events' one-match fast path must never disagree with the length-driven parser: keys
    holding CRLF or a fake length prefix, non-UTF-8 bytes, other replies, frames cut anywhere."""
    frames = [
        _pmessage(b"__keyspace@0__:a*", b"__keyspace@0__:abc", b"set"),
        _pmessage(b"__keyspace@0__:a*", b"__keyspace@0__:a\r\n$3\r\nset\r\n", b"del"),
        _pmessage(b"__keyspace@12__:*", b"__keyspace@12__:\xff\xfe", b"hset"),
        b"+OK\r\n",
        _pmessage(b"__keyspace@0__:*", b"__keyevent@0__:set", b"k"),  # not keyspace: raw
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n",
        _pmessage(b"p\r\n$9", b"__keyspace@0__:k", b"xgroup-create"),
        b"-ERR boom\r\n",
    ]
    data = b"".join(frames)
    exact = RespStream().feed(data)
    expected = [(KeyspaceEvent.from_message(r) if type(r) is list else None) or r for r in exact]
    assert len(expected) == len(frames)
    assert expected[1] == KeyspaceEvent(b"a\r\n$3\r\nset\r\n", "del", 0, b"__keyspace@0__:a*")
    assert expected[2] == KeyspaceEvent(b"\xff\xfe", "hset", 12, b"__keyspace@12__:*")
    for cut in range(1, len(data)):
        stream = RespStream()
        got = stream.feed_events(data[:cut]) + stream.feed_events(data[cut:])
        assert got == expected, cut


def test_non_keyspace_messages_are_ignored() -> None:
    assert KeyspaceEvent.from_message([b"message", b"x", b"y"]) is None
    assert KeyspaceEvent.try_parse(b"__keyevent@0__:set", b"k") is None


def test_values_decode_for_every_type() -> None:
    assert decode_value([b"string", 3, b"abc", 0], 10).value == "abc"
    hashed = decode_value([b"hash", 2, [b"a", b"1", b"b", b"2"], 0], 10)
    assert hashed.value == {"a": "1", "b": "2"} and not hashed.truncated
    listed = decode_value([b"list", 5, [b"x", b"y"], 0], 2)
    assert listed.value == ["x", "y"] and listed.truncated and listed.flags()["length"] == 5
    assert decode_value([b"set", 2, [b"b", b"a"], 0], 10).value == ["a", "b"]
    assert decode_value([b"zset", 1, [b"m", b"1.5"], 0], 10).value == [["m", 1.5]]
    # JSON has no infinity: the encoder sent these scores as null.
    infinite = decode_value([b"zset", 2, [b"lo", b"-inf", b"hi", b"inf"], 0], 10)
    assert orjson.loads(orjson.dumps(infinite.value)) == [["lo", "-inf"], ["hi", "inf"]]
    stream = decode_value([b"stream", 2, [[b"2-0", [b"f", b"2"]], [b"1-0", [b"f", b"1"]]], 0], 10)
    assert stream.value == [
        {"id": "1-0", "fields": {"f": "1"}},
        {"id": "2-0", "fields": {"f": "2"}},
    ]
    binary = decode_value([b"list", 2, [b"ok", b"\xff"], 0], 10)
    assert binary.base64 and binary.value == ["b2s=", "/w=="]
    assert decode_value([b"none", 0, [], 0], 10).after() is None
    assert decode_value([b"ReJSON-RL", 0, [], 0], 10).value is None


def test_canonical_room_names_resolve_back() -> None:
    connector = make(patterns=["session:*", "*"])
    short = connector.resolve("session:abc")
    assert short is not None
    canonical = f"{short.target}:{short.key}"  # what the hub puts in the subscribe ack
    assert canonical == "session:*:session:abc"
    assert connector.resolve(canonical) == short
