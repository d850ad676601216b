#!/usr/bin/env python3
"""PyTorch/transformers anchor for `rlhf-bench`: the same measurements, the same way.

  python3 bench/anchor_torch.py gen --threads 2 --batches 1,8,32
  python3 bench/anchor_torch.py train --threads 2
  python3 bench/anchor_torch.py dpo --threads 2

Prints one JSON line per measurement (same keys as `rlhf-bench`). The model is the same GGUF file,
dequantised to f32 by transformers. Prompts come from bench/prompts.txt (row i gets prompt i mod 8);
training rows from the same 64-bit LCG as `rlhf-bench` (`token_rows`), so both sides see identical
token ids. `dpo` runs TRL's `DPOTrainer` on pairs cut from the same rows (see `dpo_pairs`).
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
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)  # weight_decay 0.01 (torch default); rlhf-bench sets the same
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


def dpo_pairs(pairs, prompt, completion, vocab):
    """Identical to rlhf-bench's `dpo` pairs: row i of token_rows(pairs, prompt + 2 * completion)
    cut into prompt [0, prompt), chosen [prompt, prompt + completion), rejected (the rest)."""
    rows = token_rows(pairs, prompt + 2 * completion, vocab)
    return [(r[:prompt], r[prompt : prompt + completion], r[prompt + completion :]) for r in rows]


def bench_dpo(args):
    """TRL's DPOTrainer, sigmoid loss, on pre-tokenised pairs.

    TRL (checked with 1.16) always extracts the prompt, appends EOS to the completions and
    tokenises text in `_prepare_dataset`; random token ids do not survive a decode/re-encode
    round trip, so `_prepare_dataset` is overridden to pass through a dataset that already has
    TRL's own tokenised columns (`prompt_ids`, `chosen_ids`, `rejected_ids`, what its tokenising
    map produces). Everything after that (collator, concatenated forward, reference forward each
    step, loss, backward, clipping, AdamW, scheduler) is TRL/transformers' own code.
    """
    import shutil
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    import trl
    from trl import DPOConfig, DPOTrainer

    model, tok, load_s = load(args.model, True)
    # TRL would load the reference from the policy's path (which for a GGUF file lacks the file
    # name): load the same frozen copy ourselves, as TRL's default (a second full model) does.
    ref_model, _, ref_load_s = load(args.model, False)
    # transformers 5 marks a GGUF-loaded model as quantized (`hf_quantizer`) even though its
    # weights were unpacked to plain f32 `nn.Linear`/`nn.Embedding` at load (no GGUF kernel here),
    # and `Trainer` refuses to train a "quantized" model. Drop the marker, after checking that
    # every parameter is an ordinary f32 tensor.
    for m in (model, ref_model):
        assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in m.parameters())
        assert all(type(x).__module__.startswith(("torch.", "transformers.models.", "transformers.activations"))
                   for x in m.modules()), {type(x) for x in m.modules()}
        m.hf_quantizer = None
        m.is_quantized = False
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
    n_params = sum(p.numel() for p in model.parameters())
    rss_loaded = vm("VmRSS:")
    vocab = model.config.vocab_size
    pairs = dpo_pairs(args.pairs, args.prompt, args.completion, vocab)
    data = Dataset.from_dict(
        {
            "prompt_ids": [p for p, _, _ in pairs],
            "chosen_ids": [c for _, c, _ in pairs],
            "rejected_ids": [r for _, _, r in pairs],
        }
    )

    class Timer(TrainerCallback):
        """Wall and process CPU time of each optimiser step (forward, backward, clip, AdamW,
        scheduler, zero_grad); the data loading before `on_step_begin` is excluded."""

        def __init__(self):
            self.t = {"total": [], "cpu": [], "fwd": [], "bwd": [], "opt": []}
            self.t0 = self.c0 = self.t_fwd = self.t_bwd = None

        def on_step_begin(self, *a, **k):
            self.c0, self.t0 = time.process_time(), time.perf_counter()

        def on_step_end(self, *a, **k):
            t3 = time.perf_counter()
            self.t["total"].append(t3 - self.t0)
            self.t["cpu"].append(time.process_time() - self.c0)
            self.t["fwd"].append(self.t_fwd - self.t0)
            self.t["bwd"].append(self.t_bwd - self.t_fwd)
            self.t["opt"].append(t3 - self.t_bwd)

    timer = Timer()

    class BenchDPOTrainer(DPOTrainer):
        losses, grad_norms, rss_fwd = [], [], 0.0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names)
            return dataset  # already tokenised (see bench_dpo's docstring)

        def compute_loss(self, *a, **k):
            loss = super().compute_loss(*a, **k)  # policy + reference forward, loss, metrics
            timer.t_fwd = time.perf_counter()
            BenchDPOTrainer.rss_fwd = max(BenchDPOTrainer.rss_fwd, vm("VmRSS:"))
            return loss

        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)  # compute_loss + backward
            timer.t_bwd = time.perf_counter()
            BenchDPOTrainer.losses.append(loss.item())
            return loss

        def _get_grad_norm(self, *a, **k):
            g = super()._get_grad_norm(*a, **k)
            BenchDPOTrainer.grad_norms.append(float(g))
            return g

    out_dir = tempfile.mkdtemp(prefix="anchor-dpo-")
    cfg = DPOConfig(
        output_dir=out_dir,
        beta=args.beta,
        loss_type="sigmoid",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=args.max_grad_norm,
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        max_length=None,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        dataloader_num_workers=0,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = BenchDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=cfg,
        train_dataset=data,
        processing_class=tok,
        callbacks=[timer],
    )
    # With tqdm off, Trainer prints its logs (the end-of-training summary) to stdout: keep stdout
    # for the one JSON line.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    torch.set_num_threads(args.threads)  # in case anything above changed it
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    shutil.rmtree(out_dir, ignore_errors=True)  # nothing is saved there (save_strategy "no")
    n = args.warmup + args.steps
    assert len(timer.t["total"]) == n and len(BenchDPOTrainer.losses) == n, (timer.t, BenchDPOTrainer.losses)
    for step in range(n):
        print(
            f"step {step}: loss {BenchDPOTrainer.losses[step]:.6f}  grad_norm {BenchDPOTrainer.grad_norms[step]:.3f}  "
            f"fwd {timer.t['fwd'][step]:.2f}s  bwd {timer.t['bwd'][step]:.2f}s  opt {timer.t['opt'][step]:.2f}s",
            file=sys.stderr,
        )
    med = statistics.median
    w = args.warmup
    timed = {k: v[w:] for k, v in timer.t.items()}
    row_tokens = args.prompt + args.completion
    print(
        json.dumps(
            {
                "side": "torch",
                "bench": "dpo",
                "label": args.label,
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "trl": trl.__version__,
                "optim": str(getattr(cfg.optim, "value", cfg.optim)),
                "pairs": args.pairs,
                "prompt": args.prompt,
                "completion": args.completion,
                "beta": args.beta,
                "lr": args.lr,
                "max_grad_norm": args.max_grad_norm,
                "params": n_params,
                "load_s": round(load_s + ref_load_s, 3),
                # TRL runs the reference forward inside every step (no precompute): no one-off cost.
                "ref_s": None,
                "train_call_s": round(train_s, 3),
                "step_s": round(med(timed["total"]), 3),
                "step_s_all": [round(x, 3) for x in timed["total"]],
                "step_cpu_s": round(med(timed["cpu"]), 3),
                # forward = policy + reference forward, loss and TRL's metrics; optimizer = clip,
                # AdamW, scheduler, zero_grad.
                "forward_s": round(med(timed["fwd"]), 3),
                "backward_s": round(med(timed["bwd"]), 3),
                "optimizer_s": round(med(timed["opt"]), 3),
                "tokens_per_s": round(2 * args.pairs * row_tokens / med(timed["total"]), 3),
                "losses": [round(x, 3) for x in BenchDPOTrainer.losses],
                "grad_norms": [round(x, 3) for x in BenchDPOTrainer.grad_norms],
                "rss_after_load_gib": rss_loaded,
                "rss_before_backward_gib": BenchDPOTrainer.rss_fwd,
                "peak_rss_gib": vm("VmHWM:"),
            }
        ),
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("gen", "train", "dpo"):
        p = sub.add_parser(name)
        p.add_argument("--model", default=DEFAULT_MODEL)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--label", default="")
        if name == "gen":
            p.add_argument("--batches", default="1,8,32")
            p.add_argument("--new", type=int, default=64)
            p.add_argument("--reps", type=int, default=1)
            p.add_argument("--seed", type=int, default=0)
        elif name == "dpo":
            p.add_argument("--pairs", type=int, default=4)
            p.add_argument("--prompt", type=int, default=64)
            p.add_argument("--completion", type=int, default=192)
            p.add_argument("--warmup", type=int, default=1)
            p.add_argument("--steps", type=int, default=3)
            p.add_argument("--lr", type=float, default=1e-6)
            p.add_argument("--beta", type=float, default=0.1)
            p.add_argument("--max-grad-norm", type=float, default=1.0)
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
    {"gen": bench_gen, "train": bench_train, "dpo": bench_dpo}[args.cmd](args)


if __name__ == "__main__":
    main()
