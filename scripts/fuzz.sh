#!/usr/bin/env bash
# On-demand fuzzing of every loader a user's file reaches (JSON Lines in each TRL layout, Parquet,
# config.json, tokenizer.json, chat templates, safetensors, GGUF, adapter_config.json, the TOML
# configs of sft/dpo/rloo/ppo). CI runs the same tests at a small size; this runs
# RLHF_FUZZ_CASES inputs per loader (default 10^6) with a fresh random seed (RLHF_FUZZ_SEED to
# repeat a run) and prints per loader: inputs tried, accepted, rejected, the slowest input.
#
#   scripts/fuzz.sh                         # 10^6 inputs per loader
#   RLHF_FUZZ_CASES=100000 scripts/fuzz.sh  # a shorter run
set -euo pipefail
cd "$(dirname "$0")/.."
export RLHF_FUZZ_CASES="${RLHF_FUZZ_CASES:-1000000}"
export RLHF_FUZZ_SEED="${RLHF_FUZZ_SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
echo "fuzzing with RLHF_FUZZ_CASES=$RLHF_FUZZ_CASES RLHF_FUZZ_SEED=$RLHF_FUZZ_SEED"
log="$(mktemp)"
status=0
for target in "rlhf-data fuzz" "rlhf-lm fuzz" "rlhf-methods fuzz_config"; do
    set -- $target
    # --nocapture: the figures are printed by the tests themselves.
    cargo test --release -p "$1" --test "$2" -- --nocapture 2>&1 | tee -a "$log" \
        | grep -E '^(fuzz |test |test result)' || status=1
done
echo
echo "per loader (seed $RLHF_FUZZ_SEED):"
grep -a '^fuzz ' "$log" | sort
echo "full output (a failing input, its panic): $log"
exit $status
