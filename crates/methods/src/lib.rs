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
// Online policy optimisation: the shared rollout engine and reward sources, KL shaping, and one
// file per estimator.
pub mod compare;
pub mod dpo;
pub mod grpo;
pub mod kl;
pub mod kto;
pub mod online;
pub mod online_dpo;
pub mod ppo;
pub mod pref_losses;
pub mod raft;
pub mod reinforce;
pub mod reward_source;
pub mod rloo;
pub mod rollout;
pub mod self_reward;
pub mod value;
pub mod vanilla_pg;
