//! Online / iterative DPO (`rlhf online-dpo`; self-rewarding is the same loop, `rlhf self-reward`).
//!
//! Each round samples `samples_per_prompt` completions per prompt from the current policy, labels
//! them, and trains DPO (or any pair loss of [`crate::dpo`]) on the resulting pairs with the
//! previous iterate as the reference (spec §0.5): round t starts from the model round t-1 ended
//! with, and that model is also round t's reference. Labellers:
//!
//! - `reward_model`: any scorer of `[reward]` (a reward model, a command, an HTTP endpoint, or the
//!   testbed's gold score); best vs worst of the candidates, ties dropped;
//! - `annotators`: the testbed's simulated annotators (Bradley-Terry on gold, labels flipped with
//!   probability `noise`) on the first two distinct candidates;
//! - `judge`: an LLM-as-a-judge (`[judge]`, [`crate::self_reward`]); no `judge.model` means the
//!   current policy judges itself (self-rewarding); best vs worst mean score, ties and candidates
//!   with no parsable judgement dropped.
//!
//! Layout: `<output_dir>/round-<t>/` is round t's DPO run directory (config, metrics.jsonl,
//! TensorBoard, checkpoints, `model/`) plus `pairs.jsonl`, `judgements.jsonl` (judge) and
//! `round.json` (its labelling statistics); `<output_dir>/rounds.jsonl` has one line per round;
//! `<output_dir>/eval.json` evaluates the last round's model against the first round's starting
//! policy. `--resume` skips finished rounds and resumes the unfinished one from its checkpoint
//! (sampling and labelling are deterministic in the seed, so they are redone identically).
//!
//! With `[tripwire]` bounds set, each round's candidates are judged before anything is learned
//! from them (KL to the initial policy, length, perplexity): a tripped round does not train and
//! the policy goes back to the last one whose candidates passed (or, `action = "stop"`, the
//! rounds end there); `round.json` records it and `tripwire.json` says why.

use rlhf_rl::fit::FitConfig;
use rlhf_rl::registry::{Entry, Family};
use rlhf_train::rng::stream_seed;
use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_data::loaders::{load_prompts, LoadOptions};
use rlhf_data::testbed::{task_by_name, Annotator, Task};
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::Message;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use rlhf_rl::eval::EvalReport;
use rlhf_rl::judge::{eft_bootstrap, judge_candidates, EftConfig, Judge, JudgeConfig, JudgePrompt};
use rlhf_rl::pairs::PairIds;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::pref::{DpoConfig, DpoSummary, PolicyEval};
use rlhf_rl::reward_source::{Query, RewardConfig, Rewarder};
use rlhf_rl::sampling::{sample, Generated};
use rlhf_rl::tripwire::{TripAction, TripwireConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LabelerKind {
    RewardModel,
    Annotators,
    Judge,
}

/// The configuration of `rlhf online-dpo`: rounds of sampling, labelling and DPO.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OnlineDpoConfig {
    /// The initial policy (usually the SFT model).
    pub model: PathBuf,
    /// A testbed task: train prompts, eval prompts and gold (annotators, evaluation).
    pub task: Option<String>,
    /// Seed of the testbed task (its prompts and annotators).
    pub task_seed: u64,
    /// Prompts (`prompt` or `messages`) instead of the task's.
    pub prompts_file: Option<PathBuf>,
    /// Render plain-text prompts as a user message with the policy's chat template.
    pub chat: bool,
    /// The run directory (config, metrics, checkpoints, final model).
    pub output_dir: PathBuf,
    /// Rounds of sample -> label -> DPO; each round's policy is the next round's reference.
    pub rounds: usize,
    /// Prompts per round, taken in order (round t continues where round t-1 stopped, cycling).
    pub prompts_per_round: usize,
    /// Candidates per prompt.
    pub samples_per_prompt: usize,
    /// Default: the task's longest sensible response + 2 (testbed), else 128.
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature of the candidates.
    pub temperature: f64,
    /// Nucleus sampling of the candidates (unset: off).
    pub top_p: Option<f64>,
    /// Longer prompts keep their last tokens.
    pub max_prompt_len: usize,
    /// Prompts per generation batch.
    pub batch_size: usize,
    /// Who labels the candidates: reward_model | annotators (the testbed's simulated ones) | judge (an LLM judge, `[judge]`).
    pub labeler: LabelerKind,
    /// `labeler = "reward_model"`: the scorer.
    pub reward: RewardConfig,
    /// `labeler = "annotators"`: label-flip probability (AlpacaFarm: 0.25).
    pub noise: f64,
    /// `labeler = "judge"`.
    pub judge: JudgeConfig,
    /// Teach a testbed model to judge first (self-rewarding on the testbed).
    pub eft: EftConfig,
    /// Seed of every random stream of the run (data order, sampling, initialisation).
    pub seed: u64,
    /// The training of each round: loss, beta, epochs, batch size, optimiser... (`model`,
    /// `ref_model`, `train_file` and `output_dir` are set per round; leave them unset).
    pub dpo: DpoConfig,
    /// The final model against the first round's starting policy (or `eval_reference`).
    pub eval: PolicyEval,
    /// The policy the final evaluation compares against (default: the initial `model`).
    pub eval_reference: Option<PathBuf>,
    /// Also evaluate every round's model (`round-<t>/eval.json`).
    pub eval_every_round: bool,
    /// Divergence trip-wire on each round's candidates, before the policy learns from them: KL
    /// to the initial policy, mean length, the policy's perplexity on them (`max_loss` does not
    /// apply here). A tripped round does not train; the policy goes back to the last one whose
    /// candidates passed. Off unless a bound is set.
    pub tripwire: TripwireConfig,
}

