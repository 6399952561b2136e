-- Give back a slot that was not used: out of the window and, with shaping, one step back on
-- the pace. KEYS[1]: the sorted set; KEYS[2] (with shaping): the shape hash.
-- ARGV: the slot's token, limit, window (s).

local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if removed == 1 and #KEYS > 1 then
  local f = redis.call('HMGET', KEYS[2], 'spacing', 'tat')
  local spacing, tat = tonumber(f[1]) or 0, tonumber(f[2])
  if tat then
    local step = tonumber(ARGV[3]) / tonumber(ARGV[2]) * (1 + spacing)
    redis.call('HSET', KEYS[2], 'tat', tostring(tat - step))
  end
end
return removed
