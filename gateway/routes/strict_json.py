"""A route class for the routes whose JSON body FastAPI parses (the admin API, `/v1/feedback`): the body is
parsed as the completion routes parse theirs (`gateway.body.parse_json`), not by `json.loads`.

`json.loads` takes a lone surrogate (`"\\ud800"`) into a string that can be neither stored (Redis, JSON) nor
echoed in an answer: an error message naming it, or a comment holding it, failed as a 500. It also takes NaN,
Infinity and 1e400, which every float field would then have to refuse on its own. The body of a JSON request
is parsed before FastAPI's handler runs, so a refusal is worded as the completion routes word it.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from gateway.body import parse_json


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


def _is_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this type as JSON (`application/json`, `application/*+json`)."""
    kind = (content_type or "").partition(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        takes_body = self.body_field is not None

        async def strict(request: Request) -> Response:
            strict_request = _StrictJSONRequest(request.scope, request.receive)
            if takes_body and _is_json(request.headers.get("content-type")) and await strict_request.body():
                await strict_request.json()  # refused here, in OpenAI's words, rather than as FastAPI words it
            return await handle(strict_request)

        return strict
