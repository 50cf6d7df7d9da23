"""The `loragate` command. Heavy imports stay inside commands so `--help` and no-op runs are instant."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from adapters.manifest import AdapterRef
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.engine.capabilities import EngineCapabilities
    from gateway.engine.supervisor import EngineSupervisor

app = typer.Typer(
    help="loragate: an OpenAI-compatible gateway for many LoRA adapters on one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed in Redis).", no_args_is_help=True)
app.add_typer(model_app, name="model")
adapters_app = typer.Typer(help="The adapter registry (versions are immutable).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(adapters_app, name="adapters")

console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    """Print an error (unwrapped, so it can be searched) and return the exit to raise."""
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(1)


@contextlib.contextmanager
def _progress(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner for long one-off work, with each step also logged."""
    with console.status(title) as status:

        def step(message: str) -> None:
            console.log(message)
            status.update(message)

        yield step


def _base_folder(settings: Settings) -> Path:
    """The unquantised base model folder (prepared on first use): adapters are validated against it."""
    from adapters.base_model import PrepareError, is_prepared, prepare, prepared_dir

    if settings.model_dir is not None:
        return settings.model_dir
    if is_prepared(prepared_dir(settings.models_root)):
        return prepared_dir(settings.models_root)
    try:
        with _progress("preparing the default model") as step:
            return prepare(settings.models_root, step)
    except PrepareError as exc:
        raise _fail(str(exc)) from exc


def _check_engine(settings: Settings) -> EngineCapabilities:
    """Refuse, before any engine starts or any copy is built, a quantisation the engine cannot run here."""
    from gateway.engine.capabilities import ProbeFailed, needs_kernel_probe, probe, quantization_problem

    try:
        with _progress("checking what this machine's vLLM can run"):
            caps = probe(settings.engine_python, kernels=needs_kernel_probe(settings.quantization))
    except ProbeFailed as exc:
        raise _fail(str(exc)) from exc
    if problem := quantization_problem(settings.quantization, caps, settings.engine_dtype):
        raise _fail(problem)
    console.log(f"engine: vLLM {caps.vllm} ({caps.device}); CPU {caps.cpu_kind}")
    return caps


def _serving_folder(settings: Settings, base: Path) -> Path:
    """What vLLM loads: the base itself (bitsandbytes quantises it while loading), or its W4A16 copy (built once)."""
    if settings.quantization != "w4a16":
        return base
    from adapters.quantize import quantize_w4a16

    with _progress("quantising the base model to 4-bit") as step:
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
    typer.echo(str(_serving_folder(settings, _base_folder(settings))))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to.")] = "default",
    name: Annotated[str, typer.Option(help="A label for the key.")] = "default",
) -> None:
    """Create an API key; the key is printed once, only its hash is stored."""
    import redis.asyncio as aioredis

    from gateway.auth import KeyStore

    async def create() -> str:
        redis = aioredis.from_url(Settings().redis_url, decode_responses=True)
        try:
            return await KeyStore(redis).create(tenant, name)
        finally:
            await redis.aclose()

    typer.echo(asyncio.run(create()))


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The API key to revoke.")]) -> None:
    """Delete a key; gateways stop accepting it within LORAGATE_AUTH_CACHE_S."""
    import redis.asyncio as aioredis

    from gateway.auth import KeyStore

    async def revoke() -> bool:
        redis = aioredis.from_url(Settings().redis_url, decode_responses=True)
        try:
            return await KeyStore(redis).revoke(key)
        finally:
            await redis.aclose()

    if not asyncio.run(revoke()):
        raise _fail("no such key")
    typer.echo("revoked")


@keys_app.command("check")
def keys_check(key: Annotated[str, typer.Argument(help="The API key to check.")]) -> None:
    """Exit 0 if the key is valid, printing its tenant; exit 1 if not."""
    import redis.asyncio as aioredis

    from gateway.auth import KeyStore
    from gateway.errors import APIError

    async def check() -> str:
        redis = aioredis.from_url(Settings().redis_url, decode_responses=True)
        try:
            return (await KeyStore(redis, cache_seconds=0).verify(f"Bearer {key}")).tenant
        finally:
            await redis.aclose()

    try:
        typer.echo(asyncio.run(check()))
    except APIError as exc:
        raise _fail(exc.message) from exc


def _store(settings: Settings):  # type: ignore[no-untyped-def]
    from adapters.store import AdapterStore

    return AdapterStore(settings.adapter_root)


