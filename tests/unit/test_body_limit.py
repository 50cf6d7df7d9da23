"""Bodies FastAPI reads whole (the admin API's JSON, feedback) are capped as the completion routes' are: 413 in
OpenAI's envelope, declared or chunked, before any route runs; an adapter upload keeps its own limit."""

from __future__ import annotations

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
