//! Pipelines made of methods: the quickstart (task -> SFT -> reward model -> RLOO/PPO ->
//! evaluation), the comparison of online methods under one sample budget, and ReST's table
//! against online RLOO at equal samples.

pub mod compare;
pub mod quickstart;
pub mod rest_table;
