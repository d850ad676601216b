//! Losses shared by several methods: completion NLL (SFT, RAFT, PPO's pre-training mix),
//! the sequence-level policy-gradient loss (REINFORCE, RLOO), and per-token KL-shaped rewards.
//! The `masked_*` forms take an episode batch's role masks, so multi-turn episodes train the
//! policy on assistant tokens only and, where a method asks for it, model the user's tokens.

use candle_core::{Device, Tensor};
use rlhf_lm::score::{completion_logprobs, CompletionBatch};
use rlhf_train::Result;

use crate::policy::TrainableLm;

/// Summed NLL of the completion tokens of `rows` (differentiable).
pub fn nll_sum(
    lm: &TrainableLm,
    rows: &[(Vec<u32>, Vec<u32>)],
    device: &Device,
) -> Result<candle_core::Tensor> {
    let model = lm.model(device)?;
    let batch = CompletionBatch::new(rows, lm.pad_id, device)?;
    Ok(completion_logprobs(&model, &batch, 1.0)?.sum_all()?.neg()?)
}

/// The NLL of the micro-batch `part` of `batch` (indices into `rows`) as its share of the batch's
/// token-mean NLL: the parts of a batch add up to the whole batch's mean, so the update does not
/// depend on how the batch is split (gradient accumulation).
pub fn nll_share(
    lm: &TrainableLm,
    rows: &[(Vec<u32>, Vec<u32>)],
    batch: &[usize],
    part: &[usize],
    device: &Device,
) -> Result<(Tensor, Vec<(&'static str, f64)>)> {
    let n_tokens: usize = batch.iter().map(|&i| rows[i].1.len()).sum();
    let part_rows: Vec<_> = part.iter().map(|&i| rows[i].clone()).collect();
    Ok((
        (nll_sum(lm, &part_rows, device)? / n_tokens.max(1) as f64)?,
        Vec::new(),
    ))
}

/// Evaluation loss (mean NLL per completion token) without gradients.
pub fn eval_loss(
    lm: &TrainableLm,
    rows: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let frozen = lm.model(device)?.detached();
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in rows.chunks(batch_size.max(1)) {
        let batch = CompletionBatch::new(chunk, lm.pad_id, device)?;
        let lp = completion_logprobs(&frozen, &batch, 1.0)?;
        total -= lp.sum_all()?.to_scalar::<f32>()? as f64;
        count += chunk.iter().map(|(_, c)| c.len()).sum::<usize>();
    }
    Ok(total / count.max(1) as f64)
}

/// The sequence-level policy-gradient loss -mean_i(A_i * sum_t logp_i,t), from per-token
/// log-probs `(b, t)` that are zero outside each row's completion. Also RLOO's loss.
pub fn sequence_loss(logprobs: &Tensor, advantages: &[f64]) -> Result<Tensor> {
    let seq = logprobs.sum(1)?; // (b,)
    let adv = Tensor::from_vec(
        advantages.iter().map(|&a| a as f32).collect::<Vec<_>>(),
        advantages.len(),
        logprobs.device(),
    )?
    .to_dtype(seq.dtype())?;
    Ok((seq * adv)?.mean_all()?.neg()?)
}

/// [`sequence_loss`] over the tokens of `mask` only: -mean_i(A_i * sum_t m_i,t * logp_i,t).
/// logprobs, mask: `(b, t - 1)` (e.g. an episode batch's `assistant_mask`); advantages: `b`.
pub fn masked_sequence_loss(
    logprobs: &Tensor,
    mask: &Tensor,
    advantages: &[f64],
) -> Result<Tensor> {
    let masked = logprobs.broadcast_mul(&mask.to_dtype(logprobs.dtype())?)?;
    sequence_loss(&masked, advantages)
}

/// Token-level policy gradient over the tokens of `mask`:
/// -sum_i,t(m_i,t * A_i,t * logp_i,t) / sum_i,t m_i,t. logprobs, mask, advantages: `(b, t - 1)`.
pub fn masked_token_loss(logprobs: &Tensor, mask: &Tensor, advantages: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(logprobs.dtype())?;
    let n_tokens = mask
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    let weighted = (logprobs * advantages.to_dtype(logprobs.dtype())?)?.broadcast_mul(&mask)?;
    Ok((weighted.sum_all()?.neg()? / n_tokens.max(1.0))?)
}

/// Summed NLL of the tokens of `mask`: -sum_i,t(m_i,t * logp_i,t). logprobs, mask: `(b, t - 1)`
/// (e.g. an episode batch's `user_mask`, to model the user's turns).
pub fn masked_nll(logprobs: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(logprobs
        .broadcast_mul(&mask.to_dtype(logprobs.dtype())?)?
        .sum_all()?
        .neg()?)
}

/// Per-token rewards: -beta * (logp_t - ref_t) at every token, plus `score` at the last.
pub fn token_rewards(score: f64, logp: &[f32], ref_logp: &[f32], beta: f64) -> Vec<f64> {
    let n = logp.len();
    logp.iter()
        .zip(ref_logp)
        .enumerate()
        .map(|(t, (&a, &b))| -beta * (a as f64 - b as f64) + if t + 1 == n { score } else { 0.0 })
        .collect()
}

/// Summed log-probs of each episode's own `role` targets (row i keeps the targets of `roles[i]`:
/// assistant tokens to clone a policy, user tokens to model a user), differentiable, and how many
/// targets were summed.
pub fn role_logprob_sum(
    model: &rlhf_lm::llama::Llama,
    episodes: &[rlhf_lm::Episode],
    roles: &[rlhf_lm::Role],
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, f64)> {
    assert_eq!(episodes.len(), roles.len(), "one role per episode");
    let batch = rlhf_lm::score::EpisodeBatch::new(episodes, pad_id, device)?;
    let lp = rlhf_lm::score::episode_logprobs(model, &batch, 1.0)?;
    let rows = roles
        .iter()
        .enumerate()
        .map(|(i, role)| match role {
            rlhf_lm::Role::User => batch.user_mask.narrow(0, i, 1),
            rlhf_lm::Role::Assistant => batch.assistant_mask.narrow(0, i, 1),
            rlhf_lm::Role::Prompt => batch.target_mask.zeros_like()?.narrow(0, i, 1),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mask = Tensor::cat(&rows, 0)?;
    let n = mask.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((lp.broadcast_mul(&mask.to_dtype(lp.dtype())?)?.sum_all()?, n))
}

/// Held-out NLL per target of each episode's own role (see [`role_logprob_sum`]), without
/// gradients, in chunks of `batch_size` episodes.
pub fn role_nll_per_token(
    model: &rlhf_lm::llama::Llama,
    episodes: &[rlhf_lm::Episode],
    roles: &[rlhf_lm::Role],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let frozen = model.detached();
    let (mut total, mut count) = (0.0, 0.0);
    for (eps, rs) in episodes
        .chunks(batch_size.max(1))
        .zip(roles.chunks(batch_size.max(1)))
    {
        let (s, n) = role_logprob_sum(&frozen, eps, rs, pad_id, device)?;
        total -= s.to_scalar::<f32>()? as f64;
        count += n;
    }
    Ok(total / count.max(1.0))
}
