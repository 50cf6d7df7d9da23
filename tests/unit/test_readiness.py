"""`/readyz` answers within the Helm chart's 3 s probe timeout when Redis hangs (stopped, not down): a Redis that
hung held every answer 5 s (its client's timeout), and the probe took every gateway out of service while serving
went on."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import RedisServer
from tests.unit.admin_api import ADMIN, BASE
from tests.unit.stand_in_engine import StandInEngine, serving


@pytest.fixture
def engine() -> Iterator[str]:
    with serving(StandInEngine) as url:
        yield url


def test_readyz_answers_degraded_after_its_wait_while_redis_hangs(
    own_redis: RedisServer, engine: str, tmp_path: Path
) -> None:
    admin_key = SecretStr(ADMIN["Authorization"].removeprefix("Bearer "))
    settings = Settings(home=tmp_path, redis_url=own_redis.url, served_model_name=BASE, admin_key=admin_key)
    with TestClient(create_app(settings, engine_urls=[engine])) as client:
        assert client.get("/readyz").json() == {"status": "ready"}
        pid = own_redis.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            ready = client.get("/readyz", params={"verbose": 1}, headers=ADMIN)
            took = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
    assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
    assert ready.json()["redis"] == "unreachable" and took < 4.5, took  # not the socket's 5 s


def test_a_replica_whose_health_check_went_unanswered_is_still_ready(
    own_redis: RedisServer, engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine busy on the CPU answers `/health` late: it stays in service until the third check in a row it leaves
    unanswered (gateway.engine.pool), and the readiness probe, which shares the check under way, says so too (it
    took the gateway out of service while it served)."""
    from gateway.engine.pool import Replica, ReplicaPool

    settings = Settings(home=tmp_path, redis_url=own_redis.url, served_model_name=BASE)
    with TestClient(create_app(settings, engine_urls=[engine])) as client:
        assert client.get("/readyz").json() == {"status": "ready"}

        async def unanswered(self: ReplicaPool, replica: Replica) -> bool:
            return False  # timed out: no answer, the replica still healthy

        monkeypatch.setattr(ReplicaPool, "check", unanswered)
        assert client.get("/readyz").json() == {"status": "ready"}
