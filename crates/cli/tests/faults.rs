//! Numerical faults and divergence, from the outside: a NaN injected into a loss, a gradient, a
//! reward or a log-prob (`RLHF_TEST_NONFINITE`) never reaches the weights; the step is skipped or
//! the run stops, saying which quantity went non-finite at which step, with its last good
//! checkpoint on disk. A diverging run trips the shared trip-wire in every online method.

mod common;
use common::{metrics, run_method, scratch, small_sft, tiny_model};

use std::path::{Path, PathBuf};

use rlhf_data::testbed::task_by_name;

/// `rlhf --threads 1 <method>` into `out` with `inject` as the fault injection: (success, stderr).
fn run(
    method: &str,
    toml: &Path,
    out: &Path,
    sets: &[String],
    inject: Option<&str>,
) -> (bool, String) {
    let env: Vec<(&str, &str)> = inject
        .map(|i| ("RLHF_TEST_NONFINITE", i))
        .into_iter()
        .collect();
    run_method(method, toml, out, sets, false, &env)
}

fn bytes(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What the trip-wire wrote to `<run>/tripwire.json`.
fn tripwire_record(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("tripwire.json")).unwrap()).unwrap()
}

fn latest(run: &Path) -> String {
    std::fs::read_to_string(run.join("checkpoints/latest"))
        .unwrap()
        .trim()
        .to_string()
}

/// The weights of a checkpoint or model file are all finite.
fn all_finite(path: &Path) -> bool {
    let t = rlhf_train::load_safetensors(path, &candle_core::Device::Cpu).unwrap();
    t.values().all(|x| {
        x.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    })
}

#[test]
fn a_nan_loss_or_gradient_is_skipped_and_never_reaches_the_weights() {
    let root = scratch("faults-skip");
    let toml = small_sft(&root, 24);
    for (inject, quantity) in [("loss@3", "loss"), ("grad@3", "gradient norm")] {
        let dir = root.join(inject.replace('@', "-"));
        let (ok, err) = run("sft", &toml, &dir, &[], Some(inject));
        assert!(ok, "{err}");
        assert!(
            err.contains(&format!("the {quantity} is NaN at optimiser step 3"))
                && err.contains("step skipped"),
            "{err}"
        );
        let m = metrics(&dir.join("metrics.jsonl"));
        let skipped: Vec<u64> = m
            .iter()
            .filter(|r| r.get("nonfinite_skipped").is_some())
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(skipped, vec![3], "{inject}");
        assert!(all_finite(&dir.join("model/model.safetensors")));
    }
    // Stopped right after the skipped step 3 (RLHF_TEST_KILL_AT_STEP): steps 2 and 3 have the
    // same weights and optimiser state, byte for byte.
    let dir = root.join("kill-after-skip");
    let env = [
        ("RLHF_TEST_NONFINITE", "grad@3"),
        ("RLHF_TEST_KILL_AT_STEP", "4"),
    ];
    assert!(!run_method("sft", &toml, &dir, &[], false, &env).0);
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let a = bytes(dir.join("checkpoints/step-2").join(f));
        let b = bytes(dir.join("checkpoints/step-3").join(f));
        assert!(a == b, "{f}: the skipped step changed the state");
    }
    // A clean run's step 3 does change them (so the comparison above can fail).
    let clean = root.join("clean");
    let env = [("RLHF_TEST_KILL_AT_STEP", "4")];
    assert!(!run_method("sft", &toml, &clean, &[], false, &env).0);
    let a = bytes(clean.join("checkpoints/step-2/model.safetensors"));
    let b = bytes(clean.join("checkpoints/step-3/model.safetensors"));
    assert!(a != b);
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn a_nan_stops_the_run_when_asked_or_when_it_persists() {
    let root = scratch("faults-stop");
    let toml = small_sft(&root, 24);
    // on_nonfinite = "stop": the run ends at the faulty step, naming it and the last checkpoint.
    let dir = root.join("stop");
    let (ok, err) = run(
        "sft",
        &toml,
        &dir,
        &["optim.on_nonfinite=\"stop\"".into()],
        Some("grad@3"),
    );
    assert!(!ok);
    assert!(
        err.contains("the gradient norm is NaN at optimiser step 3")
            && err.contains("stopped before it reached the weights")
            && err.contains("step-2"),
        "{err}"
    );
    assert_eq!(latest(&dir), "step-2");
    assert!(!dir.join("model").exists());
    assert!(all_finite(
        &dir.join("checkpoints/step-2/model.safetensors")
    ));
    // Skips in a row are bounded: the third NaN in a row stops a run allowed two.
    let dir = root.join("persist");
    let (ok, err) = run(
        "sft",
        &toml,
        &dir,
        &["optim.max_nonfinite_skips=2".into()],
        Some("loss@2,loss@3,loss@4"),
    );
    assert!(!ok);
    assert!(
        err.contains("the loss is NaN at optimiser step 4")
            && err.contains("2 non-finite steps in a row were skipped already"),
        "{err}"
    );
    assert_eq!(latest(&dir), "step-3");
    std::fs::remove_dir_all(root).ok();
}

