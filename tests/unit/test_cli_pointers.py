"""The CLI points aliases and experiments only where the admin API would: a tenant that exists, an alias that is
a valid name and not already one of the tenant's models (real Redis; the CLI in a process of its own)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway import keys
from gateway.cli import app as cli
from gateway.cli import common
from gateway.tenants import TenantStore
from tests.conftest import RedisServer, redis_client, sync_redis_client
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
    assert sync_redis_client(redis_server.url).hgetall(keys.pins("acme")) == {}, "nothing was pinned"


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
    create = [
        "experiments",
        "create",
        "f",
        "--tenant",
        "acme",
        "--alias",
        "y",
        "--control",
        "a",
        "--arm",
        f"a={BASE}:1",
    ]
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
        (["adapters", "list", "--tenant", "ghost"], "Tenant `ghost` does not exist"),
        (["adapters", "rm", "bot@1", "--tenant", "ghost"], "Tenant `ghost` does not exist"),
        ([*create, "--arm", f"Bad Arm={BASE}:1"], "Invalid arm name 'Bad Arm'"),
        ([*create, "--arm", f"c:users={BASE}:1"], "Invalid arm name 'c:users'"),
        (create, "arms: an experiment needs at least two arms"),
        ([*create, "--arm", f"b={BASE}:1", "--max-error-rate", "2"], "max-error-rate: Input should be less than"),
    ):
        done = CliRunner().invoke(cli, command, env=env)
        assert done.exit_code == 1 and isinstance(done.exception, SystemExit), (command, done.output, done.exception)
        assert "error:" in done.output and said in done.output, (command, done.output)
        assert "pydantic.dev" not in done.output and "For further information" not in done.output, done.output
    assert not (tmp_path / "no-dir").exists()
    assert api.get("/admin/tenants/acme/experiments").json()["data"][0]["name"] == "e", "nothing was removed"
    done = CliRunner().invoke(cli, [*page, str(tmp_path / "e.html")], env=env)
    assert done.exit_code == 0 and "<html" in (tmp_path / "e.html").read_text(encoding="utf-8").lower(), done.output


def test_names_in_cli_tables_are_shown_as_given(api: TestClient, redis_server: RedisServer, tmp_path: Path) -> None:
    """Rich read names as markup: a key named `a[/b]` failed `keys list` with a traceback, `[red]x[/red]` showed
    as `x`; piped (80 columns), `experiments show` cut `treatment-a` and `treatment-b` both to `treat…`."""
    for name in ("a[/b]", "[red]hidden[/red]"):
        assert api.post("/admin/tenants/acme/keys", json={"name": name}).status_code == 201
    arms = [{"name": f"treatment-{x}", "target": BASE if x == "a" else "bot@1", "weight": 1} for x in "ab"]
    body = {"name": "wide", "alias": "w", "control": "treatment-a", "arms": arms}
    assert api.post("/admin/tenants/acme/experiments", json=body).status_code == 201
    env = {"LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url, "LORAGATE_RECORDS_REDIS_URL": ""}
    listed = CliRunner().invoke(cli, ["keys", "list", "--tenant", "acme"], env=env)
    assert listed.exit_code == 0 and "a[/b]" in listed.output and "[red]hidden[/red]" in listed.output, listed.output
    shown = CliRunner().invoke(cli, ["experiments", "show", "wide", "--tenant", "acme"], env=env)
    assert shown.exit_code == 0, shown.output
    assert "treatment-a (control)" in shown.output and "treatment-b" in shown.output and "…" not in shown.output
    assert api.post("/admin/tenants/acme/experiments/wide/stop", json={}).status_code == 200
    ended = CliRunner().invoke(cli, ["experiments", "show", "wide", "--tenant", "acme"], env=env)
    assert "results when it ended (stopped); the verdict then: keep running" in ended.output, ended.output


def test_a_redis_the_cli_cannot_reach_is_named_without_its_password(redis_server: RedisServer, tmp_path: Path) -> None:
    """The records Redis down: the error named the state Redis (healthy), and printed URLs with their passwords."""
    env = {"LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url}
    env["LORAGATE_RECORDS_REDIS_URL"] = "redis://:s3cret@127.0.0.1:1/0"
    done = CliRunner().invoke(cli, ["feedback", "forget", "--tenant", "acme", "--user", "u"], env=env)
    assert done.exit_code == 1 and "cannot be reached" in done.output, done.output
    assert "LORAGATE_RECORDS_REDIS_URL=redis://127.0.0.1:1/0" in done.output and "s3cret" not in done.output


def test_the_cli_creates_experiments_with_every_setting_the_api_takes(
    api: TestClient, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {"LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url, "LORAGATE_SERVED_MODEL_NAME": BASE}
    arms = ["--arm", f"a={BASE}:1", "--arm", f"b={BASE}:1", "--control", "a"]
    settings = ["--alpha", "0.01", "--smallest-effect", "0.05", "--mixture-sd", "0.2", "--guard-min-requests", "50"]
    done = CliRunner().invoke(
        cli, ["experiments", "create", "stats", "--tenant", "acme", "--alias", "s", *arms, *settings], env=env
    )
    assert done.exit_code == 0, done.output
    made = api.get("/admin/tenants/acme/experiments/stats").json()
    assert (made["alpha"], made["smallest_effect"], made["mixture_sd"], made["guard_min_requests"]) == (
        0.01,
        0.05,
        0.2,
        50,
    )


async def test_a_command_waits_out_a_redis_that_answers_late_and_ends_cleanly_when_it_never_does(
    own_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight seconds without replies (CLIENT PAUSE; a Redis fsyncing on a busy disk looks alike to its clients): the
    command waits them out, where redis-py 8's default gave up after 5 s. A Redis that never answers (stopped) ends
    it once its wait is over (1 s here), with the message that names the server, not a traceback."""
    env = {"LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": own_redis.url, "LORAGATE_RECORDS_REDIS_URL": ""}
    admin = redis_client(own_redis.url)
    try:
        await TenantStore(admin).create("acme")
        started = time.monotonic()
        await admin.client_pause(8000)
        listed = await asyncio.to_thread(CliRunner().invoke, cli, ["tenants", "list"], env=env)
        assert listed.exit_code == 0 and "acme" in listed.output, listed.output
        assert time.monotonic() - started >= 8, "the pause was waited out"
    finally:
        await admin.aclose()
    monkeypatch.setattr(common, "JOB_REDIS_TIMEOUT_S", 1.0)
    pid = own_redis.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        stuck = await asyncio.wait_for(asyncio.to_thread(CliRunner().invoke, cli, ["tenants", "list"], env=env), 20)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)  # a command that waited on (the thread goes on) gets its reply and ends
    assert stuck.exit_code == 1 and "Redis cannot be reached" in stuck.output, stuck.output
    assert "Traceback" not in stuck.output and own_redis.url.removesuffix("/0") in stuck.output
    assert 1 <= took < 5, f"ended after {took:.1f} s: by its own wait (1 s), not another limit"


def test_the_cli_shares_an_adapter_not_a_version(api: TestClient, redis_server: RedisServer, tmp_path: Path) -> None:
    """`adapters share bot@2` said `acme/bot@2 shared with ghost` and wrote a share no request looks up (the admin
    API refuses a version there)."""
    assert api.post("/admin/tenants", json={"name": "ghost"}).status_code == 201
    env = {**os.environ, "LORAGATE_HOME": str(tmp_path), "LORAGATE_REDIS_URL": redis_server.url}
    share = [sys.executable, "-m", "gateway", "adapters", "share", "bot@2", "--tenant", "acme", "--with", "ghost"]
    done = subprocess.run(share, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "`bot@2` names a version" in output and "Traceback" not in output, output
    assert sync_redis_client(redis_server.url).hgetall(keys.shares()) == {}, "nothing was shared"
    done = subprocess.run([*share[:5], "bot", *share[6:]], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "acme/bot shared with ghost" in done.stdout, done.stdout + done.stderr
    assert sync_redis_client(redis_server.url).hgetall(keys.shares()) != {}
