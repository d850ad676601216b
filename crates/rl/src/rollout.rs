//! The rollout engine every online method shares: sample k completions per prompt from the
//! current policy, score them with the configured reward source, take the frozen reference
//! policy's log-probs of the same tokens, and hand back a batch that knows its groups, masks and
//! per-token numbers.
//!
//! Layout: sample `j` of prompt `i` sits at index `i * k + j`, so `chunks(k)` are the groups of
//! one prompt. Completion ids include the EOS token when the policy produced one (so training
//! teaches it to stop); a completion that hit `max_new_tokens` without EOS has
//! `finished = false` and, when `missing_eos_penalty` is set, that much taken off its score.
//!
//! Per-token numbers (`logprobs`, `ref_logprobs`, and whatever a method adds, e.g. values) are
//! plain vectors over the completion's tokens; [`align`] places them into the `(b, t - 1)` layout of
//! a [`CompletionBatch`] of the same rows, where `completion_logprobs` gives the policy's
//! differentiable log-probs. A sample is also an [`Episode`] (one prompt span, one assistant span),
//! and `CompletionBatch` is that one-span case of `EpisodeBatch`, so single-turn and multi-turn rows
//! share one scoring path.

use candle_core::{Device, Tensor};
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::llama::Llama;
use rlhf_lm::score::{score_pairs, CompletionBatch};
use rlhf_lm::{Episode, Tokenizer};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use crate::kl::sequence_kl;
use crate::reward_source::{Query, Rewarder};
use crate::sampling::sample_from_chunk;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    /// Completions per prompt (RLOO's k, GRPO's group size, RAFT's candidates).
    pub k: usize,
    /// Longest completion in tokens (a completion that reaches it without EOS is unfinished).
    pub max_new_tokens: usize,
    /// Sampling temperature; log-probs (policy, reference, training) are taken at the same one.
    pub temperature: f64,
    /// Sample among the k most likely tokens only (unset: off).
    pub top_k: Option<usize>,
    /// Nucleus sampling: the smallest set of tokens with this much probability (unset: off).
    pub top_p: Option<f64>,
    /// Taken off the score of a completion that hit `max_new_tokens` without EOS.
    pub missing_eos_penalty: Option<f64>,
    /// Rows per generation / scoring chunk.
    pub batch_size: usize,
    /// Longer prompts keep their last tokens.
    pub max_prompt_len: usize,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            k: 4,
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            missing_eos_penalty: None,
            batch_size: 64,
            max_prompt_len: 256,
        }
    }
}

impl RolloutConfig {
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(TrainError::invalid("rollout.k must be >= 1"));
        }
        if self.max_new_tokens == 0 {
            return Err(TrainError::invalid("rollout.max_new_tokens must be >= 1"));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(TrainError::invalid(format!(
                "rollout.temperature must be > 0 (policy-gradient methods need samples), got {}",
                self.temperature
            )));
        }
        if let Some(p) = self.missing_eos_penalty {
            if !p.is_finite() {
                return Err(TrainError::invalid(
                    "rollout.missing_eos_penalty must be finite",
                ));
            }
        }
        self.sampling(0, Vec::new()).validate()?;
        Ok(())
    }

    pub fn sampling(&self, seed: u64, eos_token_ids: Vec<u32>) -> SamplingParams {
        SamplingParams {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed,
            stop_strings: Vec::new(),
            eos_token_ids,
        }
    }
}

/// One sampled completion with everything the estimators need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RolloutSample {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub completion: String,
    pub completion_ids: Vec<u32>,
    /// Per-token log-probs under the policy that sampled (at the rollout temperature).
    pub logprobs: Vec<f32>,
    /// Per-token log-probs under the frozen reference policy.
    pub ref_logprobs: Vec<f32>,
    /// The reward source's score, before normalisation.
    pub raw_score: f64,
    /// The score the methods use: normalised, minus the missing-EOS penalty where it applies.
    pub score: f64,
    /// Ended with an EOS token.
    pub finished: bool,
}

impl RolloutSample {
    /// sum_t (logp - ref_logp): the sequence-level k1 KL estimate.
    pub fn kl(&self) -> f64 {
        sequence_kl(&self.logprobs, &self.ref_logprobs)
    }
    pub fn len(&self) -> usize {
        self.completion_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.completion_ids.is_empty()
    }
    /// The sample as an episode: one prompt span and one assistant span.
    pub fn episode(&self) -> Episode {
        Episode::single_turn(self.prompt_ids.clone(), self.completion_ids.clone())
    }
}

/// A rollout batch: `samples[i * k + j]` is sample j of prompt i.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Rollout {
    pub k: usize,
    pub samples: Vec<RolloutSample>,
    /// Wall time of generation, reference scoring and reward scoring.
    pub generate_s: f64,
    pub reference_s: f64,
    pub reward_s: f64,
}

