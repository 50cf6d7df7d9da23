"""The CLI points aliases and experiments only where the admin API would: a tenant that exists, an alias that is
a valid name and not already one of the tenant's models (real Redis; the CLI in a process of its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis as sync_redis
from starlette.testclient import TestClient

from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway import keys
from tests.conftest import RedisServer
from tests.unit.admin_api import BASE


@pytest.mark.parametrize(
    ("tenant", "alias", "said"),
    [
        ("acme", "bot", "`bot` is already the name of a model of tenant acme"),
        ("ghost", "prod", "ghost"),
        ("acme", "has space", "has space"),
    ],
)
def test_the_cli_refuses_what_the_admin_api_refuses(
    api: TestClient, redis_server: RedisServer, tmp_path: Path, tenant: str, alias: str, said: str
) -> None:
    env = {**os.environ, "LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url}
    env["LORAGATE_SERVED_MODEL_NAME"] = BASE
    arms = ["--arm", f"control={BASE}:1", "--arm", f"treat={BASE}:1"]
    for command in (
        ["experiments", "create", "e", "--tenant", tenant, "--alias", alias, *arms],
        ["aliases", "set", alias, BASE, "--tenant", tenant],
    ):
        done = subprocess.run([sys.executable, "-m", "gateway", *command], env=env, capture_output=True, text=True)
        output = done.stdout + done.stderr
        assert done.returncode == 1 and said in output and "Traceback" not in output, (command, output)
    assert api.post("/admin/tenants", json={"name": "ghost"}).status_code == 201
    for name in ("acme", "ghost"):
        assert api.get(f"/admin/tenants/{name}/experiments").json()["data"] == [], "nothing was created"
        assert api.get(f"/admin/tenants/{name}/aliases").json()["data"] == [], "nor pointed"


def test_the_cli_pins_no_candidate(
    api: TestClient, redis_server: RedisServer, tmp_path: Path, base: BaseModelSpec
) -> None:
    """`acme` has bot@1..3 published; bot@4 is an unpublished candidate, nobody's default (the API refuses it too)."""
    api.app.state.services.registry.store("acme").add(  # type: ignore[attr-defined]
        make_adapter(tmp_path / "c", base, seed=9), "bot", base, 16, listed=False
    )
    env = {**os.environ, "LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url}
    env["LORAGATE_SERVED_MODEL_NAME"] = BASE
    pin = [sys.executable, "-m", "gateway", "adapters", "pin", "bot@4", "--tenant", "acme"]
    done = subprocess.run(pin, env=env, capture_output=True, text=True)
    assert done.returncode == 1 and "bot@4" in done.stdout + done.stderr, done.stdout + done.stderr
    assert api.put("/admin/tenants/acme/adapters/bot/pin", json={"version": 4}).status_code == 404
    assert sync_redis.Redis.from_url(redis_server.url).hgetall(keys.pins("acme")) == {}, "nothing was pinned"
