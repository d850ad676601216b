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

use crate::curves::{
    at_first_crossing, mean_curve, mean_monitors, read_run, CurvePoint, MonitorPoint,
};
use crate::plot::{Interval, IntervalChart, Panel, Series};
use crate::stats::{holm, paired_by_seed, PairedTest};

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
    /// Also evaluate every this many iterations (the curves: win-rate, gold, proxy and KL
    /// against samples consumed); 0: only at the end.
    pub eval_every: u64,
    /// Rows of your own: `[variants.<name>]` with `method` (a registered online method or a
    /// built-in variant, with `-kN`) and `set` (overrides of that method's config), e.g. an
    /// ablation `ppo-no-token-kl = { method = "ppo", set = ["method.token_kl=false"] }`.
    pub variants: std::collections::BTreeMap<String, VariantConfig>,
    /// Gold win-rates for the sample-efficiency table (samples until the seed-mean curve first
    /// reaches each).
    pub winrate_targets: Vec<f64>,
    /// KLs at which the methods' gold win-rates are compared (interpolated on each curve).
    pub kl_levels: Vec<f64>,
    /// Where the plots (SVG) go; default: beside `table`, named after it.
    pub plots_dir: Option<PathBuf>,
}

/// A named row of a comparison: a method (with `-kN`) and overrides of its config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    pub method: String,
    #[serde(default)]
    pub set: Vec<String>,
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
            eval_every: 0,
            variants: Default::default(),
            winrate_targets: vec![0.6, 0.7],
            kl_levels: vec![1.0, 2.0, 3.0],
            plots_dir: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RunResult {
    pub method: String,
    pub seed: u64,
    pub eval: EvalReport,
    pub seconds: f64,
    /// The SFT point, then every evaluation of the run (`eval_every`), the last one final.
    #[serde(default)]
    pub curve: Vec<CurvePoint>,
    /// Training-time monitors in windows of 10 iterations.
    #[serde(default)]
    pub monitors: Vec<MonitorPoint>,
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
    /// Seed-mean curve (the seeds share their evaluation iterations).
    pub curve: Vec<CurvePoint>,
    /// Seed-mean monitors.
    pub monitors: Vec<MonitorPoint>,
    /// Per `winrate_targets`: samples until the seed-mean curve first reaches the target (linear
    /// between evaluations; None: never), and how many seeds' own curves reach it.
    pub samples_to_target: Vec<Option<f64>>,
    pub seeds_reaching: Vec<usize>,
    /// Per `kl_levels`: gold win-rate of the seed-mean curve where its KL first reaches the level
    /// (None: the method never moves that far from the reference).
    pub winrate_at_kl: Vec<Option<f64>>,
    /// The seed-mean curve's highest gold win-rate and where it was (the best checkpoint comes
    /// before any over-optimisation): None without a curve.
    pub peak: Option<CurvePoint>,
}

