//! Log-prob scoring: the one function every algorithm, rollout and evaluation uses to ask
//! "how likely is this completion under this model?".
//!
//! Tokenisation follows TRL: the prompt is encoded with the tokenizer's special tokens, the
//! completion without, and the two id lists are concatenated (never re-tokenised as one string,
//! which can merge tokens across the boundary).
//!
//! Rows are [`Episode`]s: spans with roles, flattened into one sequence and scored in one forward
//! pass, with per-role masks over the targets. A (prompt, completion) pair is the one-span case
//! (`[Prompt, Assistant]`), so [`CompletionBatch`] is built from an [`EpisodeBatch`].

use candle_core::{Device, Tensor, D};

use crate::batch::TokenBatch;
use crate::episode::{Episode, Role};
use crate::error::{LmError, Result};
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;

/// Encode a (prompt, completion) pair TRL's way. An empty prompt is an error: the first completion
/// token would have no context to be scored against.
pub fn encode_pair(
    tok: &Tokenizer,
    prompt: &str,
    completion: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let p = tok.encode(prompt, true)?;
    if p.is_empty() {
        return Err(LmError::Invalid(
            "empty prompt: a completion needs at least one prompt token".into(),
        ));
    }
    let c = tok.encode(completion, false)?;
    Ok((p, c))
}

/// log p(target | logits / temperature) for every position: logits (b, t, v), targets (b, t) u32
/// -> (b, t). For f32 on the CPU this is one fused op (with a backward) that never materialises
/// the (b, t, v) log-softmax; otherwise it is composed from differentiable tensor ops.
pub fn gather_logprobs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let dims = logits.dims();
    if let Some((&v, lead)) = dims.split_last() {
        if crate::fused::supported(logits)
            && targets.dims() == lead
            && temperature > 0.0
            && temperature.is_finite()
        {
            let n = lead.iter().product::<usize>();
            let flat = crate::fused::token_logprobs(
                &logits.reshape((n, v))?,
                &targets.flatten_all()?,
                temperature,
            )?;
            return Ok(flat.reshape(lead)?);
        }
    }
    let logits = if temperature != 1.0 {
        (logits / temperature)?
    } else {
        logits.clone()
    };
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let index = targets.contiguous()?.unsqueeze(D::Minus1)?;
    Ok(logp
        .contiguous()?
        .gather(&index, D::Minus1)?
        .squeeze(D::Minus1)?)
}

/// Per-token log-probs of every next token: (b, t - 1), entry i = log p(ids[i + 1] | ids[..=i]).
/// Entries whose target is padding are whatever the model says; mask them.
pub fn next_token_logprobs(model: &Llama, batch: &TokenBatch, temperature: f64) -> Result<Tensor> {
    let (_, t) = batch.dims();
    if t < 2 {
        return Err(LmError::Invalid(
            "need at least two tokens to score a next token".into(),
        ));
    }
    let hidden = model.hidden_states(&batch.ids, &batch.positions, &batch.mask, None)?;
    // Contiguous first: a strided input sends candle's Linear down its slow broadcast-matmul path,
    // whose backward materialises per-batch weight gradients.
    let logits = model.logits(&hidden.narrow(1, 0, t - 1)?.contiguous()?)?;
    gather_logprobs(&logits, &batch.ids.narrow(1, 1, t - 1)?, temperature)
}

