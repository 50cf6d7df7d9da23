"""Wire models of what the admin, feedback and probe endpoints answer, for the OpenAPI schema.

The handlers build these answers as plain dicts from the domain models (tenants, keys, manifests,
experiments, feedback); these models say what those dicts hold, field for field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from adapters.manifest import Manifest
from gateway.apikeys import KeyInfo
from gateway.experiments import Change, Experiment
from gateway.records import Feedback
from gateway.tenants import Tenant


class TenantList(BaseModel):
    object: Literal["list"]
    data: list[Tenant]


class TenantDeleted(BaseModel):
    id: str
    object: Literal["tenant"]
    deleted: Literal[True]
    keys_revoked: int
    adapters: int = Field(description="Adapter versions removed.")
    records: int = Field(description="Completion records removed.")


class CreatedKey(KeyInfo):
    key: str = Field(description="The API key: shown this once, never again.")


class RotatedKey(CreatedKey):
    replaces: str = Field(description="The id of the key it replaces, valid until its grace ends.")


class KeyList(BaseModel):
    object: Literal["list"]
    data: list[KeyInfo]


class KeyRevoked(BaseModel):
    id: str
    object: Literal["api_key"]
    revoked: Literal[True]


class AdapterList(BaseModel):
    object: Literal["list"]
    data: list[Manifest]


class AdapterDeleted(BaseModel):
    id: str = Field(description="The version deleted, name@V.")
    object: Literal["adapter"]
    deleted: Literal[True]


class Pinned(BaseModel):
    name: str
    pinned: int | None
    resolves_to: str = Field(description="The version the bare name now serves, name@V.")


class Shared(BaseModel):
    adapter: str = Field(description="owner/name")
    shared_with: list[str]


class Alias(BaseModel):
    alias: str
    target: str


class AliasList(BaseModel):
    object: Literal["list"]
    data: list[Alias]


class AliasSet(Alias):
    serves: str = Field(description="What vLLM serves for it: the base model or tenant.name@V.")


class AliasDeleted(BaseModel):
    alias: str
    object: Literal["alias"]
    deleted: Literal[True]


class FeedbackStored(Feedback):
    status: Literal["stored", "queued"] = Field(
        description="stored: in Redis, on its disk (200); queued: in the gateway's fsynced spool (202)."
    )


class FeedbackList(BaseModel):
    object: Literal["list"]
    data: list[Feedback]


class Erasure(BaseModel):
    object: Literal["erasure"]
    tenant: str
    user: str
    removed: dict[str, int] = Field(description="What was deleted, by kind: completions, feedback.")


class ExperimentView(Experiment):
    object: Literal["experiment"]


class ExperimentDetail(ExperimentView):
    audit: list[Change] = Field(description="Who changed what, when, oldest first.")


class ExperimentList(BaseModel):
    object: Literal["list"]
    data: list[ExperimentView]


class ExperimentResults(BaseModel):
    object: Literal["experiment.results"]
    experiment: str
    status: str
    control: str
    arms: dict[str, dict[str, Any]] = Field(description="Per arm: requests, errors, latency, tokens, ratings.")
    differences: list[dict[str, Any]] = Field(description="Each arm against control: the difference and intervals.")
    sample_ratio_p: float = Field(description="p-value of the sample ratio mismatch test.")
    verdict: str
    winner: str | None
    alpha: float


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "not ready"]
    redis: Literal["ok", "unreachable"] | None = Field(None, description="verbose=1 only, as all fields below.")
    records_redis: Literal["ok", "unreachable"] | None = None
    engines: dict[str, Literal["ok", "unreachable"]] | None = Field(None, description="Each vLLM replica's state.")
    records: dict[str, Any] | None = Field(None, description="Records waiting in the spools; feedback durability.")
