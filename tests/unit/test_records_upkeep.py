"""The records upkeep's round: durability probed before spooled feedback is replayed whenever it is not trusted, and
each step on its own (one that fails holds up none of the others). The steps themselves are tested against the real
Redis and spool elsewhere (test_feedback_durability, test_feedback_replay, test_spool); here, their order."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from gateway import app


def services(calls: list[str], durability: str, failing: str = "", degraded: bool = False) -> Any:
    def step(name: str, result: object = None) -> Any:
        async def run(*_args: object) -> object:
            calls.append(name)
            if name == failing:
                raise RuntimeError(f"{name} broke")
            return result

        return run

    async def probed() -> str:
        calls.append("check")
        return feedback.durability  # as it was: Redis still down, or still fsyncing

    def metrics() -> None:
        calls.append("metrics")
        if failing == "metrics":
            raise RuntimeError("metrics broke")

    feedback = SimpleNamespace(durability=durability, check_durability=probed, replay=step("replay", 0))
    return SimpleNamespace(
        recorder=SimpleNamespace(clock=SimpleNamespace(upkeep=step("clock")), trim=step("trim"), degraded=degraded),
        spools=[SimpleNamespace(adopt=step("adopt"))],
        feedback=feedback,
        tenants=SimpleNamespace(all=step("tenants", [])),
        refresh_metrics=metrics,
    )


FIRST = ["clock", "adopt", "check", "replay", "tenants", "trim", "metrics"]
"""The first round does every step; later ones probe only while durability is not trusted (or every 30 rounds)."""


@pytest.mark.parametrize(
    ("durability", "degraded", "probed"),
    [("unknown", False, True), ("spool", False, True), ("fsync-always", True, True), ("waitaof", False, False)],
)
async def test_durability_is_probed_before_spooled_feedback_is_replayed(
    durability: str, degraded: bool, probed: bool
) -> None:
    """Every round while it is not trusted, and while the completion log spools (Redis may be down, and what comes
    back may be another Redis)."""
    calls: list[str] = []
    svc = services(calls, durability, degraded=degraded)
    for number in (0, 1):
        await app._records_round(svc, number)
    assert calls == [*FIRST, "clock", "adopt", *(["check"] if probed else []), "replay", "metrics"]


@pytest.mark.parametrize("failing", ["adopt", "replay", "trim", "metrics"])
async def test_a_step_that_fails_holds_up_none_of_the_others(failing: str) -> None:
    calls: list[str] = []
    svc = services(calls, "unknown", failing)
    await app._records_round(svc, 0)
    await app._records_round(svc, 1)
    assert calls == [*FIRST, "clock", "adopt", "check", "replay", "metrics"], "and the next round comes"
