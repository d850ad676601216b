#!/usr/bin/env bash
# The toolkit vs PyTorch/transformers on SmolLM2-135M-Instruct (f32), on this machine, one run.
#
#   bash bench/run.sh                 # everything (~13 min on 2 idle cores, ~25 min on busy ones,
#                                     # before the DPO pair was added: it adds ~7 min per round;
#                                     # the RLOO pair, 3 iterations a side, adds ~4-5 min more)
#   ROUNDS=1 EXTRAS=0 bash bench/run.sh   # one round of the headline numbers only
#   BEFORE_BIN=/path/to/old/rlhf-bench QUICKSTART_BEFORE=/path/to/old/rlhf bash bench/run.sh
#                                          # also an earlier build's training step, generation
#                                          # (batch 8 and 32, 2 threads) and quickstart
#
# Every measurement is a separate process, run one after another (never two at once). Raw
# results go to bench/results/<timestamp>.jsonl (one JSON line each); bench/report.py turns them
# into the measured section of docs/performance.md (between the bench:begin / bench:end markers).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-2}   # headline numbers (ours gen 1 and 2 threads, torch gen 2 and 1 threads, both trains, both DPO steps,
                      # both RLOO iterations)
EXTRAS=${EXTRAS:-1}   # micro-benchmarks
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
PY=${PYTHON:-python3}

cargo build --release -p rlhf-bench
# A private copy: another `cargo build` in this workspace must not swap the binary mid-run.
BIN=$(mktemp -d)/rlhf-bench
cp target/release/rlhf-bench "$BIN"

mkdir -p bench/results
OUT=bench/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl
: >"$OUT"
START=$(date +%s)

load1() { cut -d' ' -f1 /proc/loadavg; }

# meta: the machine, the code and the software on both sides
"$PY" - "$MODEL" >>"$OUT" <<'PYEOF'
import json, os, platform, subprocess, sys
def sh(*c):
    try:
        return subprocess.run(c, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return None
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None)
mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
import torch, transformers
try:
    import trl
    trl_version = trl.__version__
except Exception:
    trl_version = None
print(json.dumps({
    "bench": "meta", "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem / 2**20, 1),
    "kernel": platform.release(), "rustc": sh("rustc", "--version"),
    "git": sh("git", "rev-parse", "--short", "HEAD"),
    # The kernels are in crates/lm: is it exactly the commit?
    "git_dirty_lm": bool(sh("git", "status", "--porcelain", "crates/lm", "bench/src")),
    # Everything rlhf-bench links (dpo runs the trainer's step from crates/rl, rloo the trainer in
    # crates/methods, with bench/reward_words.py as its reward).
    "git_dirty_linked": bool(sh("git", "status", "--porcelain", "crates/lm", "crates/train", "crates/rl",
                                "crates/data", "crates/methods", "bench/src", "bench/reward_words.py")),
    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version,
    "python": platform.python_version(), "model": sys.argv[1],
    "date": sh("date", "-u", "+%Y-%m-%d %H:%M UTC"), "loadavg": open("/proc/loadavg").read().split()[:3],
}))
PYEOF

ours() {   # ours <label> <args...>
  local label=$1; shift
  echo "+ rlhf-bench $* --label '$label load1=$(load1)'" >&2
  "$BIN" "$@" --model "$MODEL" --label "$label load1=$(load1)" | tee -a "$OUT"
}
# OpenMP's default wait policy spins; with other processes on the 2 cores, torch at 2 threads
# then ran 4-7x slower than with PASSIVE (measured while writing this). PASSIVE gives the anchor
# its best case; set OMP_WAIT_POLICY= (empty) to measure torch's default.
TORCH_OMP=${OMP_WAIT_POLICY-PASSIVE}
torch() {  # torch <label> <args...>
  local label=$1; shift
  echo "+ OMP_WAIT_POLICY=$TORCH_OMP anchor_torch.py $* --label '$label load1=$(load1)'" >&2
  env ${TORCH_OMP:+OMP_WAIT_POLICY=$TORCH_OMP} "$PY" bench/anchor_torch.py "$@" --model "$MODEL" \
    --label "$label load1=$(load1)" | tee -a "$OUT"
}

