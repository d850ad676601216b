//! RLP end to end (`rlhf rlp`; Lang, Huang, Li 2024, Algorithm 1) on one run directory:
//!
//! 1. (given) the SFT policy, the reward model r_φ and the human pairs D it was trained on
//!    (`rlhf quickstart` builds all three on the testbed);
//! 2. `policy/`: an online method of the registry (`policy_method`, PPO by default) from SFT
//!    against r_φ, rollouts as long as the evaluation's samples (the task's limit + 2 tokens);
//! 3. `samples.jsonl`: n = `samples_per_prompt` responses at temperature 1 from that policy for
//!    each unlabelled prompt (the task's train prompts, the first `unlabelled_prompts` of them);
//! 4. `rm-uml/`, `rm-spg/`: the refreshed reward models r̂ (`rlhf rlp-rm`, [`rlhf_methods::rlp`]);
//! 5. `policy-uml/`, `policy-spg/`: the same online method **from SFT again** against each r̂.
//!
//! Then `report.json` and `report.md`: gold win-rate against the SFT policy of PPO, RLP-UML and
//! RLP-SPG; the distribution shift (the pairwise accuracy against gold of r_φ and of each r̂, on
//! pairs of SFT samples and on pairs of the step-2 policy's samples, eval prompts); and SPG's
//! synthetic-pair agreement with gold next to select-all (γ = 0) and reward-ranked pairs.
//!
//! `--resume` skips finished stages (each leaves `model/` or its file) and resumes an unfinished
//! training stage from its checkpoint.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, Task};
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::llama::Llama;
use rlhf_train::rng::stream_seed;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_methods::rlp::{self as rlp_rm, RlpRmConfig, RlpRmSummary, SpgStats, Variant};
use rlhf_rl::eval::{judge, EvalReport, Judges, KlModels};
use rlhf_rl::fit::FitConfig;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::policy_samples::{read_groups, sample_groups, write_groups};
use rlhf_rl::registry::Family;
use rlhf_rl::reward::RewardModel;
use rlhf_rl::sampling::{sample, Generated};
use rlhf_rl::spg::Pairing;
use rlhf_rl::trainer::OptimConfig;

use crate::quickstart::clean_accuracy;

/// The configuration of `rlhf rlp`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RlpConfig {
    /// The testbed task (prompts, equivalence, gold for evaluation only).
    pub task: String,
    /// Seed of the task.
    pub task_seed: u64,
    /// Seed of every stage.
    pub seed: u64,
    /// The run directory of the whole pipeline.
    pub out_dir: PathBuf,
    /// The SFT policy (step 1).
    pub sft_model: PathBuf,
    /// The reward model r_φ trained on `prefs_file` (step 2).
    pub rm_model: PathBuf,
    /// The human preference pairs D.
    pub prefs_file: PathBuf,
    /// The online method of steps 3 and 5 (a registry name: ppo, rloo, reinforce, ...).
    pub policy_method: String,
    /// Iterations of that method.
    pub policy_steps: u64,
    /// Its learning rate.
    pub policy_lr: f64,
    /// Its KL coefficient.
    pub policy_beta: f64,
    /// Further `key=value` overrides of the method's configuration.
    pub policy_sets: Vec<String>,
    /// Unlabelled prompts U (the first this many train prompts of the task).
    pub unlabelled_prompts: usize,
    /// n, samples per unlabelled prompt.
    pub samples_per_prompt: usize,
    /// Temperature of those samples.
    pub temperature: f64,
    /// The refreshes to run: uml and/or spg.
    pub variants: Vec<Variant>,
    /// Where a refreshed reward model starts: `sft` (retrain, as the paper) or `rm` (continue r_φ).
    pub rm_init: String,
    /// Epochs of each refresh.
    pub rm_epochs: usize,
    /// Learning rate of each refresh.
    pub rm_lr: f64,
    /// Batch size of each refresh.
    pub rm_batch_size: usize,
    /// UML's λ.
    pub lambda: f64,
    /// UML's critic: bilinear | cosine.
    pub critic: rlhf_methods::rlp::CriticKind,
    /// SPG's γ.
    pub gamma: f64,
    /// Eval prompts (the task's eval split) for win-rates and reward-model accuracies.
    pub eval_prompts: usize,
    /// Temperature of the evaluation samples.
    pub eval_temperature: f64,
}

