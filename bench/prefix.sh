#!/usr/bin/env bash
# Prefix caching benchmark: a shared-prefix workload (a SHARED-token "system prompt" + 64 different
# 32-token questions, 64 output tokens each, 16 streams) on Candela with and without prefix caching
# and on llama.cpp's server (its per-slot prompt cache), and the time to first token of one
# 1,500-token prompt sent twice. Needs bench/.venv; builds llama-server (bench/llama_cpp.sh).
#
#   bench/prefix.sh            # SHARED=1000 STREAMS=16 REQUESTS=64 (the issue's workload)
#   SHARED=1000 STREAMS=4 REQUESTS=8 bench/prefix.sh   # smaller, for slow machines
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-1000}
STREAMS=${STREAMS:-16}
REQUESTS=${REQUESTS:-64}
PY=bench/.venv/bin/python
LLAMA_SERVER=bench/.cache/llama.cpp/build/bin/llama-server
MODEL=models-cache/SmolLM2-135M-Instruct.Q4_1.gguf
CANDELA=${CANDELA:-target/release/candela}
PORT=18556
bench/llama_cpp.sh
[ -n "${CANDELA_PREBUILT:-}" ] || cargo build --release --bin candela

wait_healthy() {
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
        sleep 0.2
    done
    return 1
}
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT
run() { # name, command...
    local name=$1
    shift
    "$@" >"/tmp/prefix-$name.log" 2>&1 &
    PID=$!
    wait_healthy
    echo "== $name: shared-prefix workload"
    "$PY" bench/loadgen.py --base "http://127.0.0.1:$PORT" --model smollm2 --concurrency "$STREAMS" \
        --prompt-len 32 --output-len 64 --shared-prefix-len "$SHARED" \
        --requests-per-worker $((REQUESTS / STREAMS))
    echo "== $name: one 1500-token prompt, twice"
    "$PY" bench/loadgen.py --base "http://127.0.0.1:$PORT" --model smollm2 --repeat-ttft 1500
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
}

COMMON=(--model "$MODEL" --served-model-name smollm2 --port "$PORT" --max-model-len 2048
        --max-num-seqs "$STREAMS" --kv-cache-memory 1GiB --kv-cache-dtype float16)
# ONLY=llamacpp (or candela-cached, candela-uncached) runs one server.
want() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ]; }
want candela-cached && run candela-cached "$CANDELA" serve "${COMMON[@]}"
want candela-uncached && run candela-uncached "$CANDELA" serve "${COMMON[@]}" --no-enable-prefix-caching
want llamacpp && run llamacpp "$LLAMA_SERVER" -m "$MODEL" --port "$PORT" -t 2 -tb 2 -np "$STREAMS" \
    -c $((STREAMS * 2048)) -b 2048 -ub 512 -ctk f16 -ctv f16 --cont-batching --no-webui
