//! Helpers for tests that need real model files which are not in the repository.
//!
//! SmolLM2-135M-Instruct (Q4_1 GGUF) is fetched by `scripts/fetch-smollm2.sh` into
//! `<workspace>/models/`. Tests look for it there or at `$RLHF_SMOLLM2_GGUF`, and skip with a message
//! when it is absent, unless `RLHF_REQUIRE_SMOLLM2=1`, in which case they fail.

use std::path::{Path, PathBuf};

/// The device the parity tests run on: `$RLHF_TEST_DEVICE` (`cpu`, `cuda` or `cuda:N`; a `cuda`
/// device needs a build with the `cuda` feature), the CPU by default.
pub fn test_device() -> candle_core::Device {
    let spec = std::env::var("RLHF_TEST_DEVICE").unwrap_or_default();
    match spec.trim() {
        "" | "cpu" => candle_core::Device::Cpu,
        s => {
            let n: usize = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| {
                        panic!("RLHF_TEST_DEVICE={s}: expected cpu, cuda or cuda:N")
                    }),
                None => panic!("RLHF_TEST_DEVICE={s}: expected cpu, cuda or cuda:N"),
            };
            candle_core::Device::new_cuda(n).unwrap_or_else(|e| {
                panic!("RLHF_TEST_DEVICE={s}: {e} (built with --features cuda?)")
            })
        }
    }
}

pub const SMOLLM2_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The workspace root (two levels above this crate's manifest).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = here.join("..").join("..");
    root.canonicalize().unwrap_or(root)
}

/// The SmolLM2 GGUF: `$RLHF_SMOLLM2_GGUF` if set (and a file), else
/// `<workspace>/models/SmolLM2-135M-Instruct.Q4_1.gguf` if present.
pub fn smollm2_gguf() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("RLHF_SMOLLM2_GGUF").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let p = workspace_root().join("models").join(SMOLLM2_GGUF_NAME);
    p.is_file().then_some(p)
}

/// Whether `RLHF_REQUIRE_SMOLLM2=1`: tests must fail rather than skip without the model.
pub fn smollm2_required() -> bool {
    std::env::var("RLHF_REQUIRE_SMOLLM2").is_ok_and(|v| v == "1")
}

/// For a test that needs SmolLM2: its path, or `None` after printing why the test is skipped.
/// Panics (failing the test) when the model is absent and `RLHF_REQUIRE_SMOLLM2=1`.
pub fn smollm2_gguf_or_skip(test: &str) -> Option<PathBuf> {
    match smollm2_gguf() {
        Some(p) => Some(p),
        None if smollm2_required() => panic!(
            "{test}: SmolLM2 GGUF not found (RLHF_REQUIRE_SMOLLM2=1); run scripts/fetch-smollm2.sh \
             or set RLHF_SMOLLM2_GGUF"
        ),
        None => {
            eprintln!(
                "{test}: skipped: SmolLM2 GGUF not found; run scripts/fetch-smollm2.sh (or set RLHF_SMOLLM2_GGUF)"
            );
            None
        }
    }
}
