//! Helpers shared by this crate's tests: a scratch directory, the testbed's tiny model, a metrics
//! reader without the wall-clock columns, and tolerance checks. Each test file uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_methods::sft::SftConfig;
use rlhf_rl::fit::FitConfig;
use rlhf_rl::policy::{fresh_tiny, TrainableLm};
use rlhf_rl::trainer::OptimConfig;

pub const CPU: Device = Device::Cpu;

/// An empty directory of its own for one test (`<tmp>/rlhf-methods-<tag>-<pid>`).
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-methods-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The built-in testbed's tiny model (sentiment vocabulary), freshly initialised from `seed`.
pub fn tiny_lm(seed: u64) -> TrainableLm {
    let task = task_by_name("sentiment", 0).unwrap();
    fresh_tiny(tokenizer_for(task.as_ref()), seed, &CPU).unwrap()
}

/// [`tiny_lm`] saved as an HF directory at `<root>/init`.
pub fn tiny_model(root: &Path, seed: u64) -> PathBuf {
    let dir = root.join("init");
    tiny_lm(seed).save(&dir).unwrap();
    dir
}

/// The rows of a `metrics.jsonl` without the columns that measure time (`wall_time`,
/// `tokens_per_s`, `time/*`), so that two runs can be compared exactly.
pub fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| k != "wall_time" && k != "tokens_per_s" && !k.starts_with("time/"));
            v
        })
        .collect()
}

/// |a - b| within `tol` relative to b (absolute near 0).
pub fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

pub fn assert_all_close(got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (g, w) in got.iter().zip(want) {
        assert!(close(*g, *w, tol), "{got:?} vs {want:?}");
    }
}

/// The texts (titles, axis labels, legend entries) of the `curves.svg` a run left in `run_dir`;
/// fails if there is none or it is not an SVG.
pub fn curves_texts(run_dir: &Path) -> Vec<String> {
    let path = run_dir.join("curves.svg");
    let svg = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

/// The sentiment task's first `n` demonstrations as an SFT file, and a fresh tiny model to start
/// from, under `root`: (data file, model directory).
pub fn sft_data_and_init(root: &Path, n: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let task = task_by_name("sentiment", 0).unwrap();
    let data = root.join("sft.jsonl");
    let lines: Vec<String> = task.demonstrations()[..n]
        .iter()
        .map(|(p, r)| serde_json::json!({"prompt": p, "completion": format!(" {r}")}).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let init = root.join("init");
    tiny_lm(0).save(&init).unwrap();
    (data, init)
}

/// SFT of the tiny model on `data`: 2 epochs of 8 rows, checkpoints every 3 steps, seed 7, lr 1e-3.
pub fn sft_config(dir: &Path, data: &Path, init: &Path) -> SftConfig {
    SftConfig {
        model: init.to_path_buf(),
        train_file: data.to_path_buf(),
        fit: FitConfig {
            output_dir: dir.to_path_buf(),
            epochs: 2,
            batch_size: 8,
            max_len: 48,
            save_every: 3,
            log_every: 1,
            seed: 7,
            optim: OptimConfig {
                lr: 1e-3,
                ..OptimConfig::default()
            },
            ..SftConfig::default().fit
        },
    }
}
