#!/usr/bin/env python3
"""PyTorch/transformers anchor for `rlhf-bench`: the same measurements, the same way.

  python3 bench/anchor_torch.py gen --threads 2 --batches 1,8,32
  python3 bench/anchor_torch.py train --threads 2

Prints one JSON line per measurement (same keys as `rlhf-bench`). The model is the same GGUF file,
dequantised to f32 by transformers. Prompts come from bench/prompts.txt (row i gets prompt i mod 8);
training rows from the same 64-bit LCG as `rlhf-bench` (`token_rows`), so both sides see identical
token ids.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")


def vm(field):
    """A field of /proc/self/status in GiB (VmHWM = peak RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return round(int(line.split()[1]) * 1024 / 2**30, 3)
    return None


def load(path, want_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = os.path.split(os.path.abspath(path))
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name) if want_tokenizer else None
    return model, tok, time.perf_counter() - t


def token_rows(batch, seq, vocab):
    """Identical to rlhf-bench's `token_rows`."""
    mask = (1 << 64) - 1
    state = 0x2545F4914F6CDD1D
    span = vocab - 100
    rows = []
    for _ in range(batch):
        row = []
        for _ in range(seq):
            state = (state * 6364136223846793005 + 1442695040888963407) & mask
            row.append(100 + (state >> 33) % span)
        rows.append(row)
    return rows


def bench_gen(args):
    import torch

    model, tok, load_s = load(args.model, True)
    model.eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with open(os.path.join(HERE, "prompts.txt")) as f:
        texts = [l.rstrip("\n") for l in f if l.strip()]
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [texts[i % len(texts)] for i in range(batch)]
        enc = tok(prompts, return_tensors="pt", padding=True)
        lens = enc.attention_mask.sum(1).tolist()

        def run(n, seed):
            torch.manual_seed(seed)
            return model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                min_new_tokens=n,
                max_new_tokens=n,
                pad_token_id=tok.pad_token_id,
            )

        run(4, args.seed)  # warm-up
        t = time.perf_counter()
        run(1, args.seed)
        prefill_s = time.perf_counter() - t
        walls, cpus = [], []
        for r in range(args.reps):
            c = time.process_time()
            t = time.perf_counter()
            out = run(args.new, args.seed + 1 + r)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
            new = out.shape[1] - enc.input_ids.shape[1]
            assert new == args.new, f"generated {new} tokens, wanted {args.new}"
        wall = statistics.median(walls)
        print(
            json.dumps(
                {
                    "side": "torch",
                    "bench": "gen",
                    "label": args.label,
                    "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "batch": batch,
                    "new_tokens": args.new,
                    "prompt_tokens_min": min(lens),
                    "prompt_tokens_max": max(lens),
                    "load_s": round(load_s, 3),
                    "prefill_s": round(prefill_s, 3),
                    "wall_s": round(wall, 3),
                    "wall_s_all": [round(w, 3) for w in walls],
                    "cpu_s": round(statistics.median(cpus), 3),
                    "tok_per_s": round(batch * args.new / wall, 3),
                    "decode_tok_per_s": round(batch * (args.new - 1) / (wall - prefill_s), 3) if wall > prefill_s else None,
                    "peak_rss_gib": vm("VmHWM:"),
                }
            ),
            flush=True,
        )


def bench_train(args):
    import torch

    model, _, load_s = load(args.model, False)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in model.parameters())
    rss_loaded = vm("VmRSS:")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)  # weight_decay 0.01, as candle's default
    vocab = model.config.vocab_size
    ids = torch.tensor(token_rows(args.batch, args.seq, vocab), dtype=torch.long)
    split = args.seq - args.completion
    targets = ids[:, 1:]
    mask = torch.zeros(args.batch, args.seq - 1)
    mask[:, split - 1 :] = 1.0
    n_tokens = mask.sum()
    assert int(n_tokens) == args.batch * args.completion
    fwd, bwd, opt_s, total, cpu, losses = [], [], [], [], [], []
    rss_fwd = 0.0
    for step in range(args.warmup + args.steps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits[:, :-1]
        lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -(lp * mask).sum() / n_tokens
        loss_value = loss.item()
        t1 = time.perf_counter()
        rss_fwd = max(rss_fwd, vm("VmRSS:"))
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits, lp, loss
        t3 = time.perf_counter()
        losses.append(round(loss_value, 3))
        if step >= args.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            opt_s.append(t3 - t2)
            total.append(t3 - t0)
            cpu.append(time.process_time() - c0)
        print(
            f"step {step}: loss {loss_value:.4f}  fwd {t1 - t0:.2f}s  bwd {t2 - t1:.2f}s  opt {t3 - t2:.2f}s",
            file=sys.stderr,
        )
    med = statistics.median
    print(
        json.dumps(
            {
                "side": "torch",
                "bench": "train",
                "label": args.label,
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "batch": args.batch,
                "seq": args.seq,
                "completion": args.completion,
                "params": n_params,
                "load_s": round(load_s, 3),
                "step_s": round(med(total), 3),
                "step_s_all": [round(x, 3) for x in total],
                "step_cpu_s": round(med(cpu), 3),
                "forward_s": round(med(fwd), 3),
                "backward_s": round(med(bwd), 3),
                "optimizer_s": round(med(opt_s), 3),
                "tokens_per_s": round(args.batch * args.seq / med(total), 3),
                "losses": losses,
                "rss_after_load_gib": rss_loaded,
                "rss_before_backward_gib": rss_fwd,
                "peak_rss_gib": vm("VmHWM:"),
            }
        ),
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("gen", "train"):
        p = sub.add_parser(name)
        p.add_argument("--model", default=DEFAULT_MODEL)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--label", default="")
        if name == "gen":
            p.add_argument("--batches", default="1,8,32")
            p.add_argument("--new", type=int, default=64)
            p.add_argument("--reps", type=int, default=1)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--batch", type=int, default=8)
            p.add_argument("--seq", type=int, default=256)
            p.add_argument("--completion", type=int, default=192)
            p.add_argument("--warmup", type=int, default=1)
            p.add_argument("--steps", type=int, default=3)
            p.add_argument("--lr", type=float, default=1e-5)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(args.threads)
    (bench_gen if args.cmd == "gen" else bench_train)(args)


if __name__ == "__main__":
    main()
