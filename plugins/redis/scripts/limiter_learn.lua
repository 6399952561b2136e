-- Write a learned shape if nobody wrote one since it was read (compare and set).
-- KEYS[1]: the shape hash. ARGV[1]: the version read ('' when there was none); then field,
-- value pairs. Returns 1 (written, version + 1) or 0 (another instance wrote first: read
-- again).

local version = redis.call('HGET', KEYS[1], 'version') or ''
if version ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'version', tostring((tonumber(version) or 0) + 1))
redis.call('PEXPIRE', KEYS[1], 86400000)
return 1
