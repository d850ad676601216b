//! Training a policy on preference pairs with a pair loss (DPO, IPO, cDPO, SimPO, ORPO): shared by
//! `rlhf dpo` and online DPO's rounds.
//!
//! Each step scores the chosen and the rejected completions of a batch in one forward pass (the
//! rows `[chosen...; rejected...]`, as TRL's concatenated forward), sums their token log-probs and
//! hands them to the loss in [`crate::pref_losses`]. The reference policy's log-probs (DPO, IPO,
//! cDPO) are computed once, before the first step, with the frozen reference (`ref_model`, default
//! the initial `model`), kept in memory and cached in the run directory (`ref_logps.json`), so a
//! resumed run reuses them and no reference model is held during training. SimPO and ORPO are
//! reference-free and never load or score one.
//!
//! Metrics (TRL's names): `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
//! `rewards/margins`, `logps/chosen`, `logps/rejected` (+ ORPO's `nll_loss`, `log_odds_ratio`,
//! `log_odds_chosen`), `lr`, `grad_norm`, `epoch`; with an `eval_file` the same with `eval_`.
//! With `[eval]` set (a testbed task or prompts), the final policy is evaluated against the
//! reference policy and `eval.json` is written in the run directory.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_lm::llama::Llama;
use rlhf_lm::score::{completion_logprobs, score_pairs, CompletionBatch};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use crate::eval::{run_eval, EvalConfig, EvalReport};
use crate::fit::{fit, tail_mean, weighted_share, FitConfig};
use crate::pairs::PairIds;
use crate::policy::TrainableLm;
use crate::pref_losses::{self as pl, PairLossKind, PrefLoss};
use crate::trainer::Trainer;

/// File in the run directory holding the cached reference log-probs.
pub const REF_CACHE: &str = "ref_logps.json";

/// The evaluation a training run ends with (`eval.json`): the final policy against the reference
/// policy, judged by a testbed task's gold reward and/or a reward model (see `rlhf eval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyEval {
    /// A testbed task: its eval prompts and gold judge.
    pub task: Option<String>,
    /// Seed of the testbed task (its prompts and annotators).
    pub task_seed: u64,
    /// Prompts (`prompt` or `messages`) instead of the task's.
    pub prompts_file: Option<PathBuf>,
    /// A reward model to judge with (or to report the proxy reward with, when there is a task).
    pub reward_model: Option<PathBuf>,
    /// Evaluate on at most this many prompts.
    pub max_prompts: usize,
    /// Default: the task's longest sensible response + 2 (testbed), else 64.
    pub max_new_tokens: Option<usize>,
    /// Sampling seed (the online methods' evaluation seed, so every method meets the same reference samples).
    pub seed: u64,
    /// Prompts per generation batch.
    pub batch_size: usize,
    /// Sampling temperature (AlpacaFarm: 0.7); KL is then between the temperature-scaled
    /// distributions. Default 1.0.
    pub temperature: f64,
}

impl Default for PolicyEval {
    fn default() -> Self {
        PolicyEval {
            task: None,
            task_seed: 0,
            prompts_file: None,
            reward_model: None,
            max_prompts: 200,
            max_new_tokens: None,
            // The online methods' evaluation seed and batch size: the same SFT reference samples.
            seed: 12_345,
            batch_size: 64,
            temperature: 1.0,
        }
    }
}

impl PolicyEval {
    pub fn enabled(&self) -> bool {
        self.task.is_some() || self.prompts_file.is_some()
    }

    /// End a preference-training run: write the final model (`<run>/model`), then, when enabled,
    /// evaluate it against `reference` (`<run>/eval.json`) and log the report.
    pub fn finish(
        &self,
        trainer: &mut Trainer,
        lm: &mut TrainableLm,
        reference: &Path,
        device: &Device,
    ) -> Result<(PathBuf, Option<EvalReport>)> {
        lm.generation.max_new_tokens.get_or_insert(64);
        let model = trainer.finish(lm)?;
        if !self.enabled() {
            return Ok((model, None));
        }
        let eval_json = trainer.run.path().join("eval.json");
        let report = self.run(&model, reference, &eval_json, device)?;
        log_report(trainer, &report)?;
        Ok((model, Some(report)))
    }

