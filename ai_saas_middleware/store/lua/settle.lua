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
-- compensated. Nothing is written until the event is known to be well formed. The first
-- write is the settled marker (SET NX: it also answers whether this request id was
-- settled already), so an error reply that refuses writes (OOM under maxmemory, READONLY
-- on a replica, MISCONF) refuses it before anything changed, and reaches the caller with
-- its own first word. A key that cannot take its write (another type, a counter that is no
-- longer a number) takes back what was written before it (the event by XDEL, the marker,
-- the counters; the reservation is removed last) and answers with the error. A retry or a replay of a request id
-- already settled changes nothing (KEYS[3]). Each command here costs a few microseconds
-- of the server's time on every request, so there are as few as the work needs.
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
local actual = tonumber(ARGV[1])
-- What the member says was reserved (parsed once: whether Redis still holds it or not).
local member_tokens, member_month, money, money_day = reservation_of(ARGV[4])
local counter_base = string.sub(KEYS[1], 1, -8)
local here = string.sub(KEYS[1], -7)
-- Money: when admission reserved some (the member's money part), the real cost (the
-- event's cost, in picodollars, built as a string: exact at any size) replaces it on the
-- spend counters of the admission's month and day.
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

if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', math.max(1, tonumber(ARGV[2]) or 1)) then
  return false  -- settled already
end
local id = redis.pcall('XADD', KEYS[2], '*', unpack(ARGV, 5))
if type(id) == 'table' and id.err then
  redis.call('DEL', KEYS[3])
  return id
end

-- Take back what was written so far (the event, the marker and the counters in `moved`,
-- by the amounts given) and answer err, the error of the write that failed.
local function undo(err, moved)
  for key, amount in pairs(moved) do redis.call('DECRBY', key, amount) end
  redis.call('XDEL', KEYS[2], id)
  redis.call('DEL', KEYS[3])
  return redis.error_reply(err)
end

-- The counters move first, as if the reservation were still held (the usual case); the
-- reservation is removed last, and its ZREM says whether it was: if not (its lease ran
-- out and it was released then), the counters are put right. So a write that fails finds
-- the reservation as it was, and the usual case costs one command for the reservation.
local held_here = member_month == here and member_tokens or 0
local delta = actual - held_here
local moved = {}
if delta ~= 0 then
  local count = redis.pcall('INCRBY', KEYS[1], delta)
  if type(count) == 'table' and count.err then
    return undo('WRONGTYPE ' .. KEYS[1] .. ' cannot count tokens: ' .. count.err, moved)
  end
  moved[KEYS[1]] = delta
  if count == delta then  -- the counter was made by this call (or stood at 0): its TTL
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  end
end
local spent_m, spent_d
if cost then
  spent_m, spent_d = spend_keys(counter_base, member_month, money_day)
  for _, key in ipairs({spent_m, spent_d}) do
    local count = redis.pcall('INCRBY', key, cost)
    if type(count) == 'table' and count.err then
      return undo('WRONGTYPE ' .. key .. ' cannot count money: ' .. count.err, moved)
    end
    moved[key] = cost
  end
end
local removed = redis.pcall('ZREM', KEYS[4], ARGV[4])
if type(removed) == 'table' and removed.err then
  return undo('WRONGTYPE ' .. KEYS[4] .. ' cannot hold reservations: ' .. removed.err, moved)
end

local held = removed == 1
if not held and held_here ~= 0 then
  -- Released when its lease ran out: the counter holds it no more.
  local count = redis.pcall('INCRBY', KEYS[1], held_here)
  if type(count) == 'table' and count.err then
    return undo('WRONGTYPE ' .. KEYS[1] .. ' cannot count tokens: ' .. count.err, moved)
  end
  if count == actual then  -- (made by this call)
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  end
end
-- Nothing below can fail: every key it writes took a write above, or is only counted
-- down when it is a number.
if cost then
  if held then
    redis.call('DECRBY', spent_m, money)
    redis.call('DECRBY', spent_d, money)
  end
  if redis.call('TTL', spent_m) < 0 then redis.call('EXPIRE', spent_m, tonumber(ARGV[3])) end
  if redis.call('TTL', spent_d) < 0 then redis.call('EXPIRE', spent_d, 3 * 86400) end
end
if held and member_month and member_month ~= here then
  -- Reserved against another month's counter (a month boundary): released there.
  local other = counter_base .. member_month
  if redis.call('EXISTS', other) == 1 then
    redis.pcall('DECRBY', other, member_tokens)  -- (one no longer a number: skipped)
  end
end
return id