/// Per-token log-probs at the target indices where `mask` (b, t - 1) is nonzero, zero elsewhere:
/// the same numbers as `next_token_logprobs(..) * mask` for a 0/1 mask, but the LM head and the
/// log-softmax run only on the selected positions (the vocabulary projection is a fifth of a
/// SmolLM2 training step's FLOPs, and its (rows, vocab) logits and their gradient the largest
/// tensors in it), so prompt and padding positions cost nothing there. A right-padded batch whose
/// selected targets are all real tokens runs packed ([`TokenBatch::pack`]): rows of different
/// lengths share rows of the model's input, and the padding between them is not computed.
pub fn masked_next_token_logprobs(
    model: &Llama,
    batch: &TokenBatch,
    mask: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let (b, t) = batch.dims();
    if t < 2 {
        return Err(LmError::Invalid(
            "need at least two tokens to score a next token".into(),
        ));
    }
    let width = t - 1;
    if mask.dims() != [b, width] {
        return Err(LmError::Invalid(format!(
            "target mask is {:?}, the batch has {b} rows of {width} targets",
            mask.dims()
        )));
    }
    let keep = mask
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let selected: Vec<u32> = (0..b * width)
        .filter(|&j| keep[j] != 0.0)
        .map(|j| j as u32)
        .collect();
    let n = selected.len();
    // Rows of different lengths run packed end to end (`TokenBatch::pack`) when every selected
    // target is a real token of its row: the same hidden states for the real tokens, fewer rows.
    let packed = match batch.right_padded_lengths() {
        Some(lengths)
            if n > 0
                && selected
                    .iter()
                    .all(|&j| (j as usize % width) + 1 < lengths[j as usize / width]) =>
        {
            batch.pack(&lengths, batch.ids.device())?
        }
        _ => None,
    };
    let (hidden_sel, targets) = if let Some(p) = packed {
        let hidden = model.hidden_states(&p.ids, &p.positions, &p.mask, None)?;
        let (bins, _, h) = hidden.dims3()?;
        let device = hidden.device().clone();
        let (at, targets): (Vec<u32>, Vec<u32>) = selected
            .iter()
            .map(|&j| {
                let (r, c) = (j as usize / width, j as usize % width);
                let (bin, off) = p.place[r];
                ((bin * t + off + c) as u32, batch.ids_host[r][c + 1])
            })
            .unzip();
        let hidden_sel = hidden
            .reshape((bins * t, h))?
            .index_select(&Tensor::from_vec(at, n, &device)?, 0)?; // (n, h)
        (hidden_sel, Tensor::from_vec(targets, n, &device)?)
    } else {
        let hidden = model.hidden_states(&batch.ids, &batch.positions, &batch.mask, None)?;
        if n == 0 {
            return Ok(Tensor::zeros((b, width), hidden.dtype(), hidden.device())?);
        }
        let rows = Tensor::from_vec(selected.clone(), n, hidden.device())?;
        let h = hidden.dim(D::Minus1)?;
        let hidden_sel = hidden
            .narrow(1, 0, width)?
            .contiguous()?
            .reshape((b * width, h))?
            .index_select(&rows, 0)?; // (n, h)
        let targets = batch
            .ids
            .narrow(1, 1, width)?
            .contiguous()?
            .flatten_all()?
            .index_select(&rows, 0)?; // (n,)
        (hidden_sel, targets)
    };
    let dtype = hidden_sel.dtype();
    let device = hidden_sel.device().clone();
    // (n,) log-probs, then back to (b, t - 1): every unselected index reads the appended zero.
    let lp = gather_logprobs(&model.logits(&hidden_sel)?, &targets, temperature)?;
    let mut place = vec![n as u32; b * width];
    for (k, &j) in selected.iter().enumerate() {
        place[j as usize] = k as u32;
    }
    let place = Tensor::from_vec(place, b * width, &device)?;
    let padded = Tensor::cat(&[&lp, &Tensor::zeros(1, dtype, &device)?], 0)?;
    let lp = padded.index_select(&place, 0)?.reshape((b, width))?;
    // Scale by the mask's values (1 for a 0/1 mask), as `next_token_logprobs(..) * mask` would.
    if keep.iter().all(|&m| m == 0.0 || m == 1.0) {
        Ok(lp)
    } else {
        Ok(lp.broadcast_mul(&mask.to_dtype(dtype)?)?)
    }
}

/// A right-padded batch of episodes with per-role masks over the targets.
/// Target index j of a row predicts token j + 1 (the layout of [`next_token_logprobs`]).
pub struct EpisodeBatch {
    /// ids, positions and attention mask, (b, t), right-padded.
    pub tokens: TokenBatch,
    /// (b, t - 1) f32: 1 where the target is a real token (any role), 0 where it is padding.
    pub target_mask: Tensor,
    /// (b, t - 1) f32: 1 where the target is an assistant token.
    pub assistant_mask: Tensor,
    /// (b, t - 1) f32: 1 where the target is a user token.
    pub user_mask: Tensor,
    /// Host copy: per row, the role of each target index (length = that row's tokens - 1).
    pub roles: Vec<Vec<Role>>,
}

impl EpisodeBatch {
    pub fn new(episodes: &[Episode], pad: u32, device: &Device) -> Result<Self> {
        if episodes.is_empty() {
            return Err(LmError::Invalid("no episodes to score".into()));
        }
        for (i, e) in episodes.iter().enumerate() {
            e.validate()
                .map_err(|err| LmError::Invalid(format!("episode {i}: {err}")))?;
        }
        let rows: Vec<Vec<u32>> = episodes.iter().map(Episode::ids).collect();
        let tokens = TokenBatch::right_padded(&rows, pad, device)?;
        let roles: Vec<Vec<Role>> = episodes.iter().map(Episode::target_roles).collect();
        let b = episodes.len();
        // A batch of one-token rows still gets a one-column mask (all zeros).
        let width = tokens.dims().1.saturating_sub(1).max(1);
        let mask_of = |keep: &dyn Fn(Role) -> bool| -> Result<Tensor> {
            let mut m = vec![0f32; b * width];
            for (r, row) in roles.iter().enumerate() {
                for (j, &role) in row.iter().enumerate() {
                    if keep(role) {
                        m[r * width + j] = 1.0;
                    }
                }
            }
            Ok(Tensor::from_vec(m, (b, width), device)?)
        };
        Ok(EpisodeBatch {
            target_mask: mask_of(&|_| true)?,
            assistant_mask: mask_of(&|r| r == Role::Assistant)?,
            user_mask: mask_of(&|r| r == Role::User)?,
            tokens,
            roles,
        })
    }

