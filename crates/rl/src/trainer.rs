//! The loop plumbing every trained method shares: optimiser + schedule + clipping, the run
//! directory (resolved config, metrics.jsonl + TensorBoard, checkpoints) and resume. A method file
//! keeps only its own loss and data flow.

use std::path::Path;

use candle_core::{backprop::GradStore, Var};
use rlhf_train::{
    clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule, MetricsLogger, Result, RunDir,
    ScheduleKind,
};
use serde::{Deserialize, Serialize};

use crate::policy::TrainableLm;
use rlhf_train::faults::{self, OnNonFinite};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay (norms and biases are not decayed).
    pub weight_decay: f64,
    /// AdamW's first-moment decay.
    pub beta1: f64,
    /// AdamW's second-moment decay.
    pub beta2: f64,
    /// AdamW's denominator epsilon.
    pub eps: f64,
    /// Learning-rate schedule after warm-up: constant | linear | cosine.
    pub schedule: ScheduleKind,
    /// Linear warm-up over this fraction of the run's optimiser steps.
    pub warmup_ratio: f64,
    /// Floor of the linear/cosine decay as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip; 0 turns it off.
    pub max_grad_norm: f64,
    /// Micro-batches per optimiser step (the batch is split; the update is the same).
    pub grad_accum: usize,
    /// A step whose loss or gradient is NaN/Inf: `skip` it (weights and moments untouched) or
    /// `stop` the run. Either way nothing non-finite reaches the weights.
    pub on_nonfinite: OnNonFinite,
    /// Non-finite steps skipped in a row before the run stops anyway.
    pub max_nonfinite_skips: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 1e-5,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: ScheduleKind::Linear,
            warmup_ratio: 0.03,
            min_lr_ratio: 0.0,
            max_grad_norm: 1.0,
            grad_accum: 1,
            on_nonfinite: OnNonFinite::Skip,
            max_nonfinite_skips: 3,
        }
    }
}

pub struct StepStats {
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the step was not taken: its loss or gradient was not finite.
    pub applied: bool,
}

impl StepStats {
    /// A step that was counted but not computed.
    fn not_taken() -> Self {
        StepStats {
            lr: f64::NAN,
            grad_norm: f64::NAN,
            applied: false,
        }
    }
}

/// AdamW with its learning-rate schedule and global-norm clipping over one parameter set (a
/// policy, a critic, a reward model): the one optimiser skeleton every trained model steps with.
pub struct Optimizer {
    opt: AdamW,
    schedule: LrSchedule,
    base_lr: f64,
    max_grad_norm: f64,
    vars: Vec<Var>,
}

impl Optimizer {
    /// An optimiser for `lm`'s parameters whose schedule spans `total_steps`.
    pub fn new(lm: &TrainableLm, optim: &OptimConfig, total_steps: u64) -> Result<Self> {
        let vars: Vec<(String, Var)> = lm.params.vars.clone();
        let mut opt = AdamW::new(
            vars.clone(),
            AdamWConfig {
                lr: optim.lr,
                beta1: optim.beta1,
                beta2: optim.beta2,
                eps: optim.eps,
                weight_decay: optim.weight_decay,
            },
        )?;
        // As is customary, norms and biases are not decayed.
        opt.exclude_from_weight_decay(|n| n.ends_with("norm.weight") || n.ends_with(".bias"));
        let schedule = LrSchedule {
            kind: optim.schedule,
            warmup_steps: (optim.warmup_ratio * total_steps as f64).round() as u64,
            total_steps,
            min_lr_ratio: optim.min_lr_ratio,
        };
        schedule.validate()?;
        Ok(Optimizer {
            opt,
            schedule,
            base_lr: optim.lr,
            max_grad_norm: optim.max_grad_norm,
            vars: vars.into_iter().map(|(_, v)| v).collect(),
        })
    }

    pub fn accumulator(&self) -> GradAccumulator {
        GradAccumulator::new(&self.vars)
    }

