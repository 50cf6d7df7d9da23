"""How the feedback store decides what a 2xx means, against a stand-in for Redis 7.2+ (the Redis these machines have
is 7.0, without WAITAOF; tests/unit/test_recording.py runs the same decision against it). The stand-in answers as
Redis does: WAITAOF waits for the fsync of its own connection's writes only, so on a connection that wrote nothing
it confirms at once, and under `appendfsync no` it never confirms a write."""

from __future__ import annotations

from typing import Any

import pytest
from redis.exceptions import ResponseError

from gateway.durability import WAITAOF_TIMEOUT_MS, Durability, NotDurable, confirm, confirmed
from gateway.feedback import FeedbackStore
from gateway.metrics import Metrics


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


@pytest.mark.parametrize("mode", ["waitaof", "fsync-always", "spool"])
def test_a_write_waits_for_its_fsync_only_under_waitaof(mode: Durability) -> None:
    pipe = Pipe()
    confirm(pipe, mode)
    assert pipe.commands == ([("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)] if mode == "waitaof" else [])
    results = [1, 1] + ([[1, 0]] if mode == "waitaof" else [])
    assert confirmed(results, mode) == [1, 1], "the scripts' own results, without WAITAOF's answer"


def test_a_write_redis_did_not_confirm_on_disk_is_not_acknowledged() -> None:
    with pytest.raises(NotDurable):
        confirmed([1, [0, 0]], "waitaof")  # no local fsync within the timeout: the rating is spooled
