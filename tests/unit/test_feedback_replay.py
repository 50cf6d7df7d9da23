"""Spooled feedback that must wait for its completion's record: put back on disk before the segment that held
it goes, so that neither a crash nor a failed replay loses it, and no pass copies it; and counted against the
tenant's cap on waiting ratings only once the spool has it. Ratings of one completion are capped by end users."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway import feedback as feedback_module
from gateway import keys
from gateway import spool as spool_module
from gateway.errors import StateUnavailable
from gateway.feedback import FeedbackStore, TooManyRatings
from gateway.metrics import Metrics
from gateway.record_store import TRIMMED
from gateway.recorder import Recorder
from gateway.records import FeedbackIn
from gateway.spool import Spool
from gateway.tenants import Tenant
from tests.unit.test_recording import context, feedback_store, spooled_rating

WAITS, KNOWN = "chatcmpl-waits", "chatcmpl-known"


def on_disk(root: Path) -> list[str]:
    lines = [line for segment in sorted(root.glob("*/*.jsonl")) for line in segment.read_text().splitlines()]
    return sorted(json.loads(json.loads(line)["feedback"])["completion_id"] for line in lines)


async def spooled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, together: bool) -> FeedbackStore:
    """Two spooled ratings, in one segment or in two: one whose completion's record is not in Redis yet (it
    waits), then one vouched for when it was given."""
    monkeypatch.setattr(spool_module, "SEGMENT_ITEMS", 1)
    spool = Spool(tmp_path, fsync=True)
    spool.open()
    unreachable = aioredis.from_url("redis://127.0.0.1:1")
    recorder = Recorder(unreachable, Spool(tmp_path / "records", fsync=False), Metrics())
    feedback = FeedbackStore(unreachable, spool, recorder, Metrics())
    feedback.durability = "fsync-always"  # as probed once Redis answers (these tests replace its calls)

    async def not_in_redis_yet(
        items: list[dict[str, Any]], parsed: list[dict[str, Any]]
    ) -> list[tuple[str | None, bool]]:
        """Each rating's owner (None: not indexed yet), and whether its tenant was deleted since (never here)."""
        return [
            (item["tenant"] if rating["completion_id"] == KNOWN else None, False)
            for item, rating in zip(items, parsed, strict=True)
        ]

    monkeypatch.setattr(feedback, "_owners", not_in_redis_yet)
    ratings = [spooled_rating(Tenant(name="t"), WAITS) | {"verify": True}, spooled_rating(Tenant(name="t"), KNOWN)]
    for batch in [ratings] if together else [[rating] for rating in ratings]:
        await spool.append(batch)
    return feedback


async def test_a_waiting_rating_is_on_disk_while_the_next_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await spooled(tmp_path, monkeypatch, together=False)
    seen: list[list[str]] = []

    async def write(items: list[dict[str, Any]], replay: bool) -> None:
        seen.append(on_disk(tmp_path))  # a crash here must not have lost the waiting one

    monkeypatch.setattr(store, "_write", write)
    assert await store.replay() == 2
    assert seen == [[KNOWN, WAITS]], "while the known one was written, the waiting one was on disk again"
    assert on_disk(tmp_path) == [WAITS] and store._spool.pending() == 1


async def test_failed_passes_copy_no_waiting_rating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = await spooled(tmp_path, monkeypatch, together=True)

    async def redis_down(items: list[dict[str, Any]], replay: bool) -> None:
        raise RedisConnectionError("flapping")

    monkeypatch.setattr(store, "_write", redis_down)
    for _ in range(4):
        assert await store.replay() == 0
    assert on_disk(tmp_path) == [KNOWN, WAITS]


