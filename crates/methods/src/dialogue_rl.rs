//! Model-based multi-turn RL with a learned user model (spec §6), and its model-free baseline.
//!
//! One model plays both sides of a conversation: trained by NLL on the user's turns of real
//! conversations it is a **user model**; optimised by RLOO on its assistant turns it is the
//! **policy**. The policy practises in **imagined** conversations: MBPO-style short branches from
//! real prefixes, with a frozen snapshot of the user model answering (as Lewis et al.'s frozen
//! partner), so the RL loss never reaches the user model. Supervised steps on real conversations
//! are interleaved, as Lewis et al.'s `sv_train_freq`, against language drift:
//!
//! ```text
//! U ← snapshot(θ)                                  (or a separate user model, user_model = "separate")
//! for it = 1..iterations:
//!     h_1..h_P ~ real prefixes (a real conversation cut after its opening or a later user turn)
//!     for each h, k branches: a ~ π_θ, u ~ U (imagined) | the environment (model-free, or every
//!         `real_every`-th iteration, Dyna-style)      until won / turn_limit / horizon
//!     G_i    = 1[won] − turn_cost · (assistant turns)   or a scorer (reward model, command, HTTP)
//!                                                        over the whole dialogue
//!     R_i    = G_i − β Σ_{assistant tokens of branch i} (log π_θ − log π_ref)    (assistant-only KL)
//!     A_i    = R_i − mean_{j≠i} R_j                     (leave-one-out within h's k branches)
//!     θ ← θ − lr ∇ [ −mean_i A_i Σ_{assistant tokens of branch i} log π_θ ]      (one RLOO step)
//!     every `supervised_every` its.: θ ← θ − lr ∇ [ L_user + α L_assistant ] on real conversations
//!         (token means; L_user on the user view, L_assistant on the assistant view)
//!     every `snapshot_every` its.: U ← snapshot(θ)       (the user model's frozen copy)
//! ```
//!
//! With `rollout_user = "environment"` the same loop is model-free RLOO against the real user
//! (the testbed's scripted user, a command or an HTTP endpoint), and the user model is not trained.
//! Dialogues rolled out against the environment count as real episodes; with `real_every` they also
//! join the user model's training data (Dyna). Evaluation is always against the environment: the policy
//! (sampling at `eval_temperature`, a fixed seed) on held-out games, success rate and turns; plus the user model's held-out NLL and answer
//! accuracy (greedy reply equal to the real one) on held-out real conversations.
//!
//! Layout: `<output_dir>/` is a run directory (config, metrics.jsonl + TensorBoard, atomic
//! checkpoints with the user snapshot beside the weights, `model/`), plus `eval.jsonl` (one line
//! per evaluation), `real_dialogues.jsonl` (the environment's conversations, for Dyna and resume),
//! `samples.jsonl` (the last iteration's branches) and `summary.json`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rlhf_data::testbed::dialogue as game;
use rlhf_lm::episode::{Episode, Role};
use rlhf_lm::llama::Llama;
use rlhf_lm::score::{episode_logprobs, EpisodeBatch};
use rlhf_lm::Message;
use rlhf_rl::tripwire::{TripAction, TripwireConfig};
use rlhf_train::rng::{step_seed, stream_seed};
use rlhf_train::run::{load_safetensors, read_jsonl, write_json, write_jsonl};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::conversation::{
    load_dialogues, transcript, view_episode, view_role, Dialogue, Renderer, View,
};
use rlhf_rl::dialogue::{
    frozen_model, renderer_for, roll_out, starts_with_any, success_return, Branch, ExternalUser,
    ModelUser, PolicySide, ScriptedUser, TurnConfig, UserSimulator,
};
use rlhf_rl::objectives::{masked_sequence_loss, role_logprob_sum, role_nll_per_token};
use rlhf_rl::online::mean;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::registry::{Entry, Family};
use rlhf_rl::reward_source::{Query, RewardConfig, Rewarder};
use rlhf_rl::trainer::{OptimConfig, Optimizer, Trainer};

/// Who answers in the training rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutUser {
    /// The learned user model's frozen snapshot (model-based: imagined conversations).
    Model,
    /// The environment (model-free: real conversations).
    Environment,
}

/// Where the user model lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UserModelKind {
    /// The policy's own weights (one model, the seed's design); the snapshot is a frozen copy.
    Shared,
    /// A second model trained only by the user NLL (`user_model_path`, default `model`).
    Separate,
}

/// The real user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentKind {
    /// The testbed `dialogue` game's scripted user.
    Scripted,
    /// A command (argv, JSON on stdin; see `rlhf_rl::dialogue`).
    Command,
    /// An HTTP endpoint (JSON POST).
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EnvironmentConfig {
    /// scripted | command | http.
    pub source: EnvironmentKind,
    /// Program and arguments (`source = "command"`), run without a shell.
    pub command: Vec<String>,
    /// Endpoint (`source = "http"`).
    pub url: Option<String>,
    /// Per request, seconds.
    pub timeout_s: f64,
    /// Extra attempts after a failed request.
    pub retries: usize,
    /// Wait before the first retry, doubled for each further one.
    pub retry_backoff_s: f64,
}

impl Default for EnvironmentConfig {
    fn default() -> Self {
        EnvironmentConfig {
            source: EnvironmentKind::Scripted,
            command: Vec::new(),
            url: None,
            timeout_s: 60.0,
            retries: 2,
            retry_backoff_s: 0.5,
        }
    }
}

/// What a finished dialogue earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DialogueRewardKind {
    /// 1 if the user's reply signalled success, minus `turn_cost` per assistant turn.
    Success,
    /// `scorer` (a reward model over whole dialogues, a command, an HTTP endpoint) on the
    /// transcript, minus `turn_cost` per assistant turn.
    Scorer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DialogueRewardConfig {
    /// success | scorer.
    pub kind: DialogueRewardKind,
    /// Cost of each assistant turn.
    pub turn_cost: f64,
    /// The whole-dialogue scorer (`kind = "scorer"`).
    pub scorer: RewardConfig,
}

