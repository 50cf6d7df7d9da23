"""The Helm chart (deploy/helm/loragate), rendered and linted by Helm's own code without a cluster (see
tests/unit/deploy_tools.py), its manifests validated against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields are errors) and checked for what loragate needs from them.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.unit.deploy_tools import DEPLOY, DROPS_ADAPTER_NAMES, Manifest, find, helm_lint, helm_render, manifests
from training.config import load as load_retrain_config

FULL = "lg-loragate"
RETRAIN = {
    "retraining": {
        "enabled": True,
        "jobs": [
            {
                "tenant": "acme",
                "alias": "support-bot",
                "config": {"epochs": 2, "lora_r": 8, "regression_jsonl": "/etc/loragate/retrain/regression.jsonl"},
                "files": {"regression.jsonl": '{"prompt": "Reset my password", "completion": "Settings."}\n'},
                "extraArgs": ["--epochs", 3],
            },
            {"tenant": "Globex Corp", "alias": "triage", "gpu": True, "schedule": "30 2 * * *"},
        ],
    }
}
OVERRIDES = {
    "fullnameOverride": "a-release-name-far-longer-than-forty-characters",
    "redis": {"enabled": False, "externalUrl": "redis://redis.shared:6379/3"},
    "networkPolicy": {"enabled": False},
    "engine": {"replicas": 3, "extraArgs": ["--max-model-len", "4096"]},
    "adminKey": {"existingSecret": "my-admin"},
    "metricsKey": {"value": "my-metrics-key-0123"},
    "storage": {"existingClaim": "shared-nfs"},
    "retraining": {**RETRAIN["retraining"], "gpu": True, "timeZone": "Europe/Berlin", "ttlSecondsAfterFinished": 600},
}


@pytest.fixture(scope="module")
def default() -> list[Manifest]:
    return manifests(helm_render({}))


@pytest.fixture(scope="module")
def retrain() -> list[Manifest]:
    return manifests(helm_render(RETRAIN))


@pytest.mark.parametrize("values", [{}, RETRAIN, OVERRIDES], ids=["defaults", "retraining", "overrides"])
def test_chart_lints_clean_and_renders_valid_kubernetes_objects(values: dict[str, Any]) -> None:
    assert helm_lint(values) == []
    objects = manifests(helm_render(values))
    assert objects
    for obj in objects:
        for version in ("1.27.0", kubernetes_validate.latest_version()):  # CronJob timeZone: 1.27
            kubernetes_validate.validate(obj, version, strict=True)


def test_gateway_runs_two_probed_replicas_with_keys_from_secrets(default: list[Manifest]) -> None:
    deployment = find(default, "Deployment", f"{FULL}-gateway")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = find(default, "ConfigMap", f"{FULL}-config")["data"]
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", int(config["LORAGATE_PORT"]))
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["envFrom"] == [{"configMapRef": {"name": f"{FULL}-config"}}]
    env = {e["name"]: e for e in container["env"]}
    assert env["LORAGATE_WORKERS"]["value"] == "1"
    for variable, secret, key in [
        ("LORAGATE_ADMIN_KEY", f"{FULL}-admin", "admin-key"),
        ("LORAGATE_METRICS_KEY", f"{FULL}-metrics", "metrics-key"),
    ]:
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
        assert len(base64.b64decode(find(default, "Secret", secret)["data"][key])) == 40
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = find(default, "Service", f"{FULL}-gateway")["spec"]
    assert service["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] == "http"


def test_keys_given_or_brought_are_used(default: list[Manifest]) -> None:
    objects = manifests(helm_render(OVERRIDES))
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    name = OVERRIDES["fullnameOverride"][:40]
    assert set(secrets) == {f"{name}-metrics"}  # the admin key's Secret is the user's own
    assert base64.b64decode(secrets[f"{name}-metrics"]["data"]["metrics-key"]) == b"my-metrics-key-0123"
    env = {e["name"]: e for e in _container(find(objects, "Deployment", f"{name}-gateway"))["env"]}
    assert env["LORAGATE_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "my-admin"


@pytest.mark.parametrize("which", ["adminKey", "metricsKey"])
def test_a_key_the_gateway_would_refuse_is_refused_by_the_chart(which: str) -> None:
    """The gateway refuses operator keys under 16 characters or with spaces: the chart installed them, and every
    gateway pod went into CrashLoopBackOff."""
    for bad in ("short", "sixteen chars ok"):
        with pytest.raises(AssertionError, match=f"{which}.value must be at least 16 characters"):
            helm_render({which: {"value": bad}})
    name = f"{FULL}-{'admin' if which == 'adminKey' else 'metrics'}"
    for unset in (None, "  "):  # `value:` left empty in a values file is null: a key is generated, as for ""
        secret = find(manifests(helm_render({which: {"value": unset}})), "Secret", name)
        assert len(base64.b64decode(next(iter(secret["data"].values())))) == 40


def test_the_gateway_shares_its_home_with_the_jobs_and_keeps_its_metrics_to_itself(retrain: list[Manifest]) -> None:
    """The gateway's home was not the jobs', so deleting a tenant left its retraining runs (its log's copies) behind;
    each pod's metrics files are its own."""
    gateway = _container(find(retrain, "Deployment", f"{FULL}-gateway"))
    job = _container(find(retrain, "CronJob", f"{FULL}-retrain-acme-support-bot"))
    home = {e["name"]: e.get("value") for e in gateway["env"]}
    assert home["LORAGATE_HOME"] == {e["name"]: e.get("value") for e in job["env"]}["LORAGATE_HOME"]
    mounts = {m["mountPath"]: m["name"] for m in gateway["volumeMounts"]}
    assert mounts[home["LORAGATE_HOME"]] == "data", "on the shared volume"
    assert home["LORAGATE_SPOOL_DIR"].startswith("/tmp/"), "the pod's own unless the operator trusts flock (values)"
    unset = _container(find(manifests(helm_render({"gateway": {"spoolDir": ""}})), "Deployment", f"{FULL}-gateway"))
    assert "LORAGATE_SPOOL_DIR" not in {e["name"] for e in unset["env"]}, "empty: the gateway's default"
    metrics = home["PROMETHEUS_MULTIPROC_DIR"]
    assert metrics.startswith("/tmp/") and mounts["/tmp"] == "tmp", "each pod's own (a pod clears it as it starts)"


def test_redis_is_bounded_by_its_own_maxmemory_below_its_memory_limit(default: list[Manifest]) -> None:
    """Without maxmemory, Redis past its container's limit was killed (keys and quotas with it) and killed again
    as it reloaded; with noeviction it refuses writes, and the gateway spools."""
    redis = _container(find(default, "Deployment", f"{FULL}-redis"))
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    bound = args[args.index("--maxmemory") + 1]
    assert bound.endswith("mb") and int(bound[:-2]) * 2**20 <= 0.8 * _bytes(redis["resources"]["limits"]["memory"])
    assert args[args.index("--save") + 1] == "", "AOF only: no snapshot forks"


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]]


