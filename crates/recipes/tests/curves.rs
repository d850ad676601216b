//! The statistics and curve reports of the comparison tables, against hand-computed values: the
//! Student-t tail, the paired t-test, Holm's adjustment, first crossings (samples to a win-rate,
//! win-rate at a KL), curves and monitors read from a run's metrics, and the SVG figures.

use rlhf_recipes::curves::{at_first_crossing, mean_curve, read_run, CurvePoint};
use rlhf_recipes::plot::{write_svg, Panel, Series};
use rlhf_recipes::stats::{holm, paired_t, t_two_sided_p};
use rlhf_rl::eval::EvalReport;

fn close(a: f64, b: f64, tol: f64) {
    assert!((a - b).abs() <= tol, "{a} vs {b}");
}

/// The closed forms at hand-computable points, and the table's own 97.5% quantiles.
#[test]
fn student_t_tail_matches_closed_forms_and_the_quantile_table() {
    // df 1 (Cauchy): P(|T| >= 1) = 1 - (2/pi)(pi/4) = 0.5.
    close(t_two_sided_p(1.0, 1), 0.5, 1e-12);
    // df 2: P(|T| < t) = t / sqrt(t^2 + 2); t = 1: 1 - 1/sqrt(3).
    close(t_two_sided_p(1.0, 2), 1.0 - 1.0 / 3f64.sqrt(), 1e-12);
    // df 3, t = sqrt(3): theta = pi/4, A = (2/pi)(pi/4 + 1/2) = 1/2 + 1/pi.
    close(
        t_two_sided_p(3f64.sqrt(), 3),
        0.5 - 1.0 / std::f64::consts::PI,
        1e-12,
    );
    // df 4, t = 2: theta = pi/4, A = sin(pi/4)(1 + (1/2)(1/2)) = (5/4)/sqrt(2).
    close(t_two_sided_p(2.0, 4), 1.0 - 1.25 / 2f64.sqrt(), 1e-12);
    close(t_two_sided_p(-2.0, 4), 1.0 - 1.25 / 2f64.sqrt(), 1e-12);
    close(t_two_sided_p(0.0, 7), 1.0, 1e-12);
    // The 97.5% quantiles of the interval table give p = 0.05 (to the table's 3 decimals).
    for (t, df) in [
        (12.706, 1),
        (4.303, 2),
        (2.776, 4),
        (2.571, 5),
        (2.262, 9),
        (2.228, 10),
    ] {
        close(t_two_sided_p(t, df), 0.05, 2e-4);
    }
}

/// d = (0.2, 0.1, 0.3): mean 0.2, sd 0.1, se 0.1/sqrt(3), t = 2 sqrt(3); df 2 tail by hand.
#[test]
fn paired_t_test_by_hand() {
    let t = paired_t(&[0.8, 0.7, 0.9], &[0.6, 0.6, 0.6]);
    assert_eq!(t.n, 3);
    close(t.diff, 0.2, 1e-12);
    close(t.t, 2.0 * 3f64.sqrt(), 1e-9);
    let x = 2.0 * 3f64.sqrt();
    close(t.p, 1.0 - x / (x * x + 2.0).sqrt(), 1e-9);
    let half = 4.303 * 0.1 / 3f64.sqrt();
    close(t.ci95[0], 0.2 - half, 1e-9);
    close(t.ci95[1], 0.2 + half, 1e-9);
    // Identical non-zero differences: undefined, no p claimed; all zero: no evidence; one seed:
    // no test.
    assert!(paired_t(&[1.0, 2.0], &[0.5, 1.5]).p.is_nan());
    assert_eq!(paired_t(&[0.7, 0.8], &[0.7, 0.8]).p, 1.0);
    assert!(paired_t(&[0.7], &[0.6]).p.is_nan());
}