impl Default for OnlineDpoConfig {
    fn default() -> Self {
        OnlineDpoConfig {
            model: PathBuf::new(),
            task: None,
            task_seed: 0,
            prompts_file: None,
            chat: false,
            output_dir: PathBuf::from("runs/online-dpo"),
            rounds: 3,
            prompts_per_round: 256,
            samples_per_prompt: 2,
            max_new_tokens: None,
            temperature: 1.0,
            top_p: None,
            max_prompt_len: 256,
            batch_size: 64,
            labeler: LabelerKind::RewardModel,
            reward: RewardConfig::default(),
            noise: 0.25,
            judge: JudgeConfig::default(),
            eft: EftConfig::default(),
            seed: 0,
            dpo: DpoConfig {
                fit: FitConfig {
                    save_every: 0,
                    ..DpoConfig::default().fit
                },
                ..DpoConfig::default()
            },
            eval: PolicyEval::default(),
            eval_reference: None,
            eval_every_round: false,
            tripwire: TripwireConfig::default(),
        }
    }
}

impl OnlineDpoConfig {
    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            return Err(TrainError::invalid(
                "`model` (the initial policy) is required",
            ));
        }
        if self.task.is_none() && self.prompts_file.is_none() {
            return Err(TrainError::invalid(
                "no prompts: set `task` (a testbed task) or `prompts_file`",
            ));
        }
        if self.rounds == 0 || self.prompts_per_round == 0 || self.samples_per_prompt < 2 {
            return Err(TrainError::invalid(
                "rounds and prompts_per_round must be >= 1 and samples_per_prompt >= 2",
            ));
        }
        let d = &self.dpo;
        if !d.model.as_os_str().is_empty()
            || d.ref_model.is_some()
            || !d.train_file.as_os_str().is_empty()
            || d.eval.enabled()
        {
            return Err(TrainError::invalid(
                "dpo.model, dpo.ref_model, dpo.train_file and dpo.eval are set per round: set `model` and `eval` at the top level",
            ));
        }
        if self.labeler == LabelerKind::Annotators && self.task.is_none() {
            return Err(TrainError::invalid(
                "labeler = \"annotators\" needs a testbed `task` (its gold reward)",
            ));
        }
        if self.eft.examples > 0 && self.task.is_none() {
            return Err(TrainError::invalid("eft needs a testbed `task`"));
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return Err(TrainError::invalid(
                "temperature must be > 0 (candidates must differ)",
            ));
        }
        Ok(())
    }
}

/// A prompt as the judge sees it (`raw`) and as the policy does (`text`, chat-rendered).
#[derive(Debug, Clone)]
pub struct PromptItem {
    pub raw: String,
    pub text: String,
}