impl Default for DialogueRewardConfig {
    fn default() -> Self {
        DialogueRewardConfig {
            kind: DialogueRewardKind::Success,
            turn_cost: game::TURN_COST,
            scorer: RewardConfig::default(),
        }
    }
}

/// The configuration of `rlhf dialogue-rl`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DialogueRlConfig {
    /// Policy to start from (and, with `user_model = "shared"`, the user model): usually the
    /// `dialogue-sft` model trained on both roles. Needs a chat template.
    pub model: PathBuf,
    /// Reference policy of the KL term (default: `model`).
    pub ref_model: Option<PathBuf>,
    /// `dialogue`: the testbed game (its logs, held-out games and scripted user).
    pub task: Option<String>,
    /// Seed of the testbed task.
    pub task_seed: u64,
    /// Real conversations (`messages`, `user_context`): the prefixes branches start from and the
    /// assistant turns of the supervised steps (default: the task's logs).
    pub train_file: Option<PathBuf>,
    /// Real conversations whose user turns train the user model (default: `train_file`).
    pub user_file: Option<PathBuf>,
    /// Held-out real conversations: the user model's NLL and answer accuracy, and (their openings
    /// and user contexts) the evaluation games (default: the task's held-out logs and games).
    pub eval_file: Option<PathBuf>,
    /// model (imagined conversations with the user model) | environment (model-free).
    pub rollout_user: RolloutUser,
    /// shared | separate.
    pub user_model: UserModelKind,
    /// Initial weights of a separate user model (default: `model`).
    pub user_model_path: Option<PathBuf>,
    /// Sampling temperature of the user model.
    pub user_temperature: f64,
    /// Refresh the user model's frozen snapshot every this many iterations (0: never).
    pub snapshot_every: u64,
    /// The real user (evaluation, model-free rollouts, Dyna's real iterations).
    pub environment: EnvironmentConfig,
    /// A user reply starting with one of these ends the dialogue as won (learned and external
    /// users without a `won` field). Default: the testbed game's.
    pub win_prefixes: Vec<String>,
    /// Turn limit, horizon, turn length, policy sampling.
    pub turns: TurnConfig,
    /// RL iterations.
    pub iterations: u64,
    /// Real prefixes per iteration.
    pub prompts_per_step: usize,
    /// Branches per prefix (RLOO's k).
    pub k: usize,
    /// Prefixes are cut after the opening or after up to this many real assistant-user turns.
    pub max_prefix_turns: usize,
    /// What a finished dialogue earns.
    pub reward: DialogueRewardConfig,
    /// KL coefficient on the assistant tokens (in the reward, before the baseline).
    pub kl_beta: f64,
    /// A supervised step every this many iterations (0: none).
    pub supervised_every: u64,
    /// Real conversations per supervised step.
    pub supervised_batch: usize,
    /// α: weight of the assistant NLL in the supervised steps (0: user NLL only).
    pub assistant_nll_weight: f64,
    /// Every this many iterations roll out against the environment instead of the user model, and
    /// add those conversations to the user model's data (Dyna); 0: never.
    pub real_every: u64,
    /// Evaluate against the environment every this many iterations (0: at the start and end only).
    pub eval_every: u64,
    /// Held-out games per evaluation.
    pub eval_games: usize,
    /// Policy temperature in evaluation games (0: greedy). The default samples as the policy is
    /// trained to (a behaviour-cloned policy decoded greedily repeats its likeliest turn); the
    /// evaluation's sampling seed is fixed, so every evaluation of every run sees the same stream.
    pub eval_temperature: f64,
    /// Held-out conversations for the user model's metrics.
    pub eval_conversations: usize,
    /// Rows per optimiser micro-batch.
    pub micro_batch: usize,
    /// The run directory (config, metrics, checkpoints, evaluations, final model).
    pub output_dir: PathBuf,
    /// Seed of every random stream of the run (prefix draws, sampling).
    pub seed: u64,
    /// Checkpoint every this many iterations (0: never; the final model is always written).
    pub save_every: u64,
    /// Log metrics every this many iterations.
    pub log_every: u64,
    /// Optimiser (AdamW) of the policy (and of a separate user model), schedule and clipping.
    pub optim: OptimConfig,
    /// LoRA adapters instead of full fine-tuning (`r = 0`, the default: every weight trains); a
    /// separate user model gets adapters of its own, and the reference (without `ref_model`) is
    /// the base with adapters off.
    pub lora: rlhf_lm::lora::LoraConfig,
    /// Divergence trip-wire on each iteration's branches before the policy learns from them:
    /// mean assistant-only KL, mean assistant tokens per branch, the policy's perplexity on its own
    /// tokens, the RLOO loss. Off unless a bound is set.
    pub tripwire: TripwireConfig,
}

impl Default for DialogueRlConfig {
    fn default() -> Self {
        DialogueRlConfig {
            model: PathBuf::new(),
            ref_model: None,
            task: None,
            task_seed: 0,
            train_file: None,
            user_file: None,
            eval_file: None,
            rollout_user: RolloutUser::Model,
            user_model: UserModelKind::Shared,
            user_model_path: None,
            user_temperature: 1.0,
            snapshot_every: 10,
            environment: EnvironmentConfig::default(),
            win_prefixes: vec!["yes !".into()],
            turns: TurnConfig::default(),
            iterations: 100,
            prompts_per_step: 16,
            k: 4,
            max_prefix_turns: 2,
            reward: DialogueRewardConfig::default(),
            kl_beta: 0.05,
            supervised_every: 4,
            supervised_batch: 16,
            assistant_nll_weight: 0.5,
            real_every: 0,
            eval_every: 20,
            eval_games: 200,
            eval_temperature: 1.0,
            eval_conversations: 100,
            micro_batch: 32,
            output_dir: PathBuf::from("runs/dialogue-rl"),
            seed: 0,
            save_every: 20,
            log_every: 1,
            optim: OptimConfig {
                lr: 1e-4,
                ..OptimConfig::default()
            },
            lora: Default::default(),
            tripwire: TripwireConfig::default(),
        }
    }
}

