#!/usr/bin/env bash
# State-space benchmark: a random-weight Mamba with mamba-130m's config (bench/make_ssm.py), served
# from one f32 GGUF by Candela and by llama.cpp's server, and a transformer of the same size
# (SmolLM2-135M's shape, f32, served by Candela) beside it:
#   - throughput: 128 prompt + 128 output tokens at each concurrency (CONCURRENCY, default 1,32);
#   - TPOT against context: one stream, CONTEXTS prompt tokens (default 128 1024 2048 4096), 64
#     output tokens. A decode step of a state-space model costs the same at any context; a
#     transformer's attention reads every cached token.
#
#   bench/ssm.sh
#   CONTEXTS="128 4096" CONCURRENCY=1 bench/ssm.sh
#
# Needs bench/.venv (pip install -r bench/requirements.txt) and models-cache/ (scripts/fetch_models.sh:
# the GGUF's tokenizer); builds llama.cpp (bench/llama_cpp.sh). Results: bench/results/<date>-ssm/
# (JSON lines) and stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=bench/.cache
CONCURRENCY=${CONCURRENCY:-1,32}
CONTEXTS=${CONTEXTS:-128 1024 2048 4096}
THREADS=${THREADS:-2}
PY=bench/.venv/bin/python
LLAMA=$CACHE/llama.cpp/build/bin
OUT=bench/results/$(date +%Y-%m-%d-%H%M)-ssm
PORT=18558
mkdir -p "$OUT"
bench/llama_cpp.sh
[ -d "$CACHE/ssm/mamba-130m" ] && [ -f "$CACHE/ssm/mamba-130m-f32.gguf" ] || "$PY" bench/make_ssm.py "$CACHE/ssm"
[ -n "${CANDELA_PREBUILT:-}" ] || cargo build --release --bin candela
CANDELA=${CANDELA:-target/release/candela}
MAXC=$(echo "$CONCURRENCY" | tr ',' '\n' | sort -n | tail -1)
MAXP=$(echo "$CONTEXTS" | tr ' ' '\n' | sort -n | tail -1)
CTX=$((MAXP + 128))

PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT
serve() { # name, command...: start, load, throughput, TPOT sweep, peak RSS, stop
    local name=$1
    shift
    "$@" >"$OUT/$name.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 3000); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        kill -0 "$PID" 2>/dev/null || { echo "$name exited; see $OUT/$name.log" >&2; return 1; }
        sleep 0.1
    done
    echo "== $name"
    "$PY" bench/loadgen.py --base "http://127.0.0.1:$PORT" --model m --concurrency "$CONCURRENCY" \
        --prompt-len 128 --output-len 128 --vocab 49152 | tee "$OUT/$name.jsonl"
    for p in $CONTEXTS; do
        "$PY" bench/loadgen.py --base "http://127.0.0.1:$PORT" --model m --concurrency 1 \
            --prompt-len "$p" --output-len 64 --vocab 49152 | tail -1 |
            sed "s/^{/{\"context\": $p, /" | tee -a "$OUT/$name.context.jsonl"
    done
    echo "{\"server\": \"$name\", \"peak_rss_mib\": $(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status")}"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
}

GGUF=$CACHE/ssm/mamba-130m-f32.gguf
cat "$GGUF" >/dev/null
serve candela-mamba "$CANDELA" serve --model "$GGUF" --served-model-name m --port "$PORT" \
    --max-model-len "$CTX" --max-num-seqs "$MAXC"
# llama.cpp: one recurrent state per parallel slot; -c is split across the slots.
serve llamacpp-mamba "$LLAMA/llama-server" -m "$GGUF" --port "$PORT" -t "$THREADS" -tb "$THREADS" \
    -np "$MAXC" -c $((MAXC * CTX)) -b 2048 -ub 512 --cont-batching --no-webui
# The transformer of the same size, float16 KV cache (Candela's and llama.cpp's usual choice).
serve candela-smollm2-shape "$CANDELA" serve --model "$CACHE/ssm/smollm2-135m" --served-model-name m \
    --port "$PORT" --max-model-len "$CTX" --max-num-seqs "$MAXC" --kv-cache-dtype float16
echo "results in $OUT"