    /// Evaluate `policy` against `reference`; writes `output` (eval.json).
    pub fn run(
        &self,
        policy: &Path,
        reference: &Path,
        output: &Path,
        device: &Device,
    ) -> Result<EvalReport> {
        let max_new_tokens = match (self.max_new_tokens, &self.task) {
            (Some(n), _) => n,
            (None, Some(name)) => {
                rlhf_data::testbed::task_by_name(name, self.task_seed)
                    .map_err(TrainError::Invalid)?
                    .max_response_words()
                    + 2
            }
            (None, None) => 64,
        };
        let cfg = EvalConfig {
            policy: policy.to_path_buf(),
            reference: Some(reference.to_path_buf()),
            prompts_file: self.prompts_file.clone(),
            task: self.task.clone(),
            task_seed: self.task_seed,
            reward_model: self.reward_model.clone(),
            max_prompts: self.max_prompts,
            max_new_tokens,
            seed: self.seed,
            batch_size: self.batch_size,
            temperature: self.temperature,
            output: output.to_path_buf(),
            ..EvalConfig::default()
        };
        Ok(run_eval(&cfg, device)?)
    }
}

/// The configuration of `rlhf dpo` (and of each round of online DPO: its `[dpo]` table).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// Policy to train (usually the SFT model): an HF directory or a .gguf file.
    pub model: PathBuf,
    /// Frozen reference policy (DPO/IPO/cDPO); default: `model` itself.
    pub ref_model: Option<PathBuf>,
    /// Pairs: `prompt` / `chosen` / `rejected` (text or messages), or implicit-prompt `chosen` /
    /// `rejected` conversations.
    pub train_file: PathBuf,
    /// The pair loss: dpo | ipo | cdpo | simpo | orpo.
    pub loss: PairLossKind,
    /// DPO/cDPO: beta; IPO: tau; SimPO: beta; ORPO: lambda. Default: 0.1 (SimPO 2.0).
    pub beta: Option<f64>,
    /// cDPO's label-flip probability eps.
    pub label_smoothing: f64,
    /// IPO on per-token average log-ratios (TRL's IPO, as the IPO authors confirmed) instead of
    /// the paper's summed ones.
    pub ipo_length_normalize: bool,
    /// SimPO's target margin gamma.
    pub simpo_gamma: f64,
    /// Rows per forward pass when precomputing reference log-probs.
    pub ref_batch_size: usize,
    /// The evaluation the run ends with (eval.json); off unless a task or prompts file is set.
    pub eval: PolicyEval,
    /// Run directory, epochs, batch size, logging, checkpoints, seed, optimiser (shared keys).
    #[serde(flatten)]
    pub fit: FitConfig,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig {
            model: PathBuf::new(),
            ref_model: None,
            train_file: PathBuf::new(),
            loss: PairLossKind::Dpo,
            beta: None,
            label_smoothing: 0.1,
            ipo_length_normalize: true,
            simpo_gamma: 0.5,
            ref_batch_size: 32,
            eval: PolicyEval::default(),
            fit: FitConfig::with("runs/dpo", 1e-6),
        }
    }
}

impl DpoConfig {
    pub fn beta(&self) -> f64 {
        self.beta.unwrap_or(self.loss.default_beta())
    }

    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            return Err(TrainError::invalid(
                "`model` (the policy to train) is required",
            ));
        }
        let beta = self.beta();
        if !(beta > 0.0 && beta.is_finite()) {
            return Err(TrainError::invalid(format!("beta must be > 0, got {beta}")));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(TrainError::invalid(format!(
                "label_smoothing must be in [0, 0.5), got {}",
                self.label_smoothing
            )));
        }
        if self.fit.epochs == 0 || self.fit.batch_size == 0 {
            return Err(TrainError::invalid("epochs and batch_size must be >= 1"));
        }
        Ok(())
    }
}

/// Everything a pair loss needs besides the policy: its kind and hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct PairLossParams {
    pub kind: PairLossKind,
    pub beta: f64,
    pub label_smoothing: f64,
    pub ipo_length_normalize: bool,
    pub simpo_gamma: f64,
}

impl PairLossParams {
    pub fn from_config(cfg: &DpoConfig) -> Self {
        PairLossParams {
            kind: cfg.loss,
            beta: cfg.beta(),
            label_smoothing: cfg.label_smoothing,
            ipo_length_normalize: cfg.ipo_length_normalize,
            simpo_gamma: cfg.simpo_gamma,
        }
    }
}

/// Reference log-prob sums, `[chosen, rejected]` per pair, cached in the run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RefCache {
    pub reference: String,
    pub train: Vec<[f64; 2]>,
    pub eval: Vec<[f64; 2]>,
}

