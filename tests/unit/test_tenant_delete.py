"""Deleting a tenant through the admin API: its log is purged before the tenant goes (a failure on the way leaves a
deletion that can be asked again), a replica that fails to unload its adapters does not stop it, and its retraining
runs (copies of its log) go too; a version being added when it goes (an upload, `loragate adapters add`, a
retraining run's candidate) is removed, not inherited by a tenant created again under its name."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.testclient import TestClient
from typer.testing import CliRunner

import adapters.store
from adapters.registry import Registry
from adapters.synthetic import make_adapter, tarball
from adapters.validate import BaseModelSpec
from gateway import keys, version_guard
from gateway.app import create_app
from gateway.cli import app as cli
from gateway.pointers import PointerStore
from gateway.settings import Settings
from gateway.tenants import Limits, Tenant, TenantChanges, TenantNotFound, TenantStore
from tests.conftest import RedisServer, redis_client, sync_redis_client
from tests.unit.admin_api import ADMIN, BASE
from tests.unit.stand_in_engine import StandInEngine, serving
from training import train as training_module
from training.config import RetrainConfig
from training.retrain import Run, Stack, TenantGone, fit, retrain

GZIP = "application/gzip"


class DroppingUnloads(StandInEngine):
    """A replica that is healthy and serves `acme.bot@1`, but drops the connection of every POST (an unload)."""

    MODELS = ({"id": BASE, "parent": None}, {"id": "acme.bot@1", "parent": BASE})

    def do_POST(self) -> None:  # noqa: N802
        self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def replica() -> Iterator[str]:
    with serving(DroppingUnloads) as url:
        yield url


def test_a_failing_unload_neither_fails_the_deletion_nor_keeps_the_log(
    redis_server: RedisServer, tmp_path: Path, base: BaseModelSpec, replica: str
) -> None:
    state = sync_redis_client(redis_server.url, decode_responses=True)
    state.flushdb(asynchronous=True)
    admin_key = SecretStr(ADMIN["Authorization"].removeprefix("Bearer "))
    settings = Settings(home=tmp_path, redis_url=redis_server.url, served_model_name=BASE, admin_key=admin_key)
    with TestClient(create_app(settings, engine_urls=[replica]), headers=ADMIN) as api:
        assert api.post("/admin/tenants", json={"name": "acme"}).status_code == 201
        svc = api.app.state.services  # type: ignore[attr-defined]
        svc.registry.store("acme").add(make_adapter(tmp_path / "a", base, seed=1), "bot", base, 16)
        state.xadd(keys.completion_log("acme"), {"r": json.dumps({"id": "chatcmpl-1", "tenant": "acme"})})
        run = settings.training_root / "acme" / "retrain-1"
        run.mkdir(parents=True)
        (run / "train.jsonl").write_text('{"messages": []}\n')
        deadline = time.monotonic() + 10
        while not all(r.healthy for r in svc.pool.replicas):
            assert time.monotonic() < deadline, "the stand-in replica never turned healthy"
            time.sleep(0.1)
        deleted = api.delete("/admin/tenants/acme")
        assert deleted.status_code == 200, deleted.text
        assert (deleted.json()["records"], deleted.json()["adapters"]) == (1, 1)
        assert state.exists(keys.completion_log("acme"), keys.tenant("acme")) == 0
        assert not (settings.training_root / "acme").exists(), "retraining runs hold copies of its log"
        assert api.delete("/admin/tenants/acme").status_code == 404


def test_an_upload_that_outlasts_its_tenants_deletion_is_not_inherited(
    api: TestClient, base: BaseModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload's own time (streaming, unpacking, hashing) is stood in for by a pause in its validation."""
    real = adapters.store.check_adapter
    inside, deleted = threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        assert deleted.wait(30), "the tenant was never deleted"
        return real(*args, **kwargs)

    monkeypatch.setattr(adapters.store, "check_adapter", slow)
    api.app.state.services._base_spec = base  # type: ignore[attr-defined]
    body = tarball(make_adapter(tmp_path / "old", base, seed=42))
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(
            api.post, "/admin/tenants/acme/adapters?name=secret", content=body, headers={"Content-Type": GZIP}
        )
        assert inside.wait(30), "the upload never reached its checks"
        assert api.delete("/admin/tenants/acme").status_code == 200
        deleted.set()
        uploaded = upload.result(timeout=30)
    assert uploaded.status_code == 404 and uploaded.json()["error"]["code"] == "tenant_not_found"
    assert api.post("/admin/tenants", json={"name": "acme"}).status_code == 201  # another acme
    key = api.post("/admin/tenants/acme/keys", json={"role": "inference"}).json()["key"]
    models = api.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    assert "secret" not in {m["id"] for m in models} and api.get("/admin/tenants/acme/adapters").json()["data"] == []


