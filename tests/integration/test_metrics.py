"""`/metrics` of the real gateway after real traffic (OpenAI SDK, real vLLM and Redis), read with
Prometheus's own parser: per-request series by tenant, model, adapter and arm; errors by type; rate
limits; engine health, adapter loads, feedback and spools; the tenant cap and several processes added
up; and the Grafana dashboard's queries checked against the series the gateway and vLLM really expose."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from adapters.validate import BaseModelSpec
from gateway.metrics import OTHER, fresh_multiprocess_dir
from tests.conftest import (
    ADMIN_KEY,
    METRICS_KEY,
    MODEL,
    Gateway,
    RedisServer,
    create_key,
    loragate,
    start_side_gateway,
    stop_gateway,
)
from tests.integration.conftest import add_synthetic
from tests.unit.test_metrics import dashboard_series

pytestmark = pytest.mark.integration

OURS, LIMITED, SECOND = "metrics-a", "metrics-rpm", "metrics-b"
ASK = [{"role": "user", "content": "Say hi."}]

Sample = tuple[str, dict[str, str], float]


def scrape(url: str, key: str | None = METRICS_KEY) -> dict[str, tuple[str, list[Sample]]]:
    """Each metric family: its type and samples, parsed by prometheus_client's parser."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    resp = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert resp.status_code == 200
    return {
        family.name: (family.type, [(s.name, s.labels, s.value) for s in family.samples])
        for family in text_string_to_metric_families(resp.text)
    }


def value(families: dict[str, tuple[str, list[Sample]]], name: str, **labels: str) -> float:
    return sum(
        v
        for _, samples in families.values()
        for sample, found, v in samples
        if sample == name and all(found.get(k) == want for k, want in labels.items())
    )


@dataclass
class Scene:
    keys: dict[str, str]
    arm: str
    completion_id: str


@pytest.fixture(scope="module")
def scene(gateway: Gateway, base_spec: BaseModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Scene:
    """Tenant `metrics-a` with adapter `mbot` (2 versions) and alias `helpdesk` running an experiment
    between them, a tenant limited to one request a minute, and one more tenant."""
    keys = {OURS: create_key(gateway.env, OURS), SECOND: create_key(gateway.env, SECOND)}
    loragate(gateway.env, "tenants", "create", LIMITED, "--rpm", "1")
    keys[LIMITED] = create_key(gateway.env, LIMITED)
    tmp = tmp_path_factory.mktemp("metrics")
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=f"{gateway.url}/admin/tenants/{OURS}", headers=headers, timeout=120) as admin:
        assert add_synthetic(admin, base_spec, tmp, "mbot", seed=901) == "mbot@1"
        assert add_synthetic(admin, base_spec, tmp, "mbot", seed=902) == "mbot@2"
        assert admin.put("/aliases/helpdesk", json={"target": "mbot@1"}).status_code == 200
    loragate(
        gateway.env, "experiments", "create", "split", "--tenant", OURS, "--alias", "helpdesk",
        "--arm", "control=mbot@1:50", "--arm", "treatment=mbot@2:50",
    )  # fmt: skip
    client = openai.OpenAI(base_url=gateway.base_url, api_key=keys[OURS], max_retries=0, timeout=120)
    answered = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)  # type: ignore[arg-type]
    for _ in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, stream=True):  # type: ignore[arg-type]
        pass
    assert client.completions.create(model="mbot@2", prompt="Hi", max_tokens=2).model == "mbot@2"
    raw = client.chat.completions.with_raw_response.create(model="helpdesk", messages=ASK, max_tokens=2, user="u1")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=ASK, max_tokens=2)  # type: ignore[arg-type]
    limited = openai.OpenAI(base_url=gateway.base_url, api_key=keys[LIMITED], max_retries=0, timeout=120)
    limited.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError):
        limited.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)  # type: ignore[arg-type]
    feedback = httpx.post(
        f"{gateway.base_url}/feedback",
        json={"completion_id": answered.id, "thumbs": "up"},
        headers={"Authorization": f"Bearer {keys[OURS]}"},
        timeout=30,
    )
    assert feedback.status_code in (200, 202), feedback.text
    return Scene(keys, raw.headers["x-loragate-arm"], answered.id)


