-- cache_lookup.lua: the semantic lookup's candidates (issue 11): entries of one partition
-- of one tenant that may answer the request, for the client to score exactly. One round
-- trip, only after an exact miss of a cacheable request whose partition is not empty.
-- Touches one tenant's keys only.
--
-- A small partition (at most ARGV[3] entries) is returned whole. A larger one is searched
-- through its LSH buckets: the entries in the query's buckets are ranked by how many
-- tables they share with it (ties in the order the buckets gave them), and the first
-- ARGV[2] returned. A bucket is read up to ARGV[4] members (SRANDMEMBER beyond), so the work is
-- bounded whatever the data (one command a bucket, one an entry: each costs a few us). Members whose entry has expired are dropped from the
-- partition set on the way (bucket sets hold them until eviction or their own expiry).
--
-- KEYS[1]  the partition (set of entry ids)
-- KEYS[2..] the query's LSH buckets, one a table
-- ARGV[1]  the tenant's cache prefix ('<tenant base>:c:')
-- ARGV[2]  most candidates returned
-- ARGV[3]  largest partition returned whole
-- ARGV[4]  most members read from one bucket
--
-- Returns {partition size, id, candidate, id, candidate, ...}; a candidate is the entry's
-- 'cand' field: '<embedder id>\n' .. the vector (little-endian float32) .. the text.
local size = redis.call('SCARD', KEYS[1])
if size == 0 then return {0} end
local max_candidates = tonumber(ARGV[2])
local ids
if size <= tonumber(ARGV[3]) then
  ids = redis.call('SMEMBERS', KEYS[1])
else
  local per_bucket = tonumber(ARGV[4])
  local counts, order = {}, {}
  for i = 2, #KEYS do
    -- (The whole bucket when it is no larger, else that many of its members at random.)
    for _, id in ipairs(redis.call('SRANDMEMBER', KEYS[i], per_bucket)) do
      local c = counts[id]
      if c then
        counts[id] = c + 1
      else
        counts[id] = 1
        order[#order + 1] = id
      end
    end
  end
  -- The most shared tables first, without a sort (a comparator per pair costs more than
  -- the rest of the script): ids grouped by count, taken from the highest count down, in
  -- the order they were met.
  local by_count = {}
  for _, id in ipairs(order) do
    local c = counts[id]
    local group = by_count[c]
    if group then group[#group + 1] = id else by_count[c] = {id} end
  end
  ids = {}
  for c = #KEYS - 1, 1, -1 do
    local group = by_count[c]
    if group then
      for _, id in ipairs(group) do
        if #ids >= max_candidates then break end
        ids[#ids + 1] = id
      end
    end
    if #ids >= max_candidates then break end
  end
end
local out = {size}
local base = ARGV[1]
for _, id in ipairs(ids) do
  local candidate = redis.call('HGET', base .. 'e:' .. id, 'cand')
  if candidate then
    out[#out + 1] = id
    out[#out + 1] = candidate
  else
    redis.call('SREM', KEYS[1], id)  -- expired
  end
end
return out
