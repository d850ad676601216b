//! What every online method shares around its own math: the configuration layout, start-up
//! (policy, frozen reference, prompts, reward source and its normalisation, run directory,
//! resume), the prompt order, rollouts, optimiser steps with micro-batching, the metrics every
//! method logs, checkpoints, and the final evaluation (`eval.json`).
//!
//! A method file (`reinforce.rs`, `rloo.rs`, `vanilla_pg.rs`, `raft.rs`, `grpo.rs`) holds only its
//! estimator and a loop of the same shape:
//!
//! ```text
//! let mut s = Session::start(cfg, updates_per_iteration, resume, device)?;
//! while !s.done() {
//!     let rollout = s.rollout()?;                       // k samples per prompt, scored, ref log-probs
//!     let adv = advantages(...rollout numbers...);      // the method's pure function
//!     for minibatch { s.optimizer_step(minibatch, |lm, part| loss(...))?; }
//!     s.end_iteration(&rollout, &metrics, state)?;      // log, KL controller, eval, checkpoint
//! }
//! s.finish()                                            // model/, eval.json
//! ```
//!
//! Steps: `steps` counts rollout batches ("iterations"); the optimiser may step several times per
//! batch, and the run directory's step (metrics, checkpoints) counts optimiser steps.
//! Everything random is a function of (`seed`, iteration), so a resumed run continues exactly.

use rlhf_train::rng::{step_seed, stream_seed};
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rlhf_data::loaders::{load_prompts, LoadOptions};
use rlhf_data::testbed::{task_by_name, Task};
use rlhf_lm::generate::SamplingParams;
use rlhf_lm::llama::Llama;
use rlhf_lm::lora::LoraConfig;
use rlhf_lm::score::{completion_logprobs, CompletionBatch};
use rlhf_train::{Result, TrainError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::eval::{judge, EvalReport, Judges, KlModels};
use crate::kl::{KlConfig, KlController};
use crate::objectives::sequence_loss;
use crate::policy::TrainableLm;
use crate::reward::RewardNorm;
use crate::reward_source::{Query, RewardConfig, Rewarder, SourceKind};
use crate::rollout::{collect, summary, Policies, Rollout, RolloutConfig};
use crate::sampling::{sample, Generated};
use crate::trainer::{epoch_order, OptimConfig, StepStats, Trainer};
use crate::tripwire::{Guard, Snapshot, TripAction, TripwireConfig};
use crate::value::ValueModel;

/// A method's own parameters (the `[method]` table) and how it changes the shared defaults.
pub trait Method:
    Default
    + Clone
    + std::fmt::Debug
    + Serialize
    + DeserializeOwned
    + schemars::JsonSchema
    + Send
    + Sync
{
    const NAME: &'static str;
    /// Change the shared defaults (k, beta, ...) for this method.
    fn adjust_defaults(_cfg: &mut OnlineConfig<Self>) {}
    /// Optimiser steps per rollout batch.
    fn updates_per_iteration(cfg: &OnlineConfig<Self>) -> u64;
    /// Reject invalid combinations with a message (e.g. RLOO with k = 1).
    fn validate(_cfg: &OnlineConfig<Self>) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OnlineEvalConfig {
    /// Eval prompts (the task's eval split, or `eval_prompts_file`); 0 skips evaluation.
    pub prompts: usize,
    /// Also evaluate every this many iterations (0: only at the end).
    pub every: u64,
    /// Default: the rollout's.
    pub max_new_tokens: Option<usize>,
    /// Sampling seed of the evaluation (the same reference samples for every method).
    pub seed: u64,
    /// Sampling temperature of policy and reference at evaluation (AlpacaFarm: 0.7), no top-k /
    /// top-p. `eval/kl` is then the KL between the temperature-scaled distributions (the ones
    /// sampled from). Default 1.0.
    pub temperature: f64,
}

impl OnlineEvalConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(TrainError::invalid(format!(
                "eval.temperature must be positive and finite (got {})",
                self.temperature
            )));
        }
        Ok(())
    }
}

impl Default for OnlineEvalConfig {
    fn default() -> Self {
        OnlineEvalConfig {
            prompts: 200,
            every: 0,
            max_new_tokens: None,
            seed: 12_345,
            temperature: 1.0,
        }
    }
}

