"""`python -m loadtest.engine_dtype`: vLLM on this CPU in bf16 and in float32, with and without LoRA.

Why `LORAGATE_ENGINE_DTYPE=auto` picks float32 on CPUs without native bf16: one real vLLM per dtype,
started straight (no gateway), each measured the same way in the same run:

- throughput: 16 concurrent requests of exactly 32 tokens (`ignore_eos`), base model and a rank-16 adapter;
- a prefill burst: 100 concurrent requests of 1 token;
- one request of 64 tokens, alone.

Writes loadtest/results/engine_dtype.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway.engine.capabilities import probe
from loadtest import reports
from loadtest.reports import machine
from loadtest.runner import command_line
from loadtest.services import free_port

MODEL = Path(os.environ.get("LORAGATE_MODEL_CACHE") or Path.home() / ".cache/loragate/models") / "SmolLM2-135M-Instruct"
PROMPT = [{"role": "user", "content": "Tell me about the sea."}]
SHAPES = {"throughput": (16, 32), "burst": (100, 1), "single": (1, 64)}
"""name: (concurrent requests, tokens each)."""
DTYPES = {"bfloat16": "bf16", "float32": "float32"}
TITLE = "vLLM on this CPU: bf16 vs float32"


def start_vllm(dtype: str, adapter: Path, log: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL)]
    command += ["--served-model-name", "base", "--port", str(port), "--enable-lora", "--max-lora-rank", "16"]
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--dtype", dtype], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() - started > 900:
                raise RuntimeError(f"vLLM ({dtype}) did not start; see {log}")
            time.sleep(0.5)
        seconds = time.monotonic() - started
        load = {"lora_name": "lora", "lora_path": str(adapter)}
        httpx.post(f"{url}/v1/load_lora_adapter", json=load).raise_for_status()
    except BaseException:
        stop_vllm(proc)
        raise
    return proc, url, seconds


def stop_vllm(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def measure(urls: list[str], model: str, concurrent: int, tokens: int) -> dict[str, float]:
    """`concurrent` requests of exactly `tokens` tokens at once, taking turns over `urls`."""
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=900) as client:
        started = time.perf_counter()
        answers = await asyncio.gather(
            *(client.post(f"{urls[i % len(urls)]}/v1/chat/completions", json=body) for i in range(concurrent))
        )
        seconds = time.perf_counter() - started
    for answer in answers:
        answer.raise_for_status()
    generated = sum(answer.json()["usage"]["completion_tokens"] for answer in answers)
    return {"seconds": round(seconds, 2), "tokens": generated, "tokens_per_s": round(generated / seconds, 1)}


async def measure_shapes(label: str, urls: list[str]) -> dict[str, Any]:
    """Every shape of SHAPES, base model and adapter `lora`, after a warm-up."""
    await measure(urls, "base", 4, 4)
    result: dict[str, Any] = {}
    for model in ("base", "lora"):
        for shape, (concurrent, tokens) in SHAPES.items():
            result[f"{model}_{shape}"] = await measure(urls, model, concurrent, tokens)
            print(label, model, shape, result[f"{model}_{shape}"], flush=True)
    return result


def bench_dtype(dtype: str, adapter: Path, workdir: Path) -> dict[str, Any]:
    proc, url, startup = start_vllm(dtype, adapter, workdir / f"vllm-{dtype}.log")
    try:
        return {"startup_s": round(startup, 1), **asyncio.run(measure_shapes(dtype, [url]))}
    finally:
        stop_vllm(proc)


def machine_line(report: dict[str, Any]) -> str:
    return f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores, {report['cpu_kind']}"


def render(report: dict[str, Any], title: str, variants: dict[str, str], notes: Sequence[str] = ()) -> str:
    """Tokens/s of the two `variants` (result key: column) for every shape, and the second / the first."""
    (first, a_label), (second, b_label) = variants.items()
    a_results, b_results = report["results"][first], report["results"][second]
    lines = [f"# {title}", "", f"{report['date']} · `{report['command']}` · {machine_line(report)}", ""]
    lines += [*(f"{note}\n" for note in notes)]
    lines += [f"| measure | {a_label} | {b_label} | {b_label} / {a_label} |", "|---|---:|---:|---:|"]
    for model in ("base", "lora"):
        for shape, (concurrent, tokens) in SHAPES.items():
            a, b = a_results[f"{model}_{shape}"]["tokens_per_s"], b_results[f"{model}_{shape}"]["tokens_per_s"]
            label = f"{model}, {concurrent} x {tokens} tokens, tokens/s"
            lines.append(f"| {label} | {a:.1f} | {b:.1f} | **{b / a:.2f}x** |")
    lines.append(f"| start-up, s | {a_results['startup_s']} | {b_results['startup_s']} | |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path, title: str, variants: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{m} {c}x{t}" for m in ("base", "lora") for c, t in SHAPES.values()]
    keys = [f"{m}_{s}" for m in ("base", "lora") for s in SHAPES]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.4
    for i, (variant, label) in enumerate(variants.items()):
        values = [report["results"][variant][k]["tokens_per_s"] for k in keys]
        ax.bar([x + (i - 0.5) * width for x in range(len(keys))], values, width, label=label)
    ax.set_xticks(range(len(keys)), labels, rotation=20)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{title}: {machine_line(report)}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def publish(
    name: str,
    argv: Sequence[str],
    results: dict[str, Any],
    started: float,
    output_dir: Path,
    render_md: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """The report of `loadtest.NAME`, written to output_dir/NAME.{json,md} and printed (the plot is the caller's)."""
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "command": command_line(f"loadtest.{name}", argv),
        "machine": machine(),
        "cpu_kind": probe().cpu_kind,
        "results": results,
        "wall_s": round(time.monotonic() - started),
    }
    reports.publish(output_dir, name, report, render_md, lambda _: None)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m loadtest.engine_dtype", description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="loragate-dtype-") as scratch:
        workdir = Path(scratch)
        base = BaseModelSpec.from_folder(MODEL, "base")
        adapter = make_adapter(workdir / "adapter", base, seed=7, rank=16)
        results = {dtype: bench_dtype(dtype, adapter, workdir) for dtype in DTYPES}
    report = publish("engine_dtype", argv, results, started, args.output_dir, lambda r: render(r, TITLE, DTYPES))
    plot(report, args.output_dir / "engine_dtype.png", "vLLM by dtype", DTYPES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
