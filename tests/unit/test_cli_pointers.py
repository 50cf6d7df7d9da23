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
from typer.testing import CliRunner

from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway import keys
from gateway.cli import app as cli
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


def test_the_cli_ends_with_an_error_line_not_a_traceback(
    api: TestClient, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A missing alias, an unknown or malformed tenant, an output path that cannot be written and an empty end user
    end the command with `error: ...` and exit 1 (each printed a traceback, or listed nothing with exit 0)."""
    arms = [{"name": "a", "target": BASE, "weight": 1}, {"name": "b", "target": "bot@1", "weight": 1}]
    body = {"name": "e", "alias": "x", "control": "a", "arms": arms}
    assert api.post("/admin/tenants/acme/experiments", json=body).status_code == 201
    env = {"LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url, "LORAGATE_RECORDS_REDIS_URL": ""}
    env["LORAGATE_SERVED_MODEL_NAME"] = BASE
    export = ["feedback", "export", "--tenant", "acme", "--format", "sft", "--output"]
    page = ["experiments", "page", "e", "--tenant", "acme", "--out"]
    for command, said in (
        (["aliases", "rm", "nosuch", "--tenant", "acme"], "alias nosuch does not exist"),
        (["aliases", "rm", "x", "--tenant", "ghost"], "ghost"),
        (["aliases", "list", "--tenant", "BAD:NAME"], "Invalid tenant name"),
        (["experiments", "list", "--tenant", "BAD:NAME"], "Invalid tenant name"),
        (["experiments", "list", "--tenant", "ghost"], "ghost"),
        ([*export, str(tmp_path)], f"cannot write {tmp_path}"),
        ([*export, str(tmp_path / "no-dir" / "x.jsonl")], "cannot write"),
        ([*page, str(tmp_path / "no-dir" / "e.html")], "cannot write"),
        (["feedback", "forget", "--tenant", "acme", "--user", ""], "must be named"),
    ):
        done = CliRunner().invoke(cli, command, env=env)
        assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (command, done.output, done.exception)
        assert "error:" in done.output and said in done.output, (command, done.output)
    assert not (tmp_path / "no-dir").exists()
    assert api.get("/admin/tenants/acme/experiments").json()["data"][0]["name"] == "e", "nothing was removed"
    done = CliRunner().invoke(cli, [*page, str(tmp_path / "e.html")], env=env)
    assert done.exit_code == 0 and "<html" in (tmp_path / "e.html").read_text(encoding="utf-8").lower(), done.output