/// A paired t-test of two rows' final gold win-rates over the seeds both ran.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PairRow {
    pub a: String,
    pub b: String,
    pub test: PairedTest,
    /// Holm-adjusted p over every pair of the table.
    pub p_holm: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CompareReport {
    pub config: CompareConfig,
    pub sft: EvalReport,
    pub rows: Vec<MethodRow>,
    pub runs: Vec<RunResult>,
    /// Every pair of rows, in table order.
    #[serde(default)]
    pub pairs: Vec<PairRow>,
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

/// `name` -> (registered online method, k, the variant's overrides). A variant of the config
/// resolves to its method (itself any row name) plus its own overrides, applied last. `-kN` sets
/// `rollout.k`.
fn parse_method(
    cfg: &CompareConfig,
    name: &str,
) -> Result<(&'static dyn Registered, usize, Vec<String>)> {
    if let Some(v) = cfg.variants.get(name) {
        if v.method == name || cfg.variants.contains_key(&v.method) {
            return Err(TrainError::invalid(format!(
                "variant `{name}`: its method `{}` must be a registered method or built-in variant, not a variant of the config",
                v.method
            )));
        }
        let (m, k, mut sets) = parse_method(cfg, &v.method)
            .map_err(|e| TrainError::invalid(format!("variant `{name}`: {e}")))?;
        sets.extend(v.set.iter().cloned());
        return Ok((m, k, sets));
    }
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
    let (m, k, overrides) = parse_method(cfg, name)?;
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
        format!("eval.every={}", cfg.eval_every),
    ];
    sets.extend(overrides);
    let resolved: toml::Table = toml::from_str(&m.resolved_toml(None, &sets)?)
        .map_err(|e| TrainError::invalid(format!("{name}: {e}")))?;
    let method = resolved.get("method").and_then(|v| v.as_table());
    // A variant's own critic learning rate wins over the shared one.
    let variant_sets_value_lr = sets.iter().any(|s| s.starts_with("method.value_lr="));
    if method.is_some_and(|t| t.contains_key("value_lr")) && !variant_sets_value_lr {
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

pub use crate::stats::mean_ci;

/// One row of the report from its runs (one per seed): final means and interval, the seed-mean
/// curve and monitors, samples to each target, win-rate at each KL level, the peak.
pub fn aggregate(cfg: &CompareConfig, method: &str, runs: &[&RunResult]) -> MethodRow {
    let n = runs.len();
    let mean =
        |f: &dyn Fn(&RunResult) -> f64| runs.iter().map(|r| f(r)).sum::<f64>() / n.max(1) as f64;
    let (wr, half) = mean_ci(&runs.iter().map(|r| r.eval.winrate).collect::<Vec<_>>());
    let ci = if n >= 2 {
        [(wr - half).max(0.0), (wr + half).min(1.0)]
    } else {
        runs[0].eval.winrate_ci95
    };
    let curve = mean_curve(&runs.iter().map(|r| r.curve.as_slice()).collect::<Vec<_>>());
    let by_winrate = |c: &[CurvePoint]| -> Vec<(f64, f64)> {
        c.iter().map(|p| (p.winrate, p.samples)).collect()
    };
    let mean_by_winrate = by_winrate(&curve);
    let by_kl: Vec<(f64, f64)> = curve.iter().map(|p| (p.kl, p.winrate)).collect();
    MethodRow {
        method: method.into(),
        seeds: n,
        winrate: wr,
        winrate_ci95: ci,
        gold_mean: mean(&|r| r.eval.gold_mean.unwrap_or(f64::NAN)),
        kl: mean(&|r| r.eval.kl_to_ref.unwrap_or(f64::NAN)),
        length: mean(&|r| r.eval.mean_len),
        seconds: mean(&|r| r.seconds),
        samples_to_target: cfg
            .winrate_targets
            .iter()
            .map(|&t| at_first_crossing(&mean_by_winrate, t))
            .collect(),
        seeds_reaching: cfg
            .winrate_targets
            .iter()
            .map(|&t| {
                runs.iter()
                    .filter(|r| at_first_crossing(&by_winrate(&r.curve), t).is_some())
                    .count()
            })
            .collect(),
        winrate_at_kl: cfg
            .kl_levels
            .iter()
            .map(|&k| at_first_crossing(&by_kl, k))
            .collect(),
        peak: curve
            .iter()
            .copied()
            .max_by(|a, b| a.winrate.total_cmp(&b.winrate)),
        monitors: mean_monitors(
            &runs
                .iter()
                .map(|r| r.monitors.as_slice())
                .collect::<Vec<_>>(),
        ),
        curve,
    }
}

/// Paired t-tests of final win-rate between every two rows, on the seeds both ran, with Holm's
/// adjustment over all of them.
pub fn pairs(methods: &[String], runs: &[RunResult]) -> Vec<PairRow> {
    let finals = |m: &str| -> Vec<(u64, f64)> {
        runs.iter()
            .filter(|r| r.method == m)
            .map(|r| (r.seed, r.eval.winrate))
            .collect()
    };
    let mut rows = Vec::new();
    for (i, a) in methods.iter().enumerate() {
        for b in &methods[i + 1..] {
            rows.push(PairRow {
                a: a.clone(),
                b: b.clone(),
                test: paired_by_seed(&finals(a), &finals(b)),
                p_holm: f64::NAN,
            });
        }
    }
    let adjusted = holm(&rows.iter().map(|r| r.test.p).collect::<Vec<_>>());
    for (r, p) in rows.iter_mut().zip(adjusted) {
        r.p_holm = p;
    }
    rows
}

/// (samples spent before the first policy iteration, samples per iteration) of a finished run,
/// from its resolved `config.toml`.
fn run_shape(dir: &Path) -> Result<(f64, f64)> {
    let path = dir.join("config.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let t: toml::Table =
        toml::from_str(&text).map_err(|e| TrainError::bad_file(&path, e.to_string()))?;
    let int = |v: Option<&toml::Value>| v.and_then(|v| v.as_integer()).unwrap_or(0) as f64;
    let per = int(t.get("prompts_per_step"))
        * int(t
            .get("rollout")
            .and_then(|r| r.as_table())
            .and_then(|r| r.get("k")));
    let pre = int(t
        .get("method")
        .and_then(|m| m.as_table())
        .and_then(|m| m.get("critic_pretrain_iterations")));
    Ok((pre * per, per))
}

/// Iterations per window of the training-time monitors.
const MONITOR_WINDOW: u64 = 10;

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
            let (pre, per) = run_shape(&dir)?;
            let (curve, monitors) =
                read_run(&dir.join("metrics.jsonl"), &sft, pre, per, MONITOR_WINDOW)?;
            runs.push(RunResult {
                method: name.clone(),
                seed,
                eval,
                seconds,
                curve,
                monitors,
            });
        }
    }
    let rows = cfg
        .methods
        .iter()
        .map(|m| {
            aggregate(
                cfg,
                m,
                &runs.iter().filter(|r| &r.method == m).collect::<Vec<_>>(),
            )
        })
        .collect();
    let report = CompareReport {
        config: cfg.clone(),
        sft,
        rows,
        pairs: pairs(&cfg.methods, &runs),
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
        let plots = write_plots(&report, path)?;
        std::fs::write(path, format_markdown(&report, &plots))
            .map_err(|e| TrainError::io(path, e))?;
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

/// Where the figures of a report went, as the markdown links them (relative to the table).
#[derive(Debug, Clone, Default)]
pub struct Plots {
    pub frontier: String,
    pub curves: String,
    pub monitors: String,
    pub winrates: String,
}

/// The figures of a report, as SVG beside `table` (or in `plots_dir`), named after it:
/// `-frontier` (gold win-rate, gold and proxy reward against KL: the reward-KL frontier),
/// `-curves` (win-rate and KL against samples consumed), `-monitors` (the training-time collapse
/// monitors against iterations), each line a row's seed-mean curve; and `-winrates` (the table's
/// final gold win-rates with their 95% intervals, the SFT reference first).
pub fn write_plots(r: &CompareReport, table: &Path) -> Result<Plots> {
    let dir = match &r.config.plots_dir {
        Some(d) => d.clone(),
        None => table.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let stem = table
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "compare".into());
    // Linked by file name when the figures sit beside the table, else by their path.
    let file_name = |name: &str| format!("{stem}-{name}.svg");
    let link = |name: &str| -> String {
        if table.parent() == Some(dir.as_path()) {
            file_name(name)
        } else {
            dir.join(file_name(name)).display().to_string()
        }
    };
    let curve_series = |f: &dyn Fn(&CurvePoint) -> (f64, f64)| -> Vec<Series> {
        r.rows
            .iter()
            .map(|row| Series {
                name: row.method.clone(),
                points: row.curve.iter().map(f).collect(),
            })
            .collect()
    };
    let panel = |title: &str, x: &str, y: &str, series: Vec<Series>| Panel {
        title: title.into(),
        x_label: x.into(),
        y_label: y.into(),
        series,
    };
    let mut frontier = vec![
        panel(
            "gold win-rate vs SFT against KL",
            "KL(pi || pi_SFT)",
            "gold win-rate",
            curve_series(&|p| (p.kl, p.winrate)),
        ),
        panel(
            "gold reward against KL",
            "KL(pi || pi_SFT)",
            "gold reward",
            curve_series(&|p| (p.kl, p.gold)),
        ),
    ];
    if r.rows
        .iter()
        .any(|row| row.curve.iter().any(|p| p.proxy.is_finite()))
    {
        frontier.push(panel(
            "proxy reward against KL",
            "KL(pi || pi_SFT)",
            "reward-model score",
            curve_series(&|p| (p.kl, p.proxy)),
        ));
    }
    let curves = vec![
        panel(
            "gold win-rate vs SFT against samples",
            "completions sampled",
            "gold win-rate",
            curve_series(&|p| (p.samples, p.winrate)),
        ),
        panel(
            "KL against samples",
            "completions sampled",
            "KL(pi || pi_SFT)",
            curve_series(&|p| (p.samples, p.kl)),
        ),
    ];
    let monitor_series = |f: &dyn Fn(&MonitorPoint) -> f64| -> Vec<Series> {
        r.rows
            .iter()
            .map(|row| Series {
                name: row.method.clone(),
                points: row
                    .monitors
                    .iter()
                    .map(|m| (m.iteration as f64, f(m)))
                    .collect(),
            })
            .collect()
    };
    type Monitor = fn(&MonitorPoint) -> f64;
    let monitor_panels: [(&str, &str, Monitor); 5] = [
        ("proxy reward (raw, rollouts)", "reward", |m| m.reward_raw),
        ("gold reward (rollouts)", "gold", |m| m.gold),
        ("KL to the reference (rollouts)", "KL", |m| m.kl),
        ("response length", "tokens", |m| m.length),
        ("perplexity on own samples", "perplexity", |m| m.perplexity),
    ];
    let monitors: Vec<Panel> = monitor_panels
        .iter()
        .map(|(title, y, f)| panel(title, "iteration", y, monitor_series(f)))
        .collect();
    for (name, panels, columns) in [
        ("frontier", &frontier, 3),
        ("curves", &curves, 2),
        ("monitors", &monitors, 3),
    ] {
        crate::plot::write_svg(&dir.join(file_name(name)), panels, columns)?;
    }
    let interval = |name: &str, estimate: f64, interval: [f64; 2]| Interval {
        name: name.into(),
        estimate,
        interval,
    };
    let winrates = IntervalChart {
        title: "final gold win-rate vs SFT (95% interval)".into(),
        x_label: "gold win-rate".into(),
        rows: std::iter::once(interval(
            "SFT (reference)",
            r.sft.winrate,
            r.sft.winrate_ci95,
        ))
        .chain(
            r.rows
                .iter()
                .map(|row| interval(&row.method, row.winrate, row.winrate_ci95)),
        )
        .collect(),
        // A policy no better than SFT ties it half the time.
        reference: Some(0.5),
    };
    crate::plot::write_interval_svg(&dir.join(file_name("winrates")), &winrates)?;
    Ok(Plots {
        frontier: link("frontier"),
        curves: link("curves"),
        monitors: link("monitors"),
        winrates: link("winrates"),
    })
}

/// The rest of a markdown table head after its first cell: one column per level, then the rule.
fn column_head(columns: impl Iterator<Item = String>) -> String {
    let mut head = String::new();
    let mut n = 0;
    for c in columns {
        head.push_str(&format!(" {c} |"));
        n += 1;
    }
    format!("{head}\n|---|{}\n", "---|".repeat(n))
}

fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "-".into(),
    }
}

