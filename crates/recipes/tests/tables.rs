//! The over-seeds statistics the ReST and RLP tables print, by hand.

use rlhf_recipes::compare::mean_ci;

#[test]
fn mean_and_student_t_half_width_over_seeds() {
    // mean 0.85, sample sd 0.05, t(0.975, 2 df) = 4.303: half-width 4.303 * 0.05 / sqrt(3)
    let (m, h) = mean_ci(&[0.8, 0.85, 0.9]);
    assert!((m - 0.85).abs() < 1e-12);
    assert!((h - 4.303 * 0.05 / 3f64.sqrt()).abs() < 1e-9, "{h}");
    // two seeds: t(0.975, 1 df) = 12.706, sd = |a - b| / sqrt(2)
    let (m, h) = mean_ci(&[0.2, 0.4]);
    assert!((m - 0.3).abs() < 1e-12);
    assert!(
        (h - 12.706 * (0.2 / 2f64.sqrt()) / 2f64.sqrt()).abs() < 1e-9,
        "{h}"
    );
    // one seed: no interval
    let (m, h) = mean_ci(&[0.7]);
    assert!(m == 0.7 && h.is_nan());
}

use rlhf_methods::rest::{Distribution, RestSummary, StageRecord, Validation};
use rlhf_recipes::rest_table::{format_markdown, RestTable, RestTableConfig, SeedResult};

fn v(gold: f64, reward: f64) -> Validation {
    Validation {
        reward,
        gold: Some(gold),
        length: 9.0,
    }
}

fn stage(improve: Option<usize>, samples: usize, kept: usize, val: Validation) -> StageRecord {
    StageRecord {
        grow: usize::from(improve.is_some()),
        improve,
        threshold: improve.map(|_| 0.7),
        kept,
        kept_sources: 1,
        kept_reward: Distribution::of(&[]),
        dataset_rows: 10,
        lr: 0.0,
        optimizer_steps: 0,
        best_step: 0,
        validation: Some(val),
        samples,
        seconds: 10.0,
        model: "m".into(),
    }
}

fn seed(s: u64, g0: f64, g1: f64, kept: usize, rloo_gold: f64) -> SeedResult {
    SeedResult {
        seed: s,
        rest: RestSummary {
            grows: Vec::new(),
            stages: vec![
                stage(None, 0, 0, v(0.5, 0.8)),
                stage(Some(0), 40, kept, v(g1, 0.9)),
            ],
            model: "m".into(),
            samples: 40,
            seconds: 30.0,
            eval: None,
        },
        rest_sampled: vec![v(g0, 0.6), v(g1 - 0.1, 0.7)],
        rloo_validation: v(rloo_gold, 1.5),
        rloo_sampled: v(rloo_gold - 0.1, 1.4),
        rloo_samples: 40,
        rloo_seconds: 20.0,
        rloo_eval: None,
    }
}

#[test]
fn the_rest_table_reports_each_stage_over_seeds() {
    let t = RestTable {
        config: RestTableConfig {
            seeds: vec![0, 1],
            ..RestTableConfig::default()
        },
        seeds: vec![seed(0, 0.4, 0.6, 6, 0.3), seed(1, 0.4, 0.8, 8, 0.5)],
    };
    let md = format_markdown(&t);
    // Stage G=1 I=0: greedy gold 0.6 and 0.8 -> mean 0.7, half-width 12.706 * 0.1414 / 1.4142
    // = 1.2706; proxy 0.9 both seeds -> 0.9 ± 0; sampled gold 0.5 / 0.7 -> 0.6 ± 1.2706, sampled proxy 0.7 both; kept
    // rows (6 + 8) / 2 = 7; time: the BC stage's 10 s + this stage's 10 s.
    let row = md
        .lines()
        .find(|l| l.starts_with("| ReST G=1 I=0"))
        .unwrap_or_else(|| panic!("{md}"));
    assert_eq!(
        row,
        "| ReST G=1 I=0 (τ = 0.7) | 40 | 7 | 0.7000 ± 1.2706 | 0.9000 ± 0.0000 | 0.6000 ± 1.2706 | 0.7000 ± 0.0000 | 20 |"
    );
    // RLOO: greedy gold 0.3 / 0.5 -> 0.4 ± 1.2706, sampled gold 0.2 / 0.4 -> 0.3 ± 1.2706
    let rloo = md.lines().find(|l| l.starts_with("| online RLOO")).unwrap();
    assert_eq!(
        rloo,
        "| online RLOO k=4 (equal samples) | 40 | - | 0.4000 ± 1.2706 | 1.5000 ± 0.0000 | 0.3000 ± 1.2706 | 1.4000 ± 0.0000 | 20 |"
    );
    assert!(
        md.contains("| 1 | 0.500 / 0.800 | 0.800 / 0.900 | 0.500 / 1.500 |"),
        "{md}"
    );
}

