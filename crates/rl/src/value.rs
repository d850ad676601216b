//! A learned value baseline V(s_t): an LM trunk with a scalar head read at every position, trained
//! beside the policy with its own AdamW. Its checkpoints live in `<run>/value/` (a run directory
//! of its own, saved at the same steps as the policy's), so `--resume` restores both.
//!
//! Position convention: the value of state s_t = (prompt, y_<t) is read at the same index as the
//! logits that predict y_t, so `values(batch)` lines up with `completion_logprobs(model, batch)`.

use std::path::Path;

use candle_core::{backprop::GradStore, Device, Tensor};
use rlhf_lm::llama::{Llama, ScalarHead};
use rlhf_lm::score::CompletionBatch;
use rlhf_train::{GradAccumulator, Result, RunDir, TrainError};
use serde::Serialize;

use crate::policy::TrainableLm;
use crate::reward::{add_head, HEAD};
use crate::trainer::{OptimConfig, Optimizer};

pub struct ValueModel {
    pub lm: TrainableLm,
    optimizer: Optimizer,
    run: RunDir,
}

#[derive(Serialize)]
struct ValueRunConfig<'a> {
    init: &'a Path,
    lr: f64,
    max_grad_norm: f64,
}

/// V for every target index of `batch`, `(b, t - 1)`, zero outside the completions.
/// Differentiable when `model` and `head` are.
pub fn values(model: &Llama, head: &ScalarHead, batch: &CompletionBatch) -> Result<Tensor> {
    let tokens = &batch.tokens;
    let (_, t) = tokens.dims();
    let hidden = model.hidden_states(&tokens.ids, &tokens.positions, &tokens.mask, None)?;
    let v = head.per_token(&hidden.narrow(1, 0, t - 1)?)?;
    Ok((v * batch.completion_mask.to_dtype(hidden.dtype())?)?)
}

impl ValueModel {
    /// Trunk and head from `init`: a reward model keeps its head (AlpacaFarm initialises the value
    /// model from the reward model); any other LM gets a fresh small head.
    pub fn load_init(init: &Path, seed: u64, device: &Device) -> Result<TrainableLm> {
        let lm = TrainableLm::load(init, device)?;
        if lm.params.vars.iter().any(|(n, _)| n == HEAD) {
            return Ok(lm);
        }
        let mut w = lm.params.snapshot()?;
        add_head(
            &mut w,
            lm.config.hidden_size,
            rlhf_train::rng::stream_seed(seed, "valu"),
            device,
        )?;
        Ok(TrainableLm {
            params: rlhf_lm::llama::Trainable::new(&w)?,
            ..lm
        })
    }

    /// Start (or, with `resume_step`, continue from `<dir>/checkpoints/step-<N>`) the value model.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        init: &Path,
        dir: &Path,
        resume_step: Option<u64>,
        lr: f64,
        max_grad_norm: f64,
        seed: u64,
        lora: &rlhf_lm::lora::LoraConfig,
        device: &Device,
    ) -> Result<Self> {
        let mut lm = Self::load_init(init, seed, device)?;
        // The critic's own adapters (and its head, trained whole), drawn from their own stream.
        lm.enable_lora(lora, rlhf_train::rng::stream_seed(seed, "vlor"))?;
        // A constant learning rate, no weight decay: the policy's optimiser skeleton.
        let optim = OptimConfig {
            lr,
            weight_decay: 0.0,
            schedule: rlhf_train::ScheduleKind::Constant,
            warmup_ratio: 0.0,
            max_grad_norm,
            ..OptimConfig::default()
        };
        let mut optimizer = Optimizer::new(&lm, &optim, 1)?;
        let fresh = |dir: &Path| {
            RunDir::create_overwriting(
                dir,
                &ValueRunConfig {
                    init,
                    lr,
                    max_grad_norm,
                },
            )
        };
        // Data parallelism: rank 0 alone writes `<run>/value`; another rank's critic reads rank
        // 0's checkpoint on resume and saves its own to a scratch directory.
        let root = rlhf_train::dist::world().is_root();
        let run = match resume_step {
            Some(step) if step > 0 => {
                let run = RunDir::open_for_resume(dir)?;
                let ck = run.checkpoints_dir().join(format!("step-{step}"));
                if !ck.is_dir() {
                    return Err(TrainError::bad_file(
                        &ck,
                        "the value model has no checkpoint at the policy's step",
                    ));
                }
                let weights = rlhf_train::load_safetensors(&ck.join("model.safetensors"), device)?;
                lm.load_weights(&weights)?;
                optimizer.load_state(&rlhf_train::load_safetensors(
                    &ck.join("optimizer.safetensors"),
                    device,
                )?)?;
                if root {
                    run
                } else {
                    fresh(&rlhf_train::dist::scratch_dir("value"))?
                }
            }
            _ if root => fresh(dir)?,
            _ => fresh(&rlhf_train::dist::scratch_dir("value"))?,
        };
        Ok(ValueModel { lm, optimizer, run })
    }

    /// The trainable model and head (build once per loss).
    pub fn trainable(&self, device: &Device) -> Result<(Llama, ScalarHead)> {
        Ok((
            self.lm.model(device)?,
            ScalarHead::from_weights(&self.lm.params.tensors())?,
        ))
    }

    /// Per-token values without gradients, one vector per row (completion tokens only).
    pub fn predict(&self, batch: &CompletionBatch, device: &Device) -> Result<Vec<Vec<f32>>> {
        let model = self.lm.model(device)?.detached();
        let head = ScalarHead {
            weight: ScalarHead::from_weights(&self.lm.params.tensors())?
                .weight
                .detach(),
        };
        let v = values(&model, &head, batch)?;
        Ok(rlhf_lm::score::per_row(&v, batch)?)
    }

    pub fn accumulator(&self) -> GradAccumulator {
        self.optimizer.accumulator()
    }

    /// Clip and step; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: GradStore) -> Result<f64> {
        let stats = self.optimizer.apply(grads, 0)?;
        if !stats.applied {
            return Err(rlhf_train::TrainError::invalid(format!(
                "the critic's gradient norm is {}: stopped before it reached the critic's weights",
                rlhf_train::faults::describe(stats.grad_norm)
            )));
        }
        Ok(stats.grad_norm)
    }

    /// A deep copy of the critic's optimiser state (AdamW moments and step counts).
    pub fn optimizer_state(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        self.optimizer.state()
    }

    /// Put back what [`ValueModel::optimizer_state`] returned (a trip-wire rollback).
    pub fn restore_optimizer_state(
        &mut self,
        state: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        self.optimizer.load_state(state)
    }

    /// Save the value model at `step` (call before the policy's checkpoint of the same step).
    pub fn checkpoint(&self, step: u64) -> Result<()> {
        self.run.save_checkpoint(
            step,
            &self.lm.snapshot()?,
            &self.optimizer.state()?,
            &serde_json::json!({}),
        )?;
        Ok(())
    }
}
