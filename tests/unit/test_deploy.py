"""deploy/compose.yaml and the images' entrypoints, checked without a Docker engine or a GPU.

The Compose file is validated twice: against the Compose Specification's JSON schema (vendored in
tests/unit/schemas/, see the README there) and by the real Docker Compose v2 CLI (`config`, which
interpolates, merges anchors and validates as `up` would). The resolved project is then checked for what
the gateway needs to work: the services the stack promises, Redis with AOF, one adapter-store path on one
volume, the ports and URLs that tie gateway, vLLM, Redis, Prometheus and Grafana together.
The Helm chart: tests/unit/test_deploy_helm.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from gateway.engine.supervisor import engine_command
from gateway.settings import Settings
from tests.unit.deploy_tools import DEPLOY, DROPS_ADAPTER_NAMES, REPO, compose, compose_config

KEY = {"LORAGATE_METRICS_KEY": "test-metrics-key"}
STACK = {"volume-init", "redis", "vllm-0", "vllm-1", "gateway", "prometheus", "grafana"}
SETTINGS = {f"LORAGATE_{name.upper()}" for name in Settings.model_fields}
# Read by `loragate train` (its --gateway-url), not by Settings.
CLI_ONLY = {"LORAGATE_URL"}

Service = dict[str, Any]


@pytest.fixture(scope="module")
def stack() -> dict[str, Service]:
    services: dict[str, Service] = compose_config(KEY, "retrain")["services"]
    return services


def test_compose_file_matches_the_compose_spec_schema() -> None:
    schema = json.loads((Path(__file__).parent / "schemas" / "compose-spec.json").read_text())
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    assert [f"{e.json_path}: {e.message}" for e in validator.iter_errors(raw)] == []
    raw["services"]["redis"]["restart_policy"] = "always"  # a misplaced key is caught
    assert any("restart_policy" in e.message for e in validator.iter_errors(raw))


def test_compose_resolves_the_stack_and_retrain_only_on_demand(stack: dict[str, Service]) -> None:
    assert set(compose_config(KEY)["services"]) == STACK
    assert set(stack) == STACK | {"retrain"}
    assert stack["retrain"]["profiles"] == ["retrain"]


def test_compose_refuses_to_run_without_the_metrics_key() -> None:
    done = compose("config", "--quiet", env={})
    assert done.returncode != 0
    assert "export LORAGATE_METRICS_KEY first" in done.stderr


def test_redis_keeps_an_append_only_file_on_a_volume(stack: dict[str, Service]) -> None:
    redis = stack["redis"]
    command = redis["command"]
    assert command[0] == "redis-server" and command[command.index("--appendonly") + 1] == "yes"
    assert [(m["type"], m["target"]) for m in redis["volumes"]] == [("volume", "/data")]
    assert redis["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


def test_gateway_reaches_redis_and_every_vllm_replica(stack: dict[str, Service]) -> None:
    gateway = stack["gateway"]
    env = gateway["environment"]
    redis = urlsplit(env["LORAGATE_REDIS_URL"])
    assert (redis.hostname, redis.port) == ("redis", 6379)  # redis-server's default port
    engines = [urlsplit(url) for url in env["LORAGATE_ENGINE_URLS"].split(",")]
    assert sorted(url.hostname or "" for url in engines) == ["vllm-0", "vllm-1"]
    for url in engines:
        assert url.port == int(stack[url.hostname or ""]["environment"].get("VLLM_PORT", 8000))
        assert _shared_networks(gateway, stack[url.hostname or ""])
    assert _shared_networks(gateway, stack["redis"])
    port = int(env["LORAGATE_PORT"])
    assert env["LORAGATE_HOST"] == "0.0.0.0"
    assert [p["target"] for p in gateway["ports"]] == [port]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


def test_gateway_vllm_and_retrain_share_one_adapter_store(stack: dict[str, Service]) -> None:
    users = ["gateway", "vllm-0", "vllm-1", "retrain"]
    stores = {stack[name]["environment"]["LORAGATE_ADAPTER_STORE"] for name in users}
    assert len(stores) == 1
    store = stores.pop()
    for name in users:
        mounts = [m for m in stack[name]["volumes"] if store.startswith(m["target"].rstrip("/") + "/")]
        assert [(m["type"], m["source"]) for m in mounts] == [("volume", "loragate-data")], name


def test_every_loragate_variable_is_one_loragate_reads(stack: dict[str, Service]) -> None:
    for name in ("gateway", "vllm-0", "vllm-1", "retrain"):
        unknown = {k for k in stack[name]["environment"] if k.startswith("LORAGATE_")} - SETTINGS - CLI_ONLY
        assert unknown == set(), name


def test_only_the_gateway_is_published_beyond_loopback(stack: dict[str, Service]) -> None:
    config = compose_config(KEY)
    assert config["networks"]["backend"]["internal"] is True
    for name in ("redis", "vllm-0", "vllm-1"):
        assert "ports" not in stack[name], name
        assert set(stack[name]["networks"]) == {"backend"}, name
    for name in ("prometheus", "grafana"):
        assert {p["host_ip"] for p in stack[name]["ports"]} == {"127.0.0.1"}, name


def test_vllm_replicas_and_retrain_reserve_a_gpu(stack: dict[str, Service]) -> None:
    for name in ("vllm-0", "vllm-1", "retrain"):
        devices = stack[name]["deploy"]["resources"]["reservations"]["devices"]
        assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])], name


def test_prometheus_scrapes_the_gateway_with_its_key_and_every_vllm(stack: dict[str, Service]) -> None:
    prometheus = stack["prometheus"]
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    mount = next(m for m in prometheus["volumes"] if m["target"] == config_file)
    scrape = yaml.safe_load(Path(mount["source"]).read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    targets = {job: {t for c in cfg["static_configs"] for t in c["targets"]} for job, cfg in jobs.items()}
    env = stack["gateway"]["environment"]
    assert targets["loragate-gateway"] == {f"gateway:{env['LORAGATE_PORT']}"}
    engines = {urlsplit(url).netloc for url in env["LORAGATE_ENGINE_URLS"].split(",")}
    assert targets["vllm"] == engines
    assert DROPS_ADAPTER_NAMES in jobs["vllm"]["metric_relabel_configs"], "vLLM's labels of adapter names: dropped"
    for name in ("gateway", "vllm-0", "vllm-1"):
        assert _shared_networks(prometheus, stack[name]), name
    # The gateway's /metrics needs the metrics key: Prometheus reads it from the Compose secret.
    auth = jobs["loragate-gateway"]["authorization"]
    secret = next(s for s in prometheus["secrets"] if auth["credentials_file"] == f"/run/secrets/{s['source']}")
    assert compose_config(KEY)["secrets"][secret["source"]]["environment"] == "LORAGATE_METRICS_KEY"
    assert env["LORAGATE_METRICS_KEY"] == KEY["LORAGATE_METRICS_KEY"]


def test_grafana_reads_prometheus_and_its_dashboards(stack: dict[str, Service]) -> None:
    grafana = stack["grafana"]
    mounts = {m["target"]: Path(m["source"]) for m in grafana["volumes"] if m["type"] == "bind"}
    datasources = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "datasources/prometheus.yml").read_text())
    url = urlsplit(datasources["datasources"][0]["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090)
    assert _shared_networks(grafana, stack["prometheus"])
    provider = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "dashboards/loragate.yml").read_text())
    dashboards = mounts[provider["providers"][0]["options"]["path"]]
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert json.loads((dashboards / home.name).read_text())["uid"]


def test_retrain_uses_the_gateways_redis_store_and_url(stack: dict[str, Service]) -> None:
    retrain, gateway = stack["retrain"]["environment"], stack["gateway"]["environment"]
    assert retrain["LORAGATE_REDIS_URL"] == gateway["LORAGATE_REDIS_URL"]
    assert retrain["LORAGATE_URL"] == f"http://gateway:{gateway['LORAGATE_PORT']}"
    assert stack["retrain"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert _shared_networks(stack["retrain"], stack["gateway"]) and _shared_networks(stack["retrain"], stack["redis"])


@pytest.mark.parametrize("image", ["gateway", "engine-cuda", "retrain"])
def test_dockerfiles_copy_only_what_their_dockerignore_lets_in(image: str) -> None:
    dockerfile = DEPLOY / "docker" / f"Dockerfile.{image}"
    allowed = [
        line[1:].rstrip("/")
        for line in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    sources = [
        src
        for line in dockerfile.read_text().splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for src in [w for w in line.split()[1:] if not w.startswith("--")][:-1]
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), src


@pytest.mark.parametrize(
    ("shell", "script"),
    [("sh", "gateway-entrypoint.sh"), ("bash", "engine-entrypoint.sh"), ("sh", "retrain-entrypoint.sh")],
)
def test_entrypoints_parse(shell: str, script: str) -> None:
    done = subprocess.run([shell, "-n", str(DEPLOY / "docker" / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _stub(folder: Path, name: str) -> None:
    """A program that prints its name and arguments, one a line, then its LORAGATE_* environment."""
    path = folder / name
    path.write_text(f'#!/bin/sh\necho {name}\nfor a in "$@"; do echo "$a"; done\necho "#env"\nenv | grep ^LORAGATE_\n')
    path.chmod(0o755)


def _argv_and_env(out: str) -> tuple[list[str], list[str]]:
    lines = out.splitlines()
    at = lines.index("#env")
    return lines[:at], lines[at + 1 :]


def _run(script: str, args: list[str], env: dict[str, str], stubs: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPLOY / "docker" / script), *args],
        env={"PATH": f"{stubs}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_gateway_entrypoint_needs_engine_urls_and_drops_empty_keys(tmp_path: Path) -> None:
    _stub(tmp_path, "loragate")
    refused = _run("gateway-entrypoint.sh", ["serve"], {}, tmp_path)
    assert refused.returncode == 64 and "LORAGATE_ENGINE_URLS is required" in refused.stderr
    env = {"LORAGATE_ENGINE_URLS": "http://vllm-0:8000", "LORAGATE_ADMIN_KEY": "", "LORAGATE_METRICS_KEY": "m"}
    cmd = _default_command(DEPLOY / "docker" / "Dockerfile.gateway")
    served = _run("gateway-entrypoint.sh", cmd, env, tmp_path)
    argv, environ = _argv_and_env(served.stdout)
    assert cmd == ["serve"] and argv == ["loragate", "serve"]
    assert "LORAGATE_METRICS_KEY=m" in environ and not any(x.startswith("LORAGATE_ADMIN_KEY") for x in environ)


@pytest.mark.parametrize("quantization", ["none", "bitsandbytes"])
def test_engine_entrypoint_runs_vllm_with_lora_and_the_compose_arguments(
    tmp_path: Path, stack: dict[str, Service], quantization: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _stub(tmp_path, "python3")
    vllm = stack["vllm-0"]
    env = {**vllm["environment"], "LORAGATE_MODEL_DIR": str(model), "LORAGATE_QUANTIZATION": quantization}
    env["LORAGATE_ADAPTER_STORE"] = str(tmp_path / "adapters")
    done = _run("engine-entrypoint.sh", vllm["command"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    argv, _ = _argv_and_env(done.stdout)
    assert argv[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    flags = dict(re.findall(r"^(--[a-z-]+)\n([^-\n][^\n]*)$", "\n".join(argv), flags=re.M))
    assert flags["--model"] == str(model) and flags["--port"] == "8000"
    assert flags["--served-model-name"] == env["LORAGATE_SERVED_MODEL_NAME"]
    assert flags["--max-lora-rank"] == env["LORAGATE_MAX_LORA_RANK"]
    assert "--enable-lora" in argv and argv[-2:] == vllm["command"]
    assert ("--quantization" in argv) == (quantization == "bitsandbytes")


@pytest.mark.parametrize(
    ("parser", "extra"), [(None, None), ("", None), ("llama3_json", " --enforce-eager , --seed=3,")]
)
def test_engine_entrypoint_starts_vllm_as_the_gateways_supervisor_does(
    tmp_path: Path, parser: str | None, extra: str | None
) -> None:
    """Without `--enable-auto-tool-choice --tool-call-parser`, vLLM refuses every request with tools: the image's
    vLLM took them on no stack the deploy files start, while the gateway's own supervisor passes them."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _stub(tmp_path, "python3")
    env = {"LORAGATE_MODEL_DIR": str(model)}
    settings: dict[str, Any] = {}
    if parser is not None:
        env["LORAGATE_ENGINE_TOOL_PARSER"] = settings["engine_tool_parser"] = parser
    if extra is not None:
        env["LORAGATE_ENGINE_EXTRA_ARGS"] = settings["engine_extra_args"] = extra
    done = _run("engine-entrypoint.sh", [], env, tmp_path)
    assert done.returncode == 0, done.stderr
    argv, _ = _argv_and_env(done.stdout)
    expected = engine_command(Settings(**settings), model, 8000)
    assert _without_address(argv[3:]) == _without_address(expected[3:])
    if parser == "":
        assert "--tool-call-parser" not in argv
    if extra is not None:
        assert argv[-2:] == ["--enforce-eager", "--seed=3"]


def _without_address(argv: list[str]) -> list[str]:
    """vLLM's arguments less where it listens and the model folder it was given (the image's own choices)."""
    kept: list[str] = []
    for arg in argv:
        if kept and kept[-1] in ("--host", "--port", "--model"):
            kept.pop()
        else:
            kept.append(arg)
    return kept


def _default_command(dockerfile: Path) -> list[str]:
    cmd: list[str] = json.loads(next(x for x in dockerfile.read_text().splitlines() if x.startswith("CMD "))[4:])
    return cmd


def _shared_networks(a: Service, b: Service) -> set[str]:
    return set(a.get("networks") or {}) & set(b.get("networks") or {})


def test_the_gateway_is_given_time_to_drain_and_write_its_last_records(stack: dict[str, Service]) -> None:
    """Docker kills a container 10 s after SIGTERM unless told otherwise: before the gateway's 25 s drain
    (LORAGATE_SHUTDOWN_TIMEOUT_S) and the records it writes last."""
    grace = stack["gateway"]["stop_grace_period"]  # as compose resolves it: "40s"
    assert grace.endswith("s") and grace[:-1].isdigit() and int(grace[:-1]) >= 35, grace
