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
# Builds llama-server from the llama.cpp sources vendored in the llama-cpp-python sdist (PyPI),
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
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
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

# llama.cpp's server, from the sources inside the llama-cpp-python sdist.
LLAMA_SERVER=$CACHE/llama.cpp/build/bin/llama-server
if [ ! -x "$LLAMA_SERVER" ]; then
    # The sdist itself (pip download --no-binary would build its build tools from source).
    SDIST=$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz
    if [ ! -f "$SDIST" ]; then
        url=$(curl -sf https://pypi.org/simple/llama-cpp-python/ \
            | grep -o "https://[^\"]*llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz#sha256=[0-9a-f]*" | head -1)
        curl -sfL "${url%%#*}" -o "$SDIST"
        echo "${url##*sha256=}  $SDIST" | sha256sum --check --quiet
    fi
    rm -rf "$CACHE/llama-cpp-python" && mkdir -p "$CACHE/llama-cpp-python"
    tar -xzf "$SDIST" -C "$CACHE/llama-cpp-python" --strip-components=1
    rm -rf "$CACHE/llama.cpp" && cp -r "$CACHE/llama-cpp-python/vendor/llama.cpp" "$CACHE/llama.cpp"
    # Not GGML_NATIVE: on VMs whose CPU advertises AMX that the OS does not enable, a native build
    # dies with an illegal instruction in its AMX kernels. The instruction sets it would detect are
    # named instead, from /proc/cpuinfo, with AMX off.
    has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
    cmake -S "$CACHE/llama.cpp" -B "$CACHE/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" \
        -DGGML_BMI2="$(has bmi2)" -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" \
        -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
    cmake --build "$CACHE/llama.cpp/build" --target llama-server -j "$THREADS" >/dev/null
fi
case $PRECISION in
f32)
    MODEL=$F32
    CANDELA_QUANT=none
    ;;
q8_0)
    MODEL=$CACHE/SmolLM2-135M-Instruct.q8_0.gguf
    CANDELA_QUANT=q8_0
    QUANTIZE=$CACHE/llama.cpp/build/bin/llama-quantize
    [ -x "$QUANTIZE" ] || cmake --build "$CACHE/llama.cpp/build" --target llama-quantize -j "$THREADS" >/dev/null
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
