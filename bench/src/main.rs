//! `rlhf-bench`: wall-clock benchmarks of the toolkit on a real model, printed as one JSON line
//! per run so that `bench/run.sh` can put them next to the PyTorch/transformers anchor
//! (`bench/anchor_torch.py`, which measures the same things the same way).
//!
//! * `gen`: sampled generation (temperature 1, no top-k/top-p, exactly `--new` tokens, no EOS),
//!   tok/s = batch * new / wall time of the whole `generate` call (prefill + decode).
//! * `train`: one full-model training step (forward, backward, AdamW) on `batch x seq` tokens,
//!   loss = mean NLL over the last `--completion` tokens of each row; median of the timed steps,
//!   split into forward / backward / optimizer, and the process's peak RSS (VmHWM).
//! * `dpo`: one step of the DPO trainer (sigmoid loss) on `--pairs` preference pairs: the policy
//!   scores chosen and rejected in one batch of `2 * pairs` rows, the reference log-probs are
//!   computed once before the first step and reused (timed as `ref_s`), then backward, gradient
//!   clipping and AdamW, exactly as `rlhf dpo` runs them (`rlhf_rl::pref`).
//! * `rloo`: iterations of the RLOO trainer itself (`rlhf_methods::rloo::run`, what `rlhf rloo`
//!   runs): the 8 prompts of prompts.txt x `k` samples of up to `--max-new-tokens` tokens, the
//!   frozen reference's log-probs, a reward command (`reward_words.py`), the KL-shaped
//!   leave-one-out advantages and 2 optimiser steps per iteration; per-iteration wall and rollout
//!   times and completion lengths read back from the run's `metrics.jsonl`.
//!
//! * `membw`: this machine's memory bandwidth (read and copy), the ceiling of batch-1 decoding,
//!   which reads every weight once per token.
//!
//! Threads are fixed with `rlhf_lm::set_threads` before any tensor work, so each thread count is
//! a separate process.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use rlhf_lm::generate::{generate, SamplingParams};
use rlhf_lm::llama::{Llama, Trainable};
use rlhf_lm::score::{completion_logprobs, CompletionBatch};
use rlhf_lm::Pretrained;
use serde_json::json;

mod membw;

/// The prompts both sides use (row i of a batch gets prompt i mod 8).
const PROMPTS: &str = include_str!("../prompts.txt");
/// The reward command of `rloo` (the anchor imports the same file's `score`).
const REWARD_SCRIPT: &str = include_str!("../reward_words.py");

#[derive(Parser)]
#[command(
    name = "rlhf-bench",
    about = "Benchmarks against the PyTorch/transformers anchor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
    /// An HF directory or a .gguf file (loaded and dequantised to f32).
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// CPU threads (set before any tensor work).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Free-form label copied into the JSON line (e.g. "run 2").
    #[arg(long, default_value = "")]
    label: String,
    /// Training benchmarks: recompute each decoder layer in the backward pass (gradient
    /// checkpointing) instead of keeping its activations.
    #[arg(long)]
    checkpoint: bool,
    /// `train`: LoRA adapters of this rank on every projection (alpha = 2r) instead of full
    /// fine-tuning (0).
    #[arg(long, default_value_t = 0)]
    lora_r: usize,
    /// `train` with `--lora-r`: keep the frozen base as "q8_0" or "q4_0" blocks (QLoRA-style).
    #[arg(long, default_value = "none")]
    quantize_base: String,
}

