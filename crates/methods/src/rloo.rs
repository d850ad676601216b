//! RLOO_k (Back-to-Basics section 2.3, after Kool et al. 2019): k i.i.d. samples per prompt from
//! the current policy, each baselined by the mean KL-shaped reward of the *other* k - 1:
//!
//! ```text
//! R_i  = r_i - beta * sum_t log(pi / pi_ref)(y_i,t)          (KL in the reward, before the baseline)
//! A_i  = R_i - (1 / (k - 1)) * sum_{j != i} R_j  =  k / (k - 1) * (R_i - mean_j R_j)
//! loss = -mean_i( A_i * sum_t log pi(y_i,t | x, y_i,<t) )
//! ```
//!
//! No division by the group's std (that would make it GRPO), no importance ratio, no clipping.
//! The rollout batch is split into `minibatches` optimiser steps (the paper: 2); `epochs` > 1
//! reuses the batch again without any correction for the policy having moved (off-policy; keep 1
//! unless you mean it).

use candle_core::Device;
use rlhf_rl::registry::{Entry, Family};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::online::{advantage_metrics, mean, Method, OnlineConfig, OnlineSummary, Session};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RlooParams {
    /// Optimiser steps per rollout batch, each on its own share of the prompts' groups.
    pub minibatches: usize,
    /// Passes over each rollout batch.
    pub epochs: usize,
}

impl Default for RlooParams {
    fn default() -> Self {
        RlooParams {
            minibatches: 2,
            epochs: 1,
        }
    }
}

pub type RlooConfig = OnlineConfig<RlooParams>;

impl Method for RlooParams {
    const NAME: &'static str = "rloo";
    fn updates_per_iteration(cfg: &OnlineConfig<Self>) -> u64 {
        (cfg.method.minibatches.clamp(1, cfg.prompts_per_step) * cfg.method.epochs.max(1)) as u64
    }
    fn validate(cfg: &OnlineConfig<Self>) -> Result<()> {
        if cfg.rollout.k < 2 {
            return Err(TrainError::invalid(format!(
                "rloo needs rollout.k >= 2 samples per prompt for its leave-one-out baseline (got {}); with one sample use `rlhf reinforce`",
                cfg.rollout.k
            )));
        }
        if cfg.method.epochs == 0 || cfg.method.minibatches == 0 {
            return Err(TrainError::invalid(
                "method.epochs and method.minibatches must be >= 1",
            ));
        }
        Ok(())
    }
}

/// Leave-one-out advantages: rewards in groups of `k` consecutive samples of one prompt;
/// A_i = R_i - mean of the other k - 1 rewards of its group.
pub fn advantages(rewards: &[f64], k: usize) -> Vec<f64> {
    assert!(k >= 2 && rewards.len() % k == 0, "groups of k >= 2");
    rewards
        .chunks(k)
        .flat_map(|g| {
            let total: f64 = g.iter().sum();
            g.iter().map(move |&r| r - (total - r) / (k - 1) as f64)
        })
        .collect()
}

pub fn run(cfg: &RlooConfig, resume: bool, device: &Device) -> Result<OnlineSummary> {
    let mut s = Session::start(cfg, resume, device)?;
    while !s.done() {
        // 1. k samples per prompt from the current policy, scored; KL-shaped rewards.
        let rollout = s.rollout()?;
        // The trip-wire (when set) judges the batch before anything learns from it.
        if !s.judge(&rollout, &mut (), None)? {
            continue;
        }
        let rewards = rollout.shaped_rewards(s.kl.beta);
        // 2. Leave-one-out baseline within each prompt's group.
        let adv = advantages(&rewards, rollout.k);
        // 3. Plain policy-gradient steps over the batch (no ratio, no clip).
        let steps =
            s.sequence_pg_steps(&rollout, &adv, cfg.method.minibatches, cfg.method.epochs)?;
        let mut m = steps.metrics();
        m.push(("shaped_reward", mean(&rewards)));
        m.extend(advantage_metrics(&adv));
        s.end_iteration(&rollout, &m, &mut (), None)?;
    }
    s.finish()
}

/// `rlhf rloo`.
pub static ENTRY: Entry<RlooConfig, OnlineSummary> = Entry {
    name: "rloo",
    about: "Online RL: RLOO_k (k samples per prompt, leave-one-out baseline, no ratio or clip).",
    family: Family::Online,
    shorthands: &[],
    run,
};
