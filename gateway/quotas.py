"""Requests and tokens per minute, per tenant and optionally per key, enforced atomically in Redis.

One Lua script per request checks every limit that applies and admits the request only if all
pass, so N gateway processes sharing one Redis admit no more than the limit between them.

- Requests: a sliding log (a sorted set of the last minute's admissions): exact, at most `rpm` in
  any 60 s.
- Tokens: a sliding-window counter (this minute's tokens plus the previous minute's, weighted by how
  much of it is still inside the window). A request reserves its `max_tokens` (naming none, the most
  it may generate: the cap, or a configured default) plus an estimate of its prompt before it is
  forwarded, as OpenAI counts `max_tokens` against its limits; `settle` corrects the reservation
  by the real usage afterwards (corrections are batched and sent every 0.1 s, off the request path; a batch
  is applied once).
- Leases (gateway/quota_leases.py): where a window has room to spare, an admission also takes room for a
  few more like it, so most requests of a busy tenant are admitted in-process; near a limit every request
  is checked in Redis. What a lease holds counts as used from the start, so the limits still hold.
- Over a limit: 429 `rate_limit_exceeded` with Retry-After. OpenAI's `x-ratelimit-*` headers describe
  the tighter scope on every response of a tenant (or key) that has limits.
- Redis down: the tenant's `on_redis_down` decides: admit (`open`, the default) or refuse with 503
  (`closed`); both are counted in `loragate_quota_redis_failures_total`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import keys
from gateway import quota_scripts as scripts
from gateway.clock import RedisClock
from gateway.errors import InvalidRequest, RateLimited, StateUnavailable
from gateway.lane import Call, ScriptLane
from gateway.metrics import Metrics
from gateway.principal import Principal
from gateway.quota_leases import LeaseBook, Scopes
from gateway.records import CHARS_PER_TOKEN
from gateway.tenants import Tenant

log = logging.getLogger("loragate.quotas")

WINDOW_S = 60
MAX_USED_TOKENS = 2**40
"""A usage past this (an engine's bug) is taken as this: a correction out of INCRBY's range would fail its batch's
script half-way, and the batch is not sent again (its mark is set first)."""
GIVE_BACK_RACE_S = 0.5
"""A request refused within this long of its process giving a lease's room back is checked once more."""

DOWN_WARN_EVERY_S = 10.0
"""The most often a tenant's quotas not checked (Redis down) are logged."""


def duration(ms: int) -> str:
    """OpenAI's reset format: 1m30s, 6s, 250ms."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    seconds = math.ceil(ms / 1000)
    return f"{seconds // 60}m{seconds % 60}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class Admission:
    """A request let through: what it reserved (to settle later) and the headers to answer with."""

    headers: dict[str, str]
    reserved: int = 0
    token_keys: tuple[str, ...] = ()

    @classmethod
    def unlimited(cls) -> Admission:
        return cls({})


_HEADER_NAMES = tuple(
    (at, f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
    for at, kind in ((2, "requests"), (5, "tokens"))
)
"""Where each kind's limit, remaining and reset are in an admission reply, and their headers' names."""


def _headers(limits: list[int], tokens: bool = True) -> dict[str, str]:
    headers: dict[str, str] = {}
    for at, limit_name, remaining_name, reset_name in _HEADER_NAMES[: 2 if tokens else 1]:
        if limits[at] != -1:
            headers[limit_name] = str(limits[at])
            headers[remaining_name] = str(limits[at + 1])
            headers[reset_name] = duration(limits[at + 2])
    return headers


def _scopes(principal: Principal, tenant: Tenant) -> Scopes:
    """The scopes with limits that a request counts in: its tenant's, and its key's where the key has its own."""
    scopes = [(keys.tenant_scope(tenant.name), tenant.limits.rpm, tenant.limits.tpm)]
    if principal.key_id is not None and (principal.rpm is not None or principal.tpm is not None):
        scopes.append((keys.key_scope(principal.key_id), principal.rpm, principal.tpm))
    return tuple(scope for scope in scopes if scope[1] is not None or scope[2] is not None)


def _check_cost(scopes: Scopes, cost: int, param: str, words: Callable[[], tuple[str, str]]) -> None:
    """400 when `cost` is over a scope's whole tokens-per-minute limit: no minute would admit it. `words`: what the
    request needs and the remedy, written only then (formatting them for every request cost it a microsecond)."""
    for scope, _, tpm in scopes:
        if tpm is not None and cost > tpm:
            needs, remedy = words()
            whose = "this key's" if scope.startswith(keys.key_scope("")) else "the tenant's"
            raise InvalidRequest(
                f"{needs}, more than {whose} tokens-per-minute limit ({tpm}) allows at once: {remedy}.",
                param=param,
                code="tokens_over_limit",
            )


class QuotaGate:
    def __init__(
        self,
        redis: aioredis.Redis,
        metrics: Metrics,
        reserve_tokens: int,
        leases: LeaseBook | None = None,
        clock: RedisClock | None = None,
    ) -> None:
        self._redis = redis
        self._metrics = metrics
        self._reserve_tokens = reserve_tokens
        self._admit = ScriptLane(redis, scripts.ADMIT)
        self._retime = ScriptLane(redis, scripts.RETIME, size=1)
        self._unlease = ScriptLane(redis, scripts.UNLEASE, size=1)
        self._settle = ScriptLane(redis, scripts.SETTLE, size=1)
        self._leases = leases or LeaseBook()
        self._corrections: Counter[str] = Counter()
        self._settling: tuple[str, Counter[str]] | None = None
        """A batch of corrections sent, its reply not seen: sent again as it is (its mark makes that safe)."""
        self._batches = itertools.count()
        self._down_said: dict[str, tuple[float, int]] = {}
        """Per tenant, when a quota not checked for Redis being down was last logged, and how many since."""
        self._process = uuid.uuid4().hex
        self.clock = clock or RedisClock(redis)
        """Token counters are named by Redis's minute, whatever this host's clock says (measured by `run`)."""

    def cost(self, max_tokens: int | None, answers: int, prompt_chars: int) -> int:
        """Tokens reserved before forwarding: the request's max_tokens (else the cap, or the configured default) for
        each answer it asks for (n, times the prompts of a batch), plus its prompt at about four characters a token."""
        return (max_tokens or self._reserve_tokens) * answers + prompt_chars // CHARS_PER_TOKEN + 1

    async def admit(self, principal: Principal, tenant: Tenant, request_id: str, cost: int) -> Admission:
        scopes = _scopes(principal, tenant)
        if not scopes:
            return Admission.unlimited()
        _check_cost(
            scopes,
            cost,
            "max_tokens",
            lambda: (
                f"This request may use up to {cost} tokens",
                f"name a lower max_tokens (a chat request naming none counts {self._reserve_tokens} for each answer), "
                "ask for fewer answers (n), or for a higher limit",
            ),
        )
        for attempt in range(2):
            taken = self._leases.take(scopes, cost) or await self._leases.after_ask(scopes, cost)
            if taken is None:
                sent_at = time.monotonic()
                checked = await self._check(scopes, tenant, request_id, cost)
                if isinstance(checked, Admission):
                    return checked
                found, token_keys = checked
                if found[0]:
                    return Admission(_headers(found), reserved=cost, token_keys=token_keys)
                taken = await self._leases.after_refusal(scopes, cost)
            if taken is not None:
                return Admission(_headers(taken.found), reserved=cost, token_keys=taken.token_keys)
            # Refused while this process was giving a lease's room back: that room may be free now.
            if attempt or not self._leases.gave_back_since(scopes, sent_at - GIVE_BACK_RACE_S):
                break
        raise self._refused(tenant, found, cost)

    async def admit_request(self, principal: Principal, tenant: Tenant, request_id: str, tokens: int) -> Admission:
        """A request that generates nothing (a rating): one request of the requests-per-minute limits, no tokens
        (a tenant whose tokens are used up can still rate its answers), but where a scope limits tokens alone,
        `tokens` (what its text counts: gateway.records.FeedbackIn.tokens) of that limit: no limit leaves a tenant
        free to fill the Redis all tenants share with ratings. Taken from the lease this process holds for the
        tenant's completions where it has room (that room is the tenant's), else checked in Redis asking for no
        lease (one of its own would hold room completions cannot see). Redis down: admitted whatever
        `on_redis_down` says of answers (the rating goes to the spool)."""
        scopes = _scopes(principal, tenant)
        counted = tuple((scope, rpm, None if rpm is not None else tpm) for scope, rpm, tpm in scopes)
        by_tokens = any(tpm is not None for _, _, tpm in counted)
        cost = tokens if by_tokens else 0
        _check_cost(
            counted,
            cost,
            "correction",
            lambda: (
                f"This rating's text counts {cost} tokens (its correction, comment, labels and user, {CHARS_PER_TOKEN} "
                "characters a token)",
                "send a shorter correction or comment, or ask for a higher limit",
            ),
        )
        if not counted:
            return Admission.unlimited()
        if (taken := self._leases.take(scopes, cost) or await self._leases.after_ask(scopes, cost)) is not None:
            return Admission(_headers(taken.found, tokens=by_tokens))
        try:
            checked = await self._check(counted, tenant, request_id, cost, lease=False)
        except StateUnavailable:
            return Admission.unlimited()
        if isinstance(checked, Admission):
            return checked
        found = checked[0]
        if found[0]:
            return Admission(_headers(found))
        if (taken := await self._leases.after_refusal(scopes, cost)) is not None:  # room the answers' lease holds
            return Admission(_headers(taken.found, tokens=by_tokens))
        raise self._refused(tenant, found, cost)

    async def _check(
        self, scopes: Scopes, tenant: Tenant, request_id: str, cost: int, lease: bool = True
    ) -> tuple[list[int], tuple[str, ...]] | Admission:
        """One Lua check in Redis: its reply and this minute's token counters, or the Redis-down admission."""
        minute = int(self.clock.now() // WINDOW_S)  # Redis's minute, as the script counts
        request_keys = tuple(keys.quota_requests(scope) for scope, rpm, _ in scopes if rpm)
        token_keys = tuple(keys.quota_tokens(scope, minute) for scope, _, tpm in scopes if tpm)
        script_keys: list[str] = []
        asked = self._leases.ask(scopes) if lease else 0
        args: list[object] = [request_id, cost, asked, self._leases.share]
        for scope, rpm, tpm in scopes:
            script_keys += [keys.quota_requests(scope), keys.quota_tokens(scope, minute)]
            script_keys.append(keys.quota_tokens(scope, minute - 1))
            args += [rpm or 0, tpm or 0]
        found: list[int] | None = None
        try:
            found = [int(value) for value in await self._admit(script_keys, args)]
        except (RedisError, OSError) as exc:
            return self._redis_down(tenant, exc)
        finally:
            self._leases.answer(scopes, asked, found, request_id, cost, (request_keys, token_keys))
        return found, token_keys

    def _redis_down(self, tenant: Tenant, exc: Exception) -> Admission:
        """Counted every time; said in the log at most every DOWN_WARN_EVERY_S a tenant, with how many were not
        (a line per request flooded the log at the request rate while Redis was down)."""
        self._metrics.quota_redis_failures.labels(self._metrics.tenant(tenant.name), tenant.on_redis_down).inc()
        now = time.monotonic()
        said_at, unsaid = self._down_said.get(tenant.name, (-math.inf, 0))
        if now - said_at >= DOWN_WARN_EVERY_S:
            more = f" ({unsaid} more since the last such line)" if unsaid else ""
            log.warning("quota of %s not checked (Redis: %r); fail-%s%s", tenant.name, exc, tenant.on_redis_down, more)
            self._down_said[tenant.name] = (now, 0)
        else:
            self._down_said[tenant.name] = (said_at, unsaid + 1)
        if tenant.on_redis_down == "closed":
            raise StateUnavailable("Quotas cannot be checked right now; try again shortly.") from exc
        return Admission.unlimited()

    def _refused(self, tenant: Tenant, found: list[int], cost: int) -> RateLimited:
        """The 429 of a check Redis refused, counted by the kind of limit that refused it."""
        kind = "requests" if found[1] == 1 else "tokens"
        self._metrics.quota_refusals.labels(self._metrics.tenant(tenant.name), kind).inc()
        return self._refusal(found, _headers(found), cost)

    @staticmethod
    def _refusal(found: list[int], headers: dict[str, str], cost: int) -> RateLimited:
        by_requests = found[1] == 1
        limit, reset = (found[2], found[4]) if by_requests else (found[5], found[7])
        if found[9] == 3:  # over both limits: the request fits once both have room, the later of their resets
            reset = max(found[4], found[7])
        what = "requests per minute" if by_requests else f"tokens per minute (this request needs {cost})"
        error = RateLimited(
            f"Rate limit reached for {what}: limit {limit}. Please try again in {duration(reset)}.",
            kind="requests" if by_requests else "tokens",
        )
        error.headers = {**headers, "retry-after": str(max(math.ceil(reset / 1000), 1))}
        return error

    def settle(self, admission: Admission, used_tokens: int | None) -> None:
        """Replace a request's token reservation by what it really used (when the engine said). Corrections
        are batched: `flush` sends them, off the request path."""
        if admission.token_keys and used_tokens is not None and used_tokens != admission.reserved:
            used_tokens = min(max(int(used_tokens), 0), MAX_USED_TOKENS)  # INCRBY's range: one bad usage, one batch
            for key in admission.token_keys:
                self._corrections[key] += used_tokens - admission.reserved

    async def flush(self) -> None:
        """Send the token corrections, and what leases give back (see gateway/quota_leases.py); what fails to go
        is kept for the next flush. A batch of corrections whose reply was lost is sent again as it was, and is
        applied once."""
        returns = self._leases.due()
        self._corrections.update(returns.tokens)  # the tokens leases give back go with the corrections
        returns.tokens = {}
        if self._settling is None and self._corrections:
            self._settling = (f"{self._process}:{next(self._batches)}", self._corrections)
            self._corrections = Counter()
        logs = returns.retime.keys() | returns.remove.keys()
        calls: list[Call] = [
            ([key], [len(returns.retime.get(key, [])), *returns.retime.get(key, []), *returns.remove.get(key, [])])
            for key in logs
        ]
        lost: list[Call] = [
            ([*ask.request_keys, *ask.token_keys], [len(ask.request_keys), ask.request_id, ask.asked, ask.cost])
            for ask in returns.lost
        ]
        try:
            if calls:
                await self._retime.many(calls)
            if lost:
                await self._unlease.many(lost)
            if self._settling is not None:
                batch, counters = self._settling
                await self._settle([keys.quota_settled(batch), *counters], list(counters.values()))
                self._settling = None
        except (RedisError, OSError):
            self._leases.unsent(returns)  # re-timing, removing and ZREM of lost asks are safe to send twice

    async def run(self, interval_s: float = 0.1) -> None:
        """Send the corrections every `interval_s`; measure the state Redis's clock when due."""
        try:
            while True:
                await self.clock.upkeep()
                await asyncio.sleep(interval_s)
                try:
                    await self.flush()
                except Exception:  # a bug here must not stop every later correction
                    log.exception("quota flush failed")
        finally:
            await self._admit.close()
            await self._retime.close()
            await self._unlease.close()
            await self._settle.close()
