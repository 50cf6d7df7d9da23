"""How a rating moves its experiment arm's counters: one Lua function, shared by the script that stores a rating
(gateway.feedback) and the one that erases ratings (gateway.erasure), so that an erased rating takes away exactly
what it added.

A rating's signal is its positive share: thumbs up 1, down 0, a score scaled to 0..1 by the tenant's range, their
mean when it has both. The arm's hash (`keys.arm_counters`) counts `rated`, `positive_sum`, `positive_squares`,
`negative` (a signal under 0.5) and `corrected`.
"""

from __future__ import annotations

SIGNAL = """
local function signal(counters, raw, sign, lo, hi)
  local ok, f = pcall(cjson.decode, raw)
  if not ok then return end
  local sum, n = 0, 0
  if f['thumbs'] == 'up' then sum, n = 1, 1 elseif f['thumbs'] == 'down' then n = 1 end
  if type(f['score']) == 'number' and hi - lo < math.huge then  -- a range of +-1e308 is wider than a float holds
    sum, n = sum + math.min(math.max((f['score'] - lo) / (hi - lo), 0), 1), n + 1
  end
  if type(f['correction']) == 'string' then redis.call('HINCRBY', counters, 'corrected', sign) end
  if n == 0 then return end
  local v = sum / n
  redis.call('HINCRBY', counters, 'rated', sign)
  redis.call('HINCRBYFLOAT', counters, 'positive_sum', sign * v)
  redis.call('HINCRBYFLOAT', counters, 'positive_squares', sign * v * v)
  if v < 0.5 then redis.call('HINCRBY', counters, 'negative', sign) end
end
"""

# KEYS: the completion's feedback hash, its experiment arm's counters ('' where none). ARGV: the end user whose
# rating goes ('' for every rating of the completion), the tenant's score range (low, high). Returns how many went.
ERASE = (
    SIGNAL
    + """
local lo, hi = tonumber(ARGV[2]), tonumber(ARGV[3])
local gone = {}
if ARGV[1] == '' then
  gone = redis.call('HVALS', KEYS[1])
  redis.call('DEL', KEYS[1])
else
  local raw = redis.call('HGET', KEYS[1], ARGV[1])
  if raw then
    gone = {raw}
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
end
if KEYS[2] ~= '' then
  for _, raw in ipairs(gone) do signal(KEYS[2], raw, -1, lo, hi) end
end
return #gone
"""
)
