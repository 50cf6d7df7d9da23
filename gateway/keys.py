"""Every Redis key loragate uses, built by one function each, so the key space is read in one place.

Tenant names never contain `:` (tenants.check_tenant_name), so no key of one tenant can be spelled
as a key of another.
"""

from __future__ import annotations

import hashlib

PREFIX = "loragate"


def state_version() -> str:
    """Counter bumped by every change to tenants, keys, pins, aliases and shares; gateways watch it."""
    return f"{PREFIX}:state:version"


def tenants() -> str:
    """Set of tenant names."""
    return f"{PREFIX}:tenants"


def tenant(name: str) -> str:
    """JSON of one tenant's settings (limits, behaviour when Redis is down)."""
    return f"{PREFIX}:tenant:{name}"


def tenant_prefix() -> str:
    """What every `tenant` key is, but the name (a Lua script that finds a tenant by name appends it)."""
    return tenant("")


def tenant_keys(name: str) -> str:
    """Set of the ids of a tenant's API keys."""
    return f"{PREFIX}:tenant:{name}:keys"


def api_key(key_id: str) -> str:
    """Hash of one API key: tenant, role, name, sha256 of the key (never the key), created, expiry, last use, when
    its tenant was created (`tenant_created`: it works for that tenant only) and, once in a rotation's grace, the
    expiry it had before (`expires_before_grace`: what its successor gets)."""
    return f"{PREFIX}:key:{key_id}"


def pins(name: str) -> str:
    """Hash adapter name -> pinned version, for one tenant."""
    return f"{PREFIX}:tenant:{name}:pins"


def aliases(name: str) -> str:
    """Hash alias -> target model (`name@V`, `owner/name@V` or the base model), for one tenant."""
    return f"{PREFIX}:tenant:{name}:aliases"


def experiments(name: str) -> str:
    """Hash experiment name -> JSON (arms, weights, allocation, status), for one tenant."""
    return f"{PREFIX}:tenant:{name}:experiments"


def experiment_audit(name: str, experiment: str) -> str:
    """List of the changes made to one experiment of a tenant: who, when, what (JSON each)."""
    return f"{PREFIX}:tenant:{name}:experiment:{experiment}:audit"


def arm_counters(name: str, experiment: str, arm: str) -> str:
    """Hash of one experiment arm's counters: requests, anonymous, errors, tokens, latency buckets, and
    the feedback signal (rated, positive, score sums, corrected), updated as records and ratings land."""
    return f"{PREFIX}:tenant:{name}:experiment:{experiment}:arm:{arm}"


def arm_users(name: str, experiment: str, arm: str) -> str:
    """HyperLogLog of the end users one experiment arm has served."""
    return f"{PREFIX}:tenant:{name}:experiment:{experiment}:arm:{arm}:users"


def experiment_history(name: str, experiment: str) -> str:
    """List of one experiment's results over time (JSON points, oldest first), for its page."""
    return f"{PREFIX}:tenant:{name}:experiment:{experiment}:history"


def guard_rails_lock() -> str:
    """Held for one round by the gateway process that checks every experiment's guard rails."""
    return f"{PREFIX}:experiments:guard-rails"


def adapter_lock(owner: str, adapter: str) -> str:
    """Held by whoever deletes a version of the adapter, or points an alias or an experiment at one
    (gateway.version_guard), from its check to its write."""
    return f"{PREFIX}:tenant:{owner}:adapter:{adapter}:lock"


def retrain_lease(tenant: str, alias: str) -> str:
    """Held, with the run's id, by the retraining run working on the tenant's alias (training.lease)."""
    return f"{PREFIX}:tenant:{tenant}:alias:{alias}:retraining"


def shares() -> str:
    """Hash `owner/adapter` -> JSON list of the tenants it is shared with (set by the global admin)."""
    return f"{PREFIX}:shares"


def tenant_scope(tenant: str) -> str:
    """A tenant's quota scope (in `quota_requests` and `quota_tokens`)."""
    return f"tenant:{tenant}"


def key_scope(key_id: str) -> str:
    """An API key's quota scope, where the key has limits of its own."""
    return f"key:{key_id}"


def quota_requests(scope: str) -> str:
    """Sorted set of admitted requests in the last minute (score: time), for a tenant or key scope."""
    return f"{PREFIX}:quota:{scope}:requests"


def quota_tokens(scope: str, minute: int) -> str:
    """Tokens charged to a tenant or key scope in one clock minute (sliding-window counter)."""
    return f"{PREFIX}:quota:{scope}:tokens:{minute}"


def quota_settled(batch: str) -> str:
    """Marks a batch of token corrections as applied (a batch sent again after a lost reply is not applied twice)."""
    return f"{PREFIX}:quota:settled:{batch}"


def replica_lock(replica: str) -> str:
    """Short lock held by the gateway process that loads or evicts adapters on one vLLM replica."""
    return f"{PREFIX}:replica:{replica}:lock"


