"""What loragate stores about each request and each rating of it: the shapes of the completion log
and of feedback, and each tenant's policy for them.

These are boundary models: the recorder writes them, the feedback API reads and writes them, the
exports (and, later, experiments and retraining) read them. Every record carries the tenant, the
alias and the version that served, and room for the experiment and arm that chose it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.phones import supported_regions

PIIKind = Literal["email", "phone", "card", "iban", "ip"]
ALL_PII: list[PIIKind] = ["email", "phone", "card", "iban", "ip"]
Outcome = Literal["ok", "error", "cancelled"]


class LogPolicy(BaseModel):
    """A tenant's policy for its completion log and feedback."""

    model_config = ConfigDict(extra="forbid", strict=True)

    content: bool = Field(
        True, description="Store prompts, responses and corrections; false keeps metadata only (who, what, how long)."
    )
    redact: list[PIIKind] = Field(
        default_factory=lambda: list(ALL_PII),
        description="PII replaced by a placeholder before anything is stored: email, phone, card, iban, ip.",
    )
    phone_region: str = Field(
        "US",
        description="Where phone numbers written without a country code are from (ISO 3166, e.g. GB): "
        "`020 7946 0958` is a number in GB, not in the US. Numbers with a +country code are found in any region.",
    )
    max_records: int = Field(100_000, ge=100, description="Completion records kept (the oldest are trimmed).")
    max_age_days: float = Field(30.0, gt=0, le=3650, description="Completion records older than this are trimmed.")
    score_min: float = Field(0.0, description="Lowest feedback score accepted.")
    score_max: float = Field(1.0, description="Highest feedback score accepted.")

    @field_validator("phone_region")
    @classmethod
    def _region(cls, region: str) -> str:
        region = region.upper()  # `gb` is GB
        if region not in supported_regions():
            raise ValueError(f"phone_region must be a region code such as US or GB, not {region[:8]!r}")
        return region

    @model_validator(mode="after")
    def _range(self) -> LogPolicy:
        if not (math.isfinite(self.score_min) and math.isfinite(self.score_max)) or self.score_min >= self.score_max:
            raise ValueError("score_min must be below score_max")
        return self

    @property
    def max_age_s(self) -> int:
        return age_seconds(self.max_age_days)


def age_seconds(days: float) -> int:
    """A policy's `max_age_days` in whole seconds (one at least)."""
    return max(int(days * 86400), 1)


class Choice(BaseModel):
    index: int
    text: str | None = None
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class CompletionRecord(BaseModel):
    """One request, as the completion log keeps it (one entry of the tenant's Redis Stream)."""

    id: str
    """The response's id (`chatcmpl-...`, `cmpl-...`); `req-<request id>` for a request with no answer."""
    request_id: str
    tenant: str
    key_id: str | None = None
    user: str | None = None
    endpoint: Literal["chat", "completions"]
    model: str
    """The `model` the client asked for."""
    alias: str | None = None
    experiment: str | None = None
    arm: str | None = None
    adapter: str | None = None
    """The adapter that served (`name`, or `owner/name` when shared); None for the base model."""
    version: int | None = None
    served_model: str | None = None
    stream: bool = False
    request: dict[str, Any] | None = None
    """messages (or prompt) and the sampling parameters; None when the tenant keeps no content."""
    choices: list[Choice] | None = None
    """The answer per choice; None when the tenant keeps no content or there was no answer."""
    usage: dict[str, int] | None = None
    status: int
    outcome: Outcome
    error_type: str | None = None
    created: float
    latency_ms: float | None = None
    ttft_ms: float | None = None
    """Time to the first token of a stream."""
    redactions: dict[str, int] = Field(default_factory=dict)
    truncated: bool = False
    """A string of the request or answer was longer than the log keeps, and was cut."""

    @property
    def text(self) -> str | None:
        """The first choice's text."""
        return self.choices[0].text if self.choices else None


MAX_CORRECTION_CHARS = 100_000
"""A correction's characters at most: a string, or a message's content and its calls together (`chars`)."""


