"""What the engine answered to one request (`Answer`): assembled from a stream's events as they pass, or parsed from
a whole body off the request path, in the record process.

Compiled with the record path (gateway.native): the record process parses every whole answer with it, and a gateway
process absorbs every stream event with it. A value of another type than the API's where a field is typed (a number
as `finish_reason`, say) is taken as absent, as it is where an `id` is not a string, so that the compiled module,
which checks typed values at run time, and the Python one keep the same answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pydantic_core

from gateway.records import Choice


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
        finish_reason = choice.get("finish_reason")
        if finish_reason and isinstance(finish_reason, str):
            parts.finish_reason = finish_reason

    def choices(self) -> list[Choice]:
        return [self._parts[index].choice(index) for index in sorted(self._parts)]

    def choice_dicts(self) -> list[dict[str, Any]]:
        if not self._parts:  # a whole answer not parsed yet, or no answer: taken for every request's record
            return []
        return [self._parts[index].as_dict(index) for index in sorted(self._parts)]
