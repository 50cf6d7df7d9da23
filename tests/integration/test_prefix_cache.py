"""Tenants do not share vLLM's prefix cache: a prompt one tenant sent is not a cache hit for another (whose
answer would otherwise come faster, telling it what the first tenant asked), while a tenant's own repeat is.
Read from vLLM's own counters of prefix-cache hits, on the session's real replicas."""

from __future__ import annotations

import time
import uuid

import openai
import pytest

from tests.conftest import MODEL, Gateway, create_key
from tests.integration.test_cancellation import vllm_metric

pytestmark = pytest.mark.integration

HITS = "vllm:prefix_cache_hits_total"
SECRET = " ".join(f"Ticket {n}: customer Ada Quinn says invoice {n * 7} was charged twice." for n in range(40))


def ask(client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SECRET}], max_tokens=1)


def hits(gateway: Gateway, flusher: openai.OpenAI) -> float:
    """vLLM's hits so far. Its counters lag a step behind an idle engine, so a short prompt that shares
    no block with anything (a fresh random start) is sent first to bring them up to date."""
    flusher.completions.create(model=MODEL, prompt=f"{uuid.uuid4().hex} hi", max_tokens=1)
    time.sleep(0.3)
    return vllm_metric(gateway, HITS)


def test_a_prompt_cached_for_one_tenant_is_no_hit_for_another(gateway: Gateway) -> None:
    owner, other, flusher = (
        openai.OpenAI(base_url=gateway.base_url, api_key=create_key(gateway.env, tenant), max_retries=0)
        for tenant in ("cache-owner", "cache-other", "cache-flush")
    )
    before = hits(gateway, flusher)
    for _ in range(4):  # until a repeat lands on a replica that has the prompt
        ask(owner)
        if hits(gateway, flusher) > before:
            break
    assert hits(gateway, flusher) > before, "the owner's repeat was never a hit: the check below would prove nothing"
    for _ in range(2):  # the owner's prompt is cached wherever the other tenant's requests may go
        ask(owner)
    before = hits(gateway, flusher)
    ask(other)  # once: a second time would be a hit, on its own (salted) blocks
    assert hits(gateway, flusher) == before, "another tenant's identical prompt reused the owner's cached blocks"
