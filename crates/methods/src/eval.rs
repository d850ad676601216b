//! Evaluation as the papers do it: win-rate of a policy against a reference, judged by a gold
//! reward the training never saw (the testbed's) and/or a reward model; with a 95% interval, mean
//! gold, mean proxy reward, KL to the reference policy and mean length.

use std::path::Path;

use rlhf_lm::generate::{generate, SamplingParams};
use rlhf_lm::llama::Llama;
use rlhf_lm::score::score_pairs;
use rlhf_lm::Result;
use rlhf_lm::{LmError, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::reward::RewardModel;

/// One sampled completion with everything the judges need.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Generated {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub completion: String,
    /// Sampled ids (EOS included when the model ended the completion).
    pub completion_ids: Vec<u32>,
    /// Per-token log-probs under the sampling policy at the sampling temperature.
    pub logprobs: Vec<f32>,
}

/// Sample one completion per prompt, in batches.
pub fn sample(
    model: &Llama,
    tokenizer: &Tokenizer,
    pad_id: u32,
    prompts: &[(String, Vec<u32>)],
    params: &SamplingParams,
    batch_size: usize,
) -> Result<Vec<Generated>> {
    let mut out = Vec::with_capacity(prompts.len());
    for (chunk_no, chunk) in prompts.chunks(batch_size.max(1)).enumerate() {
        // A different stream per chunk, still a pure function of the seed.
        let params = SamplingParams {
            seed: params.seed.wrapping_add(chunk_no as u64 * 7919),
            ..params.clone()
        };
        let ids: Vec<Vec<u32>> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
        let samples = generate(model, &ids, pad_id, &params, Some(tokenizer))?;
        for ((text, ids), s) in chunk.iter().zip(samples) {
            out.push(Generated {
                prompt: text.clone(),
                prompt_ids: ids.clone(),
                completion: tokenizer.decode(&s.tokens, true)?,
                completion_ids: s.tokens,
                logprobs: s.logprobs,
            });
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// (wins + 0.5 ties) / n of the policy against the reference, by `judge`.
    pub winrate: f64,
    pub winrate_ci95: [f64; 2],
    pub judge: String,
    pub gold_mean: Option<f64>,
    pub reference_gold_mean: Option<f64>,
    pub proxy_mean: Option<f64>,
    /// Mean over samples of sum_t [log pi(y_t) - log pi_ref(y_t)] (the k1 estimator).
    pub kl_to_ref: Option<f64>,
    /// Mean completion length in tokens.
    pub mean_len: f64,
    pub n: usize,
}

impl EvalReport {
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("serialisable");
        std::fs::write(path, text).map_err(|e| LmError::io(path, e))
    }
}

/// Win-rate of `a` over `b` on paired scores: (wins + 0.5 ties) / n, with a normal-approximation
/// 95% interval from the per-prompt outcomes, clamped to [0, 1].
pub fn winrate(a: &[f64], b: &[f64]) -> (f64, [f64; 2]) {
    let outcomes: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            if (x - y).abs() <= 1e-9 {
                0.5
            } else if x > y {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    let n = outcomes.len().max(1) as f64;
    let mean = outcomes.iter().sum::<f64>() / n;
    let var = outcomes.iter().map(|o| (o - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let half = 1.96 * (var / n).sqrt();
    (mean, [(mean - half).max(0.0), (mean + half).min(1.0)])
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// What judges a completion: the hidden gold reward, a reward model, or both (gold decides the
/// win-rate when present, as in the testbed protocol).
pub struct Judges<'a> {
    pub gold: Option<&'a dyn Fn(&str, &str) -> f64>,
    pub reward_model: Option<&'a RewardModel>,
}

/// Judge `policy` completions against `reference` completions (same prompts, same order).
/// `kl_models`: (policy, reference) to compute KL of the policy's samples, at temperature 1.
pub fn judge(
    policy: &[Generated],
    reference: &[Generated],
    judges: &Judges,
    kl_models: Option<(&Llama, &Llama, u32)>,
) -> Result<EvalReport> {
    if policy.len() != reference.len() || policy.is_empty() {
        return Err(LmError::Invalid(format!(
            "evaluation needs the same non-zero number of policy and reference completions ({} vs {})",
            policy.len(),
            reference.len()
        )));
    }
    let rows = |g: &[Generated]| -> Vec<(Vec<u32>, Vec<u32>)> {
        g.iter()
            .map(|x| (x.prompt_ids.clone(), x.completion_ids.clone()))
            .collect()
    };
    let gold_of = |g: &[Generated]| -> Option<Vec<f64>> {
        judges
            .gold
            .map(|f| g.iter().map(|x| f(&x.prompt, &x.completion)).collect())
    };
    let (gold_p, gold_r) = (gold_of(policy), gold_of(reference));
    let proxy_p = judges
        .reward_model
        .map(|rm| rm.score(&rows(policy), 32))
        .transpose()?;
    let (scores_p, scores_r, judge_name) = match (&gold_p, &gold_r) {
        (Some(p), Some(r)) => (p.clone(), r.clone(), "gold"),
        _ => {
            let rm = judges.reward_model.ok_or_else(|| {
                LmError::Invalid("evaluation needs a gold reward or a reward model".into())
            })?;
            (
                proxy_p.clone().expect("scored above"),
                rm.score(&rows(reference), 32)?,
                "reward_model",
            )
        }
    };
    let (wr, ci) = winrate(&scores_p, &scores_r);
    let kl = match kl_models {
        Some((pi, pi_ref, pad)) => {
            let rows = rows(policy);
            let lp = score_pairs(pi, &rows, pad, 32, 1.0)?;
            let lr = score_pairs(pi_ref, &rows, pad, 32, 1.0)?;
            let per: Vec<f64> = lp
                .iter()
                .zip(&lr)
                .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y) as f64).sum())
                .collect();
            Some(mean(&per))
        }
        None => None,
    };
    Ok(EvalReport {
        winrate: wr,
        winrate_ci95: ci,
        judge: judge_name.into(),
        gold_mean: gold_p.as_deref().map(mean),
        reference_gold_mean: gold_r.as_deref().map(mean),
        proxy_mean: proxy_p.as_deref().map(mean),
        kl_to_ref: kl,
        mean_len: mean(
            &policy
                .iter()
                .map(|g| g.completion_ids.len() as f64)
                .collect::<Vec<_>>(),
        ),
        n: policy.len(),
    })
}
