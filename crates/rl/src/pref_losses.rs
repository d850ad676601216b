//! The offline preference losses as pure functions of sequence log-probs (spec §5.2-5.6, §0.1).
//!
//! Inputs are `(b,)` tensors of **summed** completion log-probs (`sum_t log pi(y_t | x, y_<t)`) and
//! completion lengths; a loss that needs the per-token average (SimPO, ORPO, length-normalised IPO)
//! divides by the length itself, so every caller passes the same numbers. Each function returns the
//! batch loss (differentiable in the policy log-probs), the implicit rewards TRL logs (detached)
//! and any extra metrics; [`pair_metrics`] turns them into TRL's metric names. The committed TRL
//! fixtures (`tools/make_dpo_fixtures.py`) feed these functions directly.
//!
//! | loss | per pair | rewards logged |
//! |---|---|---|
//! | DPO | `-log s(b [(pc - rc) - (pr - rr)])` | `b (p - r)` |
//! | cDPO | `(1-e) L_DPO(w,l) + e L_DPO(l,w)` | `b (p - r)` |
//! | IPO | `(h - 1/(2b))^2`, `h = (pc - rc) - (pr - rr)`, each side / its length when normalised | `b (p - r)` |
//! | SimPO | `-log s(b (pc/|c| - pr/|r|) - g)` | `b p/|y|` |
//! | ORPO | `NLL(chosen) - l log s(log odds(c) - log odds(r))`, odds from the mean log-prob | `l p/|y|` |
//! | KTO | `l_D (1 - s(b (r - z0)))` desirable, `l_U (1 - s(b (z0 - r)))` undesirable, `r = p - ref` | `b r` |

use candle_core::{DType, Tensor};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use crate::losses::neg_log_sigmoid;

/// The pair losses `rlhf dpo --loss` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PairLossKind {
    Dpo,
    Ipo,
    Cdpo,
    Simpo,
    Orpo,
}

impl PairLossKind {
    /// DPO, IPO and cDPO compare against a reference policy; SimPO and ORPO are reference-free.
    pub fn needs_reference(self) -> bool {
        matches!(self, Self::Dpo | Self::Ipo | Self::Cdpo)
    }

    /// beta when the configuration leaves it unset: 0.1 (DPO paper, TRL; for IPO TRL's beta is the
    /// paper's tau; for ORPO it is lambda), 2.0 for SimPO (its paper's base-model setting).
    pub fn default_beta(self) -> f64 {
        match self {
            Self::Simpo => 2.0,
            _ => 0.1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Dpo => "dpo",
            Self::Ipo => "ipo",
            Self::Cdpo => "cdpo",
            Self::Simpo => "simpo",
            Self::Orpo => "orpo",
        }
    }
}

impl std::str::FromStr for PairLossKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "dpo" | "sigmoid" => Self::Dpo,
            "ipo" => Self::Ipo,
            "cdpo" => Self::Cdpo,
            "simpo" => Self::Simpo,
            "orpo" => Self::Orpo,
            other => {
                return Err(format!(
                    "unknown preference loss `{other}` (dpo, ipo, cdpo, simpo, orpo)"
                ))
            }
        })
    }
}

