//! The run directory every training command writes:
//!
//! ```text
//! RUN/
//!   config.toml                 the resolved configuration (written once, atomically)
//!   metrics.jsonl               one JSON object a line: {"step":..,"wall_time":..,<metric>:..}
//!   curves.svg                  the metrics drawn (redrawn at each checkpoint and at the end)
//!   tb/events.out.tfevents.*    the same scalars for TensorBoard (one file per process)
//!   checkpoints/
//!     latest                    "step-<N>": the newest complete checkpoint
//!     step-<N>/                 model.safetensors, optimizer.safetensors, state.json (+ extras)
//! ```
//!
//! Checkpoints are crash-safe: each is written into a temporary sibling (`checkpoints/.tmp-*`),
//! every file fsynced, then renamed into place, and only then is `latest` replaced (itself through
//! a temporary file and a rename). A `step-<N>` directory therefore only ever exists complete, and
//! `latest` only ever names one; a killed run loses at most the work since its last checkpoint.
//! Leftover temporaries are ignored by loading and removed by the next save.
//!
//! On resume, [`MetricsLogger::resume`] drops the metrics lines after the checkpoint's step and
//! tells TensorBoard to drop its events after it too, so the logs of a resumed run read like an
//! uninterrupted one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, TrainError};
use crate::tensorboard::{unix_time, EventWriter};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The training curves drawn from `metrics.jsonl` ([`crate::training_curves`]).
pub const CURVES_FILE: &str = "curves.svg";
pub const TB_DIR: &str = "tb";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
pub const LATEST_FILE: &str = "latest";
pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
/// How many checkpoints are kept unless [`RunDir::set_keep_last`] says otherwise.
pub const DEFAULT_KEEP_LAST: usize = 2;

const TMP_PREFIX: &str = ".tmp-";

// ---- file helpers --------------------------------------------------------------------------------

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|e| TrainError::io(path, e))
}

/// fsync a directory, so a rename inside it survives a power cut (a no-op where directories cannot
/// be opened, i.e. not on Unix).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        io(dir, File::open(dir).and_then(|f| f.sync_all()))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// fsync every file and directory under `dir` (and `dir` itself).
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in io(dir, std::fs::read_dir(dir))? {
        let entry = io(dir, entry)?;
        let path = entry.path();
        let ft = io(&path, entry.file_type())?;
        if ft.is_dir() {
            sync_tree(&path)?;
        } else if ft.is_file() {
            io(&path, File::open(&path).and_then(|f| f.sync_all()))?;
        }
    }
    sync_dir(dir)
}

/// Write a file through a temporary sibling and a rename: readers see the old or the new content,
/// never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(TrainError::io(&tmp, e));
    }
    io(path, std::fs::rename(&tmp, path))?;
    sync_dir(parent)
}

/// Write a value as pretty JSON, atomically ([`write_atomic`]).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    write_atomic(path, text.as_bytes())
}

/// Read a JSON file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = io(path, std::fs::read_to_string(path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::bad_file(path, e.to_string()))
}

/// Write rows as JSON lines, atomically ([`write_atomic`]).
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r).expect("JSON values serialise"));
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

/// Read JSON lines (blank lines skipped), naming the file and the line in every error.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = io(path, std::fs::read_to_string(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str(l)
                .map_err(|e| TrainError::bad_file(path, format!("line {}: {e}", n + 1)))
        })
        .collect()
}

/// Save tensors as safetensors (keeping their dtypes) and fsync the file.
pub fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| TrainError::bad_file(path, format!("cannot write safetensors: {e}")))?;
    io(path, File::open(path).and_then(|f| f.sync_all()))
}

/// Load a safetensors file (dtypes kept), naming the file in every error.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = io(path, std::fs::read(path))?;
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
        TrainError::bad_file(
            path,
            format!("not a valid safetensors file (truncated?): {e}"),
        )
    })
}

fn step_of_dir_name(name: &str) -> Option<u64> {
    let n = name.strip_prefix("step-")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

fn is_complete(dir: &Path) -> bool {
    [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE]
        .iter()
        .all(|f| dir.join(f).is_file())
}

fn remove_any(path: &Path) -> Result<()> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(TrainError::io(path, e)),
        _ => Ok(()),
    }
}

