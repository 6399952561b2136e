-- Take a slot of the shared sliding-window rate limiter, on the server's clock.
-- KEYS[1]: the sorted set (member: a request's token; score: when it ended, or while it
-- is in flight, start + lease). ARGV: limit, window (s), token, lease (s).
-- Returns {1, '0'} (granted) or {0, seconds until the oldest slot leaves the window}.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit, window, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil((window + lease) * 1000))
  return {1, '0'}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tostring(tonumber(oldest[2]) + window - now)}
