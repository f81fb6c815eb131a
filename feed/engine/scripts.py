"""The Lua scripts of the Redis engine: each one a single atomic step on the Redis side.

Numbering, history and the live publication of a change happen in one script, so a node that
reads the history after a publication sees exactly what was published, with the same numbers; and
the script refuses a reader whose fencing token is no longer the current one, so a paused old
reader that wakes up after another node took its connector over cannot publish anything.
"""

ACQUIRE = """
-- KEYS: lease, fence. ARGV: node, lease ms, a random tag. Returns the new fencing token, or,
-- when another node holds the lease, its holder ('node|token') and the ms it has left (PTTL).
-- The token is the count of readings so far and the tag ('7:9f3a...'): the count orders them
-- (its first reader announces no move), the tag keeps two readings from ever sharing a token,
-- even when Redis lost the counter (a restart without persistence) and counts from 1 again
-- while a reader from before the loss still holds its old token.
-- The fence is read first: a key this script cannot read (WRONGTYPE) fails it before the lease
-- is written, so a refused node holds nothing (it held the lease, reading nothing, before).
local fence = redis.call('GET', KEYS[2])
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local count = tonumber(string.match(fence or '0', '^%d+') or '0') + 1
  local token = count .. ':' .. ARGV[3]
  redis.call('SET', KEYS[2], token)
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
  return token
end
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

RENEW = """
-- KEYS: lease. ARGV: holder ('node|token'), lease ms. 1 when still ours (and renewed), 0 when
-- another node holds it, -1 when nobody does (it expired, or Redis lost it).
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then
  return 0
end
return -1
"""

NAME = """
-- KEYS: the node name's key. ARGV: this process's instance tag, ms to keep it, and 1 to claim it
-- (set or renew) or 0 to let it go. Claiming returns 1 when the name is this process's, 0 while
-- another process holds it (two nodes configured with one `node`, or one that just died).
local holder = redis.call('GET', KEYS[1])
if ARGV[3] == '0' then
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[1])
  end
  return 1
end
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

