//! ReST: Reinforced Self-Training (Gulcehre et al. 2023; spec §3), and ReST-EM (Singh et al. 2023)
//! as its preset. Alignment as growing-batch RL: an expensive **Grow** step samples a data set from
//! the current policy once, then several cheap **Improve** steps filter it at a rising reward
//! threshold and fine-tune offline.
//!
//! ```text
//! θ ← the BC (SFT) policy `model`
//! for g = 1..G:                                              Grow
//!     D_g = { (x, y) : x ∈ sources(D), y ~ π_θ(·|x), N per source } ∪ D   (D kept unless told)
//!     R(x, y) = (r(x, y) - lo) / (hi - lo) clamped to [0, 1]    r scored once, cached on disk
//!     for i = 0..I-1:                                         Improve, threshold schedule τ_i
//!         keep {(x, y) ∈ D_g : R(x, y) ≥ τ_i(x)}                (at most `max_per_source` per x)
//!         θ ← fine-tune from the previous Improve policy at lr · decay^i on the kept rows,
//!             validating the reward on D_eval and keeping the best-validated weights
//! ```
//!
//! - Loss `nll` (the paper's best): token-mean NLL of the kept completions (BC on the filtered set).
//!   Loss `gold` (GOLD, Pang & He 2021, one of the paper's offline-RL alternatives): off-policy
//!   policy gradient with per-token importance weights, `-(1/N) Σ_i Σ_t max(π_θ(y_t|·), u) · R_i ·
//!   log π_θ(y_t|·)` with the weight taken without gradient from the current policy (the paper's
//!   lagged copy is the current one here) and lower-bounded at `u = gold_min_weight`; the return of
//!   every token is the sequence's normalised reward R_i (γ = 1, reward only at the end).
//! - Thresholds (`threshold_mode`): `global` keeps R ≥ τ_i (the paper writes R > τ; ≥ makes τ = 0
//!   exactly "no filter", which the paper says it is); `percentile` keeps, per source prompt, the rows
//!   at or above the τ_i-quantile of that source's rewards (linear interpolation, numpy's default);
//!   `gamma` keeps R ≥ γ_i · max + (1 − γ_i) · mean of the source's rewards.
//! - Normalisation to [0, 1]: min-max with `reward_range` when given, else with the minimum and
//!   maximum raw reward of Grow 1's data set (saved, so later Grow steps and resumed runs use the
//!   same map and a threshold means the same thing in every Grow step). `binarize = b` turns the
//!   reward into 1[r ≥ b] first (ReST-EM's correct/incorrect).
//! - Validation reward: the mean raw score (reward source) of greedy completions of the validation
//!   prompts; each Improve step keeps the weights with the best one, the step's starting weights
//!   included (so an Improve step never makes validation worse). Gold (testbed) is recorded next to
//!   it for reporting and never used to choose.
//! - ReST-EM (`rlhf rest-em`): binary reward, no original data in the mixture, one Improve step per
//!   iteration that fine-tunes from the base model (`reset_to_base`) on at most 10 correct samples
//!   per prompt (chosen at random, seeded).
//!
//! Layout: `<output_dir>/grow-<g>/` holds the scored data set (`dataset.jsonl`: TRL's `prompt` /
//! `completion` plus `reward`, `raw_reward`, `origin`, `source`), its sampling chunks
//! (`chunk-<c>.jsonl`, so a killed Grow resumes at its first missing chunk and never re-samples or
//! re-scores a finished one), `grow.json` (statistics), and one run directory per Improve step
//! (`improve-<i>/`: config, metrics.jsonl + TensorBoard, checkpoints, `model/`, `stage.json`);
//! `<output_dir>/stages.jsonl` has one line per stage (the BC start, then every Improve step) and
//! `<output_dir>/eval.json` evaluates the final policy against `model`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_data::loaders::{load_prompt_completion, load_prompts, LoadOptions};
use rlhf_data::testbed::{task_by_name, Task};
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::score::{completion_logprobs, CompletionBatch};
use rlhf_train::rng::{epoch_order, step_seed, stream_seed};
use rlhf_train::run::{
    load_safetensors, read_json, read_jsonl, remove_entries, save_safetensors, write_atomic,
    write_json, write_jsonl, CHECKPOINTS_DIR,
};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::eval::EvalReport;
use rlhf_rl::fit::{fit, FitConfig};
use rlhf_rl::objectives::nll_share;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::pref::PolicyEval;
use rlhf_rl::registry::{Entry, Family};
use rlhf_rl::reward_source::{Query, RewardConfig, Rewarder};
use rlhf_rl::sampling::sample;
use rlhf_rl::trainer::Trainer;

/// How an Improve step's threshold value τ_i is turned into a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdMode {
    /// Keep R ≥ τ_i (normalised reward).
    Global,
    /// Per source: keep R ≥ the τ_i-quantile of the source's rewards.
    Percentile,
    /// Per source: keep R ≥ τ_i · max + (1 − τ_i) · mean of the source's rewards.
    Gamma,
}

/// The Improve loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImproveLoss {
    /// Behaviour cloning: token-mean NLL of the kept completions.
    Nll,
    /// GOLD: reward-weighted NLL with per-token importance weights max(π_θ, u).
    Gold,
}

/// Where the validation reward comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Validation prompts (the task's eval split, or `prompts_file`); 0 turns validation off (every
    /// Improve step then keeps its last weights).
    pub prompts: usize,
    /// Prompts (`prompt` or `messages`) instead of the task's eval split.
    pub prompts_file: Option<PathBuf>,
    /// Sampling temperature of the validation completions (0: greedy).
    pub temperature: f64,
    /// Seed of the validation sampling (only used when temperature > 0).
    pub seed: u64,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            prompts: 200,
            prompts_file: None,
            temperature: 0.0,
            seed: 12_345,
        }
    }
}

