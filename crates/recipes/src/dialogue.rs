//! `rlhf compare-dialogue`: the multi-turn study on the testbed's `dialogue` game, over seeds.
//!
//! Once: a fresh tiny model with the game's chat template (`sft_seed`); `dialogue-sft` on the
//! logged conversations of the mediocre scripted assistant (assistant turns cloned, user turns
//! modelled, one model), and the reward model over dialogues. Per seed: `dialogue-rl` variants
//! from that model, each evaluated against the **scripted user** (the real environment) on held-out
//! games. Seeds vary the RL runs (prefix draws, sampling); the supervised models are trained once,
//! because on two cores they cost more than all RL runs of a seed together:
//!
//! - `sft`: the behaviour-cloned policy (every run's first evaluation);
//! - `model-based`: RLOO in imagined conversations with the frozen user-model snapshot only;
//! - `model-free`: the same RLOO against the scripted user (every episode real);
//! - `dyna`: model-based with every `dyna_real_every`-th iteration against the scripted user, its
//!   conversations added to the user model's data (a small budget of real conversations);
//! - `user-10pct`: model-based with the user model trained on only `few_logs_fraction` of the logs
//!   (SFT and RL's user NLL), the assistant still cloned from all of them (the seed's worry: does a
//!   policy trained against a weaker user model transfer?);
//! - `rm-reward`: model-based with the reward of a reward model over whole dialogues, trained on
//!   simulated annotators' preferences between pairs of SFT conversations with the scripted user,
//!   instead of the success signal read from the user's reply;
//! - `separate-user`: model-based with a separate user model (a copy of the SFT model trained only
//!   by the user NLL) instead of the policy's own weights.
//!
//! Every run's `eval.jsonl` (success, turns, return, real episodes, user-model NLL and answer
//! accuracy at each evaluation) and a `report.json` / `table.md` with means and Student-t 95%
//! intervals over seeds are written under `out_dir`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_data::testbed::dialogue as game;
use rlhf_data::testbed::Annotator;
use rlhf_train::run::{read_jsonl, write_json};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_methods::dialogue_rl::{
    self, DialogueEval, DialogueRewardKind, DialogueRlConfig, RolloutUser, UserModelKind,
};
use rlhf_methods::dialogue_sft::{self, DialogueSftConfig};
use rlhf_methods::rm::{self, RmConfig};
use rlhf_rl::conversation::{transcript, Dialogue};
use rlhf_rl::dialogue::{
    renderer_for, roll_out, testbed_dialogue_model, Branch, PolicySide, ScriptedUser, TurnConfig,
};
use rlhf_rl::fit::FitConfig;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::preferences::{write_pairs, LabelledPair};
use rlhf_rl::trainer::OptimConfig;

use crate::compare::mean_ci;

pub const VARIANTS: &[&str] = &[
    "model-based",
    "model-free",
    "dyna",
    "user-10pct",
    "rm-reward",
    "separate-user",
];

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CompareDialogueConfig {
    pub out_dir: PathBuf,
    pub seeds: Vec<u64>,
    /// Seed of the game's logs and held-out games (the same data for every seed).
    pub task_seed: u64,
    /// Seed of the supervised models (initialisation, data order), trained once for all seeds.
    pub sft_seed: u64,
    /// Which `dialogue-rl` variants to run (see the module docs); `sft` is always reported.
    pub variants: Vec<String>,
    pub sft_epochs: usize,
    pub sft_lr: f64,
    pub iterations: u64,
    pub rl_lr: f64,
    pub kl_beta: f64,
    pub prompts_per_step: usize,
    pub k: usize,
    pub eval_every: u64,
    pub eval_games: usize,
    /// Share of the logs the `user-10pct` variant's user model sees.
    pub few_logs_fraction: f64,
    /// `dyna`: every this many iterations against the scripted user.
    pub dyna_real_every: u64,
    /// `rm-reward`: games whose two SFT conversations the annotators compare.
    pub rm_pairs: usize,
    pub rm_epochs: usize,
    pub rm_lr: f64,
    /// Annotator label-flip probability.
    pub noise: f64,
    /// Sample efficiency: real episodes a run needs to first reach this held-out success rate.
    pub success_target: f64,
    /// Keep a stage whose output is already there (an SFT model, a finished run's `summary.json`)
    /// instead of training it again: seeds can run in separate processes and be tabled together.
    pub reuse: bool,
}

