"""The Lua scripts that gateway.quotas runs in Redis: one check admits a request against every limit that applies
(and leases room for more), one re-times what leases admitted, one undoes an ask whose answer was lost, one applies a
batch of token corrections once."""

# KEYS: per scope (requests zset, tokens this minute, tokens last minute). ARGV: member, cost, how many
# more such requests to lease (see gateway/quota_leases.py), the share of the room a lease may take, then per
# scope rpm, tpm (0: none). Time is Redis's own (TIME), so gateways on hosts whose clocks differ agree.
# Returns: admitted (1/0), refused by (0, 1 requests, 2 tokens), then for requests and for tokens the
# tightest limit, remaining and milliseconds to reset (-1 where no scope has that limit), then how many
# requests were leased (members MEMBER:1..n in each requests log, n * cost in each tokens counter), then the
# kinds of limit that refused (1 requests, 2 tokens, 3 both).
ADMIT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local member, cost = ARGV[1], tonumber(ARGV[2])
local lease, share = tonumber(ARGV[3]), tonumber(ARGV[4])
local window = 60
local into = (now % window) / window
local out = {1, 0, -1, -1, -1, -1, -1, -1, 0, 0}
local function tighter(at, limit, remaining, reset)
  if out[at] == -1 or remaining < out[at + 1] then
    out[at], out[at + 1], out[at + 2] = limit, remaining, reset
  end
end
-- A scope that refuses is the one reported (of several, the one whose room comes back last).
local function refused(kind, at, limit, reset)
  if out[10] % (2 * kind) < kind then out[10] = out[10] + kind end  -- the kinds that refused: 1 requests, 2 tokens
  if out[1] == 1 or (out[2] == kind and reset > out[at + 2]) then
    out[1], out[2] = 0, kind
    out[at], out[at + 1], out[at + 2] = limit, 0, reset
  else
    tighter(at, limit, 0, reset)
  end
end
for i = 0, #KEYS / 3 - 1 do
  local rpm, tpm = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3 * i + 1], '-inf', now - window)
    local count = redis.call('ZCARD', KEYS[3 * i + 1])
    local reset = window * 1000
    if count > 0 then  -- when one more fits: once the oldest count - rpm + 1 have left the window
      local rank = math.max(count - rpm, 0)
      local frees = redis.call('ZRANGE', KEYS[3 * i + 1], rank, rank, 'WITHSCORES')
      reset = math.ceil((tonumber(frees[2]) + window - now) * 1000)
    end
    if count >= rpm then refused(1, 3, rpm, reset) else tighter(3, rpm, rpm - count - 1, reset) end
    lease = math.min(lease, math.floor((rpm - count - 1) / share))
  end
  if tpm > 0 then
    local current = tonumber(redis.call('GET', KEYS[3 * i + 2]) or '0')
    local last = tonumber(redis.call('GET', KEYS[3 * i + 3]) or '0')
    local used = current + last * (1 - into)
    if used + cost > tpm then
      -- when it fits: within this minute as the last one's weight falls, or else into the next one, where
      -- this minute's tokens weigh less and less
      local wait = window - (now % window)
      if current + cost <= tpm then
        wait = ((1 - (tpm - cost - current) / last) - into) * window
      elseif cost <= tpm then
        wait = wait + (1 - (tpm - cost) / current) * window
      else
        wait = wait + window
      end
      refused(2, 6, tpm, math.ceil(wait * 1000))
    else
      tighter(6, tpm, math.floor(tpm - used - cost), math.ceil((1 - into) * window * 1000))
    end
    lease = math.min(lease, math.floor((tpm - used - cost) / share / math.max(cost, 1)))
  end
end
if out[1] == 1 then
  lease = math.max(lease, 0)
  out[9] = lease
  for i = 0, #KEYS / 3 - 1 do
    if tonumber(ARGV[5 + 2 * i]) > 0 then
      redis.call('ZADD', KEYS[3 * i + 1], now, member)
      for j = 1, lease do redis.call('ZADD', KEYS[3 * i + 1], now, member .. ':' .. j) end
      redis.call('EXPIRE', KEYS[3 * i + 1], window + 1)
    end
    if tonumber(ARGV[6 + 2 * i]) > 0 then
      redis.call('INCRBY', KEYS[3 * i + 2], cost * (1 + lease))
      redis.call('EXPIRE', KEYS[3 * i + 2], 2 * window + 1)
    end
  end
end
return out
"""

# KEYS: a requests log. ARGV: how many members follow to re-time to now (taken from a lease), then those,
# then members to remove (what a lease gives back).
RETIME = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local taken = tonumber(ARGV[1])
for i = 2, taken + 1 do redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i]) end
for i = taken + 2, #ARGV do redis.call('ZREM', KEYS[1], ARGV[i]) end
if taken > 0 then redis.call('EXPIRE', KEYS[1], 61) end
return 0
"""

# KEYS: the requests logs, then the token counters of an ask whose answer was lost. ARGV: how many logs, the
# admitted member, how many requests' room was asked, their cost. Removes MEMBER:1..asked (what was granted, if
# anything) and gives back their tokens; a tokens-only scope has no members to tell what was granted.
UNLEASE = """
local logs, member, asked, cost = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local removed = 0
for i = 1, logs do
  local here = 0
  for j = 1, asked do here = here + redis.call('ZREM', KEYS[i], member .. ':' .. j) end
  removed = math.max(removed, here)
end
if removed > 0 then
  for i = logs + 1, #KEYS do  -- a window that expired meanwhile is not re-created (negative, without a TTL)
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('DECRBY', KEYS[i], removed * cost) end
  end
end
return removed
"""


# KEYS: the batch's mark, then token counters. ARGV: each counter's correction. A batch is applied once (sent again
# after a lost reply, it is skipped), and only to windows that still exist: a correction does not re-create a window
# that expired or that Redis lost (a restart without it), and none takes a counter below zero, which would give room.
SETTLE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 180) then return 0 end
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('INCRBY', KEYS[i], ARGV[i - 1]) < 0 then
    redis.call('SET', KEYS[i], 0, 'KEEPTTL')
  end
end
return 1
"""
