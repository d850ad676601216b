//! One file per method, each readable top to bottom: the math in its doc comment, its
//! configuration, and its loop in numbered steps. A method imports only the shared pieces of
//! `rlhf-rl` (and the crates below it), never another method.
//!
//! Offline: [`sft`], [`rm`] (reward model), [`dpo`] (DPO, IPO, cDPO, SimPO, ORPO), [`kto`].
//! Online: [`reinforce`], [`rloo`], [`vanilla_pg`], [`raft`], [`grpo`], [`ppo`], and the iterative
//! [`online_dpo`] (with self-rewarding as its self-judging preset).

pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod online_dpo;
pub mod ppo;
pub mod raft;
pub mod reinforce;
pub mod rloo;
pub mod rm;
pub mod sft;
pub mod vanilla_pg;
