"""What retraining costs on this CPU: training throughput, and the whole loop from feedback to a promoted canary.

1. Throughput: demo tickets with their ideal answers (TRL prompt/completion) through training.dataset
   (source=jsonl) and training.train, one epoch, with the default RetrainConfig and with demo/config.yaml:
   examples/s and tokens/s, the precision training.hardware picks, the CPU (lscpu: model, AVX2 / AVX-512).
2. The loop: two redis-servers and `loragate serve` with its own vLLM, as `make demo` starts them, then
   `python -m demo --tickets 500 --report FILE` (users and feedback, `loragate train run`, canary until the
   guard rails decide): wall time per step, from the demo's report and run.json's `seconds`. Target: from
   500 feedback events to a promoted canary in at most 10 minutes.

Writes loadtest/results/retraining.{json,md,png}; every process it starts is stopped again.

    .venv/bin/python -m loadtest.retraining                          # both parts
    .venv/bin/python -m loadtest.retraining --only throughput -n 40  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtest import engine
from loadtest.reports import machine
from loadtest.retraining_report import STEPS, earlier, publish_report
from loadtest.runner import add_common_arguments, command_line, console, run_and_clean_up
from loadtest.services import REPO, BenchError, Service

DEMO_CONFIG = REPO / "demo" / "config.yaml"
TENANT = "acme"
"""The demo's tenant (its --tenant default): its run folders are HOME/training/acme/RUN."""
PARTS = ("throughput", "loop")


@dataclass
class Config:
    examples: int = 160
    """Tickets in the throughput dataset (about 80% of them train)."""
    tickets: int = 500
    """Feedback events before retraining (`python -m demo --tickets`)."""
    canary_round: int = 40
    seed: int = 7
    target_s: float = 600.0
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    model_cache: Path = engine.DEFAULT_MODEL_CACHE
    start_timeout_s: float = 600.0
    canary_timeout_s: float = 900.0
    one_redis: bool = False
    """Completion records in the state redis-server (no LORAGATE_RECORDS_REDIS_URL) instead of their own."""


# -- the machine ---------------------------------------------------------------------------------


