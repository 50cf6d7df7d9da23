"""Adapter requests the filesystem cannot serve (a version number too long for a folder name, an archive whose
members clash on disk) are refused as OpenAI-style 4xx errors naming no server path, never answered 500."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from adapters.archive import safe_extract
from adapters.manifest import InvalidAdapter
from adapters.store import AdapterNotFound, AdapterStore
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from tests.unit.admin_api import refused

HUGE_VERSION = 10**300
"""Its folder name, `v1000…0`, is longer than any filesystem allows (ENAMETOOLONG, not ENOENT)."""


def clashing_tarball(folder: Path, folder_first: bool = False) -> bytes:
    """An adapter's files, plus the weights again under a path that runs through the config *file*
    (`adapter_config.json/adapter_model.safetensors`): unpacking it fails with NotADirectoryError, or with
    IsADirectoryError where that member comes first (the config is then written over a folder)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        clash = (folder / "adapter_model.safetensors", "adapter_config.json/adapter_model.safetensors")
        if folder_first:
            tar.add(*clash)
        for entry in sorted(folder.iterdir()):
            tar.add(entry, arcname=entry.name)
        if not folder_first:
            tar.add(*clash)
    return buffer.getvalue()


def test_a_version_too_long_for_a_folder_name_is_not_found(tmp_path: Path, base: BaseModelSpec) -> None:
    """The name's folder exists (else the lookup stops there, at ENOENT, before the long name is seen)."""
    store = AdapterStore(tmp_path / "store" / "t", "t")
    store.add(make_adapter(tmp_path / "a", base, seed=1), "a", base, 16)
    with pytest.raises(AdapterNotFound) as found:
        store.manifest("a", HUGE_VERSION)
    assert str(tmp_path) not in str(found.value)


@pytest.mark.parametrize("version", [HUGE_VERSION, 1_000_000_000, 0, -1])
def test_a_pin_to_a_version_out_of_range_is_a_400_naming_version(api: TestClient, version: int) -> None:
    """The bound is AdapterRef's (`name@N`, 1 <= N < 10**9): no version past it can ever be stored."""
    response = api.put("/admin/tenants/acme/adapters/bot/pin", json={"version": version})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "version"), error
    assert str(HUGE_VERSION) not in error["message"], "the value is not echoed"
    pinned = api.put("/admin/tenants/acme/adapters/bot/pin", json={"version": 2}).json()
    assert pinned["resolves_to"] == "bot@2", "the bound leaves real versions pinnable"
    assert api.put("/admin/tenants/acme/adapters/bot/pin", json={"version": None}).json()["pinned"] is None


@pytest.mark.parametrize("folder_first", [False, True])
def test_an_archive_whose_members_clash_on_disk_is_invalid(
    tmp_path: Path, base: BaseModelSpec, folder_first: bool
) -> None:
    archive = tmp_path / "clash.tar.gz"
    archive.write_bytes(clashing_tarball(make_adapter(tmp_path / "a", base, seed=1), folder_first))
    with pytest.raises(InvalidAdapter, match="cannot be unpacked") as refusal:
        safe_extract(archive, tmp_path / "unpacked")
    assert str(tmp_path) not in str(refusal.value) and "/" not in str(refusal.value)


def test_an_upload_whose_members_clash_on_disk_is_a_400(api: TestClient, tmp_path: Path, base: BaseModelSpec) -> None:
    api.app.state.services._base_spec = base  # type: ignore[attr-defined]
    body = clashing_tarball(make_adapter(tmp_path / "a", base, seed=4))
    response = api.post(
        "/admin/tenants/acme/adapters",
        params={"name": "clash"},
        content=body,
        headers={"Content-Type": "application/gzip"},
    )
    message = refused(response, 400, "invalid_adapter")
    assert "cannot be unpacked" in message and "/" not in message, message
    assert api.get("/admin/tenants/acme/adapters/clash").status_code == 404, "nothing was stored"
