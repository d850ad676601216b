//! Sampling completions for a list of prompts in batches, keeping what every consumer needs
//! (prompt and completion text and ids, the sampler's log-probs): rollouts, labelled pairs, judges,
//! best-of-n and evaluation all draw through here.

use rlhf_lm::generate::{generate, SamplingParams};
use rlhf_lm::llama::Llama;
use rlhf_lm::Result;
use rlhf_lm::Tokenizer;
use serde::{Deserialize, Serialize};

/// One sampled completion with everything the judges need.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
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
    // Data parallelism: every rank calls this with the same prompts (evaluations, online DPO's
    // and ReST's sampling run on every rank); each samples a run of whole generation batches, with
    // the random streams those batches get in one process, and all get every sample.
    let world = rlhf_train::dist::world();
    if world.size() == 1 {
        return sample_from_chunk(model, tokenizer, pad_id, prompts, params, batch_size, 0);
    }
    let (first, rows) = world.batch_share(prompts.len(), batch_size);
    let mine = sample_from_chunk(
        model,
        tokenizer,
        pad_id,
        &prompts[rows],
        params,
        batch_size,
        first,
    )?;
    let all: Vec<Vec<Generated>> = world
        .gather_json(&mine)
        .map_err(|e| rlhf_lm::LmError::Invalid(e.to_string()))?;
    Ok(all.concat())
}

/// [`sample`] for the part of a longer list of prompts that starts at generation batch
/// `first_chunk` (a multiple of `batch_size` rows into it): each batch gets the random stream it
/// gets in the whole list, so a data-parallel rank that samples a run of whole batches draws
/// exactly what a single process draws for them.
pub fn sample_from_chunk(
    model: &Llama,
    tokenizer: &Tokenizer,
    pad_id: u32,
    prompts: &[(String, Vec<u32>)],
    params: &SamplingParams,
    batch_size: usize,
    first_chunk: usize,
) -> Result<Vec<Generated>> {
    let mut out = Vec::with_capacity(prompts.len());
    for (chunk_no, chunk) in prompts.chunks(batch_size.max(1)).enumerate() {
        let chunk_no = first_chunk + chunk_no;
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
