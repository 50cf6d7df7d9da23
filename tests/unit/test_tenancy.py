"""Tenants, keys, the state watch and the pointers, against a real Redis (flushed for each test)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from gateway.apikeys import InvalidKeyRequest, KeyNotFound, KeyStore, parse_duration
from gateway.errors import AuthenticationFailed
from gateway.experiments import Arm, Change, Experiment, ExperimentNotFound, ExperimentStore
from gateway.keys import api_key, experiment_audit, tenant_keys
from gateway.pointers import PointerStore
from gateway.records import LogPolicy
from gateway.state import StateWatcher
from gateway.tenants import (
    InvalidTenant,
    Limits,
    TenantChanges,
    TenantExists,
    TenantNotFound,
    TenantStore,
    check_tenant_name,
)
from tests.conftest import RedisServer, redis_client


@pytest.mark.parametrize("name", ["", "Acme", "a:b", "a/b", "a.b", "-a", "a b", "x" * 64, "é"])
def test_bad_tenant_names_are_refused_saying_why(name: str) -> None:
    with pytest.raises(InvalidTenant, match="lowercase letters"):
        check_tenant_name(name)


async def test_tenants_are_created_once_and_deleted_with_everything_they_own(redis: aioredis.Redis) -> None:
    tenants, keys, pointers = TenantStore(redis), KeyStore(redis, 0), PointerStore(redis)
    await tenants.create("acme", Limits(rpm=10))
    await tenants.create("beta")
    with pytest.raises(TenantExists):
        await tenants.create("acme")
    assert [t.name for t in await tenants.all()] == ["acme", "beta"]
    key, _ = await keys.create("acme")
    await pointers.set_alias("acme", "prod", "base")
    await pointers.share("acme", "bot", ["beta"])
    await pointers.share("beta", "helper", ["acme"])
    assert await tenants.delete("acme") == [key.removeprefix("sk-lg-").split("_")[0]]
    with pytest.raises(TenantNotFound):
        await tenants.get("acme")
    with pytest.raises(AuthenticationFailed):
        await keys.verify(key)
    assert await redis.keys("loragate:tenant:acme*") == []
    assert await pointers.shares() == {"beta/helper": frozenset()}


async def test_keys_are_hashed_listed_without_secrets_and_checked(redis: aioredis.Redis) -> None:
    await TenantStore(redis).create("acme")
    keys = KeyStore(redis, 0)
    with pytest.raises(TenantNotFound):
        await keys.create("nobody")
    with pytest.raises(InvalidKeyRequest, match="Unknown role"):
        await keys.create("acme", role="root")
    key, info = await keys.create("acme", role="manage", name="ci", limits=Limits(rpm=5))
    assert key.startswith(f"sk-lg-{info.id}_") and info.prefix == f"sk-lg-{info.id}"
    stored = await redis.hgetall(f"loragate:key:{info.id}")
    assert key not in str(stored) and key.split("_", 1)[1] not in str(stored), "only the hash is stored"
    principal = await keys.verify(key)
    assert (principal.tenant, principal.role, principal.rpm) == ("acme", "manage", 5)
    assert [i.id for i in await keys.list("acme")] == [info.id]
    for wrong in ("sk-lg-nothing", key[:-1] + ("x" if key[-1] != "x" else "y"), f"sk-lg-{info.id}_" + "a" * 43):
        with pytest.raises(AuthenticationFailed) as refused:
            await keys.verify(wrong)
        assert key not in refused.value.message


async def test_expiry_and_rotation_with_grace(redis: aioredis.Redis) -> None:
    await TenantStore(redis).create("acme")
    keys = KeyStore(redis, 60)
    short, _ = await keys.create("acme", expires_in_s=2)  # 2 s: verified before then on a loaded machine too
    await keys.verify(short)
    await asyncio.sleep(2.1)
    with pytest.raises(AuthenticationFailed, match="expired"):
        await keys.verify(short)  # an expiry holds even for a cached key
    old, info = await keys.create("acme", role="manage")
    new, new_info = await keys.rotate(info.id, grace_s=2)
    assert new_info.role == "manage" and new_info.id != info.id
    await keys.verify(old)
    await keys.verify(new)
    await asyncio.sleep(2.1)
    with pytest.raises(AuthenticationFailed):
        await keys.verify(old)
    await keys.verify(new)


async def test_key_expiries_hold_by_redis_clock_whatever_the_hosts(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's host runs 100 s behind Redis: a key it makes for 60 s expires 60 s from now by Redis's clock, and a
    rotation there gives the old key its 30 s of grace by that clock too. A gateway whose host runs 100 s ahead
    (its clock measured) still takes the key, and only refuses it once Redis's clock says so."""

    def host(monkeypatch: pytest.MonkeyPatch, ahead_s: float) -> None:
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + ahead_s)

    async def redis_now() -> float:
        seconds, micros = await redis.time()
        return seconds + micros / 1e6

    await TenantStore(redis).create("acme")
    with monkeypatch.context() as cli_host:
        host(cli_host, -100.0)
        cli = KeyStore(redis, 0)
        key, info = await cli.create("acme", expires_in_s=60)
        old, old_info = await cli.create("acme")
        await cli.rotate(old_info.id, grace_s=30)
        _, rotated = await cli.rotate(info.id, grace_s=3600)
    assert rotated.expires_at == info.expires_at, "a rotated key expires when the one it replaces did"
    # within 10 s: the host's clock is 100 s off, and a loaded machine may take seconds over the writes above
    assert info.expires_at is not None and abs(info.expires_at - (await redis_now() + 60)) < 10
    grace_ends = float(await redis.hget(api_key(old_info.id), "expires_at") or 0)
    assert abs(grace_ends - (await redis_now() + 30)) < 10
    for never in (math.nan, math.inf, 0.0):
        with pytest.raises(InvalidKeyRequest):
            await cli.create("acme", expires_in_s=never)
    with monkeypatch.context() as gateway_host:
        host(gateway_host, 100.0)
        gateway_keys = KeyStore(redis, 0)
        await gateway_keys.measure_clock()  # (a gateway's quota loop measures it)
        assert (await gateway_keys.verify(key)).key_id == info.id and await gateway_keys.verify(old)
        await redis.hset(api_key(info.id), "expires_at", repr(await redis_now() - 1))
        with pytest.raises(AuthenticationFailed, match="expired"):
            await gateway_keys.verify(key)
    with pytest.raises(InvalidKeyRequest, match="has expired"):
        await cli.rotate(info.id, grace_s=0)


