//! Token-level PPO with a critic, with every PPO-max component (Zheng et al. 2023, "Secrets of
//! RLHF Part I", section 5.4; spec section 4) as a switch and the PPO-max preset as the default.
//!
//! One rollout batch (the small experience buffer) per iteration, then `epochs` passes of
//! `minibatches` optimiser steps over it:
//!
//! ```text
//! s      = score, normalised by the running (historical) mean/std and clipped to +-reward_clip
//! r_t    = -beta * (log pi_old(y_t) - log pi_ref(y_t))  (+ s at the last completion token)
//! delta_t = r_t + gamma * V(s_t+1) - V(s_t)             (V after the last token = 0)
//! A_t    = delta_t + gamma * lambda * A_t+1   (GAE)     R_t = A_t + V(s_t)
//! ratio  = pi(y_t) / pi_old(y_t)
//! policy loss = mean_t max(-A_t ratio, -A_t clip(ratio, 1 - eps, 1 + eps))
//!               - entropy_coef * mean_t H_t  +  ptx_coef * NLL(SFT batch)
//! value loss  = mean_t 1/2 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)
//! ```
//!
//! The critic is a separate [`ValueModel`] (trunk + per-token scalar head) initialised from the
//! reward model and, before any policy update, trained on value loss alone for up to
//! `critic_pretrain_iterations` rollout batches of the initial policy (or until its loss is below
//! `critic_pretrain_tol`).
//!
//! Collapse monitors (spec 4.3) are logged every iteration: the policy's perplexity on its own
//! samples, response length, KL to the reference, the reward's mean and 95th percentile, clip
//! fractions, approx-KL, value loss and explained variance. The shared trip-wire (`[tripwire]`,
//! `rlhf_rl::tripwire`) checks KL, length, perplexity and loss on each rollout batch, before the
//! policy learns from it, and stops the run or rolls back to the last snapshot whose following
//! rollout passed (the weights and AdamW moments of policy and critic, the KL coefficient and the
//! running reward moments), writing the reason to `<run>/tripwire.json`.
//!
//! The math is in pure functions ([`gae`], [`clipped_surrogate`], [`clipped_value_loss`],
//! [`RunningMoments`], [`token_rewards`]) with tensor twins for training.

use rlhf_rl::registry::{Entry, Family};
use rlhf_train::rng::{stream_seed, GOLDEN};
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use rlhf_lm::score::{gather_logprobs, CompletionBatch};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::online::{
    advantage_metrics, policy_logprobs, Method, OnlineConfig, OnlineSummary, Session,
};
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::reward_source::SourceKind;
use rlhf_rl::rollout::{align, Rollout};
use rlhf_rl::value::{values, ValueModel};

// ---- configuration ---------------------------------------------------------------------------------

/// How the score is rescaled before it enters the token rewards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RewardScaling {
    /// The score as the reward source gives it.
    None,
    /// Divided by the running std (MOSS-RLHF's `use_reward_scaling`; no mean subtracted).
    Scale,
    /// (score - running mean) / running std, then clipped (PPO-max).
    Normalize,
}

/// Advantage whitening (zero mean, unit std over completion tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Whiten {
    None,
    /// Over the whole rollout batch (AlpacaFarm).
    Batch,
    /// Over each minibatch.
    Minibatch,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PpoParams {
    /// Passes over each rollout batch.
    pub epochs: usize,
    /// Optimiser steps per pass (policy and critic alike).
    pub minibatches: usize,
    /// Discount of the per-token rewards in GAE.
    pub gamma: f64,
    /// GAE lambda (bias/variance trade-off of the advantages).
    pub lam: f64,
    /// The surrogate's epsilon.
    pub clip_range: f64,
    /// Value-loss clipping around the rollout-time values; 0 turns it off.
    pub value_clip: f64,
    /// Critic initialisation (default: the reward model, else the initial policy with a new head).
    pub value_model: Option<PathBuf>,
    /// Learning rate of the critic (its own AdamW).
    pub value_lr: f64,
    /// Value-only rollout batches of the initial policy before any policy update (0: none).
    pub critic_pretrain_iterations: usize,
    /// Critic pre-training ends early once a batch's mean value loss is below this.
    pub critic_pretrain_tol: f64,
    pub reward_scaling: RewardScaling,
    /// Clip the normalised score to +-this; 0 turns it off.
    pub reward_clip: f64,
    /// KL penalty at every token (PPO-max); false: the sequence's summed KL at the last token.
    pub token_kl: bool,
    pub whiten: Whiten,
    /// Clip (whitened) advantages to +-this; 0 turns it off.
    pub advantage_clip: f64,
    /// PPO-ptx: weight of the LM loss on SFT data (0: off).
    pub ptx_coef: f64,
    /// SFT data for PPO-ptx (`prompt`/`completion` or `messages`); default: the task's
    /// demonstrations.
    pub ptx_file: Option<PathBuf>,
    /// SFT examples per optimiser step.
    pub ptx_batch_size: usize,
    /// Entropy bonus (full-distribution entropy per token); 0 turns it off.
    pub entropy_coef: f64,
}

