-- Record ledger events: append each to its batch's list, index it under every invoice
-- and message id it names (per-day bucket hashes: id -> batch ids), and keep what became
-- of each e-mail it names (per-read-day bucket hashes: e-mail -> "<outcome letter>
-- <read at> <invoice id>"), all with the retention as their time to live. One call for
-- the events of one step. The outcome rule is ms1.pipeline.ledger.next_outcome's.
--
-- ARGV: the time to live (s), the number of events, then per event: its JSON, its batch
-- id, the number n of ids it indexes, those n ids, its kind, its time, the number m of
-- e-mails it names, then per e-mail: the e-mail, its invoice id, and the number d of days
-- it may have been read on.
-- KEYS: per event: its batch's list, one bucket hash per id (in the ids' order), then per
-- e-mail its d state bucket hashes, the event's day first, older days after.
local ttl = tonumber(ARGV[1])

local function next_outcome(current, kind)
  if kind == 'accepted' then return 'a' end
  if kind == 'dead_lettered' then
    if current == 'a' then return 'a' end
    return 'd'
  end
  if kind == 'replayed' then
    if current == 'a' then return 'a' end
    return 'p'
  end
  if current then return current end
  if kind == 'rejected' then return 'r' end
  return 'p'
end

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
  local kind, at, m = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  for j = 1, m do
    local email, invoice, d = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
    local where, value = nil, nil
    for day = 1, d do
      value = redis.call('HGET', KEYS[k + day - 1], email)
      if value then where = KEYS[k + day - 1]; break end
    end
    if not value then
      redis.call('HSET', KEYS[k], email, next_outcome(nil, kind) .. ' ' .. at .. ' ' .. invoice)
      redis.call('EXPIRE', KEYS[k], ttl)
    else
      local current, read, known = string.match(value, '^(%S) (%S+) ?(.*)$')
      if not current then  -- not ours: start it again
        current, read, known = nil, at, ''
      end
      if known == '' then known = invoice end
      local outcome = next_outcome(current, kind)
      if outcome ~= current then
        redis.call('HSET', where, email, outcome .. ' ' .. read .. ' ' .. known)
      end
    end
    a, k = a + 3, k + d
  end
end
return 1
