//! `rlhf rlp-rm` (RLP's reward-model refresh) on the tiny model: SPG's synthetic pairs on
//! hand-made samples, UML's view pairs, determinism of whole runs, and clear configuration errors.

mod common;
use common::{metrics, scratch, tiny_lm, CPU};

use std::path::{Path, PathBuf};

use rlhf_data::testbed::task_by_name;
use rlhf_methods::rlp::{self, RlpRmConfig, Variant};
use rlhf_rl::fit::FitConfig;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::reward::{add_head, RewardModel};
use rlhf_rl::spg::SampleGroup;
use rlhf_rl::trainer::OptimConfig;

const P: [&str; 4] = [
    "review : the plot was",
    "review : the acting in this film was",
    "review : i thought the music was",
    "review : the ending of the movie felt",
];

/// The tiny model with a reward head, saved at `<root>/rm`.
fn tiny_rm(root: &Path) -> PathBuf {
    let lm = tiny_lm(2);
    let mut w = lm.snapshot().unwrap();
    add_head(&mut w, lm.config.hidden_size, 5, &CPU).unwrap();
    let lm = TrainableLm {
        params: rlhf_lm::llama::Trainable::new(&w).unwrap(),
        ..lm
    };
    let dir = root.join("rm");
    rlhf_rl::reward::save(&lm, None, &dir).unwrap();
    dir
}

fn groups() -> Vec<SampleGroup> {
    let g = |p: &str, s: &[&str]| SampleGroup {
        prompt: p.into(),
        samples: s.iter().map(|x| x.to_string()).collect(),
    };
    vec![
        // positive {0, 1}, negative {2}, neutral {3}: c = 0.5, kept at γ = 0.5.
        g(P[0], &["great .", "good .", "dull .", "long ."]),
        // all positive: every sample equivalent, skipped.
        g(P[1], &["great .", "fun .", "good .", "superb ."]),
        // negative {1, 3} is the largest: c = 0.5, kept.
        g(P[2], &["great .", "dull .", "long .", "bad ."]),
        // three singletons: c = 1/3, below γ.
        g(P[3], &["great .", "dull .", "long ."]),
    ]
}

fn setup(root: &Path) -> RlpRmConfig {
    let rm = tiny_rm(root);
    let pairs: Vec<String> = [
        (P[0], " really good .", " dull ."),
        (P[1], " charming .", " boring ."),
        (P[2], " great , and i loved it .", " weak ."),
        (P[3], " moving .", " awful ."),
        (P[0], " fun .", " messy ."),
        (P[1], " clever .", " bland ."),
    ]
    .iter()
    .map(|(p, c, r)| serde_json::json!({"prompt": p, "chosen": c, "rejected": r}).to_string())
    .collect();
    std::fs::write(root.join("prefs.jsonl"), pairs.join("\n")).unwrap();
    rlhf_rl::policy_samples::write_groups(&root.join("samples.jsonl"), &groups()).unwrap();
    RlpRmConfig {
        model: rm,
        train_file: root.join("prefs.jsonl"),
        samples_file: Some(root.join("samples.jsonl")),
        task: Some("sentiment".into()),
        z_dim: 4,
        head_width: 8,
        views_per_prompt: 2,
        fit: FitConfig {
            output_dir: root.join("out"),
            epochs: 2,
            batch_size: 4,
            max_len: 48,
            save_every: 0,
            log_every: 1,
            seed: 3,
            optim: OptimConfig {
                lr: 1e-3,
                ..OptimConfig::default()
            },
            ..FitConfig::default()
        },
        ..RlpRmConfig::default()
    }
}

