"""What tests of the in-process admin API (the `api` fixture of tests/unit/conftest.py) share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.synthetic import make_adapter

if TYPE_CHECKING:
    from starlette.testclient import TestClient

    from adapters.validate import BaseModelSpec

ADMIN = {"Authorization": "Bearer admin-secret-0123456789"}
BASE = "base-model"
"""The base model's served name in those tests."""


def refused(response: Any, status: int, code: str, kind: str = "invalid_request_error") -> str:
    """The message of an OpenAI-style refusal with this status, code and type."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == kind, error
    return str(error["message"])


def experiment_on_a_withdrawn_share(api: TestClient, tmp_path: Path, base: BaseModelSpec, control_weight: int) -> None:
    """`acme`'s experiment `borrow` behind the alias `helper`: arm `control` on `bot@1`, arm `lent` on `beta/tool@1`,
    which `beta` shared with `acme` and then stopped sharing."""
    assert api.post("/admin/tenants", json={"name": "beta"}).status_code == 201
    svc = api.app.state.services  # type: ignore[attr-defined]
    svc.registry.store("beta").add(make_adapter(tmp_path / "tool", base, seed=7), "tool", base, 16)
    svc.registry.invalidate("beta", "tool")
    assert api.put("/admin/tenants/beta/adapters/tool/share", json={"tenants": ["acme"]}).status_code == 200
    arms = [
        {"name": "control", "target": "bot@1", "weight": control_weight},
        {"name": "lent", "target": "beta/tool@1", "weight": 1},
    ]
    body = {"name": "borrow", "alias": "helper", "control": "control", "arms": arms}
    assert api.post("/admin/tenants/acme/experiments", json=body).status_code == 201
    assert api.put("/admin/tenants/beta/adapters/tool/share", json={"tenants": []}).status_code == 200