def test_requests_are_counted_by_tenant_model_adapter_and_arm(gateway: Gateway, scene: Scene) -> None:
    found = scrape(gateway.url)
    assert found["loragate_requests"][0] == "counter" and found["loragate_request_duration_seconds"][0] == "histogram"
    assert found["loragate_time_to_first_token_seconds"][0] == "histogram"
    ours = {"tenant": OURS}
    base = {**ours, "route": "chat", "model": MODEL, "adapter": "", "arm": ""}
    assert value(found, "loragate_requests_total", **base, status="200") == 2
    assert value(found, "loragate_request_duration_seconds_count", **base) == 2
    assert value(found, "loragate_time_to_first_token_seconds_count", **base) == 1, "the stream only"
    adapter = {**ours, "route": "completions", "model": "mbot", "adapter": "mbot", "arm": ""}
    assert value(found, "loragate_requests_total", **adapter, status="200") == 1, "mbot@2 counts as mbot"
    assert value(found, "loragate_tokens_total", **adapter, kind="prompt") > 0
    assert value(found, "loragate_tokens_total", **adapter, kind="completion") > 0
    armed = {**ours, "route": "chat", "model": "helpdesk", "adapter": "mbot", "arm": scene.arm}
    assert value(found, "loragate_requests_total", **armed, status="200") == 1
    unknown = {**ours, "model": "", "adapter": "", "arm": ""}
    assert value(found, "loragate_requests_total", **unknown, status="404") == 1, "an unknown model adds no label"
    assert value(found, "loragate_request_errors_total", **unknown, type="model_not_found") == 1
    assert value(found, "loragate_requests_total", tenant=LIMITED, status="429") == 1
    assert value(found, "loragate_request_errors_total", tenant=LIMITED, type="rate_limit_exceeded") == 1
    assert value(found, "loragate_quota_refusals_total", tenant=LIMITED, kind="requests") == 1
    for _, samples in found.values():
        for _, labels, _ in samples:
            assert "@" not in labels.get("model", "") + labels.get("adapter", ""), "versions roll up"


def test_engines_adapters_feedback_and_spools_are_on_metrics(gateway: Gateway, scene: Scene) -> None:
    found = scrape(gateway.url)
    for port in gateway.engine_ports:
        assert value(found, "loragate_engine_up", replica=f"http://127.0.0.1:{port}") == 1
    assert value(found, "loragate_adapter_loads_total", tenant=OURS, adapter="mbot", outcome="ok") >= 1
    assert value(found, "loragate_adapter_load_seconds_count", tenant=OURS, adapter="mbot") >= 1
    assert value(found, "loragate_adapter_resident", tenant=OURS, adapter="mbot") >= 1
    assert value(found, "loragate_replica_adapters") >= 1, "what the replicas list"
    assert value(found, "loragate_feedback_total", tenant=OURS) == 1
    assert {labels["spool"] for _, labels, _ in found["loragate_spool_pending"][1]} == {"records", "feedback"}
    assert found["loragate_inflight_requests"][0] == "gauge"
    assert value(found, "loragate_metrics_tenants") >= 2, "metrics-a and metrics-rpm at least"
    assert (
        httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {scene.keys[OURS]}"}).status_code == 401
    )


def _names(families: dict[str, tuple[str, list[Sample]]]) -> set[str]:
    """Every series name a scrape offers: sample names, and the names a family with no samples yet would have."""
    ends = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {n for f, (kind, samples) in families.items() for n in [f, *(f + e for e in ends.get(kind, ()))]} | {
        s for _, samples in families.values() for s, _, _ in samples
    }