    /// Clip, then step at the schedule's learning rate for optimiser step `step` (0-based). A
    /// non-finite gradient norm takes no step (`applied: false`): the caller decides what it means.
    pub fn apply(&mut self, mut grads: GradStore, step: u64) -> Result<StepStats> {
        if faults::inject("grad", step + 1) {
            poison(&mut grads, &self.vars)?;
        }
        let grad_norm = if self.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, &self.vars, self.max_grad_norm)?
        } else {
            rlhf_train::grad_norm(&grads, &self.vars)?
        };
        let lr = self.schedule.lr_at(step, self.base_lr);
        let applied = grad_norm.is_finite();
        if applied {
            self.opt.step(&grads, lr)?;
        }
        Ok(StepStats {
            lr,
            grad_norm,
            applied,
        })
    }

    /// A deep copy of the state (AdamW moments and step counts), for checkpoints and rollbacks.
    pub fn state(&self) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
        self.opt.state()
    }

    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, candle_core::Tensor>,
    ) -> Result<()> {
        self.opt.load_state(state)
    }
}

/// The fault injection's NaN gradient (`RLHF_TEST_NONFINITE=grad@<step>`): the first parameter's
/// gradient times NaN, so the norm computation is what finds it.
fn poison(grads: &mut GradStore, vars: &[Var]) -> Result<()> {
    if let Some(v) = vars.iter().find(|v| grads.get(v.as_tensor()).is_some()) {
        let g = grads.get(v.as_tensor()).expect("found above");
        let bad = g.affine(f64::NAN, 0.0)?;
        grads.insert(v.as_tensor(), bad);
    }
    Ok(())
}

