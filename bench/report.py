#!/usr/bin/env python3
"""Turn a bench/run.sh results file (JSON lines) into the measured section of docs/performance.md.

  python3 bench/report.py bench/results/<stamp>.jsonl docs/performance.md

Only the text between `<!-- bench:begin -->` and `<!-- bench:end -->` is replaced; the analysis
around it is kept. A missing file is created with the markers only.
"""

import json
import statistics
import sys

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Figures measured earlier on this kind of machine (the brief's reference), for context only.
EARLIER_TORCH_GEN = {1: 17, 8: 58, 32: 140}
# SmolLM2-135M's parameters read per decoded token: every weight matrix and norm, and the tied
# embedding matrix once (as the LM head).
WEIGHT_PARAMS = 134_515_008
EARLIER_TORCH_TRAIN = (16.8, 7.1)


def fmt(x, nd=1):
    return "–" if x is None else f"{x:.{nd}f}"


def rounds(xs, nd=1):
    """'a / b' for every measurement (in run order)."""
    return " / ".join(fmt(x, nd) for x in xs) if xs else "–"


def med(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b, invert=False):
    if a is None or b is None or a == 0 or b == 0:
        return "–"
    return f"{(b / a) if invert else (a / b):.2f}x"


def dirty_note(meta):
    if "git_dirty_linked" in meta:
        return (" + uncommitted changes in the crates rlhf-bench links or bench/src"
                if meta["git_dirty_linked"] else " (the crates rlhf-bench links and bench/src clean)")
    if "git_dirty_lm" in meta:
        return " + uncommitted changes in crates/lm or bench/src" if meta["git_dirty_lm"] else " (crates/lm clean)"
    # older results files: any uncommitted change under crates/ (not necessarily in crates/lm)
    return " + uncommitted changes somewhere under crates/" if meta.get("git_dirty") else ""


def main(results, doc):
    rows = [json.loads(l) for l in open(results) if l.strip().startswith("{")]
    meta = next((r for r in rows if r.get("bench") == "meta"), {})
    done = next((r for r in rows if r.get("bench") == "done"), {})
    gen = [r for r in rows if r.get("bench") == "gen"]
    train = [r for r in rows if r.get("bench") == "train"]
    dpo = [r for r in rows if r.get("bench") == "dpo"]
    rloo = [r for r in rows if r.get("bench") == "rloo"]
    micro = next((r for r in rows if r.get("bench") == "micro"), None)

    def gen_tps(side, threads, batch, headline=None):
        return [
            r["tok_per_s"]
            for r in gen
            if r["side"] == side and r["threads"] == threads and r["batch"] == batch
            and (headline is None or r["label"].startswith("round") == headline)
        ]

    out = []
    w = out.append
    w(BEGIN)
    w("")
    w(f"Results file: `{results}`. Machine: {meta.get('nproc')} cores, `{meta.get('cpu')}`, "
      f"{meta.get('mem_gib')} GiB RAM, Linux {meta.get('kernel')}. Code: commit `{meta.get('git')}`"
      f"{dirty_note(meta)}, {meta.get('rustc')}; "
      f"torch {meta.get('torch')}, transformers {meta.get('transformers')}"
      f"{', TRL ' + meta['trl'] if meta.get('trl') else ''}, Python {meta.get('python')}. "
      f"Started {meta.get('date')}, load average at start {' '.join(meta.get('loadavg', []))}; "
      f"total {done.get('total_s', '?')} s.")
    w("")
    w("### Generation (64 sampled tokens, temperature 1, no top-k/top-p, prompts 17-22 tokens)")
    w("")
    w("tok/s = batch x 64 / wall time of the whole generate call (prefill + decode); higher is better. "
      "Each cell lists every measurement in run order (separate processes for ours; for torch one "
      "process per thread count covers all batches); ratios use the medians.")
    w("")
    w("| batch | ours, 1 thread | ours, 2 threads | torch, 2 threads | torch, 1 thread | ours 1t / torch 2t | best ours / best torch | ours before (`BEFORE_BIN`), 2 threads | torch earlier (ref.) |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    best_ratio = {}
    for b in (1, 8, 32):
        o1, o2 = gen_tps("ours", 1, b), gen_tps("ours", 2, b)
        t2, t1 = gen_tps("torch", 2, b), gen_tps("torch", 1, b)
        bef = gen_tps("before", 2, b)
        best_o = max([x for x in (med(o1), med(o2)) if x is not None], default=None)
        best_t = max([x for x in (med(t1), med(t2)) if x is not None], default=None)
        best_ratio[b] = (best_o, best_t)
        w(f"| {b} | {rounds(o1)} | {rounds(o2)} | {rounds(t2)} | {rounds(t1)} | "
          f"{ratio(med(o1), med(t2))} | {ratio(best_o, best_t)} | {rounds(bef)} | {EARLIER_TORCH_GEN[b]} |")
    w("")
    membw = next((r for r in rows if r.get("bench") == "membw"), None)
    if membw:
        # Every weight is read once per decoded token (the LM head included; the embedding lookup
        # reads one row). f32, so 4 bytes per parameter.
        weight_gb = WEIGHT_PARAMS * 4 / 1e9
        bw = max(membw["read_gbps"], membw["copy_gbps"] / 2)
        limit = bw / weight_gb
        o = best_ratio[1][0]
        w(f"Memory bandwidth (`rlhf-bench membw`, {membw['buffer_gib']} GiB buffers, best of the passes): "
          f"read {membw['read_gbps_1t']} GB/s on 1 thread, {membw['read_gbps']} GB/s on {membw['threads']}; "
          f"copy (read + write, counted as STREAM does) {membw['copy_gbps_1t']} and {membw['copy_gbps']} GB/s. "
          f"Batch-1 decoding reads the {weight_gb * 1000:.0f} MB of f32 weights once per token, so this "
          f"machine's ceiling is {bw:.1f} GB/s / {weight_gb * 1000:.0f} MB = **{limit:.1f} tok/s**; "
          f"our best batch-1 median, {fmt(o)} tok/s (prefill included), is **{(o or 0) / limit:.0%}** of it "
          f"(target ≥ 70%). It can exceed 100% where the L3 cache keeps part of the weights.")
        w("")
    pol = sorted({str(r.get("omp_wait_policy")) for r in gen + train + dpo + rloo if r["side"] == "torch"})
    w(f"torch ran with OMP_WAIT_POLICY={', '.join(pol)} (see the notes on contention).")
    w("")
    w("The same runs per CPU-second (tokens / CPU time of the process, 1-thread runs only), which "
      "does not depend on how much of the 2 cores the other processes left us; higher is better:")
    w("")
    w("| batch | ours, 1 thread | torch, 1 thread | ours / torch |")
    w("|---:|---:|---:|---:|")

    def per_cpu(side, b):
        return [r["batch"] * r["new_tokens"] / r["cpu_s"] for r in gen
                if r["side"] == side and r["threads"] == 1 and r["batch"] == b and r.get("cpu_s")]

    for b in (1, 8, 32):
        o, t = per_cpu("ours", b), per_cpu("torch", b)
        w(f"| {b} | {rounds(o)} | {rounds(t)} | {ratio(med(o), med(t))} |")
    w("")
    # Contention and split details
    w("Per-run details (wall vs CPU time shows what other processes took; `model only` is the "
      "same prefill + 63 cached decode steps without sampling):")
    w("")
    w("| side | threads | batch | label | prefill s | wall s | CPU s | model only: wall s / CPU s | tok/s | peak RSS GiB |")
    w("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in gen:
        w(f"| {r['side']} | {r['threads']} | {r['batch']} | {r['label']} | {fmt(r['prefill_s'], 2)} | "
          f"{fmt(r['wall_s'], 2)} | {fmt(r.get('cpu_s'), 2)} | "
          f"{fmt(r.get('model_only_s'), 2) + ' / ' + fmt(r.get('model_only_cpu_s'), 2) if r.get('model_only_s') else '–'} | "
          f"{fmt(r['tok_per_s'])} | {fmt(r['peak_rss_gib'], 2)} |")
    w("")

    w("### Training step (batch 8 x 256 tokens, loss over the last 192 of each row, AdamW lr 1e-5, all parameters)")
    w("")
    w("Median of 3 timed steps after 1 warm-up, per run; peak RSS = VmHWM at the end of the process. Lower is better.")
    w("")
    w("| side | threads | label | step s (median) | steps s | CPU s / step | forward s | backward s | optimizer s | tokens/s | RSS before backward GiB | peak RSS GiB |")
    w("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    def variant(r):
        if r["side"] == "ours" and r.get("gradient_checkpointing"):
            return "ours, gradient checkpointing"
        if r["side"] == "before":
            return "ours before (`BEFORE_BIN`)"
        return r["side"]

    for r in train:
        w(f"| {variant(r)} | {r['threads']} | {r['label']} | {fmt(r['step_s'], 2)} | "
          f"{rounds(r['step_s_all'], 1)} | {fmt(r.get('step_cpu_s'), 1)} | {fmt(r['forward_s'], 2)} | "
          f"{fmt(r['backward_s'], 2)} | {fmt(r['optimizer_s'], 2)} | {fmt(r['tokens_per_s'])} | "
          f"{fmt(r.get('rss_before_backward_gib'), 2)} | {fmt(r['peak_rss_gib'], 2)} |")
    plain = [r for r in train if r["side"] == "ours" and not r.get("gradient_checkpointing")]
    ckpt = [r for r in train if r["side"] == "ours" and r.get("gradient_checkpointing")]
    earlier = [r for r in train if r["side"] == "before"]
    o_step = med([r["step_s"] for r in plain])
    t_step = med([r["step_s"] for r in train if r["side"] == "torch"])
    o_mem = med([r["peak_rss_gib"] for r in plain])
    t_mem = med([r["peak_rss_gib"] for r in train if r["side"] == "torch"])
    w("")
    o_cpu = med([r["step_cpu_s"] for r in plain if r.get("step_cpu_s")])
    t_cpu = med([r["step_cpu_s"] for r in train if r["side"] == "torch" and r.get("step_cpu_s")])
    w(f"Summary: step time ours {fmt(o_step, 1)} s vs torch {fmt(t_step, 1)} s "
      f"(ours is {ratio(o_step, t_step, invert=True)} torch's speed; earlier torch reference "
      f"{EARLIER_TORCH_TRAIN[0]} s); peak RSS ours {fmt(o_mem, 2)} GiB vs torch {fmt(t_mem, 2)} GiB "
      f"(ours/torch = {ratio(o_mem, t_mem)}; earlier torch reference {EARLIER_TORCH_TRAIN[1]} GB). "
      f"CPU time per step: ours {fmt(o_cpu, 1)} s vs torch {fmt(t_cpu, 1)} s "
      f"(ours needs {ratio(o_cpu, t_cpu)} torch's CPU time).")
    w("")
    if ckpt:
        c_step = med([r["step_s"] for r in ckpt])
        c_mem = med([r["peak_rss_gib"] for r in ckpt])
        w(f"With gradient checkpointing (`--checkpoint`: each layer recomputed in backward): step "
          f"{fmt(c_step, 1)} s ({ratio(c_step, t_step, invert=True)} torch's speed), peak RSS "
          f"{fmt(c_mem, 2)} GiB (ours/torch = {ratio(c_mem, t_mem)}).")
        w("")
    if earlier:
        e_step = med([r["step_s"] for r in earlier])
        e_mem = med([r["peak_rss_gib"] for r in earlier])
        w(f"The earlier build (`BEFORE_BIN`) in the same run: step {fmt(e_step, 1)} s "
          f"({ratio(e_step, t_step, invert=True)} torch's speed), peak RSS {fmt(e_mem, 2)} GiB; "
          f"this build is {ratio(e_step, o_step)} as fast.")
        w("")
    if o_step:
        # The work of the step as torch does it (every position's logits, full attention):
        # about 1.65 TFLOP; the floor is 11 s at about 150 GFLOP/s on the 2 cores.
        w(f"Throughput: 1.65 TFLOP / {fmt(o_step, 1)} s = {fmt(1650 / o_step, 0)} GFLOP/s torch-equivalent, "
          f"{fmt(100 * 11.0 / o_step, 0)}% of the 11 s floor (at 150 GFLOP/s); torch "
          f"{fmt(1650 / t_step, 0) if t_step else '–'} GFLOP/s.")
        w("")

    if dpo:
        d0 = dpo[0]
        rows_n, row_len = 2 * d0["pairs"], d0["prompt"] + d0["completion"]
        lr_s = f"{d0['lr']:.0e}".replace("e-0", "e-")  # 1e-6
        w(f"### DPO step ({d0['pairs']} pairs, prompt {d0['prompt']} + completion {d0['completion']} tokens; "
          f"chosen and rejected in one batch of {rows_n} x {row_len}; sigmoid loss, beta {d0['beta']:g}, "
          f"AdamW lr {lr_s}, no weight decay, constant LR, clip {d0.get('max_grad_norm', 1.0):g})")
        w("")
        w("One optimiser step of each library's DPO trainer, median of the timed steps after the warm-up; "
          "lower is better. Ours (`rlhf-bench dpo`): the `rlhf dpo` step (`pair_batch_loss`, backward, "
          "`clip_grad_norm`, `rlhf_train::AdamW`), the reference log-probs computed once before the first "
          "step and reused (`ref s`, not part of the step). Torch: TRL's `DPOTrainer` with its default "
          "reference handling (a frozen copy run in every step, no precompute), so its forward includes "
          "the reference forward; its optimizer column is clip + AdamW + scheduler + zero_grad.")
        w("")
        w("| side | threads | label | step s (median) | steps s | CPU s / step | forward s | backward s | optimizer s | ref s (once) | losses | RSS before backward GiB | peak RSS GiB |")
        w("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|")
        for r in dpo:
            w(f"| {r['side']} | {r['threads']} | {r['label']} | {fmt(r['step_s'], 2)} | "
              f"{rounds(r['step_s_all'], 1)} | {fmt(r.get('step_cpu_s'), 1)} | {fmt(r.get('forward_s'), 2)} | "
              f"{fmt(r.get('backward_s'), 2)} | {fmt(r.get('optimizer_s'), 2)} | {fmt(r.get('ref_s'), 1)} | "
              f"{', '.join(f'{x:.3f}' for x in r['losses'])} | "
              f"{fmt(r.get('rss_before_backward_gib'), 2)} | {fmt(r['peak_rss_gib'], 2)} |")
        o_step = med([r["step_s"] for r in dpo if r["side"] == "ours"])
        t_step = med([r["step_s"] for r in dpo if r["side"] == "torch"])
        o_cpu = med([r["step_cpu_s"] for r in dpo if r["side"] == "ours" and r.get("step_cpu_s")])
        t_cpu = med([r["step_cpu_s"] for r in dpo if r["side"] == "torch" and r.get("step_cpu_s")])
        o_ref = med([r["ref_s"] for r in dpo if r["side"] == "ours" and r.get("ref_s") is not None])
        o_mem = med([r["peak_rss_gib"] for r in dpo if r["side"] == "ours"])
        t_mem = med([r["peak_rss_gib"] for r in dpo if r["side"] == "torch"])
        losses = {tuple(r["losses"]) for r in dpo}
        same = ("identical to three decimals in every run (" + ", ".join(f"{x:.3f}" for x in next(iter(losses))) + ")"
                if len(losses) == 1 else "NOT identical across runs (see the table)")
        w("")
        w(f"Summary: DPO step ours {fmt(o_step, 1)} s vs torch {fmt(t_step, 1)} s "
          f"(torch step / ours step = {ratio(t_step, o_step)}; ours also pays {fmt(o_ref, 1)} s once for the "
          f"reference log-probs); CPU time per step ours {fmt(o_cpu, 1)} s vs torch {fmt(t_cpu, 1)} s; "
          f"peak RSS ours {fmt(o_mem, 2)} GiB vs torch {fmt(t_mem, 2)} GiB. Losses: {same}.")
        w("")

    if rloo:
        r0 = rloo[0]
        lr_s = f"{r0['lr']:.0e}".replace("e-0", "e-")
        w(f"### Online RL step (RLOO, {r0['prompts']} prompts × {r0['k']} samples × {r0['max_new_tokens']} tokens)")
        w("")
        w(f"One iteration of each library's RLOO trainer: sample {r0['k']} completions of at most "
          f"{r0['max_new_tokens']} tokens (temperature 1) for each of the {r0['prompts']} prompts of "
          f"`bench/prompts.txt` (plain text, no chat template), score them with the frozen reference and the "
          f"reward (`bench/reward_words.py`: distinct words / 10), KL-shaped leave-one-out advantages "
          f"(beta {r0['beta']:g} fixed), then {r0['minibatches']} optimiser steps of "
          f"{r0['prompts'] * r0['k'] // r0['minibatches']} samples (AdamW lr {lr_s}, constant, clip 1). "
          f"Median of the timed iterations after {r0['warmup']} warm-up; lower is better. Ours "
          f"(`rlhf-bench rloo`): `rlhf_methods::rloo::run`, the times its run directory logs "
          f"(`time/iteration_s`, `time/rollout_s` = generation + reference log-probs + reward command, a "
          f"Python process per batch). Torch: TRL's `RLOOTrainer`, one round = the optimiser steps that share "
          f"a generation batch (`steps_per_generation` = {r0['minibatches']}), rollout = its "
          f"`_generate_and_score_completions` (generation, a no-grad forward of the policy for the old "
          f"log-probs, the reference forward, the reward function in process). Each side samples its own "
          f"completions (different random streams), so lengths differ: compare the token columns. Peak RSS: "
          f"VmHWM after the last iteration (ours before writing the final model, which TRL does not do here).")
        w("")
        w("| side | threads | label | iteration s (median) | iterations s | rollout s (median) | rollout share | completion tokens (mean) | peak RSS GiB |")
        w("|---|---:|---|---:|---|---:|---:|---:|---:|")
        for r in rloo:
            w(f"| {variant(r)} | {r['threads']} | {r['label']} | {fmt(r['iteration_s'], 2)} | "
              f"{rounds(r['iteration_s_all'], 1)} | {fmt(r['rollout_s'], 2)} | "
              f"{fmt(100 * r['rollout_share'], 0)}% | {fmt(r['completion_tokens_mean'], 1)} | "
              f"{fmt(r['peak_rss_gib'], 2)} |")
        side = lambda s: [r for r in rloo if r["side"] == s and not r.get("gradient_checkpointing")]
        ckpt = [r for r in rloo if r["side"] == "ours" and r.get("gradient_checkpointing")]
        o_it = med([r["iteration_s"] for r in side("ours")])
        t_it = med([r["iteration_s"] for r in side("torch")])
        o_share = med([r["rollout_share"] for r in side("ours")])
        t_share = med([r["rollout_share"] for r in side("torch")])
        o_tok = med([r["completion_tokens_mean"] for r in side("ours")])
        t_tok = med([r["completion_tokens_mean"] for r in side("torch")])
        o_mem = med([r["peak_rss_gib"] for r in side("ours")])
        t_mem = med([r["peak_rss_gib"] for r in side("torch")])
        w("")
        w(f"Summary: RLOO iteration ours {fmt(o_it, 1)} s vs TRL {fmt(t_it, 1)} s (TRL / ours = "
          f"{ratio(t_it, o_it)}; target ≥ 3x); rollout share ours "
          f"{fmt(100 * o_share if o_share is not None else None, 0)}% vs TRL "
          f"{fmt(100 * t_share if t_share is not None else None, 0)}%; mean completion tokens ours "
          f"{fmt(o_tok, 1)} vs TRL {fmt(t_tok, 1)}; peak RSS ours {fmt(o_mem, 2)} GiB vs TRL {fmt(t_mem, 2)} GiB "
          f"(ours / TRL = {ratio(o_mem, t_mem)}; target ≤ 0.5x).")
        w("")
        if ckpt:
            c_it = med([r["iteration_s"] for r in ckpt])
            c_mem = med([r["peak_rss_gib"] for r in ckpt])
            w(f"With gradient checkpointing (`--checkpoint`, `gradient_checkpointing = true` in the "
              f"config; TRL ran without it, its faster setting): iteration {fmt(c_it, 1)} s (TRL / ours = "
              f"{ratio(t_it, c_it)}), peak RSS {fmt(c_mem, 2)} GiB (ours / TRL = {ratio(c_mem, t_mem)}).")
            w("")

    for r in [r for r in rows if r.get("bench") == "parity"]:
        w(f"Gradient parity (`rlhf-bench parity`, {r['batch']} x {r['seq']} tokens, loss on the last "
          f"{r['completion']}): the f32 training path against the composed differentiable ops in f64 on "
          f"the same weights and rows, over all {r['tensors']} parameter tensors: largest relative "
          f"gradient error (max |fast - reference| / max |reference| per tensor) "
          f"{r['max_rel_grad_error']:.1e} (`{r['worst_tensor']}`); loss {r['loss_f32_fast']:.6f} vs "
          f"{r['loss_f64_composed']:.6f}.")
        w("")

    quick = [r for r in rows if r.get("bench") == "quickstart"]
    if quick:
        w("### Quickstart on the tiny testbed model (`rlhf --threads 1 quickstart`)")
        w("")
        w("The whole built-in pipeline (data, SFT, reward model, RLOO, evaluation) on the 0.8M-parameter "
          "model, wall and CPU time of the process; lower is better.")
        w("")
        w("| build | label | wall s | user s | system s | system share | peak RSS GiB |")
        w("|---|---|---:|---:|---:|---:|---:|")
        for r in quick:
            share = r["sys_s"] / max(r["user_s"] + r["sys_s"], 1e-9)
            w(f"| {'earlier build' if r['side'] == 'before' else 'this build'} | {r['label']} | "
              f"{fmt(r['wall_s'], 1)} | {fmt(r['user_s'], 1)} | {fmt(r['sys_s'], 1)} | "
              f"{fmt(100 * share, 0)}% | {fmt(r['peak_rss_gib'], 2)} |")
        w("")

    if micro:
        w("### Micro-benchmarks (ours, 1 thread)")
        w("")
        w("`x (m x k) @ W^T` for the model's weight shapes: `Linear` on the weight as stored "
          "(out x in, multiplied through a transposed view) vs the same product with a "
          "pre-transposed contiguous (in x out) copy of the weight.")
        w("")
        w("| m (rows) | weight | n x k | Linear ms | pre-transposed ms | speed-up |")
        w("|---:|---|---|---:|---:|---:|")
        for r in micro["matmul"]:
            w(f"| {r['m']} | {r['what']} | {r['n']} x {r['k']} | {fmt(r['linear_ms'], 3)} | "
              f"{fmt(r['pretransposed_ms'], 3)} | {fmt(r['speedup'], 2)}x |")
        w("")
        w(f"Host sampling, one row of 49,152 logits: full sort {fmt(micro['sample_row_sort_ms'], 2)} ms "
          f"vs one exp pass {fmt(micro['sample_row_exp_pass_ms'], 2)} ms.")
        w("")
    w(END)
    section = "\n".join(out)

    try:
        text = open(doc).read()
    except FileNotFoundError:
        text = f"# Performance\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(doc, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
