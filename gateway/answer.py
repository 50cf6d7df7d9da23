"""What the engine answered to one request (`Answer`): assembled from a stream's events as they pass, or parsed from
a whole body off the request path, in the record process.

Compiled with the record path (gateway.native): the record process parses every whole answer with it, and a gateway
process absorbs every stream event with it. What the log keeps of an answer is taken only where it has the API's type:
an `id`, a `finish_reason`, a tool call's id, name and arguments that are not strings are taken as absent (a number
there, or a NaN, which pydantic_core reads from an upstream's JSON, would be kept as Python takes it and refused by the
compiled module, which checks typed values at run time), so that both keep the same answer and the record is JSON.
An event or a body of an unexpected shape is passed on all the same; the log misses what it could not read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pydantic_core

from gateway.records import Choice

_UNREADABLE = (ValueError, TypeError, AttributeError, OverflowError)
"""What reading an event or a body of an unexpected shape raises (OverflowError: an `index` of 1e400, read as inf)."""


def parse_chunk(data: bytes) -> dict[str, Any] | None:
    """One stream event's JSON (`data: ` stripped), parsed; None if it is not a JSON object."""
    try:
        chunk = pydantic_core.from_json(data)
    except _UNREADABLE:
        return None
    return chunk if isinstance(chunk, dict) else None


@dataclass(slots=True)
class _ChoiceParts:
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add_tool_calls(self, deltas: list[dict[str, Any]]) -> None:
        """Streamed tool calls arrive in pieces: the id and name first, the arguments in fragments."""
        for delta in deltas:
            call = self.tool_calls.setdefault(int(delta.get("index", 0)), {"type": "function", "function": {}})
            if (call_id := _text(delta.get("id"))) is not None:
                call["id"] = call_id
            function = delta.get("function") or {}
            if (name := _text(function.get("name"))) is not None:
                call["function"]["name"] = name
            if (arguments := _text(function.get("arguments"))) is not None:
                call["function"]["arguments"] = call["function"].get("arguments", "") + arguments

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


def _text(value: object) -> str | None:
    """A string the API sends (an answer's or a tool call's id, a name, a fragment of arguments), where it is one
    and not empty (another is not taken for one)."""
    return value if isinstance(value, str) and value else None


@dataclass(slots=True)
class Answer:
    """What the engine answered: assembled from stream events as they pass, or a whole body parsed later."""

    completion_id: str | None = None
    usage: dict[str, int] | None = None
    body: bytes | None = None
    """A whole (non-stream) answer, parsed by `parse_body` off the request path."""
    _parts: dict[int, _ChoiceParts] = field(default_factory=dict)

    def feed(self, data: bytes) -> dict[str, Any] | None:
        """One stream event's JSON (`data: ` stripped) into the answer; the chunk, parsed (None if it is not a JSON
        object, or not one of a chunk's shape)."""
        chunk = parse_chunk(data)
        return chunk if chunk is not None and self.take(chunk) else None

    def take(self, chunk: dict[str, Any]) -> bool:
        """A parsed stream chunk into the answer (False: not of a chunk's shape; the log misses what it holds)."""
        try:
            self.completion_id = self.completion_id or _text(chunk.get("id"))
            if isinstance(chunk.get("usage"), dict):
                self.usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                self._absorb(choice, "delta")
        except _UNREADABLE:
            return False  # an event of an unexpected shape is passed on all the same
        return True

    def parse_body(self) -> None:
        """Fill the answer from a whole JSON body (chat or text completion)."""
        if self.body is None:
            return
        body, self.body = self.body, None
        try:
            whole = pydantic_core.from_json(body)
            if not isinstance(whole, dict):
                return
            self.completion_id = _text(whole.get("id"))
            self.usage = whole.get("usage") if isinstance(whole.get("usage"), dict) else None
            for choice in whole.get("choices") or ():
                self._absorb(choice, "message")
        except _UNREADABLE:
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
            parts.add_tool_calls(calls if key == "delta" else [{**c, "index": i} for i, c in enumerate(calls)])
        if (finish_reason := _text(choice.get("finish_reason"))) is not None:
            parts.finish_reason = finish_reason

    def choices(self) -> list[Choice]:
        return [self._parts[index].choice(index) for index in sorted(self._parts)]

    def choice_dicts(self) -> list[dict[str, Any]]:
        if not self._parts:  # a whole answer not parsed yet, or no answer: taken for every request's record
            return []
        return [self._parts[index].as_dict(index) for index in sorted(self._parts)]
