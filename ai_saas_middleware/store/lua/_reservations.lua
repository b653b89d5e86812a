-- _reservations.lua: included (--#include) by the scripts that touch a tenant's in-flight
-- reservations. A reservation is one member of the tenant's sorted set res (its hash tag,
-- its slot), scored by its lease deadline (server time, ms):
--   '<request id> <tokens> <YYYY-MM>'   what admission added to that month's counter
-- One entry, so recording, renewing and releasing one is one command each. The counter of
-- month M is named counter_base .. M (counter_base: a quota key without its month; the same
-- hash tag, so the same slot).

-- The tokens and the month of a reservation member (nil when it is not one).
local function reservation_of(member)
  local tokens, month = string.match(member, ' (%d+) (%d%d%d%d%-%d%d)$')
  return tonumber(tokens), month
end

-- Release the reservations whose lease ran out before now_ms: their process died or has
-- stopped renewing them (see LeaseKeeper). At most `limit` per call, so a script stays short;
-- a backlog is worked off by the next calls.
local function reclaim_expired(res, counter_base, now_ms, limit)
  local expired = redis.call('ZRANGEBYSCORE', res, '-inf', now_ms, 'LIMIT', 0, limit)
  for _, member in ipairs(expired) do
    local tokens, month = reservation_of(member)
    if tokens then
      local counter = counter_base .. month
      if redis.call('EXISTS', counter) == 1 then
        redis.pcall('DECRBY', counter, tokens)  -- (a counter no longer a number: skipped)
      end
    end
    redis.call('ZREM', res, member)
  end
end
