"""Prometheus metrics (`/metrics`), with bounded labels.

Every label takes few values: routes, statuses, error codes, replicas, and names an operator created
(tenants, their aliases and adapters, experiment arms). Adapter versions roll up into their adapter,
and only the first `max_tenants` tenants a process sees get a label of their own; the others share
`other` (and so do their models, adapters and arms). Each process decides this alone, from its own
traffic: nothing is asked of Redis, and a label once given stays for the life of the process.

Several gateway processes: with PROMETHEUS_MULTIPROC_DIR set (`loragate serve` sets it for its
workers, see `fresh_multiprocess_dir`) every process writes its values in that folder and `/metrics`
adds them up (prometheus_client's multiprocess mode); without it, a scrape sees the process it reached.
"""

from __future__ import annotations

import os
import re
from collections import Counter as Tally
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.engine.pool import Replica
    from gateway.routing import Route

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
OTHER = "other"
"""The label of every tenant past the cap (and of its models, adapters and arms)."""
REQUEST_LABELS = ("route", "tenant", "model", "adapter", "arm")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


class TenantLabels:
    """Which tenants get a label of their own: the first `cap` this process sees; the rest are `other`."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.named: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self.named:
            return tenant
        if len(self.named) < self.cap:
            self.named.add(tenant)
            return tenant
        return OTHER

    def beyond(self, tenant: str, label: str) -> bool:
        """`tenant` got `other`: its own names are not shown either."""
        return label == OTHER and tenant != OTHER


class NameLabels:
    """Which of a tenant's names (model, adapter and arm together; or an adapter) get labels of their own: the first
    `cap` this process sees of each tenant; the rest are `other`. A manage key creates aliases and adapters without
    bound, and each name seen made series kept until the process ends."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: dict[str, set[Hashable]] = {}

    def shown(self, tenant: str, names: Hashable) -> bool:
        """Whether `names` get labels of their own (else they are `other`)."""
        seen = self.seen.get(tenant)
        if seen is None:
            seen = self.seen[tenant] = set()
        if names in seen:
            return True
        if len(seen) < self.cap:
            seen.add(names)
            return True
        return False


class _Series:
    """One request label set's children, each made on first use: a finished request then costs dictionary
    lookups, not label validation."""

    __slots__ = ("labels", "children")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.children: dict[tuple[MetricWrapperBase, str], Any] = {}

    def of(self, metric: MetricWrapperBase, extra: str = "") -> Any:
        child = self.children.get((metric, extra))
        if child is None:
            labels = (*self.labels, extra) if extra else self.labels
            child = self.children[(metric, extra)] = metric.labels(*labels)
        return child


