"""Quota leases: room a gateway process takes from a quota window ahead of use, so that most requests of a
busy tenant are admitted without a round trip to Redis while any number of processes still admit no more
than the limit between them.

The quota script grants a lease along with an admission when the window has room to spare: up to
`max_requests` more requests like the one admitted (their members added to the requests log, their
tokens to this minute's counter, both at once), never more than a `share` (an eighth) of the room left in
any scope. Where that does not cover one more such request, nothing is leased, so near a limit every
request is checked in Redis one at a time, exactly as without leases.

- What a lease holds counts as used from the moment it is granted: other processes see less room, never
  more, so N processes never admit more than the limit.
- A request admitted from a lease has its member re-timed to Redis's clock at the next flush (every
  0.1 s), so its minute in the sliding log starts when it was really admitted.
- What is left of a lease after `lifetime_s` (1 s) goes back (ZREM, DECRBY) at the next flush. A process
  that dies holding a lease leaves it counted until the window moves past it: fewer admitted, never more.
- A process asks for one lease per scope at a time. A request Redis refuses while that ask is in flight
  waits for its answer and uses the lease if one came (replies on different connections can come back
  in either order), so the last few requests under a limit are not refused while room sits in a lease.
- The headers of a request admitted from a lease report what Redis said when it was granted, less what
  this process has taken from it since; other processes' use shows from the next grant.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

Scopes = tuple[tuple[str, int | None, int | None], ...]
"""The scopes a request is counted in (tenant, and key where it has limits of its own), with their rpm and tpm."""

Keys = tuple[tuple[str, ...], tuple[str, ...]]
"""The requests logs and the token counters (this minute's) of a request's scopes that have such limits."""


@dataclass
class Lease:
    """Room for `left` more requests of up to `cost` tokens each, taken from every scope of one key."""

    found: list[int]
    """The admission reply that granted it: limits, remaining and resets as Redis saw them."""
    members: list[str]
    left: int
    cost: int
    request_keys: tuple[str, ...]
    token_keys: tuple[str, ...]
    until: float
    granted_at: float
    taken: int = 0
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.left * self.cost if self.token_keys else 0

    def covers(self, cost: int, now: float) -> bool:
        return now < self.until and self.left > 0 and (not self.token_keys or cost <= self.tokens)

    def headers_found(self, tokens_taken: int, now: float) -> list[int]:
        """The reply's header fields as they stand now: remaining less what was taken, resets less the time gone."""
        found = list(self.found)
        elapsed_ms = int((now - self.granted_at) * 1000)
        if found[2] != -1:
            found[3], found[4] = max(found[3] - self.taken, 0), max(found[4] - elapsed_ms, 0)
        if found[5] != -1:
            found[6], found[7] = max(found[6] - tokens_taken, 0), max(found[7] - elapsed_ms, 0)
        return found


@dataclass
class Taken:
    """A request admitted from a lease: the header fields to answer with and where its tokens are counted."""

    found: list[int]
    token_keys: tuple[str, ...]


@dataclass
class Returns:
    """What a flush sends back: members to re-time or remove per requests log, tokens to give back per counter."""

    retime: dict[str, list[str]]
    remove: dict[str, list[str]]
    tokens: dict[str, int]


class LeaseBook:
    """One process's leases, by the scopes they were taken from."""

    def __init__(self, lifetime_s: float = 1.0, max_requests: int = 16, share: int = 8) -> None:
        self.lifetime_s = lifetime_s
        self.max_requests = max_requests
        self.share = share
        self._leases: dict[Scopes, Lease] = {}
        self._asking: dict[Scopes, asyncio.Future[None]] = {}
        self._retime: defaultdict[str, list[str]] = defaultdict(list)
        self._spent: list[Lease] = []

    def take(self, scopes: Scopes, cost: int) -> Taken | None:
        """Admit a request from the scopes' lease, if it has room for it."""
        lease, now = self._leases.get(scopes), time.monotonic()
        if lease is None or not lease.covers(cost, now):
            return None
        lease.left -= 1
        lease.taken += 1
        if lease.token_keys:
            lease.tokens -= cost
        if lease.request_keys:
            member = lease.members.pop()
            for key in lease.request_keys:
                self._retime[key].append(member)
        return Taken(lease.headers_found(lease.taken * cost if lease.token_keys else 0, now), lease.token_keys)

    def ask(self, scopes: Scopes) -> int:
        """How many requests' room to ask for along with this admission: none while an ask is in flight."""
        if scopes in self._asking or not self.max_requests:
            return 0
        self._asking[scopes] = asyncio.get_running_loop().create_future()
        return self.max_requests

    def answer(
        self, scopes: Scopes, asked: int, found: list[int] | None, request_id: str, cost: int, keys: Keys
    ) -> None:
        """Record what Redis granted for an ask (`found` None: the call failed) and wake who waits on it.
        `keys`: the scopes' requests logs and token counters the grant was added to."""
        if not asked:
            return
        waiting = self._asking.pop(scopes, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        granted = found[8] if found is not None and len(found) > 8 else 0
        if found is None or not granted:
            return
        request_keys, token_keys = keys
        now = time.monotonic()
        old = self._leases.get(scopes)
        if old is not None:
            self._spent.append(old)
        members = [f"{request_id}:{i}" for i in range(granted, 0, -1)] if request_keys else []
        self._leases[scopes] = Lease(
            found, members, granted, cost, request_keys, token_keys, until=now + self.lifetime_s, granted_at=now
        )

    async def after_refusal(self, scopes: Scopes, cost: int) -> Taken | None:
        """A request Redis refused: wait for an ask in flight, then admit it from the lease if there is room."""
        waiting = self._asking.get(scopes)
        if waiting is not None:
            await asyncio.shield(waiting)
        return self.take(scopes, cost)

    def due(self) -> Returns:
        """Take out what a flush must send: members taken since the last one, and the rest of expired leases."""
        now = time.monotonic()
        for scopes, lease in list(self._leases.items()):
            if now >= lease.until:
                self._spent.append(self._leases.pop(scopes))
        spent, self._spent = self._spent, []
        retime, self._retime = dict(self._retime), defaultdict(list)
        remove: defaultdict[str, list[str]] = defaultdict(list)
        tokens: Counter[str] = Counter()
        for lease in spent:
            for key in lease.request_keys:
                remove[key] += lease.members
            for key in lease.token_keys:
                tokens[key] -= lease.tokens
        return Returns(
            retime,
            {key: members for key, members in remove.items() if members},
            {key: n for key, n in tokens.items() if n},
        )
