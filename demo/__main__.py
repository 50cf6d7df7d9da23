"""`python -m demo` (what `make demo` runs, against the stack it starts): the whole loop, for real.

1. a tenant `acme` whose alias `support-bot` serves the base model;
2. simulated users send support tickets through the OpenAI SDK and rate every answer through the
   feedback API, correcting the ones they reject (the base does not know the answer template);
3. `loragate train run` builds the dataset, trains an adapter, gates it through the gateway against
   the base, publishes it and starts a canary on `support-bot`;
4. the users go on; the canary's guard rails promote the new version (or roll it back).
It prints the before/after metric table (from the run) and the canary's verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from demo import simulate
from demo.tickets import tickets

CONFIG = Path(__file__).with_name("config.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("LORAGATE_URL", "http://127.0.0.1:8090"))
    parser.add_argument("--admin-key", default=os.environ.get("LORAGATE_ADMIN_KEY"))
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--alias", default="support-bot")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="The base model's name.")
    parser.add_argument("--tickets", type=int, default=200, help="Tickets before retraining.")
    parser.add_argument("--canary-round", type=int, default=40, help="Tickets per round while the canary runs.")
    parser.add_argument("--concurrency", type=int, default=8, help="Users waiting for an answer at once.")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--config", type=Path, default=CONFIG, help="The retraining config (YAML).")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds the canary may take to be decided.")
    parser.add_argument("--report", type=Path, help="Also write each phase's wall time and the outcome here (JSON).")
    return parser


class Phases:
    """Wall time of each phase of the loop and what it ended with, for --report (loadtest.retraining)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.outcome: dict[str, Any] = {}
        self._last = time.monotonic()

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(now - self._last, 2)
        self._last = now

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({"seconds": self.seconds, **self.outcome}, indent=2) + "\n")


def _loragate(*args: str) -> None:
    print(f"\n$ loragate {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "gateway", *args], check=False)
    if done.returncode:
        raise SystemExit(f"loragate {args[0]} {args[1]} failed ({done.returncode})")


async def _canary(admin: httpx.AsyncClient, tenant: str) -> str | None:
    listed = (await admin.get(f"/admin/tenants/{tenant}/experiments")).json()["data"]
    running = [e["name"] for e in listed if e["status"] == "running" and e["name"].startswith("retrain-")]
    return running[-1] if running else None


async def run(options: argparse.Namespace) -> int:
    phases = Phases()
    try:
        return await _loop(options, phases)
    finally:
        if options.report:
            phases.write(options.report)


async def _loop(options: argparse.Namespace, phases: Phases) -> int:
    headers = {"Authorization": f"Bearer {options.admin_key}"}
    async with httpx.AsyncClient(base_url=options.url, headers=headers, timeout=60) as admin:
        key = await simulate.open_tenant(admin, options.tenant, options.alias, options.model)
        print(f"tenant {options.tenant}: alias {options.alias} -> {options.model}", flush=True)
        phases.lap("setup")
        before = await simulate.users(
            options.url, key, options.alias, tickets(options.tickets, options.seed), options.concurrency
        )
        print(f"before retraining, users accepted {before.line()}", flush=True)
        phases.lap("users")
        phases.outcome.update(tickets=options.tickets, before=before.line(), errors=before.errors)
        await asyncio.to_thread(
            _loragate, "train", "run", "--tenant", options.tenant, "--alias", options.alias,
            "--config", str(options.config), "--gateway-url", options.url,
        )  # fmt: skip
        phases.lap("retrain")
        canary = await _canary(admin, options.tenant)
        phases.outcome.update(canary=canary, canary_rounds=[])
        if canary is None:
            print("no canary: the candidate did not pass the eval gate", flush=True)
            return 1

        async def traffic(round_: int) -> None:
            batch = tickets(options.canary_round, options.seed + 1 + round_)
            seen = await simulate.users(options.url, key, options.alias, batch, options.concurrency, f"c{round_}")
            print(f"canary round {round_ + 1}: users accepted {seen.line()}", flush=True)
            phases.outcome["canary_rounds"].append(seen.line())

        decided = await simulate.until_decided(admin, options.tenant, canary, traffic, options.timeout)
        phases.lap("canary")
        phases.outcome["status"] = decided["status"]
    await asyncio.to_thread(_loragate, "experiments", "show", canary, "--tenant", options.tenant)
    promoted = decided["status"] == "promoted"
    target = next(a["target"] for a in decided["arms"] if a["name"] == "candidate")
    phases.outcome["candidate"] = target
    outcome = f"promoted: {options.alias} now serves {target}" if promoted else f"not promoted ({decided['status']})"
    print(f"\ncanary {canary}: {outcome}", flush=True)
    return 0 if promoted else 1


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    if not options.admin_key:
        raise SystemExit("set LORAGATE_ADMIN_KEY or --admin-key (the gateway's admin key)")
    return asyncio.run(run(options))


if __name__ == "__main__":
    sys.exit(main())