/// SPG's pairs on hand-made samples: which prompts are kept, and that chosen is the best-scored
/// member of the largest cluster under the reward model being refreshed.
#[test]
fn spg_pairs_on_hand_made_samples() {
    let root = scratch("rlp-spg");
    let cfg = RlpRmConfig {
        variant: Variant::Spg,
        ..setup(&root)
    };
    let rm = RewardModel::load(&cfg.model, &CPU).unwrap();
    let lm = TrainableLm::load(&cfg.model, &CPU).unwrap();
    let encode = |p: &str, c: &str| -> rlhf_train::Result<(Vec<u32>, Vec<u32>)> {
        Ok(lm.encode(p, c, true, 48)?)
    };
    let task = task_by_name("sentiment", 0).unwrap();
    let (pairs, stats) =
        rlp::synthetic_pairs(&cfg, &groups(), &rm, &encode, Some(task.as_ref())).unwrap();
    assert_eq!(
        (
            stats.prompts,
            stats.pairs,
            stats.all_equivalent,
            stats.low_confidence,
            stats.ties
        ),
        (4, 2, 1, 1, 0)
    );
    // Mean confidence (0.5 + 1 + 0.5 + 1/3) / 4; clusters (3 + 1 + 3 + 3) / 4.
    assert!((stats.mean_confidence.unwrap() - (2.0 + 1.0 / 3.0) / 4.0).abs() < 1e-12);
    assert!((stats.mean_clusters.unwrap() - 2.5).abs() < 1e-12);
    let score = |p: &str, c: &str| {
        rm.score_raw(&[lm.encode(p, c, true, 48).unwrap()], 1)
            .unwrap()[0]
    };
    fn pick<'a>(better: bool, a: &'a str, b: &'a str) -> &'a str {
        if better {
            b
        } else {
            a
        }
    }
    let best = |p: &str, a: &'static str, b: &'static str| pick(score(p, b) > score(p, a), a, b);
    assert_eq!(pairs[0].prompt, P[0]);
    assert_eq!(pairs[0].chosen, best(P[0], "great .", "good ."));
    assert!(["dull .", "long ."].contains(&pairs[0].rejected.as_str()));
    assert_eq!(pairs[1].prompt, P[2]);
    assert_eq!(pairs[1].chosen, best(P[2], "dull .", "bad ."));
    assert!(["great .", "long ."].contains(&pairs[1].rejected.as_str()));
    // Gold agreement is reported, in [0, 1], counting what gold says of these two pairs.
    let g = |p: &str, a: &str, b: &str| {
        let (x, y) = (task.gold(p, a), task.gold(p, b));
        if x > y {
            1.0
        } else if x == y {
            0.5
        } else {
            0.0
        }
    };
    let want = (g(P[0], &pairs[0].chosen, &pairs[0].rejected)
        + g(P[2], &pairs[1].chosen, &pairs[1].rejected))
        / 2.0;
    assert_eq!(stats.gold_agreement, Some(want));
    // γ = 0 (select-all) adds the low-confidence prompt; the all-equivalent one stays out.
    let all = RlpRmConfig {
        gamma: 0.0,
        ..cfg.clone()
    };
    let (_, s0) = rlp::synthetic_pairs(&all, &groups(), &rm, &encode, Some(task.as_ref())).unwrap();
    assert_eq!((s0.pairs, s0.all_equivalent, s0.low_confidence), (3, 1, 0));
    // Reward-ranked: a pair for every prompt with two different texts.
    let rr = RlpRmConfig {
        pairing: rlhf_rl::spg::Pairing::RewardRanked,
        ..cfg.clone()
    };
    let (p2, s2) = rlp::synthetic_pairs(&rr, &groups(), &rm, &encode, Some(task.as_ref())).unwrap();
    assert_eq!((s2.pairs, s2.mean_confidence), (4, None));
    for (pair, group) in p2.iter().zip(groups()) {
        let scores: Vec<f64> = group
            .samples
            .iter()
            .map(|s| score(&group.prompt, s))
            .collect();
        let max = scores.iter().cloned().fold(f64::MIN, f64::max);
        assert_eq!(score(&group.prompt, &pair.chosen), max);
    }
    // The whole run trains on the 6 human + 2 synthetic pairs and writes them.
    let summary = rlp::run(&cfg, false, &CPU).unwrap();
    assert_eq!(
        (
            summary.human_pairs,
            summary.synthetic_pairs,
            summary.view_pairs
        ),
        (6, 2, 0)
    );
    assert_eq!(summary.steps, 4); // 8 pairs, batches of 4, 2 epochs
    let written = std::fs::read_to_string(root.join("out/spg_pairs.jsonl")).unwrap();
    assert_eq!(written.lines().count(), 2);
    RewardModel::load(&summary.model, &CPU).unwrap();
}

