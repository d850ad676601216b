#!/usr/bin/env python3
"""Aggregate `rlhf rlp` runs (one report.json per seed) into docs/rlp.md's tables: the mean over
seeds with a Student-t 95% interval over seeds.

    python3 tools/rlp_table.py runs/rlp-s0/report.json runs/rlp-s1/report.json runs/rlp-s2/report.json
"""
import json
import math
import sys

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def summary(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    n = len(xs)
    if n == 0:
        return "-"
    m = sum(xs) / n
    if n == 1:
        return f"{m:.3f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = T975[n - 2] * sd / math.sqrt(n) if n - 1 <= 10 else 1.96 * sd / math.sqrt(n)
    return f"{m:.3f} [{m - h:.3f}, {m + h:.3f}]"


def main(paths):
    reports = [json.load(open(p)) for p in paths]
    seeds = [r["seed"] for r in reports]
    print(f"seeds {seeds}; task {reports[0]['task']}; policy method {reports[0]['policy_method']}\n")
    print("| policy | gold win-rate vs SFT | gold mean | KL to SFT | length |")
    print("|---|---|---|---|---|")
    for name in [row["name"] for row in reports[0]["rows"]]:
        rows = [next(x["report"] for x in r["rows"] if x["name"] == name) for r in reports]
        print(
            f"| {name} | {summary([x['winrate'] for x in rows])} | {summary([x['gold_mean'] for x in rows])}"
            f" | {summary([x['kl_to_ref'] for x in rows])} | {summary([x['mean_len'] for x in rows])} |"
        )
    print("\n| reward model | accuracy vs gold on SFT samples | on the policy's samples |")
    print("|---|---|---|")
    names = []
    for a in reports[0]["rm_accuracy"]:
        if a["reward_model"] not in names:
            names.append(a["reward_model"])
    for n in names:
        def acc(which):
            return summary([
                next(a["accuracy"] for a in r["rm_accuracy"] if a["reward_model"] == n and a["samples"] == which)
                for r in reports
            ])
        print(f"| {n} | {acc('sft')} | {acc('policy')} |")
    print("\n| synthetic pairs | pairs | agreement with gold | mean confidence |")
    print("|---|---|---|---|")
    for i, row in enumerate(reports[0]["spg_ablation"]):
        st = [r["spg_ablation"][i]["stats"] for r in reports]
        print(
            f"| {row['name']} | {summary([s['pairs'] for s in st])} | {summary([s['gold_agreement'] for s in st])}"
            f" | {summary([s['mean_confidence'] for s in st])} |"
        )
    print("\nPer seed:\n")
    print("| seed | " + " | ".join(r["name"] for r in reports[0]["rows"]) + " |")
    print("|---" * (1 + len(reports[0]["rows"])) + "|")
    for r in reports:
        print(f"| {r['seed']} | " + " | ".join(f"{x['report']['winrate']:.3f}" for x in r["rows"]) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