impl Default for CompareDialogueConfig {
    fn default() -> Self {
        CompareDialogueConfig {
            out_dir: PathBuf::from("runs/compare-dialogue"),
            seeds: vec![0, 1, 2],
            task_seed: 0,
            sft_seed: 0,
            variants: VARIANTS.iter().map(|s| s.to_string()).collect(),
            sft_epochs: 4,
            sft_lr: 2e-3,
            iterations: 50,
            rl_lr: 2e-4,
            kl_beta: 0.02,
            prompts_per_step: 16,
            k: 4,
            eval_every: 10,
            eval_games: 200,
            few_logs_fraction: 0.1,
            dyna_real_every: 4,
            rm_pairs: 3000,
            rm_epochs: 6,
            rm_lr: 1e-3,
            noise: 0.25,
            success_target: 0.3,
            reuse: true,
        }
    }
}

/// One variant at one seed: its evaluations.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VariantRun {
    pub variant: String,
    pub seed: u64,
    pub evals: Vec<DialogueEval>,
    pub seconds: f64,
    /// Win rate of the training rollouts over the last 10 iterations (imagined for model-based
    /// runs, real for model-free): its gap to the held-out success measures how much the policy
    /// games its user model.
    pub train_won: Option<f64>,
}

/// A row of the table: the final evaluation's means over seeds.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DialogueRow {
    pub variant: String,
    pub seeds: usize,
    pub success: f64,
    pub success_ci95: f64,
    pub turns: f64,
    pub turns_ci95: f64,
    pub mean_return: f64,
    pub real_episodes: f64,
    pub imagined_episodes: f64,
    pub user_nll: Option<f64>,
    pub user_answer_accuracy: Option<f64>,
    /// Mean over seeds of the training rollouts' win rate at the end (see `VariantRun`).
    pub train_won: Option<f64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DialogueReport {
    pub runs: Vec<VariantRun>,
    pub rows: Vec<DialogueRow>,
    /// The success rate of the sample-efficiency columns.
    pub success_target: f64,
}

fn step(s: &str) {
    eprintln!("== {s}");
}

/// The game's data files (all logs, the first `fraction` of them, held-out logs).
fn write_data(cfg: &CompareDialogueConfig) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let dir = cfg.out_dir.join("data");
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let task = game::DialogueTask::new(cfg.task_seed, game::DialogueSize::default());
    let (all, few, eval) = (
        dir.join("logs.jsonl"),
        dir.join("logs-few.jsonl"),
        dir.join("eval_logs.jsonl"),
    );
    let n_few = ((task.logs().len() as f64 * cfg.few_logs_fraction).round() as usize).max(1);
    for (path, logs) in [
        (&all, task.logs()),
        (&few, &task.logs()[..n_few]),
        (&eval, task.eval_logs()),
    ] {
        game::write_logs(path, logs).map_err(|e| TrainError::io(path, e))?;
    }
    Ok((all, few, eval))
}

fn sft(
    cfg: &CompareDialogueConfig,
    init: &Path,
    train: &Path,
    user: &Path,
    out: PathBuf,
    seed: u64,
    device: &Device,
) -> Result<PathBuf> {
    if cfg.reuse && out.join("model/config.json").is_file() {
        return Ok(out.join("model"));
    }
    let c = DialogueSftConfig {
        model: init.to_path_buf(),
        train_file: train.to_path_buf(),
        user_file: Some(user.to_path_buf()),
        fit: FitConfig {
            output_dir: out.clone(),
            epochs: cfg.sft_epochs,
            batch_size: 32,
            max_len: 256,
            save_every: 0,
            log_every: 20,
            seed,
            optim: OptimConfig {
                lr: cfg.sft_lr,
                schedule: rlhf_train::ScheduleKind::Cosine,
                warmup_ratio: 0.05,
                min_lr_ratio: 0.1,
                weight_decay: 0.01,
                ..OptimConfig::default()
            },
            ..FitConfig::default()
        },
        ..DialogueSftConfig::default()
    };
    dialogue_sft::run(&c, false, device)?;
    Ok(out.join("model"))
}

