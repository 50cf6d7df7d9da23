"""Writing built completion records to Redis: the script that appends each to its tenant's stream, indexes
it and counts it, and the calls that send records to it, 100 at a time, in one round trip.

Both the gateway process (records built in a thread, and the spool's replay) and its record process
(gateway.record_worker, which writes what it builds) write through a `RecordStore`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
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

# Every argument is in ARGV (no KEYS: the keys are the tenants' and arms' listed in the call, and the script needs one
# Redis, not a cluster; it finds more in the entries it trims). ARGV opens with what trimming needs: TRIM_SLACK,
# TRIM_MOST, TRIMMED_KEEP_S, TRIMMED, the index prefix; then how many tenants and how many experiment arms the call
# writes for, and the key that says no erasure is named in clear any more (keys.named_tombstones_gone). Per tenant: its
# name, its log stream, its ratings prefix, its end users' prefix, its erasures' prefix (a digest of the user's name
# follows), its deletion key and its erasures' prefix of releases before (the name follows). Per arm: its counters, its
# users and ' EXPERIMENT ARM' for the index. Then per record: its JSON, its completion id, its end user ('' for none)
# and its numbers, space-separated (`_numbers`, read with META): its tenant's place in the list (from 1), its arm's (0:
# none), created, when its tenant was created, max length, ttl (s), error (1/0), prompt tokens, completion tokens,
# latency bucket (or nothing). Four arguments a record rather than twenty: packing and passing each argument costs both
# sides more than what most of them hold. A record of a tenant created at or before its deletion is skipped (each
# tenant's deletion is read once per call), and so is one past its tenant's age limit (a spool replayed late). A record
# of an end user erased since it was made is skipped too, and its index set to TRIMMED (unless one is there): a rating
# of it, spooled or sent to the process that answered it (which vouches for it), is then refused, and those kept before
# (vouched for while the record was on its way) are deleted, as erasure would have. An arm's counters move only when its
# record is written (a replay counts once). What many records of a call share is summed in the script and written once
# at its end: each end user's set gets one SADD and one EXPIRE (the longest ttl; never shortened: it also finds the
# user's ratings), each arm one HINCRBY per counter and one PFADD. A record that fails stops the loop, but what the
# records before it share is still written before the error is returned: the recorder then retries record by record, and
# the index skips those. Each entry holds the record (`r`), its completion id (`c`) and end user (`u`). Once the records
# are written, a log TRIM_SLACK entries over its length is trimmed to it (at most TRIM_MOST entries a call), and what
# was derived from each record trimmed goes with it, if its index still names that entry: the ratings and the
# completion's place in the set of its end user and of each user who rated it. Its index stays TRIMMED_KEEP_S, as
# TRIMMED (no tenant, no entry), so that a replay of the record is still skipped: written again, it would be the newest
# entry and push newer records out. What fails in a trim is logged by Redis and fails no record; the entries are trimmed
# all the same. Returns the records written; an error says how many were written before it (WRITTEN_BEFORE).
_RECORD = """
local TRIM_SLACK, TRIM_MOST, KEEP, TRIMMED = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local META = '^(%d+) (%d+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S*)$'
local written, sets, counted, deleted, logs = 0, {}, {}, {}, {}
local now = tonumber(redis.call('TIME')[1])
local indexes, tenant_count, arm_count = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local named = redis.call('EXISTS', ARGV[8]) == 0  -- tombstones named in clear may be left (gateway.erasure)
local tenants, arms, prefixes, a = {}, {}, {}, 9
for t = 1, tenant_count do
  local tenant = {name = ARGV[a], log = ARGV[a + 1], ratings = ARGV[a + 2], users = ARGV[a + 3]}
  tenant.forgotten, tenant.deleted, tenant.named = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  tenants[t], prefixes[tenant.log], a = tenant, tenant, a + 7
end
for r = 1, arm_count do
  arms[r], a = {counters = ARGV[a], users = ARGV[a + 1], label = ARGV[a + 2]}, a + 3
end
local head = a
local function bump(counts, field, by)
  if by ~= 0 then counts[field] = (counts[field] or 0) + by end
