//! Supervised fine-tuning: next-token NLL on the completion tokens only (prompt and padding
//! masked), averaged over the completion tokens of the batch, as TRL's SFTTrainer with
//! `completion_only_loss`. EOS is appended to every completion so the model learns to stop.

use std::path::PathBuf;

use candle_core::Device;
use rlhf_data::loaders::{load_prompt_completion, LoadOptions};
use rlhf_lm::score::{completion_logprobs, CompletionBatch};
use rlhf_train::Result;
use serde::{Deserialize, Serialize};

use crate::policy::TrainableLm;
use crate::trainer::{epoch_order, OptimConfig, Trainer};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Model to fine-tune: an HF directory or a .gguf file.
    pub model: PathBuf,
    /// JSONL/Parquet with `prompt`/`completion` or `messages`.
    pub train_file: PathBuf,
    pub eval_file: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    /// Longest row (prompt + completion) in tokens; longer rows are cut.
    pub max_len: usize,
    pub eval_every: u64,
    pub save_every: u64,
    pub log_every: u64,
    pub seed: u64,
    pub skip_bad_lines: bool,
    pub optim: OptimConfig,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            model: PathBuf::new(),
            train_file: PathBuf::new(),
            eval_file: None,
            output_dir: PathBuf::from("runs/sft"),
            epochs: 1,
            batch_size: 8,
            max_len: 512,
            eval_every: 0,
            save_every: 200,
            log_every: 10,
            seed: 0,
            skip_bad_lines: false,
            optim: OptimConfig {
                lr: 2e-5,
                ..OptimConfig::default()
            },
        }
    }
}

/// Tokenised (prompt, completion + EOS) rows from a data file.
pub fn load_rows(
    lm: &TrainableLm,
    path: &std::path::Path,
    max_len: usize,
    skip_bad_lines: bool,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let loaded = load_prompt_completion(
        path,
        lm.chat_template.as_ref(),
        &LoadOptions { skip_bad_lines },
    )?;
    if !loaded.skipped.is_empty() {
        eprintln!(
            "{}: skipped {} bad lines",
            path.display(),
            loaded.skipped.len()
        );
    }
    if loaded.items.is_empty() {
        return Err(rlhf_train::TrainError::bad_file(path, "no examples"));
    }
    Ok(loaded
        .items
        .iter()
        .map(|ex| lm.encode(&ex.prompt, &ex.completion, true, max_len))
        .collect::<rlhf_lm::Result<_>>()?)
}

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

/// Evaluation loss (mean NLL per completion token) without gradients.
pub fn eval_loss(
    lm: &TrainableLm,
    rows: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let frozen = rlhf_lm::llama::Llama::from_weights(&lm.config, &lm.snapshot()?, device)?;
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in rows.chunks(batch_size.max(1)) {
        let batch = CompletionBatch::new(chunk, lm.pad_id, device)?;
        let lp = completion_logprobs(&frozen, &batch, 1.0)?;
        total -= lp.sum_all()?.to_scalar::<f32>()? as f64;
        count += chunk.iter().map(|(_, c)| c.len()).sum::<usize>();
    }
    Ok(total / count.max(1) as f64)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftSummary {
    pub steps: u64,
    pub final_train_loss: f64,
    pub eval_loss: Option<f64>,
}

/// Run SFT as configured; the fine-tuned model is written to `<output_dir>/model`.
pub fn run(cfg: &SftConfig, resume: bool, device: &Device) -> Result<SftSummary> {
    let mut lm = TrainableLm::load(&cfg.model, device)?;
    let train = load_rows(&lm, &cfg.train_file, cfg.max_len, cfg.skip_bad_lines)?;
    let eval = match &cfg.eval_file {
        Some(p) => Some(load_rows(&lm, p, cfg.max_len, cfg.skip_bad_lines)?),
        None => None,
    };
    let batch_size = cfg.batch_size.max(1);
    let per_epoch = train.len().div_ceil(batch_size) as u64;
    let total = per_epoch * cfg.epochs as u64;
    let mut trainer = Trainer::start(&cfg.output_dir, cfg, &lm, &cfg.optim, total, resume)?;
    let mut last_loss = f64::NAN;
    let progress = rlhf_train::progress(total, "sft");
    progress.set_position(trainer.step);
    while trainer.step < total {
        let epoch = trainer.step / per_epoch;
        let order = epoch_order(train.len(), cfg.seed, epoch);
        let first = (trainer.step % per_epoch) as usize * batch_size;
        for idx in order[first..].chunks(batch_size) {
            let started = std::time::Instant::now();
            let rows: Vec<_> = idx.iter().map(|&i| train[i].clone()).collect();
            // Gradient accumulation: micro-batches whose losses add up to the token-mean NLL of
            // the whole batch, so the update does not depend on how the batch is split.
            let n_tokens: usize = rows.iter().map(|(_, c)| c.len()).sum();
            let micro = rows.len().div_ceil(cfg.optim.grad_accum.max(1));
            let mut acc = trainer.accumulator();
            let mut loss_sum = 0.0;
            for part in rows.chunks(micro.max(1)) {
                let loss = (nll_sum(&lm, part, device)? / n_tokens.max(1) as f64)?;
                loss_sum += loss.to_scalar::<f32>()? as f64;
                acc.add(loss.backward()?)?;
            }
            let stats = trainer.apply(acc.finish())?;
            last_loss = loss_sum;
            let step = trainer.step;
            if step % cfg.log_every.max(1) == 0 || step == total {
                let secs = started.elapsed().as_secs_f64();
                trainer.log(&[
                    ("loss", loss_sum),
                    ("lr", stats.lr),
                    ("grad_norm", stats.grad_norm),
                    ("epoch", step as f64 / per_epoch as f64),
                    ("tokens_per_s", n_tokens as f64 / secs.max(1e-9)),
                ])?;
            }
            if let Some(eval) = &eval {
                if cfg.eval_every > 0 && step % cfg.eval_every == 0 {
                    let l = eval_loss(&lm, eval, batch_size * 2, device)?;
                    trainer.log(&[("eval_loss", l)])?;
                }
            }
            if cfg.save_every > 0 && step % cfg.save_every == 0 && step < total {
                trainer.checkpoint(&lm, serde_json::json!({}))?;
            }
            progress.set_position(step);
            progress.set_message(format!("loss {loss_sum:.3}"));
            if trainer.step >= total {
                break;
            }
        }
    }
    progress.finish_and_clear();
    let eval_loss = match &eval {
        Some(e) => {
            let l = eval_loss(&lm, e, batch_size * 2, device)?;
            trainer.log(&[("eval_loss", l)])?;
            Some(l)
        }
        None => None,
    };
    lm.generation.max_new_tokens.get_or_insert(64);
    trainer.finish(&lm)?;
    Ok(SftSummary {
        steps: trainer.step,
        final_train_loss: last_loss,
        eval_loss,
    })
}
