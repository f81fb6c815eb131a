"""Reading key values after an event: one bounded round trip for a whole batch of keys.

One Lua script reads every key of a batch with the command for its type (GET via GETRANGE,
HGETALL, LRANGE, SMEMBERS, ZRANGE WITHSCORES, the stream's tail), cut to `max_items` elements and
`max_bytes` bytes inside Redis, so a huge value never crosses the network and a batch of 500 events
costs one round trip instead of two per key. The value is the value at read time, which may be
newer than the event that triggered the read.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from connectors.redis_events import text_or_base64

READ_VALUES = r"""
local maxn = tonumber(ARGV[1])
local maxb = tonumber(ARGV[2])

-- The first `maxb` bytes of `x` (longer than that), not ending inside a UTF-8 character: a text
-- value cut mid-character was no longer UTF-8 and went out base64 (`value_base64`) whenever the
-- cut fell unluckily. Backs off only when the first byte dropped is a continuation byte whose
-- lead byte is kept; binary data is cut at `maxb` as before (it is cut anyway).
local function cut_at(x)
  local b = string.byte(x, maxb + 1)
  if b and b >= 128 and b < 192 then
    local q = maxb
    while q >= 1 and q >= maxb - 2 do
      local c = string.byte(x, q)
      if c >= 192 then return string.sub(x, 1, q - 1) end
      if c < 128 then break end
      q = q - 1
    end
  end
  return string.sub(x, 1, maxb)
end

