//! GRPO (DeepSeekMath, Shao et al. 2024), for users coming from TRL or verl. It is **not** RLOO:
//!
//! | | RLOO (`rlhf rloo`) | GRPO (`rlhf grpo`) |
//! |---|---|---|
//! | KL | in the reward, sequence k1, before the baseline | in the loss, per-token k3, weight `kl.beta` |
//! | advantage | R_i - mean of the other k - 1 | (r_i - mean) / (std + eps) over the group |
//! | objective | plain policy gradient | PPO's clipped importance ratio |
//! | token weighting | sum over the sequence | mean over the sequence, then over sequences |
//!
//! ```text
//! A_i    = (r_i - mean_g r) / (std_g r + eps)        std with k - 1 in the denominator (torch.std)
//! rho_t  = pi(y_t) / pi_old(y_t)                      pi_old: the policy that sampled
//! L_t    = -min(rho_t A_i, clip(rho_t, 1 - eps_clip, 1 + eps_clip) A_i)
//!          + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)
//! loss   = mean_i( (1 / |y_i|) sum_t L_t )
//! ```
//!
//! Dividing by the group's std weights prompts whose samples barely differ as much as prompts
//! whose samples differ a lot; a group with identical rewards gives zero advantages.

use candle_core::{Device, Tensor};
use rlhf_rl::registry::{Entry, Family};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::kl::k3_tensor;
use rlhf_rl::online::{
    advantage_metrics, mean, policy_logprobs, BatchSteps, Method, OnlineConfig, OnlineSummary,
    Session,
};
use rlhf_rl::rollout::align;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoParams {
    /// The ratio is clipped to [1 - clip_eps, 1 + clip_eps].
    pub clip_eps: f64,
    /// Added to the group std before dividing.
    pub std_eps: f64,
    /// Optimiser steps per rollout batch.
    pub minibatches: usize,
    /// Passes over each rollout batch (the paper's mu).
    pub epochs: usize,
}

impl Default for GrpoParams {
    fn default() -> Self {
        GrpoParams {
            clip_eps: 0.2,
            std_eps: 1e-4,
            minibatches: 2,
            epochs: 1,
        }
    }
}

pub type GrpoConfig = OnlineConfig<GrpoParams>;

impl Method for GrpoParams {
    const NAME: &'static str = "grpo";
    fn adjust_defaults(cfg: &mut OnlineConfig<Self>) {
        cfg.kl.beta = 0.04;
    }
    fn updates_per_iteration(cfg: &OnlineConfig<Self>) -> u64 {
        (cfg.method.minibatches.clamp(1, cfg.prompts_per_step) * cfg.method.epochs.max(1)) as u64
    }
    fn validate(cfg: &OnlineConfig<Self>) -> Result<()> {
        if cfg.rollout.k < 2 {
            return Err(TrainError::invalid(format!(
                "grpo normalises rewards within a group: rollout.k must be >= 2 (got {})",
                cfg.rollout.k
            )));
        }
        if !(cfg.method.clip_eps > 0.0) || cfg.method.std_eps < 0.0 {
            return Err(TrainError::invalid(
                "method.clip_eps must be > 0 and method.std_eps >= 0",
            ));
        }
        if cfg.method.epochs == 0 || cfg.method.minibatches == 0 {
            return Err(TrainError::invalid(
                "method.epochs and method.minibatches must be >= 1",
            ));
        }
        Ok(())
    }
}

/// Group-normalised advantages: (r_i - mean) / (std + eps) within each group of `k`, with the
/// sample std (k - 1 in the denominator).
pub fn advantages(rewards: &[f64], k: usize, std_eps: f64) -> Vec<f64> {
    assert!(k >= 2 && rewards.len() % k == 0, "groups of k >= 2");
    rewards
        .chunks(k)
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / k as f64;
            let std = (g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (k - 1) as f64).sqrt();
            g.iter().map(move |r| (r - mean) / (std + std_eps))
        })
        .collect()
}

pub struct GrpoLoss {
    pub loss: Tensor,
    /// Fraction of completion tokens whose ratio was outside the clip range.
    pub clip_fraction: f64,
    /// Mean per-token k3.
    pub kl_k3: f64,
}