/// Pairs of SFT conversations with the scripted user on the same hidden animal, labelled by a
/// simulated annotator from the game's gold; written as reward-model pairs over transcripts.
fn dialogue_pairs(
    cfg: &CompareDialogueConfig,
    sft_dir: &Path,
    out: &Path,
    seed: u64,
    device: &Device,
) -> Result<usize> {
    let lm = TrainableLm::load(sft_dir, device)?;
    let model = lm.model(device)?.detached();
    let renderer = renderer_for(lm.chat_template.as_ref(), &lm.tokenizer, &lm.eos_ids)?;
    let policy = PolicySide {
        model: &model,
        tokenizer: &lm.tokenizer,
        pad_id: lm.pad_id,
        eos_ids: &lm.eos_ids,
    };
    let task = game::DialogueTask::new(cfg.task_seed, game::DialogueSize::default());
    let mut branches = Vec::new();
    for i in 0..cfg.rm_pairs {
        let log = &task.logs()[i % task.logs().len()];
        let start = Dialogue {
            user_context: Some(log.user_context.clone()),
            messages: vec![rlhf_lm::Message::new("user", game::OPENING)],
        };
        let b = Branch::start(&renderer, start)?;
        branches.push(b.clone());
        branches.push(b);
    }
    roll_out(
        &policy,
        &renderer,
        &ScriptedUser,
        &mut branches,
        &TurnConfig::default(),
        seed ^ 0xd1a1,
    )?;
    let mut annotator = Annotator::new(cfg.noise, seed + 11);
    // Gold differences here are 0.1 per turn and 1 for winning: a temperature of 0.25 makes a
    // won-against-lost comparison clear and a one-turn difference a weak preference.
    annotator.temperature = 0.25;
    let mut pairs = Vec::new();
    for pair in branches.chunks(2) {
        let (a, b) = (&pair[0].dialogue.messages, &pair[1].dialogue.messages);
        if a == b {
            continue;
        }
        let (ga, gb) = (game::gold(a), game::gold(b));
        let (pa, ca) = transcript(renderer.template, a)?;
        let (_, cb) = transcript(renderer.template, b)?;
        let a_wins = annotator.prefer_gold(ga, gb);
        let (chosen, rejected) = if a_wins { (ca, cb) } else { (cb, ca) };
        pairs.push(LabelledPair {
            prompt: pa,
            chosen,
            rejected,
        });
    }
    write_pairs(out, &pairs)?;
    Ok(pairs.len())
}

fn rl_config(
    cfg: &CompareDialogueConfig,
    model: &Path,
    out: PathBuf,
    seed: u64,
) -> DialogueRlConfig {
    DialogueRlConfig {
        model: model.to_path_buf(),
        task: Some("dialogue".into()),
        task_seed: cfg.task_seed,
        output_dir: out,
        seed,
        iterations: cfg.iterations,
        optim: OptimConfig {
            lr: cfg.rl_lr,
            ..DialogueRlConfig::default().optim
        },
        kl_beta: cfg.kl_beta,
        prompts_per_step: cfg.prompts_per_step,
        k: cfg.k,
        eval_every: cfg.eval_every,
        eval_games: cfg.eval_games,
        save_every: 0,
        log_every: 5,
        ..DialogueRlConfig::default()
    }
}

