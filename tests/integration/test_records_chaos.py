"""Chaos: the records Redis is SIGKILLed in the middle of a feedback load and started again.

A gateway process keeps its state (keys, quotas) in the session's Redis and its completion log and
feedback in a Redis of its own (AOF fsynced before every answer), which is killed while clients rate
completions and ask for new ones. Every acknowledged rating (200 from Redis, 202 from the local
spool) must be in Redis afterwards, and every completion record spooled meanwhile replayed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway import keys
from tests.conftest import (
    MODEL,
    Gateway,
    RedisServer,
    create_key,
    free_port,
    start_side_gateway,
    stop_gateway,
    sync_redis_client,
)
from tests.integration.conftest import eventually, metric

pytestmark = pytest.mark.integration

TENANT = "chaos"


@pytest.fixture(scope="module")
def records_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("records-redis"))
    server.start("durable")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def side(
    gateway: Gateway, redis_server: RedisServer, records_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:  # noqa: E501
    home = tmp_path_factory.mktemp("chaos")
    found = start_side_gateway(
        home, redis_server.url, gateway.engine_ports, LORAGATE_RECORDS_REDIS_URL=records_redis.url
    )
    yield found
    stop_gateway(found)


def complete(client: openai.OpenAI, user: str) -> str:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=1,
        user=user,  # type: ignore[list-item]
    ).id


def test_no_acknowledged_feedback_is_lost_when_redis_is_killed(
    side: Gateway, records_redis: RedisServer, tmp_path: Path
) -> None:
    key = create_key(side.env, TENANT)
    client = openai.OpenAI(base_url=side.base_url, api_key=key, max_retries=0)
    completions = [complete(client, f"before-{n}") for n in range(12)]
    acked: list[tuple[str, str, str, int]] = []
    stop = threading.Event()

    def rate(worker: int) -> None:
        with httpx.Client(base_url=side.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            n = 0
            while not stop.is_set():
                cid, user = completions[n % len(completions)], f"w{worker}-{n}"
                resp = http.post("/v1/feedback", json={"completion_id": cid, "user": user, "score": 0.5})
                if resp.status_code in (200, 202):
                    acked.append((cid, user, resp.json()["id"], resp.status_code))
                n += 1

    workers = [threading.Thread(target=rate, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(1.5)
    records_redis.kill()
    during = [complete(client, f"during-{n}") for n in range(8)]  # served while the log cannot be written
    time.sleep(1.5)
    records_redis.start("durable")
    time.sleep(1.5)
    stop.set()
    for worker in workers:
        worker.join()

    statuses = {status for *_, status in acked}
    assert statuses == {200, 202}, f"the load ran before, during and after the outage: {statuses}"
    assert eventually(lambda: httpx.get(f"{side.url}/readyz").json()["status"] == "ready", timeout=30)
    store = sync_redis_client(records_redis.url, decode_responses=True)
    try:
        pipe = store.pipeline(transaction=False)
        for cid, user, _, _ in acked:
            pipe.hget(keys.feedback(TENANT, cid), user)
        stored = pipe.execute()
        lost = [
            (cid, user) for (cid, user, fid, _), raw in zip(acked, stored, strict=True) if not raw or fid not in raw
        ]
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged ratings lost"
        logged = {f["r"].split('"id":"')[1].split('"')[0] for _, f in store.xrange(keys.completion_log(TENANT))}
        assert set(completions) | set(during) <= logged, "records spooled during the outage were replayed"
    finally:
        store.close()
    assert metric(side, "loragate_records_spooled_total") >= len(during)
    assert metric(side, "loragate_feedback_spooled_total") >= 1