/// Remove the entries of `dir` (files or directories) for which `matches(name, path)` holds.
pub fn remove_entries(dir: &Path, matches: impl Fn(&str, &Path) -> bool) -> Result<()> {
    for entry in io(dir, std::fs::read_dir(dir))? {
        let path = io(dir, entry)?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if matches(&name, &path) {
            remove_any(&path)?;
        }
    }
    Ok(())
}

// ---- run directory -------------------------------------------------------------------------------

/// A run directory (see the module docs for its layout).
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
    keep_last: usize,
    started: Instant,
}

/// A complete checkpoint found in a run directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub step: u64,
    pub dir: PathBuf,
    /// The `state.json` the method saved (RNG state, data position, ...).
    pub state: serde_json::Value,
}

impl Checkpoint {
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(MODEL_FILE)
    }
    pub fn optimizer_path(&self) -> PathBuf {
        self.dir.join(OPTIMIZER_FILE)
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    /// The model tensors (in the dtypes they were saved in).
    pub fn load_model(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        load_safetensors(&self.model_path(), device)
    }
    /// The optimiser state, for [`crate::AdamW::load_state`].
    pub fn load_optimizer(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        load_safetensors(&self.optimizer_path(), device)
    }

    fn read(step: u64, dir: PathBuf) -> Result<Checkpoint> {
        let path = dir.join(STATE_FILE);
        let text = io(&path, std::fs::read_to_string(&path))?;
        let state = serde_json::from_str(&text)
            .map_err(|e| TrainError::bad_file(&path, format!("invalid JSON: {e}")))?;
        Ok(Checkpoint { step, dir, state })
    }
}

impl RunDir {
    /// Start a new run in `path` (created if needed), writing `config.toml` from the resolved
    /// configuration. Refuses a directory that already holds a run (resume it with
    /// [`RunDir::open_for_resume`], or start over with [`RunDir::create_overwriting`]).
    pub fn create(path: impl AsRef<Path>, resolved_config: &impl Serialize) -> Result<RunDir> {
        let root = path.as_ref().to_path_buf();
        for entry in [CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR] {
            if root.join(entry).exists() {
                return Err(TrainError::bad_file(
                    root.join(entry),
                    "the directory already holds a run: resume it, or choose another output directory",
                ));
            }
        }
        io(&root, std::fs::create_dir_all(&root))?;
        let config_path = root.join(CONFIG_FILE);
        let text = toml::to_string_pretty(resolved_config).map_err(|e| {
            TrainError::bad_file(
                &config_path,
                format!("cannot write the configuration as TOML: {e}"),
            )
        })?;
        write_atomic(&config_path, text.as_bytes())?;
        Ok(RunDir {
            root,
            keep_last: DEFAULT_KEEP_LAST,
            started: Instant::now(),
        })
    }

    /// [`RunDir::create`] after removing what an earlier run left in `path` (its `config.toml`,
    /// `metrics.jsonl`, `curves.svg`, `tb/` and `checkpoints/`; nothing else).
    pub fn create_overwriting(
        path: impl AsRef<Path>,
        resolved_config: &impl Serialize,
    ) -> Result<RunDir> {
        let root = path.as_ref();
        for entry in [
            CONFIG_FILE,
            METRICS_FILE,
            CURVES_FILE,
            TB_DIR,
            CHECKPOINTS_DIR,
        ] {
            remove_any(&root.join(entry))?;
        }
        Self::create(root, resolved_config)
    }

