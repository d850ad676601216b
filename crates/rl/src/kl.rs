//! KL to the frozen reference policy, and the KL-shaped reward of InstructGPT / Back-to-Basics:
//!
//! ```text
//! R(x, y) = r(x, y) - beta * sum_t [log pi(y_t | .) - log pi_ref(y_t | .)]
//! ```
//!
//! The sum is the k1 estimator of KL(pi || pi_ref) on one sample: unbiased, and negative for some
//! samples. RLOO, REINFORCE, vanilla PG and RAFT put it into the reward (before any baseline);
//! GRPO instead adds the per-token k3 estimator `exp(ref - logp) - (ref - logp) - 1` (never
//! negative) to the loss. The two are not interchangeable (spec section 0.3).
//!
//! `beta` is fixed, or adapted toward a target KL by Ziegler et al.'s proportional controller.

use candle_core::Tensor;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

/// Sequence-level k1: sum_t (logp_t - ref_logp_t).
pub fn sequence_kl(logp: &[f32], ref_logp: &[f32]) -> f64 {
    debug_assert_eq!(logp.len(), ref_logp.len());
    logp.iter()
        .zip(ref_logp)
        .map(|(&a, &b)| a as f64 - b as f64)
        .sum()
}

/// R = score - beta * kl.
pub fn shaped_reward(score: f64, kl: f64, beta: f64) -> f64 {
    score - beta * kl
}

/// Per-token k3 on plain numbers: exp(ref - logp) - (ref - logp) - 1.
pub fn k3(logp: f64, ref_logp: f64) -> f64 {
    let d = ref_logp - logp;
    d.exp() - d - 1.0
}

/// Per-token k3 on tensors of the same shape (differentiable in `logp`).
pub fn k3_tensor(logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    let d = (ref_logp - logp)?;
    Ok(((d.exp()? - &d)? - 1.0)?)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KlConfig {
    /// KL coefficient (the initial one when `target` is set). RLOO/REINFORCE/vanilla PG/RAFT:
    /// in the reward; GRPO: the k3 term's weight in the loss.
    pub beta: f64,
    /// Adaptive beta: the sequence-level KL to steer toward. None: beta stays fixed.
    pub target: Option<f64>,
    /// Adaptive beta: samples over which a full proportional correction is applied (Ziegler et
    /// al. used 10000).
    pub horizon: f64,
}

impl Default for KlConfig {
    fn default() -> Self {
        KlConfig {
            beta: 0.05,
            target: None,
            horizon: 10_000.0,
        }
    }
}

impl KlConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(TrainError::invalid(format!(
                "kl.beta must be >= 0, got {}",
                self.beta
            )));
        }
        if let Some(t) = self.target {
            if !(t > 0.0 && t.is_finite()) {
                return Err(TrainError::invalid(format!(
                    "kl.target must be > 0, got {t}"
                )));
            }
            if self.beta == 0.0 {
                return Err(TrainError::invalid(
                    "kl.target adapts beta multiplicatively: it needs kl.beta > 0 to start from",
                ));
            }
            if !(self.horizon > 0.0) {
                return Err(TrainError::invalid("kl.horizon must be > 0"));
            }
        }
        Ok(())
    }
}

/// The current beta, fixed or adaptive.
#[derive(Debug, Clone, PartialEq)]
pub struct KlController {
    pub beta: f64,
    pub target: Option<f64>,
    pub horizon: f64,
}

impl KlController {
    pub fn new(cfg: &KlConfig) -> Self {
        KlController {
            beta: cfg.beta,
            target: cfg.target,
            horizon: cfg.horizon,
        }
    }

    /// After a rollout batch of `n_samples` whose mean sequence KL was `observed`:
    /// beta *= 1 + clip(observed / target - 1, -0.2, 0.2) * n_samples / horizon.
    pub fn update(&mut self, observed: f64, n_samples: usize) {
        if let Some(target) = self.target {
            if observed.is_finite() {
                let error = (observed / target - 1.0).clamp(-0.2, 0.2);
                self.beta *= 1.0 + error * n_samples as f64 / self.horizon;
            }
        }
    }
}
