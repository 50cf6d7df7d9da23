"""One retraining run at a time per alias.

Two runs on one alias (a scheduled job and a person's, say) would train on the same feedback, both publish a
candidate, and the second's canary would find the first's experiment on the alias and not start, leaving its
version listed for nothing. So each `loragate train` command that works on a run holds the alias's lease in the
state Redis while it works: a second run's command is refused, naming the run that holds it. The lease expires
LEASE_S after its holder's last renewal (every LEASE_S / 3 while it works), so a run whose process died frees the
alias within a minute; only the holder (its run id is the lease's value) renews or releases it, and a holder whose
lease expired under it (Redis out of reach for longer) is stopped (LeaseLost).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from gateway import keys
from training.publish import RetrainRefused

LEASE_S = 60.0
LOST = "the run's lease of its alias was lost (Redis out of reach past its lifetime, or another run took it)"


class LeaseLost(RetrainRefused):
    """The run's lease expired under it (it could not be renewed in time): its work was stopped."""


@contextlib.asynccontextmanager
async def alias_lease(redis: aioredis.Redis, tenant: str, alias: str, run_id: str) -> AsyncIterator[None]:
    """Hold `tenant`'s `alias` for run `run_id` while the block runs; RetrainRefused if another run holds it."""
    name = keys.retrain_lease(tenant, alias)
    lease = redis.lock(name, timeout=LEASE_S, blocking=False, thread_local=False)
    if not await lease.acquire(token=run_id):
        holder = await redis.get(name)
        if holder == run_id:  # this run's own, left by a step of it that was killed: taken over
            lease.local.token = run_id.encode()
            await lease.reacquire()
        elif holder is not None or not await lease.acquire(token=run_id):
            raise RetrainRefused(
                f"Alias `{alias}` is being retrained by run {holder or 'that just ended'}: one run at a time per "
                f"alias. Try again when it ends (a run whose process died frees it within {LEASE_S:g} s)."
            )
    owner, lost = asyncio.current_task(), asyncio.Event()
    renewing = asyncio.create_task(_renew(lease, owner, lost))
    try:
        yield
    except asyncio.CancelledError:
        if lost.is_set() and owner is not None and owner.uncancel() == 0:  # cancelled by _renew, nothing else
            raise LeaseLost(
                f"Run {run_id} lost its lease of alias `{alias}` (Redis was out of reach past {LEASE_S:g} s, or "
                "another run took the alias meanwhile): stopped, so that two runs never work on one alias."
            ) from None
        raise
    finally:
        renewing.cancel()
        with contextlib.suppress(LockError, RedisError, OSError):  # expired or Redis away: it frees itself
            await asyncio.shield(lease.release())


async def _renew(lease: aioredis.lock.Lock, owner: asyncio.Task[object] | None, lost: asyncio.Event) -> None:
    """Renew the lease every LEASE_S / 3, each renewal given LEASE_S / 6 at most, and one that failed tried again
    within a second or so (a renewal that hung 30 s, then waited another 20, let the lease expire after an outage of
    half its lifetime); once it is no longer the run's (it expired while Redis was out of reach, and maybe another
    run took it: renewing swallowed that before, and the run went on beside the other), stop the run's work
    (`owner`)."""
    delay = LEASE_S / 3
    while True:
        await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(lease.reacquire(), LEASE_S / 6)
        except LockNotOwnedError:
            lost.set()
            if owner is not None:
                owner.cancel(LOST)  # the message the step's CancelledError carries (what run.json says)
            return
        except (RedisError, OSError, TimeoutError):  # Redis away a moment: tried again soon
            delay = min(1.0, LEASE_S / 30)
            continue
        delay = LEASE_S / 3
