"""The Redis lane of the hot-path scripts: replies decoded as the client asks, errors returned per call,
the script reloaded after Redis forgets it, and a lost connection raised, then replaced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.lane import ScriptLane
from tests.conftest import free_port

ECHO = "if ARGV[1] == 'fail' then return redis.error_reply('ERR asked to fail') end return {KEYS[1], ARGV[1], 7}"


@pytest.fixture
async def lane(redis: aioredis.Redis) -> AsyncIterator[ScriptLane]:
    """A lane of the ECHO script on the test's Redis, closed after the test."""
    opened = ScriptLane(redis, ECHO)
    yield opened
    await opened.close()


async def test_replies_are_decoded_and_errors_come_back_per_call(lane: ScriptLane) -> None:
    assert await lane(["k"], ["é"]) == ["k", "é", 7]
    first, failed, last = await lane.many([(["a"], ["1"]), (["b"], ["fail"]), (["c"], ["3"])])
    assert first == ["a", "1", 7] and last == ["c", "3", 7]
    assert isinstance(failed, ResponseError) and "asked to fail" in str(failed)
    with pytest.raises(ResponseError, match="asked to fail"):
        await lane(["k"], ["fail"])


async def test_a_big_batch_arrives_whole(lane: ScriptLane) -> None:
    """Replies longer than one read of the socket are assembled before they are returned."""
    value = "x" * 100_000
    replies = await lane.many([([f"k{i}"], [value]) for i in range(20)])
    assert [reply[0] for reply in replies] == [f"k{i}" for i in range(20)]
    assert all(reply[1] == value for reply in replies)


async def test_the_script_is_loaded_again_after_redis_forgets_it(redis: aioredis.Redis, lane: ScriptLane) -> None:
    assert await lane(["k"], ["1"]) == ["k", "1", 7]
    await redis.script_flush()
    assert await lane.many([(["k"], ["2"]), (["j"], ["3"])]) == [["k", "2", 7], ["j", "3", 7]]


async def test_connections_redis_closed_while_idle_are_replaced_within_the_call(
    redis: aioredis.Redis, lane: ScriptLane
) -> None:
    """After Redis dropped the lane's idle connections (a restart, its idle `timeout`), the next calls are
    answered at once: none fails (a quota check failing here admitted its request unchecked)."""
    await asyncio.gather(*(lane([f"k{i}"], ["1"]) for i in range(4)))  # several idle connections
    await redis.client_kill_filter(_type="normal", skipme=True)
    for i in range(4):
        assert await lane(["k"], [str(i)]) == ["k", str(i), 7]
    assert len(await redis.client_list(_type="normal")) <= 2, "the dead connections were dropped, not kept"


async def test_an_unreachable_redis_still_raises(redis: aioredis.Redis, lane: ScriptLane) -> None:
    """A call is sent again once, on a new connection: when that one cannot be opened either, it raises."""
    assert await lane(["k"], ["1"]) == ["k", "1", 7]
    address = redis.connection_pool.connection_kwargs
    gone = aioredis.Redis(host=address.get("host", "127.0.0.1"), port=free_port())
    dead = ScriptLane(gone, ECHO)
    with pytest.raises((RedisConnectionError, ConnectionError, OSError)):
        await dead(["k"], ["2"])
    await gone.aclose()


async def test_bytes_when_the_client_does_not_decode(redis: aioredis.Redis) -> None:
    raw = aioredis.Redis(
        connection_pool=aioredis.ConnectionPool(
            **{**redis.connection_pool.connection_kwargs, "decode_responses": False}
        )
    )
    lane = ScriptLane(raw, ECHO)
    try:
        assert await lane(["k"], ["v"]) == [b"k", b"v", 7]
    finally:
        await lane.close()
        await raw.aclose()
