"""The gateway's metrics: labels (versions rolled up, the tenant cap), what one finished request counts,
the gauges read off replica state, several processes added up, and the Grafana dashboard's queries
checked against the metrics that exist. Expositions are read back with Prometheus's own parser."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway.context import RequestContext
from gateway.engine.pool import Replica
from gateway.metrics import (
    OTHER,
    Metrics,
    TenantLabels,
    fresh_multiprocess_dir,
    join_multiprocess_dir,
    sample_names,
)
from gateway.routing import Route
from gateway.tenants import Tenant
from tests.conftest import METRICS_KEY, ROOT, RedisServer, free_port, start_side_gateway, stop_gateway
from tests.unit.test_placement import route as placement_route

DASHBOARD = ROOT / "deploy/grafana/dashboards/loragate.json"
BASE = "SmolLM2-135M-Instruct"
RESIDENT = "loragate_adapter_resident"


def samples(metrics: Metrics, name: str) -> list[tuple[dict[str, str], float]]:
    text = metrics.exposition().decode()
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def adapter_route(requested: str, owner: str, version: int, tenant: str, **more: str) -> Route:
    name = requested.split("/")[-1].partition("@")[0]
    manifest = placement_route(name).adapter.model_copy(update={"version": version})  # type: ignore[union-attr]
    shown = manifest.ref if owner == tenant else f"{owner}/{manifest.ref}"
    return Route(requested, f"{owner}.{manifest.ref}", shown, manifest, "/nowhere", **more)  # type: ignore[arg-type]


def finished(tenant: str, route: Route | None, status: int = 200, **answer: object) -> RequestContext:
    context = RequestContext("req", "chat", Tenant(name=tenant), None, payload={}, route=route)
    context.answer.usage = answer.get("usage")  # type: ignore[assignment]
    if answer.get("stream"):
        context.first_token()
    context.finish(status, answer.get("error"))  # type: ignore[arg-type]
    return context


def test_the_first_tenants_seen_are_named_and_the_rest_are_other() -> None:
    labels = TenantLabels(2)
    assert [labels(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", OTHER, "a", OTHER, "b"]
    assert labels.named == {"a", "b"}


def test_request_labels_roll_versions_up_and_hide_names_past_the_cap() -> None:
    metrics = Metrics(max_tenants=2)
    base = Route(BASE, BASE, BASE)
    own = adapter_route("bot@3", "acme", 3, "acme")
    shared = adapter_route("acme/bot", "acme", 3, "beta")
    armed = adapter_route("bot@2", "acme", 2, "acme", alias="support", experiment="tone", arm="treatment")
    armed = Route("support", armed.upstream_model, armed.served_model, armed.adapter, "/x", "support", "tone", "b")
    assert metrics.request_labels("chat", "acme", base) == ("chat", "acme", BASE, "", "")
    assert metrics.request_labels("chat", "acme", own) == ("chat", "acme", "bot", "bot", "")
    assert metrics.request_labels("completions", "beta", shared) == ("completions", "beta", "acme/bot", "acme/bot", "")
    assert metrics.request_labels("chat", "acme", armed) == ("chat", "acme", "support", "bot", "b")
    assert metrics.request_labels("chat", "acme", None) == ("chat", "acme", "", "", ""), "refused before routing"
    assert metrics.request_labels("chat", "gamma", armed) == ("chat", OTHER, OTHER, OTHER, OTHER)
    assert metrics.request_labels("chat", "gamma", base) == ("chat", OTHER, OTHER, "", "")
    assert metrics.adapter_labels("acme.bot@3") == ("acme", "bot")
    assert metrics.adapter_labels("gamma.secret@1") == (OTHER, OTHER)


def test_a_tenants_names_past_its_cap_are_other_so_its_aliases_and_adapters_cannot_grow_the_series() -> None:
    """A manage key makes aliases and uploads adapters without bound: each name it then called made about 40 series
    in every process, kept until it ended, whatever the tenant cap."""
    metrics = Metrics(max_tenants=10, max_names=2)
    first, second = adapter_route("a@1", "acme", 1, "acme"), adapter_route("b@1", "acme", 1, "acme")
    third = adapter_route("c@1", "acme", 1, "acme")
    assert [metrics.request_labels("chat", "acme", r)[2:] for r in (first, second, third, first)] == [
        ("a", "a", ""), ("b", "b", ""), (OTHER, OTHER, ""), ("a", "a", "")
    ]  # fmt: skip
    assert metrics.request_labels("chat", "beta", third)[2:] == ("c", "c", ""), "each tenant's own names"
    loads = [metrics.adapter_labels(f"acme.{name}@1") for name in ("x", "y", "z", "x")]
    assert loads == [("acme", "x"), ("acme", "y"), ("acme", OTHER), ("acme", "x")]


def test_a_finished_request_is_counted_with_its_latency_first_token_tokens_and_error() -> None:
    metrics = Metrics()
    own = adapter_route("bot@3", "acme", 3, "acme")
    metrics.request_finished(finished("acme", own, usage={"prompt_tokens": 7, "completion_tokens": 3}, stream=True))
    metrics.request_finished(finished("acme", own, usage={"prompt_tokens": 5, "completion_tokens": 2}))
    metrics.request_finished(finished("acme", None, 429, error="rate_limit_exceeded"))
    metrics.request_finished(finished("acme", own, 499))
    ours = {"route": "chat", "tenant": "acme", "model": "bot", "adapter": "bot", "arm": ""}
    assert samples(metrics, "loragate_requests_total") == [
        ({**ours, "status": "200"}, 2.0),
        ({**ours, "model": "", "adapter": "", "status": "429"}, 1.0),
        ({**ours, "status": "499"}, 1.0),
    ]
    errors = samples(metrics, "loragate_request_errors_total")
    assert errors == [({**ours, "model": "", "adapter": "", "type": "rate_limit_exceeded"}, 1.0)], "499 is no error"
    assert samples(metrics, "loragate_tokens_total") == [
        ({**ours, "kind": "prompt"}, 12.0),
        ({**ours, "kind": "completion"}, 5.0),
    ]
    assert [v for labels, v in samples(metrics, "loragate_request_duration_seconds_count") if labels == ours] == [2.0]
    assert samples(metrics, "loragate_time_to_first_token_seconds_count") == [(ours, 1.0)], "streams only"
    assert not [n for n in sample_names(metrics.registry) if n.endswith("_created")]


def test_gauges_follow_the_replicas_and_resident_versions_roll_up() -> None:
    metrics = Metrics(max_tenants=1)
    up = Replica("http://e0", healthy=True, inflight=3, resident=dict.fromkeys(["acme.bot@1", "acme.bot@2", "z.q@1"]))
    down = Replica("http://e1", resident=dict.fromkeys(["acme.bot@2"]))
    metrics.refresh([up, down], {"records": 4, "feedback": 0})
    resident = {(labels["tenant"], labels["adapter"], labels["replica"]): v for labels, v in samples(metrics, RESIDENT)}
    assert resident == {
        ("acme", "bot", "http://e0"): 2,
        ("acme", "bot", "http://e1"): 1,
        (OTHER, OTHER, "http://e0"): 1,
    }
    assert samples(metrics, "loragate_engine_up") == [({"replica": "http://e0"}, 1.0), ({"replica": "http://e1"}, 0.0)]
    assert samples(metrics, "loragate_inflight_requests")[0] == ({"replica": "http://e0"}, 3.0)
    assert samples(metrics, "loragate_replica_adapters") == [
        ({"replica": "http://e0"}, 3.0),
        ({"replica": "http://e1"}, 1.0),
    ]
    assert samples(metrics, "loragate_spool_pending") == [({"spool": "records"}, 4.0), ({"spool": "feedback"}, 0.0)]
    assert samples(metrics, "loragate_metrics_tenants") == [({}, 1.0)]
    up.resident, down.resident = {}, {}
    metrics.refresh([up, down], {})
    assert samples(metrics, RESIDENT) == [], "an unloaded adapter's series goes"


WRITER = """
import os, sys, time
from gateway.metrics import Metrics
from gateway.engine.pool import Replica
metrics = Metrics()
metrics.requests.labels("chat", "acme", "bot", "bot", "", "200").inc(int(sys.argv[1]))
metrics.refresh([Replica("http://e0", healthy=True, inflight=int(sys.argv[1]))], {{}})
print("ready", flush=True)
{tail}
"""


def test_several_processes_are_added_up_and_a_gone_one_keeps_only_its_counters(tmp_path: Path) -> None:
    folder = fresh_multiprocess_dir(tmp_path / "prom")
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(ROOT)}

    def run(count: int, tail: str) -> subprocess.Popen[str]:
        code = textwrap.dedent(WRITER.format(tail=tail))
        process = subprocess.Popen([sys.executable, "-c", code, str(count)], env=env, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        return process

    staying = run(2, "time.sleep(60)")
    run(3, "").wait(timeout=30)
    try:
        reader = "from gateway.metrics import Metrics; import sys; sys.stdout.write(Metrics().exposition().decode())"
        text = subprocess.run([sys.executable, "-c", reader], env=env, capture_output=True, text=True, check=True)
        found = {s.name: s.value for f in text_string_to_metric_families(text.stdout) for s in f.samples}
    finally:
        staying.kill()
        staying.wait()
    assert found["loragate_requests_total"] == 5, "both processes' counters, the gone one's too"
    assert found["loragate_inflight_requests"] == 2, "only the live process's gauge"


def test_a_process_joining_a_metrics_folder_drops_live_gauges_left_under_its_pid(tmp_path: Path) -> None:
    """A container's gateway is pid 1 again after a restart, on the same folder (the pod's own /tmp): the earlier
    pid 1's live gauges were taken for its own (it is alive), and adapters it had loaded showed loaded for good."""
    folder = tmp_path / "prom"
    folder.mkdir()
    mine, another = folder / f"gauge_livemax_{os.getpid()}.db", folder / "gauge_livemax_999999999.db"
    counters = folder / f"counter_{os.getpid()}.db"
    for path in (mine, another, counters):
        path.write_bytes(b"")
    join_multiprocess_dir(folder)
    assert not mine.exists() and another.exists() and counters.exists(), "counters never go back"
    join_multiprocess_dir(tmp_path / "new" / "prom")
    assert (tmp_path / "new" / "prom").is_dir()