/// What the engine needs of the models.
pub struct Policies<'a> {
    /// The current policy (a detached view is fine: nothing here needs gradients).
    pub policy: &'a Llama,
    pub reference: &'a Llama,
    pub tokenizer: &'a Tokenizer,
    pub pad_id: u32,
    pub eos_ids: &'a [u32],
}

/// Sample `cfg.k` completions for each prompt, score them, and take reference log-probs.
///
/// Data parallelism ([`rlhf_train::dist`]): the rows (each prompt `k` times) are cut into
/// generation batches of `rollout.batch_size`, each rank samples, scores and rewards a run of whole
/// batches, and the samples are gathered, so every rank returns the whole rollout, in order. A
/// batch's random stream depends on its position only, so the samples are those of one process.
pub fn collect(
    models: &Policies,
    prompts: &[(String, Vec<u32>)],
    cfg: &RolloutConfig,
    rewarder: &Rewarder,
    seed: u64,
) -> Result<Rollout> {
    let k = cfg.k.max(1);
    let repeated: Vec<(String, Vec<u32>)> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), k))
        .collect();
    let world = rlhf_train::dist::world();
    let (first, rows) = world.batch_share(repeated.len(), cfg.batch_size);
    let mut rollout = collect_rows(models, &repeated[rows], first, k, cfg, rewarder, seed)?;
    if world.size() > 1 {
        let parts: Vec<Vec<RolloutSample>> = world.gather_json(&rollout.samples)?;
        rollout.samples = parts.into_iter().flatten().collect();
    }
    Ok(rollout)
}

/// [`collect`]'s work on `repeated` (rows starting at generation batch `first_chunk`).
fn collect_rows(
    models: &Policies,
    repeated: &[(String, Vec<u32>)],
    first_chunk: usize,
    k: usize,
    cfg: &RolloutConfig,
    rewarder: &Rewarder,
    seed: u64,
) -> Result<Rollout> {
    let t0 = std::time::Instant::now();
    let generated = sample_from_chunk(
        models.policy,
        models.tokenizer,
        models.pad_id,
        repeated,
        &cfg.sampling(seed, models.eos_ids.to_vec()),
        cfg.batch_size,
        first_chunk,
    )?;
    let generate_s = t0.elapsed().as_secs_f64();

    let t1 = std::time::Instant::now();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = generated
        .iter()
        .map(|g| (g.prompt_ids.clone(), g.completion_ids.clone()))
        .collect();
    let ref_logprobs = score_pairs(
        models.reference,
        &rows,
        models.pad_id,
        cfg.batch_size,
        cfg.temperature,
    )?;
    let reference_s = t1.elapsed().as_secs_f64();

    let t2 = std::time::Instant::now();
    let queries: Vec<Query> = generated
        .iter()
        .map(|g| Query {
            prompt: &g.prompt,
            completion: &g.completion,
            prompt_ids: &g.prompt_ids,
            completion_ids: &g.completion_ids,
        })
        .collect();
    let (raw, normed) = rewarder.score(&queries)?;
    let reward_s = t2.elapsed().as_secs_f64();

    let samples = generated
        .into_iter()
        .zip(ref_logprobs)
        .zip(raw.into_iter().zip(normed))
        .map(|((g, ref_lp), (raw_score, score))| {
            let finished = g
                .completion_ids
                .last()
                .is_some_and(|t| models.eos_ids.contains(t));
            let penalty = if finished {
                0.0
            } else {
                cfg.missing_eos_penalty.unwrap_or(0.0)
            };
            RolloutSample {
                prompt: g.prompt,
                prompt_ids: g.prompt_ids,
                completion: g.completion,
                completion_ids: g.completion_ids,
                logprobs: g.logprobs,
                ref_logprobs: ref_lp,
                raw_score,
                score: score - penalty,
                finished,
            }
        })
        .collect();
    Ok(Rollout {
        k,
        samples,
        generate_s,
        reference_s,
        reward_s,
    })
}

