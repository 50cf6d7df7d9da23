"""One error hierarchy and one mapper from it to OpenAI's envelope, for JSON responses and SSE frames.

`{"error": {"message", "type", "param", "code"}}` with the status OpenAI would use; nothing here
ever exposes a traceback.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
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
        self.headers: dict[str, str] = {}
        """Extra response headers (Retry-After and the rate-limit headers of a 429)."""
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
        shown = model if len(model) <= 256 else model[:256] + "..."  # a 100 KB name is not echoed whole
        super().__init__(f"The model `{shown}` does not exist or you do not have access to it.")  # param: null


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(APIError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class RateLimited(APIError):
    """OpenAI's 429: type `requests` or `tokens`, code `rate_limit_exceeded`."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.type = kind


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


class ClientClosed(APIError):
    """The client closed its connection before its request was read whole: nobody is left to answer. The
    status is nginx's 499 (`gateway.context.CLIENT_CLOSED`), for the log and the metrics only."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed"


class StateUnavailable(APIError):
    status = 503
    type = "server_error"
    code = "state_unavailable"


class UpstreamError(APIError):
    status = 502
    type = "server_error"
    code = "upstream_error"


NOT_RETRIED = {"x-should-retry": "false"}
"""OpenAI's SDKs retry a 5xx twice unless the answer says not to (this header): for an answer that the request itself
may have caused, a retry would take one more engine down each time, or wait out one more timeout."""


class EngineFailed(UpstreamError):
    """The engine failed while it had this request (it died, or answered 5xx): the gateway sends a request to one
    more replica at most, and tells clients not to retry it (NOT_RETRIED), or one SDK call reached six replicas."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers.update(NOT_RETRIED)


class UpstreamTimeout(APIError):
    """The engine sent nothing for the read timeout: not replayed elsewhere, nor retried by clients (NOT_RETRIED)."""

    status = 504
    type = "server_error"
    code = "upstream_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers.update(NOT_RETRIED)


def param_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "any"})


def _is_type_tag(part: int | str) -> bool:
    """pydantic names the members of a union in `loc` ('str', 'list[int]', 'TextPart'); fields are snake_case."""
    return isinstance(part, str) and (
        part in _TYPE_TAGS or "[" in part or part[:1].isupper() or part.startswith("function-")
    )


def _field_path(loc: Sequence[int | str]) -> tuple[int | str, ...]:
    """`loc` without FastAPI's leading request part ('body', 'query') and pydantic's union member tags."""
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    return tuple(part for part in loc if not _is_type_tag(part))


_EXPECTED = {
    "bool_type": "a boolean",
    "int_type": "an integer",
    "float_type": "a decimal",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "an object",
    "model_type": "an object",
}


def json_type(value: object) -> str:
    """What a JSON value is, in OpenAI's words."""
    if value is None:
        return "null"
    for kind, words in ((bool, "a boolean"), (int, "an integer"), (float, "a decimal"), (str, "a string")):
        if isinstance(value, kind):
            return words
    return "an array" if isinstance(value, list) else "an object"


