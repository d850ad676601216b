//! RLP-SPG's synthetic preference generation (Lang et al. 2024, §3.3): for each unlabelled prompt,
//! cluster the policy's n samples by meaning, trust the prompt when the largest cluster holds at
//! least γ of them, and make one pair from it:
//!
//! ```text
//! G  = greedy bidirectional-equivalence clustering of y_1..y_n (Kuhn et al. 2023): y joins the
//!      first cluster whose representative (its first member) r has  r ⇒ y  and  y ⇒ r,
//!      otherwise it opens a new cluster
//! g̃  = the largest cluster (the earliest-formed one on a tie);  c = |g̃| / n
//! skip when c = 1 (every sample equivalent: nothing to reject) or c < γ
//! y_w = the member of g̃ with the highest reward (the first on a tie)
//! y_l = a uniform draw from the samples outside g̃ (seeded)
//! ```
//!
//! The reward-ranked variant (the paper's Table 5 "RM-ranked pair") ignores the clusters: y_w / y_l
//! are the highest / lowest-reward samples, skipped when their texts are equal. Select-all is
//! γ = 0.
//!
//! Equivalence is pluggable ([`Entailment`]): the testbed task's own test
//! (`Task::equivalent`), the built-in normalised-text fallback, or an external NLI scorer (a
//! command or an HTTP endpoint speaking the reward protocol of [`crate::reward_source`]).

use std::collections::HashMap;

use rand::{rngs::StdRng, Rng, SeedableRng};
use rlhf_data::testbed::{normalised_text, Task};
use rlhf_train::{Result, TrainError};
use serde::{Deserialize, Serialize};

use crate::reward_source::{Query, RewardSource};

/// Clusters as lists of sample indices, each in sample order, clusters in order of creation.
pub type Clusters = Vec<Vec<usize>>;

/// Greedy bidirectional clustering: `entails(premise, hypothesis)` for sample indices.
pub fn cluster(
    n: usize,
    mut entails: impl FnMut(usize, usize) -> Result<bool>,
) -> Result<Clusters> {
    let mut clusters: Clusters = Vec::new();
    for i in 0..n {
        let mut placed = false;
        for c in clusters.iter_mut() {
            let rep = c[0];
            if entails(rep, i)? && entails(i, rep)? {
                c.push(i);
                placed = true;
                break;
            }
        }
        if !placed {
            clusters.push(vec![i]);
        }
    }
    Ok(clusters)
}

/// Index of the largest cluster (the earliest on a tie).
pub fn largest(clusters: &Clusters) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, c) in clusters.iter().enumerate() {
        if best.is_none_or(|b| c.len() > clusters[b].len()) {
            best = Some(i);
        }
    }
    best
}

/// |largest cluster| / n (0 for no samples).
pub fn confidence(clusters: &Clusters) -> f64 {
    let n: usize = clusters.iter().map(Vec::len).sum();
    match largest(clusters) {
        Some(b) if n > 0 => clusters[b].len() as f64 / n as f64,
        _ => 0.0,
    }
}

/// How pairs are made from a prompt's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pairing {
    /// RLP-SPG: confident clusters, best of the largest vs a random other.
    Spg,
    /// The highest- vs the lowest-reward sample (no clustering).
    RewardRanked,
}

/// What became of one prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// (chosen, rejected) sample indices, and the prompt's confidence.
    Pair {
        chosen: usize,
        rejected: usize,
        confidence: f64,
    },
    /// Every sample in one cluster (c = 1).
    AllEquivalent,
    /// c < γ.
    LowConfidence(f64),
    /// Reward-ranked: the best and worst samples are the same text (or fewer than 2 samples).
    Tie,
}

