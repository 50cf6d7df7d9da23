"""Who answered the completions this process handled lately: the tenant of each completion id, kept for KEPT_S,
for feedback that arrives before (or while Redis is down, instead of) its record's index says so.

The record process sends each batch's owners back packed (`PackedOwners`); `RecentCompletions` keeps them as they
came and unpacks a batch only when a lookup walks past it.
"""

from __future__ import annotations

import marshal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from gateway.record_store import TRIMMED_KEEP_S

Owner = tuple[str, float | None]
"""Who answered a completion: the tenant's name and when that tenant was created (None: not known)."""


@dataclass(frozen=True)
class PackedOwners:
    """Completion id -> owner of the records a batch wrote, as the record process sends them back: marshalled,
    and unpacked by the gateway only when feedback asks (`RecentCompletions`). Unpickled as a
    dict, they cost the gateway's event loop 0.46 µs a record (measured at 5,000 records/s, batches of 140), and
    kept as one, its collector scanned them for the 50 minutes they are kept; as bytes, neither."""

    data: bytes = b""
    count: int = 0

    @classmethod
    def pack(cls, owners: dict[str, Owner]) -> PackedOwners:
        return cls(marshal.dumps(owners), len(owners)) if owners else cls()

    def unpack(self) -> dict[str, Owner]:
        found: dict[str, Owner] = marshal.loads(self.data) if self.data else {}
        return found

    def __len__(self) -> int:
        return self.count


def owners(entries: Iterable[dict[str, Any]]) -> dict[str, Owner]:
    """Completion id -> owner of built entries."""
    shared: dict[Owner, Owner] = {}
    written = {}
    for entry in entries:
        owner = (entry["tenant"], entry.get("tenant_created"))
        written[entry["id"]] = shared.setdefault(owner, owner)
    return written


RECENT = 65536
"""Completion ids remembered per process (owner tenant), for feedback that arrives while Redis is down."""
KEPT_S = TRIMMED_KEEP_S - 600
"""How long a completion is vouched for by the process that answered it: less than a trimmed record's index keeps
saying TRIMMED (record_store.TRIMMED_KEEP_S). Remembered past that, a completion trimmed from its log took ratings
again, 200, where every other process said 404, and its owner's erasure left them."""
MERGE_S = 60.0
"""A batch remembered takes the small ones after it for this long at most (each forgotten KEPT_S after the first)."""
MERGED = 256
"""Remembered batches smaller than this are merged (a lookup walks the batches); full ones (500) are kept as sent."""
PACKED = 32
"""Batches the record process wrote of at least this many records are kept packed as it sent them (`PackedOwners`),
and unpacked by the first lookup that walks past them; smaller ones are unpacked at once and merged. A lookup walks
at most RECENT / PACKED batches (2,048)."""


class RecentCompletions:
    """Who answered the last RECENT (at least) completions this process handled in the last KEPT_S, for feedback
    that arrives while Redis is down. Kept a batch at a time, as the record process sends them (packed, or a dict:
    small ones merged, at C speed, into one begun within MERGE_S): no Python work per record; a lookup walks the
    batches, newest first, unpacking those it passes (each once)."""

    def __init__(self, limit: int = RECENT, kept_s: float = KEPT_S) -> None:
        self._batches: deque[list[Any]] = deque()
        """[when added, a dict or PackedOwners] each."""
        self._count = 0
        self._limit, self._kept_s = limit, kept_s

    def add(self, batch: dict[str, Owner] | PackedOwners) -> None:
        if not batch:
            return
        if isinstance(batch, PackedOwners) and len(batch) < PACKED:
            batch = batch.unpack()
        now = time.monotonic()
        last = self._batches[-1] if self._batches else None
        mergeable = last is not None and isinstance(last[1], dict) and len(last[1]) < MERGED and now - last[0] < MERGE_S
        if isinstance(batch, dict) and last is not None and mergeable:
            self._count -= len(last[1])
            last[1].update(batch)
        else:
            self._batches.append([now, batch])
        self._count += len(self._batches[-1][1])
        while self._count - len(self._batches[0][1]) >= self._limit or now - self._batches[0][0] > self._kept_s:
            self._count -= len(self._batches.popleft()[1])
            if not self._batches:
                break

    def get(self, completion_id: str, within_s: float | None = None) -> Owner | None:
        """Who answered the completion, if this process did within KEPT_S (and `within_s`)."""
        oldest = time.monotonic() - (self._kept_s if within_s is None else min(self._kept_s, within_s))
        for batch in reversed(self._batches):
            if batch[0] < oldest:
                return None
            if (owner := self._unpacked(batch).get(completion_id)) is not None:
                return owner
        return None

    @staticmethod
    def _unpacked(batch: list[Any]) -> dict[str, Owner]:
        if isinstance(batch[1], PackedOwners):
            batch[1] = batch[1].unpack()
        found: dict[str, Owner] = batch[1]
        return found

    def __setitem__(self, completion_id: str, owner: Owner) -> None:
        self.add({completion_id: owner})

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        """The ids remembered, oldest first (one remembered twice, twice)."""
        for batch in self._batches:
            yield from self._unpacked(batch)

    def clear(self) -> None:
        self._batches.clear()
        self._count = 0
