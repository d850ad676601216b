//! "Vanilla PG" as Back-to-Basics uses the name (Eq. 9): PPO's token-level policy gradient with
//! lambda = gamma = 1 (Monte-Carlo returns-to-go), a learned value baseline, and no ratio and no
//! clipping. Every token is an action; the KL penalty is paid per token and the score at the last:
//!
//! ```text
//! r_t  = -beta * (log pi(y_t) - log pi_ref(y_t))   + score   at the last token
//! G_t  = sum_{t' >= t} r_t'                         (returns-to-go)
//! A_t  = G_t - V(s_t)                               (V from the value model at rollout time)
//! loss = -(1 / B) * sum_i sum_t A_i,t * log pi(y_i,t | .)
//! value loss = mean over completion tokens of (V(s_t) - G_t)^2 / 2   (own optimiser)
//! ```
//!
//! The value model starts from the reward model when the reward source is one (as AlpacaFarm
//! does), else from the initial policy with a fresh head; `method.value_model` overrides.

use rlhf_rl::registry::{Entry, Family};
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::objectives::token_rewards;
use rlhf_rl::online::{
    advantage_metrics, mean, policy_logprobs, BatchSteps, Method, OnlineConfig, OnlineSummary,
    Session,
};
use rlhf_rl::reward_source::SourceKind;
use rlhf_rl::rollout::align;
use rlhf_rl::value::{values, ValueModel};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct VanillaPgParams {
    /// Optimiser steps per rollout batch (policy and value alike).
    pub minibatches: usize,
    /// Value model initialisation (default: the reward model, else the initial policy).
    pub value_model: Option<PathBuf>,
    /// Learning rate of the value model (its own AdamW).
    pub value_lr: f64,
}

impl Default for VanillaPgParams {
    fn default() -> Self {
        VanillaPgParams {
            minibatches: 2,
            value_model: None,
            value_lr: 1e-5,
        }
    }
}

pub type VanillaPgConfig = OnlineConfig<VanillaPgParams>;

impl Method for VanillaPgParams {
    const NAME: &'static str = "vanilla-pg";
    fn adjust_defaults(cfg: &mut OnlineConfig<Self>) {
        cfg.rollout.k = 1;
        cfg.prompts_per_step = 64;
    }
    fn updates_per_iteration(cfg: &OnlineConfig<Self>) -> u64 {
        cfg.method.minibatches.clamp(1, cfg.prompts_per_step) as u64
    }
    fn validate(cfg: &OnlineConfig<Self>) -> Result<()> {
        if !(cfg.method.value_lr > 0.0) {
            return Err(TrainError::invalid("method.value_lr must be > 0"));
        }
        Ok(())
    }
}

/// G_t = sum_{t' >= t} r_t' (gamma = lambda = 1).
pub fn returns_to_go(rewards: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; rewards.len()];
    let mut acc = 0.0;
    for t in (0..rewards.len()).rev() {
        acc += rewards[t];
        out[t] = acc;
    }
    out
}

/// A_t = G_t - V_t.
pub fn advantages(returns: &[f64], values: &[f32]) -> Vec<f64> {
    returns
        .iter()
        .zip(values)
        .map(|(g, &v)| g - v as f64)
        .collect()
}

/// -(1 / b) * sum of advantage * log-prob over all completion tokens; `logprobs` and `advantages`
/// are `(b, t)` and zero outside the completions.
pub fn token_loss(logprobs: &Tensor, advantages: &Tensor) -> Result<Tensor> {
    let b = logprobs.dim(0)? as f64;
    Ok(((logprobs * advantages)?.sum_all()?.neg()? / b)?)
}

/// sum over completion tokens of (V - G)^2 / 2, divided by `n_tokens`; `values`, `returns` and
/// `mask` are `(b, t)`.
pub fn value_loss(
    values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    n_tokens: f64,
) -> Result<Tensor> {
    let d = ((values - returns)? * mask)?;
    Ok((d.sqr()?.sum_all()? * (0.5 / n_tokens.max(1.0)))?)
}

