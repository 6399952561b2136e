-- Record ledger events: append each to its batch's list and index it under every
-- invoice and message id it names (per-day bucket hashes: id -> batch ids), all with
-- the retention as their time to live. One call for the events of one step.
--
-- ARGV: the time to live (s), the number of events, then per event: its JSON, its batch
-- id, the number n of ids it indexes, then those n ids.
-- KEYS: per event: its batch's list, then one bucket hash per id (in the ids' order).
local ttl = tonumber(ARGV[1])
local a, k = 3, 1
for e = 1, tonumber(ARGV[2]) do
  local payload, batch, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  redis.call('RPUSH', KEYS[k], payload)
  redis.call('EXPIRE', KEYS[k], ttl)
  for i = 1, n do
    local id, bucket = ARGV[a + 2 + i], KEYS[k + i]
    local known = redis.call('HGET', bucket, id)
    if not known then
      redis.call('HSET', bucket, id, batch)
    elseif not string.find(' ' .. known .. ' ', ' ' .. batch .. ' ', 1, true) then
      redis.call('HSET', bucket, id, known .. ' ' .. batch)
    end
    redis.call('EXPIRE', bucket, ttl)
  end
  a, k = a + 3 + n, k + 1 + n
end
return 1
