"""One retraining run at a time per alias (training.lease), on a real Redis, and through `loragate train run`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from starlette.testclient import TestClient
from typer.testing import CliRunner

from gateway import keys
from gateway.cli import app as cli
from tests.conftest import RedisServer, sync_redis_client
from training import lease
from training.publish import RetrainRefused


async def test_a_second_run_on_the_alias_is_refused_until_the_first_ends(redis: aioredis.Redis) -> None:
    async with lease.alias_lease(redis, "acme", "support", "run-1"):
        with pytest.raises(RetrainRefused, match="being retrained by run run-1"):
            async with lease.alias_lease(redis, "acme", "support", "run-2"):
                pytest.fail("two runs held one alias")
        async with lease.alias_lease(redis, "acme", "sales", "run-2"):  # another alias: its own lease
            assert await redis.get(keys.retrain_lease("acme", "sales")) == "run-2"
        async with lease.alias_lease(redis, "other", "support", "run-3"):  # another tenant's alias of that name
            pass
    assert await redis.get(keys.retrain_lease("acme", "support")) is None, "released at the end"
    async with lease.alias_lease(redis, "acme", "support", "run-2"):
        assert await redis.get(keys.retrain_lease("acme", "support")) == "run-2"


async def test_the_lease_is_renewed_while_the_run_works(redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "LEASE_S", 1.5)  # renewed every 0.5 s: a loaded machine may lag a second
    async with lease.alias_lease(redis, "acme", "support", "run-1"):
        await asyncio.sleep(3.5)  # past two lifetimes: only renewals keep it
        assert await redis.get(keys.retrain_lease("acme", "support")) == "run-1"
        with pytest.raises(RetrainRefused):
            async with lease.alias_lease(redis, "acme", "support", "run-2"):
                pass


async def test_a_run_whose_lease_was_lost_is_stopped(redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """Expired while Redis was out of reach (and taken by another run): renewing swallowed that, and the run went on
    working on the alias beside the other. Its work is stopped now, and the step fails saying why."""
    monkeypatch.setattr(lease, "LEASE_S", 1.5)  # renewed every 0.5 s
    name = keys.retrain_lease("acme", "support")
    seen: list[tuple[object, ...]] = []
    with pytest.raises(lease.LeaseLost, match="run-1 lost its lease of alias `support`"):
        async with lease.alias_lease(redis, "acme", "support", "run-1"):
            await redis.set(name, "run-2", px=60_000)  # run-1's expired, and run-2 took it
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError as exc:
                seen.append(exc.args)  # what the run's own handler reads (retrain's run.json: not "SIGTERM")
                raise
            pytest.fail("the run went on without its lease")
    assert seen == [(lease.LOST,)]
    assert await redis.get(name) == "run-2", "the other run's lease is left as it is"


async def test_a_dead_runs_lease_frees_itself_and_a_runs_own_is_taken_over(redis: aioredis.Redis) -> None:
    name = keys.retrain_lease("acme", "support")
    await redis.set(name, "run-dead", px=2000)  # a process killed while it held the alias: nobody renews it
    with pytest.raises(RetrainRefused, match="run-dead"):
        async with lease.alias_lease(redis, "acme", "support", "run-2"):
            pass
    await asyncio.sleep(2.1)
    async with lease.alias_lease(redis, "acme", "support", "run-2"):
        assert await redis.get(name) == "run-2"
    await redis.set(name, "run-2", px=60_000)  # a step of run-2 killed: the next step of run-2 goes on
    async with lease.alias_lease(redis, "acme", "support", "run-2"):
        assert 50_000 < await redis.pttl(name) <= 60_000
    assert await redis.get(name) is None


def test_train_run_is_refused_while_another_run_retrains_the_alias(
    api: TestClient, redis_server: RedisServer, tmp_path: Path
) -> None:

    state = sync_redis_client(redis_server.url, decode_responses=True)
    state.set(keys.retrain_lease("acme", "support"), "20261204-120000-abcdef", px=60_000)
    env = {**os.environ, "LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url}
    command = [sys.executable, "-m", "gateway", "train", "run", "--tenant", "acme", "--alias", "support"]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 1 and "Traceback" not in said, said
    assert "being retrained by run 20261204-120000-abcdef" in " ".join(said.split()), said
    assert state.get(keys.retrain_lease("acme", "support")) == "20261204-120000-abcdef", "the holder's lease stays"
    (run,) = (tmp_path / "training" / "acme").iterdir()
    assert "being retrained by run" in json.loads((run / "run.json").read_text())["error"], "run.json says why"


def test_the_train_commands_name_a_bad_config_or_run_folder_without_a_traceback(
    api: TestClient, redis_server: RedisServer, tmp_path: Path
) -> None:
    """In this process (CliRunner): a command that fails with a traceback leaves it in `exception`, not an exit 1."""
    env = {"LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url}
    config, run = tmp_path / "c.yaml", tmp_path / "run"
    run.mkdir()
    (tmp_path / "schema.json").write_text("{not json")
    (tmp_path / "regression.jsonl").write_text('{"prompt": "hi"}\n')  # no reference: no eval row
    for text, says in (
        ("foo: [1\n", "not valid YAML"),
        ("lora_r: 8.5\n", "lora_r must be a whole number"),
        (f"json_schema_path: {tmp_path / 'schema.json'}\n", "schema.json' is not JSON"),  # found before the fit
        (f"regression_jsonl: {tmp_path / 'regression.jsonl'}\n", "regression.jsonl:1: not an eval row"),
    ):
        config.write_text(text)
        command = ["train", "run", "--tenant", "acme", "--alias", "support", "--config", str(config)]
        done = CliRunner().invoke(cli, command, env=env)
        assert done.exit_code == 1 and says in done.output, (done.output, done.exception)
    for text, says in (("{not json", "cannot be read by this version"), (RUN_JSON, "does not know: ['bogus']")):
        (run / "run.json").write_text(text)
        done = CliRunner().invoke(cli, ["train", "fit", "--run", str(run)], env=env)
        assert done.exit_code == 1 and says in " ".join(done.output.split()), (done.output, done.exception)


RUN_JSON = json.dumps({"run_id": "r", "tenant": "acme", "alias": "support", "config": {"bogus": 1}})
"""A run.json of a loragate version whose config has a field this one does not know."""


async def test_a_renewal_that_hangs_is_given_up_and_tried_again_in_time(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal that hung (Redis slow, the client's 30 s timeout) and then waited the full interval let the lease
    expire after an outage of half its lifetime, and a multi-hour fit was stopped."""
    from redis.asyncio.lock import Lock

    monkeypatch.setattr(lease, "LEASE_S", 3.0)  # renewed every second
    real, calls = Lock.reacquire, [0]

    async def hangs_once(self: Lock) -> bool:
        calls[0] += 1
        if calls[0] == 1:
            await asyncio.sleep(10)  # past the lease's lifetime
        return await real(self)

    monkeypatch.setattr(Lock, "reacquire", hangs_once)
    async with lease.alias_lease(redis, "acme", "support", "run-1"):
        await asyncio.sleep(4.5)  # past a lifetime from the last renewal, had the hung one been waited for
        assert await redis.get(keys.retrain_lease("acme", "support")) == "run-1" and calls[0] >= 2