/// The configuration of an online method: shared keys plus the method's `[method]` table.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(
    deny_unknown_fields,
    default,
    bound(serialize = "M: Serialize", deserialize = "M: Method")
)]
#[schemars(bound = "M: Method")]
pub struct OnlineConfig<M> {
    /// The initial policy (usually the SFT model): an HF directory or a .gguf file.
    pub model: PathBuf,
    /// The frozen reference policy; default: `model`.
    pub reference: Option<PathBuf>,
    /// A testbed task: its train prompts, eval prompts and gold reward (for evaluation, and for
    /// `reward.source = "gold"`).
    pub task: Option<String>,
    /// Seed of the testbed task (its prompts and annotators).
    pub task_seed: u64,
    /// Prompts to train on (`prompt` or `messages` JSONL/Parquet), instead of the task's.
    pub prompts_file: Option<PathBuf>,
    /// Evaluation prompts (`prompt` or `messages`), instead of the task's eval split.
    pub eval_prompts_file: Option<PathBuf>,
    /// The run directory (config, metrics, checkpoints, final model).
    pub output_dir: PathBuf,
    /// Rollout batches (iterations).
    pub steps: u64,
    /// Prompts per rollout batch (each sampled `rollout.k` times).
    pub prompts_per_step: usize,
    /// Seed of every random stream of the run (data order, sampling, initialisation).
    pub seed: u64,
    /// Log every this many iterations.
    pub log_every: u64,
    /// Checkpoint every this many iterations (0: never; the final model is always written).
    pub save_every: u64,
    /// Sampling: samples per prompt (k), lengths, temperature, generation batch.
    pub rollout: RolloutConfig,
    /// Where rewards come from (reward model, gold on explicit request, a command, an HTTP endpoint) and their normalisation.
    pub reward: RewardConfig,
    /// The KL penalty to the reference policy: fixed or adaptive beta.
    pub kl: KlConfig,
    /// Optimiser (AdamW), learning-rate schedule, clipping and gradient accumulation.
    pub optim: OptimConfig,
    /// Recompute each decoder layer of the policy in the backward pass instead of keeping its
    /// activations (transformers' `gradient_checkpointing`): less memory, one more forward pass.
    pub gradient_checkpointing: bool,
    /// Win-rate evaluation against the reference policy (eval.json).
    pub eval: OnlineEvalConfig,
    /// LoRA adapters instead of full fine-tuning (`r = 0`, the default: every weight trains);
    /// the reference is then the base model with adapters off. PPO's critic gets its own.
    pub lora: LoraConfig,
    /// Divergence trip-wire: bounds on KL, length, perplexity and loss, and what to do when one
    /// is crossed (roll back to the last good state, or stop there). Off unless a bound is set.
    pub tripwire: TripwireConfig,
    /// The method's own parameters.
    pub method: M,
}

impl<M: Method> Default for OnlineConfig<M> {
    fn default() -> Self {
        let mut c = OnlineConfig {
            model: PathBuf::new(),
            reference: None,
            task: None,
            task_seed: 0,
            prompts_file: None,
            eval_prompts_file: None,
            output_dir: PathBuf::from(format!("runs/{}", M::NAME)),
            steps: 100,
            prompts_per_step: 16,
            seed: 0,
            log_every: 1,
            save_every: 50,
            rollout: RolloutConfig::default(),
            reward: RewardConfig::default(),
            kl: KlConfig::default(),
            optim: OptimConfig {
                lr: 1e-5,
                schedule: rlhf_train::ScheduleKind::Constant,
                warmup_ratio: 0.03,
                ..OptimConfig::default()
            },
            gradient_checkpointing: false,
            eval: OnlineEvalConfig::default(),
            lora: LoraConfig::default(),
            tripwire: TripwireConfig::default(),
            method: M::default(),
        };
        M::adjust_defaults(&mut c);
        c
    }
}

impl<M: Method> OnlineConfig<M> {
    pub fn validate(&self) -> Result<()> {
        if self.model.as_os_str().is_empty() {
            return Err(TrainError::invalid(
                "`model` (the initial policy) is required",
            ));
        }
        if self.steps == 0 || self.prompts_per_step == 0 {
            return Err(TrainError::invalid(
                "steps and prompts_per_step must be >= 1",
            ));
        }
        if self.task.is_none() && self.prompts_file.is_none() {
            return Err(TrainError::invalid(
                "no prompts: set `task` (a testbed task) or `prompts_file`",
            ));
        }
        self.rollout.validate()?;
        self.kl.validate()?;
        self.eval.validate()?;
        M::validate(self)
    }
}

/// What a finished run reports (and `rlhf <method>` prints).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OnlineSummary {
    pub method: String,
    pub iterations: u64,
    pub optimizer_steps: u64,
    pub samples: u64,
    pub final_reward: f64,
    pub final_kl: f64,
    pub beta: f64,
    pub eval: Option<EvalReport>,
    pub model: PathBuf,
}

