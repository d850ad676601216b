//! Where online methods get their rewards: a reward model, the testbed task's gold reward (only
//! when asked for), or a user-supplied scorer (a command, or an HTTP endpoint).
//!
//! Commands and endpoints speak one small JSON protocol, a batch at a time:
//!
//! ```text
//! request:  {"prompts": ["...", ...], "completions": ["...", ...]}
//! response: {"scores": [0.3, -1.2, ...]}      (or a bare array [0.3, -1.2, ...])
//! ```
//!
//! one finite number per completion, in order. A command gets the request on stdin and writes the
//! response to stdout (a fresh process per batch, argv without a shell); an endpoint gets it as
//! the body of a POST with `content-type: application/json`. A timeout, a failed process, an HTTP
//! error status or a response that is not that JSON is retried `retries` times (after
//! `retry_backoff_s`, doubling), then stops the run with an error naming the scorer and what was
//! wrong; checkpoints already written stay as they were.
//!
//! Scores are normalised to (raw - mean) / std when `normalize` is on: with a reward model's saved
//! statistics (`reward_normalization.json`) when it has them, else with statistics measured at
//! start-up on the reference policy's samples, so the reference scores about N(0, 1).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;
use rlhf_data::testbed::Task;
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use crate::reward::{RewardModel, RewardNorm};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A trained reward model (`model`).
    Model,
    /// The testbed task's hidden gold reward (training on it is an explicit choice).
    Gold,
    /// A command (`command`, argv) reading the JSON request on stdin.
    Command,
    /// An HTTP endpoint (`url`) receiving the JSON request in a POST.
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// model (a reward model) | gold (the testbed task's gold reward; explicit opt-in) | command | http.
    pub source: SourceKind,
    /// Reward model directory (`source = "model"`).
    pub model: Option<PathBuf>,
    /// Program and arguments (`source = "command"`), run without a shell.
    pub command: Vec<String>,
    /// Endpoint (`source = "http"`); `https://` needs the `https` build feature.
    pub url: Option<String>,
    /// Per request (command or HTTP), seconds.
    pub timeout_s: f64,
    /// Extra attempts after a failed request before the run stops.
    pub retries: usize,
    /// Wait before the first retry, doubled for each further one.
    pub retry_backoff_s: f64,
    /// Completions per request (and per reward-model forward pass).
    pub batch_size: usize,
    /// Report (raw - mean) / std (see the module docs).
    pub normalize: bool,
    /// Reference samples to measure the statistics on when none are saved.
    pub normalize_samples: usize,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            source: SourceKind::Model,
            model: None,
            command: Vec::new(),
            url: None,
            timeout_s: 30.0,
            retries: 2,
            retry_backoff_s: 0.5,
            batch_size: 64,
            normalize: true,
            normalize_samples: 256,
        }
    }
}

/// One completion to score: text for external scorers, ids for a reward model that shares the
/// policy's tokenizer.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub prompt: &'a str,
    pub completion: &'a str,
    pub prompt_ids: &'a [u32],
    pub completion_ids: &'a [u32],
}

/// Something that scores completions (raw, unnormalised).
pub trait RewardSource {
    /// For messages and logs: "reward model runs/rm/model", "command `python3 score.py`", ...
    fn describe(&self) -> String;
    /// One score per query, in order.
    fn score(&self, queries: &[Query]) -> Result<Vec<f64>>;
    /// The reward model behind this source, if it is one (evaluation reports its mean score).
    fn reward_model(&self) -> Option<&RewardModel> {
        None
    }
}

// ---- reward model ------------------------------------------------------------------------------

pub struct ModelSource {
    pub rm: RewardModel,
    pub path: PathBuf,
    /// The policy's token ids mean the same to the reward model (else the text is re-encoded).
    pub same_tokenizer: bool,
    pub batch_size: usize,
}

