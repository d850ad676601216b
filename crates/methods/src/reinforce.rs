//! REINFORCE with a moving-average baseline (Back-to-Basics, Eqs. 7-8): the whole completion is
//! one action, rewarded at the end with the KL-shaped reward R = r - beta * KL, and
//!
//! ```text
//! A_i  = R_i - b          b = mean of every shaped reward seen before this batch
//! loss = -mean_i( A_i * sum_t log pi(y_i,t | x_i, y_i,<t) )
//! ```
//!
//! The baseline is the plain mean of all rewards seen during training, and it is updated with a
//! batch's rewards only *after* that batch's gradient steps (so a sample never baselines itself);
//! the first batch has b = 0. The paper samples one completion per prompt (k = 1, the default);
//! with k > 1 the samples are simply more REINFORCE samples.

use candle_core::Device;
use rlhf_rl::registry::{Entry, Family};
use rlhf_train::Result;
use serde::{Deserialize, Serialize};

use rlhf_rl::online::{advantage_metrics, mean, Method, OnlineConfig, OnlineSummary, Session};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ReinforceParams {
    /// Optimiser steps per rollout batch, each on its own share of the batch (the paper: 2).
    pub minibatches: usize,
}

impl Default for ReinforceParams {
    fn default() -> Self {
        ReinforceParams { minibatches: 2 }
    }
}

pub type ReinforceConfig = OnlineConfig<ReinforceParams>;

impl Method for ReinforceParams {
    const NAME: &'static str = "reinforce";
    fn adjust_defaults(cfg: &mut OnlineConfig<Self>) {
        cfg.rollout.k = 1;
        cfg.prompts_per_step = 64;
    }
    fn updates_per_iteration(cfg: &OnlineConfig<Self>) -> u64 {
        cfg.method.minibatches.clamp(1, cfg.prompts_per_step) as u64
    }
}

/// The mean of all rewards seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MovingAverage {
    pub sum: f64,
    pub count: u64,
}

impl MovingAverage {
    /// 0 before any reward was seen.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
    pub fn update(&mut self, rewards: &[f64]) {
        self.sum += rewards.iter().sum::<f64>();
        self.count += rewards.len() as u64;
    }
}

/// A_i = R_i - baseline.
pub fn advantages(rewards: &[f64], baseline: f64) -> Vec<f64> {
    rewards.iter().map(|r| r - baseline).collect()
}

/// What a checkpoint (and a trip-wire snapshot) keeps besides the weights.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ReinforceState {
    baseline: MovingAverage,
}

pub fn run(cfg: &ReinforceConfig, resume: bool, device: &Device) -> Result<OnlineSummary> {
    let mut s = Session::start(cfg, resume, device)?;
    let mut state: ReinforceState = match &s.resumed_method_state {
        Some(v) => serde_json::from_value(v.clone()).unwrap_or_default(),
        None => ReinforceState::default(),
    };
    while !s.done() {
        // 1. Sample and score; shape the reward with the KL to the reference.
        let rollout = s.rollout()?;
        // The trip-wire (when set) judges the batch before anything learns from it.
        if !s.judge(&rollout, &mut state, None)? {
            continue;
        }
        let rewards = rollout.shaped_rewards(s.kl.beta);
        // 2. Advantages against the baseline of the rewards seen *before* this batch.
        let b = state.baseline.mean();
        let adv = advantages(&rewards, b);
        // 3. Gradient steps, each on its share of the batch.
        let steps = s.sequence_pg_steps(&rollout, &adv, cfg.method.minibatches, 1)?;
        // 4. Only now does the baseline see this batch.
        state.baseline.update(&rewards);
        let mut m = steps.metrics();
        m.push(("shaped_reward", mean(&rewards)));
        m.push(("baseline", b));
        m.extend(advantage_metrics(&adv));
        s.end_iteration(&rollout, &m, &mut state, None)?;
    }
    s.finish()
}

/// `rlhf reinforce`.
pub static ENTRY: Entry<ReinforceConfig, OnlineSummary> = Entry {
    name: "reinforce",
    about:
        "Online RL: REINFORCE with a moving-average baseline (sequence-level, KL-shaped reward).",
    family: Family::Online,
    shorthands: &[],
    run,
};
