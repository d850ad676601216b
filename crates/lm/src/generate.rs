//! Batched sampling with a KV cache.
//!
//! Prompts are left-padded so every row's next token sits in the last column. Each sampled token
//! comes with its log-prob under `softmax(logits / temperature)` (temperature 1 for greedy), taken
//! before top-k / top-p truncation: exactly what [`crate::score`] computes for the same tokens at
//! the same temperature, so rollouts and training see the same numbers.

use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::batch::TokenBatch;
use crate::error::{LmError, Result};
use crate::llama::{Cache, Llama, MASKED};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Generation stops after the token that completes any of these strings.
    pub stop_strings: Vec<String>,
    pub eos_token_ids: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_strings: Vec::new(),
            eos_token_ids: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams {
            max_new_tokens,
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// The temperature the reported log-probs are taken at.
    pub fn logprob_temperature(&self) -> f64 {
        if self.temperature > 0.0 {
            self.temperature
        } else {
            1.0
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(LmError::Invalid(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(LmError::Invalid(format!(
                    "top_p must be in (0, 1], got {p}"
                )));
            }
        }
        if self.top_k == Some(0) {
            return Err(LmError::Invalid("top_k must be >= 1".into()));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    StopString,
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Sampled tokens, including the EOS token or the token that completed a stop string.
    pub tokens: Vec<u32>,
    /// Log-prob of each sampled token (see the module docs for which distribution).
    pub logprobs: Vec<f32>,
    pub finish: FinishReason,
}

/// Draw one token from a row of logits, with `u` uniform in [0, 1) (unused when greedy). Returns
/// (token, its log-prob at `temperature`).
fn sample_row(logits: &[f32], p: &SamplingParams, u: f64) -> (u32, f32) {
    let t = p.logprob_temperature() as f32;
    let scaled: Vec<f32> = logits.iter().map(|&x| x / t).collect();
    let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // exp(x - max) once per token: the normaliser and the inverse CDF below both use it.
    let mut exps: Vec<f32> = scaled.iter().map(|&x| x - max).collect();
    crate::math::exp_in_place(&mut exps);
    let sum_exp: f64 = exps.iter().map(|&e| e as f64).sum();
    let log_z = max + sum_exp.ln() as f32;
    let token = if p.temperature == 0.0 {
        // First index of the maximum, as torch.argmax does.
        let mut best = 0;
        for (i, &x) in logits.iter().enumerate() {
            if x > logits[best] {
                best = i;
            }
        }
        best
    } else if p.top_k.is_none() && p.top_p.is_none() {
        // Plain sampling: inverse CDF in index order, no sort (the vocabulary can be 50k+).
        let mut u = u * sum_exp;
        let mut chosen = scaled.len() - 1;
        for (i, &q) in exps.iter().enumerate() {
            let q = q as f64;
            if u < q {
                chosen = i;
                break;
            }
            u -= q;
        }
        chosen
    } else {
        // Candidates sorted by probability; truncate by top-k, then by top-p (HF's order).
        let mut order: Vec<usize> = (0..scaled.len()).collect();
        let k = p.top_k.unwrap_or(scaled.len()).min(scaled.len());
        if k < scaled.len() {
            order.select_nth_unstable_by(k - 1, |&a, &b| scaled[b].total_cmp(&scaled[a]));
            order.truncate(k);
        }
        order.sort_unstable_by(|&a, &b| scaled[b].total_cmp(&scaled[a]).then(a.cmp(&b)));
        let mut probs: Vec<f64> = order.iter().map(|&i| exps[i] as f64).collect();
        if let Some(top_p) = p.top_p {
            let total: f64 = probs.iter().sum();
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (n, q) in probs.iter().enumerate() {
                cum += q / total;
                if cum >= top_p {
                    keep = n + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = u * total;
        let mut chosen = order[order.len() - 1];
        for (n, q) in probs.iter().enumerate() {
            if u < *q {
                chosen = order[n];
                break;
            }
            u -= q;
        }
        chosen
    };
    (token as u32, scaled[token] - log_z)
}

/// The distinct prompts in order of first appearance, and for each row the index of its prompt
/// among them.
fn distinct_prompts(prompts: &[Vec<u32>]) -> (Vec<Vec<u32>>, Vec<usize>) {
    let mut index: std::collections::HashMap<&[u32], usize> = std::collections::HashMap::new();
    let mut distinct = Vec::new();
    let source = prompts
        .iter()
        .map(|p| {
            *index.entry(p.as_slice()).or_insert_with(|| {
                distinct.push(p.clone());
                distinct.len() - 1
            })
        })
        .collect();
    (distinct, source)
}

/// Generate continuations for each prompt (token ids). `tokenizer` is needed only for stop strings.
pub fn generate(
    model: &Llama,
    prompts: &[Vec<u32>],
    pad_id: u32,
    params: &SamplingParams,
    tokenizer: Option<&Tokenizer>,
) -> Result<Vec<Sample>> {
    generate_with(model, prompts, pad_id, params, tokenizer, &mut |_, _| {})
}

/// [`generate`], calling `on_token(row, token)` as each token is sampled (a server streams them
/// as they come). The samples are the same as [`generate`]'s.
pub fn generate_with(
    model: &Llama,
    prompts: &[Vec<u32>],
    pad_id: u32,
    params: &SamplingParams,
    tokenizer: Option<&Tokenizer>,
    on_token: &mut (dyn FnMut(usize, u32) + Send),
) -> Result<Vec<Sample>> {
    // A decode step makes a handful of parallel products per layer, each well under a millisecond.
    // Called from outside the thread pool, each of them hands its work to the pool's threads and
    // sleeps until they are done: every product then pays for waking the workers and for being
    // woken. Run on one of the pool's threads instead, which works on its share itself and wakes
    // only the others (best of 3 at batch 8 on 2 threads: 3.38 s against 3.61 s).
    if rayon::current_thread_index().is_none() {
        let run = || generate_in_pool(model, prompts, pad_id, params, tokenizer, on_token);
        return rayon::join(run, || ()).0;
    }
    generate_in_pool(model, prompts, pad_id, params, tokenizer, on_token)
}

/// [`generate_with`] on a thread of the pool.
fn generate_in_pool(
    model: &Llama,
    prompts: &[Vec<u32>],
    pad_id: u32,
    params: &SamplingParams,
    tokenizer: Option<&Tokenizer>,
    on_token: &mut (dyn FnMut(usize, u32) + Send),
) -> Result<Vec<Sample>> {
    params.validate()?;
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(LmError::Invalid(format!("prompt {i} is empty")));
    }
    if !params.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(LmError::Invalid("stop strings need a tokenizer".into()));
    }
    let mut samples: Vec<Sample> = prompts
        .iter()
        .map(|_| Sample {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: FinishReason::Length,
        })
        .collect();
    if params.max_new_tokens == 0 {
        return Ok(samples);
    }
    let model = model.detached();
    // The weights do not change until this returns: products over more rows than a memory-bound
    // step has read packed copies of them, made once here (crate::skinny).
    let _packed = crate::skinny::PackedScope::for_rows(prompts.len());
    let device = model.device().clone();
    let batch = TokenBatch::left_padded(prompts, pad_id, &device)?;
    let (b, t0) = batch.dims();
    let mut cache = Cache::new(model.config.num_hidden_layers, t0 + params.max_new_tokens);
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    // Which key columns are real; generated columns are always real.
    let mut key_real: Vec<Vec<bool>> = batch.real.clone();
    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut done = vec![false; b];

    // Prefill. Rows with the same prompt (k samples per prompt in RLOO, GRPO, best-of-n) run it
    // once: the distinct prompts go through the model and their cache rows are copied to every
    // row that shares them. Padding is to the same longest prompt, so the cache is exactly the
    // one the whole batch would have made.
    let (distinct, source) = distinct_prompts(prompts);
    let shared = distinct.len() < b && model.uses_host_cache();
    let prefill = if shared {
        TokenBatch::left_padded(&distinct, pad_id, &device)?
    } else {
        batch
    };
    let hidden = model.hidden_states(
        &prefill.ids,
        &prefill.positions,
        &prefill.mask,
        Some(&mut cache),
    )?;
    let mut logits = model
        .logits(&hidden.narrow(1, t0 - 1, 1)?)?
        .squeeze(1)?
        .to_vec2::<f32>()?;
    if shared {
        cache.select_rows(&source)?;
        logits = source.iter().map(|&u| logits[u].clone()).collect();
    }

    // `live[i]`: the sample row in row i of the cache and of `logits`. Finished rows leave the batch
    // (their cache rows are dropped) once a quarter of it has finished, so the remaining steps
    // stop paying for them; until then they ride along on padding.
    let mut live: Vec<usize> = (0..b).collect();
    for step in 0..params.max_new_tokens {
        // One uniform draw per unfinished row, in row order (the same stream whatever the
        // threading or compaction), then the rows' softmax and draw in parallel.
        let draws: Vec<Option<f64>> = live
            .iter()
            .map(|&r| (!done[r] && params.temperature > 0.0).then(|| rng.random::<f64>()))
            .collect();
        let picked: Vec<Option<(u32, f32)>> = logits
            .par_iter()
            .zip(&draws)
            .zip(&live)
            .map(|((row, u), &r)| (!done[r]).then(|| sample_row(row, params, u.unwrap_or(0.0))))
            .collect();
        let mut step_ids = vec![pad_id; live.len()];
        for (i, &r) in live.iter().enumerate() {
            let Some((tok, lp)) = picked[i] else {
                continue;
            };
            step_ids[i] = tok;
            on_token(r, tok);
            let s = &mut samples[r];
            s.tokens.push(tok);
            s.logprobs.push(lp);
            if params.eos_token_ids.contains(&tok) {
                s.finish = FinishReason::Eos;
                done[r] = true;
            } else if let Some(tk) = tokenizer.filter(|_| !params.stop_strings.is_empty()) {
                let text = tk.decode(&s.tokens, false)?;
                if params
                    .stop_strings
                    .iter()
                    .any(|st| text.contains(st.as_str()))
                {
                    s.finish = FinishReason::StopString;
                    done[r] = true;
                }
            }
        }
        if done.iter().all(|&d| d) || step + 1 == params.max_new_tokens {
            break;
        }
        let keep: Vec<usize> = (0..live.len()).filter(|&i| !done[live[i]]).collect();
        if model.uses_host_cache() && keep.len() * 4 <= live.len() * 3 {
            cache.select_rows(&keep)?;
            step_ids = keep.iter().map(|&i| step_ids[i]).collect();
            live = keep.iter().map(|&i| live[i]).collect();
        }
        let n = live.len();
        let s_len = key_real[0].len() + 1;
        let mut mask = vec![MASKED; n * s_len];
        for row in key_real.iter_mut() {
            row.push(true);
        }
        for (i, &r) in live.iter().enumerate() {
            for (j, &real) in key_real[r].iter().enumerate() {
                if real {
                    mask[i * s_len + j] = 0.0;
                }
            }
        }
        let positions: Vec<u32> = live.iter().map(|&r| next_pos[r]).collect();
        let ids = Tensor::from_vec(step_ids, (n, 1), &device)?;
        let positions = Tensor::from_vec(positions, (n, 1), &device)?;
        let mask = Tensor::from_vec(mask, (n, 1, 1, s_len), &device)?;
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        let hidden = model.hidden_states(&ids, &positions, &mask, Some(&mut cache))?;
        logits = model.logits(&hidden)?.squeeze(1)?.to_vec2::<f32>()?;
    }
    Ok(samples)
}
