//! RLP's reward-model refresh (`rlhf rlp-rm`; Lang, Huang, Li 2024, Algorithm 1 step 4): retrain
//! the reward model on the human preference pairs D plus the current policy's own samples P
//! (n responses per unlabelled prompt), with no new labels:
//!
//! ```text
//! L = −E_{(x,y_w,y_l) ~ D ∪ D̂} log σ(r̂(x,y_w) − r̂(x,y_l))  +  λ · L_M
//! ```
//!
//! - **RLP-UML** (`variant = "uml"`): D̂ = ∅ and L_M is the multi-view information bottleneck over
//!   two responses y1 ≠ y2 of one prompt ([`rlhf_rl::mib`]: Gaussian heads on the last-token
//!   hidden state, JS critic (bilinear, or cosine) with in-batch negatives, closed-form symmetric
//!   KL); λ = 0.5.
//! - **RLP-SPG** (`variant = "spg"`): λ = 0 and D̂ = the synthetic pairs of
//!   [`rlhf_rl::spg`]: cluster each prompt's samples by meaning, keep it when the largest cluster
//!   holds ≥ γ of them (not all), chosen = that cluster's highest-reward member under the reward
//!   model being refreshed (`model`, the only one there is at that point), rejected = a seeded
//!   uniform draw from the other clusters. `pairing = "reward_ranked"` and `gamma = 0` give the
//!   paper's Table 5 baselines.
//!
//! The samples come from `samples_file` (`{"prompt", "samples": [...]}` per line) or are drawn
//! here from `policy` (`samples_per_prompt` at `temperature` for the task's or `prompts_file`'s
//! prompts) and written to `<output_dir>/samples.jsonl`.
//!
//! One epoch walks D ∪ D̂ and the view pairs together, shuffled: a batch's loss is the BT mean over
//! its pairs plus λ times the MIB loss over its view pairs (in-batch negatives: the other view
//! pairs of the micro-batch). The refreshed model starts from `init` (default: `model` itself;
//! the pipeline passes the SFT model, retraining as the paper does), and is saved without the MIB
//! heads as an ordinary reward model (`<output_dir>/model`), without normalisation statistics
//! (online methods measure them at start-up). `--resume` continues from the latest checkpoint;
//! sampling, clustering and pairing are deterministic in the seed (sampled files are read back).

use std::path::{Path, PathBuf};

use candle_core::Device;
use rand::{Rng, SeedableRng};
use rlhf_data::loaders::{load_prompts, LoadOptions};
use rlhf_data::testbed::{task_by_name, Task};
use rlhf_lm::generate::SamplingParams;
use rlhf_train::rng::stream_seed;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::fit::{fit, load_with_eval, tail_mean, FitConfig};
use rlhf_rl::mib::{self, HeadShape, ViewPair};
use rlhf_rl::pairs::{load_pair_ids, PairIds};
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::policy_samples::{read_groups, sample_groups, write_groups, SampleGroup};
use rlhf_rl::preferences::{write_pairs, LabelledPair};
use rlhf_rl::registry::{Entry, Family};
use rlhf_rl::reward::{self, RewardModel, HEAD};
use rlhf_rl::spg::{self, EquivalenceConfig, Pairing, Selection};
use rlhf_rl::trainer::Trainer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CriticKind {
    Bilinear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// BT on the human pairs + λ · MIB over pairs of policy samples.
    Uml,
    /// BT on the human pairs ∪ synthetic pairs from clustered policy samples.
    Spg,
}