RELEASE = """
-- KEYS: lease. ARGV: holder, the control channel, the message that says so. Deletes the lease
-- only if it is still ours, and tells the nodes waiting for it (they wait for its expiry else).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

PUBLISH = """
-- A batch of changes (what the connector had ready at once), in order, in one call.
-- KEYS: fence, seen (zset of recent change ids), live (the connector's registered rooms), then
--       (meta, stream) per distinct room.
-- ARGV: token, history, candidate epoch, ttl ms, trim (1: trim seen and refresh ttls), ids kept,
--       room count R, change count N, bytes of payloads the call may publish, lapse ms, R flags
--       ('1' per row or filter room, else '0', in one string), the prefix of room keys
--       ('<prefix>:room:'), the number of the last change this reading published (below), or
--       '', then R channels, then per change: its id, its number at this reader
--       (the token's count * 2^32 + changes published: increasing across readers), its room
--       count k, and k (room index, payload) pairs.
-- Returns, per change and per room of it, the room's seq (0 for a change published already:
-- a new reader re-reads from the connector's last saved position, which may be a little behind
-- what the old one published). A stale token is refused before anything is written.
-- Commands: per call GET, ZADD, and per room HMGET, HSET, PUBLISH (one message carries the
-- room's whole run of the batch); per change and room one XADD (docs/scaling.md counts them).
-- A row or filter room whose numbering is missing and that is not in `live` was dropped (by
-- LIVE, as nobody follows it) after the reader routed this batch: it is still published (a
-- node may yet follow it, and hears of its new epoch), but its keys are marked 'lapse' and
-- kept only `lapse` ms unless a node registers or refreshes it (which clears the mark); they
-- stayed `ttl` (24 h by default) before, for every room dropped while a batch was under way.
local fence = redis.call('GET', KEYS[1])
if fence ~= ARGV[1] then
  if not fence then
    return redis.error_reply('STALE fencing token ' .. ARGV[1] .. ': Redis no longer holds the '
      .. 'lease (restarted without persistence, flushed, or evicted it under maxmemory)')
  end
  return redis.error_reply('STALE fencing token ' .. ARGV[1] .. ', current ' .. fence)
end
local rooms, n = tonumber(ARGV[7]), tonumber(ARGV[8])
if ARGV[13] and ARGV[13] ~= '' then
  -- Redis holds none of the changes it took last from this reading: it came back with older
  -- data (an RDB restore, a failover to a replica that lagged), and the rooms' numbering went
  -- back with it. Numbering on would give changes numbers clients had for others (they would
  -- drop them as repeats): every room of the connector begins again instead, in a new epoch,
  -- its nodes told ('drop') so that its members get a gap.
  local top = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  if top[2] and tonumber(top[2]) < tonumber(ARGV[13]) then
    for _, name in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
      local meta = ARGV[12] .. name .. ':meta'
      local epoch = redis.call('HGET', meta, 'epoch')
      redis.call('DEL', meta, ARGV[12] .. name .. ':history')
      if epoch then
        redis.call('PUBLISH', ARGV[12] .. name .. ':live', 'drop\\n' .. epoch)
      end
    end
    for r = 1, rooms do
      local epoch = redis.call('HGET', KEYS[2 * r + 2], 'epoch')
      redis.call('DEL', KEYS[2 * r + 2], KEYS[2 * r + 3])
      if epoch then
        redis.call('PUBLISH', ARGV[13 + r], 'drop\\n' .. epoch)
      end
    end
  end
end
local changes, zadd = {}, {}
local at = 14 + rooms
for c = 1, n do
  local k = tonumber(ARGV[at + 2])
  changes[c] = {at, k}
  zadd[2 * c - 1] = ARGV[at + 1]
  zadd[2 * c] = ARGV[at]
  at = at + 3 + 2 * k
end
local fresh = {}
if redis.call('ZADD', KEYS[2], 'NX', unpack(zadd)) < n then
  -- Some ids were there before: those whose score is not the one given here are repeats.
  local ids = {}
  for c = 1, n do ids[c] = ARGV[changes[c][1]] end
  local scores = redis.call('ZMSCORE', KEYS[2], unpack(ids))
  for c = 1, n do fresh[c] = tonumber(scores[c]) == tonumber(ARGV[changes[c][1] + 1]) end
else
  for c = 1, n do fresh[c] = true end
end
local trim = ARGV[5] == '1'
if trim then
  local kept = redis.call('ZCARD', KEYS[2])
  if kept > tonumber(ARGV[6]) then
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, kept - tonumber(ARGV[6]) - 1)
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local epochs, first, seqs, runs, sizes, remade, lapsing = {}, {}, {}, {}, {}, {}, {}
local out = {}
-- A room's first entry of the call goes in with NOMKSTREAM, which says when its history is
-- gone: a history that expired before its numbering (registering refreshes only the numbering)
-- is made again here and must expire with it. A history holding ids past the numbering is
-- another epoch's (its numbering was evicted, say): it is replaced, since XADD would refuse
-- this call, and so every room of the connector, for good.
local function append(r, stream, seq, payload)
  local id = seq .. '-1'
  if first[r] ~= seq then
    redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], id, 'd', payload)
    return
  end
  if seq == 1 then
    -- A numbering's first entry: the history an earlier numbering left was deleted when this
    -- one began, so the stream is made here (one XADD), unless that history came back.
    local made = redis.pcall('XADD', stream, 'MAXLEN', '~', ARGV[2], id, 'd', payload)
    if type(made) == 'table' and made.err then
      redis.call('DEL', stream)
      redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], id, 'd', payload)
    end
    return
  end
  local added = redis.pcall('XADD', stream, 'NOMKSTREAM', 'MAXLEN', '~', ARGV[2], id, 'd', payload)
  if type(added) == 'table' and added.err then
    redis.call('DEL', stream)
    added = false
  end
  if not added then
    redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], id, 'd', payload)
    remade[r] = true
  end