    /// Open an existing run to continue it (its `config.toml` must exist).
    pub fn open_for_resume(path: impl AsRef<Path>) -> Result<RunDir> {
        let root = path.as_ref().to_path_buf();
        let config_path = root.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(TrainError::bad_file(
                config_path,
                "not found: not a run directory, nothing to resume",
            ));
        }
        Ok(RunDir {
            root,
            keep_last: DEFAULT_KEEP_LAST,
            started: Instant::now(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
    pub fn config_path(&self) -> PathBuf {
        self.root.join(CONFIG_FILE)
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }
    pub fn tb_dir(&self) -> PathBuf {
        self.root.join(TB_DIR)
    }
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join(CHECKPOINTS_DIR)
    }
    /// When this `RunDir` was created or opened (the origin of the metrics' `wall_time`).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The configuration the run was started with.
    pub fn read_config<T: DeserializeOwned>(&self) -> Result<T> {
        let path = self.config_path();
        let text = io(&path, std::fs::read_to_string(&path))?;
        toml::from_str(&text)
            .map_err(|e| TrainError::bad_file(&path, format!("invalid configuration: {e}")))
    }

    /// How many checkpoints to keep (at least 1; default 2).
    pub fn keep_last(&self) -> usize {
        self.keep_last
    }
    pub fn set_keep_last(&mut self, k: usize) {
        self.keep_last = k.max(1);
    }
    pub fn with_keep_last(mut self, k: usize) -> Self {
        self.set_keep_last(k);
        self
    }

    /// Save a checkpoint for `step`: `model` to `model.safetensors`, `optimizer` (e.g.
    /// [`crate::AdamW::state`]) to `optimizer.safetensors`, `state` to `state.json`. Returns its
    /// directory.
    pub fn save_checkpoint(
        &self,
        step: u64,
        model: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
        state: &serde_json::Value,
    ) -> Result<PathBuf> {
        self.save_checkpoint_with(step, model, optimizer, state, |_| Ok::<(), TrainError>(()))
    }

    /// [`RunDir::save_checkpoint`], with `extra` writing more files (an HF `config.json`, the
    /// tokenizer, ...) into the checkpoint's directory before it is made visible. If anything fails
    /// the temporary directory is removed and `latest` still names the previous checkpoint.
    pub fn save_checkpoint_with<F, E>(
        &self,
        step: u64,
        model: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
        state: &serde_json::Value,
        extra: F,
    ) -> Result<PathBuf>
    where
        F: FnOnce(&Path) -> std::result::Result<(), E>,
        E: Into<TrainError>,
    {
        let ck = self.checkpoints_dir();
        io(&ck, std::fs::create_dir_all(&ck))?;
        self.remove_stray_temporaries()?;
        let pid = std::process::id();
        let tmp = ck.join(format!("{TMP_PREFIX}step-{step}-{pid}"));
        io(&tmp, std::fs::create_dir(&tmp))?;
        let write = || -> Result<()> {
            save_safetensors(&tmp.join(MODEL_FILE), model)?;
            save_safetensors(&tmp.join(OPTIMIZER_FILE), optimizer)?;
            let state_text = serde_json::to_string_pretty(state).expect("JSON value serialises");
            let state_path = tmp.join(STATE_FILE);
            io(&state_path, std::fs::write(&state_path, state_text))?;
            extra(&tmp).map_err(Into::into)?;
            sync_tree(&tmp)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let final_dir = ck.join(format!("step-{step}"));
        // Saving a step that already has a checkpoint (e.g. again right after resuming from it):
        // move the old one aside first. Were the process killed between the two renames, `latest`
        // would name a missing directory for an instant; `latest_checkpoint` then falls back to
        // the newest complete one.
        let aside = ck.join(format!("{TMP_PREFIX}old-step-{step}-{pid}"));
        if final_dir.exists() {
            io(&final_dir, std::fs::rename(&final_dir, &aside))?;
        }
        io(&final_dir, std::fs::rename(&tmp, &final_dir))?;
        sync_dir(&ck)?;
        write_atomic(&ck.join(LATEST_FILE), format!("step-{step}\n").as_bytes())?;
        remove_any(&aside)?;
        self.prune(step)?;
        Ok(final_dir)
    }

    /// The steps of the complete checkpoints present, ascending.
    pub fn checkpoint_steps(&self) -> Result<Vec<u64>> {
        let ck = self.checkpoints_dir();
        if !ck.is_dir() {
            return Ok(Vec::new());
        }
        let mut steps = Vec::new();
        for entry in io(&ck, std::fs::read_dir(&ck))? {
            let entry = io(&ck, entry)?;
            if let Some(step) = step_of_dir_name(&entry.file_name().to_string_lossy()) {
                if is_complete(&entry.path()) {
                    steps.push(step);
                }
            }
        }
        steps.sort_unstable();
        Ok(steps)
    }

    /// The checkpoint `latest` names (or, without a usable `latest`, the newest complete one);
    /// `None` when the run has none. Temporaries of an interrupted save are never considered.
    pub fn latest_checkpoint(&self) -> Result<Option<Checkpoint>> {
        let ck = self.checkpoints_dir();
        let latest = ck.join(LATEST_FILE);
        if latest.is_file() {
            let text = io(&latest, std::fs::read_to_string(&latest))?;
            let name = text.trim();
            let step = step_of_dir_name(name).ok_or_else(|| {
                TrainError::bad_file(&latest, format!("expected `step-<N>`, found `{name}`"))
            })?;
            let dir = ck.join(name);
            if is_complete(&dir) {
                return Ok(Some(Checkpoint::read(step, dir)?));
            }
        }
        match self.checkpoint_steps()?.last() {
            Some(&step) => Ok(Some(Checkpoint::read(
                step,
                ck.join(format!("step-{step}")),
            )?)),
            None => Ok(None),
        }
    }

    /// The checkpoint of `step` (its `state.json` read; the tensors are loaded on demand).
    pub fn checkpoint(&self, step: u64) -> Result<Checkpoint> {
        Checkpoint::read(step, self.checkpoints_dir().join(format!("step-{step}")))
    }

    /// The steps a resume may start from, best first: the one `latest` names (or the newest
    /// complete one), then the older complete ones, newest first (to fall back on when the
    /// newest turns out unreadable).
    pub fn resume_steps(&self) -> Result<Vec<u64>> {
        let mut steps = self.checkpoint_steps()?;
        steps.reverse();
        if let Some(ck) = self.latest_checkpoint().ok().flatten() {
            steps.retain(|&s| s < ck.step);
            steps.insert(0, ck.step);
        }
        Ok(steps)
    }

    /// Remove what an interrupted save or prune left behind (`checkpoints/.tmp-*`).
    fn remove_stray_temporaries(&self) -> Result<()> {
        let ck = self.checkpoints_dir();
        for entry in io(&ck, std::fs::read_dir(&ck))? {
            let entry = io(&ck, entry)?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                remove_any(&entry.path())?;
            }
        }
        Ok(())
    }

    /// After saving `current`: delete checkpoints past it (left by a run that was killed and
    /// resumed from an earlier one) and all but the newest `keep_last` up to it. Each goes by a
    /// rename to a temporary name first, so none is ever seen half-deleted.
    fn prune(&self, current: u64) -> Result<()> {
        let ck = self.checkpoints_dir();
        let mut steps = Vec::new();
        for entry in io(&ck, std::fs::read_dir(&ck))? {
            let entry = io(&ck, entry)?;
            if let Some(s) = step_of_dir_name(&entry.file_name().to_string_lossy()) {
                if entry.path().is_dir() {
                    steps.push(s);
                }
            }
        }
        steps.sort_unstable_by(|a, b| b.cmp(a));
        let mut kept = 0;
        for s in steps {
            let keep = s <= current && kept < self.keep_last;
            if keep {
                kept += 1;
                continue;
            }
            let dir = ck.join(format!("step-{s}"));
            let doomed = ck.join(format!("{TMP_PREFIX}prune-step-{s}-{}", std::process::id()));
            io(&dir, std::fs::rename(&dir, &doomed))?;
            remove_any(&doomed)?;
        }
        Ok(())
    }
}

// ---- metrics -------------------------------------------------------------------------------------

/// Appends metrics to `metrics.jsonl` (one flushed line per call) and to a TensorBoard event file,
/// and draws them as `curves.svg` when it is dropped, i.e. when the run ends: this is the one
/// place every method's run goes through, however it finishes (a final evaluation logged after
/// the model is saved is in the picture too; so is the last step of a run that failed).
pub struct MetricsLogger {
    path: PathBuf,
    file: File,
    tb: EventWriter,
    started: Instant,
    /// `wall_time` already elapsed before this process (on resume: the last kept line's).
    time_offset: f64,
}

impl MetricsLogger {
    /// Start the run's logs afresh (an existing `metrics.jsonl` is truncated).
    pub fn new(run: &RunDir) -> Result<Self> {
        let path = run.metrics_path();
        let file = io(&path, File::create(&path))?;
        let tb = EventWriter::create(&run.tb_dir())?;
        Ok(MetricsLogger {
            path,
            file,
            tb,
            started: run.started(),
            time_offset: 0.0,
        })
    }

    /// Continue the logs of a run resumed from the checkpoint at `from_step`: lines of
    /// `metrics.jsonl` with a step after it are dropped (as is a line torn by a crash), `wall_time`
    /// continues from the last kept line, and TensorBoard is told to drop the events after it.
    pub fn resume(run: &RunDir, from_step: u64) -> Result<Self> {
        let path = run.metrics_path();
        let mut kept = String::new();
        let mut time_offset = 0.0;
        if path.exists() {
            let text = io(&path, std::fs::read_to_string(&path))?;
            let lines: Vec<&str> = text.split_inclusive('\n').collect();
            for (i, raw) in lines.iter().enumerate() {
                let line = raw.trim();
                if line.is_empty() {
                    continue;
                }
                let parsed: Option<(u64, f64)> = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| {
                        Some((
                            v.get("step")?.as_u64()?,
                            v.get("wall_time").and_then(|t| t.as_f64()).unwrap_or(0.0),
                        ))
                    });
                match parsed {
                    Some((step, wall)) => {
                        if step <= from_step {
                            kept.push_str(line);
                            kept.push('\n');
                            time_offset = wall;
                        }
                    }
                    // The last line, cut short by a crash mid-write: drop it.
                    None if i + 1 == lines.len() && !raw.ends_with('\n') => {}
                    None => {
                        return Err(TrainError::bad_file(
                            &path,
                            format!(
                                "line {}: not a metrics record (JSON object with a `step`)",
                                i + 1
                            ),
                        ))
                    }
                }
            }
        }
        write_atomic(&path, kept.as_bytes())?;
        let file = io(&path, OpenOptions::new().append(true).open(&path))?;
        let mut tb = EventWriter::create(&run.tb_dir())?;
        tb.add_session_start(from_step as i64 + 1, unix_time())?;
        Ok(MetricsLogger {
            path,
            file,
            tb,
            started: run.started(),
            time_offset,
        })
    }

    pub fn metrics_path(&self) -> &Path {
        &self.path
    }

    /// Draw what has been logged so far as `curves.svg` beside `metrics.jsonl`
    /// ([`crate::training_curves::write_run_curves`]); `None` when there is nothing to draw yet.
    pub fn draw_curves(&self) -> Result<Option<PathBuf>> {
        let run_dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::training_curves::write_run_curves(run_dir)
    }

    /// [`MetricsLogger::draw_curves`] for the training loop: the picture is a by-product, so a
    /// failure to draw it is reported on stderr and never stops the run.
    pub fn refresh_curves(&self) {
        if let Err(e) = self.draw_curves() {
            eprintln!("warning: training curves not drawn: {e}");
        }
    }

    pub fn tb_path(&self) -> &Path {
        self.tb.path()
    }

    /// Seconds since the run started (across resumes).
    pub fn wall_time(&self) -> f64 {
        self.time_offset + self.started.elapsed().as_secs_f64()
    }

    /// Record `metrics` at `step`: a line `{"step":N,"wall_time":T,<name>:<value>,...}` (keys in
    /// the order given; `wall_time` in seconds since the run started, to the millisecond) and one
    /// TensorBoard event with a scalar per metric. Non-finite values are written as `null` in JSON
    /// (and as themselves to TensorBoard).
    pub fn log(&mut self, step: u64, metrics: &[(&str, f64)]) -> Result<()> {
        for (i, (name, _)) in metrics.iter().enumerate() {
            if name.is_empty() || *name == "step" || *name == "wall_time" {
                return Err(TrainError::invalid(format!(
                    "metric name `{name}` is empty or reserved"
                )));
            }
            if metrics[..i].iter().any(|(n, _)| n == name) {
                return Err(TrainError::invalid(format!("metric `{name}` given twice")));
            }
        }
        let wall = self.wall_time();
        let num = |v: f64| {
            if v.is_finite() {
                serde_json::to_string(&v).expect("finite f64")
            } else {
                "null".into()
            }
        };
        let mut line = String::with_capacity(48 + metrics.len() * 32);
        line.push_str(&format!(
            "{{\"step\":{step},\"wall_time\":{}",
            num((wall * 1e3).round() / 1e3)
        ));
        for (name, value) in metrics {
            line.push(',');
            line.push_str(&serde_json::to_string(name).expect("string serialises"));
            line.push(':');
            line.push_str(&num(*value));
        }
        line.push_str("}\n");
        io(
            &self.path,
            self.file
                .write_all(line.as_bytes())
                .and_then(|_| self.file.flush()),
        )?;
        self.tb.add_scalars(step as i64, unix_time(), metrics)
    }
}

impl Drop for MetricsLogger {
    fn drop(&mut self) {
        // Not while unwinding from a panic: drawing could panic again and abort the process.
        if !std::thread::panicking() {
            self.refresh_curves();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensorboard::{event_files, read_events, SESSION_START};
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Cfg {
        lr: f64,
        steps: u64,
        model: String,
        optim: Inner,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Inner {
        beta1: f64,
        kind: crate::ScheduleKind,
    }

    fn cfg() -> Cfg {
        Cfg {
            lr: 1e-5,
            steps: 10,
            model: "m".into(),
            optim: Inner {
                beta1: 0.9,
                kind: crate::ScheduleKind::Cosine,
            },
        }
    }

    fn tensors(x: f32) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        m.insert(
            "w".to_string(),
            Tensor::new(&[x, x + 1.0], &Device::Cpu).unwrap(),
        );
        m
    }

    fn read_lines(p: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn create_writes_config_and_refuses_an_existing_run() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run");
        let run = RunDir::create(&root, &cfg()).unwrap();
        let text = std::fs::read_to_string(root.join("config.toml")).unwrap();
        assert!(
            text.contains("lr = 0.00001")
                && text.contains("[optim]")
                && text.contains("kind = \"cosine\""),
            "{text}"
        );
        assert_eq!(run.read_config::<Cfg>().unwrap(), cfg());
        let e = RunDir::create(&root, &cfg()).unwrap_err().to_string();
        assert!(e.contains("config.toml") && e.contains("already"), "{e}");
        assert!(RunDir::open_for_resume(&root).is_ok());
        let e = RunDir::open_for_resume(tmp.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.toml"), "{e}");
        // overwriting removes the old run's files only
        std::fs::write(root.join("notes.txt"), "mine").unwrap();
        run.save_checkpoint(1, &tensors(1.0), &HashMap::new(), &serde_json::json!({}))
            .unwrap();
        RunDir::create_overwriting(&root, &cfg()).unwrap();
        assert!(!root.join("checkpoints").exists() && root.join("notes.txt").exists());
        // a configuration TOML cannot hold is reported with the file
        let e = RunDir::create(tmp.path().join("r2"), &vec![1, 2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.toml"), "{e}");
    }

    #[test]
    fn metrics_jsonl_and_tensorboard() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path(), &cfg()).unwrap();
        let mut log = MetricsLogger::new(&run).unwrap();
        log.log(1, &[("loss", 0.5), ("lr", 1e-5)]).unwrap();
        log.log(2, &[("loss", f64::NAN), ("reward/mean", -1.25)])
            .unwrap();
        assert!(log.log(3, &[("step", 1.0)]).is_err());
        assert!(log.log(3, &[("a", 1.0), ("a", 2.0)]).is_err());
        // lines are on disk as soon as `log` returns
        let text = std::fs::read_to_string(run.metrics_path()).unwrap();
        let first = text.lines().next().unwrap();
        assert!(first.starts_with("{\"step\":1,\"wall_time\":"), "{first}");
        assert!(first.ends_with(",\"loss\":0.5,\"lr\":0.00001}"), "{first}");
        let lines = read_lines(&run.metrics_path());
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["loss"], serde_json::Value::Null);
        assert_eq!(lines[1]["reward/mean"], -1.25);
        assert!(lines[1]["wall_time"].as_f64().unwrap() >= 0.0);

        let files = event_files(&run.tb_dir()).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0], log.tb_path());
        let evs = read_events(&files[0]).unwrap();
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(evs[1].step, 1);
        assert_eq!(
            evs[1].scalars,
            vec![("loss".to_string(), 0.5f32), ("lr".to_string(), 1e-5f32)]
        );
        assert_eq!(evs[2].step, 2);
        assert!(evs[2].scalars[0].1.is_nan());
        assert_eq!(evs[2].scalars[1], ("reward/mean".to_string(), -1.25f32));
        assert!(evs[2].wall_time >= evs[1].wall_time && evs[1].wall_time > 1.6e9);
    }