/// The configuration of `rlhf rlp-rm`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RlpRmConfig {
    /// The reward model r_φ being refreshed (SPG scores the chosen candidates with it).
    pub model: PathBuf,
    /// Where the refreshed model starts (default: `model`); a model without a scalar head gets a
    /// fresh one (the pipeline retrains from the SFT model).
    pub init: Option<PathBuf>,
    /// The human preference pairs D (`prompt` / `chosen` / `rejected`).
    pub train_file: PathBuf,
    /// uml | spg.
    pub variant: Variant,
    /// The policy's samples: one line per prompt, `{"prompt": "...", "samples": ["...", ...]}`.
    pub samples_file: Option<PathBuf>,
    /// Without `samples_file`: the policy to sample (written to `<output_dir>/samples.jsonl`).
    pub policy: Option<PathBuf>,
    /// Without `samples_file`: prompts to sample (default: the task's train prompts).
    pub prompts_file: Option<PathBuf>,
    /// Use at most this many prompts (0: all).
    pub max_prompts: usize,
    /// n, samples per prompt.
    pub samples_per_prompt: usize,
    /// Sampling temperature (the paper: 1).
    pub temperature: f64,
    /// Default: the task's longest sensible response + 2 (testbed), else 128.
    pub max_new_tokens: Option<usize>,
    /// A testbed task: its prompts, its meaning-equivalence test, and gold for reporting the
    /// synthetic pairs' agreement with it (never for training).
    pub task: Option<String>,
    /// Seed of the testbed task.
    pub task_seed: u64,
    /// UML: weight λ of the MIB loss.
    pub lambda: f64,
    /// UML: dimension of z.
    pub z_dim: usize,
    /// UML: width of the encoder MLPs' hidden layers (0: the model's hidden size).
    pub head_width: usize,
    /// UML: view pairs (two distinct samples) per prompt.
    pub views_per_prompt: usize,
    /// UML: the JS estimator's critic: bilinear (aᵀWb, trainable W) | cosine (cos(a, b) / critic_temperature).
    pub critic: CriticKind,
    /// UML: temperature of the cosine critic.
    pub critic_temperature: f64,
    /// SPG: keep a prompt when its largest cluster holds at least this share of its samples.
    pub gamma: f64,
    /// SPG: spg | reward_ranked.
    pub pairing: Pairing,
    /// SPG: the meaning-equivalence test of the clustering.
    pub equivalence: EquivalenceConfig,
    /// Run directory, epochs, batch size, logging, checkpoints, seed, optimiser (shared keys).
    #[serde(flatten)]
    pub fit: FitConfig,
}

impl Default for RlpRmConfig {
    fn default() -> Self {
        RlpRmConfig {
            model: PathBuf::new(),
            init: None,
            train_file: PathBuf::new(),
            variant: Variant::Uml,
            samples_file: None,
            policy: None,
            prompts_file: None,
            max_prompts: 0,
            samples_per_prompt: 10,
            temperature: 1.0,
            max_new_tokens: None,
            task: None,
            task_seed: 0,
            lambda: 0.5,
            z_dim: 32,
            head_width: 0,
            views_per_prompt: 1,
            critic: CriticKind::Bilinear,
            critic_temperature: 0.5,
            gamma: 0.5,
            pairing: Pairing::Spg,
            equivalence: EquivalenceConfig::default(),
            fit: FitConfig::with("runs/rlp-rm", 1e-5),
        }
    }
}

impl RlpRmConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(TrainError::invalid(m.to_string()));
        if self.model.as_os_str().is_empty() {
            return bad("`model` (the reward model to refresh) is required");
        }
        if self.train_file.as_os_str().is_empty() {
            return bad("`train_file` (the human preference pairs) is required");
        }
        match (&self.samples_file, &self.policy) {
            (None, None) => {
                return bad("no policy samples: set `samples_file`, or `policy` to sample from")
            }
            (Some(_), Some(_)) => {
                return bad("set either `samples_file` or `policy` (to sample from), not both")
            }
            (None, Some(_)) if self.task.is_none() && self.prompts_file.is_none() => {
                return bad("sampling the policy needs prompts: set `task` or `prompts_file`")
            }
            _ => {}
        }
        if self.samples_per_prompt < 2 {
            return bad("samples_per_prompt must be >= 2 (views and clusters need two samples)");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad("temperature must be > 0");
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return bad("lambda must be a finite number >= 0");
        }
        if self.variant == Variant::Uml && (self.z_dim == 0 || self.views_per_prompt == 0) {
            return bad("uml: z_dim and views_per_prompt must be >= 1");
        }
        if !(self.critic_temperature.is_finite() && self.critic_temperature > 0.0) {
            return bad("critic_temperature must be > 0");
        }
        if !(self.gamma.is_finite() && (0.0..=1.0).contains(&self.gamma)) {
            return bad("gamma must be in [0, 1]");
        }
        if self.fit.batch_size == 0 || self.fit.epochs == 0 {
            return bad("batch_size and epochs must be >= 1");
        }
        Ok(())
    }
}

