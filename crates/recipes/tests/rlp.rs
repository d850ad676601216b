//! `rlhf rlp` end to end on the tiny model with a tiny budget: every stage runs and reports, a
//! `--resume` of a finished pipeline skips every stage and reproduces the report exactly, and a
//! method that is not online is refused by name.

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_methods::rlp::Variant;
use rlhf_recipes::rlp::{run, RlpConfig};
use rlhf_rl::policy::{fresh_tiny, TrainableLm};

fn setup(root: &Path) -> RlpConfig {
    let task = task_by_name("sentiment", 0).unwrap();
    let lm = fresh_tiny(tokenizer_for(task.as_ref()), 1, &Device::Cpu).unwrap();
    lm.save(&root.join("sft")).unwrap();
    let mut w = lm.snapshot().unwrap();
    rlhf_rl::reward::add_head(&mut w, lm.config.hidden_size, 2, &Device::Cpu).unwrap();
    let rm = TrainableLm {
        params: rlhf_lm::llama::Trainable::new(&w).unwrap(),
        ..lm
    };
    rlhf_rl::reward::save(&rm, None, &root.join("rm")).unwrap();
    let demos = task.demonstrations();
    let pairs: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({"prompt": demos[i].0, "chosen": format!(" {}", demos[i].1),
                "rejected": format!(" {}", demos[i + 20].1)})
            .to_string()
        })
        .collect();
    std::fs::write(root.join("prefs.jsonl"), pairs.join("\n")).unwrap();
    RlpConfig {
        out_dir: root.join("out"),
        sft_model: root.join("sft"),
        rm_model: root.join("rm"),
        prefs_file: root.join("prefs.jsonl"),
        policy_method: "rloo".into(),
        policy_steps: 1,
        policy_sets: vec!["prompts_per_step=2".into(), "rollout.k=2".into()],
        unlabelled_prompts: 4,
        samples_per_prompt: 4,
        rm_epochs: 1,
        rm_batch_size: 4,
        gamma: 0.25,
        eval_prompts: 6,
        ..RlpConfig::default()
    }
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-recipes-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn rlp_pipeline_runs_every_stage_and_resumes_finished() {
    rlhf_lm::set_threads(1);
    let root = scratch("rlp");
    let cfg = setup(&root);
    let report = run(&cfg, false, &Device::Cpu).unwrap();
    let names: Vec<&str> = report.rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["sft", "rloo", "rlp-uml", "rlp-spg"]);
    for r in &report.rows {
        assert!((0.0..=1.0).contains(&r.report.winrate));
    }
    // r_φ, r̂_UML, r̂_SPG, each on SFT and on policy samples.
    let acc: Vec<(&str, &str)> = report
        .rm_accuracy
        .iter()
        .map(|a| (a.reward_model.as_str(), a.samples.as_str()))
        .collect();
    assert_eq!(
        acc,
        [
            ("rm", "sft"),
            ("rm", "policy"),
            ("rm-uml", "sft"),
            ("rm-uml", "policy"),
            ("rm-spg", "sft"),
            ("rm-spg", "policy")
        ]
    );
    assert_eq!(report.refreshes.len(), 2);
    assert_eq!(report.refreshes[0].variant, Variant::Uml);
    assert!(report.refreshes[0].view_pairs > 0 && report.refreshes[0].human_pairs == 8);
    assert_eq!(report.spg_ablation.len(), 3);
    // Select-all keeps at least what SPG keeps.
    assert!(report.spg_ablation[1].stats.pairs >= report.spg_ablation[0].stats.pairs);
    let samples = rlhf_rl::policy_samples::read_groups(&cfg.out_dir.join("samples.jsonl")).unwrap();
    assert_eq!(samples.len(), 4);
    assert!(samples.iter().all(|g| g.samples.len() == 4));
    for d in ["policy", "rm-uml", "rm-spg", "policy-uml", "policy-spg"] {
        assert!(
            cfg.out_dir.join(d).join("model/config.json").exists(),
            "{d}"
        );
    }
    let first = std::fs::read_to_string(cfg.out_dir.join("report.json")).unwrap();
    // A finished pipeline resumed: every stage is skipped and the report is the same.
    let policy_weights = std::fs::read(cfg.out_dir.join("policy/model/model.safetensors")).unwrap();
    run(&cfg, true, &Device::Cpu).unwrap();
    assert_eq!(
        first,
        std::fs::read_to_string(cfg.out_dir.join("report.json")).unwrap()
    );
    assert_eq!(
        policy_weights,
        std::fs::read(cfg.out_dir.join("policy/model/model.safetensors")).unwrap()
    );
}

#[test]
fn rlp_pipeline_refuses_a_method_that_is_not_online() {
    let root = scratch("rlp-bad");
    let cfg = RlpConfig {
        policy_method: "dpo".into(),
        ..setup(&root)
    };
    let e = run(&cfg, false, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("dpo") && e.contains("online"), "{e}");
    let e = run(
        &RlpConfig {
            variants: vec![],
            ..setup(&root)
        },
        false,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("variants"), "{e}");
}