def test_durations() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration("7d") == 7 * 86400 and parse_duration(90) == 90
    assert parse_duration("0s", allow_zero=True) == 0
    for bad in ("", "soon", "-5", "0s"):
        with pytest.raises(InvalidKeyRequest):
            parse_duration(bad)


async def test_a_revocation_reaches_another_process_through_the_state_watch(redis_server: RedisServer) -> None:
    """Two processes' key stores, each with a long auth cache: the watch empties it within its interval."""
    here = redis_client(redis_server.url, decode_responses=True)
    there = redis_client(redis_server.url, decode_responses=True)
    try:
        await here.flushdb(asynchronous=True)
        await TenantStore(here).create("acme")
        mine, theirs = KeyStore(here, 3600), KeyStore(there, 3600)
        watcher = StateWatcher(there, 0.05, [theirs.forget_cached])
        watching = asyncio.create_task(watcher.run())
        key, info = await mine.create("acme")
        await theirs.verify(key)
        await mine.revoke(info.id)
        revoked_at = time.monotonic()  # once it is in Redis (an fsync on a busy disk is not the watch's time)
        while time.monotonic() - revoked_at < 1:
            try:
                await theirs.verify(key)
            except AuthenticationFailed:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the other process still accepts the revoked key after 1 s")
        watching.cancel()
    finally:
        await here.aclose()
        await there.aclose()


async def test_pointers_are_read_once_and_forgotten_on_change(redis: aioredis.Redis) -> None:
    pointers = PointerStore(redis)
    await pointers.pin("acme", "bot", 2)
    await pointers.set_alias("acme", "prod", "bot@1")
    assert (await pointers.of("acme")).pins == {"bot": 2}
    await redis.hset("loragate:tenant:acme:aliases", "sneaky", "x@1")
    assert "sneaky" not in (await pointers.of("acme")).aliases, "cached until the state version moves"
    pointers.forget_cached()
    assert (await pointers.of("acme")).aliases == {"prod": "bot@1", "sneaky": "x@1"}
    for name in ("acme", "beta", "gamma"):  # a share names tenants that exist
        await TenantStore(redis).create(name)
    await pointers.share("acme", "bot", ["beta", "gamma"])
    assert await pointers.shared_with("beta") == [("acme", "bot")]
    assert await pointers.shared_with("acme") == []