/// The configuration of `rlhf rest` (and `rlhf rest-em`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RestConfig {
    /// The BC policy ReST starts from (usually the SFT model on `train_file`).
    pub model: PathBuf,
    /// The model every Grow step's first Improve starts from when `reset_to_base` (default: `model`).
    pub base_model: Option<PathBuf>,
    /// A testbed task: its demonstrations (D, when there is no `train_file`), validation prompts
    /// and gold (reported, never used to train or choose).
    pub task: Option<String>,
    /// Seed of the testbed task.
    pub task_seed: u64,
    /// The original data D (`prompt`/`completion` or `messages`); its prompts are the sources.
    pub train_file: Option<PathBuf>,
    /// Use at most this many source prompts (the first ones, in D's order); unset: all.
    pub max_sources: Option<usize>,
    /// Grow steps G.
    pub grow_steps: usize,
    /// Candidates sampled per source prompt in each Grow step (N).
    pub samples_per_source: usize,
    /// Sampling temperature of the Grow step (the paper: 0.8).
    pub temperature: f64,
    /// Nucleus sampling in the Grow step (unset: off).
    pub top_p: Option<f64>,
    /// Longest sampled completion (default: the task's longest sensible response + 2, else 128).
    pub max_new_tokens: Option<usize>,
    /// Longer prompts keep their last tokens.
    pub max_prompt_len: usize,
    /// Prompts per generation batch.
    pub generation_batch: usize,
    /// Source prompts per cached Grow chunk (a killed Grow resumes at its first missing chunk).
    pub grow_chunk: usize,
    /// Keep the original data D in D_g (the paper does; ReST-EM does not).
    pub keep_original: bool,
    /// Who scores the completions (reward model, task gold on explicit request, command, HTTP).
    pub reward: RewardConfig,
    /// Turn the reward into 1[raw ≥ binarize] (ReST-EM's correctness) before normalising.
    pub binarize: Option<f64>,
    /// [lo, hi] of the min-max normalisation to [0, 1]; unset: measured on Grow 1's data set.
    pub reward_range: Option<[f64; 2]>,
    /// Threshold schedule τ_0..τ_{I-1}, one Improve step each, repeated in every Grow step.
    pub thresholds: Vec<f64>,
    /// global | percentile | gamma (see the module docs).
    pub threshold_mode: ThresholdMode,
    /// At most this many kept rows per source prompt (chosen at random, seeded); unset: no cap.
    pub max_per_source: Option<usize>,
    /// Start every Grow step's first Improve from `base_model` instead of the current policy.
    pub reset_to_base: bool,
    /// Improve step i trains at `optim.lr · improve_lr_decay^i` (i counts within a Grow step).
    pub improve_lr_decay: f64,
    /// nll | gold.
    pub loss: ImproveLoss,
    /// GOLD's lower bound on the per-token importance weight.
    pub gold_min_weight: f64,
    /// Validation reward (best-checkpoint selection).
    pub validation: ValidationConfig,
    /// Run directory, epochs and batch size of each Improve step, logging, checkpoints, seed,
    /// optimiser (shared keys). `eval_every`: validate every this many steps (0: at each epoch's
    /// end).
    #[serde(flatten)]
    pub fit: FitConfig,
    /// The final policy against `model` (eval.json).
    pub eval: PolicyEval,
}

impl Default for RestConfig {
    fn default() -> Self {
        RestConfig {
            model: PathBuf::new(),
            base_model: None,
            task: None,
            task_seed: 0,
            train_file: None,
            max_sources: None,
            grow_steps: 2,
            samples_per_source: 8,
            temperature: 0.8,
            top_p: None,
            max_new_tokens: None,
            max_prompt_len: 256,
            generation_batch: 64,
            grow_chunk: 256,
            keep_original: true,
            reward: RewardConfig::default(),
            binarize: None,
            reward_range: None,
            thresholds: vec![0.0, 0.7, 0.8, 0.9, 0.95],
            threshold_mode: ThresholdMode::Global,
            max_per_source: None,
            reset_to_base: false,
            improve_lr_decay: 0.5,
            loss: ImproveLoss::Nll,
            gold_min_weight: 0.1,
            validation: ValidationConfig::default(),
            fit: FitConfig::with("runs/rest", 1e-5),
            eval: PolicyEval::default(),
        }
    }
}

impl RestConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::invalid(m));
        if self.model.as_os_str().is_empty() {
            return bad("`model` (the BC policy to start from) is required".into());
        }
        if self.task.is_none() && self.train_file.is_none() {
            return bad("no data: set `task` (its demonstrations) or `train_file`".into());
        }
        if self.grow_steps == 0 || self.samples_per_source == 0 || self.thresholds.is_empty() {
            return bad(
                "grow_steps and samples_per_source must be >= 1 and thresholds non-empty".into(),
            );
        }
        if self.grow_chunk == 0 || self.generation_batch == 0 {
            return bad("grow_chunk and generation_batch must be >= 1".into());
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be > 0 (got {}): a Grow step samples",
                self.temperature
            ));
        }
        for (i, &t) in self.thresholds.iter().enumerate() {
            let ok = match self.threshold_mode {
                ThresholdMode::Global => t.is_finite(),
                ThresholdMode::Percentile | ThresholdMode::Gamma => (0.0..=1.0).contains(&t),
            };
            if !ok {
                return bad(format!(
                    "thresholds[{i}] = {t}: {:?} thresholds must lie in [0, 1]",
                    self.threshold_mode
                ));
            }
        }
        if let Some([lo, hi]) = self.reward_range {
            if !(lo.is_finite() && hi.is_finite() && hi > lo) {
                return bad(format!(
                    "reward_range = [{lo}, {hi}]: needs lo < hi, both finite"
                ));
            }
        }
        if self.max_per_source == Some(0) {
            return bad("max_per_source must be >= 1 (unset: no cap)".into());
        }
        if !(self.improve_lr_decay > 0.0 && self.improve_lr_decay <= 1.0) {
            return bad(format!(
                "improve_lr_decay must lie in (0, 1] (got {})",
                self.improve_lr_decay
            ));
        }
        if !(self.gold_min_weight >= 0.0 && self.gold_min_weight <= 1.0) {
            return bad(format!(
                "gold_min_weight must lie in [0, 1] (got {})",
                self.gold_min_weight
            ));
        }
        if self.fit.eval_file.is_some() {
            return bad(
                "eval_file: ReST validates by reward on `validation` prompts, not by a held-out loss"
                    .into(),
            );
        }
        if self.validation.temperature < 0.0 || !self.validation.temperature.is_finite() {
            return bad("validation.temperature must be >= 0 (0: greedy)".into());
        }
        if self.validation.prompts > 0
            && self.validation.prompts_file.is_none()
            && self.task.is_none()
        {
            return bad(
                "validation needs prompts: set `task`, `validation.prompts_file`, or validation.prompts = 0"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Where a row of D_g came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Sampled from the policy in this Grow step.
    Policy,
    /// The original data D.
    Data,
}

/// One row of a Grow data set (a line of `grow-<g>/dataset.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredRow {
    pub prompt: String,
    pub completion: String,
    /// The normalised reward R in [0, 1] the filters read.
    pub reward: f64,
    /// The reward source's score (after `binarize`, when set).
    pub raw_reward: f64,
    pub origin: Origin,
    /// Index of the source prompt.
    pub source: usize,
}

