"""The completion log and feedback through the OpenAI SDK, the feedback API, the admin API and the
CLI, on the real gateway, real vLLM and real Redis (with AOF fsynced before every answer)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletion

from adapters.validate import BaseModelSpec
from gateway import keys
from tests.conftest import ADMIN_KEY, MODEL, Gateway, RedisServer, create_key, loragate, sync_redis_client
from tests.integration.conftest import add_synthetic, eventually
from training.evaluate import EvalRow, answer_one

pytestmark = pytest.mark.integration

ASK = [{"role": "user", "content": "Name a colour."}]


@dataclass
class Team:
    name: str
    key: str
    gateway: Gateway

    @property
    def key_id(self) -> str:
        return self.key.removeprefix("sk-lg-").partition("_")[0]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gateway.base_url, api_key=self.key, max_retries=0)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.gateway.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)


def admin(gateway: Gateway, tenant: str) -> httpx.Client:
    return httpx.Client(
        base_url=f"{gateway.url}/admin/tenants/{tenant}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120
    )


@pytest.fixture(scope="module")
def teams(gateway: Gateway, base_spec: BaseModelSpec, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Team]:
    found = {name: Team(name, create_key(gateway.env, name), gateway) for name in ("log-a", "log-b", "log-c")}
    with admin(gateway, "log-a") as a:
        add_synthetic(a, base_spec, tmp_path_factory.mktemp("log"), "helper-bot", seed=501)
        assert a.put("/aliases/prod", json={"target": "helper-bot@1"}).status_code == 200
    patched = httpx.patch(
        f"{gateway.url}/admin/tenants/log-c",
        json={"logging": {"content": False}},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert patched.status_code == 200 and patched.json()["logging"]["content"] is False
    return found


@pytest.fixture(scope="module")
def store(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = sync_redis_client(redis_server.url, decode_responses=True)
    yield client
    client.close()


def logged(store: redis.Redis, tenant: str, **match: Any) -> dict[str, Any]:
    """The one record of the tenant's log whose fields match, once the recorder has written it."""
    found: list[dict[str, Any]] = []

    def look() -> bool:
        records = [json.loads(fields["r"]) for _, fields in store.xrange(keys.completion_log(tenant))]
        found[:] = [r for r in records if all(r.get(k) == v for k, v in match.items())]
        return len(found) == 1

    assert eventually(look, timeout=10), f"expected one record matching {match}, found {len(found)}"
    return found[0]


