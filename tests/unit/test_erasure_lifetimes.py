"""How long what is kept of an end user lives, and that erasure reaches all of it: ratings never outlive the set that
erasure follows, nothing older than the age limit or made before an erasure is written back, and the ratings of an
erased user's own completions go with them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway import keys
from gateway.erasure import MARGIN_S, digest_named_tombstones, forget_user
from gateway.feedback import CompletionUnknown, FeedbackStore
from gateway.metrics import Metrics
from gateway.record_store import CHUNK, TRIMMED, TRIMMED_KEEP_S, RecordStore, Written
from gateway.recorder import Recorder
from gateway.records import CorrectionCall, CorrectionFunction, CorrectionMessage, Feedback, FeedbackIn, LogPolicy
from gateway.routing import Route
from gateway.spool import Spool
from gateway.tenants import Tenant
from tests.unit.test_recording import context, entry, spooled_rating

pytestmark = pytest.mark.asyncio
TENANT = Tenant(name="t", logging=LogPolicy(max_age_days=60 / 86400))  # records kept 60 s


@pytest.fixture
async def store(redis: aioredis.Redis, recorder: Recorder, tmp_path: Path) -> FeedbackStore:
    spool = Spool(tmp_path / "feedback", fsync=True)
    spool.open()
    found = FeedbackStore(redis, spool, recorder, Metrics(), settle_s=0)
    await found.check_durability()
    return found


async def test_a_later_rating_does_not_outlive_the_raters_set(
    redis: aioredis.Redis, recorder: Recorder, store: FeedbackStore
) -> None:
    """ann rates v's completion; 50 s later (its index has 10 s left) bo rates it. The ratings live no longer than
    the completion, and ann's set (which erasure follows) at least as long as them."""
    recorder.record(context(TENANT, 1, user="v"))
    await recorder.written()
    await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="ann", thumbs="down", correction="fix"))
    await redis.expire(keys.completion("chatcmpl-1"), 10)
    await redis.expire(keys.end_user("t", "ann"), 10)
    await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="bo", thumbs="up"))
    assert 0 < await redis.ttl(keys.feedback("t", "chatcmpl-1")) <= 10, "not extended past its completion"
    assert await redis.ttl(keys.end_user("t", "ann")) >= await redis.ttl(keys.feedback("t", "chatcmpl-1"))
    short = Tenant(name="t", logging=LogPolicy(max_age_days=5 / 86400))  # the age limit lowered since
    await store.submit(short, FeedbackIn(completion_id="chatcmpl-1", user="bo", thumbs="down"))
    assert await redis.ttl(keys.end_user("t", "bo")) > 5, "a set is never shortened: it finds older ratings"
    recorder.record(context(short, 2, user="bo"))
    await recorder.written()
    assert await redis.ttl(keys.end_user("t", "bo")) > 5


async def test_a_rating_made_before_its_users_erasure_is_not_kept(
    redis: aioredis.Redis, recorder: Recorder, store: FeedbackStore
) -> None:
    """The rating was checked before the erasure and reaches Redis after it (the request raced the erasure)."""
    recorder.record(context(TENANT, 1, user="v"))
    await recorder.written()
    made_before = Feedback(
        **FeedbackIn(completion_id="chatcmpl-1", user="ann", thumbs="down").model_dump(), created=time.time()
    )
    await forget_user(redis, "t", "ann", TENANT.logging)
    item = {"tenant": "t", "verify": False, "ttl": 60, "since": time.time(), "feedback": made_before.model_dump_json()}
    with pytest.raises(Exception, match="did not keep"):
        await store._write([item], replay=False)
    assert await redis.hget(keys.feedback("t", "chatcmpl-1"), "ann") is None
    assert await redis.exists(keys.end_user("t", "ann")) == 0


