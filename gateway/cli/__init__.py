"""The `loragate` command. Heavy imports stay inside commands so `--help` and no-op runs are instant."""

from __future__ import annotations

import typer

from gateway.cli.adapters import adapters_app, aliases_app
from gateway.cli.experiments import experiments_app
from gateway.cli.feedback import feedback_app
from gateway.cli.serve import model_app, serve
from gateway.cli.tenants import keys_app, tenants_app
from gateway.cli.train import train_app

app = typer.Typer(
    help="loragate: an OpenAI-compatible gateway for many LoRA adapters on one base model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.command()(serve)
app.add_typer(model_app, name="model")
app.add_typer(tenants_app, name="tenants")
app.add_typer(keys_app, name="keys")
app.add_typer(adapters_app, name="adapters")
app.add_typer(aliases_app, name="aliases")
app.add_typer(feedback_app, name="feedback")
app.add_typer(experiments_app, name="experiments")
app.add_typer(train_app, name="train")


def main() -> None:
    from pydantic import ValidationError

    from gateway.cli.common import fail

    try:
        app()
    except ValidationError as exc:  # a setting (LORAGATE_*) the gateway cannot run with: said, not a traceback
        if exc.title != "Settings":
            raise
        for error in exc.errors():
            setting = "LORAGATE_" + "_".join(str(part) for part in error["loc"][:1]).upper()
            fail(f"{setting}: {error['msg'].removeprefix('Value error, ')}")
        raise SystemExit(1) from None