@contextlib.contextmanager
def _registry_errors() -> Iterator[None]:
    """Registry refusals (bad name, missing version, invalid adapter) end the command with their message."""
    from adapters.store import AdapterNotFound

    try:
        yield
    except (AdapterNotFound, ValueError) as exc:
        raise _fail(str(exc)) from exc


@adapters_app.command("add")
def adapters_add(
    path: Annotated[Path, typer.Argument(help="A PEFT adapter folder or a .tar.gz of one.")],
    name: Annotated[str, typer.Option(help="Adapter name; each add makes its next version.")],
) -> None:
    """Validate an adapter against the base model and store it as a new version."""
    from adapters.validate import BaseModelSpec

    settings = Settings()
    base = BaseModelSpec.from_folder(_base_folder(settings), settings.served_model_name)
    with _registry_errors():
        typer.echo(_store(settings).add(path, name, base, settings.max_lora_rank, origin=str(path.resolve())).ref)


@adapters_app.command("list")
def adapters_list() -> None:
    """Every version of every adapter."""
    from rich.table import Table

    store = _store(Settings())
    table = Table("adapter", "rank", "alpha", "targets", "size", "sha256 (weights)", "created", "default")
    for m in store.list():
        default = "yes" if store.resolve(AdapterRef(m.name)).version == m.version else ""
        table.add_row(
            m.ref,
            str(m.rank),
            f"{m.alpha:g}",
            ",".join(m.target_modules),
            f"{m.size_bytes / 1e6:.1f} MB",
            m.files.get("adapter_model.safetensors", "")[:12],
            m.created.strftime("%Y-%m-%d %H:%M"),
            default,
        )
    Console().print(table)


@adapters_app.command("show")
def adapters_show(ref: Annotated[str, typer.Argument(help="name (default version) or name@version")]) -> None:
    """Print one version's manifest as JSON."""
    with _registry_errors():
        typer.echo(_store(Settings()).resolve(AdapterRef.parse(ref)).model_dump_json(indent=2))


@adapters_app.command("rm")
def adapters_rm(ref: Annotated[str, typer.Argument(help="name@version to delete")]) -> None:
    """Delete one version; running gateways unload it within a health interval."""
    with _registry_errors():
        parsed = AdapterRef.parse(ref)
        if parsed.version is None:
            raise ValueError("give the version to delete: name@version")
        typer.echo(f"deleted {_store(Settings()).remove(parsed.name, parsed.version).ref}")


@adapters_app.command("pin")
def adapters_pin(
    ref: Annotated[str, typer.Argument(help="name@version the bare name should resolve to, or name to unpin")],
) -> None:
    """Make `name` resolve to a fixed version instead of the latest (no version: unpin)."""
    with _registry_errors():
        parsed = AdapterRef.parse(ref)
        store = _store(Settings())
        store.pin(parsed.name, parsed.version)
        typer.echo(f"{parsed.name} -> {store.resolve(AdapterRef(parsed.name)).ref}")


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Port (default LORAGATE_PORT or 8080).")] = None,
    host: Annotated[str | None, typer.Option(help="Address (default LORAGATE_HOST or 127.0.0.1).")] = None,
) -> None:
    """Run the gateway; without LORAGATE_ENGINE_URLS, also start and supervise vLLM."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = {k: v for k, v in {"port": port, "host": host}.items() if v is not None}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    validation_model: Path | None = settings.model_dir
    supervisor: EngineSupervisor | None = None
    if not settings.engine_urls:
        from gateway.engine.capabilities import engine_dtype
        from gateway.engine.supervisor import EngineSupervisor

        if settings.engine_python and not os.access(settings.engine_python, os.X_OK):
            raise _fail(f"LORAGATE_ENGINE_PYTHON {settings.engine_python} is not an executable")
        caps = _check_engine(settings)
        validation_model = _base_folder(settings)
        dtype = engine_dtype(settings.engine_dtype, settings.quantization, caps)
        supervisor = EngineSupervisor(settings, _serving_folder(settings, validation_model), dtype)
        console.log(f"vLLM dtype: {dtype or 'its default'} (LORAGATE_ENGINE_DTYPE={settings.engine_dtype})")
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_serve(settings, supervisor, validation_model))
    except KeyboardInterrupt:
        pass


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (uvicorn[standard] brings it): measured, about 14% more requests/s per process."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


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
        config = uvicorn.Config(
            create_app(settings, urls, validation_model),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="on",
        )
        server = _Server(config)
        console.log(f"loragate serving on http://{settings.host}:{settings.port}/v1")
        await server.serve()
    finally:
        if supervisor is not None:
            console.log("stopping vLLM")
            await supervisor.stop()


def main() -> None:
    app()
