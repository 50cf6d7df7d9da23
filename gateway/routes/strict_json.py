"""A route class for the routes whose JSON body FastAPI parses (the admin API, `/v1/feedback`): the body is
parsed as the completion routes parse theirs (gateway.body), by pydantic's parser, not `json.loads`.

`json.loads` takes a lone surrogate (`"\\ud800"`) into a string that can be neither stored (Redis, JSON) nor
echoed in an answer: an error message naming it, or a comment holding it, failed as a 500. pydantic's parser
refuses it, and the request gets FastAPI's usual 400 for a body that is not valid JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError as exc:  # as json.loads fails: FastAPI answers it as a body that is not JSON
                raise json.JSONDecodeError(str(exc), "", 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handle(_StrictJSONRequest(request.scope, request.receive))

        return strict