/// What SPG made of the samples.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SpgStats {
    pub prompts: usize,
    pub pairs: usize,
    pub all_equivalent: usize,
    pub low_confidence: usize,
    pub ties: usize,
    /// Mean over prompts of |largest cluster| / n (none for reward-ranked pairs: no clusters).
    pub mean_confidence: Option<f64>,
    /// Mean number of clusters per prompt (none for reward-ranked pairs).
    pub mean_clusters: Option<f64>,
    /// Testbed: share of synthetic pairs whose chosen response has the higher gold (ties 1/2).
    pub gold_agreement: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RlpRmSummary {
    pub variant: Variant,
    pub steps: u64,
    pub human_pairs: usize,
    pub synthetic_pairs: usize,
    pub view_pairs: usize,
    pub train_accuracy: f64,
    /// UML: the last steps' mean MI estimate and symmetric KL.
    pub mib_mi: Option<f64>,
    pub mib_skl: Option<f64>,
    pub eval_accuracy: Option<f64>,
    pub eval_loss: Option<f64>,
    pub spg: Option<SpgStats>,
    pub samples_file: PathBuf,
    pub model: PathBuf,
}

/// Step 1: the policy's samples (read, or drawn and written into the run directory).
fn policy_samples(
    cfg: &RlpRmConfig,
    task: Option<&dyn Task>,
    resume: bool,
    device: &Device,
) -> Result<(Vec<SampleGroup>, PathBuf)> {
    if let Some(path) = &cfg.samples_file {
        let mut groups = read_groups(path)?;
        if cfg.max_prompts > 0 {
            groups.truncate(cfg.max_prompts);
        }
        return Ok((groups, path.clone()));
    }
    let out = cfg.fit.output_dir.join("samples.jsonl");
    if resume && out.exists() {
        return Ok((read_groups(&out)?, out));
    }
    let policy = cfg.policy.as_ref().expect("validated");
    let lm = TrainableLm::load(policy, device)?;
    let mut prompts: Vec<String> = match (&cfg.prompts_file, task) {
        (Some(p), _) => load_prompts(p, lm.chat_template.as_ref(), &LoadOptions::default())?.items,
        (None, Some(t)) => t.train_prompts().to_vec(),
        (None, None) => unreachable!("validated"),
    };
    if cfg.max_prompts > 0 {
        prompts.truncate(cfg.max_prompts);
    }
    let max_new_tokens = cfg
        .max_new_tokens
        .unwrap_or_else(|| task.map_or(128, |t| t.max_response_words() + 2));
    eprintln!(
        "== sampling {} x {} responses from {}",
        prompts.len(),
        cfg.samples_per_prompt,
        policy.display()
    );
    let params = SamplingParams {
        max_new_tokens,
        temperature: cfg.temperature,
        seed: stream_seed(cfg.fit.seed, "rlpsamp"),
        eos_token_ids: lm.eos_ids.clone(),
        ..Default::default()
    };
    let groups = sample_groups(
        &lm,
        &prompts,
        cfg.samples_per_prompt,
        &params,
        cfg.fit.max_len,
        64,
        device,
    )?;
    std::fs::create_dir_all(&cfg.fit.output_dir)
        .map_err(|e| TrainError::io(&cfg.fit.output_dir, e))?;
    write_groups(&out, &groups)?;
    Ok((groups, out))
}

/// UML's view pairs: per prompt, `views_per_prompt` seeded draws of two samples with different
/// texts (prompts whose samples are all the same text give none).
pub fn view_pairs(
    groups: &[SampleGroup],
    per_prompt: usize,
    seed: u64,
) -> Vec<(usize, usize, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(stream_seed(seed, "views"));
    let mut out = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let n = group.samples.len();
        let distinct: Vec<(usize, usize)> = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .filter(|&(i, j)| group.samples[i] != group.samples[j])
            .collect();
        if distinct.is_empty() {
            continue;
        }
        for _ in 0..per_prompt {
            let (i, j) = distinct[rng.random_range(0..distinct.len())];
            out.push((g, i, j));
        }
    }
    out
}

/// Turns (prompt, response) text into (prompt ids, response ids) for the scorer.
pub type Encode<'a> = dyn Fn(&str, &str) -> Result<(Vec<u32>, Vec<u32>)> + 'a;