/// UML: view pairs of distinct texts, the MIB metrics logged, a saved model without the MIB
/// heads, and the same numbers from the same seed.
#[test]
fn uml_runs_are_deterministic_and_save_a_plain_reward_model() {
    let root = scratch("rlp-uml");
    let cfg = setup(&root);
    let views = rlp::view_pairs(&groups(), 2, 3);
    assert_eq!(views.len(), 8);
    for &(g, i, j) in &views {
        assert!(i < j && groups()[g].samples[i] != groups()[g].samples[j]);
    }
    assert_eq!(views, rlp::view_pairs(&groups(), 2, 3));
    let a = rlp::run(&cfg, false, &CPU).unwrap();
    assert_eq!((a.human_pairs, a.synthetic_pairs, a.view_pairs), (6, 0, 8));
    assert_eq!(a.steps, 8); // 14 items, batches of 4 -> 4 per epoch, 2 epochs
    assert!(a.mib_mi.is_some_and(f64::is_finite) && a.mib_skl.is_some_and(|s| s >= 0.0));
    let m1 = metrics(&root.join("out/metrics.jsonl"));
    assert!(m1.iter().any(|r| r.get("mib/mi").is_some()));
    let w1 = std::fs::read(root.join("out/model/model.safetensors")).unwrap();
    let saved = rlhf_lm::Pretrained::load(&root.join("out/model"), &CPU).unwrap();
    assert!(saved.weights.keys().all(|k| !k.starts_with("mib.")));
    assert!(saved.weights.contains_key("score.weight"));
    let b = rlp::run(&cfg, false, &CPU).unwrap();
    assert_eq!(m1, metrics(&root.join("out/metrics.jsonl")));
    assert_eq!(
        w1,
        std::fs::read(root.join("out/model/model.safetensors")).unwrap()
    );
    assert_eq!(a.train_accuracy, b.train_accuracy);
    // λ = 0 trains the same trunk as BT alone would: the MIB term changes the weights.
    let plain = RlpRmConfig {
        lambda: 0.0,
        ..cfg.clone()
    };
    rlp::run(&plain, false, &CPU).unwrap();
    assert_ne!(
        w1,
        std::fs::read(root.join("out/model/model.safetensors")).unwrap()
    );
}

#[test]
fn bad_configurations_are_clear_errors() {
    let root = scratch("rlp-bad");
    let cfg = setup(&root);
    let err = |c: RlpRmConfig| rlp::run(&c, false, &CPU).unwrap_err().to_string();
    assert!(err(RlpRmConfig {
        samples_file: None,
        ..cfg.clone()
    })
    .contains("samples_file"));
    assert!(err(RlpRmConfig {
        policy: Some(root.join("rm")),
        ..cfg.clone()
    })
    .contains("not both"));
    assert!(err(RlpRmConfig {
        gamma: 1.5,
        ..cfg.clone()
    })
    .contains("gamma"));
    assert!(err(RlpRmConfig {
        samples_per_prompt: 1,
        ..cfg.clone()
    })
    .contains("samples_per_prompt"));
    assert!(err(RlpRmConfig {
        lambda: f64::NAN,
        ..cfg.clone()
    })
    .contains("lambda"));
    std::fs::write(
        root.join("bad.jsonl"),
        "{\"prompt\": \"x\", \"samples\": [\"a\"]}\n{\"prompt\": 3}\n",
    )
    .unwrap();
    let e = err(RlpRmConfig {
        samples_file: Some(root.join("bad.jsonl")),
        ..cfg.clone()
    });
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");
    // SPG with the task's equivalence but no task.
    let e = err(RlpRmConfig {
        variant: Variant::Spg,
        task: None,
        ..cfg.clone()
    });
    assert!(e.contains("task"), "{e}");
    // Views need two different samples somewhere.
    rlhf_rl::policy_samples::write_groups(
        &root.join("same.jsonl"),
        &[SampleGroup {
            prompt: P[0].into(),
            samples: vec!["good .".into(), "good .".into()],
        }],
    )
    .unwrap();
    let e = err(RlpRmConfig {
        samples_file: Some(root.join("same.jsonl")),
        ..cfg
    });
    assert!(e.contains("two different samples"), "{e}");
}

/// UML with LoRA: the trunk trains adapters, the scalar and MIB heads train whole, and the saved
/// reward model is a peft adapter (SEQ_CLS, with its head, without the MIB heads) that loads as a
/// reward model.
#[test]
fn uml_with_lora_saves_a_reward_model_adapter() {
    let root = scratch("rlp-uml-lora");
    let mut cfg = setup(&root);
    cfg.fit.lora = rlhf_lm::lora::LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: rlhf_lm::lora::TargetModules::Preset("all-linear".into()),
        ..Default::default()
    };
    let a = rlp::run(&cfg, false, &CPU).unwrap();
    assert!(a.mib_mi.is_some_and(f64::is_finite));
    let dir = root.join("out/model");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(v["task_type"], "SEQ_CLS");
    let raw = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &CPU).unwrap();
    assert!(raw.contains_key("base_model.model.score.weight"));
    assert!(raw.keys().all(|k| !k.contains("mib.")), "{:?}", raw.keys());
    let rm = rlhf_rl::reward::RewardModel::load(&dir, &CPU).unwrap();
    let s = rm.score_raw(&[(vec![1, 10, 11], vec![12, 2])], 1).unwrap();
    assert!(s[0].is_finite());
}
