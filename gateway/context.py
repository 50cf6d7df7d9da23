"""One request's context, from the moment its caller is known to its outcome: who called, what was
asked, which version served, what was answered, how long it took and how it ended.

Every completion request gets one (`RequestContext`) and hands it to the recorder when it ends,
whether it was answered, refused before forwarding, failed upstream or was cancelled by its
client. A stream's answer is assembled here event by event as the events pass to the client; a
whole answer is kept as the engine's bytes and parsed later, off the request path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pydantic_core

from gateway.records import Choice, Outcome
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
class _ChoiceParts:
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add_tool_calls(self, deltas: list[dict[str, Any]]) -> None:
        """Streamed tool calls arrive in pieces: the id and name first, the arguments in fragments."""
        for delta in deltas:
            call = self.tool_calls.setdefault(int(delta.get("index", 0)), {"type": "function", "function": {}})
            if delta.get("id"):
                call["id"] = delta["id"]
            function = delta.get("function") or {}
            if function.get("name"):
                call["function"]["name"] = function["name"]
            if function.get("arguments"):
                call["function"]["arguments"] = call["function"].get("arguments", "") + function["arguments"]

    def choice(self, index: int) -> Choice:
        return Choice.model_validate(self.as_dict(index))

    def as_dict(self, index: int) -> dict[str, Any]:
        """The choice as the log keeps it (no None fields)."""
        found: dict[str, Any] = {"index": index, "text": "".join(self.texts)}
        if self.finish_reason is not None:
            found["finish_reason"] = self.finish_reason
        if self.tool_calls:
            found["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return found


def _id(answer: dict[str, Any]) -> str | None:
    """An answer's (or chunk's) `id`, where it is a string as the API's are (another is not taken for one)."""
    found = answer.get("id")
    return found if isinstance(found, str) else None


@dataclass(slots=True)
class Answer:
    """What the engine answered: assembled from stream events as they pass, or a whole body parsed later."""

    completion_id: str | None = None
    usage: dict[str, int] | None = None
    body: bytes | None = None
    """A whole (non-stream) answer, parsed by `parse_body` off the request path."""
    _parts: dict[int, _ChoiceParts] = field(default_factory=dict)

    def feed(self, data: bytes) -> dict[str, Any] | None:
        """One stream event's JSON (`data: ` stripped); the chunk, parsed (None if it is not a JSON object)."""
        try:
            chunk = pydantic_core.from_json(data)
            if not isinstance(chunk, dict):
                return None
            self.completion_id = self.completion_id or _id(chunk)
            if isinstance(chunk.get("usage"), dict):
                self.usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                self._absorb(choice, "delta")
        except (ValueError, TypeError, AttributeError):
            return None  # an event of an unexpected shape is passed on all the same; the log misses it
        return chunk

    def parse_body(self) -> None:
        """Fill the answer from a whole JSON body (chat or text completion)."""
        if self.body is None:
            return
        body, self.body = self.body, None
        try:
            whole = pydantic_core.from_json(body)
            if not isinstance(whole, dict):
                return
            self.completion_id = _id(whole)
            self.usage = whole.get("usage") if isinstance(whole.get("usage"), dict) else None
            for choice in whole.get("choices") or ():
                self._absorb(choice, "message")
        except (ValueError, TypeError, AttributeError):
            return

    def _absorb(self, choice: dict[str, Any], key: str) -> None:
        """A choice of a chunk (`delta`: a piece) or of a whole answer (`message`); text completions
        carry `text` instead."""
        parts = self._parts.setdefault(int(choice.get("index", 0)), _ChoiceParts())
        inner = choice.get(key)
        text = inner.get("content") if isinstance(inner, dict) else choice.get("text")
        if isinstance(text, str):
            parts.texts.append(text)
        calls = inner.get("tool_calls") if isinstance(inner, dict) else None
        if calls:  # a whole answer's calls are complete and unnumbered; a stream's come in numbered pieces
            parts.add_tool_calls(calls if key == "delta" else [{"index": i, **c} for i, c in enumerate(calls)])
        if choice.get("finish_reason"):
            parts.finish_reason = choice["finish_reason"]

    def choices(self) -> list[Choice]:
        return [self._parts[index].choice(index) for index in sorted(self._parts)]

    def choice_dicts(self) -> list[dict[str, Any]]:
        if not self._parts:  # a whole answer not parsed yet, or no answer: taken for every request's record
            return []
        return [self._parts[index].as_dict(index) for index in sorted(self._parts)]


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
