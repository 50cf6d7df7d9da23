"""Exception handlers: every failure leaves the gateway as an OpenAI envelope; unexpected ones are
logged, never shown."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from gateway.errors import (
    APIError,
    ClientClosed,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    StateUnavailable,
    from_errors,
)

log = logging.getLogger("loragate.errors")


def _respond(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _respond(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _respond(from_errors(exc.errors(), code=None))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no route for the path, a method the route does not take), worded as
    OpenAI words them; a 405 keeps its `Allow` header."""
    assert isinstance(exc, HTTPException)
    asked = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        error: APIError = NotFound(f"Invalid URL ({asked})")
        error.code = None  # as OpenAI answers an unknown URL
    elif exc.status_code == 405:
        error = InvalidRequest(f"Invalid method for URL ({asked})")
    else:
        error = (PayloadTooLarge if exc.status_code == 413 else InvalidRequest)(str(exc.detail))
    error.status = exc.status_code
    error.headers = dict(exc.headers or {})
    return _respond(error)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Starlette calls this from its outermost middleware, outside gateway.request_id's: the id that
    middleware gave the request (it shares the scope) is added here, so the 500 names it as well, with the
    rate-limit headers of a request that was admitted (its quota counted it)."""
    state = request.scope.get("state", {})
    request_id = state.get("request_id")
    log.exception("unexpected error (request %s)", request_id, exc_info=exc)
    error = APIError("The server had an error while processing your request.")
    error.headers = dict(state.get("response_headers") or {})
    if request_id:
        error.headers["x-request-id"] = request_id
    return _respond(error)


async def _client_gone(_: Request, exc: Exception) -> Response:
    """The client left while its request was being read: nobody to answer, nothing to log but a line."""
    log.debug("client closed the connection mid-request: %r", exc)
    return Response(status_code=ClientClosed.status)


async def _state_error(_: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis failed under a request: %r", exc)
    return _respond(StateUnavailable("loragate's state store is unavailable right now; try again shortly."))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RedisError, _state_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
