//! The model worker behind `rlhf serve`.
//!
//! One thread owns the model and does all of its work: a `Llama` is not meant to run two forward
//! passes at once, and candle already spreads each pass over the CPU cores, so a second model
//! thread would only contend for them. HTTP handlers hand [`Job`]s to the worker through a bounded
//! queue ([`Engine::submit`] refuses when it is full, which the server turns into a 503) and await
//! the answer on a one-shot channel.
//!
//! Each round, the worker takes the jobs that are waiting (up to `max_batch`), groups those whose
//! sampling settings allow sharing a batch ([`BatchKey`]), and runs each group as one batched
//! [`generate`] call, so concurrent requests decode together instead of one after another.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf_lm::batch::TokenBatch;
use rlhf_lm::generate::{generate_with, FinishReason, SamplingParams};
use rlhf_lm::llama::Llama;
use rlhf_lm::Pretrained;
use tokio::sync::oneshot;

/// How a job's randomness constrains which other jobs may share its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Greedy decoding: a row's tokens do not depend on the other rows, so any job with the same
    /// settings may join.
    Deterministic,
    /// Sampling with a client-given seed. `generate` draws every row's randomness from one stream,
    /// so another job in the batch would change this job's samples: it runs alone, and the same
    /// request with the same seed gets the same text.
    SeededAlone,
    /// Sampling without a seed: any stream will do, so jobs with equal settings share a batch and
    /// a seed drawn for it.
    FreshSeed,
}

/// Which log-probs a job wants back, all at temperature 1 (the model's own distribution).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobRequest {
    /// Also score the prompt's tokens (from its second token on): `echo` in `/v1/completions`.
    pub include_prompt: bool,
    /// How many most likely alternatives to report at each position.
    pub top: usize,
}

/// One request's model work.
pub struct Job {
    /// Prompt token ids, one row per completion wanted (a request's `n` samples are `n` rows).
    pub rows: Vec<Vec<u32>>,
    /// Sampling settings; `seed` is ignored unless `sharing` is [`Sharing::SeededAlone`].
    pub params: SamplingParams,
    pub sharing: Sharing,
    pub logprobs: Option<LogprobRequest>,
    pub reply: oneshot::Sender<Result<Vec<RowOutput>, String>>,
    /// Each token of the job's first row as it is sampled (streaming), before `reply` answers.
    pub progress: Option<tokio::sync::mpsc::UnboundedSender<u32>>,
}

/// The log-prob of one token and the most likely tokens at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// Up to `top` (token, log-prob) pairs, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What came out for one row of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct RowOutput {
    /// Generated tokens (the EOS or stop-completing token included, as `generate` returns them).
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    /// With a [`LogprobRequest`]: one entry per scored token, the prompt's (from its second
    /// token) first when asked, then every generated token.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Counters for `GET /stats`: enough to see whether requests are being batched.
#[derive(Default)]
pub struct Stats {
    pub jobs: AtomicU64,
    pub generate_calls: AtomicU64,
    /// The most jobs that shared one batched generation.
    pub largest_shared_batch: AtomicU64,
    pub queued: AtomicU64,
}

/// Why a job was not taken.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue holds `max_queue` waiting jobs already.
    QueueFull,
    /// The worker has stopped (it only does so if the model failed to load).
    Stopped,
}

/// The handle the HTTP side holds: a bounded queue into the worker thread.
pub struct Engine {
    queue: SyncSender<Job>,
    pub stats: Arc<Stats>,
}

impl Engine {
    /// Build the model on a new worker thread and start taking jobs. Returns once the model is
    /// ready, or with the reason it could not be built.
    pub fn start(
        pretrained: Arc<Pretrained>,
        device: Device,
        max_batch: usize,
        max_queue: usize,
    ) -> Result<Engine> {
        let (queue, jobs) = sync_channel::<Job>(max_queue.max(1));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let stats = Arc::new(Stats::default());
        let worker_stats = stats.clone();
        std::thread::Builder::new()
            .name("rlhf-serve-model".into())
            .spawn(move || {
                let model = match pretrained.model(&device) {
                    Ok(m) => m.detached(),
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!(e).context("building the model")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                Worker {
                    model,
                    pretrained,
                    max_batch: max_batch.max(1),
                    stats: worker_stats,
                    seeds: StdRng::from_os_rng(),
                }
                .run(jobs);
            })
            .context("starting the model thread")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the model thread stopped while loading"))??;
        Ok(Engine { queue, stats })
    }

    /// Queue a job without waiting: a full queue is refused at once rather than making the
    /// client wait for an unbounded time.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        // Count first: the worker may take the job (and decrement) before `try_send` returns.
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.queue.try_send(job).map_err(|e| {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                TrySendError::Full(_) => SubmitError::QueueFull,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            }
        })
    }
}