class Metrics:
    """One registry per app, so several apps (tests) in one process never collide."""

    def __init__(self, max_tenants: int = 100, max_names: int = 10) -> None:
        disable_created_metrics()  # no `_created` twin of every counter and histogram series
        self.tenant = TenantLabels(max_tenants)
        self.names, self.adapters = NameLabels(max_names), NameLabels(max_names)
        self._series: dict[tuple[str, ...], _Series] = {}
        self._resident_shown: set[tuple[str, str, str]] = set()
        self.registry = r = CollectorRegistry()
        self._requests(r)
        self._engines(r)
        self._records(r)

    def _requests(self, r: CollectorRegistry) -> None:
        by = REQUEST_LABELS
        self.requests = Counter(
            "loragate_requests", "Completion requests that ended, by status (499: the client left).", [*by, "status"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "loragate_request_errors", "Completion requests that failed, by error code (else type).", [*by, "type"],
            registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "loragate_request_duration_seconds", "Answered requests, from arrival to the last byte.", by,
            registry=r, buckets=REQUEST_BUCKETS,
        )  # fmt: skip
        self.first_token = Histogram(
            "loragate_time_to_first_token_seconds", "Answered streams, from arrival to the first token.", by,
            registry=r, buckets=REQUEST_BUCKETS,
        )  # fmt: skip
        self.tokens = Counter(
            "loragate_tokens", "Tokens the engine reported: prompt (in) and completion (out).", [*by, "kind"],
            registry=r,
        )  # fmt: skip
        self.quota_refusals = Counter(
            "loragate_quota_refusals", "Requests refused with 429, by tenant and the limit hit (requests or tokens).",
            ["tenant", "kind"], registry=r,
        )  # fmt: skip
        self.quota_redis_failures = Counter(
            "loragate_quota_redis_failures",
            "Requests whose quota could not be checked (Redis down), by tenant and what was done (open: admitted).",
            ["tenant", "mode"], registry=r,
        )  # fmt: skip
        self.tenant_labels = Gauge(
            "loragate_metrics_tenants", "Tenants with a label of their own in this process (the rest: `other`).",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip

    def _engines(self, r: CollectorRegistry) -> None:
        self.engine_up = Gauge(
            "loragate_engine_up", "1 while a vLLM replica passes its health check.", ["replica"], registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.inflight = Gauge(
            "loragate_inflight_requests", "Requests in flight, by vLLM replica.", ["replica"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.upstream_errors = Counter(
            "loragate_upstream_errors", "Failed calls to vLLM replicas.", ["replica"], registry=r
        )
        self.upstream_resent = Counter(
            "loragate_upstream_resent",
            "Calls to vLLM replicas sent again on a new connection, the pooled one closed under them.",
            ["replica"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "loragate_adapter_loads", "Adapter loads into vLLM, by owner, adapter and outcome.",
            ["tenant", "adapter", "outcome"], registry=r,
        )  # fmt: skip
        self.adapter_load_seconds = Histogram(
            "loragate_adapter_load_seconds", "Making an adapter usable on a replica: integrity check, eviction, load.",
            ["tenant", "adapter"], registry=r, buckets=LOAD_BUCKETS,
        )  # fmt: skip
        self.adapter_evictions = Counter(
            "loragate_adapter_evictions", "Adapters unloaded to make room (LRU), by replica.", ["replica"], registry=r
        )
        self.adapter_resident = Gauge(
            "loragate_adapter_resident", "Versions of an adapter loaded on a replica, by owner and adapter.",
            ["tenant", "adapter", "replica"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.replica_adapters = Gauge(  # the same in every gateway: `max by (replica)`, where the above sums twice
            "loragate_replica_adapters", "Adapter versions loaded on a vLLM replica, as it lists them.",
            ["replica"], registry=r, multiprocess_mode="livemax",
        )  # fmt: skip

    def _records(self, r: CollectorRegistry) -> None:
        self.feedback = Counter(
            "loragate_feedback", "Feedback accepted, by tenant and where it went (redis, or spool: replayed later).",
            ["tenant", "stored"], registry=r,
        )  # fmt: skip
        self.feedback_spooled = Counter(
            "loragate_feedback_spooled", "Feedback acknowledged from the local spool (202), to be replayed.", registry=r
        )
        self.feedback_dropped = Counter(
            "loragate_feedback_dropped",
            "Spooled feedback dropped on replay: its completion was unknown or another tenant's.",
            registry=r,
        )  # fmt: skip
        self.feedback_durable = Gauge(
            "loragate_feedback_durable", "1 when Redis fsyncs feedback before answering (else it is spooled).",
            registry=r, multiprocess_mode="livemin",
        )  # fmt: skip
        self.records_written = Counter(
            "loragate_records_written", "Completion records written to the log in Redis.", registry=r
        )
        self.records_skipped = Counter(
            "loragate_records_skipped",
            "Completion records not written, on purpose: written already (a replay), of an end user erased or a "
            "tenant deleted since, or past the tenant's age limit.",
            registry=r,
        )
        self.records_spooled = Counter(
            "loragate_records_spooled", "Completion records spooled locally while Redis was unreachable.", registry=r
        )
        self.records_dropped = Counter(
            "loragate_records_dropped",
            "Completion records lost: queue_full (recorder behind), spool_full (oldest dropped), spool_error, "
            "refused (a record the script rejected), unbuildable.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.spool_pending = Gauge(
            "loragate_spool_pending", "Items waiting in the local spools, by spool.", ["spool"], registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip

    # -- labels ----------------------------------------------------------------------------------

    def request_labels(self, route_name: str, tenant: str, route: Route | None) -> tuple[str, ...]:
        """route, tenant, model (as the tenant named it, without version), adapter (name, or owner/name
        when shared; "" for the base), arm; "" where the request did not get that far."""
        named = self.tenant(tenant)
        if route is None:
            return route_name, named, "", "", ""
        model, adapter, arm = route.requested.partition("@")[0], route.adapter_label or "", route.arm or ""
        if self.tenant.beyond(tenant, named) or not self.names.shown(tenant, (model, adapter, arm)):
            model, adapter, arm = (OTHER if value else "" for value in (model, adapter, arm))
        return route_name, named, model, adapter, arm

    def adapter_labels(self, upstream: str) -> tuple[str, str]:
        """tenant (the owner) and adapter of a version as vLLM knows it (OWNER.NAME@V)."""
        owner, dot, rest = upstream.partition(".")
        if not dot:
            owner, rest = "", upstream
        named = self.tenant(owner) if owner else ""
        if self.tenant.beyond(owner, named):
            return named, OTHER
        name = rest.rpartition("@")[0] or rest
        return named, name if self.adapters.shown(owner, name) else (OTHER if name else "")

    # -- recording -------------------------------------------------------------------------------

    def request_finished(self, context: RequestContext) -> None:
        """A completion request ended (answered, refused, failed or cancelled): counted once, here."""
        labels = self.request_labels(context.endpoint, context.tenant.name, context.route)
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series(labels)
        series.of(self.requests, str(context.status)).inc()
        if context.outcome == "error" and context.error_type is not None:
            series.of(self.errors, context.error_type).inc()
        if context.outcome == "ok" and context.latency_s is not None:
            series.of(self.duration).observe(context.latency_s)
            if context.first_token_s is not None:
                series.of(self.first_token).observe(context.first_token_s)
        usage = context.answer.usage
        if usage:
            for kind in ("prompt", "completion"):
                count = usage.get(f"{kind}_tokens")
                if isinstance(count, int) and count > 0:
                    series.of(self.tokens, kind).inc(count)

    def adapter_loaded(self, upstream: str, outcome: str, seconds: float | None = None) -> None:
        labels = self.adapter_labels(upstream)
        self.adapter_loads.labels(*labels, outcome).inc()
        if seconds is not None:
            self.adapter_load_seconds.labels(*labels).observe(seconds)

    def refresh(self, replicas: Sequence[Replica], spools: Mapping[str, int]) -> None:
        """Gauges read off this process's state: replica health and load, resident adapters, spool depth."""
        resident: Tally[tuple[str, str, str]] = Tally()
        for replica in replicas:
            self.engine_up.labels(replica.url).set(1 if replica.healthy else 0)
            self.inflight.labels(replica.url).set(replica.inflight)
            self.replica_adapters.labels(replica.url).set(len(replica.resident))
            for name in replica.resident:
                resident[(*self.adapter_labels(name), replica.url)] += 1
        for gone in self._resident_shown - resident.keys():
            self.adapter_resident.labels(*gone).set(0)  # what multiprocess mode keeps of a removed series
            self.adapter_resident.remove(*gone)
        for labels, count in resident.items():
            self.adapter_resident.labels(*labels).set(count)
        self._resident_shown = set(resident)
        for name, pending in spools.items():
            self.spool_pending.labels(name).set(pending)
        self.tenant_labels.set(len(self.tenant.named))

    def exposition(self) -> bytes:
        """What `/metrics` answers: this process's metrics, or every process's in multiprocess mode.
        Blocking (files, formatting): called off the event loop."""
        folder = os.environ.get(MULTIPROC_ENV)
        if not folder:
            return generate_latest(self.registry)
        forget_dead_processes(Path(folder))
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=folder)
        return generate_latest(merged)


def forget_dead_processes(folder: Path) -> None:
    """Drop the live gauges (in flight, engine health, spool depth...) of processes that are gone; their
    counters stay, so totals never go back."""
    for path in folder.glob("gauge_live*.db"):
        found = _LIVE_GAUGE_FILE.fullmatch(path.name)
        if found is None:
            continue
        try:
            os.kill(int(found[1]), 0)
        except ProcessLookupError:
            mark_process_dead(int(found[1]), str(folder))
        except PermissionError:
            continue


def join_multiprocess_dir(folder: Path) -> None:
    """Make the operator's PROMETHEUS_MULTIPROC_DIR ready for this process without emptying it (other processes
    may be writing to it), dropping the live gauges left under this process's pid: restarted in a container, the
    gateway is pid 1 again, and an earlier pid 1's resident adapters stayed on /metrics as loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    mark_process_dead(os.getpid(), str(folder))


def fresh_multiprocess_dir(folder: Path) -> Path:
    """A folder for PROMETHEUS_MULTIPROC_DIR with no values in it, made ready by the process that starts
    the workers, before it starts them (values left by an earlier run would be added to this one's)."""
    folder.mkdir(parents=True, exist_ok=True)
    for left in folder.glob("*.db"):
        left.unlink()
    return folder


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry's metrics expose (histograms' _bucket, _sum, _count; counters' _total)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + end for family in registry.collect() for end in suffixes.get(family.type, ("",))}