def test_every_field_of_a_whole_answer_lands(teams: dict[str, Team], store: redis.Redis) -> None:
    team = teams["log-a"]
    answer = team.client().chat.completions.create(
        model="prod",
        messages=ASK,
        user="alice",
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    record = logged(store, "log-a", id=answer.id)
    assert (record["tenant"], record["key_id"], record["user"]) == ("log-a", team.key_id, "alice")
    assert (record["model"], record["alias"], record["adapter"], record["version"]) == ("prod", "prod", "helper-bot", 1)
    assert record["served_model"] == answer.model == "helper-bot@1"
    assert record["request"]["messages"] == ASK
    assert record["request"]["params"]["max_tokens"] == 8 and record["request"]["params"]["temperature"] == 0
    assert record["choices"][0]["text"] == answer.choices[0].message.content
    assert record["choices"][0]["finish_reason"] == answer.choices[0].finish_reason
    assert answer.usage is not None and record["usage"]["completion_tokens"] == answer.usage.completion_tokens
    assert (record["status"], record["outcome"], record["stream"], record["error_type"]) == (200, "ok", False, None)
    assert record["latency_ms"] > 0 and record["experiment"] is None and record["arm"] is None


def test_every_field_of_a_stream_lands_and_usage_is_hidden_from_the_client(
    teams: dict[str, Team], store: redis.Redis
) -> None:
    chunks = list(
        teams["log-a"]
        .client()
        .chat.completions.create(model=MODEL, messages=ASK, user="bob", max_tokens=12, stream=True)  # type: ignore[arg-type]
    )
    assert all(chunk.usage is None for chunk in chunks), "the client did not ask for usage"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    record = logged(store, "log-a", id=chunks[0].id)
    assert record["stream"] is True and record["user"] == "bob" and record["adapter"] is None
    assert record["choices"][0]["text"] == text and text
    assert record["choices"][0]["finish_reason"] == next(c.choices[0].finish_reason for c in chunks[::-1] if c.choices)
    assert record["usage"]["completion_tokens"] >= 1, "usage was asked of vLLM for the log"
    assert 0 < record["ttft_ms"] <= record["latency_ms"]
    assert record["outcome"] == "ok" and record["status"] == 200


def test_a_text_completion_and_a_refused_request_are_logged(teams: dict[str, Team], store: redis.Redis) -> None:
    client = teams["log-a"].client()
    answer = client.completions.create(model=MODEL, prompt="Blue and", max_tokens=4, user="carol")
    record = logged(store, "log-a", id=answer.id)
    assert record["endpoint"] == "completions" and record["request"]["prompt"] == "Blue and"
    assert record["choices"][0]["text"] == answer.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-bot", messages=ASK, user="carol")  # type: ignore[arg-type]
    refused = logged(store, "log-a", user="carol", status=404)
    assert (refused["outcome"], refused["error_type"], refused["model"]) == ("error", "model_not_found", "no-such-bot")
    assert refused["request"]["messages"] == ASK, "admitted (a request of its quota): kept whole"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x" * 30_000, best_of=3, user="unserved")
    unserved = logged(store, "log-a", user="unserved", status=400)
    assert unserved["request"] is None, "refused before its quota was checked: metadata only (quotas bound the rest)"


def test_a_client_that_leaves_a_stream_is_logged_as_a_cancellation(teams: dict[str, Team], store: redis.Redis) -> None:
    long = {"model": MODEL, "messages": ASK, "max_tokens": 2000, "ignore_eos": True, "stream": True, "user": "dave"}
    with teams["log-a"].http() as http, http.stream("POST", "/v1/chat/completions", json=long) as resp:
        lines = resp.iter_lines()
        received = [next(lines) for _ in range(8)]
    assert any(line.startswith("data: ") for line in received)
    record = logged(store, "log-a", user="dave")
    assert (record["outcome"], record["status"]) == ("cancelled", 499)
    assert record["choices"] and record["choices"][0]["text"], "what was sent before the client left is kept"


def test_pii_is_redacted_before_it_is_stored(teams: dict[str, Team], store: redis.Redis) -> None:
    said = "I am erin@example.org, card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, from 203.0.113.9."
    answer = (
        teams["log-a"]
        .client()
        .chat.completions.create(model=MODEL, messages=[{"role": "user", "content": said}], user="erin", max_tokens=2)  # type: ignore[arg-type]
    )
    record = logged(store, "log-a", id=answer.id)
    stored = record["request"]["messages"][0]["content"]
    assert stored == "I am [EMAIL], card [CARD], IBAN [IBAN], from [IP]."
    assert record["redactions"] == {"email": 1, "card": 1, "iban": 1, "ip": 1}
    raw = json.dumps([fields for _, fields in store.xrange(keys.completion_log("log-a"))])
    # the card's digits, not any "4111": a completion id or a timestamp may hold those four by chance
    assert "erin@example.org" not in raw and "4111 1111 1111 1111" not in raw and "4111111111111111" not in raw


def test_feedback_round_trip_and_one_rating_per_user(teams: dict[str, Team], store: redis.Redis) -> None:
    team = teams["log-a"]
    answer = team.client().chat.completions.create(model="prod", messages=ASK, user="fay", max_tokens=4)  # type: ignore[arg-type]
    with team.http() as http:
        first = {"completion_id": answer.id, "user": "fay", "thumbs": "down", "comment": "wrong", "labels": ["tone"]}
        posted = http.post("/v1/feedback", json={**first, "correction": "Blue.", "score": 0.2})
        assert posted.status_code == 200, posted.text
        assert posted.json()["status"] == "stored" and posted.json()["id"].startswith("fb-")
        assert (
            http.post("/v1/feedback", json={"completion_id": answer.id, "user": "fay", "score": 1}).status_code == 200
        )
        assert (
            http.post("/v1/feedback", json={"completion_id": answer.id, "user": "gus", "thumbs": "up"}).status_code
            == 200
        )
        read = http.get("/v1/feedback", params={"completion_id": answer.id}).json()["data"]
        assert [(f["user"], f["thumbs"], f["score"], f["correction"]) for f in read] == [
            ("fay", None, 1.0, None),
            ("gus", "up", None, None),
        ], "fay's second rating replaced her first"
        for bad, param in (
            ({"completion_id": answer.id, "score": 7}, "score"),
            ({"completion_id": answer.id}, None),
            ({"completion_id": answer.id, "thumbs": "sideways"}, "thumbs"),
            ({"completion_id": answer.id, "thumbs": "up", "extra": 1}, "extra"),
        ):
            resp = http.post("/v1/feedback", json=bad)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == param, resp.text


def test_the_user_header_names_the_rater_as_it_names_the_requester(teams: dict[str, Team], gateway: Gateway) -> None:
    """`x-loragate-user` names a rating's end user where its body does not, as it does a completion's: two users'
    ratings are two (the second replaced the first, both stored as nobody's), and erasing one finds theirs."""
    team = teams["log-a"]
    ask = {"model": MODEL, "messages": ASK, "max_tokens": 2, "extra_headers": {"x-loragate-user": "hdr-alice"}}
    answer = team.client().chat.completions.create(**ask)  # type: ignore[call-overload]
    with team.http() as http:
        for user, body in (
            ("hdr-alice", {"thumbs": "up"}),
            ("hdr-bob", {"thumbs": "down"}),
            ("hdr-bob", {"user": "hdr-carl"}),
            ("hdr-dave", {"user": ""}),  # an empty user names no one, as in a completion: the header does
        ):
            rating = {"completion_id": answer.id, "score": 0.5, **body}
            posted = http.post("/v1/feedback", json=rating, headers={"x-loragate-user": user})
            assert posted.status_code == 200 and posted.json()["user"] == (body.get("user") or user), posted.text
        read = http.get("/v1/feedback", params={"completion_id": answer.id}).json()["data"]
        assert sorted((f["user"], f["thumbs"]) for f in read) == [
            ("hdr-alice", "up"),
            ("hdr-bob", "down"),
            ("hdr-carl", None),
            ("hdr-dave", None),
        ]
        with admin(gateway, "log-a") as api:
            assert api.post("/users/hdr-bob/forget").json()["removed"] == {"completions": 0, "feedback": 1}
        read = http.get("/v1/feedback", params={"completion_id": answer.id}).json()["data"]
        assert sorted(f["user"] for f in read) == ["hdr-alice", "hdr-carl", "hdr-dave"]


def test_feedback_on_another_tenants_completion_is_the_unknown_404(teams: dict[str, Team]) -> None:
    answer = teams["log-a"].client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)  # type: ignore[arg-type]
    never = "chatcmpl-0123456789abcdef0123456789abcdef"
    with teams["log-b"].http() as b:
        for call in (
            lambda cid: b.post("/v1/feedback", json={"completion_id": cid, "thumbs": "up"}),
            lambda cid: b.get("/v1/feedback", params={"completion_id": cid}),
        ):
            theirs, unknown = call(answer.id), call(never)
            assert theirs.status_code == unknown.status_code == 404
            assert theirs.content.replace(answer.id.encode(), b"X") == unknown.content.replace(never.encode(), b"X")
    with teams["log-a"].http() as a:
        assert a.get("/v1/feedback", params={"completion_id": answer.id}).json()["data"] == []