fn load_prompt_items(
    cfg: &OnlineDpoConfig,
    lm: &TrainableLm,
    task: Option<&dyn Task>,
) -> Result<Vec<PromptItem>> {
    let raw: Vec<String> = match (&cfg.prompts_file, task) {
        (Some(p), _) => load_prompts(p, lm.chat_template.as_ref(), &LoadOptions::default())?.items,
        (None, Some(t)) => t.train_prompts().to_vec(),
        (None, None) => unreachable!("validated"),
    };
    if raw.is_empty() {
        return Err(TrainError::invalid("no prompts"));
    }
    raw.into_iter()
        .map(|r| {
            let text = if cfg.chat {
                let t = lm.chat_template.as_ref().ok_or_else(|| {
                    TrainError::invalid("chat = true but the policy has no chat template")
                })?;
                t.render(&[Message::new("user", r.clone())], true)?
            } else {
                r.clone()
            };
            Ok(PromptItem { raw: r, text })
        })
        .collect()
}

/// What one round's labelling produced.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RoundStats {
    pub round: usize,
    pub policy: PathBuf,
    pub prompts: usize,
    pub candidates: usize,
    pub pairs: usize,
    /// Prompts whose best and worst candidates scored the same (or were the same text).
    pub ties_dropped: usize,
    /// Prompts with fewer than two scored candidates (judge: no parsable judgement).
    pub unscored_dropped: usize,
    /// Judge only: judgements generated and parsed, and their ratio.
    pub judgements: Option<usize>,
    pub parsed: Option<usize>,
    pub parse_rate: Option<f64>,
    /// Mean gold of the candidates (testbed), for watching the policy improve round to round.
    pub candidates_gold_mean: Option<f64>,
    /// Testbed: how often the chosen completion has the higher gold (ties count 1/2) -- the
    /// labeller's agreement with the hidden preference (the paper's judge accuracy).
    pub pairs_gold_agreement: Option<f64>,
    pub seconds_labelling: f64,
    pub dpo: Option<DpoSummary>,
    /// The trip-wire's monitors of the round's candidates (when `[tripwire]` is on).
    #[serde(default)]
    pub monitors: Option<RoundMonitors>,
    /// Why the trip-wire tripped on this round, and the policy it went back to.
    #[serde(default)]
    pub tripped: Option<(String, PathBuf)>,
}

/// What the trip-wire judges a round's candidates by.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RoundMonitors {
    /// Mean sequence KL(policy || initial policy) of the candidates.
    pub kl: f64,
    /// Mean completion tokens.
    pub response_length: f64,
    /// The policy's perplexity on its own candidates.
    pub perplexity: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OnlineDpoSummary {
    pub rounds: Vec<RoundStats>,
    pub model: PathBuf,
    pub eval: Option<EvalReport>,
}

fn round_dir(out: &Path, t: usize) -> PathBuf {
    out.join(format!("round-{t}"))
}

/// Best vs worst of each prompt's scored candidates (`None`: unscored); ties dropped.
fn best_vs_worst(
    groups: &[&[Generated]],
    scores: &[Option<f64>],
    k: usize,
    stats: &mut RoundStats,
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let scored: Vec<(usize, f64)> = (0..group.len())
            .filter_map(|j| scores[g * k + j].map(|s| (g * k + j, s)))
            .collect();
        if scored.len() < 2 {
            stats.unscored_dropped += 1;
            continue;
        }
        let best = scored
            .iter()
            .fold(scored[0], |b, &x| if x.1 > b.1 { x } else { b });
        let worst = scored
            .iter()
            .fold(scored[0], |w, &x| if x.1 < w.1 { x } else { w });
        let (a, b) = (&group[best.0 - g * k], &group[worst.0 - g * k]);
        if best.1 == worst.1 || a.completion_ids == b.completion_ids {
            stats.ties_dropped += 1;
            continue;
        }
        out.push((best.0, worst.0));
    }
    out
}

