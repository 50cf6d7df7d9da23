"""Turning finished requests into completion records under each tenant's policy: taken on the event loop as
a plain tuple (`raw_row`, a `RawRecord`'s values), built in the record process (gateway.record_worker) or a thread.

- content kept: the request's messages or prompt and its parameters, each choice's text, finish reason
  and tool calls, with PII redacted (gateway.redaction); strings longer than MAX_CHARS are cut there
  and the record says `truncated`;
- metadata only: who, what model and version, tokens, timings, outcome; the answer is not even parsed.
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
import pydantic_core

from gateway.answer import Answer
from gateway.context import RequestContext
from gateway.records import age_seconds
from gateway.redaction import LONG_NUMBER, Findings, Redactor, map_strings

REQUEST_FIELDS = ("messages", "prompt", "suffix", "tools", "tool_choice", "response_format")
"""What of a request is content (kept only when the tenant keeps content); every other field is a parameter."""
DROPPED_FIELDS = ("model", "user", "safety_identifier", "stream_options", "cache_salt")
"""Not kept as parameters: named elsewhere in the record, or the gateway's own (the per-tenant cache salt)."""
API_NUMBERS = frozenset(
    {"seed", "n", "best_of", "max_tokens", "max_completion_tokens", "min_tokens", "top_k", "logprobs", "top_logprobs"}
)
"""Parameters of the API whose whole numbers are kept as they are: the other long ones, wherever they are, are
redacted as their digits (`gateway.redaction.map_strings`)."""
MAX_CHARS = 32_768
"""Longest string kept in a record (prompts and answers beyond it are cut, and the record says so)."""
LATENCY_BUCKETS_MS = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 600_000)
"""Latency histogram of experiment arms (p50 and p95 are read from it)."""
LONGEST_FINDING = 256
"""Past a cut, this much more of a string is redacted before it is cut (an e-mail address has at most 254)."""
REMEMBERED_CHARS = 1 << 19
"""Characters of redacted text each policy's redactor remembers (the conversation so far and the system prompt come
again in every turn's request): at most 64 redactors, 32 M characters, in each record process."""
MAX_RECORD_CHARS = 262_144
"""Past this, a record loses the request's tool definitions and schemas."""
MAX_KEPT_CHARS = 2_097_152
"""Past this, a record loses its request's words (`_bounded`): a tenant's records fill the Redis every tenant shares,
and a request of 8 MiB (a few hundred messages cut at MAX_CHARS) stored one of that size."""
_ID = re.compile(rb'"id"\s*:\s*"([^"]{1,200})"')


class RawRecord(NamedTuple):
    """A finished request as the record process needs it, taken on the event loop as a plain tuple of its values
    (`raw_row`): nothing parsed, redacted or copied (about 1.3 µs to take), so that the work itself happens beside
    it. Its lists (the policy's `redact`) are the tenant's own until pickled: a policy is replaced, never changed."""

    request_id: str
    tenant: str
    tenant_created: float | None
    key_id: str | None
    user: str | None
    endpoint: str
    stream: bool
    model: str
    alias: str | None
    experiment: str | None
    arm: str | None
    adapter: str | None
    version: int | None
    served_model: str | None
    usage: dict[str, Any] | None
    completion_id: str | None
    choices: list[dict[str, Any]] | None
    """A stream's choices, assembled as it passed (content kept only)."""
    status: int
    outcome: str
    error_type: str | None
    received: float
    latency_s: float | None
    first_token_s: float | None
    request: dict[str, Any] | None
    """The request's content and parameters, when it was not sent on (otherwise parsed from `sent`)."""
    sent: bytes | None
    """The request's JSON as sent to the engine (content kept, and valid)."""
    body: bytes | None
    """A whole answer (content kept)."""
    content: bool
    redact: list[str]
    """The tenant's policy's list as it is (sorted, and hashable, in the record process: `_redactor`)."""
    max_records: int
    max_age_days: float
    phone_region: str = "US"


RawRow = tuple[Any, ...]
"""A `RawRecord`'s values as a plain tuple: what the gateway takes per request (a plain tuple is made and pickled
in a fraction of a named one's time; the record process reads it as a `RawRecord`)."""


def raw_record(context: RequestContext, clock_offset_s: float = 0.0) -> RawRecord:
    """A finished request's raw record (`raw_row`, named)."""
    return RawRecord._make(raw_row(context, clock_offset_s))