class CorrectionFunction(BaseModel):
    """The function a corrected answer calls, as OpenAI's API spells a tool call's: `arguments` is JSON text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1)
    arguments: str


class CorrectionCall(BaseModel):
    """A tool call of a corrected answer (`id` optional: exports keep no answer's call ids; a streamed call's `index`
    is its place, dropped)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = None
    type: Literal["function"] = "function"
    function: CorrectionFunction

    @model_validator(mode="before")
    @classmethod
    def _as_streamed(cls, value: Any) -> Any:
        return {k: v for k, v in value.items() if k != "index"} if isinstance(value, dict) else value


RESPONSE_ONLY = ("refusal", "annotations", "audio", "function_call", "reasoning_content", "reasoning")
"""Fields of a chat completion's message that a correction copied from an answer carries empty: dropped (a filled one
is refused, as any field a correction does not keep)."""


class CorrectionMessage(BaseModel):
    """A correction that calls tools: the ideal answer as an assistant message, as a chat completion's `message`
    holds one (its text in `content`, none or "" for calls alone). Stored redacted, as a string correction is.
    Gateways of a release before it read a stored one as no feedback they know (a rolling upgrade: README)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[CorrectionCall] = Field(default_factory=list, max_length=32)

    @model_validator(mode="before")
    @classmethod
    def _as_answered(cls, value: Any) -> Any:
        """A message as a chat completion holds it (the SDK's `message.model_dump()`): its empty response-only fields
        dropped, `tool_calls: null` read as none."""
        if not isinstance(value, dict):
            return value
        kept = {k: v for k, v in value.items() if not (k in RESPONSE_ONLY and v in (None, []))}
        if "tool_calls" in kept and kept["tool_calls"] is None:
            del kept["tool_calls"]
        return kept

    def chars(self) -> int:
        """Its characters: content, and each call's id, name and arguments (MAX_CORRECTION_CHARS)."""
        calls = (
            len(call.id or "") + len(call.function.name) + len(call.function.arguments) for call in self.tool_calls
        )
        return len(self.content or "") + sum(calls)


CHARS_PER_TOKEN = 4
"""Characters a token, as OpenAI counts English text: what a prompt reserves, and a rating stores, of a tokens limit
(gateway.quotas)."""


class FeedbackIn(BaseModel):
    """`POST /v1/feedback`: a rating (thumbs and/or score) and/or a correction of one completion."""

    model_config = ConfigDict(extra="forbid", strict=True)

    completion_id: str = Field(min_length=1, max_length=200)
    user: str | None = Field(None, max_length=256, description="The end user rating; one rating per user.")
    thumbs: Literal["up", "down"] | None = None
    score: float | None = Field(None, description="A number in the tenant's declared range (default 0 to 1).")
    correction: str | CorrectionMessage | None = Field(
        None,
        description="The ideal answer: its text, or an assistant message with `tool_calls` (and `content`) where the "
        f"ideal answer calls tools. {MAX_CORRECTION_CHARS:,} characters at most (a message's content and calls "
        "together).",
    )
    comment: str | None = Field(None, max_length=10_000)
    labels: list[str] = Field(default_factory=list, max_length=32)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str]) -> list[str]:
        if any(not 1 <= len(label) <= 64 for label in labels):
            raise ValueError("each label must be 1 to 64 characters")
        return labels

    @field_validator("correction")
    @classmethod
    def _correction(cls, correction: str | CorrectionMessage | None) -> str | CorrectionMessage | None:
        if isinstance(correction, CorrectionMessage):
            if not correction.content and not correction.tool_calls:
                raise ValueError("a correction message needs content or tool_calls")
            for i, call in enumerate(correction.tool_calls):
                _check_call(i, call)
            chars = correction.chars()
        else:
            chars = len(correction) if correction is not None else 1
        if not 1 <= chars <= MAX_CORRECTION_CHARS:
            raise ValueError(f"a correction must be 1 to {MAX_CORRECTION_CHARS:,} characters")
        return correction

    @field_validator("score", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)  # JSON has one number type: 1 is as good a score as 1.0
            except OverflowError:
                raise ValueError("score must be a finite number") from None
        return value

    def tokens(self) -> int:
        """What the text it stores counts against a tokens-per-minute limit: its correction, comment, labels and end
        user, a token for every CHARS_PER_TOKEN characters (one at least)."""
        correction = self.correction
        chars = correction.chars() if isinstance(correction, CorrectionMessage) else len(correction or "")
        chars += len(self.comment or "") + sum(map(len, self.labels)) + len(self.user or "")
        return max(math.ceil(chars / CHARS_PER_TOKEN), 1)

    @model_validator(mode="after")
    def _something(self) -> FeedbackIn:
        if self.thumbs is None and self.score is None and self.correction is None:
            raise ValueError("feedback needs at least one of thumbs, score or correction")
        if self.score is not None and not math.isfinite(self.score):
            raise ValueError("score must be a finite number")
        return self