impl Default for RlpConfig {
    fn default() -> Self {
        RlpConfig {
            task: "sentiment".into(),
            task_seed: 0,
            seed: 0,
            out_dir: PathBuf::from("runs/rlp"),
            sft_model: PathBuf::from("runs/quickstart/sft/model"),
            rm_model: PathBuf::from("runs/quickstart/rm/model"),
            prefs_file: PathBuf::from("runs/quickstart/data/prefs_train.jsonl"),
            policy_method: "ppo".into(),
            policy_steps: 100,
            policy_lr: 1e-4,
            policy_beta: 0.1,
            policy_sets: Vec::new(),
            unlabelled_prompts: 1000,
            samples_per_prompt: 10,
            temperature: 1.0,
            variants: vec![Variant::Uml, Variant::Spg],
            rm_init: "sft".into(),
            rm_epochs: 3,
            rm_lr: 1e-3,
            rm_batch_size: 32,
            lambda: 0.5,
            critic: rlhf_methods::rlp::CriticKind::Bilinear,
            gamma: 0.5,
            eval_prompts: 200,
            eval_temperature: 1.0,
        }
    }
}

/// The reward model's pairwise accuracy against gold on one policy's sample pairs.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RmAccuracy {
    /// Whose samples: `sft` or `policy`.
    pub samples: String,
    /// `rm` (r_φ) or `rm-uml` / `rm-spg` (r̂).
    pub reward_model: String,
    pub accuracy: f64,
    /// Pairs with different gold (the rest are ties, left out).
    pub pairs: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PolicyRow {
    pub name: String,
    pub report: EvalReport,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SpgAblationRow {
    pub name: String,
    pub stats: SpgStats,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RlpReport {
    pub task: String,
    pub seed: u64,
    pub policy_method: String,
    pub rows: Vec<PolicyRow>,
    pub rm_accuracy: Vec<RmAccuracy>,
    pub refreshes: Vec<RlpRmSummary>,
    pub spg_ablation: Vec<SpgAblationRow>,
}

fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Uml => "uml",
        Variant::Spg => "spg",
    }
}

/// Steps 2 and 5: the online method from SFT against `rm` into `dir` (skipped when finished).
fn optimise_policy(
    cfg: &RlpConfig,
    max_new_tokens: usize,
    rm: &Path,
    dir: &Path,
    resume: bool,
    device: &Device,
) -> Result<PathBuf> {
    let model = dir.join("model");
    if resume && model.join("config.json").exists() {
        eprintln!("== {}: done", dir.display());
        return Ok(model);
    }
    let m = rlhf_methods::method(&cfg.policy_method)
        .filter(|m| m.family() == Family::Online)
        .ok_or_else(|| {
            TrainError::invalid(format!(
                "policy_method `{}` is not an online method of the registry",
                cfg.policy_method
            ))
        })?;
    let mut sets = vec![
        format!("model={}", cfg.sft_model.display()),
        format!("task={}", cfg.task),
        format!("task_seed={}", cfg.task_seed),
        format!("output_dir={}", dir.display()),
        format!("reward.model={}", rm.display()),
        format!("steps={}", cfg.policy_steps),
        format!("rollout.max_new_tokens={max_new_tokens}"),
        format!("kl.beta={}", cfg.policy_beta),
        format!("optim.lr={}", cfg.policy_lr),
        format!("seed={}", cfg.seed),
        "eval.prompts=0".into(),
        "log_every=10".into(),
    ];
    sets.extend(cfg.policy_sets.iter().cloned());
    eprintln!(
        "== {} from SFT against {} -> {}",
        m.name(),
        rm.display(),
        dir.display()
    );
    let resume_stage = resume && dir.join("config.toml").exists();
    m.run(None, &sets, resume_stage, device)?;
    Ok(model)
}

/// Two samples per eval prompt from `model`: the pairs the reward models are judged on.
fn sample_pairs(
    model: &Llama,
    lm: &TrainableLm,
    prompts: &[(String, Vec<u32>)],
    params: &SamplingParams,
) -> Result<Vec<Generated>> {
    let doubled: Vec<(String, Vec<u32>)> = prompts
        .iter()
        .flat_map(|p| [p.clone(), p.clone()])
        .collect();
    Ok(sample(
        model,
        &lm.tokenizer,
        lm.pad_id,
        &doubled,
        params,
        64,
    )?)
}

