"""What recording costs: the completion log's writer, a gateway with recording on vs off, and feedback.

One run starts a plain and a `durable` redis-server (AOF, `appendfsync always`, as the records Redis
runs) with scripts/redis.sh, the mock upstream and five `loragate serve`, and measures, each figure
against a baseline taken in the same run:

1. the `Recorder`, in this process: N realistic chat records into each Redis, with the tenant's
   redaction on (all PII kinds), off, and content off, and redaction on for 8-turn conversations (each
   request carrying the turns before it), each built and written by one record process, and redaction on
   again with `--record-workers` of them (2): events/s (target >= 20,000);
2. C concurrent non-stream requests through gateways with `LORAGATE_RECORD_COMPLETIONS=false` and
   with it on (two processes each, same mock, same Redis), ABBA segments, at 16 and 64 clients: requests/s
   (target: at most 5% lower, at 64: the gateway's capacity);
3. `POST /v1/feedback` latency where the records Redis fsyncs (200) and where it does not (the local
   fsynced spool, 202), sequential and concurrent, with `GET /healthz` as the floor.

Writes loadtest/results/records.{json,md,png}; stops every process it started, whatever happens.

    .venv/bin/python -m loadtest.records              # the defaults: about 2-3 minutes on 2 cores
    .venv/bin/python -m loadtest.records -n 2000 -d 2  # quick
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest.records_report import markdown, plot, print_summary
from loadtest.records_run import METRICS_KEY, gateway_benches, recorder_bench, start_gateways
from loadtest.reports import publish, report_header, versions
from loadtest.runner import add_common_arguments, console, event_loop_factory, progress_bar, run_and_clean_up
from loadtest.services import BenchError, Service, Stack, free_port


@dataclass
class Config:
    events: int
    duration_s: float
    segments: int
    concurrency: tuple[int, ...]
    feedback: int
    feedback_concurrency: int
    record_workers: int


# -- processes: redis-servers from scripts/redis.sh, several gateways
class RecordsStack(Stack):
    """services.Stack with a plain and a durable redis-server (scripts/redis.sh) and several named gateways."""

    def redis_url(self, mode: str) -> str:
        return self.redis_servers[mode].url

    def redis_pid(self, mode: str) -> int:
        return self.redis_servers[mode].pid or 0

    def start_redis_servers(self) -> None:
        """The gateways' state in `plain` (no persistence: keys, tenants, quotas), and a `durable` one (AOF,
        appendfsync always)."""
        self.redis = self.start_redis_server("plain", "plain")
        self.start_redis_server("durable", "durable")

    def spawn_gateway(self, name: str, env: dict[str, str]) -> tuple[Service, int]:
        self.gateway_port = port = free_port()
        command = self.loragate_command()
        home = str(self.workdir / f"home-{name}")
        full_env = {**self.gateway_env(), "LORAGATE_HOME": home, "LORAGATE_METRICS_KEY": METRICS_KEY, **env}
        return self._spawn(name, command, full_env), port


def filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on (what an fsync costs depends on it)."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    found = [(len(mount), kind) for mount, kind in mounts if str(path.resolve()).startswith(mount)]
    return max(found)[1] if found else "?"


# -- entry point
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.records", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--events", type=int, default=30_000, help="Recorder events per Redis and policy.")
    parser.add_argument("-d", "--duration", type=float, default=15.0, help="Seconds of load per side and concurrency.")
    parser.add_argument("--segments", type=int, default=3, help="Load segments per gateway process, alternating.")
    parser.add_argument(
        "-c", "--concurrency", type=int, nargs="+", default=[16, 64],
        help="Concurrent clients of the requests/s part, one run each (the drop is judged at the highest).",
    )  # fmt: skip
    parser.add_argument("-f", "--feedback", type=int, default=500, help="Feedback requests per target and phase.")
    parser.add_argument("--feedback-concurrency", type=int, default=8, help="Concurrent feedback clients.")
    parser.add_argument(
        "--record-workers", type=int, default=2, help="Record processes of the recorder's extra run (1: none)."
    )
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    counts = (args.events, args.segments, *args.concurrency, args.feedback_concurrency, args.record_workers)
    if min(counts) < 1 or args.feedback < 2:
        parser.error("counts must be at least 1 (--feedback at least 2)")
    if args.duration <= 0 or any("=" not in item for item in args.gateway_env):
        parser.error("--duration must be > 0, and --gateway-env KEY=VALUE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = Config(
        args.events, args.duration, args.segments, tuple(args.concurrency), args.feedback, args.feedback_concurrency,
        args.record_workers,
    )  # fmt: skip
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    started, load_before = time.monotonic(), os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="loragate-records-"))
    stack = RecordsStack(workdir, extra_env)

    def body() -> None:
        with console.status("starting redis-servers (plain, durable)"):
            stack.start_redis_servers()
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            with progress_bar() as progress:
                recorder = runner.run(recorder_bench(stack, cfg, progress))
            with console.status("starting the mock upstream and five gateways"):
                gateways = start_gateways(stack, extra_env)
            with progress_bar() as progress:
                results = runner.run(gateway_benches(stack, gateways, cfg, progress))
        if any(service.proc.poll() is not None for service, _ in gateways.values()):
            raise BenchError("a gateway exited during the run")
        report = {
            **report_header("loadtest.records", stack, argv, load_before),
            "filesystem": filesystem(workdir),
            "versions": versions(),
            "config": {**asdict(cfg), "env": extra_env},
            "recorder": recorder,
            **results,
            "wall_s": round(time.monotonic() - started, 1),
        }
        publish(args.output_dir, "records", report, markdown, print_summary)
        plot(report, args.output_dir / "records.png")

    return run_and_clean_up(stack, workdir, args.keep_workdir, body)


if __name__ == "__main__":
    sys.exit(main())
