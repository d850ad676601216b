//! The Back-to-Basics comparison on the testbed (a miniature of its Table 1): every online method
//! from the same SFT policy and reward model, with the same sample budget (samples per
//! iteration x iterations), over several seeds; each judged by gold win-rate against the SFT
//! policy on the task's eval prompts (the same reference samples for every row), with KL to the
//! SFT policy and response length. Writes `<out_dir>/compare.json` and a markdown table.
//!
//! A row is any online method of the registry (`rlhf_methods::registry`), with `-kN` for k
//! samples per prompt (`rloo-k4`, `raft-k2`, `grpo-k4`, `reinforce`, `vanilla-pg`, `ppo`), or a
//! variant of one (`ppo-plain`: PPO without the PPO-max reward normalisation + clipping or critic
//! pre-training). Each runs through its registry entry with the shared settings as overrides
//! ([`run_settings`]); PPO's critic pre-training rollouts count toward its budget.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::eval::{run_eval, EvalConfig, EvalReport};
use rlhf_rl::online::OnlineSummary;
use rlhf_rl::registry::{Family, Registered};
use rlhf_rl::reward_source::SourceKind;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CompareConfig {
    pub task: String,
    pub task_seed: u64,
    /// The SFT policy (also the reference) and the reward model.
    pub sft_model: PathBuf,
    pub reward_model: PathBuf,
    /// `model` (the proxy reward model, as in the paper) or `gold`.
    pub reward_source: SourceKind,
    pub methods: Vec<String>,
    pub seeds: Vec<u64>,
    /// Samples (completions) per iteration, for every method: prompts_per_step = this / k.
    pub samples_per_step: usize,
    /// Iterations; the budget is samples_per_step x steps completions.
    pub steps: u64,
    pub lr: f64,
    pub beta: f64,
    /// GRPO's k3 weight in the loss.
    pub grpo_beta: f64,
    pub value_lr: f64,
    pub max_new_tokens: usize,
    pub eval_prompts: usize,
    pub out_dir: PathBuf,
    /// The markdown table (e.g. docs/online-comparison-sentiment.md); none or empty: only
    /// compare.json.
    pub table: Option<PathBuf>,
    /// Skip runs whose eval.json already exists (to continue an interrupted comparison).
    pub reuse: bool,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            task: "sentiment".into(),
            task_seed: 0,
            sft_model: "runs/quickstart/sft/model".into(),
            reward_model: "runs/quickstart/rm/model".into(),
            reward_source: SourceKind::Model,
            methods: [
                "rloo-k4",
                "rloo-k2",
                "raft-k4",
                "raft-k2",
                "grpo-k4",
                "reinforce",
                "vanilla-pg",
                "ppo",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            seeds: vec![0, 1, 2],
            samples_per_step: 64,
            steps: 100,
            lr: 1e-4,
            beta: 0.1,
            grpo_beta: 0.04,
            value_lr: 1e-4,
            max_new_tokens: 24,
            eval_prompts: 200,
            out_dir: "runs/compare".into(),
            table: None,
            reuse: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RunResult {
    pub method: String,
    pub seed: u64,
    pub eval: EvalReport,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MethodRow {
    pub method: String,
    pub seeds: usize,
    /// Mean over seeds of the gold win-rate against the SFT policy.
    pub winrate: f64,
    /// 95% interval: Student-t over seeds (with one seed: that run's own interval).
    pub winrate_ci95: [f64; 2],
    pub gold_mean: f64,
    pub kl: f64,
    pub length: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompareReport {
    pub config: CompareConfig,
    pub sft: EvalReport,
    pub rows: Vec<MethodRow>,
    pub runs: Vec<RunResult>,
}

/// Named variants of a registered method, as (variant, method, overrides): `ppo-plain` is `ppo`
/// without the PPO-max components (reward normalisation + clipping, critic pre-training).
const VARIANTS: &[(&str, &str, &[&str])] = &[(
    "ppo-plain",
    "ppo",
    &[
        "method.reward_scaling=none",
        "method.reward_clip=0.0",
        "method.critic_pretrain_iterations=0",
    ],
)];

/// `name` -> (registered online method, k, the variant's overrides). `-kN` sets `rollout.k`.
fn parse_method(name: &str) -> Result<(&'static dyn Registered, usize, Vec<String>)> {
    let (base, k) = match name.rsplit_once("-k") {
        Some((b, k)) if k.chars().all(|c| c.is_ascii_digit()) && !k.is_empty() => {
            (b, k.parse::<usize>().expect("digits"))
        }
        _ => (name, 1),
    };
    let (method, overrides) = match VARIANTS.iter().find(|v| v.0 == base) {
        Some((_, m, o)) => (*m, o.iter().map(|s| s.to_string()).collect()),
        None => (base, Vec::new()),
    };
    match rlhf_methods::method(method).filter(|m| m.family() == Family::Online) {
        Some(m) => Ok((m, k, overrides)),
        None => {
            let online: Vec<&str> = rlhf_methods::registry()
                .into_iter()
                .filter(|m| m.family() == Family::Online)
                .map(|m| m.name())
                .chain(VARIANTS.iter().map(|v| v.0))
                .collect();
            Err(TrainError::invalid(format!(
                "unknown online method `{name}` (one of {}, with -kN for k samples per prompt)",
                online.join(", ")
            )))
        }
    }
}

/// The registered method a comparison row runs and its configuration overrides: the shared
/// settings (same SFT policy, reward, budget of `samples_per_step x steps` completions, eval),
/// `grpo_beta` as GRPO's KL weight, `value_lr` for methods with a value model, the variant's
/// overrides. A method that pre-trains a critic on rollouts of the initial policy
/// (`method.critic_pretrain_iterations`, PPO) is charged for them: it runs that many fewer
/// iterations, and pre-training never stops early (`critic_pretrain_tol = 0`), so every method
/// draws exactly `samples_per_step x steps` completions.
pub fn run_settings(
    cfg: &CompareConfig,
    name: &str,
    seed: u64,
    dir: &Path,
) -> Result<(&'static dyn Registered, Vec<String>)> {
    let (m, k, overrides) = parse_method(name)?;
    let mut sets: Vec<String> = vec![
        format!("model={}", cfg.sft_model.display()),
        format!("task={}", cfg.task),
        format!("task_seed={}", cfg.task_seed),
        format!("output_dir={}", dir.display()),
        format!("rollout.k={k}"),
        format!("prompts_per_step={}", (cfg.samples_per_step / k).max(1)),
        format!("rollout.max_new_tokens={}", cfg.max_new_tokens),
        format!("seed={seed}"),
        "log_every=1".into(),
        "save_every=0".into(),
        format!(
            "reward.source={}",
            serde_json::to_value(cfg.reward_source)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        ),
        format!("reward.model={}", cfg.reward_model.display()),
        format!(
            "kl.beta={}",
            if m.name() == "grpo" {
                cfg.grpo_beta
            } else {
                cfg.beta
            }
        ),
        format!("optim.lr={}", cfg.lr),
        format!("eval.prompts={}", cfg.eval_prompts),
    ];
    sets.extend(overrides);
    let resolved: toml::Table = toml::from_str(&m.resolved_toml(None, &sets)?)
        .map_err(|e| TrainError::invalid(format!("{name}: {e}")))?;
    let method = resolved.get("method").and_then(|v| v.as_table());
    if method.is_some_and(|t| t.contains_key("value_lr")) {
        sets.push(format!("method.value_lr={}", cfg.value_lr));
    }
    let pretrain = method
        .and_then(|t| t.get("critic_pretrain_iterations"))
        .and_then(|v| v.as_integer())
        .unwrap_or(0) as u64;
    if pretrain > 0 {
        if pretrain >= cfg.steps {
            return Err(TrainError::invalid(format!(
                "{name}: critic pre-training ({pretrain} rollout batches) would use the whole budget of {} iterations; raise steps",
                cfg.steps
            )));
        }
        sets.push("method.critic_pretrain_tol=0.0".into());
    }
    sets.push(format!("steps={}", cfg.steps - pretrain));
    Ok((m, sets))
}

fn run_one(
    cfg: &CompareConfig,
    name: &str,
    seed: u64,
    dir: &Path,
    device: &Device,
) -> Result<OnlineSummary> {
    let (m, sets) = run_settings(cfg, name, seed, dir)?;
    let summary = m.run(None, &sets, false, device)?;
    serde_json::from_value(summary)
        .map_err(|e| TrainError::invalid(format!("{name}: summary: {e}")))
}

fn last_wall_time(metrics: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(metrics).ok()?;
    let last = text.lines().rev().find(|l| !l.trim().is_empty())?;
    serde_json::from_str::<serde_json::Value>(last).ok()?["wall_time"].as_f64()
}

/// Two-sided 97.5% Student-t quantile for `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    if df == 0 {
        f64::NAN
    } else if df <= 10 {
        T[df - 1]
    } else {
        1.96 + 2.5 / df as f64
    }
}

/// Mean and Student-t 95% half-width over seeds (NaN half-width for one seed).
pub fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
    (mean, t975(n - 1) * sd / (n as f64).sqrt())
}

fn aggregate(method: &str, runs: &[&RunResult]) -> MethodRow {
    let n = runs.len();
    let mean =
        |f: &dyn Fn(&RunResult) -> f64| runs.iter().map(|r| f(r)).sum::<f64>() / n.max(1) as f64;
    let (wr, half) = mean_ci(&runs.iter().map(|r| r.eval.winrate).collect::<Vec<_>>());
    let ci = if n >= 2 {
        [(wr - half).max(0.0), (wr + half).min(1.0)]
    } else {
        runs[0].eval.winrate_ci95
    };
    MethodRow {
        method: method.into(),
        seeds: n,
        winrate: wr,
        winrate_ci95: ci,
        gold_mean: mean(&|r| r.eval.gold_mean.unwrap_or(f64::NAN)),
        kl: mean(&|r| r.eval.kl_to_ref.unwrap_or(f64::NAN)),
        length: mean(&|r| r.eval.mean_len),
        seconds: mean(&|r| r.seconds),
    }
}

pub fn run(cfg: &CompareConfig, device: &Device) -> Result<CompareReport> {
    if cfg.seeds.is_empty() || cfg.methods.is_empty() {
        return Err(TrainError::invalid(
            "compare needs at least one method and one seed",
        ));
    }
    // Every row's configuration is checked before the first run starts.
    for m in &cfg.methods {
        let (method, sets) = run_settings(cfg, m, 0, &cfg.out_dir)?;
        method.resolved_toml(None, &sets)?;
    }
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| TrainError::io(&cfg.out_dir, e))?;
    // The SFT row: the SFT policy against itself, with the reference samples every run uses.
    let sft = run_eval(
        &EvalConfig {
            policy: cfg.sft_model.clone(),
            reference: Some(cfg.sft_model.clone()),
            task: Some(cfg.task.clone()),
            task_seed: cfg.task_seed,
            reward_model: Some(cfg.reward_model.clone()),
            max_prompts: cfg.eval_prompts,
            max_new_tokens: cfg.max_new_tokens,
            seed: rlhf_rl::online::OnlineEvalConfig::default().seed,
            batch_size: rlhf_rl::rollout::RolloutConfig::default().batch_size,
            output: cfg.out_dir.join("sft-eval.json"),
            ..EvalConfig::default()
        },
        device,
    )?;
    let mut runs = Vec::new();
    for name in &cfg.methods {
        for &seed in &cfg.seeds {
            let dir = cfg.out_dir.join(name).join(format!("seed-{seed}"));
            let eval_path = dir.join("eval.json");
            let started = std::time::Instant::now();
            let eval: EvalReport = if cfg.reuse && eval_path.is_file() {
                let text = std::fs::read_to_string(&eval_path)
                    .map_err(|e| TrainError::io(&eval_path, e))?;
                serde_json::from_str(&text)
                    .map_err(|e| TrainError::bad_file(&eval_path, e.to_string()))?
            } else {
                eprintln!("== {name} seed {seed}");
                run_one(cfg, name, seed, &dir, device)?
                    .eval
                    .ok_or_else(|| TrainError::invalid("the run has no evaluation"))?
            };
            // The run's own time (the last `wall_time` in its metrics), also for a reused run.
            let seconds = last_wall_time(&dir.join("metrics.jsonl"))
                .unwrap_or_else(|| started.elapsed().as_secs_f64());
            eprintln!(
                "   {name} seed {seed}: win-rate {:.3}, gold {:.3}, KL {:.2}, length {:.1} ({seconds:.0} s)",
                eval.winrate,
                eval.gold_mean.unwrap_or(f64::NAN),
                eval.kl_to_ref.unwrap_or(f64::NAN),
                eval.mean_len
            );
            runs.push(RunResult {
                method: name.clone(),
                seed,
                eval,
                seconds,
            });
        }
    }
    let rows = cfg
        .methods
        .iter()
        .map(|m| {
            aggregate(
                m,
                &runs.iter().filter(|r| &r.method == m).collect::<Vec<_>>(),
            )
        })
        .collect();
    let report = CompareReport {
        config: cfg.clone(),
        sft,
        rows,
        runs,
    };
    let json = cfg.out_dir.join("compare.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&report).expect("serialisable"),
    )
    .map_err(|e| TrainError::io(&json, e))?;
    if let Some(path) = cfg.table.as_ref().filter(|p| !p.as_os_str().is_empty()) {
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|e| TrainError::io(d, e))?;
        }
        std::fs::write(path, format_markdown(&report)).map_err(|e| TrainError::io(path, e))?;
    }
    Ok(report)
}

