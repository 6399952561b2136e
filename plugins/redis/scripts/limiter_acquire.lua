-- Take a slot of the shared rate limiter, on the server's clock.
-- KEYS[1]: the sliding-window log, a sorted set (member: a request's token; score: when MS4
-- counted it, or while it is in flight, start + lease). KEYS[2] (with shaping): the learned
-- shape, a hash (burst, spacing, epoch, ... and tat: GCRA's theoretical arrival time).
-- ARGV: limit, window (s), token, lease (s), ahead (s); with shaping also the burst and the
-- spacing a shape without those fields starts with, and the least spacing (the senders'
-- jitter).
-- Returns {1, free, level, fill, epoch} (granted: slots free after this one or leaving the
-- window within `ahead` s, capped by what the pace lets go in that time; requests ahead of
-- the steady pace and the share of the window in use, this one included; the shape's epoch)
-- or {0, seconds until a slot leaves the window or the pace allows one}.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit, window, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
local ahead = tonumber(ARGV[5] or '0')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tostring(tonumber(oldest[2]) + window - now)}
end
local leaving = 0
if ahead > 0 then
  leaving = redis.call('ZCOUNT', KEYS[1], '-inf', now - window + ahead)
end
local free = limit - used - 1 + leaving
local level, epoch = 1, 0
if #KEYS > 1 then
  local f = redis.call('HMGET', KEYS[2], 'burst', 'spacing', 'tat', 'epoch')
  local burst = tonumber(f[1]) or tonumber(ARGV[6])
  local spacing = tonumber(f[2]) or tonumber(ARGV[7])
  local tat = tonumber(f[3]) or 0
  epoch = tonumber(f[4]) or 0
  if burst ~= burst or burst < 1 then burst = 1 end          -- NaN or hostile: no burst
  if burst > limit then burst = limit end                     -- learned under a larger limit
  if spacing ~= spacing or spacing < 0 then spacing = 0 end
  if burst < 2 then  -- the senders' jitter: no allowance to absorb it (effective_spacing)
    spacing = math.max(spacing, tonumber(ARGV[8] or '0') or 0)
  end
  local step = window / limit * (1 + spacing)
  local early = tat - now - (burst - 1) * step
  if early > 0 then
    return {0, tostring(early)}
  end
  tat = math.max(tat, now) + step
  redis.call('HSET', KEYS[2], 'tat', tostring(tat))
  redis.call('PEXPIRE', KEYS[2], 86400000)
  level = (tat - now) / step
  local slack = (burst - 1) * step + ahead - math.max(0, tat - now)
  free = math.min(free, math.max(0, math.floor(slack / step + 1e-9) + 1))
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil((window + lease) * 1000))
return {1, tostring(free), tostring(level), tostring((used + 1) / limit), tostring(epoch)}
