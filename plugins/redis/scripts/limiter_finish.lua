-- Stamp a rate-limit slot with the moment MS4 counted its request: ARGV[2] seconds before
-- now on the server's clock (negative: ahead), if the slot is still there.
-- KEYS[1]: the sorted set. ARGV: the slot's token, seconds ago.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZADD', KEYS[1], 'XX', now - tonumber(ARGV[2]), ARGV[1])
