//! KTO on unpaired data (`rlhf kto`): each example is a (prompt, completion) labelled desirable or
//! undesirable (`prompt` / `completion` / `label`, text or messages), or pairs split into one
//! desirable and one undesirable example each (`pairs_file`, as TRL's `unpair_preference_dataset`).
//!
//! The reference point `z0` (spec §5.4) is estimated from mismatched pairs, as TRL does: example i
//! is paired with the completion of the nearest earlier example whose prompt differs (cyclically).
//! The mismatched pair of each example is fixed once, so the reference policy's log-probs of both
//! the matched and the mismatched rows are computed once before training and cached
//! (`ref_logps.json`); the policy's mismatched log-probs are taken each step without gradients.
//!
//! Metrics (TRL's names): `loss`, `kl` (the batch's `z0`), `rewards/chosen`, `rewards/rejected`,
//! `rewards/margins`, `logps/chosen`, `logps/rejected`, `lr`, `grad_norm`, `epoch`.

use rlhf_rl::registry::{Entry, Family};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_data::loaders::{load_pairs, load_unpaired, LoadOptions, Unpaired};
use rlhf_lm::llama::Llama;
use rlhf_lm::score::{completion_logprobs, CompletionBatch};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::fit::FitConfig;
use rlhf_rl::fit::{fit, tail_mean, weighted_share, FitPlan};
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::pref::{cached_reference_logps, eval_names, log_named, PolicyEval, REF_CACHE};
use rlhf_rl::pref_losses::{self as pl, KtoBatch};

/// The configuration of `rlhf kto`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KtoConfig {
    /// Policy to train (usually the SFT model): an HF directory or a .gguf file.
    pub model: PathBuf,
    /// Frozen reference policy; default: `model` itself.
    pub ref_model: Option<PathBuf>,
    /// Unpaired examples: `prompt` / `completion` / `label`.
    pub train_file: Option<PathBuf>,
    /// Or pairs (`prompt` / `chosen` / `rejected`), each giving a desirable and an undesirable
    /// example.
    pub pairs_file: Option<PathBuf>,
    /// KTO's beta (scale of the implied reward).
    pub beta: f64,
    /// lambda_D and lambda_U. The KTO paper advises lambda_D n_D / (lambda_U n_U) in [1, 3/2].
    pub desirable_weight: f64,
    /// Weight of the undesirable examples' loss (lambda_U).
    pub undesirable_weight: f64,
    /// Rows per batch when computing the reference log-probs once.
    pub ref_batch_size: usize,
    /// The evaluation the run ends with (eval.json); off unless a task or prompts file is set.
    pub eval: PolicyEval,
    /// Run directory, epochs, batch size, logging, checkpoints, seed, optimiser (shared keys).
    #[serde(flatten)]
    pub fit: FitConfig,
}

impl Default for KtoConfig {
    fn default() -> Self {
        KtoConfig {
            model: PathBuf::new(),
            ref_model: None,
            train_file: None,
            pairs_file: None,
            beta: 0.1,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            ref_batch_size: 32,
            eval: PolicyEval::default(),
            fit: FitConfig::with("runs/kto", 5e-6),
        }
    }
}

impl KtoConfig {
    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            return Err(TrainError::invalid(
                "`model` (the policy to train) is required",
            ));
        }
        if self.train_file.is_some() == self.pairs_file.is_some() {
            return Err(TrainError::invalid(
                "set exactly one of `train_file` (prompt/completion/label) and `pairs_file` (prompt/chosen/rejected)",
            ));
        }
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(TrainError::invalid(format!(
                "beta must be > 0, got {}",
                self.beta
            )));
        }
        if self.fit.batch_size < 2 {
            return Err(TrainError::invalid(
                "KTO needs batch_size >= 2 (its reference point is estimated from mismatched pairs within the batch)",
            ));
        }
        if self.fit.epochs == 0 {
            return Err(TrainError::invalid("epochs must be >= 1"));
        }
        if self.desirable_weight < 0.0 || self.undesirable_weight < 0.0 {
            return Err(TrainError::invalid(
                "desirable/undesirable weights must be >= 0",
            ));
        }
        Ok(())
    }
}

/// A tokenised unpaired example with its fixed mismatched completion.
#[derive(Debug, Clone)]
pub struct KtoExample {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub label: bool,
    /// The completion of another example (a different prompt), for the reference point.
    pub kl_completion: Vec<u32>,
}

