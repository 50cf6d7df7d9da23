"""Running one benchmark: its common options, its event loop, its progress bars, and stopping everything it
started."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from gateway.event_loop import event_loop_factory as event_loop_factory  # the gateway's own loop, for the clients
from loadtest.services import HERE, BenchError, Stack

console = Console(stderr=True, highlight=False)
C = TypeVar("C")


def key_value(item: str) -> str:
    """An argparse `type` for --gateway-env: KEY=VALUE with a non-empty KEY (kept as given)."""
    key, sep, _ = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"needs KEY=VALUE with a non-empty KEY, got {item!r}")
    return item


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark has: where results go, extra gateway settings, keeping the logs."""
    parser.add_argument("--output-dir", type=Path, default=HERE / "results", help="Where the results go.")
    parser.add_argument(
        "--gateway-env",
        action="append",
        type=key_value,
        default=[],
        metavar="KEY=VALUE",
        help="Extra environment for the gateway, e.g. LORAGATE_LOG_LEVEL=warning (repeatable).",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="Keep the temporary folder with the logs.")


def parse_config(prog: str, description: str, config: type[C], argv: Sequence[str]) -> tuple[C, argparse.Namespace]:
    """A benchmark's config dataclass from its command line: an option for every field (its `metadata["help"]`;
    a tuple field takes one or more values), and the common options. A config that refuses its values (a
    ValueError) is a usage error."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        default: Any = f.default
        many = isinstance(default, tuple)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(default[0] if many else default), nargs="+" if many else None,
            default=default, help=f.metadata["help"],
        )  # fmt: skip
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    try:
        cfg = config(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})
    except ValueError as exc:
        parser.error(str(exc))
    return cfg, args


def command_line(module: str, argv: Sequence[str]) -> str:
    """How to run the benchmark `module` again with the same arguments."""
    exe = os.path.relpath(sys.executable)
    if exe.startswith(".."):
        exe = sys.executable
    return shlex.join([exe, "-m", module, *argv])


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run like Ctrl-C, so the cleanup below always runs."""

    def handler(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def progress_bar(width: int = 34, refresh_per_second: float = 4) -> Progress:
    """Progress bars on the console: a description padded to `width`, the bar, done / total, time elapsed."""
    columns = (TextColumn(f"{{task.description:<{width}}}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, refresh_per_second=refresh_per_second)


class Ticker:
    """Advances a progress bar in batches, so drawing costs the client next to nothing."""

    def __init__(self, progress: Progress, task: TaskID, every: int = 50) -> None:
        self.progress, self.task, self.every, self.pending = progress, task, every, 0

    def tick(self) -> None:
        self.pending += 1
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.progress.advance(self.task, self.pending)
            self.pending = 0


def run_and_clean_up(stack: Stack, workdir: Path, keep_workdir: bool, body: Callable[[], None]) -> int:
    """Run one benchmark; whatever happens (errors, Ctrl-C, SIGTERM), stop every process it started and
    remove its folder. Returns the exit code."""
    code = 1
    with terminate_as_interrupt():
        try:
            body()
            code = 0
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]; stopping everything")
            code = 130
        except BenchError as exc:
            console.print(f"[red]error:[/red] {exc}")
            console.print(stack.logs())
        except (TimeoutError, OSError, ValueError, KeyError, subprocess.SubprocessError, aiohttp.ClientError) as exc:
            console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
            console.print(stack.logs())
        finally:
            # A second Ctrl-C (or SIGTERM) during cleanup must not leave processes behind.
            signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
            try:
                with console.status("stopping every process the benchmark started"):
                    stack.stop()
                if keep_workdir:
                    console.print(f"kept {workdir}")
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
            finally:
                for sig, old in previous.items():
                    signal.signal(sig, old)
    return code