impl Default for PpoParams {
    /// The PPO-max preset.
    fn default() -> Self {
        PpoParams {
            epochs: 2,
            minibatches: 2,
            gamma: 1.0,
            lam: 0.95,
            clip_range: 0.2,
            value_clip: 0.2,
            value_model: None,
            value_lr: 1e-4,
            critic_pretrain_iterations: 4,
            critic_pretrain_tol: 0.02,
            reward_scaling: RewardScaling::Normalize,
            reward_clip: 5.0,
            token_kl: true,
            whiten: Whiten::None,
            advantage_clip: 0.0,
            ptx_coef: 0.05,
            ptx_file: None,
            ptx_batch_size: 16,
            entropy_coef: 0.0,
        }
    }
}

impl PpoParams {
    /// "Plain" PPO for the ablation: no reward normalisation or clipping and no critic
    /// pre-training; everything else as PPO-max. (Set `reward.normalize = false` as well to take
    /// the reward source's raw scores.)
    pub fn plain() -> Self {
        PpoParams {
            critic_pretrain_iterations: 0,
            reward_scaling: RewardScaling::None,
            reward_clip: 0.0,
            ..PpoParams::default()
        }
    }
}

pub type PpoConfig = OnlineConfig<PpoParams>;

impl Method for PpoParams {
    const NAME: &'static str = "ppo";
    fn adjust_defaults(cfg: &mut OnlineConfig<Self>) {
        cfg.rollout.k = 1;
        cfg.prompts_per_step = 64;
    }
    fn updates_per_iteration(cfg: &OnlineConfig<Self>) -> u64 {
        (cfg.method.minibatches.clamp(1, cfg.prompts_per_step) * cfg.method.epochs.max(1)) as u64
    }
    fn validate(cfg: &OnlineConfig<Self>) -> Result<()> {
        let m = &cfg.method;
        if m.epochs == 0 || m.minibatches == 0 {
            return Err(TrainError::invalid(
                "method.epochs and method.minibatches must be >= 1",
            ));
        }
        if !(m.value_lr > 0.0) {
            return Err(TrainError::invalid("method.value_lr must be > 0"));
        }
        if !(0.0..=1.0).contains(&m.gamma) || !(0.0..=1.0).contains(&m.lam) {
            return Err(TrainError::invalid(
                "method.gamma and method.lam must be in [0, 1]",
            ));
        }
        if !(m.clip_range > 0.0) {
            return Err(TrainError::invalid("method.clip_range must be > 0"));
        }
        for (name, v) in [
            ("value_clip", m.value_clip),
            ("reward_clip", m.reward_clip),
            ("advantage_clip", m.advantage_clip),
            ("ptx_coef", m.ptx_coef),
            ("entropy_coef", m.entropy_coef),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(TrainError::invalid(format!(
                    "method.{name} must be >= 0, got {v}"
                )));
            }
        }
        if m.ptx_coef > 0.0 && m.ptx_file.is_none() && cfg.task.is_none() {
            return Err(TrainError::invalid(
                "method.ptx_coef > 0 needs SFT data: set method.ptx_file (or a testbed task), or method.ptx_coef = 0",
            ));
        }
        Ok(())
    }
}

// ---- the math, on plain numbers ----------------------------------------------------------------------

