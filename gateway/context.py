"""One request's context, from the moment its caller is known to its outcome: who called, what was
asked, which version served, what was answered, how long it took and how it ended.

Every completion request gets one (`RequestContext`) and hands it to the recorder when it ends,
whether it was answered, refused before forwarding, failed upstream or was cancelled by its
client. Its `answer` (gateway.answer) assembles a stream's answer event by event as the events pass to
the client; a whole answer is kept as the engine's bytes and parsed later, off the request path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.answer import Answer
from gateway.records import Outcome
from gateway.routing import Route
from gateway.tenants import Tenant

CLIENT_CLOSED = 499
"""Status recorded (nginx's convention) for a request whose client left before its answer was done."""


MAX_USER_CHARS = 256
"""End user names are cut to this (in records, and in erasures, which must find them)."""

USER_HEADER = "x-loragate-user"
"""The header that names a request's end user where its body does not."""


def user_from_header(value: str | None) -> str | None:
    """The end user an `x-loragate-user` header names (None for none). Starlette reads header values as latin-1,
    which is what `requests`, `http.client` and browsers send for `José`; clients that send UTF-8 bytes (httpx given
    bytes, curl, most servers) would be recorded as `JosÃ©` and not erased as `José`. So the bytes are read as
    UTF-8 where they are UTF-8 (a latin-1 name almost never is), else as latin-1."""
    if not value:
        return None
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:  # not UTF-8: the latin-1 reading stands (a str Starlette did not make may not be latin-1)
        return value


@dataclass(slots=True)
class RequestContext:
    """One completion request, as far as it got."""

    request_id: str
    endpoint: str
    """"chat" or "completions"."""
    tenant: Tenant
    """The tenant's settings when the request came (its log policy decides what is kept)."""
    key_id: str | None
    payload: dict[str, Any]
    """The request as it was sent on (after the gateway's own changes, e.g. the max_tokens cap)."""
    validated: bool = False
    """The payload passed validation: only then is its content recorded."""
    sent: bytes | None = None
    """The payload's JSON as sent to the engine: the log parses it off the request path."""
    header_user: str | None = None
    """The end user named by an `x-loragate-user` header, decoded (`user_from_header`); the body's `user` wins."""
    received: float = field(default_factory=time.time)
    started: float = field(default_factory=time.perf_counter)
    route: Route | None = None
    answer: Answer = field(default_factory=Answer)
    status: int = 0
    outcome: Outcome = "ok"
    error_type: str | None = None
    first_token_s: float | None = None
    latency_s: float | None = None

    @property
    def user(self) -> str | None:
        """The end user the application named: OpenAI's `user`, its newer `safety_identifier`, or the
        `x-loragate-user` header."""
        for name in ("user", "safety_identifier"):
            value = self.payload.get(name)
            if isinstance(value, str) and value:
                return value[:MAX_USER_CHARS]
        return self.header_user[:MAX_USER_CHARS] if self.header_user else None

    @property
    def stream(self) -> bool:
        return self.payload.get("stream") is True

    def first_token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started

    def finish(self, status: int, error_type: str | None = None) -> None:
        """The request ended with `status`: 499 is a cancellation, 4xx/5xx an error (of `error_type`)."""
        if self.latency_s is not None:
            return  # already finished: the first ending is the true one
        self.latency_s = time.perf_counter() - self.started
        self.status = status
        if status == CLIENT_CLOSED:
            self.outcome = "cancelled"
        elif status >= 400:
            self.outcome = "error"
            self.error_type = error_type or ("server_error" if status >= 500 else "invalid_request_error")
