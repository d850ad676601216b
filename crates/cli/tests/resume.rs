//! A killed run resumes from its last checkpoint and ends exactly where an uninterrupted run does.

mod common;
use common::{demonstrations_file, metrics, scratch, tiny_model, train};

use rlhf_data::testbed::task_by_name;

#[test]
fn killed_sft_resumes_to_the_same_result() {
    let root = scratch("resume");
    let task = task_by_name("sentiment", 1).unwrap();
    demonstrations_file(&root.join("sft.jsonl"), task.as_ref(), 40, " ");
    tiny_model(&root, task.as_ref(), 3);
    std::fs::write(
        root.join("run.toml"),
        format!(
            "model = {:?}\ntrain_file = {:?}\nepochs = 2\nbatch_size = 8\nmax_len = 48\nsave_every = 3\nlog_every = 1\nseed = 11\n[optim]\nlr = 1e-3\n",
            root.join("init"),
            root.join("sft.jsonl")
        ),
    )
    .unwrap();

    let (ok, err) = train(
        &root,
        &["sft"],
        &[format!("output_dir={}", root.join("full").display())],
        None,
        false,
    );
    assert!(ok, "{err}");
    let (ok, err) = train(
        &root,
        &["sft"],
        &[format!("output_dir={}", root.join("killed").display())],
        Some(8),
        false,
    );
    assert!(!ok && err.contains("killed at step 8"), "{err}");
    assert!(
        !root.join("killed/model").exists(),
        "no final model after a kill"
    );
    let (ok, err) = train(
        &root,
        &["sft"],
        &[format!("output_dir={}", root.join("killed").display())],
        None,
        true,
    );
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

/// `stages.jsonl` of a ReST run without its wall-clock column, with the run directory's name
/// replaced, so two runs in different directories compare exactly.
fn rest_stages(out: &std::path::Path) -> Vec<serde_json::Value> {
    let name = out.to_string_lossy().into_owned();
    std::fs::read_to_string(out.join("stages.jsonl"))
        .unwrap()
        .replace(&name, "OUT")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

#[test]
fn killed_rest_resumes_mid_improve_and_mid_grow_to_the_same_result() {
    let root = scratch("resume-rest");
    let task = task_by_name("arithmetic", 0).unwrap();
    demonstrations_file(&root.join("d.jsonl"), task.as_ref(), 24, "");
    tiny_model(&root, task.as_ref(), 3);
    std::fs::write(
        root.join("run.toml"),
        format!(
            "model = {:?}\ntask = \"arithmetic\"\ntrain_file = {:?}\ngrow_steps = 2\nsamples_per_source = 2\ngrow_chunk = 8\nthresholds = [0.0, 0.5]\nepochs = 1\nbatch_size = 8\nmax_len = 32\nsave_every = 2\nlog_every = 1\nseed = 11\n[reward]\nsource = \"gold\"\n[validation]\nprompts = 8\n[optim]\nlr = 1e-3\n",
            root.join("init"),
            root.join("d.jsonl")
        ),
    )
    .unwrap();
    let out = |d: &str| format!("output_dir={}", root.join(d).display());
    let (ok, err) = train(&root, &["rest"], &[out("full")], None, false);
    assert!(ok, "{err}");

    // 1. killed in the first Improve step (after optimiser step 5; the last checkpoint is step 4)
    let (ok, err) = train(&root, &["rest"], &[out("killed")], Some(5), false);
    assert!(!ok && err.contains("killed at step 5"), "{err}");
    // 2. resumed, then killed in the second Grow step right after its second chunk was cached
    let o = common::rlhf()
        .args(["rest", "--config"])
        .arg(root.join("run.toml"))
        .args(["--set", &out("killed"), "--resume"])
        .env("RLHF_TEST_KILL_AFTER_CHUNK", "2:1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("killed after grow 2 chunk 1"),
        "{err}"
    );
    assert!(
        err.contains("resuming from") && err.contains("step-4"),
        "{err}"
    );
    // 3. resumed to the end: grow 1 and its Improve steps are not redone, grow 2's chunks 0-1 are
    //    read back, not sampled or scored again
    let (ok, err) = train(&root, &["rest"], &[out("killed")], None, true);
    assert!(ok, "{err}");
    assert!(err.contains("grow 1: cached"), "{err}");
    assert!(
        err.contains("grow 1 improve 0: done") && err.contains("grow 1 improve 1: done"),
        "{err}"
    );
    assert!(
        err.contains("grow 2: chunk 0 cached") && err.contains("grow 2: chunk 1 cached"),
        "{err}"
    );
    assert!(!err.contains("grow 2: chunk 2 cached"), "{err}");

    let (full, killed) = (root.join("full"), root.join("killed"));
    assert_eq!(rest_stages(&full).len(), 5, "BC + 2 Grow x 2 Improve");
    assert_eq!(rest_stages(&full), rest_stages(&killed));
    for stage in [
        "grow-1/improve-0",
        "grow-1/improve-1",
        "grow-2/improve-0",
        "grow-2/improve-1",
    ] {
        assert_eq!(
            metrics(&full.join(stage).join("metrics.jsonl")),
            metrics(&killed.join(stage).join("metrics.jsonl")),
            "{stage}"
        );
    }
    for g in ["grow-1", "grow-2"] {
        let a = std::fs::read(full.join(g).join("dataset.jsonl")).unwrap();
        let b = std::fs::read(killed.join(g).join("dataset.jsonl")).unwrap();
        assert!(a == b, "{g}: the resumed data set differs");
    }
    let a = std::fs::read(full.join("grow-2/improve-1/model/model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("grow-2/improve-1/model/model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
}

/// Killed before its first checkpoint (here in PPO's first policy step, after the critic's
/// pre-training was logged), a resumed run starts over: its log has each pre-training row once,
/// as the uninterrupted run's does. (Found by the kill drill.)
#[test]
fn killed_before_the_first_checkpoint_starts_over_without_repeating_rows() {
    let root = scratch("resume-first");
    let task = task_by_name("sentiment", 0).unwrap();
    tiny_model(&root, task.as_ref(), 4);
    std::fs::write(
        root.join("run.toml"),
        format!(
            "model = {:?}\ntask = \"sentiment\"\nsteps = 2\nprompts_per_step = 4\nsave_every = 1\nseed = 5\n\
             [method]\ncritic_pretrain_iterations = 2\n\
             [rollout]\nk = 2\nmax_new_tokens = 6\n[reward]\nsource = \"gold\"\nnormalize_samples = 8\n\
             [optim]\nlr = 1e-3\nwarmup_ratio = 0.0\n[eval]\nprompts = 4\n",
            root.join("init")
        ),
    )
    .unwrap();
    let out = |d: &str| format!("output_dir={}", root.join(d).display());
    let (ok, err) = train(
        &root,
        &["--threads", "1", "ppo"],
        &[out("full")],
        None,
        false,
    );
    assert!(ok, "{err}");
    let (ok, err) = train(
        &root,
        &["--threads", "1", "ppo"],
        &[out("killed")],
        Some(1),
        false,
    );
    assert!(!ok && err.contains("killed at step 1"), "{err}");
    let (ok, err) = train(
        &root,
        &["--threads", "1", "ppo"],
        &[out("killed")],
        None,
        true,
    );
    assert!(ok, "{err}");
    assert!(err.contains("starting the run over"), "{err}");
    let full = metrics(&root.join("full/metrics.jsonl"));
    assert_eq!(
        full.iter()
            .filter(|r| r.get("critic_pretrain/iteration").is_some())
            .count(),
        2
    );
    assert_eq!(full, metrics(&root.join("killed/metrics.jsonl")));
    let a = std::fs::read(root.join("full/model/model.safetensors")).unwrap();
    let b = std::fs::read(root.join("killed/model/model.safetensors")).unwrap();
    assert!(a == b);
    std::fs::remove_dir_all(root).ok();
}