fn rm_accuracy(rm: &RewardModel, pairs: &[Generated], task: &dyn Task) -> Result<(f64, usize)> {
    let rows: Vec<(Vec<u32>, Vec<u32>)> = pairs
        .iter()
        .map(|g| (g.prompt_ids.clone(), g.completion_ids.clone()))
        .collect();
    let s = rm.score_raw(&rows, 64)?;
    let gold: Vec<(f64, f64)> = pairs
        .chunks(2)
        .map(|p| {
            (
                task.gold(&p[0].prompt, &p[0].completion),
                task.gold(&p[1].prompt, &p[1].completion),
            )
        })
        .collect();
    let scores: Vec<(f64, f64)> = s.chunks(2).map(|c| (c[0], c[1])).collect();
    let c = clean_accuracy(&gold, &scores)?;
    Ok((c.accuracy, c.pairs))
}

pub fn run(cfg: &RlpConfig, resume: bool, device: &Device) -> Result<RlpReport> {
    if cfg.variants.is_empty() {
        return Err(TrainError::invalid(
            "variants: name at least one of uml, spg",
        ));
    }
    if cfg.rm_init != "sft" && cfg.rm_init != "rm" {
        return Err(TrainError::invalid("rm_init must be \"sft\" or \"rm\""));
    }
    if cfg.eval_prompts == 0 || cfg.unlabelled_prompts == 0 {
        return Err(TrainError::invalid(
            "eval_prompts and unlabelled_prompts must be >= 1",
        ));
    }
    for (what, p) in [
        ("sft_model", &cfg.sft_model),
        ("rm_model", &cfg.rm_model),
        ("prefs_file", &cfg.prefs_file),
    ] {
        if !p.exists() {
            return Err(TrainError::invalid(format!(
                "{what} {} does not exist (run `rlhf quickstart` first, or point it elsewhere)",
                p.display()
            )));
        }
    }
    let task_box = task_by_name(&cfg.task, cfg.task_seed).map_err(TrainError::Invalid)?;
    let task: &dyn Task = task_box.as_ref();
    let out = &cfg.out_dir;
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let max_new = task.max_response_words() + 2;

    // Step 3: the policy optimised against r_φ.
    let policy = optimise_policy(
        cfg,
        max_new,
        &cfg.rm_model,
        &out.join("policy"),
        resume,
        device,
    )?;

    // Step 4a: n samples per unlabelled prompt from it.
    let samples_file = out.join("samples.jsonl");
    let policy_lm = TrainableLm::load(&policy, device)?;
    let groups = if resume && samples_file.exists() {
        read_groups(&samples_file)?
    } else {
        let prompts: Vec<String> = task
            .train_prompts()
            .iter()
            .take(cfg.unlabelled_prompts)
            .cloned()
            .collect();
        eprintln!(
            "== sampling {} x {} responses from the policy",
            prompts.len(),
            cfg.samples_per_prompt
        );
        let params = SamplingParams {
            max_new_tokens: max_new,
            temperature: cfg.temperature,
            seed: stream_seed(cfg.seed, "rlpsamp"),
            eos_token_ids: policy_lm.eos_ids.clone(),
            ..Default::default()
        };
        let g = sample_groups(
            &policy_lm,
            &prompts,
            cfg.samples_per_prompt,
            &params,
            256,
            64,
            device,
        )?;
        write_groups(&samples_file, &g)?;
        g
    };

    // Step 4b: the refreshed reward models.
    let rm_cfg = |v: Variant| RlpRmConfig {
        model: cfg.rm_model.clone(),
        init: (cfg.rm_init == "sft").then(|| cfg.sft_model.clone()),
        train_file: cfg.prefs_file.clone(),
        variant: v,
        samples_file: Some(samples_file.clone()),
        task: Some(cfg.task.clone()),
        task_seed: cfg.task_seed,
        lambda: cfg.lambda,
        critic: cfg.critic,
        gamma: cfg.gamma,
        samples_per_prompt: cfg.samples_per_prompt,
        fit: FitConfig {
            output_dir: out.join(format!("rm-{}", variant_name(v))),
            epochs: cfg.rm_epochs,
            batch_size: cfg.rm_batch_size,
            max_len: 64,
            save_every: 50,
            log_every: 10,
            seed: cfg.seed,
            optim: OptimConfig {
                lr: cfg.rm_lr,
                schedule: rlhf_train::ScheduleKind::Cosine,
                warmup_ratio: 0.05,
                ..OptimConfig::default()
            },
            ..RlpRmConfig::default().fit
        },
        ..RlpRmConfig::default()
    };
    let mut refreshes = Vec::new();
    let mut refreshed: Vec<(Variant, PathBuf)> = Vec::new();
    for &v in &cfg.variants {
        let c = rm_cfg(v);
        let dir = c.fit.output_dir.clone();
        let summary_path = dir.join("summary.json");
        let summary: RlpRmSummary = if resume && summary_path.exists() {
            eprintln!("== {}: done", dir.display());
            let text = std::fs::read_to_string(&summary_path)
                .map_err(|e| TrainError::io(&summary_path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| TrainError::bad_file(&summary_path, e.to_string()))?
        } else {
            eprintln!(
                "== RLP-{}: refreshing the reward model",
                variant_name(v).to_uppercase()
            );
            let resume_stage = resume && dir.join("config.toml").exists();
            rlp_rm::run(&c, resume_stage, device)?
        };
        refreshed.push((v, summary.model.clone()));
        refreshes.push(summary);
    }

    // Step 5: policy optimisation from SFT against each refreshed reward model.
    let mut policies: Vec<(String, PathBuf)> = vec![(cfg.policy_method.clone(), policy.clone())];
    for (v, rm) in &refreshed {
        let dir = out.join(format!("policy-{}", variant_name(*v)));
        let p = optimise_policy(cfg, max_new, rm, &dir, resume, device)?;
        policies.push((format!("rlp-{}", variant_name(*v)), p));
    }

    // Evaluation: gold win-rate vs SFT; reward-model accuracy against gold on SFT and policy pairs.
    eprintln!("== evaluation");
    let sft_lm = TrainableLm::load(&cfg.sft_model, device)?;
    let sft = sft_lm.model(device)?.detached();
    let eval_prompts: Vec<(String, Vec<u32>)> = task
        .eval_prompts()
        .iter()
        .take(cfg.eval_prompts)
        .map(|p| Ok((p.clone(), sft_lm.encode_prompt(p, 256)?)))
        .collect::<Result<_>>()?;
    let params = |name: &str| SamplingParams {
        max_new_tokens: max_new,
        temperature: cfg.eval_temperature,
        seed: stream_seed(cfg.seed, name),
        eos_token_ids: sft_lm.eos_ids.clone(),
        ..Default::default()
    };
    let reference = sample(
        &sft,
        &sft_lm.tokenizer,
        sft_lm.pad_id,
        &eval_prompts,
        &params("evalref"),
        64,
    )?;
    let gold = |p: &str, r: &str| task.gold(p, r);
    let judges = Judges {
        gold: Some(&gold),
        reward_model: None,
    };
    let mut rows = Vec::new();
    let sft_again = sample(
        &sft,
        &sft_lm.tokenizer,
        sft_lm.pad_id,
        &eval_prompts,
        &params("evalsft"),
        64,
    )?;
    rows.push(PolicyRow {
        name: "sft".into(),
        report: judge(&sft_again, &reference, &judges, None)?,
    });
    for (name, dir) in &policies {
        let model = TrainableLm::load(dir, device)?.model(device)?.detached();
        let samples = sample(
            &model,
            &sft_lm.tokenizer,
            sft_lm.pad_id,
            &eval_prompts,
            &params("evalpol"),
            64,
        )?;
        let report = judge(
            &samples,
            &reference,
            &judges,
            Some(KlModels {
                policy: &model,
                reference: &sft,
                pad_id: sft_lm.pad_id,
                temperature: cfg.eval_temperature,
            }),
        )?;
        rows.push(PolicyRow {
            name: name.clone(),
            report,
        });
    }
    let policy_model = policy_lm.model(device)?.detached();
    let pair_sets = [
        (
            "sft",
            sample_pairs(&sft, &sft_lm, &eval_prompts, &params("accsft"))?,
        ),
        (
            "policy",
            sample_pairs(&policy_model, &sft_lm, &eval_prompts, &params("accpol"))?,
        ),
    ];
    let mut rms: Vec<(String, PathBuf)> = vec![("rm".into(), cfg.rm_model.clone())];
    rms.extend(
        refreshed
            .iter()
            .map(|(v, p)| (format!("rm-{}", variant_name(*v)), p.clone())),
    );
    let mut rm_acc = Vec::new();
    for (name, path) in &rms {
        let rm = RewardModel::load(path, device)?;
        for (samples, pairs) in &pair_sets {
            let (accuracy, n) = rm_accuracy(&rm, pairs, task)?;
            rm_acc.push(RmAccuracy {
                samples: samples.to_string(),
                reward_model: name.clone(),
                accuracy,
                pairs: n,
            });
        }
    }
    // SPG's synthetic pairs against gold: SPG, select-all (γ = 0), reward-ranked.
    let mut spg_ablation = Vec::new();
    let scorer = RewardModel::load(&cfg.rm_model, device)?;
    let encode =
        |p: &str, c: &str| -> Result<(Vec<u32>, Vec<u32>)> { Ok(sft_lm.encode(p, c, true, 64)?) };
    for (name, gamma, pairing) in [
        (
            format!("rlp-spg (gamma {})", cfg.gamma),
            cfg.gamma,
            Pairing::Spg,
        ),
        ("select-all (gamma 0)".to_string(), 0.0, Pairing::Spg),
        ("reward-ranked".to_string(), 0.0, Pairing::RewardRanked),
    ] {
        let c = RlpRmConfig {
            gamma,
            pairing,
            ..rm_cfg(Variant::Spg)
        };
        let (_, stats) = rlp_rm::synthetic_pairs(&c, &groups, &scorer, &encode, Some(task))?;
        spg_ablation.push(SpgAblationRow { name, stats });
    }
    let report = RlpReport {
        task: cfg.task.clone(),
        seed: cfg.seed,
        policy_method: cfg.policy_method.clone(),
        rows,
        rm_accuracy: rm_acc,
        refreshes,
        spg_ablation,
    };
    let path = out.join("report.json");
    rlhf_train::run::write_atomic(
        &path,
        serde_json::to_string_pretty(&report)
            .expect("serialisable")
            .as_bytes(),
    )?;
    let md = out.join("report.md");
    rlhf_train::run::write_atomic(&md, format_report(&report).as_bytes())?;
    Ok(report)
}

/// The report as markdown tables.
pub fn format_report(r: &RlpReport) -> String {
    let mut s = format!(
        "RLP on `{}` (seed {}, policy method {}): gold win-rate vs the SFT policy\n\n| policy | win-rate | 95% interval | gold mean | KL | length |\n|---|---|---|---|---|---|\n",
        r.task, r.seed, r.policy_method
    );
    for row in &r.rows {
        let e = &row.report;
        s.push_str(&format!(
            "| {} | {:.3} | [{:.3}, {:.3}] | {} | {} | {:.1} |\n",
            row.name,
            e.winrate,
            e.winrate_ci95[0],
            e.winrate_ci95[1],
            e.gold_mean.map_or("-".into(), |g| format!("{g:.3}")),
            e.kl_to_ref.map_or("-".into(), |k| format!("{k:.2}")),
            e.mean_len
        ));
    }
    s.push_str("\nReward-model pairwise accuracy against gold (pairs of two samples per eval prompt; gold ties left out)\n\n| reward model | on SFT samples | on policy samples |\n|---|---|---|\n");
    let mut names: Vec<&str> = r
        .rm_accuracy
        .iter()
        .map(|a| a.reward_model.as_str())
        .collect();
    names.dedup();
    for n in names {
        let get = |which: &str| {
            r.rm_accuracy
                .iter()
                .find(|a| a.reward_model == n && a.samples == which)
                .map_or("-".into(), |a| {
                    format!("{:.3} ({} pairs)", a.accuracy, a.pairs)
                })
        };
        s.push_str(&format!("| {n} | {} | {} |\n", get("sft"), get("policy")));
    }
    s.push_str("\nSynthetic pairs from the policy's samples against gold\n\n| pairing | pairs | agreement with gold | mean confidence |\n|---|---|---|---|\n");
    for a in &r.spg_ablation {
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            a.name,
            a.stats.pairs,
            a.stats
                .gold_agreement
                .map_or("-".into(), |g| format!("{g:.3}")),
            a.stats
                .mean_confidence
                .map_or("-".into(), |c| format!("{c:.3}"))
        ));
    }
    s
}

