#!/bin/sh
# Entrypoint of the retraining image: runs `loragate ARGS`. A leading `loragate` is dropped, so both
#   docker compose --profile retrain run --rm retrain loragate train run --tenant acme --alias support-bot
#   docker compose --profile retrain run --rm retrain train run --tenant acme --alias support-bot
# work (and a Kubernetes Job's args need not name it).
#
# SIGTERM (docker stop, a Job's activeDeadlineSeconds, pod deletion) is handled as SIGINT: Python
# leaves SIGTERM at its default, which a container's PID 1 ignores until the SIGKILL, whereas SIGINT
# cancels `asyncio.run`'s main task, so `loragate train run` removes a staged candidate and records the
# error in run.json before it exits (a fit in progress runs in a thread and is not interrupted).
set -eu

if [ "${1:-}" = "loragate" ]; then
    shift
fi

# Same rule as the gateway image: an empty key means "no such key", never "the empty string is the key".
if [ -z "${LORAGATE_ADMIN_KEY:-}" ]; then
    unset LORAGATE_ADMIN_KEY
fi
if [ -z "${LORAGATE_METRICS_KEY:-}" ]; then
    unset LORAGATE_METRICS_KEY
fi

# `loragate`'s console script, with SIGTERM turned into SIGINT inside the process (see above).
exec python -c '
import signal, sys
signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
sys.argv[0] = "loragate"
from gateway.cli import main
main()
' "$@"