    #[test]
    fn resume_drops_metrics_after_the_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path(), &cfg()).unwrap();
        let mut log = MetricsLogger::new(&run).unwrap();
        for s in 1..=5 {
            log.log(s, &[("loss", s as f64)]).unwrap();
        }
        drop(log);
        // a crash mid-write leaves a torn last line
        let mut f = OpenOptions::new()
            .append(true)
            .open(run.metrics_path())
            .unwrap();
        f.write_all(b"{\"step\":6,\"wall_ti").unwrap();
        drop(f);

        let run = RunDir::open_for_resume(tmp.path()).unwrap();
        let mut log = MetricsLogger::resume(&run, 3).unwrap();
        assert!(
            log.wall_time()
                >= read_lines(&run.metrics_path())[2]["wall_time"]
                    .as_f64()
                    .unwrap()
        );
        log.log(4, &[("loss", 40.0)]).unwrap();
        let steps: Vec<u64> = read_lines(&run.metrics_path())
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        assert_eq!(read_lines(&run.metrics_path())[3]["loss"], 40.0);

        // TensorBoard: a second file, starting with a restart marker at step 4
        let files = event_files(&run.tb_dir()).unwrap();
        assert_eq!(files.len(), 2);
        let evs = read_events(log.tb_path()).unwrap();
        assert_eq!(
            (evs[1].step, evs[1].session_status),
            (4, Some(SESSION_START))
        );
        assert_eq!(evs[2].step, 4);

