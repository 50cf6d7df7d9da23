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
