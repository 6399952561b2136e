-- Take a slot of the shared sliding-window rate limiter, on the server's clock.
-- KEYS[1]: the sorted set (member: a request's token; score: when MS4 counted it, or while it
-- is in flight, start + lease). ARGV: limit, window (s), token, lease (s), ahead (s).
-- Returns {1, slots free after this one or leaving the window within `ahead` s} (granted)
-- or {0, seconds until the oldest slot leaves the window}.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit, window, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
local ahead = tonumber(ARGV[5] or '0')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used < limit then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil((window + lease) * 1000))
  local leaving = 0
  if ahead > 0 then
    leaving = redis.call('ZCOUNT', KEYS[1], '-inf', now - window + ahead)
  end
  return {1, tostring(limit - used - 1 + leaving)}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tostring(tonumber(oldest[2]) + window - now)}
