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
-- ARGV[14] money to reserve, picodollars (10^-12 USD): the worst-case cost of the models
--          the request may use; '0' when the tenant has no money budget (nothing is
--          counted, the member has no money part)
-- ARGV[15] monthly budget, picodollars; -1 = none
-- ARGV[16] daily budget (UTC day, by the server's clock), picodollars; -1 = none
-- ARGV[17] optional 'retry': the caller lost the reply of an earlier attempt of this
--          request id (same arguments); if that attempt was admitted (its reservation is
--          recorded), answer admitted again without counting it twice ('' otherwise)
-- ARGV[18] optional, the response cache's exact lookup (issue 11): 'free' (a hit takes
--          no quota) or 'quota' (a hit is served only if the quota can hold its tokens);
--          absent when the cache is off for the request: then KEYS[6..8] are absent too
-- ARGV[19] the cache entry id (the LRU member)
-- KEYS[6]  the cache entry of the request's exact key (hash: body, pt, ct, model ...)
-- KEYS[7]  the tenant's cached entries by last use (sorted set, ms)
-- KEYS[8]  the request's partition (set of entry ids): only its size is read
--
-- Money is counted on '<tenant base>:b:m:<YYYY-MM>' and '<tenant base>:b:d:<YYYY-MM-DD>'
-- (named from KEYS[2]: the same hash tag), in picodollars, compared as exact decimal
-- strings (a Lua number is exact only up to 2^53).
--
-- Returns {code, now_ms, a, b}:
--   {0, now_ms, remaining, reset_ms, used, spent_month, spent_day, day}
--                                            admitted; remaining requests in the window,
--                                            ms until a slot frees, tokens now counted,
--                                            picodollars now counted this month and day
--                                            ('' without money) and the day 'YYYY-MM-DD'
--   {7, now_ms, 'month' | 'day', spent}      a money budget cannot hold the reservation
--                                            (spent: picodollars counted with it, a
--                                            string)
--   {1, now_ms, retry_after_ms}              rate limited
--   {2, now_ms, remaining_tokens, used}      quota cannot hold the reservation
--   {3, now_ms, 'unknown' | 'revoked'}       the API key is not an active key
--   {4, now_ms}                              no stored tenant / tenant suspended
--   {5, now_ms, 'YYYY-MM'}                   the server's month differs; retry with it
--   {6, now_ms, tier}                        the stored tier differs; retry with it
--   {8, now_ms, remaining, reset_ms, body, prompt_tokens, completion_tokens, model}
--                                            an exact cache hit (ARGV[18]): admitted
--                                            (counted by the rate limit), nothing reserved
-- With ARGV[18], an admission {0, ...} has a 9th element: the size of the partition
-- (KEYS[8]), 0 telling the caller that a semantic lookup would find nothing.
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
-- The server's civil date, UTC (Howard Hinnant's civil_from_days).
local function civil(now_s)
  local z = math.floor(now_s / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  return yoe + era * 400 + (month <= 2 and 1 or 0), month, day
end

local now_s = tonumber(t[1])
if now_s < tonumber(ARGV[11]) or now_s >= tonumber(ARGV[12]) then
  local year, month = civil(now_s)
  return {5, now_ms, string.format('%04d-%02d', year, month)}
end

-- x > y for decimal strings of whole numbers (no sign but an optional '-', no leading 0s).
local function exceeds(x, y)
  local xneg, yneg = string.sub(x, 1, 1) == '-', string.sub(y, 1, 1) == '-'
  if xneg ~= yneg then return yneg end
  if xneg then x, y = string.sub(y, 2), string.sub(x, 2) end
  if #x ~= #y then return #x > #y end
  return x > y
end

local limit = tonumber(ARGV[6])
local window_us = tonumber(ARGV[7]) * 1000
local money = ARGV[14]
local member = ARGV[1] .. ' ' .. ARGV[9] .. ' ' .. ARGV[2]
local counter_base = string.sub(KEYS[2], 1, -8)
local day, spent_month_key, spent_day_key = '', nil, nil
if money ~= '0' then  -- (the day only matters to money)
  local year, month_num, day_num = civil(now_s)
  day = string.format('%04d-%02d-%02d', year, month_num, day_num)
  member = member .. ' ' .. money .. ' ' .. day
  spent_month_key, spent_day_key = spend_keys(counter_base, ARGV[2], day)
end
if ARGV[17] == 'retry' and redis.call('ZSCORE', KEYS[5], member) then
  -- The earlier attempt ran: it is admitted, and counted once.
  local count = limit > 0 and redis.call('ZCARD', KEYS[1]) or 0
  local spent_m, spent_d = '', ''
  if money ~= '0' then
    spent_m = redis.call('GET', spent_month_key) or '0'
    spent_d = redis.call('GET', spent_day_key) or '0'
  end
  return {0, now_ms, limit > 0 and math.max(limit - count, 0) or -1, tonumber(ARGV[7]),
          tonumber(redis.call('GET', KEYS[2]) or '0'), spent_m, spent_d, day}
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

-- The response cache's exact lookup (issue 11), folded into admission so that it costs
-- no round trip: a hit is admitted like any request by the rate limit, and reserves
-- nothing (with 'quota', only when the month can still hold the entry's tokens, which
-- settlement then counts).
-- The admission in the rate-limit log. The log lives at least a window past its newest
-- admission: renewed (to two windows) only when less than that is left, so most
-- admissions read its TTL rather than write it.
local function log_admission()
  if limit > 0 then
    redis.call('ZADD', KEYS[1], now_us, ARGV[1])
    if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[7]) + 1000 then
      redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[7]) + 1000)
    end
  end
