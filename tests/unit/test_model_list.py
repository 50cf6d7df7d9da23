"""`GET /v1/models`'s answer is kept per tenant until something it shows changes, and no longer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient

from adapters.registry import Registry
from adapters.store import AdapterStore
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway.model_list import ModelLists
from gateway.pointers import PointerStore
from gateway.tenants import TenantStore
from tests.unit.admin_api import BASE, experiment_on_a_withdrawn_share


def ids(body: bytes) -> list[str]:
    return [card["id"] for card in json.loads(body)["data"]]


async def test_the_answer_is_kept_until_an_alias_a_version_or_a_share_changes(
    redis: aioredis.Redis, base: BaseModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path / "store", recheck_s=0.0)  # look at the disk on every call
    pointers = PointerStore(redis)
    lists = ModelLists("tiny-base", registry, pointers)
    monkeypatch.setattr("gateway.model_list.time.time", lambda: 1_000_000.0)
    adapter = make_adapter(tmp_path / "a", base, seed=1, rank=4)
    AdapterStore(tmp_path / "store" / "t", "t").add(adapter, "bot", base, 16)
    first = await lists.body("t")
    assert ids(first) == ["tiny-base", "bot", "bot@1"]
    assert await lists.body("t") is first, "nothing changed: the same bytes, not built again"

    await pointers.set_alias("t", "support", "bot@1")
    pointers.forget_cached()  # what the state watcher does on every change
    assert ids(await lists.body("t")) == ["tiny-base", "support", "bot", "bot@1"]
    AdapterStore(tmp_path / "store" / "t", "t").add(adapter, "bot", base, 16)  # another process's write
    with_two = await lists.body("t")
    assert ids(with_two) == ["tiny-base", "support", "bot", "bot@1", "bot@2"]
    assert json.loads(with_two)["data"][2]["root"] == "bot@2", "the bare name is the latest version"

    AdapterStore(tmp_path / "store" / "o", "o").add(adapter, "shared", base, 16)
    for name in ("o", "t"):
        await TenantStore(redis).create(name)
    await pointers.share("o", "shared", ["t"])
    pointers.forget_cached()
    assert ids(await lists.body("t"))[-2:] == ["o/shared", "o/shared@1"]
    assert ids(await lists.body("o")) == ["tiny-base", "shared", "shared@1"], "the owner's own answer"
    await pointers.set_alias("t", "borrowed", "o/shared@1")
    pointers.forget_cached()
    assert "borrowed" in ids(await lists.body("t"))
    await pointers.share("o", "shared", [])  # withdrawn: the alias is left, and cannot be used
    pointers.forget_cached()
    assert "borrowed" not in ids(await lists.body("t")) and "support" in ids(await lists.body("t"))
    await pointers.share("o", "shared", ["t"])
    pointers.forget_cached()
    kept = await lists.body("t")
    monkeypatch.setattr("gateway.model_list.time.time", lambda: 1_000_001.0)
    later = await lists.body("t")
    assert later is not kept and json.loads(later)["data"][0]["created"] == 1_000_001, "created is now, as in vLLM"


async def test_within_recheck_the_registry_answers_from_memory_and_its_own_writes_show_at_once(
    base: BaseModelSpec, tmp_path: Path
) -> None:
    registry = Registry(tmp_path / "store", recheck_s=60)
    store = registry.store("t")
    adapter = make_adapter(tmp_path / "a", base, seed=1, rank=4)
    store.add(adapter, "bot", base, 16)
    listed = await registry.listed("t", {})
    assert [ref for ref, _ in listed] == ["bot", "bot@1"]
    AdapterStore(tmp_path / "store" / "t", "t").add(adapter, "bot", base, 16)  # another process
    assert await registry.listed("t", {}) is listed, "within recheck_s: from memory"
    assert [ref for ref, _ in await registry.listed("t", {"bot": 1})] == ["bot", "bot@1", "bot@2"], "other pins"
    store.add(adapter, "bot", base, 16)
    registry.invalidate("t", "bot")  # this process's own write
    assert [ref for ref, _ in await registry.listed("t", {})][-1] == "bot@3"


async def test_an_alias_on_an_adapter_no_longer_shared_is_not_listed_while_another_of_its_owner_is(
    redis: aioredis.Redis, base: BaseModelSpec, tmp_path: Path
) -> None:
    """`o` shares `foo` and `bar` with `t`, then withdraws `bar`: `t`'s alias on `o/bar@1` answers 404, and was
    still listed because `o/foo` stayed shared."""
    registry, pointers = Registry(tmp_path / "store", recheck_s=0.0), PointerStore(redis)
    lists = ModelLists("tiny-base", registry, pointers)
    adapter = make_adapter(tmp_path / "a", base, seed=1, rank=4)
    for tenant in ("o", "t"):
        await TenantStore(redis).create(tenant)
    for name in ("foo", "bar"):
        AdapterStore(tmp_path / "store" / "o", "o").add(adapter, name, base, 16)
        await pointers.share("o", name, ["t"])
    await pointers.set_alias("t", "borrowed", "o/bar@1")
    pointers.forget_cached()
    assert "borrowed" in ids(await lists.body("t"))
    await pointers.share("o", "bar", [])
    pointers.forget_cached()
    assert "borrowed" not in ids(await lists.body("t")) and "o/foo" in ids(await lists.body("t"))


async def test_an_alias_is_listed_however_its_target_spells_a_version_it_serves(
    redis: aioredis.Redis, base: BaseModelSpec, tmp_path: Path
) -> None:
    """`t/bot@1` (the tenant's own adapter, owner named) and `o/shared@01` (a shared one, the version padded) are
    served as `bot@1` and `o/shared@1` are: both were left out of the list."""
    registry, pointers = Registry(tmp_path / "store", recheck_s=0.0), PointerStore(redis)
    lists = ModelLists("tiny-base", registry, pointers)
    adapter = make_adapter(tmp_path / "a", base, seed=1, rank=4)
    for tenant in ("o", "t"):
        await TenantStore(redis).create(tenant)
    AdapterStore(tmp_path / "store" / "t", "t").add(adapter, "bot", base, 16)
    AdapterStore(tmp_path / "store" / "o", "o").add(adapter, "shared", base, 16)
    await pointers.share("o", "shared", ["t"])
    for alias, target in (("own", "t/bot@1"), ("padded", "o/shared@01"), ("gone", "o/shared@2"), ("x", "u/bot@1")):
        await pointers.set_alias("t", alias, target)
    pointers.forget_cached()
    listed = ids(await lists.body("t"))
    assert "own" in listed and "padded" in listed
    assert "gone" not in listed and "x" not in listed, "what it cannot use is still left out"


def test_an_alias_is_the_same_card_listed_and_retrieved(api: TestClient) -> None:
    """`GET /v1/models/{alias}` answers as the list shows the alias: its target (for one running an experiment, the
    experiment), not the version of whichever arm the call happened to draw (it drew one at random each time)."""
    assert api.put("/admin/tenants/acme/aliases/prod", json={"target": "bot@2"}).status_code == 200
    arms = [{"name": "a", "target": "bot@1", "weight": 1}, {"name": "b", "target": "bot@3", "weight": 1}]
    assert (
        api.post(
            "/admin/tenants/acme/experiments", json={"name": "e", "alias": "x", "control": "a", "arms": arms}
        ).status_code
        == 201
    )
    auth = {"authorization": f"Bearer {api.post('/admin/tenants/acme/keys', json={'role': 'inference'}).json()['key']}"}
    listed = {card["id"]: card for card in api.get("/v1/models", headers=auth).json()["data"]}
    for alias in ("prod", "x"):
        retrieved = [api.get(f"/v1/models/{alias}", headers=auth).json() for _ in range(12)]
        roots = {card["root"] for card in retrieved}
        assert roots == {listed[alias]["root"]}, (alias, roots, listed[alias])
        assert {card["parent"] for card in retrieved} == {listed[alias]["parent"]} == {BASE}
    assert listed["prod"]["root"] == "bot@2"
    assert api.get("/v1/models/bot@1", headers=auth).json()["root"] == "bot@1", "a version is still its own card"


def test_an_experiments_alias_keeps_its_card_when_an_arms_share_is_withdrawn(
    api: TestClient, tmp_path: Path, base: BaseModelSpec
) -> None:
    """The list shows the alias (its target is the experiment); its card answered 200 or 404 at random, as each call
    drew an arm and the withdrawn one was not found."""
    experiment_on_a_withdrawn_share(api, tmp_path, base, control_weight=1)
    auth = {"authorization": f"Bearer {api.post('/admin/tenants/acme/keys', json={'role': 'inference'}).json()['key']}"}
    listed = {card["id"]: card for card in api.get("/v1/models", headers=auth).json()["data"]}
    retrieved = [api.get("/v1/models/helper", headers=auth) for _ in range(16)]
    assert {answer.status_code for answer in retrieved} == {200}
    assert all(answer.json() == {**listed["helper"], "created": answer.json()["created"]} for answer in retrieved)


def test_a_model_path_ending_in_a_slash_is_an_unknown_url(api: TestClient) -> None:
    """`/v1/models/` answered 404 `model_not_found` for the model "" (and `/v1/models/bot@1/` for `bot@1/`), where
    every other route answers an unknown URL, a trailing slash too, as OpenAI does."""
    auth = {"authorization": f"Bearer {api.post('/admin/tenants/acme/keys', json={'role': 'inference'}).json()['key']}"}
    for path in ("/v1/models/", "/v1/models/bot@1/"):
        answer = api.get(path, headers=auth)
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"] == {
            "message": f"Invalid URL (GET {path})",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    assert api.get("/v1/models/bot@1", headers=auth).status_code == 200
