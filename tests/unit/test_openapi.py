"""/openapi.json describes every route: its request body, its answers, and OpenAI's error envelope."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
import schemathesis
from fastapi.routing import APIRoute
from pydantic import SecretStr
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.errors import AuthenticationFailed, InvalidRequest, ModelNotFound
from gateway.openapi import authenticates
from gateway.settings import Settings

ENGINE = "http://10.9.8.7:8123"
BODILESS = {
    ("POST", "/admin/tenants/{tenant}/experiments/{name}/pause"),
    ("POST", "/admin/tenants/{tenant}/experiments/{name}/resume"),
    ("POST", "/admin/tenants/{tenant}/experiments/{name}/stop"),
    ("POST", "/admin/tenants/{tenant}/experiments/{name}/rollback"),
    ("POST", "/admin/tenants/{tenant}/users/{user}/forget"),
}
"""Actions whose path says everything: no body. Every other POST, PUT and PATCH must describe one."""
READ_THEMSELVES = {
    ("POST", "/v1/chat/completions"): "ChatCompletionRequest",
    ("POST", "/v1/completions"): "CompletionRequest",
    ("POST", "/v1/feedback"): "FeedbackIn",
}
"""Routes that read and validate their JSON body themselves (size cap, OpenAI's error words)."""
ENVELOPE = {"$ref": "#/components/schemas/ErrorResponse"}
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def app() -> Any:
    settings = Settings(served_model_name="secret-base-name", admin_key=SecretStr("admin-secret-0123456789"))
    return create_app(settings, engine_urls=[ENGINE])


@pytest.fixture(scope="module")
def spec(app: Any) -> dict[str, Any]:
    # Not `with TestClient(app)`: the lifespan (Redis, vLLM) is not needed to describe the routes.
    response = TestClient(app).get("/openapi.json")  # no Authorization header: it is public
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def operations(app: Any) -> list[tuple[APIRoute, str]]:
    return [(route, method) for route in app.routes if isinstance(route, APIRoute) for method in sorted(route.methods)]


def test_every_route_is_described_with_its_body_and_answer(app: Any, spec: dict[str, Any]) -> None:
    found = operations(app)
    assert len(found) >= 40
    for route, method in found:
        operation = spec["paths"][route.path_format][method.lower()]
        assert any(status.startswith("2") for status in operation["responses"]), (method, route.path_format)
        takes_body = method in ("POST", "PUT", "PATCH") and (method, route.path_format) not in BODILESS
        assert ("requestBody" in operation) == takes_body, (method, route.path_format)
        if (method, route.path_format) in READ_THEMSELVES:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{READ_THEMSELVES[method, route.path_format]}"}
        for status, answered in operation["responses"].items():
            assert answered.get("content"), f"{method} {route.path_format} {status} has no content described"


def test_every_error_is_the_openai_envelope(app: Any, spec: dict[str, Any]) -> None:
    for route, method in operations(app):
        operation = spec["paths"][route.path_format][method.lower()]
        responses = operation["responses"]
        not_ready = route.path_format == "/readyz"  # its 503 is its own answer: {"status": "not ready"}
        failures = {s: r for s, r in responses.items() if int(s) >= 400 and not (not_ready and s == "503")}
        if route.path_format != "/healthz":
            assert failures, f"{method} {route.path_format} documents no error"
        for status, failure in failures.items():
            assert failure["content"] == {"application/json": {"schema": ENVELOPE}}, (method, route.path_format, status)
        if authenticates(route):
            assert operation["security"] == [{"bearer": []}]
            assert {"401", "403", "503"} <= set(responses), (method, route.path_format)
        if "requestBody" in operation or any(p["in"] == "query" for p in operation.get("parameters", [])):
            assert "400" in responses, f"{method} {route.path_format}: bad input is a 400"
    generation = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"413", "429", "502", "504"} <= set(generation)
    assert set(generation["200"]["content"]) == {"application/json", "text/event-stream"}


def test_the_envelope_schema_is_what_the_gateway_sends(spec: dict[str, Any]) -> None:
    """FastAPI's 422 validation model is gone: the gateway answers 400 with the envelope."""
    text = json.dumps(spec)
    assert "HTTPValidationError" not in text and "$defs" not in text
    case = schemathesis.openapi.from_dict(spec)["/v1/models/{model_id}"]["GET"].Case(path_parameters={"model_id": "m"})
    for error in (AuthenticationFailed("no key"), ModelNotFound("m")):
        case.validate_response(answer(error.status, "application/json", error.body()), checks=CHECKS)
    with pytest.raises(BaseExceptionGroup):
        envelope = {"error": {"message": "no type, param or code"}}
        case.validate_response(answer(404, "application/json", envelope), checks=CHECKS)


def test_the_schema_names_no_tenant_setting_or_address(spec: dict[str, Any]) -> None:
    text = json.dumps(spec)
    for secret in ("secret-base-name", "admin-secret", "10.9.8.7", "8123"):
        assert secret not in text


def test_schemathesis_can_generate_a_request_for_every_operation(spec: dict[str, Any]) -> None:
    loaded = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in loaded.get_all_operations()]
    assert len(operations) == sum(len(methods) for methods in spec["paths"].values())


def test_a_stream_is_described_event_by_event(spec: dict[str, Any]) -> None:
    """Each event's data is a chunk or the error envelope as JSON, or the closing [DONE]; anything else
    breaks the schema, so the fuzzer catches a malformed stream."""
    operation = schemathesis.openapi.from_dict(spec)["/v1/chat/completions"]["POST"]
    case = operation.Case(body={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    delta = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]}
    usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    failed = InvalidRequest("engine failed").body()

    def stream(*events: object) -> schemathesis.Response:
        body = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)
        return answer(200, "text/event-stream", body)

    case.validate_response(stream(delta, usage, failed, b"[DONE]"), checks=CHECKS)
    for wrong in ({**delta, "object": "chat.completion"}, b"not json"):
        with pytest.raises(BaseExceptionGroup):
            case.validate_response(stream(wrong, b"[DONE]"), checks=CHECKS)


def answer(status: int, media_type: str, body: object) -> schemathesis.Response:
    """A response as schemathesis checks it."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = requests.Request("GET", "http://gateway/").prepare()
    return schemathesis.Response(status, {"content-type": [media_type]}, content, request, 0.1, True)
