"""A route class for the routes whose JSON body FastAPI parses (the admin API, `/v1/feedback`): the body is
parsed as the completion routes parse theirs (`gateway.body.parse_json_beside`), not by `json.loads`.

`json.loads` takes a lone surrogate (`"\\ud800"`) into a string that can be neither stored (Redis, JSON) nor
echoed in an answer: an error message naming it, or a comment holding it, failed as a 500. It also takes NaN,
Infinity and 1e400, which every float field would then have to refuse on its own. The body of a JSON request
is parsed before FastAPI's handler runs, so a refusal is worded as the completion routes word it, once the route's
dependencies have checked the key (a request without one is a 401 whatever its body, as the completion routes
answer); it is read as JSON whatever its Content-Type, as the completion routes read theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Scope

from gateway.body import parse_json_beside
from gateway.errors import InvalidRequest

_UNPARSED = object()
"""A body that did not parse, as FastAPI is handed it: no model takes it, so the route's dependencies (its key's
check first) run and its body then fails, and that failure is answered with why it did not parse."""


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = await parse_json_beside(await self.body())
        return self._json


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this type as JSON (`application/json`, `application/*+json`)."""
    kind = (content_type or "").partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _as_json(scope: Scope) -> Scope:
    """The request, its body typed as JSON: a route that takes a JSON body reads it whatever its Content-Type says,
    as the completion routes do (`curl -d` sends `application/x-www-form-urlencoded`: FastAPI then refused the
    body as "not a valid dictionary", with nothing said of the type)."""
    headers = [(name, value) for name, value in scope["headers"] if name.lower() != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", b"application/json")]}


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        takes_body = self.body_field is not None

        async def strict(request: Request) -> Response:
            scope = request.scope
            if takes_body and not _is_json(request.headers.get("content-type")):
                scope = _as_json(scope)
            strict_request = _StrictJSONRequest(scope, request.receive)
            unparsed: InvalidRequest | None = None
            if takes_body and await strict_request.body():
                try:
                    await strict_request.json()
                except InvalidRequest as exc:  # said once the key is checked: the dependencies run after the body
                    unparsed, strict_request._json = exc, _UNPARSED
            try:
                return await handle(strict_request)
            except RequestValidationError:
                if unparsed is not None:  # refused in OpenAI's words, rather than as FastAPI words it
                    raise unparsed from None
                raise

        return strict