pub fn run(cfg: &CompareDialogueConfig, device: &Device) -> Result<DialogueReport> {
    if let Some(v) = cfg
        .variants
        .iter()
        .find(|v| !VARIANTS.contains(&v.as_str()))
    {
        return Err(TrainError::invalid(format!(
            "compare-dialogue: unknown variant `{v}` (known: {})",
            VARIANTS.join(", ")
        )));
    }
    if cfg.seeds.is_empty() {
        return Err(TrainError::invalid(
            "compare-dialogue needs at least one seed",
        ));
    }
    step("the dialogue game's logs");
    let (all, few, _) = write_data(cfg)?;
    let out = &cfg.out_dir;
    let want = |v: &str| cfg.variants.iter().any(|x| x == v);
    step("tiny model, dialogue-sft on both roles");
    let init = out.join("init");
    if !(cfg.reuse && init.join("config.json").is_file()) {
        testbed_dialogue_model(cfg.sft_seed, device)?.save(&init)?;
    }
    let sft_all = sft(
        cfg,
        &init,
        &all,
        &all,
        out.join("sft"),
        cfg.sft_seed,
        device,
    )?;
    let sft_few = if want("user-10pct") {
        step(&format!(
            "dialogue-sft with the user model on {} of the logs",
            cfg.few_logs_fraction
        ));
        Some(sft(
            cfg,
            &init,
            &all,
            &few,
            out.join("sft-user-few"),
            cfg.sft_seed,
            device,
        )?)
    } else {
        None
    };
    let rm_dir = out.join("rm");
    if want("rm-reward") && !(cfg.reuse && rm_dir.join("model/config.json").is_file()) {
        step("reward model over dialogues: annotated pairs of SFT games");
        let pairs = out.join("dialogue_pairs.jsonl");
        let n = dialogue_pairs(cfg, &sft_all, &pairs, cfg.sft_seed, device)?;
        eprintln!("{n} labelled dialogue pairs");
        let rm_cfg = RmConfig {
            model: sft_all.clone(),
            train_file: pairs,
            fit: FitConfig {
                output_dir: rm_dir.clone(),
                epochs: cfg.rm_epochs,
                batch_size: 32,
                max_len: 256,
                save_every: 0,
                seed: cfg.sft_seed,
                optim: OptimConfig {
                    lr: cfg.rm_lr,
                    ..OptimConfig::default()
                },
                ..FitConfig::default()
            },
            ..RmConfig::default()
        };
        rm::run(&rm_cfg, false, device)?;
    }
    let mut runs = Vec::new();
    for &seed in &cfg.seeds {
        let dir = cfg.out_dir.join(format!("seed-{seed}"));
        for variant in VARIANTS.iter().filter(|v| want(v)) {
            step(&format!("seed {seed}: dialogue-rl `{variant}`"));
            let started = std::time::Instant::now();
            let out = dir.join(variant);
            if cfg.reuse && out.join("summary.json").is_file() {
                runs.push(variant_run(variant, seed, &out)?);
                continue;
            }
            let mut c = rl_config(cfg, &sft_all, out.clone(), seed);
            match *variant {
                "model-based" => {}
                "model-free" => c.rollout_user = RolloutUser::Environment,
                "dyna" => c.real_every = cfg.dyna_real_every,
                "separate-user" => c.user_model = UserModelKind::Separate,
                "user-10pct" => {
                    c.model = sft_few.clone().expect("trained above");
                    c.user_file = Some(few.clone());
                }
                "rm-reward" => {
                    c.reward.kind = DialogueRewardKind::Scorer;
                    c.reward.scorer.model = Some(rm_dir.join("model"));
                    c.reward.scorer.normalize = false;
                    // The reward model was trained on gold preferences that already charge for
                    // turns.
                    c.reward.turn_cost = 0.0;
                }
                _ => unreachable!("checked above"),
            }
            dialogue_rl::run(&c, false, device)?;
            write_json(&out.join("seconds.json"), &started.elapsed().as_secs_f64())?;
            runs.push(variant_run(variant, seed, &out)?);
        }
    }
    let report = DialogueReport {
        rows: rows(&runs),
        runs,
        success_target: cfg.success_target,
    };
    write_json(&cfg.out_dir.join("report.json"), &report)?;
    let md = format_markdown(&report);
    rlhf_train::run::write_atomic(&cfg.out_dir.join("table.md"), md.as_bytes())?;
    Ok(report)
}

/// A finished run as the table reads it: its evaluations, wall time and final training win rate.
fn variant_run(variant: &str, seed: u64, out: &Path) -> Result<VariantRun> {
    Ok(VariantRun {
        variant: variant.to_string(),
        seed,
        evals: read_jsonl(&out.join("eval.jsonl"))?,
        seconds: rlhf_train::run::read_json::<f64>(&out.join("seconds.json")).unwrap_or(f64::NAN),
        train_won: train_won(out)?,
    })
}

