//! `sentiment`: continue the start of a short film review (TRL's IMDB demo in miniature).
//!
//! Prompts and continuations come from one stochastic grammar ([`GRAMMAR`]): a prompt such as
//! `review : the acting in this film was` and a continuation such as `really charming , but the
//! ending was dull .`. Demonstrations are grammar samples whose adjectives are drawn evenly from
//! positive, negative and neutral words, so an SFT policy is fluent but only middling on gold.
//!
//! Gold ([`SentimentTask::gold_parts`]) is `3 tanh(raw / 3)` with `raw = sentiment + fluency + length`:
//! - sentiment: `2 tanh(s / 2.5)`, `s` summing the lexicon values of the words (±1, ±1.5 for strong
//!   words; `very`/`really`/`quite`/`truly` make the next one count 1.5 times, `not` -0.5 times).
//!   In (-2, 2), saturating, so piling on positive words gains little.
//! - fluency: -1 per word bigram the grammar cannot produce (the prompt's last word included, so the
//!   first word must fit the prompt), -0.75 per repeat of a content word already in the response,
//!   -1 when the response is not a complete continuation the grammar derives (this covers a
//!   missing final `.` and bigram-valid but ungrammatical chains such as `great , and fun , and
//!   superb .`), and -1 more for an empty response.
//! - length: -0.3 per word past [`LENGTH_CAP`] (14; the grammar's longest continuation has 13).
//!
//! So gold lies in (-3, 3); in practice a fluent, strongly positive continuation scores about 1.7,
//! a fluent neutral one about 0, a fluent negative one down to about -1.7, and `great great great
//! great` about -2.7.

use std::collections::{HashMap, HashSet};

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::grammar::Grammar;
use super::{split_prompts, Task, TaskSize};

/// The review grammar. `REVIEW` is a prompt followed by its continuation.
pub const GRAMMAR: &str = "
REVIEW -> PROMPT CONT
PROMPT -> [1] review : BODY | [3] review : OPENER BODY
OPENER -> honestly , | to be fair , | all in all , | in my opinion , | as expected , | after two hours , | to be honest ,
BODY -> [4] the ASPECT in this MEDIUM was | [3] i thought the ASPECT was | [1] this MEDIUM is
BODY -> [4] the ASPECT of the MEDIUM felt | [3] i found the ASPECT | [3] my friend said the ASPECT was
BODY -> [1] the MEDIUM itself seemed
ASPECT -> acting | plot | story | music | dialogue | ending | cast | script | pacing | humor
ASPECT -> soundtrack | direction | lead | villain | setting | editing
MEDIUM -> film | movie | show | sequel
CONT -> [3] PRED . | [2] PRED , TAIL .
PRED -> [3] ADJP | [1] ADJP and ADJP
ADJP -> [4] ADJ | [2] INT ADJ | [1] not ADJ
ADJ -> POS | NEG | NEU
POS -> good | great | fun | charming | moving | clever | beautiful | wonderful | brilliant | superb
NEG -> bad | dull | boring | weak | messy | bland | tedious | clumsy | awful | terrible
NEU -> long | short | quiet | simple | ordinary | serious | dark | loud | unusual | familiar
INT -> very | really | quite | truly
TAIL -> CONJ CLAUSE
CONJ -> and | but | because
CLAUSE -> [3] the ASPECT was ADJP | [2] it was ADJP | [2] i VERB it | [1] i would REC it | [1] it made me FEEL
VERB -> [2] loved | [2] enjoyed | [2] liked | [2] hated | [2] disliked | [2] watched
REC -> recommend | skip | rewatch | forget
FEEL -> smile | laugh | think | cry | yawn | cringe
";

/// Word-level sentiment values.
pub const LEXICON: &[(&str, f64)] = &[
    ("good", 1.0),
    ("great", 1.0),
    ("fun", 1.0),
    ("charming", 1.0),
    ("moving", 1.0),
    ("clever", 1.0),
    ("beautiful", 1.0),
    ("wonderful", 1.5),
    ("brilliant", 1.5),
    ("superb", 1.5),
    ("bad", -1.0),
    ("dull", -1.0),
    ("boring", -1.0),
    ("weak", -1.0),
    ("messy", -1.0),
    ("bland", -1.0),
    ("tedious", -1.0),
    ("clumsy", -1.0),
    ("awful", -1.5),
    ("terrible", -1.5),
    ("loved", 1.5),
    ("enjoyed", 1.0),
    ("liked", 1.0),
    ("hated", -1.5),
    ("disliked", -1.0),
    ("recommend", 1.0),
    ("rewatch", 1.0),
    ("skip", -1.0),
    ("forget", -1.0),
    ("smile", 1.0),
    ("laugh", 1.0),
    ("think", 0.5),
    ("yawn", -1.0),
    ("cringe", -1.0),
];

const INTENSIFIERS: &[&str] = &["very", "really", "quite", "truly"];
/// Responses longer than this many words are penalised.
pub const LENGTH_CAP: usize = 14;
/// Generation limit: room past the cap, so that length growth shows up in gold.
pub const MAX_RESPONSE_WORDS: usize = 20;

/// Gold reward and its parts (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SentimentParts {
    pub sentiment: f64,
    pub fluency: f64,
    pub length: f64,
    /// `3 tanh((sentiment + fluency + length) / 3)`.
    pub gold: f64,
}

