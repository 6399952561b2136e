-- Store groups of entries in a stream and ack the inbound entries each group came from:
-- atomic (no other command runs meanwhile) and idempotent (run again after a lost reply,
-- it finds the refs of every group it stored no longer pending, and stores nothing twice).
--
-- KEYS[1]: the stream to add to; KEYS[2]: the inbound stream.
-- ARGV: group, delete (1: XDEL acked inbound entries, 0: keep them), n groups, then per
--       group: n refs, refs..., n entries, then per entry: 2*n fields, field, value, ...
-- A group none of whose refs is pending any more was stored by an earlier call and is
-- skipped; a group without refs is always stored. Returns how many groups were stored.
--
-- The whole argument list is read before the first write: Redis does not roll a script
-- back, so a script that fails must fail before it changed anything.

local CHUNK = 500  -- ids per XACK / XDEL: unpack() of too many values is an error

local function in_chunks(command, key, group, ids)
  for first = 1, #ids, CHUNK do
    local last = math.min(first + CHUNK - 1, #ids)
    if group then
      redis.call(command, key, group, unpack(ids, first, last))
    else
      redis.call(command, key, unpack(ids, first, last))
    end
  end
end

local group, delete = ARGV[1], ARGV[2] == '1'
local groups = {}
local i = 4
for g = 1, tonumber(ARGV[3]) do
  local refs, entries = {}, {}
  for k = 1, tonumber(ARGV[i]) do refs[k] = ARGV[i + k] end
  i = i + #refs + 1
  for e = 1, tonumber(ARGV[i]) do
    local n = tonumber(ARGV[i + 1])
    entries[e] = {i + 2, i + 1 + n}  -- where its fields are in ARGV
    i = i + 1 + n
  end
  i = i + 1
  groups[g] = {refs, entries}
end

local stored = 0
for _, g in ipairs(groups) do
  local refs, entries = g[1], g[2]
  local live = #refs == 0
  for _, ref in ipairs(refs) do
    if #redis.call('XPENDING', KEYS[2], group, ref, ref, 1) > 0 then
      live = true
      break
    end
  end
  if live then
    for _, span in ipairs(entries) do
      redis.call('XADD', KEYS[1], '*', unpack(ARGV, span[1], span[2]))
    end
    if #refs > 0 then
      in_chunks('XACK', KEYS[2], group, refs)
      if delete then in_chunks('XDEL', KEYS[2], nil, refs) end
    end
    stored = stored + 1
  end
end
return stored
