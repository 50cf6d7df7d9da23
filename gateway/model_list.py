"""`GET /v1/models` for a tenant: the base, its aliases, its adapters and those shared with it.

The answer is the same for every call until something it shows changes, so it is built (and serialised)
once and kept per tenant, keyed by everything it is made of: the second (the base's and aliases'
`created` is now, as in vLLM), the tenant's pointers and the registry's listings, each of which keeps
its identity until it changes (`PointerStore.of`, `Registry.listed`). A tenant with a hundred versions
is then answered as fast as one with one.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from adapters.manifest import AdapterRef, InvalidAdapter, Manifest
from adapters.registry import Registry
from gateway.pointers import PointerStore, TenantPointers
from gateway.protocol import ModelCard, ModelList

MAX_TENANTS = 1024
"""Tenants whose answer is kept (at most about 15 MB for tenants of 100 versions); past it the cache starts again."""


class ModelLists:
    def __init__(self, base: str, registry: Registry, pointers: PointerStore) -> None:
        self._base = base
        self._registry = registry
        self._pointers = pointers
        self._answers: dict[str, tuple[tuple[Any, ...], bytes]] = {}

    async def body(self, tenant: str) -> bytes:
        """The tenant's `ModelList` as JSON."""
        key = await self._key(tenant)
        cached = self._answers.get(tenant)
        if cached is not None and cached[0] == key:
            return cached[1]
        body = ModelList(data=self._cards(tenant, *key)).model_dump_json().encode()
        if len(self._answers) >= MAX_TENANTS and tenant not in self._answers:
            self._answers.clear()
        self._answers[tenant] = (key, body)
        return body

    async def alias_card(self, tenant: str, alias: str) -> ModelCard | None:
        """The card of the tenant's alias as its list shows it; None where the list leaves it out (its target's share
        withdrawn) or it is no alias. Read without routing: an experiment's alias draws no arm for its card."""
        if alias not in (await self._pointers.of(tenant)).aliases:  # the common case (a version, the base): no listing
            return None
        key = await self._key(tenant)
        return next((card for card in self._cards(tenant, *key) if card.id == alias), None)

    async def _key(self, tenant: str) -> tuple[Any, ...]:
        pointers = await self._pointers.of(tenant)
        own = await self._registry.listed(tenant, pointers.pins)
        shared = []
        for owner, adapter in await self._pointers.shared_with(tenant):
            pins = (await self._pointers.of(owner)).pins
            shared.append((owner, adapter, await self._registry.listed(owner, pins)))
        return int(time.time()), pointers, own, tuple(shared)

    def _cards(
        self,
        tenant: str,
        now: int,
        pointers: TenantPointers,
        own: list[tuple[str, Manifest]],
        shared: tuple[tuple[str, str, list[tuple[str, Manifest]]], ...],
    ) -> list[ModelCard]:
        base = self._base
        cards = [ModelCard(id=base, created=now, root=base)]
        reachable = {  # only the shared adapter's versions: `listing` is all of its owner's
            f"{owner}/{name}"
            for owner, adapter, listing in shared
            for name, manifest in listing
            if manifest.name == adapter
        }
        for alias, target in sorted(pointers.aliases.items()):
            canonical = _canonical(target, tenant)
            if "/" not in canonical or canonical in reachable:  # not one whose share was withdrawn, or owner left
                cards.append(ModelCard(id=alias, created=now, root=target, parent=base))
        for name, manifest in own:
            cards.append(ModelCard(id=name, created=int(manifest.created.timestamp()), root=manifest.ref, parent=base))
        for owner, adapter, listing in shared:
            for name, manifest in listing:
                if manifest.name == adapter:
                    created = int(manifest.created.timestamp())
                    cards.append(
                        ModelCard(id=f"{owner}/{name}", created=created, root=f"{owner}/{manifest.ref}", parent=base)
                    )
        return cards


def _canonical(target: str, tenant: str) -> str:
    """An alias's target as the listing names it: `bot@1` for `bot@01`, and for the tenant's own adapter written as
    `tenant/bot@1`, which the router serves alike (both were left out of the list)."""
    owner, slash, rest = target.rpartition("/")
    with contextlib.suppress(InvalidAdapter):  # a target no adapter can have is left as it is (and not listed)
        rest = str(AdapterRef.parse(rest))
    return f"{owner}/{rest}" if slash and owner != tenant else rest
