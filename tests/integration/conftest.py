"""Helpers for driving adapters through the real gateway and looking inside the real vLLM replicas."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from adapters.synthetic import make_adapter, tarball
from adapters.validate import BaseModelSpec
from tests.conftest import METRICS_KEY, TENANT, Gateway


def upload(admin: httpx.Client, name: str, folder: Path) -> httpx.Response:
    return admin.post(
        "/adapters", params={"name": name}, content=tarball(folder), headers={"content-type": "application/gzip"}
    )


def add_synthetic(admin: httpx.Client, base: BaseModelSpec, tmp: Path, name: str, seed: int, **kw: object) -> str:
    folder = make_adapter(tmp / f"{name}-{seed}", base, seed=seed, **kw)  # type: ignore[arg-type]
    resp = upload(admin, name, folder)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["name"]) + "@" + str(resp.json()["version"])


def loaded_on(port: int, tenant: str = TENANT) -> set[str]:
    """A tenant's adapter versions (`name@V`) a vLLM replica has registered, asked of vLLM itself (which
    knows them as `TENANT.name@V`)."""
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]
    prefix = f"{tenant}."
    return {m["id"].removeprefix(prefix) for m in models if m.get("parent") and m["id"].startswith(prefix)}


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """A gateway metric, summed over the samples whose labels match, read with Prometheus's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def engine_states(gateway: Gateway) -> dict[str, str]:
    """Each replica's state as /readyz?verbose=1 reports it to operators."""
    headers = {"Authorization": f"Bearer {METRICS_KEY}"}  # 30 s: asked while replicas restart, the CPU full
    resp = httpx.get(f"{gateway.url}/readyz", params={"verbose": 1}, headers=headers, timeout=30)
    return dict(resp.json()["engines"])


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.25)
    return check()