impl RefCache {
    pub fn load(path: &Path) -> Option<RefCache> {
        let text = std::fs::read_to_string(path).ok()?;
        serde_json::from_str(&text).ok()
    }
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string(self).expect("serialisable");
        rlhf_train::run::write_atomic(path, text.as_bytes())
    }
}

/// The frozen reference model: `path`, or the current weights of `lm` (call before training).
pub fn reference_model(lm: &TrainableLm, path: Option<&Path>, device: &Device) -> Result<Llama> {
    match path {
        Some(p) => {
            let r = rlhf_lm::Pretrained::load(p, device)?;
            if r.tokenizer.inner().get_vocab(true) != lm.tokenizer.inner().get_vocab(true) {
                return Err(TrainError::invalid(format!(
                    "{}: the reference model's tokenizer differs from the policy's",
                    p.display()
                )));
            }
            Ok(r.model(device)?)
        }
        None => Ok(lm.reference_model(device)?),
    }
}

/// Summed completion log-probs of `rows` under a frozen model.
pub fn sequence_logps(
    model: &Llama,
    rows: &[(Vec<u32>, Vec<u32>)],
    pad: u32,
    batch_size: usize,
) -> Result<Vec<f64>> {
    Ok(score_pairs(model, rows, pad, batch_size, 1.0)?
        .iter()
        .map(|r| r.iter().map(|&x| x as f64).sum())
        .collect())
}

/// The two rows of each pair, `(prompt, chosen)` then `(prompt, rejected)`, for scoring.
pub fn pair_rows(pairs: &[PairIds]) -> Vec<(Vec<u32>, Vec<u32>)> {
    pairs
        .iter()
        .flat_map(|p| {
            [
                (p.prompt.clone(), p.chosen.clone()),
                (p.prompt.clone(), p.rejected.clone()),
            ]
        })
        .collect()
}

/// Reference log-prob sums of items scored as two rows each (`rows[2i]`, `rows[2i + 1]`: a pair's
/// chosen and rejected, or a KTO example's completion and its mismatched partner).
pub fn two_row_reference_logps(
    reference: &Llama,
    rows: &[(Vec<u32>, Vec<u32>)],
    pad: u32,
    batch_size: usize,
) -> Result<Vec<[f64; 2]>> {
    // Data parallelism: each rank scores a run of whole batches (the batches one process would
    // score, so the same numbers), and every rank gets all of them.
    let world = rlhf_train::dist::world();
    let (_, part) = world.batch_share(rows.len(), batch_size);
    let s = sequence_logps(reference, &rows[part], pad, batch_size)?;
    let s: Vec<f64> = world.gather_json(&s)?.concat();
    Ok(s.chunks(2).map(|c| [c[0], c[1]]).collect())
}

/// The reference's `[a, b]` sums for the train and eval items (two rows each): taken from the
/// run directory's cache when resuming with the same reference and data sizes, else computed now,
/// once, with the frozen reference (`ref_model`, default: the initial weights of `lm`). The
/// caller saves the result in the run directory once it exists.
#[allow(clippy::too_many_arguments)]
pub fn cached_reference_logps(
    lm: &TrainableLm,
    ref_model: Option<&Path>,
    model: &Path,
    output_dir: &Path,
    resume: bool,
    train_rows: &[(Vec<u32>, Vec<u32>)],
    eval_rows: &[(Vec<u32>, Vec<u32>)],
    batch_size: usize,
    device: &Device,
) -> Result<RefCache> {
    let reference_name = ref_model.unwrap_or(model).display().to_string();
    let (n_train, n_eval) = (train_rows.len() / 2, eval_rows.len() / 2);
    let cached = RefCache::load(&output_dir.join(REF_CACHE)).filter(|c| {
        resume
            && c.reference == reference_name
            && c.train.len() == n_train
            && c.eval.len() == n_eval
    });
    // Data parallelism: rank 0's cache (or its decision to compute one) holds for every rank.
    let world = rlhf_train::dist::world();
    let cached = if world.size() > 1 {
        world.broadcast_json(&cached)?
    } else {
        cached
    };
    if let Some(c) = cached {
        return Ok(c);
    }
    let started = std::time::Instant::now();
    let reference = reference_model(lm, ref_model, device)?;
    let train = two_row_reference_logps(&reference, train_rows, lm.pad_id, batch_size)?;
    let eval = two_row_reference_logps(&reference, eval_rows, lm.pad_id, batch_size)?;
    eprintln!(
        "reference log-probs of {} items in {:.1} s",
        n_train + n_eval,
        started.elapsed().as_secs_f64()
    );
    Ok(RefCache {
        reference: reference_name,
        train,
        eval,
    })
}