async def test_what_is_replayed_past_its_age_limit_is_not_written(redis: aioredis.Redis, store: FeedbackStore) -> None:
    """A spool replayed late (a stopped gateway's folder adopted days later) writes nothing older than the age
    limit: its user's erasure tombstone may be gone by then."""
    old, young = entry(context(TENANT, 1)), entry(context(TENANT, 2))
    old["created"] = young["created"] - 61
    done = await RecordStore(redis).write([old, young])
    assert done == Written(written=1), "the old one skipped"
    assert [f["r"] for _, f in await redis.xrange(keys.completion_log("t"))] == [young["record"]]
    assert await redis.exists(keys.completion("chatcmpl-1")) == 0 and await redis.exists(keys.completion("chatcmpl-2"))
    rating = Feedback(
        **FeedbackIn(completion_id="chatcmpl-2", user="ann", thumbs="up").model_dump(), created=time.time()
    )
    rating.created -= 61
    item = {"tenant": "t", "verify": False, "ttl": 60, "since": rating.created, "feedback": rating.model_dump_json()}
    await store._write([item], replay=True)
    assert await redis.exists(keys.feedback("t", "chatcmpl-2")) == 0


async def test_erasing_a_user_takes_every_rating_of_their_completions(
    redis: aioredis.Redis, recorder: Recorder, store: FeedbackStore
) -> None:
    long_name = "u" * 300  # cut to 256 in records: the erasure finds it by the same cut
    recorder.record(context(TENANT, 1, user=long_name))
    recorder.record(context(TENANT, 2, user="v"))
    await recorder.written()
    await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="agent", correction="Ann's account: ..."))
    await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-2", user="agent", thumbs="up"))
    before, _ = await redis.time()
    removed = await forget_user(redis, "t", long_name, TENANT.logging)
    after, _ = await redis.time()
    assert removed == {"completions": 1, "feedback": 1}
    assert await redis.exists(keys.feedback("t", "chatcmpl-1")) == 0
    assert await redis.get(keys.completion("chatcmpl-1")) == TRIMMED, "an index that names no one"
    assert await redis.hkeys(keys.feedback("t", "chatcmpl-2")) == ["agent"], "another user's completion: kept"
    with pytest.raises(CompletionUnknown):  # this process answered it (`recent`): refused all the same
        await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="bob", correction="Ann's account"))
    assert await redis.exists(keys.feedback("t", "chatcmpl-1")) == 0, "the erased conversation's ratings stay gone"
    tombstone = float(await redis.get(keys.forgotten("t", long_name[:256])) or 0)
    # dated by Redis's clock when the erasure began, plus a margin for gateways' clocks (not by how long it took)
    assert before + MARGIN_S <= tombstone <= after + 1 + MARGIN_S


async def test_a_completion_trimmed_from_the_log_takes_its_ratings_with_it(
    redis: aioredis.Redis, recorder: Recorder, store: FeedbackStore
) -> None:
    """Past the tenant's length limit the record is trimmed; its index and ratings no longer vouch for it."""
    recorder.record(context(TENANT, 1, user="v"))
    await recorder.written()
    await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="ann", thumbs="up"))
    await redis.xtrim(keys.completion_log("t"), maxlen=0)
    recorder.recent.clear()  # as in another process, or after RECENT newer answers
    with pytest.raises(CompletionUnknown):
        await store.of_completion(TENANT, "chatcmpl-1")
    removed = await forget_user(redis, "t", "v", TENANT.logging)
    assert removed == {"completions": 0, "feedback": 1}, "ann's rating of it went, and is counted"
    assert await redis.exists(keys.feedback("t", "chatcmpl-1")) == 0
    assert await redis.get(keys.completion("chatcmpl-1")) in (None, TRIMMED)


