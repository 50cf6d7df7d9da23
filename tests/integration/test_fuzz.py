"""Fuzzing the published OpenAPI schema: schemathesis reads /openapi.json from a real gateway (in front of
the session's real vLLM replicas, on a real Redis), sends every operation requests generated from it,
valid and invalid, and checks each answer: never a 5xx, and always what the schema says (a documented
status, a documented content type, a body that matches its schema).

Bounded in time: a few examples per operation, deterministic, no shrinking; LORAGATE_FUZZ_EXAMPLES
raises the count for a longer hunt.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis import engine
from schemathesis.engine import events

from tests.conftest import ADMIN_KEY, METRICS_KEY, MODEL, Gateway, create_key, start_side_gateway, stop_gateway

pytestmark = pytest.mark.integration

# The adapter upload takes a .tar.gz as it is: random bytes, sent as they are generated.
schemathesis.serializer.alias("application/gzip", "application/octet-stream")

FUZZ_TENANT = "fuzz"
TOKEN_CAP = 2
"""LORAGATE_MAX_TOKENS_CAP of the fuzzed gateway: every generation it forwards is lowered to 2 tokens, so
vLLM on CPU answers the fuzzer in well under a second whatever max_tokens or n it drew."""
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
EXAMPLES = int(os.environ.get("LORAGATE_FUZZ_EXAMPLES", "6"))
"""Generated requests per operation (twice as many for the two completion routes), besides the boundary
cases schemathesis derives from the schema itself."""
CEILING_S = 240
"""A ceiling, not the expected time: a run still going then is stopped, and fails."""


@pytest.fixture(scope="module")
def fuzzed(
    gateway: Gateway, redis_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, str]]:
    """A gateway of its own in front of the session's vLLM replicas, on Redis database 1: whatever tenants,
    keys, aliases or experiments the fuzzer creates or deletes stay out of the state other tests read.
    Returns it and a key of its tenant `fuzz`."""
    home: Path = tmp_path_factory.mktemp("fuzz-gateway")
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/1"
    side = start_side_gateway(home, redis_url, gateway.engine_ports, LORAGATE_MAX_TOKENS_CAP=str(TOKEN_CAP))
    try:
        yield side, create_key(side.env, FUZZ_TENANT)
    finally:
        stop_gateway(side)


def config(tenant_key: str) -> dict[str, Any]:
    """What schemathesis runs, in the words of its schemathesis.toml."""
    return {
        "generation": {"mode": "all", "max-examples": EXAMPLES, "no-shrink": True, "deterministic": True},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "request-timeout": 60,
        # Each route with the key it is for (schemathesis also sends each one request without a key).
        "operations": [
            {"include-path-regex": "^/v1/", "headers": {"Authorization": f"Bearer {tenant_key}"}},
            {"include-path-regex": "^/admin/", "headers": {"Authorization": f"Bearer {ADMIN_KEY}"}},
            {"include-path-regex": "^/(readyz|metrics)$", "headers": {"Authorization": f"Bearer {METRICS_KEY}"}},
            # The boundary cases already send the completion routes hundreds of invalid bodies: their
            # generated ones are valid, so they reach vLLM.
            {
                "include-path-regex": "^/v1/(chat/)?completions$",
                "phases": {"fuzzing": {"generation": {"mode": "positive", "max-examples": 2 * EXAMPLES}}},
            },
        ],
        # Constrained so the fuzzer gets past "not found" most of the time: a `{tenant}` that exists,
        # a `model` vLLM serves. Each is drawn from the dictionary 4 times out of 5, generated otherwise
        # (the boundary cases test unknown models: their `model` is "0").
        "dictionaries": {"tenants": {"values": [FUZZ_TENANT]}, "models": {"values": [MODEL]}},
        "parameters": {
            "path.tenant": {"dictionary": "tenants", "probability": 0.8},
            "body.model": {"dictionary": "models", "probability": 0.8},
            "path.model_id": {"dictionary": "models", "probability": 0.8},
        },
    }


@dataclass
class Report:
    """What a run found: failed checks, errors of the run itself, and the statuses each operation got."""

    failures: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    finished: events.EngineFinished | None = None

    def take(self, event: events.EngineEvent) -> None:
        if isinstance(event, events.ScenarioFinished):
            label, recorder = event.recorder.label, event.recorder
            counts = self.statuses.setdefault(label, Counter())
            counts.update(i.response.status_code if i.response else 0 for i in recorder.interactions.values())
            self.seconds[label] = self.seconds.get(label, 0.0) + event.elapsed_time
            for check in (check for checks in recorder.checks.values() for check in checks):
                if check.failure_info is not None:  # what failed, and the request that did it, as curl
                    found = check.failure_info.failure
                    self.failures.add(f"{label}: {found.title}\n{found.message}\n{check.failure_info.code_sample}")
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            self.errors.append(f"{getattr(event, 'label', 'run')}: {getattr(event, 'value', event)!r}")
        elif isinstance(event, events.EngineFinished):
            self.finished = event

    def summary(self) -> str:
        assert self.finished is not None
        total = sum(sum(counts.values()) for counts in self.statuses.values())
        lines = [f"{len(self.statuses)} operations, {total} requests, {self.finished.running_time:.0f} s"]
        for label, counts in sorted(self.statuses.items()):
            lines.append(f"  {label}: {self.seconds[label]:.1f} s, statuses {dict(sorted(counts.items()))}")
        return "\n".join(lines)


def test_every_answer_keeps_to_the_published_schema(fuzzed: tuple[Gateway, str]) -> None:
    side, tenant_key = fuzzed
    loaded = schemathesis.openapi.from_url(
        f"{side.url}/openapi.json", config=schemathesis.Config.from_dict(config(tenant_key))
    )
    report = Report()
    started = time.monotonic()
    run = engine.from_schema(loaded).execute()
    for event in run:
        report.take(event)
        if time.monotonic() - started > CEILING_S:
            run.stop()
    assert report.finished is not None
    print(report.summary())
    assert not report.errors, "\n".join(report.errors)
    assert not report.failures, "\n\n".join(sorted(report.failures))
    assert report.finished.stop_reason == "completed", f"stopped ({report.finished.stop_reason}):\n{report.summary()}"
    assert len(report.statuses) == sum(len(methods) for methods in loaded.raw_schema["paths"].values())
    for route in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert report.statuses[route][200] > 0, f"no request reached vLLM through {route}"
