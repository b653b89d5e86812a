-- _cache.lua: included (--#include) by the response cache's scripts (issue 11). Every
-- cache key of a tenant is '<tenant base>:c:...' (one hash tag, one slot), and the
-- scripts build the names of entries and buckets they are not given from that prefix:
--   <c>e:<id>                    an entry (hash; expires after cache.ttl)
--   <c>p:<partition>             the entry ids of one partition and embedder (set)
--   <c>l:<partition>:<t>:<code>  LSH bucket t of the partition (set)
-- and the tenant's bookkeeping, given as KEYS by the scripts that write it:
--   <c>lru    entry id -> last use, ms (sorted set)
--   <c>sz     entry id -> '<bytes> <partition> <code> <code> ...' (hash): what an
--             eviction removes, also once the entry itself has expired
--   <c>bytes  the bytes all the tenant's entries count (a counter)

-- Forget entry `id`: its hash, its LRU and size records, its byte count, its partition
-- and bucket memberships (exactly, from its size record).
local function cache_evict(base, lru, sizes, bytes, id)
  local info = redis.call('HGET', sizes, id)
  redis.call('ZREM', lru, id)
  redis.call('DEL', base .. 'e:' .. id)
  if not info then return end
  redis.call('HDEL', sizes, id)
  local size, partition, codes = string.match(info, '^(%d+) (%S+) ?(.*)$')
  if not size then return end
  redis.call('DECRBY', bytes, size)
  redis.call('SREM', base .. 'p:' .. partition, id)
  local t = 0
  for code in string.gmatch(codes, '%S+') do
    redis.call('SREM', base .. 'l:' .. partition .. ':' .. t .. ':' .. code, id)
    t = t + 1
  end
end