end

local partition_size = nil
if ARGV[18] then
  local entry = redis.call('HMGET', KEYS[6], 'body', 'pt', 'ct', 'model')
  if entry[1] then
    local quota = tonumber(ARGV[8])
    if ARGV[18] ~= 'quota' or quota < 0 or tonumber(redis.call('GET', KEYS[2]) or '0')
        + tonumber(entry[2]) + tonumber(entry[3]) <= quota then
      redis.call('ZADD', KEYS[7], 'XX', now_ms, ARGV[19])
      log_admission()
      return {8, now_ms, remaining, reset_ms, entry[1], entry[2], entry[3], entry[4]}
    end
  end
  partition_size = redis.call('SCARD', KEYS[8])
end

-- Quota: refuse a reservation the month cannot hold; never go over. (Counted first and
-- taken back on refusal: refusals are the rare path.) Reservations of requests that will
-- never settle (a killed process) leave the counter before a refusal, and at about one
-- admission in 16, so a refusal is never due to them and they do not linger.
local quota = tonumber(ARGV[8])
local reserve = tonumber(ARGV[9])
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

-- Money budgets: the same, in picodollars, on the month's and the day's spend.
local spent_m, spent_d = '', ''
if money ~= '0' then
  local month_budget, day_budget = ARGV[15], ARGV[16]
  local function over()
    spent_m = redis.call('GET', spent_month_key)
    spent_d = redis.call('GET', spent_day_key)
    if month_budget ~= '-1' and exceeds(spent_m, month_budget) then return 'month' end
    if day_budget ~= '-1' and exceeds(spent_d, day_budget) then return 'day' end
    return nil
  end
  redis.call('INCRBY', spent_month_key, money)
  redis.call('INCRBY', spent_day_key, money)
  local which = over()
  if which then
    reclaim_expired(KEYS[5], counter_base, now_ms, 64)
    which = over()
  end
  if which then
    redis.call('DECRBY', spent_month_key, money)
    redis.call('DECRBY', spent_day_key, money)
    if used == reserve then
      redis.call('DEL', KEYS[2])
    else
      redis.call('DECRBY', KEYS[2], reserve)
    end
    return {7, now_ms, which, which == 'month' and spent_m or spent_d}
  end
  if redis.call('TTL', spent_month_key) < 0 then
    redis.call('EXPIRE', spent_month_key, ttl)
  end
  if redis.call('TTL', spent_day_key) < 0 then
    redis.call('EXPIRE', spent_day_key, 3 * 86400)
  end
end

if used == reserve then  -- a new counter
  redis.call('EXPIRE', KEYS[2], ttl)
end
-- (No TTL on the reservations: they empty themselves as requests settle, and what a
-- killed process left is reclaimed here; a TTL could drop reservations still counted.)
redis.call('ZADD', KEYS[5], now_ms + tonumber(ARGV[13]), member)
log_admission()
return {0, now_ms, remaining, reset_ms, used, spent_m, spent_d, day, partition_size}