/// Running mean and (population) variance over every value seen, merged batch by batch with
/// Chan et al.'s parallel update:
///
/// ```text
/// d = mean_b - mean;  n' = n + n_b
/// mean' = mean + d * n_b / n'
/// M2'   = M2 + M2_b + d^2 * n * n_b / n'          var = M2 / n
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
pub struct RunningMoments {
    pub n: f64,
    pub mean: f64,
    pub m2: f64,
}

impl RunningMoments {
    pub fn update(&mut self, xs: &[f64]) {
        if xs.is_empty() {
            return;
        }
        let nb = xs.len() as f64;
        let mean_b = xs.iter().sum::<f64>() / nb;
        let m2_b: f64 = xs.iter().map(|x| (x - mean_b).powi(2)).sum();
        let n = self.n + nb;
        let d = mean_b - self.mean;
        self.mean += d * nb / n;
        self.m2 += m2_b + d * d * self.n * nb / n;
        self.n = n;
    }
    pub fn var(&self) -> f64 {
        if self.n > 0.0 {
            self.m2 / self.n
        } else {
            0.0
        }
    }
    pub fn std(&self) -> f64 {
        self.var().sqrt()
    }
}

/// Rescale a batch of scores: the batch first joins the running moments (history including this
/// batch), then each score is scaled / normalised and clipped to +-`clip` (0: no clip).
pub fn normalize_scores(
    scores: &[f64],
    moments: &mut RunningMoments,
    kind: RewardScaling,
    clip: f64,
) -> Vec<f64> {
    if kind == RewardScaling::None {
        return scores.to_vec();
    }
    moments.update(scores);
    let std = moments.std().max(1e-8);
    scores
        .iter()
        .map(|&s| {
            let x = match kind {
                RewardScaling::Scale => s / std,
                _ => (s - moments.mean) / std,
            };
            if clip > 0.0 {
                x.clamp(-clip, clip)
            } else {
                x
            }
        })
        .collect()
}

/// Per-token rewards of one completion: the KL penalty -beta * (logp_t - ref_t) at every token
/// (`per_token`), or the whole sequence's -beta * sum_t (logp_t - ref_t) at the last token; and
/// the score at the last completion token only.
pub fn token_rewards(
    score: f64,
    logp: &[f32],
    ref_logp: &[f32],
    beta: f64,
    per_token: bool,
) -> Vec<f64> {
    if per_token {
        return rlhf_rl::objectives::token_rewards(score, logp, ref_logp, beta);
    }
    let mut r = vec![0.0; logp.len()];
    if let Some(last) = r.last_mut() {
        *last = score - beta * rlhf_rl::kl::sequence_kl(logp, ref_logp);
    }
    r
}

/// GAE over one completion: (advantages, returns = advantages + values). The value after the
/// last token is 0 (the episode ends).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(rewards.len(), values.len(), "one value per reward");
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_adv = 0.0;
    for t in (0..n).rev() {
        let next_v = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_v - values[t];
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// The clipped surrogate of one token: (loss, whether the clipped branch was taken).
/// loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).
pub fn clipped_surrogate(ratio: f64, adv: f64, eps: f64) -> (f64, bool) {
    let unclipped = -adv * ratio;
    let clipped = -adv * ratio.clamp(1.0 - eps, 1.0 + eps);
    (unclipped.max(clipped), clipped > unclipped)
}

/// The clipped value loss of one token: (loss, whether the clipped branch was taken).
/// loss = 1/2 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2); `clip` = 0: 1/2 (V - R)^2.
pub fn clipped_value_loss(v: f64, v_old: f64, ret: f64, clip: f64) -> (f64, bool) {
    let plain = (v - ret).powi(2);
    if clip <= 0.0 {
        return (0.5 * plain, false);
    }
    let v_clipped = v_old + (v - v_old).clamp(-clip, clip);
    let c = (v_clipped - ret).powi(2);
    (0.5 * plain.max(c), c > plain)
}

/// Whiten in place (zero mean, unit std); then clip to +-`clip` (0: no clip).
pub fn whiten(xs: &mut [f64], clip: f64) {
    let (mean, std, _, _) = rlhf_rl::rollout::summary(xs);
    for x in xs.iter_mut() {
        *x = (*x - mean) / (std + 1e-8);
        if clip > 0.0 {
            *x = x.clamp(-clip, clip);
        }
    }
}

/// 1 - Var(returns - values) / Var(returns) (NaN when the returns do not vary).
pub fn explained_variance(values: &[f64], returns: &[f64]) -> f64 {
    let resid: Vec<f64> = returns.iter().zip(values).map(|(r, v)| r - v).collect();
    let var_r = rlhf_rl::rollout::summary(returns).1.powi(2);
    if var_r == 0.0 {
        return f64::NAN;
    }
    1.0 - rlhf_rl::rollout::summary(&resid).1.powi(2) / var_r
}

/// The q-quantile (linear interpolation between order statistics).
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

// ---- the same, on tensors (for training) ------------------------------------------------------------

/// Sum over masked tokens of the clipped surrogate, divided by `n_tokens`. `logp`, `old_logp`,
/// `adv`, `mask` are `(b, t)`; differentiable in `logp`.
pub fn surrogate_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    adv: &Tensor,
    mask: &Tensor,
    eps: f64,
    n_tokens: f64,
) -> Result<Tensor> {
    let ratio = (logp - old_logp)?.exp()?;
    let unclipped = (adv.neg()? * &ratio)?;
    let clipped = (adv.neg()? * ratio.clamp(1.0 - eps, 1.0 + eps)?)?;
    let per_token = (unclipped.maximum(&clipped)? * mask)?;
    Ok((per_token.sum_all()? / n_tokens.max(1.0))?)
}

