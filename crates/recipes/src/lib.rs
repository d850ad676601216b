//! Pipelines made of methods: the quickstart (task -> SFT -> reward model -> RLOO/PPO ->
//! evaluation) and the comparison of online methods under one sample budget.

pub mod compare;
pub mod quickstart;
