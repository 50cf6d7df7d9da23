"""LiteLLM's proxy, the gateway people would otherwise pick, set up for the comparison.

It lives in its own virtual environment, `.venv-litellm` (ignored by git), made by the benchmark the
first time with `python -m venv` and `pip install 'litellm[proxy]'` from PyPI. Its config has one model,
`mock-model`, as an OpenAI-compatible `openai/` model whose `api_base` is the mock upstream, a master key
and no database; no callbacks, no telemetry, and `LITELLM_OFFLINE_MODE` so it fetches nothing at start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loadtest.runner import console
from loadtest.services import MODEL, REPO, BenchError, Service, Stack, free_port

VENV = REPO / ".venv-litellm"
REQUIREMENT = "litellm[proxy]"
MASTER_KEY = "sk-loragate-bench-master"


def executable() -> Path:
    return VENV / "bin" / "litellm"


def ensure_installed() -> str:
    """Make `.venv-litellm` with LiteLLM's proxy unless it is there; returns LiteLLM's version."""
    if not executable().exists():
        console.print(f"installing {REQUIREMENT} into {os.path.relpath(VENV)} (once; a few minutes)")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=300)
            pip = [str(VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", REQUIREMENT]
            subprocess.run(pip, check=True, timeout=1800, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"could not install {REQUIREMENT} into {VENV}: {exc}") from exc
    return version()


def version() -> str:
    probe = "from importlib.metadata import version; print(version('litellm'))"
    result = subprocess.run(
        [str(VENV / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout.strip() or "?"


def config(upstream: str) -> dict[str, object]:
    """The proxy's config.yaml (written as JSON, which YAML reads as it is)."""
    return {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {"model": f"openai/{MODEL}", "api_base": f"{upstream}/v1", "api_key": "sk-mock"},
            }
        ],
        "litellm_settings": {
            "telemetry": False,
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
            "set_verbose": False,
        },
        "general_settings": {"master_key": MASTER_KEY},
    }


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LITELLM", "DATABASE_URL", "OPENAI"))}
    env.update(
        {
            "LITELLM_OFFLINE_MODE": "true",  # no model cost map or other fetches at start (no network here)
            "LITELLM_LOCAL_MODEL_COST_MAP": "true",
            "LITELLM_LOG": "ERROR",
            "VIRTUAL_ENV": str(VENV),
            "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


def start(stack: Stack, name: str, workers: int) -> Service:
    """`litellm --config ... --num_workers N` on a free port, ready when /health/liveliness answers."""
    port = free_port()
    path = stack.workdir / f"{name}.yaml"
    path.write_text(json.dumps(config(f"http://127.0.0.1:{stack.mock_port}"), indent=2) + "\n")
    command = [str(executable()), "--config", str(path), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--num_workers", str(workers)]
    return stack.start_http(name, command, port, "/health/liveliness", environment())