    /// Per-token values of each row's `role` targets (in order) placed at their target indices,
    /// zero elsewhere: `(b, t - 1)` f32, aligned with [`episode_logprobs`]. E.g. the log-probs
    /// the sampler reported for the assistant turns.
    pub fn scatter(&self, role: Role, rows: &[&[f32]]) -> Result<Tensor> {
        let (b, width) = self.target_mask.dims2()?;
        if rows.len() != b {
            return Err(LmError::Invalid(format!(
                "scatter: {} rows for a batch of {b}",
                rows.len()
            )));
        }
        let mut out = vec![0f32; b * width];
        for (r, (roles, values)) in self.roles.iter().zip(rows).enumerate() {
            let at: Vec<usize> = (0..roles.len()).filter(|&j| roles[j] == role).collect();
            if at.len() != values.len() {
                return Err(LmError::Invalid(format!(
                    "scatter: row {r} has {} values for {} {role:?} tokens",
                    values.len(),
                    at.len()
                )));
            }
            for (j, &v) in at.into_iter().zip(values.iter()) {
                out[r * width + j] = v;
            }
        }
        Ok(Tensor::from_vec(
            out,
            (b, width),
            self.target_mask.device(),
        )?)
    }
}

/// Per-token log-probs of every real target of every episode, (b, t - 1), zero where the target
/// is padding. Select roles with the batch's masks (`assistant_mask`, `user_mask`).
pub fn episode_logprobs(model: &Llama, batch: &EpisodeBatch, temperature: f64) -> Result<Tensor> {
    masked_next_token_logprobs(model, &batch.tokens, &batch.target_mask, temperature)
}

/// A right-padded batch of prompt + completion rows, with a mask over the completion tokens:
/// the one-span case of [`EpisodeBatch`] (each row is `[Prompt, Assistant]`).
pub struct CompletionBatch {
    pub tokens: TokenBatch,
    /// (b, t - 1) f32: 1 where the target at that index is a completion token.
    pub completion_mask: Tensor,
    /// Per row, the range of target indices holding the completion's tokens.
    pub spans: Vec<std::ops::Range<usize>>,
}

impl CompletionBatch {
    pub fn new(pairs: &[(Vec<u32>, Vec<u32>)], pad: u32, device: &Device) -> Result<Self> {
        if pairs.is_empty() {
            return Err(LmError::Invalid(
                "no (prompt, completion) pairs to score".into(),
            ));
        }
        if let Some(i) = pairs.iter().position(|(p, _)| p.is_empty()) {
            return Err(LmError::Invalid(format!("pair {i}: empty prompt")));
        }
        let episodes: Vec<Episode> = pairs
            .iter()
            .map(|(p, c)| Episode::single_turn(p.clone(), c.clone()))
            .collect();
        let batch = EpisodeBatch::new(&episodes, pad, device)?;
        let spans = pairs
            .iter()
            .map(|(p, c)| (p.len() - 1)..(p.len() - 1 + c.len()))
            .collect();
        Ok(CompletionBatch {
            tokens: batch.tokens,
            completion_mask: batch.assistant_mask,
            spans,
        })
    }
}

/// Per-token completion log-probs, (b, t - 1), zero outside each row's completion.
/// With a trainable model this is differentiable; the loss code sums or averages it.
pub fn completion_logprobs(
    model: &Llama,
    batch: &CompletionBatch,
    temperature: f64,
) -> Result<Tensor> {
    masked_next_token_logprobs(model, &batch.tokens, &batch.completion_mask, temperature)
}

/// Host copy of each row's completion log-probs (only the completion tokens).
pub fn per_row(logprobs: &Tensor, batch: &CompletionBatch) -> Result<Vec<Vec<f32>>> {
    let all = logprobs.to_vec2::<f32>()?;
    Ok(all
        .into_iter()
        .zip(&batch.spans)
        .map(|(row, span)| row[span.clone()].to_vec())
        .collect())
}

/// Score (prompt, completion) id pairs without gradients, in chunks of `batch_size` rows.
pub fn score_pairs(
    model: &Llama,
    pairs: &[(Vec<u32>, Vec<u32>)],
    pad: u32,
    batch_size: usize,
    temperature: f64,
) -> Result<Vec<Vec<f32>>> {
    let frozen = model.detached();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch_size.max(1)) {
        let batch = CompletionBatch::new(chunk, pad, model.device())?;
        let lp = completion_logprobs(&frozen, &batch, temperature)?;
        out.extend(per_row(&lp, &batch)?);
    }
    Ok(out)
}
