-- release.lua: give back the reservation of a request that will not be served after all
-- (its admission was cancelled while admit.lua's reply was on its way). Only what Redis
-- holds for the request is released (tokens, and money when it reserved some), once; no event is written (the client never saw the
-- request admitted). Its admission stays in the rate-limit log: it was an attempt.
--
-- KEYS[1]  reservations in flight: sorted set, '<request id> <tokens> <YYYY-MM>' -> lease
--          deadline (ms)
-- KEYS[2]  a monthly counter of the tenant (any month: its name gives the others')
-- ARGV[1]  the reservation member admit.lua would have recorded
--
-- Returns the tokens released (0 when nothing was held).
--#include _reservations.lua
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local tokens, month, money, day = reservation_of(ARGV[1])
if not tokens then
  return 0
end
local counter_base = string.sub(KEYS[2], 1, -8)
local counter = counter_base .. month
if redis.call('EXISTS', counter) == 1 then
  redis.pcall('DECRBY', counter, tokens)
end
release_money(counter_base, month, day, money)
return tokens
