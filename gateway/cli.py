"""The `loragate` command. Heavy imports stay inside commands so `--help` and no-op runs are instant."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gateway.settings import Settings

app = typer.Typer(help="loragate: an OpenAI-compatible gateway for many LoRA adapters on one base model.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
model_app = typer.Typer(help="The base model.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (stored hashed in Redis).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")

console = Console(stderr=True)


def _prepare_model(settings: Settings) -> Path:
    from adapters.base_model import PrepareError, is_prepared, prepare, prepared_dir

    if settings.model_dir is not None:
        return settings.model_dir
    if is_prepared(prepared_dir(settings.models_root)):
        return prepared_dir(settings.models_root)
    try:
        with console.status("preparing the default model") as status:
            return prepare(settings.models_root, lambda step: (console.log(step), status.update(step)))
    except PrepareError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


@model_app.command("prepare")
def model_prepare() -> None:
    """Convert the bundled SmolLM2-135M-Instruct GGUF to a bf16 safetensors folder (once)."""
    settings = Settings()
    folder = _prepare_model(settings)
    typer.echo(str(folder))


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
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(1) from exc


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
    model_dir = None if settings.engine_urls else _prepare_model(settings)
    try:
        asyncio.run(_serve(settings, model_dir))
    except KeyboardInterrupt:
        pass


async def _serve(settings: Settings, model_dir: Path | None) -> None:
    import uvicorn

    from gateway.app import create_app
    from gateway.engine.supervisor import EngineSupervisor

    supervisor = None
    urls = settings.engine_urls
    if model_dir is not None:
        supervisor = EngineSupervisor(settings, model_dir)
        console.log(f"starting {settings.engine_replicas} vLLM server(s) on {supervisor.urls} (logs in {settings.home / 'logs'})")
        await supervisor.start()
        urls = supervisor.urls
        console.log("vLLM is healthy")
    try:
        config = uvicorn.Config(
            create_app(settings, urls), host=settings.host, port=settings.port,
            log_level=settings.log_level, access_log=False, lifespan="on",
        )
        server = uvicorn.Server(config)
        console.log(f"loragate serving on http://{settings.host}:{settings.port}/v1")
        await server.serve()
    finally:
        if supervisor is not None:
            console.log("stopping vLLM")
            await supervisor.stop()


def main() -> None:
    app()
