"""Sticky, deterministic assignment of end users to the arms of an experiment.

A user's bucket is a hash of (tenant, experiment, user) into BUCKETS buckets; an allocation maps each
bucket to an arm. The allocation is kept with the experiment, so that changing the weights
(90/10 -> 80/20) moves only as many buckets as the change needs: arms that shrink give up buckets,
arms that grow take exactly those, and every other user stays where they were. Requests without an
end user are assigned at random by the weights (and counted apart by the caller).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence

BUCKETS = 10_000


def bucket_of(tenant: str, experiment: str, user: str) -> int:
    digest = hashlib.sha256(f"{tenant}\x00{experiment}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def shares(weights: Sequence[float]) -> list[int]:
    """Buckets per arm, proportional to the weights, summing to BUCKETS (largest remainders first), at least one
    for an arm with a weight. The weights are scaled by the largest first, so that huge ones (whose sum would
    overflow) split as well."""
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or max(weights) <= 0:
        raise ValueError("weights must be finite and non-negative, and not all zero")
    top = max(weights)
    scaled = [w / top for w in weights]
    total = sum(scaled)  # at most len(weights): finite
    exact = [w / total * BUCKETS for w in scaled]
    counts = [min(int(x), BUCKETS) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    while sum(counts) < BUCKETS:  # one round in practice; a loop, so that no rounding can leave a bucket out
        for i in order[: BUCKETS - sum(counts)]:
            counts[i] += 1
    for i, weight in enumerate(weights):  # an arm with a weight gets users, however small (else no verdict comes)
        if weight > 0 and not counts[i]:
            counts[i] = 1
    while sum(counts) > BUCKETS:
        counts[counts.index(max(counts))] -= 1
    return counts


MAX_ARMS = 255
"""Arms an experiment has at most: a bucket names its arm in one byte."""


def allocate(weights: Sequence[float]) -> bytes:
    """A first allocation: arm 0 takes the first buckets, arm 1 the next, and so on (one byte per bucket)."""
    if len(weights) > MAX_ARMS:
        raise ValueError(f"at most {MAX_ARMS} arms")
    return b"".join(bytes([arm]) * count for arm, count in enumerate(shares(weights)))


def reallocate(current: bytes, weights: Sequence[float]) -> bytes:
    """The allocation for new weights that moves the fewest buckets from `current`: each arm over its new
    share gives up its highest buckets, and the arms under theirs take them, lowest arm first."""
    if len(current) != BUCKETS:
        raise ValueError(f"an allocation has {BUCKETS} buckets")
    target = shares(weights)
    held: list[list[int]] = [[] for _ in weights]
    for bucket, arm in enumerate(current):
        if arm < len(held):
            held[arm].append(bucket)
    freed = [bucket for bucket, arm in enumerate(current) if arm >= len(held)]  # arms that were removed
    for arm, buckets in enumerate(held):
        while len(buckets) > target[arm]:
            freed.append(buckets.pop())
    free = iter(sorted(freed))
    allocation = bytearray(current)
    for arm, buckets in enumerate(held):
        for _ in range(target[arm] - len(buckets)):
            allocation[next(free)] = arm
    return bytes(allocation)


def arm_for(allocation: bytes, tenant: str, experiment: str, user: str | None) -> int:
    """The arm of a request: the user's bucket's, or (no user) a random one by the allocation's weights."""
    if user is None:
        return allocation[random.randrange(BUCKETS)]  # noqa: S311 (not security: a traffic split)
    return allocation[bucket_of(tenant, experiment, user)]
