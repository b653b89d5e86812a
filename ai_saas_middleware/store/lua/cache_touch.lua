-- cache_touch.lua: record the use of an entry a semantic hit served from the body the
-- lookup returned (issue 11). Pipelined with the hit's settle.lua (same slot, no round
-- trip of its own). Touches one tenant's keys only.
--
-- KEYS[1]  the tenant's entries by last use (sorted set, ms)
-- ARGV[1]  the entry id
--
-- Returns 1 when the entry was still tracked, else 0 (evicted since: nothing to record).
local t = redis.call('TIME')
return redis.call('ZADD', KEYS[1], 'XX', 'CH',
                  tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[1])