/// SPG's selection for one prompt: `clusters` of its samples, their `rewards`, threshold `gamma`;
/// `rng` draws the rejected sample.
pub fn select(clusters: &Clusters, rewards: &[f64], gamma: f64, rng: &mut StdRng) -> Selection {
    let Some(top) = largest(clusters) else {
        return Selection::Tie;
    };
    let c = confidence(clusters);
    let g = &clusters[top];
    if g.len() == rewards.len() {
        return Selection::AllEquivalent;
    }
    if c < gamma {
        return Selection::LowConfidence(c);
    }
    let chosen = g
        .iter()
        .copied()
        .fold(g[0], |b, i| if rewards[i] > rewards[b] { i } else { b });
    let rest: Vec<usize> = (0..rewards.len()).filter(|i| !g.contains(i)).collect();
    let rejected = rest[rng.random_range(0..rest.len())];
    Selection::Pair {
        chosen,
        rejected,
        confidence: c,
    }
}

/// The reward-ranked pair: argmax vs argmin of `rewards` (first on ties), unless the two texts are
/// equal.
pub fn reward_ranked(samples: &[String], rewards: &[f64]) -> Selection {
    if rewards.len() < 2 {
        return Selection::Tie;
    }
    let best = (0..rewards.len()).fold(0, |b, i| if rewards[i] > rewards[b] { i } else { b });
    let worst = (0..rewards.len()).fold(0, |w, i| if rewards[i] < rewards[w] { i } else { w });
    if samples[best] == samples[worst] {
        return Selection::Tie;
    }
    Selection::Pair {
        chosen: best,
        rejected: worst,
        confidence: f64::NAN,
    }
}

// ---- equivalence -------------------------------------------------------------------------------

/// Where the meaning-equivalence test comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EquivalenceKind {
    /// The testbed task's `equivalent` (needs `task`).
    Task,
    /// Built-in fallback: equal after folding case, collapsing whitespace and dropping trailing
    /// sentence punctuation.
    Text,
    /// An NLI command (`command`, argv) speaking the reward protocol (below).
    Command,
    /// An NLI endpoint (`url`) speaking the reward protocol.
    Http,
}

/// The equivalence test of SPG's clustering. External NLI scorers get the reward protocol's
/// request with `prompts` = premises and `completions` = hypotheses, each the prompt followed by a
/// response (as Kuhn et al. feed question + answer), and return one entailment probability per
/// item; `p >= threshold` counts as entailment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EquivalenceConfig {
    /// task | text | command | http.
    pub kind: EquivalenceKind,
    /// `kind = "command"`: program and arguments, run without a shell.
    pub command: Vec<String>,
    /// `kind = "http"`: the endpoint.
    pub url: Option<String>,
    /// Entailment when the scorer's probability is at least this.
    pub threshold: f64,
    /// Seconds per request.
    pub timeout_s: f64,
    /// Extra attempts after a failed request.
    pub retries: usize,
    /// Premise/hypothesis pairs per request.
    pub batch_size: usize,
}

impl Default for EquivalenceConfig {
    fn default() -> Self {
        EquivalenceConfig {
            kind: EquivalenceKind::Task,
            command: Vec::new(),
            url: None,
            threshold: 0.5,
            timeout_s: 60.0,
            retries: 2,
            batch_size: 256,
        }
    }
}

/// A prompt and its samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleGroup {
    pub prompt: String,
    pub samples: Vec<String>,
}

/// Entailment between samples of one prompt, answered for whole data sets at once.
pub enum Entailment<'a> {
    Task(&'a dyn Task),
    Text,
    External {
        source: Box<dyn RewardSource>,
        threshold: f64,
        batch_size: usize,
    },
}

