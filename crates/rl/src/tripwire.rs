//! The divergence trip-wire every online method shares (`[tripwire]`; off unless a bound is set).
//!
//! Each rollout batch is judged before the policy learns from it: a mean sequence KL to the
//! reference above `max_kl`, a mean response length above `max_length` or a perplexity of the
//! policy on its own samples below `min_perplexity` (collapse lowers it) trips the wire; so does an
//! optimiser step whose loss is above `max_loss` in absolute value (that step is not applied, nor
//! are the rest of its batch's). A tripped wire restores the last good snapshot: the policy's
//! weights and AdamW moments, the critic's (PPO, vanilla PG), the KL coefficient and the method's
//! own state (a baseline, running reward moments). A snapshot is taken every `snapshot_every`
//! iterations and counts as good once the next rollout of its weights passes the wire. Then
//! `action = "stop"` ends the run there (the restored model is written and evaluated) and
//! `"rollback"` carries on with the next iteration's prompts, at most `max_rollbacks` times.
//! The reason is printed, logged (`tripwire/tripped`) and written to `<run>/tripwire.json`.
//!
//! Rolled-back iterations still count toward `steps` (the optimiser step count and the
//! learning-rate schedule go on), as in PPO-max's recipe.

use std::collections::HashMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TripAction {
    /// Restore the last good state, write the final model and eval.json, and end the run.
    Stop,
    /// Restore the last good state and carry on (at most `max_rollbacks` times, then stop).
    Rollback,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TripwireConfig {
    /// Mean sequence KL(pi || pi_ref) of a rollout batch above this trips.
    pub max_kl: Option<f64>,
    /// Mean response length (tokens) above this trips.
    pub max_length: Option<f64>,
    /// The policy's perplexity on its own samples below this trips (collapse lowers it).
    pub min_perplexity: Option<f64>,
    /// An optimiser step's loss above this in absolute value trips (the step is not applied).
    pub max_loss: Option<f64>,
    /// What a tripped wire does: stop (restore the last good state, write the final model, end) |
    /// rollback (restore it and carry on).
    pub action: TripAction,
    /// Rollbacks allowed before the run stops.
    pub max_rollbacks: usize,
    /// Snapshot the state every this many iterations (0: `save_every`, or 10 when that is 0).
    pub snapshot_every: u64,
}

impl Default for TripwireConfig {
    fn default() -> Self {
        TripwireConfig {
            max_kl: None,
            max_length: None,
            min_perplexity: None,
            max_loss: None,
            action: TripAction::Stop,
            max_rollbacks: 2,
            snapshot_every: 0,
        }
    }
}

// The bounds are written `!(x <= bound)` on purpose: a NaN monitor must trip the wire too.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
impl TripwireConfig {
    pub fn enabled(&self) -> bool {
        self.max_kl.is_some()
            || self.max_length.is_some()
            || self.min_perplexity.is_some()
            || self.max_loss.is_some()
    }

    /// Iterations between snapshots.
    pub fn snapshot_interval(&self, save_every: u64) -> u64 {
        match (self.snapshot_every, save_every) {
            (0, 0) => 10,
            (0, e) => e,
            (e, _) => e,
        }
    }

    /// Why the monitors of a rollout batch trip the wire, if they do. (A NaN monitor trips too.)
    pub fn check(&self, kl: f64, length: f64, perplexity: f64) -> Option<String> {
        let mut why = Vec::new();
        if let Some(b) = self.max_kl {
            if !(kl <= b) {
                why.push(format!("KL to the reference {kl:.3} > max_kl {b}"));
            }
        }
        if let Some(b) = self.max_length {
            if !(length <= b) {
                why.push(format!("mean response length {length:.2} > max_length {b}"));
            }
        }
        if let Some(b) = self.min_perplexity {
            if !(perplexity >= b) {
                why.push(format!(
                    "policy perplexity on its samples {perplexity:.4} < min_perplexity {b}"
                ));
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Why an optimiser step's loss trips the wire, if it does.
    pub fn check_loss(&self, loss: f64, step: u64) -> Option<String> {
        let b = self.max_loss?;
        (!(loss.abs() <= b))
            .then(|| format!("loss {loss:.4} at optimiser step {step}: |loss| > max_loss {b}"))
    }
}

/// Say why the wire tripped: on stderr, as a `tripwire/tripped` row of the run's metrics (with
/// the `monitors` that tripped it) and in `<run>/tripwire.json`. `stopped`: the run ends here.
pub fn record(
    metrics: &mut impl FnMut(&[(&str, f64)]) -> rlhf_train::Result<()>,
    run_dir: &std::path::Path,
    why: &str,
    stopped: bool,
    optimizer_step: u64,
    restored_iteration: u64,
    monitors: &[(&str, f64)],
) -> rlhf_train::Result<()> {
    let what = if stopped { "stopped" } else { "rolled back" };
    eprintln!(
        "trip-wire: {why}; {what} (weights, optimiser moments and the method's state restored to iteration {restored_iteration})"
    );
    let mut row = vec![
        ("tripwire/tripped", 1.0),
        ("tripwire/restored_iteration", restored_iteration as f64),
    ];
    row.extend_from_slice(monitors);
    metrics(&row)?;
    let mut record = serde_json::json!({
        "reason": why,
        "action": what,
        "optimizer_step": optimizer_step,
        "restored_iteration": restored_iteration,
    });
    for (k, v) in monitors {
        record[*k] = serde_json::json!(v);
    }
    rlhf_train::run::write_json(&run_dir.join("tripwire.json"), &record)
}

/// What a rollback returns to: the weights and AdamW moments of the policy and of the critic
/// (when the method has one), the KL coefficient and the method's own state, as they were after
/// `iteration`.
pub struct Snapshot {
    pub(crate) policy: HashMap<String, Tensor>,
    pub(crate) policy_optimizer: HashMap<String, Tensor>,
    pub(crate) critic: Option<(HashMap<String, Tensor>, HashMap<String, Tensor>)>,
    pub(crate) beta: f64,
    pub(crate) method_state: serde_json::Value,
    pub iteration: u64,
}

/// The wire's state in a run: the last good snapshot, the one waiting to be confirmed by the next
/// rollout, the rollbacks so far and a loss bound crossed during the current iteration.
#[derive(Default)]
pub struct Guard {
    pub(crate) good: Option<Snapshot>,
    pub(crate) pending: Option<Snapshot>,
    pub rollbacks: usize,
    pub(crate) loss_breach: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_which_bound_tripped() {
        let tw = TripwireConfig {
            max_kl: Some(2.0),
            max_length: Some(10.0),
            min_perplexity: Some(1.5),
            max_loss: Some(5.0),
            ..Default::default()
        };
        assert_eq!(tw.check(1.0, 5.0, 2.0), None);
        let why = tw.check(3.0, 11.0, 1.2).unwrap();
        assert!(
            why.contains("max_kl 2")
                && why.contains("max_length 10")
                && why.contains("min_perplexity 1.5"),
            "{why}"
        );
        assert!(tw.check(f64::NAN, 5.0, 2.0).unwrap().contains("max_kl"));
        assert_eq!(tw.check_loss(-4.9, 3), None);
        assert!(tw.check_loss(-5.1, 3).unwrap().contains("step 3"));
        assert!(tw.check_loss(f64::NAN, 3).is_some());
        assert!(!TripwireConfig::default().enabled());
        assert_eq!(TripwireConfig::default().snapshot_interval(0), 10);
        assert_eq!(TripwireConfig::default().snapshot_interval(4), 4);
    }
}
