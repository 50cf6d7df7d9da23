"""`loragate serve` and `loragate model prepare`: what runs the gateway and its engines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gateway import heap
from gateway.cli.common import console, fail, progress
from gateway.event_loop import event_loop_factory
from gateway.ports import taken, url_host
from gateway.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gateway.engine.capabilities import EngineCapabilities
    from gateway.engine.supervisor import EngineSupervisor

model_app = typer.Typer(help="The base model.", no_args_is_help=True)


def base_folder(settings: Settings) -> Path:
    """The unquantised base model folder (prepared on first use): adapters are validated against it."""
    from adapters.base_model import PrepareError, is_prepared, prepare, prepared_dir

    if settings.model_dir is not None:
        return settings.model_dir
    if is_prepared(prepared_dir(settings.models_root)):
        return prepared_dir(settings.models_root)
    try:
        with progress("preparing the default model") as step:
            return prepare(settings.models_root, step)
    except PrepareError as exc:
        raise fail(str(exc)) from exc


def _check_engine(settings: Settings) -> EngineCapabilities:
    """Refuse, before any engine starts or any copy is built, a quantisation the engine cannot run here."""
    from gateway.engine.capabilities import ProbeFailed, needs_kernel_probe, probe, quantization_problem

    try:
        with progress("checking what this machine's vLLM can run"):
            caps = probe(settings.engine_python, kernels=needs_kernel_probe(settings.quantization))
    except ProbeFailed as exc:
        raise fail(str(exc)) from exc
    if problem := quantization_problem(settings.quantization, caps, settings.engine_dtype):
        raise fail(problem)
    console.log(f"engine: vLLM {caps.vllm} ({caps.device}); CPU {caps.cpu_kind}")
    return caps


def _serving_folder(settings: Settings, base: Path) -> Path:
    """What vLLM loads: the base itself (bitsandbytes quantises it while loading), or its W4A16 copy (built once)."""
    if settings.quantization != "w4a16":
        return base
    from adapters.quantize import quantize_w4a16

    with progress("quantising the base model to 4-bit") as step:
        return quantize_w4a16(base, base.with_name(f"{base.name}-w4a16"), progress=step)


@model_app.command("prepare")
def model_prepare(
    quantization: Annotated[
        str | None, typer.Option(help="none | w4a16 | bitsandbytes (default LORAGATE_QUANTIZATION)")
    ] = None,
) -> None:
    """Convert the bundled SmolLM2-135M-Instruct GGUF to a bf16 safetensors folder (once), and its
    4-bit copy with --quantization w4a16. Prints the folder vLLM serves."""
    settings = Settings(**({"quantization": quantization} if quantization else {}))  # type: ignore[arg-type]
    if settings.quantization != "none" and not settings.engine_urls:
        _check_engine(settings)
    typer.echo(str(_serving_folder(settings, base_folder(settings))))


def serve(
    port: Annotated[int | None, typer.Option(help="Port (default LORAGATE_PORT or 8080).")] = None,
    host: Annotated[str | None, typer.Option(help="Address (default LORAGATE_HOST or 127.0.0.1).")] = None,
) -> None:
    """Run the gateway; without LORAGATE_ENGINE_URLS, also start and supervise vLLM."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    heap.steady()
    overrides = {k: v for k, v in {"port": port, "host": host}.items() if v is not None}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    _logging(settings)
    _refuse_taken_ports(settings)
    validation_model: Path | None = settings.model_dir
    supervisor: EngineSupervisor | None = None
    if not settings.engine_urls:
        from gateway.engine.capabilities import engine_dtype
        from gateway.engine.supervisor import EngineSupervisor

        if settings.engine_python and not os.access(settings.engine_python, os.X_OK):
            raise fail(f"LORAGATE_ENGINE_PYTHON {settings.engine_python} is not an executable")
        caps = _check_engine(settings)
        validation_model = base_folder(settings)
        dtype = engine_dtype(settings.engine_dtype, settings.quantization, caps)
        supervisor = EngineSupervisor(settings, _serving_folder(settings, validation_model), dtype)
        console.log(f"vLLM dtype: {dtype or 'its default'} (LORAGATE_ENGINE_DTYPE={settings.engine_dtype})")
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(_serve(settings, supervisor, validation_model))
    except KeyboardInterrupt:
        pass