end
local function drop_ratings(tenant, id)  -- a completion's ratings, and its place in the sets of those who rated it
  local ratings = tenant.ratings .. id
  for _, rater in ipairs(redis.call('HKEYS', ratings)) do
    if rater ~= '' then redis.call('SREM', tenant.users .. rater, id) end
  end
  redis.call('DEL', ratings)
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
local function erased_at(tenant, user)  -- by its digest; by its name too while tombstones may be named so
  local at = tonumber(redis.call('GET', tenant.forgotten .. redis.sha1hex(user)) or '-1')
  if named then at = math.max(at, tonumber(redis.call('GET', tenant.named .. user) or '-1')) end
  return at
end
local function one(i)
  local a = head + 4 * i
  local id, user = ARGV[a + 1], ARGV[a + 2]
  local t, r, created, incarnation, limit, ttl, errors, prompt, completion, bucket = string.match(ARGV[a + 3], META)
  local tenant, arm = tenants[tonumber(t)], arms[tonumber(r)]
  created, incarnation, limit, ttl = tonumber(created), tonumber(incarnation), tonumber(limit), tonumber(ttl)
  errors, prompt, completion = tonumber(errors), tonumber(prompt), tonumber(completion)
  if tenant == nil or (r ~= '0' and arm == nil) or created == nil or incarnation == nil or limit == nil
    or ttl == nil or errors == nil or prompt == nil or completion == nil then
    error('record ' .. id .. ': bad counts')
  end
  if deletion(tenant.deleted) >= incarnation or created + ttl < now then return end
  local erased = user ~= '' and erased_at(tenant, user) >= created
  local index = indexes .. id
  if erased then  -- TRIMMED refuses the ratings others give of it (spooled, or sent to the process that answered)
    -- its first copy: the ratings kept before it came (vouched for, counted in no arm) quote the erased conversation
    if redis.call('SET', index, TRIMMED, 'EX', math.max(ttl, tonumber(KEEP)), 'NX') then drop_ratings(tenant, id) end
    return
  end
  if redis.call('EXISTS', index) == 1 then return end
  local entry = redis.call('XADD', tenant.log, '*', 'r', ARGV[a], 'c', id, 'u', user)
  logs[tenant.log] = limit
  redis.call('SET', index, tenant.name .. ' ' .. entry .. (arm and arm.label or ''), 'EX', ttl)
  written = written + 1
  if user ~= '' then
    local key = tenant.users .. user
    local set = sets[key]
    if set == nil then set = {ttl = 0, ids = {}}; sets[key] = set end
    set.ids[#set.ids + 1] = id
    set.ttl = math.max(set.ttl, ttl)
  end
  if arm ~= nil then
    local found = counted[arm]
    if found == nil then found = {counts = {}, who = {}}; counted[arm] = found end
    local counts = found.counts
    bump(counts, 'requests', 1)
    if user == '' then bump(counts, 'anonymous', 1) else found.who[#found.who + 1] = user end
    bump(counts, 'errors', errors)
    bump(counts, 'prompt_tokens', prompt)
    bump(counts, 'completion_tokens', completion)
    if bucket ~= '' then bump(counts, 'latency:' .. bucket, 1) end
  end
end
local failed = nil
for i = 0, (#ARGV - head + 1) / 4 - 1 do
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
for arm, found in pairs(counted) do
  for field, by in pairs(found.counts) do shared('HINCRBY', arm.counters, field, by) end
  if #found.who > 0 then shared('PFADD', arm.users, unpack(found.who)) end
end
local function forget(found, entry)
  local fields, id, user = entry[2], nil, ''
  for f = 1, #fields, 2 do
    if fields[f] == 'c' then id = fields[f + 1] elseif fields[f] == 'u' then user = fields[f + 1] end
  end
  local index = id and redis.call('GET', indexes .. id)
  if not index or string.match(index, '^%S+ (%S+)') ~= entry[1] then return end
  drop_ratings(found, id)
  if user ~= '' then redis.call('SREM', found.users .. user, id) end
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
  local suffix = ' (written before it: ' .. written .. ')'
  if type(failed) == 'table' then failed.err = tostring(failed.err) .. suffix; return failed end
  return redis.error_reply(tostring(failed) .. suffix)
end
return written
"""
WRITTEN_BEFORE = re.compile(r" \(written before it: (\d+)\)$")
"""How a script error ends: how many records of the call were written before it (they skip when retried)."""
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


@dataclass
class Written:
    """What became of the entries of one `RecordStore.write`."""

    refused: set[str] = field(default_factory=set)
    """Completion ids Redis refused (a record the script could not read): dropped."""
    written: int = 0
    """Records the script appended to a log. The rest it skipped: written already (a replay), of an end user erased
    or a tenant deleted since, or past the tenant's age limit."""

    def skipped(self, entries: int) -> int:
        return entries - len(self.refused) - self.written


class RecordStore:
    """The records Redis, for writing built records (entries of gateway.record_builder.build_entries)."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._lane = ScriptLane(redis, _RECORD, size=2)

    async def write(self, entries: list[dict[str, Any]]) -> Written:
        """Write entries. A chunk Redis refuses (a script error, not an outage) is retried record by record, so one
        bad record cannot stop the log; the others are sent to the script, which skips those already written,
        erased or of a deleted tenant. An unreachable Redis raises (UNREACHABLE)."""
        chunks = [entries[i : i + CHUNK] for i in range(0, len(entries), CHUNK)]
        replies = _unless_busy(await self._lane.many([_call(chunk) for chunk in chunks]))
        done = Written()
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, ResponseError):  # the records before the bad one were written: retried, they skip
                before = WRITTEN_BEFORE.search(str(reply))
                done.written += int(before.group(1)) if before else 0
                await self._one_by_one(chunk, reply, done)
            else:
                done.written += int(reply)
        return done

    async def _one_by_one(self, chunk: list[dict[str, Any]], error: Exception, done: Written) -> None:
        log.error("completion log: Redis refused a batch (%s); writing its records one by one", error)
        replies = _unless_busy(await self._lane.many([_call([entry]) for entry in chunk]))
        for entry, reply in zip(chunk, replies, strict=True):
            if isinstance(reply, ResponseError):
                log.error("completion log: record %s refused by Redis, dropped: %s", entry["id"], reply)
                done.refused.add(entry["id"])
            else:
                done.written += int(reply)

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
    """The arguments of one script call writing `chunk` (no keys: see _RECORD)."""
    tenants: dict[str, int] = {}
    arms: dict[tuple[str, str, str], int] = {}
    records: list[Any] = []
    for e in chunk:
        tenant, user, experiment, arm = e["tenant"], e["user"] or "", e.get("experiment"), e.get("arm")
        t = tenants.setdefault(tenant, len(tenants) + 1)
        r = arms.setdefault((tenant, experiment, arm), len(arms) + 1) if experiment and arm else 0
        records += (e["record"], e["id"], user, _numbers(e, t, r))
    args: list[Any] = [TRIM_SLACK, TRIM_MOST, TRIMMED_KEEP_S, TRIMMED, keys.completion_prefix()]
    args += (len(tenants), len(arms), keys.named_tombstones_gone())
    for tenant in tenants:
        args += (tenant, keys.completion_log(tenant), keys.feedback_prefix(tenant), keys.end_user_prefix(tenant))
        args += (keys.forgotten_prefix(tenant), keys.tenant_deleted(tenant), keys.named_tombstone_prefix(tenant))
    for tenant, experiment, arm in arms:
        args += (keys.arm_counters(tenant, experiment, arm), keys.arm_users(tenant, experiment, arm))
        args.append(f" {experiment} {arm}")
    return [], args + records


def _numbers(e: dict[str, Any], tenant: int, arm: int) -> str:
    """A record's numbers, one argument (see _RECORD's META)."""
    created = e["created"]
    return (
        f"{tenant} {arm} {created!r} {e.get('tenant_created') or created!r} {e['max_records']} {e['ttl']} "
        f"{e.get('error', 0)} {e.get('prompt_tokens', 0)} {e.get('completion_tokens', 0)} {e.get('latency_bucket', '')}"
    )
