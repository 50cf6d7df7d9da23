"""The benchmarks' load generator (loadtest.scenarios, the soak's traffic) against the real gateway and vLLM:
a closed loop of mixed draws through the OpenAI SDK, chat and text, streamed or not, over the base and an
alias, with ratings; every answer is logged and every acknowledged rating can be read back."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx

from loadtest.load import run_closed
from loadtest.scenarios import KINDS, Scenario, ScenarioClient, summary
from tests.conftest import MODEL, Gateway, create_key, loragate
from tests.integration.conftest import eventually

TENANT = "load-generator"


@dataclass
class Caller:
    name: str
    key: str
    models: list[str] = field(default_factory=list)


def test_a_mixed_scenario_runs_through_the_sdk_and_everything_it_was_told_is_kept(gateway: Gateway) -> None:
    key = create_key(gateway.env, TENANT)
    loragate(gateway.env, "aliases", "set", "assistant", MODEL, "--tenant", TENANT)
    caller = Caller(TENANT, key, [MODEL, "assistant"])
    scenario = Scenario(stream_share=0.5, completion_share=0.3, feedback_share=0.5, zipf_s=1.0, max_tokens=6, seed=7)

    async def run() -> ScenarioClient:
        load = ScenarioClient(gateway.url, [caller], scenario)
        try:
            await run_closed(load.request, concurrency=3, duration_s=8)
        finally:
            await load.close()
        return load

    load = asyncio.run(run())
    out = summary(load.samples, 8)
    assert not load.errors, load.error_samples
    assert {s.kind for s in load.samples} >= {"chat", "chat stream", "feedback"}
    assert {s.model for s in load.samples if s.kind in KINDS} == {MODEL, "assistant"}
    streams = [s for s in load.samples if s.kind.endswith("stream")]
    assert streams and all(s.ttft_s is not None and 0 < s.ttft_s <= s.latency_s for s in streams)
    assert out["all completions"]["requests"] == len(load.answered) and out["chat stream"]["inter_token"]["count"] > 0
    headers = {"Authorization": f"Bearer {key}"}
    assert load.acked, "some answers were rated"
    for tenant, completion_id, user, status in load.acked:
        assert tenant == TENANT and status in (200, 202)

        def stored(completion_id: str = completion_id, user: str = user) -> bool:  # 202: spooled, replayed soon
            found = httpx.get(f"{gateway.url}/v1/feedback", params={"completion_id": completion_id}, headers=headers)
            return found.status_code == 200 and any(r["user"] == user for r in found.json()["data"])

        assert eventually(stored, timeout=10), (completion_id, user)
