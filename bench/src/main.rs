//! `rlhf-bench`: wall-clock benchmarks of the toolkit on a real model, printed as one JSON line
//! per run so that `bench/run.sh` can put them next to the PyTorch/transformers anchor
//! (`bench/anchor_torch.py`, which measures the same things the same way).
//!
//! * `gen`: sampled generation (temperature 1, no top-k/top-p, exactly `--new` tokens, no EOS),
//!   tok/s = batch * new / wall time of the whole `generate` call (prefill + decode).
//! * `train`: one full-model training step (forward, backward, AdamW) on `batch x seq` tokens,
//!   loss = mean NLL over the last `--completion` tokens of each row; median of the timed steps,
//!   split into forward / backward / optimizer, and the process's peak RSS (VmHWM).
//!
//! Threads are fixed with `rlhf_lm::set_threads` before any tensor work, so each thread count is
//! a separate process.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::{Args, Parser, Subcommand};
use rlhf_lm::generate::{generate, SamplingParams};
use rlhf_lm::llama::{Llama, Trainable};
use rlhf_lm::score::{completion_logprobs, CompletionBatch};
use rlhf_lm::Pretrained;
use serde_json::json;

/// The prompts both sides use (row i of a batch gets prompt i mod 8).
const PROMPTS: &str = include_str!("../prompts.txt");

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
}

/// A field of /proc/self/status in bytes (VmHWM = peak RSS, VmRSS = current).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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
    for r in 0..reps {
        let t = Instant::now();
        let samples = generate(
            &model,
            &prompts,
            pad,
            &params(new, seed + 1 + r as u64),
            None,
        )?;
        walls.push(t.elapsed().as_secs_f64());
        ensure!(
            samples.iter().all(|s| s.tokens.len() == new),
            "a row stopped early: lengths {:?}",
            samples.iter().map(|s| s.tokens.len()).collect::<Vec<_>>()
        );
    }
    let wall = median(&walls);
    let tokens = (batch * new) as f64;
    Ok(json!({
        "side": "ours",
        "bench": "gen",
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
        "tok_per_s": round3(tokens / wall),
        "decode_tok_per_s": round3(batch as f64 * (new - 1) as f64 / (wall - prefill_s).max(1e-9)),
        "peak_rss_gib": gib(proc_status_bytes("VmHWM:")),
    }))
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
    let Pretrained {
        config, weights, ..
    } = pre;
    let rss_loaded = proc_status_bytes("VmRSS:");
    let trainable = Trainable::new(&weights)?;
    drop(weights); // the trainable copy is the only one kept, as on the torch side
    let device = Device::Cpu;
    let model = Llama::from_weights(&config, &trainable.tensors(), &device)?;
    let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
    let n_params: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr,
            ..ParamsAdamW::default()
        },
    )?;

    let rows = token_rows(batch, seq, config.vocab_size);
    let split = seq - completion;
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = rows
        .iter()
        .map(|r| (r[..split].to_vec(), r[split..].to_vec()))
        .collect();
    let cb = CompletionBatch::new(&pairs, pad, &device)?;
    let n_tokens = cb.completion_mask.sum_all()?.to_scalar::<f32>()? as f64;
    ensure!(
        n_tokens as usize == batch * completion,
        "completion mask covers {n_tokens} tokens"
    );

    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    let mut opt_s = Vec::new();
    let mut total = Vec::new();
    let mut losses = Vec::new();
    for step in 0..warmup + steps {
        let t0 = Instant::now();
        let lp = completion_logprobs(&model, &cb, 1.0)?;
        let loss = (lp.sum_all()? / -n_tokens)?;
        let loss_value = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        drop(grads);
        drop(loss);
        drop(lp);
        let t3 = Instant::now();
        ensure!(loss_value.is_finite(), "non-finite loss at step {step}");
        losses.push(round3(loss_value as f64));
        if step >= warmup {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            opt_s.push((t3 - t2).as_secs_f64());
            total.push((t3 - t0).as_secs_f64());
        }
        eprintln!(
            "step {step}: loss {loss_value:.4}  fwd {:.2}s  bwd {:.2}s  opt {:.2}s",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64()
        );
    }
    let r = |v: &[f64]| v.iter().map(|&x| round3(x)).collect::<Vec<_>>();
    Ok(json!({
        "side": "ours",
        "bench": "train",
        "label": common.label,
        "threads": common.threads,
        "batch": batch,
        "seq": seq,
        "completion": completion,
        "params": n_params,
        "load_s": round3(load_s),
        "step_s": round3(median(&total)),
        "step_s_all": r(&total),
        "forward_s": round3(median(&fwd)),
        "backward_s": round3(median(&bwd)),
        "optimizer_s": round3(median(&opt_s)),
        "tokens_per_s": round3((batch * seq) as f64 / median(&total)),
        "losses": losses,
        "rss_after_load_gib": gib(rss_loaded),
        "peak_rss_gib": gib(proc_status_bytes("VmHWM:")),
    }))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Gen { common, .. } | Command::Train { common, .. } => common.threads,
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
        } => bench_gen(common, *batch, *new, *reps, *seed)?,
        Command::Train {
            common,
            batch,
            seq,
            completion,
            warmup,
            steps,
            lr,
        } => bench_train(common, *batch, *seq, *completion, *warmup, *steps, *lr)?,
    };
    println!("{out}");
    Ok(())
}