/// `rlhf rlp-table`: several seeds' `report.json` of `rlhf rlp` as one markdown table.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RlpTableConfig {
    /// The runs' `report.json` files (one per seed, same task and stages).
    pub reports: Vec<PathBuf>,
    /// Write the table here too (unset: only print it).
    pub table: Option<PathBuf>,
}

/// The mean over seeds with a Student-t 95% interval over seeds ("-" for none).
fn over_seeds(xs: &[Option<f64>]) -> String {
    let xs: Vec<f64> = xs
        .iter()
        .flatten()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    match xs.len() {
        0 => "-".into(),
        1 => format!("{:.3}", xs[0]),
        _ => {
            let (m, h) = crate::compare::mean_ci(&xs);
            format!("{m:.3} [{:.3}, {:.3}]", m - h, m + h)
        }
    }
}

/// The seeds' reports as markdown: policies, reward-model accuracies, SPG's synthetic pairs, and the
/// per-seed win-rates. Every report must have the first one's rows.
pub fn format_seeds(reports: &[RlpReport]) -> Result<String> {
    let first = reports
        .first()
        .ok_or_else(|| TrainError::invalid("rlp-table: no reports"))?;
    let missing = |what: &str, name: &str, seed: u64| {
        TrainError::invalid(format!("rlp-table: seed {seed} has no {what} `{name}`"))
    };
    let mut s = format!(
        "seeds {:?}; task {}; policy method {}\n\n| policy | gold win-rate vs SFT | gold mean | KL to SFT | length |\n|---|---|---|---|---|\n",
        reports.iter().map(|r| r.seed).collect::<Vec<_>>(),
        first.task,
        first.policy_method
    );
    for row in &first.rows {
        let rows = reports
            .iter()
            .map(|r| {
                r.rows
                    .iter()
                    .find(|x| x.name == row.name)
                    .map(|x| &x.report)
                    .ok_or_else(|| missing("policy", &row.name, r.seed))
            })
            .collect::<Result<Vec<_>>>()?;
        let col = |f: &dyn Fn(&EvalReport) -> Option<f64>| {
            over_seeds(&rows.iter().map(|e| f(e)).collect::<Vec<_>>())
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            row.name,
            col(&|e| Some(e.winrate)),
            col(&|e| e.gold_mean),
            col(&|e| e.kl_to_ref),
            col(&|e| Some(e.mean_len)),
        ));
    }
    s.push_str("\n| reward model | accuracy vs gold on SFT samples | on the policy's samples |\n|---|---|---|\n");
    let mut names: Vec<&str> = Vec::new();
    for a in &first.rm_accuracy {
        if !names.contains(&a.reward_model.as_str()) {
            names.push(&a.reward_model);
        }
    }
    for n in names {
        let acc = |which: &str| {
            over_seeds(
                &reports
                    .iter()
                    .map(|r| {
                        r.rm_accuracy
                            .iter()
                            .find(|a| a.reward_model == n && a.samples == which)
                            .map(|a| a.accuracy)
                    })
                    .collect::<Vec<_>>(),
            )
        };
        s.push_str(&format!("| {n} | {} | {} |\n", acc("sft"), acc("policy")));
    }
    s.push_str("\n| synthetic pairs | pairs | agreement with gold | mean confidence |\n|---|---|---|---|\n");
    for row in &first.spg_ablation {
        let stats = reports
            .iter()
            .map(|r| {
                r.spg_ablation
                    .iter()
                    .find(|x| x.name == row.name)
                    .map(|x| &x.stats)
                    .ok_or_else(|| missing("synthetic-pair row", &row.name, r.seed))
            })
            .collect::<Result<Vec<_>>>()?;
        let col = |f: &dyn Fn(&SpgStats) -> Option<f64>| {
            over_seeds(&stats.iter().map(|x| f(x)).collect::<Vec<_>>())
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            row.name,
            col(&|x| Some(x.pairs as f64)),
            col(&|x| x.gold_agreement),
            col(&|x| x.mean_confidence),
        ));
    }
    s.push_str("\nPer seed (gold win-rate vs SFT):\n\n| seed | ");
    s.push_str(
        &first
            .rows
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
    );
    s.push_str(" |\n");
    s.push_str(&"|---".repeat(first.rows.len() + 1));
    s.push_str("|\n");
    for r in reports {
        s.push_str(&format!(
            "| {} | {} |\n",
            r.seed,
            r.rows
                .iter()
                .map(|x| format!("{:.3}", x.report.winrate))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
    }
    Ok(s)
}

/// Read the reports and format them (and write `table` when set).
pub fn seeds_table(cfg: &RlpTableConfig) -> Result<String> {
    let reports = cfg
        .reports
        .iter()
        .map(|p| rlhf_train::run::read_json::<RlpReport>(p))
        .collect::<Result<Vec<_>>>()?;
    let text = format_seeds(&reports)?;
    if let Some(path) = cfg.table.as_ref().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::write(path, &text).map_err(|e| TrainError::io(path, e))?;
    }
    Ok(text)
}
