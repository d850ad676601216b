//! Supervised fine-tuning: next-token NLL on the completion tokens only (prompt and padding
//! masked), averaged over the completion tokens of the batch, as TRL's SFTTrainer with
//! `completion_only_loss`. EOS is appended to every completion so the model learns to stop.

use rlhf_rl::registry::{Entry, Family};
use std::path::PathBuf;

use candle_core::Device;
use rlhf_rl::fit::FitConfig;
use rlhf_rl::fit::{fit, load_with_eval};
use rlhf_rl::objectives::{eval_loss, nll_share};
use rlhf_rl::pairs::load_rows;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::trainer::Trainer;
use rlhf_train::Result;
use serde::{Deserialize, Serialize};

/// The configuration of `rlhf sft`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Model to fine-tune: an HF directory or a .gguf file.
    pub model: PathBuf,
    /// JSONL/Parquet with `prompt`/`completion` or `messages`.
    pub train_file: PathBuf,
    /// Run directory, epochs, batch size, logging, checkpoints, seed, optimiser (shared keys).
    #[serde(flatten)]
    pub fit: FitConfig,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            model: PathBuf::new(),
            train_file: PathBuf::new(),
            fit: FitConfig::with("runs/sft", 2e-5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SftSummary {
    pub steps: u64,
    pub final_train_loss: f64,
    pub eval_loss: Option<f64>,
}

/// Run SFT as configured; the fine-tuned model is written to `<output_dir>/model`.
pub fn run(cfg: &SftConfig, resume: bool, device: &Device) -> Result<SftSummary> {
    // 1. The model and the tokenised (prompt, completion + EOS) rows.
    let mut lm = TrainableLm::load(&cfg.model, device)?;
    lm.enable_lora(&cfg.fit.lora, cfg.fit.seed)?;
    let (train, eval) = load_with_eval(&cfg.train_file, cfg.fit.eval_file.as_deref(), |p| {
        load_rows(&lm, p, cfg.fit.max_len, cfg.fit.skip_bad_lines)
    })?;
    let eval_batch = cfg.fit.batch_size.max(1) * 2;
    // 2. The run: optimiser, schedule, run directory (or its latest checkpoint).
    let plan = cfg.fit.plan("sft", eval.is_some());
    let mut trainer = cfg.fit.start(&plan, train.len(), cfg, &lm, resume)?;
    // 3. Epochs of token-mean NLL steps on the completion tokens.
    let loss = |lm: &TrainableLm, batch: &[usize], part: &[usize]| {
        nll_share(lm, &train, batch, part, device)
    };
    let held_out = |trainer: &mut Trainer, lm: &TrainableLm| {
        let rows = eval.as_ref().expect("eval_every is 0 without eval");
        trainer.log(&[("eval_loss", eval_loss(lm, rows, eval_batch, device)?)])
    };
    let history = fit(&mut trainer, &lm, train.len(), &plan, loss, held_out)?;
    // 4. Held-out loss and the final model.
    let eval_loss = match &eval {
        Some(e) => {
            let l = eval_loss(&lm, e, eval_batch, device)?;
            trainer.log(&[("eval_loss", l)])?;
            Some(l)
        }
        None => None,
    };
    lm.generation.max_new_tokens.get_or_insert(64);
    trainer.finish(&lm)?;
    Ok(SftSummary {
        steps: trainer.step,
        final_train_loss: history.last().map_or(f64::NAN, |m| m[0].1),
        eval_loss,
    })
}

/// `rlhf sft`.
pub static ENTRY: Entry<SftConfig, SftSummary> = Entry {
    name: "sft",
    about: "Supervised fine-tuning on prompt/completion or chat data (completion-only NLL).",
    family: Family::Offline,
    shorthands: &[],
    run,
};
