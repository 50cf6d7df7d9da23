"""Which model serves a request: the `model` a client names becomes the name vLLM knows.

Pure: no I/O. The base model is always selectable; adapters come from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth import Principal
from gateway.errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Route:
    requested: str
    upstream_model: str
    adapter_path: str | None = None
    """Folder vLLM loads the adapter from; None for the base model."""


class Router:
    def __init__(self, base_model: str) -> None:
        self.base_model = base_model

    def resolve(self, model: str, principal: Principal) -> Route:
        if model == self.base_model:
            return Route(requested=model, upstream_model=model)
        raise ModelNotFound(model)
