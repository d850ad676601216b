//! Reward-model training: Bradley-Terry on preference pairs, r = scalar head on the LM trunk read
//! at the last token. Loss = -log sigmoid(r_chosen - r_rejected - margin), optionally plus
//! PPO-max's LM regulariser (beta_rm times the NLL of the chosen response under the same trunk's LM
//! head). After training, optional normalisation statistics: mean/std of the reward on samples of
//! the reference policy, saved with the model so later stages see ~N(0, 1) rewards.

use rlhf_rl::registry::{Entry, Family};
use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use rlhf_data::loaders::{load_prompts, LoadOptions};
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::llama::ScalarHead;
use rlhf_lm::score::{gather_logprobs, CompletionBatch};
use rlhf_train::Result;
use serde::{Deserialize, Serialize};

use rlhf_rl::fit::FitConfig;
use rlhf_rl::fit::{fit, load_with_eval, tail_mean, weighted_share};
use rlhf_rl::losses::neg_log_sigmoid;
use rlhf_rl::pairs::{load_pair_ids, PairIds};
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::reward::{self, last_token_index, RewardModel, RewardNorm, HEAD};
use rlhf_rl::sampling::sample;
use rlhf_rl::trainer::Trainer;

/// The configuration of `rlhf rm`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RmConfig {
    /// Initial model (usually the SFT model); a scalar head is added if it has none.
    pub model: PathBuf,
    /// Pairs: `prompt` / `chosen` / `rejected` (plain or messages), optional `margin`.
    pub train_file: PathBuf,
    /// Multiplies each pair's `margin` field (Llama 2's margin loss); 0 ignores margins.
    pub margin_scale: f64,
    /// PPO-max's LM regulariser weight (NLL on the chosen response); 0 turns it off.
    pub lm_coef: f64,
    /// Prompts to sample the reference policy (`model`) on for normalisation statistics.
    pub normalize_prompts: Option<PathBuf>,
    /// Reference samples scored to measure the reward's mean and std (with `normalize_prompts`).
    pub normalize_samples: usize,
    /// Length limit of those reference samples.
    pub normalize_max_new_tokens: usize,
    /// Run directory, epochs, batch size, logging, checkpoints, seed, optimiser (shared keys).
    #[serde(flatten)]
    pub fit: FitConfig,
}

impl Default for RmConfig {
    fn default() -> Self {
        RmConfig {
            model: PathBuf::new(),
            train_file: PathBuf::new(),
            margin_scale: 0.0,
            lm_coef: 0.0,
            normalize_prompts: None,
            normalize_samples: 256,
            normalize_max_new_tokens: 64,
            fit: FitConfig::with("runs/rm", 1e-5),
        }
    }
}

/// A tokenised pair.
pub struct PairLoss {
    pub loss: Tensor,
    pub accuracy: f64,
    pub chosen_mean: f64,
    pub rejected_mean: f64,
    pub margin_mean: f64,
}

/// Bradley-Terry loss (with margin and optional LM term) for a batch of pairs.
pub fn pair_loss(
    lm: &TrainableLm,
    pairs: &[PairIds],
    margin_scale: f64,
    lm_coef: f64,
    device: &Device,
) -> Result<PairLoss> {
    let b = pairs.len();
    let rows: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|p| (p.prompt.clone(), p.chosen.clone()))
        .chain(pairs.iter().map(|p| (p.prompt.clone(), p.rejected.clone())))
        .collect();
    let batch = CompletionBatch::new(&rows, lm.pad_id, device)?;
    let model = lm.model(device)?;
    let head = ScalarHead::from_weights(&lm.params.tensors())?;
    let tokens = &batch.tokens;
    let hidden = model.hidden_states(&tokens.ids, &tokens.positions, &tokens.mask, None)?;
    let r = head.at_last_token(&hidden, &last_token_index(tokens, device)?)?;
    let (rc, rr) = (r.narrow(0, 0, b)?, r.narrow(0, b, b)?);
    let margins = Tensor::from_vec(
        pairs
            .iter()
            .map(|p| (p.margin * margin_scale) as f32)
            .collect(),
        b,
        device,
    )?;
    let diff = ((&rc - &rr)? - margins)?;
    let mut loss = neg_log_sigmoid(&diff)?.mean_all()?;
    if lm_coef > 0.0 {
        let (_, t) = tokens.dims();
        let logits = model.logits(&hidden.narrow(0, 0, b)?.narrow(1, 0, t - 1)?)?;
        let lp = gather_logprobs(
            &logits,
            &tokens.ids.narrow(0, 0, b)?.narrow(1, 1, t - 1)?,
            1.0,
        )?;
        let mask = batch.completion_mask.narrow(0, 0, b)?;
        let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
        let nll = ((lp * mask)?.sum_all()?.neg()? / n)?;
        loss = (loss + (nll * lm_coef)?)?;
    }
    let (c, rj) = (rc.to_vec1::<f32>()?, rr.to_vec1::<f32>()?);
    let accuracy = c.iter().zip(&rj).filter(|(x, y)| x > y).count() as f64 / b as f64;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    Ok(PairLoss {
        loss,
        accuracy,
        chosen_mean: mean(&c),
        rejected_mean: mean(&rj),
        margin_mean: mean(&c) - mean(&rj),
    })
}

