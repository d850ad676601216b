//! Training curves from hand-written `metrics.jsonl` files: the series read back are the values
//! written (points, order, axis), the panels are the families present, the SVG names them, and
//! malformed, empty or unusual files give a clear error or no picture, never a panic.

use std::path::{Path, PathBuf};

use rlhf_train::training_curves::{
    panels, read_runs, write_overlay, write_run_curves, LabelledRun, RunMetrics,
};
use rlhf_train::{MetricsLogger, RunDir};

/// A DPO-like run: training loss, accuracy and margins every step, an evaluation at step 2 and 4,
/// a NaN written as null, and a string value that is not a metric.
const DPO_LIKE: &str = r#"{"step":1,"wall_time":0.1,"loss":0.69,"accuracy":0.5,"rewards/margins":0.0,"lr":0.001}
{"step":2,"wall_time":0.2,"loss":0.6,"accuracy":0.75,"rewards/margins":0.25,"lr":0.0005}
{"step":2,"wall_time":0.25,"eval_loss":0.65,"eval_accuracy":0.625}

{"step":3,"wall_time":0.3,"loss":null,"accuracy":1.0,"rewards/margins":0.5,"lr":0.00025,"note":"x"}
{"step":4,"wall_time":0.4,"loss":0.4,"accuracy":1.0,"rewards/margins":0.75,"lr":0.000125}
{"step":4,"wall_time":0.45,"eval_loss":0.55,"eval_accuracy":0.75}
"#;

fn write_run(root: &Path, name: &str, text: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    dir
}

/// The contents of the SVG's text elements (titles, axis labels, legend entries), trimmed.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|t| {
            let body = &t[t.find('>')? + 1..];
            Some(body[..body.find("</text>")?].trim().to_string())
        })
        .collect()
}

fn one(label: &str, text: &str) -> LabelledRun {
    LabelledRun {
        label: label.into(),
        metrics: RunMetrics::parse(text, Path::new("metrics.jsonl")).unwrap(),
    }
}

#[test]
fn series_are_the_values_written() {
    let m = RunMetrics::parse(DPO_LIKE, Path::new("m.jsonl")).unwrap();
    assert_eq!(m.len(), 6);
    assert!(!m.torn_last_line);
    assert_eq!(
        m.names(),
        [
            "accuracy",
            "eval_accuracy",
            "eval_loss",
            "loss",
            "lr",
            "rewards/margins"
        ]
    );
    // the null at step 3 is left out; order is file order
    assert_eq!(
        m.points("loss", "step"),
        vec![(1.0, 0.69), (2.0, 0.6), (4.0, 0.4)]
    );
    assert_eq!(
        m.points("eval_loss", "step"),
        vec![(2.0, 0.65), (4.0, 0.55)]
    );
    assert_eq!(
        m.points("lr", "step"),
        vec![(1.0, 0.001), (2.0, 0.0005), (3.0, 0.00025), (4.0, 0.000125)]
    );
    assert!(m.points("note", "step").is_empty() && m.points("missing", "step").is_empty());

    let ps = panels(&[one("run", DPO_LIKE)], None).unwrap();
    let titles: Vec<&str> = ps.iter().map(|p| p.title.as_str()).collect();
    assert_eq!(
        titles,
        [
            "loss",
            "preference accuracy",
            "implicit rewards and margin",
            "learning rate"
        ]
    );
    let loss = &ps[0];
    assert_eq!(loss.x_label, "optimiser step");
    let names: Vec<&str> = loss.series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["loss", "eval_loss"]);
    assert_eq!(loss.series[1].points, vec![(2.0, 0.65), (4.0, 0.55)]);
    let acc = &ps[1];
    assert_eq!(
        acc.series[0].points,
        vec![(1.0, 0.5), (2.0, 0.75), (3.0, 1.0), (4.0, 1.0)]
    );
    assert_eq!(acc.series[1].name, "eval_accuracy");
}