/// Jobs that may run as one `generate` call: equal settings, and randomness that allows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum BatchKey {
    /// The sampling settings (seed left out), as JSON since `f64` fields are not `Hash`.
    Shared(String),
    /// A seeded sampling job, by its position in the round.
    Alone(usize),
}

fn batch_key(job: &Job, position: usize) -> BatchKey {
    match job.sharing {
        Sharing::SeededAlone => BatchKey::Alone(position),
        Sharing::Deterministic | Sharing::FreshSeed => {
            let settings = SamplingParams {
                seed: 0,
                ..job.params.clone()
            };
            BatchKey::Shared(serde_json::to_string(&settings).unwrap_or_default())
        }
    }
}

/// The seed for the `chunk`-th `generate` call of one group: the group's own seed for the first,
/// so a request that fits one call samples exactly as `rlhf generate --seed` does; distinct
/// seeds after it, so chunks of the same prompt do not repeat each other's samples.
fn chunk_seed(seed: u64, chunk: usize) -> u64 {
    seed.wrapping_add((chunk as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

struct Worker {
    model: Llama,
    pretrained: Arc<Pretrained>,
    max_batch: usize,
    stats: Arc<Stats>,
    /// Seeds for batches of unseeded sampling jobs.
    seeds: StdRng,
}

impl Worker {
    /// Take rounds of waiting jobs until every sender is gone.
    fn run(mut self, jobs: Receiver<Job>) {
        while let Ok(first) = jobs.recv() {
            let mut round = vec![first];
            while round.len() < self.max_batch {
                match jobs.try_recv() {
                    Ok(job) => round.push(job),
                    Err(_) => break,
                }
            }
            self.stats
                .queued
                .fetch_sub(round.len() as u64, Ordering::Relaxed);
            // A client that has gone away no longer needs its job.
            round.retain(|job| !job.reply.is_closed());
            for group in group_by_key(round) {
                self.run_group(group);
            }
        }
    }

    /// Generate for a group of compatible jobs in one batch (chunks of `max_batch` rows), then
    /// score what each job asked log-probs for, and answer every job.
    fn run_group(&mut self, jobs: Vec<Job>) {
        let mut params = jobs[0].params.clone();
        if jobs[0].sharing == Sharing::FreshSeed {
            params.seed = self.seeds.random();
        }
        let rows: Vec<Vec<u32>> = jobs.iter().flat_map(|j| j.rows.iter().cloned()).collect();
        // Row -> the stream its tokens go to (a streaming job's first row).
        let streams: Vec<Option<tokio::sync::mpsc::UnboundedSender<u32>>> = jobs
            .iter()
            .flat_map(|j| (0..j.rows.len()).map(move |i| j.progress.clone().filter(|_| i == 0)))
            .collect();
        self.stats
            .largest_shared_batch
            .fetch_max(jobs.len() as u64, Ordering::Relaxed);
        let samples = guarded(|| {
            let mut samples = Vec::with_capacity(rows.len());
            for (chunk_no, chunk) in rows.chunks(self.max_batch).enumerate() {
                let chunk_params = SamplingParams {
                    seed: chunk_seed(params.seed, chunk_no),
                    ..params.clone()
                };
                self.stats.generate_calls.fetch_add(1, Ordering::Relaxed);
                let first = chunk_no * self.max_batch;
                samples.extend(generate_with(
                    &self.model,
                    chunk,
                    self.pretrained.pad_id(),
                    &chunk_params,
                    Some(&self.pretrained.tokenizer),
                    &mut |row, token| {
                        if let Some(tx) = &streams[first + row] {
                            // A closed stream (client gone) is not the worker's error.
                            let _ = tx.send(token);
                        }
                    },
                )?);
            }
            Ok(samples)
        });
        let mut samples = match samples {
            Ok(s) => s.into_iter(),
            Err(message) => {
                for job in jobs {
                    let _ = job.reply.send(Err(message.clone()));
                }
                return;
            }
        };
        for job in jobs {
            let mine: Vec<_> = samples.by_ref().take(job.rows.len()).collect();
            let answer = guarded(|| {
                mine.into_iter()
                    .zip(&job.rows)
                    .map(|(sample, prompt)| {
                        let logprobs = match job.logprobs {
                            Some(want) => Some(self.score_row(prompt, &sample.tokens, want)?),
                            None => None,
                        };
                        Ok(RowOutput {
                            tokens: sample.tokens,
                            finish: sample.finish,
                            logprobs,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            });
            self.stats.jobs.fetch_add(1, Ordering::Relaxed);
            let _ = job.reply.send(answer);
        }
    }

    /// Log-probs (and top alternatives) of the generated tokens, and of the prompt's when asked,
    /// from one forward pass over prompt + completion.
    fn score_row(
        &self,
        prompt: &[u32],
        completion: &[u32],
        want: LogprobRequest,
    ) -> Result<Vec<TokenLogprob>> {
        let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        let first_target = if want.include_prompt { 1 } else { prompt.len() };
        position_logprobs(&self.model, &ids, first_target, want.top)
    }
}

/// Run `work`, turning an error or a panic into a message for the client, so that no input can
/// take the worker (and with it the server) down.
fn guarded<T>(work: impl FnOnce() -> Result<T>) -> Result<T, String> {
    match rlhf_lm::error::without_panics(work) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(why) => Err(format!("the model failed on this request: {why}")),
    }
}

/// Split a round into groups of jobs that may share a batch, in order of each group's first job.
fn group_by_key(round: Vec<Job>) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    let mut index: HashMap<BatchKey, usize> = HashMap::new();
    for (position, job) in round.into_iter().enumerate() {
        let key = batch_key(&job, position);
        match index.get(&key) {
            Some(&g) => groups[g].push(job),
            None => {
                index.insert(key, groups.len());
                groups.push(vec![job]);
            }
        }
    }
    groups
}

/// log p(ids[j] | ids[..j]) for every j from `first_target` on, with the `top` most likely tokens
/// at each of those positions. One unpadded forward pass; the log-softmax is taken on the host in
/// f64 over the full vocabulary (no temperature, no truncation).
pub fn position_logprobs(
    model: &Llama,
    ids: &[u32],
    first_target: usize,
    top: usize,
) -> Result<Vec<TokenLogprob>> {
    let first_target = first_target.max(1);
    if first_target >= ids.len() {
        return Ok(Vec::new());
    }
    let batch = TokenBatch::right_padded(&[ids.to_vec()], 0, model.device())?;
    let hidden = model.hidden_states(&batch.ids, &batch.positions, &batch.mask, None)?;
    // Hidden state j predicts token j + 1: only the positions whose targets are asked for go
    // through the LM head.
    let count = ids.len() - first_target;
    let logits = model
        .logits(&hidden.narrow(1, first_target - 1, count)?.contiguous()?)?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    Ok(logits
        .iter()
        .zip(&ids[first_target..])
        .map(|(row, &target)| logprob_of(row, target, top))
        .collect())
}

/// The log-softmax of one row of logits at `target`, with its `top` largest entries.
fn logprob_of(logits: &[f32], target: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum_exp: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_z = max + sum_exp.ln();
    let logprob = |id: usize| (logits[id] as f64 - log_z) as f32;
    let mut best: Vec<usize> = (0..logits.len()).collect();
    let k = top.min(logits.len());
    // Most likely first; equal logits in id order, so the answer does not depend on the sort.
    let by_likelihood = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k > 0 && k < best.len() {
        best.select_nth_unstable_by(k - 1, by_likelihood);
    }
    best.truncate(k);
    best.sort_unstable_by(by_likelihood);
    TokenLogprob {
        token: target,
        logprob: logprob(target as usize),
        top: best
            .into_iter()
            .map(|id| (id as u32, logprob(id)))
            .collect(),
    }
}

/// OpenAI's finish reasons: an EOS token and a stop string are both "stop".
pub fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Eos | FinishReason::StopString => "stop",
        FinishReason::Length => "length",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprob_of_normalises_and_orders_alternatives() {
        let row = [1.0f32, 3.0, 2.0, 3.0];
        let lp = logprob_of(&row, 2, 3);
        let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        assert!((lp.logprob as f64 - (2.0 - z)).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![1, 3, 2], "ties in id order, most likely first");
        assert!(logprob_of(&row, 0, 0).top.is_empty());
        assert_eq!(logprob_of(&row, 0, 10).top.len(), 4);
    }

    #[test]
    fn first_chunk_keeps_the_requested_seed() {
        assert_eq!(chunk_seed(42, 0), 42);
        assert_ne!(chunk_seed(42, 1), 42);
    }
}
