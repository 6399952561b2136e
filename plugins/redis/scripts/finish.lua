-- Finish an outbound entry, once: XACK + XDEL it and XADD what replaces it. The only
-- place an outbound entry is acked:
--   * a batch MS4 accepted (or whose objects are all dead letters): nothing replaces it;
--   * a batch split after a 400: its halves, to the outbound stream;
--   * an entry that is no ms1 batch: a dead letter with its raw fields, to the
--     dead-letter stream;
--   * an entry deleted while pending: nothing.
--
-- KEYS[1]: the outbound stream; KEYS[2]: the stream the replacements go to.
-- ARGV: group, entry id, n entries, then per entry: 2*n fields, field, value, ...
-- Run again after a lost reply (the entry is no longer pending) it only makes sure the
-- entry is deleted. Returns 1 if it finished the entry now, 0 if it was finished before.

-- The XADDs come before the XACK: Redis does not roll a failed script back, and an
-- entry acked without its replacements would be lost.
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 0
end
local i = 4
for e = 1, tonumber(ARGV[3]) do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, i + 1, i + n))
  i = i + 1 + n
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return 1
