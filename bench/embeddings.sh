#!/usr/bin/env bash
# Embedding benchmark: all-MiniLM-L6-v2 (scripts/fetch_models.sh) on 1,000 sentences of 8-128
# words, sentence-transformers (PyTorch, THREADS threads, batch 32) against `candela serve` (its
# compute pool takes every core: 2 on the reference VM)
# with float32 weights and with --quantization q8_0, in one run (bench/embeddings.py).
#
#   bench/embeddings.sh
#
# Needs bench/.venv (bench/run.sh, or pip install -r bench/requirements.txt). Results:
# bench/results/<date>-embeddings.jsonl and stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
PY=bench/.venv/bin/python
MODEL=models-cache/all-MiniLM-L6-v2
OUT=bench/results/$(date +%Y-%m-%d-%H%M)-embeddings.jsonl
PORT=18559
mkdir -p bench/results
[ -d "$MODEL" ] || scripts/fetch_models.sh
[ -n "${CANDELA_PREBUILT:-}" ] || cargo build --release --bin candela
CANDELA=${CANDELA:-target/release/candela}
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null || true' EXIT
"$PY" bench/embeddings.py --model "$MODEL" --threads "$THREADS" | tee "$OUT"
for q in none q8_0; do
    "$CANDELA" serve --model "$MODEL" --port "$PORT" --quantization "$q" \
        >/dev/null 2>&1 &
    PID=$!
    until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 0.1; done
    echo "== candela --quantization $q"
    # The baseline again in the same process, for the cosine and the ratio (its time is
    # printed too, so run-to-run noise shows).
    "$PY" bench/embeddings.py --model "$MODEL" --threads "$THREADS" --candela "http://127.0.0.1:$PORT" |
        tail -1 | sed "s/^{/{\"quantization\": \"$q\", /" | tee -a "$OUT"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
done
