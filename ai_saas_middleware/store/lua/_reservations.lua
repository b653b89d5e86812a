-- _reservations.lua: included (--#include) by the scripts that touch a tenant's in-flight
-- reservations. A reservation is two entries of the tenant's keys (its hash tag, its slot):
--   res   sorted set: request id -> lease deadline (server time, ms)
--   resv  hash:       request id -> '<tokens> <YYYY-MM>' (what was added to that month's
--                     counter at admission)
-- The counter of month M is named counter_base .. M (counter_base: a quota key without its
-- month; the same hash tag, so the same slot).

-- Release the reservations whose lease ran out before now_ms: their process died or has
-- stopped renewing them (see LeaseKeeper). At most `limit` per call, so a script stays short;
-- a backlog is worked off by the next calls.
local function reclaim_expired(res, resv, counter_base, now_ms, limit)
  local expired = redis.call('ZRANGEBYSCORE', res, '-inf', now_ms, 'LIMIT', 0, limit)
  for _, rid in ipairs(expired) do
    local held = redis.call('HGET', resv, rid)
    if held then
      local tokens, month = string.match(held, '^(%d+) (%d%d%d%d%-%d%d)$')
      if tokens then
        local counter = counter_base .. month
        if redis.call('EXISTS', counter) == 1 then
          redis.pcall('DECRBY', counter, tokens)  -- (a counter no longer a number: skipped)
        end
      end
      redis.call('HDEL', resv, rid)
    end
    redis.call('ZREM', res, rid)
  end
end
