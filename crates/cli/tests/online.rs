//! The online commands from the outside: a TOML config, `--set` overrides, refused
//! configurations, and a killed `rlhf grpo` run resumed to exactly the uninterrupted result.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_rl::policy::fresh_tiny;

fn scratch() -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-cli-online-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rlhf(
    root: &Path,
    cmd: &str,
    sets: &[String],
    kill_at: Option<u64>,
    resume: bool,
) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.env("RLHF_NO_PROGRESS", "1")
        .args(["--threads", "1", cmd, "--config"])
        .arg(root.join("run.toml"));
    for s in sets {
        c.arg("--set").arg(s);
    }
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
                .retain(|k, _| k != "wall_time" && k != "tokens_per_s" && !k.starts_with("time/"));
            v
        })
        .collect()
}

#[test]
fn online_commands_configure_refuse_and_resume() {
    let root = scratch();
    let task = task_by_name("sentiment", 0).unwrap();
    fresh_tiny(tokenizer_for(task.as_ref()), 4, &Device::Cpu)
        .unwrap()
        .save(&root.join("init"))
        .unwrap();
    std::fs::write(
        root.join("run.toml"),
        format!(
            "model = {:?}\ntask = \"sentiment\"\nsteps = 4\nprompts_per_step = 3\nsave_every = 1\n\
             [rollout]\nk = 2\nmax_new_tokens = 5\n[reward]\nsource = \"gold\"\nnormalize_samples = 8\n\
             [optim]\nlr = 1e-3\nwarmup_ratio = 0.0\n[eval]\nprompts = 4\n",
            root.join("init")
        ),
    )
    .unwrap();
    let out = |name: &str| format!("output_dir={}", root.join(name).display());

    // Refused before anything runs, with the reason.
    let (ok, err) = rlhf(
        &root,
        "rloo",
        &[out("bad"), "rollout.k=1".into()],
        None,
        false,
    );
    assert!(!ok && err.contains("rollout.k >= 2"), "{err}");
    let (ok, err) = rlhf(
        &root,
        "rloo",
        &[out("bad"), "method.minibatchs=2".into()],
        None,
        false,
    );
    assert!(!ok && err.contains("minibatchs"), "{err}");
    assert!(!root.join("bad/metrics.jsonl").exists());

    // GRPO: 2 optimiser steps per rollout batch. Killed at step 5 (mid-way through the third
    // batch), resumed from its checkpoint at step 4: the same metrics and weights as a clean run.
    let (ok, err) = rlhf(&root, "grpo", &[out("full")], None, false);
    assert!(ok, "{err}");
    let (ok, err) = rlhf(&root, "grpo", &[out("killed")], Some(5), false);
    assert!(!ok && err.contains("killed at step 5"), "{err}");
    assert!(!root.join("killed/model").exists() && !root.join("killed/eval.json").exists());
    let (ok, err) = rlhf(&root, "grpo", &[out("killed")], None, true);
    assert!(ok, "{err}");
    assert!(
        err.contains("resuming from") && err.contains("step-4"),
        "{err}"
    );
    assert_eq!(
        metrics(&root.join("full/metrics.jsonl")),
        metrics(&root.join("killed/metrics.jsonl"))
    );
    let a = std::fs::read(root.join("full/model/model.safetensors")).unwrap();
    let b = std::fs::read(root.join("killed/model/model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("killed/eval.json")).unwrap())
            .unwrap();
    assert_eq!(eval["n"], 4);
    std::fs::remove_dir_all(root).ok();
}
