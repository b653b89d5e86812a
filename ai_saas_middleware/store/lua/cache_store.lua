-- cache_store.lua: store one response in the tenant's cache (issue 11), within the
-- tenant's bounds: at most ARGV[3] entries and ARGV[4] bytes, the least recently used
-- evicted first (with their bucket memberships, exactly). Sent in the same network
-- round trip as settle.lua (pipelined, same slot). Touches one tenant's keys only.
--
-- KEYS[1]  the entry (hash), written whole, expiring after ARGV[2] seconds
-- KEYS[2]  the tenant's entries by last use (sorted set, ms)
-- KEYS[3]  the tenant's size records (hash: id -> '<bytes> <partition> <codes>')
-- KEYS[4]  the tenant's byte counter
-- KEYS[5]  the entry's partition (set of ids), when it has a semantic text
-- KEYS[6..] its LSH buckets, one a table, in table order
-- ARGV[1]  entry id
-- ARGV[2]  TTL, seconds (>= 1)
-- ARGV[3]  most entries the tenant may hold
-- ARGV[4]  most bytes the tenant's entries may count
-- ARGV[5]  this entry's bytes (its fields, its memberships)
-- ARGV[6]  its partition id ('-' without a semantic text: no partition, no buckets)
-- ARGV[7]  its bucket codes, space-separated, in table order
-- ARGV[8]  the tenant's cache prefix ('<tenant base>:c:')
-- ARGV[9..] the entry's fields, as field, value, field, value ...
--
-- Returns 1 when stored, 0 when the entry alone is over the byte bound.
--#include _cache.lua
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, ttl = ARGV[1], tonumber(ARGV[2])
local max_entries, max_bytes, size = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local base = ARGV[8]
if size > max_bytes then return 0 end
if redis.call('HEXISTS', KEYS[3], id) == 1 then  -- stored again (two misses at once)
  cache_evict(base, KEYS[2], KEYS[3], KEYS[4], id)
end
-- Entries unused for longer than the TTL have expired: their records go (a few a call).
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms - ttl * 1000, 'LIMIT', 0, 16)
for _, old in ipairs(stale) do cache_evict(base, KEYS[2], KEYS[3], KEYS[4], old) end
-- Room: the least recently used go first.
while redis.call('ZCARD', KEYS[2]) >= max_entries
    or tonumber(redis.call('GET', KEYS[4]) or '0') + size > max_bytes do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then
    redis.call('DEL', KEYS[4])  -- nothing left to count
    break
  end
  cache_evict(base, KEYS[2], KEYS[3], KEYS[4], oldest[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[2], now_ms, id)
redis.call('HSET', KEYS[3], id, ARGV[5] .. ' ' .. ARGV[6] .. ' ' .. ARGV[7])
redis.call('INCRBY', KEYS[4], size)
-- Every entry expires within the TTL of its store, so the bookkeeping may go a little
-- after the newest store: a tenant that stops using the cache leaves nothing behind.
for i = 2, 4 do redis.call('EXPIRE', KEYS[i], ttl + 60) end
if ARGV[6] ~= '-' then
  for i = 5, #KEYS do
    redis.call('SADD', KEYS[i], id)
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
return 1