/// Mean `won` of a run's last 10 logged training iterations (`metrics.jsonl`).
fn train_won(run: &Path) -> Result<Option<f64>> {
    let rows: Vec<serde_json::Value> = read_jsonl(&run.join("metrics.jsonl"))?;
    let won: Vec<f64> = rows.iter().filter_map(|r| r["won"].as_f64()).collect();
    let tail = &won[won.len().saturating_sub(10)..];
    Ok((!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64))
}

/// The table's rows: `sft` from the first evaluation of every run that starts from the all-logs SFT
/// model (one per seed), then each variant's final evaluation; means and Student-t 95% half-widths
/// over seeds.
pub fn rows(runs: &[VariantRun]) -> Vec<DialogueRow> {
    let mut out = Vec::new();
    let mut row = |variant: &str, evals: Vec<(&DialogueEval, f64)>, won: Vec<f64>| {
        if evals.is_empty() {
            return;
        }
        let col =
            |f: &dyn Fn(&DialogueEval) -> f64| evals.iter().map(|(e, _)| f(e)).collect::<Vec<_>>();
        let opt = |f: &dyn Fn(&DialogueEval) -> Option<f64>| {
            let v: Vec<f64> = evals.iter().filter_map(|(e, _)| f(e)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let (success, success_ci95) = mean_ci(&col(&|e| e.success_rate));
        let (turns, turns_ci95) = mean_ci(&col(&|e| e.mean_turns));
        let n = evals.len() as f64;
        out.push(DialogueRow {
            variant: variant.to_string(),
            seeds: evals.len(),
            success,
            success_ci95,
            turns,
            turns_ci95,
            mean_return: col(&|e| e.mean_return).iter().sum::<f64>() / n,
            real_episodes: col(&|e| e.real_episodes as f64).iter().sum::<f64>() / n,
            imagined_episodes: col(&|e| e.imagined_episodes as f64).iter().sum::<f64>() / n,
            user_nll: opt(&|e| e.user_nll),
            user_answer_accuracy: opt(&|e| e.user_answer_accuracy),
            train_won: (!won.is_empty()).then(|| won.iter().sum::<f64>() / won.len() as f64),
            seconds: evals.iter().map(|(_, s)| s).sum::<f64>() / n,
        });
    };
    // The SFT row: one start evaluation per seed, from a run that starts at the all-logs SFT model.
    let mut seen = std::collections::BTreeSet::new();
    let starts: Vec<(&DialogueEval, f64)> = runs
        .iter()
        .filter(|r| r.variant != "user-10pct" && seen.insert(r.seed))
        .filter_map(|r| r.evals.first().map(|e| (e, 0.0)))
        .collect();
    row("sft", starts, Vec::new());
    for v in VARIANTS {
        let finals: Vec<(&DialogueEval, f64)> = runs
            .iter()
            .filter(|r| r.variant == *v)
            .filter_map(|r| r.evals.last().map(|e| (e, r.seconds)))
            .collect();
        let won: Vec<f64> = runs
            .iter()
            .filter(|r| r.variant == *v)
            .filter_map(|r| r.train_won)
            .collect();
        row(v, finals, won);
    }
    out
}

/// Real episodes a run needed to first reach `success` at an evaluation (None: never).
pub fn episodes_to_reach(evals: &[DialogueEval], success: f64) -> Option<u64> {
    evals
        .iter()
        .find(|e| e.success_rate >= success)
        .map(|e| e.real_episodes)
}

/// Mean held-out success of each variant over seeds at every evaluated iteration.
pub fn curves(runs: &[VariantRun]) -> Vec<(String, Vec<(u64, f64)>)> {
    let mut out = Vec::new();
    for v in VARIANTS {
        let mine: Vec<&VariantRun> = runs.iter().filter(|r| r.variant == *v).collect();
        let Some(first) = mine.first() else { continue };
        let points = first
            .evals
            .iter()
            .map(|e| e.iteration)
            .filter_map(|it| {
                let xs: Vec<f64> = mine
                    .iter()
                    .filter_map(|r| r.evals.iter().find(|e| e.iteration == it))
                    .map(|e| e.success_rate)
                    .collect();
                (xs.len() == mine.len()).then(|| (it, xs.iter().sum::<f64>() / xs.len() as f64))
            })
            .collect();
        out.push((v.to_string(), points));
    }
    out
}

pub fn format_markdown(report: &DialogueReport) -> String {
    let mut s = String::from(
        "| variant | seeds | success (95% CI) | turns (95% CI) | return | training-rollout win rate | real episodes | imagined episodes | user NLL | user answer acc. | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let f = |x: Option<f64>| x.map_or("—".to_string(), |v| format!("{v:.3}"));
    for r in &report.rows {
        s.push_str(&format!(
            "| {} | {} | {:.3} ± {:.3} | {:.2} ± {:.2} | {:.3} | {} | {:.0} | {:.0} | {} | {} | {:.0} |\n",
            r.variant,
            r.seeds,
            r.success,
            r.success_ci95,
            r.turns,
            r.turns_ci95,
            r.mean_return,
            f(r.train_won),
            r.real_episodes,
            r.imagined_episodes,
            f(r.user_nll),
            f(r.user_answer_accuracy),
            r.seconds
        ));
    }
    // Sample efficiency: real episodes to the target, per seed.
    s.push_str(&format!(
        "\nReal episodes until the held-out success rate first reaches {:.2} (per seed; `never` within the run):\n\n| variant | per seed |\n|---|---|\n",
        report.success_target
    ));
    for v in VARIANTS {
        let per: Vec<String> = report
            .runs
            .iter()
            .filter(|r| r.variant == *v)
            .map(|r| {
                episodes_to_reach(&r.evals, report.success_target)
                    .map_or("never".to_string(), |n| n.to_string())
            })
            .collect();
        if !per.is_empty() {
            s.push_str(&format!("| {v} | {} |\n", per.join(", ")));
        }
    }
    s.push_str(&paired_markdown(&report.runs));
    // Curves: mean success over seeds at each evaluation.
    let c = curves(&report.runs);
    if let Some((_, first)) = c.first() {
        s.push_str("\nHeld-out success rate (mean over seeds) by iteration:\n\n| iteration |");
        for (v, _) in &c {
            s.push_str(&format!(" {v} |"));
        }
        s.push_str("\n|---|");
        s.push_str(&"---|".repeat(c.len()));
        s.push('\n');
        for (i, (it, _)) in first.iter().enumerate() {
            s.push_str(&format!("| {it} |"));
            for (_, pts) in &c {
                match pts.get(i) {
                    Some((_, y)) => s.push_str(&format!(" {y:.3} |")),
                    None => s.push_str(" — |"),
                }
            }
            s.push('\n');
        }
    }
    s
}

/// Paired t-tests of final held-out success between each variant and the first (model-based), on
/// the seeds both ran, Holm-adjusted over the variants; empty when no variant shares two seeds
/// with it.
pub fn paired_markdown(runs: &[VariantRun]) -> String {
    let finals = |v: &str| -> Vec<(u64, f64)> {
        runs.iter()
            .filter(|r| r.variant == v)
            .filter_map(|r| r.evals.last().map(|e| (r.seed, e.success_rate)))
            .collect()
    };
    let base = VARIANTS[0];
    let reference = finals(base);
    let mut tests = Vec::new();
    for v in &VARIANTS[1..] {
        let test = crate::stats::paired_by_seed(&finals(v), &reference);
        if test.n >= 2 {
            tests.push((v, test));
        }
    }
    if tests.is_empty() {
        return String::new();
    }
    let adjusted = crate::stats::holm(&tests.iter().map(|t| t.1.p).collect::<Vec<_>>());
    let mut s = format!(
        "\nFinal held-out success minus `{base}`'s on the same seeds (paired t-test; Holm over the rows):\n\n| variant | seeds | difference | 95% interval | p | Holm p |\n|---|---|---|---|---|---|\n"
    );
    for ((v, t), p_holm) in tests.iter().zip(adjusted) {
        s.push_str(&format!(
            "| {v} | {} | {:+.3} | [{:+.3}, {:+.3}] | {:.4} | {:.4} |\n",
            t.n, t.diff, t.ci95[0], t.ci95[1], t.p, p_holm
        ));
    }
    s
}