end
for c = 1, n do
  local base, k = changes[c][1], changes[c][2]
  for j = 1, k do
    local r = tonumber(ARGV[base + 1 + 2 * j])
    if not fresh[c] then
      out[#out + 1] = 0
    else
      local meta, stream = KEYS[2 * r + 2], KEYS[2 * r + 3]
      if not epochs[r] then
        local v = redis.call('HMGET', meta, 'epoch', 'seq', 'lapse')
        if not v[1] then
          -- New room, or Redis lost it: a new epoch, and no history that could contradict it.
          epochs[r], seqs[r] = ARGV[3], 0
          redis.call('DEL', stream)
          redis.call('HSET', meta, 'epoch', ARGV[3])
          local name = string.sub(meta, #ARGV[12] + 1, -6)
          if string.byte(ARGV[11], r) == 49 and not redis.call('ZSCORE', KEYS[3], name) then
            lapsing[r] = true
            redis.call('HSET', meta, 'lapse', 1)
          end
        else
          epochs[r], seqs[r], lapsing[r] = v[1], tonumber(v[2] or '0'), v[3] ~= false
        end
        first[r], runs[r], sizes[r] = seqs[r] + 1, {}, 0
      end
      local seq = seqs[r] + 1
      seqs[r] = seq
      local payload = ARGV[base + 2 + 2 * j]
      append(r, stream, seq, payload)
      runs[r][#runs[r] + 1] = payload
      sizes[r] = sizes[r] + #payload
      out[#out + 1] = seq
    end
  end
end
local budget = tonumber(ARGV[9])
for r = 1, rooms do
  if epochs[r] then
    local meta, stream = KEYS[2 * r + 2], KEYS[2 * r + 3]
    redis.call('HSET', meta, 'seq', seqs[r])
    if trim or remade[r] or math.floor((first[r] - 2) / 64) ~= math.floor((seqs[r] - 1) / 64) then
      local ttl = lapsing[r] and ARGV[10] or ARGV[4]
      redis.call('PEXPIRE', meta, ttl)
      redis.call('PEXPIRE', stream, ttl)
    end
    -- One message for the room's run: its first seq, the epoch, then one payload a line
    -- (JSON payloads hold no raw newline). Everything a call publishes sits whole in each
    -- subscriber's output buffer until the call ends, and Redis cuts a subscriber past
    -- `client-output-buffer-limit pubsub`: a run that would take the call past its budget goes
    -- as a reference instead ('ref', its first and last seq, the epoch), and the nodes read
    -- it from the history the call just wrote (feed.engine.delivery).
    if sizes[r] > budget then
      redis.call('PUBLISH', ARGV[13 + r],
        'ref\\n' .. first[r] .. '\\n' .. seqs[r] .. '\\n' .. epochs[r])
    else
      budget = budget - sizes[r]
      redis.call('PUBLISH', ARGV[13 + r],
        first[r] .. '\\n' .. epochs[r] .. '\\n' .. table.concat(runs[r], '\\n'))
    end
  end
end
return out
"""

NOW_MS = """
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
"""
"""Redis's own clock, in ms: the registry's expiries are set and read by it, never by a node's
clock, so a node whose clock is off (a failed NTP, a VM restored from a snapshot) neither has
its rooms dropped by the reader as long expired nor keeps them alive long after it left."""

REGISTER = (
    """
-- KEYS: registry hash, live zset, meta, history. ARGV: room name, spec, ms to keep it alive
-- (from Redis's clock), candidate epoch, ttl, control channel, the room's channel. Registers a
-- followed room, tells the reader (one round trip for both), and returns {epoch, seq, gap} of
-- its history. A new numbering starts a new epoch, so a history left from an earlier one (it
-- outlived its numbering) is not this epoch's; and it is said on the room's channel ('epoch',
-- seq 0, the epoch), so that a node still following the old one tells its clients now, not
-- at the room's next change (feed.engine.delivery). Once per numbering, never per change.
-- ARGV 8 and 9 (optional): a seq and the epoch this node delivered it in. A numbering of that
-- epoch below that seq went back: Redis came back with older data than it gave out (an RDB
-- restore, a failover to a replica that lagged), and the changes numbered next would take
-- numbers clients already had for other changes. It begins again, as for a numbering lost.
"""
    + NOW_MS
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'GT', now_ms + tonumber(ARGV[3]), ARGV[1])
if ARGV[9] then
  local had = redis.call('HMGET', KEYS[3], 'epoch', 'seq')
  if had[1] == ARGV[9] and tonumber(had[2] or '0') < tonumber(ARGV[8]) then
    redis.call('DEL', KEYS[3])
  end
end
if redis.call('HSETNX', KEYS[3], 'epoch', ARGV[4]) == 1 then
  redis.call('HSET', KEYS[3], 'seq', 0)
  redis.call('DEL', KEYS[4])
  if ARGV[7] then
    redis.call('PUBLISH', ARGV[7], 'epoch\\n0\\n' .. ARGV[4])
  end
elseif redis.call('HDEL', KEYS[3], 'lapse') == 1 then
  -- Made by a publish after it was dropped (PUBLISH): followed again, it keeps the full ttl.
  redis.call('PEXPIRE', KEYS[4], ARGV[5])
end
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('PUBLISH', ARGV[6], '{"t":"room","spec":' .. ARGV[2] .. '}')
local v = redis.call('HMGET', KEYS[3], 'epoch', 'seq', 'gap')
return {v[1], v[2] or '0', v[3] or '0'}
"""
)

REFRESH = (
    """
-- A node's followed rooms, kept alive. KEYS: registry hash, live zset, then (meta, history) per
-- room. ARGV: ms to keep them alive (from Redis's clock), ttl ms, then (name, 1 for a row or
-- filter room else 0) per room. Returns the row and filter rooms the registry no longer held
-- (the reader dropped them as expired): their node registers them again and tells the reader.
"""
    + NOW_MS
    + """
local live, expiry, ttl = KEYS[2], now_ms + tonumber(ARGV[1]), ARGV[2]
local missing = {}
for i = 1, (#ARGV - 2) / 2 do
  local name = ARGV[1 + 2 * i]
  if ARGV[2 + 2 * i] == '1' then
    if not redis.call('ZSCORE', live, name) then
      missing[#missing + 1] = name
      redis.call('HDEL', KEYS[1 + 2 * i], 'lapse')  -- followed: the full ttl (PUBLISH)
    end
    redis.call('ZADD', live, 'GT', expiry, name)
  end
  redis.call('PEXPIRE', KEYS[1 + 2 * i], ttl)
  redis.call('PEXPIRE', KEYS[2 + 2 * i], ttl)
end
return missing
"""
)

LAPSE = (
    """
-- KEYS: live zset. ARGV: ms left to the rooms (from Redis's clock), then their names. A node
-- dropped them: their registration lapses that soon, unless a node that keeps them (members,
-- or idle within their grace) refreshes them first, as it does every refresh period. Only
-- entries there are shortened (XX), never lengthened (LT).
"""
    + NOW_MS
    + """
local expiry = now_ms + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', 'LT', expiry, ARGV[i])
end
return 0
"""
)

LIVE = (
    """
-- KEYS: live zset, registry hash. ARGV: the prefix of room keys ('<prefix>:room:').
-- Returns the rooms whose expiry is still ahead by Redis's clock. The others are dropped here,
-- in the same step; a row, filter or shaped room with its numbering and history, since one
-- nobody follows is not routed: the changes that came meanwhile were never numbered in it, and
-- a resume from before must find a new epoch (recovered: false), not the old one with a hole
-- in it. Done in one step so that a room registered again in between keeps its numbers.
-- A dropped numbering is said on the room's channel ('drop', its epoch): a node still
-- following the room (one late to refresh it: paused, or cut from Redis) registers it again
-- at once and its clients get a `gap`, not a silence until the room's next change.
"""
    + NOW_MS
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms)
for _, name in ipairs(dead) do
  -- Target rooms are registered too (REGISTER, when a node first follows one) but are routed
  -- whether or not anyone follows them: their history is whole, and stays.
  local ok, spec = pcall(cjson.decode, redis.call('HGET', KEYS[2], name) or 'null')
  if ok and type(spec) == 'table' and (spec.shape or (spec.key ~= nil and spec.key ~= cjson.null)
      or (spec.filter ~= nil and spec.filter ~= cjson.null)) then
    local epoch = redis.call('HGET', ARGV[1] .. name .. ':meta', 'epoch')
    redis.call('DEL', ARGV[1] .. name .. ':meta', ARGV[1] .. name .. ':history')
    if epoch then
      redis.call('PUBLISH', ARGV[1] .. name .. ':live', 'drop\\n' .. epoch)
    end
  end
  redis.call('ZREM', KEYS[1], name)
  redis.call('HDEL', KEYS[2], name)
end
return redis.call('ZRANGEBYSCORE', KEYS[1], now_ms, '+inf')
"""
)

GAP = """
-- KEYS: meta per room. ARGV: body, then a channel per room.
-- Marks every room's history as untrustworthy up to its current seq and tells the nodes. A
-- room whose keys are gone (LIVE dropped it while the reader still routed it) gets no mark: an
-- HSET would make a meta of the mark alone, with no expiry, left in Redis for good.
for i = 1, #KEYS do
  local seq = redis.call('HGET', KEYS[i], 'seq') or '0'
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('HSET', KEYS[i], 'gap', seq)
  end
  redis.call('PUBLISH', ARGV[i + 1], 'gap\\n' .. seq .. '\\n' .. ARGV[1])
end
return #KEYS
"""
