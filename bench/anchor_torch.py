#!/usr/bin/env python3
"""PyTorch/transformers anchor for `rlhf-bench`: the same measurements, the same way.

  python3 bench/anchor_torch.py gen --threads 2 --batches 1,8,32
  python3 bench/anchor_torch.py train --threads 2
  python3 bench/anchor_torch.py dpo --threads 2
  python3 bench/anchor_torch.py rloo --threads 2

Prints one JSON line per measurement (same keys as `rlhf-bench`). The model is the same GGUF file,
dequantised to f32 by transformers. Prompts come from bench/prompts.txt (row i gets prompt i mod 8);
training rows from the same 64-bit LCG as `rlhf-bench` (`token_rows`), so both sides see identical
token ids. `dpo` runs TRL's `DPOTrainer` on pairs cut from the same rows (see `dpo_pairs`).
`rloo` runs TRL's `RLOOTrainer` on the 8 prompts, with the reward of bench/reward_words.py (which
`rlhf-bench rloo` runs as its reward command); see `bench_rloo`.
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

# What both TRL trainers share: constant learning rate without warm-up, AdamW without weight decay
# (torch's default betas and eps, as ours), f32 on the CPU, and nothing written, logged or evaluated.
TRAINER_ARGS = dict(
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
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


def gguf_trainable(model):
    """transformers 5 marks a GGUF-loaded model as quantized (`hf_quantizer`) even though its
    weights were unpacked to plain f32 `nn.Linear`/`nn.Embedding` at load (no GGUF kernel here),
    and `Trainer` refuses to train a "quantized" model. Drop the marker, after checking that every
    parameter is an ordinary f32 tensor."""
    import torch

    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in model.parameters())
    assert all(type(x).__module__.startswith(("torch.", "transformers.models.", "transformers.activations"))
               for x in model.modules()), {type(x) for x in model.modules()}
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


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
    for m in (model, ref_model):
        gguf_trainable(m)
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
        max_grad_norm=args.max_grad_norm,
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        max_length=None,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        **TRAINER_ARGS,
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


def bench_rloo(args):
    """TRL's RLOOTrainer (TRL 1.16: GRPO-style, generation inside the trainer), configured as
    `rlhf-bench rloo`: the 8 prompts of prompts.txt as a plain-text `prompt` column (no chat
    template), `num_generations` samples each at temperature 1 (no top-k/top-p) of at most
    `max_completion_length` tokens, one generation batch of 8 x k per round split into
    `minibatches` optimiser steps (per_device_train_batch_size = 8 * k / minibatches,
    steps_per_generation = minibatches, no gradient accumulation, num_iterations 1), beta > 0 so
    a frozen reference model scores every batch, the reward `reward_words.score` in process,
    AdamW at a constant learning rate, no weight decay, clip 1.0, no gradient checkpointing
    (TRL's default is on), f32 (TRL's default is bf16), no eval, no saving, no logging.

    TRL builds the reference itself, by loading the policy's `config._name_or_path` again, which
    for a GGUF file is its directory (and `create_model_from_path` reads the config without the
    `gguf_file` argument, so `model_init_kwargs` cannot name the file): that one call is answered
    with a second copy of the same GGUF loaded here, exactly what TRL's default (a second full
    model) would hold. One round = the optimiser steps that share a generation batch,
    timed from `on_step_begin` of the first to `on_step_end` of the last (the generation, the
    policy's and the reference's log-probs of the batch, the rewards and advantages all run inside
    the first step's `training_step`); `rollout_s` = `_generate_and_score_completions`.
    """
    import atexit
    import importlib.util
    import shutil
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    import trl
    import trl.trainer.rloo_trainer as rloo_module
    from trl import RLOOConfig, RLOOTrainer

    spec = importlib.util.spec_from_file_location("reward_words", os.path.join(HERE, "reward_words.py"))
    reward_words = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reward_words)

    def distinct_words(completions, **kwargs):
        return [reward_words.score(c) for c in completions]

    model, tok, load_s = load(args.model, True)
    ref_model, _, ref_load_s = load(args.model, False)
    for m in (model, ref_model):
        gguf_trainable(m)
    tok.padding_side = "left"  # what TRL's own AutoProcessor load would set
    with open(os.path.join(HERE, "prompts.txt")) as f:
        texts = [l.rstrip("\n") for l in f if l.strip()]
    data = Dataset.from_dict({"prompt": texts})
    gen_batch = len(texts) * args.k
    assert gen_batch % args.minibatches == 0, "the generation batch must split into equal minibatches"
    rounds = args.steps
    assert rounds > args.warmup, "need at least one timed round (steps > warmup)"

    class Timer(TrainerCallback):
        """Wall and CPU time of each round of `minibatches` optimiser steps."""

        def __init__(self):
            self.wall, self.cpu = [], []
            self.t0 = self.c0 = None

        def on_step_begin(self, args_, state, control, **k):
            if state.global_step % args.minibatches == 0:
                self.c0, self.t0 = time.process_time(), time.perf_counter()

        def on_step_end(self, args_, state, control, **k):
            if state.global_step % args.minibatches == 0:
                self.wall.append(time.perf_counter() - self.t0)
                self.cpu.append(time.process_time() - self.c0)

    timer = Timer()

    class BenchRLOOTrainer(RLOOTrainer):
        rollout_s, completion_tokens, rewards, kl, losses = [], [], [], [], []

        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            BenchRLOOTrainer.rollout_s.append(time.perf_counter() - t)
            BenchRLOOTrainer.completion_tokens.append(out["completion_mask"].sum(1).float().mean().item())
            BenchRLOOTrainer.rewards.append(self._metrics["train"]["reward"][-1])
            BenchRLOOTrainer.kl.append(self._metrics["train"]["kl"][-1])
            return out

        def training_step(self, *a, **k):
            loss = super().training_step(*a, **k)
            BenchRLOOTrainer.losses.append(loss.item())
            return loss

    out_dir = tempfile.mkdtemp(prefix="anchor-rloo-")  # nothing is saved there (save_strategy "no")
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)  # also when something fails
    cfg = RLOOConfig(
        output_dir=out_dir,
        num_generations=args.k,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        num_iterations=1,
        per_device_train_batch_size=gen_batch // args.minibatches,
        steps_per_generation=args.minibatches,
        gradient_accumulation_steps=1,
        max_steps=rounds * args.minibatches,
        learning_rate=args.lr,
        max_grad_norm=1.0,
        gradient_checkpointing=args.checkpoint,
        **TRAINER_ARGS,
    )
    policy_id = model.config._name_or_path
    create_model_from_path = rloo_module.create_model_from_path

    def reference_copy(model_id, **kwargs):  # see the docstring
        assert model_id == policy_id and kwargs.get("dtype") == torch.float32, (model_id, kwargs)
        return ref_model

    rloo_module.create_model_from_path = reference_copy
    try:
        trainer = BenchRLOOTrainer(
            model=model,
            reward_funcs=distinct_words,
            args=cfg,
            train_dataset=data,
            processing_class=tok,
            callbacks=[timer],
        )
    finally:
        rloo_module.create_model_from_path = create_model_from_path
    assert trainer.ref_model is ref_model
    assert trainer.args.generation_batch_size == gen_batch, trainer.args.generation_batch_size
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    torch.set_num_threads(args.threads)  # in case anything above changed it
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    T = BenchRLOOTrainer
    assert len(timer.wall) == rounds and len(T.rollout_s) == rounds, (timer.wall, T.rollout_s)
    for i in range(rounds):
        print(f"round {i}: {timer.wall[i]:.2f}s (rollout {T.rollout_s[i]:.2f}s), "
              f"mean completion {T.completion_tokens[i]:.1f} tokens", file=sys.stderr)
    med = statistics.median
    w = args.warmup
    r3 = lambda xs: [round(x, 3) for x in xs]
    shares = [r / i for r, i in zip(T.rollout_s, timer.wall)]
    print(
        json.dumps(
            {
                "side": "torch",
                "bench": "rloo",
                "gradient_checkpointing": args.checkpoint,
                "label": args.label,
                "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "trl": trl.__version__,
                "optim": str(getattr(cfg.optim, "value", cfg.optim)),
                "prompts": len(texts),
                "k": args.k,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0,
                "beta": args.beta,
                "lr": args.lr,
                "minibatches": args.minibatches,
                "optimizer_steps": trainer.state.global_step,
                "warmup": w,
                "iteration_s": round(med(timer.wall[w:]), 3),
                "iteration_s_all": r3(timer.wall),
                "iteration_cpu_s": round(med(timer.cpu[w:]), 3),
                "rollout_s": round(med(T.rollout_s[w:]), 3),
                "rollout_s_all": r3(T.rollout_s),
                "rollout_share": round(med(shares[w:]), 3),
                "completion_tokens_mean": round(statistics.mean(T.completion_tokens[w:]), 3),
                "completion_tokens_all": r3(T.completion_tokens),
                "losses": r3(T.losses),
                "rewards": r3(T.rewards),
                # TRL's `kl` metric: the mean per-token log-ratio over the batch's completion tokens.
                "kl_per_token": r3(T.kl),
                "load_s": round(load_s + ref_load_s, 3),
                "train_call_s": round(train_s, 3),
                "peak_rss_gib": vm("VmHWM:"),
            }
        ),
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("gen", "train", "dpo", "rloo"):
        p = sub.add_parser(name)
        p.add_argument("--model", default=DEFAULT_MODEL)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--label", default="")
        if name == "gen":
            p.add_argument("--batches", default="1,8,32")
            p.add_argument("--new", type=int, default=64)
            p.add_argument("--reps", type=int, default=1)
            p.add_argument("--seed", type=int, default=0)
        elif name == "rloo":
            p.add_argument("--k", type=int, default=4)
            p.add_argument("--max-new-tokens", type=int, default=64)
            p.add_argument("--warmup", type=int, default=1)
            p.add_argument("--steps", type=int, default=3, help="rounds, the first --warmup not timed (as rlhf-bench rloo)")
            p.add_argument("--lr", type=float, default=1e-6)
            p.add_argument("--beta", type=float, default=0.05)
            p.add_argument("--minibatches", type=int, default=2)
            p.add_argument("--checkpoint", action="store_true", help="gradient checkpointing")
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
    {"gen": bench_gen, "train": bench_train, "dpo": bench_dpo, "rloo": bench_rloo}[args.cmd](args)


if __name__ == "__main__":
    main()
