-- cache_lookup.lua: the semantic lookup's candidates (issue 11): entries of one partition
-- of one tenant that may answer the request, for the client to score exactly, and the
-- body of the likeliest few, so that a semantic hit usually needs no second round trip.
-- One round trip, only after an exact miss of a cacheable request whose partition is not
-- empty. Touches one tenant's keys only; writes nothing but the removal of expired ids.
--
-- A small partition (at most ARGV[3] entries) is returned whole. A larger one is searched
-- through its LSH buckets: the entries in the query's buckets are ranked by how many
-- tables they share with it (ties in the order the buckets gave them), and the first
-- ARGV[2] returned. A bucket is read up to ARGV[4] members (SRANDMEMBER beyond), so the
-- work is bounded whatever the data (one command a bucket, one an entry: each costs a few
-- us). Members whose entry has expired are dropped from the partition set on the way
-- (bucket sets hold them until eviction or their own expiry).
--
-- Speculative bodies: the ARGV[5] candidates that share the most LSH tables with the
-- query (the bucketed search's own ranking; for a whole partition, counted from the
-- query's buckets, at most ARGV[4] members each) come back with what a hit serves (as
-- cache_fetch.lua returns it), when their body is at most ARGV[6] bytes. They are read,
-- not used: the client decides, and records the use of the one it serves with its
-- settlement (cache_touch.lua). (A Hamming distance over all the codes' bits, read
-- from the size records, ranked no better here and cost 0.7 ms of Lua at 32
-- candidates: benchmarks/README.md.)
--
-- KEYS[1]  the partition (set of entry ids)
-- KEYS[2..] the query's LSH buckets, one a table
-- ARGV[1]  the tenant's cache prefix ('<tenant base>:c:')
-- ARGV[2]  most candidates returned
-- ARGV[3]  largest partition returned whole
-- ARGV[4]  most members read from one bucket
-- ARGV[5]  most bodies returned (0: none)
-- ARGV[6]  largest body returned, bytes
--
-- Returns {partition size, bodies, id, candidate, id, candidate, ...}; a candidate is the
-- entry's 'cand' field: '<embedder id>\n' .. the vector (little-endian float32) .. the
-- text; bodies is {id, body, prompt_tokens, completion_tokens, model, id, ...}, the
-- likeliest first.
local size = redis.call('SCARD', KEYS[1])
if size == 0 then return {0, {}} end
local max_candidates = tonumber(ARGV[2])
local ids, counts
if size <= tonumber(ARGV[3]) then
  ids = redis.call('SMEMBERS', KEYS[1])
else
  local per_bucket = tonumber(ARGV[4])
  local order = {}
  counts = {}
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
local base = ARGV[1]
local found, candidates = {}, {}
for _, id in ipairs(ids) do
  local candidate = redis.call('HGET', base .. 'e:' .. id, 'cand')
  if candidate then
    found[#found + 1] = id
    candidates[#candidates + 1] = candidate
  else
    redis.call('SREM', KEYS[1], id)  -- expired
  end
end
local bodies = {}
local most_bodies = tonumber(ARGV[5])
if most_bodies > 0 and #found > 0 then
  if not counts then  -- a whole partition: its members' shared tables, from the buckets
    counts = {}
    for i = 2, #KEYS do
      for _, id in ipairs(redis.call('SRANDMEMBER', KEYS[i], ARGV[4])) do
        counts[id] = (counts[id] or 0) + 1
      end
    end
  end
  -- The few sharing the most tables, by selection (most_bodies is small); ties in the
  -- candidates' order.
  local taken, limit = {}, tonumber(ARGV[6])
  for _ = 1, math.min(most_bodies, #found) do
    local best, best_count = nil, -1
    for i = 1, #found do
      local c = counts[found[i]] or 0
      if not taken[i] and c > best_count then best, best_count = i, c end
    end
    taken[best] = true
    local key = base .. 'e:' .. found[best]
    if redis.call('HSTRLEN', key, 'body') <= limit then
      local entry = redis.call('HMGET', key, 'body', 'pt', 'ct', 'model')
      if entry[1] then
        bodies[#bodies + 1] = found[best]
        for f = 1, 4 do bodies[#bodies + 1] = entry[f] or '' end
      end
    end
  end
end
local out = {size, bodies}
for i, id in ipairs(found) do
  out[#out + 1] = id
  out[#out + 1] = candidates[i]
end
return out