/// One evaluation against the environment.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DialogueEval {
    pub iteration: u64,
    /// Dialogues with the environment consumed by training so far.
    pub real_episodes: u64,
    pub imagined_episodes: u64,
    pub games: usize,
    pub success_rate: f64,
    /// Mean assistant turns per game.
    pub mean_turns: f64,
    /// Mean of 1[won] − turn_cost · turns (the testbed game's gold, at its own cost of 0.1).
    pub mean_return: f64,
    /// The user model's held-out NLL per user token.
    pub user_nll: Option<f64>,
    /// Share of held-out user turns the user model's greedy reply reproduces exactly.
    pub user_answer_accuracy: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DialogueRlSummary {
    pub iterations: u64,
    pub real_episodes: u64,
    pub imagined_episodes: u64,
    pub evals: Vec<DialogueEval>,
}

/// State saved in every checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    iteration: u64,
    real_episodes: u64,
    imagined_episodes: u64,
    #[serde(default)]
    tripwire_rollbacks: usize,
}

/// What a trip-wire rollback returns to: the policy's weights and AdamW moments, a separate
/// user model's, and the user's frozen snapshot, as they were after `iteration` iterations.
/// (The iteration count goes on: a rolled-back iteration still counts.)
struct Restore {
    policy: HashMap<String, Tensor>,
    policy_optimizer: HashMap<String, Tensor>,
    user: Option<(HashMap<String, Tensor>, HashMap<String, Tensor>)>,
    user_snapshot: HashMap<String, Tensor>,
    iteration: u64,
}

/// Where a real conversation can be cut for a branch to continue it: after each user message
/// (the opening included) preceded by at most `max_prefix_turns` assistant messages and fewer than
/// `turn_limit`, unless that message already won (`win_prefixes`). A cut `c` keeps
/// `messages[..c]`.
pub fn prefix_cuts(
    d: &Dialogue,
    max_prefix_turns: usize,
    turn_limit: usize,
    win_prefixes: &[String],
) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut assistant = 0;
    for (i, m) in d.messages.iter().enumerate() {
        if m.role == "assistant" {
            assistant += 1;
        }
        if m.role == "user"
            && assistant <= max_prefix_turns
            && assistant < turn_limit
            && !starts_with_any(&m.content, win_prefixes)
        {
            cuts.push(i + 1);
        }
    }
    cuts
}

/// Leave-one-out advantages in groups of `k`.
pub fn loo_advantages(returns: &[f64], k: usize) -> Vec<f64> {
    returns
        .chunks(k)
        .flat_map(|g| {
            let total: f64 = g.iter().sum();
            g.iter()
                .map(move |&r| r - (total - r) / (g.len() - 1).max(1) as f64)
        })
        .collect()
}

fn environment(cfg: &DialogueRlConfig) -> Result<Box<dyn UserSimulator>> {
    let e = &cfg.environment;
    let timeout = Duration::from_secs_f64(e.timeout_s.max(0.001));
    Ok(match e.source {
        EnvironmentKind::Scripted => {
            if cfg.task.as_deref() != Some("dialogue") {
                return Err(TrainError::invalid(
                    "environment.source = \"scripted\" is the testbed game's user: set task = \"dialogue\", or use a command or http environment",
                ));
            }
            Box::new(ScriptedUser)
        }
        EnvironmentKind::Command => Box::new(ExternalUser::command(
            e.command.clone(),
            timeout,
            e.retries,
            e.retry_backoff_s,
            cfg.win_prefixes.clone(),
        )?),
        EnvironmentKind::Http => Box::new(ExternalUser::http(
            e.url.as_deref().ok_or_else(|| {
                TrainError::invalid("environment.source = \"http\" needs environment.url")
            })?,
            timeout,
            e.retries,
            e.retry_backoff_s,
            cfg.win_prefixes.clone(),
        )?),
    })
}

/// The real conversations: train, user-model data and held-out ones, and the held-out games.
struct Data {
    train: Vec<Dialogue>,
    user: Vec<Dialogue>,
    eval: Vec<Dialogue>,
    games: Vec<Dialogue>,
}

fn load_data(cfg: &DialogueRlConfig) -> Result<Data> {
    let testbed = match cfg.task.as_deref() {
        None => None,
        Some("dialogue") => Some(game::DialogueTask::new(
            cfg.task_seed,
            game::DialogueSize::default(),
        )),
        Some(other) => {
            return Err(TrainError::invalid(format!(
            "dialogue-rl: task `{other}` is single-turn; the multi-turn testbed task is `dialogue`"
        )))
        }
    };
    let from_logs = |logs: &[game::Log]| -> Vec<Dialogue> {
        logs.iter()
            .map(|l| Dialogue {
                user_context: Some(l.user_context.clone()),
                messages: l.messages.clone(),
            })
            .collect()
    };
    let train = match (&cfg.train_file, &testbed) {
        (Some(f), _) => load_dialogues(f)?,
        (None, Some(t)) => from_logs(t.logs()),
        (None, None) => {
            return Err(TrainError::invalid(
                "dialogue-rl needs train_file or task = \"dialogue\"",
            ))
        }
    };
    let user = match &cfg.user_file {
        Some(f) => load_dialogues(f)?,
        None => train.clone(),
    };
    let eval = match (&cfg.eval_file, &testbed) {
        (Some(f), _) => load_dialogues(f)?,
        (None, Some(t)) => from_logs(t.eval_logs()),
        (None, None) => Vec::new(),
    };
    let games: Vec<Dialogue> = match (&cfg.eval_file, &testbed) {
        (None, Some(t)) => t
            .eval_contexts()
            .iter()
            .map(|c| Dialogue {
                user_context: Some(c.clone()),
                messages: vec![Message::new("user", game::OPENING)],
            })
            .collect(),
        _ => eval
            .iter()
            .map(|d| {
                let first_user = d
                    .messages
                    .iter()
                    .position(|m| m.role == "user")
                    .unwrap_or(0);
                Dialogue {
                    user_context: d.user_context.clone(),
                    messages: d.messages[..=first_user].to_vec(),
                }
            })
            .collect(),
    };
    Ok(Data {
        train,
        user,
        eval,
        games: games.into_iter().take(cfg.eval_games).collect(),
    })
}

