-- breaker.lua: the deployment's circuit breakers, one per model, shared by every process
-- (see breakers.py). Every key carries the hash tag {breakers}: one cluster slot, so the
-- same script runs on one Redis server or on a Redis Cluster. Server time (TIME) only.
--
-- KEYS[1]  breaker states (hash): model -> '<open until ms> <probe owner | -> <probe
--          lease until ms>'; a model without a field is closed
-- KEYS[2]  the model's recent failures (sorted set: unique id -> ms); ops fail only
-- ARGV[1]  op:
--   (The watch reads the states with plain HGETALL and TIME: no script.)
--   fail  model window_ms threshold reset_ms failure_id probe_owner|'-' channel
--                             -> {now_ms, open 0|1, open until ms}
--         A closed breaker logs the failure and opens once the window holds threshold
--         of them. An open one ignores failures of calls made before it opened; a failure
--         of its probe (the owner named) opens it again for reset_ms.
--   ok    model probe_owner channel -> {now_ms, open 0|1, open until ms}
--         The probe succeeded: the breaker closes. Any other success changes nothing
--         (and the processes do not report it: the healthy path costs no round trip).
--   claim model owner lease_ms -> {now_ms, won 0|1, open until ms}
--         Once an open breaker's reset time has passed, one owner, across all processes,
--         may send the probe; its claim lasts lease_ms unless released or decided.
--   release model owner       -> {now_ms, released 0|1, open until ms}
--         The owner of an unused claim gives it back, for another process to take.
-- Every transition (opened, opened again, closed) is announced: PUBLISH channel model.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op = ARGV[1]

local model = ARGV[2]
local state = redis.call('HGET', KEYS[1], model)
local open_until, owner, lease = 0, '-', 0
if state then
  local a, b, c = string.match(state, '^(%d+) (%S+) (%d+)$')
  if a then
    open_until, owner, lease = tonumber(a), b, tonumber(c)
  else
    state = nil  -- not ours: treated as closed, and overwritten on the next opening
  end
end

local function set_open(until_ms, new_owner, new_lease)
  redis.call('HSET', KEYS[1], model,
             string.format('%.0f %s %.0f', until_ms, new_owner, new_lease))
end

if op == 'fail' then
  local reset = tonumber(ARGV[5])
  if state then
    if ARGV[7] ~= '-' and owner == ARGV[7] then
      set_open(now + reset, '-', 0)
      redis.call('PUBLISH', ARGV[8], model)
      return {now, 1, now + reset}
    end
    return {now, 1, open_until}
  end
  local window = tonumber(ARGV[3])
  redis.call('ZADD', KEYS[2], now, ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  redis.call('PEXPIRE', KEYS[2], window)
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
    redis.call('DEL', KEYS[2])
    set_open(now + reset, '-', 0)
    redis.call('PUBLISH', ARGV[8], model)
    return {now, 1, now + reset}
  end
  return {now, 0, 0}
elseif op == 'ok' then
  if state and owner == ARGV[3] then
    redis.call('HDEL', KEYS[1], model)
    redis.call('PUBLISH', ARGV[4], model)
    return {now, 0, 0}
  end
  return {now, state and 1 or 0, open_until}
elseif op == 'claim' then
  if state and now >= open_until and (owner == '-' or now >= lease) then
    set_open(open_until, ARGV[3], now + tonumber(ARGV[4]))
    return {now, 1, open_until}
  end
  return {now, 0, open_until}
elseif op == 'release' then
  if state and owner == ARGV[3] then
    set_open(open_until, '-', 0)
    return {now, 1, open_until}
  end
  return {now, 0, open_until}
end
return redis.error_reply('breaker.lua: unknown op ' .. tostring(op))
