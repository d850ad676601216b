//! Supervised fine-tuning: next-token NLL on the completion tokens only (prompt and padding
//! masked), averaged over the completion tokens of the batch, as TRL's SFTTrainer with
//! `completion_only_loss`. EOS is appended to every completion so the model learns to stop.

use rlhf_rl::registry::{Entry, Family};
use std::path::PathBuf;

use candle_core::Device;
use rlhf_rl::fit::{fit, load_with_eval};
use rlhf_rl::objectives::{eval_loss, nll_share};
use rlhf_rl::pairs::load_rows;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::trainer::{OptimConfig, Trainer};
use rlhf_train::Result;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Model to fine-tune: an HF directory or a .gguf file.
    pub model: PathBuf,
    /// JSONL/Parquet with `prompt`/`completion` or `messages`.
    pub train_file: PathBuf,
    /// Held-out data in the same format as `train_file`, for an evaluation loss.
    pub eval_file: Option<PathBuf>,
    /// The run directory (config, metrics, checkpoints, final model).
    pub output_dir: PathBuf,
    /// Passes over the training data.
    pub epochs: usize,
    /// Examples per optimiser step (split into `optim.grad_accum` micro-batches).
    pub batch_size: usize,
    /// Longest row (prompt + completion) in tokens; longer rows are cut.
    pub max_len: usize,
    /// Evaluate on `eval_file` every this many optimiser steps (0: only at the end).
    pub eval_every: u64,
    /// Checkpoint every this many optimiser steps (0: never; the final model is always written).
    pub save_every: u64,
    /// Log metrics every this many optimiser steps.
    pub log_every: u64,
    /// Seed of every random stream of the run (data order, sampling, initialisation).
    pub seed: u64,
    /// Skip (and count) malformed data lines instead of stopping at the first one.
    pub skip_bad_lines: bool,
    /// Optimiser (AdamW), learning-rate schedule, clipping and gradient accumulation.
    pub optim: OptimConfig,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            model: PathBuf::new(),
            train_file: PathBuf::new(),
            eval_file: None,
            output_dir: PathBuf::from("runs/sft"),
            epochs: 1,
            batch_size: 8,
            max_len: 512,
            eval_every: 0,
            save_every: 200,
            log_every: 10,
            seed: 0,
            skip_bad_lines: false,
            optim: OptimConfig {
                lr: 2e-5,
                ..OptimConfig::default()
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SftSummary {
    pub steps: u64,
    pub final_train_loss: f64,
    pub eval_loss: Option<f64>,
}

/// Run SFT as configured; the fine-tuned model is written to `<output_dir>/model`.
pub fn run(cfg: &SftConfig, resume: bool, device: &Device) -> Result<SftSummary> {
    // 1. The model and the tokenised (prompt, completion + EOS) rows.
    let mut lm = TrainableLm::load(&cfg.model, device)?;
    let (train, eval) = load_with_eval(&cfg.train_file, cfg.eval_file.as_deref(), |p| {
        load_rows(&lm, p, cfg.max_len, cfg.skip_bad_lines)
    })?;
    let eval_batch = cfg.batch_size.max(1) * 2;
    // 2. The run: optimiser, schedule, run directory (or its latest checkpoint).
    let plan = rlhf_rl::fit_plan!("sft", cfg, eval.is_some());
    let total = plan.total_steps(train.len());
    let mut trainer = Trainer::start(&cfg.output_dir, cfg, &lm, &cfg.optim, total, resume)?;
    // 3. Epochs of token-mean NLL steps on the completion tokens.
    let history = fit(
        &mut trainer,
        &lm,
        train.len(),
        &plan,
        |lm, batch, part| nll_share(lm, &train, batch, part, device),
        |trainer, lm| {
            let l = eval_loss(
                lm,
                eval.as_ref().expect("eval_every is 0 without eval"),
                eval_batch,
                device,
            )?;
            trainer.log(&[("eval_loss", l)])
        },
    )?;
    // 4. Held-out loss and the final model.
    let eval_loss = match &eval {
        Some(e) => {
            let l = eval_loss(&lm, e, eval_batch, device)?;
            trainer.log(&[("eval_loss", l)])?;
            Some(l)
        }
        None => None,
    };
    lm.generation.max_new_tokens.get_or_insert(64);
    trainer.finish(&lm)?;
    Ok(SftSummary {
        steps: trainer.step,
        final_train_loss: history.last().map_or(f64::NAN, |m| m[0].1),
        eval_loss,
    })
}

/// `rlhf sft`.
pub static ENTRY: Entry<SftConfig, SftSummary> = Entry {
    name: "sft",
    about: "Supervised fine-tuning on prompt/completion or chat data (completion-only NLL).",
    family: Family::Offline,
    shorthands: &[],
    run,
};