impl RewardSource for ModelSource {
    fn describe(&self) -> String {
        format!("reward model {}", self.path.display())
    }
    fn score(&self, queries: &[Query]) -> Result<Vec<f64>> {
        let rows: Vec<(Vec<u32>, Vec<u32>)> = if self.same_tokenizer {
            queries
                .iter()
                .map(|q| (q.prompt_ids.to_vec(), q.completion_ids.to_vec()))
                .collect()
        } else {
            queries
                .iter()
                .map(|q| {
                    let (p, mut c) =
                        rlhf_lm::score::encode_pair(&self.rm.tokenizer, q.prompt, q.completion)?;
                    if let Some(eos) = self.rm.tokenizer.eos_token_id() {
                        c.push(eos);
                    }
                    Ok((p, c))
                })
                .collect::<Result<_>>()?
        };
        Ok(self.rm.score_raw(&rows, self.batch_size)?)
    }
    fn reward_model(&self) -> Option<&RewardModel> {
        Some(&self.rm)
    }
}

// ---- gold --------------------------------------------------------------------------------------

pub struct GoldSource {
    pub task: Box<dyn Task>,
}

impl RewardSource for GoldSource {
    fn describe(&self) -> String {
        format!("gold reward of the `{}` task", self.task.name())
    }
    fn score(&self, queries: &[Query]) -> Result<Vec<f64>> {
        Ok(queries
            .iter()
            .map(|q| self.task.gold(q.prompt, q.completion))
            .collect())
    }
}

// ---- the JSON protocol -------------------------------------------------------------------------

pub fn request_body(queries: &[Query]) -> String {
    serde_json::json!({
        "prompts": queries.iter().map(|q| q.prompt).collect::<Vec<_>>(),
        "completions": queries.iter().map(|q| q.completion).collect::<Vec<_>>(),
    })
    .to_string()
}

/// Parse `{"scores": [...]}` or `[...]` holding exactly `n` finite numbers.
pub fn parse_scores(text: &str, n: usize) -> std::result::Result<Vec<f64>, String> {
    let shown = || {
        let t = text.trim();
        let cut: String = t.chars().take(200).collect();
        if cut.len() < t.len() {
            format!("{cut:?}...")
        } else {
            format!("{cut:?}")
        }
    };
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("response is not JSON ({e}): {}", shown()))?;
    let list = match &value {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => match o.get("scores") {
            Some(serde_json::Value::Array(a)) => a,
            _ => {
                return Err(format!(
                    "expected {{\"scores\": [...]}} or a JSON array, got {}",
                    shown()
                ))
            }
        },
        _ => {
            return Err(format!(
                "expected {{\"scores\": [...]}} or a JSON array, got {}",
                shown()
            ))
        }
    };
    if list.len() != n {
        return Err(format!(
            "{} scores for {n} completions: {}",
            list.len(),
            shown()
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| match v.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(format!("score {i} is not a finite number: {v}")),
        })
        .collect()
}

/// Try `attempt` up to `1 + retries` times with doubling backoff; the error names `what`.
pub(crate) fn with_retries<T>(
    what: &str,
    retries: usize,
    backoff_s: f64,
    mut attempt: impl FnMut() -> std::result::Result<T, String>,
) -> Result<T> {
    let mut wait = backoff_s.max(0.0);
    let mut errors = Vec::new();
    for i in 0..=retries {
        match attempt() {
            Ok(s) => return Ok(s),
            Err(e) => {
                if i < retries {
                    eprintln!("{what}: {e} (retrying, {} left)", retries - i);
                    std::thread::sleep(Duration::from_secs_f64(wait));
                    wait *= 2.0;
                }
                errors.push(e);
            }
        }
    }
    let last = errors.pop().unwrap_or_default();
    Err(TrainError::invalid(format!(
        "{what}: {last} (after {} attempt{})",
        retries + 1,
        if retries == 0 { "" } else { "s" }
    )))
}

// ---- command -----------------------------------------------------------------------------------

pub struct CommandSource {
    pub argv: Vec<String>,
    pub timeout: Duration,
    pub retries: usize,
    pub retry_backoff_s: f64,
}

impl CommandSource {
    fn run_once(&self, body: &str, n: usize) -> std::result::Result<Vec<f64>, String> {
        parse_scores(&self.call(body)?, n)
    }