async def test_while_redis_is_down_known_keys_keep_working_and_unknown_ones_get_503(redis: aioredis.Redis) -> None:
    from gateway.errors import StateUnavailable
    from tests.conftest import free_port

    await TenantStore(redis).create("acme")
    keys = KeyStore(redis, cache_seconds=0.05)
    key, _ = await keys.create("acme")
    other, _ = await keys.create("acme")
    await keys.verify(key)
    tenants = TenantStore(redis)
    await tenants.cached("acme")
    dead = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", decode_responses=True)
    keys._redis = tenants._redis = dead  # Redis goes away
    await asyncio.sleep(0.1)
    assert (await keys.verify(key)).tenant == "acme", "verified before: still valid"
    assert (await tenants.cached("acme")).name == "acme"
    with pytest.raises(StateUnavailable):
        await keys.verify(other)
    with pytest.raises(StateUnavailable):
        await TenantStore(dead).cached("acme")
    await dead.aclose()


async def test_deleting_a_tenant_removes_its_experiments_audit_logs_and_a_late_change_brings_none_back(
    redis: aioredis.Redis,
) -> None:
    """The state Redis may be another instance than the records Redis: the tenant's keys there go with it."""
    tenants, experiments = TenantStore(redis), ExperimentStore(redis)
    await tenants.create("acme")
    arms = [Arm(name="a", target="helper@1", weight=50), Arm(name="b", target="helper@2", weight=50)]
    await experiments.create(Experiment(name="tone", tenant="acme", alias="bot", control="a", arms=arms), by="t")
    await experiments.set_weights("acme", "tone", {"b": 10}, by="t")
    assert await redis.llen(experiment_audit("acme", "tone")) == 2
    late = await experiments._live("acme", "tone")  # a guard rail read it just before the deletion
    await tenants.delete("acme")
    assert await redis.keys("loragate:tenant:acme*") == [], "the audit log went with the tenant"
    with pytest.raises(ExperimentNotFound):
        await experiments._save(late, Change(at=time.time(), by="guard-rails", action="rollback"))
    assert await redis.keys("loragate:tenant:acme*") == [], "nothing came back"
    await tenants.create("acme")
    assert await experiments.all("acme") == [] and await experiments.audit("acme", "tone") == []


async def test_a_tenant_recreated_after_a_deletion_is_created_after_it_whatever_the_clock(
    redis: aioredis.Redis,
) -> None:
    tenants = TenantStore(redis)
    first = await tenants.create("acme")
    await tenants.delete("acme")
    ahead = time.time() + 30  # the deleting gateway's clock ran 30 s ahead of this one
    second = await tenants.create("acme", not_before=ahead)
    assert second.created > ahead > first.created
    assert (await tenants.get("acme")).created == second.created