/// Supervised episodes of one view of `dialogues` (the user view for the user model).
fn view_episodes(renderer: &Renderer, dialogues: &[&Dialogue], view: View) -> Result<Vec<Episode>> {
    dialogues
        .iter()
        .map(|d| Ok(view_episode(renderer, d, view)?))
        .collect()
}

/// Token-mean NLL of `view`'s own role over `episodes` (differentiable).
fn view_nll(
    model: &Llama,
    episodes: &[Episode],
    view: View,
    pad_id: u32,
    device: &Device,
) -> Result<Tensor> {
    let roles = vec![view_role(view); episodes.len()];
    let (sum, n) = role_logprob_sum(model, episodes, &roles, pad_id, device)?;
    Ok((sum.neg()? / n.max(1.0))?)
}

/// The user model's held-out NLL per user token and the share of user turns (after an assistant
/// turn) whose reply (greedy when `user` samples at temperature 0) equals the real one.
fn user_model_metrics(
    user: &ModelUser,
    renderer: &Renderer,
    eval: &[Dialogue],
    device: &Device,
) -> Result<(Option<f64>, Option<f64>)> {
    if eval.is_empty() {
        return Ok((None, None));
    }
    let refs: Vec<&Dialogue> = eval.iter().collect();
    let episodes = view_episodes(renderer, &refs, View::User)?;
    let roles = vec![Role::User; episodes.len()];
    let nll = role_nll_per_token(&user.model, &episodes, &roles, user.pad_id, 32, device)?;
    // Every user reply to an assistant turn, as a branch ending at that assistant turn.
    let mut branches = Vec::new();
    let mut truth = Vec::new();
    for d in eval {
        for (i, m) in d.messages.iter().enumerate() {
            if m.role == "user" && i > 0 && d.messages[i - 1].role == "assistant" {
                let prefix = Dialogue {
                    user_context: d.user_context.clone(),
                    messages: d.messages[..i].to_vec(),
                };
                branches.push(Branch::start(renderer, prefix)?);
                truth.push(m.content.trim().to_string());
            }
        }
    }
    let refs: Vec<&Branch> = branches.iter().collect();
    let replies = user.reply(renderer, &refs, 0)?;
    let right = replies
        .iter()
        .zip(&truth)
        .filter(|(r, t)| r.content.split_whitespace().eq(t.split_whitespace()))
        .count();
    Ok((
        Some(nll),
        (!truth.is_empty()).then(|| right as f64 / truth.len() as f64),
    ))
}

/// Returns of finished branches.
fn returns(
    cfg: &DialogueRlConfig,
    scorer: Option<&Rewarder>,
    renderer: &Renderer,
    branches: &[Branch],
) -> Result<Vec<f64>> {
    let cost = cfg.reward.turn_cost;
    match scorer {
        None => Ok(branches.iter().map(|b| success_return(b, cost)).collect()),
        Some(r) => {
            let texts = branches
                .iter()
                .map(|b| transcript(renderer.template, &b.dialogue.messages))
                .collect::<rlhf_lm::Result<Vec<_>>>()?;
            let ids = texts
                .iter()
                .map(|(p, c)| {
                    let mut c_ids = renderer.tokenizer.encode(c, false)?;
                    if let Some(&eos) = renderer.eos_ids.first() {
                        if c_ids.last() != Some(&eos) {
                            c_ids.push(eos);
                        }
                    }
                    Ok((renderer.tokenizer.encode(p, true)?, c_ids))
                })
                .collect::<rlhf_lm::Result<Vec<_>>>()?;
            let queries: Vec<Query> = texts
                .iter()
                .zip(&ids)
                .map(|((p, c), (pi, ci))| Query {
                    prompt: p,
                    completion: c,
                    prompt_ids: pi,
                    completion_ids: ci,
                })
                .collect();
            let (_, normed) = r.score(&queries)?;
            Ok(normed
                .iter()
                .zip(branches)
                .map(|(s, b)| s - cost * b.assistant_turns() as f64)
                .collect())
        }
    }
}

const EVAL_SEED: u64 = 4242;

/// Games against the environment on the held-out games: success rate, mean turns, mean return.
fn evaluate_games(
    cfg: &DialogueRlConfig,
    policy: &PolicySide,
    renderer: &Renderer,
    env: &dyn UserSimulator,
    games: &[Dialogue],
) -> Result<(f64, f64, f64)> {
    if games.is_empty() {
        return Ok((f64::NAN, f64::NAN, f64::NAN));
    }
    let mut branches = games
        .iter()
        .map(|g| Branch::start(renderer, g.clone()))
        .collect::<Result<Vec<_>>>()?;
    let turns = TurnConfig {
        temperature: cfg.eval_temperature,
        horizon: 0,
        ..cfg.turns.clone()
    };
    roll_out(policy, renderer, env, &mut branches, &turns, EVAL_SEED)?;
    let n = branches.len() as f64;
    let won = branches.iter().filter(|b| b.won).count() as f64 / n;
    let mean_turns = branches
        .iter()
        .map(|b| b.assistant_turns() as f64)
        .sum::<f64>()
        / n;
    // The testbed game's gold always costs its own 0.1 per turn, whatever the training reward.
    let cost = if cfg.task.as_deref() == Some("dialogue") {
        game::TURN_COST
    } else {
        cfg.reward.turn_cost
    };
    let ret = branches
        .iter()
        .map(|b| success_return(b, cost))
        .sum::<f64>()
        / n;
    Ok((won, mean_turns, ret))
}

