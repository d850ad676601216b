//! The online commands from the outside: a TOML config, `--set` overrides, refused
//! configurations, and a killed `rlhf grpo` run resumed to exactly the uninterrupted result.

mod common;
use common::{metrics, scratch, tiny_model, train};

use rlhf_data::testbed::task_by_name;

#[test]
fn online_commands_configure_refuse_and_resume() {
    let root = scratch("online");
    let task = task_by_name("sentiment", 0).unwrap();
    tiny_model(&root, task.as_ref(), 4);
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
    let (ok, err) = train(
        &root,
        &["--threads", "1", "rloo"],
        &[out("bad"), "rollout.k=1".into()],
        None,
        false,
    );
    assert!(!ok && err.contains("rollout.k >= 2"), "{err}");
    let (ok, err) = train(
        &root,
        &["--threads", "1", "rloo"],
        &[out("bad"), "method.minibatchs=2".into()],
        None,
        false,
    );
    assert!(!ok && err.contains("minibatchs"), "{err}");
    assert!(!root.join("bad/metrics.jsonl").exists());

    // GRPO: 2 optimiser steps per rollout batch. Killed at step 5 (mid-way through the third
    // batch), resumed from its checkpoint at step 4: the same metrics and weights as a clean run.
    let (ok, err) = train(
        &root,
        &["--threads", "1", "grpo"],
        &[out("full")],
        None,
        false,
    );
    assert!(ok, "{err}");
    let (ok, err) = train(
        &root,
        &["--threads", "1", "grpo"],
        &[out("killed")],
        Some(5),
        false,
    );
    assert!(!ok && err.contains("killed at step 5"), "{err}");
    assert!(!root.join("killed/model").exists() && !root.join("killed/eval.json").exists());
    let (ok, err) = train(
        &root,
        &["--threads", "1", "grpo"],
        &[out("killed")],
        None,
        true,
    );
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