#[test]
fn online_runs_get_reward_kl_length_winrate_and_ppo_pretraining_panels() {
    let text = r#"{"step":0,"wall_time":0.5,"critic_pretrain/iteration":1.0,"critic_pretrain/value_loss":0.4}
{"step":0,"wall_time":1.1,"critic_pretrain/iteration":2.0,"critic_pretrain/value_loss":0.3}
{"step":2,"wall_time":2.0,"reward":0.25,"gold":-0.5,"kl":0.125,"response_length":5.5,"tokens_per_s":900.0}
{"step":4,"wall_time":3.0,"reward":0.5,"gold":-0.25,"kl":0.25,"response_length":6.0,"tokens_per_s":950.0}
{"step":4,"wall_time":3.5,"eval/winrate":0.625,"eval/mean_len":6.5,"eval/gold_mean":-0.125,"eval/kl_to_ref":0.375}
"#;
    let ps = panels(&[one("ppo", text)], None).unwrap();
    let got: Vec<(&str, Vec<&str>)> = ps
        .iter()
        .map(|p| {
            (
                p.title.as_str(),
                p.series.iter().map(|s| s.name.as_str()).collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("reward", vec!["reward", "gold", "eval/gold_mean"]),
            ("KL to the reference", vec!["kl", "eval/kl_to_ref"]),
            (
                "completion length",
                vec!["response_length", "eval/mean_len"]
            ),
            ("win-rate against the reference", vec!["eval/winrate"]),
            ("critic pre-training", vec!["critic_pretrain/value_loss"]),
        ]
    );
    // a single evaluation is a single point; pre-training is drawn against its own iterations
    assert_eq!(ps[3].series[0].points, vec![(4.0, 0.625)]);
    assert_eq!(ps[4].x_label, "pre-training iteration");
    assert_eq!(ps[4].series[0].points, vec![(1.0, 0.4), (2.0, 0.3)]);
}

#[test]
fn curves_svg_is_written_and_names_panels_and_series() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_run(tmp.path(), "dpo", DPO_LIKE);
    let out = write_run_curves(&dir).unwrap().unwrap();
    assert_eq!(out, dir.join("curves.svg"));
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
    assert!(svg.trim_end().ends_with("</svg>"));
    for text in [
        "loss",
        "eval_loss",
        "preference accuracy",
        "eval_accuracy",
        "implicit rewards and margin",
        "rewards/margins",
        "learning rate",
        "optimiser step",
    ] {
        assert!(
            texts(&svg).iter().any(|t| t == text),
            "{text} not in the SVG"
        );
    }
    // No temporary left beside it.
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn nothing_to_draw_is_no_picture_and_no_error() {
    let tmp = tempfile::tempdir().unwrap();
    // no metrics file at all
    assert_eq!(write_run_curves(tmp.path()).unwrap(), None);
    // an empty file, blank lines only, and only metrics of no family
    for (name, text) in [
        ("empty", ""),
        ("blank", "\n\n"),
        (
            "timings",
            "{\"step\":1,\"wall_time\":0.1,\"time/step_s\":0.2}\n",
        ),
        ("nulls", "{\"step\":1,\"loss\":null}\n"),
    ] {
        let dir = write_run(tmp.path(), name, text);
        assert_eq!(write_run_curves(&dir).unwrap(), None, "{name}");
        assert!(!dir.join("curves.svg").exists(), "{name}");
    }
    // a single point is a picture
    let dir = write_run(tmp.path(), "single", "{\"step\":7,\"loss\":1.5}\n");
    assert!(write_run_curves(&dir).unwrap().is_some());
    let ps = panels(&read_runs(&[dir]).unwrap(), None).unwrap();
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0].series[0].points, vec![(7.0, 1.5)]);
}

#[test]
fn malformed_lines_are_errors_naming_file_and_line_but_a_torn_last_line_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, line, why) in [
        (
            "{\"step\":1,\"loss\":1}\nnot json\n{\"step\":3,\"loss\":1}\n",
            2,
            "not JSON",
        ),
        (
            "{\"step\":1,\"loss\":1}\n[1, 2]\n",
            2,
            "not a metrics record",
        ),
        ("{\"loss\":1}\n", 1, "no numeric `step`"),
        ("{\"step\":\"one\",\"loss\":1}\n", 1, "no numeric `step`"),
    ] {
        let dir = write_run(tmp.path(), "bad", text);
        let e = write_run_curves(&dir).unwrap_err().to_string();
        assert!(
            e.contains(&dir.join("metrics.jsonl").display().to_string())
                && e.contains(&format!("line {line}:"))
                && e.contains(why),
            "{e}"
        );
        assert!(!dir.join("curves.svg").exists());
    }
    // A run killed mid-write: the unfinished last line is left out, the rest drawn.
    let dir = write_run(
        tmp.path(),
        "torn",
        "{\"step\":1,\"loss\":2}\n{\"step\":2,\"loss\":1}\n{\"step\":3,\"lo",
    );
    let m = RunMetrics::read(&dir.join("metrics.jsonl")).unwrap();
    assert!(m.torn_last_line);
    assert_eq!(m.points("loss", "step"), vec![(1.0, 2.0), (2.0, 1.0)]);
    assert!(write_run_curves(&dir).unwrap().is_some());
}

