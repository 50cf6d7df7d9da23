"""Refusals the routes FastAPI serves owe their callers: bodies parsed as the completion routes' are (a lone
surrogate, which could be neither stored nor echoed in an answer, is a 400 in OpenAI's envelope, not a 500), and a
key whose tenant is gone is a 401."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from gateway.errors import AuthenticationFailed
from gateway.principal import Principal
from gateway.routes import callers_tenant
from gateway.tenants import TenantNotFound
from tests.unit.admin_api import BASE

LONE = '"\\ud800"'
"""A JSON string holding a lone surrogate: `json.loads` takes it, pydantic's parser does not."""


def _post(api: TestClient, method: str, url: str, body: str, **headers: str) -> dict[str, object]:
    answer = api.request(method, url, content=body, headers={"content-type": "application/json", **headers})
    assert answer.status_code == 400, (url, answer.status_code, answer.text)
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and "ud800" not in str(error), error
    return dict(error)


def test_lone_surrogates_in_bodies_are_refused_in_the_envelope(api: TestClient) -> None:
    _post(api, "PUT", "/admin/tenants/acme/aliases/a", f'{{"target": {LONE[:-1]}@1"}}')
    arms = f'[{{"name": "a", "target": "{BASE}", "weight": 1}}, {{"name": "b", "target": "bot@1", "weight": 1}}]'
    _post(
        api,
        "POST",
        "/admin/tenants/acme/experiments",
        f'{{"name": "e", "alias": "x", "control": {LONE}, "arms": {arms}}}',
    )
    key = api.post("/admin/tenants/acme/keys", json={"role": "inference"}).json()["key"]
    rating = f'{{"completion_id": "chatcmpl-0123456789abcdef0123456789abcdef", "thumbs": "up", "comment": {LONE}}}'
    _post(api, "POST", "/v1/feedback", rating, authorization=f"Bearer {key}")
    assert api.put("/admin/tenants/acme/aliases/a", json={"target": "bot@1"}).status_code == 200, "plain JSON still"
    assert api.get("/admin/tenants/acme/experiments").json()["data"] == []


async def test_a_key_whose_tenant_was_deleted_since_it_was_verified_gets_401_not_500() -> None:
    """A verified key is cached for up to a state poll: its tenant may be gone meanwhile (feedback's routes and
    the completion routes alike)."""

    class Gone:
        async def cached(self, name: str) -> None:
            raise TenantNotFound(name)

    svc = SimpleNamespace(tenants=Gone())
    caller = Principal(key_id="0123456789ab", tenant="acme", role="inference")
    with pytest.raises(AuthenticationFailed, match="tenant no longer exists"):
        await callers_tenant(svc, caller)  # type: ignore[arg-type]
