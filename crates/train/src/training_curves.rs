//! A run's training curves as a picture: `metrics.jsonl` read back into one series per metric,
//! the series grouped into panels by the quantity they measure ([`FAMILIES`]), drawn as
//! `curves.svg` in the run directory. The metrics logger draws it when a run ends (and the trainer
//! at each checkpoint), so every method gets it; `rlhf plot` overlays several runs in one picture.
//!
//! Reading is strict where skipping would hide a bug, and lenient where the file is in a state a
//! normal run leaves:
//! - a line that is not a JSON object with a numeric `step` is an error naming the file and the
//!   line, except a last line without its newline: a run killed mid-write leaves one, and
//!   resuming drops it too, so it is left out and counted ([`RunMetrics::torn_last_line`]);
//! - `null` values (how the logger writes NaN and infinities) and values that are not numbers are
//!   left out of the series;
//! - an empty file (a run that has not logged yet) has no series and draws no picture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};
use crate::plot::{write_svg, Panel, Series};
use crate::run::{CURVES_FILE, METRICS_FILE};

/// The key every record has: the optimiser step it was logged at.
pub const STEP_KEY: &str = "step";

/// Record keys that are not metrics (drawn as nothing, only used as axes).
const BOOKKEEPING: [&str; 2] = [STEP_KEY, "wall_time"];

/// A kind of quantity drawn in one panel: which metrics belong to it, in legend order, and what
/// they are drawn against.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub title: &'static str,
    pub y_label: &'static str,
    /// The record key of the horizontal axis (`step` for all but PPO's critic pre-training, whose
    /// rows are all logged at step 0 and count their own iterations).
    pub x_key: &'static str,
    pub x_label: &'static str,
    pub metrics: &'static [&'static str],
}

const STEP_AXIS: (&str, &str) = (STEP_KEY, "optimiser step");

const fn family(
    title: &'static str,
    y_label: &'static str,
    metrics: &'static [&'static str],
) -> Family {
    Family {
        title,
        y_label,
        x_key: STEP_AXIS.0,
        x_label: STEP_AXIS.1,
        metrics,
    }
}

/// The panels of `curves.svg`, in drawing order, each with the metric names the methods log for
/// it (training and held-out side by side, so over-fitting shows as the two lines parting).
/// Metrics in no family (timings, throughput, advantage statistics, ...) are not drawn there;
/// `rlhf plot --metrics` draws any metric by name.
pub const FAMILIES: &[Family] = &[
    family(
        "loss",
        "loss",
        &[
            "loss",
            "eval_loss",
            "nll_loss",
            "ptx_loss",
            "assistant_nll",
            "eval_assistant_nll",
            "user_nll",
            "eval_user_nll",
            "mib/loss",
        ],
    ),
    family(
        "reward",
        "reward",
        &[
            "reward",
            "reward_raw",
            "shaped_reward",
            "gold",
            "eval/gold_mean",
            "eval/proxy_mean",
            "eval/mean_return",
            "validation/reward",
            "validation/gold",
            "kept_reward",
        ],
    ),
    family(
        "KL to the reference",
        "KL",
        &["kl", "kl_k3", "approx_kl", "eval/kl_to_ref"],
    ),
    family(
        "completion length",
        "tokens",
        &[
            "response_length",
            "eval/mean_len",
            "validation/length",
            "kept_length",
        ],
    ),
    family(
        "win-rate against the reference",
        "win-rate",
        &["eval/winrate", "eval/success_rate"],
    ),
    family(
        "preference accuracy",
        "accuracy",
        &["accuracy", "eval_accuracy", "rewards/accuracies"],
    ),
    family(
        "implicit rewards and margin",
        "reward",
        &["rewards/chosen", "rewards/rejected", "rewards/margins"],
    ),
    family("learning rate", "lr", &["lr"]),
    family(
        "gradient norm (before clipping)",
        "norm",
        &["grad_norm", "value_grad_norm"],
    ),
    family(
        "value model",
        "value",
        &["value_loss", "explained_variance"],
    ),
    Family {
        title: "critic pre-training",
        y_label: "value",
        x_key: "critic_pretrain/iteration",
        x_label: "pre-training iteration",
        metrics: &[
            "critic_pretrain/value_loss",
            "critic_pretrain/explained_variance",
        ],
    },
];

