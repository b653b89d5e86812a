-- usage.lua: what a tenant has used, for its own usage endpoint. Read-only; checks the
-- caller's credentials exactly as admit.lua does. One tenant's keys, one slot.
--
-- KEYS[1]  rate-limit log (sorted set, scores in us)
-- KEYS[2]  monthly token counter of the month in ARGV[2]
-- KEYS[3]  stored tenant record
-- KEYS[4]  stored tenant's API keys
-- ARGV[1]  auth mode: 'static' | 'key' | 'stored' (see admit.lua)
-- ARGV[2]  month, 'YYYY-MM'
-- ARGV[3]  API key hash (mode 'key')
-- ARGV[4]  rate-limit window, ms
--
-- Returns {0, now_ms, tokens_used, requests_in_window, tier or ''}, or admit.lua's
-- {3, now_ms, 'unknown' | 'revoked'} / {4, now_ms} for bad credentials.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local tier = ''
if ARGV[1] ~= 'static' then
  if ARGV[1] == 'key' then
    local state = redis.call('HGET', KEYS[4], ARGV[3])
    if not state then return {3, now_ms, 'unknown'} end
    if state ~= 'active' then return {3, now_ms, 'revoked'} end
  end
  local record = redis.call('HMGET', KEYS[3], 'tier', 'status')
  if not record[1] or record[2] == 'suspended' then return {4, now_ms} end
  tier = record[1]
end
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
local requests = redis.call('ZCOUNT', KEYS[1],
                                string.format('(%d', now_us - tonumber(ARGV[4]) * 1000), '+inf')
return {0, now_ms, used, requests, tier}
