from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from gateway.errors import from_validation_error
from gateway.protocol import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


def error_of(schema: type, payload: dict) -> tuple[str | None, str]:  # type: ignore[type-arg]
    with pytest.raises(ValidationError) as info:
        schema.model_validate(payload)
    err = from_validation_error(info.value)
    assert err.status == 400 and err.type == "invalid_request_error"
    return err.param, err.message


def test_unknown_fields_pass_through() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "ignore_eos": True, "top_k": 5})
    assert req.model_extra == {"ignore_eos": True, "top_k": 5}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": MSG}, "model"),
        ({"model": "", "messages": MSG}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": MSG, "temperature": 2.5}, "temperature"),
        ({"model": "m", "messages": MSG, "top_p": -0.1}, "top_p"),
        ({"model": "m", "messages": MSG, "n": 0}, "n"),
        ({"model": "m", "messages": MSG, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": MSG, "top_logprobs": 21}, "top_logprobs"),
        ({"model": "m", "messages": MSG, "response_format": {"type": "yaml"}}, "response_format.type"),
        ({"model": "m", "messages": MSG, "tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ],
)
def test_chat_rejections_name_the_param(payload: dict, param: str) -> None:  # type: ignore[type-arg]
    assert error_of(ChatCompletionRequest, payload)[0] == param


@pytest.mark.parametrize(
    ("field", "value", "expected", "got"),
    [
        ("logprobs", "yes", "a boolean", "a string"),
        ("stream", 1, "a boolean", "an integer"),
        ("n", "2", "an integer", "a string"),
        ("n", 2.0, "an integer", "a decimal"),
        ("max_tokens", True, "an integer", "a boolean"),
        ("temperature", "0.5", "a decimal", "a string"),
        ("user", 5, "a string", "an integer"),
    ],
)
def test_types_are_strict_as_openai_is(field: str, value: object, expected: str, got: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, field: value})
    err = from_validation_error(info.value)
    assert (err.param, err.code) == (field, "invalid_type")
    assert err.message == f"Invalid type for '{field}': expected {expected}, but got {got} instead."


def test_strictness_still_takes_what_json_means() -> None:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MSG, "temperature": 1, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert req.temperature == 1.0 and req.stream_options is not None and req.stream_options.include_usage


def test_json_schema_format_needs_its_schema() -> None:
    _, message = error_of(
        ChatCompletionRequest, {"model": "m", "messages": MSG, "response_format": {"type": "json_schema"}}
    )
    assert "json_schema" in message


def test_vllms_structural_tag_format_passes_through() -> None:
    """vLLM takes `structural_tag` formats, new (`format`) and legacy (`structures`, `triggers`); it was a 400."""
    for tag in (
        {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f>"], "tags": []}},
        {"type": "structural_tag", "structures": [{"begin": "<f>", "schema": {}, "end": "</f>"}], "triggers": ["<f>"]},
    ):
        request = ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, "response_format": tag})
        assert request.model_dump(exclude_unset=True, by_alias=True)["response_format"] == tag


def test_stream_options_need_stream() -> None:
    _, message = error_of(
        ChatCompletionRequest, {"model": "m", "messages": MSG, "stream_options": {"include_usage": True}}
    )
    assert "stream" in message


def test_completion_prompt_forms() -> None:
    for prompt in ("text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt == prompt
    assert error_of(CompletionRequest, {"model": "m"})[0] == "prompt"
    assert error_of(CompletionRequest, {"model": "m", "prompt": "x", "logprobs": 9})[0] == "logprobs"


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "Invalid value for 'stop': stop accepts at most 4 sequences"),
        (
            {"stream_options": {"include_usage": True}},
            "stream_options",
            "Invalid value for 'stream_options': stream_options is only allowed when stream is true",
        ),
    ],
)
def test_rules_across_fields_name_the_field_they_refuse(extra: dict, param: str, message: str) -> None:  # type: ignore[type-arg]
    assert error_of(ChatCompletionRequest, {"model": "m", "messages": MSG, **extra}) == (param, message)
    assert error_of(CompletionRequest, {"model": "m", "prompt": "x", **extra}) == (param, message)


@pytest.mark.parametrize(
    ("schema", "payload", "param"),
    [
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "stop": [1] * 300_000}, "stop"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": [1] * 300_000}]}, "messages"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": [1] * 1000}] * 2048}, "messages"),
        (CompletionRequest, {"prompt": [[1]] * 300_000 + [["x"]]}, "prompt"),
        (CompletionRequest, {"prompt": list(range(300_000))}, "prompt"),
        (CompletionRequest, {"prompt": [[1]] * 2000 + [list(range(300_000))]}, "prompt"),
        (CompletionRequest, {"prompt": ["x"] * 3000}, "prompt"),
    ],
)
def test_huge_lists_are_refused_before_their_items_are_validated(
    schema: type[BaseModel], payload: dict[str, Any], param: str
) -> None:
    """Millions of wrong-typed items each made one validation error: seconds to validate and tens of seconds to
    report on the event loop, for every tenant of the process. Now counted first: one error, naming the field."""
    with pytest.raises(ValidationError) as refused:
        schema.model_validate({"model": "m", **payload})
    assert refused.value.error_count() == 1
    assert from_validation_error(refused.value).param == param


def test_a_batch_of_prompts_each_within_the_bound_is_taken() -> None:
    """Each prompt is bounded on its own: eight of 40,000 tokens fit a 128k context each."""
    prompt = [list(range(40_000))] * 8
    assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompts() == 8


def test_a_text_completion_asks_for_at_most_1024_answers_all_together() -> None:
    """`n` times the prompts: 1,024 prompts with `n` 128 were 131,072 sequences, counted as one request."""
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["x"] * 8, "n": 128}).answers() == 1024
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["x"] * 1024}).answers() == 1024
    param, message = error_of(CompletionRequest, {"model": "m", "prompt": ["x"] * 9, "n": 128})
    assert param == "n" and "(128 x 9) must be at most 1024" in message
    assert error_of(CompletionRequest, {"model": "m", "prompt": ["x"] * 1025})[0] == "prompt", "vLLM's own limit"


def test_best_of_is_typed_and_only_one_is_served() -> None:
    """vLLM's V1 engine ignores `best_of`: `best_of=3` came back as one completion, as if the best of three had been
    chosen, and reserved three answers' tokens of the quota."""
    base = {"model": "m", "prompt": "hi"}
    asked = CompletionRequest.model_validate({**base, "best_of": 3, "n": 1})
    assert asked.asks_best_of() and asked.answers() == 1
    assert not CompletionRequest.model_validate({**base, "best_of": 1}).asks_best_of()
    assert not CompletionRequest.model_validate(base).asks_best_of()
    for bad in ("x", 0, 21, 2.5):
        assert error_of(CompletionRequest, {**base, "best_of": bad})[0] == "best_of"