/// Sample, label and pair one round's prompts with `policy`.
#[allow(clippy::too_many_arguments)]
fn label_round(
    cfg: &OnlineDpoConfig,
    t: usize,
    lm: &TrainableLm,
    prompts: &[PromptItem],
    task: Option<&dyn Task>,
    dir: &Path,
    max_new_tokens: usize,
    initial: Option<&rlhf_lm::llama::Llama>,
    device: &Device,
) -> Result<(Vec<PairIds>, RoundStats)> {
    let started = std::time::Instant::now();
    let k = cfg.samples_per_prompt;
    let n = cfg.prompts_per_round;
    let chosen: Vec<&PromptItem> = (0..n)
        .map(|i| &prompts[((t - 1) * n + i) % prompts.len()])
        .collect();
    let mut rows: Vec<(String, Vec<u32>)> = Vec::with_capacity(n * k);
    for p in &chosen {
        let ids = lm.encode_prompt(&p.text, cfg.max_prompt_len)?;
        rows.extend(std::iter::repeat_n((p.text.clone(), ids), k));
    }
    let policy = lm.model(device)?.detached();
    let round_seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(t as u64);
    let params = SamplingParams {
        max_new_tokens,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        seed: round_seed,
        eos_token_ids: lm.eos_ids.clone(),
        ..Default::default()
    };
    let cands = sample(
        &policy,
        &lm.tokenizer,
        lm.pad_id,
        &rows,
        &params,
        cfg.batch_size,
    )?;
    let groups: Vec<&[Generated]> = cands.chunks(k).collect();
    let mut stats = RoundStats {
        round: t,
        prompts: n,
        candidates: cands.len(),
        ..Default::default()
    };
    if let Some(initial) = initial {
        stats.monitors = Some(monitors(&cands, initial, lm.pad_id, cfg)?);
    }
    if let Some(task) = task {
        let g: Vec<f64> = cands
            .iter()
            .zip(chosen.iter().flat_map(|p| std::iter::repeat_n(*p, k)))
            .map(|(c, p)| task.gold(&p.raw, &c.completion))
            .collect();
        stats.candidates_gold_mean = Some(g.iter().sum::<f64>() / g.len().max(1) as f64);
    }
    let raw_of = |i: usize| &chosen[i / k].raw;
    let picked: Vec<(usize, usize)> = match cfg.labeler {
        LabelerKind::RewardModel => {
            let rewarder = Rewarder::from_config(
                &cfg.reward,
                cfg.task.as_deref(),
                cfg.task_seed,
                &lm.tokenizer,
                device,
            )?;
            let queries: Vec<Query> = cands
                .iter()
                .enumerate()
                .map(|(i, c)| Query {
                    prompt: raw_of(i),
                    completion: &c.completion,
                    prompt_ids: &c.prompt_ids,
                    completion_ids: &c.completion_ids,
                })
                .collect();
            let scores: Vec<Option<f64>> = rewarder
                .score_raw(&queries)?
                .into_iter()
                .map(|s| Some(s).filter(|s| s.is_finite()))
                .collect();
            best_vs_worst(&groups, &scores, k, &mut stats)
        }
        LabelerKind::Annotators => {
            let task = task.expect("validated");
            let mut annotator =
                Annotator::for_task(task, cfg.noise, stream_seed(round_seed, "annot"));
            let mut out = Vec::new();
            for (g, group) in groups.iter().enumerate() {
                let a = 0;
                let Some(b) =
                    (1..group.len()).find(|&j| group[j].completion != group[a].completion)
                else {
                    stats.ties_dropped += 1;
                    continue;
                };
                let p = &chosen[g].raw;
                let a_wins = annotator.prefer(task, p, &group[a].completion, &group[b].completion);
                let (w, l) = if a_wins { (a, b) } else { (b, a) };
                out.push((g * k + w, g * k + l));
            }
            out
        }
        LabelerKind::Judge => {
            let own;
            let (judge_lm, judge_model) = match &cfg.judge.model {
                Some(p) => {
                    own = TrainableLm::load(p, device)?;
                    let m = own.model(device)?.detached();
                    (&own, m)
                }
                None => (lm, policy.detached()),
            };
            let jp =
                JudgePrompt::resolve(&cfg.judge, task.is_some(), judge_lm.chat_template.as_ref())?;
            let judge = Judge {
                model: &judge_model,
                tokenizer: &judge_lm.tokenizer,
                chat_template: judge_lm.chat_template.as_ref(),
                pad_id: judge_lm.pad_id,
                eos_ids: judge_lm.eos_ids.clone(),
            };
            let items: Vec<(String, String)> = cands
                .iter()
                .enumerate()
                .map(|(i, c)| (raw_of(i).clone(), c.completion.clone()))
                .collect();
            let judged = judge_candidates(
                &judge,
                &jp,
                &cfg.judge,
                &items,
                stream_seed(round_seed, "judge"),
            )?;
            stats.judgements = Some(judged.judgements);
            stats.parsed = Some(judged.parsed);
            stats.parse_rate = Some(judged.parse_rate());
            let mut lines = String::new();
            for ((p, r), (score, replies)) in
                items.iter().zip(judged.scores.iter().zip(&judged.replies))
            {
                lines.push_str(
                    &serde_json::json!({"prompt": p, "response": r, "score": score,
                        "judgements": replies.iter().map(|(t, s)| serde_json::json!({"reply": t, "score": s})).collect::<Vec<_>>()})
                    .to_string(),
                );
                lines.push('\n');
            }
            let path = dir.join("judgements.jsonl");
            std::fs::write(&path, lines).map_err(|e| TrainError::io(&path, e))?;
            best_vs_worst(&groups, &judged.scores, k, &mut stats)
        }
    };
    let pairs: Vec<PairIds> = picked
        .iter()
        .map(|&(w, l)| {
            let mut pair = PairIds {
                prompt: cands[w].prompt_ids.clone(),
                chosen: cands[w].completion_ids.clone(),
                rejected: cands[l].completion_ids.clone(),
                margin: 0.0,
            };
            // One shared prompt, both sides within `dpo.max_len` (a no-op when the rollout
            // limits already fit).
            rlhf_rl::policy::truncate_shared(
                &mut pair.prompt,
                &mut pair.chosen,
                &mut pair.rejected,
                cfg.dpo.fit.max_len,
                &lm.eos_ids,
            );
            pair
        })
        .collect();
    let texts: Vec<rlhf_rl::preferences::LabelledPair> = picked
        .iter()
        .map(|&(w, l)| rlhf_rl::preferences::LabelledPair {
            prompt: cands[w].prompt.clone(),
            chosen: cands[w].completion.clone(),
            rejected: cands[l].completion.clone(),
        })
        .collect();
    rlhf_rl::preferences::write_pairs(&dir.join("pairs.jsonl"), &texts)?;
    if let Some(task) = task {
        let agree: f64 = picked
            .iter()
            .map(|&(w, l)| {
                let p = raw_of(w);
                let (a, b) = (
                    task.gold(p, &cands[w].completion),
                    task.gold(p, &cands[l].completion),
                );
                if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                }
            })
            .sum();
        stats.pairs_gold_agreement = Some(agree / picked.len().max(1) as f64);
    }
    stats.pairs = pairs.len();
    stats.seconds_labelling = started.elapsed().as_secs_f64();
    Ok((pairs, stats))
}