    /// Run the command once with `body` on stdin; its stdout, or what went wrong.
    pub fn call(&self, body: &str) -> std::result::Result<String, String> {
        let mut command = Command::new(&self.argv[0]);
        command
            .args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A process group of its own, so a timeout stops whatever the command started too (a
        // shell's `sleep`, a server it forked), not only the command itself.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().map_err(|e| format!("cannot start: {e}"))?;
        // Feed stdin and drain stdout/stderr on their own threads so no pipe can fill up and block.
        let mut stdin = child.stdin.take().expect("piped");
        let body = body.to_string();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(body.as_bytes());
        });
        let mut stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let mut stderr = child.stderr.take().expect("piped");
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() >= self.timeout => {
                    kill_group(&mut child);
                    let _ = child.wait();
                    return Err(format!(
                        "timed out after {:.1} s (killed)",
                        self.timeout.as_secs_f64()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(format!("waiting for it failed: {e}")),
            }
        };
        let _ = writer.join();
        let out = reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        if !status.success() {
            // The last 300 characters of stderr.
            let err = err.trim();
            let tail = &err[err.char_indices().rev().nth(299).map_or(0, |(i, _)| i)..];
            return Err(format!("exited with {status}; stderr: {tail:?}"));
        }
        Ok(out)
    }
}

/// SIGKILL a command started in a process group of its own, and everything in that group.
fn kill_group(child: &mut std::process::Child) {
    #[cfg(unix)]
    {
        // The group's id is the child's pid (`process_group(0)`); a negative pid names the group.
        let pgid = child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { libc::kill(-pgid, libc::SIGKILL) } == 0 {
            return;
        }
    }
    let _ = child.kill();
}

impl RewardSource for CommandSource {
    fn describe(&self) -> String {
        format!("reward command `{}`", self.argv.join(" "))
    }
    fn score(&self, queries: &[Query]) -> Result<Vec<f64>> {
        let body = request_body(queries);
        with_retries(&self.describe(), self.retries, self.retry_backoff_s, || {
            self.run_once(&body, queries.len())
        })
    }
}

// ---- HTTP --------------------------------------------------------------------------------------

pub struct HttpSource {
    pub url: String,
    agent: ureq::Agent,
    pub retries: usize,
    pub retry_backoff_s: f64,
}

impl HttpSource {
    /// A JSON endpoint at `url`; `setting` (`reward.url`, `judge.url`) names where the URL came
    /// from in errors.
    pub fn new(
        setting: &str,
        url: &str,
        timeout: Duration,
        retries: usize,
        retry_backoff_s: f64,
    ) -> Result<Self> {
        if url.starts_with("https://") && !cfg!(feature = "https") {
            return Err(TrainError::invalid(format!(
                "{setting} {url}: this build has no TLS; build with `--features rlhf-methods/https`, or serve the endpoint over plain http on localhost"
            )));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(TrainError::invalid(format!(
                "{setting} {url:?}: expected an http:// or https:// URL"
            )));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(HttpSource {
            url: url.to_string(),
            agent,
            retries,
            retry_backoff_s,
        })
    }

    fn post_once(&self, body: &str, n: usize) -> std::result::Result<Vec<f64>, String> {
        parse_scores(&self.post(body)?, n)
    }

    /// POST `body` once; the response text of a successful status, or what went wrong.
    pub fn post(&self, body: &str) -> std::result::Result<String, String> {
        let mut response = self
            .agent
            .post(&self.url)
            .header("content-type", "application/json")
            .send(body)
            .map_err(|e| match e {
                ureq::Error::Timeout(_) => format!("timed out ({e})"),
                e => format!("request failed: {e}"),
            })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("reading the response failed: {e}"))?;
        if !status.is_success() {
            let cut: String = text.chars().take(200).collect();
            return Err(format!("HTTP status {status}: {cut:?}"));
        }
        Ok(text)
    }
}

impl RewardSource for HttpSource {
    fn describe(&self) -> String {
        format!("reward endpoint {}", self.url)
    }
    fn score(&self, queries: &[Query]) -> Result<Vec<f64>> {
        let body = request_body(queries);
        with_retries(&self.describe(), self.retries, self.retry_backoff_s, || {
            self.post_once(&body, queries.len())
        })
    }
}

// ---- the configured scorer ---------------------------------------------------------------------

/// A reward source plus its normalisation: what the rollout engine calls.
pub struct Rewarder {
    pub source: Box<dyn RewardSource>,
    pub norm: Option<RewardNorm>,
    pub batch_size: usize,
}

