"""Simulated users of the demo: they call the support bot through the OpenAI SDK and rate every answer
through the feedback API, correcting the ones they reject (the data retraining learns from).

Everything goes through the real gateway: a tenant and its key made with the admin API, the alias the
users call, and the experiment the retraining run starts (read back until its guard rails decide).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from demo.tickets import Ticket


@dataclass
class Tally:
    """What the users saw, per arm (None: no experiment behind the alias)."""

    asked: Counter[str | None] = field(default_factory=Counter)
    accepted: Counter[str | None] = field(default_factory=Counter)
    errors: int = 0

    def line(self) -> str:
        parts = [
            f"{arm or 'alias'}: {self.accepted[arm]}/{n} accepted" for arm, n in sorted(self.asked.items(), key=str)
        ]
        return ", ".join(parts) + (f", {self.errors} errors" if self.errors else "")


async def open_tenant(admin: httpx.AsyncClient, tenant: str, alias: str, base_model: str) -> str:
    """A tenant (made anew if it exists), an inference key, and `alias` pointing at the base; the key."""
    if (await admin.get(f"/admin/tenants/{tenant}")).status_code == 200:
        (await admin.delete(f"/admin/tenants/{tenant}")).raise_for_status()
    (await admin.post("/admin/tenants", json={"name": tenant})).raise_for_status()
    created = await admin.post(f"/admin/tenants/{tenant}/keys", json={"name": "support-app"})
    created.raise_for_status()
    (await admin.put(f"/admin/tenants/{tenant}/aliases/{alias}", json={"target": base_model})).raise_for_status()
    return str(created.json()["key"])


async def _serve_one(
    client: openai.AsyncOpenAI, feedback: httpx.AsyncClient, alias: str, user: str, ticket: Ticket, tally: Tally
) -> None:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=alias,
            messages=ticket.messages,  # type: ignore[arg-type]
            max_tokens=24,
            temperature=0,
            user=user,
        )
    except openai.APIError:
        tally.errors += 1
        return
    answer = raw.parse()
    arm = raw.headers.get("x-loragate-arm")
    text = answer.choices[0].message.content or ""
    good = ticket.judge(text)
    tally.asked[arm] += 1
    tally.accepted[arm] += good
    rating: dict[str, Any] = {"completion_id": answer.id, "user": user, "thumbs": "up" if good else "down"}
    if not good:
        rating["correction"] = ticket.ideal
    for attempt in range(3):  # a rating is idempotent (one per end user): safe to send again
        try:
            (await feedback.post("/v1/feedback", json=rating)).raise_for_status()
            return
        except httpx.TransportError:
            await asyncio.sleep(0.5 * (attempt + 1))
    tally.errors += 1


async def users(
    base_url: str, key: str, alias: str, tickets: list[Ticket], concurrency: int = 8, prefix: str = "user"
) -> Tally:
    """Each ticket from its own end user (sticky in an experiment), `concurrency` at a time, all rated."""
    tally = Tally()
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=1) as client,
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as feedback,
    ):

        async def one(n: int, ticket: Ticket) -> None:
            async with gate:
                await _serve_one(client, feedback, alias, f"{prefix}-{n}", ticket, tally)

        await asyncio.gather(*(one(n, t) for n, t in enumerate(tickets)))
    return tally


async def until_decided(
    admin: httpx.AsyncClient,
    tenant: str,
    experiment: str,
    traffic: Callable[[int], Any],
    timeout_s: float = 600,
) -> dict[str, Any]:
    """Send rounds of traffic (`traffic(round)`) until the experiment's guard rails promote or roll back
    its candidate; the experiment as the admin API shows it."""
    deadline = time.monotonic() + timeout_s
    path = f"/admin/tenants/{tenant}/experiments/{experiment}"
    rounds = 0
    while time.monotonic() < deadline:
        shown = (await admin.get(path)).json()
        if shown["status"] != "running" or any(a["weight"] == 0 for a in shown["arms"]):
            return dict(shown)
        await traffic(rounds)
        rounds += 1
        await asyncio.sleep(1)
    raise TimeoutError(f"experiment {experiment} undecided after {timeout_s:.0f} s")