/// The markdown report written to docs/: the final table, the figures, sample efficiency,
/// win-rate at equal KL, paired tests, and the seed-mean curves and monitors.
pub fn format_markdown(r: &CompareReport, plots: &Plots) -> String {
    let c = &r.config;
    let mut s = String::new();
    s.push_str(&format!(
        "# Online methods on the `{}` testbed task\n\n\
         Gold win-rate against the SFT policy (wins + ties/2 over {} eval prompts, the same SFT reference \
         samples for every row), mean over seeds {:?} with a Student-t 95% interval over seeds; KL = mean \
         sequence-level KL(pi || pi_SFT) of the policy's eval samples; length in tokens. Every method \
         starts from the same SFT policy and trains on the {} for {} iterations of {} samples \
         ({} completions per run; PPO's critic pre-training rollouts count toward them, so PPO runs \
         fewer policy iterations). lr {}, beta {} (GRPO: k3 weight {}).{}\n\n",
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
        c.grpo_beta,
        if c.eval_every > 0 {
            format!(
                " Every run is also evaluated every {} iterations on the same prompts (the curves).",
                c.eval_every
            )
        } else {
            String::new()
        }
    ));
    let named: Vec<String> = c
        .methods
        .iter()
        .filter_map(|m| {
            let (method, set) = match c.variants.get(m) {
                Some(v) => (v.method.as_str(), v.set.join("`, `")),
                None => VARIANTS
                    .iter()
                    .find(|v| v.0 == m)
                    .map(|v| (v.1, v.2.join("`, `")))?,
            };
            Some(format!("`{m}` = `{method}` with `{set}`"))
        })
        .collect();
    if !named.is_empty() {
        s.push_str(&format!("Variants: {}.\n\n", named.join("; ")));
    }
    s.push_str(
        "| method | gold win-rate vs SFT | 95% interval | gold mean | KL | length | s / run |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|\n");
    let opt = |x: Option<f64>| fmt_opt(x, 3);
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
    s.push_str(&format!(
        "\n![final gold win-rates with 95% intervals]({})\n",
        plots.winrates
    ));
    let has_curves = r.rows.iter().any(|row| row.curve.len() > 2);
    if has_curves {
        s.push_str(&format!(
            "\n## Reward-KL frontier and curves\n\nEach line is a method's seed-mean curve, from the SFT policy (KL 0) \
             to the end of training; a method further up at the same KL optimises better for the \
             distance it moves.\n\n![reward-KL frontier]({})\n\n![win-rate and KL against samples]({})\n\n\
             Training-time monitors (rollout batches, seed means over windows of {MONITOR_WINDOW} iterations):\n\n![monitors]({})\n",
            plots.frontier, plots.curves, plots.monitors
        ));
        s.push_str("\n## Sample efficiency\n\nCompletions sampled until the seed-mean curve first reaches each gold win-rate (linear between evaluations; `-`: never within the budget), and how many seeds' own curves reach it.\n\n| method |");
        s.push_str(&column_head(
            c.winrate_targets.iter().map(|t| format!("win-rate {t}")),
        ));
        for row in &r.rows {
            s.push_str(&format!("| {} |", row.method));
            for (x, k) in row.samples_to_target.iter().zip(&row.seeds_reaching) {
                s.push_str(&format!(" {} ({k}/{}) |", fmt_opt(*x, 0), row.seeds));
            }
            s.push('\n');
        }
        s.push_str("\n## Peak and end\n\nThe seed-mean curve's highest gold win-rate, where it was reached, and how much of it is left at the end (a drop is over-optimisation of the proxy: the best checkpoint came before it).\n\n| method | peak win-rate | at iteration | at samples | at KL | final win-rate | final - peak |\n|---|---|---|---|---|---|---|\n");
        for row in &r.rows {
            if let (Some(p), Some(last)) = (row.peak, row.curve.last()) {
                s.push_str(&format!(
                    "| {} | {:.3} | {} | {:.0} | {:.2} | {:.3} | {:+.3} |\n",
                    row.method,
                    p.winrate,
                    p.iteration,
                    p.samples,
                    p.kl,
                    last.winrate,
                    last.winrate - p.winrate
                ));
            }
        }
        s.push_str("\n## Gold win-rate at equal KL\n\nThe seed-mean curve's gold win-rate where its KL to the SFT policy first reaches each level (linear between evaluations; `-`: the method never moves that far).\n\n| method |");
        s.push_str(&column_head(c.kl_levels.iter().map(|k| format!("KL {k}"))));
        for row in &r.rows {
            s.push_str(&format!("| {} |", row.method));
            for x in &row.winrate_at_kl {
                s.push_str(&format!(" {} |", opt(*x)));
            }
            s.push('\n');
        }
    }
    if r.pairs.iter().any(|p| p.test.n >= 2) {
        s.push_str("\n## Paired differences in final gold win-rate\n\nRow a minus row b on the same seeds (same SFT policy, same data order seed): mean difference, Student-t 95% interval, two-sided paired t-test p (`-` when every seed differs by the same amount: no test), and Holm's adjustment over every pair of the table. `real` when the Holm-adjusted p < 0.05.\n\n| a | b | seeds | a - b | 95% interval | p | Holm p | |\n|---|---|---|---|---|---|---|---|\n");
        for p in &r.pairs {
            let t = &p.test;
            s.push_str(&format!(
                "| {} | {} | {} | {:+.3} | [{:+.3}, {:+.3}] | {} | {} | {} |\n",
                p.a,
                p.b,
                t.n,
                t.diff,
                t.ci95[0],
                t.ci95[1],
                fmt_opt(Some(t.p), 4),
                fmt_opt(Some(p.p_holm), 4),
                if p.p_holm < 0.05 { "real" } else { "" }
            ));
        }
    }
    if has_curves {
        s.push_str("\n## Seed-mean curves\n\n<details><summary>evaluations (samples, gold win-rate, gold, proxy, KL, length)</summary>\n\n| method | iteration | samples | win-rate | gold | proxy | KL | length |\n|---|---|---|---|---|---|---|---|\n");
        for row in &r.rows {
            for p in &row.curve {
                s.push_str(&format!(
                    "| {} | {} | {:.0} | {:.3} | {:.3} | {} | {:.3} | {:.1} |\n",
                    row.method,
                    p.iteration,
                    p.samples,
                    p.winrate,
                    p.gold,
                    fmt_opt(Some(p.proxy), 3),
                    p.kl,
                    p.length
                ));
            }
        }
        s.push_str("\n</details>\n\n<details><summary>training-time monitors (window means: proxy raw reward, gold, KL, length, perplexity)</summary>\n\n| method | iteration | proxy (raw) | gold | KL | length | perplexity |\n|---|---|---|---|---|---|---|\n");
        for row in &r.rows {
            for m in &row.monitors {
                s.push_str(&format!(
                    "| {} | {} | {:.3} | {:.3} | {:.3} | {:.1} | {:.3} |\n",
                    row.method, m.iteration, m.reward_raw, m.gold, m.kl, m.length, m.perplexity
                ));
            }
        }
        s.push_str("\n</details>\n");
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