impl<'a> Entailment<'a> {
    pub fn from_config(cfg: &EquivalenceConfig, task: Option<&'a dyn Task>) -> Result<Self> {
        use std::time::Duration;
        if !(cfg.threshold.is_finite() && (0.0..=1.0).contains(&cfg.threshold)) {
            return Err(TrainError::invalid(
                "equivalence.threshold must be in [0, 1]",
            ));
        }
        Ok(match cfg.kind {
            EquivalenceKind::Task => Entailment::Task(task.ok_or_else(|| {
                TrainError::invalid(
                    "equivalence.kind = \"task\" needs a testbed `task`; use \"text\", \"command\" or \"http\" for other data",
                )
            })?),
            EquivalenceKind::Text => Entailment::Text,
            EquivalenceKind::Command => {
                if cfg.command.is_empty() {
                    return Err(TrainError::invalid(
                        "equivalence.kind = \"command\" needs equivalence.command (argv)",
                    ));
                }
                Entailment::External {
                    source: Box::new(crate::reward_source::CommandSource {
                        argv: cfg.command.clone(),
                        timeout: Duration::from_secs_f64(cfg.timeout_s.max(0.001)),
                        retries: cfg.retries,
                        retry_backoff_s: 0.5,
                    }),
                    threshold: cfg.threshold,
                    batch_size: cfg.batch_size.max(1),
                }
            }
            EquivalenceKind::Http => {
                let url = cfg.url.as_deref().ok_or_else(|| {
                    TrainError::invalid("equivalence.kind = \"http\" needs equivalence.url")
                })?;
                Entailment::External {
                    source: Box::new(crate::reward_source::HttpSource::new(
                        "equivalence.url",
                        url,
                        Duration::from_secs_f64(cfg.timeout_s.max(0.001)),
                        cfg.retries,
                        0.5,
                    )?),
                    threshold: cfg.threshold,
                    batch_size: cfg.batch_size.max(1),
                }
            }
        })
    }

    /// Cluster every group's samples. External scorers get every ordered pair of distinct texts
    /// of a group in batched requests up front (equal texts entail each other without asking).
    pub fn cluster_all(&self, groups: &[SampleGroup]) -> Result<Vec<Clusters>> {
        let answers: HashMap<(usize, usize, usize), bool> = match self {
            Entailment::External {
                source,
                threshold,
                batch_size,
            } => {
                let mut keys = Vec::new();
                let mut texts: Vec<(String, String)> = Vec::new();
                for (g, group) in groups.iter().enumerate() {
                    for i in 0..group.samples.len() {
                        for j in 0..group.samples.len() {
                            if i != j && group.samples[i] != group.samples[j] {
                                keys.push((g, i, j));
                                texts.push((
                                    format!("{} {}", group.prompt, group.samples[i].trim()),
                                    format!("{} {}", group.prompt, group.samples[j].trim()),
                                ));
                            }
                        }
                    }
                }
                let mut probs = Vec::with_capacity(texts.len());
                for chunk in texts.chunks(*batch_size) {
                    let queries: Vec<Query> = chunk
                        .iter()
                        .map(|(p, h)| Query {
                            prompt: p,
                            completion: h,
                            prompt_ids: &[],
                            completion_ids: &[],
                        })
                        .collect();
                    probs.extend(source.score(&queries)?);
                }
                keys.into_iter()
                    .zip(probs)
                    .map(|(k, p)| (k, p >= *threshold))
                    .collect()
            }
            _ => HashMap::new(),
        };
        groups
            .iter()
            .enumerate()
            .map(|(g, group)| {
                let s = &group.samples;
                cluster(s.len(), |i, j| {
                    Ok(match self {
                        Entailment::Task(t) => t.equivalent(&group.prompt, &s[i], &s[j]),
                        Entailment::Text => normalised_text(&s[i]) == normalised_text(&s[j]),
                        Entailment::External { .. } => {
                            s[i] == s[j] || answers.get(&(g, i, j)).copied().unwrap_or(false)
                        }
                    })
                })
            })
            .collect()
    }
}

/// The seeded stream of prompt `g`'s rejected-sample draw.
pub fn prompt_rng(seed: u64, g: usize) -> StdRng {
    StdRng::seed_from_u64(rlhf_train::rng::stream_seed(seed, "spg").wrapping_add(g as u64))
}