/// Held-out (loss, accuracy) without gradients.
pub fn evaluate_pairs(rm: &RewardModel, pairs: &[PairIds]) -> Result<(f64, f64)> {
    let chosen: Vec<_> = pairs
        .iter()
        .map(|p| (p.prompt.clone(), p.chosen.clone()))
        .collect();
    let rejected: Vec<_> = pairs
        .iter()
        .map(|p| (p.prompt.clone(), p.rejected.clone()))
        .collect();
    let (rc, rr) = (rm.score_raw(&chosen, 32)?, rm.score_raw(&rejected, 32)?);
    let n = pairs.len().max(1) as f64;
    let acc = rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64 / n;
    let loss = rc
        .iter()
        .zip(&rr)
        .map(|(c, r)| softplus(-(c - r)))
        .sum::<f64>()
        / n;
    Ok((loss, acc))
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RmSummary {
    pub steps: u64,
    pub train_accuracy: f64,
    pub eval_accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
    pub norm: Option<RewardNorm>,
}

pub fn run(cfg: &RmConfig, resume: bool, device: &Device) -> Result<RmSummary> {
    // 1. The trunk with a scalar head (a fresh one unless the model has one) and the pairs.
    let lm = TrainableLm::load(&cfg.model, device)?;
    let mut lm = if lm.params.vars.iter().any(|(n, _)| n == HEAD) {
        lm
    } else {
        let mut weights = lm.params.snapshot()?;
        reward::add_head(&mut weights, lm.config.hidden_size, cfg.fit.seed, device)?;
        TrainableLm {
            params: rlhf_lm::llama::Trainable::new(&weights)?,
            ..lm
        }
    };
    lm.enable_lora(&cfg.fit.lora, cfg.fit.seed)?;
    let (train, eval) = load_with_eval(&cfg.train_file, cfg.fit.eval_file.as_deref(), |p| {
        load_pair_ids(&lm, p, cfg.fit.max_len, cfg.fit.skip_bad_lines)
    })?;
    // 2. Epochs of Bradley-Terry steps (plus the optional LM term) on the pairs.
    let plan = cfg.fit.plan("reward model", eval.is_some());
    let mut trainer = cfg.fit.start(&plan, train.len(), cfg, &lm, resume)?;
    let loss = |lm: &TrainableLm, batch: &[usize], part: &[usize]| {
        let pairs: Vec<PairIds> = part.iter().map(|&i| train[i].clone()).collect();
        let out = pair_loss(lm, &pairs, cfg.margin_scale, cfg.lm_coef, device)?;
        let metrics = vec![
            ("accuracy", out.accuracy),
            ("rewards/chosen", out.chosen_mean),
            ("rewards/rejected", out.rejected_mean),
            ("rewards/margins", out.margin_mean),
        ];
        weighted_share(part, batch, out.loss, metrics)
    };
    let held_out = |trainer: &mut Trainer, lm: &TrainableLm| {
        let pairs = eval.as_ref().expect("eval_every is 0 without eval");
        let (l, a) = evaluate_pairs(&RewardModel::from_trainable(lm, None, device)?, pairs)?;
        trainer.log(&[("eval_loss", l), ("eval_accuracy", a)])
    };
    let history = fit(&mut trainer, &lm, train.len(), &plan, loss, held_out)?;
    // 3. Held-out accuracy, normalisation statistics, the model with its head.
    let rm = RewardModel::from_trainable(&lm, None, device)?;
    let (eval_loss, eval_accuracy) = match &eval {
        Some(e) => {
            let (l, a) = evaluate_pairs(&rm, e)?;
            trainer.log(&[("eval_loss", l), ("eval_accuracy", a)])?;
            (Some(l), Some(a))
        }
        None => (None, None),
    };
    let norm = match &cfg.normalize_prompts {
        Some(path) => Some(normalization(&rm, &lm, path, cfg, device)?),
        None => None,
    };
    reward::save(&lm, norm, &trainer.run.path().join("model"))?;
    Ok(RmSummary {
        steps: trainer.step,
        train_accuracy: tail_mean(&history, 20)
            .get("accuracy")
            .copied()
            .unwrap_or(f64::NAN),
        eval_accuracy,
        eval_loss,
        norm,
    })
}

/// Mean/std of the reward on samples of the reference policy (the initial model).
fn normalization(
    rm: &RewardModel,
    lm: &TrainableLm,
    prompts_file: &std::path::Path,
    cfg: &RmConfig,
    device: &Device,
) -> Result<RewardNorm> {
    let reference = TrainableLm::load(&cfg.model, device)?;
    let prompts = load_prompts(
        prompts_file,
        lm.chat_template.as_ref(),
        &LoadOptions {
            skip_bad_lines: cfg.fit.skip_bad_lines,
        },
    )?;
    let prompts: Vec<(String, Vec<u32>)> = prompts
        .items
        .into_iter()
        .take(cfg.normalize_samples.max(1))
        .map(|p| Ok((p.clone(), lm.encode_prompt(&p, cfg.fit.max_len)?)))
        .collect::<Result<_>>()?;
    let params = SamplingParams {
        max_new_tokens: cfg.normalize_max_new_tokens,
        temperature: 1.0,
        seed: cfg.fit.seed,
        eos_token_ids: lm.eos_ids.clone(),
        ..Default::default()
    };
    let samples = sample(
        &reference.model(device)?.detached(),
        &lm.tokenizer,
        lm.pad_id,
        &prompts,
        &params,
        32,
    )?;
    let rows: Vec<_> = samples
        .iter()
        .map(|g| (g.prompt_ids.clone(), g.completion_ids.clone()))
        .collect();
    let raw = rm.score_raw(&rows, 32)?;
    let _ = D::Minus1;
    Ok(RewardNorm::from_scores(&raw))
}

/// `rlhf rm`.
pub static ENTRY: Entry<RmConfig, RmSummary> = Entry {
    name: "rm",
    about: "Train a reward model on preference pairs (Bradley-Terry; optional LM regulariser).",
    family: Family::Offline,
    shorthands: &[],
    run,
};