def replica_usage(replica: str) -> str:
    """Sorted set adapter -> last time any gateway sent it a request on one replica (shared LRU)."""
    return f"{PREFIX}:replica:{replica}:usage"


def replica_recent_uses(replica: str) -> str:
    """Sorted set `adapter` NUL `process` -> that gateway process's last request to it on one replica, kept for the
    last minutes only: which adapters other processes used lately, even where this one used them since."""
    return f"{PREFIX}:replica:{replica}:recent"


def completion_log(tenant: str) -> str:
    """Stream of a tenant's completion records (fields `r`: the record's JSON, `c`: its completion id, `u`: its end
    user, '' for none), trimmed by length and age."""
    return f"{PREFIX}:log:{tenant}"


def records_replaying() -> str:
    """Sorted set of the gateway processes replaying spooled records into the log (a process token, scored by when
    its mark lapses, Unix time): while one is, a completion id no index names yet may be one of its records."""
    return f"{PREFIX}:records:replaying"


def completion(completion_id: str) -> str:
    """`TENANT ENTRY-ID[ EXPERIMENT ARM]` of one recorded completion: who owns it, where its record is in
    the log, and the experiment arm that answered it (so that its feedback counts for that arm); for an hour after
    the length limit trimmed its record, `record_store.TRIMMED`."""
    return completion_prefix() + completion_id


def completion_prefix() -> str:
    """What every `completion` key starts with (the id follows): for the trim in the record script."""
    return f"{PREFIX}:completion:"


def durability_probe() -> str:
    """A key written (with a short TTL) before a WAITAOF that checks the records Redis fsyncs its writes."""
    return f"{PREFIX}:durability-probe"


def feedback(tenant: str, completion_id: str) -> str:
    """Hash end user (empty: anonymous) -> feedback JSON, for one completion of one tenant."""
    return feedback_prefix(tenant) + completion_id


def feedback_prefix(tenant: str) -> str:
    return f"{PREFIX}:feedback:{tenant}:"


def end_user(tenant: str, user: str) -> str:
    """Set of the completion ids an end user of a tenant asked for or rated (for erasure)."""
    return end_user_prefix(tenant) + user


def end_user_prefix(tenant: str) -> str:
    return f"{PREFIX}:user:{tenant}:"


def forgotten(tenant: str, user: str) -> str:
    """When an end user of a tenant was erased: records and feedback of theirs made before then, replayed
    from a spool later, are not written back. Named by the SHA-1 of the user's name (the record script computes it
    alike, `redis.sha1hex`): an erased user's name, often an e-mail address, is not kept for the tombstone's years."""
    return forgotten_prefix(tenant) + hashlib.sha1(user.encode()).hexdigest()


def forgotten_prefix(tenant: str) -> str:
    return f"{PREFIX}:erased:{tenant}:"


def named_tombstones() -> str:
    """SCAN pattern of the tombstones releases before 2026-12-07 wrote, under the user's name in clear
    (`named_tombstone_prefix`): each is moved under its digest (gateway.erasure.digest_named_tombstones)."""
    return f"{PREFIX}:forgotten:*"


def named_tombstone_prefix(tenant: str) -> str:
    """`loragate:forgotten:TENANT:`, followed by the user's name: a tombstone of a release before 2026-12-07, read
    beside `forgotten` until they are all moved (`named_tombstones_gone`)."""
    return f"{PREFIX}:forgotten:{tenant}:"


def named_tombstones_gone() -> str:
    """Set once a pass found no tombstone named in clear: no more passes."""
    return f"{PREFIX}:forgotten-digested"


def tenant_deleted(tenant: str) -> str:
    """`THRESHOLD REDIS-MS` of a deleted tenant: records and feedback of the tenant as it was when deleted
    (created at or before THRESHOLD, a Unix time), replayed from a queue or a spool later, are not written;
    completion indexes written by that Redis at or before REDIS-MS (its own clock, as stream ids) belong to it,
    not to a tenant re-created with the same name. Kept as long as the deleted tenant kept records."""
    return f"{PREFIX}:tenant-deleted:{tenant}"


def tenant_state_pattern(tenant: str) -> str:
    """SCAN pattern of every per-tenant key in the state Redis (keys, pins, aliases, experiments and their
    audit logs)."""
    return f"{PREFIX}:tenant:{tenant}:*"


def tenant_records_pattern(tenant: str) -> list[str]:
    """SCAN patterns of every per-key record structure of a tenant (feedback, end users, erasures)."""
    return [
        feedback_prefix(tenant) + "*",
        end_user_prefix(tenant) + "*",
        forgotten_prefix(tenant) + "*",
        named_tombstone_prefix(tenant) + "*",  # named in clear, before 2026-12-07 (not moved yet)
        f"{PREFIX}:tenant:{tenant}:experiment:*",  # arms' counters and users, audit logs
    ]
