"""Which model serves a request: the `model` a client names becomes the name vLLM knows.

The base model is always selectable; `name` or `name@version` selects an adapter version from the
registry. In vLLM an adapter version is loaded under the name `name@version`, so responses already
name the exact version that answered and need no rewriting.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.manifest import AdapterRef, InvalidAdapter, Manifest
from adapters.registry import Registry
from adapters.store import AdapterNotFound
from gateway.auth import Principal
from gateway.errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Route:
    requested: str
    upstream_model: str
    adapter: Manifest | None = None
    adapter_path: str | None = None
    """Folder vLLM loads the adapter from; None for the base model."""


class Router:
    def __init__(self, base_model: str, registry: Registry) -> None:
        self.base_model = base_model
        self.registry = registry

    async def resolve(self, model: str, principal: Principal) -> Route:
        if model == self.base_model:
            return Route(requested=model, upstream_model=model)
        try:
            manifest = await self.registry.lookup(AdapterRef.parse(model))
        except (InvalidAdapter, AdapterNotFound):
            raise ModelNotFound(model) from None
        return Route(
            requested=model,
            upstream_model=manifest.ref,
            adapter=manifest,
            adapter_path=str(self.registry.path(manifest)),
        )
