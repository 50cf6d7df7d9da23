"""Prometheus metrics. Labels are bounded: routes, served model names, replicas, statuses, tenants."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LOAD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """One registry per app, so several apps (tests) in one process never collide."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "loragate_requests",
            "Requests answered, by route, served model (adapter name@version) and HTTP status.",
            ["route", "model", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "loragate_request_duration_seconds",
            "Time to the full (non-stream) or first (stream) response.",
            ["route"],
            registry=r,
            buckets=REQUEST_BUCKETS,
        )
        self.tokens = Counter(
            "loragate_tokens", "Tokens reported by the engine, by model and kind.", ["model", "kind"], registry=r
        )
        self.upstream_errors = Counter(
            "loragate_upstream_errors", "Connection failures to vLLM replicas.", ["replica"], registry=r
        )
        self.inflight = Gauge(
            "loragate_inflight_requests", "Requests in flight, by vLLM replica.", ["replica"], registry=r
        )
        self.adapter_loads = Counter(
            "loragate_adapter_loads",
            "Adapter loads into vLLM, by adapter and outcome.",
            ["adapter", "outcome"],
            registry=r,
        )
        self.adapter_load_seconds = Histogram(
            "loragate_adapter_load_seconds",
            "Time to make an adapter usable on a replica: integrity check, eviction, vLLM load.",
            ["adapter"],
            registry=r,
            buckets=LOAD_BUCKETS,
        )
        self.adapter_evictions = Counter(
            "loragate_adapter_evictions", "Adapters unloaded to make room (LRU), by replica.", ["replica"], registry=r
        )
        self.quota_redis_failures = Counter(
            "loragate_quota_redis_failures",
            "Requests whose quota could not be checked (Redis down), by tenant and what was done (open: admitted).",
            ["tenant", "mode"],
            registry=r,
        )
        self.quota_refusals = Counter(
            "loragate_quota_refusals",
            "Requests refused with 429, by tenant and the limit they hit (requests or tokens).",
            ["tenant", "kind"],
            registry=r,
        )
        self.adapter_resident = Gauge(
            "loragate_adapter_resident",
            "1 while an adapter is loaded on a replica.",
            ["adapter", "replica"],
            registry=r,
        )
        self.records_written = Counter(
            "loragate_records_written", "Completion records written to the log in Redis.", registry=r
        )
        self.records_spooled = Counter(
            "loragate_records_spooled", "Completion records spooled locally while Redis was unreachable.", registry=r
        )
        self.records_dropped = Counter(
            "loragate_records_dropped",
            "Completion records lost: queue_full (recorder behind), spool_full (oldest dropped), spool_error.",
            ["reason"],
            registry=r,
        )
        self.feedback_spooled = Counter(
            "loragate_feedback_spooled", "Feedback acknowledged from the local spool (202), to be replayed.", registry=r
        )
        self.feedback_dropped = Counter(
            "loragate_feedback_dropped",
            "Spooled feedback dropped on replay: its completion was unknown or another tenant's.",
            registry=r,
        )
        self.feedback_durable = Gauge(
            "loragate_feedback_durable",
            "1 when Redis fsyncs feedback before answering (else it is spooled).",
            registry=r,
        )
        self.spool_pending = Gauge(
            "loragate_spool_pending", "Items waiting in the local spools, by spool.", ["spool"], registry=r
        )
