//! The one in-memory training loop: epochs over a data set in a seeded order, batches split into
//! micro-batches whose gradients are summed (gradient accumulation), one clipped AdamW step per
//! batch on the scheduled learning rate, metrics, periodic evaluation and checkpoints, and resume
//! from the step a checkpoint was taken at.
//!
//! A method supplies only its loss: `loss_of(lm, batch, micro)` gets the indices of the whole batch
//! and of one micro-batch and returns the micro-batch's loss **already weighted by its share of the
//! batch** (so the parts add up to the batch's loss) and metrics weighted the same way (they are
//! summed over the parts). SFT, the reward model, DPO, KTO, online DPO's rounds and the judge's
//! EFT bootstrap all train through here.

use std::path::PathBuf;

use candle_core::Tensor;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use crate::policy::TrainableLm;
use crate::trainer::{OptimConfig, Trainer};
use rlhf_train::rng::epoch_order;

/// The keys every offline training run shares. Each offline method's configuration flattens it
/// in (`#[serde(flatten)]`), so they stay top-level keys of its TOML (`epochs = 2`,
/// `[optim]`), and unknown keys are still refused by the method's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct FitConfig {
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
    /// Recompute each decoder layer in the backward pass instead of keeping its activations
    /// (transformers' `gradient_checkpointing`): far less memory for one more forward pass per step.
    pub gradient_checkpointing: bool,
    /// LoRA adapters instead of full fine-tuning (`r = 0`, the default: every weight trains).
    pub lora: rlhf_lm::lora::LoraConfig,
}

impl Default for FitConfig {
    fn default() -> Self {
        FitConfig {
            eval_file: None,
            output_dir: PathBuf::from("runs/run"),
            epochs: 1,
            batch_size: 8,
            max_len: 512,
            eval_every: 0,
            save_every: 200,
            log_every: 10,
            seed: 0,
            skip_bad_lines: false,
            optim: OptimConfig::default(),
            gradient_checkpointing: false,
            lora: Default::default(),
        }
    }
}

impl FitConfig {
    /// The defaults with a method's own run directory and learning rate.
    pub fn with(output_dir: &str, lr: f64) -> Self {
        FitConfig {
            output_dir: PathBuf::from(output_dir),
            optim: OptimConfig {
                lr,
                ..OptimConfig::default()
            },
            ..FitConfig::default()
        }
    }

    /// The run's [`Trainer`] (fresh, or from the latest checkpoint when `resume`) for `plan` over
    /// `examples` items; `resolved` is the method's whole configuration, written to the run.
    pub fn start(
        &self,
        plan: &FitPlan,
        examples: usize,
        resolved: &impl Serialize,
        lm: &TrainableLm,
        resume: bool,
    ) -> Result<Trainer> {
        let total = plan.total_steps(examples);
        Trainer::start(&self.output_dir, resolved, lm, &self.optim, total, resume)
    }

    /// How `fit` walks the data (held-out evaluation only when there is held-out data).
    pub fn plan(&self, label: &str, has_eval: bool) -> FitPlan {
        FitPlan {
            log_every: self.log_every,
            eval_every: if has_eval { self.eval_every } else { 0 },
            save_every: self.save_every,
            grad_accum: self.optim.grad_accum,
            gradient_checkpointing: self.gradient_checkpointing,
            ..FitPlan::new(label, self.epochs, self.batch_size, self.seed)
        }
    }
}

/// How a data set is walked: epochs, batch size, the shuffling seed, and when to log, evaluate and
/// checkpoint (every so many optimiser steps; 0 turns evaluation / checkpoints off).
#[derive(Debug, Clone)]
pub struct FitPlan {
    /// Shown on the progress bar and in error messages.
    pub label: String,
    pub epochs: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub log_every: u64,
    pub eval_every: u64,
    pub save_every: u64,
    /// Micro-batches per optimiser step (`optim.grad_accum`).
    pub grad_accum: usize,
    /// The smallest micro-batch a loss accepts (KTO's batch KL needs 2).
    pub min_micro: usize,
    /// Models built by `lm.model` during the run recompute their layers in backward.
    pub gradient_checkpointing: bool,
}

impl FitPlan {
    pub fn new(label: &str, epochs: usize, batch_size: usize, seed: u64) -> Self {
        FitPlan {
            label: label.to_string(),
            epochs,
            batch_size: batch_size.max(1),
            seed,
            log_every: 10,
            eval_every: 0,
            save_every: 0,
            grad_accum: 1,
            min_micro: 1,
            gradient_checkpointing: false,
        }
    }

    pub fn steps_per_epoch(&self, examples: usize) -> u64 {
        examples.div_ceil(self.batch_size) as u64
    }

    /// Optimiser steps of the whole run (what the learning-rate schedule spans).
    pub fn total_steps(&self, examples: usize) -> u64 {
        self.steps_per_epoch(examples) * self.epochs as u64
    }
}

/// A training file and an optional held-out file, loaded the same way.
pub fn load_with_eval<T>(
    train: &std::path::Path,
    eval: Option<&std::path::Path>,
    load: impl Fn(&std::path::Path) -> Result<T>,
) -> Result<(T, Option<T>)> {
    Ok((load(train)?, eval.map(&load).transpose()?))
}