fn online_setup(root: &Path) -> PathBuf {
    let task = task_by_name("sentiment", 0).unwrap();
    let init = tiny_model(root, task.as_ref(), 4);
    let toml = root.join("online.toml");
    std::fs::write(
        &toml,
        format!(
            "model = {init:?}\ntask = \"sentiment\"\nsteps = 4\nprompts_per_step = 4\nsave_every = 1\nseed = 3\n\
             [rollout]\nk = 2\nmax_new_tokens = 6\n[reward]\nsource = \"gold\"\nnormalize_samples = 8\n\
             [optim]\nlr = 1e-3\nwarmup_ratio = 0.0\n[eval]\nprompts = 4\n"
        ),
    )
    .unwrap();
    toml
}

#[test]
fn a_nan_reward_or_log_prob_stops_an_online_run_before_it_learns_from_the_batch() {
    let root = scratch("faults-online");
    let toml = online_setup(&root);
    for (inject, what) in [
        ("reward@3", "the reward is NaN for sample 0"),
        ("logprob@3", "the policy's log-prob is NaN for sample 0"),
    ] {
        let dir = root.join(inject.replace('@', "-"));
        let (ok, err) = run("rloo", &toml, &dir, &[], Some(inject));
        assert!(!ok);
        assert!(
            err.contains(what)
                // RLOO takes 2 optimiser steps per batch: step 3 opens the second batch.
                && err.contains("optimiser step 3 (iteration 2)")
                && err.contains("step-2"),
            "{err}"
        );
        assert_eq!(latest(&dir), "step-2");
        assert!(all_finite(
            &dir.join("checkpoints/step-2/model.safetensors")
        ));
    }
    // A NaN loss in an online step is skipped like an offline one.
    let dir = root.join("loss");
    let (ok, err) = run("grpo", &toml, &dir, &[], Some("loss@2"));
    assert!(
        ok && err.contains("the loss is NaN at optimiser step 2"),
        "{err}"
    );
    std::fs::remove_dir_all(root).ok();
}

/// Every online method: a bound the policy breaks from the start trips the wire on the first
/// batch, the run stops there with its initial weights restored, and says why in tripwire.json.
#[test]
fn every_online_method_stops_at_its_tripwire_with_the_last_good_weights() {
    let root = scratch("faults-trip");
    let toml = online_setup(&root);
    let init = bytes(root.join("init/model.safetensors"));
    for method in ["reinforce", "rloo", "grpo", "raft", "vanilla-pg", "ppo"] {
        let dir = root.join(method);
        let mut sets = vec!["tripwire.max_length=0.5".to_string()];
        if method == "ppo" {
            sets.push("method.critic_pretrain_iterations=0".into());
        }
        let (ok, err) = run(method, &toml, &dir, &sets, None);
        assert!(ok, "{method}: {err}");
        let trip = tripwire_record(&dir);
        assert_eq!(trip["action"], "stopped", "{method}");
        assert!(
            trip["reason"].as_str().unwrap().contains("max_length 0.5"),
            "{method}: {trip}"
        );
        assert!(
            bytes(dir.join("model/model.safetensors")) == init,
            "{method}: the final model is not the restored initial one"
        );
        assert!(dir.join("eval.json").is_file(), "{method}");
    }
    std::fs::remove_dir_all(root).ok();
}