_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A function's name as OpenAI's API takes it."""


def _not_a_number(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e400: Python reads it as infinity, JSON readers elsewhere refuse or null it
        raise ValueError(f"{text} is out of range")
    return number


def strict_json(text: str) -> Any:
    """`text` read as strict JSON: `NaN`, `Infinity` and numbers out of a double's range, which Python's reader
    takes and other readers (and `datasets`, which makes them null) do not, raise ValueError."""
    return json.loads(text, parse_constant=_not_a_number, parse_float=_finite)


def _check_call(i: int, call: CorrectionCall) -> None:
    """A correction's call as the ideal answer should make it: a function name the API takes, arguments that are a
    JSON object (as a function's parameters are). Checked on what was sent (redaction may change both)."""
    if not _FUNCTION_NAME.fullmatch(call.function.name):
        raise ValueError(f"tool_calls[{i}].function.name must be 1 to 64 letters, digits, underscores or dashes")
    try:
        arguments = strict_json(call.function.arguments)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read
        arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"tool_calls[{i}].function.arguments must be a JSON object (as text), such as '{{}}'")


class Feedback(FeedbackIn):
    """Feedback as stored and returned. The lengths FeedbackIn allows are checked on what was sent: redaction can
    lengthen a string a little (`a@b.cc` becomes `[EMAIL]`), so what is stored is read back without them. Fields it
    does not know are ignored: a later release's, or what only the scripts read (`counted`, gateway.feedback), so that
    during a rolling upgrade a gateway of this release still reads what one of the next wrote."""

    model_config = ConfigDict(extra="ignore")

    correction: str | CorrectionMessage | None = Field(None, description="The ideal answer.")
    comment: str | None = None
    labels: list[str] = Field(default_factory=list)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str]) -> list[str]:  # FeedbackIn's, not checked again
        return labels

    @field_validator("correction")
    @classmethod
    def _correction(cls, correction: str | CorrectionMessage | None) -> str | CorrectionMessage | None:  # FeedbackIn's
        return correction

    object: Literal["feedback"] = "feedback"
    id: str = Field(default_factory=lambda: f"fb-{uuid.uuid4().hex}")
    created: float = Field(description="When it was given (Unix time, by the records Redis's clock).")
    redactions: dict[str, int] = Field(default_factory=dict)
    score_range: tuple[float, float] | None = Field(
        None,
        description="The tenant's score range when the score was given: its judgement stays what it was when the "
        "range changes later (none for a rating without a score, or kept before 2026-12-07: the range now).",
    )


def stored_feedback(stored: dict[str, str]) -> list[Feedback]:
    """The ratings of one completion as its hash keeps them (end user -> JSON), oldest first; one that cannot be read
    (a shape only a later release knows) is logged and left out, not the reason the others cannot be read."""
    found = []
    for user, value in stored.items():
        try:
            found.append(Feedback.model_validate_json(value))
        except ValueError as exc:  # pydantic's ValidationError is one
            logging.getLogger("loragate.feedback").warning("feedback of user %r unreadable, left out: %s", user, exc)
    return sorted(found, key=lambda feedback: feedback.created)