/// Load unpaired examples (or unpair pairs) and tokenise them with EOS appended.
pub fn load_examples(
    lm: &TrainableLm,
    unpaired: Option<&Path>,
    pairs: Option<&Path>,
    max_len: usize,
    skip: bool,
) -> Result<Vec<KtoExample>> {
    let opts = LoadOptions {
        skip_bad_lines: skip,
    };
    let template = lm.chat_template.as_ref();
    let (items, path): (Vec<Unpaired>, &Path) = match (unpaired, pairs) {
        (Some(p), _) => (load_unpaired(p, template, &opts)?.items, p),
        (None, Some(p)) => {
            let loaded = load_pairs(p, template, &opts)?.items;
            // All desirable examples, then all undesirable ones (TRL's unpairing order).
            let mut v: Vec<Unpaired> = loaded
                .iter()
                .map(|x| Unpaired {
                    prompt: x.prompt.clone(),
                    completion: x.chosen.clone(),
                    label: true,
                })
                .collect();
            v.extend(loaded.iter().map(|x| Unpaired {
                prompt: x.prompt.clone(),
                completion: x.rejected.clone(),
                label: false,
            }));
            (v, p)
        }
        (None, None) => return Err(TrainError::invalid("no KTO data file")),
    };
    if items.is_empty() {
        return Err(TrainError::bad_file(path, "no examples"));
    }
    let encoded: Vec<(Vec<u32>, Vec<u32>)> = items
        .iter()
        .map(|x| lm.encode(&x.prompt, &x.completion, true, max_len))
        .collect::<rlhf_lm::Result<_>>()?;
    let partners =
        mismatched_partners(&items.iter().map(|x| x.prompt.as_str()).collect::<Vec<_>>());
    Ok(encoded
        .iter()
        .zip(&items)
        .zip(&partners)
        .map(|(((p, c), x), &j)| {
            let mut kl_completion = encoded[j].1.clone();
            kl_completion.truncate(max_len.saturating_sub(p.len()).max(1));
            KtoExample {
                prompt: p.clone(),
                completion: c.clone(),
                label: x.label,
                kl_completion,
            }
        })
        .collect())
}

/// For each example, the nearest earlier example (cyclically) whose prompt differs; itself when
/// every prompt is the same.
pub fn mismatched_partners(prompts: &[&str]) -> Vec<usize> {
    let n = prompts.len();
    (0..n)
        .map(|i| {
            (1..n)
                .map(|d| (i + n - d) % n)
                .find(|&j| prompts[j] != prompts[i])
                .unwrap_or(i)
        })
        .collect()
}

/// The two rows each example is scored as: its completion and its mismatched partner's.
fn example_rows(ex: &[KtoExample]) -> Vec<(Vec<u32>, Vec<u32>)> {
    ex.iter()
        .flat_map(|e| {
            [
                (e.prompt.clone(), e.completion.clone()),
                (e.prompt.clone(), e.kl_completion.clone()),
            ]
        })
        .collect()
}