/// Sum over masked tokens of the clipped value loss, divided by `n_tokens`; `clip` = 0: plain.
pub fn value_loss_tensor(
    v: &Tensor,
    v_old: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip: f64,
    n_tokens: f64,
) -> Result<Tensor> {
    let plain = (v - returns)?.sqr()?;
    let per_token = if clip > 0.0 {
        let v_clipped = (v_old + (v - v_old)?.clamp(-clip, clip)?)?;
        plain.maximum(&(v_clipped - returns)?.sqr()?)?
    } else {
        plain
    };
    Ok(((per_token * mask)?.sum_all()? * (0.5 / n_tokens.max(1.0)))?)
}

/// The policy's per-token log-probs `(b, t - 1)` and, when asked, the full-distribution entropy
/// of each position (both zero outside the completions), from one forward pass.
pub fn logprobs_and_entropy(
    lm: &TrainableLm,
    batch: &CompletionBatch,
    temperature: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let model = lm.model(device)?;
    let tokens = &batch.tokens;
    let (_, t) = tokens.dims();
    let hidden = model.hidden_states(&tokens.ids, &tokens.positions, &tokens.mask, None)?;
    let logits = model.logits(&hidden.narrow(1, 0, t - 1)?.contiguous()?)?;
    let mask = &batch.completion_mask;
    let logp = (gather_logprobs(&logits, &tokens.ids.narrow(1, 1, t - 1)?, temperature)? * mask)?;
    let scaled = (logits / temperature)?;
    let lsm = candle_nn::ops::log_softmax(&scaled, D::Minus1)?;
    let entropy = (lsm.exp()? * &lsm)?.sum(D::Minus1)?.neg()?;
    Ok((logp, (entropy * mask)?))
}

/// The approx-KL monitor's term for one token sampled from the rollout policy: k3 of
/// KL(pi_old || pi_new), `(r - 1) - ln r` with `r = pi_new / pi_old` (Schulman's estimator, never
/// negative, unbiased under pi_old).
pub fn approx_kl_token(old_logp: f64, new_logp: f64) -> f64 {
    rlhf_rl::kl::k3(old_logp, new_logp)
}

// ---- the loop -------------------------------------------------------------------------------------

/// The method's checkpoint state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
struct PpoState {
    moments: RunningMoments,
}

/// Everything computed from a rollout batch before the updates.
struct Experience {
    old_logp: Vec<Vec<f32>>,
    v_old: Vec<Vec<f32>>,
    adv: Vec<Vec<f64>>,
    returns: Vec<Vec<f64>>,
    /// The rescaled scores (what enters the last token's reward).
    scores: Vec<f64>,
}

fn f32_rows(rows: &[Vec<f64>], idx: &[usize]) -> Vec<Vec<f32>> {
    idx.iter()
        .map(|&i| rows[i].iter().map(|&x| x as f32).collect())
        .collect()
}