async def test_the_length_limit_trims_what_was_derived_from_a_record_with_it(
    redis: aioredis.Redis, store: FeedbackStore
) -> None:
    """An entry as older versions wrote it, then 250 records of a tenant that keeps 100, in three script calls (100,
    100, 50): the second call takes the log TRIM_SLACK over its length, and the old entry and the first 100 records
    go, with their ratings and place in their end users' and raters' sets, their indexes kept a while as TRIMMED; the
    others keep theirs. Those records written again (a replay) are skipped by those indexes."""
    short = Tenant(name="t", logging=LogPolicy(max_records=100))
    await redis.xadd(keys.completion_log("t"), {"r": "{}"})  # an entry as older versions wrote them
    entries = [entry(context(short, n, user=f"user-{n % 3}")) for n in range(1, 251)]
    assert await RecordStore(redis).write(entries[:CHUNK]) == Written(written=CHUNK)
    for n in (1, 2):
        await store.submit(short, FeedbackIn(completion_id=f"chatcmpl-{n}", user="ann", thumbs="up"))
    assert await RecordStore(redis).write(entries[CHUNK:]) == Written(written=150)
    await store.submit(short, FeedbackIn(completion_id="chatcmpl-150", user="ann", thumbs="up"))
    kept = [f["c"] for _, f in await redis.xrange(keys.completion_log("t"))]
    assert kept == [f"chatcmpl-{n}" for n in range(101, 251)], "the old entry and records 1-100 are over the length"
    for n in (1, 2, 100):
        assert await redis.get(keys.completion(f"chatcmpl-{n}")) == TRIMMED, "kept a while, naming no tenant"
        assert 0 < await redis.ttl(keys.completion(f"chatcmpl-{n}")) <= TRIMMED_KEEP_S
        assert await redis.exists(keys.feedback("t", f"chatcmpl-{n}")) == 0
        with pytest.raises(CompletionUnknown):
            await store.of_completion(short, f"chatcmpl-{n}")
        assert not await redis.sismember(keys.end_user("t", f"user-{n % 3}"), f"chatcmpl-{n}")
    store._recorder.recent["chatcmpl-1"] = ("t", short.created)  # answered here a while ago, as this process recalls
    with pytest.raises(CompletionUnknown):
        await store.submit(short, FeedbackIn(completion_id="chatcmpl-1", user="bo", thumbs="up"))
    assert await redis.exists(keys.feedback("t", "chatcmpl-1")) == 0, "no rating kept for a trimmed completion"
    assert await redis.exists(keys.completion("chatcmpl-101"), keys.feedback("t", "chatcmpl-150")) == 2
    assert await redis.sismember(keys.end_user("t", "user-0"), "chatcmpl-150")
    assert await redis.smembers(keys.end_user("t", "ann")) == {"chatcmpl-150"}, "nor in its raters' sets"
    assert await RecordStore(redis).write(entries[:CHUNK]) == Written(written=0)  # replayed (the answer was lost)
    again = [f["c"] for _, f in await redis.xrange(keys.completion_log("t"))]
    assert again == kept, "a replay of trimmed records brings none back, nor pushes newer ones out"
    assert [r.user for r in await store.of_completion(short, "chatcmpl-150")] == ["ann"]


async def test_records_written_under_a_shorter_age_limit_are_still_erased(
    redis: aioredis.Redis, recorder: Recorder
) -> None:
    """The limit was raised since: the trim keeps the records, while their indexes and the user's set expired at
    the old limit. Erasure reads on from the head of the log while entries have no index."""
    for n in (1, 2):
        recorder.record(context(TENANT, n, user="ann"))
    recorder.record(context(TENANT, 3, user="bo"))
    await recorder.written()
    await redis.delete(keys.completion("chatcmpl-1"), keys.completion("chatcmpl-2"), keys.end_user("t", "ann"))
    raised = LogPolicy(max_age_days=30)  # the entries are seconds old: far younger than the limit now
    assert await forget_user(redis, "t", "ann", raised) == {"completions": 2, "feedback": 0}
    assert [json.loads(f["r"])["user"] for _, f in await redis.xrange(keys.completion_log("t"))] == ["bo"]


