"""`python -m loadtest.engine_cores`: two vLLM replicas on one CPU host, each on its own cores vs vLLM's binding.

Why the engine supervisor gives each replica its own cores (gateway.engine.supervisor.cpu_shares): vLLM's
`VLLM_CPU_OMP_THREADS_BIND=auto` binds every server to the same cores (a NUMA node's, but the last), so two
replicas share them while the rest of the host waits. The supervisor (`EngineSupervisor`, as `loragate serve`
runs it with `LORAGATE_ENGINE_REPLICAS=2`) starts both replicas once with `auto` set by the operator (kept
as it is: the baseline) and once with its own shares; requests alternate between the replicas, measured the
same way in the same run:

- throughput: 16 concurrent requests of exactly 32 tokens (`ignore_eos`), base model and a rank-16 adapter;
- a prefill burst: 100 concurrent requests of 1 token;
- one request of 64 tokens, alone.

Writes loadtest/results/engine_cores.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway.engine.capabilities import engine_dtype, probe
from gateway.engine.supervisor import EngineSupervisor
from gateway.settings import Settings
from loadtest.engine_dtype import MODEL, measure_shapes, plot, publish, render
from loadtest.services import free_port_pair

BIND = "VLLM_CPU_OMP_THREADS_BIND"
VARIANTS = {"vllm_auto": "vLLM auto", "own_cores": "own cores"}
TITLE = "Two vLLM replicas on one CPU host: vLLM's auto binding vs a share of cores each (tokens/s of both)"


async def bench_variant(variant: str, adapter: Path, workdir: Path) -> dict[str, Any]:
    if variant == "vllm_auto":
        os.environ[BIND] = "auto"
    else:
        os.environ.pop(BIND, None)
    home = workdir / variant
    settings = Settings(
        home=home, engine_port=free_port_pair(), engine_replicas=2, served_model_name="base", max_lora_rank=16
    )
    caps = probe(str(settings.engine_python or sys.executable))
    supervisor = EngineSupervisor(settings, MODEL, engine_dtype(settings.engine_dtype, settings.quantization, caps))
    started = time.monotonic()
    await supervisor.start()
    try:
        result: dict[str, Any] = {"startup_s": round(time.monotonic() - started, 1), "cores": cores_of(home)}
        async with httpx.AsyncClient(timeout=60) as client:
            for url in supervisor.urls:
                load = {"lora_name": "lora", "lora_path": str(adapter)}
                (await client.post(f"{url}/v1/load_lora_adapter", json=load)).raise_for_status()
        return result | await measure_shapes(variant, supervisor.urls)
    finally:
        await supervisor.stop()


def cores_of(home: Path) -> list[str]:
    """The cores each replica's vLLM says it bound its threads to."""
    found = []
    for log in sorted((home / "logs").glob("vllm-*.log")):
        match = re.search(r"core ids=\[([0-9, ]*)\]", log.read_text(errors="replace"))
        found.append(match.group(1) if match else "?")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m loadtest.engine_cores", description=__doc__)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    started = time.monotonic()
    chosen = os.environ.get(BIND)
    try:
        with tempfile.TemporaryDirectory(prefix="loragate-cores-") as scratch:
            workdir = Path(scratch)
            adapter = make_adapter(workdir / "adapter", BaseModelSpec.from_folder(MODEL, "base"), seed=7, rank=16)
            results = {variant: asyncio.run(bench_variant(variant, adapter, workdir)) for variant in VARIANTS}
    finally:
        os.environ.pop(BIND, None)
        if chosen is not None:
            os.environ[BIND] = chosen
    report = publish("engine_cores", argv, results, started, args.output_dir, markdown)
    plot(report, args.output_dir / "engine_cores.png", "Two vLLM replicas by CPU binding", VARIANTS)
    return 0


def markdown(report: dict[str, Any]) -> str:
    cores = {variant: " / ".join(report["results"][variant]["cores"]) for variant in VARIANTS}
    note = f"Cores each replica bound its threads to: {cores['vllm_auto']} (auto); {cores['own_cores']} (own shares)."
    return render(report, TITLE, VARIANTS, [note])


if __name__ == "__main__":
    sys.exit(main())