/// The terminal table.
pub fn format_table(r: &CompareReport) -> String {
    let mut s = format!(
        "task {}: gold win-rate vs the SFT policy ({} seeds, {} samples per run)\n\n{:<12} {:>9} {:>17} {:>9} {:>8} {:>7}\n",
        r.config.task,
        r.config.seeds.len(),
        r.config.samples_per_step as u64 * r.config.steps,
        "method",
        "win-rate",
        "95% interval",
        "gold",
        "KL",
        "length"
    );
    let line = |name: &str, wr: f64, ci: [f64; 2], gold: f64, kl: f64, len: f64| {
        format!(
            "{:<12} {:>9.3} {:>17} {:>9.3} {:>8.2} {:>7.1}\n",
            name,
            wr,
            format!("[{:.3}, {:.3}]", ci[0], ci[1]),
            gold,
            kl,
            len
        )
    };
    s.push_str(&line(
        "sft",
        r.sft.winrate,
        r.sft.winrate_ci95,
        r.sft.gold_mean.unwrap_or(f64::NAN),
        r.sft.kl_to_ref.unwrap_or(f64::NAN),
        r.sft.mean_len,
    ));
    for row in &r.rows {
        s.push_str(&line(
            &row.method,
            row.winrate,
            row.winrate_ci95,
            row.gold_mean,
            row.kl,
            row.length,
        ));
    }
    s
}