@pytest.mark.parametrize("host_ahead_s", [100.0, -100.0])
async def test_records_and_ratings_are_dated_by_the_records_redis_clock(
    redis: aioredis.Redis,
    recorder: Recorder,
    store: FeedbackStore,
    monkeypatch: pytest.MonkeyPatch,
    host_ahead_s: float,
) -> None:
    """A gateway host whose clock runs 100 s ahead (or behind) of the records Redis's: a record it made before an
    erasure, queued until after it, is still not kept; one made after the erasure's margin is; records and ratings
    carry Redis's time (the scripts compare them with tombstones and the age limit)."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + host_ahead_s)  # this host's clock, for everything
    await recorder.clock.sync()
    host_now = time.time()
    before = context(TENANT, 1, user="v")
    before.received = host_now  # made now, by the host's clock
    await forget_user(redis, "t", "v", TENANT.logging)
    after = context(TENANT, 2, user="v")
    after.received = host_now + MARGIN_S + 1  # a request a few seconds after the erasure
    other = context(TENANT, 3, user="w")
    other.received = host_now
    for ctx in (before, after, other):
        recorder.record(ctx)
    await recorder.written()
    kept = {f["c"]: json.loads(f["r"])["created"] for _, f in await redis.xrange(keys.completion_log("t"))}
    assert set(kept) == {"chatcmpl-2", "chatcmpl-3"}, "made before the erasure by Redis's clock: not kept"
    seconds, micros = await redis.time()
    redis_now = seconds + micros / 1e6
    # within 10 s: the host's clock is 100 s off, and a loaded machine may take seconds to write the records
    assert abs(kept["chatcmpl-2"] - (redis_now + MARGIN_S + 1)) < 10
    feedback, stored = await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-3", user="w", thumbs="up"))
    assert stored and abs(feedback.created - redis_now) < 10, "a rating is dated by Redis's clock too"
    (read,) = await store.of_completion(TENANT, "chatcmpl-3")
    assert abs(read.created - redis_now) < 10


async def test_a_spooled_rating_of_a_completion_known_gone_is_dropped_at_once(
    redis: aioredis.Redis, recorder: Recorder, store: FeedbackStore
) -> None:
    """A rating spooled while its completion could not be checked; meanwhile the length limit trimmed the record.
    The replay drops it at once: it does not wait VERIFY_FOR_S for a record that is known to be gone."""
    recorder.record(context(TENANT, 1, user="v"))
    await recorder.written()
    await redis.set(keys.completion("chatcmpl-1"), TRIMMED)
    await store._spool.append([spooled_rating(TENANT, "chatcmpl-1") | {"verify": True}])  # noqa: SLF001
    await store.replay()
    assert not store._spool.pending(), "not kept waiting"  # noqa: SLF001
    assert await redis.exists(keys.feedback("t", "chatcmpl-1")) == 0


async def test_tombstones_outlast_the_longest_age_limit_a_spooled_item_can_carry(redis: aioredis.Redis) -> None:
    """The tenant's limit was 30 days when a record was spooled and is 1 day at the erasure: the record, replayed
    days later, carries its 30 days; the tombstone must still be there to refuse it."""
    from gateway.erasure import LONGEST_AGE_S, mark_tenant_deleted
    from gateway.records import LogPolicy

    assert LONGEST_AGE_S == int(LogPolicy.model_json_schema()["properties"]["max_age_days"]["maximum"] * 86400)
    await forget_user(redis, "t", "ann", LogPolicy(max_age_days=1))
    await mark_tenant_deleted(redis, "gone", 0.0, 86400)
    for key in (keys.forgotten("t", "ann"), keys.tenant_deleted("gone")):
        assert await redis.ttl(key) > LONGEST_AGE_S - 60, key


async def test_erased_ratings_leave_their_experiment_arms_counters(
    redis: aioredis.Redis, recorder: Recorder, store: FeedbackStore
) -> None:
    """ann rates bo's answer (arm a of experiment e) down and her own answer up; both ratings count for the arm.
    Erased, she counts no more: her own answer's ratings go with it, and her rating of bo's answer leaves the arm's
    counters, so rating it again after the erasure counts once (it counted twice)."""
    for n, user in ((1, "bo"), (2, "ann")):
        ctx = context(TENANT, n, user=user)
        ctx.route = Route(requested="bot", upstream_model="m", served_model="m", alias="bot", experiment="e", arm="a")
        recorder.record(ctx)
    await recorder.written()
    counters = keys.arm_counters("t", "e", "a")
    await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="ann", thumbs="down", correction="x"))
    calls = CorrectionMessage(tool_calls=[CorrectionCall(function=CorrectionFunction(name="f", arguments="{}"))])
    await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-2", user="ann", score=0.8, correction=calls))
    await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-2", user="bo", thumbs="up"))
    assert await redis.hmget(counters, "rated", "negative", "corrected") == ["3", "1", "2"], "a message corrects too"
    removed = await forget_user(redis, "t", "ann", TENANT.logging)
    assert removed == {"completions": 1, "feedback": 3}
    assert await redis.hmget(counters, "rated", "negative", "corrected") == ["0", "0", "0"]
    assert abs(float(await redis.hget(counters, "positive_sum") or "nan")) < 1e-9
    await asyncio.sleep(MARGIN_S)  # past the tombstone: what she sends now is kept
    await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="ann", thumbs="down"))
    assert await redis.hmget(counters, "rated", "negative") == ["1", "1"]


async def test_erasing_a_rater_of_a_completion_whose_record_is_gone_takes_only_their_rating_from_its_arm(
    redis: aioredis.Redis, recorder: Recorder, store: FeedbackStore
) -> None:
    """A record gone from the log (an age limit lowered since) while its index stays: erasing one user who rated it
    took every rating of it out of the arm's results, as if all three raters had been erased."""
    ctx = context(TENANT, 1, user="bo")
    ctx.route = Route(requested="bot", upstream_model="m", served_model="m", alias="bot", experiment="e", arm="a")
    recorder.record(ctx)
    await recorder.written()
    for rater, thumbs in (("ann", "down"), ("cy", "down"), ("di", "up")):
        await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user=rater, thumbs=thumbs))
    counters = keys.arm_counters("t", "e", "a")
    assert await redis.hmget(counters, "rated", "negative") == ["3", "2"]
    (entry,) = await redis.xrange(keys.completion_log("t"))
    await redis.xdel(keys.completion_log("t"), entry[0])  # as the age trim takes it, its index left
    removed = await forget_user(redis, "t", "ann", TENANT.logging)
    assert removed["feedback"] == 3, "the others' ratings go with the record, as a trim takes them"
    assert await redis.hmget(counters, "rated", "negative") == ["2", "1"], "only ann's left the arm's results"