/// Min-max normalisation to [0, 1], clamped.
pub fn normalise(raw: f64, [lo, hi]: [f64; 2]) -> f64 {
    ((raw - lo) / (hi - lo)).clamp(0.0, 1.0)
}

/// The [lo, hi] of scores (hi = lo + 1 when they are all equal, so normalising stays defined).
pub fn measured_range(raw: &[f64]) -> [f64; 2] {
    let lo = raw.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if hi > lo {
        [lo, hi]
    } else {
        [lo, lo + 1.0]
    }
}

/// The q-quantile of `xs` by linear interpolation between order statistics (numpy's default).
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let h = q * (s.len() - 1) as f64;
    let (f, c) = (h.floor() as usize, h.ceil() as usize);
    s[f] + (h - f as f64) * (s[c] - s[f])
}

/// Each row's threshold for the schedule value `tau` (the same for every row in `global` mode).
pub fn row_thresholds(rows: &[ScoredRow], tau: f64, mode: ThresholdMode) -> Vec<f64> {
    if mode == ThresholdMode::Global {
        return vec![tau; rows.len()];
    }
    let mut by_source: HashMap<usize, Vec<f64>> = HashMap::new();
    for r in rows {
        by_source.entry(r.source).or_default().push(r.reward);
    }
    let per_source: HashMap<usize, f64> = by_source
        .into_iter()
        .map(|(s, rs)| {
            let t = match mode {
                ThresholdMode::Percentile => quantile(&rs, tau),
                ThresholdMode::Gamma => {
                    let max = rs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let mean = rs.iter().sum::<f64>() / rs.len() as f64;
                    tau * max + (1.0 - tau) * mean
                }
                ThresholdMode::Global => unreachable!(),
            };
            (s, t)
        })
        .collect();
    rows.iter().map(|r| per_source[&r.source]).collect()
}

/// Indices of the rows kept at schedule value `tau`: R ≥ threshold, then at most `cap` per source
/// (a seeded random choice among that source's kept rows), in data-set order.
pub fn filter(
    rows: &[ScoredRow],
    tau: f64,
    mode: ThresholdMode,
    cap: Option<usize>,
    seed: u64,
) -> Vec<usize> {
    let thresholds = row_thresholds(rows, tau, mode);
    let kept: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].reward >= thresholds[i])
        .collect();
    let Some(cap) = cap else { return kept };
    let mut by_source: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for &i in &kept {
        by_source.entry(rows[i].source).or_default().push(i);
    }
    let mut out: Vec<usize> = Vec::with_capacity(kept.len());
    for (source, idx) in by_source {
        if idx.len() <= cap {
            out.extend(idx);
        } else {
            let order = epoch_order(idx.len(), seed, source as u64);
            out.extend(order[..cap].iter().map(|&j| idx[j]));
        }
    }
    out.sort_unstable();
    out
}

/// The learning rate of Improve step `i` (0-based within its Grow step).
pub fn improve_lr(lr: f64, decay: f64, i: usize) -> f64 {
    lr * decay.powi(i as i32)
}

/// Mean, min, median and max of some numbers (all NaN for none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Distribution {
    pub count: usize,
    #[serde(deserialize_with = "nan_if_null")]
    pub mean: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub min: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub median: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub max: f64,
}

/// JSON writes NaN (an empty distribution) as null; read it back as NaN.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Distribution {
    pub fn of(xs: &[f64]) -> Self {
        if xs.is_empty() {
            return Distribution {
                count: 0,
                mean: f64::NAN,
                min: f64::NAN,
                median: f64::NAN,
                max: f64::NAN,
            };
        }
        Distribution {
            count: xs.len(),
            mean: xs.iter().sum::<f64>() / xs.len() as f64,
            min: xs.iter().copied().fold(f64::INFINITY, f64::min),
            median: quantile(xs, 0.5),
            max: xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// The validation reward of a policy: mean raw score of its completions of the validation prompts,
/// plus (testbed) their mean gold and (always) their mean length in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Validation {
    pub reward: f64,
    pub gold: Option<f64>,
    pub length: f64,
}

/// What a Grow step produced (`grow-<g>/grow.json`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GrowStats {
    pub grow: usize,
    /// The policy that sampled.
    pub policy: PathBuf,
    pub sources: usize,
    pub sampled: usize,
    pub original: usize,
    /// The normalisation's [lo, hi].
    pub range: [f64; 2],
    /// Normalised rewards of the samples and of the original data; V = the mean over D_g.
    pub samples_reward: Distribution,
    pub original_reward: Distribution,
    pub dataset_mean: f64,
    /// Testbed only, for inspection: mean gold of the samples (never read by training).
    pub samples_gold: Option<f64>,
    pub seconds: f64,
}

