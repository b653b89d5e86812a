-- cache_lookup.lua: the semantic lookup's candidates (issue 11): entries of one partition
-- of one tenant that may answer the request, for the client to score exactly. One round
-- trip, only after an exact miss of a cacheable request whose partition is not empty.
-- Touches one tenant's keys only.
--
-- A small partition (at most ARGV[3] entries) is returned whole. A larger one is searched
-- through its LSH buckets: the entries in the query's buckets are ranked by how many
-- tables they share with it (then by id, for a stable order), and the first ARGV[2]
-- returned. A bucket is read up to ARGV[4] members (SRANDMEMBER beyond), so the work is
-- bounded whatever the data. Members whose entry has expired are dropped from the
-- partition set on the way (bucket sets hold them until eviction or their own expiry).
--
-- KEYS[1]  the partition (set of entry ids)
-- KEYS[2..] the query's LSH buckets, one a table
-- ARGV[1]  the tenant's cache prefix ('<tenant base>:c:')
-- ARGV[2]  most candidates returned
-- ARGV[3]  largest partition returned whole
-- ARGV[4]  most members read from one bucket
--
-- Returns {partition size, id, text, embedder id, vector bytes, id, text, ...}.
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
    local members
    if redis.call('SCARD', KEYS[i]) > per_bucket then
      members = redis.call('SRANDMEMBER', KEYS[i], per_bucket)
    else
      members = redis.call('SMEMBERS', KEYS[i])
    end
    for _, id in ipairs(members) do
      local c = counts[id]
      if c then
        counts[id] = c + 1
      else
        counts[id] = 1
        order[#order + 1] = id
      end
    end
  end
  table.sort(order, function(a, b)
    if counts[a] ~= counts[b] then return counts[a] > counts[b] end
    return a < b
  end)
  ids = {}
  for i = 1, math.min(#order, max_candidates) do ids[i] = order[i] end
end
local out = {size}
local base = ARGV[1]
for _, id in ipairs(ids) do
  local entry = redis.call('HMGET', base .. 'e:' .. id, 'text', 'emb', 'vec')
  if entry[3] then
    out[#out + 1] = id
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2]
    out[#out + 1] = entry[3]
  else
    redis.call('SREM', KEYS[1], id)  -- expired
  end
end
return out