/// The trip-wire's view of a round's candidates: their KL to the initial policy (sampled
/// log-probs against the initial policy's, at the sampling temperature), length and perplexity.
fn monitors(
    cands: &[Generated],
    initial: &rlhf_lm::llama::Llama,
    pad_id: u32,
    cfg: &OnlineDpoConfig,
) -> Result<RoundMonitors> {
    let rows: Vec<(Vec<u32>, Vec<u32>)> = cands
        .iter()
        .map(|g| (g.prompt_ids.clone(), g.completion_ids.clone()))
        .collect();
    let initial_lp =
        rlhf_lm::score::score_pairs(initial, &rows, pad_id, cfg.batch_size, cfg.temperature)?;
    let n = cands.len().max(1) as f64;
    let tokens: usize = cands.iter().map(|g| g.logprobs.len()).sum();
    let logp_sum: f64 = cands
        .iter()
        .flat_map(|g| g.logprobs.iter())
        .map(|&x| x as f64)
        .sum();
    let kl = cands
        .iter()
        .zip(&initial_lp)
        .map(|(g, r)| rlhf_rl::kl::sequence_kl(&g.logprobs, r))
        .sum::<f64>()
        / n;
    Ok(RoundMonitors {
        kl,
        response_length: tokens as f64 / n,
        perplexity: (-logp_sum / tokens.max(1) as f64).exp(),
    })
}

/// Mark a round done (`round.json`) and append it to `rounds.jsonl`.
fn finish_round(done: &Path, log_path: &Path, stats: &RoundStats) -> Result<()> {
    rlhf_train::run::write_json(done, stats)?;
    let mut log = std::fs::read_to_string(log_path).unwrap_or_default();
    log.push_str(&serde_json::to_string(stats).expect("serialisable"));
    log.push('\n');
    rlhf_train::run::write_atomic(log_path, log.as_bytes())
}

/// Whether a trip now ends the rounds: `action = "stop"`, or the rollbacks (earlier tripped
/// rounds) are used up.
fn trip_stops(tw: &TripwireConfig, earlier: &[RoundStats]) -> bool {
    let rollbacks = earlier.iter().filter(|r| r.tripped.is_some()).count();
    tw.action == TripAction::Stop || rollbacks >= tw.max_rollbacks
}

