//! Helpers shared by this crate's tests: a scratch directory, the testbed's tiny model and the
//! committed tiny-Llama fixture (with a chat template). Each test file uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_rl::policy::{fresh_tiny, TrainableLm};

pub const CPU: Device = Device::Cpu;

/// An empty directory of its own for one test (`<tmp>/rlhf-rl-<tag>-<pid>`).
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-rl-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The built-in testbed's tiny model (sentiment vocabulary), freshly initialised from `seed`.
pub fn tiny_lm(seed: u64) -> TrainableLm {
    let task = task_by_name("sentiment", 0).unwrap();
    fresh_tiny(tokenizer_for(task.as_ref()), seed, &CPU).unwrap()
}

/// The committed tiny Llama fixture (an HF directory with a chat template).
pub fn tiny_llama_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/tiny-llama")
}
