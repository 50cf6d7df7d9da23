"""The Lua script that gateway.feedback runs in Redis to store one rating: checked against its tenant's deletion, its
completion's trim and its end user's erasure, counted in its experiment arm, kept as long as its completion."""

from __future__ import annotations

from gateway.arm_signal import SIGNAL

# KEYS: the completion's feedback hash, the end user's set, the end user's erasure, the experiment arm's
# counters ('' where none), the tenant's deletion, the completion's index, the end user's erasure as releases before
# 2026-12-07 named it (gateway.erasure.digest_named_tombstones). ARGV: field (end user), feedback JSON,
# created, completion id, ttl (s), replay (1/0), score_min, score_max, when its tenant was created, TRIMMED,
# MAX_RATERS. Feedback of a tenant created at or before its deletion, or of a completion the length limit trimmed, is
# refused (-1); one made before its end user's erasure, or (replayed) past the tenant's age limit, is dropped (0); a
# new end user's past MAX_RATERS is refused (-3) unless replayed (acknowledged already). A replay never replaces a
# newer rating. The hash lives as long as the completion's index (a later rating does not extend it) and the end
# user's set at least as long (it is never shortened): erasure finds every rating through the set. The arm's
# feedback signal moves by the difference a (replaced) rating makes (gateway.arm_signal).
STORE = (
    SIGNAL
    + """
local deleted = redis.call('GET', KEYS[5])
if deleted and tonumber(string.match(deleted, '^%S+')) >= tonumber(ARGV[9]) then return -1 end
if redis.call('GET', KEYS[6]) == ARGV[10] then return -1 end
if KEYS[2] ~= '' then
  local erased = math.max(tonumber(redis.call('GET', KEYS[3]) or '-1'), tonumber(redis.call('GET', KEYS[7]) or '-1'))
  if erased >= tonumber(ARGV[3]) then return 0 end
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
local ttl = tonumber(ARGV[5])
if ARGV[6] == '1' then
  if tonumber(redis.call('TIME')[1]) > tonumber(ARGV[3]) + ttl then return 0 end
  if old then
    local ok, previous = pcall(cjson.decode, old)
    if ok and tonumber(previous['created']) and tonumber(previous['created']) > tonumber(ARGV[3]) then return 0 end
  end
end
if ARGV[6] ~= '1' and not old and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[11]) then return -3 end
local lo, hi = tonumber(ARGV[7]), tonumber(ARGV[8])
if KEYS[4] ~= '' then
  if old then signal(KEYS[4], old, -1, lo, hi) end
  signal(KEYS[4], ARGV[2], 1, lo, hi)
end
local keep = redis.call('TTL', KEYS[6])
if keep <= 0 then keep = ttl end  -- not indexed yet (its record is still queued): the tenant's age limit
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], keep)
if KEYS[2] ~= '' then
  redis.call('SADD', KEYS[2], ARGV[4])
  keep = math.max(keep, ttl)
  if redis.call('TTL', KEYS[2]) < keep then redis.call('EXPIRE', KEYS[2], keep) end
end
return 1
"""
)
