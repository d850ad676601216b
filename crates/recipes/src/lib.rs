//! Pipelines made of methods: the quickstart (task -> SFT -> reward model -> RLOO/PPO ->
//! evaluation), the comparison of online methods under one sample budget, ReST's table against
//! online RLOO at equal samples, and RLP's Algorithm 1 (policy -> samples -> refreshed reward model
//! -> policy again from SFT), and the multi-turn dialogue study (model-based RL with a learned user
//! model against model-free RL and behaviour cloning).

pub mod compare;
pub mod curves;
pub mod dialogue;
pub mod plot;
pub mod quickstart;
pub mod rest_table;
pub mod rlp;
pub mod stats;
