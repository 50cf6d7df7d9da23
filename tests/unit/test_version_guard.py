"""A version is never deleted while something points at it: a delete and an alias or experiment pointed at the
same version wait for each other (gateway.version_guard), through the admin API and the CLI (real Redis)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from adapters.manifest import Manifest
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway import keys, version_guard
from gateway.experiments import Arm, Experiment, ExperimentStore
from gateway.tenants import TenantStore
from tests.conftest import RedisServer, redis_client, sync_redis_client
from tests.unit.admin_api import BASE, refused

pytestmark = pytest.mark.usefixtures("experiment_tenants")


def test_a_delete_and_a_pointer_at_the_same_version_wait_for_each_other(
    api: TestClient, redis_server: RedisServer
) -> None:
    """Whichever of the two comes second sees what the first did (a delete in flight holds the adapter's lock,
    as does an alias or experiment being pointed at it, here held by hand)."""
    tenant = "/admin/tenants/acme"
    svc = api.app.state.services  # type: ignore[attr-defined]
    state = sync_redis_client(redis_server.url, decode_responses=True)
    held = state.lock(keys.adapter_lock("acme", "bot"), timeout=30)
    with ThreadPoolExecutor(2) as pool:
        assert held.acquire(blocking=False)  # a delete of bot@3 in flight
        pointing = pool.submit(api.put, f"{tenant}/aliases/prod", json={"target": "bot@3"})
        arm = [{"name": "control", "target": BASE, "weight": 1}, {"name": "treat", "target": "bot@3", "weight": 1}]
        new = {"name": "tone", "alias": "beta", "control": "control", "arms": arm}
        testing = pool.submit(api.post, f"{tenant}/experiments", json=new)
        time.sleep(0.6)
        assert not pointing.done() and not testing.done(), "both wait for the delete"
        svc.registry.store("acme").remove("bot", 3)
        held.release()
        refused(pointing.result(timeout=10), 400, "invalid_alias_target")
        refused(testing.result(timeout=10), 400, "invalid_arm")

        assert held.acquire(blocking=False)  # an alias being pointed at bot@2
        deleting = pool.submit(api.delete, f"{tenant}/adapters/bot@2")
        time.sleep(0.6)
        assert not deleting.done(), "the delete waits for the pointer"
        state.hset(keys.aliases("acme"), "prod", "bot@2")
        held.release()
        assert "alias `prod`" in refused(deleting.result(timeout=10), 409, "version_in_use")
    assert svc.registry.store("acme").versions("bot") == [1, 2]
    assert "one version at a time" in refused(api.delete(f"{tenant}/adapters/bot"), 400, "invalid_adapter")


def test_a_change_that_waits_too_long_for_the_adapter_is_refused_as_busy(
    api: TestClient, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(version_guard, "WAIT_S", 0.3)
    held = sync_redis_client(redis_server.url).lock(keys.adapter_lock("acme", "bot"), timeout=30)
    assert held.acquire(blocking=False)
    try:
        message = refused(api.delete("/admin/tenants/acme/adapters/bot@1"), 409, "adapter_busy")
        assert "`bot`" in message and "try again" in message
        refused(api.put("/admin/tenants/acme/aliases/prod", json={"target": "bot@1"}), 409, "adapter_busy")
        refused(api.put("/admin/tenants/acme/adapters/bot/pin", json={"version": 1}), 409, "adapter_busy")
    finally:
        held.release()
    assert api.delete("/admin/tenants/acme/adapters/bot@1").status_code == 200, "free again"


def test_the_cli_deletes_no_version_in_use(api: TestClient, redis_server: RedisServer, tmp_path: Path) -> None:
    assert api.put("/admin/tenants/acme/aliases/prod", json={"target": "bot@02"}).status_code == 200
    env = {**os.environ, "LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url}
    command = [sys.executable, "-m", "gateway", "adapters", "rm", "bot@2", "--tenant", "acme"]
    in_use = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    said = in_use.stdout + in_use.stderr
    assert in_use.returncode == 1 and "Traceback" not in said, said
    assert "`bot@2` is in use by alias `prod`" in said, "bot@02 is bot@2"
    assert api.put("/admin/tenants/acme/aliases/prod", json={"target": BASE}).status_code == 200
    deleted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert deleted.returncode == 0 and "deleted bot@2" in deleted.stdout, deleted.stderr


def test_a_pinned_version_is_not_deleted_while_its_name_has_another(api: TestClient) -> None:
    """Deleted, a pinned version would move every caller of the bare name to its latest version at once (a
    retraining run's candidate in the middle of its canary, say): refused until the pin moves. Its name's last
    version goes with its pin, as an unpinned one does."""
    tenant = "/admin/tenants/acme/adapters"
    assert api.put(f"{tenant}/bot/pin", json={"version": 1}).status_code == 200
    message = refused(api.delete(f"{tenant}/bot@1"), 409, "version_in_use")
    assert "the pin of `bot`" in message and "repoint the alias or the pin" in message
    assert api.delete(f"{tenant}/bot@2").status_code == 200, "not the pinned one"
    assert api.put(f"{tenant}/bot/pin", json={"version": 3}).status_code == 200
    assert api.delete(f"{tenant}/bot@1").status_code == 200
    assert api.delete(f"{tenant}/bot@3").status_code == 200, "the last one: no caller moves anywhere"
    assert api.get(f"{tenant}/bot").status_code == 404


def test_a_version_whose_manifest_is_damaged_can_be_deleted(api: TestClient) -> None:
    """A damaged manifest hides its version from listings and routing, but its weights stay on the volume (and
    maybe in a replica): the operator deletes it like any other version, and only a version that is there."""
    svc = api.app.state.services  # type: ignore[attr-defined]
    store = svc.registry.store("acme")
    manifest = store.version_dir("bot", 2) / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text("{")
    tenant = "/admin/tenants/acme/adapters"
    assert api.get(f"{tenant}/bot@2").status_code == 404
    deleted = api.delete(f"{tenant}/bot@2")
    assert deleted.status_code == 200 and deleted.json() == {"id": "bot@2", "object": "adapter", "deleted": True}
    assert not store.version_dir("bot", 2).exists()
    assert store.versions("bot") == [1, 3]
    refused(api.delete(f"{tenant}/bot@2"), 404, "adapter_not_found")


def test_a_tenant_refused_a_delete_learns_how_many_other_tenants_use_it_not_who(api: TestClient) -> None:
    assert api.post("/admin/tenants", json={"name": "globex"}).status_code == 201
    assert api.put("/admin/tenants/acme/adapters/bot/share", json={"tenants": ["globex"]}).status_code == 200
    assert api.put("/admin/tenants/globex/aliases/theirs", json={"target": "acme/bot@1"}).status_code == 200
    key = api.post("/admin/tenants/acme/keys", json={"role": "manage"}).json()["key"]
    as_acme = api.delete("/admin/tenants/acme/adapters/bot@1", headers={"Authorization": f"Bearer {key}"})
    message = refused(as_acme, 409, "version_in_use")
    assert "1 alias(es) or experiment(s) of tenants it is shared with" in message
    assert "globex" not in as_acme.text and "theirs" not in as_acme.text
    as_operator = refused(api.delete("/admin/tenants/acme/adapters/bot@1"), 409, "version_in_use")
    assert "alias `theirs` of tenant globex" in as_operator


def test_another_tenants_adapter_not_shared_is_refused_before_its_lock(
    api: TestClient, redis_server: RedisServer
) -> None:
    """Its lock would tell another tenant that the adapter exists, and when its owner is changing it; taking it
    from another tenant would make the owner's own changes wait."""
    assert api.post("/admin/tenants", json={"name": "globex"}).status_code == 201
    key = api.post("/admin/tenants/globex/keys", json={"role": "manage"}).json()["key"]
    as_globex = {"Authorization": f"Bearer {key}"}
    held = sync_redis_client(redis_server.url).lock(keys.adapter_lock("acme", "bot"), timeout=30)
    assert held.acquire(blocking=False)  # acme is changing bot
    try:
        answers = []
        for target in ("acme/bot@1", "acme/nothing@1", "ghost/bot@1"):
            started = time.monotonic()
            answer = api.put("/admin/tenants/globex/aliases/x", json={"target": target}, headers=as_globex)
            answers.append(
                (refused(answer, 400, "invalid_alias_target").replace(target, "T"), time.monotonic() - started)
            )
        assert len({message for message, _ in answers}) == 1, "the same answer as for names that do not exist"
        assert max(seconds for _, seconds in answers) < 5, "at once: nobody waited for acme's lock (10 s)"
    finally:
        held.release()


@pytest.mark.parametrize(
    ("target", "adapter"),
    [
        ("bot@2", ("acme", "bot")),
        ("other/bot@2", ("other", "bot")),
        ("base-model", None),
        ("bot", None),
        ("Bad:Owner/bot@1", None),
        ("bot..x@1", None),
    ],
)
def test_the_adapter_a_target_names(target: str, adapter: tuple[str, str] | None) -> None:
    assert version_guard.adapter_of(target, "acme") == adapter


async def test_a_promote_between_reads_does_not_hide_the_version_from_a_delete(redis: aioredis.Redis) -> None:
    """The aliases and the experiments are read at one moment: before, a promote landing between the two reads
    was seen as neither (the alias still pointing at the experiment, the experiment already promoted)."""
    store = ExperimentStore(redis)
    arms = [Arm(name="control", target="bot@1", weight=1), Arm(name="treat", target="bot@2", weight=1)]
    await store.create(Experiment(name="tone", tenant="acme", alias="prod", control="control", arms=arms), by="test")
    real = redis.hgetall

    async def promoted_meanwhile(name: str) -> dict[str, str]:
        found = await real(name)
        if name == keys.aliases("acme"):
            await store.set_status("acme", "tone", "promoted", "test", "treat")
        return found

    redis.hgetall = promoted_meanwhile  # type: ignore[method-assign]
    try:
        found = await version_guard.users(redis, store, "acme", "bot@2")
    finally:
        redis.hgetall = real  # type: ignore[method-assign]
    assert found, "in use, whichever moment it was read at"


def test_an_alias_and_an_upload_of_the_same_name_never_both_stand(
    api: TestClient, redis_server: RedisServer, tmp_path: Path, base: BaseModelSpec
) -> None:
    """An upload checks for an alias of its name before its body comes, an alias for versions of its name: an
    alias set while the body came was served in the adapter's place, both listed. Now an alias is refused while
    a version of its name is stored (listed or not yet), and a version is not listed once its name is an alias
    (removed: 409), the name's lock held by both; the CLI refuses an adapter named as an alias."""
    svc = api.app.state.services  # type: ignore[attr-defined]
    store = svc.registry.store("acme")
    uploading = store.add(make_adapter(tmp_path / "a", base, seed=7), "racey", base, 16, listed=False)
    assert "already the name of a model" in refused(
        api.put("/admin/tenants/acme/aliases/racey", json={"target": "bot@1"}), 409, "name_taken"
    )
    assert api.put("/admin/tenants/acme/aliases/late", json={"target": "bot@1"}).status_code == 200  # body coming
    late = store.add(make_adapter(tmp_path / "b", base, seed=8), "late", base, 16, listed=False)

    async def publish(manifest: Manifest) -> Manifest:
        async with redis_client(redis_server.url, decode_responses=True) as redis:
            owner = await TenantStore(redis).get("acme")
            return await version_guard.publish_unaliased(redis, TenantStore(redis), store, owner, manifest)

    with pytest.raises(version_guard.NameTaken):
        asyncio.run(publish(late))
    assert store.versions("late") == [], "removed, not left unlisted"
    assert asyncio.run(publish(uploading)).listed
    env = {**os.environ, "LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url}
    command = [sys.executable, "-m", "gateway", "adapters", "add", str(tmp_path / "b"), "--name", "late"]
    refusal = subprocess.run([*command, "--tenant", "acme"], env=env, capture_output=True, text=True, timeout=60)
    assert refusal.returncode == 1 and "`late` is already an alias of tenant acme" in refusal.stderr, refusal.stderr


def test_an_upload_that_cannot_take_its_names_lock_leaves_no_version_behind(
    api: TestClient, redis_server: RedisServer, tmp_path: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused busy (409 `adapter_busy`), its unlisted version stayed on disk for good, and the name could never be
    an alias (409 `name_taken`)."""
    monkeypatch.setattr(version_guard, "WAIT_S", 0.2)
    store = api.app.state.services.registry.store("acme")  # type: ignore[attr-defined]
    stored = store.add(make_adapter(tmp_path / "a", base, seed=9), "newbot", base, 16, listed=False)
    state = sync_redis_client(redis_server.url, decode_responses=True)
    held = state.lock(keys.adapter_lock("acme", "newbot"), timeout=30)
    assert held.acquire(blocking=False)

    async def publish() -> Manifest:
        async with redis_client(redis_server.url, decode_responses=True) as redis:
            owner = await TenantStore(redis).get("acme")
            return await version_guard.publish_unaliased(redis, TenantStore(redis), store, owner, stored)

    try:
        with pytest.raises(version_guard.AdapterBusy):
            asyncio.run(publish())
    finally:
        held.release()
    assert store.versions("newbot") == []
    assert api.put("/admin/tenants/acme/aliases/newbot", json={"target": "bot@1"}).status_code == 200
