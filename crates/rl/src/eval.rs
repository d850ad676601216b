//! Evaluation as the papers do it: win-rate of a policy against a reference, judged by a gold
//! reward the training never saw (the testbed's) and/or a reward model; with a 95% interval, mean
//! gold, mean proxy reward, KL to the reference policy and mean length.

use std::path::Path;

use rlhf_lm::generate::SamplingParams;
use rlhf_lm::llama::Llama;
use rlhf_lm::score::score_pairs;
use rlhf_lm::LmError;
use rlhf_lm::Result;
use serde::{Deserialize, Serialize};

use crate::reward::RewardModel;
use crate::sampling::{sample, Generated};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EvalReport {
    /// (wins + 0.5 ties) / n of the policy against the reference, by `judge`.
    pub winrate: f64,
    pub winrate_ci95: [f64; 2],
    pub judge: String,
    pub gold_mean: Option<f64>,
    pub reference_gold_mean: Option<f64>,
    pub proxy_mean: Option<f64>,
    /// Mean over the policy's samples of sum_t [log pi_T(y_t) - log pi_ref_T(y_t)] (the k1
    /// estimator of KL(pi_T || pi_ref_T)), where pi_T and pi_ref_T are the temperature-scaled
    /// distributions (softmax(logits / T)) at the evaluation temperature T: the distributions the
    /// samples are drawn from. At T = 1 this is KL(pi || pi_ref). `top_p` / `top_k` truncation is
    /// not accounted for.
    pub kl_to_ref: Option<f64>,
    /// Mean completion length in tokens.
    pub mean_len: f64,
    pub n: usize,
}

impl EvalReport {
    /// The report as metrics, named `eval/<field of eval.json>` (the same names for every method).
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        let mut m = vec![
            ("eval/winrate", self.winrate),
            ("eval/mean_len", self.mean_len),
        ];
        if let Some(g) = self.gold_mean {
            m.push(("eval/gold_mean", g));
        }
        if let Some(p) = self.proxy_mean {
            m.push(("eval/proxy_mean", p));
        }
        if let Some(k) = self.kl_to_ref {
            m.push(("eval/kl_to_ref", k));
        }
        m
    }

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

/// The models the KL column is measured with: the policy that drew the samples, the reference,
/// the pad id, and the temperature the samples were drawn at (both models are scored with their
/// logits divided by it).
#[derive(Clone, Copy)]
pub struct KlModels<'a> {
    pub policy: &'a Llama,
    pub reference: &'a Llama,
    pub pad_id: u32,
    pub temperature: f64,
}

/// The k1 estimate of KL(pi_T || pi_ref_T) on the policy's samples: the mean over samples of the
/// summed per-token log-ratio, both models scored at `temperature` (see [`EvalReport::kl_to_ref`]).
pub fn kl_estimate(samples: &[Generated], m: &KlModels) -> Result<f64> {
    if !(m.temperature > 0.0 && m.temperature.is_finite()) {
        return Err(LmError::Invalid(format!(
            "the KL estimate needs a positive, finite sampling temperature (got {})",
            m.temperature
        )));
    }
    let rows: Vec<(Vec<u32>, Vec<u32>)> = samples
        .iter()
        .map(|x| (x.prompt_ids.clone(), x.completion_ids.clone()))
        .collect();
    let lp = score_pairs(m.policy, &rows, m.pad_id, 32, m.temperature)?;
    let lr = score_pairs(m.reference, &rows, m.pad_id, 32, m.temperature)?;
    let per: Vec<f64> = lp
        .iter()
        .zip(&lr)
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y) as f64).sum())
        .collect();
    Ok(mean(&per))
}

/// Judge `policy` completions against `reference` completions (same prompts, same order).
/// `kl_models`: to estimate KL of the policy's samples to the reference at the sampling
/// temperature.
pub fn judge(
    policy: &[Generated],
    reference: &[Generated],
    judges: &Judges,
    kl_models: Option<KlModels>,
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
    let kl = kl_models.map(|m| kl_estimate(policy, &m)).transpose()?;
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

/// `rlhf eval`: sample the policy (optionally best-of-n by a reward model) and a reference on the
/// same prompts, judge, write `eval.json`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub policy: std::path::PathBuf,
    /// A reference policy: its samples are the reference completions, and KL is measured to it.
    pub reference: Option<std::path::PathBuf>,
    /// Or fixed reference completions (`prompt` / `completion` JSONL), in the prompts' order.
    pub reference_file: Option<std::path::PathBuf>,
    /// Prompts (`prompt` or `messages`); default: the testbed task's eval prompts.
    pub prompts_file: Option<std::path::PathBuf>,
    /// A testbed task whose gold reward judges (and whose eval prompts are used by default).
    pub task: Option<String>,
    pub task_seed: u64,
    pub reward_model: Option<std::path::PathBuf>,
    /// More than 1: the policy's answer is the best of n samples by `reward_model`.
    pub best_of_n: usize,
    pub max_prompts: usize,
    pub max_new_tokens: usize,
    /// Sampling temperature of both policy and reference (AlpacaFarm evaluates at 0.7); the KL
    /// column is then KL between the temperature-scaled distributions (0: greedy, KL at 1).
    /// Default 1.0.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub batch_size: usize,
    pub output: std::path::PathBuf,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            policy: Default::default(),
            reference: None,
            reference_file: None,
            prompts_file: None,
            task: None,
            task_seed: 0,
            reward_model: None,
            best_of_n: 1,
            max_prompts: 200,
            max_new_tokens: 64,
            temperature: 1.0,
            top_p: None,
            seed: 0,
            batch_size: 32,
            output: "eval.json".into(),
        }
    }
}

