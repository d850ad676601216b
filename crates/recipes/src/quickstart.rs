//! The main job on the built-in testbed, end to end with no download: generate a task, pre-train /
//! SFT the tiny model on its demonstrations, train a reward model on simulated noisy preferences
//! over SFT samples, optimise the SFT policy against it online with RLOO (k = 4), and evaluate
//! against the SFT policy by the gold reward the training never saw.
//! Every stage reads and writes ordinary files through the same loaders and run directories a user
//! gets, under `<out_dir>/`.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, tokenizer_for, write_task_files, Annotator, Task};
use rlhf_lm::generate::SamplingParams;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_methods::rm::{self, RmConfig};
use rlhf_methods::sft::{self, SftConfig};
use rlhf_rl::best_of_n::{best_of_n, kl_bound};
use rlhf_rl::eval::{judge, EvalReport, Judges, KlModels};
use rlhf_rl::fit::FitConfig;
use rlhf_rl::online::{Method, OnlineConfig};
use rlhf_rl::policy::{fresh_tiny, TrainableLm};
use rlhf_rl::preferences::{sample_and_label, write_pairs};
use rlhf_rl::reward::RewardModel;
use rlhf_rl::sampling::{sample, Generated};
use rlhf_rl::trainer::OptimConfig;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct QuickstartConfig {
    pub task: String,
    pub out_dir: PathBuf,
    pub seed: u64,
    pub sft_epochs: usize,
    pub sft_lr: f64,
    pub rm_epochs: usize,
    pub rm_lr: f64,
    /// Preference pairs sampled per training prompt (each from two fresh SFT samples).
    pub pairs_per_prompt: usize,
    /// Annotator label-flip probability (AlpacaFarm: 0.25).
    pub noise: f64,
    pub best_of_n: usize,
    pub eval_prompts: usize,
    /// RLOO (k = 4) iterations of 16 prompts on the reward model, from the SFT policy; 0 skips it.
    pub rloo_steps: u64,
    pub rloo_lr: f64,
    /// KL coefficient in RLOO's shaped reward.
    pub rloo_beta: f64,
    /// PPO (the PPO-max preset, 64 prompts per iteration) on the reward model, from the SFT
    /// policy, with RLOO's lr and beta; 0 (the default, to keep the quickstart at ~3 minutes)
    /// skips it.
    pub ppo_steps: u64,
}

