"""A retraining run's folder and state, and where it reads and writes (training.retrain runs its steps).

A run lives in a folder (`HOME/training/TENANT/RUN`): its state (`run.json`: the config, what each step found), the
dataset (`data/`), the training run and adapter (`fit/`), the eval report (`eval/`). `run.json` is replaced whole
(written aside, then renamed), so a run stopped at any point is read back as it was after its last step.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, Field

from adapters.registry import Registry
from gateway.settings import Settings
from training.config import RetrainConfig
from training.publish import CANARY_PREFIX, RetrainRefused


class RunState(BaseModel):
    """What a run was asked and what each of its steps found (run.json)."""

    run_id: str
    tenant: str
    alias: str
    config: dict[str, Any]
    created: float = Field(default_factory=time.time)
    tenant_created: float | None = None
    """When the tenant was created, as the run's creation (or else its dataset step) found it: a tenant deleted and
    created again under its name is another, and gets nothing of this run (None: a run.json from before this field)."""
    done: list[str] = Field(default_factory=list)
    serving: dict[str, Any] | None = None
    data_card: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    candidate: str | None = None
    """The staged version (`name@V`), unlisted until published."""
    eval: dict[str, Any] | None = None
    published: str | None = None
    pinned: str | None = None
    """`name@V` the publish step pinned the bare adapter name to before listing the candidate (publish.hold_bare_name);
    None: it needed no pin."""
    canary: str | None = None
    error: str | None = None
    seconds: dict[str, float] = Field(default_factory=dict)
    """Wall time of each step done."""


@dataclass(frozen=True)
class Stack:
    """Where a run reads and writes: the gateway's settings, its Redis servers and its URL."""

    settings: Settings
    state: aioredis.Redis
    records: aioredis.Redis
    gateway_url: str

    @property
    def registry(self) -> Registry:
        return Registry(self.settings.adapter_root)


class Run:
    def __init__(self, folder: Path, state: RunState) -> None:
        self.folder = folder
        self.state = state

    @classmethod
    def create(
        cls, root: Path, tenant: str, alias: str, config: RetrainConfig, tenant_created: float | None = None
    ) -> Run:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        folder = root / tenant / run_id
        folder.mkdir(parents=True)
        state = RunState(
            run_id=run_id, tenant=tenant, alias=alias, config=config.to_dict(), tenant_created=tenant_created
        )
        run = cls(folder, state)
        run.save()
        return run

    @classmethod
    def load(cls, folder: Path) -> Run:
        return cls(folder, RunState.model_validate_json((folder / "run.json").read_text()))

    @property
    def config(self) -> RetrainConfig:
        """The run's config; ValueError naming what this version does not know (a run of another version)."""
        known = {f.name for f in fields(RetrainConfig)}
        if unknown := sorted(set(self.state.config) - known):
            raise ValueError(f"its config has fields this version does not know: {unknown}")
        return RetrainConfig(**self.state.config)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def canary_name(self) -> str:
        """The name of the experiment its publish step starts on the alias."""
        return f"{CANARY_PREFIX}{self.state.run_id}"

    @property
    def fit_dir(self) -> Path:
        return self.folder / "fit"

    @property
    def eval_dir(self) -> Path:
        return self.folder / "eval"

    def save(self) -> None:
        scratch = self.folder / ".run.json.tmp"
        scratch.write_text(self.state.model_dump_json(indent=2))
        scratch.replace(self.folder / "run.json")

    def require(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.state.done]
        if missing:
            raise RetrainRefused(f"Run {self.state.run_id} has not done {', '.join(missing)} yet.")
