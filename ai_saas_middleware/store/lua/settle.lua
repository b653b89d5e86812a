-- settle.lua: record one AI request's real usage, once. Adjusts the monthly token
-- counter by (actual - reserved) and appends the usage event to the shard's stream,
-- atomically, in one round trip. Touches one tenant's keys and its shard's stream
-- (one hash tag, one cluster slot).
--
-- A script that fails half way keeps what it wrote (Redis does not roll scripts back),
-- so the writes are ordered and compensated: the event first, then the counter (the
-- event is deleted again if the counter cannot move), the settled marker last. Either
-- all three happen or none does, and a retry or replay can never count twice.
--
-- KEYS[1]  monthly token counter the reservation was made against
-- KEYS[2]  usage stream of the tenant's shard
-- KEYS[3]  settled marker of this request id (dedupes retries and spool replays)
-- ARGV[1]  token delta, actual minus reserved (negative releases a reservation)
-- ARGV[2]  TTL of the settled marker, seconds
-- ARGV[3]  TTL of a new monthly counter, seconds (a replay may create it)
-- ARGV[4..] the event, as field, value, field, value ...
--
-- Returns the stream entry id, or false when this request id was already settled.
if redis.call('EXISTS', KEYS[3]) == 1 then
  return false
end
local id = redis.pcall('XADD', KEYS[2], '*', unpack(ARGV, 4))
if type(id) == 'table' and id.err then
  return redis.error_reply('usage event not written: ' .. id.err)
end
local delta = tonumber(ARGV[1])
if delta ~= 0 then
  local moved = redis.pcall('INCRBY', KEYS[1], delta)
  if type(moved) == 'table' and moved.err then
    redis.call('XDEL', KEYS[2], id)
    return redis.error_reply('quota counter not moved: ' .. moved.err)
  end
  if redis.call('TTL', KEYS[1]) < 0 then
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  end
end
redis.call('SET', KEYS[3], '1', 'EX', tonumber(ARGV[2]))
return id
