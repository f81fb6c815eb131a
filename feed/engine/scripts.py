"""The Lua scripts of the Redis engine: each one a single atomic step on the Redis side.

Numbering, history and the live publication of a change happen in one script, so a node that
reads the history after a publication sees exactly what was published, with the same numbers; and
the script refuses a reader whose fencing token is no longer the current one, so a paused old
reader that wakes up after another node took its connector over cannot publish anything.
"""

ACQUIRE = """
-- KEYS: lease, fence. ARGV: node, lease ms. Returns the new fencing token, or nil.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
  return token
end
return false
"""

RENEW = """
-- KEYS: lease. ARGV: holder ('node|token'), lease ms. 1 when still ours (and renewed), else 0.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

RELEASE = """
-- KEYS: lease. ARGV: holder. Deletes the lease only if it is still ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

PUBLISH = """
-- KEYS: fence, seen (zset of recent change ids), then (meta, stream) per room.
-- ARGV: token, history, candidate epoch, ttl ms, change id, its number at this reader
--       (token * 2^32 + count: increasing across readers), trim (1: trim seen and refresh ttls),
--       ids kept, then (channel, payload) per room.
-- Returns the room seqs, in order, or nil when this change id was published already (a new
-- reader re-reads from the connector's last saved position, which may be a little behind what
-- the old one published). A stale token is refused before anything is written.
-- Seven commands for a change that goes to one room (with EVALSHA): the cost per change that
-- docs/scaling.md counts.
local fence = redis.call('GET', KEYS[1])
if fence ~= ARGV[1] then
  return redis.error_reply('STALE fencing token ' .. ARGV[1] .. ', current ' .. tostring(fence))
end
if redis.call('ZADD', KEYS[2], 'NX', ARGV[6], ARGV[5]) == 0 then
  return false
end
local trim = ARGV[7] == '1'
if trim then
  local kept = redis.call('ZCARD', KEYS[2])
  if kept > tonumber(ARGV[8]) then
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, kept - tonumber(ARGV[8]) - 1)
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
local out = {}
local rooms = (#KEYS - 2) / 2
for i = 1, rooms do
  local meta, stream = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    -- New room, or Redis lost it: a new epoch, and no history that could contradict it.
    epoch = ARGV[3]
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  local payload = ARGV[8 + 2 * i]
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[2], seq .. '-1', 'd', payload)
  if trim or seq % 64 == 1 then
    redis.call('PEXPIRE', meta, ARGV[4])
    redis.call('PEXPIRE', stream, ARGV[4])
  end
  redis.call('PUBLISH', ARGV[7 + 2 * i], seq .. '\\n' .. epoch .. '\\n' .. payload)
  out[i] = seq
end
return out
"""

REGISTER = """
-- KEYS: registry hash, live zset, meta. ARGV: room name, spec, expiry ms, candidate epoch, ttl.
-- Registers a followed room and returns {epoch, seq, gap} of its history.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[1])
if redis.call('HSETNX', KEYS[3], 'epoch', ARGV[4]) == 1 then
  redis.call('HSET', KEYS[3], 'seq', 0)
end
redis.call('PEXPIRE', KEYS[3], ARGV[5])
local v = redis.call('HMGET', KEYS[3], 'epoch', 'seq', 'gap')
return {v[1], v[2] or '0', v[3] or '0'}
"""

GAP = """
-- KEYS: meta per room. ARGV: body, then a channel per room.
-- Marks every room's history as untrustworthy up to its current seq and tells the nodes.
for i = 1, #KEYS do
  local seq = redis.call('HGET', KEYS[i], 'seq') or '0'
  redis.call('HSET', KEYS[i], 'gap', seq)
  redis.call('PUBLISH', ARGV[i + 1], 'gap\\n' .. seq .. '\\n' .. ARGV[1])
end
return #KEYS
"""