impl Default for QuickstartConfig {
    fn default() -> Self {
        QuickstartConfig {
            task: "sentiment".into(),
            out_dir: PathBuf::from("runs/quickstart"),
            seed: 0,
            sft_epochs: 4,
            sft_lr: 2e-3,
            rm_epochs: 3,
            rm_lr: 1e-3,
            pairs_per_prompt: 2,
            noise: 0.25,
            best_of_n: 16,
            eval_prompts: 200,
            rloo_steps: 100,
            rloo_lr: 1e-4,
            rloo_beta: 0.1,
            ppo_steps: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Row {
    pub name: String,
    pub report: EvalReport,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QuickstartReport {
    pub task: String,
    pub sft: sft::SftSummary,
    pub rm: rm::RmSummary,
    /// Held-out pairwise accuracy of the reward model against clean gold labels (over the
    /// `rm_clean_pairs` pairs whose gold rewards differ).
    pub rm_clean_accuracy: f64,
    pub rm_clean_pairs: usize,
    /// Held-out pairs left out of the clean accuracy because their gold rewards tie.
    pub rm_clean_ties_excluded: usize,
    /// The best accuracy any model can expect on the noisy held-out labels: the mean probability
    /// that the simulated annotator labels the gold-better response as chosen.
    pub noisy_label_ceiling: f64,
    pub train_pairs: usize,
    pub rows: Vec<Row>,
}

/// The reward model's accuracy against gold labels, and what it left out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CleanAccuracy {
    /// Correct / `pairs` (NaN when no pair is left).
    pub accuracy: f64,
    /// Pairs judged: those whose gold rewards differ.
    pub pairs: usize,
    /// Pairs whose gold rewards tie: neither answer is right, so they are not counted.
    pub ties_excluded: usize,
}

/// Pair `i` has gold rewards `gold[i]` and reward-model scores `scores[i]` for the same two
/// responses (in the same order); the reward model is right when it strictly prefers the
/// gold-better one. Pairs tied on gold are excluded.
pub fn clean_accuracy(gold: &[(f64, f64)], scores: &[(f64, f64)]) -> Result<CleanAccuracy> {
    if gold.len() != scores.len() {
        return Err(TrainError::invalid(format!(
            "clean accuracy: {} gold pairs but {} scored pairs",
            gold.len(),
            scores.len()
        )));
    }
    let (mut right, mut pairs) = (0usize, 0usize);
    for (&(ga, gb), &(sa, sb)) in gold.iter().zip(scores) {
        if ga == gb {
            continue;
        }
        let (sa, sb) = if ga > gb { (sa, sb) } else { (sb, sa) };
        pairs += 1;
        right += usize::from(sa > sb);
    }
    Ok(CleanAccuracy {
        accuracy: if pairs == 0 {
            f64::NAN
        } else {
            right as f64 / pairs as f64
        },
        pairs,
        ties_excluded: gold.len() - pairs,
    })
}

fn step(name: &str) {
    eprintln!("== {name}");
}

/// An online method's run for a quickstart row: from the SFT policy against the quickstart's reward
/// model (β and lr of `rloo_*`), into `<out>/<dir>`, without its own evaluation (every row is
/// judged afterwards against the same reference samples).
fn online_row<M: Method>(
    cfg: &QuickstartConfig,
    sft_dir: &Path,
    out: &Path,
    dir: &str,
    steps: u64,
    max_new_tokens: usize,
) -> OnlineConfig<M> {
    let mut c = OnlineConfig::<M>::default();
    c.model = sft_dir.to_path_buf();
    c.task = Some(cfg.task.clone());
    c.task_seed = cfg.seed;
    c.output_dir = out.join(dir);
    c.steps = steps;
    c.rollout.max_new_tokens = max_new_tokens;
    c.reward.model = Some(out.join("rm/model"));
    c.kl.beta = cfg.rloo_beta;
    c.optim.lr = cfg.rloo_lr;
    c.seed = cfg.seed;
    c.save_every = 0;
    c.log_every = 10;
    c.eval.prompts = 0;
    c
}

pub fn run(cfg: &QuickstartConfig, device: &Device) -> Result<QuickstartReport> {
    let out = &cfg.out_dir;
    let task = task_by_name(&cfg.task, cfg.seed).map_err(TrainError::Invalid)?;
    let task: &dyn Task = task.as_ref();

    step(&format!("task `{}`: writing data files", task.name()));
    let files = write_task_files(task, &out.join("data"))
        .map_err(|e| TrainError::io(out.join("data"), e))?;

    step("tiny model: fresh weights");
    let init_dir = out.join("init");
    fresh_tiny(tokenizer_for(task), cfg.seed, device)?.save(&init_dir)?;

    step("SFT on the demonstrations");
    let sft_cfg = SftConfig {
        model: init_dir.clone(),
        train_file: files.sft.clone(),
        fit: FitConfig {
            output_dir: out.join("sft"),
            epochs: cfg.sft_epochs,
            batch_size: 32,
            max_len: 64,
            save_every: 0,
            log_every: 10,
            seed: cfg.seed,
            optim: OptimConfig {
                lr: cfg.sft_lr,
                schedule: rlhf_train::ScheduleKind::Cosine,
                warmup_ratio: 0.05,
                min_lr_ratio: 0.1,
                weight_decay: 0.01,
                ..OptimConfig::default()
            },
            ..SftConfig::default().fit
        },
        ..SftConfig::default()
    };
    let sft_summary = sft::run(&sft_cfg, false, device)?;
    let sft_dir = out.join("sft/model");
    let sft_lm = TrainableLm::load(&sft_dir, device)?;
    let sft_model = sft_lm.model(device)?.detached();
    let max_new = task.max_response_words() + 2;
    let sampling = |seed: u64| SamplingParams {
        max_new_tokens: max_new,
        temperature: 1.0,
        seed,
        eos_token_ids: sft_lm.eos_ids.clone(),
        ..Default::default()
    };

    step("preference pairs: SFT samples labelled by simulated annotators");
    let mut annotator = Annotator::for_task(task, cfg.noise, cfg.seed + 1);
    let pair_prompts: Vec<String> = (0..cfg.pairs_per_prompt.max(1))
        .flat_map(|_| task.train_prompts().iter().cloned())
        .collect();
    let train_pairs = sample_and_label(
        &sft_model,
        &sft_lm,
        task,
        &pair_prompts,
        &mut annotator,
        &sampling(cfg.seed + 2),
    )?;
    let eval_prompts: Vec<String> = task
        .eval_prompts()
        .iter()
        .take(cfg.eval_prompts)
        .cloned()
        .collect();
    let mut noisy = Annotator::for_task(task, cfg.noise, cfg.seed + 3);
    let eval_pairs = sample_and_label(
        &sft_model,
        &sft_lm,
        task,
        &eval_prompts,
        &mut noisy,
        &sampling(cfg.seed + 4),
    )?;
    // The same eval pairs relabelled by gold alone (no flips, no Bradley-Terry sampling); pairs
    // whose gold rewards tie have no right answer and are left out.
    let gold_of = |p: &rlhf_rl::preferences::LabelledPair| {
        (
            task.gold(&p.prompt, p.chosen.trim()),
            task.gold(&p.prompt, p.rejected.trim()),
        )
    };
    let eval_gold: Vec<(f64, f64)> = eval_pairs.iter().map(gold_of).collect();
    let clean_pairs: Vec<_> = eval_pairs
        .iter()
        .zip(&eval_gold)
        .filter(|(_, (c, r))| c != r)
        .map(|(p, (c, r))| {
            if c > r {
                p.clone()
            } else {
                rlhf_rl::preferences::LabelledPair {
                    chosen: p.rejected.clone(),
                    rejected: p.chosen.clone(),
                    ..p.clone()
                }
            }
        })
        .collect();
    let ceiling = {
        // Over every noisy eval pair (ties included: the noisy accuracy counts them too).
        let probe = Annotator::for_task(task, cfg.noise, 0);
        let q: f64 = eval_gold
            .iter()
            .map(|&(a, b)| {
                let better = probe.p_prefer(a.max(b), a.min(b));
                (1.0 - cfg.noise) * better + cfg.noise * (1.0 - better)
            })
            .sum();
        q / eval_gold.len().max(1) as f64
    };
    let data = out.join("data");
    write_pairs(&data.join("prefs_train.jsonl"), &train_pairs)?;
    write_pairs(&data.join("prefs_eval.jsonl"), &eval_pairs)?;
    write_pairs(&data.join("prefs_eval_clean.jsonl"), &clean_pairs)?;

    step("reward model (Bradley-Terry) on the noisy pairs");
    let rm_cfg = RmConfig {
        model: sft_dir.clone(),
        train_file: data.join("prefs_train.jsonl"),
        normalize_prompts: Some(files.prompts_train.clone()),
        normalize_samples: 512,
        normalize_max_new_tokens: max_new,
        fit: FitConfig {
            eval_file: Some(data.join("prefs_eval.jsonl")),
            output_dir: out.join("rm"),
            epochs: cfg.rm_epochs,
            batch_size: 32,
            max_len: 64,
            save_every: 0,
            log_every: 10,
            seed: cfg.seed,
            optim: OptimConfig {
                lr: cfg.rm_lr,
                schedule: rlhf_train::ScheduleKind::Cosine,
                warmup_ratio: 0.05,
                ..OptimConfig::default()
            },
            ..RmConfig::default().fit
        },
        ..RmConfig::default()
    };
    let rm_summary = rm::run(&rm_cfg, false, device)?;
    let reward_model = RewardModel::load(&out.join("rm/model"), device)?;
    // The reward model's scores of both responses of every eval pair, judged against gold.
    let eval_ids =
        rlhf_rl::pairs::load_pair_ids(&sft_lm, &data.join("prefs_eval.jsonl"), 64, false)?;
    if eval_ids.len() != eval_pairs.len() {
        return Err(TrainError::invalid(format!(
            "prefs_eval.jsonl: read back {} pairs, wrote {}",
            eval_ids.len(),
            eval_pairs.len()
        )));
    }
    let side = |f: fn(&rlhf_rl::pairs::PairIds) -> &Vec<u32>| -> Vec<(Vec<u32>, Vec<u32>)> {
        eval_ids
            .iter()
            .map(|p| (p.prompt.clone(), f(p).clone()))
            .collect()
    };
    let (sc, sr) = (
        reward_model.score_raw(&side(|p| &p.chosen), 32)?,
        reward_model.score_raw(&side(|p| &p.rejected), 32)?,
    );
    let rm_scores: Vec<(f64, f64)> = sc.into_iter().zip(sr).collect();
    let clean = clean_accuracy(&eval_gold, &rm_scores)?;

    step("evaluation against the SFT policy, judged by gold");
    let prompts: Vec<(String, Vec<u32>)> = eval_prompts
        .iter()
        .map(|p| Ok((p.clone(), sft_lm.encode_prompt(p, 256)?)))
        .collect::<Result<_>>()?;
    let gold = |p: &str, r: &str| task.gold(p, r);
    let judges = Judges {
        gold: Some(&gold),
        reward_model: Some(&reward_model),
    };
    let reference = sample(
        &sft_model,
        &sft_lm.tokenizer,
        sft_lm.pad_id,
        &prompts,
        &sampling(cfg.seed + 100),
        64,
    )?;
    let init_lm = TrainableLm::load(&init_dir, device)?;
    let init_model = init_lm.model(device)?.detached();
    let mut rows = Vec::new();
    let eval_dir = out.join("eval");
    std::fs::create_dir_all(&eval_dir).map_err(|e| TrainError::io(&eval_dir, e))?;
    let mut add = |name: &str,
                   policy: &[Generated],
                   kl: Option<(&rlhf_lm::llama::Llama, &rlhf_lm::llama::Llama)>|
     -> Result<EvalReport> {
        let report = judge(
            policy,
            &reference,
            &judges,
            // Every quickstart sample is drawn at temperature 1.
            kl.map(|(a, b)| KlModels {
                policy: a,
                reference: b,
                pad_id: sft_lm.pad_id,
                temperature: 1.0,
            }),
        )?;
        // eval/<first word of the row name>.json: untrained, sft, best-of-16, rloo, ppo.
        let stem = name.split_whitespace().next().unwrap_or(name);
        report.write(&eval_dir.join(format!("{stem}.json")))?;
        rows.push(Row {
            name: name.into(),
            report: report.clone(),
        });
        Ok(report)
    };
    // One sample per eval prompt from `model`, seeded.
    let sample_eval = |model: &rlhf_lm::llama::Llama, seed: u64| {
        sample(
            model,
            &sft_lm.tokenizer,
            sft_lm.pad_id,
            &prompts,
            &sampling(seed),
            64,
        )
    };
    let untrained = sample_eval(&init_model, cfg.seed + 101)?;
    add("untrained", &untrained, Some((&init_model, &sft_model)))?;
    let sft_again = sample_eval(&sft_model, cfg.seed + 102)?;
    add("sft", &sft_again, Some((&sft_model, &sft_model)))?;
    let bon = best_of_n(
        &sft_model,
        &sft_lm.tokenizer,
        sft_lm.pad_id,
        &prompts,
        cfg.best_of_n,
        &sampling(cfg.seed + 103),
        &reward_model,
        128,
    )?;
    add(&format!("best-of-{}", cfg.best_of_n), &bon, None)?;
    // A trained policy's row: load it, sample the eval prompts, judge against the same reference.
    let load_and_sample =
        |dir: &std::path::Path, seed: u64| -> Result<(rlhf_lm::llama::Llama, Vec<Generated>)> {
            let model = TrainableLm::load(dir, device)?.model(device)?.detached();
            let samples = sample_eval(&model, seed)?;
            Ok((model, samples))
        };

    if cfg.rloo_steps > 0 {
        step("RLOO (k = 4) on the reward model, from the SFT policy");
        let mut rl: rlhf_methods::rloo::RlooConfig =
            online_row(cfg, &sft_dir, &out, "rloo", cfg.rloo_steps, max_new);
        rl.prompts_per_step = 16;
        rl.rollout.k = 4;
        rlhf_methods::rloo::run(&rl, false, device)?;
        let (model, samples) = load_and_sample(&out.join("rloo/model"), cfg.seed + 104)?;
        add("rloo (k=4)", &samples, Some((&model, &sft_model)))?;
    }

    if cfg.ppo_steps > 0 {
        step("PPO (the PPO-max preset) on the reward model, from the SFT policy");
        let pc: rlhf_methods::ppo::PpoConfig =
            online_row(cfg, &sft_dir, &out, "ppo", cfg.ppo_steps, max_new);
        rlhf_methods::ppo::run(&pc, false, device)?;
        let (model, samples) = load_and_sample(&out.join("ppo/model"), cfg.seed + 105)?;
        add("ppo (PPO-max)", &samples, Some((&model, &sft_model)))?;
    }
    // Best-of-n has no log-probs of its own: its KL column is the analytic bound.
    if let Some(row) = rows.iter_mut().find(|r| r.name.starts_with("best-of-")) {
        row.report.kl_to_ref = Some(kl_bound(cfg.best_of_n));
    }

    let report = QuickstartReport {
        task: task.name().into(),
        sft: sft_summary,
        rm: rm_summary,
        rm_clean_accuracy: clean.accuracy,
        rm_clean_pairs: clean.pairs,
        rm_clean_ties_excluded: clean.ties_excluded,
        noisy_label_ceiling: ceiling,
        train_pairs: train_pairs.len(),
        rows,
    };
    let path = out.join("report.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&report).expect("serialisable"),
    )
    .map_err(|e| TrainError::io(&path, e))?;
    Ok(report)
}

/// The table the quickstart prints.
pub fn format_table(r: &QuickstartReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "task: {}   (win-rate vs the SFT policy, judged by the hidden gold reward)\n\n",
        r.task
    ));
    s.push_str(&format!(
        "{:<14} {:>9} {:>17} {:>10} {:>10} {:>9} {:>8}\n",
        "policy", "win-rate", "95% interval", "gold mean", "proxy (RM)", "KL(ref)", "length"
    ));
    for row in &r.rows {
        let e = &row.report;
        let opt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
        s.push_str(&format!(
            "{:<14} {:>9.3} {:>17} {:>10} {:>10} {:>9} {:>8.1}\n",
            row.name,
            e.winrate,
            format!("[{:.3}, {:.3}]", e.winrate_ci95[0], e.winrate_ci95[1]),
            opt(e.gold_mean),
            opt(e.proxy_mean),
            opt(e.kl_to_ref),
            e.mean_len
        ));
    }
    s.push_str(&format!(
        "\nreward model ({} noisy pairs): held-out accuracy {:.3} on noisy labels (noise ceiling {:.3}), {:.3} on clean gold labels ({} pairs; {} gold ties left out)\n",
        r.train_pairs,
        r.rm.eval_accuracy.unwrap_or(f64::NAN),
        r.noisy_label_ceiling,
        r.rm_clean_accuracy,
        r.rm_clean_pairs,
        r.rm_clean_ties_excluded
    ));
    s.push_str(&format!(
        "SFT: {} steps, final train loss {:.3}\n",
        r.sft.steps, r.sft.final_train_loss
    ));
    s
}
