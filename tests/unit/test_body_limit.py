"""Bodies FastAPI reads whole (the admin API's JSON, feedback) are capped as the completion routes' are: 413 in
OpenAI's envelope, declared or chunked, before any route runs; an adapter upload keeps its own limit."""

from __future__ import annotations

import json
from collections.abc import Iterator

from starlette.testclient import TestClient

from tests.unit.admin_api import refused

OVER = 8 * 1024 * 1024 + 1  # the default LORAGATE_MAX_BODY_BYTES, and one byte


def chunked(size: int) -> Iterator[bytes]:
    """A body with no declared length, sent in pieces."""
    yield b'{"name": "'
    for _ in range(size // 65536 + 1):
        yield b"a" * 65536
    yield b'"}'


def test_an_admin_body_past_the_cap_is_a_413(api: TestClient) -> None:
    for body in (b" " * OVER, chunked(OVER)):
        answer = api.post("/admin/tenants", content=body, headers={"content-type": "application/json"})
        assert "exceeds the limit" in refused(answer, 413, "request_too_large") or "bytes; the limit" in answer.text
    assert "x-request-id" in answer.headers
    feedback = api.post("/v1/feedback", content=b" " * OVER, headers={"content-type": "application/json"})
    assert feedback.status_code == 413
    assert api.post("/admin/tenants", json={"name": "small"}).status_code == 201, "a body under the cap goes on"


def test_a_rating_within_its_schema_is_never_too_large(api: TestClient) -> None:
    """Every field at its longest, every character an escaped surrogate pair (12 bytes): read, then refused only for
    its unknown completion (404), not as too large (413: at 256 KiB, 100,000 "é" as `json.dumps` writes them were)."""
    key = api.post("/admin/tenants/acme/keys", json={"role": "inference"}).json()["key"]
    rating = {
        "completion_id": "chatcmpl-" + "0" * 191,
        "user": "🙂" * 256,
        "thumbs": "up",
        "correction": "🙂" * 100_000,
        "comment": "🙂" * 10_000,
        "labels": ["🙂" * 64] * 32,
    }
    body = json.dumps(rating).encode()
    assert len(body) > 1_300_000
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    answer = api.post("/v1/feedback", content=body, headers=headers)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "completion_not_found", answer.text[:300]