def test_one_process_serves_with_a_metrics_folder_it_was_given_that_does_not_exist_yet(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The chart sets PROMETHEUS_MULTIPROC_DIR on the pod's empty /tmp; `serve` with one worker made the folder only
    for several workers, and the gateway failed to start (prometheus_client opens its files there)."""
    folder = tmp_path / "not" / "yet"
    side = start_side_gateway(tmp_path / "home", redis_server.url, [free_port()], PROMETHEUS_MULTIPROC_DIR=str(folder))
    try:
        answer = httpx.get(f"{side.url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10)
    finally:
        stop_gateway(side)
    assert answer.status_code == 200 and "loragate_feedback_durable" in answer.text
    assert list(folder.glob("*.db")), "its values are in the folder it was given"


def _expressions(board: dict[str, object]) -> list[str]:
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "query", "definition") and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(board)
    return found


def dashboard_series(prefix: str) -> set[str]:
    """Series names the dashboard's queries use (PromQL identifiers that start with `prefix`)."""
    board = json.loads(DASHBOARD.read_text())
    words = (re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr) for expr in _expressions(board))
    return {word for found in words for word in found if word.startswith(prefix)}


def label_names(metrics: Metrics) -> dict[str, set[str]]:
    """Each metric family's labels, by the names its series have."""
    found: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            for name in sample_names_of(metric):
                found[name] = set(metric._labelnames) | ({"le"} if name.endswith("_bucket") else set())
    return found


def sample_names_of(metric: MetricWrapperBase) -> list[str]:
    ends = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(str(metric._type), [""])
    return [metric._name + end for end in ends]


def test_the_dashboard_queries_only_metrics_and_labels_the_gateway_has() -> None:
    metrics = Metrics()
    used = dashboard_series("loragate_")
    assert used and used <= sample_names(metrics.registry), used - sample_names(metrics.registry)
    labels = label_names(metrics)
    for expr in _expressions(json.loads(DASHBOARD.read_text())):
        for name, selector in re.findall(r"(loragate_[a-z_]+)\{([^}]*)\}", expr):
            keys = set(re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", selector))
            assert keys <= labels[name], (expr, keys - labels[name])
    board = DASHBOARD.read_text()
    for dimension in ("tenant", "model", "adapter", "arm", "replica"):
        assert f'"name": "{dimension}"' in board, f"the dashboard has a {dimension} variable"


def test_metric_names_follow_prometheus_conventions() -> None:
    metrics = Metrics()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            assert metric._name.startswith("loragate_") and metric._name == metric._name.lower()
            assert not metric._name.endswith("_total"), "the client adds _total to counters"
            if metric._type == "histogram":
                assert metric._name.endswith("_seconds"), "durations in seconds, the unit in the name"
