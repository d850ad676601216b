#!/usr/bin/env bash
# The kill drill at full size (CI runs it with 5 kills per method): SFT, RM, DPO, KTO, online
# DPO, RLOO, PPO and ReST runs are SIGKILLed at random instants, resumed, killed again, ..., and
# must end with the weights and metrics of an uninterrupted run. Prints one line per method.
#   KILLS=20 (default)  SEED=<n> (default: the test's process id)  METHODS=sft,ppo (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
export RLHF_DRILL_KILLS="${KILLS:-20}"
[ -n "${SEED:-}" ] && export RLHF_DRILL_SEED="$SEED"
[ -n "${METHODS:-}" ] && export RLHF_DRILL_METHODS="$METHODS"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
cargo test --release -p rlhf-cli --test drill_kill -- --nocapture 2>&1 |
  grep -E '^(kill drill|sft|rm|dpo|kto|online-dpo|rloo|ppo|rest) |^test result|panicked|failed'
