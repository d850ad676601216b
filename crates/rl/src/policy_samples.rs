//! n samples per prompt from a policy, and the JSONL file that holds them (one line per prompt:
//! `{"prompt": "...", "samples": ["...", ...]}`): what RLP's reward-model refresh reads, whether a
//! pipeline sampled them or a user brings their own.

use std::path::Path;

use candle_core::Device;
use rlhf_lm::generate::SamplingParams;
use rlhf_train::{Result, TrainError};

use crate::policy::TrainableLm;
use crate::sampling::sample;
pub use crate::spg::SampleGroup;

/// `n` samples for each prompt from `lm` (prompts cut to `max_prompt_len` tokens, keeping the end).
pub fn sample_groups(
    lm: &TrainableLm,
    prompts: &[String],
    n: usize,
    params: &SamplingParams,
    max_prompt_len: usize,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<SampleGroup>> {
    let mut rows = Vec::with_capacity(prompts.len() * n);
    for p in prompts {
        let ids = lm.encode_prompt(p, max_prompt_len)?;
        rows.extend(std::iter::repeat_n((p.clone(), ids), n));
    }
    let model = lm.model(device)?.detached();
    let out = sample(&model, &lm.tokenizer, lm.pad_id, &rows, params, batch_size)?;
    Ok(prompts
        .iter()
        .zip(out.chunks(n.max(1)))
        .map(|(p, g)| SampleGroup {
            prompt: p.clone(),
            samples: g.iter().map(|s| s.completion.clone()).collect(),
        })
        .collect())
}

pub fn write_groups(path: &Path, groups: &[SampleGroup]) -> Result<()> {
    rlhf_train::run::write_jsonl(path, groups)
}

/// Read a samples file; every line must hold a `prompt` string and a `samples` list of strings.
pub fn read_groups(path: &Path) -> Result<Vec<SampleGroup>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| TrainError::bad_file(path, format!("line {}: {why}", i + 1));
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(&format!("not JSON ({e})")))?;
        let prompt = v["prompt"]
            .as_str()
            .ok_or_else(|| bad("no `prompt` string"))?;
        let samples = v["samples"]
            .as_array()
            .ok_or_else(|| bad("no `samples` list"))?
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`samples` must hold strings"))?;
        out.push(SampleGroup {
            prompt: prompt.to_string(),
            samples,
        });
    }
    if out.is_empty() {
        return Err(TrainError::bad_file(path, "no prompts with samples"));
    }
    Ok(out)
}
