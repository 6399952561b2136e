-- Stamp a rate-limiter slot with the time its request ended (the server's clock), if the
-- slot is still there. KEYS[1]: the sorted set. ARGV: the slot's token.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