/// m = 3 tests: sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 0.04).
#[test]
fn holm_adjustment_by_hand() {
    let h = holm(&[0.01, 0.04, 0.03, f64::NAN]);
    close(h[0], 0.03, 1e-12);
    close(h[1], 0.06, 1e-12);
    close(h[2], 0.06, 1e-12);
    assert!(h[3].is_nan());
    close(holm(&[0.6, 0.2])[0], 0.6, 1e-12);
    close(holm(&[0.6, 0.2])[1], 0.4, 1e-12);
}

#[test]
fn first_crossing_interpolates_between_evaluations() {
    // (win-rate, samples): 0.7 lies halfway between 0.6 @100 and 0.8 @200.
    let pts = [(0.5, 0.0), (0.6, 100.0), (0.8, 200.0)];
    close(at_first_crossing(&pts, 0.7).unwrap(), 150.0, 1e-9);
    close(at_first_crossing(&pts, 0.55).unwrap(), 50.0, 1e-9);
    assert_eq!(at_first_crossing(&pts, 0.5), Some(0.0));
    assert_eq!(at_first_crossing(&pts, 0.81), None);
    // The first crossing counts, not a later one: the curve dips and rises again.
    let dip = [(0.5, 0.0), (0.75, 100.0), (0.6, 200.0), (0.9, 300.0)];
    close(at_first_crossing(&dip, 0.7).unwrap(), 80.0, 1e-9);
    // (KL, win-rate): the win-rate where KL first reaches 2.
    let kl = [(0.0, 0.5), (1.0, 0.6), (3.0, 0.9)];
    close(at_first_crossing(&kl, 2.0).unwrap(), 0.75, 1e-12);
}

fn start_eval() -> EvalReport {
    EvalReport {
        winrate: 0.5,
        winrate_ci95: [0.4, 0.6],
        judge: "gold".into(),
        gold_mean: Some(-0.1),
        reference_gold_mean: Some(-0.1),
        proxy_mean: Some(0.2),
        kl_to_ref: Some(0.0),
        mean_len: 6.0,
        n: 10,
    }
}

/// A run's metrics.jsonl: iteration rows become window means of the monitors (perplexity =
/// exp(entropy)), evaluation rows curve points at (pre-samples + iteration x per-iteration).
#[test]
fn curves_and_monitors_from_a_runs_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    let rows = [
        r#"{"step":0,"critic_pretrain/value_loss":0.3}"#,
        r#"{"step":1,"iteration":1.0,"reward_raw":0.1,"gold":0.0,"kl":0.5,"response_length":4.0,"entropy":1.0}"#,
        r#"{"step":2,"iteration":2.0,"reward_raw":0.3,"gold":0.2,"kl":1.5,"response_length":6.0,"entropy":0.0}"#,
        r#"{"step":2,"eval/winrate":0.6,"eval/mean_len":7.0,"eval/gold_mean":0.3,"eval/proxy_mean":0.9,"eval/kl_to_ref":1.2,"eval/iteration":2.0}"#,
        r#"{"step":3,"iteration":3.0,"reward_raw":0.5,"gold":0.4,"kl":2.0,"response_length":8.0,"entropy":2.0}"#,
        r#"{"step":3,"eval/winrate":0.7,"eval/mean_len":8.0,"eval/gold_mean":0.5,"eval/kl_to_ref":2.5,"eval/iteration":3.0}"#,
    ];
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    let (curve, monitors) = read_run(&path, &start_eval(), 128.0, 64.0, 2).unwrap();
    assert_eq!(curve.len(), 3);
    assert_eq!(curve[0], CurvePoint::start(&start_eval()));
    assert_eq!(
        (curve[1].iteration, curve[1].samples),
        (2, 128.0 + 2.0 * 64.0)
    );
    assert_eq!(
        (curve[1].winrate, curve[1].kl, curve[1].proxy),
        (0.6, 1.2, 0.9)
    );
    assert_eq!((curve[2].samples, curve[2].gold), (128.0 + 3.0 * 64.0, 0.5));
    assert!(curve[2].proxy.is_nan());
    assert_eq!(monitors.len(), 2);
    assert_eq!(monitors[0].iteration, 2);
    close(monitors[0].reward_raw, 0.2, 1e-12);
    close(monitors[0].kl, 1.0, 1e-12);
    close(monitors[0].length, 5.0, 1e-12);
    close(monitors[0].perplexity, (1f64.exp() + 1.0) / 2.0, 1e-12);
    assert_eq!(monitors[1].iteration, 3);
    close(monitors[1].perplexity, 2f64.exp(), 1e-12);

    // Seed means, point by point, up to the shorter curve.
    let other: Vec<CurvePoint> = curve
        .iter()
        .map(|p| CurvePoint {
            winrate: p.winrate + 0.1,
            kl: p.kl * 3.0,
            ..*p
        })
        .collect();
    let m = mean_curve(&[&curve, &other[..2]]);
    assert_eq!(m.len(), 2);
    close(m[1].winrate, 0.65, 1e-12);
    close(m[1].kl, 2.4, 1e-12);

    // A malformed line names the file and line.
    std::fs::write(&path, "{\"step\":1}\nnot json\n").unwrap();
    let err = read_run(&path, &start_eval(), 0.0, 1.0, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("metrics.jsonl") && err.contains("line 2"),
        "{err}"
    );
}

