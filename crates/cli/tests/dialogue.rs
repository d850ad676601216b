//! `rlhf testbed --task dialogue` and `rlhf dialogue-rl`: a run killed mid-way and resumed ends
//! with the same weights, user model, evaluations, metrics and real conversations as one that
//! was never interrupted.

mod common;

use common::{metrics, scratch, train};

fn file(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn killed_dialogue_rl_resumes_to_the_same_result() {
    let root = scratch("dialogue-resume");
    let data = root.join("data");
    common::dialogue_testbed(&data);
    for f in [
        "logs.jsonl",
        "eval_logs.jsonl",
        "init/config.json",
        "tokenizer/tokenizer.json",
    ] {
        assert!(data.join(f).is_file(), "{f}");
    }
    // Separate user model, Dyna (iteration 3 against the scripted user), supervised steps and
    // snapshot refreshes every 2 iterations, a checkpoint every 2: optimiser steps are
    // it1: 1; it2: 2 + supervised 3 (checkpoint); it3: 4 (real); it4: 5 + supervised 6.
    std::fs::write(
        root.join("run.toml"),
        format!(
            r#"model = "{init}"
task = "dialogue"
train_file = "{logs}"
eval_file = "{eval}"
user_model = "separate"
iterations = 4
prompts_per_step = 2
k = 2
real_every = 3
supervised_every = 2
snapshot_every = 2
eval_every = 2
eval_games = 4
eval_conversations = 3
save_every = 2
seed = 5
[turns]
turn_limit = 3
max_turn_tokens = 6
[optim]
lr = 0.01
"#,
            init = data.join("init").display(),
            logs = data.join("logs.jsonl").display(),
            eval = data.join("eval_logs.jsonl").display(),
        ),
    )
    .unwrap();
    let whole = root.join("whole");
    let cut = root.join("cut");
    let set = |d: &std::path::Path| vec![format!("output_dir=\"{}\"", d.display())];
    let (ok, err) = train(
        &root,
        &["--threads", "1", "dialogue-rl"],
        &set(&whole),
        None,
        false,
    );
    assert!(ok, "{err}");
    let (ok, err) = train(
        &root,
        &["--threads", "1", "dialogue-rl"],
        &set(&cut),
        Some(4),
        false,
    );
    assert!(!ok && err.contains("killed at step 4"), "{err}");
    assert!(!cut.join("model").exists());
    let (ok, err) = train(
        &root,
        &["--threads", "1", "dialogue-rl"],
        &set(&cut),
        None,
        true,
    );
    assert!(ok, "{err}");
    assert!(err.contains("resuming from"), "{err}");
    for f in [
        "model/model.safetensors",
        "user_model/model.safetensors",
        "eval.jsonl",
        "real_dialogues.jsonl",
        "samples.jsonl",
    ] {
        assert_eq!(file(&whole.join(f)), file(&cut.join(f)), "{f} differs");
    }
    assert_eq!(
        metrics(&whole.join("metrics.jsonl")),
        metrics(&cut.join("metrics.jsonl"))
    );
    // Iteration 3 was the real one: 2 prefixes x 2 branches against the scripted user.
    let summary: serde_json::Value =
        serde_json::from_slice(&file(&whole.join("summary.json"))).unwrap();
    assert_eq!(summary["real_episodes"], 4);
    assert_eq!(summary["imagined_episodes"], 12);
    assert_eq!(
        std::fs::read_to_string(whole.join("real_dialogues.jsonl"))
            .unwrap()
            .lines()
            .count(),
        4
    );
}
