//! Preference pairs from a policy's own samples, labelled by the testbed's simulated annotators
//! (Bradley-Terry on the gold reward, labels flipped with probability `noise`), written as TRL
//! pair JSONL (`prompt` / `chosen` / `rejected`).

use std::io::Write;
use std::path::Path;

use rlhf_data::testbed::{Annotator, Task};
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::llama::Llama;
use rlhf_lm::{LmError, Result};

use crate::policy::TrainableLm;
use crate::sampling::sample;

#[derive(Debug, Clone, PartialEq)]
pub struct LabelledPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// Two samples per prompt from `policy`, labelled by `annotator`. Identical or empty samples are
/// skipped.
pub fn sample_and_label(
    policy: &Llama,
    lm: &TrainableLm,
    task: &dyn Task,
    prompts: &[String],
    annotator: &mut Annotator,
    params: &SamplingParams,
) -> Result<Vec<LabelledPair>> {
    let mut doubled: Vec<(String, Vec<u32>)> = Vec::with_capacity(2 * prompts.len());
    for p in prompts {
        let ids = lm.encode_prompt(p, 256)?;
        doubled.push((p.clone(), ids.clone()));
        doubled.push((p.clone(), ids));
    }
    let samples = sample(policy, &lm.tokenizer, lm.pad_id, &doubled, params, 64)?;
    let mut out = Vec::new();
    for pair in samples.chunks(2) {
        let (a, b) = (&pair[0], &pair[1]);
        // Identical samples carry no preference; an empty one is not a valid pair record.
        if a.completion == b.completion
            || a.completion.trim().is_empty()
            || b.completion.trim().is_empty()
        {
            continue;
        }
        let a_wins = annotator.prefer(task, &a.prompt, &a.completion, &b.completion);
        let (chosen, rejected) = if a_wins { (a, b) } else { (b, a) };
        out.push(LabelledPair {
            prompt: a.prompt.clone(),
            chosen: format!(" {}", chosen.completion),
            rejected: format!(" {}", rejected.completion),
        });
    }
    Ok(out)
}

pub fn write_pairs(path: &Path, pairs: &[LabelledPair]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| LmError::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    for p in pairs {
        let v = serde_json::json!({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected});
        writeln!(w, "{v}").map_err(|e| LmError::io(path, e))?;
    }
    w.flush().map_err(|e| LmError::io(path, e))
}
