#!/usr/bin/env bash
# redis.sh install | start PORT DIR [persist|durable] | stop PORT — a real redis-server for runs and tests.
set -euo pipefail
cmd=${1:-}
case "$cmd" in
  install)
    if ! command -v redis-server >/dev/null; then
      echo "==> installing redis-server (Debian package)"
      SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    fi ;;
  start)
    port=$2; dir=$3; mkdir -p "$dir"
    if redis-cli -p "$port" ping >/dev/null 2>&1; then exit 0; fi
    case "${4:-}" in
      persist) save=(--save "60 1" --appendonly yes) ;;
      durable) save=(--save "" --appendonly yes --appendfsync always) ;;  # records: fsync before answering
      *) save=(--save "") ;;
    esac
    redis-server --port "$port" --bind 127.0.0.1 "${save[@]}" --dir "$dir" --daemonize yes \
      --logfile "$dir/redis.log" --pidfile "$dir/redis.pid"
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && exit 0; sleep 0.1; done
    echo "redis-server did not start; see $dir/redis.log" >&2; exit 1 ;;
  stop)
    redis-cli -p "$2" shutdown nosave >/dev/null 2>&1 || true ;;
  *) echo "usage: $0 install | start PORT DIR [persist|durable] | stop PORT" >&2; exit 2 ;;
esac
