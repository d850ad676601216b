//! The built-in testbed (see `spec/testbed.md`): small tasks with a known gold reward, simulated
//! annotators that give noisy pairwise preferences from it, a word-level tokenizer covering every
//! task, and writers for the same JSONL files users bring.
//!
//! Everything is deterministic from a seed (`StdRng::seed_from_u64`).
//!
//! Text is plain words separated by single spaces, punctuation as separate words
//! (`the plot was dull .`). Responses carry no EOS marker.
//!
//! Tasks ([`task_by_name`]):
//! - `sentiment` ([`sentiment`]): continue a review; gold in (-3, 3) = sentiment + fluency - length.
//! - `arithmetic` ([`arithmetic`]): digit-by-digit sums and products; gold in [-0.5, 1].
//! - `translate` ([`translate`]): a toy language pair; gold = chrF in [0, 1].
//!
//! Multi-turn tasks (not [`Task`]s; [`task_by_name`] refuses them):
//! - `dialogue` ([`dialogue`]): a 16-animal guessing game against a scripted user, for
//!   `rlhf dialogue-rl` and `rlhf compare-dialogue`; gold in [-0.6, 0.9] = win - 0.1 per assistant
//!   turn. It has its own tokenizer ([`dialogue::tokenizer`]); its words are not in [`vocabulary`].

pub mod arithmetic;
pub mod chrf;
pub mod dialogue;
mod grammar;
pub mod sentiment;
pub mod translate;

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

pub use arithmetic::ArithmeticTask;
pub use chrf::chrf;
pub use sentiment::SentimentTask;
pub use translate::TranslateTask;

pub trait Task: Send + Sync {
    fn name(&self) -> &'static str;
    fn train_prompts(&self) -> &[String];
    /// Disjoint from the train prompts.
    fn eval_prompts(&self) -> &[String];
    /// SFT corpus: (prompt, response) of mediocre quality, so there is room to improve.
    /// Responses carry no EOS marker.
    fn demonstrations(&self) -> &[(String, String)];
    /// The hidden true preference; each task's module documents its scale.
    fn gold(&self, prompt: &str, response: &str) -> f64;
    /// Max response length in words that makes sense for this task (for generation limits).
    fn max_response_words(&self) -> usize;
    /// The correct response, for tasks that have one (arithmetic, translate).
    fn reference(&self, _prompt: &str) -> Option<String> {
        None
    }
    /// A Bradley-Terry temperature suited to this task's gold scale (sentiment 1, arithmetic 0.25,
    /// translate 0.1): with it, a clearly better response wins about 88-95% of noise-free
    /// comparisons (sentiment: +2 gold, a fluent positive against a fluent neutral continuation;
    /// arithmetic: +0.75, right against one of two digits wrong; translate: +0.2 chrF).
    /// [`Annotator::for_task`] uses it; [`Annotator::new`] uses 1.
    fn annotator_temperature(&self) -> f64 {
        1.0
    }
    /// Whether two responses to `prompt` mean the same thing (RLP-SPG's clustering; the paper used
    /// bidirectional entailment under an NLI model). Symmetric and reflexive. The default is
    /// [`normalised_text`] equality; each task overrides it with its own notion of meaning:
    /// arithmetic, the same stated answer; sentiment, the same verdict on the film; translate, the
    /// same words in any order.
    fn equivalent(&self, _prompt: &str, a: &str, b: &str) -> bool {
        normalised_text(a) == normalised_text(b)
    }
}

/// Text with case folded, runs of whitespace collapsed and trailing sentence punctuation
/// (`.`, `!`, `?`) removed: the built-in meaning-equivalence fallback compares these.
pub fn normalised_text(s: &str) -> String {
    let lower = s.to_lowercase();
    let mut words: Vec<&str> = lower.split_whitespace().collect();
    while let Some(last) = words.last_mut() {
        let t = last.trim_end_matches(['.', '!', '?']);
        if t.is_empty() {
            words.pop();
        } else {
            *last = t;
            break;
        }
    }
    words.join(" ")
}

/// How many prompts and demonstrations a task generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSize {
    pub train_prompts: usize,
    pub eval_prompts: usize,
    pub demonstrations: usize,
}

impl Default for TaskSize {
    fn default() -> Self {
        TaskSize {
            train_prompts: 2000,
            eval_prompts: 200,
            demonstrations: 2000,
        }
    }
}

pub const TASK_NAMES: &[&str] = &["sentiment", "arithmetic", "translate"];

