"""Chaos: a gateway process is restarted (SIGTERM, then started again on its port) in the middle of a
load of completions and ratings. Clients see answers or connection errors, never a 5xx; every answered
completion is in the log and every acknowledged rating in Redis afterwards; keys keep working."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gateway import keys
from tests.conftest import (
    MODEL,
    Gateway,
    RedisServer,
    create_key,
    start_gateway,
    start_side_gateway,
    stop_gateway,
    sync_redis_client,
)
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration

TENANT = "restart"


@dataclass
class Traffic:
    """What the clients saw: statuses (or connection errors by name), answered completions, acknowledged ratings."""

    seen: list[int | str] = field(default_factory=list)
    answered: list[str] = field(default_factory=list)
    rated: list[tuple[str, str, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def client(self, gateway: Gateway, key: str, worker: int) -> None:
        with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    self._one(http, f"w{worker}-{n}")
                except httpx.TransportError as exc:  # the process went away, or is not listening yet
                    self.seen.append(type(exc).__name__)
                    time.sleep(0.05)

    def _one(self, http: httpx.Client, user: str) -> None:
        asked = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        answer = http.post("/v1/chat/completions", json=asked)
        self.seen.append(answer.status_code)
        if answer.status_code != 200:
            return
        self.answered.append(answer.json()["id"])
        rating = http.post("/v1/feedback", json={"completion_id": answer.json()["id"], "user": user, "score": 1})
        self.seen.append(rating.status_code)
        if rating.status_code in (200, 202):
            self.rated.append((answer.json()["id"], user, rating.json()["id"]))


def answering(traffic: Traffic, past: int) -> None:
    """Wait until the clients have had more than `past` answers, and a second more (on a busy vLLM, 60 s at most)."""
    assert eventually(lambda: len(traffic.answered) > past, timeout=60), f"no answer past the {past} before in 60 s"
    time.sleep(1)


@pytest.fixture
def side(gateway: Gateway, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    started = start_side_gateway(tmp_path_factory.mktemp("restart"), redis_server.url, gateway.engine_ports[:1])
    yield started
    stop_gateway(started)


def test_a_restart_under_load_shows_only_connection_errors_and_loses_nothing(
    side: Gateway, redis_server: RedisServer
) -> None:
    key = create_key(side.env, TENANT)
    traffic = Traffic()
    clients = [threading.Thread(target=traffic.client, args=(side, key, w)) for w in range(3)]
    for thread in clients:
        thread.start()
    answering(traffic, 0)
    before = len(traffic.answered)
    stop_gateway(side)
    home = Path(side.env["LORAGATE_HOME"])
    restarted = start_gateway(home, side.env, side.engine_ports, ready_timeout=180)
    side.process = restarted.process  # the fixture stops the new process
    answering(traffic, before)
    traffic.stop.set()
    for thread in clients:
        thread.join(timeout=90)

    assert before > 0 and len(traffic.answered) > before, "answers before and after the restart"
    assert any(isinstance(s, str) for s in traffic.seen), "the clients met the restart (connection errors)"
    statuses = {s for s in traffic.seen if isinstance(s, int)}
    assert statuses <= {200, 202}, f"only answers and acknowledgements, no error status: {statuses}"
    store = sync_redis_client(redis_server.url, decode_responses=True)
    try:

        def all_logged() -> bool:
            logged = {f["r"].split('"id":"')[1].split('"')[0] for _, f in store.xrange(keys.completion_log(TENANT))}
            return set(traffic.answered) <= logged

        assert eventually(all_logged, timeout=15), "every answered completion is in the log"
        lost = [
            (cid, user)
            for cid, user, fid in traffic.rated
            if fid not in (store.hget(keys.feedback(TENANT, cid), user) or "")
        ]
        assert not lost, f"{len(lost)} of {len(traffic.rated)} acknowledged ratings lost"
    finally:
        store.close()
    assert httpx.get(f"{side.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