/// The family `metric` is drawn in, if any.
pub fn family_of(metric: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.metrics.contains(&metric))
}

/// The records of one `metrics.jsonl`, read back in file order.
#[derive(Debug, Clone, Default)]
pub struct RunMetrics {
    /// Metric names (not `step` or `wall_time`), sorted.
    names: Vec<String>,
    /// Each record's numeric values, `step` included.
    records: Vec<BTreeMap<String, f64>>,
    /// Whether a last line cut short by a crash was left out.
    pub torn_last_line: bool,
}

impl RunMetrics {
    /// Read a `metrics.jsonl` (see the module docs for what is an error and what is skipped).
    pub fn read(path: &Path) -> Result<RunMetrics> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::parse(&text, path)
    }

    /// [`RunMetrics::read`] on text already read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<RunMetrics> {
        let mut out = RunMetrics::default();
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for (i, raw) in lines.iter().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            match parse_record(line) {
                Ok(record) => {
                    for name in record.keys() {
                        if !BOOKKEEPING.contains(&name.as_str()) {
                            if let Err(at) = out.names.binary_search(name) {
                                out.names.insert(at, name.clone());
                            }
                        }
                    }
                    out.records.push(record);
                }
                Err(_) if i + 1 == lines.len() && !raw.ends_with('\n') => {
                    out.torn_last_line = true;
                }
                Err(why) => {
                    return Err(TrainError::bad_file(path, format!("line {}: {why}", i + 1)))
                }
            }
        }
        Ok(out)
    }

    /// The metric names, sorted (without `step` and `wall_time`).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// How many records were read.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// `(x, metric)` of every record that has both as finite numbers, in file order.
    pub fn points(&self, metric: &str, x_key: &str) -> Vec<(f64, f64)> {
        self.records
            .iter()
            .filter_map(|r| Some((*r.get(x_key)?, *r.get(metric)?)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    }
}

/// One line's numeric values; an error says why the line is not a metrics record.
fn parse_record(line: &str) -> std::result::Result<BTreeMap<String, f64>, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
    let object = value
        .as_object()
        .ok_or("not a metrics record (a JSON object with a numeric `step`)")?;
    if !object.get(STEP_KEY).is_some_and(|s| s.is_number()) {
        return Err("no numeric `step`: not a metrics record".into());
    }
    Ok(object
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect())
}

/// One panel to draw: a [`Family`], or a single metric `--metrics` asked for.
struct PanelSpec<'a> {
    title: &'a str,
    y_label: &'a str,
    x_key: &'a str,
    x_label: &'a str,
    metrics: Vec<&'a str>,
}

/// A run to draw: its legend label and its metrics.
#[derive(Debug, Clone)]
pub struct LabelledRun {
    pub label: String,
    pub metrics: RunMetrics,
}

/// The panels for `runs` overlaid: with `only`, one panel per named metric (drawn against its
/// family's axis, or the step); without, one per [`FAMILIES`] entry any run has a value for.
/// Series are named by what tells them apart: the metric for a single run, the run's label when
/// a panel holds one metric, else `label: metric`. Empty panels are left out; naming a metric no
/// run has is an error listing the ones they do have.
pub fn panels(runs: &[LabelledRun], only: Option<&[String]>) -> Result<Vec<Panel>> {
    let specs: Vec<PanelSpec> = match only {
        Some(names) => {
            let mut specs = Vec::new();
            for name in names {
                if !runs
                    .iter()
                    .any(|r| r.metrics.names.binary_search(name).is_ok())
                {
                    let mut known: Vec<&str> = runs
                        .iter()
                        .flat_map(|r| r.metrics.names.iter().map(String::as_str))
                        .collect();
                    known.sort_unstable();
                    known.dedup();
                    return Err(TrainError::invalid(format!(
                        "metric `{name}` is in none of the runs; they log: {}",
                        known.join(", ")
                    )));
                }
                let (x_key, x_label) = family_of(name).map_or(STEP_AXIS, |f| (f.x_key, f.x_label));
                specs.push(PanelSpec {
                    title: name,
                    y_label: name,
                    x_key,
                    x_label,
                    metrics: vec![name],
                });
            }
            specs
        }
        None => FAMILIES
            .iter()
            .map(|f| PanelSpec {
                title: f.title,
                y_label: f.y_label,
                x_key: f.x_key,
                x_label: f.x_label,
                metrics: f.metrics.to_vec(),
            })
            .collect(),
    };
    let mut out = Vec::new();
    for spec in specs {
        // (run, metric, points) of every line with something to draw.
        let lines: Vec<_> = runs
            .iter()
            .flat_map(|run| {
                spec.metrics
                    .iter()
                    .map(move |m| (run, *m, run.metrics.points(m, spec.x_key)))
            })
            .filter(|(_, _, points)| !points.is_empty())
            .collect();
        if lines.is_empty() {
            continue;
        }
        let mut drawn_metrics: Vec<&str> = lines.iter().map(|l| l.1).collect();
        drawn_metrics.sort_unstable();
        drawn_metrics.dedup();
        let one_metric = drawn_metrics.len() == 1;
        // A lone line has no legend (see `plot`), so its metric names the vertical axis.
        let y_label = match lines.as_slice() {
            [(_, metric, _)] => metric,
            _ => spec.y_label,
        };
        let series = lines
            .into_iter()
            .map(|(run, metric, points)| Series {
                name: if runs.len() == 1 {
                    metric.to_string()
                } else if one_metric {
                    run.label.clone()
                } else {
                    format!("{}: {metric}", run.label)
                },
                points,
            })
            .collect();
        out.push(Panel {
            title: spec.title.into(),
            x_label: spec.x_label.into(),
            y_label: y_label.into(),
            series,
        });
    }
    Ok(out)
}

