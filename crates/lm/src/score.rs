//! Log-prob scoring: the one function every algorithm, rollout and evaluation uses to ask
//! "how likely is this completion under this model?".
//!
//! Tokenisation follows TRL: the prompt is encoded with the tokenizer's special tokens, the
//! completion without, and the two id lists are concatenated (never re-tokenised as one string,
//! which can merge tokens across the boundary).

use candle_core::{Device, Tensor, D};

use crate::batch::TokenBatch;
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

/// A right-padded batch of prompt + completion rows, with a mask over the completion tokens.
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
        let rows: Vec<Vec<u32>> = pairs
            .iter()
            .map(|(p, c)| [p.as_slice(), c.as_slice()].concat())
            .collect();
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(2);
        let tokens = TokenBatch::right_padded(&rows, pad, device)?;
        let (_, t_batch) = tokens.dims();
        debug_assert!(t_batch <= t);
        let width = t_batch.saturating_sub(1).max(1);
        let mut mask = vec![0f32; pairs.len() * width];
        let mut spans = Vec::with_capacity(pairs.len());
        for (r, (p, c)) in pairs.iter().enumerate() {
            let span = (p.len() - 1)..(p.len() - 1 + c.len());
            for i in span.clone() {
                mask[r * width + i] = 1.0;
            }
            spans.push(span);
        }
        Ok(CompletionBatch {
            tokens,
            completion_mask: Tensor::from_vec(mask, (pairs.len(), width), device)?,
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
    let lp = next_token_logprobs(model, &batch.tokens, temperature)?;
    Ok(lp.broadcast_mul(&batch.completion_mask.to_dtype(lp.dtype())?)?)
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