def test_a_metadata_only_tenant_keeps_no_content(teams: dict[str, Team], store: redis.Redis) -> None:
    team = teams["log-c"]
    answer = team.client().chat.completions.create(model=MODEL, messages=ASK, user="hal", max_tokens=3)  # type: ignore[arg-type]
    record = logged(store, "log-c", id=answer.id)
    assert record["request"] is None and record["choices"] is None
    assert record["usage"]["completion_tokens"] >= 1 and record["user"] == "hal" and record["status"] == 200
    with team.http() as http:
        refused = http.post("/v1/feedback", json={"completion_id": answer.id, "correction": "Red."})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "correction"
        said = http.post("/v1/feedback", json={"completion_id": answer.id, "thumbs": "up", "comment": "Jane, rude"})
        assert said.status_code == 400 and said.json()["error"]["param"] == "comment", "free text is content too"
        rated = {"completion_id": answer.id, "thumbs": "up", "labels": ["tone"]}
        assert http.post("/v1/feedback", json=rated).status_code == 200, "labels are tags: kept"


def test_an_end_user_is_forgotten_through_the_cli_and_the_admin_api(
    teams: dict[str, Team], store: redis.Redis, gateway: Gateway
) -> None:
    team = teams["log-a"]
    client = team.client()
    mine = [client.chat.completions.create(model=MODEL, messages=ASK, user="ivy", max_tokens=2).id for _ in range(2)]  # type: ignore[arg-type]
    other = client.chat.completions.create(model=MODEL, messages=ASK, user="jon", max_tokens=2).id  # type: ignore[arg-type]
    with team.http() as http:
        for cid in (mine[0], other):
            assert (
                http.post("/v1/feedback", json={"completion_id": cid, "user": "ivy", "thumbs": "up"}).status_code == 200
            )
    out = json.loads(loragate(gateway.env, "feedback", "forget", "--tenant", "log-a", "--user", "ivy"))
    assert out["removed"] == {"completions": 2, "feedback": 2}
    users = [json.loads(f["r"])["user"] for _, f in store.xrange(keys.completion_log("log-a"))]
    assert "ivy" not in users and "jon" in users
    assert store.hkeys(keys.feedback("log-a", other)) == []
    with admin(gateway, "log-a") as api:
        erased = api.post("/users/jon/forget")
        assert erased.status_code == 200 and erased.json()["removed"] == {"completions": 1, "feedback": 0}
    with team.http() as http:  # an inference key cannot erase
        assert http.post("/admin/tenants/log-a/users/jon/forget").status_code == 403