fn aligned(batch: &CompletionBatch, rows: &[Vec<f32>], device: &Device) -> Result<Tensor> {
    align(
        batch,
        &rows.iter().map(|r| r.as_slice()).collect::<Vec<_>>(),
        device,
    )
}

fn predict_values(
    value: &ValueModel,
    rollout: &Rollout,
    pad: u32,
    bs: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let all: Vec<usize> = (0..rollout.len()).collect();
    let mut out = Vec::with_capacity(rollout.len());
    for chunk in all.chunks(bs.max(1)) {
        out.extend(value.predict(&rollout.batch(chunk, pad, device)?, device)?);
    }
    Ok(out)
}

/// Rewards, values, GAE (and batch whitening) for a rollout batch.
fn experience(
    m: &PpoParams,
    rollout: &Rollout,
    v_old: Vec<Vec<f32>>,
    moments: &mut RunningMoments,
    beta: f64,
) -> Experience {
    let raw: Vec<f64> = rollout.scores();
    let scores = normalize_scores(&raw, moments, m.reward_scaling, m.reward_clip);
    let (mut adv, mut returns) = (Vec::new(), Vec::new());
    for ((x, s), v) in rollout.samples.iter().zip(&scores).zip(&v_old) {
        let r = token_rewards(*s, &x.logprobs, &x.ref_logprobs, beta, m.token_kl);
        let v: Vec<f64> = v.iter().map(|&v| v as f64).collect();
        let (a, g) = gae(&r, &v, m.gamma, m.lam);
        adv.push(a);
        returns.push(g);
    }
    if m.whiten == Whiten::Batch {
        whiten_rows(&mut adv, m.advantage_clip);
    }
    Experience {
        old_logp: rollout.samples.iter().map(|x| x.logprobs.clone()).collect(),
        v_old,
        adv,
        returns,
        scores,
    }
}

fn whiten_rows(rows: &mut [Vec<f64>], clip: f64) {
    let mut flat: Vec<f64> = rows.iter().flatten().copied().collect();
    whiten(&mut flat, clip);
    let mut it = flat.into_iter();
    for r in rows.iter_mut() {
        for x in r.iter_mut() {
            *x = it.next().expect("same count");
        }
    }
}

/// One critic step on the samples `mb` (micro-batched like the policy); returns (loss, clip
/// fraction, grad norm).
fn value_step(
    value: &mut ValueModel,
    rollout: &Rollout,
    exp: &Experience,
    mb: &[usize],
    clip: f64,
    grad_accum: usize,
    pad: u32,
    device: &Device,
) -> Result<(f64, f64, f64)> {
    let mb_tokens: usize = mb.iter().map(|&i| rollout.samples[i].len()).sum();
    // Data parallelism: this rank's share of the minibatch (the loss is a sum over tokens divided
    // by the whole minibatch's token count, so the ranks' parts add up).
    let world = rlhf_train::dist::world();
    let mine = &mb[world.share(mb.len())];
    let micro = mine.len().div_ceil(grad_accum.max(1)).max(1);
    let mut acc = value.accumulator();
    let (mut loss, mut clipped) = (0.0, 0usize);
    for part in mine.chunks(micro) {
        let batch = rollout.batch(part, pad, device)?;
        let (model, head) = value.trainable(device)?;
        let v = values(&model, &head, &batch)?;
        let v_old_rows: Vec<Vec<f32>> = part.iter().map(|&i| exp.v_old[i].clone()).collect();
        let v_old = aligned(&batch, &v_old_rows, device)?;
        let ret = aligned(&batch, &f32_rows(&exp.returns, part), device)?;
        let l = value_loss_tensor(
            &v,
            &v_old,
            &ret,
            &batch.completion_mask,
            clip,
            mb_tokens as f64,
        )?;
        loss += l.to_scalar::<f32>()? as f64;
        if clip > 0.0 {
            let new = rlhf_lm::score::per_row(&v.detach(), &batch)?;
            for (row, &i) in new.iter().zip(part) {
                for (t, &vn) in row.iter().enumerate() {
                    let (_, c) = clipped_value_loss(
                        vn as f64,
                        exp.v_old[i][t] as f64,
                        exp.returns[i][t],
                        clip,
                    );
                    clipped += usize::from(c);
                }
            }
        }
        acc.add(rlhf_lm::llama::backward(&l)?)?;
    }
    let norm = value.step(acc.finish_across_ranks()?)?;
    let mut sums = [loss, clipped as f64];
    world.sum_f64(&mut sums)?;
    Ok((sums[0], sums[1] / mb_tokens.max(1) as f64, norm))
}

