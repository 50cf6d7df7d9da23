"""Every error a client can cause, or meet, arrives as OpenAI's envelope with the right status."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import MODEL, Gateway, create_key, free_port, gateway_env, loragate, start_gateway, stop_gateway
from tests.integration.conftest import engine_states

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "hi"}]
INTERNALS = ("127.0.0.1", "localhost", "http://", "/tmp/", "/root/", ".py", "EngineCore", "Traceback", "vllm")


def assert_no_internals(text: str) -> None:
    for internal in INTERNALS:
        assert internal not in text, f"{internal!r} leaked: {text}"


def assert_envelope(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert_no_internals(resp.text)
    assert len(resp.headers["x-request-id"]) == 32, "errors carry a request id too"
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_missing_key_is_401(gateway: Gateway) -> None:
    resp = httpx.post(f"{gateway.base_url}/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert_envelope(resp, 401, "invalid_api_key")
    resp = httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": MODEL, "messages": HELLO},
        headers={"Authorization": "Basic abc"},
    )
    assert_envelope(resp, 401, "invalid_api_key")


def test_wrong_key_is_401(gateway: Gateway) -> None:
    wrong = openai.OpenAI(base_url=gateway.base_url, api_key="sk-lg-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.code == "invalid_api_key"
    assert "not-a-real-key" not in str(info.value), "the key must not be echoed back"


def test_revoked_key_stops_working(gateway: Gateway) -> None:
    key = create_key(gateway.env, tenant="short-lived")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)
    assert client.models.list().data
    loragate(gateway.env, "keys", "revoke", key.removeprefix("sk-lg-").split("_")[0])
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            client.models.list()
        except openai.AuthenticationError:
            return
        time.sleep(0.05)
    raise AssertionError("a revoked key still works after a second")


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=HELLO)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"
    assert info.value.param is None, "as OpenAI answers it"
    for odd in ("hot@\u00b2", "hot@" + "9" * 5000, "hot@0", "hot\n"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=odd, messages=HELLO)  # type: ignore[arg-type]


def test_malformed_json_is_400(http: httpx.Client) -> None:
    resp = http.post(
        "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}
    )
    assert_envelope(resp, 400)
    resp = http.post("/v1/completions", content=b"[1, 2]")
    assert_envelope(resp, 400)
    for number in (b"NaN", b"Infinity", b"1e400"):
        body = b'{"model": "%s", "prompt": "hi", "temperature": %s}' % (MODEL.encode(), number)
        assert_envelope(http.post("/v1/completions", content=body), 400)


def test_invalid_fields_are_400_naming_the_param(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])  # type: ignore[list-item]
    assert info.value.param == "messages[0].role"
    assert_envelope(
        http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "temperature": 7}),
        400,
        param="temperature",
    )
    assert_envelope(http.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400, param="messages")
    assert_envelope(http.post("/v1/completions", json={"model": MODEL}), 400, param="prompt")
    number_prompt = http.post("/v1/completions", json={"model": MODEL, "prompt": 5.5})
    wrong_type = assert_envelope(number_prompt, 400, param="prompt")
    assert "expected one of: str, list[str]" in wrong_type["message"]
    content = {"model": MODEL, "messages": [{"role": "user", "content": 5}]}
    assert_envelope(http.post("/v1/chat/completions", json=content), 400, param="messages[0].content")


def test_types_are_strict_and_vllm_extras_still_pass(client: openai.OpenAI, http: httpx.Client) -> None:
    for field, value in (("logprobs", "yes"), ("n", "2"), ("stream", 1), ("max_tokens", 2.0)):
        error = assert_envelope(
            http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, field: value}),
            400,
            code="invalid_type",
            param=field,
        )
        assert error["message"].startswith(f"Invalid type for '{field}'")
    extras = {"top_k": 1, "repetition_penalty": 1.0, "min_tokens": 2}
    answer = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, extra_body=extras)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.completion_tokens >= 2


def test_engine_rejection_keeps_the_envelope(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5, extra_body={"min_tokens": 50})
    assert info.value.type == "invalid_request_error"
    assert "min_tokens" in info.value.message
    refused = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 5, "min_tokens": 50})
    assert_envelope(refused, 400)


def test_a_stream_vllm_cannot_start_is_refused_like_the_same_request_unstreamed(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    """vLLM answers such a stream 200 and an error event: the SDK raised a bare APIError with no status. OpenAI
    refuses a bad request before streaming: 400, naming the param as the unstreamed refusal does."""
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    for extra in ({"response_format": bad_schema}, {"extra_body": {"stop_token_ids": [99999999]}}):
        refusals = []
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as info:
                answer = client.chat.completions.create(
                    model=MODEL, messages=HELLO, max_tokens=5, stream=stream, **extra
                )  # type: ignore[call-overload]
                list(answer) if stream else None
            refusals.append((info.value.status_code, info.value.param, info.value.message))
        assert refusals[0] == refusals[1], refusals
    streamed = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "stream": True, "stop_token_ids": [99999999]},
    )
    assert streamed.headers["content-type"].startswith("application/json")
    assert_envelope(streamed, 400)


def test_best_of_above_one_is_refused_not_ignored(client: openai.OpenAI) -> None:
    """vLLM's V1 engine ignores it: one completion came back as if it were the best of several."""
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, best_of=3)
    assert (info.value.code, info.value.param) == ("unsupported_parameter", "best_of")
    assert len(client.completions.create(model=MODEL, prompt="hi", max_tokens=2, best_of=1).choices) == 1