        // garbage in the middle of the file is an error naming it
        let mut text = std::fs::read_to_string(run.metrics_path()).unwrap();
        text.insert_str(0, "not json\n");
        std::fs::write(run.metrics_path(), text).unwrap();
        let e = MetricsLogger::resume(&run, 3).err().unwrap().to_string();
        assert!(e.contains("metrics.jsonl") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn checkpoints_round_trip_rotate_and_point_latest() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path(), &cfg()).unwrap();
        assert!(run.latest_checkpoint().unwrap().is_none());
        let mut opt = HashMap::new();
        opt.insert("step".to_string(), Tensor::new(7i64, &Device::Cpu).unwrap());
        for step in [10u64, 20, 30] {
            let dir = run
                .save_checkpoint_with(
                    step,
                    &tensors(step as f32),
                    &opt,
                    &serde_json::json!({"rng": {"pos": step}, "epoch": 0}),
                    |d: &Path| {
                        std::fs::write(d.join("config.json"), "{}")
                            .map_err(|e| TrainError::io(d, e))
                    },
                )
                .unwrap();
            assert_eq!(dir, run.checkpoints_dir().join(format!("step-{step}")));
        }
        assert_eq!(run.checkpoint_steps().unwrap(), vec![20, 30]); // keep_last 2
        assert_eq!(
            std::fs::read_to_string(run.checkpoints_dir().join("latest")).unwrap(),
            "step-30\n"
        );
        let ck = run.latest_checkpoint().unwrap().unwrap();
        assert_eq!(ck.step, 30);
        assert_eq!(ck.state["rng"]["pos"], 30);
        assert!(ck.dir.join("config.json").exists());
        let m = ck.load_model(&Device::Cpu).unwrap();
        assert_eq!(m["w"].to_vec1::<f32>().unwrap(), vec![30.0, 31.0]);
        let o = ck.load_optimizer(&Device::Cpu).unwrap();
        assert_eq!(o["step"].to_scalar::<i64>().unwrap(), 7);