-- Keep whole groups of `step` items (field+value, member+score) while the total stays in budget;
-- clip single items that alone exceed it.
local function clip(arr, step)
  local out, used, cut = {}, 0, 0
  for i = 1, #arr, step do
    for j = i, i + step - 1 do
      local x = arr[j]
      if #x > maxb then x = cut_at(x); cut = 1 end
      used = used + #x
      out[#out + 1] = x
    end
    if used > maxb then
      for j = 1, step do out[#out] = nil end
      cut = 1
      break
    end
  end
  return out, cut
end

-- The first `maxn` elements of a list or sorted set (`per` replies each), read in growing windows
-- that stop once more than `maxb` bytes are in: one LRANGE of `maxn` elements copied them all
-- into the script however few the byte budget kept, and held Redis for that long.
local function ranged(k, cmd, per, extra)
  local arr, start, step, used = {}, 0, 16, 0
  while start < maxn do
    local stop = math.min(start + step, maxn) - 1
    local part
    if extra then part = redis.call(cmd, k, start, stop, extra)
    else part = redis.call(cmd, k, start, stop) end
    for _, x in ipairs(part) do arr[#arr + 1] = x; used = used + #x end
    if #part < (stop - start + 1) * per or used > maxb then break end
    start = stop + 1
    step = step * 2
  end
  return arr
end

-- Up to `maxn` fields (with their values) of a hash, or members of a set, by HSCAN/SSCAN in
-- growing windows that stop once more than `maxb` bytes are in: HGETALL or SMEMBERS of 1000
-- elements of 10 KB copied 10 MB into the script to keep 64 KB (36 ms of Redis per event).
-- Nothing writes while the script runs, so the cursor meets each element once; `seen` makes
-- sure of it.
local function scanned(k, cmd, per)
  local arr, seen, cursor, step, used, n = {}, {}, '0', 16, 0, 0
  repeat
    local r = redis.call(cmd, k, cursor, 'COUNT', step)
    cursor = r[1]
    local part = r[2]
    for j = 1, #part, per do
      if not seen[part[j]] then
        seen[part[j]] = true
        for q = j, j + per - 1 do arr[#arr + 1] = part[q]; used = used + #part[q] end
        n = n + 1
        if n >= maxn then return arr end
      end
    end
    if used > maxb then return arr end
    step = step * 2
  until cursor == '0'
  return arr
end

local out = {}
for i, k in ipairs(KEYS) do
  local t = redis.call('TYPE', k)['ok']
  local len, v, cut = 0, {}, 0
  if t == 'string' then
    len = redis.call('STRLEN', k)
    if len > maxb then
      v = cut_at(redis.call('GETRANGE', k, 0, maxb))
      cut = 1
    else
      v = redis.call('GETRANGE', k, 0, maxb - 1)
    end
  elseif t == 'hash' then
    len = redis.call('HLEN', k)
    if len <= 16 and len <= maxn then v = redis.call('HGETALL', k)
    else v = scanned(k, 'HSCAN', 2) end
    v, cut = clip(v, 2)
  elseif t == 'list' then
    len = redis.call('LLEN', k)
    v, cut = clip(ranged(k, 'LRANGE', 1), 1)
  elseif t == 'set' then
    len = redis.call('SCARD', k)
    if len <= 16 and len <= maxn then v = redis.call('SMEMBERS', k)
    else v = scanned(k, 'SSCAN', 1) end
    v, cut = clip(v, 1)
  elseif t == 'zset' then
    len = redis.call('ZCARD', k)
    v, cut = clip(ranged(k, 'ZRANGE', 2, 'WITHSCORES'), 2)
  elseif t == 'stream' then
    len = redis.call('XLEN', k)
    -- Newest first, in growing windows (exclusive ranges, Redis 6.2+): one XREVRANGE of
    -- `maxn` entries copied up to 1000 whole entries to keep a few (100 ms for 1000 entries of
    -- 500 fields, at every event of the stream).
    local last, left, step, used, full = '+', maxn, 16, 0, false
    while left > 0 and not full do
      local n = math.min(step, left)
      local entries = redis.call('XREVRANGE', k, last, '-', 'COUNT', n)
      for _, e in ipairs(entries) do
        local fields, c = clip(e[2], 2)
        if c == 1 then cut = 1 end
        for _, x in ipairs(fields) do used = used + #x end
        if used > maxb and #v > 0 then cut = 1; full = true; break end
        v[#v + 1] = {e[1], fields}
      end
      if #entries < n then break end
      left = left - n
      step = step * 2
      last = '(' .. entries[#entries][1]
    end
  end
  out[i] = {t, len, v, cut}
end
return out
"""


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key's type and value as JSON-ready data, with the flags a client needs to read it right.

    `truncated` means `value` holds only part of the key (`length` says how big it really is, in
    bytes for strings and in elements otherwise); `base64` means every string in `value` is base64
    because at least one was not UTF-8.
    """

    type: str
    value: Any
    length: int = 0
    truncated: bool = False
    base64: bool = False

    def after(self) -> dict[str, Any] | None:
        if self.type == "none":
            return None
        return {"value": self.value, "type": self.type}

    def flags(self) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        if self.truncated:
            meta["truncated"] = True
            meta["length"] = self.length
        if self.base64:
            meta["value_base64"] = True
        return meta


def decode_value(reply: Sequence[Any], max_items: int) -> KeyValue:
    """Turn one `[type, length, raw, cut]` row of the script's reply into a KeyValue."""
    kind_raw, length, raw, cut = reply
    kind = kind_raw.decode() if isinstance(kind_raw, bytes) else str(kind_raw)
    truncated = bool(cut)
    if kind == "none":
        return KeyValue("none", None)
    if kind == "string":
        text, b64 = text_or_base64(raw or b"")
        return KeyValue(kind, text, length, truncated, b64)
    if kind in ("hash", "list", "set", "zset"):
        items = list(raw or [])
        if kind == "zset":
            scores = [_score(s) for s in items[1::2]]
            items = items[0::2]
        else:
            scores = []
        strings, b64 = _texts(items)
        value: Any
        if kind == "hash":
            value = dict(zip(strings[0::2], strings[1::2], strict=True))
            shown = len(value)
        elif kind == "zset":
            value = [[m, s] for m, s in zip(strings, scores, strict=True)]
            shown = len(value)
        elif kind == "set":
            value = sorted(strings)
            shown = len(value)
        else:
            value = strings
            shown = len(value)
        return KeyValue(kind, value, length, truncated or shown < length, b64)
    if kind == "stream":
        entries = list(reversed(raw or []))  # the script reads newest first; send oldest first
        flat: list[bytes] = []
        for entry_id, fields in entries:
            flat.append(entry_id)
            flat.extend(fields)
        strings, b64 = _texts(flat)
        out: list[dict[str, Any]] = []
        pos = 0
        for _, fields in entries:
            entry_id = strings[pos]
            pairs = strings[pos + 1 : pos + 1 + len(fields)]
            pos += 1 + len(fields)
            out.append({"id": entry_id, "fields": dict(zip(pairs[0::2], pairs[1::2], strict=True))})
        return KeyValue(kind, out, length, truncated or len(out) < length, b64)
    # Module types (ReJSON-RL, ...): the type is known, the value is not ours to decode.
    return KeyValue(kind, None, length, False, False)


def _texts(items: Sequence[bytes]) -> tuple[list[str], bool]:
    """All items as text, or all as base64 when any is not UTF-8 (one flag covers the value)."""
    try:
        return [item.decode("utf-8") for item in items], False
    except UnicodeDecodeError:
        return [base64.b64encode(item).decode("ascii") for item in items], True


def _score(raw: Any) -> float | str:
    """A score as a number; `inf` and `-inf` (ZADD accepts them) stay text: JSON has no
    infinity, and the encoder wrote them as null, a score lost in silence."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        score = float(text)
    except ValueError:
        return text
    return score if math.isfinite(score) else text