/// Load the newest checkpoint that reads back whole into `lm` and `optimizer`. One that does not
/// (a file truncated or damaged after it was written: checkpoints are never half-written by
/// us) is reported and passed over for the next older one, so a damaged file costs the steps
/// since the older checkpoint rather than the run. `None`: the run has no checkpoint.
fn load_newest_readable(
    run: &RunDir,
    lm: &TrainableLm,
    optimizer: &mut Optimizer,
) -> Result<Option<rlhf_train::Checkpoint>> {
    let device = lm.device();
    let mut first_error = None;
    for step in run.resume_steps()? {
        let attempt = (|| -> Result<rlhf_train::Checkpoint> {
            let ck = run.checkpoint(step)?;
            let weights = ck.load_model(&device)?;
            let moments = ck.load_optimizer(&device)?;
            lm.load_weights(&weights)?;
            optimizer.load_state(&moments)?;
            Ok(ck)
        })();
        match attempt {
            Ok(ck) => {
                if first_error.is_some() {
                    eprintln!(
                        "warning: resuming from the older checkpoint {} instead",
                        ck.dir.display()
                    );
                }
                return Ok(Some(ck));
            }
            Err(e) => {
                eprintln!("warning: checkpoint step-{step} cannot be resumed from: {e}");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// A training run of one model: its [`Optimizer`], the run directory (metrics, checkpoints) and
/// the optimiser step, restored from the latest checkpoint on resume.
pub struct Trainer {
    pub run: RunDir,
    /// `None` on ranks other than 0, which log nothing.
    metrics: Option<MetricsLogger>,
    optimizer: Optimizer,
    pub step: u64,
    /// The method's own state from the checkpoint a resumed run started from.
    pub resumed_state: Option<serde_json::Value>,
    /// The directory of that checkpoint (for files a method saved beside the weights).
    pub resumed_from: Option<std::path::PathBuf>,
    /// `RLHF_TEST_KILL_AT_STEP`: fail right after this step, leaving the run directory as a killed
    /// process would (metrics past the last checkpoint, no final model). For resume tests.
    kill_at: Option<u64>,
    on_nonfinite: OnNonFinite,
    max_nonfinite_skips: usize,
    /// Why the step being computed will not be applied (a non-finite loss), if it will not.
    pending_skip: Option<String>,
    /// Non-finite steps skipped in a row.
    skipped_in_a_row: usize,
}

impl Trainer {
    /// Open the run directory (fresh, or continuing from its latest checkpoint when `resume`),
    /// restoring the model's weights, the optimiser state and the step.
    pub fn start(
        dir: &Path,
        resolved_config: &impl Serialize,
        lm: &TrainableLm,
        optim: &OptimConfig,
        total_steps: u64,
        resume: bool,
    ) -> Result<Self> {
        let world = rlhf_train::dist::world();
        if !world.is_root() {
            return Self::start_replica(dir, resolved_config, lm, optim, total_steps);
        }
        let mut optimizer = Optimizer::new(lm, optim, total_steps)?;
        // `--resume` on a directory that holds no run yet (a job restarted before its first
        // start got as far as writing its configuration) simply starts the run, so a scheduler
        // can always pass `--resume`.
        let resume = resume && {
            let has_run = dir.join(rlhf_train::run::CONFIG_FILE).is_file();
            if !has_run {
                eprintln!("nothing to resume in {}: starting a new run", dir.display());
            }
            has_run
        };
        let (run, metrics, step, resumed_state, resumed_from) = if resume {
            let run = RunDir::open_for_resume(dir)?;
            match load_newest_readable(&run, lm, &mut optimizer)? {
                Some(ck) => {
                    let metrics = MetricsLogger::resume(&run, ck.step)?;
                    eprintln!("resuming from {} (step {})", ck.dir.display(), ck.step);
                    (run, metrics, ck.step, Some(ck.state), Some(ck.dir))
                }
                None => {
                    // Killed before its first checkpoint: everything it logged (e.g. PPO's critic
                    // pre-training) will be done again, so the run starts over.
                    eprintln!(
                        "no checkpoint in {} yet: starting the run over",
                        dir.display()
                    );
                    let run = RunDir::create_overwriting(dir, resolved_config)?;
                    let metrics = MetricsLogger::new(&run)?;
                    (run, metrics, 0, None, None)
                }
            }
        } else {
            let run = RunDir::create_overwriting(dir, resolved_config)?;
            let metrics = MetricsLogger::new(&run)?;
            (run, metrics, 0, None, None)
        };
        if world.size() > 1 {
            // The other ranks start where this one did (their replicas load the same checkpoint).
            let point = resumed_from.clone().map(|dir| (step, dir));
            world.broadcast_json(&point)?;
        }
        Ok(Self::assemble(
            run,
            Some(metrics),
            optimizer,
            step,
            resumed_state,
            resumed_from,
            optim,
        ))
    }

    /// [`Trainer::start`] on a rank other than 0 ([`rlhf_train::dist`]): the replica loads the
    /// checkpoint rank 0 resumed from (read-only: rank 0 alone writes the run directory). What a
    /// method writes to its run directory on this rank (checkpoints, models it reads back later)
    /// goes to a scratch directory of its own ([`rlhf_train::dist::scratch_dir`]), removed when
    /// the process ends; it logs no metrics.
    fn start_replica(
        dir: &Path,
        resolved_config: &impl Serialize,
        lm: &TrainableLm,
        optim: &OptimConfig,
        total_steps: u64,
    ) -> Result<Self> {
        let world = rlhf_train::dist::world();
        let mut optimizer = Optimizer::new(lm, optim, total_steps)?;
        let point: Option<(u64, std::path::PathBuf)> = world.broadcast_json(&None)?;
        let (step, resumed_state, resumed_from) = match point {
            Some((step, ck_dir)) => {
                let ck = RunDir::open_for_resume(dir)?.checkpoint(step)?;
                lm.load_weights(&ck.load_model(&lm.device())?)?;
                optimizer.load_state(&ck.load_optimizer(&lm.device())?)?;
                debug_assert_eq!(ck.dir, ck_dir);
                (step, Some(ck.state), Some(ck_dir))
            }
            None => (0, None, None),
        };
        let run =
            RunDir::create_overwriting(rlhf_train::dist::scratch_dir("run"), resolved_config)?;
        Ok(Self::assemble(
            run,
            None,
            optimizer,
            step,
            resumed_state,
            resumed_from,
            optim,
        ))
    }

    fn assemble(
        run: RunDir,
        metrics: Option<MetricsLogger>,
        optimizer: Optimizer,
        step: u64,
        resumed_state: Option<serde_json::Value>,
        resumed_from: Option<std::path::PathBuf>,
        optim: &OptimConfig,
    ) -> Self {
        Trainer {
            run,
            metrics,
            optimizer,
            step,
            resumed_state,
            resumed_from,
            kill_at: std::env::var("RLHF_TEST_KILL_AT_STEP")
                .ok()
                .and_then(|s| s.parse().ok()),
            on_nonfinite: optim.on_nonfinite,
            max_nonfinite_skips: optim.max_nonfinite_skips,
            pending_skip: None,
            skipped_in_a_row: 0,
        }
    }

    pub fn accumulator(&self) -> GradAccumulator {
        self.optimizer.accumulator()
    }

    /// A loss of the step being computed is `value` (a number the caller has just read back):
    /// when it is not finite, the step will be skipped (`optim.on_nonfinite = "skip"`, below the
    /// limit of skips in a row) or the run stops with an error naming the loss and the step.
    /// Returns whether the loss is usable (skip its backward pass when it is not).
    pub fn check_loss(&mut self, name: &str, value: f64) -> Result<bool> {
        let value = if faults::inject("loss", self.step + 1) {
            f64::NAN
        } else {
            value
        };
        if value.is_finite() {
            return Ok(true);
        }
        self.nonfinite(name, value)?;
        Ok(false)
    }

    /// A non-finite `quantity` in the step being computed: mark the step to be skipped, or stop.
    fn nonfinite(&mut self, quantity: &str, value: f64) -> Result<()> {
        let what = format!(
            "the {quantity} is {} at optimiser step {}",
            faults::describe(value),
            self.step + 1
        );
        if self.on_nonfinite == OnNonFinite::Stop {
            return Err(self.stop_error(&what, "optim.on_nonfinite = \"stop\""));
        }
        if self.skipped_in_a_row >= self.max_nonfinite_skips {
            let why = format!(
                "{} non-finite steps in a row were skipped already, optim.max_nonfinite_skips",
                self.skipped_in_a_row
            );
            return Err(self.stop_error(&what, &why));
        }
        self.pending_skip.get_or_insert(what);
        Ok(())
    }

    /// The error a run stops with on a non-finite number (`what`, stopped `why`), naming its last
    /// good state.
    pub fn stop_error(&self, what: &str, why: &str) -> rlhf_train::TrainError {
        let last = match self.run.latest_checkpoint() {
            Ok(Some(ck)) => format!(
                "the last checkpoint, {} (step {}), holds the last good state",
                ck.dir.display(),
                ck.step
            ),
            _ => "there is no checkpoint yet".to_string(),
        };
        rlhf_train::TrainError::Invalid(format!(
            "{what}: stopped before it reached the weights ({why}); {last}"
        ))
    }

    /// Clip, step the optimiser at the scheduled learning rate, advance the step. A step whose
    /// loss ([`Trainer::check_loss`]) or gradient is not finite is skipped or stops the run
    /// (`optim.on_nonfinite`); `applied` says which.
    pub fn apply(&mut self, grads: GradStore) -> Result<StepStats> {
        let world = rlhf_train::dist::world();
        if world.size() > 1 && world.any(self.pending_skip.is_some())? {
            // A non-finite loss on any rank: every rank skips, so the replicas stay equal.
            self.pending_skip.get_or_insert_with(|| {
                format!(
                    "a loss is not finite on another rank at optimiser step {}",
                    self.step + 1
                )
            });
        }
        let stats = if self.pending_skip.is_some() {
            StepStats::not_taken()
        } else {
            let stats = self.optimizer.apply(grads, self.step)?;
            if !stats.applied {
                self.nonfinite("gradient norm", stats.grad_norm)?;
            }
            stats
        };
        self.step += 1;
        match self.pending_skip.take() {
            Some(what) => {
                self.skipped_in_a_row += 1;
                eprintln!("warning: {what}: step skipped (weights and optimiser state unchanged)");
                self.log(&[("nonfinite_skipped", 1.0)])?;
            }
            None => self.skipped_in_a_row = 0,
        }
        self.stop_if_killed()?;
        Ok(stats)
    }

    /// Count a step without computing or applying it (the trip-wire's rolled-back iteration).
    pub fn skip(&mut self) -> Result<StepStats> {
        self.step += 1;
        self.stop_if_killed()?;
        Ok(StepStats::not_taken())
    }

    /// `RLHF_TEST_KILL_AT_STEP`: fail right after that step.
    fn stop_if_killed(&self) -> Result<()> {
        if self.kill_at == Some(self.step) {
            return Err(rlhf_train::TrainError::Invalid(format!(
                "killed at step {} (RLHF_TEST_KILL_AT_STEP)",
                self.step
            )));
        }
        Ok(())
    }

    /// A deep copy of the optimiser's state (AdamW moments and step counts).
    pub fn optimizer_state(
        &self,
    ) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
        self.optimizer.state()
    }

    /// Put back what [`Trainer::optimizer_state`] returned (a trip-wire rollback); the step and
    /// the learning-rate schedule are left as they are.
    pub fn restore_optimizer_state(
        &mut self,
        state: &std::collections::HashMap<String, candle_core::Tensor>,
    ) -> Result<()> {
        self.optimizer.load_state(state)
    }

    pub fn log(&mut self, metrics: &[(&str, f64)]) -> Result<()> {
        match &mut self.metrics {
            Some(m) => m.log(self.step, metrics),
            None => Ok(()),
        }
    }

    /// A checkpoint of the current step: weights (as an HF directory), optimiser, method state.
    pub fn checkpoint(&self, lm: &TrainableLm, state: serde_json::Value) -> Result<()> {
        self.checkpoint_with(lm, state, &[])
    }

    /// [`Trainer::checkpoint`] with more tensors saved beside the weights, each as
    /// `<name>.safetensors` in the checkpoint's directory (a second model, its optimiser state);
    /// written before the checkpoint is made visible, so they are never missing or half-written.
    pub fn checkpoint_with(
        &self,
        lm: &TrainableLm,
        state: serde_json::Value,
        extra: &[(
            &str,
            &std::collections::HashMap<String, candle_core::Tensor>,
        )],
    ) -> Result<()> {
        let weights = lm.snapshot()?;
        let world = rlhf_train::dist::world();
        if world.size() > 1 {
            // Data parallelism: the replicas must still be one model. Summed gradients keep them
            // equal; a rank that drifted (a bug, a bad node) is caught here, not after the run.
            let differ = world.same_everywhere(digest(&weights)?)?;
            if !differ.is_empty() {
                return Err(rlhf_train::TrainError::invalid(format!(
                    "at optimiser step {}: the weights of rank(s) {differ:?} differ from rank 0's \
                     (data-parallel replicas must stay equal); the last checkpoint holds the last \
                     state they agreed on",
                    self.step
                )));
            }
        }
        self.run.save_checkpoint_with(
            self.step,
            &weights,
            &self.optimizer.state()?,
            &state,
            |dir: &Path| {
                std::fs::write(
                    dir.join("config.json"),
                    serde_json::to_string_pretty(&lm.config.to_hf_json()).expect("serialisable"),
                )
                .map_err(|e| rlhf_train::TrainError::io(dir.join("config.json"), e))?;
                lm.tokenizer.save_hf(dir, lm.chat_template.as_ref())?;
                for (name, tensors) in extra {
                    rlhf_train::run::save_safetensors(
                        &dir.join(format!("{name}.safetensors")),
                        tensors,
                    )?;
                }
                Ok::<(), rlhf_train::TrainError>(())
            },
        )?;
        // The picture follows the checkpoints, so a long run's curves can be looked at while it
        // trains (the metrics logger draws the final one when the run ends).
        if let Some(m) = &self.metrics {
            m.refresh_curves();
        }
        Ok(())
    }

    /// The final model, as an HF directory at `<run>/model`.
    pub fn finish(&self, lm: &TrainableLm) -> Result<std::path::PathBuf> {
        let dir = self.run.path().join("model");
        lm.save(&dir)?;
        Ok(dir)
    }
}

pub use rlhf_train::rng::epoch_order;

/// A CRC-32C of named tensors (names in order, then each tensor's f32 values): equal weights give
/// equal digests on every rank.
fn digest(weights: &std::collections::HashMap<String, candle_core::Tensor>) -> Result<u64> {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut crc = 0u32;
    for name in names {
        crc = crc32c::crc32c_append(crc, name.as_bytes());
        let values = weights[name]
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        crc = crc32c::crc32c_append(crc, &bytes);
    }
    Ok(crc as u64)
}