pub fn run(cfg: &OnlineDpoConfig, resume: bool, device: &Device) -> Result<OnlineDpoSummary> {
    cfg.validate()?;
    let out = &cfg.output_dir;
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let task_box = cfg
        .task
        .as_deref()
        .map(|n| task_by_name(n, cfg.task_seed).map_err(TrainError::Invalid))
        .transpose()?;
    let task = task_box.as_deref();
    let max_new_tokens = cfg
        .max_new_tokens
        .unwrap_or_else(|| task.map_or(128, |t| t.max_response_words() + 2));
    // The starting policy: the model, or the model after EFT (testbed self-rewarding).
    let start = if cfg.eft.examples > 0 {
        let eft_dir = out.join("eft");
        if resume && eft_dir.join("model/config.json").exists() {
            eft_dir.join("model")
        } else {
            let first = TrainableLm::load(&cfg.model, device)?;
            let jp = JudgePrompt::resolve(&cfg.judge, true, first.chat_template.as_ref())?;
            eprintln!(
                "== EFT: teaching the policy to judge ({} examples)",
                cfg.eft.examples
            );
            let task = task.expect("validated");
            // The judge learns from the simulated annotators' pairwise labels (the user's
            // side of the testbed), never from the gold reward itself.
            let mut annotator =
                Annotator::for_task(task, cfg.noise, stream_seed(cfg.seed, "eftannot"));
            let mut prefer = |p: &str, a: &str, b: &str| annotator.prefer(task, p, a, b);
            eft_bootstrap(
                &cfg.eft,
                &jp,
                task,
                &mut prefer,
                &cfg.model,
                &eft_dir,
                cfg.seed,
                device,
            )?
        }
    } else {
        cfg.model.clone()
    };
    let mut policy = start.clone();
    // The trip-wire's last good policy (one whose candidates passed) and the initial policy the
    // KL is measured against.
    let tw = &cfg.tripwire;
    let mut good = start.clone();
    // The round whose starting policy `good` is (its candidates passed), 1-based.
    let mut good_round = 1;
    let initial = if tw.enabled() {
        Some(TrainableLm::load(&start, device)?.model(device)?.detached())
    } else {
        None
    };
    let mut rounds: Vec<RoundStats> = Vec::new();
    let log_path = out.join("rounds.jsonl");
    if !resume {
        std::fs::remove_file(&log_path).ok();
    }
    for t in 1..=cfg.rounds {
        let dir = round_dir(out, t);
        let done = dir.join("round.json");
        if resume && done.exists() {
            let stats: RoundStats = rlhf_train::run::read_json(&done)?;
            eprintln!("round {t}: done ({} pairs)", stats.pairs);
            match &stats.tripped {
                Some((_, back_to)) => policy = back_to.clone(),
                None => {
                    good = stats.policy.clone();
                    good_round = t;
                    if stats.dpo.is_some() {
                        policy = dir.join("model");
                    }
                }
            }
            let stopped = stats.tripped.is_some() && trip_stops(tw, &rounds);
            rounds.push(stats);
            if stopped {
                break;
            }
            continue;
        }
        std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        eprintln!(
            "== round {t}/{}: sampling and labelling with {}",
            cfg.rounds,
            policy.display()
        );
        let lm = TrainableLm::load(&policy, device)?;
        let prompts = load_prompt_items(cfg, &lm, task)?;
        let (pairs, mut stats) = label_round(
            cfg,
            t,
            &lm,
            &prompts,
            task,
            &dir,
            max_new_tokens,
            initial.as_ref(),
            device,
        )?;
        stats.policy = policy.clone();
        // The trip-wire judges the policy that sampled this round before it learns from them.
        if let Some(m) = stats.monitors {
            match tw.check(m.kl, m.response_length, m.perplexity) {
                None => {
                    good = policy.clone();
                    good_round = t;
                }
                Some(why) => {
                    let stop = trip_stops(tw, &rounds);
                    rlhf_rl::tripwire::record(
                        &mut |_| Ok(()),
                        out,
                        &format!("round {t}: {why}; back to round {good_round}'s starting policy"),
                        stop,
                        0,
                        good_round as u64,
                        &[
                            ("kl", m.kl),
                            ("response_length", m.response_length),
                            ("perplexity", m.perplexity),
                        ],
                    )?;
                    policy = good.clone();
                    stats.tripped = Some((why, good.clone()));
                    finish_round(&done, &log_path, &stats)?;
                    rounds.push(stats);
                    if stop {
                        break;
                    }
                    continue;
                }
            }
        }
        eprintln!(
            "   {} pairs from {} prompts ({} ties, {} unscored dropped){}",
            stats.pairs,
            stats.prompts,
            stats.ties_dropped,
            stats.unscored_dropped,
            stats
                .parse_rate
                .map_or(String::new(), |r| format!("; judge parse rate {r:.3}"))
        );
        if pairs.is_empty() {
            // Nothing to learn from (e.g. no judgement parsed): the policy carries over unchanged.
            eprintln!(
                "   round {t}: no preference pairs, no training (see {})",
                dir.display()
            );
            finish_round(&done, &log_path, &stats)?;
            rounds.push(stats);
            continue;
        }
        let dpo_cfg = DpoConfig {
            model: policy.clone(),
            ref_model: None,
            eval: if cfg.eval_every_round && cfg.eval.enabled() {
                cfg.eval.clone()
            } else {
                PolicyEval::default()
            },
            fit: FitConfig {
                // the round's starting policy: the previous iterate
                output_dir: dir.clone(),
                seed: cfg.dpo.fit.seed.wrapping_add(t as u64),
                ..cfg.dpo.clone().fit
            },
            ..cfg.dpo.clone()
        };
        let resume_round = resume && dir.join(rlhf_train::run::CHECKPOINTS_DIR).exists();
        let summary =
            rlhf_rl::pref::train_on_pairs(&dpo_cfg, lm, pairs, None, resume_round, device)?;
        policy = summary.model.clone();
        stats.dpo = Some(summary);
        finish_round(&done, &log_path, &stats)?;
        rounds.push(stats);
    }
    let eval = if cfg.eval.enabled() {
        let reference = cfg.eval_reference.clone().unwrap_or(start);
        Some(
            cfg.eval
                .run(&policy, &reference, &out.join("eval.json"), device)?,
        )
    } else {
        None
    };
    let summary = OnlineDpoSummary {
        rounds,
        model: policy,
        eval,
    };
    rlhf_train::run::write_json(&out.join("summary.json"), &summary)?;
    Ok(summary)
}