/// SFT rows for PPO-ptx: `ptx_file`, else the task's demonstrations.
fn ptx_rows(cfg: &PpoConfig, s: &Session<PpoParams>) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let max_len = cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens;
    match (&cfg.method.ptx_file, &s.task) {
        (Some(p), _) => rlhf_rl::pairs::load_rows(&s.lm, p, max_len, false),
        (None, Some(task)) => task
            .demonstrations()
            .iter()
            .map(|(p, c)| Ok(s.lm.encode(p, c, true, max_len)?))
            .collect(),
        (None, None) => Err(TrainError::invalid("PPO-ptx has no SFT data")),
    }
}

/// A rollout of the initial policy for critic pre-training: prompts from far along the
/// prompt stream (the same whatever `steps` is), a seed of their own.
fn pretrain_rollout(s: &Session<PpoParams>, i: u64) -> Result<Rollout> {
    let seed = stream_seed(s.cfg.seed.wrapping_mul(GOLDEN), "pretrain") ^ i;
    s.collect_rollout(&s.prompts_for((1 << 20) + i), seed)
}

pub fn run(cfg: &PpoConfig, resume: bool, device: &Device) -> Result<OnlineSummary> {
    let mut s = Session::start(cfg, resume, device)?;
    let m = &cfg.method;
    let init = match (&m.value_model, cfg.reward.source, &cfg.reward.model) {
        (Some(p), _, _) => p.clone(),
        (None, SourceKind::Model, Some(rm)) => rm.clone(),
        _ => cfg.model.clone(),
    };
    let resumed_at = resume.then_some(s.trainer.step).filter(|&st| st > 0);
    let mut value = ValueModel::start(
        &init,
        &cfg.output_dir.join("value"),
        resumed_at,
        m.value_lr,
        cfg.optim.max_grad_norm,
        cfg.seed,
        &cfg.lora,
        device,
    )?;
    let mut state: PpoState = match &s.resumed_method_state {
        Some(v) if !v.is_null() => serde_json::from_value(v.clone())
            .map_err(|e| TrainError::invalid(format!("checkpoint state: ppo: {e}")))?,
        _ => PpoState::default(),
    };
    let ptx = if m.ptx_coef > 0.0 {
        ptx_rows(cfg, &s)?
    } else {
        Vec::new()
    };
    let (pad, temp, bs) = (s.lm.pad_id, cfg.rollout.temperature, cfg.rollout.batch_size);
    let grad_accum = cfg.optim.grad_accum;

    // 0. Critic pre-training: value updates only, on rollouts of the initial policy.
    if resumed_at.is_none() && m.critic_pretrain_iterations > 0 {
        let mut moments = state.moments;
        for i in 0..m.critic_pretrain_iterations {
            let rollout = pretrain_rollout(&s, i as u64)?;
            let v_old = predict_values(&value, &rollout, pad, bs, device)?;
            let exp = experience(m, &rollout, v_old, &mut moments, s.kl.beta);
            let (mut losses, mut ev) = (Vec::new(), f64::NAN);
            for epoch in 0..m.epochs as u64 {
                for mb in s.minibatches(&rollout, m.minibatches, 1_000_000 + i as u64 * 100 + epoch)
                {
                    let (l, _, _) = value_step(
                        &mut value,
                        &rollout,
                        &exp,
                        &mb,
                        m.value_clip,
                        grad_accum,
                        pad,
                        device,
                    )?;
                    losses.push(l);
                }
            }
            let flat_v: Vec<f64> = exp.v_old.iter().flatten().map(|&v| v as f64).collect();
            let flat_r: Vec<f64> = exp.returns.iter().flatten().copied().collect();
            if !flat_v.is_empty() {
                ev = explained_variance(&flat_v, &flat_r);
            }
            let mean_loss = losses.iter().sum::<f64>() / losses.len().max(1) as f64;
            s.trainer.log(&[
                ("critic_pretrain/iteration", (i + 1) as f64),
                ("critic_pretrain/value_loss", mean_loss),
                ("critic_pretrain/explained_variance", ev),
            ])?;
            eprintln!(
                "critic pre-training {}: value loss {mean_loss:.4}, explained variance {ev:.3}",
                i + 1
            );
            if mean_loss < m.critic_pretrain_tol {
                break;
            }
        }
        // The pre-training batches count toward the running reward statistics.
        state.moments = moments;
    }

    while !s.done() {
        // 1. Sample and score with the current policy; the critic's values at rollout time.
        let rollout = s.rollout()?;
        let st = rollout.stats();
        let perplexity = st.entropy.exp();
        let ref_perplexity = {
            let n = rollout.num_tokens().max(1) as f64;
            (rollout
                .samples
                .iter()
                .flat_map(|x| x.ref_logprobs.iter())
                .map(|&x| -(x as f64))
                .sum::<f64>()
                / n)
                .exp()
        };

        // 2. Trip-wire (when set): judge the policy that produced this batch before learning
        //    from it.
        if !s.judge(&rollout, &mut state, Some(&mut value))? {
            continue;
        }

        let v_old = predict_values(&value, &rollout, pad, bs, device)?;
        let exp = experience(m, &rollout, v_old, &mut state.moments, s.kl.beta);

        // 3. Epochs of minibatches: clipped-surrogate policy steps (+ ptx, entropy), critic steps.
        let (mut losses, mut v_losses, mut v_clip, mut v_norms) = (vec![], vec![], vec![], vec![]);
        let (mut clipped, mut approx_kl, mut tokens_seen, mut entropy_sum, mut ptx_losses) =
            (0usize, 0.0, 0usize, 0.0, vec![]);
        let mut last = None;
        for epoch in 0..m.epochs as u64 {
            for mb in s.minibatches(&rollout, m.minibatches, epoch) {
                let mb_tokens: f64 =
                    mb.iter().map(|&i| rollout.samples[i].len()).sum::<usize>() as f64;
                let mut mb_adv: Vec<Vec<f64>> = mb.iter().map(|&i| exp.adv[i].clone()).collect();
                if m.whiten == Whiten::Minibatch {
                    whiten_rows(&mut mb_adv, m.advantage_clip);
                }
                let adv_of: HashMap<usize, Vec<f64>> = mb.iter().copied().zip(mb_adv).collect();
                let ptx_idx: Vec<usize> = if ptx.is_empty() {
                    Vec::new()
                } else {
                    let at = (s.trainer.step as usize * m.ptx_batch_size) % ptx.len();
                    (0..m.ptx_batch_size.min(ptx.len()))
                        .map(|j| (at + j) % ptx.len())
                        .collect()
                };
                let first = mb[0];
                let (loss, stats) = s.optimizer_step(&mb, |lm, part| {
                    let batch = rollout.batch(part, pad, device)?;
                    let (logp, ent) = if m.entropy_coef > 0.0 {
                        let (l, e) = logprobs_and_entropy(lm, &batch, temp, device)?;
                        (l, Some(e))
                    } else {
                        (policy_logprobs(lm, &batch, temp, device)?, None)
                    };
                    let old_rows: Vec<Vec<f32>> =
                        part.iter().map(|&i| exp.old_logp[i].clone()).collect();
                    let old = aligned(&batch, &old_rows, device)?;
                    let a_rows: Vec<Vec<f32>> = part
                        .iter()
                        .map(|i| adv_of[i].iter().map(|&x| x as f32).collect())
                        .collect();
                    let a = aligned(&batch, &a_rows, device)?;
                    let mask = &batch.completion_mask;
                    let mut loss = surrogate_loss(&logp, &old, &a, mask, m.clip_range, mb_tokens)?;
                    // Monitors: clip fraction and approx-KL (k3 of KL(old || new)) over these tokens.
                    let new_rows = rlhf_lm::score::per_row(&logp.detach(), &batch)?;
                    for ((new, old), adv) in new_rows.iter().zip(&old_rows).zip(&a_rows) {
                        for ((&n, &o), &av) in new.iter().zip(old).zip(adv) {
                            let ratio = (n as f64 - o as f64).exp();
                            clipped +=
                                usize::from(clipped_surrogate(ratio, av as f64, m.clip_range).1);
                            approx_kl += approx_kl_token(o as f64, n as f64);
                            tokens_seen += 1;
                        }
                    }
                    if let Some(e) = ent {
                        let e_sum = e.sum_all()?;
                        entropy_sum += e_sum.to_scalar::<f32>()? as f64;
                        loss = (loss - (e_sum * (m.entropy_coef / mb_tokens.max(1.0)))?)?;
                    }
                    if !ptx_idx.is_empty() && part[0] == first {
                        let rows: Vec<(Vec<u32>, Vec<u32>)> =
                            ptx_idx.iter().map(|&j| ptx[j].clone()).collect();
                        let n: usize = rows.iter().map(|(_, c)| c.len()).sum();
                        let nll =
                            (rlhf_rl::objectives::nll_sum(lm, &rows, device)? / n.max(1) as f64)?;
                        ptx_losses.push(nll.to_scalar::<f32>()? as f64);
                        loss = (loss + (nll * m.ptx_coef)?)?;
                    }
                    Ok(loss)
                })?;
                losses.push(loss);
                last = Some(stats);
                let (vl, vc, vn) = value_step(
                    &mut value,
                    &rollout,
                    &exp,
                    &mb,
                    m.value_clip,
                    grad_accum,
                    pad,
                    device,
                )?;
                v_losses.push(vl);
                v_clip.push(vc);
                v_norms.push(vn);
            }
        }

        // 4. Monitors (each rank saw its share of every minibatch's tokens: add them up).
        let mut seen = [clipped as f64, approx_kl, tokens_seen as f64, entropy_sum];
        rlhf_train::dist::world().sum_f64(&mut seen)?;
        let [clipped, approx_kl, tokens_seen, entropy_sum] = seen;
        let stats = last.expect("at least one minibatch");
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len().max(1) as f64;
        let flat_adv: Vec<f64> = exp.adv.iter().flatten().copied().collect();
        let flat_v: Vec<f64> = exp.v_old.iter().flatten().map(|&v| v as f64).collect();
        let flat_r: Vec<f64> = exp.returns.iter().flatten().copied().collect();
        // The tail on the reward source's own scale (comparable across normalisation settings).
        let raw: Vec<f64> = rollout.samples.iter().map(|x| x.raw_score).collect();
        let n_tok = tokens_seen.max(1.0);
        let mut metrics = vec![
            ("loss", mean(&losses)),
            ("lr", stats.lr),
            ("grad_norm", stats.grad_norm),
            ("perplexity", perplexity),
            ("ref_perplexity", ref_perplexity),
            ("reward_p50", quantile(&raw, 0.5)),
            ("reward_p95", quantile(&raw, 0.95)),
            ("reward_normalized", mean(&exp.scores)),
            ("reward_running_mean", state.moments.mean),
            ("reward_running_std", state.moments.std()),
            ("clip_fraction", clipped / n_tok),
            ("approx_kl", approx_kl / n_tok),
            ("value_loss", mean(&v_losses)),
            ("value_clip_fraction", mean(&v_clip)),
            ("value_grad_norm", mean(&v_norms)),
            ("explained_variance", explained_variance(&flat_v, &flat_r)),
            ("value", mean(&flat_v)),
            ("return", mean(&flat_r)),
        ];
        if m.entropy_coef > 0.0 {
            metrics.push(("entropy_full", entropy_sum / n_tok));
        }
        if !ptx_losses.is_empty() {
            metrics.push(("ptx_loss", mean(&ptx_losses)));
        }
        metrics.extend(advantage_metrics(&flat_adv));
        s.end_iteration(&rollout, &metrics, &mut state, Some(&mut value))?;
    }
    s.finish()
}

/// `rlhf ppo`.
pub static ENTRY: Entry<PpoConfig, OnlineSummary> = Entry {
    name: "ppo",
    about: "Online RL: token-level PPO with a critic and GAE; the PPO-max recipe by default, collapse monitors and a trip-wire.",
    family: Family::Online,
    shorthands: &[],
    run,
};
