//! Training infrastructure shared by every method (SFT, reward model, RLOO, PPO, DPO, ...):
//!
//! - [`optim`]: AdamW matching `torch.optim.AdamW`, updating parameters in place;
//! - [`schedule`]: learning-rate schedules (constant / linear / cosine with linear warm-up);
//! - [`clip`]: global-norm gradient clipping and gradient accumulation over micro-batches;
//! - [`run`]: the run directory (resolved `config.toml`, `metrics.jsonl`, TensorBoard events,
//!   atomic checkpoints, resume);
//! - [`tensorboard`]: the TensorBoard event-file writer (and a reader, for tests);
//! - [`plot`]: SVG charts (line charts in panels, dot-and-whisker interval charts);
//! - [`training_curves`]: a run's `metrics.jsonl` drawn as `curves.svg`, and several runs overlaid;
//! - [`dist`]: data parallelism across MPI ranks (a world of one without the `mpi` feature);
//! - [`faults`]: what a non-finite loss, gradient, reward or log-prob does, and its test injection;
//! - [`rng`]: a seedable RNG whose full state round-trips through JSON, for exact resume;
//! - [`mod@progress`]: progress bars that stay quiet when stderr is not a terminal.

pub mod clip;
pub mod config;
pub mod dist;
pub mod error;
pub mod faults;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod rng;
pub mod run;
pub mod schedule;
pub mod tensorboard;
pub mod training_curves;

pub use clip::{clip_grad_norm, grad_norm, GradAccumulator};
pub use error::{Result, TrainError};
pub use optim::{AdamW, AdamWConfig};
pub use progress::{progress, spinner};
pub use rng::{RngState, TrainRng};
pub use run::{load_safetensors, save_safetensors, Checkpoint, MetricsLogger, RunDir};
pub use schedule::{LrSchedule, ScheduleKind};