def test_a_request_that_would_stop_the_engine_for_everyone_is_refused(http: httpx.Client) -> None:
    """Prompt logprobs computed beside a request of n > 1 stop vLLM 0.32's engine with LoRA on (measured straight
    against it: chat `echo` with a chat request of n = 2 at the same time, five times out of five; vLLM issue
    16668), and with it every tenant's requests for half a minute. Each way to ask for them is refused with a 400
    naming the field; the engine stays up for the request beside them."""
    story = [{"role": "user", "content": "Tell me a story about a dragon who lives in a castle by the sea."}]
    asks = [
        ("/v1/chat/completions", {"messages": story, "echo": True}, "echo"),
        ("/v1/chat/completions", {"messages": story, "prompt_logprobs": 0}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "hi there", "echo": True, "logprobs": 0, "n": 2}, "echo"),
        ("/v1/completions", {"prompt": "hi there", "prompt_logprobs": 1}, "prompt_logprobs"),
    ]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for path, body, field in asks:
            two = {"model": MODEL, "messages": HELLO, "n": 2, "max_tokens": 3}
            beside = pool.submit(http.post, "/v1/chat/completions", json=two)
            asked = http.post(path, json={"model": MODEL, "max_tokens": 3, **body})
            assert_envelope(asked, 400, code="unsupported_parameter", param=field)
            assert "vLLM issue 16668" in asked.json()["error"]["message"]
            assert beside.result().status_code == 200, beside.result().text
    assert http.get("/readyz").status_code == 200


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = "x" * (9 * 1024 * 1024)
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": big}]})
    assert_envelope(resp, 413, "request_too_large")


def test_unknown_route_is_404_envelope(http: httpx.Client) -> None:
    error = assert_envelope(http.get("/v1/nothing-here"), 404)
    assert (error["message"], error["code"]) == ("Invalid URL (GET /v1/nothing-here)", None), "as OpenAI words it"
    for method, path in (("POST", "/v1/chat/completions/"), ("GET", "/v1/models/")):
        assert_envelope(http.request(method, path), 404)  # not a redirect with an empty body


def test_a_method_a_route_does_not_take_is_405_with_allow(http: httpx.Client) -> None:
    resp = http.get("/v1/chat/completions")
    error = assert_envelope(resp, 405)
    assert error["message"] == "Invalid method for URL (GET /v1/chat/completions)"
    assert "POST" in resp.headers["allow"]


def test_head_answers_as_get_without_a_body(http: httpx.Client) -> None:
    for path in ("/healthz", "/v1/models"):
        got, head = http.get(path), http.head(path)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["content-type"] == got.headers["content-type"] and "x-request-id" in head.headers
    post_only = http.head("/v1/chat/completions")
    assert (post_only.status_code, post_only.content) == (405, b"") and "POST" in post_only.headers["allow"]


def test_malformed_json_to_the_admin_api_names_no_param(gateway: Gateway, admin: httpx.Client) -> None:
    json_header = {"content-type": "application/json"}
    error = assert_envelope(admin.post(f"{gateway.url}/admin/tenants", content=b'{"name": ', headers=json_header), 400)
    assert error["param"] is None and "could not parse the JSON body" in error["message"]


@pytest.fixture(scope="module")
def stranded_gateway(redis_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    """A gateway whose only engine URL has nothing listening, and a second Redis URL that is dead."""
    home = tmp_path_factory.mktemp("stranded")
    env = gateway_env(home, redis_server.url, free_port(), LORAGATE_ENGINE_URLS=f"http://127.0.0.1:{free_port()}")
    gw = start_gateway(home, env, [], ready_timeout=60)
    yield gw
    stop_gateway(gw)


def test_engine_down_is_503(stranded_gateway: Gateway) -> None:
    key = create_key(stranded_gateway.env)
    down = openai.OpenAI(base_url=stranded_gateway.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        down.chat.completions.create(model=MODEL, messages=HELLO)  # type: ignore[arg-type]
    assert info.value.status_code == 503
    assert info.value.code == "engine_unavailable"
    assert_no_internals(info.value.response.text)
    ready = httpx.get(f"{stranded_gateway.url}/readyz")
    assert ready.status_code == 503 and ready.json() == {"status": "not ready"}
    assert set(engine_states(stranded_gateway).values()) == {"unreachable"}


def test_redis_down_is_503_and_named(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("no-redis")
    env = gateway_env(
        home, f"redis://127.0.0.1:{free_port()}/0", free_port(), LORAGATE_ENGINE_URLS=f"http://127.0.0.1:{free_port()}"
    )
    gw = start_gateway(home, env, [], ready_timeout=60)
    try:
        ready = httpx.get(f"{gw.url}/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "not ready"}
        resp = httpx.post(
            f"{gw.base_url}/chat/completions",
            json={"model": MODEL, "messages": HELLO},
            headers={"Authorization": "Bearer sk-lg-0123456789ab_" + "a" * 43},
            timeout=30,
        )
        assert_envelope(resp, 503, "state_unavailable")
    finally:
        stop_gateway(gw)
