//! One file per method, each readable top to bottom, on shared pieces written once
//! (`policy`: the model being trained; `reward`: reward models; `rlhf_lm::score`: log-probs;
//! `rlhf_train`: optimiser, schedules, run directories, checkpoints).

pub mod best_of_n;
pub mod eval;
pub mod losses;
pub mod policy;
pub mod preferences;
pub mod quickstart;
pub mod reward;
pub mod rm;
pub mod sft;
pub mod trainer;