pub struct SentimentTask {
    grammar: Grammar,
    bigrams: HashSet<(String, String)>,
    first_words: HashSet<String>,
    content: HashSet<String>,
    lexicon: HashMap<&'static str, f64>,
    train: Vec<String>,
    eval: Vec<String>,
    demos: Vec<(String, String)>,
}

/// Every word the task can produce.
pub fn vocabulary() -> Vec<String> {
    Grammar::new(GRAMMAR)
        .terminals("REVIEW")
        .into_iter()
        .collect()
}

impl SentimentTask {
    pub fn new(seed: u64, size: TaskSize) -> Self {
        let grammar = Grammar::new(GRAMMAR);
        let bigrams = grammar.bigrams("REVIEW");
        let first_words = grammar.first_words("CONT").clone();
        let mut content = HashSet::new();
        for nt in ["ADJ", "ASPECT", "MEDIUM", "VERB", "REC", "FEEL"] {
            content.extend(grammar.terminals(nt));
        }
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5e47_1e47_0000_0001);
        let (train, eval) =
            split_prompts(&mut rng, &size, |r| grammar.sample("PROMPT", r).join(" "));
        let demos = (0..size.demonstrations)
            .map(|i| {
                (
                    train[i % train.len()].clone(),
                    grammar.sample("CONT", &mut rng).join(" "),
                )
            })
            .collect();
        SentimentTask {
            grammar,
            bigrams,
            first_words,
            content,
            lexicon: LEXICON.iter().copied().collect(),
            train,
            eval,
            demos,
        }
    }

    /// The raw lexicon sum `s` of a text (before squashing).
    pub fn lexicon_score(&self, text: &str) -> f64 {
        let (mut s, mut intense, mut negated) = (0.0, false, false);
        for w in text.split_whitespace() {
            if INTENSIFIERS.contains(&w) {
                intense = true;
            } else if w == "not" {
                negated = true;
            } else {
                if let Some(v) = self.lexicon.get(w) {
                    let mut m = if intense { 1.5 } else { 1.0 };
                    if negated {
                        m *= -0.5;
                    }
                    s += v * m;
                }
                intense = false;
                negated = false;
            }
        }
        s
    }

    /// Gold and its parts (see the module docs).
    pub fn gold_parts(&self, _prompt: &str, response: &str) -> SentimentParts {
        let words: Vec<&str> = response.split_whitespace().collect();
        let sentiment = 2.0 * (self.lexicon_score(response) / 2.5).tanh();

        let mut fluency = 0.0;
        if words.is_empty() {
            fluency -= 1.0;
        } else {
            // The first word must continue the prompt. Every prompt ends where a continuation
            // starts (`REVIEW -> PROMPT CONT`), so this is the bigram check across the boundary.
            if !self.first_words.contains(words[0]) {
                fluency -= 1.0;
            }
            for pair in words.windows(2) {
                if !self
                    .bigrams
                    .contains(&(pair[0].to_string(), pair[1].to_string()))
                {
                    fluency -= 1.0;
                }
            }
        }
        let mut seen = HashSet::new();
        for w in &words {
            if self.content.contains(*w) && !seen.insert(*w) {
                fluency -= 0.75;
            }
        }
        if !self.grammar.derives("CONT", &words) {
            fluency -= 1.0;
        }
        let length = -0.3 * words.len().saturating_sub(LENGTH_CAP) as f64;
        let gold = 3.0 * ((sentiment + fluency + length) / 3.0).tanh();
        SentimentParts {
            sentiment,
            fluency,
            length,
            gold,
        }
    }
}

impl Task for SentimentTask {
    fn name(&self) -> &'static str {
        "sentiment"
    }

    /// A response better by +1 gold (e.g. a mild vs a clear positive) wins sigmoid(2) = 88% of
    /// noise-free comparisons.
    fn annotator_temperature(&self) -> f64 {
        0.5
    }
    fn train_prompts(&self) -> &[String] {
        &self.train
    }
    fn eval_prompts(&self) -> &[String] {
        &self.eval
    }
    fn demonstrations(&self) -> &[(String, String)] {
        &self.demos
    }
    fn gold(&self, prompt: &str, response: &str) -> f64 {
        self.gold_parts(prompt, response).gold
    }
    fn max_response_words(&self) -> usize {
        MAX_RESPONSE_WORDS
    }
    /// The same verdict on the film: both continuations positive (lexicon sum `s > 0.5`), both
    /// negative (`s < -0.5`) or both neutral. This is the testbed's stand-in for an NLI model's
    /// bidirectional entailment (`really charming .` and `very good .` say the same; `dull .` and
    /// `long .` do not); it reads the sentiment lexicon, not the fluency or length terms of gold.
    fn equivalent(&self, _prompt: &str, a: &str, b: &str) -> bool {
        self.verdict(a) == self.verdict(b)
    }
}

impl SentimentTask {
    /// -1, 0 or 1: the polarity of a text's lexicon sum with a dead zone of ±0.5.
    pub fn verdict(&self, text: &str) -> i8 {
        let s = self.lexicon_score(text);
        if s > 0.5 {
            1
        } else if s < -0.5 {
            -1
        } else {
            0
        }
    }
}