impl Rewarder {
    /// Swap in another reward model mid-run (a reward model retrained on the policy's own samples,
    /// as RLP does). Only a reward-model source can be swapped; the normalisation is reset to the
    /// new model's saved statistics (re-measure it when the run normalises rewards).
    pub fn replace_reward_model(
        &mut self,
        rm: RewardModel,
        path: PathBuf,
        policy_tokenizer: &rlhf_lm::Tokenizer,
    ) -> Result<()> {
        if self.source.reward_model().is_none() {
            return Err(TrainError::invalid(format!(
                "cannot swap the reward model of {}: only reward.source = \"model\" can be retrained",
                self.source.describe()
            )));
        }
        let same_tokenizer =
            rm.tokenizer.inner().get_vocab(true) == policy_tokenizer.inner().get_vocab(true);
        self.norm = rm.norm;
        self.source = Box::new(ModelSource {
            rm,
            path,
            same_tokenizer,
            batch_size: self.batch_size,
        });
        Ok(())
    }

    /// Build the configured source. `task`: the testbed task (for `gold`); `policy_tokenizer`: to
    /// decide whether a reward model can take the policy's token ids as they are.
    pub fn from_config(
        cfg: &RewardConfig,
        task: Option<&str>,
        task_seed: u64,
        policy_tokenizer: &rlhf_lm::Tokenizer,
        device: &Device,
    ) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(TrainError::invalid("reward.batch_size must be >= 1"));
        }
        let timeout = Duration::from_secs_f64(cfg.timeout_s.max(0.001));
        let mut norm = None;
        let source: Box<dyn RewardSource> = match cfg.source {
            SourceKind::Model => {
                let path = cfg.model.clone().ok_or_else(|| {
                    TrainError::invalid(
                        "reward.source = \"model\" needs reward.model (a reward model directory)",
                    )
                })?;
                let rm = RewardModel::load(&path, device)?;
                norm = rm.norm;
                let same_tokenizer = rm.tokenizer.inner().get_vocab(true)
                    == policy_tokenizer.inner().get_vocab(true);
                if !same_tokenizer {
                    eprintln!(
                        "{}: its tokenizer differs from the policy's; completions are re-encoded from text",
                        path.display()
                    );
                }
                Box::new(ModelSource {
                    rm,
                    path,
                    same_tokenizer,
                    batch_size: cfg.batch_size,
                })
            }
            SourceKind::Gold => {
                let name = task.ok_or_else(|| {
                    TrainError::invalid("reward.source = \"gold\" needs a testbed `task`")
                })?;
                Box::new(GoldSource {
                    task: rlhf_data::testbed::task_by_name(name, task_seed)
                        .map_err(TrainError::Invalid)?,
                })
            }
            SourceKind::Command => {
                if cfg.command.is_empty() {
                    return Err(TrainError::invalid(
                        "reward.source = \"command\" needs reward.command (program and arguments)",
                    ));
                }
                Box::new(CommandSource {
                    argv: cfg.command.clone(),
                    timeout,
                    retries: cfg.retries,
                    retry_backoff_s: cfg.retry_backoff_s,
                })
            }
            SourceKind::Http => {
                let url = cfg.url.as_deref().ok_or_else(|| {
                    TrainError::invalid("reward.source = \"http\" needs reward.url")
                })?;
                Box::new(HttpSource::new(
                    "reward.url",
                    url,
                    timeout,
                    cfg.retries,
                    cfg.retry_backoff_s,
                )?)
            }
        };
        Ok(Rewarder {
            source,
            norm: if cfg.normalize { norm } else { None },
            batch_size: cfg.batch_size,
        })
    }

    /// Raw scores, in requests of `batch_size`.
    pub fn score_raw(&self, queries: &[Query]) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(queries.len());
        for chunk in queries.chunks(self.batch_size.max(1)) {
            let s = self.source.score(chunk)?;
            if s.len() != chunk.len() {
                return Err(TrainError::invalid(format!(
                    "{}: {} scores for {} completions",
                    self.source.describe(),
                    s.len(),
                    chunk.len()
                )));
            }
            out.extend(s);
        }
        Ok(out)
    }

    /// (raw, normalised) scores.
    pub fn score(&self, queries: &[Query]) -> Result<(Vec<f64>, Vec<f64>)> {
        let raw = self.score_raw(queries)?;
        let normed = match &self.norm {
            Some(n) => raw.iter().map(|&r| n.apply(r)).collect(),
            None => raw.clone(),
        };
        Ok((raw, normed))
    }
}