/// One batch of pairs through `model` (trainable for a training step, detached for evaluation):
/// the loss and TRL's metrics. `refs`: the reference `[chosen, rejected]` sums (ignored by the
/// reference-free losses).
pub fn pair_batch_loss(
    model: &Llama,
    pad: u32,
    pairs: &[PairIds],
    refs: Option<&[[f64; 2]]>,
    p: &PairLossParams,
    device: &Device,
) -> Result<(PrefLoss, Vec<(&'static str, f64)>)> {
    let b = pairs.len();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|x| (x.prompt.clone(), x.chosen.clone()))
        .chain(pairs.iter().map(|x| (x.prompt.clone(), x.rejected.clone())))
        .collect();
    let batch = CompletionBatch::new(&rows, pad, device)?;
    let lp = completion_logprobs(model, &batch, 1.0)?;
    let sums = lp.sum(1)?;
    let (pc, pr) = (sums.narrow(0, 0, b)?, sums.narrow(0, b, b)?);
    let lens: Vec<f32> = batch.spans.iter().map(|s| s.len() as f32).collect();
    let dtype = sums.dtype();
    let lens = Tensor::from_vec(lens, 2 * b, device)?.to_dtype(dtype)?;
    let (len_c, len_r) = (lens.narrow(0, 0, b)?, lens.narrow(0, b, b)?);
    let refs_t = || -> Result<(Tensor, Tensor)> {
        let r = refs.ok_or_else(|| {
            TrainError::invalid(format!("{} needs reference log-probs", p.kind.name()))
        })?;
        let c: Vec<f32> = r.iter().map(|x| x[0] as f32).collect();
        let j: Vec<f32> = r.iter().map(|x| x[1] as f32).collect();
        Ok((
            Tensor::from_vec(c, b, device)?.to_dtype(dtype)?,
            Tensor::from_vec(j, b, device)?.to_dtype(dtype)?,
        ))
    };
    let out = match p.kind {
        PairLossKind::Dpo => {
            let (rc, rr) = refs_t()?;
            pl::dpo(&pc, &pr, &rc, &rr, p.beta)?
        }
        PairLossKind::Cdpo => {
            let (rc, rr) = refs_t()?;
            pl::cdpo(&pc, &pr, &rc, &rr, p.beta, p.label_smoothing)?
        }
        PairLossKind::Ipo => {
            let (rc, rr) = refs_t()?;
            pl::ipo(
                &pc,
                &pr,
                &rc,
                &rr,
                &len_c,
                &len_r,
                p.beta,
                p.ipo_length_normalize,
            )?
        }
        PairLossKind::Simpo => pl::simpo(&pc, &pr, &len_c, &len_r, p.beta, p.simpo_gamma)?,
        PairLossKind::Orpo => {
            // NLL of the chosen completions, averaged over their tokens.
            let n_tokens: usize = batch.spans[..b].iter().map(|s| s.len()).sum();
            let nll = (pc.sum_all()?.neg()? / n_tokens.max(1) as f64)?;
            pl::orpo(&pc, &pr, &len_c, &len_r, &nll, p.beta)?
        }
    };
    let (logged_c, logged_r) = match p.kind {
        PairLossKind::Simpo | PairLossKind::Orpo => ((&pc / &len_c)?, (&pr / &len_r)?),
        _ => (pc.clone(), pr.clone()),
    };
    let metrics = pl::pair_metrics(&out, &logged_c.detach(), &logged_r.detach())?;
    Ok((out, metrics))
}

