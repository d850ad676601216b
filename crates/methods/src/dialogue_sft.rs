//! Supervised training on multi-turn conversations: behaviour cloning of the assistant's turns
//! and, in the same model, a user model that predicts the user's turns.
//!
//! ```text
//! L = -(1/N) [ Σ_{assistant tokens of train_file's conversations, assistant view} log p_θ
//!            + Σ_{user tokens of user_file's conversations, user view}            log p_θ ]
//! ```
//!
//! N counts the trained tokens of the batch (one token mean over both roles). The assistant view is
//! the conversation as the assistant sees it; the user view puts the conversation's `user_context`
//! (what only the user knows) first, so the user model learns to answer from it (see
//! `rlhf_rl::conversation`). Every turn ends with the template's EOS, so both roles learn to stop.
//! A model trained on both roles is where `rlhf dialogue-rl` starts (the seed's one-model design);
//! `train_user = false` gives plain behaviour cloning, `train_assistant = false` a separate user
//! model.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rlhf_lm::episode::{Episode, Role};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::conversation::{load_dialogues, view_episode, view_role, View};
use rlhf_rl::dialogue::renderer_for;
use rlhf_rl::fit::{fit, FitConfig};
use rlhf_rl::objectives::{role_logprob_sum, role_nll_per_token};
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::registry::{Entry, Family};
use rlhf_rl::trainer::Trainer;

/// The configuration of `rlhf dialogue-sft`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DialogueSftConfig {
    /// Model to train (an HF directory with a chat template, or a .gguf).
    pub model: PathBuf,
    /// Conversations (`messages`, optional `user_context`) whose assistant turns are cloned.
    pub train_file: PathBuf,
    /// Conversations whose user turns train the user model (default: `train_file`).
    pub user_file: Option<PathBuf>,
    /// Train on assistant turns (behaviour cloning).
    pub train_assistant: bool,
    /// Train on user turns (the user model).
    pub train_user: bool,
    /// Run directory, epochs, batch size, logging, checkpoints, seed, optimiser (shared keys).
    /// `eval_file`: held-out conversations; the evaluation loss is per trained token.
    #[serde(flatten)]
    pub fit: FitConfig,
}

