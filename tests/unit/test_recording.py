"""The pieces of the completion log, one at a time: answers assembled from streams, records under a
tenant's policy, the local spool, and the recorder and feedback store against a real Redis (one of
them killed and restarted)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pydantic_core
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway import arm_signal, keys
from gateway.answer import Answer
from gateway.context import CLIENT_CLOSED, RequestContext
from gateway.erasure import forget_user, mark_tenant_deleted, purge_tenant, tenant_deleted
from gateway.errors import StateUnavailable
from gateway.export import export, feedback_value
from gateway.feedback import CompletionUnknown, FeedbackStore
from gateway.metrics import Metrics
from gateway.record_builder import MAX_CHARS, build_entries, raw_record, raw_row, record_json, record_of
from gateway.record_worker import Built, RecordWorker, RecordWorkers
from gateway.recorder import SHARE_AFTER, Recorder
from gateway.records import CompletionRecord, Feedback, FeedbackIn, LogPolicy
from gateway.routing import Route
from gateway.spool import Spool
from gateway.tenants import Tenant, TenantStore
from tests.conftest import RedisServer

MINUTE = LogPolicy(max_age_days=60 / 86400)  # records kept 60 s
NAN = float("nan")


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


def test_an_answer_of_an_odd_shape_is_read_as_far_as_it_has_the_api_s_types() -> None:
    """An event whose `index` reads as inf is passed on unread (it raised past the stream before); two whole tool
    calls numbered alike are two; ids, names and finish reasons that are not strings are not kept."""
    answer = Answer()
    assert answer.feed(b'{"id":"c-1","choices":[{"index":1e400,"delta":{"content":"lost"}}]}') is None
    assert answer.feed(b'{"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":NaN}]}') is not None
    (only,) = answer.choices()
    assert (only.text, only.finish_reason) == ("ok", None)
    calls = [{"index": 0, "id": n, "function": {"name": n, "arguments": "{}"}} for n in ("c1", "c2", NAN)]
    body = {"id": "x", "choices": [{"index": 0, "message": {"tool_calls": calls}, "finish_reason": 7}]}
    whole = Answer(body=json.dumps(body).encode())
    whole.parse_body()
    assert whole.choice_dicts()[0]["tool_calls"] == [
        {"type": "function", "id": "c1", "function": {"name": "c1", "arguments": "{}"}},
        {"type": "function", "id": "c2", "function": {"name": "c2", "arguments": "{}"}},
        {"type": "function", "function": {"arguments": "{}"}},
    ]
    assert "finish_reason" not in whole.choice_dicts()[0]


def context(tenant: Tenant, n: int = 7, user: str = "u1", **payload: object) -> RequestContext:
    body = {"model": "m", "messages": [{"role": "user", "content": "mail bob@example.com"}], "user": user, **payload}
    ctx = RequestContext("r1", "chat", tenant, "k1", payload=body, validated=True)
    ctx.route = Route(requested="prod", upstream_model="t.bot@2", served_model="bot@2", alias="prod")
    answer = {"id": f"chatcmpl-{n}", "choices": [{"index": 0, "message": {"content": "call 415-555-0123"}}]}
    ctx.answer = Answer(body=json.dumps(answer).encode())
    ctx.finish(200)
    return ctx


def entry(ctx: RequestContext) -> dict[str, Any]:
    (built,) = build_entries([raw_record(ctx)])
    return built


def test_a_request_read_from_the_json_sent_is_recorded_as_from_its_payload() -> None:
    """The gateway hands the recorder the JSON it forwarded; the builder process parses it."""
    plain = context(Tenant(name="t"), temperature=0.5, stop=["\n"], stream_options={"include_usage": True})
    sent = context(Tenant(name="t"), temperature=0.5, stop=["\n"], stream_options={"include_usage": True})
    sent.sent = json.dumps({**sent.payload, "model": "t.bot@2"}).encode()
    raw = raw_record(sent)
    assert raw.request is None and raw.sent == sent.sent, "not parsed on the request path"
    sent.received, sent.latency_s = plain.received, plain.latency_s
    assert json.loads(entry(sent)["record"]) == json.loads(entry(plain)["record"])
    request = json.loads(entry(sent)["record"])["request"]
    assert request["params"] == {"temperature": 0.5, "stop": ["\n"]}
    assert request["messages"] == [{"role": "user", "content": "mail [EMAIL]"}]


def test_a_record_holding_an_integer_past_64_bits_is_encoded_all_the_same() -> None:
    """A record's JSON is orjson's, and pydantic_core's for what orjson refuses: a request's seed of 2**70 is kept."""
    ctx = context(Tenant(name="t"), seed=2**70, temperature=0.25)
    ctx.sent = json.dumps(ctx.payload).encode()
    record = json.loads(entry(ctx)["record"])
    assert record["request"]["params"] == {"seed": 2**70, "temperature": 0.25}
    plain = json.loads(entry(context(Tenant(name="t"), seed=7))["record"])
    assert record_json(plain) == pydantic_core.to_json(plain).decode(), "the same text either way"


def test_records_follow_the_tenant_policy() -> None:
    record = CompletionRecord.model_validate_json(entry(context(Tenant(name="t")))["record"])
    assert (record.id, record.user, record.alias, record.status) == ("chatcmpl-7", "u1", "prod", 200)
    assert (record.outcome, record.adapter, record.served_model, record.truncated) == ("ok", None, "bot@2", False)
    assert record.request and record.request["messages"][0]["content"] == "mail [EMAIL]"
    assert record.text == "call [PHONE]" and record.redactions == {"email": 1, "phone": 1}
    assert record.request["params"] == {} and "user" not in record.request
    bare = Tenant(name="t", logging=LogPolicy(content=False))
    record = CompletionRecord.model_validate_json(entry(context(bare))["record"])
    assert record.request is None and record.choices is None and record.user == "u1" and record.id == "chatcmpl-7"
    huge = context(Tenant(name="t", logging=LogPolicy(redact=[])), messages=[{"role": "user", "content": "x" * 50_000}])
    record = CompletionRecord.model_validate_json(entry(huge)["record"])
    assert record.truncated and record.request and len(record.request["messages"][0]["content"]) == MAX_CHARS
    refused = context(Tenant(name="t"))
    refused.validated = False
    assert raw_record(refused).sent is None
    assert json.loads(entry(refused)["record"])["request"] is None, "an invalid body's content is never kept"
    cancelled = context(Tenant(name="t"))
    cancelled.latency_s = None
    cancelled.finish(CLIENT_CLOSED)
    assert record_of(raw_record(cancelled))["outcome"] == "cancelled"


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
    heir.open()
    assert heir.pending() == 1, "adopted at once: a folder has its name only once its owner holds its lock"
    seen.clear()
    await heir.drain(take)
    assert seen == [1] and len(list(tmp_path.iterdir())) == 1


def process_recorder(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path, batch: int = 500, metrics: Metrics | None = None
) -> Recorder:
    """A recorder as the gateway runs it: its record process builds and writes; its spool in `tmp_path`."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    return Recorder(redis, spool, metrics or Metrics(), batch=batch, workers=1, redis_url=redis_server.url)