pub fn run_eval(cfg: &EvalConfig, device: &candle_core::Device) -> Result<EvalReport> {
    use rlhf_data::loaders::{load_prompt_completion, load_prompts, LoadOptions};
    if !(cfg.temperature >= 0.0 && cfg.temperature.is_finite()) {
        return Err(LmError::Invalid(format!(
            "eval: `temperature` must be >= 0 and finite (got {})",
            cfg.temperature
        )));
    }
    let policy = rlhf_lm::Pretrained::load(&cfg.policy, device)?;
    let task = match &cfg.task {
        Some(name) => {
            Some(rlhf_data::testbed::task_by_name(name, cfg.task_seed).map_err(LmError::Invalid)?)
        }
        None => None,
    };
    let texts: Vec<String> = match (&cfg.prompts_file, &task) {
        (Some(p), _) => {
            load_prompts(p, policy.chat_template.as_ref(), &LoadOptions::default())?.items
        }
        (None, Some(t)) => t.eval_prompts().to_vec(),
        (None, None) => {
            return Err(LmError::Invalid(
                "eval needs `prompts_file` or a testbed `task`".into(),
            ))
        }
    };
    let texts: Vec<String> = texts.into_iter().take(cfg.max_prompts.max(1)).collect();
    let prompts: Vec<(String, Vec<u32>)> = texts
        .iter()
        .map(|t| {
            let ids = policy.tokenizer.encode(t, true)?;
            if ids.is_empty() {
                return Err(LmError::Invalid(format!("empty prompt {t:?}")));
            }
            Ok((t.clone(), ids))
        })
        .collect::<Result<_>>()?;
    let params = SamplingParams {
        max_new_tokens: cfg.max_new_tokens,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        seed: cfg.seed,
        eos_token_ids: policy.eos_token_ids(),
        ..Default::default()
    };
    let pi = policy.model(device)?;
    let reward_model = cfg
        .reward_model
        .as_ref()
        .map(|p| RewardModel::load(p, device))
        .transpose()?;
    let policy_samples = if cfg.best_of_n > 1 {
        let rm = reward_model
            .as_ref()
            .ok_or_else(|| LmError::Invalid("best_of_n > 1 needs `reward_model`".into()))?;
        crate::best_of_n::best_of_n(
            &pi,
            &policy.tokenizer,
            policy.pad_id(),
            &prompts,
            cfg.best_of_n,
            &params,
            rm,
            cfg.batch_size,
        )?
    } else {
        sample(
            &pi,
            &policy.tokenizer,
            policy.pad_id(),
            &prompts,
            &params,
            cfg.batch_size,
        )?
    };
    let reference_policy = cfg
        .reference
        .as_ref()
        .map(|p| rlhf_lm::Pretrained::load(p, device))
        .transpose()?;
    let reference_model = reference_policy
        .as_ref()
        .map(|r| r.model(device))
        .transpose()?;
    let reference_samples = match (&reference_policy, &reference_model, &cfg.reference_file) {
        (Some(r), Some(m), _) => {
            let ref_params = SamplingParams {
                seed: cfg.seed.wrapping_add(1_000_003),
                ..params.clone()
            };
            sample(
                m,
                &r.tokenizer,
                r.pad_id(),
                &prompts,
                &ref_params,
                cfg.batch_size,
            )?
        }
        (_, _, Some(file)) => {
            let refs = load_prompt_completion(
                file,
                policy.chat_template.as_ref(),
                &LoadOptions::default(),
            )?
            .items;
            if refs.len() < prompts.len() {
                return Err(LmError::bad_file(
                    file,
                    format!(
                        "{} reference completions for {} prompts",
                        refs.len(),
                        prompts.len()
                    ),
                ));
            }
            prompts
                .iter()
                .zip(refs)
                .map(|((text, ids), r)| {
                    Ok(Generated {
                        prompt: text.clone(),
                        prompt_ids: ids.clone(),
                        completion_ids: policy.tokenizer.encode(&r.completion, false)?,
                        completion: r.completion.trim_start().to_string(),
                        logprobs: Vec::new(),
                    })
                })
                .collect::<Result<_>>()?
        }
        _ => {
            return Err(LmError::Invalid(
                "eval needs a `reference` policy or a `reference_file`".into(),
            ))
        }
    };
    let gold = task.as_ref().map(|t| move |p: &str, r: &str| t.gold(p, r));
    let judges = Judges {
        gold: gold.as_ref().map(|g| g as &dyn Fn(&str, &str) -> f64),
        reward_model: reward_model.as_ref(),
    };
    let kl_models = match (&reference_model, cfg.best_of_n > 1) {
        (Some(m), false) => Some(KlModels {
            policy: &pi,
            reference: m,
            pad_id: policy.pad_id(),
            temperature: params.logprob_temperature(),
        }),
        _ => None,
    };
    let mut report = judge(&policy_samples, &reference_samples, &judges, kl_models)?;
    if cfg.best_of_n > 1 && reference_model.is_some() {
        report.kl_to_ref = Some(crate::best_of_n::kl_bound(cfg.best_of_n));
    }
    if let Some(dir) = cfg.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| LmError::io(dir, e))?;
    }
    report.write(&cfg.output)?;
    Ok(report)
}
