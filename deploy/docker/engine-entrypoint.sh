#!/bin/bash
# Entrypoint of the vLLM engine image: find or prepare the base model, then exec vLLM's
# OpenAI-compatible server with LoRA enabled. Extra arguments are passed to vLLM unchanged.
set -euo pipefail

SERVED_NAME="${LORAGATE_SERVED_MODEL_NAME:-SmolLM2-135M-Instruct}"
export LORAGATE_QUANTIZATION="${LORAGATE_QUANTIZATION:-none}"   # none | w4a16 | bitsandbytes
CACHE="${LORAGATE_MODEL_CACHE:-/var/lib/loragate/models}"
BAKED="/opt/loragate/models/SmolLM2-135M-Instruct"

if [ -n "${LORAGATE_MODEL_DIR:-}" ] && [ -f "${LORAGATE_MODEL_DIR}/config.json" ]; then
    MODEL_DIR="${LORAGATE_MODEL_DIR}"
elif [ -z "${LORAGATE_MODEL_DIR:-}" ] && [ -f "${BAKED}/config.json" ] && [ ! -f "${CACHE}/SmolLM2-135M-Instruct/config.json" ]; then
    MODEL_DIR="${BAKED}"
else
    if [ -n "${LORAGATE_MODEL_DIR:-}" ] && [ "${LORAGATE_MODEL_DIR%/}" != "${CACHE%/}/SmolLM2-135M-Instruct" ]; then
        echo "engine-entrypoint: LORAGATE_MODEL_DIR=${LORAGATE_MODEL_DIR} has no config.json and is not the default model's folder" >&2
        exit 66
    fi
    mkdir -p "${CACHE}"
    echo "engine-entrypoint: preparing the default model into ${CACHE} (once; other replicas wait)" >&2
    # Several replicas may share the volume: one converts, the rest find it prepared (prepare is idempotent).
    LORAGATE_MODEL_CACHE="${CACHE}" flock "${CACHE}/.prepare.lock" loragate model prepare
    MODEL_DIR="${CACHE}/SmolLM2-135M-Instruct"
fi

if [ "${LORAGATE_QUANTIZATION}" = "w4a16" ]; then
    # A 4-bit weight-only copy beside the base, built once; vLLM reads the method from its config.json.
    MODEL_DIR="$(LORAGATE_MODEL_DIR="${MODEL_DIR}" flock "${CACHE}/.prepare.lock" loragate model prepare)"
fi

# The gateway asks vLLM to load adapters by path: the store must exist at the same path as in the gateway.
if [ -n "${LORAGATE_ADAPTER_STORE:-}" ]; then
    mkdir -p "${LORAGATE_ADAPTER_STORE}" 2>/dev/null || true
fi

ARGS=(
    --model "${MODEL_DIR}"
    --served-model-name "${SERVED_NAME}"
    --enable-lora
    --max-loras "${LORAGATE_MAX_LORAS:-16}"
    --max-cpu-loras "${LORAGATE_MAX_CPU_LORAS:-32}"
    --max-lora-rank "${LORAGATE_MAX_LORA_RANK:-16}"
    --host 0.0.0.0
    --port "${VLLM_PORT:-8000}"
    --disable-uvicorn-access-log
)
# As the gateway's own supervisor starts vLLM (gateway/engine/supervisor.py engine_command): tools and tool_choice
# need a tool-call parser (vLLM refuses them without one); LORAGATE_ENGINE_TOOL_PARSER="" turns tools off.
TOOL_PARSER="${LORAGATE_ENGINE_TOOL_PARSER-hermes}"
if [ -n "${TOOL_PARSER}" ]; then
    ARGS+=(--enable-auto-tool-choice --tool-call-parser "${TOOL_PARSER}")
fi
if [ "${LORAGATE_QUANTIZATION}" = "bitsandbytes" ]; then
    # NF4 (QLoRA) base: vLLM quantises the bf16 folder while loading; needs vLLM <= 0.27.1 (0.28 removed bitsandbytes).
    ARGS+=(--quantization bitsandbytes --load-format bitsandbytes)
fi

# LORAGATE_ENGINE_EXTRA_ARGS: more vLLM arguments, comma-separated (as the gateway's setting reads them).
if [ -n "${LORAGATE_ENGINE_EXTRA_ARGS:-}" ]; then
    IFS=',' read -ra EXTRA <<< "${LORAGATE_ENGINE_EXTRA_ARGS}"
    for arg in "${EXTRA[@]}"; do
        arg="$(echo "${arg}" | sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//')"
        if [ -n "${arg}" ]; then ARGS+=("${arg}"); fi
    done
fi

echo "engine-entrypoint: serving ${MODEL_DIR} as ${SERVED_NAME}" >&2
export HF_HUB_OFFLINE=1 VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
exec python3 -m vllm.entrypoints.openai.api_server "${ARGS[@]}" "$@"