def test_rated_completions_export_in_trl_formats(
    teams: dict[str, Team], gateway: Gateway, tmp_path: Path, store: redis.Redis
) -> None:
    team = teams["log-b"]
    client = team.client()

    # Whole answers (finish_reason "stop"), greedy so that no run samples 16 tokens without a stop: the first word,
    # and (to be a different answer) what comes before that word's last character. One cut by max_tokens is not
    # exported as an answer.
    def ask(max_tokens: int, stop: list[str] | None) -> ChatCompletion:
        return client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            user="kim",
            max_tokens=max_tokens,
            stop=stop,
            temperature=0,
        )

    good = ask(16, [" ", "\n"])
    word = good.choices[0].message.content or ""
    assert word, "a first word"
    bad, cut = ask(16, [word[-1]]), ask(1, None)
    assert bad.choices[0].finish_reason == "stop" and bad.choices[0].message.content != word
    assert (good.choices[0].finish_reason, cut.choices[0].finish_reason) == ("stop", "length")
    with team.http() as http:
        assert http.post("/v1/feedback", json={"completion_id": good.id, "thumbs": "up"}).status_code == 200
        rated = {"completion_id": bad.id, "thumbs": "down", "correction": "Green."}
        assert http.post("/v1/feedback", json=rated).status_code == 200
        assert http.post("/v1/feedback", json={"completion_id": cut.id, "thumbs": "up"}).status_code == 200
    out = tmp_path / "dpo.jsonl"
    loragate(gateway.env, "feedback", "export", "--tenant", "log-b", "--format", "dpo", "--output", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"prompt", "chosen", "rejected"} == set(rows[0]) and len(rows) >= 2
    assert {"role": "assistant", "content": "Green."} in [row["chosen"][0] for row in rows]
    with admin(gateway, "log-b") as api:
        kto = api.get("/feedback/export", params={"format": "kto"})
        assert kto.status_code == 200
        labelled = [json.loads(line) for line in kto.text.splitlines()]
        assert {row["label"] for row in labelled} == {True, False} and len(labelled) == 3, "not the cut answer"
        sft = [json.loads(line) for line in api.get("/feedback/export", params={"format": "sft"}).text.splitlines()]
        assert all(row["messages"][-1]["role"] == "assistant" for row in sft) and len(sft) == 2
        assert api.get("/feedback/export", params={"format": "csv"}).status_code == 400


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_a_conversation_with_tool_calls_is_exported_whole(gateway: Gateway) -> None:
    """vLLM calls the tool (streamed: the log assembles the call from its deltas); the answer after the tool's result
    is corrected. The export keeps the call as the first answer, and the call and its result in the second's prompt,
    each row with the request's tools. A third answer should have called the tool: its correction calls it."""
    team = Team("log-tools", create_key(gateway.env, "log-tools"), gateway)
    client, ask = team.client(), [{"role": "user", "content": "What is the weather in Paris?"}]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ask,  # type: ignore[arg-type]
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=100,
            temperature=0,
            stream=True,
        )
    )
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) and deltas[0].id, "one call of the tool, streamed"
    # The history the application sends back: the call (its arguments an object's JSON), then its result.
    sent = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    call = {"id": deltas[0].id, "type": "function", "function": sent}
    after = [
        *ask,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18 C"},
    ]
    answered = client.chat.completions.create(
        model=MODEL,
        messages=after,
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type, list-item]
    )
    guessed = client.chat.completions.create(
        model=MODEL,
        messages=ask,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    with team.http() as http:
        assert http.post("/v1/feedback", json={"completion_id": chunks[0].id, "thumbs": "up"}).status_code == 200
        corrected = {"completion_id": answered.id, "thumbs": "down", "correction": "It is 18 C in Paris."}
        assert http.post("/v1/feedback", json=corrected).status_code == 200
        should_call = {"role": "assistant", "content": None, "tool_calls": [{**call, "id": "call_1"}]}
        assert http.post("/v1/feedback", json={"completion_id": guessed.id, "correction": should_call}).is_success
        (read,) = http.get("/v1/feedback", params={"completion_id": guessed.id}).json()["data"]
        assert read["correction"] == should_call, "a correction that calls the tool, read back as it was sent"
    with admin(gateway, "log-tools") as api:
        sft = [json.loads(line) for line in api.get("/feedback/export", params={"format": "sft"}).text.splitlines()]
    held = json.loads(arguments)  # an object, as rows keep arguments; this vLLM streams '"Paris"' for a named tool
    streamed = {"name": "get_weather", "arguments": held if isinstance(held, dict) else arguments}
    calling = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": streamed}]}
    parsed = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    called = {"role": "assistant", "content": "", "tool_calls": [{"id": call["id"], **parsed}]}
    result = {"role": "tool", "content": "18 C", "tool_call_id": call["id"]}
    tools = json.dumps([WEATHER_TOOL], sort_keys=True)
    eval_client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=team.key, max_retries=0)
    row = EvalRow(prompt=sft[1]["messages"][:-1], reference="It is 18 C in Paris.", tools=sft[1]["tools"])
    asked_again = asyncio.run(answer_one(eval_client, MODEL, row.prompt, max_tokens=4, tools=row.tools))
    assert asked_again.error is None, "the retraining eval sends such a prompt, with its tools, as the API takes it"
    assert sft == [
        {"messages": [*ask, calling], "tools": tools},
        {"messages": [*ask, called, result, {"role": "assistant", "content": "It is 18 C in Paris."}], "tools": tools},
        {"messages": [*ask, {"role": "assistant", "content": "", "tool_calls": [parsed]}], "tools": tools},
    ]