/// A running online method: everything but its estimator.
pub struct Session<M: Method> {
    pub cfg: OnlineConfig<M>,
    pub device: Device,
    pub lm: TrainableLm,
    pub reference: Llama,
    pub rewarder: Rewarder,
    pub task: Option<Box<dyn Task>>,
    pub prompts: Vec<(String, Vec<u32>)>,
    pub eval_prompts: Vec<(String, Vec<u32>)>,
    eval_reference: Option<Vec<Generated>>,
    pub trainer: Trainer,
    pub kl: KlController,
    pub updates_per_iteration: u64,
    /// The method's own state from the checkpoint a resumed run started from.
    pub resumed_method_state: Option<serde_json::Value>,
    /// The trip-wire's snapshots and rollbacks (`[tripwire]`).
    pub guard: Guard,
    /// The trip-wire ended the run.
    stopped: bool,
    iteration_started: Instant,
    last_reward: f64,
    last_kl: f64,
}

fn encode_all(
    lm: &TrainableLm,
    texts: &[String],
    max_len: usize,
) -> Result<Vec<(String, Vec<u32>)>> {
    texts
        .iter()
        .map(|t| Ok((t.clone(), lm.encode_prompt(t, max_len)?)))
        .collect()
}

impl<M: Method> Session<M> {
    pub fn start(cfg: &OnlineConfig<M>, resume: bool, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut lm = TrainableLm::load(&cfg.model, device)?;
        lm.enable_lora(&cfg.lora, cfg.seed)?;
        lm.set_gradient_checkpointing(cfg.gradient_checkpointing);
        // The reference is the initial weights, taken before a resumed run loads its checkpoint.
        let reference = match &cfg.reference {
            Some(p) => rlhf_lm::Pretrained::load(p, device)?.model(device)?,
            None => lm.reference_model(device)?,
        };
        let task = cfg
            .task
            .as_deref()
            .map(|name| task_by_name(name, cfg.task_seed).map_err(TrainError::Invalid))
            .transpose()?;
        let opts = LoadOptions::default();
        let train_texts: Vec<String> = match (&cfg.prompts_file, &task) {
            (Some(p), _) => load_prompts(p, lm.chat_template.as_ref(), &opts)?.items,
            (None, Some(t)) => t.train_prompts().to_vec(),
            (None, None) => unreachable!("validated"),
        };
        if train_texts.is_empty() {
            return Err(TrainError::invalid("no training prompts"));
        }
        let eval_texts: Vec<String> = match (&cfg.eval_prompts_file, &task) {
            (Some(p), _) => load_prompts(p, lm.chat_template.as_ref(), &opts)?.items,
            (None, Some(t)) => t.eval_prompts().to_vec(),
            (None, None) => Vec::new(),
        };
        let max_prompt = cfg.rollout.max_prompt_len;
        let prompts = encode_all(&lm, &train_texts, max_prompt)?;
        let eval_texts: Vec<String> = eval_texts.into_iter().take(cfg.eval.prompts).collect();
        let eval_prompts = encode_all(&lm, &eval_texts, max_prompt)?;
        let mut rewarder = Rewarder::from_config(
            &cfg.reward,
            cfg.task.as_deref(),
            cfg.task_seed,
            &lm.tokenizer,
            device,
        )?;
        if cfg.reward.source == SourceKind::Gold {
            eprintln!("training on the task's gold reward (reward.source = \"gold\")");
        }
        let updates_per_iteration = M::updates_per_iteration(cfg).max(1);
        let trainer = Trainer::start(
            &cfg.output_dir,
            cfg,
            &lm,
            &cfg.optim,
            cfg.steps * updates_per_iteration,
            resume,
        )?;
        if trainer.step % updates_per_iteration != 0 {
            return Err(TrainError::invalid(format!(
                "checkpoint at optimiser step {} is not at a rollout-batch boundary ({} steps per batch): was the configuration changed?",
                trainer.step, updates_per_iteration
            )));
        }
        let mut kl = KlController::new(&cfg.kl);
        let mut resumed_method_state = None;
        let mut guard = Guard::default();
        if let Some(state) = &trainer.resumed_state {
            if let Some(n) = state.get("tripwire_rollbacks").and_then(|n| n.as_u64()) {
                guard.rollbacks = n as usize;
            }
            if let Some(b) = state.get("beta").and_then(|b| b.as_f64()) {
                kl.beta = b;
            }
            if cfg.reward.normalize {
                if let Some(n) = state.get("reward_norm").filter(|n| !n.is_null()) {
                    rewarder.norm = Some(serde_json::from_value(n.clone()).map_err(|e| {
                        TrainError::invalid(format!("checkpoint state: reward_norm: {e}"))
                    })?);
                }
            }
            resumed_method_state = state.get("method").cloned();
        }
        let mut s = Session {
            cfg: cfg.clone(),
            device: device.clone(),
            lm,
            reference,
            rewarder,
            task,
            prompts,
            eval_prompts,
            eval_reference: None,
            trainer,
            kl,
            updates_per_iteration,
            resumed_method_state,
            guard,
            stopped: false,
            iteration_started: Instant::now(),
            last_reward: f64::NAN,
            last_kl: f64::NAN,
        };
        if cfg.reward.normalize && s.rewarder.norm.is_none() {
            s.rewarder.norm = Some(s.measure_norm()?);
        }
        if let Some(n) = s.rewarder.norm {
            eprintln!(
                "{}: scores normalised as (raw - mean) / std with mean {:.4}, std {:.4}",
                s.rewarder.source.describe(),
                n.mean,
                n.std
            );
        }
        Ok(s)
    }

