"""How a rating moves its experiment arm's counters: one Lua function, shared by the script that stores a rating
(gateway.feedback) and the one that erases ratings (gateway.erasure), so that an erased rating takes away exactly
what it added.

A rating's signal is its positive share: thumbs up 1, down 0, a score scaled to 0..1 by the tenant's range when it
was given (its `score_range`; the range now for a rating kept without one), their mean when it has both: a rating
replaced or erased after the range changed takes away what it added, and one that no arm counted when it was written
(`counted` false: its completion's record had not come yet) takes away nothing. The arm's hash
(`keys.arm_counters`) counts `rated`, `positive_sum`, `positive_squares`, `negative` (a signal under 0.5) and
`corrected`.

Arms are compared on the ratings given since the split last changed (gateway.experiment_results), which the hash
counts apart: `since:rated`, `since:positive_sum` and `since:positive_squares` hold the ratings dated (`created`) at
or after `since:at`, which `begin_period` sets when the split changes (before any change, every rating counts). A
rating replaced or erased takes away from them only if it was counted in them: its own date decides both ways, so
the figures since are always those of ratings really given since. (Before, a snapshot of the totals was taken at the
change and subtracted: a rating given before it and replaced or erased after it then took from the ratings since
what it had never added to them, and the comparison could name a winner that no rating supported.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway import keys

SINCE_MARGIN_S = 2
"""A new period begins this long after the change, by the records Redis's clock. Ratings are dated by each gateway's
reading of that clock, off by less than this: a rating written before the change is never dated after its start
(counted then in the ratings since, it would be taken from them when replaced, though the change had cleared it)."""

SIGNAL = """
local function signal(counters, raw, sign, lo, hi)
  local ok, f = pcall(cjson.decode, raw)
  if not ok or (sign < 0 and f['counted'] == false) then return end  -- taken away only if it was added
  local sum, n, range = 0, 0, f['score_range']
  if type(range) == 'table' and tonumber(range[1]) and tonumber(range[2]) then  -- the range it was given in
    lo, hi = tonumber(range[1]), tonumber(range[2])
  end
  if f['thumbs'] == 'up' then sum, n = 1, 1 elseif f['thumbs'] == 'down' then n = 1 end
  if type(f['score']) == 'number' and hi - lo < math.huge then  -- a range of +-1e308 is wider than a float holds
    sum, n = sum + math.min(math.max((f['score'] - lo) / (hi - lo), 0), 1), n + 1
  end
  local correction = type(f['correction'])  -- a string, or a message that calls tools (a table)
  if correction == 'string' or correction == 'table' then redis.call('HINCRBY', counters, 'corrected', sign) end
  if n == 0 then return end
  local v = sum / n
  redis.call('HINCRBY', counters, 'rated', sign)
  redis.call('HINCRBYFLOAT', counters, 'positive_sum', sign * v)
  redis.call('HINCRBYFLOAT', counters, 'positive_squares', sign * v * v)
  if v < 0.5 then redis.call('HINCRBY', counters, 'negative', sign) end
  local created, at = tonumber(f['created']) or 0, redis.call('HMGET', counters, 'since:at', 'guard:at')
  if created >= (tonumber(at[1] or '0') or 0) then
    redis.call('HINCRBY', counters, 'since:rated', sign)
    redis.call('HINCRBYFLOAT', counters, 'since:positive_sum', sign * v)
    redis.call('HINCRBYFLOAT', counters, 'since:positive_squares', sign * v * v)
  end
  if at[2] and created >= (tonumber(at[2]) or 0) then  -- the guard window's (gateway.arm_signal.guard_window)
    redis.call('HINCRBY', counters, 'guard:rated', sign)
    if v < 0.5 then redis.call('HINCRBY', counters, 'guard:negative', sign) end
  end
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

# The guard rails judge an arm on what it did since its own weight last changed or its experiment was last resumed
# (`guard_window`, gateway.experiment_results), not on its whole life: an arm given a weight again once its failure was
# mended, or an experiment resumed after a pause, was rolled back again at once for its old errors, and an arm that
# begins to fail after 10,000 good requests passed 20% errors only some 2,500 failures later. The window's fields are
# numbers (a release before reads every field but `since:base` as one): `guard:at` (when it began, by the records
# Redis's clock plus SINCE_MARGIN_S), `guard:requests` and `guard:errors` (the arm's totals then), and `guard:rated`
# and `guard:negative`, the ratings dated (`created`) in it, as the ratings since the split changed are counted: a
# rating given before and replaced or erased after takes nothing from them.
# An arm is judged against control over its own window: the window notes control's totals when it begins
# (`guard:control_*`), so that an outage failing every arm alike after a canary's weight changed reads as control's
# too (control's whole life diluted it, and the canary was rolled back).
# KEYS: the tenant's deletion tombstone, then the arms' counters. ARGV[1]: SINCE_MARGIN_S, ARGV[2]: when the experiment
# was created, ARGV[3]: per arm, '1' where its window begins anew, ARGV[4]: control's place in KEYS. Nothing is
# written for an experiment whose tenant was deleted since (its counters were purged: the change is refused as saved).
_GUARD = """
local deleted = redis.call('GET', KEYS[1])
if deleted and tonumber(string.match(deleted, '^%S+')) >= tonumber(ARGV[2]) then return {} end
local now = redis.call('TIME')
local at = string.format('%.6f', tonumber(now[1]) + tonumber(now[2]) / 1e6 + tonumber(ARGV[1]))
local function guard_begins(i)
  if string.sub(ARGV[3], i - 1, i - 1) ~= '1' then return end
  local n = redis.call('HMGET', KEYS[i], 'requests', 'errors')
  local c = redis.call('HMGET', KEYS[tonumber(ARGV[4])], 'requests', 'errors', 'rated', 'negative')
  redis.call('HSET', KEYS[i], 'guard:at', at, 'guard:requests', n[1] or 0, 'guard:errors', n[2] or 0,
    'guard:rated', 0, 'guard:negative', 0, 'guard:control_requests', c[1] or 0, 'guard:control_errors', c[2] or 0,
    'guard:control_rated', c[3] or 0, 'guard:control_negative', c[4] or 0)
end
"""
_RESTART_GUARD = (
    _GUARD
    + """
for i = 2, #KEYS do guard_begins(i) end
return #KEYS - 1
"""
)

