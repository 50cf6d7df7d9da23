#!/bin/sh
# Entrypoint of the gateway image: `loragate serve` against external vLLM servers only.
set -eu

if [ "${1:-serve}" = "serve" ]; then
    # Without engine URLs `loragate serve` would try to start vLLM itself, which this image cannot.
    if [ -z "${LORAGATE_ENGINE_URLS:-}" ]; then
        echo "gateway-entrypoint: LORAGATE_ENGINE_URLS is required (e.g. http://vllm-0:8000,http://vllm-1:8000)" >&2
        exit 64
    fi
fi

# An empty admin or metrics key must mean "no such key", never "the empty string is the key".
if [ -z "${LORAGATE_ADMIN_KEY:-}" ]; then
    unset LORAGATE_ADMIN_KEY
fi
if [ -z "${LORAGATE_METRICS_KEY:-}" ]; then
    unset LORAGATE_METRICS_KEY
fi

exec loragate "$@"