def raw_row(context: RequestContext, clock_offset_s: float = 0.0) -> RawRow:
    """`clock_offset_s`: the records Redis's clock minus this host's (a record is dated by Redis's clock)."""
    policy, route, answer = context.tenant.logging, context.route, context.answer
    content = policy.content
    completion_id = answer.completion_id
    if completion_id is None and answer.body is not None and not content:  # the answer itself is not kept
        found = _ID.search(answer.body[:512])
        completion_id = found.group(1).decode() if found else None
    valid = content and context.validated
    return (
        context.request_id, context.tenant.name, context.tenant.created, context.key_id, context.user,
        context.endpoint, context.stream,
        route.requested if route is not None else str(context.payload.get("model", ""))[:200],
        *((route.alias, route.experiment, route.arm, route.adapter_label) if route is not None else (None,) * 4),
        route.adapter.version if route is not None and route.adapter is not None else None,
        route.served_model if route is not None else None,
        answer.usage, completion_id, (answer.choice_dicts() or None) if content else None,
        context.status, context.outcome, context.error_type, context.received + clock_offset_s, context.latency_s,
        context.first_token_s,
        request_of(context.payload) if valid and context.sent is None else None,
        context.sent if valid else None, answer.body if content else None,
        content, policy.redact if content else [], policy.max_records, policy.max_age_days, policy.phone_region,
    )  # fmt: skip


_SENT, _BODY = RawRecord._fields.index("sent"), RawRecord._fields.index("body")


def row_size(row: RawRow) -> int:
    """What a raw record holds, as far as it is known without work: the request sent on and the answer (the bulk of
    it; a request refused before it was sent on, kept as parsed, is not counted)."""
    return len(row[_SENT] or b"") + len(row[_BODY] or b"")


def build_entries(raws: list[RawRecord]) -> list[dict[str, Any]]:
    """What the recorder writes (and spools) for each request: the record's JSON and how to keep it. Runs
    in the record process (or a thread): whole answers parsed, prose cut and redacted, JSON encoded."""
    entries = []
    for raw in raws:
        try:
            entries.append(_entry(raw))
        except Exception:  # noqa: BLE001 (one record of an unexpected shape must not cost the batch)
            logging.getLogger("loragate.recorder").exception("completion record %s not built", raw.request_id)
    return entries


def _entry(raw: RawRecord) -> dict[str, Any]:
    record = record_of(raw)
    if raw.sent is not None:
        record["request"] = request_of(pydantic_core.from_json(raw.sent))
    if raw.body is not None:
        answer = Answer(body=raw.body)
        answer.parse_body()
        record["id"] = answer.completion_id or record["id"]
        record["choices"] = answer.choice_dicts() or None
    if record["request"] is not None or record["choices"] is not None:
        _clean(record, _redactor(tuple(sorted(raw.redact)), raw.phone_region))
    text = _bounded(record, record_json(record))
    usage = record["usage"] or {}
    return {
        "id": record["id"],
        "tenant": raw.tenant,
        "user": raw.user,
        "record": text,
        "max_records": raw.max_records,
        "ttl": age_seconds(raw.max_age_days),
        "created": raw.received,
        "experiment": raw.experiment,
        "arm": raw.arm,
        "error": int(arm_error(raw.outcome, raw.status)),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "latency_bucket": latency_bucket(record["latency_ms"]),
        "tenant_created": raw.tenant_created,
    }


def record_json(record: dict[str, Any]) -> str:
    """A record's JSON: orjson's, the same text as pydantic_core's in half the time (about 3 µs a record instead of
    6), or pydantic_core's for what orjson does not take (an integer past 64 bits, which a request may hold)."""
    try:
        return orjson.dumps(record).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return pydantic_core.to_json(record).decode()


def arm_error(outcome: str, status: int) -> bool:
    """Whether a request counts as an error of its experiment arm (what `max_error_rate` judges): one the arm failed
    (5xx: its engine or adapter), or a 404 (routed, so its target: an arm the tenant can no longer use). Not what the
    caller got wrong (a prompt over the context, a bad parameter: the engine's 400s): one end user's bad requests,
    always assigned to the same arm, rolled it back."""
    return outcome == "error" and (status >= 500 or status == 404)


def latency_bucket(latency_ms: float | None) -> str:
    """The upper bound (ms) of the histogram bucket a latency falls in ('' for none)."""
    if latency_ms is None:
        return ""
    return str(LATENCY_BUCKETS_MS[min(bisect.bisect_left(LATENCY_BUCKETS_MS, latency_ms), len(LATENCY_BUCKETS_MS) - 1)])


@functools.lru_cache(maxsize=64)
def _redactor(kinds: tuple[str, ...], phone_region: str) -> Redactor:
    return Redactor(kinds, phone_region, remember_chars=REMEMBERED_CHARS)