    /// Mean/std of the raw reward on the reference policy's samples of the first training prompts.
    fn measure_norm(&self) -> Result<RewardNorm> {
        let n = self
            .cfg
            .reward
            .normalize_samples
            .max(2)
            .min(self.prompts.len().max(2));
        let prompts: Vec<_> = self.prompts.iter().cycle().take(n).cloned().collect();
        let params = self
            .cfg
            .rollout
            .sampling(stream_seed(self.cfg.seed, "norm"), self.lm.eos_ids.clone());
        let samples = sample(
            &self.reference,
            &self.lm.tokenizer,
            self.lm.pad_id,
            &prompts,
            &params,
            self.cfg.rollout.batch_size,
        )?;
        let queries: Vec<Query> = samples.iter().map(query_of).collect();
        let raw = self.rewarder.score_raw(&queries)?;
        Ok(RewardNorm::from_scores(&raw))
    }

    /// Rollout batches done so far.
    pub fn iteration(&self) -> u64 {
        self.trainer.step / self.updates_per_iteration
    }

    pub fn done(&self) -> bool {
        self.stopped || self.iteration() >= self.cfg.steps
    }

    /// The prompts of rollout batch `iteration`: consecutive positions in a stream of shuffled
    /// epochs over the training prompts (a pure function of the seed and the iteration).
    pub fn prompts_for(&self, iteration: u64) -> Vec<(String, Vec<u32>)> {
        let n = self.prompts.len();
        let per = self.cfg.prompts_per_step;
        let first = iteration as usize * per;
        let mut order: Option<(usize, Vec<usize>)> = None;
        (first..first + per)
            .map(|pos| {
                let epoch = pos / n;
                if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
                    order = Some((epoch, epoch_order(n, self.cfg.seed, epoch as u64)));
                }
                let idx = order.as_ref().expect("set above").1[pos % n];
                self.prompts[idx].clone()
            })
            .collect()
    }

    /// The current policy without a gradient graph (for sampling).
    pub fn policy_model(&self) -> Result<Llama> {
        Ok(self.lm.model(&self.device)?.detached())
    }

    /// Sample this iteration's rollout batch with `rollout.k` samples per prompt.
    pub fn rollout(&mut self) -> Result<Rollout> {
        self.iteration_started = Instant::now();
        let iteration = self.iteration();
        self.collect_rollout(
            &self.prompts_for(iteration),
            step_seed(self.cfg.seed, iteration),
        )
    }

    /// A rollout of the current policy on `prompts` (`rollout.k` samples each), sampled from
    /// `seed`, scored, with the reference's log-probs.
    pub fn collect_rollout(&self, prompts: &[(String, Vec<u32>)], seed: u64) -> Result<Rollout> {
        let policy = self.policy_model()?;
        let models = Policies {
            policy: &policy,
            reference: &self.reference,
            tokenizer: &self.lm.tokenizer,
            pad_id: self.lm.pad_id,
            eos_ids: &self.lm.eos_ids,
        };
        let mut rollout = collect(&models, prompts, &self.cfg.rollout, &self.rewarder, seed)?;
        let step = self.trainer.step + 1;
        if let Some(first) = rollout.samples.first_mut() {
            if rlhf_train::faults::inject("reward", step) {
                // What a reward source's NaN becomes: raw and normalised alike.
                first.raw_score = f64::NAN;
                first.score = f64::NAN;
            }
            if rlhf_train::faults::inject("logprob", step) {
                if let Some(lp) = first.logprobs.first_mut() {
                    *lp = f32::NAN;
                }
            }
        }
        // A batch with a non-finite reward or log-prob is never learned from: every sample's
        // advantage or KL term could be poisoned through the batch's statistics.
        if let Some(what) = rollout.first_nonfinite() {
            return Err(self.trainer.stop_error(
                &format!(
                    "{what} in the rollout batch of optimiser step {step} (iteration {})",
                    self.iteration() + 1
                ),
                "a rollout batch with a non-finite reward or log-prob is never learned from",
            ));
        }
        Ok(rollout)
    }

    /// Groups of a rollout (indices of the k samples of each prompt) split into `parts`
    /// minibatches of whole groups, in an order shuffled by (seed, iteration, epoch).
    pub fn minibatches(&self, rollout: &Rollout, parts: usize, epoch: u64) -> Vec<Vec<usize>> {
        let groups = rollout.num_groups();
        let order = epoch_order(
            groups,
            stream_seed(self.cfg.seed, "mb"),
            self.iteration() * 1000 + epoch,
        );
        split_groups(&order, rollout.k, parts)
    }

    /// One optimiser step on the samples `idx`: they are split into `optim.grad_accum`
    /// micro-batches, `loss_of(lm, part)` returns each part's loss already weighted by its share
    /// of the whole (so the parts add up to the minibatch's loss), and the gradients are summed.
    /// Returns (the minibatch's loss, the step's lr and gradient norm).
    pub fn optimizer_step(
        &mut self,
        idx: &[usize],
        mut loss_of: impl FnMut(&TrainableLm, &[usize]) -> Result<Tensor>,
    ) -> Result<(f64, StepStats)> {
        if self.guard.loss_breach.is_some() {
            // The wire tripped on an earlier step of this batch: the iteration is rolled back at
            // its end, so its remaining steps are not worth computing.
            return Ok((f64::NAN, self.trainer.skip()?));
        }
        // Data parallelism: this rank's share of the minibatch (`loss_of` weights each part by
        // its share of the whole `idx`, so the ranks' gradients and losses add up).
        let world = rlhf_train::dist::world();
        let mine = &idx[world.share(idx.len())];
        let micro = mine.len().div_ceil(self.cfg.optim.grad_accum.max(1)).max(1);
        let mut acc = self.trainer.accumulator();
        let mut total = 0.0;
        for part in mine.chunks(micro) {
            let loss = loss_of(&self.lm, part)?;
            let v = loss.to_scalar::<f32>()? as f64;
            if !self.trainer.check_loss("loss", v)? {
                total = f64::NAN;
                break;
            }
            total += v;
            acc.add(rlhf_lm::llama::backward(&loss)?)?;
        }
        let mut t = [total];
        world.sum_f64(&mut t)?;
        total = t[0];
        if let Some(why) = self.cfg.tripwire.check_loss(total, self.trainer.step + 1) {
            if total.is_finite() {
                self.guard.loss_breach = Some(why);
                return Ok((total, self.trainer.skip()?));
            }
        }
        let stats = self.trainer.apply(acc.finish_across_ranks()?)?;
        Ok((total, stats))
    }

    /// Plain policy-gradient steps with one advantage per sample (REINFORCE, RLOO): `epochs` passes
    /// over the batch, each in `minibatches` optimiser steps of whole groups, on
    /// `-mean_i(A_i * sum_t log pi(y_i,t | x, y_i,<t))` (no ratio, no clip).
    pub fn sequence_pg_steps(
        &mut self,
        rollout: &Rollout,
        adv: &[f64],
        minibatches: usize,
        epochs: usize,
    ) -> Result<BatchSteps> {
        let (pad, temp, device) = (
            self.lm.pad_id,
            self.cfg.rollout.temperature,
            self.device.clone(),
        );
        let mut steps = BatchSteps::default();
        for epoch in 0..epochs.max(1) as u64 {
            for mb in self.minibatches(rollout, minibatches, epoch) {
                steps.push(self.optimizer_step(&mb, |lm, part| {
                    let batch = rollout.batch(part, pad, &device)?;
                    let logp = policy_logprobs(lm, &batch, temp, &device)?;
                    let a: Vec<f64> = part.iter().map(|&i| adv[i]).collect();
                    Ok((sequence_loss(&logp, &a)? * (part.len() as f64 / mb.len() as f64))?)
                })?);
            }
        }
        Ok(steps)
    }

    /// Whether `end_iteration` will checkpoint now (the critic, when there is one, at the same
    /// step).
    pub fn checkpoint_due(&self) -> bool {
        let it = self.iteration();
        self.cfg.save_every > 0 && it % self.cfg.save_every == 0 && it < self.cfg.steps
    }

    /// The checkpoint state: KL coefficient, reward normalisation, the method's own state.
    fn state(&self, method_state: &serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "iteration": self.iteration(),
            "beta": self.kl.beta,
            "reward_norm": self.rewarder.norm,
            "tripwire_rollbacks": self.guard.rollbacks,
            "method": method_state,
        })
    }

    /// After a rollout batch's updates: log the shared metrics (plus `extra`), update an adaptive
    /// beta, evaluate and checkpoint when due (the critic too, when the method has one). With the
    /// trip-wire on, a loss bound crossed during the updates rolls the iteration back instead
    /// (or ends the run: [`Session::done`]); `method_state` is then the snapshot's.
    pub fn end_iteration<S: Serialize + DeserializeOwned>(
        &mut self,
        rollout: &Rollout,
        extra: &[(&str, f64)],
        method_state: &mut S,
        critic: Option<&mut ValueModel>,
    ) -> Result<()> {
        if let Some(why) = self.guard.loss_breach.take() {
            let st = rollout.stats();
            return self.trip(
                &why,
                &[("kl", st.kl_mean), ("response_length", st.length_mean)],
                method_state,
                critic,
            );
        }
        let it = self.iteration();
        let st = rollout.stats();
        let secs = self.iteration_started.elapsed().as_secs_f64();
        self.last_reward = st.score_mean;
        self.last_kl = st.kl_mean;
        let mut m: Vec<(&str, f64)> = vec![
            ("iteration", it as f64),
            ("reward", st.score_mean),
            ("reward_raw", st.raw_score_mean),
            ("kl", st.kl_mean),
            ("beta", self.kl.beta),
            ("entropy", st.entropy),
            ("response_length", st.length_mean),
            ("eos_fraction", st.finished_fraction),
            ("tokens_per_s", st.tokens as f64 / secs.max(1e-9)),
            ("time/rollout_s", st.seconds),
            ("time/iteration_s", secs),
        ];
        let gold;
        if let Some(task) = &self.task {
            let g: Vec<f64> = rollout
                .samples
                .iter()
                .map(|s| task.gold(&s.prompt, &s.completion))
                .collect();
            gold = summary(&g).0;
            m.push(("gold", gold));
        }
        m.extend_from_slice(extra);
        if self.cfg.tripwire.enabled() {
            m.push(("tripwire/rollbacks", self.guard.rollbacks as f64));
        }
        self.kl.update(st.kl_mean, rollout.len());
        let last = it >= self.cfg.steps;
        if it % self.cfg.log_every.max(1) == 0 || last {
            self.trainer.log(&m)?;
        }
        if self.cfg.eval.every > 0 && it % self.cfg.eval.every == 0 && !last {
            if let Some(r) = self.evaluate()? {
                self.log_eval(&r)?;
            }
        }
        let state_value = method_state_value::<M, S>(method_state)?;
        if self.checkpoint_due() {
            if let Some(c) = critic.as_deref() {
                c.checkpoint(self.trainer.step)?;
            }
            let state = self.state(&state_value);
            self.trainer.checkpoint(&self.lm, state)?;
        }
        let tw = &self.cfg.tripwire;
        if tw.enabled() && it.is_multiple_of(tw.snapshot_interval(self.cfg.save_every)) {
            // Good once the next rollout of these weights passes the wire.
            self.guard.pending = Some(self.snapshot(&state_value, critic.as_deref())?);
        }
        Ok(())
    }

    /// The trip-wire's judgement of a rollout batch, before anything learns from it: whether to
    /// learn from it (always, when no bound is set). A batch within the bounds confirms the
    /// pending snapshot; one outside them restores the last good state (`method_state` and
    /// `critic` included), and the run goes on with the next iteration or ends
    /// ([`Session::done`]).
    pub fn judge<S: Serialize + DeserializeOwned>(
        &mut self,
        rollout: &Rollout,
        method_state: &mut S,
        critic: Option<&mut ValueModel>,
    ) -> Result<bool> {
        if !self.cfg.tripwire.enabled() {
            return Ok(true);
        }
        if self.guard.good.is_none() {
            // The state this process starts learning from (initial, or resumed) is the first good one.
            let state_value = method_state_value::<M, S>(method_state)?;
            self.guard.good = Some(self.snapshot(&state_value, critic.as_deref())?);
        }
        let st = rollout.stats();
        let perplexity = st.entropy.exp();
        match self
            .cfg
            .tripwire
            .check(st.kl_mean, st.length_mean, perplexity)
        {
            None => {
                if let Some(p) = self.guard.pending.take() {
                    self.guard.good = Some(p);
                }
                Ok(true)
            }
            Some(why) => self
                .trip(
                    &format!("iteration {}: {why}", self.iteration() + 1),
                    &[
                        ("kl", st.kl_mean),
                        ("response_length", st.length_mean),
                        ("perplexity", perplexity),
                    ],
                    method_state,
                    critic,
                )
                .map(|()| false),
        }
    }

    /// Deep copies of everything a rollback restores.
    pub fn snapshot(
        &self,
        method_state: &serde_json::Value,
        critic: Option<&ValueModel>,
    ) -> Result<Snapshot> {
        Ok(Snapshot {
            policy: self.lm.snapshot()?,
            policy_optimizer: self.trainer.optimizer_state()?,
            critic: critic
                .map(|c| Ok::<_, TrainError>((c.lm.snapshot()?, c.optimizer_state()?)))
                .transpose()?,
            beta: self.kl.beta,
            method_state: method_state.clone(),
            iteration: self.iteration(),
        })
    }

    /// Put back everything [`Session::snapshot`] copied (the snapshot stays as it is).
    pub fn restore<S: DeserializeOwned>(
        &mut self,
        to: &Snapshot,
        method_state: &mut S,
        critic: Option<&mut ValueModel>,
    ) -> Result<()> {
        self.lm.load_weights(&to.policy)?;
        self.trainer.restore_optimizer_state(&to.policy_optimizer)?;
        if let (Some(c), Some((w, o))) = (critic, &to.critic) {
            c.lm.load_weights(w)?;
            c.restore_optimizer_state(o)?;
        }
        self.kl.beta = to.beta;
        *method_state = serde_json::from_value(to.method_state.clone()).map_err(|e| {
            TrainError::invalid(format!("{}: snapshot's method state: {e}", M::NAME))
        })?;
        Ok(())
    }

    /// Restore the last good snapshot, log and record why (`tripwire.json`), and end the run when
    /// that is the action or the rollbacks are used up.
    fn trip<S: DeserializeOwned>(
        &mut self,
        why: &str,
        monitors: &[(&str, f64)],
        method_state: &mut S,
        critic: Option<&mut ValueModel>,
    ) -> Result<()> {
        self.guard.pending = None;
        let to = self
            .guard
            .good
            .take()
            .expect("a good snapshot is taken before any rollout is learned from");
        self.restore(&to, method_state, critic)?;
        let tw = &self.cfg.tripwire;
        let stop = tw.action == TripAction::Stop || self.guard.rollbacks >= tw.max_rollbacks;
        let (run_dir, step) = (self.trainer.run.path().to_path_buf(), self.trainer.step);
        crate::tripwire::record(
            &mut |row| self.trainer.log(row),
            &run_dir,
            why,
            stop,
            step,
            to.iteration,
            monitors,
        )?;
        self.guard.good = Some(to);
        if stop {
            self.stopped = true;
        } else {
            self.guard.rollbacks += 1;
        }
        Ok(())
    }

    /// The evaluation's metrics, with the iteration it follows (so curves can be drawn against
    /// samples consumed).
    fn log_eval(&mut self, r: &EvalReport) -> Result<()> {
        let mut m = r.metrics();
        m.push(("eval/iteration", self.iteration() as f64));
        self.trainer.log(&m)
    }

    /// Win-rate of the current policy against the reference policy on the eval prompts (judged
    /// by the task's gold when there is a task, else by the reward source), with KL and length.
    pub fn evaluate(&mut self) -> Result<Option<EvalReport>> {
        if self.eval_prompts.is_empty() {
            return Ok(None);
        }
        let mut params: SamplingParams = self
            .cfg
            .rollout
            .sampling(self.cfg.eval.seed, self.lm.eos_ids.clone());
        self.cfg.eval.validate()?;
        params.temperature = self.cfg.eval.temperature;
        params.top_k = None;
        params.top_p = None;
        if let Some(n) = self.cfg.eval.max_new_tokens {
            params.max_new_tokens = n;
        }
        let bs = self.cfg.rollout.batch_size;
        if self.eval_reference.is_none() {
            let ref_params = SamplingParams {
                seed: params.seed.wrapping_add(1_000_003),
                ..params.clone()
            };
            self.eval_reference = Some(sample(
                &self.reference,
                &self.lm.tokenizer,
                self.lm.pad_id,
                &self.eval_prompts,
                &ref_params,
                bs,
            )?);
        }
        let reference = self.eval_reference.as_ref().expect("sampled above");
        let pi = self.policy_model()?;
        let policy = sample(
            &pi,
            &self.lm.tokenizer,
            self.lm.pad_id,
            &self.eval_prompts,
            &params,
            bs,
        )?;
        let kl_models = Some(KlModels {
            policy: &pi,
            reference: &self.reference,
            pad_id: self.lm.pad_id,
            temperature: params.temperature,
        });
        let rm = self.rewarder.source.reward_model();
        let report = match &self.task {
            Some(task) => {
                let gold = |p: &str, r: &str| task.gold(p, r);
                let judges = Judges {
                    gold: Some(&gold),
                    reward_model: rm,
                };
                judge(&policy, reference, &judges, kl_models)?
            }
            None if rm.is_some() => {
                let judges = Judges {
                    gold: None,
                    reward_model: rm,
                };
                judge(&policy, reference, &judges, kl_models)?
            }
            None => {
                // A command or endpoint judges: score both sides once, then look the scores up.
                let both: Vec<&Generated> = policy.iter().chain(reference.iter()).collect();
                let queries: Vec<Query> = both.iter().map(|g| query_of(g)).collect();
                let scores = self.rewarder.score_raw(&queries)?;
                let table: std::collections::HashMap<(&str, &str), f64> = both
                    .iter()
                    .zip(&scores)
                    .map(|(g, &s)| ((g.prompt.as_str(), g.completion.as_str()), s))
                    .collect();
                let lookup = |p: &str, r: &str| table.get(&(p, r)).copied().unwrap_or(f64::NAN);
                let judges = Judges {
                    gold: Some(&lookup),
                    reward_model: None,
                };
                let mut r = judge(&policy, reference, &judges, kl_models)?;
                r.judge = self.rewarder.source.describe();
                r.proxy_mean = r.gold_mean.take();
                r.reference_gold_mean = None;
                r
            }
        };
        Ok(Some(report))
    }

    /// Write the final model (`<output_dir>/model`) and evaluate it (`<output_dir>/eval.json`).
    pub fn finish(mut self) -> Result<OnlineSummary> {
        self.lm
            .generation
            .max_new_tokens
            .get_or_insert(self.cfg.rollout.max_new_tokens);
        let model = self.trainer.finish(&self.lm)?;
        let eval = self.evaluate()?;
        if let Some(r) = &eval {
            self.log_eval(r)?;
            r.write(&self.trainer.run.path().join("eval.json"))?;
        }
        Ok(OnlineSummary {
            method: M::NAME.into(),
            iterations: self.iteration(),
            optimizer_steps: self.trainer.step,
            samples: self.iteration() * (self.cfg.prompts_per_step * self.cfg.rollout.k) as u64,
            final_reward: self.last_reward,
            final_kl: self.last_kl,
            beta: self.kl.beta,
            eval,
            model,
        })
    }
}

