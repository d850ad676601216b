//! The main job on the testbed meets the bar the testbed design sets (measured, not asserted by
//! hand): SFT beats the untrained model on gold, the reward model is clearly above chance on clean
//! labels and near the noise ceiling on noisy ones, and best-of-16 beats SFT.

use candle_core::Device;
use rlhf_recipes::quickstart::{format_table, run, QuickstartConfig};

#[test]
fn quickstart_on_sentiment() {
    rlhf_lm::set_threads(1);
    let out = std::env::temp_dir().join(format!("rlhf-quickstart-{}", std::process::id()));
    let cfg = QuickstartConfig {
        out_dir: out.clone(),
        ..QuickstartConfig::default()
    };
    let report = run(&cfg, &Device::Cpu).unwrap();
    println!("{}", format_table(&report));
    let row = |name: &str| {
        report
            .rows
            .iter()
            .find(|r| r.name.starts_with(name))
            .unwrap()
            .report
            .clone()
    };
    // The untrained model almost never beats SFT.
    assert!(
        row("untrained").winrate < 0.1,
        "untrained vs SFT: {}",
        row("untrained").winrate
    );
    let rm_noisy = report.rm.eval_accuracy.unwrap();
    assert!(
        report.rm_clean_accuracy > 0.65,
        "clean accuracy {}",
        report.rm_clean_accuracy
    );
    // Held-out accuracy on ~200 noisy pairs has a standard error of about 0.035: over seeds 0-2
    // and two builds whose kernels round differently it ranged 0.535-0.593 against ceilings of
    // 0.644-0.660, so the bound sits three standard errors below the ceiling.
    assert!(
        rm_noisy > report.noisy_label_ceiling - 0.12,
        "noisy {rm_noisy} vs ceiling {}",
        report.noisy_label_ceiling
    );
    let bon = row("best-of-16");
    assert!(
        bon.winrate_ci95[0] > 0.5,
        "best-of-16 vs SFT: {} {:?}",
        bon.winrate,
        bon.winrate_ci95
    );
    // RLOO (k = 4) on the reward model beats SFT on gold at a bounded KL.
    let rloo = row("rloo");
    assert!(
        rloo.winrate_ci95[0] > 0.5,
        "rloo vs SFT: {} {:?}",
        rloo.winrate,
        rloo.winrate_ci95
    );
    assert!(
        rloo.kl_to_ref.unwrap() < 10.0,
        "rloo KL {:?}",
        rloo.kl_to_ref
    );
    assert!(out.join("report.json").exists() && out.join("eval/sft.json").exists());
    std::fs::remove_dir_all(out).ok();
}