def test_every_container_requests_cpu_and_memory(retrain: list[Manifest]) -> None:
    pods = [_pod(o) for o in retrain if o["kind"] in ("Deployment", "StatefulSet", "CronJob")]
    assert len(pods) == 5  # gateway, engine, redis, two retraining jobs
    for pod in pods:
        for container in pod["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]
            assert "memory" in container["resources"]["limits"], container["name"]


@pytest.mark.parametrize(
    ("values", "name", "replicas"), [({}, FULL, 2), (OVERRIDES, OVERRIDES["fullnameOverride"][:40], 3)]
)
def test_engine_urls_name_every_vllm_replica(values: dict[str, Any], name: str, replicas: int) -> None:
    objects = manifests(helm_render(values))
    engine = find(objects, "StatefulSet", f"{name}-engine")
    service = find(objects, "Service", f"{name}-engine")
    assert engine["spec"]["replicas"] == replicas
    assert service["spec"]["clusterIP"] == "None" and engine["spec"]["serviceName"] == f"{name}-engine"
    container = _container(engine)
    port = container["ports"][0]["containerPort"]
    assert {e["name"]: e.get("value") for e in container["env"]}["VLLM_PORT"] == str(port)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    urls = find(objects, "ConfigMap", f"{name}-config")["data"]["LORAGATE_ENGINE_URLS"].split(",")
    host = f"{name}-engine.loragate.svc.cluster.local"
    assert urls == [f"http://{name}-engine-{i}.{host}:{port}" for i in range(replicas)]


def test_redis_appends_to_a_persistent_file_and_is_where_the_gateway_looks(default: list[Manifest]) -> None:
    redis = find(default, "Deployment", f"{FULL}-redis")
    args = _container(redis)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (volume,) = redis["spec"]["template"]["spec"]["volumes"]
    assert find(default, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    url = urlsplit(find(default, "ConfigMap", f"{FULL}-config")["data"]["LORAGATE_REDIS_URL"])
    service = find(default, "Service", url.hostname or "")
    assert service["spec"]["ports"][0]["port"] == url.port
    external = manifests(helm_render(OVERRIDES))
    assert not [o for o in external if "redis" in o["metadata"]["name"]]
    name = OVERRIDES["fullnameOverride"][:40]
    assert find(external, "ConfigMap", f"{name}-config")["data"]["LORAGATE_REDIS_URL"] == "redis://redis.shared:6379/3"
    with pytest.raises(AssertionError, match="redis.externalUrl is required"):
        helm_render({"redis": {"enabled": False}})


def test_gateway_engine_and_jobs_mount_one_adapter_store(retrain: list[Manifest]) -> None:
    store = find(retrain, "ConfigMap", f"{FULL}-config")["data"]["LORAGATE_ADAPTER_STORE"]
    users = [o for o in retrain if o["kind"] in ("Deployment", "StatefulSet", "CronJob")]
    for obj in (o for o in users if o["metadata"]["name"] != f"{FULL}-redis"):
        pod = _pod(obj)
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        mounts = [m for m in pod["containers"][0]["volumeMounts"] if store.startswith(m["mountPath"] + "/")]
        assert [claims[m["name"]] for m in mounts] == [f"{FULL}-data"], obj["metadata"]["name"]


def test_retraining_cronjobs_run_train_against_this_release(retrain: list[Manifest], tmp_path: Path) -> None:
    assert not [o for o in manifests(helm_render({})) if o["kind"] == "CronJob"]  # off by default
    job = find(retrain, "CronJob", f"{FULL}-retrain-acme-support-bot")
    spec = job["spec"]
    assert (spec["schedule"], spec["concurrencyPolicy"]) == ("0 3 * * 0", "Forbid")
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 0
    container = _container(job)
    args = container["args"]
    assert args[:6] == ["train", "run", "--tenant", "acme", "--alias", "support-bot"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    gateway_port = find(retrain, "Service", f"{FULL}-gateway")["spec"]["ports"][0]["port"]
    assert env["LORAGATE_URL"] == f"http://{FULL}-gateway.loragate.svc.cluster.local:{gateway_port}"
    assert container["envFrom"] == [{"configMapRef": {"name": f"{FULL}-config"}}]
    # The rendered config files, as the job reads them: retrain.yaml and the flags after `--`.
    # The ConfigMap's files, mounted here at tmp_path instead of the job's folder.
    config_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    assert args[args.index("--config") + 1] == f"{config_dir}/retrain.yaml"
    for name, text in find(retrain, "ConfigMap", f"{FULL}-retrain-acme-support-bot")["data"].items():
        (tmp_path / name).write_text(text.replace(config_dir, str(tmp_path)))
    config = load_retrain_config(tmp_path / "retrain.yaml", args[args.index("--") + 1 :])
    assert (config.epochs, config.lora_r) == (3, 8)
    assert config.regression_jsonl == str(tmp_path / "regression.jsonl")
    gpu = _container(find(retrain, "CronJob", f"{FULL}-retrain-globex-corp-triage"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    with pytest.raises(AssertionError, match=r"retraining.jobs\[0\].alias is required"):
        helm_render({"retraining": {"enabled": True, "jobs": [{"tenant": "acme"}]}})


def test_network_policies_admit_the_gateway_and_the_jobs(retrain: list[Manifest]) -> None:
    labels = {
        part: _pod_template(find(retrain, kind, f"{FULL}-{part}"))["metadata"]["labels"]
        for kind, part in [("Deployment", "gateway"), ("StatefulSet", "engine"), ("Deployment", "redis")]
    }
    job_labels = _pod_template(find(retrain, "CronJob", f"{FULL}-retrain-acme-support-bot"))["metadata"]["labels"]
    for part, admitted in [("engine", [labels["gateway"]]), ("redis", [labels["gateway"], job_labels])]:
        policy = find(retrain, "NetworkPolicy", f"{FULL}-{part}")["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= labels[part].items()
        selectors = [peer["podSelector"]["matchLabels"] for peer in policy["ingress"][0]["from"]]
        assert len(selectors) == len(admitted)
        for selector, pod in zip(selectors, admitted, strict=True):
            assert selector.items() <= pod.items()


def test_kubernetes_scrape_config_finds_both_gateway_pods_and_every_vllm(default: list[Manifest]) -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "kubernetes-scrape-config.yml").read_text())
    jobs = {job["job_name"]: job["relabel_configs"] for job in scrape["scrape_configs"]}
    kept: dict[str, list[str]] = {job: [] for job in jobs}
    for obj in (o for o in default if o["kind"] in ("Deployment", "StatefulSet")):
        for replica in range(obj["spec"]["replicas"]):
            for meta in _discovered_targets(obj):
                for job, rules in jobs.items():
                    if _kept(rules, meta):
                        kept[job].append(f"{obj['metadata']['name']}-{replica}:{meta['port']}")
    assert kept["loragate-gateway"] == [f"{FULL}-gateway-0:8080", f"{FULL}-gateway-1:8080"]
    assert kept["kubernetes-pods"] == [f"{FULL}-engine-0:8000", f"{FULL}-engine-1:8000"]
    pods = next(job for job in scrape["scrape_configs"] if job["job_name"] == "kubernetes-pods")
    assert DROPS_ADAPTER_NAMES in pods["metric_relabel_configs"], "vLLM's labels of adapter names: dropped"


def _pod_template(obj: Manifest) -> dict[str, Any]:
    template: dict[str, Any] = (
        obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
    )
    return template


def _pod(obj: Manifest) -> dict[str, Any]:
    pod: dict[str, Any] = _pod_template(obj)["spec"]
    return pod


def _container(obj: Manifest) -> dict[str, Any]:
    (container,) = _pod(obj)["containers"]
    return container  # type: ignore[no-any-return]


def _discovered_targets(obj: Manifest) -> list[dict[str, str]]:
    """What Prometheus's pod discovery labels each container port with (the labels these configs read)."""
    template = _pod_template(obj)
    meta: dict[str, str] = {}
    for prefix, source in [("label", "labels"), ("annotation", "annotations")]:
        for key, value in (template["metadata"].get(source) or {}).items():
            meta[f"__meta_kubernetes_pod_{prefix}_{re.sub(r'[^a-zA-Z0-9_]', '_', key)}"] = str(value)
    ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
    annotated = meta.get("__meta_kubernetes_pod_annotation_prometheus_io_port")
    return [
        {
            **meta,
            "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
            "port": annotated or str(p["containerPort"]),
        }
        for p in ports
    ]


def _kept(rules: list[dict[str, Any]], meta: dict[str, str]) -> bool:
    for rule in rules:
        if rule.get("action") not in ("keep", "drop"):
            continue
        value = rule.get("separator", ";").join(meta.get(label, "") for label in rule["source_labels"])
        if bool(re.fullmatch(rule["regex"], value)) != (rule["action"] == "keep"):
            return False
    return True


def test_a_stopping_gateway_pod_pauses_then_drains_before_the_kill(default: list[Manifest]) -> None:
    """A rolling update refused connections while kube-proxy still sent them (no preStop pause), and the kubelet's
    30 s came before the gateway's 25 s drain and its last records. No checksum of the keys is on the pod: whoever
    may read pods could test guesses of them."""
    annotations = _pod_template(find(default, "Deployment", f"{FULL}-gateway"))["metadata"]["annotations"]
    assert not [name for name in annotations if "key" in name], annotations
    spec = _pod(find(default, "Deployment", f"{FULL}-gateway"))
    (container,) = spec["containers"]
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    config = find(default, "ConfigMap", f"{FULL}-config")["data"]
    drain = float(config.get("LORAGATE_SHUTDOWN_TIMEOUT_S", 25))
    assert pause >= 5 and spec["terminationGracePeriodSeconds"] >= pause + drain + 10


def test_the_volume_init_makes_the_spool_folder_the_gateway_writes_to(default: list[Manifest]) -> None:
    """values.yaml suggests a spoolDir on the volume; where the volume's driver applies no fsGroup (NFS) the gateway
    (uid 10001) could not make it, and crash-looped."""
    statefulset = next(o for o in default if o["kind"] == "StatefulSet")
    (init,) = _pod(statefulset)["initContainers"]
    assert "/spool" in init["args"][0] and "chown 10001:10001" in init["args"][0]