impl Rollout {
    /// The first non-finite number of the batch, described ("the reward is NaN for sample 3
    /// (prompt \"...\")"), if there is one: scores, the policy's and the reference's log-probs.
    pub fn first_nonfinite(&self) -> Option<String> {
        let describe = rlhf_train::faults::describe;
        self.samples.iter().enumerate().find_map(|(i, s)| {
            let what = if !s.raw_score.is_finite() {
                format!("the reward is {}", describe(s.raw_score))
            } else if !s.score.is_finite() {
                format!("the (normalised) reward is {}", describe(s.score))
            } else if let Some(&x) = s.logprobs.iter().find(|x| !x.is_finite()) {
                format!("the policy's log-prob is {}", describe(x as f64))
            } else if let Some(&x) = s.ref_logprobs.iter().find(|x| !x.is_finite()) {
                format!("the reference's log-prob is {}", describe(x as f64))
            } else {
                return None;
            };
            let prompt: String = s.prompt.chars().take(60).collect();
            Some(format!("{what} for sample {i} (prompt {prompt:?})"))
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
    pub fn num_groups(&self) -> usize {
        self.samples.len() / self.k.max(1)
    }
    pub fn scores(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.score).collect()
    }
    /// Sequence-level KL of every sample.
    pub fn kls(&self) -> Vec<f64> {
        self.samples.iter().map(|s| s.kl()).collect()
    }
    /// R = score - beta * kl for every sample.
    pub fn shaped_rewards(&self, beta: f64) -> Vec<f64> {
        self.samples
            .iter()
            .map(|s| crate::kl::shaped_reward(s.score, s.kl(), beta))
            .collect()
    }
    /// (prompt ids, completion ids) of the samples at `idx`.
    pub fn rows(&self, idx: &[usize]) -> Vec<(Vec<u32>, Vec<u32>)> {
        idx.iter()
            .map(|&i| {
                let s = &self.samples[i];
                (s.prompt_ids.clone(), s.completion_ids.clone())
            })
            .collect()
    }
    /// The padded batch (with its completion mask) of the samples at `idx`.
    pub fn batch(&self, idx: &[usize], pad: u32, device: &Device) -> Result<CompletionBatch> {
        Ok(CompletionBatch::new(&self.rows(idx), pad, device)?)
    }
    /// The samples at `idx` as single-turn episodes.
    pub fn episodes(&self, idx: &[usize]) -> Vec<Episode> {
        idx.iter().map(|&i| self.samples[i].episode()).collect()
    }
    /// Completion tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.samples.iter().map(|s| s.len()).sum()
    }

    /// Batch statistics every online method logs.
    pub fn stats(&self) -> RolloutStats {
        let n = self.samples.len().max(1) as f64;
        let tokens = self.num_tokens();
        let lens: Vec<f64> = self.samples.iter().map(|s| s.len() as f64).collect();
        let neg_lp: f64 = self
            .samples
            .iter()
            .flat_map(|s| s.logprobs.iter())
            .map(|&x| -(x as f64))
            .sum();
        RolloutStats {
            score_mean: self.samples.iter().map(|s| s.score).sum::<f64>() / n,
            raw_score_mean: self.samples.iter().map(|s| s.raw_score).sum::<f64>() / n,
            kl_mean: self.kls().iter().sum::<f64>() / n,
            entropy: neg_lp / tokens.max(1) as f64,
            length_mean: lens.iter().sum::<f64>() / n,
            finished_fraction: self.samples.iter().filter(|s| s.finished).count() as f64 / n,
            tokens,
            seconds: self.generate_s + self.reference_s + self.reward_s,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutStats {
    /// Mean score the methods see (normalised, after the missing-EOS penalty).
    pub score_mean: f64,
    pub raw_score_mean: f64,
    /// Mean sequence-level KL(pi || pi_ref) (k1).
    pub kl_mean: f64,
    /// Per-token entropy estimate: the mean of -log pi over the sampled tokens.
    pub entropy: f64,
    pub length_mean: f64,
    /// Fraction of completions that ended with EOS.
    pub finished_fraction: f64,
    pub tokens: usize,
    pub seconds: f64,
}

/// Per-token values of each row placed where that row's completion sits in `batch`, zero
/// elsewhere: a `(b, t - 1)` f32 tensor aligned with `completion_logprobs(model, batch)`.
pub fn align(batch: &CompletionBatch, rows: &[&[f32]], device: &Device) -> Result<Tensor> {
    let (b, width) = batch.completion_mask.dims2()?;
    if rows.len() != b {
        return Err(TrainError::invalid(format!(
            "align: {} rows for a batch of {b}",
            rows.len()
        )));
    }
    let mut out = vec![0f32; b * width];
    for (r, (span, values)) in batch.spans.iter().zip(rows).enumerate() {
        if span.len() != values.len() {
            return Err(TrainError::invalid(format!(
                "align: row {r} has {} values for {} completion tokens",
                values.len(),
                span.len()
            )));
        }
        out[r * width + span.start..r * width + span.end].copy_from_slice(values);
    }
    Ok(Tensor::from_vec(out, (b, width), device)?)
}

/// Mean, population std, min and max (zeros for an empty slice).
pub fn summary(xs: &[f64]) -> (f64, f64, f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0, 0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let std = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, std, min, max)
}