/// A batch's loss and what TRL logs about it.
pub struct PrefLoss {
    /// Scalar, differentiable in the policy log-probs.
    pub loss: Tensor,
    /// Implicit rewards, `(b,)`, detached. For KTO these are all rows, split by [`PrefLoss::labels`].
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
    /// Loss-specific metrics (ORPO: `nll_loss`, `log_odds_ratio`, `log_odds_chosen`; KTO: `kl`).
    pub extra: Vec<(&'static str, f64)>,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn check_same(tensors: &[&Tensor]) -> Result<usize> {
    let b = tensors[0].dims1()?;
    if b == 0 {
        return Err(TrainError::invalid("empty batch"));
    }
    for t in tensors {
        if t.dims1()? != b {
            return Err(TrainError::invalid(format!(
                "preference loss inputs disagree in batch size ({b} vs {:?})",
                t.dims()
            )));
        }
    }
    Ok(b)
}

/// DPO (Rafailov et al.): `-log sigmoid(beta * [(pc - rc) - (pr - rr)])`, averaged over pairs.
pub fn dpo(pc: &Tensor, pr: &Tensor, rc: &Tensor, rr: &Tensor, beta: f64) -> Result<PrefLoss> {
    cdpo(pc, pr, rc, rr, beta, 0.0)
}

/// Conservative DPO: `(1 - eps) L_DPO(w, l) + eps L_DPO(l, w)`; `eps = 0` is DPO.
pub fn cdpo(
    pc: &Tensor,
    pr: &Tensor,
    rc: &Tensor,
    rr: &Tensor,
    beta: f64,
    eps: f64,
) -> Result<PrefLoss> {
    check_same(&[pc, pr, rc, rr])?;
    let (lc, lr) = ((pc - rc)?, (pr - rr)?);
    let logits = ((&lc - &lr)? * beta)?;
    let mut per = neg_log_sigmoid(&logits)?;
    if eps != 0.0 {
        per = ((per * (1.0 - eps))? + (neg_log_sigmoid(&logits.neg()?)? * eps)?)?;
    }
    Ok(PrefLoss {
        loss: per.mean_all()?,
        chosen_rewards: (lc * beta)?.detach(),
        rejected_rewards: (lr * beta)?.detach(),
        extra: Vec::new(),
    })
}

/// IPO (Azar et al.): `(h - 1/(2 beta))^2` with `h = (pc - rc) - (pr - rr)`; with
/// `length_normalize` each log-ratio is divided by its completion length first (TRL's IPO).
#[allow(clippy::too_many_arguments)]
pub fn ipo(
    pc: &Tensor,
    pr: &Tensor,
    rc: &Tensor,
    rr: &Tensor,
    len_c: &Tensor,
    len_r: &Tensor,
    beta: f64,
    length_normalize: bool,
) -> Result<PrefLoss> {
    check_same(&[pc, pr, rc, rr, len_c, len_r])?;
    let (lc, lr) = ((pc - rc)?, (pr - rr)?);
    let h = if length_normalize {
        ((&lc / len_c.clamp(1.0, f64::INFINITY)?)? - (&lr / len_r.clamp(1.0, f64::INFINITY)?)?)?
    } else {
        (&lc - &lr)?
    };
    let per = (h - 1.0 / (2.0 * beta))?.sqr()?;
    Ok(PrefLoss {
        loss: per.mean_all()?,
        chosen_rewards: (lc * beta)?.detach(),
        rejected_rewards: (lr * beta)?.detach(),
        extra: Vec::new(),
    })
}

/// SimPO (Meng et al.): `-log sigmoid(beta (pc/|c| - pr/|r|) - gamma)`; no reference.
pub fn simpo(
    pc: &Tensor,
    pr: &Tensor,
    len_c: &Tensor,
    len_r: &Tensor,
    beta: f64,
    gamma: f64,
) -> Result<PrefLoss> {
    check_same(&[pc, pr, len_c, len_r])?;
    let (ac, ar) = ((pc / len_c)?, (pr / len_r)?);
    let logits = (((&ac - &ar)? * beta)? - gamma)?;
    Ok(PrefLoss {
        loss: neg_log_sigmoid(&logits)?.mean_all()?,
        chosen_rewards: (ac * beta)?.detach(),
        rejected_rewards: (ar * beta)?.detach(),
        extra: Vec::new(),
    })
}

/// `log(1 - exp(x))` for `x < 0`, as `log(-2t) - log(1 - t)` with `t = tanh(x / 2)`: exact to the
/// last bits near 0 (where `1 - exp(x)` cancels) and differentiable everywhere below 0. `x` is
/// clamped to at most -1e-7 (a mean log-prob of exactly 0 has infinite odds).
pub fn log1mexp(x: &Tensor) -> Result<Tensor> {
    let x = x.clamp(f64::NEG_INFINITY, -1e-7)?;
    let t = (x * 0.5)?.tanh()?;
    Ok(((t.neg()? * 2.0)?.log()? - (t.neg()? + 1.0)?.log()?)?)
}

/// ORPO (Hong et al.): `nll - lambda * mean(log sigmoid(log odds(c) - log odds(r)))`, with
/// `log odds(y) = m - log(1 - exp(m))` of the mean log-prob `m = p/|y|`. `nll` is the chosen
/// responses' NLL (a scalar), passed in so the same function serves any way of averaging it.
pub fn orpo(
    pc: &Tensor,
    pr: &Tensor,
    len_c: &Tensor,
    len_r: &Tensor,
    nll: &Tensor,
    lambda: f64,
) -> Result<PrefLoss> {
    check_same(&[pc, pr, len_c, len_r])?;
    let (ac, ar) = ((pc / len_c)?, (pr / len_r)?);
    let log_odds = ((&ac - &ar)? - (log1mexp(&ac)? - log1mexp(&ar)?)?)?;
    let ratio = neg_log_sigmoid(&log_odds)?.neg()?;
    let loss = (nll - (ratio.mean_all()? * lambda)?)?;
    Ok(PrefLoss {
        extra: vec![
            ("nll_loss", scalar(nll)?),
            ("log_odds_ratio", scalar(&ratio.mean_all()?)?),
            ("log_odds_chosen", scalar(&log_odds.mean_all()?)?),
        ],
        loss,
        chosen_rewards: (ac * lambda)?.detach(),
        rejected_rewards: (ar * lambda)?.detach(),
    })
}

/// KTO's per-row inputs.
pub struct KtoBatch<'a> {
    /// `(b,)` summed policy log-probs of each (prompt, completion).
    pub logps: &'a Tensor,
    pub ref_logps: &'a Tensor,
    /// Desirable (`true`) or undesirable.
    pub labels: &'a [bool],
    /// `(b,)` log-probs of mismatched (prompt, other completion) pairs under the policy and the
    /// reference: the reference point `z0 = max(0, mean(kl_logps - ref_kl_logps))`, not
    /// differentiated through.
    pub kl_logps: &'a Tensor,
    pub ref_kl_logps: &'a Tensor,
}

