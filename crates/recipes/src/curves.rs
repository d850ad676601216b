//! Learning curves of online runs, read back from their run directories: the periodic
//! evaluations (`eval/*` rows of `metrics.jsonl`, each with the iteration it follows) against
//! samples consumed, and the training-time collapse monitors in windows of iterations. The
//! reports built on them: the seed-mean curve, the samples needed to reach a win-rate, and the
//! win-rate reached at a given KL (the reward-KL frontier read at equal KL).

use std::path::Path;

use rlhf_rl::eval::EvalReport;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

/// One evaluation of a run on the held-out prompts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CurvePoint {
    /// Policy iterations done (0: the starting policy).
    pub iteration: u64,
    /// Completions sampled so far, including any spent before the first policy update (PPO's
    /// critic pre-training).
    pub samples: f64,
    /// Gold win-rate against the reference samples.
    pub winrate: f64,
    pub gold: f64,
    /// Mean proxy (reward model) score of the policy's eval samples; NaN without one.
    pub proxy: f64,
    /// KL(pi || pi_ref) of the eval samples.
    pub kl: f64,
    pub length: f64,
}

/// Training-time monitors (on the rollout batches), averaged over a window of iterations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MonitorPoint {
    /// The window's last iteration.
    pub iteration: u64,
    /// The reward source's raw score (the proxy the policy optimises).
    pub reward_raw: f64,
    pub gold: f64,
    pub kl: f64,
    pub length: f64,
    /// exp(mean -log pi) of the policy on its own samples (Secrets of RLHF's collapse signal).
    pub perplexity: f64,
}

fn field(row: &serde_json::Value, key: &str) -> f64 {
    row.get(key).and_then(|v| v.as_f64()).unwrap_or(f64::NAN)
}

impl CurvePoint {
    /// The starting policy's point (iteration 0, no samples, KL 0), from its own evaluation.
    pub fn start(eval: &EvalReport) -> CurvePoint {
        CurvePoint {
            iteration: 0,
            samples: 0.0,
            winrate: eval.winrate,
            gold: eval.gold_mean.unwrap_or(f64::NAN),
            proxy: eval.proxy_mean.unwrap_or(f64::NAN),
            kl: 0.0,
            length: eval.mean_len,
        }
    }
}

/// A run's curve and monitors from its `metrics.jsonl`: `start` (the starting policy's
/// evaluation) first, then every logged evaluation, at `(pre_samples + iteration *
/// samples_per_iteration)` samples; monitors averaged over windows of `window` iterations.
pub fn read_run(
    metrics: &Path,
    start: &EvalReport,
    pre_samples: f64,
    samples_per_iteration: f64,
    window: u64,
) -> Result<(Vec<CurvePoint>, Vec<MonitorPoint>)> {
    let text = std::fs::read_to_string(metrics).map_err(|e| TrainError::io(metrics, e))?;
    let mut curve = vec![CurvePoint::start(start)];
    let mut monitors = Vec::new();
    let mut acc: Vec<[f64; 5]> = Vec::new();
    let window = window.max(1);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| TrainError::bad_file(metrics, format!("line {}: {e}", i + 1)))?;
        if row.get("eval/winrate").is_some() {
            let Some(it) = row.get("eval/iteration").and_then(|v| v.as_f64()) else {
                continue; // an evaluation logged before curves were recorded
            };
            let it = it as u64;
            if curve.last().is_some_and(|p| p.iteration == it && it > 0) {
                continue; // the same evaluation logged twice (a resumed run)
            }
            curve.push(CurvePoint {
                iteration: it,
                samples: pre_samples + it as f64 * samples_per_iteration,
                winrate: field(&row, "eval/winrate"),
                gold: field(&row, "eval/gold_mean"),
                proxy: field(&row, "eval/proxy_mean"),
                kl: field(&row, "eval/kl_to_ref"),
                length: field(&row, "eval/mean_len"),
            });
        } else if let Some(it) = row.get("iteration").and_then(|v| v.as_f64()) {
            acc.push([
                field(&row, "reward_raw"),
                field(&row, "gold"),
                field(&row, "kl"),
                field(&row, "response_length"),
                field(&row, "entropy").exp(),
            ]);
            let it = it as u64;
            if it.is_multiple_of(window) {
                monitors.push(window_mean(it, &acc));
                acc.clear();
            }
        }
    }
    if !acc.is_empty() {
        let last = monitors.last().map_or(0, |m: &MonitorPoint| m.iteration) + acc.len() as u64;
        monitors.push(window_mean(last, &acc));
    }
    Ok((curve, monitors))
}

fn window_mean(iteration: u64, rows: &[[f64; 5]]) -> MonitorPoint {
    let m = |j: usize| rows.iter().map(|r| r[j]).sum::<f64>() / rows.len() as f64;
    MonitorPoint {
        iteration,
        reward_raw: m(0),
        gold: m(1),
        kl: m(2),
        length: m(3),
        perplexity: m(4),
    }
}

/// Pointwise mean over seeds of curves evaluated at the same iterations (up to the shortest).
pub fn mean_curve(curves: &[&[CurvePoint]]) -> Vec<CurvePoint> {
    let n = curves.iter().map(|c| c.len()).min().unwrap_or(0);
    let k = curves.len() as f64;
    (0..n)
        .map(|i| {
            let m =
                |f: &dyn Fn(&CurvePoint) -> f64| curves.iter().map(|c| f(&c[i])).sum::<f64>() / k;
            CurvePoint {
                iteration: curves[0][i].iteration,
                samples: m(&|p| p.samples),
                winrate: m(&|p| p.winrate),
                gold: m(&|p| p.gold),
                proxy: m(&|p| p.proxy),
                kl: m(&|p| p.kl),
                length: m(&|p| p.length),
            }
        })
        .collect()
}

/// Pointwise mean over seeds of monitors logged at the same iterations (up to the shortest).
pub fn mean_monitors(runs: &[&[MonitorPoint]]) -> Vec<MonitorPoint> {
    let n = runs.iter().map(|c| c.len()).min().unwrap_or(0);
    let k = runs.len() as f64;
    (0..n)
        .map(|i| {
            let m =
                |f: &dyn Fn(&MonitorPoint) -> f64| runs.iter().map(|c| f(&c[i])).sum::<f64>() / k;
            MonitorPoint {
                iteration: runs[0][i].iteration,
                reward_raw: m(&|p| p.reward_raw),
                gold: m(&|p| p.gold),
                kl: m(&|p| p.kl),
                length: m(&|p| p.length),
                perplexity: m(&|p| p.perplexity),
            }
        })
        .collect()
}

/// Walking the polyline `(key_i, value_i)` in order, the value where the key first reaches
/// `level`, linear between the two points that bracket it; the first value if the first key is
/// already there; None if the key never reaches it.
///
/// With (win-rate, samples) it is the samples needed to reach a win-rate; with (KL, win-rate)
/// the win-rate a method has when its KL first reaches a level.
pub fn at_first_crossing(points: &[(f64, f64)], level: f64) -> Option<f64> {
    let i = points.iter().position(|&(k, _)| k >= level)?;
    if i == 0 {
        return Some(points[0].1);
    }
    let (k0, v0) = points[i - 1];
    let (k1, v1) = points[i];
    let f = if k1 > k0 {
        (level - k0) / (k1 - k0)
    } else {
        1.0
    };
    Some(v0 + f * (v1 - v0))
}