#[test]
fn several_runs_overlay_with_the_run_names_as_legend() {
    let tmp = tempfile::tempdir().unwrap();
    let a = write_run(
        tmp.path(),
        "lr-high",
        "{\"step\":1,\"loss\":2.0,\"kl\":0.5}\n{\"step\":2,\"loss\":1.0,\"kl\":1.0}\n",
    );
    let b = write_run(
        tmp.path(),
        "lr-low",
        "{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"loss\":2.0,\"eval_loss\":2.25}\n",
    );
    let runs = read_runs(&[a.clone(), b.join("metrics.jsonl")]).unwrap();
    assert_eq!(runs[0].label, "lr-high");
    assert_eq!(runs[1].label, "lr-low");

    // --metrics loss: one panel, one series per run, named after the run
    let only = vec!["loss".to_string()];
    let ps = panels(&runs, Some(&only)).unwrap();
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0].title, "loss");
    let series: Vec<(&str, &[(f64, f64)])> = ps[0]
        .series
        .iter()
        .map(|s| (s.name.as_str(), s.points.as_slice()))
        .collect();
    assert_eq!(
        series,
        vec![
            ("lr-high", &[(1.0, 2.0), (2.0, 1.0)][..]),
            ("lr-low", &[(1.0, 2.5), (2.0, 2.0)][..]),
        ]
    );

    // every family: the loss panel has two metrics, so the legend names both run and metric;
    // the KL panel only the run
    let ps = panels(&runs, None).unwrap();
    let names = |i: usize| -> Vec<String> { ps[i].series.iter().map(|s| s.name.clone()).collect() };
    assert_eq!(ps[0].title, "loss");
    assert_eq!(
        names(0),
        ["lr-high: loss", "lr-low: loss", "lr-low: eval_loss"]
    );
    assert_eq!(ps[1].title, "KL to the reference");
    assert_eq!(names(1), ["lr-high"]);

    // the picture, with the run names in it
    let out = tmp.path().join("figs/cmp.svg");
    assert_eq!(
        write_overlay(&[a.clone(), b.clone()], Some(&only), &out).unwrap(),
        Some(out.clone())
    );
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg"));
    let written = texts(&svg);
    for name in ["loss", "lr-high", "lr-low"] {
        assert!(written.iter().any(|t| t == name), "{name}: {written:?}");
    }

    // an unknown metric is an error listing the known ones
    let e = panels(&runs, Some(&["reward".to_string()]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`reward`") && e.contains("eval_loss, kl, loss"),
        "{e}"
    );

    // two runs with the same directory name are told apart by their paths
    let c = write_run(
        &tmp.path().join("other"),
        "lr-high",
        "{\"step\":1,\"loss\":3}\n",
    );
    let runs = read_runs(&[a.clone(), c.clone()]).unwrap();
    assert_eq!(runs[0].label, a.display().to_string());
    assert_eq!(runs[1].label, c.display().to_string());
    // a missing run is an error naming it
    let e = read_runs(&[tmp.path().join("nope")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
}

/// The logger draws the curves when the run ends (dropped), and a new run over an old directory
/// removes the old picture.
#[test]
fn the_metrics_logger_draws_curves_when_the_run_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir::create(tmp.path(), &serde_json::json!({"lr": 1e-3})).unwrap();
    let mut log = MetricsLogger::new(&run).unwrap();
    log.log(1, &[("loss", 1.0), ("lr", 1e-3)]).unwrap();
    log.log(2, &[("loss", 0.5), ("lr", 5e-4)]).unwrap();
    assert!(!tmp.path().join("curves.svg").exists());
    drop(log);
    let svg = std::fs::read_to_string(tmp.path().join("curves.svg")).unwrap();
    let written = texts(&svg);
    assert!(written.iter().any(|t| t == "loss") && written.iter().any(|t| t == "learning rate"));

    RunDir::create_overwriting(tmp.path(), &serde_json::json!({"lr": 1e-3})).unwrap();
    assert!(!tmp.path().join("curves.svg").exists());
}