# Optional: an earlier build of rlhf-bench (e.g. the last commit before a change) measured in the
# same run, its rows marked "side": "before"; and earlier/current `rlhf` binaries for the quickstart.
BEFORE_BIN=${BEFORE_BIN:-}
before() {  # before <label> <args...>
  local label=$1; shift
  [ -n "$BEFORE_BIN" ] || return 0
  echo "+ (before) $BEFORE_BIN $* --label '$label load1=$(load1)'" >&2
  "$BEFORE_BIN" "$@" --model "$MODEL" --label "$label load1=$(load1)" \
    | "$PY" -c 'import json, sys; [print(json.dumps({**json.loads(l), "side": "before"})) for l in sys.stdin]' \
    | tee -a "$OUT"
}
# quickstart <side> <rlhf binary>: the built-in testbed pipeline's wall, user and system time.
quickstart() {
  local side=$1 bin=$2 dir
  dir=$(mktemp -d)
  echo "+ ($side) $bin --threads 1 quickstart --set out_dir=$dir load1=$(load1)" >&2
  local l1; l1=$(load1)
  /usr/bin/time -f '%e %U %S %M' -o "$dir/time" "$bin" --threads 1 quickstart --set "out_dir=$dir/run" >/dev/null 2>&1
  read -r wall user sys kb <"$dir/time"
  echo "{\"bench\":\"quickstart\",\"side\":\"$side\",\"label\":\"load1=$l1\",\"wall_s\":$wall,\"user_s\":$user,\"sys_s\":$sys,\"peak_rss_gib\":$(awk "BEGIN{print $kb/1048576}")}" | tee -a "$OUT"
  rm -rf "$dir"
}

ours parity parity --threads 2   # fast training path vs composed f64 gradients, once
echo "+ rlhf-bench membw --threads 2 load1=$(load1)" >&2
"$BIN" membw --threads 2 --label "load1=$(load1)" | tee -a "$OUT"   # batch-1 decoding's ceiling

for r in $(seq 1 "$ROUNDS"); do
  split=""
  [ "$r" = 1 ] && split="--split"   # round 1 also times the model alone (gen split)
  for b in 1 8 32; do
    ours "round$r" gen --threads 1 --batch "$b" $split
    ours "round$r" gen --threads 2 --batch "$b"
  done
  for b in 8 32; do before "round$r" gen --threads 2 --batch "$b"; done
  torch "round$r" gen --threads 2 --batches 1,8,32
  torch "round$r" gen --threads 1 --batches 1,8,32
  ours "round$r" train --threads 2
  torch "round$r" train --threads 2
  ours "round$r" train --threads 2 --checkpoint
  before "round$r" train --threads 2
  ours "round$r" dpo --threads 2
  torch "round$r" dpo --threads 2
  ours "round$r" rloo --threads 2
  torch "round$r" rloo --threads 2
  ours "round$r" rloo --threads 2 --checkpoint
done

if [ -n "${QUICKSTART_BEFORE:-}" ]; then
  cargo build --release -p rlhf-cli
  NOW_RLHF=$(mktemp -d)/rlhf
  cp target/release/rlhf "$NOW_RLHF"
  quickstart before "$QUICKSTART_BEFORE"
  quickstart ours "$NOW_RLHF"
fi

if [ "$EXTRAS" = 1 ]; then
  echo "+ rlhf-bench micro --threads 1" >&2
  "$BIN" micro --threads 1 --reps 5 | tee -a "$OUT"
fi

echo "{\"bench\":\"done\",\"total_s\":$(($(date +%s) - START)),\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}" | tee -a "$OUT"
"$PY" bench/report.py "$OUT" docs/performance.md
echo "results: $OUT; docs/performance.md updated" >&2