/// The policy's differentiable per-token log-probs of a batch, `(b, t - 1)`, zero outside the
/// completions, at the rollout temperature.
pub fn policy_logprobs(
    lm: &TrainableLm,
    batch: &CompletionBatch,
    temperature: f64,
    device: &Device,
) -> Result<Tensor> {
    Ok(completion_logprobs(&lm.model(device)?, batch, temperature)?)
}

/// A method's own state as JSON (checkpoints and trip-wire snapshots keep it so).
fn method_state_value<M: Method, S: Serialize>(state: &S) -> Result<serde_json::Value> {
    serde_json::to_value(state)
        .map_err(|e| TrainError::invalid(format!("{}: method state: {e}", M::NAME)))
}

fn query_of(g: &Generated) -> Query<'_> {
    Query {
        prompt: &g.prompt,
        completion: &g.completion,
        prompt_ids: &g.prompt_ids,
        completion_ids: &g.completion_ids,
    }
}

/// Split groups (in `order`) into `parts` contiguous minibatches of sample indices (group g
/// holds samples g*k .. g*k + k). Sizes differ by at most one group; no minibatch is empty.
pub fn split_groups(order: &[usize], k: usize, parts: usize) -> Vec<Vec<usize>> {
    let parts = parts.clamp(1, order.len().max(1));
    let base = order.len() / parts;
    let extra = order.len() % parts;
    let mut out = Vec::with_capacity(parts);
    let mut at = 0;
    for p in 0..parts {
        let n = base + usize::from(p < extra);
        out.push(
            order[at..at + n]
                .iter()
                .flat_map(|&g| g * k..g * k + k)
                .collect(),
        );
        at += n;
    }
    out.retain(|m: &Vec<usize>| !m.is_empty());
    out
}

/// The optimiser steps of one rollout batch: their losses, and the last step's learning rate and
/// gradient norm (the first metrics every online method logs).
#[derive(Default)]
pub struct BatchSteps {
    losses: Vec<f64>,
    last: Option<StepStats>,
}

impl BatchSteps {
    pub fn push(&mut self, (loss, stats): (f64, StepStats)) {
        self.losses.push(loss);
        self.last = Some(stats);
    }

    /// `loss` (mean over the steps), `lr`, `grad_norm` (of the last step).
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        let st = self
            .last
            .as_ref()
            .expect("at least one optimiser step per rollout batch");
        vec![
            ("loss", mean(&self.losses)),
            ("lr", st.lr),
            ("grad_norm", st.grad_norm),
        ]
    }
}

/// The mean of `xs` (0 for none).
pub fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// The advantage statistics every method logs.
pub fn advantage_metrics(adv: &[f64]) -> [(&'static str, f64); 4] {
    let (mean, std, min, max) = summary(adv);
    [
        ("advantage/mean", mean),
        ("advantage/std", std),
        ("advantage/min", min),
        ("advantage/max", max),
    ]
}
