-- Merge outbound entries: XADD what replaces them, then XACK + XDEL each, atomically --
-- or change nothing. The parts of batches split before a refusal storm was recognised,
-- joined again into full-size batches.
--
-- KEYS[1]: the outbound stream.
-- ARGV: group, consumer, n ids, ids..., then n entries, per entry: 2*n fields, field,
-- value, ...
-- Returns 1 if merged, 0 if nothing changed: an entry is no longer pending for this
-- consumer (its lease ran out and another took it, or it was finished).
local group, consumer, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
for k = 4, 3 + n do
  local pending = redis.call('XPENDING', KEYS[1], group, ARGV[k], ARGV[k], 1)
  if #pending == 0 or pending[1][2] ~= consumer then
    return 0
  end
end
-- the XADDs come before the XACKs: Redis does not roll a failed script back
local j = 5 + n
for e = 1, tonumber(ARGV[4 + n]) do
  local size = tonumber(ARGV[j])
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, j + 1, j + size))
  j = j + 1 + size
end
for k = 4, 3 + n do
  redis.call('XACK', KEYS[1], group, ARGV[k])
  redis.call('XDEL', KEYS[1], ARGV[k])
end
return 1
