"""Retraining end to end, as `make demo` runs it, on real vLLM and Redis, on the CPU.

Simulated users call the support bot (the base, which does not know the ticket template) through the
OpenAI SDK and rate or correct every answer; `loragate train run` builds the dataset, trains an fp32
LoRA on the CPU, gates it through the gateway against the base, publishes it and starts a canary whose
guard rails promote it. Also: an unpublished candidate is invisible to everyone but a training key.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from adapters.manifest import AdapterRef
from adapters.store import AdapterStore
from adapters.synthetic import make_adapter
from adapters.validate import BaseModelSpec
from gateway import keys
from tests.conftest import ADMIN_KEY, ROOT, Gateway, create_key, sync_redis_client

pytestmark = pytest.mark.integration
TENANT = "retrain-e2e"
ASK = [{"role": "user", "content": "Say hi."}]


def test_an_unpublished_candidate_is_called_only_with_a_training_key(
    gateway: Gateway, base_spec: BaseModelSpec, tmp_path: Path
) -> None:
    inference = create_key(gateway.env, "cand-t")
    training = create_key(gateway.env, "cand-t", "--role", "training")
    store = AdapterStore(Path(gateway.env["LORAGATE_HOME"]) / "adapters" / "cand-t", "cand-t")
    folder = make_adapter(tmp_path / "a", base_spec, seed=901)
    store.add(folder, "bot", base_spec, 16)
    staged = store.add(folder, "bot", base_spec, 16, listed=False, provenance={"run": "t"})
    users = openai.OpenAI(base_url=gateway.base_url, api_key=inference, max_retries=0)
    job = openai.OpenAI(base_url=gateway.base_url, api_key=training, max_retries=0)
    with pytest.raises(openai.NotFoundError) as refused:
        users.chat.completions.create(model=staged.ref, messages=ASK, max_tokens=2)  # type: ignore[arg-type]
    assert "bot@2" in refused.value.message and "does not exist" in refused.value.message
    assert "bot@2" not in {m.id for m in users.models.list()}
    assert users.chat.completions.create(model="bot", messages=ASK, max_tokens=2).model == "bot@1"  # type: ignore[arg-type]
    answer = job.chat.completions.create(model=staged.ref, messages=ASK, max_tokens=2)  # type: ignore[arg-type]
    assert answer.model == "bot@2", "the training key reaches the candidate by its exact name"
    logged = _record(gateway, "cand-t", answer.id)
    assert logged["request"] is None and logged["choices"] is None, "an eval's prompts (copied from the log): not kept"
    assert job.chat.completions.create(model="bot", messages=ASK, max_tokens=2).model == "bot@1", "never a default"  # type: ignore[arg-type]
    store.publish("bot", 2, {"metrics": {}})
    deadline = time.monotonic() + 30  # each try waits for vLLM, busy in CI
    while users.chat.completions.create(model="bot", messages=ASK, max_tokens=2).model != "bot@2":  # type: ignore[arg-type]
        assert time.monotonic() < deadline, "published: the bare name serves it"
        time.sleep(0.3)
    assert store.resolve(AdapterRef("bot")).provenance == {"run": "t", "metrics": {}}


def test_feedback_becomes_a_published_version_that_its_canary_promotes(gateway: Gateway, tmp_path: Path) -> None:
    """`make demo`'s loop with its config, but for a 50% canary in rounds of 32 users at once (each arm's 10 rated
    answers, the canary's minimum, usually come in one round: 22 s alone on the AVX2 kind, against 40 s for two of
    24, 16 at once) and 16 eval requests at once."""
    config = tmp_path / "config.yaml"
    settings = yaml.safe_load((ROOT / "demo/config.yaml").read_text())
    settings.update(canary_weight=50, eval_concurrency=16)
    config.write_text(yaml.safe_dump(settings))
    started = time.monotonic()
    demo = subprocess.run(
        [sys.executable, "-m", "demo", "--url", gateway.url, "--admin-key", ADMIN_KEY, "--tenant", TENANT,
         "--tickets", "120", "--canary-round", "32", "--concurrency", "32", "--config", str(config),
         "--timeout", "300", "--report", str(tmp_path / "phases.json")],
        env=gateway.env, cwd=ROOT, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    output = demo.stdout + demo.stderr
    report = tmp_path / "phases.json"
    outcome = report.read_text() if report.exists() else "(no report)"
    assert demo.returncode == 0, (
        f"{outcome}\nstdout:\n{demo.stdout[-4000:]}\nstderr:\n{demo.stderr[-2000:]}\ngateway:\n{gateway.log_tail(3000)}"
    )
    phases = json.loads(report.read_text())["seconds"]
    print(f"\nthe loop took {time.monotonic() - started:.0f} s ({phases})\n{demo.stdout[-3000:]}")
    runs = sorted((Path(gateway.env["LORAGATE_HOME"]) / "training" / TENANT).iterdir())
    state = json.loads((runs[-1] / "run.json").read_text())
    assert state["done"] == ["dataset", "fit", "eval", "publish"] and state["error"] is None
    scores = state["eval"]["scores"]
    base, candidate = scores["base"]["metrics"]["format"], scores["candidate"]["metrics"]["format"]
    assert base < 0.2 and candidate >= 0.9, f"format validity: base {base}, candidate {candidate}"
    assert state["published"] and state["canary"] and "published" in output and "promoted" in output
    with httpx.Client(
        base_url=f"{gateway.url}/admin/tenants/{TENANT}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as api:
        manifest = api.get(f"/adapters/{state['published']}").json()
        provenance = manifest["provenance"]
        assert manifest["listed"] and provenance["dataset_hash"] == state["data_card"]["dataset_hash"]
        assert provenance["base"] == "SmolLM2-135M-Instruct" and provenance["parent"] is None
        assert provenance["config"]["primary_metric"] == "format" and provenance["metrics"]["candidate"]
        experiment = api.get(f"/experiments/{state['canary']}").json()
        assert experiment["status"] == "promoted" and experiment["audit"][-1]["by"] == "guard rail"
        aliases = {a["alias"]: a["target"] for a in api.get("/aliases").json()["data"]}
        assert aliases["support-bot"] == state["published"], "the alias serves the promoted version"
        assert all(k["role"] != "training" for k in api.get("/keys").json()["data"]), "the eval's key was revoked"


def _record(gateway: Gateway, tenant: str, completion_id: str) -> dict[str, Any]:
    """A completion's record in the tenant's log, once the gateway has written it."""
    log = sync_redis_client(gateway.env["LORAGATE_REDIS_URL"], decode_responses=True)
    deadline = time.monotonic() + 30
    while True:
        found = [json.loads(f["r"]) for _, f in log.xrange(keys.completion_log(tenant))]
        mine = [record for record in found if record["id"] == completion_id]
        if mine:
            return dict(mine[0])
        assert time.monotonic() < deadline, f"{completion_id} was not recorded"
        time.sleep(0.1)
