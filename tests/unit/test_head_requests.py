"""HEAD on the feedback export: the headers a GET would send, validated as a GET is, without running the export."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from gateway.routes import feedback

EXPORT = "/admin/tenants/acme/feedback/export?format=sft"


def test_head_on_the_export_runs_no_export(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[str] = []
    real = feedback.export

    async def counted(*args: Any, **kwargs: Any) -> None:
        runs.append(args[1])
        await real(*args, **kwargs)

    monkeypatch.setattr(feedback, "export", counted)
    got, head = api.get(EXPORT), api.head(EXPORT)
    assert (got.status_code, head.status_code, head.content) == (200, 200, b"")
    assert head.headers["content-type"] == got.headers["content-type"] == "application/x-ndjson"
    assert runs == ["acme"], "the GET ran the export, the HEAD did not"
    assert api.head("/admin/tenants/nobody/feedback/export?format=sft").status_code == 404
    bad_format = "/admin/tenants/acme/feedback/export?format=csv"
    assert api.head(bad_format).status_code == api.get(bad_format).status_code == 400
