//! Non-finite numbers in a training step: what the loops check, what they do about it, and the
//! fault injection the reliability tests use to prove it.
//!
//! A NaN or Inf in a loss, a gradient, a reward or a log-prob is caught before it reaches the
//! weights (the loss before its backward pass, the gradients before the optimiser step, rewards
//! and log-probs before a rollout batch is learned from). Then, by `optim.on_nonfinite`:
//! - `skip` (the default): a step whose loss or gradient is non-finite is not applied (weights and
//!   AdamW moments stay as they were; the step still counts, so the data order and schedule go on
//!   and a resumed run stays identical); after `optim.max_nonfinite_skips` such steps in a row the
//!   run stops;
//! - `stop`: the run stops at once.
//!
//! A non-finite reward or log-prob always stops the run: the whole rollout batch is suspect.
//! Stopping leaves the run directory as it was after the last checkpoint, and the error says which
//! quantity went non-finite at which optimiser step.
//!
//! Injection (tests only): `RLHF_TEST_NONFINITE=<quantity>@<step>[,<quantity>@<step>...]`, with
//! quantity `loss`, `grad`, `reward` or `logprob` and the 1-based optimiser step being computed
//! (for `reward` and `logprob`: the first step of the rollout batch), makes that quantity NaN there,
//! so the real detection path is what the tests exercise.

use serde::{Deserialize, Serialize};

/// What a non-finite loss or gradient does to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Leave the weights and optimiser state as they were and go on with the next step.
    Skip,
    /// Stop the run (its last checkpoint is its last good state).
    Stop,
}

/// The environment variable of the fault injection (tests only).
pub const INJECT_ENV: &str = "RLHF_TEST_NONFINITE";

/// Whether the tests asked for `quantity` to be made NaN at optimiser step `step` (1-based).
pub fn inject(quantity: &str, step: u64) -> bool {
    let Ok(spec) = std::env::var(INJECT_ENV) else {
        return false;
    };
    spec.split(',').any(|item| {
        item.trim()
            .split_once('@')
            .is_some_and(|(q, s)| q == quantity && s.parse() == Ok(step))
    })
}

/// "NaN", "+Inf" or "-Inf" for messages.
pub fn describe(v: f64) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "+Inf"
    } else {
        "-Inf"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_each_kind_of_non_finite_number() {
        assert_eq!(describe(f64::NAN), "NaN");
        assert_eq!(describe(f64::INFINITY), "+Inf");
        assert_eq!(describe(f64::NEG_INFINITY), "-Inf");
    }
}
