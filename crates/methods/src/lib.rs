//! One file per method, each readable top to bottom: the math in its doc comment, its
//! configuration, and its loop in numbered steps. A method imports only the shared pieces of
//! `rlhf-rl` (and the crates below it), never another method.
//!
//! Offline: [`sft`], [`rm`] (reward model), [`dpo`] (DPO, IPO, cDPO, SimPO, ORPO), [`kto`].
//! Online: [`reinforce`], [`rloo`], [`vanilla_pg`], [`raft`], [`grpo`], [`ppo`], and the iterative
//! [`online_dpo`] (with self-rewarding as its self-judging preset) and [`rest`] (ReST, with
//! ReST-EM as its preset). [`rlp`]: RLP's reward-model refresh on the policy's own samples (UML,
//! SPG). Multi-turn: [`dialogue_sft`] (behaviour cloning and a user model in one model) and
//! [`dialogue_rl`] (RLOO in imagined conversations with the learned user model, or model-free
//! against the real user).

pub mod dialogue_rl;
pub mod dialogue_sft;
pub mod dpo;
pub mod grpo;
pub mod kto;
pub mod online_dpo;
pub mod ppo;
pub mod raft;
pub mod reinforce;
pub mod rest;
pub mod rloo;
pub mod rlp;
pub mod rm;
pub mod sft;
pub mod vanilla_pg;

use rlhf_rl::registry::Registered;

/// Every method, in the order `rlhf --help` lists them. Adding a method: its file declares an
/// `ENTRY`, and it is listed here (the command line, its help and `compare-online` follow).
pub fn registry() -> [&'static dyn Registered; 17] {
    [
        &sft::ENTRY,
        &rm::ENTRY,
        &dpo::ENTRY,
        &kto::ENTRY,
        &online_dpo::ENTRY,
        &online_dpo::SELF_REWARD_ENTRY,
        &rest::ENTRY,
        &rest::EM_ENTRY,
        &reinforce::ENTRY,
        &rloo::ENTRY,
        &vanilla_pg::ENTRY,
        &raft::ENTRY,
        &grpo::ENTRY,
        &ppo::ENTRY,
        &rlp::ENTRY,
        &dialogue_sft::ENTRY,
        &dialogue_rl::ENTRY,
    ]
}

/// The registered method called `name`.
pub fn method(name: &str) -> Option<&'static dyn Registered> {
    registry().into_iter().find(|m| m.name() == name)
}
