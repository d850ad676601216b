//! A killed run resumes from its last checkpoint and ends exactly where an uninterrupted run does.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_rl::policy::fresh_tiny;

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-resume-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sft(root: &Path, out: &str, kill_at: Option<u64>, resume: bool) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.env("RLHF_NO_PROGRESS", "1")
        .args(["sft", "--config"])
        .arg(root.join("run.toml"));
    c.arg("--set")
        .arg(format!("output_dir={}", root.join(out).display()));
    if let Some(k) = kill_at {
        c.env("RLHF_TEST_KILL_AT_STEP", k.to_string());
    }
    if resume {
        c.arg("--resume");
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| k != "wall_time" && !k.starts_with("time/"));
            v
        })
        .collect()
}

#[test]
fn killed_sft_resumes_to_the_same_result() {
    let root = scratch();
    let task = task_by_name("sentiment", 1).unwrap();
    let lines: Vec<String> = task.demonstrations()[..40]
        .iter()
        .map(|(p, r)| serde_json::json!({"prompt": p, "completion": format!(" {r}")}).to_string())
        .collect();
    std::fs::write(root.join("sft.jsonl"), lines.join("\n")).unwrap();
    fresh_tiny(tokenizer_for(task.as_ref()), 3, &Device::Cpu)
        .unwrap()
        .save(&root.join("init"))
        .unwrap();
    std::fs::write(
        root.join("run.toml"),
        format!(
            "model = {:?}\ntrain_file = {:?}\nepochs = 2\nbatch_size = 8\nmax_len = 48\nsave_every = 3\nlog_every = 1\nseed = 11\n[optim]\nlr = 1e-3\n",
            root.join("init"),
            root.join("sft.jsonl")
        ),
    )
    .unwrap();

    let (ok, err) = sft(&root, "full", None, false);
    assert!(ok, "{err}");
    let (ok, err) = sft(&root, "killed", Some(8), false);
    assert!(!ok && err.contains("killed at step 8"), "{err}");
    assert!(
        !root.join("killed/model").exists(),
        "no final model after a kill"
    );
    let (ok, err) = sft(&root, "killed", None, true);
    assert!(ok, "{err}");
    assert!(
        err.contains("resuming from") && err.contains("step-6"),
        "{err}"
    );

    assert_eq!(
        metrics(&root.join("full/metrics.jsonl")),
        metrics(&root.join("killed/metrics.jsonl"))
    );
    let a = std::fs::read(root.join("full/model/model.safetensors")).unwrap();
    let b = std::fs::read(root.join("killed/model/model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
}
