//! Evaluation: the win-rate statistic by hand, and `run_eval` end to end on the testbed.

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_rl::best_of_n::kl_bound;
use rlhf_rl::eval::{run_eval, winrate, EvalConfig};
use rlhf_rl::policy::fresh_tiny;

#[test]
fn winrate_and_interval_by_hand() {
    // outcomes [win, tie, loss, win] -> 0.625; sample variance 0.6875 / 3; half-width
    // 1.96 * sqrt(0.229167 / 4) = 0.469140.
    let (w, ci) = winrate(&[1.0, 2.0, 3.0, 4.0], &[0.0, 2.0, 5.0, 1.0]);
    assert!((w - 0.625).abs() < 1e-12);
    assert!((ci[0] - 0.155_860).abs() < 1e-5, "{ci:?}");
    assert_eq!(ci[1], 1.0, "clamped");
    // KL(best-of-n || base) bound: log 16 - 15/16.
    assert!((kl_bound(16) - (16f64.ln() - 15.0 / 16.0)).abs() < 1e-12);
    assert_eq!(kl_bound(1), 0.0);
}

#[test]
fn eval_writes_the_report_fields() {
    let dir = std::env::temp_dir().join(format!("rlhf-eval-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let task = task_by_name("sentiment", 0).unwrap();
    fresh_tiny(tokenizer_for(task.as_ref()), 1, &Device::Cpu)
        .unwrap()
        .save(&dir.join("policy"))
        .unwrap();
    let cfg = EvalConfig {
        policy: dir.join("policy"),
        reference: Some(dir.join("policy")),
        task: Some("sentiment".into()),
        max_prompts: 12,
        max_new_tokens: 6,
        output: dir.join("out/eval.json"),
        ..EvalConfig::default()
    };
    let report = run_eval(&cfg, &Device::Cpu).unwrap();
    assert_eq!(report.n, 12);
    assert_eq!(report.judge, "gold");
    assert_eq!(
        report.kl_to_ref,
        Some(0.0),
        "a policy has zero KL to itself"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/eval.json")).unwrap()).unwrap();
    for field in [
        "winrate",
        "winrate_ci95",
        "gold_mean",
        "proxy_mean",
        "kl_to_ref",
        "mean_len",
        "n",
    ] {
        assert!(v.get(field).is_some(), "eval.json lacks `{field}`");
    }
    let w = v["winrate"].as_f64().unwrap();
    let ci = v["winrate_ci95"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() <= w && w <= ci[1].as_f64().unwrap());
    // Deterministic: the same config gives the same report.
    assert_eq!(run_eval(&cfg, &Device::Cpu).unwrap(), report);
}
