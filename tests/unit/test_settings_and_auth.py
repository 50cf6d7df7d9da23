from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.apikeys import hash_key
from gateway.auth import bearer_matches, bearer_token
from gateway.engine.supervisor import engine_command, is_internal_address
from gateway.errors import AuthenticationFailed
from gateway.ports import url_host
from gateway.settings import Settings
from tests.conftest import ROOT, gateway_env


def test_env_and_yaml_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "loragate.yaml"
    config.write_text("port: 9001\nmax_lora_rank: 32\nserved_model_name: from-yaml\n")
    monkeypatch.setenv("LORAGATE_CONFIG", str(config))
    monkeypatch.setenv("LORAGATE_PORT", "9002")
    monkeypatch.setenv("LORAGATE_ENGINE_URLS", "http://10.0.0.5:8000/, http://10.0.0.6:8000")
    settings = Settings()
    assert settings.port == 9002, "environment beats the file"
    assert settings.max_lora_rank == 32 and settings.served_model_name == "from-yaml"
    assert settings.engine_urls == ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]


def test_engine_command_carries_lora_settings(tmp_path: Path) -> None:
    cmd = engine_command(Settings(max_loras=3, max_cpu_loras=6, max_lora_rank=8), tmp_path, 8123)
    assert "--enable-lora" in cmd
    for flag, value in (("--max-loras", "3"), ("--max-cpu-loras", "6"), ("--max-lora-rank", "8"), ("--port", "8123")):
        assert cmd[cmd.index(flag) + 1] == value


def test_engine_dtype_is_passed_only_when_chosen(tmp_path: Path) -> None:
    cmd = engine_command(Settings(), tmp_path, 8123, "float32")
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    assert "--dtype" not in engine_command(Settings(), tmp_path, 8123)


def test_bitsandbytes_engine_runs_in_its_own_python(tmp_path: Path) -> None:
    python = tmp_path / "bnb/bin/python"
    cmd = engine_command(Settings(quantization="bitsandbytes", engine_python=python), tmp_path, 8123)
    assert cmd[0] == str(python)
    assert cmd[cmd.index("--quantization") + 1] == "bitsandbytes"
    assert cmd[cmd.index("--load-format") + 1] == "bitsandbytes"
    assert "--quantization" not in engine_command(Settings(quantization="w4a16"), tmp_path, 8123)


def test_engine_python_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(engine_python=Path(".venv-bnb/bin/python")).engine_python == tmp_path / ".venv-bnb/bin/python"


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("10.1.2.3", True),
        ("192.168.1.1", True),
        ("0.0.0.0", False),
        ("8.8.8.8", False),
        ("example.com", False),
    ],
)
def test_engine_listens_only_inside(host: str, ok: bool) -> None:
    assert is_internal_address(host) is ok


def test_bearer_parsing() -> None:
    assert bearer_token("Bearer sk-abc") == "sk-abc"
    assert bearer_token("bearer   sk-abc ") == "sk-abc"
    for bad in (None, "", "Basic abc", "Bearer", "Bearer   "):
        with pytest.raises(AuthenticationFailed):
            bearer_token(bad)


def test_admin_key_is_separate() -> None:
    assert bearer_matches("Bearer root-key", "root-key")
    assert not bearer_matches("Bearer root-key", None)
    assert not bearer_matches("Bearer other", "root-key")
    assert hash_key("a") != hash_key("b") and len(hash_key("a")) == 64


def test_operator_keys_lose_the_spaces_around_them_and_weak_ones_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key read from a file ends with a newline, which no Authorization header can carry: the operator was locked
    out, with nothing said. One too short to be safe, or that no header can carry, stops the gateway at start."""
    monkeypatch.setenv("LORAGATE_ADMIN_KEY", " admin-secret-0123456789\n")
    monkeypatch.setenv("LORAGATE_METRICS_KEY", "")
    settings = Settings()
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == "admin-secret-0123456789"
    assert settings.metrics_key is None, "empty is unset"
    for weak, says in (
        ("x", "at least 16"),
        ("admin secret 0123456789", "without spaces"),
        ("clé-0123456789abc", "ASCII"),
    ):
        with pytest.raises(ValueError, match=says):
            Settings(admin_key=weak)


def test_the_cli_names_a_bad_setting_without_a_traceback(tmp_path: Path) -> None:
    env = {**gateway_env(tmp_path, "redis://127.0.0.1:1/0", 1), "LORAGATE_ADMIN_KEY": "short"}
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "tenants", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "LORAGATE_ADMIN_KEY: has 5 characters; use at least 16" in done.stderr


def test_an_empty_spool_dir_is_the_default_not_the_working_directory(tmp_path: Path) -> None:
    assert Settings(home=tmp_path, spool_dir="").spool_root == tmp_path / "spool"
    assert Settings(home=tmp_path, spool_dir=str(tmp_path / "s")).spool_root == tmp_path / "s"


def test_guard_rails_run_no_more_often_than_their_round_lock_can_say() -> None:
    """A round takes a lock of 90% of the interval in whole milliseconds: one of a millisecond would be 0 ms, which
    Redis refuses, and no round would ever run."""
    assert Settings(guard_rails_s=0.01).guard_rails_s == 0.01
    with pytest.raises(ValueError, match="guard_rails_s"):
        Settings(guard_rails_s=0.001)


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"health_interval_s": 0}, "health_interval_s"),  # the health checks and maintenance looped without a pause
        ({"upstream_timeout_s": 0}, "upstream_timeout_s"),  # every completion a 504 at once
        ({"engine_start_timeout_s": -1}, "engine_start_timeout_s"),
        ({"log_level": "warn"}, "log_level"),  # uvicorn's KeyError, after vLLM had started
        ({"engine_port": 65535, "engine_replicas": 2}, "passes port 65535"),
    ],
)
def test_settings_that_would_fail_later_are_refused_at_start(given: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**given)


def test_a_log_level_is_read_in_any_case_and_an_ipv6_engine_host_makes_a_url() -> None:
    assert Settings(log_level="WARNING").log_level == "warning"
    assert (url_host("::1"), url_host("127.0.0.1"), url_host("[::1]")) == ("[::1]", "127.0.0.1", "[::1]")