/// SPG's synthetic pairs (text) with its statistics.
pub fn synthetic_pairs(
    cfg: &RlpRmConfig,
    groups: &[SampleGroup],
    scorer: &RewardModel,
    encode: &Encode,
    task: Option<&dyn Task>,
) -> Result<(Vec<LabelledPair>, SpgStats)> {
    let entail = spg::Entailment::from_config(&cfg.equivalence, task)?;
    let clusters = match cfg.pairing {
        Pairing::Spg => entail.cluster_all(groups)?,
        Pairing::RewardRanked => Vec::new(),
    };
    let mut stats = SpgStats {
        prompts: groups.len(),
        ..Default::default()
    };
    let mut pairs = Vec::new();
    let mut agree = 0.0;
    let (mut conf_sum, mut clusters_sum) = (0.0, 0.0);
    for (g, group) in groups.iter().enumerate() {
        let rows: Vec<(Vec<u32>, Vec<u32>)> = group
            .samples
            .iter()
            .map(|s| encode(&group.prompt, s))
            .collect::<Result<_>>()?;
        let rewards = scorer.score_raw(&rows, 64)?;
        let sel = match cfg.pairing {
            Pairing::Spg => {
                conf_sum += spg::confidence(&clusters[g]);
                clusters_sum += clusters[g].len() as f64;
                spg::select(
                    &clusters[g],
                    &rewards,
                    cfg.gamma,
                    &mut spg::prompt_rng(cfg.fit.seed, g),
                )
            }
            Pairing::RewardRanked => spg::reward_ranked(&group.samples, &rewards),
        };
        match sel {
            Selection::Pair {
                chosen, rejected, ..
            } => {
                let (c, r) = (&group.samples[chosen], &group.samples[rejected]);
                if let Some(t) = task {
                    let (a, b) = (
                        t.gold(&group.prompt, c.trim()),
                        t.gold(&group.prompt, r.trim()),
                    );
                    agree += if a > b {
                        1.0
                    } else if a == b {
                        0.5
                    } else {
                        0.0
                    };
                }
                pairs.push(LabelledPair {
                    prompt: group.prompt.clone(),
                    chosen: c.clone(),
                    rejected: r.clone(),
                });
            }
            Selection::AllEquivalent => stats.all_equivalent += 1,
            Selection::LowConfidence(_) => stats.low_confidence += 1,
            Selection::Tie => stats.ties += 1,
        }
    }
    let n = groups.len().max(1) as f64;
    if cfg.pairing == Pairing::Spg {
        stats.mean_confidence = Some(conf_sum / n);
        stats.mean_clusters = Some(clusters_sum / n);
    }
    stats.pairs = pairs.len();
    if task.is_some() && !pairs.is_empty() {
        stats.gold_agreement = Some(agree / pairs.len() as f64);
    }
    Ok((pairs, stats))
}

fn score_pairs(rm: &RewardModel, pairs: &[PairIds]) -> Result<(f64, f64)> {
    let side = |f: fn(&PairIds) -> &Vec<u32>| -> Vec<(Vec<u32>, Vec<u32>)> {
        pairs
            .iter()
            .map(|p| (p.prompt.clone(), f(p).clone()))
            .collect()
    };
    let (c, r) = (
        rm.score_raw(&side(|p| &p.chosen), 32)?,
        rm.score_raw(&side(|p| &p.rejected), 32)?,
    );
    let n = pairs.len().max(1) as f64;
    let acc = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64 / n;
    let loss = c
        .iter()
        .zip(&r)
        .map(|(a, b)| {
            let x = -(a - b);
            x.max(0.0) + (-x.abs()).exp().ln_1p()
        })
        .sum::<f64>()
        / n;
    Ok((loss, acc))
}