pub fn run(cfg: &VanillaPgConfig, resume: bool, device: &Device) -> Result<OnlineSummary> {
    let mut s = Session::start(cfg, resume, device)?;
    let init = match (
        &cfg.method.value_model,
        cfg.reward.source,
        &cfg.reward.model,
    ) {
        (Some(p), _, _) => p.clone(),
        (None, SourceKind::Model, Some(rm)) => rm.clone(),
        _ => cfg.model.clone(),
    };
    let mut value = ValueModel::start(
        &init,
        &cfg.output_dir.join("value"),
        resume.then_some(s.trainer.step),
        cfg.method.value_lr,
        cfg.optim.max_grad_norm,
        cfg.seed,
        &cfg.lora,
        device,
    )?;
    let (pad, temp) = (s.lm.pad_id, cfg.rollout.temperature);
    while !s.done() {
        // 1. Sample and score; the value model's predictions at rollout time.
        let rollout = s.rollout()?;
        // The trip-wire (when set) judges the batch before anything learns from it.
        if !s.judge(&rollout, &mut (), Some(&mut value))? {
            continue;
        }
        let all: Vec<usize> = (0..rollout.len()).collect();
        let mut v_old: Vec<Vec<f32>> = Vec::with_capacity(rollout.len());
        for chunk in all.chunks(cfg.rollout.batch_size.max(1)) {
            v_old.extend(value.predict(&rollout.batch(chunk, pad, device)?, device)?);
        }
        // 2. Per-token KL-shaped rewards, returns-to-go, advantages.
        let beta = s.kl.beta;
        let returns: Vec<Vec<f64>> = rollout
            .samples
            .iter()
            .map(|x| returns_to_go(&token_rewards(x.score, &x.logprobs, &x.ref_logprobs, beta)))
            .collect();
        let adv: Vec<Vec<f64>> = returns
            .iter()
            .zip(&v_old)
            .map(|(g, v)| advantages(g, v))
            .collect();
        let f32s = |rows: &[Vec<f64>], idx: &[usize]| -> Vec<Vec<f32>> {
            idx.iter()
                .map(|&i| rows[i].iter().map(|&x| x as f32).collect())
                .collect()
        };
        // 3. Policy and value steps on each minibatch.
        let (mut steps, mut v_losses, mut v_norms) = (BatchSteps::default(), vec![], vec![]);
        for mb in s.minibatches(&rollout, cfg.method.minibatches, 0) {
            steps.push(s.optimizer_step(&mb, |lm, part| {
                let batch = rollout.batch(part, pad, device)?;
                let logp = policy_logprobs(lm, &batch, temp, device)?;
                let a = f32s(&adv, part);
                let a = align(
                    &batch,
                    &a.iter().map(|r| r.as_slice()).collect::<Vec<_>>(),
                    device,
                )?;
                Ok((token_loss(&logp, &a)? * (part.len() as f64 / mb.len() as f64))?)
            })?);
            let mb_tokens: usize = mb.iter().map(|&i| rollout.samples[i].len()).sum();
            // Data parallelism: this rank's share of the minibatch, as for the policy's step.
            let world = rlhf_train::dist::world();
            let mine = &mb[world.share(mb.len())];
            let micro = mine.len().div_ceil(cfg.optim.grad_accum.max(1)).max(1);
            let mut acc = value.accumulator();
            let mut v_loss = 0.0;
            for part in mine.chunks(micro) {
                let batch = rollout.batch(part, pad, device)?;
                let (model, head) = value.trainable(device)?;
                let v = values(&model, &head, &batch)?;
                let g = f32s(&returns, part);
                let g = align(
                    &batch,
                    &g.iter().map(|r| r.as_slice()).collect::<Vec<_>>(),
                    device,
                )?;
                let l = value_loss(&v, &g, &batch.completion_mask, mb_tokens as f64)?;
                v_loss += l.to_scalar::<f32>()? as f64;
                acc.add(rlhf_lm::llama::backward(&l)?)?;
            }
            v_norms.push(value.step(acc.finish_across_ranks()?)?);
            let mut v_loss = [v_loss];
            world.sum_f64(&mut v_loss)?;
            v_losses.push(v_loss[0]);
        }
        let flat: Vec<f64> = adv.iter().flatten().copied().collect();
        let mut m = steps.metrics();
        m.extend([
            ("value_loss", mean(&v_losses)),
            ("value_grad_norm", mean(&v_norms)),
            (
                "return",
                mean(&returns.iter().map(|g| g[0]).collect::<Vec<_>>()),
            ),
            (
                "value",
                mean(&v_old.iter().map(|v| v[0] as f64).collect::<Vec<_>>()),
            ),
        ]);
        m.extend(advantage_metrics(&flat));
        s.end_iteration(&rollout, &m, &mut (), Some(&mut value))?;
    }
    s.finish()
}

/// `rlhf vanilla-pg`.
pub static ENTRY: Entry<VanillaPgConfig, OnlineSummary> = Entry {
    name: "vanilla-pg",
    about: "Online RL: token-level policy gradient with a learned value baseline (lambda = 1, no clip).",
    family: Family::Online,
    shorthands: &[],
    run,
};
