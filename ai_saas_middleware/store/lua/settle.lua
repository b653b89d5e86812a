-- settle.lua: record one AI request's real usage, once. Adjusts the monthly token
-- counter by (actual - reserved) and appends the usage event to the shard's stream,
-- atomically, in one round trip. Touches one tenant's keys and its shard's stream
-- (one hash tag, one cluster slot).
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
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', tonumber(ARGV[2])) then
  return false
end
local delta = tonumber(ARGV[1])
if delta ~= 0 then
  redis.call('INCRBY', KEYS[1], delta)
  if redis.call('TTL', KEYS[1]) < 0 then
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  end
end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