/// One marker per finite point of each series, the legend's names, the axes'
/// labels; a non-finite point is left out.
#[test]
fn svg_figure_draws_every_series() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fig.svg");
    let panels = vec![
        Panel {
            title: "gold against KL".into(),
            x_label: "KL here".into(),
            y_label: "win-rate".into(),
            series: vec![
                Series {
                    name: "rloo-k4".into(),
                    points: vec![(0.0, 0.5), (1.0, 0.6), (2.0, 0.7)],
                },
                Series {
                    name: "ppo".into(),
                    points: vec![(0.0, 0.5), (f64::NAN, 0.9), (3.0, 0.8)],
                },
            ],
        },
        Panel {
            title: "second".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series {
                name: "only".into(),
                points: vec![(0.0, 1.0), (1.0, 2.0)],
            }],
        },
    ];
    write_svg(&path, &panels, 2).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg") || svg.contains("<svg"));
    assert_eq!(svg.matches("<circle").count(), 3 + 2 + 2);
    for text in ["rloo-k4", "ppo", "KL here", "gold against KL", "second"] {
        assert!(svg.contains(text), "{text} missing");
    }
}

fn point(iteration: u64, samples: f64, winrate: f64, kl: f64) -> CurvePoint {
    CurvePoint {
        iteration,
        samples,
        winrate,
        gold: 0.0,
        proxy: f64::NAN,
        kl,
        length: 5.0,
    }
}

fn run(method: &str, seed: u64, curve: Vec<CurvePoint>) -> rlhf_recipes::compare::RunResult {
    let last = curve.last().unwrap().winrate;
    rlhf_recipes::compare::RunResult {
        method: method.into(),
        seed,
        eval: EvalReport {
            winrate: last,
            ..start_eval()
        },
        seconds: 1.0,
        curve,
        monitors: Vec::new(),
    }
}