async def test_others_ratings_of_a_completion_erased_before_its_record_was_written_are_refused(
    redis: aioredis.Redis, recorder: Recorder, store: FeedbackStore
) -> None:
    """v is forgotten while (or just before) a completion of theirs is on its way to the log: the record is not
    written, and the process that answered it, which vouches for it, no longer takes others' ratings of it (a
    correction quotes v's conversation): neither given now, nor spooled before and replayed (by a process that
    took over a dead one's spool, say)."""
    await forget_user(redis, "t", "v", TENANT.logging)
    recorder.record(context(TENANT, 1, user="v"))  # made within the erasure's margin: v's too
    await recorder.written()
    assert await redis.xlen(keys.completion_log("t")) == 0 and recorder.recent.get("chatcmpl-1") is not None
    with pytest.raises(CompletionUnknown):
        await store.submit(TENANT, FeedbackIn(completion_id="chatcmpl-1", user="ann", correction="v said: BLUEBIRD"))
    with pytest.raises(CompletionUnknown):
        await store.of_completion(TENANT, "chatcmpl-1")  # as every other process answers
    spooled = spooled_rating(TENANT, "chatcmpl-1")  # vouched for when given, in a spool since
    await store._spool.append([spooled])
    await store.replay()
    assert store._spool.pending() == 0 and await redis.exists(keys.feedback("t", "chatcmpl-1")) == 0


async def test_ratings_kept_before_an_erased_users_record_came_go_when_it_comes(
    redis: aioredis.Redis, store: FeedbackStore
) -> None:
    """v's completion was answered while the log spooled; ann's correction of it, vouched for by the process that
    answered, was kept before its record came. v is erased (their set does not hold it yet), then the record is
    replayed: it is skipped, and ann's correction, which quotes v's conversation, goes with it."""
    item = spooled_rating(TENANT, "chatcmpl-9") | {"feedback": Feedback(
        **FeedbackIn(completion_id="chatcmpl-9", user="ann", correction="v said: BLUEBIRD").model_dump(),
        created=time.time(),
    ).model_dump_json()}  # fmt: skip
    await store._write([item], replay=True)
    assert await redis.hkeys(keys.feedback("t", "chatcmpl-9")) == ["ann"], "kept: its record may still come"
    await forget_user(redis, "t", "v", TENANT.logging)
    assert await redis.exists(keys.feedback("t", "chatcmpl-9")) == 1, "nothing told the erasure of it"
    assert await RecordStore(redis).write([entry(context(TENANT, 9, user="v"))]) == Written(written=0)
    assert await redis.xlen(keys.completion_log("t")) == 0 and await redis.get(keys.completion("chatcmpl-9")) == TRIMMED
    assert await redis.exists(keys.feedback("t", "chatcmpl-9")) == 0
    assert not await redis.sismember(keys.end_user("t", "ann"), "chatcmpl-9")


