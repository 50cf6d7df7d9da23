"""Quota leases: room a gateway process takes from a quota window ahead of use, so that most requests of a
busy tenant are admitted without a round trip to Redis while any number of processes still admit no more
than the limit between them.

The quota script grants a lease along with an admission when the window has room to spare: the room for
as many more requests like the one admitted as the process asks for (their members added to the requests
log, their tokens to this minute's counter, both at once), never more than a `share` (an eighth) of the
room left in any scope. Where that does not cover one more such request, nothing is leased, so near a limit
every request is checked in Redis one at a time, exactly as without leases.

A lease's size follows the scope's traffic in this process: the first asks for `first_requests` (16); one
used up before its lifetime ends makes the next ask twice as large, up to `max_requests` (256); one that
runs out of time with more than half its room unused makes the next half as large, down to the first size
(each lease counts once, whether a flush or the next ask finds it run out); and after QUIET_S (5 s) without
an ask the next starts from the first size again. A request too large for a lease that still has room says
nothing of the traffic and changes nothing.
A tenant sending 3,000 requests a second to one process then makes about ten round trips a second for its
quota rather than two hundred (`loadtest.compare`'s everything-on gateway, 64 concurrent requests, one
worker: 1,970-2,340 requests/s at 0.48-0.56 ms of CPU each with fixed leases of 16, 2,430-2,750 at
0.40-0.45 ms with these), and a quiet one holds little room away from the other processes.

- What a lease holds counts as used from the moment it is granted: other processes see less room, never
  more, so N processes never admit more than the limit.
- A request admitted from a lease has its member re-timed to Redis's clock at the next flush (every
  0.1 s), so its minute in the sliding log starts when it was really admitted.
- What is left of a lease after `lifetime_s` (1 s) goes back (ZREM, DECRBY) at the next flush. A process
  that dies holding a lease leaves it counted until the window moves past it: fewer admitted, never more.
- A process asks for one lease per scope at a time. A request Redis refuses while that ask is in flight
  waits for its answer and uses the lease if one came (replies on different connections can come back
  in either order), or a lease past its lifetime whose room is still counted, so the last few requests
  under a limit are not refused while room sits in a lease. A request refused just as its process gave a
  lease's room back is checked once more.
- A request that finds its lease used up while the ask for the next one is in flight waits for that answer
  and takes from the new lease, rather than asking Redis itself: under load a process makes about one
  round trip per lease, not one per request until the next lease comes. Only where the answer grants
  nothing (near a limit) does each request then go to Redis one at a time.
- Only a request counted in one scope (its tenant's) takes a lease: a key with limits of its own would
  hold its tenant's room away from the tenant's other keys.
- An ask whose answer never came (timeout, dropped connection) has whatever it was granted removed at the
  next flush; what a failed flush could not send goes with the next one. Its scopes ask for no lease until a
  check of theirs is answered again, so an outage leaves one such ask to undo, not one per request.
- The headers of a request admitted from a lease report what Redis said when it was granted, less what
  this process has taken from it since; other processes' use shows from the next grant.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

QUIET_S = 5.0
"""Scopes that asked for no lease this long start again from the first size."""
FAILING_KEEP_S = 60.0
"""After a lost ask, no lease is asked for the scopes until a check is answered, or for this long at most."""

Scopes = tuple[tuple[str, int | None, int | None], ...]
"""The scopes a request is counted in (tenant, and key where it has limits of its own), with their rpm and tpm."""

Keys = tuple[tuple[str, ...], tuple[str, ...]]
"""The requests logs and the token counters (this minute's) of a request's scopes that have such limits."""


@dataclass
class Lease:
    """Room for `granted` more requests of `cost` tokens each (their tokens pooled), taken from every scope of
    one key."""

    found: list[int]
    """The admission reply that granted it: limits, remaining and resets as Redis saw them."""
    members: list[str]
    """The members not taken yet (in the requests logs; none where no scope limits requests)."""
    granted: int
    cost: int
    request_keys: tuple[str, ...]
    token_keys: tuple[str, ...]
    until: float
    granted_at: float
    taken: int = 0
    tokens_taken: int = 0
    sized: bool = False
    """Whether this lease has already set the size of its scopes' next one (each lease does so once at most)."""

    @property
    def left(self) -> int:
        return self.granted - self.taken

    @property
    def used_up(self) -> bool:
        """No room left for one more request like the one it was granted for."""
        return self.left == 0 or (bool(self.token_keys) and self.tokens < self.cost)

    @property
    def tokens(self) -> int:
        """Tokens not taken yet (0 where no scope limits tokens)."""
        return self.granted * self.cost - self.tokens_taken if self.token_keys else 0

    def covers(self, cost: int, now: float | None) -> bool:
        """Room for one more request of `cost` tokens (`now` None: even if the lease has run out, as long as
        its room has not been given back yet)."""
        return (now is None or now < self.until) and self.left > 0 and (not self.token_keys or cost <= self.tokens)

    def headers_found(self, now: float) -> list[int]:
        """The reply's header fields as they stand now: remaining less what was taken, resets less the time gone."""
        found = list(self.found)
        elapsed_ms = int((now - self.granted_at) * 1000)
        if found[2] != -1:
            found[3], found[4] = max(found[3] - self.taken, 0), max(found[4] - elapsed_ms, 0)
        if found[5] != -1:
            found[6], found[7] = max(found[6] - self.tokens_taken, 0), max(found[7] - elapsed_ms, 0)
        return found


@dataclass
class Taken:
    """A request admitted from a lease: the header fields to answer with and where its tokens are counted."""

    found: list[int]
    token_keys: tuple[str, ...]


@dataclass
class LostAsk:
    """An ask whose answer never came (timeout, dropped connection): Redis may have granted up to `asked`
    requests' room, members REQUEST_ID:1..asked, which a flush removes along with their tokens."""

    request_keys: tuple[str, ...]
    token_keys: tuple[str, ...]
    request_id: str
    asked: int
    cost: int


@dataclass
class Returns:
    """What a flush sends back: members to re-time or remove per requests log, tokens to give back per counter,
    and asks whose answer was lost."""

    retime: dict[str, list[str]] = field(default_factory=dict)
    remove: dict[str, list[str]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    lost: list[LostAsk] = field(default_factory=list)

    def merge(self, later: Returns) -> Returns:
        """This (older, unsent) and `later` in one, older first."""
        merged = Returns({k: list(v) for k, v in self.retime.items()}, {k: list(v) for k, v in self.remove.items()})
        for into, more in ((merged.retime, later.retime), (merged.remove, later.remove)):
            for key, members in more.items():
                into.setdefault(key, []).extend(members)
        merged.tokens = {k: self.tokens.get(k, 0) + later.tokens.get(k, 0) for k in self.tokens.keys() | later.tokens}
        merged.lost = self.lost + later.lost
        return merged


class LeaseBook:
    """One process's leases, by the scopes they were taken from."""

    def __init__(
        self, lifetime_s: float = 1.0, max_requests: int = 256, share: int = 8, first_requests: int = 16
    ) -> None:
        self.lifetime_s = lifetime_s
        self.max_requests = max_requests
        self.first_requests = min(first_requests, max_requests)
        self.share = share
        self._leases: dict[Scopes, Lease] = {}
        self._sizes: dict[Scopes, tuple[int, float]] = {}
        """The next ask's size per scopes, where it is not `first_requests`, and when the last ask was made."""
        self._asking: dict[Scopes, asyncio.Future[None]] = {}
        self._failing: dict[Scopes, float] = {}
        """Scopes whose last ask's answer was lost, and when: no lease is asked for until a check is answered (during
        an outage, one lost ask to give back, not one per request), or FAILING_KEEP_S has passed (scopes never seen
        again, e.g. a revoked key's, leave the map)."""
        self._retime: defaultdict[str, list[str]] = defaultdict(list)
        self._spent: list[Lease] = []
        self._lost: list[LostAsk] = []
        self._unsent = Returns()
        self._gave_back: dict[Scopes, float] = {}

    def take(self, scopes: Scopes, cost: int, *, ran_out_ok: bool = False) -> Taken | None:
        """Admit a request from the scopes' lease, if it has room for it (`ran_out_ok`: also from a lease past its
        lifetime whose room the next flush has not given back yet)."""
        lease, now = self._leases.get(scopes), time.monotonic()
        if lease is None or not lease.covers(cost, None if ran_out_ok else now):
            return None
        lease.taken += 1
        if lease.token_keys:
            lease.tokens_taken += cost
        if lease.request_keys:
            member = lease.members.pop()
            for key in lease.request_keys:
                self._retime[key].append(member)
        return Taken(lease.headers_found(now), lease.token_keys)

    def ask(self, scopes: Scopes) -> int:
        """How many requests' room to ask for along with this admission: none while an ask is in flight, and none
        for a key with limits of its own (its lease would hold the tenant's room away from the tenant's other keys)."""
        if scopes in self._asking or scopes in self._failing or not self.max_requests or len(scopes) > 1:
            return 0
        self._asking[scopes] = asyncio.get_running_loop().create_future()
        now = time.monotonic()
        lease = self._leases.get(scopes)
        if lease is not None:
            self._resize(scopes, lease, now)
        size = self._size(scopes, now)
        self._set_size(scopes, size, now)  # asked now: not quiet
        return size

    def _size(self, scopes: Scopes, now: float) -> int:
        size, at = self._sizes.get(scopes, (self.first_requests, now))
        return size if now - at < QUIET_S else self.first_requests

    def _set_size(self, scopes: Scopes, size: int, now: float) -> None:
        if size > self.first_requests:
            self._sizes[scopes] = (size, now)
        else:
            self._sizes.pop(scopes, None)

    def _resize(self, scopes: Scopes, lease: Lease, now: float) -> None:
        """Once per lease: used up within its lifetime, its scopes' next lease is twice as large; run out of time
        with more than half of it unused, half as large. (A request too large for a lease with room left says
        nothing of the traffic.)"""
        if lease.sized or (now < lease.until and not lease.used_up):
            return
        lease.sized = True
        if now < lease.until:
            self._set_size(scopes, min(self._size(scopes, now) * 2, self.max_requests), now)
        elif lease.left * 2 > lease.granted:
            self._set_size(scopes, self._size(scopes, now) // 2, now)

    def answer(
        self, scopes: Scopes, asked: int, found: list[int] | None, request_id: str, cost: int, keys: Keys
    ) -> None:
        """Record what Redis granted for an ask (`found` None: the call failed) and wake who waits on it.
        `keys`: the scopes' requests logs and token counters the grant was added to."""
        if found is not None:
            self._failing.pop(scopes, None)
        if not asked:
            return
        waiting = self._asking.pop(scopes, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        request_keys, token_keys = keys
        if found is None:
            self._lost.append(LostAsk(request_keys, token_keys, request_id, asked, cost))
            self._failing[scopes] = time.monotonic()
            return
        granted = found[8] if len(found) > 8 else 0
        if not granted:
            return
        now = time.monotonic()
        old = self._leases.get(scopes)
        if old is not None:
            self._spent.append(old)
            self._gave_back[scopes] = now
        members = [f"{request_id}:{i}" for i in range(granted, 0, -1)] if request_keys else []
        self._leases[scopes] = Lease(
            found, members, granted, cost, request_keys, token_keys, until=now + self.lifetime_s, granted_at=now
        )

    async def _answered(self, scopes: Scopes) -> bool:
        """Wait for the scopes' ask in flight, if there is one; whether there was."""
        waiting = self._asking.get(scopes)
        if waiting is None:
            return False
        await asyncio.shield(waiting)
        return True

    async def after_ask(self, scopes: Scopes, cost: int) -> Taken | None:
        """A request its scopes' lease has no room for, while an ask is in flight: wait for that answer and admit
        the request from the new lease if there is room (None at once when nothing is being asked)."""
        return self.take(scopes, cost) if await self._answered(scopes) else None

    async def after_refusal(self, scopes: Scopes, cost: int) -> Taken | None:
        """A request Redis refused: wait for an ask in flight, then admit it from the lease if there is room."""
        await self._answered(scopes)
        return self.take(scopes, cost, ran_out_ok=True)

    def due(self) -> Returns:
        """Take out what a flush must send: members taken since the last one, and the rest of expired leases."""
        now = time.monotonic()
        for scopes, lease in list(self._leases.items()):
            if now >= lease.until:
                self._spent.append(self._leases.pop(scopes))
                self._gave_back[scopes] = now
                self._resize(scopes, lease, now)
        self._gave_back = {scopes: at for scopes, at in self._gave_back.items() if now - at < 5.0}
        self._sizes = {scopes: sized for scopes, sized in self._sizes.items() if now - sized[1] < QUIET_S}
        self._failing = {scopes: at for scopes, at in self._failing.items() if now - at < FAILING_KEEP_S}
        spent, self._spent = self._spent, []
        lost, self._lost = self._lost, []
        retime, self._retime = dict(self._retime), defaultdict(list)
        remove: defaultdict[str, list[str]] = defaultdict(list)
        tokens: Counter[str] = Counter()
        for lease in spent:
            for key in lease.request_keys:
                remove[key] += lease.members
            for key in lease.token_keys:
                tokens[key] -= lease.tokens
        fresh = Returns(
            retime,
            {key: members for key, members in remove.items() if members},
            {key: n for key, n in tokens.items() if n},
            lost,
        )
        unsent, self._unsent = self._unsent, Returns()
        return unsent.merge(fresh)

    def gave_back_since(self, scopes: Scopes, since: float) -> bool:
        """Whether a lease of `scopes` was given back (or its rest queued to go back) at `since` or later."""
        return self._gave_back.get(scopes, -1.0) >= since

    def unsent(self, returns: Returns) -> None:
        """A flush that failed: send `returns` with the next one (re-timing to a later time is always safe)."""
        self._unsent = returns.merge(self._unsent)