impl Default for DialogueSftConfig {
    fn default() -> Self {
        DialogueSftConfig {
            model: PathBuf::new(),
            train_file: PathBuf::new(),
            user_file: None,
            train_assistant: true,
            train_user: true,
            fit: FitConfig::with("runs/dialogue-sft", 2e-5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DialogueSftSummary {
    pub steps: u64,
    pub examples: usize,
    pub final_train_loss: f64,
    /// Held-out NLL per assistant token and per user token (when `eval_file` is set).
    pub eval_assistant_nll: Option<f64>,
    pub eval_user_nll: Option<f64>,
}

/// One training example: a conversation seen from one side, trained on that side's tokens.
struct Example {
    episode: Episode,
    role: Role,
}

/// Token-mean NLL of each example's own role over `rows`, as its share of the batch's tokens
/// (`n_tokens`): the parts of a batch add up to the whole batch's mean.
fn role_nll(
    lm: &TrainableLm,
    rows: &[&Example],
    n_tokens: usize,
    device: &Device,
) -> Result<Tensor> {
    let episodes: Vec<Episode> = rows.iter().map(|e| e.episode.clone()).collect();
    let roles: Vec<Role> = rows.iter().map(|e| e.role).collect();
    let (sum, _) = role_logprob_sum(&lm.model(device)?, &episodes, &roles, lm.pad_id, device)?;
    Ok((sum.neg()? / n_tokens.max(1) as f64)?)
}

/// Trained tokens of an example (its role's targets).
fn trained_tokens(e: &Example) -> usize {
    e.episode
        .target_roles()
        .iter()
        .filter(|&&r| r == e.role)
        .count()
}

fn examples(
    lm: &TrainableLm,
    cfg: &DialogueSftConfig,
    assistant_file: &std::path::Path,
    user_file: &std::path::Path,
) -> Result<Vec<Example>> {
    let renderer = renderer_for(lm.chat_template.as_ref(), &lm.tokenizer, &lm.eos_ids)?;
    let mut out = Vec::new();
    for (on, file, view) in [
        (cfg.train_assistant, assistant_file, View::Assistant),
        (cfg.train_user, user_file, View::User),
    ] {
        if !on {
            continue;
        }
        for d in load_dialogues(file)? {
            let mut episode = view_episode(&renderer, &d, view)?;
            if episode.len() > cfg.fit.max_len {
                // Keep the start of a long conversation (its later turns are cut).
                let mut kept = 0;
                episode.spans.retain_mut(|s| {
                    let room = cfg.fit.max_len - kept;
                    s.ids.truncate(room);
                    kept += s.ids.len();
                    !s.ids.is_empty()
                });
            }
            out.push(Example {
                episode,
                role: view_role(view),
            });
        }
    }
    if out.is_empty() {
        return Err(TrainError::invalid(
            "dialogue-sft: nothing to train (train_assistant and train_user are both off)",
        ));
    }
    Ok(out)
}

/// Held-out NLL per token of one role.
fn eval_nll(
    lm: &TrainableLm,
    rows: &[Example],
    role: Role,
    device: &Device,
) -> Result<Option<f64>> {
    let episodes: Vec<Episode> = rows
        .iter()
        .filter(|e| e.role == role)
        .map(|e| e.episode.clone())
        .collect();
    if episodes.is_empty() {
        return Ok(None);
    }
    let roles = vec![role; episodes.len()];
    let model = lm.model(device)?;
    Ok(Some(role_nll_per_token(
        &model, &episodes, &roles, lm.pad_id, 32, device,
    )?))
}

pub fn run(cfg: &DialogueSftConfig, resume: bool, device: &Device) -> Result<DialogueSftSummary> {
    // 1. The model and its examples: assistant views (cloning) and user views (the user model).
    let mut lm = TrainableLm::load(&cfg.model, device)?;
    lm.enable_lora(&cfg.fit.lora, cfg.fit.seed)?;
    let user_file = cfg.user_file.as_deref().unwrap_or(&cfg.train_file);
    let train = examples(&lm, cfg, &cfg.train_file, user_file)?;
    let eval = match &cfg.fit.eval_file {
        Some(f) => Some(examples(&lm, cfg, f, f)?),
        None => None,
    };
    // 2. The run.
    let plan = cfg.fit.plan("dialogue-sft", eval.is_some());
    let mut trainer = cfg.fit.start(&plan, train.len(), cfg, &lm, resume)?;
    // 3. Epochs of token-mean NLL steps over both roles.
    let loss = |lm: &TrainableLm, batch: &[usize], part: &[usize]| {
        let n_tokens: usize = batch.iter().map(|&i| trained_tokens(&train[i])).sum();
        let rows: Vec<&Example> = part.iter().map(|&i| &train[i]).collect();
        Ok((role_nll(lm, &rows, n_tokens, device)?, Vec::new()))
    };
    let held_out = |trainer: &mut Trainer, lm: &TrainableLm| {
        let rows = eval.as_ref().expect("eval_every is 0 without eval");
        let mut m = Vec::new();
        if let Some(a) = eval_nll(lm, rows, Role::Assistant, device)? {
            m.push(("eval_assistant_nll", a));
        }
        if let Some(u) = eval_nll(lm, rows, Role::User, device)? {
            m.push(("eval_user_nll", u));
        }
        trainer.log(&m)
    };
    let history = fit(&mut trainer, &lm, train.len(), &plan, loss, held_out)?;
    // 4. Held-out losses and the final model.
    let (eval_assistant_nll, eval_user_nll) = match &eval {
        Some(rows) => (
            eval_nll(&lm, rows, Role::Assistant, device)?,
            eval_nll(&lm, rows, Role::User, device)?,
        ),
        None => (None, None),
    };
    trainer.finish(&lm)?;
    Ok(DialogueSftSummary {
        steps: trainer.step,
        examples: train.len(),
        final_train_loss: history.last().map_or(f64::NAN, |m| m[0].1),
        eval_assistant_nll,
        eval_user_nll,
    })
}

/// `rlhf dialogue-sft`.
pub static ENTRY: Entry<DialogueSftConfig, DialogueSftSummary> = Entry {
    name: "dialogue-sft",
    about: "Multi-turn SFT: behaviour cloning of assistant turns and a user model on user turns, one model.",
    family: Family::Offline,
    shorthands: &[],
    run,
};
