-- settle.lua: record one AI request's real usage, once. Replaces the request's reservation
-- by its real token count on the monthly counter and appends the usage event to the
-- shard's stream, atomically, in one round trip. Touches one tenant's keys and its shard's
-- stream (one hash tag, one cluster slot).
--
-- What is released is what Redis holds for this request (KEYS[4]), not what the caller
-- believes: an admission whose reply was lost (served from the local allowance) is still
-- released exactly, and a reservation already released because its lease ran out is not
-- released twice.
--
-- All or none: Redis does not roll a script back, so the writes are ordered and
-- compensated. Every read that can fail comes first; the first write is the XADD, so an
-- error reply that refuses writes (OOM under maxmemory, READONLY on a replica, MISCONF)
-- refuses it before anything changed, and reaches the caller with its own first word;
-- a counter that cannot move (a key of another type, not a number) takes the event back
-- (XDEL) and answers WRONGTYPE. After that nothing can fail. A retry or a replay of a
-- request id already settled changes nothing (KEYS[3]).
--
-- KEYS[1]  monthly token counter of the admission month (the real usage is added here)
-- KEYS[2]  usage stream of the tenant's shard
-- KEYS[3]  settled marker of this request id (dedupes retries and spool replays)
-- KEYS[4]  reservations in flight: sorted set, '<request id> <tokens> <YYYY-MM>' -> lease
--          deadline (ms)
-- ARGV[1]  real tokens of the request (prompt + completion), >= 0
-- ARGV[2]  TTL of the settled marker, seconds (>= 1)
-- ARGV[3]  TTL of a new monthly counter, seconds (a replay may create it)
-- ARGV[4]  the request's reservation member, as admit.lua records it
-- ARGV[5..] the event, as field, value, field, value ...
--
-- A reservation with money (the member's '<pUSD> <YYYY-MM-DD>' part) has the event's cost
-- (picodollars) counted on that month's and day's spend, in place of what was reserved.
--
-- Returns the stream entry id, or false when this request id was already settled.
--#include _reservations.lua
if redis.call('EXISTS', KEYS[3]) == 1 then
  return false
end
local actual = tonumber(ARGV[1])
-- (WRONGTYPE here: before any write)
local held = redis.call('ZSCORE', KEYS[4], ARGV[4])
-- What the member says was reserved (parsed once: whether Redis still holds it or not).
local member_tokens, member_month, money, money_day = reservation_of(ARGV[4])
local held_tokens, held_month = 0, nil
if held then
  held_tokens, held_month = member_tokens or 0, member_month
end
local counter_base = string.sub(KEYS[1], 1, -8)
local here = string.sub(KEYS[1], -7)
-- Money: when admission reserved some (the member's money part), the real cost (the
-- event's cost, in picodollars, built as a string: exact at any size) replaces it on the
-- spend counters of the admission's month and day.
local money_month = member_month
local cost = nil
if money_day then
  for i = 5, #ARGV - 1, 2 do
    if ARGV[i] == 'cost' then cost = usd_to_picodollars(ARGV[i + 1]) end
  end
  if not cost then
    return redis.error_reply('ERR settle.lua: the event has no cost in plain decimals '
                             .. 'with at most 12 decimal places')
  end
end

local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 5))

local delta = actual
if held_month == here then
  delta = actual - held_tokens
end
if delta ~= 0 then
  local moved = redis.pcall('INCRBY', KEYS[1], delta)
  if type(moved) == 'table' and moved.err then
    redis.call('XDEL', KEYS[2], id)
    return redis.error_reply('WRONGTYPE ' .. KEYS[1] .. ' cannot count tokens: ' .. moved.err)
  end
  if redis.call('TTL', KEYS[1]) < 0 then
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  end
end
if cost then
  local spent_m, spent_d = spend_keys(counter_base, money_month, money_day)
  local done = {}
  for _, key in ipairs({spent_m, spent_d}) do
    local moved = redis.pcall('INCRBY', key, cost)
    if type(moved) == 'table' and moved.err then
      for _, back in ipairs(done) do redis.call('DECRBY', back, cost) end
      if delta ~= 0 then redis.call('DECRBY', KEYS[1], delta) end
      redis.call('XDEL', KEYS[2], id)
      return redis.error_reply('WRONGTYPE ' .. key .. ' cannot count money: ' .. moved.err)
    end
    table.insert(done, key)
  end
  if held then
    redis.call('DECRBY', spent_m, money)
    redis.call('DECRBY', spent_d, money)
  end
  if redis.call('TTL', spent_m) < 0 then redis.call('EXPIRE', spent_m, tonumber(ARGV[3])) end
  if redis.call('TTL', spent_d) < 0 then redis.call('EXPIRE', spent_d, 3 * 86400) end
end
if held_month and held_month ~= here then
  -- Reserved against another month's counter (a month boundary): released there.
  local other = counter_base .. held_month
  if redis.call('EXISTS', other) == 1 then
    redis.pcall('DECRBY', other, held_tokens)  -- (one no longer a number: skipped)
  end
end
if held then
  redis.call('ZREM', KEYS[4], ARGV[4])
end
redis.call('SET', KEYS[3], '1', 'EX', math.max(1, tonumber(ARGV[2]) or 1))
return id