/// A micro-batch's loss and metrics weighted by its share of the batch (`part.len() /
/// batch.len()`), as `fit`'s `loss_of` returns them for losses that are means over examples.
pub fn weighted_share(
    part: &[usize],
    batch: &[usize],
    loss: Tensor,
    metrics: Vec<(&'static str, f64)>,
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let w = part.len() as f64 / batch.len() as f64;
    Ok((
        (loss * w)?,
        metrics.into_iter().map(|(k, v)| (k, w * v)).collect(),
    ))
}

/// The metrics of each optimiser step this process ran (a resumed run: since the resume), in order.
pub type History = Vec<Vec<(&'static str, f64)>>;

/// Train `lm` on `examples` items (indices into the caller's data) until the run's last step.
/// `on_eval` runs every `plan.eval_every` steps (after the step's checkpoint decision is made, before
/// it is written), e.g. to log held-out metrics.
pub fn fit(
    trainer: &mut Trainer,
    lm: &TrainableLm,
    examples: usize,
    plan: &FitPlan,
    mut loss_of: impl FnMut(
        &TrainableLm,
        &[usize],
        &[usize],
    ) -> Result<(Tensor, Vec<(&'static str, f64)>)>,
    mut on_eval: impl FnMut(&mut Trainer, &TrainableLm) -> Result<()>,
) -> Result<History> {
    if examples == 0 {
        return Err(TrainError::invalid(format!(
            "{}: no training examples",
            plan.label
        )));
    }
    lm.set_gradient_checkpointing(plan.gradient_checkpointing);
    let per_epoch = plan.steps_per_epoch(examples);
    let total = plan.total_steps(examples);
    let world = rlhf_train::dist::world();
    let progress = rlhf_train::progress(total, &plan.label);
    progress.set_position(trainer.step);
    let mut history = History::new();
    while trainer.step < total {
        let epoch = trainer.step / per_epoch;
        let order = epoch_order(examples, plan.seed, epoch);
        let first = (trainer.step % per_epoch) as usize * plan.batch_size;
        for batch in order[first..].chunks(plan.batch_size) {
            let started = std::time::Instant::now();
            // Data parallelism: this rank's share of the batch (all of it in a world of one); the
            // parts' losses are weighted by their share of the whole batch, so summing the ranks'
            // gradients gives the batch's gradient.
            let mine = &batch[world.share(batch.len())];
            let micro = mine
                .len()
                .div_ceil(plan.grad_accum.max(1))
                .max(plan.min_micro)
                .max(1);
            let mut acc = trainer.accumulator();
            let mut loss_sum = 0.0;
            let mut sums: Vec<(&'static str, f64)> = Vec::new();
            for part in mine.chunks(micro) {
                let (loss, metrics) = loss_of(lm, batch, part)?;
                let v = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                if !trainer.check_loss("loss", v)? {
                    loss_sum = f64::NAN;
                    break;
                }
                loss_sum += v;
                acc.add(rlhf_lm::llama::backward(&loss)?)?;
                for (k, x) in metrics {
                    match sums.iter_mut().find(|(n, _)| *n == k) {
                        Some((_, s)) => *s += x,
                        None => sums.push((k, x)),
                    }
                }
            }
            // Under data parallelism: first wait for the slowest rank (timed apart, so that
            // `time/allreduce_s` is the gradient sum itself), then sum the gradients.
            let waiting = std::time::Instant::now();
            world.barrier();
            let wait_s = waiting.elapsed().as_secs_f64();
            let reducing = std::time::Instant::now();
            let grads = acc.finish_across_ranks()?;
            let reduce_s = reducing.elapsed().as_secs_f64();
            let stats = trainer.apply(grads)?;
            let (loss_sum, sums) = if world.size() > 1 {
                let mut all =
                    world.sum_metrics([("loss", loss_sum)].into_iter().chain(sums).collect())?;
                let loss = all.remove(0).1;
                (loss, all)
            } else {
                (loss_sum, sums)
            };
            let mut m = vec![("loss", loss_sum)];
            m.extend(sums);
            history.push(m.clone());
            let step = trainer.step;
            if step.is_multiple_of(plan.log_every.max(1)) || step == total {
                m.push(("lr", stats.lr));
                m.push(("grad_norm", stats.grad_norm));
                m.push(("epoch", step as f64 / per_epoch as f64));
                m.push(("time/step_s", started.elapsed().as_secs_f64()));
                if world.size() > 1 {
                    m.push(("time/rank_wait_s", wait_s));
                    m.push(("time/allreduce_s", reduce_s));
                }
                trainer.log(&m)?;
            }
            if plan.eval_every > 0 && step.is_multiple_of(plan.eval_every) {
                on_eval(trainer, lm)?;
            }
            if plan.save_every > 0 && step.is_multiple_of(plan.save_every) && step < total {
                trainer.checkpoint(lm, serde_json::json!({}))?;
            }
            progress.set_position(step);
            progress.set_message(format!("loss {loss_sum:.4}"));
            if trainer.step >= total {
                break;
            }
        }
    }
    progress.finish_and_clear();
    Ok(history)
}

/// Per-metric means over the last `n` steps of a history (what a run reports as its final
/// training numbers).
pub fn tail_mean(history: &History, n: usize) -> std::collections::BTreeMap<String, f64> {
    let tail = &history[history.len().saturating_sub(n)..];
    let mut sums: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    for step in tail {
        for (k, v) in step {
            let e = sums.entry(k.to_string()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(k, (s, c))| (k, s / c as f64))
        .collect()
}