#[derive(Subcommand)]
enum Command {
    /// Sampled generation throughput.
    Gen {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// New tokens per row (forced: no EOS ids).
        #[arg(long, default_value_t = 64)]
        new: usize,
        /// Timed repetitions (after one short warm-up); the median is reported.
        #[arg(long, default_value_t = 1)]
        reps: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also time the model alone over the same decode (prefill, then `new - 1` one-token
        /// steps with a KV cache, logits copied to the host, no sampling), to split the wall
        /// time into model and host-side sampling.
        #[arg(long)]
        split: bool,
    },
    /// One full-model training step.
    Train {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Completion tokens at the end of each row (the loss is over these).
        #[arg(long, default_value_t = 192)]
        completion: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 1e-5)]
        lr: f64,
    },
    /// One DPO step (sigmoid loss), as `rlhf dpo` runs it. Pair i is row i of
    /// `token_rows(pairs, prompt + 2 * completion, vocab)` cut in three: ids `[0, prompt)` are
    /// the prompt, `[prompt, prompt + completion)` the chosen and the rest the rejected
    /// completion (no BOS/EOS added), so `anchor_torch.py dpo` builds identical ids.
    Dpo {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 4)]
        pairs: usize,
        #[arg(long, default_value_t = 64)]
        prompt: usize,
        /// Tokens of each completion (chosen and rejected alike).
        #[arg(long, default_value_t = 192)]
        completion: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Constant learning rate (no warm-up, no decay), AdamW without weight decay.
        #[arg(long, default_value_t = 1e-6)]
        lr: f64,
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        /// Global gradient-norm clip before AdamW (the trainer's and TRL's default 1.0); 0: off.
        #[arg(long, default_value_t = 1.0)]
        max_grad_norm: f64,
    },
    /// Micro-benchmarks behind the library recommendations in docs/performance.md: the LM's
    /// matmul shapes with the weight as stored (`Linear`, `x @ W^T` through a transposed view) vs
    /// a pre-transposed contiguous copy, and the host-side full-vocabulary sort in sampling.
    /// Gradient parity of the training path (f32: fused attention, linear, SwiGLU, RMSNorm, RoPE,
    /// log-probs at the scored positions only) against the composed differentiable ops in f64 on
    /// the same model and rows: the largest relative gradient error over all parameters.
    Parity {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 2)]
        batch: usize,
        #[arg(long, default_value_t = 64)]
        seq: usize,
        #[arg(long, default_value_t = 48)]
        completion: usize,
    },
    /// Iterations of the RLOO trainer (`rlhf rloo`): sampling, reference log-probs, reward
    /// command, leave-one-out advantages, `minibatches` optimiser steps. Eval off, no checkpoints
    /// (the final model the trainer always writes is outside the per-iteration times).
    Rloo {
        #[command(flatten)]
        common: Common,
        /// Iterations (rollout batches), the first `--warmup` of them not timed.
        #[arg(long, default_value_t = 3)]
        steps: u64,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Samples per prompt.
        #[arg(long, default_value_t = 4)]
        k: usize,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Constant learning rate (no warm-up), AdamW without weight decay, clip 1.0.
        #[arg(long, default_value_t = 1e-6)]
        lr: f64,
        /// Fixed KL coefficient (in the reward).
        #[arg(long, default_value_t = 0.05)]
        beta: f64,
        /// Optimiser steps per iteration, each on its share of the prompts' groups.
        #[arg(long, default_value_t = 2)]
        minibatches: usize,
        /// The interpreter that runs the reward command (`reward_words.py`).
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// This machine's memory bandwidth (read and copy, 1 thread and the pool), the ceiling of
    /// batch-1 decoding.
    Membw {
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Buffer size in GiB (far above the caches).
        #[arg(long, default_value_t = 1.0)]
        gib: f64,
        /// Passes per measurement (the best is reported).
        #[arg(long, default_value_t = 5)]
        passes: usize,
        #[arg(long, default_value = "")]
        label: String,
    },
    Micro {
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Repetitions per shape (the median is reported).
        #[arg(long, default_value_t = 20)]
        reps: usize,
    },
}

/// A field of /proc/self/status in bytes (VmHWM = peak RSS, VmRSS = current).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system, all threads) this process has used so far, in seconds. Next to the
/// wall time it shows how much of a run other processes took from us on a shared machine.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|x| x.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0 // CLK_TCK is 100 on Linux
}

