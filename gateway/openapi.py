"""The OpenAPI description served at /openapi.json: request bodies, answers, and OpenAI's error envelope.

The OpenAI routes read and validate their bodies themselves (a size cap, OpenAI's error words), so
FastAPI cannot see those bodies: `json_body` describes them from the same pydantic models, in the
route's `openapi_extra`. Each route's decorator also says what it answers (`answer`) and which errors
its handler raises (`errors`). What follows from a route's shape is added by `finish`, for every route
alike: the Bearer scheme on routes that authenticate, with 401, 403 and 503 (keys live in Redis); 400
on routes that take query parameters or a body (FastAPI's own validation errors are answered 400 by
gateway.error_handlers, never FastAPI's 422, whose model is taken out).

/openapi.json needs no key, as OpenAI's published spec needs none: it describes routes and models
only, and names no tenant, key, adapter or address (paths hold `{tenant}` placeholders).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.responses import Response
from starlette.routing import BaseRoute

from gateway.auth import authenticate
from gateway.protocol import ErrorResponse

ABOUT = (
    "An OpenAI-compatible gateway serving many LoRA adapters on one shared base model. Send a key as "
    "`Authorization: Bearer KEY`: a tenant's key for /v1, the admin key or a tenant's manage key for /admin. "
    'Every error is OpenAI\'s envelope `{"error": {"message", "type", "param", "code"}}`.'
)
REF = "#/components/schemas/{model}"
BEARER: dict[str, list[str]] = {"bearer": []}

ERRORS: dict[int, str] = {
    400: "The request is malformed or a value is out of range (`param` names the field).",
    401: "No API key, or one that is unknown, revoked or expired.",
    403: "The key may not do this: the admin key on /v1, a tenant's key on admin routes or on another tenant.",
    404: "Not found: the tenant, model, adapter, alias, key, experiment or completion named.",
    409: "A conflict: the name is taken, the thing changed meanwhile or is in use, or a limit is reached.",
    408: "The body took longer to arrive than this gateway waits for it.",
    413: "The body is larger than this gateway accepts.",
    422: "The engine could not process this well-formed request.",
    429: "Over the tenant's or the key's requests or tokens per minute, or (uploads) the gateway's adapter uploads at "
    "once; Retry-After says when to retry.",
    502: "The engine failed while processing the request.",
    503: "An engine replica, the adapter or the state store (Redis) is unavailable right now; retry shortly.",
    504: "The engine was silent for too long.",
}


def schema_of(model: type[BaseModel], mode: JsonSchemaMode = "validation") -> dict[str, Any]:
    """A $ref to the model, with its definitions beside it (`finish` moves them into components)."""
    refs, definitions = models_json_schema([(model, mode)], ref_template=REF)
    return {**refs[(model, mode)], "$defs": definitions.get("$defs", {})}


def json_body(model: type[BaseModel], description: str | None = None) -> dict[str, Any]:
    """`openapi_extra` of a route whose handler reads its JSON body itself."""
    body: dict[str, Any] = {"required": True, "content": {"application/json": {"schema": schema_of(model)}}}
    if description:
        body["description"] = description
    return {"requestBody": body}


def binary_body(media_type: str, description: str) -> dict[str, Any]:
    """`openapi_extra` of a route whose body is a file, streamed by its handler."""
    content = {media_type: {"schema": {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "description": description, "content": content}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses` for the errors a handler raises: OpenAI's envelope, always JSON."""
    envelope = {"application/json": {"schema": schema_of(ErrorResponse, "serialization")}}
    return {status: {"description": ERRORS[status], "content": envelope} for status in statuses}


def event_stream(*chunks: type[BaseModel]) -> dict[str, Any]:
    """The media type object of a server-sent event stream, each event's data one of `chunks` as JSON
    (or OpenAI's error envelope, when the engine fails mid-stream), the last one `[DONE]`."""
    members: tuple[type[BaseModel], ...] = (*chunks, ErrorResponse)
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [schema_of(member, "serialization") for member in members]},
    }
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"anyOf": [{"const": "[DONE]"}, json_data]},
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
        "description": "One server-sent event: a JSON chunk, an error event if the engine fails mid-stream, "
        "or the last one, `data: [DONE]`.",
    }
    return {"text/event-stream": {"schema": event}}


def answer(model: type[BaseModel], description: str, status: int = 200, **extra: Any) -> dict[int | str, Any]:
    """`responses` for what a handler answers when the handler's return type does not say it."""
    return {status: {"model": model, "description": description, **extra}}


class JSONLines(Response):
    """The media type of an answer of JSON lines (exports), for the schema; handlers stream their own."""

    media_type = "application/x-ndjson"


class DescribedAPI(FastAPI):
    """FastAPI whose schema is finished by `finish` the first time it is asked for."""

    def openapi(self) -> dict[str, Any]:
        if not self.openapi_schema:
            finish(super().openapi(), self.routes)
        assert self.openapi_schema is not None
        return self.openapi_schema


def _dependencies(dependant: Dependant) -> Iterator[Dependant]:
    for dependency in dependant.dependencies:
        yield dependency
        yield from _dependencies(dependency)


def authenticates(route: APIRoute) -> bool:
    return any(d.call is authenticate for d in _dependencies(route.dependant))


def _operations(schema: dict[str, Any], routes: Sequence[BaseRoute]) -> Iterator[tuple[APIRoute, dict[str, Any]]]:
    for route in routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            for method in sorted(route.methods):
                yield route, schema["paths"][route.path_format][method.lower()]


def _hoist(node: Any, into: dict[str, Any]) -> None:
    """Move every `$defs` found under `node` into the components' schemas (one name, one schema)."""
    if isinstance(node, list):
        for item in node:
            _hoist(item, into)
    if not isinstance(node, dict):
        return
    for name, definition in node.pop("$defs", {}).items():
        if into.setdefault(name, definition) != definition:
            raise RuntimeError(f"two different schemas are named {name} in the OpenAPI description")
    for value in node.values():
        _hoist(value, into)


def finish(schema: dict[str, Any], routes: Sequence[BaseRoute]) -> None:
    components = schema.setdefault("components", {})
    components["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "A tenant's API key, or the admin key."}
    }
    implied = errors(400, 401, 403, 503)
    for route, operation in _operations(schema, routes):
        responses = operation["responses"]
        if "HTTPValidationError" in str(responses.get("422", {})):
            del responses["422"]
        shape: list[int] = []
        if authenticates(route):
            operation["security"] = [BEARER]
            shape += [401, 403, 503]
        if "requestBody" in operation or any(p["in"] == "query" for p in operation.get("parameters", [])):
            shape.append(400)
        for status in shape:
            responses.setdefault(str(status), implied[status])
        operation["responses"] = dict(sorted(responses.items()))
    _hoist(schema["paths"], components.setdefault("schemas", {}))
    if "HTTPValidationError" not in str(schema["paths"]):
        for name in ("HTTPValidationError", "ValidationError"):
            components["schemas"].pop(name, None)
