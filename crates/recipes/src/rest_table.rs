//! ReST's Table 1 on the testbed (`rlhf compare-rest`): for each seed, a ReST run (BC -> Grow 1
//! with Improve steps at the threshold schedule -> Grow 2 ...) and online RLOO from the same SFT
//! policy against the same reward model with the same number of sampled completions. Every stage is
//! measured the same way (`rest::validate_model`: greedy completions of the validation prompts,
//! mean proxy reward and mean gold), reported as the mean over seeds with a Student-t 95% interval,
//! next to samples drawn and wall time. Writes `<out_dir>/rest-table.json` and a markdown table.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_train::run::{read_json, write_json};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_methods::rest::{self, RestConfig, RestSummary, Validation};
use rlhf_rl::eval::EvalReport;
use rlhf_rl::online::OnlineSummary;

use crate::compare::mean_ci;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RestTableConfig {
    pub task: String,
    pub task_seed: u64,
    /// The SFT (BC) policy and the reward model both methods optimise.
    pub sft_model: PathBuf,
    pub reward_model: PathBuf,
    pub seeds: Vec<u64>,
    /// A `rlhf rest` configuration (Grow/Improve settings); `model`, `task`, `reward`, `seed`,
    /// `output_dir` and `eval` are set per run.
    pub rest_config: Option<PathBuf>,
    /// `--set` overrides for the ReST runs, after `rest_config`.
    pub rest_overrides: Vec<String>,
    /// RLOO: samples per prompt, completions per iteration (the iteration count is chosen so
    /// RLOO samples as many completions as the ReST run did), lr, beta, completion length.
    pub rloo_k: usize,
    pub rloo_samples_per_step: usize,
    pub rloo_lr: f64,
    pub rloo_beta: f64,
    pub rloo_max_new_tokens: usize,
    /// Eval prompts of the final win-rate against the SFT policy (eval.json of both methods).
    pub eval_prompts: usize,
    pub out_dir: PathBuf,
    /// The markdown table (e.g. docs/rest.md); unset: only rest-table.json.
    pub table: Option<PathBuf>,
    /// Reuse finished runs (their summary.json / eval.json) to continue an interrupted table.
    pub reuse: bool,
}

impl Default for RestTableConfig {
    fn default() -> Self {
        RestTableConfig {
            task: "translate".into(),
            task_seed: 0,
            sft_model: "runs/quickstart-translate/sft/model".into(),
            reward_model: "runs/quickstart-translate/rm/model".into(),
            seeds: vec![0, 1, 2],
            rest_config: None,
            rest_overrides: Vec::new(),
            rloo_k: 4,
            rloo_samples_per_step: 64,
            rloo_lr: 1e-4,
            rloo_beta: 0.1,
            rloo_max_new_tokens: 18,
            eval_prompts: 200,
            out_dir: "runs/compare-rest".into(),
            table: None,
            reuse: false,
        }
    }
}

/// One seed: the ReST run's stages and RLOO's final policy, all validated alike.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SeedResult {
    pub seed: u64,
    pub rest: RestSummary,
    /// Each ReST stage's policy validated with samples at temperature 1 instead of ReST's own
    /// validation decoding (what the online methods optimise and are evaluated with).
    pub rest_sampled: Vec<Validation>,
    pub rloo_validation: Validation,
    pub rloo_sampled: Validation,
    pub rloo_samples: u64,
    pub rloo_seconds: f64,
    pub rloo_eval: Option<EvalReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RestTable {
    pub config: RestTableConfig,
    pub seeds: Vec<SeedResult>,
}

fn rest_sets(cfg: &RestTableConfig, seed: u64, dir: &Path) -> Vec<String> {
    let mut sets = vec![
        format!("model={}", cfg.sft_model.display()),
        format!("task={}", cfg.task),
        format!("task_seed={}", cfg.task_seed),
        "reward.source=model".into(),
        format!("reward.model={}", cfg.reward_model.display()),
        format!("seed={seed}"),
        format!("output_dir={}", dir.display()),
        format!("eval.task={}", cfg.task),
        format!("eval.task_seed={}", cfg.task_seed),
        format!("eval.reward_model={}", cfg.reward_model.display()),
        format!("eval.max_prompts={}", cfg.eval_prompts),
    ];
    sets.extend(cfg.rest_overrides.iter().cloned());
    sets
}

