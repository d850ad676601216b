//! Data: JSONL loading with TRL's field conventions (and, later, the built-in testbed tasks).

pub mod jsonl;
pub mod loaders;
pub mod parquet;
pub mod testbed;