/// Held-out loss and metrics (no gradients), averaged over chunks by size.
pub fn evaluate_pairs(
    lm: &TrainableLm,
    pairs: &[PairIds],
    refs: Option<&[[f64; 2]]>,
    p: &PairLossParams,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<(&'static str, f64)>> {
    let frozen = lm.model(device)?.detached();
    let mut parts = Vec::new();
    for (i, chunk) in pairs.chunks(batch_size.max(1)).enumerate() {
        let start = i * batch_size.max(1);
        let r = refs.map(|r| &r[start..start + chunk.len()]);
        let (out, mut m) = pair_batch_loss(&frozen, lm.pad_id, chunk, r, p, device)?;
        m.insert(0, ("loss", scalar(&out.loss)?));
        parts.push((chunk.len() as f64 / pairs.len() as f64, m));
    }
    Ok(pl::weighted_metrics(&parts))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Named metrics, for summaries.
pub type Metrics = std::collections::BTreeMap<String, f64>;

/// Prefix every metric name with `eval_`.
pub fn eval_names(m: &[(&'static str, f64)]) -> Metrics {
    m.iter().map(|(k, v)| (format!("eval_{k}"), *v)).collect()
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DpoSummary {
    pub loss: String,
    pub beta: f64,
    pub steps: u64,
    pub pairs: usize,
    /// Means over the last (up to) 20 steps.
    pub final_train: Metrics,
    pub eval_pairs: Option<Metrics>,
    pub model: PathBuf,
    pub eval: Option<EvalReport>,
}

/// Train on tokenised pairs (online DPO passes its sampled ids here directly). `lm` must hold the
/// initial weights (a resumed run loads its checkpoint after the reference log-probs are taken).
pub fn train_on_pairs(
    cfg: &DpoConfig,
    mut lm: TrainableLm,
    train: Vec<PairIds>,
    eval: Option<Vec<PairIds>>,
    resume: bool,
    device: &Device,
) -> Result<DpoSummary> {
    cfg.validate()?;
    if train.is_empty() {
        return Err(TrainError::invalid("no preference pairs to train on"));
    }
    lm.enable_lora(&cfg.fit.lora, cfg.fit.seed)?;
    let params = PairLossParams::from_config(cfg);
    // Reference log-probs: from the cache of a resumed run, else computed now, once.
    let refs: Option<RefCache> = if params.kind.needs_reference() {
        Some(cached_reference_logps(
            &lm,
            cfg.ref_model.as_deref(),
            &cfg.model,
            &cfg.fit.output_dir,
            resume,
            &pair_rows(&train),
            &eval.as_deref().map(pair_rows).unwrap_or_default(),
            cfg.ref_batch_size,
            device,
        )?)
    } else {
        None
    };
    let plan = cfg.fit.plan(params.kind.name(), eval.is_some());
    let mut trainer = cfg.fit.start(&plan, train.len(), cfg, &lm, resume)?;
    if let Some(r) = &refs {
        r.save(&trainer.run.path().join(REF_CACHE))?;
    }
    let history = fit(
        &mut trainer,
        &lm,
        train.len(),
        &plan,
        |lm, batch, part| {
            let pairs: Vec<PairIds> = part.iter().map(|&i| train[i].clone()).collect();
            let r: Option<Vec<[f64; 2]>> = refs
                .as_ref()
                .map(|c| part.iter().map(|&i| c.train[i]).collect());
            let model = lm.model(device)?;
            let (out, m) =
                pair_batch_loss(&model, lm.pad_id, &pairs, r.as_deref(), &params, device)?;
            weighted_share(part, batch, out.loss, m)
        },
        |trainer, lm| {
            let e = eval.as_ref().expect("eval_every is 0 without eval");
            let r = refs.as_ref().map(|c| c.eval.as_slice());
            let em = evaluate_pairs(lm, e, r, &params, cfg.ref_batch_size, device)?;
            log_named(trainer, &eval_names(&em))
        },
    )?;
    let eval_pairs = match &eval {
        Some(e) => {
            let r = refs.as_ref().map(|c| c.eval.as_slice());
            let em = eval_names(&evaluate_pairs(
                &lm,
                e,
                r,
                &params,
                cfg.ref_batch_size,
                device,
            )?);
            log_named(&mut trainer, &em)?;
            Some(em)
        }
        None => None,
    };
    let reference = cfg.ref_model.as_ref().unwrap_or(&cfg.model);
    let (model, report) = cfg.eval.finish(&mut trainer, &mut lm, reference, device)?;
    Ok(DpoSummary {
        loss: params.kind.name().into(),
        beta: params.beta,
        steps: trainer.step,
        pairs: train.len(),
        final_train: tail_mean(&history, 20),
        eval_pairs,
        model,
        eval: report,
    })
}

/// Log metrics whose names are owned strings.
pub fn log_named(trainer: &mut Trainer, m: &Metrics) -> Result<()> {
    let refs: Vec<(&str, f64)> = m.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    trainer.log(&refs)
}

/// The final evaluation's numbers as metrics (`eval/winrate`, ...).
pub fn log_report(trainer: &mut Trainer, r: &EvalReport) -> Result<()> {
    trainer.log(&r.metrics())
}