/// A task with the default sizes.
pub fn task_by_name(name: &str, seed: u64) -> Result<Box<dyn Task>, String> {
    task_by_name_sized(name, seed, TaskSize::default())
}

pub fn task_by_name_sized(name: &str, seed: u64, size: TaskSize) -> Result<Box<dyn Task>, String> {
    if name == "dialogue" {
        return Err("`dialogue` is a multi-turn task used by `rlhf dialogue-rl` / `rlhf compare-dialogue`, not a single-turn task (see `rlhf_data::testbed::dialogue`)".into());
    }
    if size.train_prompts == 0 || size.eval_prompts == 0 {
        return Err("a testbed task needs at least one train and one eval prompt".into());
    }
    Ok(match name {
        "sentiment" => Box::new(SentimentTask::new(seed, size)),
        "arithmetic" => Box::new(ArithmeticTask::new(seed, size)),
        "translate" => Box::new(TranslateTask::new(seed, size)),
        other => {
            return Err(format!(
                "unknown testbed task `{other}` (known: {})",
                TASK_NAMES.join(", ")
            ));
        }
    })
}

/// Draw `eval_prompts` distinct prompts, then `train_prompts` prompts (repeats allowed) that are
/// not eval prompts.
pub(crate) fn split_prompts(
    rng: &mut StdRng,
    size: &TaskSize,
    mut sample: impl FnMut(&mut StdRng) -> String,
) -> (Vec<String>, Vec<String>) {
    assert!(
        size.train_prompts > 0 && size.eval_prompts > 0,
        "a task needs train and eval prompts"
    );
    let limit = 1000 * (size.train_prompts + size.eval_prompts) + 100_000;
    let mut tries = 0;
    let mut seen = HashSet::new();
    let mut eval = Vec::with_capacity(size.eval_prompts);
    while eval.len() < size.eval_prompts {
        let p = sample(rng);
        if seen.insert(p.clone()) {
            eval.push(p);
        }
        tries += 1;
        assert!(
            tries < limit,
            "the prompt grammar cannot produce {} distinct prompts",
            size.eval_prompts
        );
    }
    let mut train = Vec::with_capacity(size.train_prompts);
    while train.len() < size.train_prompts {
        let p = sample(rng);
        if !seen.contains(&p) {
            train.push(p);
        }
        tries += 1;
        assert!(
            tries < limit,
            "the prompt grammar has too few prompts beyond the eval split"
        );
    }
    (train, eval)
}

/// A simulated annotator: Bradley-Terry on gold, then the label flipped with probability `noise`.
pub struct Annotator {
    /// Probability of flipping the label (AlpacaFarm used 0.25).
    pub noise: f64,
    rng: StdRng,
    /// Bradley-Terry temperature: P(a > b) = sigmoid((gold_a - gold_b) / temperature); 0 means
    /// the higher gold always wins (ties: a coin flip).
    pub temperature: f64,
}

impl Annotator {
    /// Default noise in AlpacaFarm's setting.
    pub const DEFAULT_NOISE: f64 = 0.25;

    /// Temperature 1.
    pub fn new(noise: f64, seed: u64) -> Self {
        Annotator {
            noise,
            rng: StdRng::seed_from_u64(seed),
            temperature: 1.0,
        }
    }

    /// Temperature from [`Task::annotator_temperature`].
    pub fn for_task(task: &dyn Task, noise: f64, seed: u64) -> Self {
        let mut a = Annotator::new(noise, seed);
        a.temperature = task.annotator_temperature();
        a
    }

    /// Probability that a response with gold `gold_a` beats one with `gold_b`, before noise.
    pub fn p_prefer(&self, gold_a: f64, gold_b: f64) -> f64 {
        let d = gold_a - gold_b;
        if self.temperature <= 0.0 {
            return if d > 0.0 {
                1.0
            } else if d < 0.0 {
                0.0
            } else {
                0.5
            };
        }
        1.0 / (1.0 + (-d / self.temperature).exp())
    }

    /// Whether `a` is preferred to `b` given their golds. Always draws two numbers from the
    /// annotator's stream, so a sequence of calls is reproducible.
    pub fn prefer_gold(&mut self, gold_a: f64, gold_b: f64) -> bool {
        let p = self.p_prefer(gold_a, gold_b);
        let label = self.rng.random::<f64>() < p;
        let flip = self.rng.random::<f64>() < self.noise;
        label != flip
    }

    /// True if `a` is preferred to `b` as a response to `prompt`.
    pub fn prefer(&mut self, task: &dyn Task, prompt: &str, a: &str, b: &str) -> bool {
        let (ga, gb) = (task.gold(prompt, a), task.gold(prompt, b));
        self.prefer_gold(ga, gb)
    }
}

