"""Turning finished requests into completion records under each tenant's policy (in a worker thread).

- content kept: the request's messages or prompt and its parameters, each choice's text, finish reason
  and tool calls, with PII redacted (gateway.redaction); strings longer than MAX_CHARS are cut there
  and the record says `truncated`;
- metadata only: who, what model and version, tokens, timings, outcome; the answer is not even parsed.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pydantic_core

from gateway.context import Answer, RequestContext
from gateway.redaction import Redactor

REQUEST_FIELDS = ("messages", "prompt", "suffix", "tools", "tool_choice", "response_format")
"""What of a request is content (kept only when the tenant keeps content); every other field is a parameter."""
DROPPED_FIELDS = ("model", "user", "safety_identifier", "stream_options", "cache_salt")
"""Not kept as parameters: named elsewhere in the record, or the gateway's own (the per-tenant cache salt)."""
MAX_CHARS = 32_768
"""Longest string kept in a record (prompts and answers beyond it are cut, and the record says so)."""
LATENCY_BUCKETS_MS = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 600_000)
"""Latency histogram of experiment arms (p50 and p95 are read from it)."""
MAX_RECORD_CHARS = 262_144
"""Past this, a record loses the request's tool definitions and schemas."""
_ID = re.compile(rb'"id"\s*:\s*"([^"]{1,200})"')


def raw_record(context: RequestContext) -> dict[str, Any]:
    """A finished request as the builder needs it, taken on the event loop: cheap (no parsing, no
    redaction) and picklable, so that the work itself can happen in another process."""
    policy = context.tenant.logging
    return {
        "record": record_of(context, content=policy.content, parse=False),
        "sent": context.sent if policy.content and context.validated else None,
        "body": context.answer.body if policy.content else None,
        "redact": tuple(sorted(policy.redact)) if policy.content else (),
        "max_records": policy.max_records,
        "ttl": policy.max_age_s,
        "tenant_created": context.tenant.created,
    }


def build_entries(raws: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the recorder writes (and spools) for each request: the record's JSON and how to keep it. Runs
    in a worker process (or thread): whole answers parsed, prose cut and redacted, JSON encoded."""
    entries = []
    for raw in raws:
        try:
            entries.append(_entry(raw))
        except Exception:  # noqa: BLE001 (one record of an unexpected shape must not cost the batch)
            logging.getLogger("loragate.recorder").exception("completion record %s not built", raw["record"]["id"])
    return entries


def _entry(raw: dict[str, Any]) -> dict[str, Any]:
    record = raw["record"]
    if raw["sent"] is not None:
        record["request"] = request_of(pydantic_core.from_json(raw["sent"]))
    if raw["body"] is not None:
        answer = Answer(body=raw["body"])
        answer.parse_body()
        record["id"] = answer.completion_id or record["id"]
        record["choices"] = answer.choice_dicts() or None
    if record["request"] is not None or record["choices"] is not None:
        _clean(record, _redactor(raw["redact"]))
    text = pydantic_core.to_json(record).decode()
    if len(text) > MAX_RECORD_CHARS and record["request"]:  # tools, schemas: kept only while small
        for field in ("tools", "tool_choice", "response_format"):
            record["request"].pop(field, None)
        record["truncated"] = True
        text = pydantic_core.to_json(record).decode()
    usage = record["usage"] or {}
    return {
        "id": record["id"],
        "tenant": record["tenant"],
        "user": record["user"],
        "record": text,
        "max_records": raw["max_records"],
        "ttl": raw["ttl"],
        "created": record["created"],
        "experiment": record["experiment"],
        "arm": record["arm"],
        "error": int(record["outcome"] == "error"),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "latency_bucket": latency_bucket(record["latency_ms"]),
        "tenant_created": raw.get("tenant_created"),
    }


def latency_bucket(latency_ms: float | None) -> str:
    """The upper bound (ms) of the histogram bucket a latency falls in ('' for none)."""
    if latency_ms is None:
        return ""
    return str(next((bound for bound in LATENCY_BUCKETS_MS if latency_ms <= bound), LATENCY_BUCKETS_MS[-1]))


@functools.lru_cache(maxsize=64)
def _redactor(kinds: tuple[str, ...]) -> Redactor:
    return Redactor(kinds)


def _clean(record: dict[str, Any], redactor: Redactor) -> None:
    counts: Counter[str] = Counter()
    for holder, slot in list(_texts(record)):
        text = holder[slot]
        if len(text) > MAX_CHARS:
            holder[slot] = text = text[:MAX_CHARS]
            record["truncated"] = True
        if redactor.kinds and len(text) > 5:
            holder[slot] = redactor.redact_into(text, counts)
    record["redactions"] = dict(counts)


def _texts(record: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """Where the prose of a record is (container, key): messages' content and text parts, prompts and
    suffix, answers' text and tool-call arguments. Only these are cut and redacted."""
    request = record["request"] or {}
    for message in request.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield message, "content"
        elif isinstance(content, list):
            yield from (
                (part, "text") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        yield request, "prompt"
    elif isinstance(prompt, list):
        yield from ((prompt, i) for i, item in enumerate(prompt) if isinstance(item, str))
    if isinstance(request.get("suffix"), str):
        yield request, "suffix"
    for choice in record["choices"] or ():
        if isinstance(choice.get("text"), str):
            yield choice, "text"
        for call in choice.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                yield function, "arguments"


def request_of(payload: dict[str, Any]) -> dict[str, Any]:
    """A request as the log keeps it: its content fields, and every other field under `params`."""
    request = {k: v for k, v in payload.items() if k in REQUEST_FIELDS}
    request["params"] = {k: v for k, v in payload.items() if k not in REQUEST_FIELDS and k not in DROPPED_FIELDS}
    return request


def record_of(context: RequestContext, content: bool = True, parse: bool = True) -> dict[str, Any]:
    """A context as a completion record (the fields of records.CompletionRecord), before redaction; with
    `parse` false a whole answer, and the request as it was sent, are left for `build_entries` to read."""
    answer = context.answer
    if content and parse:
        answer.parse_body()
    elif answer.body is not None and answer.completion_id is None and not content:
        found = _ID.search(answer.body[:512])
        answer.completion_id = found.group(1).decode() if found else None
    route, payload = context.route, context.payload
    adapter = route.adapter if route is not None else None
    request = choices = None
    if content and context.validated and (parse or context.sent is None):
        request = request_of(payload)
    if content:
        choices = answer.choice_dicts() or None
    return {
        "id": answer.completion_id or f"req-{context.request_id}",
        "request_id": context.request_id,
        "tenant": context.tenant.name,
        "key_id": context.key_id,
        "user": context.user,
        "endpoint": context.endpoint,
        "model": route.requested if route is not None else str(payload.get("model", ""))[:200],
        "alias": route.alias if route is not None else None,
        "experiment": route.experiment if route is not None else None,
        "arm": route.arm if route is not None else None,
        "adapter": route.adapter_label if route is not None else None,
        "version": adapter.version if adapter is not None else None,
        "served_model": route.served_model if route is not None else None,
        "stream": context.stream,
        "request": request,
        "choices": choices,
        "usage": {k: v for k, v in (answer.usage or {}).items() if isinstance(v, int)} or None,
        "status": context.status,
        "outcome": context.outcome,
        "error_type": context.error_type,
        "created": context.received,
        "latency_ms": round(context.latency_s * 1000, 3) if context.latency_s is not None else None,
        "ttft_ms": round(context.first_token_s * 1000, 3) if context.first_token_s is not None else None,
        "redactions": {},
        "truncated": False,
    }