/// The markdown table written to docs/.
pub fn format_markdown(r: &CompareReport) -> String {
    let c = &r.config;
    let mut s = String::new();
    s.push_str(&format!(
        "# Online methods on the `{}` testbed task\n\n\
         Gold win-rate against the SFT policy (wins + ties/2 over {} eval prompts, the same SFT reference \
         samples for every row), mean over seeds {:?} with a Student-t 95% interval over seeds; KL = mean \
         sequence-level KL(pi || pi_SFT) of the policy's eval samples; length in tokens. Every method \
         starts from the same SFT policy and trains on the {} for {} iterations of {} samples \
         ({} completions per run; PPO's critic pre-training rollouts count toward them, so PPO runs \
         fewer policy iterations). lr {}, beta {} (GRPO: k3 weight {}).\n\n",
        c.task,
        c.eval_prompts,
        c.seeds,
        match c.reward_source {
            SourceKind::Gold => "gold reward".to_string(),
            _ => format!("proxy reward model `{}`", c.reward_model.display()),
        },
        c.steps,
        c.samples_per_step,
        c.steps * c.samples_per_step as u64,
        c.lr,
        c.beta,
        c.grpo_beta
    ));
    s.push_str(
        "| method | gold win-rate vs SFT | 95% interval | gold mean | KL | length | s / run |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|\n");
    let opt = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.3}"));
    s.push_str(&format!(
        "| SFT (reference) | {:.3} | [{:.3}, {:.3}] | {} | {} | {:.1} | - |\n",
        r.sft.winrate,
        r.sft.winrate_ci95[0],
        r.sft.winrate_ci95[1],
        opt(r.sft.gold_mean),
        opt(r.sft.kl_to_ref),
        r.sft.mean_len
    ));
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {:.3} | [{:.3}, {:.3}] | {:.3} | {:.2} | {:.1} | {:.0} |\n",
            row.method,
            row.winrate,
            row.winrate_ci95[0],
            row.winrate_ci95[1],
            row.gold_mean,
            row.kl,
            row.length,
            row.seconds
        ));
    }
    s.push_str("\nPer run:\n\n| method | seed | win-rate | 95% interval (prompts) | gold | KL | length |\n|---|---|---|---|---|---|---|\n");
    for run in &r.runs {
        let e = &run.eval;
        s.push_str(&format!(
            "| {} | {} | {:.3} | [{:.3}, {:.3}] | {} | {} | {:.1} |\n",
            run.method,
            run.seed,
            e.winrate,
            e.winrate_ci95[0],
            e.winrate_ci95[1],
            opt(e.gold_mean),
            opt(e.kl_to_ref),
            e.mean_len
        ));
    }
    s
}
