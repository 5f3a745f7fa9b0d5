#!/usr/bin/env bash
# Side-by-side benchmark: Candela vs llama.cpp's llama-server vs Hugging Face transformers on the
# same machine, same weights (SmolLM2-135M-Instruct dequantized to f32), same load. Both servers keep
# the KV cache in float16 (llama.cpp's default; Candela's --kv-cache-dtype float16).
#
#   bench/run.sh                 # everything (about 30-40 minutes on 2 cores, first run longer)
#   CONCURRENCY=1,8 bench/run.sh # fewer levels
#   PRECISION=q8_0 bench/run.sh  # both servers on 8-bit weights: llama.cpp on a Q8_0 GGUF made by
#                                # its llama-quantize, Candela with --quantization q8_0 on the same file
#   SKIP_HF=1 bench/run.sh       # without the transformers baseline
#
# Builds llama-server (bench/llama_cpp.sh: from the llama.cpp sources in the llama-cpp-python sdist),
# CPU only, into bench/.cache; Python tools go into bench/.venv. Results: bench/results/<date>/
# (JSON) and a Markdown table on stdout to paste into docs/benchmarks.md. Not part of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=bench/.cache
VENV=bench/.venv
CONCURRENCY=${CONCURRENCY:-1,8,32,64}
PRECISION=${PRECISION:-f32}
THREADS=${THREADS:-2}
OUT=bench/results/$(date +%Y-%m-%d-%H%M)-$PRECISION
mkdir -p "$CACHE" "$OUT"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import httpx, gguf, transformers, accelerate, cmake" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -r bench/requirements.txt
fi
PY=$ROOT/$VENV/bin/python
export PATH="$ROOT/$VENV/bin:$PATH"

scripts/fetch_models.sh
Q4=models-cache/SmolLM2-135M-Instruct.Q4_1.gguf
F32=$CACHE/SmolLM2-135M-Instruct.f32.gguf
[ -f "$F32" ] || "$PY" bench/make_f32_gguf.py "$Q4" "$F32"

# llama.cpp's server and quantizer (bench/llama_cpp.sh says how it is built).
bench/llama_cpp.sh
LLAMA_SERVER=$CACHE/llama.cpp/build/bin/llama-server
case $PRECISION in
f32)
    MODEL=$F32
    CANDELA_QUANT=none
    ;;
q8_0)
    MODEL=$CACHE/SmolLM2-135M-Instruct.q8_0.gguf
    CANDELA_QUANT=q8_0
    QUANTIZE=$CACHE/llama.cpp/build/bin/llama-quantize
    [ -f "$MODEL" ] || "$QUANTIZE" "$F32" "$MODEL" Q8_0 >/dev/null 2>&1
    ;;
*)
    echo "PRECISION must be f32 or q8_0" >&2
    exit 2
    ;;
esac
cargo build --release --bin candela

MAXC=$(echo "$CONCURRENCY" | tr ',' '\n' | sort -n | tail -1)
PORT=18555
wait_healthy() {
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
        sleep 0.2
    done
    echo "server did not become healthy" >&2
    return 1
}
peak_rss_mib() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }

SERVER_PID=
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true' EXIT
run_server() { # name, command...
    local name=$1
    shift
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
        echo "port $PORT is already serving; stop that server first" >&2
        return 1
    fi
    "$@" >"$OUT/$name.log" 2>&1 &
    SERVER_PID=$!
    wait_healthy
    "$PY" bench/loadgen.py --base "http://127.0.0.1:$PORT" --model smollm2 --concurrency "$CONCURRENCY" >"$OUT/$name.jsonl"
    echo "{\"peak_rss_mib\": $(peak_rss_mib $SERVER_PID)}" >"$OUT/$name.rss.json"
    kill "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

echo "== machine ceilings"
OPENBLAS_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS "$PY" bench/ceilings.py | tee "$OUT/ceilings.json"

echo "== candela"
run_server candela target/release/candela serve --model "$MODEL" --quantization "$CANDELA_QUANT" --served-model-name smollm2 --port "$PORT" --max-model-len 512 \
    --max-num-seqs "$MAXC" --kv-cache-memory 2GiB --kv-cache-dtype float16
cat "$OUT/candela.jsonl"

echo "== llama.cpp"
run_server llamacpp "$LLAMA_SERVER" -m "$MODEL" --port "$PORT" -t "$THREADS" -tb "$THREADS" -np "$MAXC" \
    -c $((MAXC * 320)) -b 2048 -ub 512 -ctk f16 -ctv f16 --cont-batching --no-webui
cat "$OUT/llamacpp.jsonl"

echo "== transformers (float32)"
if [ -z "${SKIP_HF:-}" ]; then
    OMP_NUM_THREADS=$THREADS "$PY" bench/hf_baseline.py --gguf "$F32" 2>/dev/null | grep "^{" | tee "$OUT/transformers.jsonl"
fi

"$PY" bench/report.py "$OUT"
