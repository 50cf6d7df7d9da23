"""What the gateway and its record process do per batch: the memory of who answered the completions the process
handled (feedback while Redis is down), and the record process's pauses."""

from __future__ import annotations

import json

import pytest

from gateway import record_worker
from gateway.answer import Answer
from gateway.context import RequestContext
from gateway.recent_completions import KEPT_S, MERGE_S, MERGED, PACKED, RECENT, PackedOwners, RecentCompletions, owners
from gateway.record_builder import raw_row
from gateway.routing import Route
from gateway.tenants import Tenant


def batch(start: int, size: int, tenant: str = "t") -> dict[str, tuple[str, float | None]]:
    return {f"chatcmpl-{n}": (tenant, 1.0) for n in range(start, start + size)}


def test_the_last_limit_completions_are_remembered_and_older_ones_forgotten() -> None:
    recent = RecentCompletions(limit=2000)
    for start in range(0, 10_000, 500):
        recent.add(batch(start, 500))
    assert recent.get("chatcmpl-9999") == ("t", 1.0) and recent.get("chatcmpl-8000") == ("t", 1.0)
    assert recent.get("chatcmpl-7499") is None, "more than the limit (and a batch) ago"
    assert 2000 <= len(recent) < 2000 + 2 * MERGED and len(list(recent)) == len(recent)


def test_small_batches_are_merged_so_a_lookup_walks_few_dicts() -> None:
    recent = RecentCompletions()
    for n in range(RECENT * 2):  # a quiet gateway: one record per write cycle
        recent[f"chatcmpl-{n}"] = ("t", None)
    assert len(recent._batches) <= RECENT // MERGED + 2
    assert recent.get(f"chatcmpl-{RECENT * 2 - 1}") == ("t", None) and recent.get("chatcmpl-0") is None
    assert list(recent)[-1] == f"chatcmpl-{RECENT * 2 - 1}", "oldest first"


def test_completions_are_vouched_for_less_long_than_a_trimmed_ones_index_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Remembered for good (but by count), a completion trimmed from its log over an hour before (its TRIMMED index
    gone) took a rating again at the process that answered it, 200, where every other said 404."""
    from gateway import recent_completions
    from gateway.record_store import TRIMMED_KEEP_S

    clock = [1000.0]
    monkeypatch.setattr(recent_completions.time, "monotonic", lambda: clock[0])
    recent = RecentCompletions()
    recent.add(batch(0, 10))
    clock[0] += MERGE_S + 1  # a batch of its own
    recent.add(batch(10, 10))
    clock[0] += KEPT_S - MERGE_S  # the first batch past KEPT_S, the second not yet
    assert recent.get("chatcmpl-0") is None and recent.get("chatcmpl-10") == ("t", 1.0)
    assert KEPT_S < TRIMMED_KEEP_S
    clock[0] += MERGE_S + 1
    recent.add(batch(20, 1))  # adding forgets what is past KEPT_S
    assert list(recent) == ["chatcmpl-20"] and len(recent) == 1
    clock[0] += 61  # a tenant keeping records a minute: past its age limit, its record and index are gone
    assert recent.get("chatcmpl-20", within_s=60) is None and recent.get("chatcmpl-20") == ("t", 1.0)


def test_a_later_answer_for_an_id_wins() -> None:
    """A tenant deleted and created again with the same name, answering an id this process remembers: the newest
    owner is the one a rating is checked against."""
    recent = RecentCompletions(limit=10)
    recent.add({**batch(0, MERGED), "chatcmpl-x": ("t", 1.0)})
    recent.add({"chatcmpl-x": ("t", 2.0)})
    assert recent.get("chatcmpl-x") == ("t", 2.0)
    recent.clear()
    assert recent.get("chatcmpl-x") is None and len(recent) == 0 and list(recent) == []


def test_owners_are_shared_per_tenant() -> None:
    """What the record process sends back: one owner tuple per tenant (pickled once per batch)."""
    entries = [{"id": f"c{n}", "tenant": "ab"[n % 2], "tenant_created": 5.0} for n in range(6)]
    found = owners(entries)
    assert found == {f"c{n}": ("ab"[n % 2], 5.0) for n in range(6)}
    assert found["c0"] is found["c2"] and found["c1"] is found["c3"] and found["c0"] is not found["c1"]


def test_the_record_process_pauses_every_few_records_and_builds_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built in one go, a batch held a core for milliseconds while the processes sharing it waited: the record
    process gives the CPU away (`sched_yield`) every few records, and builds exactly what it built without."""
    rows = [raw_row(chat(n)) for n in range(7)]
    pauses: list[None] = []
    whole = record_worker.build(rows)
    monkeypatch.setattr(record_worker.os, "sched_yield", lambda: pauses.append(None))
    paused = record_worker.build(rows, pause_every=3)
    assert paused.entries == whole.entries and len(whole.entries) == 7 and paused.unbuildable == 0
    assert len(pauses) == 3, "after records 3, 6 and 7"
    assert record_worker.build([], pause_every=3).entries == [] and len(pauses) == 3


def chat(n: int) -> RequestContext:
    body = {"model": "m", "messages": [{"role": "user", "content": f"mail me at user{n}@example.com"}]}
    ctx = RequestContext(f"r{n}", "chat", Tenant(name="t"), "k1", payload=body, validated=True)
    ctx.sent = json.dumps(body).encode()
    ctx.route = Route(requested="m", upstream_model="m", served_model="m")
    ctx.answer = Answer(body=json.dumps({"id": f"chatcmpl-{n}", "choices": [{"index": 0, "message": {}}]}).encode())
    ctx.finish(200)
    return ctx


def test_batches_the_record_process_wrote_stay_packed_until_a_lookup_walks_past_them() -> None:
    """The record process sends back who answered what as bytes: the gateway's event loop does not unpickle a dict
    per batch (0.46 µs a record), nor does its collector scan one for 50 minutes; a lookup unpacks what it passes."""
    recent = RecentCompletions()
    packed = [PackedOwners.pack(batch(start, 100)) for start in range(0, 300, 100)]
    for one in packed:
        recent.add(one)
    assert [type(b[1]) for b in recent._batches] == [PackedOwners] * 3 and len(recent) == 300
    assert recent.get("chatcmpl-250") == ("t", 1.0)
    assert [type(b[1]) for b in recent._batches] == [PackedOwners, PackedOwners, dict], "only the newest was walked"
    assert recent.get("chatcmpl-5") == ("t", 1.0) and recent.get("chatcmpl-300") is None
    assert all(isinstance(b[1], dict) for b in recent._batches)
    recent.add(PackedOwners.pack(batch(300, PACKED - 1)))  # small: unpacked at once, merged into the last
    assert len(recent._batches) == 3 and recent.get(f"chatcmpl-{299 + PACKED - 1}") == ("t", 1.0)
    assert list(recent)[:2] == ["chatcmpl-0", "chatcmpl-1"] and len(list(recent)) == len(recent) == 300 + PACKED - 1


def test_packed_owners_keep_one_owner_per_tenant() -> None:
    found = owners([{"id": f"c{n}", "tenant": "ab"[n % 2], "tenant_created": 5.0} for n in range(6)])
    packed = PackedOwners.pack(found)
    assert len(packed) == 6 and packed.unpack() == found and not PackedOwners.pack({})
    again = packed.unpack()
    assert again["c0"] is again["c2"] and again["c0"] is not again["c1"], "marshal keeps shared tuples shared"
