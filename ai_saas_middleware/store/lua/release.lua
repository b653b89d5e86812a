-- release.lua: give back the reservation of a request that will not be served after all
-- (its admission was cancelled while admit.lua's reply was on its way). Only what Redis
-- holds for the request id is released, once; no event is written (the client never saw
-- the request admitted). Its admission stays in the rate-limit log: it was an attempt.
--
-- KEYS[1]  reservations in flight: sorted set, request id -> lease deadline (ms)
-- KEYS[2]  reservations in flight: hash, request id -> '<tokens> <YYYY-MM>'
-- KEYS[3]  a monthly counter of the tenant (any month: its name gives the others')
-- ARGV[1]  request id
--
-- Returns the tokens released (0 when nothing was held).
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local tokens, month = string.match(held, '^(%d+) (%d%d%d%d%-%d%d)$')
local counter = string.sub(KEYS[3], 1, -8) .. (month or '')
if tokens and redis.call('EXISTS', counter) == 1 then
  redis.pcall('DECRBY', counter, tokens)
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
return tonumber(tokens) or 0
