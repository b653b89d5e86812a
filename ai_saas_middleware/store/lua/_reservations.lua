-- _reservations.lua: included (--#include) by the scripts that touch a tenant's in-flight
-- reservations. A reservation is one member of the tenant's sorted set res (its hash tag,
-- its slot), scored by its lease deadline (server time, ms):
--   '<request id> <tokens> <YYYY-MM>'                       tokens only
--   '<request id> <tokens> <YYYY-MM> <pUSD> <YYYY-MM-DD>'   and money, when the tenant
--                                                           has a money budget
-- what admission added to that month's token counter and, in picodollars (10^-12 USD,
-- so every cost this package computes is a whole number of them), to the spend counters
-- of that month and that day. One entry, so recording, renewing and releasing one is one
-- command each. The counters of month M and day D are named from counter_base (a quota
-- key without its month, '<tenant base>:q:'; the same hash tag, so the same slot):
--   counter_base .. M                  tokens of month M
--   <tenant base>:b:m:M, :b:d:D        money spent in month M, on day D (picodollars)

-- The tokens, month, picodollars (a string, '0' when none) and day of a reservation
-- member (nil when it is not one).
local function reservation_of(member)
  -- (Tokens only, the usual case, first: one match.)
  local tokens, month = string.match(member, ' (%d+) (%d%d%d%d%-%d%d)$')
  if tokens then
    return tonumber(tokens), month, '0', nil
  end
  local money, day
  tokens, month, money, day = string.match(
    member, ' (%d+) (%d%d%d%d%-%d%d) (%d+) (%d%d%d%d%-%d%d%-%d%d)$')
  return tonumber(tokens), month, money, day
end

-- A USD amount in plain decimals ('0.000015', '12', at most 12 decimal places) as a whole
-- number of picodollars, a string (built digit by digit: no Lua number, so exact at any
-- size); nil for anything else.
local function usd_to_picodollars(usd)
  local whole, fraction = string.match(usd, '^(%d+)%.?(%d*)$')
  if not whole or #fraction > 12 then
    return nil
  end
  local digits = string.gsub(whole .. fraction .. string.rep('0', 12 - #fraction), '^0+', '')
  return digits == '' and '0' or digits
end

local function spend_keys(counter_base, month, day)
  local base = string.sub(counter_base, 1, -3)  -- '<tenant base>:'
  return base .. 'b:m:' .. month, base .. 'b:d:' .. day
end

-- Take back `money` picodollars (a string) from the spend counters of month and day.
local function release_money(counter_base, month, day, money)
  if money == '0' or not day then
    return
  end
  local m, d = spend_keys(counter_base, month, day)
  for _, key in ipairs({m, d}) do
    if redis.call('EXISTS', key) == 1 then
      redis.pcall('DECRBY', key, money)  -- (a counter no longer a number: skipped)
    end
  end
end

-- Release the reservations whose lease ran out before now_ms: their process died or has
-- stopped renewing them (see LeaseKeeper). At most `limit` per call, so a script stays short;
-- a backlog is worked off by the next calls.
local function reclaim_expired(res, counter_base, now_ms, limit)
  local expired = redis.call('ZRANGEBYSCORE', res, '-inf', now_ms, 'LIMIT', 0, limit)
  for _, member in ipairs(expired) do
    local tokens, month, money, day = reservation_of(member)
    if tokens then
      local counter = counter_base .. month
      if redis.call('EXISTS', counter) == 1 then
        redis.pcall('DECRBY', counter, tokens)  -- (a counter no longer a number: skipped)
      end
      release_money(counter_base, month, day, money)
    end
    redis.call('ZREM', res, member)
  end
end