/// The GRPO loss on `(b, t)` per-token tensors (zero outside the completions; `mask` 1 on them):
/// current log-probs `logp` (differentiable), sampling-time `old`, reference `reference`.
pub fn loss(
    logp: &Tensor,
    old: &Tensor,
    reference: &Tensor,
    mask: &Tensor,
    advantages: &[f64],
    clip_eps: f64,
    beta: f64,
) -> Result<GrpoLoss> {
    let b = advantages.len();
    let adv = Tensor::from_vec(
        advantages.iter().map(|&a| a as f32).collect::<Vec<_>>(),
        (b, 1),
        logp.device(),
    )?;
    let ratio = (logp - old)?.exp()?;
    let unclipped = ratio.broadcast_mul(&adv)?;
    let clipped = ratio
        .clamp(1.0 - clip_eps, 1.0 + clip_eps)?
        .broadcast_mul(&adv)?;
    let pg = unclipped.minimum(&clipped)?.neg()?;
    let k3 = k3_tensor(logp, reference)?;
    let per_token = ((pg + (&k3 * beta)?)? * mask)?;
    let lens = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
    let loss = (per_token.sum(1)? / lens)?.mean_all()?;
    let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    let outside = ((ratio.lt(1.0 - clip_eps)?.to_dtype(mask.dtype())?
        + ratio.gt(1.0 + clip_eps)?.to_dtype(mask.dtype())?)?
        * mask)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let kl_k3 = (k3 * mask)?.sum_all()?.to_scalar::<f32>()? as f64 / n;
    Ok(GrpoLoss {
        loss,
        clip_fraction: outside / n,
        kl_k3,
    })
}

pub fn run(cfg: &GrpoConfig, resume: bool, device: &Device) -> Result<OnlineSummary> {
    let mut s = Session::start(cfg, resume, device)?;
    let (pad, temp, p) = (s.lm.pad_id, cfg.rollout.temperature, &cfg.method);
    while !s.done() {
        // 1. A group of k samples per prompt; the raw scores (KL goes into the loss instead).
        let rollout = s.rollout()?;
        // The trip-wire (when set) judges the batch before anything learns from it.
        if !s.judge(&rollout, &mut (), None)? {
            continue;
        }
        let adv = advantages(&rollout.scores(), rollout.k, p.std_eps);
        // 2. Clipped-ratio steps with the k3 penalty, against the sampling policy's log-probs.
        let beta = s.kl.beta;
        let (mut steps, mut clip, mut k3) = (BatchSteps::default(), vec![], vec![]);
        for epoch in 0..p.epochs as u64 {
            for mb in s.minibatches(&rollout, p.minibatches, epoch) {
                steps.push(s.optimizer_step(&mb, |lm, part| {
                    let batch = rollout.batch(part, pad, device)?;
                    let logp = policy_logprobs(lm, &batch, temp, device)?;
                    let rows = |f: fn(&rlhf_rl::rollout::RolloutSample) -> &[f32]| -> Vec<&[f32]> {
                        part.iter().map(|&i| f(&rollout.samples[i])).collect()
                    };
                    let old = align(&batch, &rows(|x| &x.logprobs), device)?;
                    let reference = align(&batch, &rows(|x| &x.ref_logprobs), device)?;
                    let a: Vec<f64> = part.iter().map(|&i| adv[i]).collect();
                    let out = loss(
                        &logp,
                        &old,
                        &reference,
                        &batch.completion_mask,
                        &a,
                        p.clip_eps,
                        beta,
                    )?;
                    clip.push(out.clip_fraction);
                    k3.push(out.kl_k3);
                    Ok((out.loss * (part.len() as f64 / mb.len() as f64))?)
                })?);
            }
        }
        // Under data parallelism each rank saw its parts of every minibatch: pool them.
        let world = rlhf_train::dist::world();
        let clip: Vec<f64> = world.gather_json(&clip)?.concat();
        let k3: Vec<f64> = world.gather_json(&k3)?.concat();
        let mut m = steps.metrics();
        m.extend([("clip_fraction", mean(&clip)), ("kl_k3", mean(&k3))]);
        m.extend(advantage_metrics(&adv));
        s.end_iteration(&rollout, &m, &mut (), None)?;
    }
    s.finish()
}

/// `rlhf grpo`.
pub static ENTRY: Entry<GrpoConfig, OnlineSummary> = Entry {
    name: "grpo",
    about: "Online RL: GRPO (group-normalised advantages, k3 KL in the loss, clipped ratio).",
    family: Family::Online,
    shorthands: &[],
    run,
};
