#!/usr/bin/env bash
# Real-size benchmark: random-weight models with Llama-3.2-1B's and Llama-3.1-8B's shapes, quantized
# by llama.cpp's own llama-quantize (from an f16 GGUF that bench/make_llama_gguf.py writes), served by
# Candela (the file's blocks, native kernels) and by llama.cpp's server on the same file: load time,
# peak RSS, and output tok/s / TTFT / TPOT at each concurrency with 128 prompt + 128 output tokens.
#
#   bench/realsize.sh                                # MODELS="1b:Q4_K_M 1b:Q8_0" CONCURRENCY=1,8,32
#   MODELS=8b:Q4_K_M CONCURRENCY=1 bench/realsize.sh # the 8B shape (16 GB f16 + 4.9 GB on disk)
#   PROMPT_LEN=2048 OUTPUT_LEN=64 KV=q8_0 bench/realsize.sh  # long context, 8-bit KV cache in both
#   MODELS="moe:F32 moe:Q8_0" CONCURRENCY=1,32 bench/realsize.sh
#       # Mixture of Experts: Qwen3-30B-A3B's layer shape, 4 layers (bench/make_moe_gguf.py writes
#       # the f32 file; Q8_0 by llama-quantize from it)
#
# Needs bench/.venv (bench/run.sh, or pip install -r bench/requirements.txt); builds llama.cpp
# (bench/llama_cpp.sh). Results: bench/results/<date>-realsize/ (JSON lines) and stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=bench/.cache
MODELS=${MODELS:-1b:Q4_K_M 1b:Q8_0}
CONCURRENCY=${CONCURRENCY:-1,8,32}
THREADS=${THREADS:-2}
PROMPT_LEN=${PROMPT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
KV=${KV:-f16} # f16 or q8_0 (llama.cpp's quantized V cache needs flash attention: -fa on)
CTX=$((PROMPT_LEN + OUTPUT_LEN + 64))
PY=bench/.venv/bin/python
LLAMA=$CACHE/llama.cpp/build/bin
OUT=bench/results/$(date +%Y-%m-%d-%H%M)-realsize
PORT=18557
mkdir -p "$OUT" "$CACHE/realsize"
bench/llama_cpp.sh
[ -n "${CANDELA_PREBUILT:-}" ] || cargo build --release --bin candela
CANDELA=${CANDELA:-target/release/candela}
MAXC=$(echo "$CONCURRENCY" | tr ',' '\n' | sort -n | tail -1)

PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT
serve() { # name, command...: start, time until healthy, load, peak RSS, stop
    local name=$1
    shift
    local start
    start=$(date +%s.%N)
    "$@" >"$OUT/$name.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 3000); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        kill -0 "$PID" 2>/dev/null || { echo "$name exited; see $OUT/$name.log" >&2; return 1; }
        sleep 0.1
    done
    local ready rss_loaded
    ready=$(echo "$(date +%s.%N) - $start" | bc)
    rss_loaded=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status")
    "$PY" bench/loadgen.py --base "http://127.0.0.1:$PORT" --model m --concurrency "$CONCURRENCY" \
        --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN" >"$OUT/$name.jsonl"
    local peak
    peak=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$PID/status")
    echo "{\"server\": \"$name\", \"load_s\": $ready, \"peak_rss_mib_after_load\": $rss_loaded, \"peak_rss_mib\": $peak}" | tee "$OUT/$name.load.json"
    cat "$OUT/$name.jsonl"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
}

for spec in $MODELS; do
    shape=${spec%%:*}
    quant=${spec##*:}
    q=$(echo "$quant" | tr 'A-Z' 'a-z')
    # The source GGUF llama-quantize starts from: f16 for the Llama shapes, f32 for the MoE.
    case $shape in
    moe)
        src=$CACHE/realsize/qwen3moe-f32.gguf
        make() { "$PY" bench/make_moe_gguf.py "$src"; }
        file=$CACHE/realsize/qwen3moe-$q.gguf
        ;;
    *)
        src=$CACHE/realsize/llama-$shape-f16.gguf
        make() { "$PY" bench/make_llama_gguf.py "$shape" "$src"; }
        file=$CACHE/realsize/llama-$shape-$q.gguf
        ;;
    esac
    [ -f "$file" ] || {
        [ -f "$src" ] || make
        [ "$file" = "$src" ] ||
            "$LLAMA/llama-quantize" "$src" "$file" "$quant" "$THREADS" >"$OUT/quantize-$shape-$quant.log" 2>&1
    }
    echo "== $shape $quant: $(du -m "$file" | cut -f1) MiB"
    # Page cache warm for both (the first reader would pay the disk).
    cat "$file" >/dev/null
    # KV cache: the same type in both, the same MAXC * CTX tokens (llama.cpp's -c). In float16 32 KiB
    # per token for the 1B shape (16 layers x 8 KV heads x 64 x K and V x 2 bytes), 128 KiB for the
    # 8B, 8 KiB for the MoE (4 layers x 4 x 128 x 2 x 2); q8_0 takes 34/64 of that.
    case $shape in 8b) kv_kib=128 ;; moe) kv_kib=8 ;; *) kv_kib=32 ;; esac
    if [ "$KV" = q8_0 ]; then
        kv_kib=$((kv_kib * 34 / 64)) cdt=q8_0 lfa="-fa on"
    else
        cdt=float16 lfa=
    fi
    serve "candela-$shape-$quant-$KV" "$CANDELA" serve --model "$file" --served-model-name m --port "$PORT" \
        --max-model-len 4096 --max-num-seqs "$MAXC" --kv-cache-dtype "$cdt" \
        --kv-cache-memory $((MAXC * CTX * kv_kib))KiB
    # shellcheck disable=SC2086 # $lfa is empty or two words
    serve "llamacpp-$shape-$quant-$KV" "$LLAMA/llama-server" -m "$file" --port "$PORT" -t "$THREADS" -tb "$THREADS" \
        -np "$MAXC" -c $((MAXC * CTX)) -b 2048 -ub 512 -ctk "$KV" -ctv "$KV" $lfa --cont-batching --no-webui
done
echo "results in $OUT"