pub fn run(cfg: &DialogueRlConfig, resume: bool, device: &Device) -> Result<DialogueRlSummary> {
    if cfg.k < 2 || cfg.prompts_per_step == 0 || cfg.micro_batch == 0 {
        return Err(TrainError::invalid(
            "dialogue-rl needs k >= 2 (leave-one-out baseline), prompts_per_step >= 1 and micro_batch >= 1",
        ));
    }
    // 1. Models: the policy (and shared user model), the reference, a separate user model if asked.
    let mut lm = TrainableLm::load(&cfg.model, device)?;
    lm.enable_lora(&cfg.lora, cfg.seed)?;
    // Taken before a resumed run loads its checkpoint: the starting weights.
    let reference = match &cfg.ref_model {
        Some(p) => TrainableLm::load(p, device)?.model(device)?.detached(),
        None => lm.reference_model(device)?,
    };
    let renderer = renderer_for(lm.chat_template.as_ref(), &lm.tokenizer, &lm.eos_ids)?;
    let separate = match cfg.user_model {
        UserModelKind::Shared => None,
        UserModelKind::Separate => {
            let mut u =
                TrainableLm::load(cfg.user_model_path.as_deref().unwrap_or(&cfg.model), device)?;
            u.enable_lora(&cfg.lora, rlhf_train::rng::stream_seed(cfg.seed, "ulor"))?;
            Some(u)
        }
    };
    let data = load_data(cfg)?;
    let env = environment(cfg)?;
    let scorer = match cfg.reward.kind {
        DialogueRewardKind::Success => None,
        DialogueRewardKind::Scorer => Some(Rewarder::from_config(
            &cfg.reward.scorer,
            None,
            cfg.task_seed,
            &lm.tokenizer,
            device,
        )?),
    };
    let model_based = cfg.rollout_user == RolloutUser::Model;
    let train_user = model_based || cfg.real_every > 0;
    let supervised_steps = cfg
        .iterations
        .checked_div(cfg.supervised_every)
        .unwrap_or(0);
    // Policy steps: one per iteration, plus the supervised steps that touch the policy.
    let policy_supervised = match (cfg.user_model, train_user) {
        (UserModelKind::Shared, true) => true,
        _ => cfg.assistant_nll_weight > 0.0,
    };
    let total = cfg.iterations
        + if policy_supervised {
            supervised_steps
        } else {
            0
        };
    // 2. The run (or its latest checkpoint, with the user snapshot saved beside it).
    let mut trainer = Trainer::start(&cfg.output_dir, cfg, &lm, &cfg.optim, total, resume)?;
    let mut user_optimizer = match &separate {
        Some(u) => Some(Optimizer::new(u, &cfg.optim, supervised_steps.max(1))?),
        None => None,
    };
    let mut state: State = match &trainer.resumed_state {
        Some(s) => serde_json::from_value(s.clone())
            .map_err(|e| TrainError::invalid(format!("checkpoint state: {e}")))?,
        None => State::default(),
    };
    // The user's frozen snapshot: whole weights (with LoRA, the adapters merged into a copy).
    let mut snapshot: HashMap<String, Tensor> = match &separate {
        Some(u) => u.full_weights()?,
        None => lm.full_weights()?,
    };
    if let Some(dir) = trainer.resumed_from.clone() {
        snapshot = load_safetensors(&dir.join("user_snapshot.safetensors"), device)?;
        if let (Some(u), Some(opt)) = (&separate, user_optimizer.as_mut()) {
            u.load_weights(&load_safetensors(
                &dir.join("user_model.safetensors"),
                device,
            )?)?;
            opt.load_state(&load_safetensors(
                &dir.join("user_optimizer.safetensors"),
                device,
            )?)?;
        }
    }
    // Dyna's real conversations so far (only those before the checkpoint survive a resume).
    let real_path = cfg.output_dir.join("real_dialogues.jsonl");
    #[derive(Serialize, Deserialize)]
    struct RealRow {
        iteration: u64,
        dialogue: Dialogue,
    }
    let mut real_rows: Vec<RealRow> = if resume && real_path.is_file() {
        read_jsonl::<RealRow>(&real_path)?
            .into_iter()
            .filter(|r| r.iteration < state.iteration)
            .collect()
    } else {
        Vec::new()
    };
    let evals_path = cfg.output_dir.join("eval.jsonl");
    let mut evals: Vec<DialogueEval> = if resume && evals_path.is_file() {
        read_jsonl::<DialogueEval>(&evals_path)?
            .into_iter()
            .filter(|e| e.iteration <= state.iteration)
            .collect()
    } else {
        Vec::new()
    };
    let user_side = |weights: &HashMap<String, Tensor>, temperature: f64| -> Result<ModelUser> {
        let config = separate.as_ref().map_or(&lm.config, |u| &u.config);
        Ok(ModelUser {
            model: frozen_model(config, weights, device)?,
            pad_id: lm.pad_id,
            eos_ids: lm.eos_ids.clone(),
            tokenizer: lm.tokenizer.clone(),
            max_turn_tokens: cfg.turns.max_turn_tokens,
            temperature,
            batch_size: cfg.turns.batch_size,
            win_prefixes: cfg.win_prefixes.clone(),
        })
    };
    let evaluate = |lm: &TrainableLm,
                    snapshot: &HashMap<String, Tensor>,
                    state: &State|
     -> Result<DialogueEval> {
        let model = lm.model(device)?.detached();
        let policy = PolicySide {
            model: &model,
            tokenizer: &lm.tokenizer,
            pad_id: lm.pad_id,
            eos_ids: &lm.eos_ids,
        };
        let (success_rate, mean_turns, mean_return) =
            evaluate_games(cfg, &policy, &renderer, env.as_ref(), &data.games)?;
        let (user_nll, user_answer_accuracy) = if train_user {
            let eval: Vec<Dialogue> = data
                .eval
                .iter()
                .take(cfg.eval_conversations)
                .cloned()
                .collect();
            user_model_metrics(&user_side(snapshot, 0.0)?, &renderer, &eval, device)?
        } else {
            (None, None)
        };
        Ok(DialogueEval {
            iteration: state.iteration,
            real_episodes: state.real_episodes,
            imagined_episodes: state.imagined_episodes,
            games: data.games.len(),
            success_rate,
            mean_turns,
            mean_return,
            user_nll,
            user_answer_accuracy,
        })
    };
    if evals.is_empty() {
        let e = evaluate(&lm, &snapshot, &state)?;
        eprintln!(
            "dialogue-rl: start: success {:.3}, turns {:.2}",
            e.success_rate, e.mean_turns
        );
        evals.push(e);
        write_jsonl(&evals_path, &evals)?;
    }
    let progress = rlhf_train::progress(cfg.iterations, "dialogue-rl");
    progress.set_position(state.iteration);
    let seed = stream_seed(cfg.seed, "dlg-rl");
    let tw = &cfg.tripwire;
    let take = |lm: &TrainableLm,
                trainer: &Trainer,
                user_optimizer: &Option<Optimizer>,
                snapshot: &HashMap<String, Tensor>,
                iteration: u64|
     -> Result<Restore> {
        Ok(Restore {
            policy: lm.snapshot()?,
            policy_optimizer: trainer.optimizer_state()?,
            user: match (&separate, user_optimizer) {
                (Some(u), Some(o)) => Some((u.snapshot()?, o.state()?)),
                _ => None,
            },
            user_snapshot: snapshot.clone(),
            iteration,
        })
    };
    let (mut good, mut pending): (Option<Restore>, Option<Restore>) = (None, None);
    while state.iteration < cfg.iterations {
        let it = state.iteration;
        let started = std::time::Instant::now();
        // 1. Real prefixes: P conversations, each cut after its opening or a later user turn.
        let mut rng = StdRng::seed_from_u64(step_seed(seed, it));
        let mut starts = Vec::with_capacity(cfg.prompts_per_step * cfg.k);
        for _ in 0..cfg.prompts_per_step {
            let d = &data.train[rng.random_range(0..data.train.len())];
            let cuts = prefix_cuts(
                d,
                cfg.max_prefix_turns,
                cfg.turns.turn_limit,
                &cfg.win_prefixes,
            );
            let cut = if cuts.is_empty() {
                1
            } else {
                cuts[rng.random_range(0..cuts.len())]
            };
            let prefix = Dialogue {
                user_context: d.user_context.clone(),
                messages: d.messages[..cut].to_vec(),
            };
            let b = Branch::start(&renderer, prefix)?;
            starts.extend(std::iter::repeat_n(b, cfg.k));
        }
        // 2. k branches per prefix against the user model's frozen snapshot, or the environment.
        let real = !model_based || (cfg.real_every > 0 && (it + 1).is_multiple_of(cfg.real_every));
        let model = lm.model(device)?.detached();
        let policy = PolicySide {
            model: &model,
            tokenizer: &lm.tokenizer,
            pad_id: lm.pad_id,
            eos_ids: &lm.eos_ids,
        };
        let mut branches = starts;
        if real {
            roll_out(
                &policy,
                &renderer,
                env.as_ref(),
                &mut branches,
                &cfg.turns,
                step_seed(seed ^ 1, it),
            )?;
            state.real_episodes += branches.len() as u64;
        } else {
            let user = user_side(&snapshot, cfg.user_temperature)?;
            roll_out(
                &policy,
                &renderer,
                &user,
                &mut branches,
                &cfg.turns,
                step_seed(seed ^ 1, it),
            )?;
            state.imagined_episodes += branches.len() as u64;
        }
        // 3. Returns, the assistant-only KL to the reference, leave-one-out advantages.
        let g = returns(cfg, scorer.as_ref(), &renderer, &branches)?;
        let episodes: Vec<Episode> = branches.iter().map(Branch::rl_episode).collect();
        let mut kl = Vec::with_capacity(branches.len());
        for (chunk_e, chunk_b) in episodes
            .chunks(cfg.micro_batch)
            .zip(branches.chunks(cfg.micro_batch))
        {
            let batch = EpisodeBatch::new(chunk_e, lm.pad_id, device)?;
            let ref_lp = episode_logprobs(&reference, &batch, 1.0)?
                .broadcast_mul(&batch.assistant_mask)?
                .sum(1)?
                .to_vec1::<f32>()?;
            for (b, r) in chunk_b.iter().zip(ref_lp) {
                let sampled: f64 = b.sampled_logprobs().iter().map(|&x| x as f64).sum();
                kl.push(sampled - r as f64);
            }
        }
        let shaped: Vec<f64> = g
            .iter()
            .zip(&kl)
            .map(|(g, k)| g - cfg.kl_beta * k)
            .collect();
        let adv = loo_advantages(&shaped, cfg.k);
        // The trip-wire (when set) judges the branches before the policy learns from them.
        let mut tripped = None;
        if tw.enabled() {
            if good.is_none() {
                good = Some(take(&lm, &trainer, &user_optimizer, &snapshot, it)?);
            }
            let sampled: Vec<f32> = branches.iter().flat_map(|b| b.sampled_logprobs()).collect();
            let tokens = sampled.len().max(1) as f64;
            let length = sampled.len() as f64 / branches.len().max(1) as f64;
            let perplexity = (-sampled.iter().map(|&x| x as f64).sum::<f64>() / tokens).exp();
            let monitors = vec![
                ("kl", mean(&kl)),
                ("response_length", length),
                ("perplexity", perplexity),
            ];
            match tw.check(mean(&kl), length, perplexity) {
                None => {
                    if let Some(p) = pending.take() {
                        good = Some(p);
                    }
                }
                Some(why) => tripped = Some((format!("iteration {}: {why}", it + 1), monitors)),
            }
        }
        // 4. One RLOO step on the assistant tokens of the branches (the prefix is context).
        //    Data parallelism: this rank's share of the episodes (each part weighted by its share
        //    of all of them, so the ranks' gradients add up to the batch's).
        let mut acc = trainer.accumulator();
        let n = episodes.len();
        let world = rlhf_train::dist::world();
        let mine = world.share(n);
        let mut loss_sum = 0.0;
        if tripped.is_none() {
            for (idx, chunk) in episodes[mine.clone()].chunks(cfg.micro_batch).enumerate() {
                let batch = EpisodeBatch::new(chunk, lm.pad_id, device)?;
                let lp = episode_logprobs(&lm.model(device)?, &batch, 1.0)?;
                let first = mine.start + idx * cfg.micro_batch;
                let a = &adv[first..first + chunk.len()];
                let loss = (masked_sequence_loss(&lp, &batch.assistant_mask, a)?
                    * (chunk.len() as f64 / n as f64))?;
                let v = loss.to_scalar::<f32>()? as f64;
                if !trainer.check_loss("loss", v)? {
                    loss_sum = f64::NAN;
                    break;
                }
                loss_sum += v;
                acc.add(rlhf_lm::llama::backward(&loss)?)?;
            }
            let mut total = [loss_sum];
            world.sum_f64(&mut total)?;
            loss_sum = total[0];
            if let Some(why) = tw.check_loss(loss_sum, trainer.step + 1) {
                if loss_sum.is_finite() {
                    tripped = Some((why, vec![("loss", loss_sum)]));
                }
            }
        }
        if let Some((why, monitors)) = tripped {
            let to = good.take().expect("taken before the first judgement");
            lm.load_weights(&to.policy)?;
            trainer.restore_optimizer_state(&to.policy_optimizer)?;
            if let (Some(u), Some(o), Some((w, m))) = (&separate, user_optimizer.as_mut(), &to.user)
            {
                u.load_weights(w)?;
                o.load_state(m)?;
            }
            snapshot = to.user_snapshot.clone();
            pending = None;
            let stop =
                tw.action == TripAction::Stop || state.tripwire_rollbacks >= tw.max_rollbacks;
            let step = trainer.step;
            let run_dir = trainer.run.path().to_path_buf();
            rlhf_rl::tripwire::record(
                &mut |row| trainer.log(row),
                &run_dir,
                &why,
                stop,
                step,
                to.iteration,
                &monitors,
            )?;
            good = Some(to);
            if stop {
                break;
            }
            state.tripwire_rollbacks += 1;
            // The iteration counts (its policy step too), as a rolled-back PPO iteration does.
            trainer.skip()?;
            state.iteration += 1;
            progress.set_position(state.iteration);
            continue;
        }
        let stats = trainer.apply(acc.finish_across_ranks()?)?;
        let mut metrics = vec![
            ("return", mean(&g)),
            (
                "won",
                branches.iter().filter(|b| b.won).count() as f64 / n as f64,
            ),
            (
                "turns",
                branches
                    .iter()
                    .map(|b| b.assistant_turns() as f64)
                    .sum::<f64>()
                    / n as f64,
            ),
            ("kl", mean(&kl)),
            ("shaped_return", mean(&shaped)),
            ("real", f64::from(u8::from(real))),
            ("grad_norm", stats.grad_norm),
            ("lr", stats.lr),
        ];
        if real && train_user {
            real_rows.extend(branches.iter().map(|b| RealRow {
                iteration: it,
                dialogue: b.dialogue.clone(),
            }));
            write_jsonl(&real_path, &real_rows)?;
        }
        // 5. Interleaved supervised step on real conversations: user NLL (+ α assistant NLL).
        if cfg.supervised_every > 0 && (it + 1).is_multiple_of(cfg.supervised_every) {
            let mut rng = StdRng::seed_from_u64(step_seed(seed ^ 2, it));
            let pool_user: Vec<&Dialogue> = data
                .user
                .iter()
                .chain(real_rows.iter().map(|r| &r.dialogue))
                .collect();
            let user_batch: Vec<&Dialogue> = (0..cfg.supervised_batch)
                .map(|_| pool_user[rng.random_range(0..pool_user.len())])
                .collect();
            let asst_batch: Vec<&Dialogue> = (0..cfg.supervised_batch)
                .map(|_| &data.train[rng.random_range(0..data.train.len())])
                .collect();
            let user_eps = view_episodes(&renderer, &user_batch, View::User)?;
            let asst_eps = view_episodes(&renderer, &asst_batch, View::Assistant)?;
            let nll = |model: &Llama, eps: &[Episode], view: View| {
                view_nll(model, eps, view, lm.pad_id, device)
            };
            match (&separate, user_optimizer.as_mut()) {
                (None, _) => {
                    if train_user || cfg.assistant_nll_weight > 0.0 {
                        let model = lm.model(device)?;
                        let mut loss = None;
                        if train_user {
                            let l = nll(&model, &user_eps, View::User)?;
                            metrics.push(("user_nll", l.to_scalar::<f32>()? as f64));
                            loss = Some(l);
                        }
                        if cfg.assistant_nll_weight > 0.0 {
                            let l = nll(&model, &asst_eps, View::Assistant)?;
                            metrics.push(("assistant_nll", l.to_scalar::<f32>()? as f64));
                            let l = (l * cfg.assistant_nll_weight)?;
                            loss = Some(match loss {
                                Some(u) => (u + l)?,
                                None => l,
                            });
                        }
                        let loss = loss.expect("one of the two terms");
                        let mut acc = trainer.accumulator();
                        acc.add(rlhf_lm::llama::backward(&loss)?)?;
                        trainer.apply(acc.finish())?;
                    }
                }
                (Some(u), Some(opt)) => {
                    if train_user {
                        let l = nll(&u.model(device)?, &user_eps, View::User)?;
                        metrics.push(("user_nll", l.to_scalar::<f32>()? as f64));
                        let mut acc = opt.accumulator();
                        acc.add(rlhf_lm::llama::backward(&l)?)?;
                        let stats = opt.apply(acc.finish(), it / cfg.supervised_every)?;
                        if !stats.applied {
                            return Err(TrainError::invalid(format!(
                                "the user model's gradient norm is {} at iteration {it}: stopped before it reached its weights",
                                rlhf_train::faults::describe(stats.grad_norm)
                            )));
                        }
                    }
                    if cfg.assistant_nll_weight > 0.0 {
                        let l = nll(&lm.model(device)?, &asst_eps, View::Assistant)?;
                        metrics.push(("assistant_nll", l.to_scalar::<f32>()? as f64));
                        let mut acc = trainer.accumulator();
                        acc.add(rlhf_lm::llama::backward(&(l * cfg.assistant_nll_weight)?)?)?;
                        trainer.apply(acc.finish())?;
                    }
                }
                (Some(_), None) => unreachable!("a separate user model has its optimiser"),
            }
        }
        state.iteration += 1;
        // 6. Refresh the user model's frozen snapshot from its NLL-trained weights.
        if model_based
            && cfg.snapshot_every > 0
            && state.iteration.is_multiple_of(cfg.snapshot_every)
        {
            snapshot = match &separate {
                Some(u) => u.full_weights()?,
                None => lm.full_weights()?,
            };
        }
        metrics.push(("time/iteration_s", started.elapsed().as_secs_f64()));
        metrics.push(("real_episodes", state.real_episodes as f64));
        metrics.push(("imagined_episodes", state.imagined_episodes as f64));
        if state.iteration.is_multiple_of(cfg.log_every.max(1)) || state.iteration == cfg.iterations
        {
            trainer.log(&metrics)?;
        }
        if state.iteration == cfg.iterations {
            write_jsonl(
                &cfg.output_dir.join("samples.jsonl"),
                &branches.iter().map(|b| &b.dialogue).collect::<Vec<_>>(),
            )?;
        }
        // 7. Evaluation against the environment, then the checkpoint.
        let eval_now = (cfg.eval_every > 0 && state.iteration.is_multiple_of(cfg.eval_every))
            || state.iteration == cfg.iterations;
        if eval_now {
            let e = evaluate(&lm, &snapshot, &state)?;
            record_eval(e, &mut trainer, &mut evals, &evals_path)?;
        }
        if cfg.save_every > 0
            && state.iteration.is_multiple_of(cfg.save_every)
            && state.iteration < cfg.iterations
        {
            let mut extra: Vec<(&str, &HashMap<String, Tensor>)> =
                vec![("user_snapshot", &snapshot)];
            let (user_weights, user_state);
            if let (Some(u), Some(opt)) = (&separate, &user_optimizer) {
                user_weights = u.snapshot()?;
                user_state = opt.state()?;
                extra.push(("user_model", &user_weights));
                extra.push(("user_optimizer", &user_state));
            }
            let value = serde_json::to_value(&state).expect("serialisable");
            trainer.checkpoint_with(&lm, value, &extra)?;
        }
        if tw.enabled()
            && state
                .iteration
                .is_multiple_of(tw.snapshot_interval(cfg.save_every))
        {
            // Good once the next iteration's branches pass the wire.
            pending = Some(take(
                &lm,
                &trainer,
                &user_optimizer,
                &snapshot,
                state.iteration,
            )?);
        }
        progress.set_position(state.iteration);
        progress.set_message(format!("return {:.3}", mean(&g)));
    }
    progress.finish_and_clear();
    // 8. The final policy (and a separate user model beside it), evaluated if the trip-wire
    //    ended the run (or its last iterations) before the regular final evaluation.
    if evals.last().map(|e| e.iteration) != Some(state.iteration) {
        let e = evaluate(&lm, &snapshot, &state)?;
        record_eval(e, &mut trainer, &mut evals, &evals_path)?;
    }
    trainer.finish(&lm)?;
    if let Some(u) = &separate {
        u.save(&cfg.output_dir.join("user_model"))?;
    }
    let summary = DialogueRlSummary {
        iterations: state.iteration,
        real_episodes: state.real_episodes,
        imagined_episodes: state.imagined_episodes,
        evals,
    };
    write_json(&cfg.output_dir.join("summary.json"), &summary)?;
    Ok(summary)
}

/// Log an evaluation's headline numbers and add it to `eval.jsonl`.
fn record_eval(
    e: DialogueEval,
    trainer: &mut Trainer,
    evals: &mut Vec<DialogueEval>,
    path: &std::path::Path,
) -> Result<()> {
    trainer.log(&[
        ("eval/success_rate", e.success_rate),
        ("eval/mean_turns", e.mean_turns),
        ("eval/mean_return", e.mean_return),
    ])?;
    evals.push(e);
    write_jsonl(path, evals)
}

/// `rlhf dialogue-rl`.
pub static ENTRY: Entry<DialogueRlConfig, DialogueRlSummary> = Entry {
    name: "dialogue-rl",
    about: "Multi-turn RL: RLOO in imagined conversations with a learned user model (or model-free against the real user).",
    family: Family::Iterative,
    shorthands: &[],
    run,
};