def stream_ids(entries: list[tuple[str, dict[str, str]]]) -> list[str]:
    return [json.loads(fields["r"])["id"] for _, fields in entries]


@pytest.mark.parametrize("workers", [0, 1, 2])
async def test_the_recorder_spools_while_redis_is_down_and_replays_in_order(
    own_redis: RedisServer, tmp_path: Path, workers: int
) -> None:
    """Built and written in a thread and by the gateway (0), by the record process (1), or by either of two (2)."""
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, Metrics(), workers=workers, redis_url=own_redis.url)
    tenant = Tenant(name="t")
    try:
        for n in range(3):
            recorder.record(context(tenant, n))
        await recorder._cycle()
        own_redis.kill()
        for n in range(3, 8):
            recorder.record(context(tenant, n))
        await recorder._cycle()
        assert recorder.degraded and spool.pending() == 5
        own_redis.start()
        recorder._retry_at = 0
        recorder.record(context(tenant, 8))
        await recorder._cycle()
        assert not recorder.degraded and spool.pending() == 0
        ids = stream_ids(await redis.xrange(keys.completion_log("t")))
        assert ids == [f"chatcmpl-{n}" for n in range(9)]
        await recorder._write([entry(context(tenant, 0))])  # a replayed record is kept once
        assert await redis.xlen(keys.completion_log("t")) == 9
        assert list(recorder.recent) == [f"chatcmpl-{n}" for n in range(9)], "who answered each is remembered"
    finally:
        await recorder.close()
        await redis.aclose()


async def test_the_record_process_writes_nothing_after_a_failed_write_until_a_new_epoch(
    own_redis: RedisServer,
) -> None:
    """Once a write found Redis away, the batches already sent come back unwritten even if Redis is back,
    so that the gateway spools them after the failed one and the log keeps its order."""
    worker = RecordWorker(own_redis.url)
    tenant = Tenant(name="t")
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    try:
        await worker.send([raw_row(context(tenant, 0))], "first", 0)
        assert (await worker.receive())[1].written.unpack() == {"chatcmpl-0": ("t", tenant.created)}
        own_redis.kill()
        await worker.send([raw_row(context(tenant, 1))], "failed", 0)
        _, failed = await worker.receive()
        assert failed.unreachable and [e["id"] for e in failed.entries] == ["chatcmpl-1"] and not failed.written
        own_redis.start()
        await worker.send([raw_row(context(tenant, 2))], "same epoch", 0)
        await worker.send([raw_row(context(tenant, 3))], "spooling", None)
        for tag in ("same epoch", "spooling"):
            got, built = await worker.receive()
            assert got == tag and len(built.entries) == 1 and not built.written and not built.unreachable
        assert stream_ids(await redis.xrange(keys.completion_log("t"))) == ["chatcmpl-0"], "nothing after the failure"
        await worker.send([raw_row(context(tenant, 4))], "next epoch", 1)
        assert (await worker.receive())[1].written.unpack() == {"chatcmpl-4": ("t", tenant.created)}
        assert stream_ids(await redis.xrange(keys.completion_log("t"))) == ["chatcmpl-0", "chatcmpl-4"]
    finally:
        await worker.stop()
        await redis.aclose()


