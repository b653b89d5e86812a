-- admit.lua: authenticate a stored tenant, enforce the rate limit and reserve tokens
-- against the monthly quota, atomically, in one round trip. Touches one tenant's keys
-- only (one hash tag, one cluster slot). Time comes from the server (TIME), never from
-- the app servers' clocks.
--
-- A reservation is held under a lease: it is recorded (res, one member
-- '<request id> <tokens> <YYYY-MM>') with a deadline of now + ARGV[13]; the process serving
-- the request renews it while the request runs (renew.lua), settle.lua replaces it by the
-- real usage, and a reservation whose lease ran out (its process was killed) is released by
-- a later admission of the tenant: one that the quota would otherwise refuse, and about one
-- in 16 in any case, so the look costs the hot path little.
--
-- KEYS[1]  rate-limit log, sorted set of request ids scored by admission time (us)
-- KEYS[2]  monthly token counter of the month in ARGV[2]
-- KEYS[3]  stored tenant record (hash: tier, status, ...)
-- KEYS[4]  stored tenant's API keys (hash: sha256 hex -> 'active' | 'revoked')
-- KEYS[5]  reservations in flight: sorted set, '<request id> <tokens> <YYYY-MM>' -> lease
--          deadline (ms)
-- ARGV[1]  request id (the member added to the rate-limit log; with ARGV[9] and ARGV[2],
--          the reservation's: '<request id> <tokens> <YYYY-MM>')
-- ARGV[2]  month the caller expects, 'YYYY-MM' (UTC)
-- ARGV[3]  auth mode: 'static' (tier known from config; KEYS[3], KEYS[4] unused),
--          'key' (ARGV[4] must be an active key of the stored tenant),
--          'stored' (the stored tenant must exist; identity verified by the app)
-- ARGV[4]  API key hash (hex), mode 'key' only
-- ARGV[5]  tier the caller expects; modes 'key' and 'stored' check it against KEYS[3]
-- ARGV[6]  rate limit, requests per window; 0 = unlimited
-- ARGV[7]  rate-limit window, ms
-- ARGV[8]  monthly quota, tokens; -1 = unlimited
-- ARGV[9]  tokens to reserve (estimated prompt + max output)
-- ARGV[10] TTL of a new monthly counter, seconds
-- ARGV[11] start of that month, seconds since the epoch (UTC)
-- ARGV[12] start of the next month: the server's clock is checked against these bounds
-- ARGV[13] reservation lease, ms
-- ARGV[14] optional 'retry': the caller lost the reply of an earlier attempt of this
--          request id (same arguments); if that attempt was admitted (its reservation is
--          recorded), answer
--          admitted again without counting it twice
--
-- Returns {code, now_ms, a, b}:
--   {0, now_ms, remaining, reset_ms, used}   admitted; remaining requests in the window,
--                                            ms until a slot frees, tokens now counted
--   {1, now_ms, retry_after_ms}              rate limited
--   {2, now_ms, remaining_tokens, used}      quota cannot hold the reservation
--   {3, now_ms, 'unknown' | 'revoked'}       the API key is not an active key
--   {4, now_ms}                              no stored tenant / tenant suspended
--   {5, now_ms, 'YYYY-MM'}                   the server's month differs; retry with it
--   {6, now_ms, tier}                        the stored tier differs; retry with it
--#include _reservations.lua
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)

local mode = ARGV[3]
if mode ~= 'static' then
  if mode == 'key' then
    local state = redis.call('HGET', KEYS[4], ARGV[4])
    if not state then return {3, now_ms, 'unknown'} end
    if state ~= 'active' then return {3, now_ms, 'revoked'} end
  end
  local record = redis.call('HMGET', KEYS[3], 'tier', 'status')
  if not record[1] or record[2] == 'suspended' then return {4, now_ms} end
  if record[1] ~= ARGV[5] then return {6, now_ms, record[1]} end
end

-- The month is the caller's unless the server's clock says otherwise; only then is the
-- server's month worked out, in UTC (Howard Hinnant's civil_from_days).
local now_s = tonumber(t[1])
if now_s < tonumber(ARGV[11]) or now_s >= tonumber(ARGV[12]) then
  local z = math.floor(now_s / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return {5, now_ms, string.format('%04d-%02d', year, month)}
end

local limit = tonumber(ARGV[6])
local window_us = tonumber(ARGV[7]) * 1000
local member = ARGV[1] .. ' ' .. ARGV[9] .. ' ' .. ARGV[2]
if ARGV[14] == 'retry' and redis.call('ZSCORE', KEYS[5], member) then
  -- The earlier attempt ran: it is admitted, and counted once.
  local count = limit > 0 and redis.call('ZCARD', KEYS[1]) or 0
  return {0, now_ms, limit > 0 and math.max(limit - count, 0) or -1, tonumber(ARGV[7]),
          tonumber(redis.call('GET', KEYS[2]) or '0')}
end

-- Sliding-window log: exact, at most `limit` admissions in any window.
local remaining = -1
local reset_ms = 0
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_us - window_us)
  local count = redis.call('ZCARD', KEYS[1])
  if count >= limit then
    -- A request passes once fewer than `limit` admissions are left in the window: when the
    -- (count - limit + 1)-th oldest leaves it (more than the oldest, after a lowered limit).
    local nth = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
    local retry_ms = math.ceil((tonumber(nth[2]) + window_us - now_us) / 1000)
    return {1, now_ms, math.max(retry_ms, 1)}
  end
  remaining = limit - count - 1
  if count > 0 then
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    reset_ms = math.ceil((tonumber(oldest[2]) + window_us - now_us) / 1000)
  else
    reset_ms = tonumber(ARGV[7])
  end
end

-- Quota: refuse a reservation the month cannot hold; never go over. (Counted first and
-- taken back on refusal: refusals are the rare path.) Reservations of requests that will
-- never settle (a killed process) leave the counter before a refusal, and at about one
-- admission in 16, so a refusal is never due to them and they do not linger.
local quota = tonumber(ARGV[8])
local reserve = tonumber(ARGV[9])
local counter_base = string.sub(KEYS[2], 1, -8)
if tonumber(t[2]) % 16 == 0 then  -- (the clock's microseconds: about one in 16)
  reclaim_expired(KEYS[5], counter_base, now_ms, 16)
end
local used = redis.call('INCRBY', KEYS[2], reserve)
if quota >= 0 and used > quota and used > reserve then
  reclaim_expired(KEYS[5], counter_base, now_ms, 64)
  used = tonumber(redis.call('GET', KEYS[2]))
end
if quota >= 0 and used > quota then
  if used == reserve then
    redis.call('DEL', KEYS[2])  -- this call made the counter: leave none behind
  else
    redis.call('DECRBY', KEYS[2], reserve)
  end
  return {2, now_ms, quota - used + reserve, used - reserve}
end
local ttl = tonumber(ARGV[10])
if used == reserve then  -- a new counter
  redis.call('EXPIRE', KEYS[2], ttl)
end
-- (No TTL on the reservations: they empty themselves as requests settle, and what a
-- killed process left is reclaimed here; a TTL could drop reservations still counted.)
redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[13]), member)
if limit > 0 then
  redis.call('ZADD', KEYS[1], now_us, ARGV[1])
  -- The log lives at least a window past its newest admission. Renewed (to two windows)
  -- only when less than that is left: most admissions read its TTL rather than write it.
  if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[7]) + 1000 then
    redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[7]) + 1000)
  end
end
return {0, now_ms, remaining, reset_ms, used}
