"""One error hierarchy and one mapper from it to OpenAI's envelope, for JSON responses and SSE frames.

`{"error": {"message", "type", "param", "code"}}` with the status OpenAI would use; nothing here
ever exposes a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.", param="model"
        )


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnprocessableEntity(APIError):
    status = 422
    type = "invalid_request_error"


class EngineUnavailable(APIError):
    status = 503
    type = "server_error"
    code = "engine_unavailable"


class AdapterUnavailable(APIError):
    status = 503
    type = "server_error"
    code = "adapter_unavailable"


class StateUnavailable(APIError):
    status = 503
    type = "server_error"
    code = "state_unavailable"


class UpstreamError(APIError):
    status = 502
    type = "server_error"
    code = "upstream_error"


def _param_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def from_validation_error(exc: ValidationError) -> InvalidRequest:
    """The first problem pydantic found, named the way OpenAI names params (`messages[0].role`)."""
    first = exc.errors(include_url=False)[0]
    loc = tuple(part for part in first["loc"] if not (isinstance(part, str) and part.startswith("function-")))
    param = _param_path(loc) or None
    message = first["msg"]
    if param:
        message = f"Invalid value for '{param}': {message}"
    return InvalidRequest(message, param=param, code="invalid_value" if loc else None)


def sse_error_frame(exc: APIError) -> bytes:
    """A mid-stream failure: one error event, then the terminator clients wait for."""
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\ndata: [DONE]\n\n"


def install_handlers(app: Any) -> None:
    """Every failure leaves the gateway as an OpenAI envelope; unexpected ones are logged, not shown."""
    import logging

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    log = logging.getLogger("loragate.errors")

    def respond(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return respond(exc)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, (RequestValidationError, ValidationError))
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = tuple(p for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        param = _param_path(loc) or None
        return respond(InvalidRequest(f"Invalid value for '{param}': {first['msg']}" if param else first["msg"],
                                      param=param))

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kinds: dict[int, type[APIError]] = {404: NotFound, 405: InvalidRequest, 413: PayloadTooLarge}
        error = kinds.get(exc.status_code, InvalidRequest)(str(exc.detail))
        error.status = exc.status_code
        return respond(error)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return respond(APIError("The server had an error while processing your request."))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
