"""How the feedback store decides what a 2xx means, against a stand-in for Redis 7.2+ (the Redis these machines have
is 7.0, without WAITAOF; tests/unit/test_recording.py runs the same decision against it), and when it asks again
(the session's real Redis). The stand-in answers as
Redis does: WAITAOF waits for the fsync of its own connection's writes only, so on a connection that wrote nothing
it confirms at once, and under `appendfsync no` it never confirms a write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway import keys
from gateway.durability import WAITAOF_TIMEOUT_MS, Durability, NotDurable, confirm, confirmed
from gateway.feedback import FeedbackStore
from gateway.metrics import Metrics
from gateway.recorder import Recorder
from gateway.records import FeedbackIn
from gateway.tenants import Tenant
from tests.unit.test_recording import context, feedback_store


class Redis72:
    def __init__(self, appendfsync: str, config: bool = True, waitaof: bool = True) -> None:
        self.appendfsync, self.config, self.waitaof = appendfsync, config, waitaof
        self.probes = 0
        """WAITAOF commands sent."""

    def register_script(self, _script: str) -> None:
        return None

    async def info(self, section: str) -> dict[str, Any]:
        return {"redis_version": "7.2.4"} if section == "server" else {"aof_enabled": 1}

    async def config_get(self, _pattern: str) -> dict[str, str]:
        if not self.config:
            raise ResponseError("unknown command 'CONFIG'")
        return {"appendfsync": self.appendfsync, "no-appendfsync-on-rewrite": "no"}

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return Pipeline(self)


class Pipeline:
    def __init__(self, redis: Redis72) -> None:
        self._redis, self._commands = redis, list[str]()

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None

    def set(self, *_: Any, **__: Any) -> None:
        self._commands.append("SET")

    def execute_command(self, name: str, *_: Any) -> None:
        self._commands.append(name)

    async def execute(self) -> list[Any]:
        replies: list[Any] = []
        wrote = False
        for command in self._commands:
            if command == "SET":
                wrote = True
                replies.append(True)
            else:
                self._redis.probes += 1
                if not self._redis.waitaof:
                    raise ResponseError("unknown command 'WAITAOF'")
                replies.append([0 if wrote and self._redis.appendfsync == "no" else 1, 0])
        return replies


@pytest.mark.parametrize(
    ("redis", "durability", "probed"),
    [
        (Redis72("everysec"), "waitaof", True),
        (Redis72("always"), "waitaof", True),
        (Redis72("no"), "spool", False),  # not probed: it would wait out its timeout at every check
        (Redis72("no", config=False), "spool", True),  # CONFIG refused: the probe's own write is not confirmed
        (Redis72("everysec", config=False), "waitaof", True),
        (Redis72("always", waitaof=False), "fsync-always", True),  # names itself 7.2 without WAITAOF (a fork)
        (Redis72("everysec", waitaof=False), "spool", True),
    ],
)
async def test_waitaof_is_trusted_once_it_confirms_a_write_of_its_own_connection(
    redis: Redis72, durability: str, probed: bool
) -> None:
    store = FeedbackStore(redis, None, None, Metrics())  # type: ignore[arg-type]
    assert await store.check_durability() == durability
    assert (redis.probes > 0) == probed


class Pipe:
    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        self.commands.append(args)


SETTINGS = {"appendonly": "yes", "appendfsync": "always", "no-appendfsync-on-rewrite": "no", "appendfilename": "a"}


@pytest.mark.parametrize(
    ("mode", "asked", "answer"),
    [
        ("waitaof", ("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS), [1, 0]),
        ("fsync-always", ("CONFIG GET", "*append*"), SETTINGS),
        ("spool", None, None),
    ],
)
def test_a_write_is_confirmed_on_disk_in_its_own_pipeline(mode: Durability, asked: Any, answer: Any) -> None:
    """WAITAOF; or under `fsync-always` the settings read again after the write: a Redis restarted or replaced
    without them is caught at its first write, where it was trusted until the next probe (30 s)."""
    pipe = Pipe()
    confirm(pipe, mode)
    assert pipe.commands == ([asked] if asked else [])
    results = [1, 1] + ([answer] if answer else [])
    assert confirmed(results, mode) == [1, 1], "the scripts' own results, without the confirmation's answer"


@pytest.mark.parametrize("changed", [{"appendfsync": "everysec"}, {"appendonly": "no"}, {"appendfsync": None}])
def test_a_redis_that_no_longer_fsyncs_every_write_is_caught_at_the_write(changed: dict[str, Any]) -> None:
    settings = {k: v for k, v in {**SETTINGS, **changed}.items() if v is not None}
    with pytest.raises(NotDurable):
        confirmed([1, settings], "fsync-always")


def test_a_write_redis_did_not_confirm_on_disk_is_not_acknowledged() -> None:
    with pytest.raises(NotDurable):
        confirmed([1, [0, 0]], "waitaof")  # no local fsync within the timeout: the rating is spooled


async def test_a_failed_write_makes_durability_unknown_until_probed_again(
    redis: aioredis.Redis, recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis back from an outage may be another (a replacement without `appendfsync always`): after a write fails,
    ratings spool (202) until a probe says how it persists, and the upkeep probes before it replays them."""
    store = await feedback_store(redis, recorder, tmp_path)
    tenant = Tenant(name="t")
    recorder.record(context(tenant))
    write = store._write

    async def down(items: list[dict[str, Any]], replay: bool) -> None:
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(store, "_write", down)
    _, stored = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u1", thumbs="up"))
    assert not stored and store.durability == "unknown", "spooled, and not trusted until probed"
    assert await store.replay() == 0, "nothing replayed into a Redis not probed since it failed"
    monkeypatch.setattr(store, "_write", write)
    _, stored = await store.submit(tenant, FeedbackIn(completion_id="chatcmpl-7", user="u2", thumbs="up"))
    assert not stored, "Redis is up again, but not yet probed: spooled too"
    assert await store.check_durability() == "fsync-always"
    assert await store.replay() == 2 and len(await redis.hgetall(keys.feedback("t", "chatcmpl-7"))) == 2
