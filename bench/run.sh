#!/usr/bin/env bash
# The toolkit vs PyTorch/transformers on SmolLM2-135M-Instruct (f32), on this machine, one run.
#
#   bash bench/run.sh                 # everything (~13 min on 2 idle cores, ~25 min on busy ones,
#                                     # before the DPO pair was added: it adds ~7 min per round)
#   ROUNDS=1 EXTRAS=0 bash bench/run.sh   # one round of the headline numbers only
#
# Every measurement is a separate process, run one after another (never two at once). Raw
# results go to bench/results/<timestamp>.jsonl (one JSON line each); bench/report.py turns them
# into the measured section of docs/performance.md (between the bench:begin / bench:end markers).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-2}   # headline numbers (ours gen 1 thread, torch gen 2 and 1 threads, both trains, both DPO steps)
EXTRAS=${EXTRAS:-1}   # ours gen at 2 threads, micro-benchmarks
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
    # Everything rlhf-bench links (dpo runs the trainer's step from crates/rl).
    "git_dirty_linked": bool(sh("git", "status", "--porcelain", "crates/lm", "crates/train", "crates/rl",
                                "crates/data", "bench/src")),
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

for r in $(seq 1 "$ROUNDS"); do
  split=""
  [ "$r" = 1 ] && split="--split"   # round 1 also times the model alone (gen split)
  for b in 1 8 32; do ours "round$r" gen --threads 1 --batch "$b" $split; done
  torch "round$r" gen --threads 2 --batches 1,8,32
  torch "round$r" gen --threads 1 --batches 1,8,32
  ours "round$r" train --threads 2
  torch "round$r" train --threads 2
  ours "round$r" dpo --threads 2
  torch "round$r" dpo --threads 2
done

if [ "$EXTRAS" = 1 ]; then
  for b in 1 8 32; do ours extra gen --threads 2 --batch "$b"; done
  echo "+ rlhf-bench micro --threads 1" >&2
  "$BIN" micro --threads 1 --reps 5 | tee -a "$OUT"
fi

echo "{\"bench\":\"done\",\"total_s\":$(($(date +%s) - START)),\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}" | tee -a "$OUT"
"$PY" bench/report.py "$OUT" docs/performance.md
echo "results: $OUT; docs/performance.md updated" >&2
