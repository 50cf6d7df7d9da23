"""The Redis lane of the hot-path scripts: replies decoded as the client asks, errors returned per call,
the script reloaded after Redis forgets it, and a lost connection raised, then replaced."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.lane import ScriptLane

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


async def test_a_lost_connection_raises_and_the_next_call_opens_another(
    redis: aioredis.Redis, lane: ScriptLane
) -> None:
    assert await lane(["k"], ["1"]) == ["k", "1", 7]
    await redis.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises((RedisConnectionError, ConnectionError, OSError)):
        await lane(["k"], ["2"])
    assert await lane(["k"], ["3"]) == ["k", "3", 7]


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
