-- Add e-mails to the inbound stream, once per token: what the ingestor calls (through
-- ms1.inbound or 'ms1-service enqueue'). A call retried with the same token after an
-- error -- its reply lost, a failover, a WAIT that fell short -- adds nothing twice: the
-- token is kept in a sorted set with the entries, in the same atomic step, so a replica
-- (and the primary it becomes) has both or neither.
--
-- KEYS[1]: the inbound stream; KEYS[2]: the sorted set of tokens (score: when added, on
-- the server's clock), in the same slot.
-- ARGV: token, seconds a token is remembered, then the e-mails (field 'email' each).
-- Returns how many entries it added (0: the token was known, nothing added).
--
-- Both branches end with a write (PEXPIRE of the set), so a WAIT sent after this script on
-- the same connection waits for the replicas to have it -- and with it, replication being
-- in order, the entries of the first call.

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local keep = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - keep)
local added = 0
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  for i = 3, #ARGV do
    redis.call('XADD', KEYS[1], '*', 'email', ARGV[i])
  end
  added = #ARGV - 2
end
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[2], math.ceil(keep * 1000))
return added