def cpu() -> dict[str, Any]:
    """The CPU as lscpu names it, and the vector extensions training's speed depends on."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}
    flags, here = fields.get("Flags", "").split(), machine()
    return {
        "model": fields.get("Model name") or here["cpu_model"],
        "cores": here["cores"],
        "avx2": "avx2" in flags,
        "avx512": sorted(f for f in flags if f.startswith("avx512")),
        "amx": sorted(f for f in flags if f.startswith("amx")),
    }


# -- 1. training throughput ---------------------------------------------------------------------


def ticket_jsonl(path: Path, count: int, seed: int) -> Path:
    """Demo tickets with their ideal answers as TRL prompt/completion rows (conversational)."""
    from demo.tickets import tickets

    rows = (
        {"prompt": t.messages, "completion": [{"role": "assistant", "content": t.ideal}]} for t in tickets(count, seed)
    )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_once(name: str, flags: list[str], jsonl: Path, workdir: Path, base_dir: Path) -> dict[str, Any]:
    """One epoch of `name`'s config (defaults, or the demo's YAML) on the tickets; its throughput."""
    from training import config as training_config
    from training import dataset, sources, train

    yaml_path = DEMO_CONFIG if name == "demo" else None
    config = training_config.load(yaml_path, [*flags, "--source", "jsonl", "--jsonl_path", str(jsonl)])
    card = dataset.write(dataset.build(sources.from_jsonl(jsonl), config), workdir / name / "data")
    console.print(f"[bold]{name} config[/bold]: dataset {card.splits['train']['sft']} train examples")
    result = train.train(config, workdir / name / "data", base_dir, workdir / name / "fit", progress=say)
    console.print(f"{name}: {result.examples_per_s:.2f} examples/s, {result.tokens_per_s:.0f} tokens/s")
    numbers = ("examples_per_s", "tokens_per_s", "train_examples", "steps", "train_seconds", "wall_seconds")
    return {k: round(getattr(result, k), 3) for k in numbers} | {
        "tokens_per_example": round(result.tokens_per_s / max(result.examples_per_s, 1e-9), 1),
        "precision": f"{result.device} {result.dtype}" + (" QLoRA" if result.qlora else ""),
        "config": {k: getattr(config, k) for k in ("learning_rate", "batch_size", "max_length", "lora_r")},
    }


def measure_throughput(cfg: Config, workdir: Path) -> dict[str, Any]:
    from adapters.base_model import is_prepared, prepared_dir
    from training.hardware import choose_precision

    base_dir = prepared_dir(cfg.model_cache)
    if not is_prepared(base_dir):
        raise BenchError(f"no prepared base model in {base_dir}; run `loragate model prepare` first")
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    jsonl = ticket_jsonl(workdir / "tickets.jsonl", cfg.examples, cfg.seed)
    flags = ["--epochs", "1", "--min_examples", "1"]
    precision = choose_precision()
    return {
        "examples": cfg.examples,
        "precision": f"{precision.device} {str(precision.dtype).removeprefix('torch.')}",
        "configs": {
            name: train_once(name, flags, jsonl, workdir / "throughput", base_dir) for name in ("default", "demo")
        },
    }


def say(message: str) -> None:
    console.print(f"  {message}", markup=False)


# -- 2. the loop: redis x2, the gateway and its vLLM, `python -m demo` ---------------------------


class LoopStack(engine.EngineStack):
    """What `make demo` starts (scripts/demo.sh), on free ports in a temporary folder."""

    def __init__(self, workdir: Path, gateway_env: dict[str, str], cfg: Config) -> None:
        super().__init__(
            workdir, gateway_env, engine.EngineOptions(start_timeout_s=cfg.start_timeout_s), cfg.model_cache
        )
        self.roles = (("state", "persist"),) + ((("records", "durable"),) if not cfg.one_redis else ())
        self.admin_key = "bench-admin-" + secrets.token_hex(12)
        self.demo: Service | None = None

    def start_redis(self) -> None:
        for role, mode in self.roles:
            self.start_redis_server(role, mode)
        self.redis = self.redis_servers["state"]

    def gateway_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_")} | {
            "LORAGATE_REDIS_URL": self.redis_servers["state"].url,
            "LORAGATE_HOST": "127.0.0.1", "LORAGATE_PORT": str(self.gateway_port),
            "LORAGATE_ENGINE_PORT": str(self.engine_port), "LORAGATE_HOME": str(self.home),
            "LORAGATE_MODEL_CACHE": str(self.model_cache), "LORAGATE_ADMIN_KEY": self.admin_key,
            "LORAGATE_GUARD_RAILS_S": "2", "LORAGATE_LOG_LEVEL": "warning", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        }  # fmt: skip
        if "records" in self.redis_servers:
            env["LORAGATE_RECORDS_REDIS_URL"] = self.redis_servers["records"].url
        return env | self.extra_gateway_env

    def stop(self) -> None:
        if self.demo is not None and self.demo.proc.poll() is None:  # the demo and its `loragate train run`
            try:
                os.killpg(self.demo.proc.pid, signal.SIGTERM)
                self.demo.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.demo.proc.pid, signal.SIGKILL)
        super().stop()


def run_demo(stack: LoopStack, cfg: Config, report: Path) -> int:
    """`python -m demo` against the stack, its output shown as it comes; its exit code."""
    url = f"http://127.0.0.1:{stack.gateway_port}"
    command = [
        sys.executable, "-m", "demo", "--url", url, "--tickets", str(cfg.tickets), "--seed", str(cfg.seed),
        "--canary-round", str(cfg.canary_round), "--timeout", str(cfg.canary_timeout_s), "--report", str(report),
    ]  # fmt: skip
    stack.demo = stack._spawn("demo", command, {**stack.gateway_env(), "COLUMNS": "150"})
    started, shown = time.monotonic(), 0
    while True:
        done = stack.demo.proc.poll() is not None
        text = stack.demo.log.read_text(errors="replace")
        lines = text[shown:].split("\n")
        complete = lines if done else lines[:-1]
        for line in complete:
            last = next((part.rstrip() for part in reversed(line.split("\r")) if part.strip()), "")
            if last:
                console.print(f"{time.monotonic() - started:6.0f} s  {last}", markup=False, highlight=False)
        shown += sum(len(line) + 1 for line in complete)
        if done:
            return stack.demo.proc.returncode
        time.sleep(0.5)


def breakdown(demo: dict[str, Any], run: dict[str, Any]) -> dict[str, float]:
    """Seconds per step (STEPS), from the demo's phases and the retraining run's own step times."""
    phases, steps = demo.get("seconds", {}), run.get("seconds", {})
    out = {"users": phases.get("setup", 0.0) + phases.get("users", 0.0)}
    out |= {step: float(steps.get(step, 0.0)) for step in ("dataset", "fit", "eval", "publish")}
    out["train CLI"] = max(phases.get("retrain", 0.0) - sum(steps.values()), 0.0)
    out["canary"] = phases.get("canary", 0.0)
    return {k: round(out[k], 1) for k in STEPS}


def measure_loop(stack: LoopStack, cfg: Config) -> dict[str, Any]:
    stack.start_redis()
    with console.status("starting the gateway and its vLLM (about a minute or two)"):
        t0 = time.monotonic()
        stack.start_gateway()
        startup_s = time.monotonic() - t0
    console.print(f"gateway :{stack.gateway_port}, vLLM :{stack.engine_port}, ready in {startup_s:.0f} s")
    report_path = stack.workdir / "demo-report.json"
    code = run_demo(stack, cfg, report_path)
    if not report_path.is_file():
        raise BenchError(f"python -m demo exited with {code} and wrote no report")
    demo = json.loads(report_path.read_text())
    runs = sorted((stack.home / "training" / TENANT).glob("*/run.json"))
    run = json.loads(runs[-1].read_text()) if runs else {}
    steps = breakdown(demo, run)
    loop_s = sum(v for k, v in steps.items() if k != "users")
    promoted = demo.get("status") == "promoted"
    return {
        "startup_s": round(startup_s, 1),
        "redis_servers": len(stack.redis_servers),
        "demo_exit_code": code,
        "demo": demo,
        "steps_s": steps,
        "loop_s": round(loop_s, 1),
        "with_users_s": round(loop_s + steps["users"], 1),
        "promoted": promoted,
        "verdict": "PASS" if promoted and loop_s <= cfg.target_s else "FAIL",
        "canary_round": cfg.canary_round,
        "run": {k: run.get(k) for k in ("run_id", "seconds", "train", "data_card", "eval", "published", "canary")},
    }


# -- entry point --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    d = Config()
    parser = argparse.ArgumentParser(prog="python -m loadtest.retraining", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--examples", type=int, default=d.examples, help="Tickets for the throughput part.")
    parser.add_argument("--tickets", type=int, default=d.tickets, help="Feedback events before retraining.")
    parser.add_argument("--canary-round", type=int, default=d.canary_round, help="Tickets per canary round.")
    parser.add_argument("--seed", type=int, default=d.seed, help="Seed of the tickets.")
    parser.add_argument("--target", type=float, default=d.target_s, help="Target seconds for the loop.")
    parser.add_argument("--only", choices=PARTS, help="Run one part only.")
    parser.add_argument("--model-cache", type=Path, default=d.model_cache, help="Where the prepared base model is.")
    parser.add_argument("--start-timeout", type=float, default=d.start_timeout_s, help="Seconds for vLLM to start.")
    parser.add_argument("--canary-timeout", type=float, default=d.canary_timeout_s, help="Seconds for the canary.")
    parser.add_argument("--one-redis", action="store_true", help="Records in the state redis-server, not their own.")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("examples", "tickets", "canary_round"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = Config(
        examples=args.examples, tickets=args.tickets, canary_round=args.canary_round, seed=args.seed,
        target_s=args.target, parts=[args.only] if args.only else list(PARTS), model_cache=args.model_cache,
        start_timeout_s=args.start_timeout, canary_timeout_s=args.canary_timeout, one_redis=args.one_redis,
    )  # fmt: skip
    started, load_before = time.monotonic(), os.getloadavg()
    others = len(engine.vllm_servers())
    workdir = Path(tempfile.mkdtemp(prefix="loragate-bench-retraining-"))
    stack = LoopStack(workdir, dict(item.split("=", 1) for item in args.gateway_env), cfg)

    def body() -> None:
        report: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": command_line("loadtest.retraining", argv),
            "machine": machine(),
            "cpu": cpu(),
            "config": asdict(cfg) | {"model_cache": str(cfg.model_cache)},
            "load_average_before": list(load_before),
            "other_vllm_servers": others,
        }
        if "throughput" in cfg.parts:
            report["throughput"] = measure_throughput(cfg, workdir)
        if "loop" in cfg.parts:
            report["loop"] = measure_loop(stack, cfg)
        report |= {"load_average_after": list(os.getloadavg()), "wall_s": round(time.monotonic() - started, 1)}
        report |= earlier(args.output_dir, [part for part in PARTS if part not in cfg.parts])
        publish_report(args.output_dir, report)
        if report.get("loop", {}).get("demo_exit_code"):
            raise BenchError(f"python -m demo exited with {report['loop']['demo_exit_code']} (see demo.log below)")

    return run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
