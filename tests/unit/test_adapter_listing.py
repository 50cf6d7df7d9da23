"""A version deleted while it is listed, or whose manifest on disk is empty or corrupt, is left out of listings
(and not found where looked up) instead of failing the tenant's whole listing with a 500; a shipped manifest of
the wrong shape is the upload's fault (400), not a TypeError."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from adapters.manifest import AdapterRef, InvalidAdapter
from adapters.registry import Registry
from adapters.store import AdapterNotFound, AdapterStore
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec

MAX_RANK = 16


def corrupt(store: AdapterStore, name: str, version: int, text: str) -> None:
    path = store.version_dir(name, version) / "manifest.json"
    path.chmod(0o644)
    path.write_text(text)


@pytest.mark.parametrize("claimed", [["adapter_model.safetensors"], "adapter_model.safetensors", 7, None])
def test_a_shipped_manifest_whose_files_are_not_an_object_is_refused(
    tmp_path: Path, good: Path, base: BaseModelSpec, claimed: object
) -> None:
    (good / "manifest.json").write_text(json.dumps({"files": claimed}))
    store = AdapterStore(tmp_path / "store" / "t", "t")
    with pytest.raises(InvalidAdapter, match="`files` is an object"):
        store.add(good, "a", base, MAX_RANK)
    assert store.list() == []


def test_a_shipped_manifest_nested_too_deep_to_read_is_refused(tmp_path: Path, good: Path, base: BaseModelSpec) -> None:
    (good / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError, not ValueError, in json.loads
    with pytest.raises(InvalidAdapter, match="manifest.json is not valid JSON"):
        AdapterStore(tmp_path / "store" / "t", "t").add(good, "a", base, MAX_RANK)


def test_a_shipped_manifest_over_its_cap_is_refused_unread(tmp_path: Path, good: Path, base: BaseModelSpec) -> None:
    (good / "manifest.json").write_text(json.dumps({"files": {}, "notes": "x" * (1 << 20)}))
    with pytest.raises(InvalidAdapter, match="manifest.json holds more than"):
        AdapterStore(tmp_path / "store" / "t", "t").add(good, "a", base, MAX_RANK)


@pytest.mark.parametrize("text", ["", "{", '{"name": "a"}', "[]"])
def test_a_version_with_a_corrupt_manifest_is_skipped_and_not_found(
    tmp_path: Path, good: Path, base: BaseModelSpec, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = AdapterStore(tmp_path / "store" / "t", "t")
    for _ in range(3):
        store.add(good, "a", base, MAX_RANK)
    corrupt(store, "a", 3, text)
    with caplog.at_level(logging.WARNING, logger="loragate"):
        assert [m.ref for m in store.list()] == ["a@1", "a@2"]
    assert "a@3 has an unreadable manifest" in caplog.text
    with pytest.raises(AdapterNotFound):
        store.manifest("a", 3)
    assert store.resolve(AdapterRef("a")).ref == "a@2", "the bare name falls back to the latest readable version"
    assert [ref for ref, _ in Registry(store.root.parent).listing("t", {})] == ["a", "a@1", "a@2"]
    assert store.add(good, "a", base, MAX_RANK).version == 4, "its number is still never reused"


def test_a_version_deleted_while_listed_is_left_out(
    tmp_path: Path, good: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path / "store" / "t", "t")
    store.add(good, "a", base, MAX_RANK)
    store.add(good, "a", base, MAX_RANK)
    versions = AdapterStore.versions
    monkeypatch.setattr(AdapterStore, "versions", lambda self, name: versions(self, name) + [3])  # gone by its read
    assert [m.ref for m in store.list()] == ["a@1", "a@2"]


def test_the_tenants_listing_answers_despite_a_corrupt_or_vanished_version(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both were a 500 for the tenant's whole listing (`GET /admin/tenants/T/adapters`)."""
    store = api.app.state.services.registry.store("acme")  # type: ignore[attr-defined]
    corrupt(store, "bot", 2, "")
    versions = AdapterStore.versions
    monkeypatch.setattr(AdapterStore, "versions", lambda self, name: versions(self, name) + [9])
    response = api.get("/admin/tenants/acme/adapters")
    assert response.status_code == 200, response.text
    assert [(m["name"], m["version"]) for m in response.json()["data"]] == [("bot", 1), ("bot", 3)]
    assert api.get("/admin/tenants/acme/adapters/bot@2").status_code == 404


def test_a_deleted_tenants_version_with_a_corrupt_manifest_is_deleted_too(
    tmp_path: Path, good: Path, base: BaseModelSpec
) -> None:
    """Listings skip it; a tenant's deletion must not leave its weights behind (nor fail, as it did: a 500)."""
    registry = Registry(tmp_path / "store")
    store = registry.store("t")
    store.add(good, "a", base, MAX_RANK)
    store.add(good, "a", base, MAX_RANK)
    corrupt(store, "a", 1, "{")
    assert registry.remove_tenant("t") == ["t.a@2", "t.a@1"]
    assert not any(store.root.glob("a/v*")) and not any(store.root.glob("a/.trash*"))
    assert store.add(good, "a", base, MAX_RANK).version == 3, "numbers are still never reused"


def test_a_tenant_is_shown_its_adapters_not_the_hosts_paths(
    api: TestClient, tmp_path_factory: pytest.TempPathFactory, base: BaseModelSpec
) -> None:
    """Versions added from a folder on the gateway's host, or published by a training run, name where they came from
    relative to LORAGATE_HOME, or by the last part of a path elsewhere: a manage key saw `/home/op/...` before."""
    svc = api.app.state.services  # type: ignore[attr-defined]
    home = svc.settings.home
    elsewhere = make_adapter(tmp_path_factory.mktemp("operator") / "adapter", base, seed=5)
    run = home / "training" / "acme" / "run-1" / "adapter"
    config = {"endpoint": "http://10.0.0.5:8080", "jsonl_path": "/srv/data/tickets.jsonl", "label_pattern": "/P[1-4]/"}
    provenance = {"training": {"adapter_dir": str(run), "resumed_from": None}, "dataset_hash": "ab12", "config": config}
    svc.registry.store("acme").add(elsewhere, "bot", base, MAX_RANK, provenance=provenance)
    svc.registry.invalidate("acme", "bot")
    listed = api.get("/admin/tenants/acme/adapters").json()["data"]
    shown = api.get("/admin/tenants/acme/adapters/bot@4").json()
    assert "/" + str(home).strip("/") not in json.dumps(listed) and str(elsewhere.parent) not in json.dumps(shown)
    assert [m["source"]["origin"] for m in listed] == ["adapter1", "adapter2", "adapter3", "adapter"]
    assert shown["provenance"]["training"] == {"adapter_dir": "training/acme/run-1/adapter", "resumed_from": None}
    assert shown["provenance"]["dataset_hash"] == "ab12"
    kept = {"endpoint": "(set)", "jsonl_path": "tickets.jsonl", "label_pattern": "/P[1-4]/"}  # a regex is no path
    assert shown["provenance"]["config"] == kept
