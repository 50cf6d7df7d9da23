"""Which model serves a request: the `model` a tenant names becomes the name vLLM knows.

A tenant's `model` resolves only within its own namespace, the adapters shared with it, and the base:

| `model` | serves |
|---|---|
| the base model's name | the base |
| an alias of the tenant | the alias's target (a version, a shared version, or the base) |
| `name` / `name@V` | the tenant's adapter: its pinned (else latest) version / exactly V |
| `owner/name` / `owner/name@V` | another tenant's adapter that the global admin shared with this one |

Anything else, including another tenant's adapter or alias, is the same ModelNotFound as a name that
never existed. vLLM knows an adapter version as `OWNER.NAME@V`; responses name the version that
served as the tenant sees it (`name@V`, or `owner/name@V` for a shared one).
"""

from __future__ import annotations

from typing import NamedTuple

from adapters.manifest import AdapterRef, InvalidAdapter, Manifest
from adapters.registry import Registry, upstream_name
from adapters.store import AdapterNotFound
from gateway.assignment import arm_for
from gateway.errors import ModelNotFound
from gateway.experiments import PREFIX as EXPERIMENT
from gateway.experiments import ExperimentNotFound, ExperimentStore
from gateway.pointers import PointerStore, TenantPointers
from gateway.tenants import InvalidTenant, check_tenant_name


class Route(NamedTuple):
    """Immutable and built on every request: a named tuple builds in a fifth of a frozen dataclass's time."""

    requested: str
    upstream_model: str
    """The name vLLM knows: the base model's, or OWNER.NAME@V."""
    served_model: str
    """The name responses give the version that served, as the tenant sees it."""
    adapter: Manifest | None = None
    adapter_path: str | None = None
    """Folder vLLM loads the adapter from; None for the base model."""
    alias: str | None = None
    experiment: str | None = None
    arm: str | None = None
    """The experiment arm that served (an alias pointing at an experiment)."""

    @property
    def adapter_label(self) -> str | None:
        """The adapter that serves, as the tenant names it (`name`, or `owner/name` when shared); None: the base."""
        return self.served_model.rpartition("@")[0] if self.adapter is not None else None

    @property
    def model_rename(self) -> tuple[bytes, bytes] | None:
        """How the engine's `"model"` field is rewritten to the name the tenant sees (None: no change)."""
        if self.served_model == self.upstream_model:
            return None
        return b'"model":"%s"' % self.upstream_model.encode(), b'"model":"%s"' % self.served_model.encode()


class ArmUnavailable(ModelNotFound):
    """An experiment arm whose target the tenant can no longer use (an adapter its owner stopped sharing): a 404
    like any model the caller may not use, recorded with its `route`'s experiment and arm, so that it counts as
    that arm's error (its guard rails can roll it back)."""

    def __init__(self, model: str, route: Route) -> None:
        super().__init__(model)
        self.route = route


class Router:
    def __init__(
        self, base_model: str, registry: Registry, pointers: PointerStore, experiments: ExperimentStore
    ) -> None:
        self.base_model = base_model
        self.registry = registry
        self.pointers = pointers
        self.experiments = experiments

    async def resolve(self, model: str, tenant: str, user: str | None = None, candidates: bool = False) -> Route:
        """The route of `model` for `tenant`; `user` (the end user) picks the arm of an experiment alias;
        `candidates`: the caller may name an unpublished candidate (`name@V` exactly; a training key)."""
        if model == self.base_model:
            return Route(requested=model, upstream_model=model, served_model=model)
        pointers = await self.pointers.of(tenant)
        target = pointers.aliases.get(model)
        if target is not None:
            experiment, arm = None, None
            try:
                if target.startswith(EXPERIMENT):
                    experiment, arm, target = await self._arm(tenant, target.removeprefix(EXPERIMENT), user)
                route = await self.target(target, tenant)
            except ModelNotFound:
                if arm is not None:  # the arm's target went (its owner stopped sharing it): that arm's error
                    assigned = Route(model, "", "", alias=model, experiment=experiment, arm=arm)
                    raise ArmUnavailable(model, assigned) from None
                raise ModelNotFound(model) from None
            # built whole: a named tuple's `_replace` took four times as long (1 µs, on every request of an alias)
            upstream, served, path = route.upstream_model, route.served_model, route.adapter_path
            return Route(model, upstream, served, route.adapter, path, model, experiment, arm)
        return await self._adapter(model, tenant, pointers, candidates)

    async def _arm(self, tenant: str, name: str, user: str | None) -> tuple[str | None, str, str]:
        """The experiment's arm for this end user: (experiment, arm, target). While it is paused, control serves
        everyone and the experiment is None: such requests are not a random sample, and are not counted in it."""
        try:
            experiment = await self.experiments.get(tenant, name)
        except ExperimentNotFound:
            raise ModelNotFound(name) from None
        if experiment.status != "running":
            control = experiment.arms[experiment.control_index]
            return None, control.name, control.target
        arm = experiment.arms[arm_for(experiment.buckets, tenant, name, user)]
        return name, arm.name, arm.target

    async def target(self, target: str, tenant: str) -> Route:
        """What an alias target means for `tenant`: the base, or one exact adapter version."""
        if target == self.base_model:
            return Route(requested=target, upstream_model=target, served_model=target)
        if "@" not in target:
            raise ModelNotFound(target)
        return await self._adapter(target, tenant, await self.pointers.of(tenant))

    async def _adapter(self, model: str, tenant: str, pointers: TenantPointers, candidates: bool = False) -> Route:
        owner, slash, rest = model.partition("/")
        if not slash:
            owner, rest = tenant, model
        try:
            check_tenant_name(owner)
            ref = AdapterRef.parse(rest)
            if owner != tenant:
                if tenant not in (await self.pointers.shares()).get(f"{owner}/{ref.name}", ()):
                    raise ModelNotFound(model)
                pointers = await self.pointers.of(owner)
            manifest = await self.registry.lookup(owner, ref, pointers.pins.get(ref.name))
        except (InvalidAdapter, InvalidTenant, AdapterNotFound):
            raise ModelNotFound(model) from None
        if not manifest.listed and not (candidates and owner == tenant):
            raise ModelNotFound(model)
        return Route(
            requested=model,
            upstream_model=upstream_name(owner, manifest),
            served_model=manifest.ref if owner == tenant else f"{owner}/{manifest.ref}",
            adapter=manifest,
            adapter_path=self.registry.path_text(manifest),
        )