async def test_a_dead_processs_spool_is_replayed_by_the_next_and_erasures_hold(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    tenant = Tenant(name="t")
    dead = Spool(tmp_path, fsync=False)
    dead.open()
    await dead.append([entry(context(tenant, n, user="ann" if n < 2 else "bo")) for n in range(4)])
    dead.close()
    for folder in tmp_path.iterdir():
        os.utime(folder, (0, 0))
    assert (await forget_user(redis, "t", "ann", MINUTE)) == {"completions": 0, "feedback": 0}
    heir = Spool(tmp_path, fsync=False)
    heir.open()
    recorder = Recorder(redis, heir, Metrics())
    recorder.record(context(tenant, 9, user="cy"))
    await recorder._cycle()
    assert heir.pending() == 0, "the adopted spool is replayed though Redis never went away"
    ids = set(stream_ids(await redis.xrange(keys.completion_log("t"))))
    assert ids == {"chatcmpl-2", "chatcmpl-3", "chatcmpl-9"}, "ann's records, made before her erasure, stay erased"


async def test_a_write_cycle_survives_a_record_that_cannot_be_built(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    recorder = process_recorder(redis, redis_server, tmp_path)
    broken = context(Tenant(name="t"), 1)
    broken.payload = None  # type: ignore[assignment]
    recorder.record(broken)
    await recorder._cycle()
    recorder.record(context(Tenant(name="t"), 2))
    await recorder._cycle()
    assert stream_ids(await redis.xrange(keys.completion_log("t"))) == ["chatcmpl-2"]
    await recorder.close()


def test_only_what_the_arm_failed_counts_as_its_error() -> None:
    """A caller's mistakes (the engine's 400 for a prompt over the context, say) are not the arm's: one end user's bad
    requests, always assigned to the same arm, rolled it back. 5xx and the 404 of an arm that cannot serve are."""
    routed = Route(requested="prod", upstream_model="m", served_model="m", alias="prod", experiment="e", arm="a")
    found = {}
    for status in (200, 400, 404, 422, 499, 500, 502, 503, 504):
        ctx = context(Tenant(name="t"), status)
        ctx.route, ctx.latency_s = routed, None
        ctx.finish(status)
        found[status] = build_entries([raw_record(ctx)])[0]["error"]
    assert found == {200: 0, 400: 0, 404: 1, 422: 0, 499: 0, 500: 1, 502: 1, 503: 1, 504: 1}


async def test_a_record_redis_refuses_costs_only_itself(redis: aioredis.Redis, tmp_path: Path) -> None:
    """One call writes 100 records and sums what they share (end users' sets, an arm's counters) at its end.
    A record in the middle that the script refuses: the others all land, with their sets and counters, once."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, Metrics())
    contexts = [context(Tenant(name="t"), n, user=f"u{n % 3}") for n in range(100)]
    for ctx in contexts:
        ctx.route = Route(requested="prod", upstream_model="m", served_model="m", alias="prod", experiment="e", arm="a")
    entries = build_entries([raw_record(ctx) for ctx in contexts])
    entries[50]["prompt_tokens"] = "many"  # the script refuses it
    await recorder._write(entries)
    assert len(await redis.xrange(keys.completion_log("t"))) == 99
    members = [await redis.smembers(keys.end_user("t", f"u{n}")) for n in range(3)]
    assert sum(map(len, members)) == 99 and "chatcmpl-50" not in set().union(*members)
    counters = await redis.hgetall(keys.arm_counters("t", "e", "a"))
    assert int(counters["requests"]) == 99, counters
    assert await redis.pfcount(keys.arm_users("t", "e", "a")) == 3


@pytest.mark.parametrize("workers", [0, 1, 2])
async def test_pipelined_batches_are_written_in_the_order_they_came(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path, workers: int
) -> None:
    """Batches overlap (one built while the next is taken and the last is written): the log keeps order."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    metrics = Metrics()
    recorder = Recorder(redis, spool, metrics, batch=3, workers=workers, redis_url=redis_server.url)
    for n in range(20):
        recorder.record(context(Tenant(name="t"), n))
    await recorder._cycle()
    assert stream_ids(await redis.xrange(keys.completion_log("t"))) == [f"chatcmpl-{n}" for n in range(20)]
    assert metrics.registry.get_sample_value("loragate_records_written_total") == 20
    assert list(recorder.recent) == [f"chatcmpl-{n}" for n in range(20)]
    await recorder.close()


@pytest.mark.parametrize("workers", [0, 1])
async def test_what_the_script_skips_is_counted_skipped_not_written(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path, workers: int
) -> None:
    """A record written already (a replay) or of an end user erased since is skipped by the script: counted in
    `loragate_records_skipped_total`, not as written (before 2026-12-07, as written)."""
    await redis.set(keys.forgotten("t", "gone"), "9999999999")
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    metrics = Metrics()
    recorder = Recorder(redis, spool, metrics, batch=3, workers=workers, redis_url=redis_server.url)
    try:
        for n in range(3):
            recorder.record(context(Tenant(name="t"), n))
        recorder.record(context(Tenant(name="t"), 3, user="gone"))
        await recorder._cycle()
        for n in range(2):
            recorder.record(context(Tenant(name="t"), n))  # the same completions again
        await recorder._cycle()
        assert stream_ids(await redis.xrange(keys.completion_log("t"))) == [f"chatcmpl-{n}" for n in range(3)]
        assert metrics.registry.get_sample_value("loragate_records_written_total") == 3
        assert metrics.registry.get_sample_value("loragate_records_skipped_total") == 3
        assert metrics.registry.get_sample_value("loragate_records_dropped_total", {"reason": "refused"}) is None
    finally:
        await recorder.close()


async def test_records_that_arrive_during_a_cycle_wait_for_the_next_unless_they_fill_a_batch(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Under load a cycle does not hand over the few records that came in while it ran (batches would shrink to a
    handful, each costing a script run): they wait for the next cycle, unless they fill a batch or `written` waits
    for them."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, Metrics(), batch=4, interval_s=30)
    arrivals = [range(3, 5), range(5, 10), range(0), range(10, 12)]  # during each batch handed over
    waiting: list[asyncio.Task[None]] = []
    send = recorder._builder.send

    async def arriving(*args: Any) -> None:
        for n in arrivals.pop(0) if arrivals else ():
            recorder.record(context(Tenant(name="t"), n))
        if not arrivals and not waiting:  # the third cycle: 10 and 11 came in, and someone waits for them
            waiting.append(asyncio.create_task(recorder.written()))
            await asyncio.sleep(0)
        await send(*args)

    recorder._builder.send = arriving  # type: ignore[method-assign]
    for n in range(3):
        recorder.record(context(Tenant(name="t"), n))

    async def logged() -> list[str]:
        return stream_ids(await redis.xrange(keys.completion_log("t")))

    await recorder._cycle()
    assert await logged() == [f"chatcmpl-{n}" for n in range(3)] and len(recorder._queue) == 2
    await recorder._cycle()  # 3 and 4 were queued before it began; 5-8 fill a batch during it; 9 waits
    assert await logged() == [f"chatcmpl-{n}" for n in range(9)] and len(recorder._queue) == 1
    await recorder._cycle()  # 9 was queued before it began; 10 and 11 are waited for: they go in this cycle too
    assert await logged() == [f"chatcmpl-{n}" for n in range(12)] and not recorder._queue
    await asyncio.wait_for(waiting[0], 5)
    await recorder.close()


async def test_waiting_for_what_is_written_already_keeps_the_next_records_batching_window(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Feedback on an id no one knows waits for this process's queue every time (as for one answered a moment ago);
    with nothing queued that is no reason to hand the next records over at once, in batches of one."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, Metrics(), interval_s=30)
    task = asyncio.create_task(recorder.run())
    try:
        await asyncio.wait_for(recorder.written(), 1)  # nothing queued: at once
        recorder.record(context(Tenant(name="t"), 1))
        await asyncio.sleep(0.3)
        assert len(recorder._queue) == 1, "it waits for its batch's window"
        await asyncio.wait_for(recorder.written(), 5)  # now one is queued: handed over at once
        assert stream_ids(await redis.xrange(keys.completion_log("t"))) == ["chatcmpl-1"]
    finally:
        await recorder.stop()
        await task
        await recorder.close()


async def test_record_processes_share_batches_and_write_one_only_while_no_other_holds_one(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """`LORAGATE_RECORD_WORKERS=2`: each batch goes to the process holding fewer, answers come back in the order the
    batches were sent, and a process writes a batch itself only while the other holds none (two writing at once could
    log a later batch first): the rest come back built, for the gateway to write in order."""
    pool, tenant = RecordWorkers(2, redis_server.url), Tenant(name="t")
    await pool.start()
    try:
        for n in range(3):
            await pool.send([raw_row(context(tenant, n))], n, epoch=0)
        assert [worker.pending for worker in pool._workers] == [2, 1] and pool.pending == 3
        got = [await pool.receive() for _ in range(3)]
        assert [tag for tag, _ in got] == [0, 1, 2]
        first = got[0][1]
        assert list(first.written.unpack()) == ["chatcmpl-0"] and not first.entries, "alone in flight: written there"
        assert [[e["id"] for e in built.entries] for _, built in got[1:]] == [["chatcmpl-1"], ["chatcmpl-2"]]
        assert not any(built.written for _, built in got[1:]), "sent while another was in flight: built only"
        assert stream_ids(await redis.xrange(keys.completion_log("t"))) == ["chatcmpl-0"]
        await pool.send([raw_row(context(tenant, 3))], 3, epoch=0)
        last = (await pool.receive())[1]
        assert list(last.written.unpack()) == ["chatcmpl-3"], "nothing else in flight: written there"
        processes = [worker._process for worker in pool._workers]
        assert all(processes) and len({p.process.pid for p in processes if p}) == 2, "two processes"
    finally:
        await pool.stop()


async def test_when_one_of_two_record_processes_dies_its_batches_come_back_in_order_for_the_gateway(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A batch in flight to a process that died is built in a thread and comes back in its turn; the recorder writes
    it and those after it in order, and the next batch goes to a new process."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, Metrics(), batch=2, workers=2, redis_url=redis_server.url)
    await recorder.start()
    builder = recorder._builder
    assert isinstance(builder, RecordWorkers)
    dying = builder._workers[0]._process
    assert dying is not None
    os.kill(dying.process.pid, signal.SIGSTOP)  # it cannot read the batches it is sent before it dies
    try:
        for n in range(12):
            recorder.record(context(Tenant(name="t"), n))
        kill = asyncio.get_running_loop().call_later(0.2, dying.process.kill)
        await recorder._cycle()
        kill.cancel()
        assert dying.process.returncode is not None
        assert stream_ids(await redis.xrange(keys.completion_log("t"))) == [f"chatcmpl-{n}" for n in range(12)]
        for n in range(12, 14):
            recorder.record(context(Tenant(name="t"), n))
        await recorder._cycle()
        assert stream_ids(await redis.xrange(keys.completion_log("t")))[12:] == ["chatcmpl-12", "chatcmpl-13"]
        assert builder._workers[0]._process is not None and builder._workers[0]._process is not dying
    finally:
        await recorder.close()


async def test_the_record_process_writes_while_it_keeps_up_and_the_gateway_helps_with_a_backlog(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    recorder = process_recorder(redis, redis_server, tmp_path, batch=3)
    written_here: list[str] = []
    store_write = recorder._records.write

    async def spy(entries: list[dict[str, Any]]) -> Any:
        written_here.extend(e["id"] for e in entries)
        return await store_write(entries)

    recorder._records.write = spy  # type: ignore[method-assign]
    try:
        for n in range(3):
            recorder.record(context(Tenant(name="t"), n))
        await recorder._cycle()
        assert written_here == [], "a batch the record process keeps up with is written there"
        waiting = 3 * SHARE_AFTER  # SHARE_AFTER batches waiting: the record process is left to catch up alone
        for n in range(3, 3 + waiting):
            recorder.record(context(Tenant(name="t"), n))
        await recorder._cycle()
        assert written_here == [], "a short lag: the record process writes it all"
        end = 3 + waiting + 3 * SHARE_AFTER + 4
        for n in range(3 + waiting, end):
            recorder.record(context(Tenant(name="t"), n))
        await recorder._cycle()
        backlog = {f"chatcmpl-{n}" for n in range(3 + waiting, end)}
        assert written_here and set(written_here) <= backlog, "past SHARE_AFTER batches: both write"
        for n in range(end, end + 2):
            recorder.record(context(Tenant(name="t"), n))
        written_here.clear()
        await recorder._cycle()
        assert written_here == [], "once the backlog is gone, the record process writes alone again"
        ids = stream_ids(await redis.xrange(keys.completion_log("t")))
        assert ids == [f"chatcmpl-{n}" for n in range(end + 2)], "in order, whoever wrote them"
    finally:
        await recorder.close()


async def test_a_record_refused_in_the_record_process_is_counted_dropped_not_written(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    await redis.set(keys.completion_log("blocked"), "not a stream")  # XADD: WRONGTYPE, that record is refused
    metrics = Metrics()
    recorder = process_recorder(redis, redis_server, tmp_path, metrics=metrics)
    try:
        for n, tenant in enumerate(("t", "blocked", "t")):
            recorder.record(context(Tenant(name=tenant), n))
        await recorder._cycle()
        assert stream_ids(await redis.xrange(keys.completion_log("t"))) == ["chatcmpl-0", "chatcmpl-2"]
        assert metrics.registry.get_sample_value("loragate_records_written_total") == 2
        assert metrics.registry.get_sample_value("loragate_records_dropped_total", {"reason": "refused"}) == 1
        assert list(recorder.recent) == ["chatcmpl-0", "chatcmpl-2"]
    finally:
        await recorder.close()


async def test_batches_in_flight_when_the_builder_process_dies_are_built_all_the_same() -> None:
    worker = RecordWorker()
    await worker.start()
    dying = worker._process
    for n in range(3):
        await worker.send([raw_row(context(Tenant(name="t"), n))], n)
    assert dying is not None and worker.pending == 3
    dying.process.kill()  # before it has built them: what it had is built in a thread instead, in order
    got = [await worker.receive() for _ in range(3)]
    assert [(tag, built.entries[0]["id"]) for tag, built in got] == [(n, f"chatcmpl-{n}") for n in range(3)]
    await worker.send([raw_row(context(Tenant(name="t"), 9))], "next")
    assert (await worker.receive())[1].entries[0]["id"] == "chatcmpl-9"
    assert worker._process is not None and worker._process is not dying, "a new process builds what comes after"
    await worker.stop()


async def test_a_batch_sent_after_its_record_process_died_is_left_to_the_gateway_behind_the_ones_before_it(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A batch in flight to a process that died comes back unwritten (built in a thread) for the gateway to write: a
    batch sent after it, to the new process, must not be written there first."""
    worker = RecordWorker(redis_server.url)
    await worker.start()
    dying = worker._process
    assert dying is not None
    os.kill(dying.process.pid, signal.SIGSTOP)  # it cannot read batch 0 before it dies
    await worker.send([raw_row(context(Tenant(name="t"), 0))], 0, epoch=0)
    dying.process.kill()
    await dying.process.wait()
    await worker.send([raw_row(context(Tenant(name="t"), 1))], 1, epoch=0)  # to a new process
    await worker.send([raw_row(context(Tenant(name="t"), 2))], 2, epoch=0)
    got = [await worker.receive() for _ in range(3)]
    assert [(tag, [e["id"] for e in built.entries], built.written.unpack()) for tag, built in got] == [
        (n, [f"chatcmpl-{n}"], {}) for n in range(3)
    ], "all three come back to be written by the gateway, in order"
    assert await redis.xlen(keys.completion_log("t")) == 0
    await worker.send([raw_row(context(Tenant(name="t"), 3))], 3, epoch=0)
    assert list((await worker.receive())[1].written.unpack()) == ["chatcmpl-3"], "once they are back, it writes again"
    await worker.stop()


def first_gateway_write_waits_for_the_next_answer(recorder: Recorder) -> None:
    """The gateway's first write (of a batch that came back for it to write) waits until the builder has answered the
    batch after it: were that batch's process allowed to write it, it would be in Redis first (deterministically)."""
    builder, store_write = recorder._builder, recorder._records.write
    receive, answers, answered = builder.receive, [], asyncio.Event()

    async def receiving() -> tuple[Any, Built]:
        got = await receive()
        answers.append(got[0])
        if len(answers) >= 2:
            answered.set()
        return got

    async def writing(entries: list[dict[str, Any]]) -> Any:
        await asyncio.wait_for(answered.wait(), 60)  # never answered: the write fails (spooled), and the test with it
        return await store_write(entries)

    builder.receive = receiving  # type: ignore[method-assign]
    recorder._records.write = writing  # type: ignore[method-assign]


async def test_the_log_keeps_its_order_when_the_record_process_dies_mid_cycle(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The death is found when the next batch is sent (a new process gets it): that batch is left to the gateway."""
    recorder = process_recorder(redis, redis_server, tmp_path, batch=1)
    await recorder.start()
    builder = recorder._builder
    assert isinstance(builder, RecordWorker)
    send, sent = builder.send, list[Any]()

    async def dying_after_the_first(*args: Any) -> None:
        process = builder._process
        if not sent and process is not None:
            os.kill(process.process.pid, signal.SIGSTOP)  # it cannot read what is sent next: killed after
        await send(*args)
        if not sent and process is not None:
            process.process.kill()
            await process.process.wait()
        sent.append(args[2])
        if len(sent) < 4:  # one at a time: never a backlog, so the record process would write each itself
            recorder.record(context(Tenant(name="t"), len(sent)))

    builder.send = dying_after_the_first  # type: ignore[method-assign]
    first_gateway_write_waits_for_the_next_answer(recorder)
    try:
        recorder.record(context(Tenant(name="t"), 0))
        await recorder._cycle()
        assert stream_ids(await redis.xrange(keys.completion_log("t"))) == [f"chatcmpl-{n}" for n in range(4)]
    finally:
        await recorder.close()


async def test_the_log_keeps_its_order_when_the_record_process_is_found_dead_at_its_answer(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The death is found reading the only batch in flight, which the gateway then writes itself: the next batch,
    handed to a new process with nothing in flight, is left to the gateway too, written after it."""
    recorder = process_recorder(redis, redis_server, tmp_path, batch=1)
    await recorder.start()
    builder = recorder._builder
    assert isinstance(builder, RecordWorker) and builder._process is not None
    dying = builder._process
    os.kill(dying.process.pid, signal.SIGSTOP)  # it cannot read the first batch: killed when it is awaited
    first_gateway_write_waits_for_the_next_answer(recorder)
    receive = builder.receive

    async def then_one_more(*args: Any) -> Any:
        if dying.process.returncode is None:  # it dies with the first batch sent to it, unread
            dying.process.kill()
        got = await receive(*args)
        if got[0] == 1:  # the first batch's tag: its last record's sequence number
            recorder.record(context(Tenant(name="t"), 1))
        return got

    builder.receive = then_one_more  # type: ignore[method-assign]
    try:
        recorder.record(context(Tenant(name="t"), 0))
        await recorder._cycle()
        assert stream_ids(await redis.xrange(keys.completion_log("t"))) == ["chatcmpl-0", "chatcmpl-1"]
        assert builder._process is not dying
    finally:
        await recorder.close()


async def feedback_store(redis: aioredis.Redis, recorder: Recorder, tmp_path: Path) -> FeedbackStore:
    spool = Spool(tmp_path / "feedback", fsync=True)
    spool.open()
    store = FeedbackStore(redis, spool, recorder, Metrics(), settle_s=0.2)
    assert await store.check_durability() == "fsync-always", "the session's Redis fsyncs before answering"
    return store


async def test_a_server_naming_itself_7_2_is_trusted_with_waitaof_only_once_it_confirms_one(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that says it is Redis 7.2 but refuses WAITAOF (a fork, a proxy; here Debian's 7.0, told to say 7.2)
    is not trusted with it: it fsyncs every write (`appendfsync always`), so feedback is still acknowledged as
    stored, where trusting the version spooled every rating (each WAITAOF failed)."""
    real = tuple(int(part) for part in str((await redis.info("server"))["redis_version"]).split(".")[:2])
    info = redis.info

    async def newer(section: str | None = None, *args: Any, **kwargs: Any) -> Any:
        found = await info(section, *args, **kwargs)
        if section == "server":
            found["redis_version"] = "7.2.4"
        return found

    monkeypatch.setattr(redis, "info", newer)
    spool = Spool(tmp_path / "feedback", fsync=True)
    spool.open()
    store = FeedbackStore(redis, spool, recorder, Metrics(), settle_s=0.2)
    assert await store.check_durability() == ("waitaof" if real >= (7, 2) else "fsync-always")
    tenant = Tenant(name="t")
    recorder.record(context(tenant))
    _, stored = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", thumbs="up"))
    assert stored, "in Redis, on its disk: not left in the spool"


async def test_feedback_is_tenant_scoped_replaced_per_user_and_forgotten(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    store = await feedback_store(redis, recorder, tmp_path)
    tenant, other = Tenant(name="t", logging=LogPolicy(score_min=1, score_max=5)), Tenant(name="o")
    recorder.record(context(tenant))  # chatcmpl-7, asked by u1
    first, stored = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", thumbs="down"))
    assert stored, "the queued record was written first, then the feedback"
    await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", score=4.5))
    await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u2", thumbs="up"))
    found = await store.of_completion(tenant, "chatcmpl-7")
    assert [(f.user, f.thumbs, f.score) for f in found] == [("u1", None, 4.5), ("u2", "up", None)]
    with pytest.raises(CompletionUnknown) as theirs:
        await store.submit(other, FeedbackIn(completion_id="chatcmpl-7", thumbs="up"))
    with pytest.raises(CompletionUnknown) as never:
        await store.submit(other, FeedbackIn(completion_id="chatcmpl-none", thumbs="up"))
    mine, unknown = theirs.value.body()["error"], never.value.body()["error"]
    assert mine["message"].replace("chatcmpl-7", "X") == unknown["message"].replace("chatcmpl-none", "X")
    assert (mine["code"], mine["param"], theirs.value.status) == (unknown["code"], unknown["param"], 404)
    removed = await forget_user(redis, "t", "u1", MINUTE)
    assert removed == {"completions": 1, "feedback": 2}, "u1's completion, with every rating of it (u2's quotes it)"
    assert await redis.xlen(keys.completion_log("t")) == 0
    assert await redis.exists(keys.feedback("t", "chatcmpl-7")) == 0
    assert await redis.get(keys.completion("chatcmpl-7")) == "-", "its index: a marker that names no one"


async def test_a_score_range_wider_than_a_float_holds_does_not_stop_feedback(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    """score_min -1e308 and score_max 1e308 are both finite, their distance is not: the arm's share of positive
    ratings was NaN, which Redis refused half-way through the script (and, spooled, every later rating behind it).
    The score is kept; the arm counts the rating by its thumbs only."""
    store = await feedback_store(redis, recorder, tmp_path)
    tenant = Tenant(name="t", logging=LogPolicy(score_min=-1e308, score_max=1e308))
    ctx = context(tenant)
    ctx.route = Route(requested="prod", upstream_model="m", served_model="m", alias="prod", experiment="e", arm="a")
    recorder.record(ctx)
    await recorder.written()
    _, stored = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", thumbs="up", score=5.0))
    assert stored and [f.score for f in await store.of_completion(tenant, "chatcmpl-7")] == [5.0]
    counters = await redis.hgetall(keys.arm_counters("t", "e", "a"))
    assert (counters["rated"], float(counters["positive_sum"])) == ("1", 1.0), counters


async def test_a_rating_keeps_the_score_range_it_was_given_in(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    """A score of 4 out of 0-10 is a negative judgement whatever the tenant's range becomes: replaced after the range
    became 0-5, its arm took away 0.8 (by the range then) where it had added 0.4, and kept a phantom negative; and
    every export re-judged it (a top rating became a thumbs-down)."""
    store = await feedback_store(redis, recorder, tmp_path)
    tenant = Tenant(name="t", logging=LogPolicy(score_min=0, score_max=10))
    ctx = context(tenant)
    ctx.route = Route(requested="prod", upstream_model="m", served_model="m", alias="prod", experiment="e", arm="a")
    recorder.record(ctx)
    await recorder.written()
    given, _ = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", score=4.0))
    assert given.score_range == (0.0, 10.0)
    narrower = tenant.model_copy(update={"logging": LogPolicy(score_min=0, score_max=5)})
    assert feedback_value(given, narrower.logging) == 0.4, "judged by the range it was given in"
    await store.submit(narrower, FeedbackIn(completion_id="chatcmpl-7", user="u1", thumbs="up"))
    counters = await redis.hgetall(keys.arm_counters("t", "e", "a"))
    assert (counters["rated"], float(counters["positive_sum"]), counters["negative"]) == ("1", 1.0, "0"), counters
    [read] = await store.of_completion(narrower, "chatcmpl-7")
    assert read.score_range is None, "a thumb has no score, so no range"


async def test_a_rating_no_arm_counted_takes_nothing_from_the_arm_when_replaced_or_erased(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    """Written before its completion's record came (a spool replayed first), a rating counted for no arm; replaced or
    erased once the record had come, it took from the arm what the arm never had: one rating fewer, a phantom +1 in
    its positive sum, which could name a false winner."""
    store = await feedback_store(redis, recorder, tmp_path)
    tenant = Tenant(name="t")
    early = [spooled_rating(tenant, "chatcmpl-7")]
    early.append(early[0] | {"feedback": early[0]["feedback"].replace('"user":"u1"', '"user":"u2"')})
    await store._write(early, replay=True)  # the record not in Redis yet: no arm counts them
    ctx = context(tenant)
    ctx.route = Route(requested="prod", upstream_model="m", served_model="m", alias="prod", experiment="e", arm="a")
    recorder.record(ctx)
    await recorder.written()
    assert await redis.hget(keys.arm_counters("t", "e", "a"), "rated") is None
    await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", thumbs="down"))  # replaces u1's
    await forget_user(redis, "t", "u2", tenant.logging)  # erases u2's
    counters = await redis.hgetall(keys.arm_counters("t", "e", "a"))
    assert (counters["rated"], float(counters["positive_sum"]), counters["negative"]) == ("1", 0.0, "1"), counters
    stored = await redis.hget(keys.feedback("t", "chatcmpl-7"), "u1")
    assert stored is not None and "counted" not in stored, "written once its record had come: counted, not marked"


async def test_a_guard_window_counts_the_ratings_given_in_it(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    """The window began as a snapshot of the arm's totals: a rating given before it and erased after it lowered
    the totals, and the new ratings were hidden under the snapshot (30 old thumbs-down erased, 30 new ones: none
    seen). Ratings are dated in it as in a comparison period; every field a number, as the release before reads."""
    store = await feedback_store(redis, recorder, tmp_path)
    tenant = Tenant(name="t")
    route = Route(requested="prod", upstream_model="m", served_model="m", alias="prod", experiment="e", arm="a")
    for n, user in ((1, "old"), (2, "new")):
        ctx = context(tenant, n, user=user)
        ctx.route = route
        recorder.record(ctx)
    await recorder.written()
    await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-1", user="old", thumbs="down"))
    await arm_signal.restart_guard(redis, "t", "e", 0.0, ["a"], "a")
    await asyncio.sleep(arm_signal.SINCE_MARGIN_S + 0.1)  # the window begins that long after
    await forget_user(redis, "t", "old", tenant.logging)
    await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-2", user="new", thumbs="down"))
    counters = await redis.hgetall(keys.arm_counters("t", "e", "a"))
    window = arm_signal.guard_window({k: float(v) for k, v in counters.items() if k != "since:base"})
    assert window == {"requests": 0, "errors": 0, "rated": 1, "negative": 1}, counters


async def test_spooled_feedback_is_checked_on_replay(redis: aioredis.Redis, recorder: Recorder, tmp_path: Path) -> None:
    """Feedback taken while its completion could not be vouched for: the tenant's is written, another
    tenant's dropped, one whose record is not in Redis yet waits."""
    store = await feedback_store(redis, recorder, tmp_path)
    mine, theirs = Tenant(name="t"), Tenant(name="o")  # spooled while Redis was down, say
    recorder.record(context(mine, 1))
    recorder.record(context(theirs, 2))
    await recorder.written()
    for cid, since in (("chatcmpl-1", 0.0), ("chatcmpl-2", 0.0), ("chatcmpl-404", time.time())):
        item = {"tenant": "t", "verify": True, "ttl": 60, "since": since}
        item["feedback"] = FeedbackIn(completion_id=cid, thumbs="up").model_dump_json()
        item["feedback"] = (
            item["feedback"][:-1] + ',"object":"feedback","id":"fb-' + cid + f'","created":{time.time()}}}'
        )
        await store._spool.append([item])
    assert await store.replay() >= 2
    assert await redis.hkeys(keys.feedback("t", "chatcmpl-1")) == [""], "its own completion: written"
    assert await redis.exists(keys.feedback("t", "chatcmpl-2")) == 0, "another tenant's: dropped"
    assert store._spool.pending() == 1, "an unknown one waits for its record"


def spooled_rating(tenant: Tenant, completion_id: str) -> dict[str, Any]:
    """A rating as `FeedbackStore.submit` spools it (its completion vouched for when it was given)."""
    feedback = Feedback(
        **FeedbackIn(completion_id=completion_id, user="u1", thumbs="up").model_dump(), created=time.time()
    )
    item = {"tenant": tenant.name, "verify": False, "ttl": 60, "since": time.time(), "tenant_created": tenant.created}
    return item | {"feedback": feedback.model_dump_json()}


async def test_a_deleted_tenants_queued_and_spooled_records_stay_out_of_its_namesakes_log(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    """Tenant `t` is deleted while records and ratings of it wait in this process's queue, in another
    process's queue, `recent` map and rating spool, and in a dead process's spool. None of them is written
    afterwards, and `t` created again sees nothing of the old `t`; its own completions and ratings work."""
    store = await feedback_store(redis, recorder, tmp_path)
    old = await TenantStore(redis).create("t")
    recorder.record(context(old, 1))
    await store.submit(old, FeedbackIn(completion_id="chatcmpl-1", user="u1", thumbs="up"))
    await redis.set(keys.completion("chatcmpl-0"), "t 1-0", ex=60)  # a record trimmed from the log: its index stays
    elsewhere = Recorder(redis, Spool(tmp_path / "elsewhere", fsync=False), Metrics())  # another process
    elsewhere._spool.open()
    elsewhere.record(context(old, 2))
    await elsewhere._cycle()  # written, and remembered there, before the deletion
    elsewhere.record(context(old, 3))  # still queued there
    ratings = Spool(tmp_path / "ratings", fsync=True)
    ratings.open()
    await ratings.append([spooled_rating(old, "chatcmpl-2")])  # spooled there (Redis did not fsync, say)
    dead = Spool(tmp_path / "dead", fsync=False)
    dead.open()
    await dead.append([entry(context(old, 4))])
    recorder.record(context(old, 5))  # still queued here

    await TenantStore(redis).delete("t")  # as DELETE /admin/tenants/t does
    await mark_tenant_deleted(redis, "t", old.created, old.logging.max_age_s)
    await recorder.written()
    assert await purge_tenant(redis, "t") >= 2, "chatcmpl-1 and -2 (and -5, if written in time)"

    await elsewhere._cycle()
    await Recorder(redis, dead, Metrics())._cycle()  # a process adopting the dead one's spool replays it
    assert dead.pending() == 0
    late = FeedbackStore(redis, ratings, elsewhere, Metrics(), settle_s=0)
    assert await late.check_durability() == "fsync-always"
    await late.replay()
    assert ratings.pending() == 0, "replayed, and refused"
    assert await redis.xlen(keys.completion_log("t")) == 0, "nothing of the old tenant was written after it"
    assert await redis.keys("loragate:feedback:t:*") == [] and await redis.keys("loragate:user:t:*") == []
    with pytest.raises(CompletionUnknown):  # a gateway that still has the old tenant cached is refused in Redis
        await late.submit(old, FeedbackIn(completion_id="chatcmpl-2", thumbs="up"))
    assert await redis.keys("loragate:feedback:t:*") == []

    deleted = await tenant_deleted(redis, "t")
    assert deleted is not None and deleted[0] >= old.created
    new = await TenantStore(redis).create("t", not_before=deleted[0])
    store._settle_s = 0
    for completion_id in [f"chatcmpl-{n}" for n in range(6)]:
        for gateway in (store, late):
            assert await gateway.owned(new, completion_id) is False, (completion_id, gateway)
            with pytest.raises(CompletionUnknown):
                await gateway.of_completion(new, completion_id)
            with pytest.raises(CompletionUnknown):
                await gateway.submit(new, FeedbackIn(completion_id=completion_id, thumbs="down"))
    assert await forget_user(redis, "t", "u1", MINUTE) == {"completions": 0, "feedback": 0}
    buffer = io.StringIO()
    await export(redis, "t", "kto", buffer, new.logging)
    assert buffer.getvalue() == ""

    recorder.record(context(new, 7, user="u2"))  # not u1: erased a moment ago, and an erasure holds for 2 s more
    _, stored = await store.submit(new, FeedbackIn(completion_id="chatcmpl-7", user="u2", thumbs="up"))
    assert stored and [f.thumbs for f in await store.of_completion(new, "chatcmpl-7")] == ["up"]
    elsewhere.record(context(new, 8, user="u2"))
    await elsewhere._cycle()
    assert await late.owned(new, "chatcmpl-8") is True and await store.owned(new, "chatcmpl-8") is True
    assert stream_ids(await redis.xrange(keys.completion_log("t"))) == ["chatcmpl-7", "chatcmpl-8"]


async def test_another_tenants_completion_takes_the_path_and_time_of_an_unknown_one(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path
) -> None:
    """Neither the answer nor how long it takes tells a caller that an id exists at another tenant: both
    wait for the recorder and the settle loop, with the same Redis calls; while the log is spooling, both
    are "cannot tell yet"."""
    store = await feedback_store(redis, recorder, tmp_path)
    mine, theirs = Tenant(name="t"), Tenant(name="o")
    recorder.record(context(theirs, 1))
    await recorder.written()
    assert await store.owned(theirs, "chatcmpl-1") is True, "answered here, for the other tenant"
    looked: list[str] = []
    owner = store._owner

    async def counted(completion_id: str, *tenant: str) -> str | None:
        looked.append(completion_id)
        return await owner(completion_id, *tenant)

    store._owner = counted  # type: ignore[method-assign]
    took = {}
    for completion_id in ("chatcmpl-1", "chatcmpl-unknown"):
        started = time.monotonic()
        assert await store.owned(mine, completion_id) is False
        took[completion_id] = time.monotonic() - started
    assert looked.count("chatcmpl-1") >= 3 and looked.count("chatcmpl-unknown") >= 3, looked  # the settle loop
    assert min(took.values()) >= 0.2, took  # settle_s: both waited for other processes' records
    recorder.degraded, recorder._retry_at = True, time.monotonic() + 60  # spooling, and not retrying yet
    try:
        assert await store.owned(mine, "chatcmpl-1") is None and await store.owned(mine, "chatcmpl-unknown") is None
    finally:
        recorder.degraded = False


async def test_a_completion_no_index_names_is_no_404_while_another_process_replays_its_spool(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis back after an outage, the process that answered it still replaying its spooled records: another process
    answered 404 for the completion (it waited half a second), which a client does not retry, and the rating was
    lost. The replaying process marks itself in Redis, and an id no index names is "cannot tell yet" meanwhile."""
    store = await feedback_store(redis, recorder, tmp_path)
    mine = Tenant(name="t")
    replaying = keys.records_replaying()
    assert await store.owned(mine, "chatcmpl-elsewhere") is False
    await redis.zadd(replaying, {"a-process": recorder.clock.now() + 30})
    assert await store.owned(mine, "chatcmpl-elsewhere") is None, "its record may be in that spool: a 503, or 202"
    await redis.zadd(replaying, {"a-process": recorder.clock.now() - 1})  # lapsed: a process that died replaying
    assert await store.owned(mine, "chatcmpl-elsewhere") is False
    await redis.delete(replaying)
    spool = Spool(tmp_path / "records", fsync=False)
    spool.open()
    await spool.append([{"some": "record"}])
    other = Recorder(redis, spool, Metrics())
    seen: list[list[str]] = []

    async def write(entries: list[dict[str, Any]]) -> None:
        seen.append(await redis.zrange(replaying, 0, -1))

    monkeypatch.setattr(other, "_write", write)
    await other._replay()
    assert seen == [[other._token]] and await redis.zscore(replaying, other._token) is not None, "while it replays"
    other.record(context(mine, 1))  # queued while it replayed: written next, then the mark goes
    monkeypatch.undo()
    await other._cycle()
    assert await redis.zscore(replaying, other._token) is None and await store.owned(mine, "chatcmpl-1") is True
    await spool.append([{"some": "record"}])

    async def broken(entries: list[dict[str, Any]]) -> None:
        raise KeyError("tenant")  # a record that fails every pass, not an outage

    monkeypatch.setattr(other, "_write", broken)
    with pytest.raises(KeyError):
        await other._replay()
    assert await redis.zscore(replaying, other._token) is None, "no mark kept alive for every process, for good"


async def test_reading_feedback_while_redis_is_down_is_a_503_not_a_404(own_redis: RedisServer, tmp_path: Path) -> None:
    redis = aioredis.from_url(own_redis.url, decode_responses=True)
    spool = Spool(tmp_path / "records", fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, Metrics())
    store = FeedbackStore(redis, Spool(tmp_path / "feedback", fsync=False), recorder, Metrics(), settle_s=0.1)
    tenant = Tenant(name="t")
    try:
        recorder.record(context(tenant, 1))
        await recorder._cycle()
        with pytest.raises(CompletionUnknown):
            await store.of_completion(tenant, "chatcmpl-unknown")
        own_redis.kill()
        for completion_id in ("chatcmpl-1", "chatcmpl-unknown"):
            with pytest.raises((StateUnavailable, RedisError)) as refused:
                await store.of_completion(tenant, completion_id)
            if isinstance(refused.value, StateUnavailable):
                assert (refused.value.status, refused.value.code) == (503, "state_unavailable")
    finally:
        own_redis.start()
        await redis.aclose()


async def test_a_batch_an_unforeseen_error_stops_is_spooled_not_lost(
    redis: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis refusal that is no outage (a script it would not load, a protocol error): before, the batch was
    neither written nor spooled, and the write cycle failed with it."""
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    recorder = Recorder(redis, spool, Metrics())

    async def refuses(entries: list[dict[str, Any]]) -> list[str]:
        raise ResponseError("NOSCRIPT No matching script")

    monkeypatch.setattr(recorder._records, "write", refuses)
    try:
        for n in range(3):
            recorder.record(context(Tenant(name="t"), n))
        await recorder._cycle()
        assert spool.pending() == 3 and not recorder.degraded
    finally:
        await recorder.close()


async def test_the_queue_is_bounded_by_what_its_records_hold_too(redis: aioredis.Redis, tmp_path: Path) -> None:
    """A record holds its request and answer (MBs each, at most): 100,000 queued while Redis is slow could be many
    GB. Past `max_queued_bytes` the oldest go, counted as queue_full."""
    metrics = Metrics()
    recorder = Recorder(redis, Spool(tmp_path, fsync=False), metrics, max_queued_bytes=10_000)
    big = "x" * 3000
    for n in range(5):
        forwarded = context(Tenant(name="t"), n, note=big)
        forwarded.sent = json.dumps(forwarded.payload).encode()
        recorder.record(forwarded)
    assert 0 < recorder._queued_bytes <= 10_000 and len(recorder._queue) == 3
    assert metrics.records_dropped.labels("queue_full")._value.get() == 2
    assert [seq for seq, _, _ in recorder._queue] == [3, 4, 5], "the oldest went"