pub fn run(cfg: &RlpRmConfig, resume: bool, device: &Device) -> Result<RlpRmSummary> {
    cfg.validate()?;
    let task_box = cfg
        .task
        .as_deref()
        .map(|n| task_by_name(n, cfg.task_seed).map_err(TrainError::Invalid))
        .transpose()?;
    let task = task_box.as_deref();
    // 1. The policy's samples P.
    let (groups, samples_file) = policy_samples(cfg, task, resume, device)?;
    // 2. The model the refresh starts from: its scalar head (fresh if it has none) and, for UML,
    //    the MIB heads.
    let start = cfg.init.as_ref().unwrap_or(&cfg.model);
    let lm = TrainableLm::load(start, device)?;
    let mut weights = lm.params.snapshot()?;
    if !weights.contains_key(HEAD) {
        reward::add_head(&mut weights, lm.config.hidden_size, cfg.fit.seed, device)?;
    }
    if cfg.variant == Variant::Uml && !mib::has_heads(&weights) {
        let h = lm.config.hidden_size;
        let shape = HeadShape {
            input: h,
            width: if cfg.head_width == 0 {
                h
            } else {
                cfg.head_width
            },
            z_dim: cfg.z_dim,
        };
        mib::add_heads(
            &mut weights,
            shape,
            stream_seed(cfg.fit.seed, "mibinit"),
            device,
        )?;
    }
    let mut lm = TrainableLm {
        params: rlhf_lm::llama::Trainable::new(&weights)?,
        ..lm
    };
    // With LoRA the trunk trains adapters; the scalar and MIB heads train whole (they are not
    // decoder weights), and the saved reward model is an adapter with its head.
    lm.enable_lora(&cfg.fit.lora, cfg.fit.seed)?;
    let max_len = cfg.fit.max_len;
    let (mut pairs, eval) = load_with_eval(&cfg.train_file, cfg.fit.eval_file.as_deref(), |p| {
        load_pair_ids(&lm, p, max_len, cfg.fit.skip_bad_lines)
    })?;
    let human_pairs = pairs.len();
    // 3. UML: view pairs; SPG: synthetic pairs D̂ scored by the reward model being refreshed.
    let mut views: Vec<ViewPair> = Vec::new();
    let mut spg_stats = None;
    match cfg.variant {
        Variant::Uml => {
            for (g, i, j) in view_pairs(&groups, cfg.views_per_prompt, cfg.fit.seed) {
                let group = &groups[g];
                let (prompt, first, second) = lm.encode_shared(
                    &group.prompt,
                    &group.samples[i],
                    &group.samples[j],
                    true,
                    max_len,
                )?;
                views.push(ViewPair {
                    prompt,
                    first,
                    second,
                });
            }
            if views.is_empty() {
                return Err(TrainError::invalid(
                    "uml: no prompt has two different samples; nothing to learn views from",
                ));
            }
        }
        Variant::Spg => {
            let scorer = RewardModel::load(&cfg.model, device)?;
            let encode = |p: &str, c: &str| -> Result<(Vec<u32>, Vec<u32>)> {
                Ok(lm.encode(p, c, true, max_len)?)
            };
            let (synthetic, stats) = synthetic_pairs(cfg, &groups, &scorer, &encode, task)?;
            eprintln!(
                "   SPG: {} synthetic pairs from {} prompts ({} all-equivalent, {} below gamma {}, {} ties; mean confidence {:.3}){}",
                stats.pairs,
                stats.prompts,
                stats.all_equivalent,
                stats.low_confidence,
                cfg.gamma,
                stats.ties,
                stats.mean_confidence.unwrap_or(f64::NAN),
                stats
                    .gold_agreement
                    .map_or(String::new(), |a| format!("; agreement with gold {a:.3}"))
            );
            std::fs::create_dir_all(&cfg.fit.output_dir)
                .map_err(|e| TrainError::io(&cfg.fit.output_dir, e))?;
            write_pairs(&cfg.fit.output_dir.join("spg_pairs.jsonl"), &synthetic)?;
            rlhf_train::run::write_atomic(
                &cfg.fit.output_dir.join("spg.json"),
                serde_json::to_string_pretty(&stats)
                    .expect("serialisable")
                    .as_bytes(),
            )?;
            for p in &synthetic {
                let (prompt, chosen, rejected) =
                    lm.encode_shared(&p.prompt, &p.chosen, &p.rejected, true, max_len)?;
                pairs.push(PairIds {
                    prompt,
                    chosen,
                    rejected,
                    margin: 0.0,
                });
            }
            spg_stats = Some(stats);
        }
    }
    let synthetic_pairs = pairs.len() - human_pairs;
    // 4. Epochs over D ∪ D̂ and the view pairs together: BT mean + λ · MIB per batch.
    let (np, nv) = (pairs.len(), views.len());
    let plan = cfg.fit.plan("RLP reward model", eval.is_some());
    let mut trainer = cfg.fit.start(&plan, np + nv, cfg, &lm, resume)?;
    let noise_stream = stream_seed(cfg.fit.seed, "mibnoise");
    let critic = match cfg.critic {
        CriticKind::Bilinear => mib::Critic::Bilinear,
        CriticKind::Cosine => mib::Critic::Cosine {
            temperature: cfg.critic_temperature,
        },
    };
    let loss = |lm: &TrainableLm, batch: &[usize], part: &[usize]| {
        let (bp, bv) = (
            batch.iter().filter(|&&i| i < np).count(),
            batch.iter().filter(|&&i| i >= np).count(),
        );
        let part_pairs: Vec<PairIds> = part
            .iter()
            .filter(|&&i| i < np)
            .map(|&i| pairs[i].clone())
            .collect();
        let part_views: Vec<ViewPair> = part
            .iter()
            .filter(|&&i| i >= np)
            .map(|&i| views[i - np].clone())
            .collect();
        // The reparameterisation noise: a pure function of the seed and the micro-batch's items,
        // so a resumed run draws what the uninterrupted one did.
        let noise_seed = part.iter().fold(noise_stream, |h, &i| {
            h.rotate_left(7) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        });
        let out = mib::rlp_parts(lm, &part_pairs, &part_views, critic, noise_seed, device)?;
        let mut total: Option<candle_core::Tensor> = None;
        let mut metrics = Vec::new();
        if let Some(bt) = out.bt {
            let w = part_pairs.len() as f64 / bp as f64;
            metrics.push((
                "bt_loss",
                w * bt.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
            ));
            metrics.push(("accuracy", w * out.accuracy));
            total = Some((bt * w)?);
        }
        if let Some(m) = out.mib {
            let w = part_views.len() as f64 / bv as f64;
            metrics.push(("mib/loss", w * (m.skl - m.mi)));
            metrics.push(("mib/mi", w * m.mi));
            metrics.push(("mib/skl", w * m.skl));
            let term = (m.loss * (w * cfg.lambda))?;
            total = Some(match total {
                Some(t) => (t + term)?,
                None => term,
            });
        }
        Ok((total.expect("a micro-batch has pairs or views"), metrics))
    };
    let held_out = |trainer: &mut Trainer, lm: &TrainableLm| {
        let e = eval.as_ref().expect("eval_every is 0 without eval");
        let (l, a) = score_pairs(&RewardModel::from_trainable(lm, None, device)?, e)?;
        trainer.log(&[("eval_loss", l), ("eval_accuracy", a)])
    };
    let history = fit(&mut trainer, &lm, np + nv, &plan, loss, held_out)?;
    // 5. Held-out accuracy; the refreshed reward model without the MIB heads.
    let rm = RewardModel::from_trainable(&lm, None, device)?;
    let (eval_loss, eval_accuracy) = match &eval {
        Some(e) => {
            let (l, a) = score_pairs(&rm, e)?;
            trainer.log(&[("eval_loss", l), ("eval_accuracy", a)])?;
            (Some(l), Some(a))
        }
        None => (None, None),
    };
    let plain = TrainableLm {
        params: rlhf_lm::llama::Trainable::new(&mib::strip(&lm.params.snapshot()?))?,
        ..lm
    };
    let model_dir = trainer.run.path().join("model");
    reward::save(&plain, None, &model_dir)?;
    let tail = tail_mean(&history, 20);
    let summary = RlpRmSummary {
        variant: cfg.variant,
        steps: trainer.step,
        human_pairs,
        synthetic_pairs,
        view_pairs: nv,
        train_accuracy: tail.get("accuracy").copied().unwrap_or(f64::NAN),
        mib_mi: tail.get("mib/mi").copied(),
        mib_skl: tail.get("mib/skl").copied(),
        eval_accuracy,
        eval_loss,
        spg: spg_stats,
        samples_file,
        model: model_dir,
    };
    let path = cfg.fit.output_dir.join("summary.json");
    rlhf_train::run::write_atomic(
        &path,
        serde_json::to_string_pretty(&summary)
            .expect("serialisable")
            .as_bytes(),
    )?;
    Ok(summary)
}

/// Where a refreshed reward model is saved (for pipelines).
pub fn model_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("model")
}

/// `rlhf rlp-rm`.
pub static ENTRY: Entry<RlpRmConfig, RlpRmSummary> = Entry {
    name: "rlp-rm",
    about: "RLP: refresh a reward model on the policy's own samples (UML: BT + MIB over sample pairs; SPG: BT on human + synthetic pairs).",
    family: Family::Offline,
    shorthands: &[("variant", "variant", "uml | spg")],
    run,
};