/// A row from two seeds' curves, by hand. Seed-mean curve: (0, 0.5, KL 0), (640, 0.6, KL 0.75),
/// (1280, 0.7, KL 2). Win-rate 0.6 is first reached at the second point (640 samples), by both
/// seeds' own curves; 0.75 by the mean curve never, by one seed (0.8). KL 1 lies a fifth of the
/// way from 0.75 to 2: win-rate 0.6 + 0.2 x 0.1 = 0.62. The peak is the last point. Pairs match
/// by seed, whatever the order of the runs.
#[test]
fn a_comparison_row_from_curves_by_hand() {
    let cfg = rlhf_recipes::compare::CompareConfig {
        winrate_targets: vec![0.6, 0.75],
        kl_levels: vec![1.0, 3.0],
        ..Default::default()
    };
    let a = run(
        "x",
        0,
        vec![
            point(0, 0.0, 0.5, 0.0),
            point(10, 640.0, 0.7, 1.0),
            point(20, 1280.0, 0.6, 2.0),
        ],
    );
    let b = run(
        "x",
        1,
        vec![
            point(0, 0.0, 0.5, 0.0),
            point(10, 640.0, 0.5, 0.5),
            point(20, 1280.0, 0.8, 2.0),
        ],
    );
    let row = rlhf_recipes::compare::aggregate(&cfg, "x", &[&a, &b]);
    close(row.winrate, 0.7, 1e-12);
    assert_eq!(row.curve.len(), 3);
    close(row.samples_to_target[0].unwrap(), 640.0, 1e-9);
    assert_eq!(row.samples_to_target[1], None);
    assert_eq!(row.seeds_reaching, [2, 1]);
    close(row.winrate_at_kl[0].unwrap(), 0.62, 1e-9);
    assert_eq!(row.winrate_at_kl[1], None);
    let peak = row.peak.unwrap();
    assert_eq!(peak.iteration, 20);
    close(peak.winrate, 0.7, 1e-12);

    // y is 0.1 above x on seed 0 and 0.2 above on seed 1, listed in the other order.
    let y1 = run(
        "y",
        1,
        vec![point(0, 0.0, 0.5, 0.0), point(20, 1280.0, 1.0, 1.0)],
    );
    let y0 = run(
        "y",
        0,
        vec![point(0, 0.0, 0.5, 0.0), point(20, 1280.0, 0.7, 1.0)],
    );
    let pairs =
        rlhf_recipes::compare::pairs(&["x".into(), "y".into()], &[a, b, y1.clone(), y0.clone()]);
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].test.n, 2);
    close(pairs[0].test.diff, -0.15, 1e-12);
    // differences -0.1, -0.2: sd 0.0707, se 0.05, t = -3 on 1 df.
    close(
        pairs[0].test.p,
        1.0 - 2.0 / std::f64::consts::PI * 3f64.atan(),
        1e-9,
    );
    close(pairs[0].p_holm, pairs[0].test.p, 1e-12);

    // The written report: its tables carry the same numbers, and its figures exist and are linked
    // by file name beside the table.
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("cmp.md");
    let mut cfg = cfg;
    cfg.methods = vec!["x".into(), "y".into()];
    cfg.seeds = vec![0, 1];
    let rows = vec![
        row,
        rlhf_recipes::compare::aggregate(&cfg, "y", &[&y0, &y1]),
    ];
    let report = rlhf_recipes::compare::CompareReport {
        config: cfg,
        sft: start_eval(),
        rows,
        runs: Vec::new(),
        pairs,
    };
    let plots = rlhf_recipes::compare::write_plots(&report, &table).unwrap();
    assert_eq!(plots.frontier, "cmp-frontier.svg");
    for f in [
        "cmp-frontier.svg",
        "cmp-curves.svg",
        "cmp-monitors.svg",
        "cmp-winrates.svg",
    ] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    // The table's chart: a row per method after the SFT reference, with the reference line.
    let svg = std::fs::read_to_string(dir.path().join("cmp-winrates.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
    for name in ["SFT (reference)", "x", "y", "gold win-rate"] {
        assert!(svg.contains(&format!("\n{name}\n")), "{name}");
    }
    let md = rlhf_recipes::compare::format_markdown(&report, &plots);
    for line in [
        "| x | 640 (2/2) | - (1/2) |",
        "| x | 0.620 | - |",
        "| x | 0.700 | 20 | 1280 | 2.00 | 0.700 | +0.000 |",
        "![reward-KL frontier](cmp-frontier.svg)",
        "![final gold win-rates with 95% intervals](cmp-winrates.svg)",
    ] {
        assert!(md.lines().any(|l| l == line), "{line}\n{md}");
    }
    let pair = md.lines().find(|l| l.starts_with("| x | y | 2 |")).unwrap();
    assert!(pair.starts_with("| x | y | 2 | -0.150 |"), "{pair}");
}
