//! A killed run resumes from its last checkpoint and ends exactly where an uninterrupted run does.

mod common;
use common::{metrics, scratch, train};

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_rl::policy::fresh_tiny;

#[test]
fn killed_sft_resumes_to_the_same_result() {
    let root = scratch("resume");
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
