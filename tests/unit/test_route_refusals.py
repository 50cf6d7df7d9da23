"""Refusals the routes FastAPI serves owe their callers: bodies parsed as the completion routes' are (a lone
surrogate, which could be neither stored nor echoed in an answer, is a 400 in OpenAI's envelope, not a 500), and a
key whose tenant is gone is a 401."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway.assignment import MAX_ARMS
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


def test_a_key_whose_tenant_is_gone_since_it_was_verified_gets_401_on_every_v1_route(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verified key is cached for up to a state poll: its tenant may be gone meanwhile. Every /v1 route answers
    as the completion routes do (401), not 500 (feedback's routes) or 200 (the model list)."""
    key = api.post("/admin/tenants/acme/keys", json={"role": "inference"}).json()["key"]
    auth = {"authorization": f"Bearer {key}"}
    assert api.get("/v1/models", headers=auth).status_code == 200  # verified, and cached

    async def gone(name: str) -> None:
        raise TenantNotFound(name)

    monkeypatch.setattr(api.app.state.services.tenants, "cached", gone)  # type: ignore[attr-defined]
    rating = {"completion_id": "chatcmpl-0123456789abcdef0123456789abcdef", "thumbs": "up"}
    for method, path, body in (
        ("GET", "/v1/models", None),
        ("GET", f"/v1/models/{BASE}", None),
        ("GET", "/v1/feedback?completion_id=chatcmpl-1", None),
        ("POST", "/v1/feedback", rating),
        ("POST", "/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}),
    ):
        answer = api.request(method, path, json=body, headers=auth)
        assert answer.status_code == 401, (path, answer.status_code, answer.text)
        assert "tenant no longer exists" in answer.json()["error"]["message"]


def test_the_tenant_in_the_path_is_checked_before_anything_else(api: TestClient) -> None:
    """A malformed tenant is a 400 naming `tenant` (not `expires`), an unknown one a 404 (not an empty list), and an
    empty end user's erasure a 400 (it answered 200 and left a tombstone for nobody)."""
    for method, url, body in (
        ("POST", "/admin/tenants/ZZ/keys", {"role": "inference"}),
        ("GET", "/admin/tenants/ZZ/keys", None),
        ("GET", "/admin/tenants/a:b/experiments", None),
    ):
        answer = api.request(method, url, json=body)
        error = answer.json()["error"]
        assert answer.status_code == 400 and (error["code"], error["param"]) == ("invalid_tenant", "tenant"), url
    answer = api.get("/admin/tenants/no-such/experiments")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "tenant_not_found", answer.text
    answer = api.post("/admin/tenants/acme/users//forget")
    error = answer.json()["error"]
    assert answer.status_code == 400 and (error["param"], error["code"]) == ("user", "invalid_user"), answer.text
    assert api.post("/admin/tenants/acme/users/u1/forget").status_code == 200, "a named user still is"


def test_a_training_key_reads_the_candidate_it_may_call_and_no_other_key_does(
    api: TestClient, base: BaseModelSpec, tmp_path: Path
) -> None:
    """A retraining run's key completes on its unpublished candidate (`name@V` exactly); retrieving that model was a
    404 for it all the same. Other keys still get the 404 any model they may not use gets."""
    svc = api.app.state.services  # type: ignore[attr-defined]
    folder = make_adapter(tmp_path / "candidate", base, seed=9)
    candidate = svc.registry.store("acme").add(folder, "bot", base, 16, listed=False)
    svc.registry.invalidate("acme", "bot")
    model = f"bot@{candidate.version}"
    for role, status in (("training", 200), ("inference", 404)):
        key = api.post("/admin/tenants/acme/keys", json={"role": role}).json()["key"]
        answer = api.get(f"/v1/models/{model}", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == status, (role, answer.text)
        if status == 200:
            assert answer.json()["id"] == model and answer.json()["parent"] == BASE


def test_a_missing_parameter_is_named_as_openai_names_it(api: TestClient) -> None:
    """OpenAI: `Missing required parameter: 'messages[0].role'.`, code `missing_required_parameter`; the gateway said
    `Invalid value for 'model': Field required` with code `invalid_value`, which clients branching on codes missed."""
    key = api.post("/admin/tenants/acme/keys", json={"role": "inference"}).json()["key"]
    auth = {"Authorization": f"Bearer {key}"}
    for body, param in (
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": BASE, "messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"model": BASE}, "messages"),
    ):
        answer = api.post("/v1/chat/completions", json=body, headers=auth)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"] == {
            "message": f"Missing required parameter: '{param}'.",
            "type": "invalid_request_error",
            "param": param,
            "code": "missing_required_parameter",
        }


def test_an_experiment_of_more_arms_than_an_experiment_takes_is_refused_before_any_lock(
    api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An 8 MiB body held 150,000 arms, and the route took a lock in Redis and looked on disk for each target before
    the 255-arm bound refused it."""

    def locked(*args: object) -> None:
        raise AssertionError("a lock was taken for the arms' targets")

    monkeypatch.setattr("gateway.routes.experiments.version_guard.pointing_at", locked)
    arms = [{"name": f"a{i}", "target": f"a{i}@1", "weight": 1} for i in range(MAX_ARMS + 1)]
    body = {"name": "e", "alias": "x", "control": "a0", "arms": arms}
    answer = api.post("/admin/tenants/acme/experiments", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "arms", answer.text
    assert api.get("/admin/tenants/acme/experiments").json()["data"] == []
