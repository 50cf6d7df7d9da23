"""Redaction reaches every string of a record a tenant's users wrote, and what straddles a cut is redacted before
it is cut (the tenant redacts all five kinds, the default)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from gateway import keys
from gateway.answer import Answer
from gateway.feedback import FeedbackStore
from gateway.metrics import Metrics
from gateway.record_builder import LONGEST_FINDING, MAX_CHARS, MAX_KEPT_CHARS, build_entries, raw_record
from gateway.recorder import Recorder
from gateway.records import MAX_CORRECTION_CHARS, FeedbackIn, LogPolicy
from gateway.spool import Spool
from gateway.tenants import Tenant
from tests.unit.test_recording import context

TENANT = Tenant(name="t")
EMAIL, CARD = "ann.smith@example.com", "4111 1111 1111 1111"


def stored(**payload: Any) -> dict[str, Any]:
    (entry,) = build_entries([raw_record(context(TENANT, 1, **payload))])
    return dict(json.loads(entry["record"]))


def test_earlier_tool_calls_names_and_parameters_are_redacted() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "book", "arguments": json.dumps({"email": EMAIL})}}
    messages = [
        {"role": "user", "name": EMAIL, "content": "book it"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": f"charged {CARD}"},
    ]
    record = stored(messages=messages, metadata={"customer": EMAIL}, stop=[f"pay {CARD}"])
    text = json.dumps(record["request"])
    assert EMAIL not in text and CARD not in text and "4111" not in text
    assert record["request"]["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"email": "[EMAIL]"}'
    assert record["request"]["params"]["metadata"] == {"customer": "[EMAIL]"}
    assert record["redactions"] == {"email": 3, "card": 2, "phone": 1}, "(the answer holds a phone number)"


def test_the_apis_own_labels_are_kept_and_what_only_sits_where_a_label_would_is_redacted() -> None:
    """`role`, `type` and `tool_call_id` of a label's shape are the API's labels: not redacted, not counted (an id's
    digits are no phone number). The same keys holding something else (a `metadata` field named `role`, an id made
    of an e-mail) and dict keys holding PII are redacted, as any value."""
    messages = [
        {"role": "user", "content": [{"type": "text", "text": f"mail {EMAIL}"}]},
        {"role": "tool", "tool_call_id": "call_41111111111111112025", "content": "done"},
        {"role": "tool", "tool_call_id": "call_" + EMAIL, "content": "done"},
    ]
    record = stored(messages=messages, metadata={"role": EMAIL, "type": CARD, EMAIL: "vip"})
    assert record["request"]["messages"][0]["content"] == [{"type": "text", "text": "mail [EMAIL]"}]
    assert record["request"]["messages"][1]["tool_call_id"] == "call_41111111111111112025"
    assert record["request"]["messages"][2]["tool_call_id"] == "[EMAIL]"
    assert record["request"]["params"]["metadata"] == {"role": "[EMAIL]", "type": "[CARD]", "[EMAIL]": "vip"}
    assert record["redactions"]["email"] == 4 and record["redactions"]["card"] == 1


def test_a_tool_calls_id_is_kept_or_redacted_as_the_tool_call_id_naming_it() -> None:
    """An assistant's tool call and the tool message answering it name one id: both kept where it has a label's
    shape (the digits of `call_4155552671` are no phone number in either place), both redacted where it does not, so
    the two still match in the record and in its exports. An `id` outside a tool call is redacted as any value."""
    ids = ["call_4155552671", "chatcmpl-tool-192.168.1.20", "call_" + EMAIL, "4155552671"]

    def call(i: str) -> dict[str, Any]:
        return {"id": i, "type": "function", "function": {"name": "lookup", "arguments": "{}"}}

    messages = [
        {"role": "user", "content": "where is my order?"},
        {"role": "assistant", "content": None, "tool_calls": [call(i) for i in ids]},
        *({"role": "tool", "tool_call_id": i, "content": "shipped"} for i in ids),
    ]
    record = stored(messages=messages, metadata={"id": "4155552671", "call": {"function": {}, "id": "4155552672"}})
    kept = record["request"]["messages"]
    calls, answers = [c["id"] for c in kept[1]["tool_calls"]], [m["tool_call_id"] for m in kept[2:]]
    assert calls == answers == ["call_4155552671", "chatcmpl-tool-[IP]", "[EMAIL]", "[PHONE]"], "a label has a letter"
    assert record["request"]["params"]["metadata"] == {"id": "[PHONE]", "call": {"function": {}, "id": "[PHONE]"}}


def test_tool_call_arguments_stay_json_where_a_number_was_redacted() -> None:
    """A phone or card number written as a JSON number leaves a placeholder outside any string: quoted, so that the
    arguments (of an earlier turn's call and of the answer's) still parse, as exports and chat templates read them."""
    arguments = json.dumps({"to": EMAIL, "phone": 2025550143, "card": 4111111111111111, "note": "ring 2025550143"})
    call = {"id": "call_1", "type": "function", "function": {"name": "notify", "arguments": arguments}}
    ctx = context(TENANT, 1, messages=[{"role": "assistant", "content": None, "tool_calls": [call]}])
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    ctx.answer = Answer(body=json.dumps({"id": "c1", "choices": [{"index": 0, "message": message}]}).encode())
    (entry,) = build_entries([raw_record(ctx)])
    record = json.loads(entry["record"])
    sent = record["request"]["messages"][0]["tool_calls"][0]["function"]["arguments"]
    answered = record["choices"][0]["tool_calls"][0]["function"]["arguments"]
    expected = {"to": "[EMAIL]", "phone": "[PHONE]", "card": "[CARD]", "note": "ring [PHONE]"}
    assert json.loads(sent) == json.loads(answered) == expected
    assert record["redactions"] == {"email": 2, "phone": 4, "card": 2}


def test_long_whole_numbers_are_redacted_wherever_they_are_but_in_the_apis_own_parameters() -> None:
    """A phone or card number is one whether the client quoted it or not: `{"phone": 2025550143}` in `metadata`, a
    message's extra field or a list, as `"2025550143"` would be. The API's own numbers (a seed) are kept as sent."""
    part = {"type": "text", "text": "hi", "ref": 4155552671}
    record = stored(
        messages=[{"role": "user", "content": [part]}],
        metadata={
            "phone": 2025550143,
            "card": 4111111111111111,
            "count": 1234567,
            "small": 12,
            "ok": [-2025550143, 4111111111111111.0, 1e300],
            "big": 10**400,  # past a double (compiled, it failed the record): 401 digits, redacted whole as in text
            "card19": 6221260000000000001,  # a 19-digit card (Luhn-valid), past 1e16
        },
        seed=2025550143,
        max_tokens=4,
    )
    params = record["request"]["params"]
    assert params["metadata"] == {
        "phone": "[PHONE]",
        "card": "[CARD]",
        "count": 1234567,
        "small": 12,
        "ok": ["[PHONE]", "[CARD]", 1e300],
        "big": "[PHONE]",
        "card19": "[CARD]",
    }
    assert type(params["metadata"]["count"]) is int, "compiled, a whole number came back a float (1234567.0)"
    assert (params["seed"], params["max_tokens"]) == (2025550143, 4), "the API's parameters as sent"
    assert record["request"]["messages"][0]["content"][0]["ref"] == "[PHONE]"
    assert record["redactions"] == {"phone": 5, "card": 3}, "(the answer holds a phone number)"


def test_an_answers_tool_call_is_redacted_as_an_earlier_turns_is() -> None:
    """Its function's name too (a model can write anything there), and its id unless it has a label's shape."""
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "mail_bob@example.com", "arguments": "{}"}},
        {"id": "4155552671", "type": "function", "function": {"name": "ring", "arguments": "{}"}},
    ]
    ctx = context(TENANT, 1)
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    ctx.answer = Answer(body=json.dumps({"id": "c1", "choices": [{"index": 0, "message": message}]}).encode())
    (entry,) = build_entries([raw_record(ctx)])
    kept = json.loads(entry["record"])["choices"][0]["tool_calls"]
    assert [(c["id"], c["function"]["name"]) for c in kept] == [("call_1", "[EMAIL]"), ("[PHONE]", "ring")]


def test_a_record_past_two_million_characters_keeps_no_request() -> None:
    """Each string is cut at MAX_CHARS, but 70 messages of that were a record of 2.3 M characters in a Redis all
    tenants share: past MAX_KEPT_CHARS the request goes (first its tools), its answers stay while they fit."""
    messages = [{"role": "user", "content": "x" * 40_000}] * 70
    record = stored(messages=messages, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert record["request"] is None and record["truncated"] and record["choices"][0]["text"] == "call [PHONE]"
    kept = stored(messages=messages[:60])
    assert len(kept["request"]["messages"]) == 60 and kept["truncated"], "cut at MAX_CHARS each, but kept"
    assert MAX_KEPT_CHARS < 70 * MAX_CHARS


def test_a_cut_after_redaction_shortened_the_text_keeps_no_part_of_a_finding() -> None:
    """Redaction shortens what comes before the cut (long e-mails become `[EMAIL]`): the kept text ended inside
    the first slice, in an e-mail that slice had cut in two and so was not found (`...john.smith@e`)."""
    long_email = "a" * 60 + "@" + "b" * 60 + "." + "c" * 60 + ".com"
    head = " ".join([long_email] * 20) + " "
    text = head + "x" * (MAX_CHARS + LONGEST_FINDING - 12 - len(head)) + " john.smith@example.com " + "y" * 1000
    record = stored(messages=[{"role": "user", "content": text}])
    kept = record["request"]["messages"][0]["content"]
    assert record["truncated"] and len(kept) <= MAX_CHARS
    assert "john" not in kept and "@e" not in kept, kept[-40:]


def test_what_straddles_the_cut_is_redacted_whole() -> None:
    for tail, kind in ((f" card {CARD} ok", "card"), (f" {EMAIL}", "email")):
        record = stored(messages=[{"role": "user", "content": "x" * (MAX_CHARS - 12) + tail}])
        kept = record["request"]["messages"][0]["content"]
        assert len(kept) <= MAX_CHARS and record["truncated"] and record["redactions"] == {kind: 1, "phone": 1}
        assert not any(part in kept for part in ("4111", "ann.smith")), kept[-20:]


async def _answered(redis: aioredis.Redis, recorder: Recorder, tmp_path: Path, seq: int) -> FeedbackStore:
    """A feedback store, and completion `chatcmpl-{seq}` of TENANT in the log."""
    spool = Spool(tmp_path / "feedback", fsync=True)
    spool.open()
    store = FeedbackStore(redis, spool, recorder, Metrics(), settle_s=0)
    await store.check_durability()
    recorder.record(context(TENANT, seq))
    await recorder.written()
    return store


async def test_feedback_labels_are_redacted(redis: aioredis.Redis, recorder: Recorder, tmp_path: Path) -> None:
    store = await _answered(redis, recorder, tmp_path, 9)
    rating = FeedbackIn(completion_id="chatcmpl-9", user="u1", thumbs="down", labels=[f"contact:{EMAIL}"])
    kept, _ = await store.submit(TENANT, rating)
    assert kept.labels == ["contact:[EMAIL]"] and kept.redactions == {"email": 1}
    assert EMAIL not in (await redis.hget(keys.feedback("t", "chatcmpl-9"), "u1") or "")


async def test_feedback_reads_phone_numbers_in_the_tenants_region(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    store = await _answered(redis, recorder, tmp_path, 10)
    british = TENANT.model_copy(update={"logging": LogPolicy(phone_region="GB")})
    rating = FeedbackIn(completion_id="chatcmpl-10", user="u1", thumbs="down", comment="ring 020 7946 0958")
    kept, _ = await store.submit(british, rating)
    assert kept.comment == "ring [PHONE]" and kept.redactions == {"phone": 1}


async def test_feedback_that_redaction_lengthens_past_its_limits_is_still_read_back(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    """A 64-character label (the most allowed) holding `a@b.cc` is 65 once redacted: kept, and read back."""
    store = await _answered(redis, recorder, tmp_path, 10)
    label = "x" * 57 + " a@b.cc"
    rating = FeedbackIn(
        completion_id="chatcmpl-10", user="u1", thumbs="up", labels=[label], comment="y" * 9_996 + " ::1"
    )
    await store.submit(TENANT, rating)
    (read,) = await store.of_completion(TENANT, "chatcmpl-10")
    assert read.labels == ["x" * 57 + " [EMAIL]"] and len(read.comment or "") == 10_001


async def test_a_correction_that_calls_tools_is_redacted_as_an_answers_calls_are(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    """Its content and arguments (JSON kept: the number's placeholder quoted), and its calls' ids whatever their
    shape (nothing refers to them). Stored as a message, and read back as one, 100,000 characters lengthened past."""
    store = await _answered(redis, recorder, tmp_path, 11)
    others = len("a@b.cc" + "4155552671" + "notify" + "call_4155552671" + "notify" + "{}")  # all but arguments
    held = {"phone": 2025550143, "to": EMAIL, "note": ""}
    held["note"] = "x" * (MAX_CORRECTION_CHARS - others - len(json.dumps(held)))
    arguments = json.dumps(held)
    calls = [
        {"id": "4155552671", "type": "function", "function": {"name": "notify", "arguments": arguments}},
        {"id": "call_4155552671", "function": {"name": "notify", "arguments": "{}"}},
    ]

    def rating(calls: list[dict[str, Any]]) -> FeedbackIn:
        message = {"role": "assistant", "content": "a@b.cc", "tool_calls": calls}
        return FeedbackIn.model_validate({"completion_id": "chatcmpl-11", "correction": message})

    with pytest.raises(ValidationError, match="1 to 100,000 characters"):  # one more: too long
        rating([calls[0], {**calls[1], "function": {"name": "notify", "arguments": "{} "}}])
    given = rating(calls)
    kept, _ = await store.submit(TENANT, given)
    (read,) = await store.of_completion(TENANT, "chatcmpl-11")
    assert read == kept and read.redactions == {"email": 2, "phone": 3}
    correction = read.model_dump(mode="json")["correction"]
    assert correction["content"] == "[EMAIL]" and [c["id"] for c in correction["tool_calls"]] == [
        "[PHONE]",
        "call_[PHONE]",
    ]
    held = json.loads(correction["tool_calls"][0]["function"]["arguments"])
    assert (held["phone"], held["to"]) == ("[PHONE]", "[EMAIL]")
    (counted,) = await redis.hmget(keys.feedback("t", "chatcmpl-11"), [""])
    assert counted is not None and EMAIL not in counted and "2025550143" not in counted


def test_token_id_prompts_are_not_kept_where_redaction_is_on() -> None:
    """Token ids read back as the text they encode (PII and all) with the model's tokenizer: not redactable, so not
    kept (only counted) where the tenant redacts; kept where it does not."""
    record = stored(prompt=[[101, 102], [103]])
    assert record["request"]["prompt"] == [] and record["redactions"]["token_ids"] == 3
    plain = Tenant(name="t", logging=LogPolicy(redact=[]))
    (entry,) = build_entries([raw_record(context(plain, 1, prompt=[[101, 102], [103]]))])
    assert json.loads(entry["record"])["request"]["prompt"] == [[101, 102], [103]]


def test_engine_tool_call_ids_are_labels_and_a_text_just_over_the_limit_loses_nothing_more() -> None:
    messages = [
        {"role": "tool", "tool_call_id": "chatcmpl-tool-9a1b2c3d4e5f60718293a4b5c6d7e8f9", "content": "done"},
        {"role": "tool", "tool_call_id": "A1b2C3d4E", "content": "done"},
        {"role": "user", "content": "z" * (MAX_CHARS + 100)},
    ]
    record = stored(messages=messages)
    kept = record["request"]["messages"]
    assert [m["tool_call_id"] for m in kept[:2]] == [m["tool_call_id"] for m in messages[:2]]
    assert len(kept[2]["content"]) == MAX_CHARS, "the slice held it all: nothing was cut in two"


def test_phone_numbers_without_a_country_code_are_read_in_the_tenants_region() -> None:
    """`020 7946 0958` is a London number, and no US one: found where the tenant says its users are in GB."""
    ask = [{"role": "user", "content": "ring me on 020 7946 0958 or +1 415-555-0123"}]
    british = Tenant(name="t", logging=LogPolicy(phone_region="GB"))
    kept = build_entries([raw_record(context(TENANT, 1, messages=ask))])[0]
    found = build_entries([raw_record(context(british, 1, messages=ask))])[0]
    assert json.loads(kept["record"])["request"]["messages"][0]["content"] == "ring me on 020 7946 0958 or [PHONE]"
    assert json.loads(found["record"])["request"]["messages"][0]["content"] == "ring me on [PHONE] or [PHONE]"
