"""Exception handlers: every failure leaves the gateway as an OpenAI envelope; unexpected ones are
logged, never shown."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.errors import APIError, InvalidRequest, NotFound, PayloadTooLarge, StateUnavailable, from_errors

log = logging.getLogger("loragate.errors")


def _respond(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _respond(exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _respond(from_errors(exc.errors(), code=None))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    kinds: dict[int, type[APIError]] = {404: NotFound, 405: InvalidRequest, 413: PayloadTooLarge}
    error = kinds.get(exc.status_code, InvalidRequest)(str(exc.detail))
    error.status = exc.status_code
    return _respond(error)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=exc)
    return _respond(APIError("The server had an error while processing your request."))


async def _state_error(_: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis failed under a request: %r", exc)
    return _respond(StateUnavailable("loragate's state store is unavailable right now; try again shortly."))


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RedisError, _state_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