def test_a_deleted_tenants_log_does_not_pass_to_a_new_tenant_of_its_name(gateway: Gateway, store: redis.Redis) -> None:
    """Requests stream in while the tenant is deleted; what was still queued is not written after the
    deletion, and the tenant created again under that name finds none of it, nor its experiments' audit."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=120) as api:
        assert api.post("/admin/tenants", json={"name": "log-gone"}).status_code == 201
        old = Team("log-gone", api.post("/admin/tenants/log-gone/keys", json={}).json()["key"], gateway)
        arms = [{"name": "a", "target": MODEL, "weight": 50}, {"name": "b", "target": MODEL, "weight": 50}]
        tone = {"name": "tone", "alias": "bot", "control": "a", "arms": arms}
        assert api.post("/admin/tenants/log-gone/experiments", json=tone).status_code == 201
        first = old.client().chat.completions.create(model="bot", messages=ASK, user="vic", max_tokens=2)  # type: ignore[arg-type]
        with old.http() as http:
            assert http.post("/v1/feedback", json={"completion_id": first.id, "user": "vic", "thumbs": "up"}).is_success
        answered: list[str] = []
        stop = threading.Event()

        def stream_in() -> None:
            with old.http() as http:
                while not stop.is_set():
                    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 2})
                    if resp.status_code != 200:
                        return
                    answered.append(resp.json()["id"])

        spammers = [threading.Thread(target=stream_in) for _ in range(4)]
        for spammer in spammers:
            spammer.start()
        deadline = time.monotonic() + 60
        while not answered and time.monotonic() < deadline:  # traffic under way before the deletion
            time.sleep(0.1)
        deleted = api.delete("/admin/tenants/log-gone")
        stop.set()
        for spammer in spammers:
            spammer.join()
        assert deleted.status_code == 200, deleted.text
        assert answered, "requests were streaming in"
        time.sleep(1.0)  # what any queue still held has been written (or refused) by now
        assert store.xlen(keys.completion_log("log-gone")) == 0
        assert store.keys("loragate:tenant:log-gone:*") == [], "its experiment and its audit log went too"
        assert api.post("/admin/tenants", json={"name": "log-gone"}).status_code == 201
        new = Team("log-gone", api.post("/admin/tenants/log-gone/keys", json={}).json()["key"], gateway)
        with new.http() as http:
            for completion_id in [first.id, *answered[-3:]]:
                assert http.get("/v1/feedback", params={"completion_id": completion_id}).status_code == 404
                rated = http.post("/v1/feedback", json={"completion_id": completion_id, "thumbs": "down"})
                assert rated.status_code == 404, rated.text
        assert api.get("/admin/tenants/log-gone/experiments").json()["data"] == []
        assert api.get("/admin/tenants/log-gone/feedback/export", params={"format": "kto"}).text == ""
        assert api.post("/admin/tenants/log-gone/users/vic/forget").json()["removed"] == {
            "completions": 0,
            "feedback": 0,
        }
        # not vic: erased a moment ago, and an erasure holds for 2 s more (for hosts whose clocks differ)
        fresh = new.client().chat.completions.create(model=MODEL, messages=ASK, user="wes", max_tokens=2)  # type: ignore[arg-type]
        with new.http() as http:
            assert http.post("/v1/feedback", json={"completion_id": fresh.id, "thumbs": "up"}).status_code == 200
            assert [
                f["thumbs"] for f in http.get("/v1/feedback", params={"completion_id": fresh.id}).json()["data"]
            ] == ["up"]
        assert [json.loads(f["r"])["id"] for _, f in store.xrange(keys.completion_log("log-gone"))] == [fresh.id]
        assert api.delete("/admin/tenants/log-gone").status_code == 200
