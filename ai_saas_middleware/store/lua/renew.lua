-- renew.lua: extend the leases of reservations whose requests are still running (a long
-- stream keeps its reservation so). Only reservations still held are renewed (XX): one
-- already settled, or released after its lease ran out, is not brought back. Server time.
--
-- KEYS[1]  reservations in flight: sorted set, '<request id> <tokens> <YYYY-MM>' -> lease
--          deadline (ms)
-- ARGV[1]  lease, ms, from now
-- ARGV[2..] reservation members
--
-- Returns the number of reservations renewed.
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'GT', 'CH', deadline, ARGV[i])
end
return renewed