use rlhf_methods::dialogue_rl::DialogueEval;
use rlhf_recipes::dialogue::{curves, episodes_to_reach, rows, VariantRun};

fn ev(iteration: u64, real: u64, success: f64, turns: f64, nll: Option<f64>) -> DialogueEval {
    DialogueEval {
        iteration,
        real_episodes: real,
        imagined_episodes: 0,
        games: 200,
        success_rate: success,
        mean_turns: turns,
        mean_return: success - 0.1 * turns,
        user_nll: nll,
        user_answer_accuracy: nll.map(|_| 0.9),
    }
}

#[test]
fn dialogue_rows_curves_and_sample_efficiency_by_hand() {
    let run = |variant: &str, seed, evals| VariantRun {
        variant: variant.into(),
        seed,
        evals,
        seconds: 10.0,
        train_won: Some(0.5),
    };
    let runs = vec![
        run(
            "model-free",
            0,
            vec![
                ev(0, 0, 0.3, 5.0, None),
                ev(10, 640, 0.5, 4.5, None),
                ev(20, 1280, 0.7, 4.0, None),
            ],
        ),
        run(
            "model-free",
            1,
            vec![
                ev(0, 0, 0.3, 5.0, None),
                ev(10, 640, 0.7, 4.2, None),
                ev(20, 1280, 0.8, 3.8, None),
            ],
        ),
        run(
            "model-based",
            0,
            vec![
                ev(0, 0, 0.3, 5.0, Some(0.1)),
                ev(20, 0, 0.5, 4.4, Some(0.2)),
            ],
        ),
    ];
    let r = rows(&runs);
    let names: Vec<&str> = r.iter().map(|x| x.variant.as_str()).collect();
    assert_eq!(names, ["sft", "model-based", "model-free"]);
    // sft: one start evaluation per seed (seeds 0 and 1), both 0.3.
    assert_eq!(r[0].seeds, 2);
    assert!((r[0].success - 0.3).abs() < 1e-12 && r[0].success_ci95.abs() < 1e-12);
    // model-free's final evaluations: 0.7 and 0.8; half-width 12.706 * (0.1 / sqrt 2) / sqrt 2.
    let mf = &r[2];
    assert!((mf.success - 0.75).abs() < 1e-12);
    assert!(
        (mf.success_ci95 - 12.706 * 0.05).abs() < 1e-9,
        "{}",
        mf.success_ci95
    );
    assert!((mf.turns - 3.9).abs() < 1e-12 && (mf.real_episodes - 1280.0).abs() < 1e-12);
    assert!(mf.user_nll.is_none());
    assert_eq!(r[1].user_nll, Some(0.2));
    // The first evaluation at or above 0.6: seed 0 at 1280 real episodes, seed 1 at 640.
    assert_eq!(episodes_to_reach(&runs[0].evals, 0.6), Some(1280));
    assert_eq!(episodes_to_reach(&runs[1].evals, 0.6), Some(640));
    assert_eq!(episodes_to_reach(&runs[2].evals, 0.6), None);
    // Curves: model-free's mean over both seeds at iterations 0, 10, 20.
    let c = curves(&runs);
    let mf = c.iter().find(|(v, _)| v == "model-free").unwrap();
    let want = [(0, 0.3), (10, 0.6), (20, 0.75)];
    for ((it, y), (wi, wy)) in mf.1.iter().zip(want) {
        assert!(*it == wi && (y - wy).abs() < 1e-12, "{:?}", mf.1);
    }
}