fn run_seed(cfg: &RestTableConfig, seed: u64, device: &Device) -> Result<SeedResult> {
    let registered = |name: &str| {
        rlhf_methods::method(name).ok_or_else(|| TrainError::invalid(format!("no method `{name}`")))
    };
    // 1. ReST.
    let rest_dir = cfg.out_dir.join("rest").join(format!("seed-{seed}"));
    let sets = rest_sets(cfg, seed, &rest_dir);
    let rest_cfg: RestConfig = rlhf_train::config::resolve(cfg.rest_config.as_deref(), &sets)?;
    let summary_path = rest_dir.join("summary.json");
    let rest: RestSummary = if cfg.reuse && summary_path.is_file() {
        read_json(&summary_path)?
    } else {
        eprintln!("== rest seed {seed}");
        let v = registered("rest")?.run(cfg.rest_config.as_deref(), &sets, false, device)?;
        serde_json::from_value(v).map_err(|e| TrainError::invalid(format!("rest: {e}")))?
    };
    // 2. RLOO with as many sampled completions.
    let per_step = cfg.rloo_samples_per_step.max(cfg.rloo_k);
    let steps = (rest.samples as u64).div_ceil(per_step as u64).max(1);
    let rloo_dir = cfg
        .out_dir
        .join(format!("rloo-k{}", cfg.rloo_k))
        .join(format!("seed-{seed}"));
    let rloo_sets = vec![
        format!("model={}", cfg.sft_model.display()),
        format!("task={}", cfg.task),
        format!("task_seed={}", cfg.task_seed),
        format!("output_dir={}", rloo_dir.display()),
        format!("rollout.k={}", cfg.rloo_k),
        format!("prompts_per_step={}", per_step / cfg.rloo_k),
        format!("rollout.max_new_tokens={}", cfg.rloo_max_new_tokens),
        format!("seed={seed}"),
        format!("steps={steps}"),
        "log_every=10".into(),
        "save_every=0".into(),
        "reward.source=model".into(),
        format!("reward.model={}", cfg.reward_model.display()),
        format!("kl.beta={}", cfg.rloo_beta),
        format!("optim.lr={}", cfg.rloo_lr),
        format!("eval.prompts={}", cfg.eval_prompts),
    ];
    let rloo_summary_path = rloo_dir.join("summary.json");
    let (rloo, rloo_seconds): (OnlineSummary, f64) = if cfg.reuse && rloo_summary_path.is_file() {
        read_json(&rloo_summary_path)?
    } else {
        eprintln!("== rloo-k{} seed {seed}: {steps} iterations", cfg.rloo_k);
        let started = std::time::Instant::now();
        let v = registered("rloo")?.run(None, &rloo_sets, false, device)?;
        let s: OnlineSummary =
            serde_json::from_value(v).map_err(|e| TrainError::invalid(format!("rloo: {e}")))?;
        let secs = started.elapsed().as_secs_f64();
        write_json(&rloo_summary_path, &(&s, secs))?;
        (s, secs)
    };
    // 3. RLOO's policy validated as ReST validates its stages; every policy also with samples at
    //    temperature 1.
    let validate = |c: &RestConfig, models: &[&Path]| -> Result<Vec<Validation>> {
        rest::validate_models(c, models, device)?
            .into_iter()
            .map(|v| {
                v.ok_or_else(|| {
                    TrainError::invalid("the ReST configuration has validation turned off")
                })
            })
            .collect()
    };
    let rloo_validation = validate(&rest_cfg, &[&rloo.model])?.remove(0);
    let mut at_t1 = rest_cfg.clone();
    at_t1.validation.temperature = 1.0;
    let mut models: Vec<&Path> = rest.stages.iter().map(|st| st.model.as_path()).collect();
    models.push(&rloo.model);
    let mut rest_sampled = validate(&at_t1, &models)?;
    let rloo_sampled = rest_sampled.pop().expect("RLOO's model is the last one");
    Ok(SeedResult {
        seed,
        rest_sampled,
        rloo_sampled,
        rloo_samples: rloo.samples,
        rloo_eval: rloo.eval.clone(),
        rest,
        rloo_validation,
        rloo_seconds,
    })
}