def _clean(record: dict[str, Any], redactor: Redactor) -> None:
    """Cut and redact the words of a record: every string of the request's messages (content and its parts, names,
    the tool calls of earlier turns), prompts, suffix and parameters (`metadata`, `stop`), and the answers' text and
    tool calls (as an earlier turn's). Tool definitions and schemas, the application's own, are kept as they are.
    What straddles a cut is redacted whole before it is cut."""
    counts = Findings()

    def clean(text: str) -> str:
        if len(text) > MAX_CHARS:
            record["truncated"] = True
            redacted = redactor.redact_into(text[: MAX_CHARS + LONGEST_FINDING], counts)
            if len(text) <= MAX_CHARS + LONGEST_FINDING:  # the slice held it all: nothing was cut in two
                return redacted[:MAX_CHARS]
            # The last LONGEST_FINDING characters may hold a finding the slice cut in two (so not found): never kept,
            # wherever redaction before it (placeholders are shorter) has moved them.
            return redacted[: min(MAX_CHARS, len(redacted) - LONGEST_FINDING)]
        return redactor.redact_into(text, counts) if len(text) > 5 else text

    request = record["request"]
    for field in ("messages", "prompt", "suffix", "params") if request else ():
        if field in request:
            request[field] = map_strings(request[field], clean) if field != "params" else _params(request[field], clean)
    if request and redactor.kinds and (tokens := _token_ids(request.get("prompt"))):
        request["prompt"] = []  # they read back as the text they encode, PII and all, with the model's tokenizer
        counts["token_ids"] += tokens
    for choice in record["choices"] or ():
        if isinstance(choice.get("text"), str):
            choice["text"] = clean(choice["text"])
        if choice.get("tool_calls"):  # as a later turn's request holds them: name and arguments, the id if no label
            choice["tool_calls"] = map_strings(choice["tool_calls"], clean)
    record["redactions"] = dict(counts)


def _bounded(record: dict[str, Any], text: str) -> str:
    """The record's JSON within MAX_RECORD_CHARS while its tools and schemas can go, and within MAX_KEPT_CHARS:
    past that it keeps no request, then no answers (more words than any context holds; each string is cut already,
    but a request may hold thousands of them). A record that loses anything says so (`truncated`)."""
    for drop, limit in ((("tools", "tool_choice", "response_format"), MAX_RECORD_CHARS), ((), MAX_KEPT_CHARS)):
        if len(text) <= limit or not record["request"]:
            continue
        record["truncated"] = True
        for field in drop:
            record["request"].pop(field, None)
        if not drop:
            record["request"] = None
        text = record_json(record)
    if len(text) > MAX_KEPT_CHARS and record["choices"]:
        record["truncated"], record["choices"] = True, None
        text = record_json(record)
    return text


def _params(params: dict[str, Any], clean: Callable[[str], str]) -> dict[str, Any]:
    """A request's parameters redacted, but for the long whole numbers of API_NUMBERS: no phone number in a seed."""
    kept = {k: params[k] for k in API_NUMBERS.intersection(params) if type(params[k]) is int}
    if not any(not -LONG_NUMBER < number < LONG_NUMBER for number in kept.values()):
        return map_strings(params, clean)  # (nearly every request: no long number to keep)
    return {**map_strings({k: v for k, v in params.items() if k not in kept}, clean), **kept}


def _token_ids(prompt: object) -> int:
    """How many token ids a text completion's prompt holds (one list of them, or a batch of such lists)."""
    if not isinstance(prompt, list):
        return 0
    return sum(1 for item in prompt if isinstance(item, int)) + sum(
        sum(1 for token in item if isinstance(token, int)) for item in prompt if isinstance(item, list)
    )


def request_of(payload: dict[str, Any]) -> dict[str, Any]:
    """A request as the log keeps it: its content fields, and every other field under `params`."""
    request = {k: v for k, v in payload.items() if k in REQUEST_FIELDS}
    request["params"] = {k: v for k, v in payload.items() if k not in REQUEST_FIELDS and k not in DROPPED_FIELDS}
    return request


def record_of(raw: RawRecord) -> dict[str, Any]:
    """A request as a completion record (the fields of records.CompletionRecord), before its JSON sent and
    its whole answer are read (`_entry`) and before redaction."""
    return {
        "id": raw.completion_id or f"req-{raw.request_id}",
        "request_id": raw.request_id,
        "tenant": raw.tenant,
        "key_id": raw.key_id,
        "user": raw.user,
        "endpoint": raw.endpoint,
        "model": raw.model,
        "alias": raw.alias,
        "experiment": raw.experiment,
        "arm": raw.arm,
        "adapter": raw.adapter,
        "version": raw.version,
        "served_model": raw.served_model,
        "stream": raw.stream,
        "request": raw.request,
        "choices": raw.choices,
        "usage": {k: v for k, v in (raw.usage or {}).items() if isinstance(v, int)} or None,
        "status": raw.status,
        "outcome": raw.outcome,
        "error_type": raw.error_type,
        "created": raw.received,
        "latency_ms": round(raw.latency_s * 1000, 3) if raw.latency_s is not None else None,
        "ttft_ms": round(raw.first_token_s * 1000, 3) if raw.first_token_s is not None else None,
        "redactions": {},
        "truncated": False,
    }