/// Each variant's final success minus model-based's on the same seeds: model-free 0.7 / 0.8
/// against 0.5 / 0.5 -> differences 0.2, 0.3: mean 0.25, se 0.05, t = 5 on 1 df,
/// p = 1 - (2/pi) atan(5); half-width 12.706 x 0.05. A variant on one shared seed is not tested.
#[test]
fn dialogue_paired_tests_against_model_based_by_hand() {
    let run = |variant: &str, seed, last: f64| VariantRun {
        variant: variant.into(),
        seed,
        evals: vec![ev(0, 0, 0.3, 5.0, None), ev(20, 640, last, 4.0, None)],
        seconds: 1.0,
        train_won: None,
    };
    let runs = vec![
        run("model-based", 0, 0.5),
        run("model-based", 1, 0.5),
        run("model-free", 0, 0.7),
        run("model-free", 1, 0.8),
        run("dyna", 0, 0.9),
    ];
    let md = rlhf_recipes::dialogue::paired_markdown(&runs);
    let p = 1.0 - 2.0 / std::f64::consts::PI * 5f64.atan();
    let want = format!(
        "| model-free | 2 | +0.250 | [{:+.3}, {:+.3}] | {p:.4} | {p:.4} |",
        0.25 - 12.706 * 0.05,
        0.25 + 12.706 * 0.05
    );
    assert!(md.lines().any(|l| l == want), "{want}\n{md}");
    assert!(!md.contains("| dyna"), "{md}");
    assert!(rlhf_recipes::dialogue::paired_markdown(&runs[..3]).is_empty());
}

/// ReST's and RLOO's final win-rates paired by seed: 0.7 - 0.6 and 0.9 - 0.6 -> mean 0.2,
/// sd 0.1414, se 0.1, t = 2 on 1 df, p = 1 - (2/pi) atan(2).
#[test]
fn rest_table_pairs_final_winrates_by_seed() {
    let eval = |w: f64| rlhf_rl::eval::EvalReport {
        winrate: w,
        winrate_ci95: [w - 0.05, w + 0.05],
        judge: "gold".into(),
        gold_mean: None,
        reference_gold_mean: None,
        proxy_mean: None,
        kl_to_ref: Some(1.0),
        mean_len: 5.0,
        n: 100,
    };
    let mut a = seed(0, 0.4, 0.6, 6, 0.3);
    let mut b = seed(1, 0.4, 0.8, 8, 0.5);
    a.rest.eval = Some(eval(0.7));
    a.rloo_eval = Some(eval(0.6));
    b.rest.eval = Some(eval(0.9));
    b.rloo_eval = Some(eval(0.6));
    let t = RestTable {
        config: RestTableConfig {
            seeds: vec![0, 1],
            ..RestTableConfig::default()
        },
        seeds: vec![a, b],
    };
    let md = format_markdown(&t);
    let p = 1.0 - 2.0 / std::f64::consts::PI * 2f64.atan();
    let want = format!(
        "ReST minus RLOO, paired over the 2 seeds: +0.200 (95% interval [{:+.3}, {:+.3}], paired t-test p = {p:.4}).",
        0.2 - 12.706 * 0.1,
        0.2 + 12.706 * 0.1
    );
    assert!(md.contains(&want), "{want}\n{md}");
}
