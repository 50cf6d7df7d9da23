"""Probes stay open; what only operators should see (metrics, per-replica readiness) needs a key."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ADMIN_KEY, METRICS_KEY, Gateway

pytestmark = pytest.mark.integration


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_probes_are_open_and_say_only_up_or_ready(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}


def test_operators_see_which_part_is_ready(gateway: Gateway) -> None:
    for key in (METRICS_KEY, ADMIN_KEY):
        detail = httpx.get(f"{gateway.url}/readyz", params={"verbose": 1}, headers=bearer(key))
        assert detail.status_code == 200
        assert detail.json()["redis"] == "ok"
        assert set(detail.json()["engines"].values()) == {"ok"}
        assert len(detail.json()["engines"]) == len(gateway.engine_ports)


def test_metrics_need_the_metrics_or_admin_key(gateway: Gateway, api_key: str) -> None:
    for headers in ({}, bearer(api_key), bearer("wrong")):
        for resp in (
            httpx.get(f"{gateway.url}/metrics", headers=headers),
            httpx.get(f"{gateway.url}/readyz", params={"verbose": 1}, headers=headers),
        ):
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
            assert "loragate_" not in resp.text and "127.0.0.1" not in resp.text
    for key in (METRICS_KEY, ADMIN_KEY):
        resp = httpx.get(f"{gateway.url}/metrics", headers=bearer(key))
        assert resp.status_code == 200 and "loragate_requests_total" in resp.text
