#!/usr/bin/env bash
# make run: Redis, vLLM (supervised by the gateway) and the gateway, until Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAGATE_HOME=${LORAGATE_HOME:-$HOME/.cache/loragate}
export LORAGATE_PORT=${LORAGATE_PORT:-8080}
REDIS_PORT=${LORAGATE_REDIS_PORT:-6379}
RECORDS_PORT=$((REDIS_PORT + 1))
export LORAGATE_REDIS_URL=${LORAGATE_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}
# The completion log and feedback: a Redis of their own that fsyncs before answering (Debian's Redis 7.0
# has no WAITAOF), so an acknowledged rating is on disk without slowing every quota check down.
export LORAGATE_RECORDS_REDIS_URL=${LORAGATE_RECORDS_REDIS_URL:-redis://127.0.0.1:$RECORDS_PORT/0}
export HF_HUB_OFFLINE=1
LG=.venv/bin/loragate

if [ "${LORAGATE_QUANTIZATION:-none}" = bitsandbytes ] && [ -z "${LORAGATE_ENGINE_PYTHON:-}${LORAGATE_ENGINE_URLS:-}" ]; then
  # vLLM 0.28+ has no bitsandbytes: the NF4 (QLoRA) base runs on vLLM 0.27.1, installed apart.
  LORAGATE_VENV=.venv-bnb LORAGATE_EXTRAS=${BNB_EXTRAS:-cpu-bnb,train} scripts/setup.sh
  export LORAGATE_ENGINE_PYTHON=$PWD/.venv-bnb/bin/python
fi

started_redis=""
cleanup() { for port in $started_redis; do scripts/redis.sh stop "$port"; done; }
trap cleanup EXIT  # set first: a records Redis that fails to start must not leave the state one running
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  scripts/redis.sh start "$REDIS_PORT" "$LORAGATE_HOME/redis" persist
  started_redis="$REDIS_PORT"
fi
if [ "$LORAGATE_RECORDS_REDIS_URL" = "redis://127.0.0.1:$RECORDS_PORT/0" ] && ! redis-cli -p "$RECORDS_PORT" ping >/dev/null 2>&1; then
  scripts/redis.sh start "$RECORDS_PORT" "$LORAGATE_HOME/redis-records" durable
  started_redis="$started_redis $RECORDS_PORT"
fi

"$LG" model prepare >/dev/null
keyfile="$LORAGATE_HOME/demo-key"
if [ ! -s "$keyfile" ] || ! "$LG" keys check "$(cat "$keyfile")" >/dev/null 2>&1; then
  "$LG" tenants create demo --exist-ok >/dev/null
  "$LG" keys create --tenant demo --name demo 2>/dev/null | tail -1 > "$keyfile"
  chmod 600 "$keyfile"
fi
cat <<MSG

  loragate is starting (vLLM takes about a minute on CPU).
  base URL : http://127.0.0.1:$LORAGATE_PORT/v1
  API key  : $(cat "$keyfile")
  model    : SmolLM2-135M-Instruct
  CLI      : export LORAGATE_HOME=$LORAGATE_HOME LORAGATE_REDIS_URL=$LORAGATE_REDIS_URL LORAGATE_RECORDS_REDIS_URL=$LORAGATE_RECORDS_REDIS_URL
             (in another shell, before \`loragate feedback export\` and the like: they read the same stores)
  Ctrl-C stops the gateway, vLLM and Redis.

MSG
"$LG" serve