async def test_a_key_created_while_its_tenant_is_deleted_goes_with_it(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key is created between the deletion's read of the tenant's keys and its write: it is revoked all the same,
    not left to work for a tenant created again under the name."""
    tenants, keys = TenantStore(redis), KeyStore(redis, 0)
    await tenants.create("acme")
    real = aioredis.Redis.smembers
    made: list[str] = []

    async def then_a_key(self: aioredis.Redis, name: str) -> Any:
        found = await real(self, name)  # type: ignore[misc]
        if name == tenant_keys("acme") and not made:
            made.append((await keys.create("acme"))[1].id)
        return found

    monkeypatch.setattr(aioredis.Redis, "smembers", then_a_key)
    assert await tenants.delete("acme") == made
    assert await redis.exists(api_key(made[0])) == 0


async def test_a_key_that_outlived_its_tenant_does_not_work_for_its_namesake(redis: aioredis.Redis) -> None:
    """A key left behind by a deletion (as a key created during one could be) names the tenant it was made for:
    it is refused as an unknown key, and cannot be rotated into one, once a tenant of that name is created again.
    Keys stored before keys named their tenant's creation are not checked."""
    tenants, keys = TenantStore(redis), KeyStore(redis, 0)
    await tenants.create("acme")
    key, info = await keys.create("acme")
    await redis.srem(tenant_keys("acme"), info.id)  # not in the tenant's set: the deletion misses it
    await tenants.delete("acme")
    assert await redis.exists(api_key(info.id)) == 1
    await tenants.create("acme")
    with pytest.raises(AuthenticationFailed, match="Incorrect API key"):
        await keys.verify(key)
    with pytest.raises(KeyNotFound):
        await keys.rotate(info.id, grace_s=0)
    fresh, fresh_info = await keys.create("acme")
    assert (await keys.verify(fresh)).tenant == "acme"
    assert (await keys.rotate(fresh_info.id, grace_s=0))[1].tenant == "acme"
    legacy, legacy_info = await keys.create("acme")
    await redis.hdel(api_key(legacy_info.id), "tenant_created")
    assert (await keys.verify(legacy)).key_id == legacy_info.id


async def test_a_tenant_created_again_during_a_deletion_keeps_what_is_its_own(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deletion sweeps the keys under the tenant's name after its transaction; a tenant created under the name
    before the sweep keeps its key set."""
    tenants, keys = TenantStore(redis), KeyStore(redis, 0)
    await tenants.create("acme")
    real = aioredis.Redis.scan_iter
    made: list[str] = []

    async def created_again_first(self: aioredis.Redis, *args: Any, **kwargs: Any) -> AsyncIterator[str]:
        if not made:
            await tenants.create("acme")
            made.append((await keys.create("acme"))[1].id)
        async for found in real(self, *args, **kwargs):
            yield found

    monkeypatch.setattr(aioredis.Redis, "scan_iter", created_again_first)
    await tenants.delete("acme")
    assert [info.id for info in await keys.list("acme")] == made


async def test_a_key_rotated_again_in_its_grace_hands_on_its_own_expiry(redis: aioredis.Redis) -> None:
    """The README's promise: a rotated key's successor expires when it did, also when it is rotated a second time
    while the first rotation's grace runs (the grace's end is not handed on)."""
    await TenantStore(redis).create("acme")
    keys = KeyStore(redis, 0)
    _, info = await keys.create("acme", expires_in_s=30 * 86400)
    _, first = await keys.rotate(info.id, grace_s=60)
    _, second = await keys.rotate(info.id, grace_s=60)
    assert first.expires_at == second.expires_at == info.expires_at
    grace_ends = (await keys.get(info.id)).expires_at
    assert grace_ends is not None and info.expires_at is not None and grace_ends < info.expires_at
    _, never = await keys.create("acme")
    await keys.rotate(never.id, grace_s=60)
    assert (await keys.rotate(never.id, grace_s=60))[1].expires_at is None


def test_a_duration_of_thousands_of_digits_is_refused_saying_why() -> None:
    for huge in ("9" * 5000 + "s", "9" * 5000 + "d", "1" * 13 + "m", "1d" + "9" * 5000 + "h"):
        with pytest.raises(InvalidKeyRequest, match="Invalid duration") as refused:
            parse_duration(huge)
        assert len(str(refused.value)) < 200, "the duration is not echoed whole"


async def test_a_partial_logging_policy_is_checked_once_merged(redis: aioredis.Redis) -> None:
    """`{"score_min": 2}` on a tenant scoring 1..5: 2 is above the default score_max (1), not above the tenant's."""
    tenants = TenantStore(redis)
    await tenants.create("acme", logging=LogPolicy(score_min=1.0, score_max=5.0))
    updated = await tenants.update("acme", TenantChanges.model_validate({"logging": {"score_min": 2}}))
    assert (updated.logging.score_min, updated.logging.score_max) == (2.0, 5.0)
    with pytest.raises(InvalidTenant, match="score_min must be below score_max"):
        await tenants.update("acme", TenantChanges.model_validate({"logging": {"score_min": 6}}))
    with pytest.raises(ValidationError):
        TenantChanges.model_validate({"logging": {"max_records": 5}})
    assert (await tenants.get("acme")).logging.score_min == 2.0


def test_a_duration_in_bare_seconds_is_taken_as_text_too() -> None:
    """`loragate keys create --expires 3600` passes text: seconds, as the docstring and the CLI's help say."""
    assert parse_duration("3600") == parse_duration(3600) == parse_duration("1h") == 3600.0
    with pytest.raises(InvalidKeyRequest):
        parse_duration("1h30")  # 1h and 30 what? refused, not read as seconds
