-- pricebook.lua: the price book's run-time overrides of the model profiles (see
-- pricebook.py). Every key carries the hash tag {models}: one cluster slot. Run with EVAL
-- from the admin command and from each process's price-book thread, never a request.
--
-- KEYS[1]  the overrides (hash): model id -> JSON of its overridden fields
-- KEYS[2]  the version (integer; absent means 0, the configuration's profiles)
-- KEYS[3]  the history (hash): version -> '{"ts":<ms>,"model":<id>,"book":{<KEYS[1]>}}'
-- ARGV[1]  op:
--   read                          -> {version, {model, json, ...}}
--         The version and the book it names, read together (atomically).
--   write expected model json|'' channel -> {written 0|1, version}
--         Only when the version is still `expected` (the writer validated the model's
--         new fields against the book of that version): sets the model's overrides
--         (json) or drops them (''), INCRs the version and files the whole new book
--         under the new version in the history, all in this one step. Otherwise
--         writes nothing and answers the current version (the writer reads again).
--         A new version is announced on the channel (PUBLISH channel version), so that
--         every process reads it at once.
local op = ARGV[1]
if op == 'read' then
  return {tonumber(redis.call('GET', KEYS[2]) or '0'), redis.call('HGETALL', KEYS[1])}
end

local version = tonumber(redis.call('GET', KEYS[2]) or '0')
if version ~= tonumber(ARGV[2]) then
  return {0, version}
end
local model, json = ARGV[3], ARGV[4]
if json == '' then
  redis.call('HDEL', KEYS[1], model)
else
  redis.call('HSET', KEYS[1], model, json)
end
version = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- The entries are JSON objects already: the book's JSON is built around them, with each
-- model id encoded (escaped) by cjson.
local flat = redis.call('HGETALL', KEYS[1])
local parts = {}
for i = 1, #flat, 2 do
  parts[#parts + 1] = cjson.encode(flat[i]) .. ':' .. flat[i + 1]
end
redis.call('HSET', KEYS[3], tostring(version), '{"ts":' .. string.format('%d', ms)
           .. ',"model":' .. cjson.encode(model) .. ',"book":{' .. table.concat(parts, ',')
           .. '}}')
if ARGV[5] then
  redis.call('PUBLISH', ARGV[5], tostring(version))
end
return {1, version}
