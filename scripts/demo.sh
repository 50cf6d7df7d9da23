#!/usr/bin/env bash
# make demo: the whole loop on a synthetic task, on a stack of its own (its own home, Redis and ports,
# so it runs beside `make run`): users and feedback -> loragate train run -> canary -> promotion.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORAGATE_HOME=${LORAGATE_DEMO_HOME:-$HOME/.cache/loragate-demo}
export LORAGATE_PORT=${LORAGATE_DEMO_PORT:-8090}
REDIS_PORT=${LORAGATE_DEMO_REDIS_PORT:-6390}
RECORDS_PORT=$((REDIS_PORT + 1))
export LORAGATE_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
export LORAGATE_RECORDS_REDIS_URL=redis://127.0.0.1:$RECORDS_PORT/0
export LORAGATE_ADMIN_KEY=${LORAGATE_ADMIN_KEY:-demo-admin-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')}
export LORAGATE_GUARD_RAILS_S=${LORAGATE_GUARD_RAILS_S:-2}
export LORAGATE_URL=http://127.0.0.1:$LORAGATE_PORT
export HF_HUB_OFFLINE=1
LG=.venv/bin/loragate

# A clean slate each time (the prepared base model is kept).
for port in "$REDIS_PORT" "$RECORDS_PORT"; do scripts/redis.sh stop "$port" >/dev/null 2>&1 || true; done
rm -rf "$LORAGATE_HOME"/redis "$LORAGATE_HOME"/redis-records "$LORAGATE_HOME"/adapters "$LORAGATE_HOME"/training \
  "$LORAGATE_HOME"/spool
scripts/redis.sh start "$REDIS_PORT" "$LORAGATE_HOME/redis" persist
scripts/redis.sh start "$RECORDS_PORT" "$LORAGATE_HOME/redis-records" durable
gateway_pid=""
cleanup() {
  if [ -n "$gateway_pid" ]; then kill -INT "$gateway_pid" 2>/dev/null || true; wait "$gateway_pid" 2>/dev/null || true; fi
  for port in "$REDIS_PORT" "$RECORDS_PORT"; do scripts/redis.sh stop "$port" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

echo "==> preparing the base model"
"$LG" model prepare >/dev/null
echo "==> starting the gateway and vLLM on :$LORAGATE_PORT (log: $LORAGATE_HOME/gateway.log; about a minute)"
"$LG" serve > "$LORAGATE_HOME/gateway.log" 2>&1 &
gateway_pid=$!
for _ in $(seq 600); do
  if curl -fs "$LORAGATE_URL/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$gateway_pid" 2>/dev/null; then echo "the gateway stopped; see $LORAGATE_HOME/gateway.log" >&2; exit 1; fi
  sleep 1
done
curl -fs "$LORAGATE_URL/readyz" >/dev/null || { echo "the gateway is not ready after 10 minutes" >&2; exit 1; }
.venv/bin/python -m demo "$@"
