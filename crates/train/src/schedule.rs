//! Learning-rate schedules, as the Hugging Face `get_*_schedule_with_warmup` functions define them.
//!
//! `step` is the index (from 0) of the optimiser step about to be taken. During warm-up the rate
//! rises linearly from 0: `base * step / warmup_steps` (so the very first step has rate 0, as in
//! transformers). After it, `Constant` stays at `base`; `Linear` and `Cosine` decay from `base` at
//! `warmup_steps` to `base * min_lr_ratio` at `total_steps` (and stay there after):
//!
//! ```text
//! progress = (step - warmup) / (total - warmup)            clamped to [0, 1]
//! linear:  factor = 1 - progress
//! cosine:  factor = 0.5 * (1 + cos(pi * progress))
//! lr = base * (min_lr_ratio + (1 - min_lr_ratio) * factor)
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    /// The number of optimiser steps of the whole run (where a decay reaches its floor).
    pub total_steps: u64,
    /// The decay's floor as a fraction of the base rate (ignored by `constant`).
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    pub fn constant() -> Self {
        LrSchedule::default()
    }

    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(TrainError::invalid(format!(
                "lr schedule `min_lr_ratio` = {} must be in [0, 1]",
                self.min_lr_ratio
            )));
        }
        if self.kind != ScheduleKind::Constant && self.warmup_steps > self.total_steps {
            return Err(TrainError::invalid(format!(
                "lr schedule: warmup_steps ({}) exceeds total_steps ({})",
                self.warmup_steps, self.total_steps
            )));
        }
        Ok(())
    }

    /// The learning rate for optimiser step `step` (0-based).
    pub fn lr_at(&self, step: u64, base_lr: f64) -> f64 {
        if step < self.warmup_steps {
            return base_lr * step as f64 / self.warmup_steps as f64;
        }
        let factor = match self.kind {
            ScheduleKind::Constant => return base_lr,
            ScheduleKind::Linear | ScheduleKind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                if self.kind == ScheduleKind::Linear {
                    1.0 - progress
                } else {
                    0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        };
        // Written so that factor 1 gives exactly `base` and factor 0 exactly the floor.
        base_lr * (factor + self.min_lr_ratio * (1.0 - factor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, min_lr_ratio: f64) -> LrSchedule {
        LrSchedule {
            kind,
            warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio,
        }
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        for kind in [
            ScheduleKind::Constant,
            ScheduleKind::Linear,
            ScheduleKind::Cosine,
        ] {
            let s = sched(kind, 0.1);
            assert_eq!(s.lr_at(0, 2e-5), 0.0);
            assert!((s.lr_at(5, 2e-5) - 1e-5).abs() < 1e-20); // 2e-5 * 5 / 10
            assert!((s.lr_at(7, 1.0) - 0.7).abs() < 1e-15); // 7 / 10
            assert_eq!(s.lr_at(10, 2e-5), 2e-5); // end of warm-up: the base rate
        }
    }

    #[test]
    fn constant_stays() {
        let s = sched(ScheduleKind::Constant, 0.1);
        assert_eq!(s.lr_at(60, 1.0), 1.0);
        assert_eq!(s.lr_at(110, 1.0), 1.0);
        assert_eq!(s.lr_at(1000, 1.0), 1.0);
        assert_eq!(LrSchedule::constant().lr_at(0, 3e-4), 3e-4); // no warm-up: base from step 0
    }

    #[test]
    fn linear_decay() {
        // middle: progress (60 - 10) / 100 = 0.5 -> factor 0.5
        assert_eq!(sched(ScheduleKind::Linear, 0.0).lr_at(60, 1.0), 0.5);
        // with a floor of 0.1: 0.1 + 0.9 * 0.5 = 0.55
        assert!((sched(ScheduleKind::Linear, 0.1).lr_at(60, 1.0) - 0.55).abs() < 1e-15);
        // three quarters: 0.25
        assert_eq!(sched(ScheduleKind::Linear, 0.0).lr_at(85, 1.0), 0.25);
        // end and beyond: the floor
        assert_eq!(sched(ScheduleKind::Linear, 0.0).lr_at(110, 1.0), 0.0);
        assert!((sched(ScheduleKind::Linear, 0.1).lr_at(110, 2.0) - 0.2).abs() < 1e-15);
        assert!((sched(ScheduleKind::Linear, 0.1).lr_at(500, 2.0) - 0.2).abs() < 1e-15);
    }

    #[test]
    fn cosine_decay() {
        // middle: 0.5 * (1 + cos(pi / 2)) = 0.5
        assert!((sched(ScheduleKind::Cosine, 0.0).lr_at(60, 1.0) - 0.5).abs() < 1e-15);
        // quarter: 0.5 * (1 + cos(pi / 4)) = 0.5 + sqrt(2) / 4 = 0.853553390593...
        assert!(
            (sched(ScheduleKind::Cosine, 0.0).lr_at(35, 1.0) - 0.853_553_390_593_273_8).abs()
                < 1e-15
        );
        // with a floor of 0.2 in the middle: 0.2 + 0.8 * 0.5 = 0.6
        assert!((sched(ScheduleKind::Cosine, 0.2).lr_at(60, 1.0) - 0.6).abs() < 1e-15);
        // end: the floor
        assert!(sched(ScheduleKind::Cosine, 0.0).lr_at(110, 1.0).abs() < 1e-15);
        assert!((sched(ScheduleKind::Cosine, 0.2).lr_at(110, 1.0) - 0.2).abs() < 1e-15);
    }

    #[test]
    fn serde_snake_case_and_defaults() {
        let s: LrSchedule =
            serde_json::from_str(r#"{"kind":"cosine","warmup_steps":3,"total_steps":9}"#).unwrap();
        assert_eq!(
            s,
            LrSchedule {
                kind: ScheduleKind::Cosine,
                warmup_steps: 3,
                total_steps: 9,
                min_lr_ratio: 0.0
            }
        );
        assert_eq!(
            serde_json::to_string(&ScheduleKind::Linear).unwrap(),
            "\"linear\""
        );
        assert!(serde_json::from_str::<LrSchedule>(r#"{"kind":"Cosine"}"#).is_err());
        assert!(LrSchedule {
            kind: ScheduleKind::Linear,
            warmup_steps: 5,
            total_steps: 4,
            min_lr_ratio: 0.0
        }
        .validate()
        .is_err());
        assert!(LrSchedule {
            min_lr_ratio: 1.5,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
