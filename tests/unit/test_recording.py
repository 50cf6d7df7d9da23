"""The pieces of the completion log, one at a time: answers assembled from streams, records under a
tenant's policy, the local spool, and the recorder and feedback store against a real Redis (one of
them killed and restarted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.context import CLIENT_CLOSED, Answer, RequestContext
from gateway.feedback import CompletionUnknown, FeedbackStore
from gateway.metrics import Metrics
from gateway.recorder import Recorder, record_of
from gateway.records import CompletionRecord, FeedbackIn, LogPolicy
from gateway.routing import Route
from gateway.spool import Spool
from gateway.tenants import Tenant
from tests.conftest import RedisServer, free_port


def events(*chunks: dict[str, object]) -> list[bytes]:
    return [json.dumps(chunk).encode() for chunk in chunks]


def test_a_stream_is_assembled_as_it_passes() -> None:
    answer = Answer()
    for data in events(
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "Par"}}, {"index": 1, "delta": {}}]},
        {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"content": "is"}, "finish_reason": "stop"}]},
        {
            "id": "chatcmpl-1",
            "choices": [
                {"index": 1, "delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f"}}]}},
            ],
        },
        {"choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}}]},
        {"choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
    ):
        answer.feed(data)
    answer.feed(b"not json")
    first, second = answer.choices()
    assert answer.completion_id == "chatcmpl-1" and answer.usage == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    assert (first.text, first.finish_reason) == ("Paris", "stop")
    assert second.tool_calls == [{"type": "function", "id": "c1", "function": {"name": "f", "arguments": '{"a":1}'}}]


def test_a_whole_answer_is_parsed_later() -> None:
    answer = Answer(body=b'{"id":"cmpl-9","choices":[{"index":0,"text":"hi","finish_reason":"length"}],"usage":{}}')
    assert answer.choices() == []  # nothing parsed on the request path
    answer.parse_body()
    assert answer.completion_id == "cmpl-9" and answer.choices()[0].text == "hi"
    calls = [{"id": f"c{n}", "type": "function", "function": {"name": f"f{n}", "arguments": "{}"}} for n in (1, 2)]
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    chat = Answer(body=json.dumps({"id": "x", "choices": [{"index": 0, "message": message}]}).encode())
    chat.parse_body()
    assert chat.choices()[0].tool_calls == calls and chat.choices()[0].text == ""


def context(tenant: Tenant, **payload: object) -> RequestContext:
    body = {"model": "m", "messages": [{"role": "user", "content": "mail bob@example.com"}], "user": "u1", **payload}
    ctx = RequestContext("r1", "chat", tenant, "k1", payload=body)
    ctx.route = Route(requested="prod", upstream_model="t.bot@2", served_model="bot@2", alias="prod")
    ctx.answer = Answer(body=b'{"id":"chatcmpl-7","choices":[{"index":0,"message":{"content":"call 415-555-0123"}}]}')
    ctx.finish(200)
    return ctx


def test_records_follow_the_tenant_policy() -> None:
    recorder = Recorder(aioredis.Redis(), Spool(Path("/nonexistent"), fsync=False), Metrics())
    entry = recorder._entry(context(Tenant(name="t")))
    record = CompletionRecord.model_validate_json(entry["record"])
    assert (record.id, record.user, record.alias, record.status, record.outcome) == (
        "chatcmpl-7",
        "u1",
        "prod",
        200,
        "ok",
    )
    assert record.request and record.request["messages"][0]["content"] == "mail [EMAIL]"
    assert record.text == "call [PHONE]" and record.redactions == {"email": 1, "phone": 1}
    assert record.request["params"] == {} and "user" not in record.request
    bare = Tenant(name="t", logging=LogPolicy(content=False))
    record = CompletionRecord.model_validate_json(recorder._entry(context(bare))["record"])
    assert record.request is None and record.choices is None and record.user == "u1"
    cancelled = context(Tenant(name="t"))
    cancelled.latency_s = None
    cancelled.finish(CLIENT_CLOSED)
    assert record_of(cancelled)["outcome"] == "cancelled"


async def test_the_spool_keeps_order_bounds_and_is_adopted(tmp_path: Path) -> None:
    dropped: list[int] = []
    spool = Spool(tmp_path, fsync=True, max_items=2500, on_drop=dropped.append)
    spool.open()
    for start in range(0, 3000, 500):
        await spool.append([{"n": n} for n in range(start, start + 500)])
    assert dropped == [1000] and spool.pending() == 2000
    seen: list[int] = []

    async def take(items: list[dict[str, int]]) -> None:
        seen.extend(item["n"] for item in items)

    assert await spool.drain(take) == 2000 and seen == list(range(1000, 3000))
    await spool.append([{"n": 1}])
    spool.close()  # as if its process died: the next one adopts it
    heir = Spool(tmp_path, fsync=True)
    for folder in tmp_path.iterdir():
        os.utime(folder, (0, 0))  # old enough to be an orphan
    heir.open()
    assert heir.pending() == 1
    seen.clear()
    await heir.drain(take)
    assert seen == [1] and len(list(tmp_path.iterdir())) == 1


@pytest.fixture
async def own_redis(tmp_path: Path) -> RedisServer:
    server = RedisServer(free_port(), tmp_path / "redis")
    server.start()
    return server


async def test_the_recorder_spools_while_redis_is_down_and_replays_in_order(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, Metrics(), interval_s=0.01)
    tenant = Tenant(name="t")
    try:
        for n in range(3):
            recorder.record(_numbered(tenant, n))
        await recorder.flush()
        own_redis.kill()
        for n in range(3, 8):
            recorder.record(_numbered(tenant, n))
        await recorder.flush()
        assert recorder.degraded and spool.pending() == 5
        own_redis.start()
        recorder._retry_at = 0
        recorder.record(_numbered(tenant, 8))
        await recorder.flush()
        assert not recorder.degraded and spool.pending() == 0
        entries = await redis.xrange(keys.completion_log("t"))
        assert [json.loads(fields["r"])["id"] for _, fields in entries] == [f"chatcmpl-{n}" for n in range(9)]
        await recorder._write([recorder._entry(_numbered(tenant, 0))])  # a replayed record is kept once
        assert await redis.xlen(keys.completion_log("t")) == 9
    finally:
        await redis.aclose()
        own_redis.stop()


def _numbered(tenant: Tenant, n: int) -> RequestContext:
    ctx = context(tenant)
    ctx.answer = Answer(body=json.dumps({"id": f"chatcmpl-{n}", "choices": []}).encode())
    return ctx


async def test_feedback_is_tenant_scoped_replaced_per_user_and_forgotten(redis: aioredis.Redis, tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=True)
    spool.open()
    recorder = Recorder(redis, spool, Metrics())
    store = FeedbackStore(redis, spool, recorder, Metrics(), settle_s=0.2)
    assert await store.check_durability() == "fsync-always", "the session's Redis fsyncs before answering"
    tenant, other = Tenant(name="t", logging=LogPolicy(score_min=1, score_max=5)), Tenant(name="o")
    recorder.record(context(tenant))  # chatcmpl-7, asked by u1
    first, stored = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", thumbs="down"))
    assert stored, "the queued record was written first, then the feedback"
    await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", score=4.5))
    await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u2", thumbs="up"))
    found = await store.of_completion("t", "chatcmpl-7")
    assert [(f.user, f.thumbs, f.score) for f in found] == [("u1", None, 4.5), ("u2", "up", None)]
    with pytest.raises(CompletionUnknown) as theirs:
        await store.submit(other, FeedbackIn(completion_id="chatcmpl-7", thumbs="up"))
    with pytest.raises(CompletionUnknown) as never:
        await store.submit(other, FeedbackIn(completion_id="chatcmpl-none", thumbs="up"))
    mine, unknown = theirs.value.body()["error"], never.value.body()["error"]
    assert mine["message"].replace("chatcmpl-7", "X") == unknown["message"].replace("chatcmpl-none", "X")
    assert (mine["code"], mine["param"], theirs.value.status) == (unknown["code"], unknown["param"], 404)
    removed = await store.forget("t", "u1")
    assert removed == {"completions": 1, "feedback": 1}
    assert await redis.xlen(keys.completion_log("t")) == 0
    assert await redis.hkeys(keys.feedback("t", "chatcmpl-7")) == ["u2"], "only u1's rating is erased"
    with pytest.raises(CompletionUnknown):
        await store.of_completion("t", "chatcmpl-7")  # the record was u1's: gone