/// One stage of the run: the BC start (`improve` = None) or an Improve step (`stages.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StageRecord {
    pub grow: usize,
    pub improve: Option<usize>,
    /// The schedule value τ_i (global: the threshold itself).
    pub threshold: Option<f64>,
    /// Rows of D_g kept by the filter (after the per-source cap) and their source prompts.
    pub kept: usize,
    pub kept_sources: usize,
    pub kept_reward: Distribution,
    pub dataset_rows: usize,
    pub lr: f64,
    pub optimizer_steps: u64,
    /// The optimiser step whose weights were kept (0: the starting weights).
    pub best_step: u64,
    /// The kept weights' validation (reward = raw reward-source score).
    pub validation: Option<Validation>,
    /// Completions sampled by Grow steps so far (validation samples not counted).
    pub samples: usize,
    pub seconds: f64,
    pub model: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RestSummary {
    pub grows: Vec<GrowStats>,
    pub stages: Vec<StageRecord>,
    pub model: PathBuf,
    pub samples: usize,
    pub seconds: f64,
    pub eval: Option<EvalReport>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::io(path, e)
}

/// A raw (unnormalised) scored completion, as a Grow chunk caches it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RawRow {
    prompt: String,
    completion: String,
    raw_reward: f64,
    source: usize,
}

/// Everything a run reads and does not change: the data, the sources and the scorer.
struct Setup<'a> {
    cfg: &'a RestConfig,
    task: Option<&'a dyn Task>,
    /// D as (prompt, completion) texts, with each row's source index.
    data: Vec<(String, String, usize)>,
    /// Distinct prompts of D, in order of first appearance.
    sources: Vec<String>,
    validation_prompts: Vec<(String, Vec<u32>)>,
    rewarder: Rewarder,
    max_new_tokens: usize,
    device: Device,
}

