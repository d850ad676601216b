#!/usr/bin/env bash
# The scaling table of docs/scale-out.md: each run as 1 process x 1 thread, 1 process x 2 threads
# and 2 MPI ranks x 1 thread, one after another (run on a quiet machine; the load average is
# printed before each). Needs the MPI build (`cargo build --release -p rlhf-cli --features mpi`),
# `rlhf quickstart` (runs/quickstart) for the tiny runs and scripts/fetch-smollm2.sh for SmolLM2.
#   bash bench/scale-out.sh [tiny] [smollm2]     (default: both)
# Prints, per run, the median logged step time after the first step (time/step_s, or
# time/iteration_s for RLOO) and the median time/allreduce_s and time/rank_wait_s.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/rlhf
out=${OUT:-/tmp/rlhf-scale-out}
mkdir -p "$out"
run() { # label ranks threads method config
  local label=$1 ranks=$2 threads=$3 method=$4 config=$5 dir="$out/$1"
  rm -rf "$dir"
  echo "== $label: load $(cut -d' ' -f1-3 /proc/loadavg)"
  local launch=()
  # One process runs without mpirun, which would bind a lone rank to one core.
  [ "$ranks" -gt 1 ] && launch=(mpirun --allow-run-as-root -n "$ranks" -x RLHF_NO_PROGRESS=1)
  RLHF_NO_PROGRESS=1 /usr/bin/time -f "$label: wall %e s, peak RSS %M KB (per process)" \
    "${launch[@]}" "$bin" --threads "$threads" "$method" --config "$config" \
    --set "output_dir=$dir" > "$dir.out" 2> "$dir.err" || { tail -5 "$dir.err"; exit 1; }
  tail -1 "$dir.err"
  python3 - "$dir/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
key = "time/step_s" if "time/step_s" in rows[0] else "time/iteration_s"
rows = [r for r in rows if key in r][1:]
med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)
print(f"   median {key} {med(key):.4f} s ({1 / med(key):.3f}/s), "
      f"allreduce {med('time/allreduce_s'):.4f} s, rank wait {med('time/rank_wait_s'):.4f} s")
PY
}
set_of() { # name method config
  run "$1-1p1t" 1 1 "$2" "$3"
  run "$1-1p2t" 1 2 "$2" "$3"
  run "$1-2r1t" 2 1 "$2" "$3"
}
for what in "${@:-tiny smollm2}"; do
  for w in $what; do
    case $w in
      tiny) set_of sft-tiny sft bench/scale-out/sft-tiny.toml
            set_of dpo-tiny dpo bench/scale-out/dpo-tiny.toml
            set_of rloo-tiny rloo bench/scale-out/rloo-tiny.toml ;;
      smollm2) set_of sft-smollm2 sft bench/scale-out/sft-smollm2.toml ;;
      *) echo "unknown set $w (tiny, smollm2)" >&2; exit 2 ;;
    esac
  done
done
