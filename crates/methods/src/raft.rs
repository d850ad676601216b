//! RAFT_k (Dong et al. 2023; spec 5.7), as Back-to-Basics runs it: sample k completions per
//! prompt from the current policy, keep the one with the highest reward, and take supervised
//! (NLL) steps on the kept ones:
//!
//! ```text
//! R_i  = r_i - beta * sum_t log(pi / pi_ref)(y_i,t)     (beta = 0 ranks by the raw score)
//! keep y* = argmax_i R_i in each prompt's group
//! loss = -(1 / N) * sum over the kept completions' tokens of log pi(y*_t | .)   (N: their tokens)
//! ```
//!
//! The loss is SFT's token-mean NLL; the discarded k - 1 samples only cost sampling.

use candle_core::Device;
use rlhf_rl::registry::{Entry, Family};
use rlhf_train::rng::stream_seed;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::online::{
    advantage_metrics, mean, policy_logprobs, split_groups, BatchSteps, Method, OnlineConfig,
    OnlineSummary, Session,
};
use rlhf_rl::trainer::epoch_order;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RaftParams {
    /// Optimiser steps per rollout batch, each on its share of the kept completions.
    pub minibatches: usize,
}

impl Default for RaftParams {
    fn default() -> Self {
        RaftParams { minibatches: 1 }
    }
}

pub type RaftConfig = OnlineConfig<RaftParams>;

impl Method for RaftParams {
    const NAME: &'static str = "raft";
    fn updates_per_iteration(cfg: &OnlineConfig<Self>) -> u64 {
        cfg.method.minibatches.clamp(1, cfg.prompts_per_step) as u64
    }
    fn validate(cfg: &OnlineConfig<Self>) -> Result<()> {
        if cfg.rollout.k < 2 {
            return Err(TrainError::invalid(format!(
                "raft keeps the best of rollout.k samples per prompt: it needs k >= 2 (got {})",
                cfg.rollout.k
            )));
        }
        Ok(())
    }
}

/// Index of the highest reward in each group of `k` (the first one on ties).
pub fn best_of_groups(rewards: &[f64], k: usize) -> Vec<usize> {
    rewards
        .chunks(k)
        .enumerate()
        .map(|(g, r)| {
            let best = (0..r.len()).fold(0, |b, i| if r[i] > r[b] { i } else { b });
            g * k + best
        })
        .collect()
}

pub fn run(cfg: &RaftConfig, resume: bool, device: &Device) -> Result<OnlineSummary> {
    let mut s = Session::start(cfg, resume, device)?;
    let (pad, temp) = (s.lm.pad_id, cfg.rollout.temperature);
    while !s.done() {
        // 1. k samples per prompt; rank by the (KL-shaped) reward and keep the best of each group.
        let rollout = s.rollout()?;
        // The trip-wire (when set) judges the batch before anything learns from it.
        if !s.judge(&rollout, &mut (), None)? {
            continue;
        }
        let rewards = rollout.shaped_rewards(s.kl.beta);
        let kept = best_of_groups(&rewards, rollout.k);
        // 2. NLL steps on the kept completions (token mean over each minibatch).
        let order = epoch_order(kept.len(), stream_seed(cfg.seed, "ra"), s.iteration());
        let mut steps = BatchSteps::default();
        for mb in split_groups(&order, 1, cfg.method.minibatches) {
            let mb: Vec<usize> = mb.iter().map(|&j| kept[j]).collect();
            let n_tokens: usize = mb.iter().map(|&i| rollout.samples[i].len()).sum();
            steps.push(s.optimizer_step(&mb, |lm, part| {
                let batch = rollout.batch(part, pad, device)?;
                let logp = policy_logprobs(lm, &batch, temp, device)?;
                Ok((logp.sum_all()?.neg()? / n_tokens.max(1) as f64)?)
            })?);
        }
        let kept_r: Vec<f64> = kept.iter().map(|&i| rewards[i]).collect();
        let kept_len: Vec<f64> = kept
            .iter()
            .map(|&i| rollout.samples[i].len() as f64)
            .collect();
        // RAFT has no advantage; log the rewards centred on their group's mean instead.
        let centred: Vec<f64> = rewards
            .chunks(rollout.k)
            .flat_map(|g| g.iter().map(move |r| r - mean(g)))
            .collect();
        let mut m = steps.metrics();
        m.extend([
            ("shaped_reward", mean(&rewards)),
            ("kept_reward", mean(&kept_r)),
            ("kept_length", mean(&kept_len)),
        ]);
        m.extend(advantage_metrics(&centred));
        s.end_iteration(&rollout, &m, &mut (), None)?;
    }
    s.finish()
}

/// `rlhf raft`.
pub static ENTRY: Entry<RaftConfig, OnlineSummary> = Entry {
    name: "raft",
    about: "Online RL: RAFT_k (keep the best of k samples by reward, NLL step on it).",
    family: Family::Online,
    shorthands: &[],
    run,
};