def test_a_cli_add_that_outlasts_its_tenants_deletion_is_not_inherited(
    api: TestClient,
    redis_server: RedisServer,
    base: BaseModelSpec,
    tiny_base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`loragate adapters add` (in this process): acme is deleted and created again while the adapter is validated."""
    real = adapters.store.check_adapter

    def deleted_meanwhile(*args: Any, **kwargs: Any) -> Any:
        assert api.delete("/admin/tenants/acme").status_code == 200
        assert api.post("/admin/tenants", json={"name": "acme"}).status_code == 201  # another acme
        return real(*args, **kwargs)

    monkeypatch.setattr(adapters.store, "check_adapter", deleted_meanwhile)
    env = {
        "LORAGATE_HOME": str(tmp_path),
        "LORAGATE_REDIS_URL": redis_server.url,
        "LORAGATE_MODEL_DIR": str(tiny_base_dir),
        "LORAGATE_SERVED_MODEL_NAME": base.name,
    }
    folder = make_adapter(tmp_path / "new", base, seed=7)
    done = CliRunner().invoke(cli, ["adapters", "add", str(folder), "--name", "secret", "--tenant", "acme"], env=env)
    assert done.exit_code == 1 and "Tenant `acme` does not exist" in done.output, done.output
    assert api.get("/admin/tenants/acme/adapters").json()["data"] == []
    assert not adapters.store.AdapterStore(tmp_path / "adapters" / "acme").versions("secret")


async def test_a_retraining_run_gives_a_deleted_tenant_and_its_namesake_nothing(
    api: TestClient,
    redis_server: RedisServer,
    tmp_path: Path,
    base: BaseModelSpec,
    tiny_base_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """acme is deleted through the admin API (which also removes its run folders) and created again: while a run's
    fit step trains, while a run stages its candidate, or before its eval. Each ends with the refusal that says so,
    and leaves no folder (no data, no weights) and no version to the new acme."""
    redis = redis_client(redis_server.url, decode_responses=True)
    settings = Settings(home=tmp_path, redis_url=redis_server.url, served_model_name=base.name, model_dir=tiny_base_dir)
    stack = Stack(settings, redis, redis, "http://127.0.0.1:9")
    fitted = str(make_adapter(tmp_path / "fitted", base, seed=3))

    async def run_of_acme(*done: str) -> Run:
        created = (await TenantStore(redis).get("acme")).created
        run = Run.create(settings.training_root, "acme", "bot", RetrainConfig(), tenant_created=created)
        run.state.done, run.state.data_card = list(done), {"dataset_hash": "0" * 64}
        run.state.serving = {"alias": "bot", "target": base.name, "adapter_name": "bot-tuned", "parent": None}
        run.state.train = {"adapter_dir": fitted}
        return run

    def deleted_and_created_again() -> None:
        assert api.delete("/admin/tenants/acme").status_code == 200
        assert api.post("/admin/tenants", json={"name": "acme"}).status_code == 201

    def training(run: Run) -> Any:
        def train(*args: Any, **kwargs: Any) -> Any:
            deleted_and_created_again()
            (run.fit_dir / "adapter").mkdir(parents=True)  # the trainer writes on into the removed folder
            return None

        return train

    real = adapters.store.check_adapter

    def staging(*args: Any, **kwargs: Any) -> Any:
        deleted_and_created_again()
        return real(*args, **kwargs)

    try:
        for done, patch in (
            (["dataset"], lambda run: monkeypatch.setattr(training_module, "train", training(run))),
            (["dataset", "fit"], lambda run: monkeypatch.setattr(adapters.store, "check_adapter", staging)),
            (["dataset", "fit"], lambda run: deleted_and_created_again()),
        ):
            run = await run_of_acme(*done)
            patch(run)
            step = fit if done == ["dataset"] else retrain  # `loragate train fit` runs that step alone
            with pytest.raises(TenantGone, match="deleted after run"):
                await step(run, stack, lambda _: None)
            monkeypatch.undo()
            assert not run.folder.exists(), done
            assert not Registry(settings.adapter_root).store("acme").versions("bot-tuned"), done
    finally:
        await redis.aclose()


async def test_a_version_whose_tenant_cannot_be_checked_is_not_left_half_added(
    tmp_path: Path, base: BaseModelSpec
) -> None:
    """Redis is away when an upload or `adapters add` checks its tenant: the unlisted version goes, the error stays."""

    class Unreachable:
        async def get(self, name: str) -> Any:
            raise RedisConnectionError("Redis is away")

    store = adapters.store.AdapterStore(tmp_path / "adapters" / "acme")
    stored = store.add(make_adapter(tmp_path / "a", base, seed=5), "bot", base, 16, listed=False)
    owner = Tenant(name="acme")
    with pytest.raises(RedisConnectionError):
        await version_guard.keep_if_still_owned(Unreachable(), store, owner, stored, publish=True)  # type: ignore[arg-type]
    assert store.versions("bot") == []


async def test_a_share_written_as_its_tenant_is_deleted_is_not_left_behind(redis: aioredis.Redis) -> None:
    """The share's check that its tenants exist and its write are one step: a tenant deleted in between (its
    deletion clears its shares) is not given its share back, to pass to a tenant created again under its name."""
    tenants, pointers = TenantStore(redis), PointerStore(redis)
    for name in ("owner", "user"):
        await tenants.create(name)
    await tenants.delete("user")
    with pytest.raises(TenantNotFound, match="`user`"):
        await pointers.share("owner", "bot", ["user"])
    assert await redis.hget(keys.shares(), "owner/bot") is None
    await tenants.create("user")
    await pointers.share("owner", "bot", ["user"])
    assert await redis.hget(keys.shares(), "owner/bot") == '["user"]'


def test_a_share_whose_tenant_goes_while_it_is_written_is_a_404(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route checked the tenants, then one was deleted before the write: 404 naming it, not a 500."""
    svc = api.app.state.services  # type: ignore[attr-defined]
    assert api.post("/admin/tenants", json={"name": "beta"}).status_code == 201
    real = svc.pointers.share

    async def deleted_meanwhile(owner: str, adapter: str, tenants: list[str]) -> None:
        await svc.tenants.delete("beta")
        await real(owner, adapter, tenants)

    monkeypatch.setattr(svc.pointers, "share", deleted_meanwhile)
    answer = api.put("/admin/tenants/acme/adapters/bot/share", json={"tenants": ["beta"]})
    assert answer.status_code == 404 and "`beta`" in answer.json()["error"]["message"], answer.text


async def test_partial_changes_at_once_both_hold(redis: aioredis.Redis) -> None:
    """Read and written in one transaction: two PATCHes at once, one of the rpm and one of the tpm (from two
    gateways), both hold, where the later write took the other's change away."""
    store = TenantStore(redis)
    await store.create("both")
    for n in range(1, 11):
        await asyncio.gather(
            store.update("both", TenantChanges.model_validate({"limits": {"rpm": n}})),
            store.update("both", TenantChanges.model_validate({"limits": {"tpm": 1000 + n}})),
        )
        assert (await store.get("both")).limits == Limits(rpm=n, tpm=1000 + n)