/// One KTO batch: policy log-probs of the matched rows through `model` (trainable or not), of the
/// mismatched rows through `frozen`; returns the loss and TRL's metrics.
pub fn kto_batch_loss(
    model: &Llama,
    frozen: &Llama,
    pad: u32,
    ex: &[KtoExample],
    refs: &[[f64; 2]],
    cfg: &KtoConfig,
    device: &Device,
) -> Result<(pl::PrefLoss, Vec<(&'static str, f64)>)> {
    let b = ex.len();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = ex
        .iter()
        .map(|e| (e.prompt.clone(), e.completion.clone()))
        .collect();
    let kl_rows: Vec<(Vec<u32>, Vec<u32>)> = ex
        .iter()
        .map(|e| (e.prompt.clone(), e.kl_completion.clone()))
        .collect();
    let batch = CompletionBatch::new(&rows, pad, device)?;
    let logps = completion_logprobs(model, &batch, 1.0)?.sum(1)?;
    let kl_batch = CompletionBatch::new(&kl_rows, pad, device)?;
    let kl = completion_logprobs(frozen, &kl_batch, 1.0)?
        .sum(1)?
        .detach();
    let dtype = logps.dtype();
    let f = |v: Vec<f64>| Tensor::from_vec(v, b, device)?.to_dtype(dtype);
    let ref_logps = f(refs.iter().map(|r| r[0]).collect())?;
    let ref_kl = f(refs.iter().map(|r| r[1]).collect())?;
    let labels: Vec<bool> = ex.iter().map(|e| e.label).collect();
    let out = pl::kto(
        &KtoBatch {
            logps: &logps,
            ref_logps: &ref_logps,
            labels: &labels,
            kl_logps: &kl,
            ref_kl_logps: &ref_kl,
        },
        cfg.beta,
        cfg.desirable_weight,
        cfg.undesirable_weight,
    )?;
    let m = pl::kto_metrics(&out, &logps.detach(), &labels)?;
    Ok((out, m))
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct KtoSummary {
    pub steps: u64,
    pub examples: usize,
    pub desirable: usize,
    pub final_train: rlhf_rl::pref::Metrics,
    pub eval_examples: Option<rlhf_rl::pref::Metrics>,
    pub model: PathBuf,
    pub eval: Option<rlhf_rl::eval::EvalReport>,
}

fn evaluate(
    lm: &TrainableLm,
    ex: &[KtoExample],
    refs: &[[f64; 2]],
    cfg: &KtoConfig,
    device: &Device,
) -> Result<rlhf_rl::pref::Metrics> {
    let frozen = lm.model(device)?.detached();
    let bs = cfg.fit.batch_size;
    let mut parts = Vec::new();
    for (i, chunk) in ex.chunks(bs).enumerate() {
        let r = &refs[i * bs..i * bs + chunk.len()];
        let (out, mut m) = kto_batch_loss(&frozen, &frozen, lm.pad_id, chunk, r, cfg, device)?;
        m.insert(
            0,
            (
                "loss",
                out.loss
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?,
            ),
        );
        parts.push((chunk.len() as f64 / ex.len() as f64, m));
    }
    Ok(eval_names(&pl::weighted_metrics(&parts)))
}

pub fn run(cfg: &KtoConfig, resume: bool, device: &Device) -> Result<KtoSummary> {
    cfg.validate()?;
    let mut lm = TrainableLm::load(&cfg.model, device)?;
    lm.enable_lora(&cfg.fit.lora, cfg.fit.seed)?;
    let train = load_examples(
        &lm,
        cfg.train_file.as_deref(),
        cfg.pairs_file.as_deref(),
        cfg.fit.max_len,
        cfg.fit.skip_bad_lines,
    )?;
    let eval = cfg
        .fit
        .eval_file
        .as_deref()
        .map(|p| load_examples(&lm, Some(p), None, cfg.fit.max_len, cfg.fit.skip_bad_lines))
        .transpose()?;
    let n_d = train.iter().filter(|e| e.label).count();
    let n_u = train.len() - n_d;
    let balance =
        cfg.desirable_weight * n_d as f64 / (cfg.undesirable_weight * n_u as f64).max(1e-12);
    if !(1.0..=1.5).contains(&balance) {
        eprintln!(
            "note: desirable_weight * {n_d} / (undesirable_weight * {n_u}) = {balance:.2}; the KTO paper advises 1 to 1.5"
        );
    }
    // 2. Reference sums of the matched and mismatched rows, computed once (or from the cache).
    let refs = cached_reference_logps(
        &lm,
        cfg.ref_model.as_deref(),
        &cfg.model,
        &cfg.fit.output_dir,
        resume,
        &example_rows(&train),
        &eval.as_deref().map(example_rows).unwrap_or_default(),
        cfg.ref_batch_size,
        device,
    )?;
    // 3. Epochs of KTO steps; the batch KL term uses each example's mismatched completion under
    //    the current weights without a gradient, as TRL does.
    let plan = FitPlan {
        min_micro: 2,
        ..cfg.fit.plan("kto", eval.is_some())
    };
    let mut trainer = cfg.fit.start(&plan, train.len(), cfg, &lm, resume)?;
    refs.save(&trainer.run.path().join(REF_CACHE))?;
    let history = fit(
        &mut trainer,
        &lm,
        train.len(),
        &plan,
        |lm, batch, part| {
            let model = lm.model(device)?;
            let frozen = model.detached();
            let ex: Vec<KtoExample> = part.iter().map(|&i| train[i].clone()).collect();
            let r: Vec<[f64; 2]> = part.iter().map(|&i| refs.train[i]).collect();
            let (out, m) = kto_batch_loss(&model, &frozen, lm.pad_id, &ex, &r, cfg, device)?;
            weighted_share(part, batch, out.loss, m)
        },
        |trainer, lm| {
            let e = eval.as_ref().expect("eval_every is 0 without eval");
            let em = evaluate(lm, e, &refs.eval, cfg, device)?;
            log_named(trainer, &em)
        },
    )?;
    let eval_examples = match &eval {
        Some(e) => {
            let em = evaluate(&lm, e, &refs.eval, cfg, device)?;
            log_named(&mut trainer, &em)?;
            Some(em)
        }
        None => None,
    };
    let reference = cfg.ref_model.as_ref().unwrap_or(&cfg.model);
    let (model, report) = cfg.eval.finish(&mut trainer, &mut lm, reference, device)?;
    Ok(KtoSummary {
        steps: trainer.step,
        examples: train.len(),
        desirable: n_d,
        final_train: tail_mean(&history, 20),
        eval_examples,
        model,
        eval: report,
    })
}

/// `rlhf kto`.
pub static ENTRY: Entry<KtoConfig, KtoSummary> = Entry {
    name: "kto",
    about: "KTO on unpaired data (prompt / completion / label), or on pairs split in two.",
    family: Family::Offline,
    shorthands: &[],
    run,
};
