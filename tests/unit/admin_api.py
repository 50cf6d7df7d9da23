"""What tests of the in-process admin API (the `api` fixture of tests/unit/conftest.py) share."""

from __future__ import annotations

from typing import Any

ADMIN = {"Authorization": "Bearer admin-secret-0123456789"}
BASE = "base-model"
"""The base model's served name in those tests."""


def refused(response: Any, status: int, code: str, kind: str = "invalid_request_error") -> str:
    """The message of an OpenAI-style refusal with this status, code and type."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == kind, error
    return str(error["message"])