impl Setup<'_> {
    /// Score completions (with the ids the policy's tokenizer gives them), binarised if asked.
    fn score(&self, items: &[(&str, &str, &[u32], &[u32])]) -> Result<Vec<f64>> {
        let queries: Vec<Query> = items
            .iter()
            .map(|&(p, c, pi, ci)| Query {
                prompt: p,
                completion: c,
                prompt_ids: pi,
                completion_ids: ci,
            })
            .collect();
        let raw = self.rewarder.score_raw(&queries)?;
        Ok(match self.cfg.binarize {
            Some(b) => raw
                .into_iter()
                .map(|r| f64::from(u8::from(r >= b)))
                .collect(),
            None => raw,
        })
    }

    fn sampling(&self, lm: &TrainableLm, seed: u64) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.cfg.temperature,
            top_p: self.cfg.top_p,
            seed,
            eos_token_ids: lm.eos_ids.clone(),
            ..Default::default()
        }
    }

    /// The validation reward of `lm` (None when validation is off).
    fn validate(&self, lm: &TrainableLm) -> Result<Option<Validation>> {
        if self.validation_prompts.is_empty() {
            return Ok(None);
        }
        let v = &self.cfg.validation;
        let params = SamplingParams {
            temperature: v.temperature,
            top_p: None,
            seed: v.seed,
            ..self.sampling(lm, v.seed)
        };
        let model = lm.model(&self.device)?.detached();
        let gens = sample(
            &model,
            &lm.tokenizer,
            lm.pad_id,
            &self.validation_prompts,
            &params,
            self.cfg.generation_batch,
        )?;
        let items: Vec<_> = gens
            .iter()
            .map(|g| {
                (
                    g.prompt.as_str(),
                    g.completion.as_str(),
                    g.prompt_ids.as_slice(),
                    g.completion_ids.as_slice(),
                )
            })
            .collect();
        let scores = self.score(&items)?;
        let n = gens.len() as f64;
        Ok(Some(Validation {
            reward: scores.iter().sum::<f64>() / n,
            gold: self.task.map(|t| {
                gens.iter()
                    .map(|g| t.gold(&g.prompt, &g.completion))
                    .sum::<f64>()
                    / n
            }),
            length: gens
                .iter()
                .map(|g| g.completion_ids.len() as f64)
                .sum::<f64>()
                / n,
        }))
    }

    /// Grow step `g` with `policy`: the scored data set D_g (from the cache when a run already
    /// made it), and the normalisation range (measured here on Grow 1 when not configured).
    fn grow(
        &self,
        g: usize,
        policy: &Path,
        range: &mut Option<[f64; 2]>,
        dir: &Path,
    ) -> Result<(Vec<ScoredRow>, GrowStats)> {
        let dataset_path = dir.join("dataset.jsonl");
        let stats_path = dir.join("grow.json");
        if dataset_path.exists() && stats_path.exists() {
            let stats: GrowStats = read_json(&stats_path)?;
            range.get_or_insert(stats.range);
            eprintln!("grow {g}: cached ({} rows)", stats.sampled + stats.original);
            return Ok((read_jsonl(&dataset_path)?, stats));
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let started = std::time::Instant::now();
        let lm = TrainableLm::load(policy, &self.device)?;
        let model = lm.model(&self.device)?.detached();
        let n = self.cfg.samples_per_source;
        let chunks = self.sources.len().div_ceil(self.cfg.grow_chunk);
        let progress = rlhf_train::progress(chunks as u64, &format!("grow {g}"));
        let mut raw: Vec<RawRow> = Vec::with_capacity(self.sources.len() * n);
        // 1. N samples per source, a chunk of sources at a time, each chunk scored and cached.
        for c in 0..chunks {
            let path = dir.join(format!("chunk-{c}.jsonl"));
            if path.exists() {
                raw.extend(read_jsonl::<RawRow>(&path)?);
                progress.inc(1);
                eprintln!("grow {g}: chunk {c} cached");
                continue;
            }
            let first = c * self.cfg.grow_chunk;
            let last = (first + self.cfg.grow_chunk).min(self.sources.len());
            let mut prompts = Vec::with_capacity((last - first) * n);
            let mut source_of = Vec::with_capacity((last - first) * n);
            for s in first..last {
                let ids = lm.encode_prompt(&self.sources[s], self.cfg.max_prompt_len)?;
                for _ in 0..n {
                    prompts.push((self.sources[s].clone(), ids.clone()));
                    source_of.push(s);
                }
            }
            let seed = step_seed(
                stream_seed(self.cfg.fit.seed, "grow"),
                ((g as u64) << 24) | c as u64,
            );
            let gens = sample(
                &model,
                &lm.tokenizer,
                lm.pad_id,
                &prompts,
                &self.sampling(&lm, seed),
                self.cfg.generation_batch,
            )?;
            let items: Vec<_> = gens
                .iter()
                .map(|x| {
                    (
                        x.prompt.as_str(),
                        x.completion.as_str(),
                        x.prompt_ids.as_slice(),
                        x.completion_ids.as_slice(),
                    )
                })
                .collect();
            let scores = self.score(&items)?;
            let rows: Vec<RawRow> = gens
                .into_iter()
                .zip(scores)
                .zip(source_of)
                .map(|((x, r), source)| RawRow {
                    prompt: x.prompt,
                    completion: x.completion,
                    raw_reward: r,
                    source,
                })
                .collect();
            write_jsonl(&path, &rows)?;
            raw.extend(rows);
            progress.inc(1);
            // For resume tests: stop right after a chunk is cached, as a killed process would.
            if std::env::var("RLHF_TEST_KILL_AFTER_CHUNK").ok() == Some(format!("{g}:{c}")) {
                return Err(TrainError::invalid(format!(
                    "killed after grow {g} chunk {c} (RLHF_TEST_KILL_AFTER_CHUNK)"
                )));
            }
        }
        progress.finish_and_clear();
        let sampled = raw.len();
        // 2. The original data, scored by the same source (cached like a chunk).
        if self.cfg.keep_original {
            let path = dir.join("chunk-data.jsonl");
            if path.exists() {
                raw.extend(read_jsonl::<RawRow>(&path)?);
            } else {
                let encoded: Vec<(Vec<u32>, Vec<u32>)> = self
                    .data
                    .iter()
                    .map(|(p, c, _)| lm.encode(p, c, true, self.cfg.fit.max_len))
                    .collect::<rlhf_lm::Result<_>>()?;
                let items: Vec<_> = self
                    .data
                    .iter()
                    .zip(&encoded)
                    .map(|((p, c, _), (pi, ci))| {
                        (p.as_str(), c.as_str(), pi.as_slice(), ci.as_slice())
                    })
                    .collect();
                let scores = self.score(&items)?;
                let rows: Vec<RawRow> = self
                    .data
                    .iter()
                    .zip(scores)
                    .map(|((p, c, s), r)| RawRow {
                        prompt: p.clone(),
                        completion: c.clone(),
                        raw_reward: r,
                        source: *s,
                    })
                    .collect();
                write_jsonl(&path, &rows)?;
                raw.extend(rows);
            }
        }
        // 3. Normalise to [0, 1]: the configured range, or Grow 1's min and max.
        let r = match (self.cfg.binarize, self.cfg.reward_range, *range) {
            (Some(_), _, _) => [0.0, 1.0],
            (None, Some(r), _) => r,
            (None, None, Some(r)) => r,
            (None, None, None) => {
                measured_range(&raw.iter().map(|x| x.raw_reward).collect::<Vec<_>>())
            }
        };
        *range = Some(r);
        let rows: Vec<ScoredRow> = raw
            .into_iter()
            .enumerate()
            .map(|(i, x)| ScoredRow {
                reward: normalise(x.raw_reward, r),
                raw_reward: x.raw_reward,
                origin: if i < sampled {
                    Origin::Policy
                } else {
                    Origin::Data
                },
                source: x.source,
                prompt: x.prompt,
                completion: x.completion,
            })
            .collect();
        let rewards = |o: Origin| -> Vec<f64> {
            rows.iter()
                .filter(|x| x.origin == o)
                .map(|x| x.reward)
                .collect()
        };
        let stats = GrowStats {
            grow: g,
            policy: policy.to_path_buf(),
            sources: self.sources.len(),
            sampled,
            original: rows.len() - sampled,
            range: r,
            samples_reward: Distribution::of(&rewards(Origin::Policy)),
            original_reward: Distribution::of(&rewards(Origin::Data)),
            dataset_mean: rows.iter().map(|x| x.reward).sum::<f64>() / rows.len().max(1) as f64,
            samples_gold: self.task.map(|t| {
                rows[..sampled]
                    .iter()
                    .map(|x| t.gold(&x.prompt, &x.completion))
                    .sum::<f64>()
                    / sampled.max(1) as f64
            }),
            seconds: started.elapsed().as_secs_f64(),
        };
        write_jsonl(&dataset_path, &rows)?;
        write_json(&stats_path, &stats)?;
        Ok((rows, stats))
    }

    /// Improve step `i` of Grow step `g`: filter at `tau`, fine-tune from `start`, keep the
    /// best-validated weights as `<dir>/model`. `start_validation` is `start`'s validation.
    #[allow(clippy::too_many_arguments)]
    fn improve(
        &self,
        g: usize,
        i: usize,
        rows: &[ScoredRow],
        start: &Path,
        start_validation: Option<Validation>,
        samples: usize,
        dir: &Path,
        resume: bool,
    ) -> Result<StageRecord> {
        let cfg = self.cfg;
        let done = dir.join("stage.json");
        if resume && done.exists() {
            let rec: StageRecord = read_json(&done)?;
            eprintln!("grow {g} improve {i}: done ({} rows kept)", rec.kept);
            return Ok(rec);
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let started = std::time::Instant::now();
        let tau = cfg.thresholds[i];
        // 1. Filter D_g at τ_i (then cap per source).
        let seed = step_seed(
            stream_seed(cfg.fit.seed, "cap"),
            ((g as u64) << 16) | i as u64,
        );
        let kept = filter(rows, tau, cfg.threshold_mode, cfg.max_per_source, seed);
        let kept_reward: Vec<f64> = kept.iter().map(|&j| rows[j].reward).collect();
        let kept_sources = kept
            .iter()
            .map(|&j| rows[j].source)
            .collect::<std::collections::HashSet<_>>()
            .len();
        let lr = improve_lr(cfg.fit.optim.lr, cfg.improve_lr_decay, i);
        eprintln!(
            "== grow {g} improve {i}: threshold {tau} keeps {} of {} rows ({} sources), lr {lr:.2e}",
            kept.len(),
            rows.len(),
            kept_sources
        );
        let mut rec = StageRecord {
            grow: g,
            improve: Some(i),
            threshold: Some(tau),
            kept: kept.len(),
            kept_sources,
            kept_reward: Distribution::of(&kept_reward),
            dataset_rows: rows.len(),
            lr,
            optimizer_steps: 0,
            best_step: 0,
            validation: start_validation,
            samples,
            seconds: 0.0,
            model: start.to_path_buf(),
        };
        if kept.is_empty() {
            eprintln!("   nothing passes the threshold: the policy carries over");
            rec.seconds = started.elapsed().as_secs_f64();
            write_json(&done, &rec)?;
            return Ok(rec);
        }
        // 2. The kept rows as token ids, and their rewards (GOLD's returns).
        // With LoRA each Improve step trains fresh adapters on its starting policy (an adapter
        // directory of the step before is merged into its base when loaded).
        let seed = step_seed(cfg.fit.seed, ((g as u64) << 16) | i as u64);
        let mut lm = TrainableLm::load(start, &self.device)?;
        lm.enable_lora(&cfg.fit.lora, seed)?;
        let train: Vec<(Vec<u32>, Vec<u32>)> = kept
            .iter()
            .map(|&j| lm.encode(&rows[j].prompt, &rows[j].completion, true, cfg.fit.max_len))
            .collect::<rlhf_lm::Result<_>>()?;
        // 3. The run: its own directory, the step's learning rate, validation once per epoch (or
        //    every `eval_every` steps).
        let fit_cfg = FitConfig {
            output_dir: dir.to_path_buf(),
            seed,
            optim: rlhf_rl::trainer::OptimConfig {
                lr,
                ..cfg.fit.optim.clone()
            },
            ..cfg.fit.clone()
        };
        let mut plan = fit_cfg.plan(&format!("grow {g} improve {i}"), false);
        plan.eval_every = match (cfg.validation.prompts, cfg.fit.eval_every) {
            (0, _) => 0,
            (_, 0) => plan.steps_per_epoch(train.len()),
            (_, e) => e,
        };
        let validating = plan.eval_every > 0;
        let resume_stage = resume && dir.join(CHECKPOINTS_DIR).exists();
        if !resume_stage {
            Best::clear(dir)?;
        }
        let mut trainer = fit_cfg.start(&plan, train.len(), cfg, &lm, resume_stage)?;
        let mut best = Best::load(dir)?.unwrap_or(Best {
            step: 0,
            validation: start_validation,
            weights: None,
        });
        let device = self.device.clone();
        let loss = |lm: &TrainableLm, batch: &[usize], part: &[usize]| match cfg.loss {
            ImproveLoss::Nll => nll_share(lm, &train, batch, part, &device),
            ImproveLoss::Gold => gold_share(
                lm,
                &train,
                &kept_reward,
                batch,
                part,
                cfg.gold_min_weight,
                &device,
            ),
        };
        let mut last_validated = None;
        let on_eval = |trainer: &mut Trainer, lm: &TrainableLm| {
            let v = self
                .validate(lm)?
                .expect("eval_every is 0 without validation");
            trainer.log(&validation_metrics(&v))?;
            last_validated = Some(trainer.step);
            best.offer(dir, trainer.step, v, lm)
        };
        fit(&mut trainer, &lm, train.len(), &plan, loss, on_eval)?;
        if validating && last_validated != Some(trainer.step) {
            // the last step was not on the validation schedule
            let v = self.validate(&lm)?.expect("validation is on");
            trainer.log(&validation_metrics(&v))?;
            best.offer(dir, trainer.step, v, &lm)?;
        }
        // 4. The kept weights: the best-validated (the starting ones if nothing beat them), or the
        //    last ones without validation.
        if validating {
            match &best.weights {
                Some(file) => lm.load_weights(&load_safetensors(&dir.join(file), &device)?)?,
                None => {
                    // The starting weights: with LoRA, the adapters as they started (B = 0).
                    let mut fresh = TrainableLm::load(start, &device)?;
                    fresh.enable_lora(&cfg.fit.lora, seed)?;
                    lm.load_weights(&fresh.snapshot()?)?
                }
            }
        }
        lm.generation
            .max_new_tokens
            .get_or_insert(self.max_new_tokens);
        rec.model = trainer.finish(&lm)?;
        rec.optimizer_steps = trainer.step;
        (rec.best_step, rec.validation) = if validating {
            (best.step, best.validation)
        } else {
            (trainer.step, None)
        };
        rec.seconds = started.elapsed().as_secs_f64();
        write_json(&done, &rec)?;
        Best::clear(dir)?;
        Ok(rec)
    }
}

impl<'a> Setup<'a> {
    /// The data D and its sources, the validation prompts and the reward source; also the
    /// starting policy (`model`).
    fn new(
        cfg: &'a RestConfig,
        task: Option<&'a dyn Task>,
        device: &Device,
    ) -> Result<(Setup<'a>, TrainableLm)> {
        let lm = TrainableLm::load(&cfg.model, device)?;
        let texts: Vec<(String, String)> = match (&cfg.train_file, task) {
            (Some(p), _) => {
                let loaded = load_prompt_completion(
                    p,
                    lm.chat_template.as_ref(),
                    &LoadOptions {
                        skip_bad_lines: cfg.fit.skip_bad_lines,
                    },
                )?;
                if loaded.items.is_empty() {
                    return Err(TrainError::bad_file(p, "no examples"));
                }
                loaded
                    .items
                    .into_iter()
                    .map(|x| (x.prompt, x.completion))
                    .collect()
            }
            (None, Some(t)) => t.demonstrations().to_vec(),
            (None, None) => unreachable!("validated"),
        };
        let mut sources: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut data = Vec::with_capacity(texts.len());
        for (p, c) in texts {
            let s = match index.get(&p) {
                Some(&s) => s,
                None => {
                    if cfg.max_sources.is_some_and(|m| sources.len() >= m) {
                        continue;
                    }
                    index.insert(p.clone(), sources.len());
                    sources.push(p.clone());
                    sources.len() - 1
                }
            };
            data.push((p, c, s));
        }
        let validation_texts: Vec<String> = match (&cfg.validation.prompts_file, task) {
            _ if cfg.validation.prompts == 0 => Vec::new(),
            (Some(p), _) => {
                load_prompts(p, lm.chat_template.as_ref(), &LoadOptions::default())?.items
            }
            (None, Some(t)) => t.eval_prompts().to_vec(),
            (None, None) => unreachable!("validated"),
        };
        let validation_prompts = validation_texts
            .into_iter()
            .take(cfg.validation.prompts)
            .map(|t| Ok((t.clone(), lm.encode_prompt(&t, cfg.max_prompt_len)?)))
            .collect::<rlhf_lm::Result<Vec<_>>>()?;
        let rewarder = Rewarder::from_config(
            &cfg.reward,
            cfg.task.as_deref(),
            cfg.task_seed,
            &lm.tokenizer,
            device,
        )?;
        let setup = Setup {
            cfg,
            task,
            data,
            sources,
            validation_prompts,
            rewarder,
            max_new_tokens: cfg
                .max_new_tokens
                .unwrap_or_else(|| task.map_or(128, |t| t.max_response_words() + 2)),
            device: device.clone(),
        };
        Ok((setup, lm))
    }
}

/// The validation of each of `models` as a ReST run with `cfg` measures it (completions of the
/// validation prompts, scored by the run's reward source), with the task, data and reward source
/// loaded once: for comparing other methods' policies with ReST's stages on the same footing.
pub fn validate_models(
    cfg: &RestConfig,
    models: &[&Path],
    device: &Device,
) -> Result<Vec<Option<Validation>>> {
    cfg.validate()?;
    let task_box = cfg
        .task
        .as_deref()
        .map(|n| task_by_name(n, cfg.task_seed).map_err(TrainError::Invalid))
        .transpose()?;
    let (setup, _) = Setup::new(cfg, task_box.as_deref(), device)?;
    models
        .iter()
        .map(|m| setup.validate(&TrainableLm::load(m, device)?))
        .collect()
}

fn validation_metrics(v: &Validation) -> Vec<(&'static str, f64)> {
    let mut m = vec![
        ("validation/reward", v.reward),
        ("validation/length", v.length),
    ];
    if let Some(g) = v.gold {
        m.push(("validation/gold", g));
    }
    m
}

/// GOLD's share of a batch's loss for the micro-batch `part`: `-(1/N) Σ_i Σ_t w_i,t R_i log π(y_i,t)`
/// with `w = max(π(y_i,t), u)` without gradient and N the batch's completion tokens.
pub fn gold_share(
    lm: &TrainableLm,
    rows: &[(Vec<u32>, Vec<u32>)],
    returns: &[f64],
    batch: &[usize],
    part: &[usize],
    min_weight: f64,
    device: &Device,
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let n_tokens: usize = batch.iter().map(|&i| rows[i].1.len()).sum();
    let part_rows: Vec<_> = part.iter().map(|&i| rows[i].clone()).collect();
    let cb = CompletionBatch::new(&part_rows, lm.pad_id, device)?;
    let logp = completion_logprobs(&lm.model(device)?, &cb, 1.0)?;
    let w = logp.detach().exp()?.maximum(min_weight as f32)?;
    let r: Vec<f32> = part.iter().map(|&i| returns[i] as f32).collect();
    let r = Tensor::new(r, device)?.unsqueeze(1)?;
    // logp is 0 outside the completions, so padding and prompt positions add nothing.
    let weighted = (logp * w)?.broadcast_mul(&r)?;
    Ok((
        (weighted.sum_all()?.neg()? / n_tokens.max(1) as f64)?,
        Vec::new(),
    ))
}

/// The best-validated weights of an Improve step so far: in memory, and on disk
/// (`best-<step>.safetensors` written first, then `best.json` naming it, so a kill never leaves
/// `best.json` pointing at a half-written file).
struct Best {
    step: u64,
    validation: Option<Validation>,
    /// File name inside the stage directory; None: the starting weights.
    weights: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct BestRecord {
    step: u64,
    validation: Validation,
    weights: String,
}

impl Best {
    fn load(dir: &Path) -> Result<Option<Best>> {
        let path = dir.join("best.json");
        if !path.exists() {
            return Ok(None);
        }
        let r: BestRecord = read_json(&path)?;
        Ok(Some(Best {
            step: r.step,
            validation: Some(r.validation),
            weights: Some(r.weights),
        }))
    }

    /// Keep `lm`'s weights when `v` beats the best validation reward so far.
    fn offer(&mut self, dir: &Path, step: u64, v: Validation, lm: &TrainableLm) -> Result<()> {
        if self.validation.is_some_and(|b| v.reward <= b.reward) {
            return Ok(());
        }
        let name = format!("best-{step}.safetensors");
        save_safetensors(&dir.join(&name), &lm.snapshot()?)?;
        write_json(
            &dir.join("best.json"),
            &BestRecord {
                step,
                validation: v,
                weights: name.clone(),
            },
        )?;
        if let Some(old) = self.weights.replace(name) {
            if Some(&old) != self.weights.as_ref() {
                std::fs::remove_file(dir.join(old)).ok();
            }
        }
        self.step = step;
        self.validation = Some(v);
        Ok(())
    }

    /// Remove what an earlier attempt at this stage left.
    fn clear(dir: &Path) -> Result<()> {
        remove_entries(dir, |name, _| {
            name == "best.json" || (name.starts_with("best-") && name.ends_with(".safetensors"))
        })
    }
}

/// Remove what an earlier ReST run left in `out` (its Grow directories and records).
fn clear_run(out: &Path) -> Result<()> {
    remove_entries(out, |name, path| {
        (name.starts_with("grow-") && path.is_dir())
            || ["bc.json", "stages.jsonl", "eval.json", "summary.json"].contains(&name)
    })
}

/// Write the stage records so far (`stages.jsonl`).
fn write_stages(out: &Path, stages: &[StageRecord]) -> Result<()> {
    write_jsonl(&out.join("stages.jsonl"), stages)
}

pub fn run(cfg: &RestConfig, resume: bool, device: &Device) -> Result<RestSummary> {
    cfg.validate()?;
    let started = std::time::Instant::now();
    let out = &cfg.fit.output_dir;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    if !resume {
        // A fresh run: nothing cached by an earlier run in this directory is reused. Under data
        // parallelism rank 0 clears it, before any rank writes there.
        let world = rlhf_train::dist::world();
        if world.is_root() {
            clear_run(out)?;
        }
        world.barrier();
    }
    write_atomic(
        &out.join("config.toml"),
        toml::to_string(cfg)
            .map_err(|e| TrainError::invalid(format!("rest: config: {e}")))?
            .as_bytes(),
    )?;
    // 1. The data D, its source prompts, the validation prompts and the reward source.
    let task_box = cfg
        .task
        .as_deref()
        .map(|n| task_by_name(n, cfg.task_seed).map_err(TrainError::Invalid))
        .transpose()?;
    let task = task_box.as_deref();
    let (setup, lm) = Setup::new(cfg, task, device)?;
    eprintln!(
        "rest: {} rows of D over {} source prompts; {} Grow step(s) x {} Improve step(s); {}",
        setup.data.len(),
        setup.sources.len(),
        cfg.grow_steps,
        cfg.thresholds.len(),
        setup.rewarder.source.describe()
    );
    // 2. The BC start: its validation reward (the first stage).
    let bc_path = out.join("bc.json");
    let bc: StageRecord = if resume && bc_path.exists() {
        read_json(&bc_path)?
    } else {
        let rec = StageRecord {
            grow: 0,
            improve: None,
            threshold: None,
            kept: 0,
            kept_sources: 0,
            kept_reward: Distribution::of(&[]),
            dataset_rows: setup.data.len(),
            lr: 0.0,
            optimizer_steps: 0,
            best_step: 0,
            validation: setup.validate(&lm)?,
            samples: 0,
            seconds: 0.0,
            model: cfg.model.clone(),
        };
        write_json(&bc_path, &rec)?;
        rec
    };
    drop(lm);
    let mut stages = vec![bc];
    write_stages(out, &stages)?;
    let base = cfg.base_model.clone().unwrap_or_else(|| cfg.model.clone());
    let mut policy = cfg.model.clone();
    let mut validation = stages[0].validation;
    // The base model's validation, measured once when Improve steps restart from it (the BC
    // stage's own when the base is `model`).
    let mut base_validation = (base == cfg.model).then_some(validation);
    let mut range: Option<[f64; 2]> = None;
    let mut grows = Vec::new();
    let mut samples = 0;
    for g in 1..=cfg.grow_steps {
        let gdir = out.join(format!("grow-{g}"));
        // 3. Grow: sample D_g with the current policy, score it once.
        eprintln!(
            "== grow {g}/{}: sampling with {}",
            cfg.grow_steps,
            policy.display()
        );
        let (rows, stats) = setup.grow(g, &policy, &mut range, &gdir)?;
        samples += stats.sampled;
        eprintln!(
            "   {} samples (+{} original rows), normalised reward: samples {:.3}, data {:.3}",
            stats.sampled, stats.original, stats.samples_reward.mean, stats.original_reward.mean
        );
        grows.push(stats);
        // 4. Improve steps at rising thresholds, each from the previous one's kept weights.
        let (mut current, mut current_validation) = if cfg.reset_to_base && base != policy {
            let v = match base_validation {
                Some(v) => v,
                None => {
                    *base_validation.insert(setup.validate(&TrainableLm::load(&base, device)?)?)
                }
            };
            (base.clone(), v)
        } else {
            (policy.clone(), validation)
        };
        for i in 0..cfg.thresholds.len() {
            let dir = gdir.join(format!("improve-{i}"));
            let rec = setup.improve(
                g,
                i,
                &rows,
                &current,
                current_validation,
                samples,
                &dir,
                resume,
            )?;
            if let Some(v) = rec.validation {
                eprintln!(
                    "   validation reward {:.4}{} (kept step {} of {})",
                    v.reward,
                    v.gold.map_or(String::new(), |g| format!(", gold {g:.4}")),
                    rec.best_step,
                    rec.optimizer_steps
                );
            }
            current = rec.model.clone();
            current_validation = rec.validation;
            stages.push(rec);
            write_stages(out, &stages)?;
        }
        // Only the final policy of this Grow step samples the next D_g.
        policy = current;
        validation = current_validation;
    }
    // 5. The final policy against the BC policy.
    let eval = if cfg.eval.enabled() {
        Some(
            cfg.eval
                .run(&policy, &cfg.model, &out.join("eval.json"), device)?,
        )
    } else {
        None
    };
    let summary = RestSummary {
        grows,
        stages,
        model: policy,
        samples,
        seconds: started.elapsed().as_secs_f64(),
        eval,
    };
    write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}

/// `rlhf rest-em`: ReST-EM's defaults (binary reward 1[r ≥ 1], 32 samples per prompt at
/// temperature 1, at most 10 correct ones per prompt, no original data, one Improve step per
/// iteration fine-tuned from the base model, 3 iterations).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct RestEmConfig(pub RestConfig);

impl Default for RestEmConfig {
    fn default() -> Self {
        RestEmConfig(RestConfig {
            grow_steps: 3,
            samples_per_source: 32,
            temperature: 1.0,
            keep_original: false,
            binarize: Some(1.0),
            thresholds: vec![0.5],
            max_per_source: Some(10),
            reset_to_base: true,
            fit: FitConfig::with("runs/rest-em", 1e-5),
            ..RestConfig::default()
        })
    }
}

pub fn run_em(cfg: &RestEmConfig, resume: bool, device: &Device) -> Result<RestSummary> {
    run(&cfg.0, resume, device)
}

/// `rlhf rest`.
pub static ENTRY: Entry<RestConfig, RestSummary> = Entry {
    name: "rest",
    about: "ReST: Grow (sample and score a data set once) then Improve (filter at rising reward thresholds, fine-tune offline); repeat.",
    family: Family::Iterative,
    shorthands: &[],
    run,
};

/// `rlhf rest-em`.
pub static EM_ENTRY: Entry<RestEmConfig, RestSummary> = Entry {
    name: "rest-em",
    about: "ReST-EM: keep the correct samples (binary reward, capped per prompt), fine-tune from the base model; iterate.",
    family: Family::Iterative,
    shorthands: &[],
    run: run_em,
};