        // keep 1, and an empty optimizer state is fine
        let run = RunDir::open_for_resume(tmp.path())
            .unwrap()
            .with_keep_last(1);
        run.save_checkpoint(
            40,
            &tensors(40.0),
            &HashMap::new(),
            &serde_json::json!(null),
        )
        .unwrap();
        assert_eq!(run.checkpoint_steps().unwrap(), vec![40]);
        assert!(run
            .latest_checkpoint()
            .unwrap()
            .unwrap()
            .load_optimizer(&Device::Cpu)
            .unwrap()
            .is_empty());

        // saving the same step again replaces it
        run.save_checkpoint(40, &tensors(41.0), &HashMap::new(), &serde_json::json!(1))
            .unwrap();
        let ck = run.latest_checkpoint().unwrap().unwrap();
        assert_eq!((ck.step, ck.state.clone()), (40, serde_json::json!(1)));
        assert_eq!(
            ck.load_model(&Device::Cpu).unwrap()["w"]
                .to_vec1::<f32>()
                .unwrap(),
            vec![41.0, 42.0]
        );
    }

    #[test]
    fn a_crash_mid_save_never_surfaces() {
        let tmp = tempfile::tempdir().unwrap();
        let run = RunDir::create(tmp.path(), &cfg())
            .unwrap()
            .with_keep_last(3);
        run.save_checkpoint(
            5,
            &tensors(5.0),
            &HashMap::new(),
            &serde_json::json!({"s": 5}),
        )
        .unwrap();
        let ck = run.checkpoints_dir();

        // 1. A killed save: a half-written temporary directory (truncated model, no state.json),
        //    plus a torn temporary `latest`.
        let stray = ck.join(".tmp-step-6-99999");
        std::fs::create_dir(&stray).unwrap();
        std::fs::write(stray.join("model.safetensors"), b"\x10\x00\x00\x00").unwrap();
        std::fs::write(ck.join(".tmp-latest-99999"), "step-6").unwrap();
        let found = run.latest_checkpoint().unwrap().unwrap();
        assert_eq!(
            (found.step, found.state.clone()),
            (5, serde_json::json!({"s": 5}))
        );
        assert_eq!(run.checkpoint_steps().unwrap(), vec![5]);

        // 2. A save that fails in the caller's hook leaves `latest` alone and nothing behind.
        let e = run
            .save_checkpoint_with(
                6,
                &tensors(6.0),
                &HashMap::new(),
                &serde_json::json!({}),
                |_: &Path| Err(TrainError::invalid("disk full (simulated)")),
            )
            .unwrap_err();
        assert!(e.to_string().contains("simulated"));
        assert_eq!(run.latest_checkpoint().unwrap().unwrap().step, 5);
        assert!(!ck
            .join(format!(".tmp-step-6-{}", std::process::id()))
            .exists());

        // 3. The next save removes the strays.
        run.save_checkpoint(
            7,
            &tensors(7.0),
            &HashMap::new(),
            &serde_json::json!({"s": 7}),
        )
        .unwrap();
        assert!(!stray.exists() && !ck.join(".tmp-latest-99999").exists());
        let names: Vec<String> = std::fs::read_dir(&ck)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
        assert_eq!(run.latest_checkpoint().unwrap().unwrap().step, 7);

        // 4. Killed after the rename but before `latest` moved: `latest` still names step-7, the
        //    complete step-9 is an orphan; resuming from 7 and saving 8 deletes it.
        std::fs::create_dir(ck.join("step-9")).unwrap();
        for f in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            std::fs::copy(ck.join("step-7").join(f), ck.join("step-9").join(f)).unwrap();
        }
        assert_eq!(run.latest_checkpoint().unwrap().unwrap().step, 7);
        run.save_checkpoint(8, &tensors(8.0), &HashMap::new(), &serde_json::json!({}))
            .unwrap();
        assert_eq!(run.checkpoint_steps().unwrap(), vec![5, 7, 8]);

        // 5. No `latest` at all (killed before the first one was written): the newest complete
        //    checkpoint is used; a corrupt `latest` is an error naming it.
        std::fs::remove_file(ck.join("latest")).unwrap();
        assert_eq!(run.latest_checkpoint().unwrap().unwrap().step, 8);
        std::fs::write(ck.join("latest"), "garbage").unwrap();
        let e = run.latest_checkpoint().unwrap_err().to_string();
        assert!(e.contains("latest"), "{e}");
    }

    #[test]
    fn corrupt_files_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("model.safetensors");
        std::fs::write(&p, b"\x08\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
        let e = load_safetensors(&p, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("model.safetensors"), "{e}");
        let e = load_safetensors(&tmp.path().join("missing.safetensors"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.safetensors"), "{e}");
    }
}
