-- stats.lua: what settled requests showed, deployment-wide (see observed.py): completion
-- tokens per endpoint and model, latency per model. Every key carries the hash tag
-- {stats}: one cluster slot. Run with EVAL by each process's statistics thread (about
-- once a second), never by a request. Server time (TIME) only.
--
-- KEYS[1]  completions (hash): '<endpoint>\31<model>' -> '<sum> <weight> <count>', the
--          sums of completion tokens and of samples, each sample's weight halved every
--          half-life, and the undecayed number of samples; field '\31at' holds the server
--          time (ms) the weights were last decayed to
-- KEYS[2]  the base of the latency keys: KEYS[2]..<minute> (minute = server ms // 60000)
--          is that minute's histogram (hash: '<model>\31<bucket>' -> count), expiring
--          ARGV[3] s after it was last written; same hash tag as KEYS[1]
-- ARGV[1]  half-life of a completion sample's weight, ms
-- ARGV[2]  window, minutes: the latency read covers this minute and the ones before
-- ARGV[3]  time to live of a minute's histogram, s (more than the window)
-- ARGV[4]  C, then C triples: field of KEYS[1], completion tokens, samples
-- then     triples to the end: age of the samples (s, from now), '<model>\31<bucket>',
--          samples; ages beyond the window are ignored (they could not count)
-- Returns  {now ms, {completions field, value, ...}, {'<model>\31<bucket>', count, ...}}
--          the latter summed over the window's minutes
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local half_life, window, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

local function parse(value)
  local s, w, n = string.match(value or '', '^(%S+) (%S+) (%S+)$')
  if s == nil then return 0, 0, 0 end
  return tonumber(s), tonumber(w), tonumber(n)
end

local function format(s, w, n)
  return string.format('%.17g %.17g %d', s, w, n)
end

-- Decay every pair's weights to now, at most once a second whoever calls: a silent pair
-- keeps its average (sum and weight shrink alike) and is forgotten once its weight is
-- negligible (hours of silence).
local at = tonumber(redis.call('HGET', KEYS[1], '\31at') or '')
if at == nil then
  redis.call('HSET', KEYS[1], '\31at', now)
elseif now - at >= 1000 then
  local factor = 2 ^ (-(now - at) / half_life)
  local flat = redis.call('HGETALL', KEYS[1])
  for i = 1, #flat, 2 do
    if flat[i] ~= '\31at' then
      local s, w, n = parse(flat[i + 1])
      if w * factor < 1e-6 then
        redis.call('HDEL', KEYS[1], flat[i])
      else
        redis.call('HSET', KEYS[1], flat[i], format(s * factor, w * factor, n))
      end
    end
  end
  redis.call('HSET', KEYS[1], '\31at', now)
end

local pairs_count = tonumber(ARGV[4])
local i = 5
for _ = 1, pairs_count do
  local field, tokens, samples = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local s, w, n = parse(redis.call('HGET', KEYS[1], field))
  redis.call('HSET', KEYS[1], field, format(s + tokens, w + samples, n + samples))
  i = i + 3
end

local minute = math.floor(now / 60000)
local touched = {}
while i + 2 <= #ARGV do
  local at_minute = math.floor((now - tonumber(ARGV[i]) * 1000) / 60000)
  if at_minute > minute - window then
    local key = KEYS[2] .. at_minute
    redis.call('HINCRBY', key, ARGV[i + 1], tonumber(ARGV[i + 2]))
    touched[key] = true
  end
  i = i + 3
end
for key in pairs(touched) do
  redis.call('EXPIRE', key, ttl)
end

local counts, order = {}, {}
for m = minute - window + 1, minute do
  local flat = redis.call('HGETALL', KEYS[2] .. m)
  for j = 1, #flat, 2 do
    if counts[flat[j]] == nil then
      counts[flat[j]] = 0
      order[#order + 1] = flat[j]
    end
    counts[flat[j]] = counts[flat[j]] + tonumber(flat[j + 1])
  end
end
local latency = {}
for _, field in ipairs(order) do
  latency[#latency + 1] = field
  latency[#latency + 1] = counts[field]
end
return {now, redis.call('HGETALL', KEYS[1]), latency}
