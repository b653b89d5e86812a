-- cache_fetch.lua: the body of the entry a semantic lookup chose, and its use recorded
-- (issue 11). Only on a semantic hit. Touches one tenant's keys only.
--
-- KEYS[1]  the entry (hash)
-- KEYS[2]  the tenant's entries by last use (sorted set, ms)
-- ARGV[1]  the entry id
--
-- Returns {body, prompt_tokens, completion_tokens, model}, or false when the entry
-- expired or was evicted since the lookup.
local entry = redis.call('HMGET', KEYS[1], 'body', 'pt', 'ct', 'model')
if not entry[1] then return false end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], 'XX', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
           ARGV[1])
return entry
