"""Writing built completion records to Redis: the script that appends each to its tenant's stream, indexes
it and counts it, and the calls that send records to it, 100 at a time, in one round trip.

Both the gateway process (records built in a thread, and the spool's replay) and its record process
(gateway.record_worker, which writes what it builds) write through a `RecordStore`.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import keys
from gateway.lane import Call, ScriptLane

log = logging.getLogger("loragate.recorder")

TRIM_SLACK = 100
"""A log is trimmed once it holds this many records over its length (as `XADD MAXLEN ~` trims whole nodes of 100)."""
TRIM_MOST = 200
"""Records trimmed per call at most (each is read into the script: a length limit lowered a lot is reached over
several calls, not in one that blocks Redis)."""
TRIMMED_KEEP_S = 3600
"""How long a trimmed record's completion index stays, as TRIMMED: long enough for any replay of the record (a lost
answer, a spool adopted from a process that died) to be skipped by it, and short next to the age limit."""
TRIMMED = "-"
"""A trimmed record's completion index: names no tenant and no entry (feedback and erasure take it as unknown)."""

# ARGV opens with what trimming needs: TRIM_SLACK, TRIM_MOST, TRIMMED_KEEP_S, TRIMMED, the index prefix, how many
# tenants the call writes for, and for each its log stream, its ratings prefix and its end users' prefix. Then per
# record, KEYS: log stream, completion index, end user's set, end user's erasure, experiment arm's counters,
# experiment arm's users ('' for what does not apply), the tenant's deletion. ARGV: record JSON, max length, ttl
# (s), tenant, completion id, created, ' EXPERIMENT ARM' (or ''), end user, error (1/0), prompt tokens, completion
# tokens, latency bucket, when its tenant was created. A record of a tenant created at or before its deletion is
# skipped (each tenant's deletion is read once per call), and so is one past its tenant's age limit (a spool
# replayed late). An arm's counters move only when its record is written (a replay counts once). What many records
# of a call share is summed in the script and written once at its end: each end user's set gets one SADD and one
# EXPIRE (the longest ttl; never shortened: it also finds the user's ratings), each arm one HINCRBY per counter and
# one PFADD. A record that fails stops the loop, but what the records before it share is still written before the
# error is returned: the recorder then retries record by record, and the index skips those.
# Each entry holds the record (`r`), its completion id (`c`) and end user (`u`). Once the records are written, a log
# TRIM_SLACK entries over its length is trimmed to it (at most TRIM_MOST entries a call), and what was derived from
# each record trimmed goes with it, if its index still names that entry: the ratings and the completion's place in
# the set of its end user and of each user who rated it. Its index stays TRIMMED_KEEP_S, as TRIMMED (no tenant, no
# entry), so that a replay of the record is still skipped: written again, it would be the newest entry and push
# newer records out. These keys are not declared (they are found in the entries): the script needs one Redis, not
# a cluster. What fails in a trim is logged by Redis and fails no record; the entries are trimmed all the same.
# Returns the records written.
_RECORD = """
local TRIM_SLACK, TRIM_MOST, KEEP, TRIMMED = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local written, sets, arms, deleted, logs = 0, {}, {}, {}, {}
local now = tonumber(redis.call('TIME')[1])
local indexes, tenants = ARGV[5], tonumber(ARGV[6])
local prefixes = {}
for t = 0, tenants - 1 do prefixes[ARGV[7 + 3 * t]] = {ratings = ARGV[8 + 3 * t], users = ARGV[9 + 3 * t]} end
local head = 6 + 3 * tenants
local function bump(counts, field, by)
  if by ~= 0 then counts[field] = (counts[field] or 0) + by end
end
local function deletion(key)
  local at = deleted[key]
  if at == nil then
    local found = redis.call('GET', key)
    at = found and tonumber(string.match(found, '^%S+')) or -1
    deleted[key] = at
  end
  return at
end
local function one(i)
  local stream, index, user, gone = KEYS[7 * i + 1], KEYS[7 * i + 2], KEYS[7 * i + 3], KEYS[7 * i + 4]
  local arm = KEYS[7 * i + 5]
  local a = head + 13 * i
  local errors, prompt, completion = tonumber(ARGV[a + 9]), tonumber(ARGV[a + 10]), tonumber(ARGV[a + 11])
  local incarnation = tonumber(ARGV[a + 13])
  if errors == nil or prompt == nil or completion == nil or incarnation == nil then
    error('record ' .. ARGV[a + 5] .. ': bad counts')
  end
  if deletion(KEYS[7 * i + 7]) >= incarnation or tonumber(ARGV[a + 6]) + tonumber(ARGV[a + 3]) < now then return end
  local erased = user ~= '' and tonumber(redis.call('GET', gone) or '-1') >= tonumber(ARGV[a + 6])
  if erased or redis.call('EXISTS', index) == 1 then return end
  local entry = redis.call('XADD', stream, '*', 'r', ARGV[a + 1], 'c', ARGV[a + 5], 'u', ARGV[a + 8])
  logs[stream] = tonumber(ARGV[a + 2])
  redis.call('SET', index, ARGV[a + 4] .. ' ' .. entry .. ARGV[a + 7], 'EX', ARGV[a + 3])
  written = written + 1
  if user ~= '' then
    local set = sets[user]
    if set == nil then set = {ttl = 0, ids = {}}; sets[user] = set end
    set.ids[#set.ids + 1] = ARGV[a + 5]
    set.ttl = math.max(set.ttl, tonumber(ARGV[a + 3]))
  end
  if arm ~= '' then
    local found = arms[arm]
    if found == nil then found = {users = KEYS[7 * i + 6], counts = {}, who = {}}; arms[arm] = found end
    local counts = found.counts
    bump(counts, 'requests', 1)
    if ARGV[a + 8] == '' then bump(counts, 'anonymous', 1) else found.who[#found.who + 1] = ARGV[a + 8] end
    bump(counts, 'errors', errors)
    bump(counts, 'prompt_tokens', prompt)
    bump(counts, 'completion_tokens', completion)
    if ARGV[a + 12] ~= '' then bump(counts, 'latency:' .. ARGV[a + 12], 1) end
  end
end
local failed = nil
for i = 0, #KEYS / 7 - 1 do
  local ok, err = pcall(one, i)
  if not ok then failed = err; break end
end
local function shared(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err and failed == nil then failed = reply end
end
for key, set in pairs(sets) do
  shared('SADD', key, unpack(set.ids))
  if redis.call('TTL', key) < set.ttl then shared('EXPIRE', key, set.ttl) end
end
for key, found in pairs(arms) do
  for field, by in pairs(found.counts) do shared('HINCRBY', key, field, by) end
  if #found.who > 0 then shared('PFADD', found.users, unpack(found.who)) end
end
local function forget(found, entry)
  local fields, id, user = entry[2], nil, ''
  for f = 1, #fields, 2 do
    if fields[f] == 'c' then id = fields[f + 1] elseif fields[f] == 'u' then user = fields[f + 1] end
  end
  local index = id and redis.call('GET', indexes .. id)
  if not index or string.match(index, '^%S+ (%S+)') ~= entry[1] then return end
  local ratings = found.ratings .. id
  for _, rater in ipairs(redis.call('HKEYS', ratings)) do
    if rater ~= '' then redis.call('SREM', found.users .. rater, id) end
  end
  if user ~= '' then redis.call('SREM', found.users .. user, id) end
  redis.call('DEL', ratings)
  redis.call('SET', indexes .. id, TRIMMED, 'EX', KEEP)
end
local function warn(stream, err)
  local text = type(err) == 'table' and (err.err or '?') or tostring(err)
  redis.log(redis.LOG_WARNING, 'loragate: trimming ' .. stream .. ': ' .. text)
end
local function trim(stream, limit)
  local length = redis.call('XLEN', stream)
  if length - limit < TRIM_SLACK then return end
  local old = redis.call('XRANGE', stream, '-', '+', 'COUNT', math.min(length - limit, TRIM_MOST))
  for _, entry in ipairs(old) do
    local ok, err = pcall(forget, prefixes[stream], entry)
    if not ok then warn(stream, err) end
  end
  redis.call('XTRIM', stream, 'MAXLEN', length - #old)
end
for stream, limit in pairs(logs) do
  local ok, err = pcall(trim, stream, limit)
  if not ok then warn(stream, err) end
end
if failed ~= nil then
  if type(failed) == 'table' then return failed end
  return redis.error_reply(tostring(failed))
end
return written
"""
CHUNK = 100
"""Records per script call: a call blocks Redis while it runs, so a batch is several short calls."""
BUSY_NOW = ("OOM", "READONLY", "LOADING", "BUSY", "MISCONF", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS", "CLUSTERDOWN")
"""Error replies that say Redis cannot write now (full, demoted by a failover, loading, a script running, its
disk failing), not that a record is bad."""


def parse_index(index: str | None) -> tuple[str, str, str, str]:
    """A completion index's value as the script writes it (`TENANT ENTRY[ EXPERIMENT ARM]`): tenant, stream entry,
    experiment and arm ('' for what it does not hold; all '' for TRIMMED)."""
    if index == TRIMMED:
        return "", "", "", ""
    owner, entry, experiment, arm = ((index or "").split(" ") + ["", "", "", ""])[:4]
    return owner, entry, experiment, arm


class WritesRefused(RedisConnectionError):
    """Redis answered, but refuses writes for now (BUSY_NOW): the records wait in the spool as for an outage."""


UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
"""What an unreachable Redis raises, or one refusing writes for now (the records then go to the spool)."""


class RecordStore:
    """The records Redis, for writing built records (entries of gateway.record_builder.build_entries)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._lane = ScriptLane(redis, _RECORD, size=2)

    async def write(self, entries: list[dict[str, Any]]) -> set[str]:
        """Write entries; the completion ids Redis refused (dropped). A chunk Redis refuses (a script error, not
        an outage) is retried record by record, so one bad record cannot stop the log; the others are sent to
        the script, which skips those already written, erased or of a deleted tenant. An unreachable Redis
        raises (UNREACHABLE)."""
        chunks = [entries[i : i + CHUNK] for i in range(0, len(entries), CHUNK)]
        replies = _unless_busy(await self._lane.many([_call(chunk) for chunk in chunks]))
        refused: set[str] = set()
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, ResponseError):
                refused |= await self._one_by_one(chunk, reply)
        return refused

    async def _one_by_one(self, chunk: list[dict[str, Any]], error: Exception) -> set[str]:
        log.error("completion log: Redis refused a batch (%s); writing its records one by one", error)
        refused = set()
        replies = _unless_busy(await self._lane.many([_call([entry]) for entry in chunk]))
        for entry, reply in zip(chunk, replies, strict=True):
            if isinstance(reply, ResponseError):
                log.error("completion log: record %s refused by Redis, dropped: %s", entry["id"], reply)
                refused.add(entry["id"])
        return refused

    async def close(self) -> None:
        await self._lane.close()


def _unless_busy(replies: list[Any]) -> list[Any]:
    """The replies, unless one says Redis refuses writes for now (WritesRefused): then no record of the call is
    dropped as bad; all of them go to the spool, and the script skips, on replay, those written already."""
    for reply in replies:
        if isinstance(reply, ResponseError) and str(reply).split(" ", 1)[0] in BUSY_NOW:
            raise WritesRefused(str(reply))
    return replies


def _call(chunk: list[dict[str, Any]]) -> Call:
    """The keys and arguments of one script call writing `chunk`."""
    script_keys: list[str] = []
    tenants = dict.fromkeys(e["tenant"] for e in chunk)
    args: list[Any] = [TRIM_SLACK, TRIM_MOST, TRIMMED_KEEP_S, TRIMMED, keys.completion_prefix(), len(tenants)]
    for tenant in tenants:
        args += [keys.completion_log(tenant), keys.feedback_prefix(tenant), keys.end_user_prefix(tenant)]
    for e in chunk:
        tenant, user, experiment, arm = e["tenant"], e["user"], e.get("experiment"), e.get("arm")
        script_keys += [keys.completion_log(tenant), keys.completion(e["id"])]
        script_keys += [keys.end_user(tenant, user), keys.forgotten(tenant, user)] if user else ["", ""]
        if experiment and arm:
            script_keys += [keys.arm_counters(tenant, experiment, arm), keys.arm_users(tenant, experiment, arm)]
        else:
            script_keys += ["", ""]
        script_keys.append(keys.tenant_deleted(tenant))
        args += [e["record"], e["max_records"], e["ttl"], tenant, e["id"], e["created"]]
        args += [f" {experiment} {arm}" if experiment and arm else "", user or "", e.get("error", 0)]
        args += [e.get("prompt_tokens", 0), e.get("completion_tokens", 0), e.get("latency_bucket", "")]
        args.append(e.get("tenant_created") or e["created"])
    return script_keys, args
