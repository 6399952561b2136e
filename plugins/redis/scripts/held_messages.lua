-- The message ids of the batches a stream holds, without their payloads: COUNT entries
-- from ARGV[1] (an entry id, exclusive: "(" is prepended by the caller, or "-").
-- KEYS[1]: the stream. ARGV: start, count.
-- Returns: the last entry id read (false when none), then each entry's message_ids field
-- (a JSON list; entries without one are skipped).
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
local out = {false}
for _, entry in ipairs(entries) do
  out[1] = entry[1]
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'message_ids' then
      out[#out + 1] = fields[i + 1]
      break
    end
  end
end
return out