def test_the_dashboard_uses_only_series_the_gateway_and_vllm_expose(gateway: Gateway, scene: Scene) -> None:
    ours = dashboard_series("loragate_")
    assert ours and not ours - _names(scrape(gateway.url)), ours - _names(scrape(gateway.url))
    engine = scrape(f"http://127.0.0.1:{gateway.engine_ports[0]}", key=None)
    theirs = dashboard_series("vllm:")
    assert theirs and not theirs - _names(engine), theirs - _names(engine)


@pytest.fixture
def sides(gateway: Gateway, redis_server: RedisServer, tmp_path: Path) -> Iterator[list[Gateway]]:
    """Two more gateway processes in front of the session's replicas, one tenant label each, writing
    their metrics to one multiprocess folder."""
    folder = fresh_multiprocess_dir(tmp_path / "prometheus")
    started = [
        start_side_gateway(
            tmp_path / f"side{i}",
            redis_server.url,
            gateway.engine_ports,
            LORAGATE_METRICS_MAX_TENANTS="1",
            PROMETHEUS_MULTIPROC_DIR=str(folder),
            LORAGATE_ADAPTER_STORE=str(Path(gateway.env["LORAGATE_HOME"]) / "adapters"),
        )
        for i in range(2)
    ]
    yield started
    for side in started:
        stop_gateway(side)


def test_tenants_past_the_cap_are_other_and_processes_add_up(scene: Scene, sides: list[Gateway]) -> None:
    for side in sides:
        for tenant in (OURS, SECOND):
            client = openai.OpenAI(base_url=side.base_url, api_key=scene.keys[tenant], max_retries=0, timeout=120)
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)  # type: ignore[arg-type]
    for side in sides:
        found = scrape(side.url)
        requests = found["loragate_requests"][1]
        assert sum(v for _, _, v in requests) == 4, "either process answers for both"
        assert {labels["tenant"] for _, labels, _ in requests} <= {OURS, SECOND, OTHER}
        past = [labels for _, labels, _ in requests if labels["tenant"] == OTHER]
        assert past and all(labels["model"] == OTHER for labels in past), "one label each: the other tenant is other"
        assert value(found, "loragate_metrics_tenants") == 1
        assert len(found["loragate_engine_up"][1]) == len(sides[0].engine_ports), "one series a replica, not a process"


def test_workers_of_one_gateway_answer_one_sum(
    gateway: Gateway, redis_server: RedisServer, scene: Scene, tmp_path: Path
) -> None:
    """`LORAGATE_WORKERS=2` and no PROMETHEUS_MULTIPROC_DIR: `loragate serve` gives its workers one
    folder, so whichever worker a scrape reaches, it counts every worker's requests."""
    side = start_side_gateway(tmp_path / "workers", redis_server.url, gateway.engine_ports, LORAGATE_WORKERS="2")
    try:
        folder = tmp_path / "workers" / "prometheus" / side.url.rpartition(":")[2]
        sent = 0
        # A kept-alive connection stays with one worker, and the kernel need not spread new ones
        # evenly, so each request opens its own connection until both workers have answered.
        while sent < 6 or (len(_answered_by(folder)) < 2 and sent < 60):
            with openai.OpenAI(base_url=side.base_url, api_key=scene.keys[SECOND], max_retries=0) as client:
                client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)  # type: ignore[arg-type]
            sent += 1
        assert len(_answered_by(folder)) == 2, "both workers answered"
        for _ in range(4):
            found = scrape(side.url)
            assert value(found, "loragate_requests_total", tenant=SECOND, status="200") == sent
            assert len(found["loragate_engine_up"][1]) == len(gateway.engine_ports)
    finally:
        stop_gateway(side)


def _answered_by(folder: Path) -> dict[str, float]:
    """Requests each worker counted (by process id), read from its own file in the multiprocess folder."""
    answered: dict[str, float] = {}
    for path in folder.glob("counter_*.db"):
        for key, count, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "loragate_requests_total" and count > 0:
                pid = path.stem.rpartition("_")[2]
                answered[pid] = answered.get(pid, 0.0) + count
    return answered
