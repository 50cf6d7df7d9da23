"""The OpenAI SDK, unmodified, against the real gateway, real vLLM and real Redis."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL, Gateway
from tests.integration.conftest import metric

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Say hello in one word."}]


def test_chat_completion_has_id_request_id_and_usage(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=8)
    completion = raw.parse()
    request_id = raw.headers["x-request-id"]
    assert completion.id == f"chatcmpl-{request_id}"
    assert completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8


def test_an_idle_connection_outlives_the_sdks_own_keep_alive(gateway: Gateway, client: openai.OpenAI) -> None:
    """The SDK (httpx) keeps an idle connection 5 s; the gateway keeps one longer (LORAGATE_KEEP_ALIVE_S), so that
    a request sent on it as those 5 s end is never met by the gateway closing it (uvicorn's default, 5 s, raced
    the SDK's: "Server disconnected without sending a response", a failure without retries)."""
    address = urllib.parse.urlsplit(gateway.url)
    connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)
    headers = {"Authorization": f"Bearer {client.api_key}"}
    for pause in (0, 6):
        time.sleep(pause)
        connection.request("GET", "/v1/models", headers=headers)
        answer = connection.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["object"] == "list"
    connection.close()


def test_text_completion(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="The capital of France is", max_tokens=6)
    completion = raw.parse()
    assert completion.id.startswith("cmpl-") and raw.headers["x-request-id"] in completion.id
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.prompt_tokens > 0


def test_null_n_and_stream_are_the_defaults(client: openai.OpenAI) -> None:
    """The SDK sends a parameter set to None as null: OpenAI and vLLM read it as the default."""
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], n=None, stream=None, max_tokens=3
    )
    assert len(answer.choices) == 1 and answer.choices[0].message.content is not None


def test_text_completion_defaults_to_16_tokens_and_echo_with_0_returns_the_prompt(client: openai.OpenAI) -> None:
    """OpenAI's default for text completions is 16 tokens (chat has none); `max_tokens: 0` with `echo` returns the
    prompt, nothing generated. Its logprobs (vLLM's way to score a prompt) are refused by default: computing a
    prompt's logprobs beside a request of n > 1 stops vLLM's engine with LoRA on (tests/integration/test_errors.py)."""
    default = client.completions.create(model=MODEL, prompt="Once upon a time", extra_body={"ignore_eos": True})
    assert default.usage is not None and default.usage.completion_tokens == 16
    prompt = "The capital of France is"
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True)
    assert echoed.choices[0].text == prompt, "the prompt echoed, nothing generated after it"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert (info.value.param, info.value.code) == ("echo", "unsupported_parameter")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=0)
    assert info.value.param == "max_tokens"


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and 0 < chunks[-1].usage.completion_tokens <= 10
    assert all(c.usage is None for c in chunks[:-1])


def test_a_stream_without_usage_has_vllms_fingerprint_on_its_last_chunk(client: openai.OpenAI) -> None:
    """vLLM stamps `system_fingerprint` on the chunk that ends a choice unless asked for usage; the gateway
    always asks (and drops the usage chunk): the client still gets it, where vLLM would have put it."""
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert whole.system_fingerprint, "vLLM names its build on whole answers"
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, stream=True))
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None
    assert [c.system_fingerprint for c in chunks] == [None] * (len(chunks) - 1) + [whole.system_fingerprint]


def test_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    # The gateway asks vLLM for usage on every stream (to settle quotas); a client that did not gets none.
    assert all(c.usage is None and c.choices for c in chunks)


def test_stream_is_sse_ending_with_done(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"]
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the largest city of France and its population as JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
    )
    data = json.loads(completion.choices[0].message.content or "")
    assert set(data) == {"city", "population"}
    assert isinstance(data["city"], str) and isinstance(data["population"], int)


def test_sampling_parameters_pass_through(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=HELLO, max_completion_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    first = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    second = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage is not None and first.usage.completion_tokens <= 12

    many = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, n=3)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]

    with_logprobs = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = with_logprobs.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content[0].top_logprobs) == 2


def test_stop_sequence_ends_generation(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3, 4, 5, 6, 7,", max_tokens=30, temperature=0, stop=[" 9"]
    )
    assert " 9" not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"


def test_tool_calls(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ]
    for tool_choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        completion = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=tools,  # type: ignore[arg-type]
            tool_choice=tool_choice,  # type: ignore[arg-type]
            max_tokens=100,
            temperature=0,
        )
        calls = completion.choices[0].message.tool_calls
        assert calls, f"no tool call for tool_choice={tool_choice}"
        assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        json.loads(calls[0].function.arguments)  # type: ignore[union-attr]


def test_models_lists_base_model(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids


def test_metrics_count_requests(gateway: Gateway, client: openai.OpenAI) -> None:
    before = metric(gateway, "loragate_requests_total", model=MODEL, route="chat", status="200")
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert metric(gateway, "loragate_requests_total", model=MODEL, route="chat", status="200") == before + 1
    assert metric(gateway, "loragate_tokens_total", model=MODEL, kind="completion") > 0


def test_engines_compute_in_the_dtype_this_cpu_runs_fast(gateway: Gateway) -> None:
    """LORAGATE_ENGINE_DTYPE=auto: bf16 where the CPU has it natively, float32 where bf16 would be emulated."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    expected = "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"
    for port in gateway.engine_ports:
        log = (Path(gateway.env["LORAGATE_HOME"]) / "logs" / f"vllm-{port}.log").read_text()
        assert f"dtype=torch.{expected}," in log
