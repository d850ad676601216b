//! Best-of-n: sample n completions from a policy and keep the one the reward model likes best.
//! The inference-time baseline of AlpacaFarm's table (its best n was about 16).

use rlhf_lm::generate::SamplingParams;
use rlhf_lm::llama::Llama;
use rlhf_lm::Result;
use rlhf_lm::Tokenizer;

use crate::reward::RewardModel;
use crate::sampling::{sample, Generated};

/// For each prompt, the best of `n` samples by reward-model score.
pub fn best_of_n(
    policy: &Llama,
    tokenizer: &Tokenizer,
    pad_id: u32,
    prompts: &[(String, Vec<u32>)],
    n: usize,
    params: &SamplingParams,
    reward_model: &RewardModel,
    batch_size: usize,
) -> Result<Vec<Generated>> {
    // n copies of each prompt, sampled together; candidate j of prompt i sits at i * n + j.
    let repeated: Vec<(String, Vec<u32>)> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), n.max(1)))
        .collect();
    let candidates = sample(policy, tokenizer, pad_id, &repeated, params, batch_size)?;
    let rows: Vec<(Vec<u32>, Vec<u32>)> = candidates
        .iter()
        .map(|g| (g.prompt_ids.clone(), g.completion_ids.clone()))
        .collect();
    let scores = reward_model.score_raw(&rows, batch_size)?;
    Ok(candidates
        .chunks(n.max(1))
        .zip(scores.chunks(n.max(1)))
        .map(|(cands, s)| {
            let best = s
                .iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > s[b] { i } else { b });
            cands[best].clone()
        })
        .collect())
}

/// KL(best-of-n || base) <= log n - (n - 1) / n (Stiennon et al.'s analytic value); reported for
/// best-of-n instead of a sample estimate, which its log-probs cannot give.
pub fn kl_bound(n: usize) -> f64 {
    let n = n.max(1) as f64;
    n.ln() - (n - 1.0) / n
}
