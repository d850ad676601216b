//! Reward models: the LM trunk plus a scalar head read at the last non-pad token, saved as a
//! Hugging Face `*ForSequenceClassification` directory with `num_labels = 1`, plus the
//! normalisation statistics (mean/std of its scores on the reference policy's samples).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rlhf_lm::batch::TokenBatch;
use rlhf_lm::llama::{Llama, ScalarHead};
use rlhf_lm::pretrained::SaveExtras;
use rlhf_lm::Result;
use rlhf_lm::{LmError, Pretrained, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::policy::TrainableLm;

pub const HEAD: &str = "score.weight";
pub const NORM_FILE: &str = "reward_normalization.json";

/// Scores are reported as (raw - mean) / std, so the reference policy's samples score ~N(0, 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RewardNorm {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl RewardNorm {
    pub fn from_scores(scores: &[f64]) -> Self {
        let n = scores.len().max(1) as f64;
        let mean = scores.iter().sum::<f64>() / n;
        let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n;
        RewardNorm {
            mean,
            std: var.sqrt().max(1e-6),
            n: scores.len(),
        }
    }
    pub fn apply(&self, raw: f64) -> f64 {
        (raw - self.mean) / self.std
    }
}

/// Add a scalar head to a language model's parameters: small random init (seeded).
pub fn add_head(
    weights: &mut HashMap<String, Tensor>,
    hidden: usize,
    seed: u64,
    device: &Device,
) -> Result<()> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let std = 1.0 / (hidden as f64).sqrt();
    let v: Vec<f32> = (0..hidden)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * std) as f32)
        .collect();
    weights.insert(HEAD.into(), Tensor::from_vec(v, (1, hidden), device)?);
    Ok(())
}

/// Index of each row's last real token, (b,) u32.
pub fn last_token_index(batch: &TokenBatch, device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = batch
        .real
        .iter()
        .map(|row| row.iter().rposition(|&r| r).unwrap_or(0) as u32)
        .collect();
    Ok(Tensor::new(idx, device)?)
}

/// Scalar rewards for full rows (prompt + completion), (b,). Differentiable when `model` is.
/// Also returns the hidden states, for losses that reuse them (PPO-max's LM term).
pub fn rewards(model: &Llama, head: &ScalarHead, batch: &TokenBatch) -> Result<(Tensor, Tensor)> {
    let hidden = model.hidden_states(&batch.ids, &batch.positions, &batch.mask, None)?;
    let last = last_token_index(batch, model.device())?;
    Ok((head.at_last_token(&hidden, &last)?, hidden))
}

/// Save a trained reward model (trunk + head + normalisation) as an HF directory.
pub fn save(lm: &TrainableLm, norm: Option<RewardNorm>, dir: &Path) -> Result<()> {
    let mut extras = SaveExtras::default();
    let arch = format!(
        "{}ForSequenceClassification",
        match lm.config.family {
            rlhf_lm::Family::Llama => "Llama",
            rlhf_lm::Family::Mistral => "Mistral",
            rlhf_lm::Family::Qwen2 => "Qwen2",
        }
    );
    extras
        .config_fields
        .insert("architectures".into(), serde_json::json!([arch]));
    extras.config_fields.insert("num_labels".into(), 1.into());
    extras
        .config_fields
        .insert("id2label".into(), serde_json::json!({"0": "LABEL_0"}));
    extras
        .config_fields
        .insert("label2id".into(), serde_json::json!({"LABEL_0": 0}));
    extras
        .config_fields
        .insert("pad_token_id".into(), lm.pad_id.into());
    if let Some(n) = norm {
        extras.files.push((
            NORM_FILE.into(),
            serde_json::to_string_pretty(&n).expect("serialisable"),
        ));
    }
    lm.save_with(dir, &extras)
}

/// A frozen reward model for scoring.
pub struct RewardModel {
    pub model: Llama,
    pub head: ScalarHead,
    pub tokenizer: Tokenizer,
    pub norm: Option<RewardNorm>,
    pub pad_id: u32,
}

/// The normalisation saved beside a reward model in `dir` (`None` when it has none).
pub fn read_norm(dir: &Path) -> Result<Option<RewardNorm>> {
    let path = dir.join(NORM_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| LmError::io(&path, e))?;
    let norm = serde_json::from_str(&text).map_err(|e| LmError::bad_file(&path, e.to_string()))?;
    Ok(Some(norm))
}

impl RewardModel {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_pretrained(&Pretrained::load(path, device)?, device)
    }

    /// A reward model over loaded weights (shared, not copied), with the normalisation saved in
    /// its directory (`p.source`).
    pub fn from_pretrained(p: &Pretrained, device: &Device) -> Result<Self> {
        if !p.weights.contains_key(HEAD) {
            return Err(LmError::bad_file(
                &p.source,
                format!("not a reward model: no `{HEAD}` tensor"),
            ));
        }
        Ok(RewardModel {
            model: p.model(device)?,
            head: ScalarHead::from_weights(&p.weights)?,
            pad_id: p.pad_id(),
            tokenizer: p.tokenizer.clone(),
            norm: read_norm(&p.source)?,
        })
    }

    pub fn from_trainable(
        lm: &TrainableLm,
        norm: Option<RewardNorm>,
        device: &Device,
    ) -> Result<Self> {
        Ok(RewardModel {
            model: lm.frozen_model(device)?,
            head: ScalarHead::from_weights(&lm.snapshot()?)?,
            tokenizer: lm.tokenizer.clone(),
            norm,
            pad_id: lm.pad_id,
        })
    }

    /// Raw scores of (prompt ids, completion ids) rows, in chunks.
    pub fn score_raw(&self, rows: &[(Vec<u32>, Vec<u32>)], batch_size: usize) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(batch_size.max(1)) {
            let full: Vec<Vec<u32>> = chunk
                .iter()
                .map(|(p, c)| [p.as_slice(), c.as_slice()].concat())
                .collect();
            let batch = TokenBatch::right_padded(&full, self.pad_id, self.model.device())?;
            let (r, _) = rewards(&self.model, &self.head, &batch)?;
            out.extend(r.to_vec1::<f32>()?.into_iter().map(|x| x as f64));
        }
        Ok(out)
    }

    /// Scores normalised with the saved statistics (raw when there are none).
    pub fn score(&self, rows: &[(Vec<u32>, Vec<u32>)], batch_size: usize) -> Result<Vec<f64>> {
        let raw = self.score_raw(rows, batch_size)?;
        Ok(match self.norm {
            Some(n) => raw.into_iter().map(|r| n.apply(r)).collect(),
            None => raw,
        })
    }
}