async def test_ratings_the_spool_refused_do_not_count_as_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unvouched-for ratings are capped per tenant (UNVERIFIED_MAX); one the spool could not take (a full disk,
    503) was counted all the same, so enough failures refused every later one until the process restarted."""
    store = await spooled(tmp_path, monkeypatch, together=True)

    async def cannot_tell(tenant: Tenant, completion_id: str) -> None:
        return None

    monkeypatch.setattr(feedback_module, "UNVERIFIED_MAX", 3)
    monkeypatch.setattr(store, "owned", cannot_tell)
    real_append = store._spool.append

    async def disk_full(items: list[dict[str, Any]]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store._spool, "append", disk_full)
    for _ in range(3):
        with pytest.raises(StateUnavailable):
            await store.submit(Tenant(name="t"), FeedbackIn(completion_id="chatcmpl-1", thumbs="up"))
    monkeypatch.setattr(store._spool, "append", real_append)
    _, in_redis = await store.submit(Tenant(name="t"), FeedbackIn(completion_id="chatcmpl-1", thumbs="up"))
    assert in_redis is False, "spooled (202), not refused"


async def test_a_long_outage_does_not_use_up_a_ratings_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given (and spooled) an hour ago, while Redis was down: the wait for its completion's record starts when
    Redis can first be asked, so the rating still waits now, and is dropped only VERIFY_FOR_S later."""
    store = await spooled(tmp_path, monkeypatch, together=True)
    written: list[str] = []

    async def write(items: list[dict[str, Any]], replay: bool) -> None:
        written.extend(json.loads(item["feedback"])["completion_id"] for item in items)

    monkeypatch.setattr(store, "_write", write)
    clock = [feedback_module.time.time() + 3600]  # an hour after they were spooled
    monkeypatch.setattr(feedback_module.time, "time", lambda: clock[0])
    assert await store.replay() == 2
    assert written == [KNOWN] and on_disk(tmp_path) == [WAITS], "still waits: Redis was first asked just now"
    clock[0] += feedback_module.VERIFY_FOR_S - 1
    await store.replay()
    assert on_disk(tmp_path) == [WAITS]
    clock[0] += 2
    await store.replay()
    assert on_disk(tmp_path) == [] and written == [KNOWN], "dropped once it waited VERIFY_FOR_S with Redis up"


async def test_ratings_of_a_completion_are_capped_at_max_raters(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new end user past MAX_RATERS gets 409 (written to Redis, or about to be spooled while Redis answers); one
    already in may still change their rating. One acknowledged from the spool (202, Redis could not say) is written
    when replayed, past the cap too: an acknowledgement is never taken back."""
    monkeypatch.setattr(feedback_module, "MAX_RATERS", 3)
    store = await feedback_store(redis, recorder, tmp_path)
    tenant = Tenant(name="t")
    recorder.record(context(tenant))  # chatcmpl-7
    for user in ("u0", "u1", None):  # anonymous ratings count as one rater
        await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user=user, thumbs="up"))
    with pytest.raises(TooManyRatings) as refused:
        await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u3", thumbs="up"))
    error = refused.value.body()["error"]
    assert (refused.value.status, error["type"], error["code"]) == (409, "invalid_request_error", "too_many_ratings")
    assert "3 end users" in error["message"]
    _, stored = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", thumbs="down"))
    assert stored, "a rater already in changes their rating"
    store.durability = "spool"  # Redis does not fsync: ratings are spooled (202), and replayed
    with pytest.raises(TooManyRatings):
        await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u3", thumbs="up"))
    _, stored = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u0", thumbs="down"))
    assert not stored
    late = [spooled_rating(tenant, "chatcmpl-7") for _ in range(2)]  # spooled before the cap was reached, say
    for n, item in enumerate(late):
        item["feedback"] = item["feedback"].replace('"user":"u1"', f'"user":"late{n}"')
    await store._spool.append(late)
    dropped = store._metrics.feedback_dropped._value.get()
    await store.replay()
    assert store._metrics.feedback_dropped._value.get() == dropped, "acknowledged: none dropped"
    found = await store.of_completion(tenant, "chatcmpl-7")
    users = [("", "up"), ("late0", "up"), ("late1", "up"), ("u0", "down"), ("u1", "down")]
    assert sorted((f.user or "", f.thumbs) for f in found) == users


async def test_ratings_waiting_in_the_spool_count_towards_max_raters(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Redis not fsyncing, ratings are spooled and replayed later: those waiting count too (before, 105 end
    users rating one completion before the replay were all taken, past a cap of 100). Once replayed, they are
    counted from Redis, once; a rater waiting in the spool may still change their rating."""
    monkeypatch.setattr(feedback_module, "MAX_RATERS", 3)
    store = await feedback_store(redis, recorder, tmp_path)
    store.durability = "spool"
    tenant = Tenant(name="t")
    recorder.record(context(tenant))  # chatcmpl-7
    await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u0", thumbs="up"))
    await store.replay()  # u0 in Redis
    for user in ("u1", "u2"):  # waiting in the spool
        _, stored = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user=user, thumbs="up"))
        assert not stored
    with pytest.raises(TooManyRatings):
        await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u3", thumbs="up"))
    await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u2", thumbs="down"))
    await store.replay()
    with pytest.raises(TooManyRatings):
        await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u3", thumbs="up"))
    found = await store.of_completion(tenant, "chatcmpl-7")
    assert sorted((f.user, f.thumbs) for f in found) == [("u0", "up"), ("u1", "up"), ("u2", "down")]
    assert not store._spooled_raters, "nothing counted as waiting once replayed"