# KEYS, ARGV: as _GUARD's. Each arm's ratings since start again from none, from now plus the margin, and the period
# notes the arm's totals it began at (`since:base`: the experiment's `rated_before` must match it, below); the guard
# windows ARGV[3] names begin too. Returns per arm its identified requests so far (requests less anonymous ones) and
# that base, in KEYS' order.
_BEGIN_PERIOD = (
    _GUARD
    + """
local found = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  local n = redis.call('HMGET', key, 'requests', 'anonymous', 'rated', 'positive_sum', 'positive_squares')
  local base = (n[3] or '0') .. ' ' .. (n[4] or '0') .. ' ' .. (n[5] or '0')
  redis.call('HSET', key, 'since:at', at, 'since:base', base, 'since:rated', 0, 'since:positive_sum', 0,
    'since:positive_squares', 0)
  guard_begins(i)
  found[i - 1] = {(tonumber(n[1]) or 0) - (tonumber(n[2]) or 0), base}
end
return found
"""
)


@dataclass(frozen=True)
class Period:
    """What a new comparison period began at, per arm: its identified requests and its rating totals."""

    exposed: dict[str, int]
    rated: dict[str, tuple[int, float, float]]


async def begin_period(
    redis: aioredis.Redis,
    tenant: str,
    experiment: str,
    created: float,
    arms: list[str],
    guarded: set[str],
    control: str,
) -> Period:
    """A new comparison period for the arms of the experiment (created at `created`) whose split changed: their
    ratings since count from none; so do the guard windows of the arms `guarded` names (those whose own weight
    changed: another arm's roll-back does not start a failing arm's window again). Returns what each arm had until
    then (nothing for an experiment whose tenant was deleted since): the sample ratio test counts requests from
    there; the totals are the experiment's `rated_before`, which gateways of the release before compare from (and
    which tells this one whether they changed the split since: `counted_since`)."""
    script_keys = _script_keys(tenant, experiment, arms)
    which = "".join("1" if arm in guarded else "0" for arm in arms)
    args = (SINCE_MARGIN_S, repr(created), which, arms.index(control) + 2)  # control's place in KEYS
    found = await redis.eval(_BEGIN_PERIOD, len(script_keys), *script_keys, *args)
    period = Period({}, {})
    for arm, (exposed, base) in zip(arms, found, strict=False):
        period.exposed[arm], period.rated[arm] = int(exposed), _base(base)
    return period


async def restart_guard(
    redis: aioredis.Redis, tenant: str, experiment: str, created: float, arms: list[str], control: str
) -> None:
    """The arms' guard windows begin now (an experiment resumed): the guard rails judge what they do from here."""
    script_keys = _script_keys(tenant, experiment, arms)
    args = (SINCE_MARGIN_S, repr(created), "1" * len(arms), arms.index(control) + 2)
    await redis.eval(_RESTART_GUARD, len(script_keys), *script_keys, *args)


def _script_keys(tenant: str, experiment: str, arms: list[str]) -> list[str]:
    """_GUARD's KEYS: the tenant's deletion tombstone, then the arms' counters."""
    return [keys.tenant_deleted(tenant), *(keys.arm_counters(tenant, experiment, arm) for arm in arms)]


def guard_window(counters: dict[str, float]) -> dict[str, int]:
    """An arm's requests, errors, ratings and negative ratings in its guard window (its whole life where none began),
    from its counters read as numbers."""
    figure = {name: int(counters.get(name, 0)) for name in ("requests", "errors", "rated", "negative")}
    if "guard:at" not in counters:
        return figure
    return {
        "requests": max(figure["requests"] - int(counters.get("guard:requests", 0)), 0),
        "errors": max(figure["errors"] - int(counters.get("guard:errors", 0)), 0),
        "rated": max(int(counters.get("guard:rated", 0)), 0),
        "negative": max(int(counters.get("guard:negative", 0)), 0),
    }


def control_window(control: dict[str, float], arm: dict[str, float]) -> dict[str, int]:
    """Control's requests, errors, ratings and negative ratings over an arm's guard window (from the totals the
    window noted; its whole life where the arm has no window), each counter read as a number."""
    names = ("requests", "errors", "rated", "negative")
    began = {name: int(arm.get(f"guard:control_{name}", 0)) if "guard:at" in arm else 0 for name in names}
    return {name: max(int(control.get(name, 0)) - began[name], 0) for name in names}


def _base(text: str | bytes) -> tuple[int, float, float]:
    rated, total, squares = (text.decode() if isinstance(text, bytes) else text).split()
    return int(float(rated)), float(total), float(squares)


def counted_since(counters: dict[str, str], before: tuple[int, float, float] | None) -> bool:
    """Whether the arm's counters hold its ratings since the split last changed: a period begun by this release
    (`since:at`) whose base is the experiment's `rated_before` (a gateway of the release before that changed the
    split later took a new snapshot, which the period's base then no longer matches)."""
    if "since:at" not in counters or "since:base" not in counters or before is None:
        return False
    base = _base(counters["since:base"])
    return base[0] == before[0] and all(
        math.isclose(a, b, abs_tol=1e-6) for a, b in zip(base[1:], before[1:], strict=True)
    )
