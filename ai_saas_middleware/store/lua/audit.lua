-- audit.lua: one shard's quota state at one instant, for `ai-saas billing audit`. Read
-- only. Touches one shard's stream and some of its tenants' keys (one hash tag, one
-- cluster slot), so what it returns is a consistent snapshot: every settlement either ran
-- before it (its tokens on the counter, its event at or below the stream id returned) or
-- after it (neither).
--
-- KEYS[1]        usage stream of the shard
-- KEYS[2i], KEYS[2i+1]   (i = 1, 2, ...) a tenant's monthly token counter of the audited
--                month and its reservations in flight (sorted set, see _reservations.lua)
-- ARGV           none
--
-- Returns {last_id, counter_1, members_1, counter_2, members_2, ...}: the id of the last
-- entry ever added to the stream ('0-0' when it was never written), each counter's value
-- (false when absent; '!<error>' when it is not a number) and each tenant's reservation
-- members (all months: the caller keeps those of the audited month).
local last = '0-0'
local info = redis.pcall('XINFO', 'STREAM', KEYS[1])
if type(info) == 'table' and not info.err then
  for i = 1, #info - 1, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
end
local out = {last}
for i = 2, #KEYS - 1, 2 do
  local counter = redis.pcall('GET', KEYS[i])
  if type(counter) == 'table' and counter.err then
    counter = '!' .. counter.err
  end
  table.insert(out, counter)
  local members = redis.pcall('ZRANGE', KEYS[i + 1], 0, -1)
  if type(members) == 'table' and members.err then
    members = {}
  end
  table.insert(out, members)
end
return out