/// Special tokens of the testbed tokenizer, with ids 0..=3.
pub const PAD: &str = "<pad>";
pub const BOS: &str = "<s>";
pub const EOS: &str = "</s>";
pub const UNK: &str = "<unk>";
pub const SPECIAL_TOKENS: [&str; 4] = [PAD, BOS, EOS, UNK];

/// Every word any task can produce, sorted and without duplicates (ids 4.. in the tokenizer).
pub fn vocabulary() -> Vec<String> {
    let mut all = BTreeSet::new();
    all.extend(sentiment::vocabulary());
    all.extend(arithmetic::vocabulary());
    all.extend(translate::vocabulary());
    all.into_iter().collect()
}

/// The word-level tokenizer of the testbed as a `tokenizers::Tokenizer`: one tokenizer for all
/// tasks. Ids: `<pad>` 0, `<s>` 1, `</s>` 2, `<unk>` 3 (special added tokens), then
/// [`vocabulary`] in sorted order. Splits on whitespace only; encoding with special tokens puts
/// `<s>` first (as Llama tokenizers do), never `</s>`; decoding joins tokens with single spaces,
/// so `decode(encode(text))` gives back any task text.
pub fn testbed_tokenizers_inner() -> tokenizers::Tokenizer {
    word_level_tokenizer(vocabulary())
}

/// A word-level tokenizer over `vocabulary` (assumed sorted and distinct, without the special
/// tokens), built as [`testbed_tokenizers_inner`] describes: the special tokens with ids 0..=3,
/// then the words in the given order from id 4.
pub(crate) fn word_level_tokenizer(vocabulary: Vec<String>) -> tokenizers::Tokenizer {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(t.to_string(), json!(id));
        added.push(json!({
            "id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true,
        }));
    }
    for (i, w) in vocabulary.into_iter().enumerate() {
        vocab.insert(w, json!(SPECIAL_TOKENS.len() + i));
    }
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": BOS, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": BOS, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}},
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK},
    });
    serde_json::from_value(spec).expect("a word-level tokenizer spec is valid")
}

/// The testbed tokenizer wrapped with its special tokens (BOS `<s>`, EOS `</s>`, pad `<pad>`).
pub fn testbed_tokenizer() -> rlhf_lm::Tokenizer {
    rlhf_lm::Tokenizer::from_tokenizers(
        testbed_tokenizers_inner(),
        Some(BOS.to_string()),
        Some(EOS.to_string()),
        Some(PAD.to_string()),
    )
    .expect("the testbed tokenizer names tokens in its vocabulary")
}

/// The tokenizer for a task: the one testbed tokenizer, which covers every task.
pub fn tokenizer_for(_task: &dyn Task) -> rlhf_lm::Tokenizer {
    testbed_tokenizer()
}

/// Paths of the files [`write_task_files`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFiles {
    /// `sft.jsonl`: `{"prompt", "completion"}` per demonstration.
    pub sft: PathBuf,
    /// `prompts_train.jsonl`: `{"prompt"}`.
    pub prompts_train: PathBuf,
    /// `prompts_eval.jsonl`: `{"prompt"}`.
    pub prompts_eval: PathBuf,
}

/// Write a task's data as TRL-format JSONL into `dir` (created if needed). As in TRL's
/// prompt-completion data sets, `completion` starts with a space, so `prompt + completion` is the
/// full text; the word-level tokenizer ignores the space, so encoding the completion alone gives
/// the same ids as encoding the demonstration's response.
pub fn write_task_files(task: &dyn Task, dir: &Path) -> std::io::Result<TaskFiles> {
    std::fs::create_dir_all(dir)?;
    let files = TaskFiles {
        sft: dir.join("sft.jsonl"),
        prompts_train: dir.join("prompts_train.jsonl"),
        prompts_eval: dir.join("prompts_eval.jsonl"),
    };
    write_jsonl(
        &files.sft,
        task.demonstrations()
            .iter()
            .map(|(p, r)| json!({"prompt": p, "completion": format!(" {r}")})),
    )?;
    write_jsonl(
        &files.prompts_train,
        task.train_prompts().iter().map(|p| json!({"prompt": p})),
    )?;
    write_jsonl(
        &files.prompts_eval,
        task.eval_prompts().iter().map(|p| json!({"prompt": p})),
    )?;
    Ok(files)
}

fn write_jsonl(
    path: &Path,
    records: impl Iterator<Item = serde_json::Value>,
) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in records {
        serde_json::to_writer(&mut out, &r)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}