/// KTO (Ethayarajh et al., TRL's `kto` loss): desirable rows cost `l_D (1 - s(beta (r - z0)))`,
/// undesirable rows `l_U (1 - s(beta (z0 - r)))`, `r = logp - ref_logp`; mean over all rows.
/// The rewards are returned for every row (`chosen_rewards`), `rejected_rewards` is empty;
/// [`kto_metrics`] splits them by label.
pub fn kto(
    batch: &KtoBatch,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> Result<PrefLoss> {
    let b = check_same(&[
        batch.logps,
        batch.ref_logps,
        batch.kl_logps,
        batch.ref_kl_logps,
    ])?;
    if batch.labels.len() != b {
        return Err(TrainError::invalid(format!(
            "KTO: {} labels for {b} rows",
            batch.labels.len()
        )));
    }
    let device = batch.logps.device();
    let dtype = batch.logps.dtype();
    let kl = (batch.kl_logps - batch.ref_kl_logps)?
        .detach()
        .mean_all()?
        .clamp(0.0, f64::INFINITY)?;
    let r = (batch.logps - batch.ref_logps)?;
    // z = beta * sign * (r - kl); the loss 1 - sigmoid(z) = sigmoid(-z) = exp(-softplus(z)).
    let per_row = |f: &dyn Fn(bool) -> f64| -> Result<Tensor> {
        let v: Vec<f64> = batch.labels.iter().map(|&l| f(l)).collect();
        Ok(Tensor::from_vec(v, b, device)?.to_dtype(dtype)?)
    };
    let sign = per_row(&|l| if l { beta } else { -beta })?;
    let weight = per_row(&|l| {
        if l {
            desirable_weight
        } else {
            undesirable_weight
        }
    })?;
    let z = (r.broadcast_sub(&kl)? * sign)?;
    let per = (neg_log_sigmoid(&z.neg()?)?.neg()?.exp()? * weight)?;
    Ok(PrefLoss {
        extra: vec![("kl", scalar(&kl)?)],
        loss: per.mean_all()?,
        chosen_rewards: (r * beta)?.detach(),
        rejected_rewards: Tensor::zeros(0, dtype, device)?,
    })
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// TRL's metrics for a pair loss: `rewards/{chosen,rejected,accuracies,margins}`,
/// `logps/{chosen,rejected}` (the log-probs the loss saw: sums for DPO/IPO/cDPO, per-token means
/// for SimPO/ORPO, passed as `logged_c`/`logged_r`), then the loss's extras.
pub fn pair_metrics(
    out: &PrefLoss,
    logged_c: &Tensor,
    logged_r: &Tensor,
) -> Result<Vec<(&'static str, f64)>> {
    let (c, r) = (host(&out.chosen_rewards)?, host(&out.rejected_rewards)?);
    let acc = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64 / c.len().max(1) as f64;
    let margins: Vec<f64> = c.iter().zip(&r).map(|(a, b)| a - b).collect();
    let mut m = vec![
        ("rewards/chosen", mean(&c)),
        ("rewards/rejected", mean(&r)),
        ("rewards/accuracies", acc),
        ("rewards/margins", mean(&margins)),
        ("logps/chosen", mean(&host(logged_c)?)),
        ("logps/rejected", mean(&host(logged_r)?)),
    ];
    m.extend(out.extra.iter().copied());
    Ok(m)
}

/// TRL's KTO metrics: `kl`, and per label `rewards/*`, `logps/*` (means over that label's rows,
/// present only when the batch has such rows), `rewards/margins` when it has both.
pub fn kto_metrics(
    out: &PrefLoss,
    logps: &Tensor,
    labels: &[bool],
) -> Result<Vec<(&'static str, f64)>> {
    let (r, lp) = (host(&out.chosen_rewards)?, host(logps)?);
    let pick = |v: &[f64], want: bool| -> Vec<f64> {
        v.iter()
            .zip(labels)
            .filter(|(_, &l)| l == want)
            .map(|(x, _)| *x)
            .collect()
    };
    let mut m: Vec<(&'static str, f64)> = out.extra.clone();
    let (rc, rr) = (pick(&r, true), pick(&r, false));
    if !rc.is_empty() {
        m.push(("rewards/chosen", mean(&rc)));
        m.push(("logps/chosen", mean(&pick(&lp, true))));
    }
    if !rr.is_empty() {
        m.push(("rewards/rejected", mean(&rr)));
        m.push(("logps/rejected", mean(&pick(&lp, false))));
    }
    if !rc.is_empty() && !rr.is_empty() {
        m.push(("rewards/margins", mean(&rc) - mean(&rr)));
    }
    Ok(m)
}

/// Metrics averaged over micro-batches with weights (each micro-batch's share of the batch); a
/// metric missing from some micro-batches is averaged over those that have it.
pub fn weighted_metrics(parts: &[(f64, Vec<(&'static str, f64)>)]) -> Vec<(&'static str, f64)> {
    let mut names: Vec<&'static str> = Vec::new();
    for (_, m) in parts {
        for (k, _) in m {
            if !names.contains(k) {
                names.push(k);
            }
        }
    }
    names
        .into_iter()
        .map(|k| {
            let (mut s, mut w) = (0.0, 0.0);
            for (wt, m) in parts {
                if let Some((_, v)) = m.iter().find(|(n, _)| *n == k) {
                    s += wt * v;
                    w += wt;
                }
            }
            (k, s / w.max(1e-12))
        })
        .collect()
}