async def test_an_erased_completions_marker_lasts_as_long_as_its_index_would_have(
    redis: aioredis.Redis, recorder: Recorder
) -> None:
    """The limit was 30 days when v's completion was recorded (and ann's rating of it spooled: it carries those 30
    days) and is 1 day at v's erasure: the marker must outlast the day, or the rating, replayed after it, is kept as
    one of a completion yet to come."""
    recorder.record(context(Tenant(name="t", logging=LogPolicy(max_age_days=30)), 1, user="v"))
    await recorder.written()
    await forget_user(redis, "t", "v", LogPolicy(max_age_days=1))
    assert await redis.get(keys.completion("chatcmpl-1")) == TRIMMED
    assert await redis.ttl(keys.completion("chatcmpl-1")) > 30 * 86400 - 60


async def test_an_erased_users_tombstone_does_not_name_them_and_old_named_ones_are_moved(
    redis: aioredis.Redis, recorder: Recorder, store: FeedbackStore
) -> None:
    """Tombstones last ten years: they were named by the user's name, often an e-mail address. Now by its digest, and
    the scripts find them (a record of theirs still queued is not written). Those of the release before are read by
    name until they are copied under their digest (the named ones kept a day, for gateways of that release): a pass
    that finds none ends the passes, and the record script stops reading names."""
    user, old = "zoë.mail@example.com", "old@example.com"
    await forget_user(redis, "t", user, TENANT.logging)
    assert not [key async for key in redis.scan_iter(match="*example.com*")], "no key names them"
    recorder.record(context(TENANT, 1, user=user))
    await recorder.written()
    assert await redis.xlen(keys.completion_log("t")) == 0, "the record script read the tombstone by its digest"
    await redis.set(keys.named_tombstone_prefix("t") + old, "99999999999", ex=10 * 86400)  # the release before's
    await redis.set(keys.named_tombstone_prefix("u") + "ann:x", "5", ex=600)
    recorder.record(context(TENANT, 2, user=old))
    await recorder.written()
    assert await redis.xlen(keys.completion_log("t")) == 0, "read by its name while names may be left"
    recorder.record(context(TENANT, 3, user="v"))
    await recorder.written()
    rating = Feedback(**FeedbackIn(completion_id="chatcmpl-3", user=old, thumbs="up").model_dump(), created=time.time())
    item = {"tenant": "t", "verify": False, "ttl": 60, "since": time.time(), "feedback": rating.model_dump_json()}
    with pytest.raises(Exception, match="did not keep"):
        await store._write([item], replay=False)  # noqa: SLF001
    assert await digest_named_tombstones(redis) == 2
    assert await redis.get(keys.forgotten("t", old)) == "99999999999"
    assert 86_390 <= await redis.ttl(keys.named_tombstone_prefix("t") + old) <= 86_400, "kept a day, not ten years"
    assert 590 <= await redis.ttl(keys.forgotten("u", "ann:x")) <= 600
    assert 590 <= await redis.ttl(keys.named_tombstone_prefix("u") + "ann:x") <= 600, "not lengthened"
    assert await digest_named_tombstones(redis) == 0 and not await redis.exists(keys.named_tombstones_gone())
    await redis.set(keys.named_tombstone_prefix("t") + "later", "99999999999", ex=3650 * 86400)  # the release before's
    assert await digest_named_tombstones(redis) == 1, "named ones are left (a day): passes go on, and copy it"
    assert await redis.ttl(keys.named_tombstone_prefix("t") + "later") <= 86_400
    await redis.delete(*[key async for key in redis.scan_iter(match=keys.named_tombstones())])  # a day later
    assert await digest_named_tombstones(redis) == 0 and await redis.exists(keys.named_tombstones_gone())
    await redis.set(keys.named_tombstone_prefix("t") + "late", "99999999999")  # the release before's, after that
    assert await digest_named_tombstones(redis) == 0, "a pass that found none ended the passes"
    recorder.record(context(TENANT, 4, user="late"))
    await recorder.written()
    assert await redis.xlen(keys.completion_log("t")) == 2, "v's, and late's: names are no longer read (erase again)"