async def test_a_segment_is_checked_in_a_few_round_trips_however_many_ratings_it_holds(
    redis: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage thousands of ratings may be spooled: each one's completion index, tenant tombstone and log
    entry used to be looked up on its own (two or three round trips a rating); a segment is now looked up whole, in
    a number of round trips that does not grow with its size, and each rating is decided as before."""
    recorder = Recorder(redis, Spool(tmp_path / "records", fsync=False), Metrics())  # not running: Redis is all ours
    store = await feedback_store(redis, recorder, tmp_path)
    tenant, n = Tenant(name="t"), 50
    for i in range(n):
        entry = await redis.xadd(keys.completion_log("t"), {"c": f"chatcmpl-{i}"})
        await redis.set(keys.completion(f"chatcmpl-{i}"), f"t {entry}", ex=60)
    await redis.set(keys.completion("chatcmpl-theirs"), "o 1-0", ex=60)  # another tenant's
    await redis.set(keys.completion("chatcmpl-gone"), "t 1-0", ex=60)  # no longer in the log
    ratings = [spooled_rating(tenant, f"chatcmpl-{i}") for i in range(n)]
    ratings += [spooled_rating(tenant, c) | {"verify": True} for c in ("chatcmpl-theirs", "chatcmpl-gone")]
    await redis.set(keys.completion("chatcmpl-trimmed"), TRIMMED, ex=60)
    ratings.append(spooled_rating(tenant, "chatcmpl-trimmed"))  # vouched for: written, and refused by the script
    ratings.append(spooled_rating(tenant, "chatcmpl-later"))  # not indexed yet: waits
    deleted = Tenant(name="d")
    await redis.set(keys.tenant_deleted("d"), f"{deleted.created + 1!r} 0")
    ratings.append(spooled_rating(deleted, "chatcmpl-later"))  # its tenant deleted since: waits for nothing
    await store._spool.append(ratings)
    round_trips = 0
    send = Connection.send_packed_command

    async def counted(self: Connection, command: Any, check_health: bool = True) -> None:
        nonlocal round_trips
        round_trips += 1
        await send(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counted)
    dropped = store._metrics.feedback_dropped._value.get()
    assert await store.replay() == n + 5
    monkeypatch.undo()
    assert round_trips <= 8, f"{round_trips} round trips for a segment of {n + 5} ratings"
    assert store._metrics.feedback_dropped._value.get() == dropped + 2, "another's, and one trimmed: dropped"
    assert store._spool.pending() == 1 and on_disk(tmp_path / "feedback") == ["chatcmpl-later"]
    rated = [await redis.hlen(keys.feedback("t", f"chatcmpl-{i}")) for i in range(n)]
    assert rated == [1] * n, "each of the tenant's own, written"
    refused = [
        keys.feedback("t", "chatcmpl-gone"),
        keys.feedback("t", "chatcmpl-trimmed"),
        keys.feedback("d", "chatcmpl-later"),
    ]
    assert not await redis.exists(*refused)


async def test_a_failed_replay_leaves_its_ratings_counted_as_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass took an unvouched-for rating off the tenant's count of waiting ones before writing it; the write
    failed, the segment stayed, and each later pass took it off again: past the cap (UNVERIFIED_MAX) more waited."""
    store = await spooled(tmp_path, monkeypatch, together=True)

    async def owned_now(items: list[dict[str, Any]], parsed: list[dict[str, Any]]) -> list[tuple[str | None, bool]]:
        return [(item["tenant"], False) for item in items]

    async def redis_down(items: list[dict[str, Any]], replay: bool) -> None:
        raise RedisConnectionError("flapping")

    written: list[str] = []

    async def write(items: list[dict[str, Any]], replay: bool) -> None:
        written.extend(json.loads(item["feedback"])["completion_id"] for item in items)

    monkeypatch.setattr(store, "_owners", owned_now)
    store._unverified["t"] = 2  # WAITS (unvouched for) and one more of the tenant's, waiting elsewhere
    monkeypatch.setattr(store, "_write", redis_down)
    for _ in range(3):
        assert await store.replay() == 0
    assert store._unverified["t"] == 2, "nothing was written: the rating still waits"
    monkeypatch.setattr(store, "_write", write)
    store.durability = "fsync-always"  # probed again once Redis answers (a failed pass forgets it)
    assert await store.replay() == 2 and sorted(written) == [KNOWN, WAITS] and store._unverified["t"] == 1
