"""What every benchmark report holds and where it goes: the machine, versions, JSON and Markdown files."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.runner import command_line, console

if TYPE_CHECKING:
    from loadtest.services import Stack


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity: int | None
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    return {
        "cores": affinity,
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    out = {}
    for name in ("loragate", "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "aiohttp", "pydantic"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        text = subprocess.run(
            [shutil.which("redis-server") or "/usr/bin/redis-server", "--version"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        out["redis-server"] = next((part[2:] for part in text.split() if part.startswith("v=")), text.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def ms(value: float, signed: bool = False) -> str:
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report_header(module: str, stack: Stack, argv: Sequence[str], load_before: Sequence[float]) -> dict[str, Any]:
    """What every benchmark report starts with: when, how it was run, on what, under what load."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command_line(module, argv),
        "gateway_command": [os.path.relpath(stack.gateway_command[0]), *stack.gateway_command[1:]],
        "machine": machine(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
    }


def publish(
    output_dir: Path,
    stem: str,
    report: dict[str, Any],
    render: Callable[[dict[str, Any]], str],
    summarise: Callable[[dict[str, Any]], None],
) -> None:
    """Write a report as JSON and Markdown (atomically), print it, and say where it went."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = render(report)
    write_atomic(output_dir / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    write_atomic(output_dir / f"{stem}.md", text)
    print(text)
    summarise(report)
    out = os.path.relpath(output_dir)
    console.print(f"wrote {out}/{stem}.md and {out}/{stem}.json in {report['wall_s']:.0f} s")