/// A loss past `max_loss` is not applied; the iteration rolls back, and after `max_rollbacks`
/// the run stops, with the initial weights.
#[test]
fn a_loss_past_its_bound_rolls_back_then_stops() {
    let root = scratch("faults-loss-bound");
    let toml = online_setup(&root);
    let dir = root.join("run");
    let (ok, err) = run(
        "rloo",
        &toml,
        &dir,
        &[
            "tripwire.max_loss=1e-12".into(),
            "tripwire.action=\"rollback\"".into(),
            "tripwire.max_rollbacks=1".into(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let m = metrics(&dir.join("metrics.jsonl"));
    let trips = m
        .iter()
        .filter(|r| r["tripwire/tripped"].as_f64() == Some(1.0))
        .count();
    assert_eq!(trips, 2, "{m:?}");
    let trip = tripwire_record(&dir);
    assert_eq!(trip["action"], "stopped");
    assert!(
        trip["reason"].as_str().unwrap().contains("max_loss"),
        "{trip}"
    );
    assert!(
        bytes(dir.join("model/model.safetensors")) == bytes(root.join("init/model.safetensors"))
    );
    std::fs::remove_dir_all(root).ok();
}

/// A rollback restores the method's own state too: REINFORCE's baseline after a rollback to the
/// initial snapshot is the empty one again, not the one that had seen the first batch.
#[test]
fn a_kl_rollback_restores_the_methods_state() {
    let root = scratch("faults-kl-rollback");
    let toml = online_setup(&root);
    let dir = root.join("run");
    let (ok, err) = run(
        "reinforce",
        &toml,
        &dir,
        &[
            "steps=2".into(),
            "optim.lr=1e-2".into(),
            "tripwire.max_kl=1e-3".into(),
            "tripwire.action=\"rollback\"".into(),
            "tripwire.max_rollbacks=3".into(),
        ],
        None,
    );
    assert!(ok, "{err}");
    let m = metrics(&dir.join("metrics.jsonl"));
    let rows: Vec<_> = m.iter().filter(|r| r.get("baseline").is_some()).collect();
    let trips: Vec<_> = m
        .iter()
        .filter(|r| r["tripwire/tripped"].as_f64() == Some(1.0))
        .collect();
    assert!(
        !trips.is_empty(),
        "the large step should push KL past 1e-3: {m:?}"
    );
    assert_eq!(trips[0]["tripwire/restored_iteration"].as_f64(), Some(0.0));
    // The batch learned from after the rollback is baselined by the restored (empty) average.
    assert_eq!(rows[0]["baseline"], rows[1]["baseline"], "{m:?}");
    // ... and sampled from the restored (initial) weights: KL to the reference ~ 0 again.
    assert!(rows[1]["kl"].as_f64().unwrap().abs() < 1e-4, "{m:?}");
    std::fs::remove_dir_all(root).ok();
}

/// dialogue-rl (its own loop, not the online session) has the same wire: a length bound its
/// first iteration breaks stops it with its initial weights (and the separate user model's)
/// restored.
#[test]
fn dialogue_rl_stops_at_its_tripwire_with_the_last_good_weights() {
    let root = scratch("faults-dialogue");
    let data = root.join("data");
    common::dialogue_testbed(&data);
    let toml = root.join("run.toml");
    std::fs::write(
        &toml,
        format!(
            "model = {:?}\ntask = \"dialogue\"\ntrain_file = {:?}\neval_file = {:?}\nuser_model = \"separate\"\n\
             iterations = 3\nprompts_per_step = 2\nk = 2\nsupervised_every = 1\nsnapshot_every = 1\neval_every = 0\n\
             eval_games = 4\neval_conversations = 2\nsave_every = 1\nseed = 5\n\
             [turns]\nturn_limit = 3\nmax_turn_tokens = 6\n[optim]\nlr = 0.01\n[tripwire]\nmax_length = 0.5\n",
            data.join("init"),
            data.join("logs.jsonl"),
            data.join("eval_logs.jsonl"),
        ),
    )
    .unwrap();
    let dir = root.join("run");
    let (ok, err) = run("dialogue-rl", &toml, &dir, &[], None);
    assert!(ok, "{err}");
    let trip = tripwire_record(&dir);
    assert_eq!(trip["action"], "stopped");
    assert!(
        trip["reason"].as_str().unwrap().contains("max_length 0.5"),
        "{trip}"
    );
    let init = bytes(data.join("init/model.safetensors"));
    assert!(bytes(dir.join("model/model.safetensors")) == init);
    assert!(bytes(dir.join("user_model/model.safetensors")) == init);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    // Stopped in its first iteration: the start's evaluation is the restored model's.
    let evals = summary["evals"].as_array().unwrap();
    assert_eq!(evals.len(), 1);
    assert_eq!(
        (
            evals[0]["iteration"].as_u64(),
            summary["iterations"].as_u64()
        ),
        (Some(0), Some(0))
    );
    std::fs::remove_dir_all(root).ok();
}