/// `rlhf self-reward`: online DPO whose labeller is the policy judging itself, with the paper's
/// defaults (4 candidates at temperature 0.7, top-p 0.9; 3 judgements averaged; beta 0.1).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct SelfRewardConfig(pub OnlineDpoConfig);

impl Default for SelfRewardConfig {
    fn default() -> Self {
        let mut c = OnlineDpoConfig {
            labeler: LabelerKind::Judge,
            samples_per_prompt: 4,
            temperature: 0.7,
            top_p: Some(0.9),
            rounds: 2,
            output_dir: PathBuf::from("runs/self-reward"),
            ..OnlineDpoConfig::default()
        };
        c.judge.model = None;
        SelfRewardConfig(c)
    }
}

pub fn run_self_reward(
    cfg: &SelfRewardConfig,
    resume: bool,
    device: &Device,
) -> Result<OnlineDpoSummary> {
    if cfg.0.labeler != LabelerKind::Judge || cfg.0.judge.model.is_some() {
        return Err(TrainError::invalid(
            "self-rewarding: the policy judges itself (labeler = \"judge\", no judge.model); use `rlhf online-dpo` for other labellers",
        ));
    }
    run(&cfg.0, resume, device)
}

/// `rlhf online-dpo`.
pub static ENTRY: Entry<OnlineDpoConfig, OnlineDpoSummary> = Entry {
    name: "online-dpo",
    about: "Online / iterative DPO: sample pairs from the current policy, label them (reward model, simulated annotators or a judge), DPO against the previous iterate; repeat.",
    family: Family::Iterative,
    shorthands: &[],
    run,
};

/// `rlhf self-reward`.
pub static SELF_REWARD_ENTRY: Entry<SelfRewardConfig, OnlineDpoSummary> = Entry {
    name: "self-reward",
    about: "Self-rewarding: the policy judges its own candidates (0-5 rubric), best vs worst -> DPO; iterate.",
    family: Family::Iterative,
    shorthands: &[],
    run: run_self_reward,
};