def _refuse_taken_ports(settings: Settings) -> None:
    """End at once, before vLLM starts, if the gateway's port or a port of a vLLM it would start is in use (another
    gateway, or one still stopping): its sockets would be shared with the other, or its vLLM's health read from the
    other's."""
    wanted = [("the gateway", settings.host, settings.port, settings.workers == 1)]
    if not settings.engine_urls:
        ports = range(settings.engine_port, settings.engine_port + settings.engine_replicas)
        wanted += [("vLLM", settings.engine_host, port, True) for port in ports]
    for what, host, port, v6only in wanted:
        if taken(host, port, v6only):
            raise fail(f"{host}:{port}, the port {what} listens on, is in use (another loragate, or one stopping?)")


HTTP_PROTOCOL = "gateway.http_protocol:HttpProtocol"
"""uvicorn's httptools protocol, each response's head and body in one write (gateway.http_protocol)."""


async def _serve(settings: Settings, supervisor: EngineSupervisor | None, validation_model: Path | None) -> None:
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after shutting down, which would kill this process
        before it stops vLLM; here a signal only asks the server to exit."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    from gateway.app import create_app
    from gateway.metrics import MULTIPROC_ENV, join_multiprocess_dir

    urls = settings.engine_urls
    if supervisor is not None:
        console.log(
            f"starting {settings.engine_replicas} vLLM server(s) on {supervisor.urls}"
            f" (logs in {settings.home / 'logs'})"
        )
        await supervisor.start()
        urls = supervisor.urls
        console.log("vLLM is healthy")
    try:
        if settings.workers > 1:
            await _serve_workers(settings, urls, validation_model)
            return
        if metrics := os.environ.get(MULTIPROC_ENV):  # the operator's (the chart's): made, never emptied, as other
            join_multiprocess_dir(Path(metrics))  # processes may be writing to it already
        config = uvicorn.Config(
            create_app(settings, urls, validation_model),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="on",
            proxy_headers=False,  # no client address or scheme is read: one ASGI layer less per request (~10 µs)
            timeout_keep_alive=settings.keep_alive_s,
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
            http=HTTP_PROTOCOL,
        )
        server = _Server(config)
        console.log(f"loragate serving on http://{url_host(settings.host)}:{settings.port}/v1")
        await server.serve()
    finally:
        if supervisor is not None:
            console.log("stopping vLLM")
            await supervisor.stop()


def _logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def worker_app() -> FastAPI:
    """The app of one of several gateway processes (`LORAGATE_WORKERS` > 1): everything it needs is in
    its environment, which the parent set (the vLLM URLs it started, the base model folder)."""
    from gateway.app import create_app

    heap.steady()
    settings = Settings()
    _logging(settings)
    return create_app(settings, settings.engine_urls, settings.model_dir)


async def _serve_workers(settings: Settings, urls: list[str], validation_model: Path | None) -> None:
    """Serve with `settings.workers` processes on one port, each on a listening socket of its own (uvicorn's
    supervisor: a worker that dies or hangs is replaced). The engines stay with this process, which supervises
    them."""
    import uvicorn

    from gateway.metrics import MULTIPROC_ENV, fresh_multiprocess_dir
    from gateway.workers import Workers, reuseport_sockets

    os.environ["LORAGATE_ENGINE_URLS"] = ",".join(urls)  # the workers' environment: spawned, they inherit it
    if validation_model is not None:
        os.environ["LORAGATE_MODEL_DIR"] = str(validation_model)
    # The workers write their metrics to one emptied folder, and /metrics in any of them adds all up.
    metrics = Path(os.environ.get(MULTIPROC_ENV) or settings.home / "prometheus" / str(settings.port))
    os.environ[MULTIPROC_ENV] = str(fresh_multiprocess_dir(metrics))
    config = uvicorn.Config(
        f"{__name__}:worker_app",
        factory=True,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        proxy_headers=False,  # as above
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        http=HTTP_PROTOCOL,
        loop="uvloop" if event_loop_factory() is not None else "asyncio",
    )
    # One listening socket per worker (SO_REUSEPORT): the kernel spreads connections evenly (gateway.workers).
    try:
        sockets = reuseport_sockets(settings.host, settings.port, settings.workers)
    except OSError as exc:
        raise fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from exc
    supervisor = Workers(config, sockets)  # takes SIGINT/SIGTERM: both end the run
    address = f"http://{url_host(settings.host)}:{settings.port}/v1"
    console.log(f"loragate serving on {address} with {settings.workers} processes")
    await asyncio.to_thread(supervisor.run)