def _inside_union(first: Mapping[str, Any], errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Where the first error is a union member refusing the value's JSON type, a member that took the type and
    refused something inside it is the one to name: `stop: [1]` is `stop[0]` not being a string (its
    `list[str]` member), not `stop` not being a string (its `str` member)."""
    raw = tuple(first.get("loc", ()))
    if not raw or not _is_type_tag(raw[-1]):
        return first
    loc = _field_path(raw)
    deepest, depth = first, len(loc)
    for error in errors:
        path = _field_path(error.get("loc", ()))
        if len(path) > depth and path[: len(loc)] == loc:
            deepest, depth = error, len(path)
    return deepest


def from_errors(errors: Sequence[Mapping[str, Any]], code: str | None = "invalid_value") -> InvalidRequest:
    """The first problem pydantic found, named the way OpenAI names params (`messages[0].role`); a value
    of the wrong JSON type is told as OpenAI tells it (code `invalid_type`)."""
    if not errors:
        return InvalidRequest("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":  # FastAPI's body parsing: its `loc` is a character offset
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return InvalidRequest(
            f"We could not parse the JSON body of your request ({reason}). The OpenAI API expects a JSON payload."
        )
    first = _inside_union(first, errors)
    loc = _field_path(first.get("loc", ()))
    members = [str(e["loc"][-1]) for e in errors if e.get("loc") and _field_path(e["loc"]) == loc]
    param = param_path(loc) or None
    message = str(first["msg"]).removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
    if len(members) > 1 and all(_is_type_tag(m) for m in members):
        message = f"Input has the wrong type; expected one of: {', '.join(members)}"
        if param and "input" in first:
            message = (
                f"Invalid type for '{param}': expected one of: {', '.join(members)}, "
                f"but got {json_type(first['input'])} instead."
            )
            return InvalidRequest(message, param=param, code="invalid_type")
    elif param and first.get("type") == "missing":  # OpenAI's own words and code
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    elif param and first.get("type") in _EXPECTED and "input" in first:
        expected, got = _EXPECTED[first["type"]], json_type(first["input"])
        message = f"Invalid type for '{param}': expected {expected}, but got {got} instead."
        return InvalidRequest(message, param=param, code="invalid_type")
    if param:
        message = f"Invalid value for '{param}': {message}"
    return InvalidRequest(message, param=param, code=code if loc else None)


def from_validation_error(exc: ValidationError) -> InvalidRequest:
    return from_errors(exc.errors(include_url=False))


def sse_error_event(exc: APIError) -> bytes:
    """A mid-stream failure as one SSE event."""
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\n"


def sse_error_frame(exc: APIError) -> bytes:
    """A mid-stream failure: one error event, then the terminator clients wait for."""
    return sse_error_event(exc) + b"data: [DONE]\n\n"


_INTERNALS = re.compile(
    r"""\b[a-z][a-z0-9+.-]{0,31}://[^\s'"`]+"""  # URLs (a bounded scheme: tried at every letter, in linear time)
    r"|\[[0-9a-f.]*:[0-9a-f.]*:[0-9a-f:.]*\](?::\d+)?"  # IPv6, bracketed (two colons: not `[99999999]`, `[0:5]`)
    r"|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"  # IPv4 addresses, with a port
    r"|\b(?:localhost|[a-z0-9-]+(?:\.[a-z0-9-]+)+):\d{2,5}\b"  # dotted host:port (aiohttp's "Cannot connect to host")
    r"|(?:(?<=host )|(?<=to )|(?<=from ))[a-z][a-z0-9-]*:\d{2,5}\b"  # a dotless one where a host is named
    r"""|(?<![\w/.:])/[\w.-]+(?:/[^\s/'"`]+)*/?""",  # absolute paths
    re.IGNORECASE,
)


def engine_refusal(message: str, param: object) -> InvalidRequest:
    """A request the engine refused (4xx), as the client gets it: its message with internals redacted, and its
    `param` where the engine named one (a string or null in OpenAI's envelope, whatever the engine sent)."""
    return InvalidRequest(redact_internals(message), param=param if isinstance(param, str) else None)


MAX_ENGINE_MESSAGE_CHARS = 2000
"""An engine's message passed on is cut to this first (it may echo a client's text: the redaction of a long one
took seconds on the event loop)."""


def redact_internals(message: str) -> str:
    """An engine's message with addresses and file paths taken out, for messages passed on to clients."""
    if len(message) > MAX_ENGINE_MESSAGE_CHARS:  # at a space: an address cut in two would not be found
        cut = message.rfind(" ", 0, MAX_ENGINE_MESSAGE_CHARS)
        message = message[: cut if cut > 0 else MAX_ENGINE_MESSAGE_CHARS] + " (cut)"
    return _INTERNALS.sub("<internal>", message)