/// Panels per row of a figure.
const COLUMNS: usize = 3;

/// Draw a run directory's training curves into `<run_dir>/curves.svg` from its `metrics.jsonl`.
/// Returns the picture's path, or `None` (and writes nothing) when there is nothing to draw yet:
/// no metrics file, an empty one, or no finite value of a drawn metric.
pub fn write_run_curves(run_dir: &Path) -> Result<Option<PathBuf>> {
    let metrics_path = run_dir.join(METRICS_FILE);
    if !metrics_path.is_file() {
        return Ok(None);
    }
    let run = LabelledRun {
        label: String::new(),
        metrics: RunMetrics::read(&metrics_path)?,
    };
    let panels = panels(std::slice::from_ref(&run), None)?;
    if panels.is_empty() {
        return Ok(None);
    }
    let out = run_dir.join(CURVES_FILE);
    write_svg(&out, &panels, COLUMNS)?;
    Ok(Some(out))
}

/// The runs `sources` name (run directories, or `metrics.jsonl` files directly), each labelled
/// with its directory's name, or with the path as given where two names collide.
pub fn read_runs(sources: &[PathBuf]) -> Result<Vec<LabelledRun>> {
    let dir_of = |source: &Path| -> PathBuf {
        if source.is_dir() {
            source.to_path_buf()
        } else {
            source.parent().map(Path::to_path_buf).unwrap_or_default()
        }
    };
    let short = |source: &Path| -> String {
        let dir = dir_of(source);
        match dir.file_name() {
            Some(name) => name.to_string_lossy().into_owned(),
            None => dir
                .canonicalize()
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| source.display().to_string()),
        }
    };
    let shorts: Vec<String> = sources.iter().map(|s| short(s)).collect();
    sources
        .iter()
        .zip(&shorts)
        .map(|(source, name)| {
            let metrics_path = if source.is_dir() {
                source.join(METRICS_FILE)
            } else {
                source.clone()
            };
            let unique = shorts.iter().filter(|s| *s == name).count() == 1;
            Ok(LabelledRun {
                label: if unique {
                    name.clone()
                } else {
                    dir_of(source).display().to_string()
                },
                metrics: RunMetrics::read(&metrics_path)?,
            })
        })
        .collect()
}

/// `rlhf plot`: the runs `sources` name, overlaid in one picture at `out` (every family they log,
/// or only the `only` metrics). Returns `None`, writing nothing, when no run has a value to draw.
pub fn write_overlay(
    sources: &[PathBuf],
    only: Option<&[String]>,
    out: &Path,
) -> Result<Option<PathBuf>> {
    let runs = read_runs(sources)?;
    let panels = panels(&runs, only)?;
    if panels.is_empty() {
        return Ok(None);
    }
    write_svg(out, &panels, COLUMNS)?;
    Ok(Some(out.to_path_buf()))
}