fn gib(bytes: Option<u64>) -> serde_json::Value {
    bytes.map_or(serde_json::Value::Null, |b| {
        json!(round3(b as f64 / (1u64 << 30) as f64))
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn load(common: &Common) -> Result<(Pretrained, f64)> {
    let t = Instant::now();
    let pre = Pretrained::load(&common.model, &Device::Cpu)
        .with_context(|| format!("loading {}", common.model.display()))?;
    Ok((pre, t.elapsed().as_secs_f64()))
}

fn bench_gen(
    common: &Common,
    batch: usize,
    new: usize,
    reps: usize,
    seed: u64,
    split: bool,
) -> Result<serde_json::Value> {
    ensure!(
        batch >= 1 && new >= 1 && reps >= 1,
        "batch, new and reps must be >= 1"
    );
    let (pre, load_s) = load(common)?;
    let model = pre.model(&Device::Cpu)?;
    let texts: Vec<&str> = PROMPTS.lines().filter(|l| !l.trim().is_empty()).collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| pre.tokenizer.encode(texts[i % texts.len()], true))
        .collect::<rlhf_lm::Result<_>>()?;
    let prompt_lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let pad = pre.pad_id();
    let params = |n: usize, s: u64| SamplingParams {
        max_new_tokens: n,
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed: s,
        stop_strings: Vec::new(),
        eos_token_ids: Vec::new(),
    };

    // Warm-up: a short generation at the same batch (allocator, thread pool, caches).
    generate(&model, &prompts, pad, &params(4, seed), None)?;

    // Prefill alone (+ one sampled token): generate with one new token.
    let t = Instant::now();
    generate(&model, &prompts, pad, &params(1, seed), None)?;
    let prefill_s = t.elapsed().as_secs_f64();

    let mut walls = Vec::with_capacity(reps);
    let mut cpus = Vec::with_capacity(reps);
    for r in 0..reps {
        let c = cpu_seconds();
        let t = Instant::now();
        let samples = generate(
            &model,
            &prompts,
            pad,
            &params(new, seed + 1 + r as u64),
            None,
        )?;
        walls.push(t.elapsed().as_secs_f64());
        cpus.push(cpu_seconds() - c);
        ensure!(
            samples.iter().all(|s| s.tokens.len() == new),
            "a row stopped early: lengths {:?}",
            samples.iter().map(|s| s.tokens.len()).collect::<Vec<_>>()
        );
    }
    let wall = median(&walls);
    let tokens = (batch * new) as f64;
    let model_only_s = if split {
        Some(model_only_decode(&model, &prompts, pad, new)?)
    } else {
        None
    };
    Ok(json!({
        "side": "ours",
        "bench": "gen",
        "model_only_s": model_only_s.map(|m| round3(m.0)),
        "model_only_cpu_s": model_only_s.map(|m| round3(m.1)),
        "label": common.label,
        "threads": common.threads,
        "batch": batch,
        "new_tokens": new,
        "prompt_tokens_min": prompt_lens.iter().min(),
        "prompt_tokens_max": prompt_lens.iter().max(),
        "load_s": round3(load_s),
        "prefill_s": round3(prefill_s),
        "wall_s": round3(wall),
        "wall_s_all": walls.iter().map(|&w| round3(w)).collect::<Vec<_>>(),
        "cpu_s": round3(median(&cpus)),
        "tok_per_s": round3(tokens / wall),
        "decode_tok_per_s": (wall > prefill_s)
            .then(|| round3(batch as f64 * (new - 1) as f64 / (wall - prefill_s))),
        "peak_rss_gib": gib(proc_status_bytes("VmHWM:")),
    }))
}

/// Wall time of the model's share of a generation: the same prefill and `new - 1` cached
/// one-token steps that `generate` runs (logits to the host each step), feeding a fixed token
/// instead of sampling.
fn model_only_decode(
    model: &Llama,
    prompts: &[Vec<u32>],
    pad: u32,
    new: usize,
) -> Result<(f64, f64)> {
    use candle_core::Tensor;
    use rlhf_lm::batch::TokenBatch;
    use rlhf_lm::llama::Cache;
    let device = model.device().clone();
    let c = cpu_seconds();
    let t = Instant::now();
    let batch = TokenBatch::left_padded(prompts, pad, &device)?;
    let (b, t0) = batch.dims();
    let mut cache = Cache::new(model.config.num_hidden_layers, t0 + new);
    let hidden =
        model.hidden_states(&batch.ids, &batch.positions, &batch.mask, Some(&mut cache))?;
    let _ = model
        .logits(&hidden.narrow(1, t0 - 1, 1)?)?
        .squeeze(1)?
        .to_vec2::<f32>()?;
    let mut pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    for step in 0..new.saturating_sub(1) {
        let s_len = t0 + step + 1;
        let ids = Tensor::from_vec(vec![pad; b], (b, 1), &device)?;
        let positions = Tensor::from_vec(pos.clone(), (b, 1), &device)?;
        let mask = Tensor::zeros((b, 1, 1, s_len), candle_core::DType::F32, &device)?;
        let hidden = model.hidden_states(&ids, &positions, &mask, Some(&mut cache))?;
        let _ = model.logits(&hidden)?.squeeze(1)?.to_vec2::<f32>()?;
        pos.iter_mut().for_each(|p| *p += 1);
    }
    Ok((t.elapsed().as_secs_f64(), cpu_seconds() - c))
}

/// Each row cut into (prompt, completion) after its first `split` ids.
fn split_rows<'a>(
    rows: impl IntoIterator<Item = &'a [u32]>,
    split: usize,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    rows.into_iter()
        .map(|r| (r[..split].to_vec(), r[split..].to_vec()))
        .collect()
}

/// Deterministic pseudo-random token ids, identical to `anchor_torch.py`'s `token_rows`.
pub fn token_rows(batch: usize, seq: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let span = (vocab - 100) as u64;
    (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| {
                    // 64-bit LCG (Knuth's MMIX constants), high bits.
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (100 + (state >> 33) % span) as u32
                })
                .collect()
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
/// The timed steps of a training benchmark (those after the warm-up): forward, backward, optimiser,
/// whole step, and the process's CPU time per step.
#[derive(Default)]
struct StepTimes {
    forward: Vec<f64>,
    backward: Vec<f64>,
    optimizer: Vec<f64>,
    total: Vec<f64>,
    cpu: Vec<f64>,
}

impl StepTimes {
    /// One step from the instants at its start, after forward, after backward and after the
    /// optimiser; kept only when `timed`. Returns the forward, backward and optimiser seconds.
    fn record(&mut self, timed: bool, t: [Instant; 4], cpu_s: f64) -> (f64, f64, f64) {
        let secs = |a: Instant, b: Instant| (b - a).as_secs_f64();
        let (f, b, o) = (secs(t[0], t[1]), secs(t[1], t[2]), secs(t[2], t[3]));
        if timed {
            self.forward.push(f);
            self.backward.push(b);
            self.optimizer.push(o);
            self.total.push(secs(t[0], t[3]));
            self.cpu.push(cpu_s);
        }
        (f, b, o)
    }

    /// Median seconds per step.
    fn step_s(&self) -> f64 {
        median(&self.total)
    }

    /// `row` (a JSON object) with the step-time keys both sides of the report read added.
    fn with_fields(&self, mut row: serde_json::Value) -> serde_json::Value {
        let fields = json!({
            "step_s": round3(self.step_s()),
            "step_s_all": self.total.iter().map(|&x| round3(x)).collect::<Vec<_>>(),
            "step_cpu_s": round3(median(&self.cpu)),
            "forward_s": round3(median(&self.forward)),
            "backward_s": round3(median(&self.backward)),
            "optimizer_s": round3(median(&self.optimizer)),
        });
        if let (Some(row), serde_json::Value::Object(fields)) = (row.as_object_mut(), fields) {
            row.extend(fields);
        }
        row
    }
}

fn bench_train(
    common: &Common,
    batch: usize,
    seq: usize,
    completion: usize,
    warmup: usize,
    steps: usize,
    lr: f64,
) -> Result<serde_json::Value> {
    ensure!(
        completion >= 1 && completion < seq,
        "need 1 <= completion < seq"
    );
    ensure!(steps >= 1, "need at least one timed step");
    let (pre, load_s) = load(common)?;
    let pad = pre.pad_id();
    let rss_loaded = proc_status_bytes("VmRSS:");
    // The trainable copy is the only one kept, as on the torch side; with LoRA the base is
    // frozen (or quantised) and only the adapters are `Var`s.
    let mut lm = rlhf_rl::policy::TrainableLm::from_pretrained(pre)?;
    let device = Device::Cpu;
    let rows = token_rows(batch, seq, lm.config.vocab_size);
    let split = seq - completion;
    let pairs = split_rows(rows.iter().map(Vec::as_slice), split);
    // A quantised base: the completion log-probs of two rows before (f32) and after (quantised,
    // adapters at zero), to report how far quantising moves them.
    // Real text (this repository's testbed page), not random ids: how far the log-probs of text
    // the model reads move.
    let text = lm
        .tokenizer
        .encode(include_str!("../../docs/testbed.md"), false)?;
    let text = split_rows(text.chunks(seq).take(2).filter(|c| c.len() == seq), split);
    let probe = CompletionBatch::new(&text, pad, &device)?;
    let probe_lp = |lm: &rlhf_rl::policy::TrainableLm| -> Result<Vec<f32>> {
        let lp = completion_logprobs(&lm.model(&device)?.detached(), &probe, 1.0)?;
        let mask = probe.completion_mask.to_dtype(lp.dtype())?;
        let kept: Vec<f32> = lp.flatten_all()?.to_vec1()?;
        let m: Vec<f32> = mask.flatten_all()?.to_vec1()?;
        Ok(kept
            .into_iter()
            .zip(m)
            .filter(|(_, k)| *k > 0.0)
            .map(|(x, _)| x)
            .collect())
    };
    let quantized = common.quantize_base != "none";
    let f32_lp = if quantized {
        Some(probe_lp(&lm)?)
    } else {
        None
    };
    lm.enable_lora(
        &rlhf_lm::lora::LoraConfig {
            r: common.lora_r,
            alpha: 2.0 * common.lora_r as f64,
            target_modules: rlhf_lm::lora::TargetModules::Preset("all-linear".into()),
            quantize_base: common.quantize_base.clone(),
            ..Default::default()
        },
        0,
    )?;
    let logprob_shift = match &f32_lp {
        Some(before) => {
            let after = probe_lp(&lm)?;
            let d: Vec<f64> = before
                .iter()
                .zip(&after)
                .map(|(a, b)| (a - b).abs() as f64)
                .collect();
            json!({
                "max_abs": d.iter().copied().fold(0.0, f64::max),
                "mean_abs": d.iter().sum::<f64>() / d.len().max(1) as f64,
                "tokens": d.len(),
            })
        }
        None => serde_json::Value::Null,
    };
    let model = lm
        .model(&device)?
        .with_gradient_checkpointing(common.checkpoint);
    let n_params = lm.trainable_parameters();
    // The toolkit's own optimiser (in-place f32 update), as every trainer uses.
    let mut opt = rlhf_train::AdamW::new(
        lm.params.vars.clone(),
        rlhf_train::AdamWConfig {
            lr,
            // torch.optim.AdamW's default, which the anchor uses.
            weight_decay: 0.01,
            ..rlhf_train::AdamWConfig::default()
        },
    )?;

    let cb = CompletionBatch::new(&pairs, pad, &device)?;
    let n_tokens = cb.completion_mask.sum_all()?.to_scalar::<f32>()? as f64;
    ensure!(
        n_tokens as usize == batch * completion,
        "completion mask covers {n_tokens} tokens"
    );

    let mut times = StepTimes::default();
    let mut rss_fwd = 0u64;
    let mut losses = Vec::new();
    for step in 0..warmup + steps {
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        let lp = completion_logprobs(&model, &cb, 1.0)?;
        let loss = (lp.sum_all()? / -n_tokens)?;
        let loss_value = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        // Resident memory with the whole forward graph alive (weights, optimizer state, saved
        // activations), just before backward.
        rss_fwd = rss_fwd.max(proc_status_bytes("VmRSS:").unwrap_or(0));
        let grads = rlhf_lm::llama::backward(&loss)?;
        let t2 = Instant::now();
        opt.step(&grads, lr)?;
        drop(grads);
        drop(loss);
        drop(lp);
        let t3 = Instant::now();
        ensure!(loss_value.is_finite(), "non-finite loss at step {step}");
        losses.push(round3(loss_value as f64));
        let (f, b, o) = times.record(step >= warmup, [t0, t1, t2, t3], cpu_seconds() - c0);
        eprintln!("step {step}: loss {loss_value:.4}  fwd {f:.2}s  bwd {b:.2}s  opt {o:.2}s");
    }
    Ok(times.with_fields(json!({
        "side": "ours",
        "bench": "train",
        "gradient_checkpointing": common.checkpoint,
        "lora_r": common.lora_r,
        "quantize_base": common.quantize_base,
        "logprob_shift_vs_f32": logprob_shift,
        "label": common.label,
        "threads": common.threads,
        "batch": batch,
        "seq": seq,
        "completion": completion,
        "params": n_params,
        "load_s": round3(load_s),
        "tokens_per_s": round3((batch * seq) as f64 / times.step_s()),
        "losses": losses,
        "rss_after_load_gib": gib(rss_loaded),
        "rss_before_backward_gib": gib(Some(rss_fwd)),
        "peak_rss_gib": gib(proc_status_bytes("VmHWM:")),
    })))
}

/// One DPO step as `rlhf dpo` runs it (`rlhf_rl::pref::train_on_pairs` through `fit`): the
/// reference's `[chosen, rejected]` sums computed once with a frozen deep copy of the initial
/// weights (`two_row_reference_logps`, the trainer's `ref_batch_size` 32), then per step
/// `pair_batch_loss` (one `CompletionBatch` of `[chosen...; rejected...]`, `completion_logprobs`,
/// `pref_losses::dpo`, TRL's metrics), `backward` into the trainer's `GradAccumulator`,
/// `clip_grad_norm` and `rlhf_train::AdamW` at a constant learning rate.
#[allow(clippy::too_many_arguments)]
fn bench_parity(
    common: &Common,
    batch: usize,
    seq: usize,
    completion: usize,
) -> Result<serde_json::Value> {
    ensure!(
        completion >= 1 && completion < seq,
        "need 1 <= completion < seq"
    );
    let (pre, _) = load(common)?;
    let pad = pre.pad_id();
    let device = Device::Cpu;
    let rows = token_rows(batch, seq, pre.config.vocab_size);
    let split = seq - completion;
    let pairs = split_rows(rows.iter().map(Vec::as_slice), split);
    let cb = CompletionBatch::new(&pairs, pad, &device)?;
    let n_tokens = (batch * completion) as f64;
    // The same loss as the training benchmark, in each precision / path.
    let grads_of =
        |dtype: candle_core::DType| -> Result<(f64, Vec<(String, candle_core::Tensor)>)> {
            let weights = pre
                .weights
                .iter()
                .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?)))
                .collect::<Result<std::collections::HashMap<_, _>>>()?;
            let trainable = Trainable::new(&weights)?;
            let model = Llama::from_weights(&pre.config, &trainable.tensors(), &device)?;
            let lp = completion_logprobs(&model, &cb, 1.0)?;
            let loss = (lp.sum_all()? / -n_tokens)?;
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            let grads = rlhf_lm::llama::backward(&loss)?;
            let out = trainable
                .vars
                .iter()
                .map(|(n, v)| {
                    let g = grads
                        .get(v.as_tensor())
                        .with_context(|| format!("no gradient for {n}"))?;
                    Ok((n.clone(), g.to_dtype(candle_core::DType::F64)?))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((value, out))
        };
    let t = Instant::now();
    let (loss32, fast) = grads_of(candle_core::DType::F32)?;
    let fast_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (loss64, reference) = grads_of(candle_core::DType::F64)?;
    let reference_s = t.elapsed().as_secs_f64();
    // Per tensor: max |fast − reference| / max |reference|; report the worst tensor.
    let mut worst = (String::new(), 0f64);
    for ((name, a), (_, b)) in fast.iter().zip(&reference) {
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
        ensure!(scale > 0.0, "{name}: reference gradient is all zeros");
        let rel = diff / scale;
        if rel > worst.1 {
            worst = (name.clone(), rel);
        }
    }
    Ok(json!({
        "side": "ours",
        "bench": "parity",
        "label": common.label,
        "batch": batch,
        "seq": seq,
        "completion": completion,
        "loss_f32_fast": loss32,
        "loss_f64_composed": loss64,
        "loss_abs_diff": (loss32 - loss64).abs(),
        "max_rel_grad_error": worst.1,
        "worst_tensor": worst.0,
        "tensors": fast.len(),
        "fast_s": round3(fast_s),
        "reference_s": round3(reference_s),
    }))
}

#[allow(clippy::too_many_arguments)]
fn bench_dpo(
    common: &Common,
    n_pairs: usize,
    prompt: usize,
    completion: usize,
    warmup: usize,
    steps: usize,
    lr: f64,
    beta: f64,
    max_grad_norm: f64,
) -> Result<serde_json::Value> {
    use rlhf_rl::pairs::PairIds;
    use rlhf_rl::pref::{pair_batch_loss, pair_rows, two_row_reference_logps, PairLossParams};
    use rlhf_rl::pref_losses::PairLossKind;
    ensure!(
        n_pairs >= 1 && prompt >= 1 && completion >= 1,
        "need pairs, prompt and completion >= 1"
    );
    ensure!(steps >= 1, "need at least one timed step");
    ensure!(max_grad_norm >= 0.0, "max_grad_norm must be >= 0");
    let (pre, load_s) = load(common)?;
    let pad = pre.pad_id();
    let Pretrained {
        config, weights, ..
    } = pre;
    let rss_loaded = proc_status_bytes("VmRSS:");
    let trainable = Trainable::new(&weights)?;
    drop(weights); // the trainable copy is the only one kept, as in `TrainableLm`
    let device = Device::Cpu;
    let model = Llama::from_weights(&config, &trainable.tensors(), &device)?
        .with_gradient_checkpointing(common.checkpoint);
    let n_params: usize = trainable.vars.iter().map(|(_, v)| v.elem_count()).sum();
    let vars: Vec<candle_core::Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
    // The trainer's optimiser for DPO here: AdamW (0.9, 0.999, eps 1e-8), no weight decay, the
    // learning rate constant (no warm-up).
    let mut opt = rlhf_train::AdamW::new(
        trainable.vars.clone(),
        rlhf_train::AdamWConfig {
            lr,
            weight_decay: 0.0,
            ..rlhf_train::AdamWConfig::default()
        },
    )?;

    let pairs: Vec<PairIds> = token_rows(n_pairs, prompt + 2 * completion, config.vocab_size)
        .into_iter()
        .map(|r| PairIds {
            prompt: r[..prompt].to_vec(),
            chosen: r[prompt..prompt + completion].to_vec(),
            rejected: r[prompt + completion..].to_vec(),
            margin: 0.0,
        })
        .collect();
    let params = PairLossParams {
        kind: PairLossKind::Dpo,
        beta,
        label_smoothing: 0.0,
        ipo_length_normalize: false,
        simpo_gamma: 0.0,
    };

    // The reference log-probs, once (the trainer's `cached_reference_logps` without the file):
    // a frozen deep copy of the initial weights, dropped after scoring.
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    let refs = {
        let reference = Llama::from_weights(&config, &trainable.snapshot()?, &device)?;
        two_row_reference_logps(&reference, &pair_rows(&pairs), pad, 32)?
    };
    let ref_s = t0.elapsed().as_secs_f64();
    let ref_cpu_s = cpu_seconds() - c0;
    let rss_after_ref = proc_status_bytes("VmRSS:");

    let mut times = StepTimes::default();
    let mut rss_fwd = 0u64;
    let mut losses = Vec::new();
    let mut grad_norms = Vec::new();
    for step in 0..warmup + steps {
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        let (out, _metrics) = pair_batch_loss(&model, pad, &pairs, Some(&refs), &params, &device)?;
        let loss_value = out.loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        // Resident memory with the whole forward graph alive, just before backward.
        rss_fwd = rss_fwd.max(proc_status_bytes("VmRSS:").unwrap_or(0));
        let mut acc = rlhf_train::GradAccumulator::new(&vars);
        acc.add(rlhf_lm::llama::backward(&out.loss)?)?;
        let mut grads = acc.finish();
        drop(out);
        let t2 = Instant::now();
        let grad_norm = if max_grad_norm > 0.0 {
            rlhf_train::clip_grad_norm(&mut grads, &vars, max_grad_norm)?
        } else {
            rlhf_train::grad_norm(&grads, &vars)?
        };
        opt.step(&grads, lr)?;
        drop(grads);
        let t3 = Instant::now();
        ensure!(loss_value.is_finite(), "non-finite loss at step {step}");
        losses.push(round3(loss_value as f64));
        grad_norms.push(round3(grad_norm));
        let (f, b, o) = times.record(step >= warmup, [t0, t1, t2, t3], cpu_seconds() - c0);
        eprintln!(
            "step {step}: loss {loss_value:.6}  grad_norm {grad_norm:.3}  fwd {f:.2}s  bwd {b:.2}s  opt {o:.2}s"
        );
    }
    let row_tokens = prompt + completion;
    Ok(times.with_fields(json!({
        "side": "ours",
        "bench": "dpo",
        "gradient_checkpointing": common.checkpoint,
        "label": common.label,
        "threads": common.threads,
        "pairs": n_pairs,
        "prompt": prompt,
        "completion": completion,
        "beta": beta,
        "lr": lr,
        "max_grad_norm": max_grad_norm,
        "params": n_params,
        "load_s": round3(load_s),
        "ref_s": round3(ref_s),
        "ref_cpu_s": round3(ref_cpu_s),
        "tokens_per_s": round3((2 * n_pairs * row_tokens) as f64 / times.step_s()),
        "losses": losses,
        "grad_norms": grad_norms,
        "rss_after_load_gib": gib(rss_loaded),
        "rss_after_ref_gib": gib(rss_after_ref),
        "rss_before_backward_gib": gib(Some(rss_fwd)),
        "peak_rss_gib": gib(proc_status_bytes("VmHWM:")),
    })))
}

/// Iterations of `rlhf rloo` on the real model, through the trainer's own entry point
/// (`rlhf_methods::rloo::run`): the policy and the reference are the same `--model` (the
/// reference a frozen copy of the initial weights), the 8 prompts of prompts.txt as plain-text
/// `prompt` lines (no chat template: TRL leaves a plain-text prompt as it is), `k` samples each at
/// temperature 1 (no top-k/top-p), the reward from `reward_words.py` as a command, unnormalised
/// (normalising would first sample the reference to measure the statistics), a fixed beta in the
/// reward, `minibatches` optimiser steps per iteration, one epoch, no evaluation, no checkpoints.
/// The times are what the trainer logs per iteration in `metrics.jsonl`: `time/iteration_s`
/// (from the start of the rollout to the end of the last optimiser step), `time/rollout_s`
/// (generation + reference log-probs + reward), `response_length`. The final model the trainer
/// always writes is not in them; peak RSS is taken when the last iteration is logged (before that
/// write) and again at the end.
#[allow(clippy::too_many_arguments)]
fn bench_rloo(
    common: &Common,
    steps: u64,
    warmup: usize,
    k: usize,
    max_new_tokens: usize,
    lr: f64,
    beta: f64,
    minibatches: usize,
    python: &str,
) -> Result<serde_json::Value> {
    use rlhf_methods::rloo::{RlooConfig, RlooParams};
    use rlhf_rl::kl::KlConfig;
    use rlhf_rl::online::OnlineEvalConfig;
    use rlhf_rl::reward_source::{RewardConfig, SourceKind};
    use rlhf_rl::rollout::RolloutConfig;
    use rlhf_rl::trainer::OptimConfig;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    ensure!(
        steps as usize > warmup,
        "need at least one timed iteration (steps > warmup)"
    );
    let dir = tempfile::Builder::new()
        .prefix("rlhf-bench-rloo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let texts: Vec<&str> = PROMPTS.lines().filter(|l| !l.trim().is_empty()).collect();
    let prompts_file = dir.path().join("prompts.jsonl");
    let jsonl: String = texts
        .iter()
        .map(|t| json!({ "prompt": t }).to_string() + "\n")
        .collect();
    std::fs::write(&prompts_file, jsonl)?;
    let reward_script = dir.path().join("reward_words.py");
    std::fs::write(&reward_script, REWARD_SCRIPT)?;
    let run_dir = dir.path().join("run");

    let cfg = RlooConfig {
        model: common.model.clone(),
        reference: None,
        prompts_file: Some(prompts_file),
        output_dir: run_dir.clone(),
        steps,
        prompts_per_step: texts.len(),
        seed: 0,
        log_every: 1,
        save_every: 0,
        rollout: RolloutConfig {
            k,
            max_new_tokens,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            missing_eos_penalty: None,
            ..RolloutConfig::default()
        },
        reward: RewardConfig {
            source: SourceKind::Command,
            command: vec![python.to_string(), reward_script.display().to_string()],
            normalize: false,
            ..RewardConfig::default()
        },
        kl: KlConfig {
            beta,
            target: None,
            ..KlConfig::default()
        },
        optim: OptimConfig {
            lr,
            weight_decay: 0.0,
            schedule: rlhf_train::ScheduleKind::Constant,
            warmup_ratio: 0.0,
            max_grad_norm: 1.0,
            grad_accum: 1,
            ..OptimConfig::default()
        },
        gradient_checkpointing: common.checkpoint,
        eval: OnlineEvalConfig {
            prompts: 0,
            every: 0,
            ..OnlineEvalConfig::default()
        },
        method: RlooParams {
            minibatches,
            epochs: 1,
        },
        ..RlooConfig::default()
    };

    // Peak RSS of the iterations alone: VmHWM as soon as the last iteration's metrics line is
    // written (polled every 5 ms), before `finish` snapshots and writes the final model.
    let metrics_path = run_dir.join(rlhf_train::run::METRICS_FILE);
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (stop, path) = (stop.clone(), metrics_path.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let logged = std::fs::read_to_string(&path).map_or(0, |s| s.lines().count());
                if logged as u64 >= steps {
                    return proc_status_bytes("VmHWM:");
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            None
        })
    };
    let t = Instant::now();
    let summary = rlhf_methods::rloo::run(&cfg, false, &Device::Cpu);
    let run_s = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peak_iterations = watcher.join().expect("the RSS watcher does not panic");
    let summary = summary?;

    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics_path)
        .with_context(|| format!("reading {}", metrics_path.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    ensure!(
        lines.len() as u64 == steps,
        "{} metrics lines for {steps} iterations",
        lines.len()
    );
    let column = |name: &str| -> Result<Vec<f64>> {
        lines
            .iter()
            .map(|l| {
                l.get(name)
                    .and_then(serde_json::Value::as_f64)
                    .with_context(|| format!("metrics.jsonl: no `{name}` in {l}"))
            })
            .collect()
    };
    let iteration_s = column("time/iteration_s")?;
    let rollout_s = column("time/rollout_s")?;
    let lengths = column("response_length")?;
    let all = |xs: &[f64]| xs.iter().map(|&x| round3(x)).collect::<Vec<_>>();
    let timed = |xs: &[f64]| xs[warmup..].to_vec();
    let shares: Vec<f64> = rollout_s
        .iter()
        .zip(&iteration_s)
        .map(|(r, i)| r / i)
        .collect();
    for (i, ((it, ro), len)) in iteration_s.iter().zip(&rollout_s).zip(&lengths).enumerate() {
        eprintln!("iteration {i}: {it:.2}s (rollout {ro:.2}s), mean completion {len:.1} tokens");
    }
    Ok(json!({
        "side": "ours",
        "bench": "rloo",
        "gradient_checkpointing": common.checkpoint,
        "label": common.label,
        "threads": common.threads,
        "prompts": texts.len(),
        "k": k,
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0,
        "beta": beta,
        "lr": lr,
        "minibatches": minibatches,
        "optimizer_steps": summary.optimizer_steps,
        "warmup": warmup,
        "iteration_s": round3(median(&timed(&iteration_s))),
        "iteration_s_all": all(&iteration_s),
        "rollout_s": round3(median(&timed(&rollout_s))),
        "rollout_s_all": all(&rollout_s),
        "rollout_share": round3(median(&timed(&shares))),
        "completion_tokens_mean": round3(timed(&lengths).iter().sum::<f64>() / (lengths.len() - warmup) as f64),
        "completion_tokens_all": all(&lengths),
        "eos_fraction_all": all(&column("eos_fraction")?),
        "losses": all(&column("loss")?),
        "rewards": all(&column("reward_raw")?),
        // The trainer's `kl`: the mean over samples of the summed per-token log-ratio.
        "kl_per_sequence": all(&column("kl")?),
        // The whole `rloo::run`: loading, the iterations, writing the final model.
        "run_s": round3(run_s),
        "peak_rss_gib": gib(peak_iterations),
        "peak_rss_end_gib": gib(proc_status_bytes("VmHWM:")),
    }))
}

/// Median seconds of `reps` calls of `f` (after one warm-up call).
fn time_median(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(&v))
}

fn bench_micro(threads: usize, reps: usize) -> Result<serde_json::Value> {
    use candle_core::{DType, Module, Tensor};
    let dev = Device::Cpu;
    let mut rows = Vec::new();
    // (rows of x, out features, in features): decode at batch 8 / 32, a 8 x 256 training batch;
    // q/o projections, MLP up/gate, MLP down, LM head (SmolLM2-135M shapes).
    for &m in &[8usize, 32, 2048] {
        for &(n, k, what) in &[
            (576usize, 576usize, "q/o_proj"),
            (1536, 576, "gate/up_proj"),
            (576, 1536, "down_proj"),
            (49152, 576, "lm_head"),
        ] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
            let wt = w.t()?.contiguous()?; // (k, n), row-major
            let lin = candle_nn::Linear::new(w.clone(), None);
            let a = time_median(reps, || {
                lin.forward(&x)?;
                Ok(())
            })?;
            let b = time_median(reps, || {
                x.matmul(&wt)?;
                Ok(())
            })?;
            let diff = (lin.forward(&x)? - x.matmul(&wt)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            ensure!(diff < 1e-3, "layouts disagree by {diff}");
            let gflop = 2.0 * (m * n * k) as f64 / 1e9;
            rows.push(json!({
                "m": m, "n": n, "k": k, "what": what,
                "linear_ms": round3(a * 1e3), "pretransposed_ms": round3(b * 1e3),
                "linear_gflops": round3(gflop / a), "pretransposed_gflops": round3(gflop / b),
                "speedup": round3(a / b),
            }));
        }
    }
    // Host sampling: one row of 49152 logits, full sort (what sample_row does with no top-k /
    // top-p) vs a single exp pass (what inverse-CDF sampling in index order needs).
    let v = 49152usize;
    let logits: Vec<f32> = Tensor::randn(0f32, 3.0, v, &dev)?
        .to_dtype(DType::F32)?
        .to_vec1()?;
    let sort_s = time_median(reps, || {
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        std::hint::black_box(&order);
        Ok(())
    })?;
    let pass_s = time_median(reps, || {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let probs: Vec<f64> = logits.iter().map(|&x| ((x - max) as f64).exp()).collect();
        std::hint::black_box(&probs);
        Ok(())
    })?;
    Ok(json!({
        "side": "ours",
        "bench": "micro",
        "threads": threads,
        "matmul": rows,
        "sample_row_sort_ms": round3(sort_s * 1e3),
        "sample_row_exp_pass_ms": round3(pass_s * 1e3),
    }))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Gen { common, .. }
        | Command::Train { common, .. }
        | Command::Dpo { common, .. }
        | Command::Parity { common, .. }
        | Command::Rloo { common, .. } => common.threads,
        Command::Micro { threads, .. } | Command::Membw { threads, .. } => *threads,
    };
    // Before any tensor work: candle and rayon read these once.
    rlhf_lm::set_threads(threads);
    let out = match &cli.command {
        Command::Gen {
            common,
            batch,
            new,
            reps,
            seed,
            split,
        } => bench_gen(common, *batch, *new, *reps, *seed, *split)?,
        Command::Train {
            common,
            batch,
            seq,
            completion,
            warmup,
            steps,
            lr,
        } => bench_train(common, *batch, *seq, *completion, *warmup, *steps, *lr)?,
        Command::Parity {
            common,
            batch,
            seq,
            completion,
        } => bench_parity(common, *batch, *seq, *completion)?,
        Command::Dpo {
            common,
            pairs,
            prompt,
            completion,
            warmup,
            steps,
            lr,
            beta,
            max_grad_norm,
        } => bench_dpo(
            common,
            *pairs,
            *prompt,
            *completion,
            *warmup,
            *steps,
            *lr,
            *beta,
            *max_grad_norm,
        )?,
        Command::Rloo {
            common,
            steps,
            warmup,
            k,
            max_new_tokens,
            lr,
            beta,
            minibatches,
            python,
        } => bench_rloo(
            common,
            *steps,
            *warmup,
            *k,
            *max_new_tokens,
            *lr,
            *beta,
            *minibatches,
            python,
        )?,
        Command::Micro { threads, reps } => bench_micro(*threads, *reps)?,
        Command::Membw {
            gib, passes, label, ..
        } => membw::run(*gib, *passes, label),
    };
    println!("{out}");
    Ok(())
}