pub fn run(cfg: &RestTableConfig, device: &Device) -> Result<RestTable> {
    if cfg.seeds.is_empty() || cfg.rloo_k < 2 {
        return Err(TrainError::invalid(
            "compare-rest needs at least one seed and rloo_k >= 2",
        ));
    }
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| TrainError::io(&cfg.out_dir, e))?;
    let mut seeds = Vec::new();
    for &seed in &cfg.seeds {
        seeds.push(run_seed(cfg, seed, device)?);
    }
    let table = RestTable {
        config: cfg.clone(),
        seeds,
    };
    write_json(&cfg.out_dir.join("rest-table.json"), &table)?;
    if let Some(path) = cfg.table.as_ref().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::write(path, format_markdown(&table)).map_err(|e| TrainError::io(path, e))?;
    }
    Ok(table)
}

fn cell((m, h): (f64, f64), digits: usize) -> String {
    if h.is_nan() {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ± {h:.digits$}")
    }
}

fn stage_name(s: &rest::StageRecord) -> String {
    match s.improve {
        None => "BC (SFT)".into(),
        Some(i) => format!(
            "ReST G={} I={i} (τ = {})",
            s.grow,
            s.threshold.unwrap_or(f64::NAN)
        ),
    }
}

/// The markdown report: one row per stage (mean ± 95% interval over seeds), RLOO at equal samples,
/// the final win-rates, and per-seed numbers.
pub fn format_markdown(t: &RestTable) -> String {
    let c = &t.config;
    let n_stages = t
        .seeds
        .iter()
        .map(|s| s.rest.stages.len())
        .min()
        .unwrap_or(0);
    let mut s = format!(
        "Task `{}`; {} seed(s) {:?}; mean ± Student-t 95% half-width over seeds. Validation = completions \
         of the task's first validation prompts (greedy: ReST's own validation, which chooses each \
         Improve step's weights; T = 1: sampled, as the online methods train and are evaluated), \
         scored by the reward model (proxy, the reward ReST filters and selects on) and by gold \
         (chrF for `translate`; never seen by training or selection). Samples = completions sampled for training (validation samples not counted); \
         time = wall seconds from the start of the run to the end of the stage.\n\n",
        c.task,
        c.seeds.len(),
        c.seeds
    );
    s.push_str("| stage | samples | kept rows | gold (greedy) | proxy (greedy) | gold (T = 1) | proxy (T = 1) | time (s) |\n|---|---|---|---|---|---|---|---|\n");
    for k in 0..n_stages {
        let stages: Vec<&rest::StageRecord> = t.seeds.iter().map(|x| &x.rest.stages[k]).collect();
        let val = |f: &dyn Fn(&Validation) -> f64| -> Vec<f64> {
            stages
                .iter()
                .map(|st| st.validation.as_ref().map_or(f64::NAN, f))
                .collect()
        };
        let elapsed: Vec<f64> = t
            .seeds
            .iter()
            .map(|x| {
                let grow_s: f64 = x
                    .rest
                    .grows
                    .iter()
                    .take(x.rest.stages[k].grow)
                    .map(|g| g.seconds)
                    .sum();
                grow_s + x.rest.stages[..=k].iter().map(|st| st.seconds).sum::<f64>()
            })
            .collect();
        let sampled = |f: &dyn Fn(&Validation) -> f64| -> Vec<f64> {
            t.seeds.iter().map(|x| f(&x.rest_sampled[k])).collect()
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            stage_name(stages[0]),
            stages[0].samples,
            if stages[0].improve.is_some() {
                format!(
                    "{:.0}",
                    mean_ci(&stages.iter().map(|st| st.kept as f64).collect::<Vec<_>>()).0
                )
            } else {
                "-".into()
            },
            cell(mean_ci(&val(&|v| v.gold.unwrap_or(f64::NAN))), 4),
            cell(mean_ci(&val(&|v| v.reward)), 4),
            cell(mean_ci(&sampled(&|v| v.gold.unwrap_or(f64::NAN))), 4),
            cell(mean_ci(&sampled(&|v| v.reward)), 4),
            mean_ci(&elapsed).0,
        ));
    }
    let rv = |f: &dyn Fn(&Validation) -> f64| -> Vec<f64> {
        t.seeds.iter().map(|x| f(&x.rloo_validation)).collect()
    };
    let rs = |f: &dyn Fn(&Validation) -> f64| -> Vec<f64> {
        t.seeds.iter().map(|x| f(&x.rloo_sampled)).collect()
    };
    s.push_str(&format!(
        "| online RLOO k={} (equal samples) | {} | - | {} | {} | {} | {} | {:.0} |\n\n",
        c.rloo_k,
        t.seeds.first().map_or(0, |x| x.rloo_samples),
        cell(mean_ci(&rv(&|v| v.gold.unwrap_or(f64::NAN))), 4),
        cell(mean_ci(&rv(&|v| v.reward)), 4),
        cell(mean_ci(&rs(&|v| v.gold.unwrap_or(f64::NAN))), 4),
        cell(mean_ci(&rs(&|v| v.reward)), 4),
        mean_ci(&t.seeds.iter().map(|x| x.rloo_seconds).collect::<Vec<_>>()).0,
    ));
    // Final win-rates against the SFT policy (eval.json of each run: sampled at temperature 1).
    let wr = |f: &dyn Fn(&SeedResult) -> Option<f64>| -> Vec<f64> {
        t.seeds.iter().filter_map(f).collect()
    };
    let rest_wr = wr(&|x| x.rest.eval.as_ref().map(|e| e.winrate));
    let rloo_wr = wr(&|x| x.rloo_eval.as_ref().map(|e| e.winrate));
    if !rest_wr.is_empty() && !rloo_wr.is_empty() {
        s.push_str(&format!(
            "Final policies against the SFT policy on {} eval prompts (gold win-rate, samples at temperature 1, ties 1/2): ReST {}, RLOO {}; KL to SFT: ReST {}, RLOO {}.\n\n",
            c.eval_prompts,
            cell(mean_ci(&rest_wr), 3),
            cell(mean_ci(&rloo_wr), 3),
            cell(mean_ci(&wr(&|x| x.rest.eval.as_ref().and_then(|e| e.kl_to_ref))), 2),
            cell(mean_ci(&wr(&|x| x.rloo_eval.as_ref().and_then(|e| e.kl_to_ref))), 2),
        ));
    }
    // The same seeds' final win-rates, paired.
    let pairs: Vec<(f64, f64)> = t
        .seeds
        .iter()
        .filter_map(|x| Some((x.rest.eval.as_ref()?.winrate, x.rloo_eval.as_ref()?.winrate)))
        .collect();
    if pairs.len() >= 2 {
        let (a, b): (Vec<f64>, Vec<f64>) = pairs.into_iter().unzip();
        let p = crate::stats::paired_t(&a, &b);
        s.push_str(&format!(
            "ReST minus RLOO, paired over the {} seeds: {:+.3} (95% interval [{:+.3}, {:+.3}], paired t-test p = {:.4}).\n\n",
            p.n, p.diff, p.ci95[0], p.ci95[1], p.p
        ));
    }
    s.push_str("Per seed (validation gold / proxy):\n\n| seed | ");
    let names: Vec<String> = t
        .seeds
        .first()
        .map(|x| x.rest.stages.iter().map(stage_name).collect())
        .unwrap_or_default();
    s.push_str(&names.join(" | "));
    s.push_str(" | RLOO |\n|");
    s.push_str(&"---|".repeat(names.len() + 2));
    s.push('\n');
    for x in &t.seeds {
        let f = |v: Option<&Validation>| {
            v.map_or("-".into(), |v| {
                format!("{:.3} / {:.3}", v.gold.unwrap_or(f64::NAN), v.reward)
            })
        };
        s.push_str(&format!("| {} | ", x.seed));
        let cells: Vec<String> = x
            .rest
            .stages
            .iter()
            .map(|st| f(st.validation.as_ref()))
            .collect();
        s.push_str(&cells.join(" | "));
        s.push_str(&format!(" | {} |\n", f(Some(&x.rloo_validation))));
    }
    s
}
