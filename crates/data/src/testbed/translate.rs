//! `translate` (ReST's setting): translate a toy English-like source language into an invented
//! target language with a deterministic, non-trivial mapping.
//!
//! Source (subject, verb, object; the verb agrees in number with the subject; `a` / `an` as in
//! English):
//! `translate : the big dogs see a red ball .`
//! Target: `los kado ne grando un bulo roso vidan .`
//! - words are substituted ([`NOUNS`], [`ADJECTIVES`], [`VERBS`]);
//! - nouns have a gender: articles agree with gender and number (`the` -> lo/la/los/las,
//!   `a` -> un/una, `some` -> unos/unas), adjectives take the gender's ending (-o / -a);
//! - a plural noun is followed by the marker word `ne`;
//! - adjectives follow their noun and the verb goes to the end (subject object verb); the verb
//!   takes `-as` after a singular subject and `-an` after a plural one.
//!
//! Gold = sentence-level chrF (character n-grams up to 6, beta 2; see [`super::chrf`]) of the
//! response against the reference translation, in [0, 1]; 0 for a prompt that does not parse.
//! Demonstrations are mediocre translations: some keep the source word order, some have wrong
//! agreement, a missing plural marker or a wrong noun.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{split_prompts, Task, TaskSize};

pub const MAX_RESPONSE_WORDS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Gender {
    M,
    F,
}

/// (source singular, target, gender, can be a subject). Plurals add `s`.
const NOUNS: &[(&str, &str, Gender, bool)] = &[
    ("dog", "kado", Gender::M, true),
    ("cat", "mira", Gender::F, true),
    ("bird", "tivi", Gender::F, true),
    ("girl", "nena", Gender::F, true),
    ("boy", "poro", Gender::M, true),
    ("farmer", "gabo", Gender::M, true),
    ("ball", "bulo", Gender::M, false),
    ("apple", "pama", Gender::F, false),
    ("book", "libo", Gender::M, false),
    ("house", "kasa", Gender::F, false),
    ("boat", "nafo", Gender::M, false),
    ("tree", "aria", Gender::F, false),
];
/// (source, target stem); the target adds `o` (masculine) or `a` (feminine).
const ADJECTIVES: &[(&str, &str)] = &[
    ("big", "grand"),
    ("small", "pik"),
    ("red", "ros"),
    ("green", "verd"),
    ("old", "vek"),
    ("new", "nov"),
    ("happy", "fel"),
    ("sad", "trist"),
];
/// (source plural-subject form, source singular-subject form, target stem); the target adds `as`
/// (singular subject) or `an` (plural subject).
const VERBS: &[(&str, &str, &str)] = &[
    ("see", "sees", "vid"),
    ("like", "likes", "am"),
    ("find", "finds", "trov"),
    ("carry", "carries", "port"),
    ("want", "wants", "vol"),
    ("paint", "paints", "pint"),
];
const PLURAL_MARKER: &str = "ne";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Det {
    The,
    A,
    Some,
}

#[derive(Clone, Copy, Debug)]
struct Np {
    det: Det,
    adj: Option<usize>,
    noun: usize,
    plural: bool,
}

#[derive(Clone, Copy, Debug)]
struct Sentence {
    subj: Np,
    verb: usize,
    obj: Np,
}

/// Every word the task can produce (source and target).
pub fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = [
        "translate",
        ":",
        ".",
        "the",
        "a",
        "an",
        "some",
        PLURAL_MARKER,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(
        ["lo", "la", "los", "las", "un", "una", "unos", "unas"]
            .iter()
            .map(|s| s.to_string()),
    );
    for (src, tgt, _, _) in NOUNS {
        v.push(src.to_string());
        v.push(format!("{src}s"));
        v.push(tgt.to_string());
    }
    for (src, stem) in ADJECTIVES {
        v.push(src.to_string());
        v.push(format!("{stem}o"));
        v.push(format!("{stem}a"));
    }
    for (pl, sg, stem) in VERBS {
        v.push(pl.to_string());
        v.push(sg.to_string());
        v.push(format!("{stem}as"));
        v.push(format!("{stem}an"));
    }
    v
}

fn sample_np(rng: &mut StdRng, subject: bool) -> Np {
    let nouns: Vec<usize> = (0..NOUNS.len())
        .filter(|&i| !subject || NOUNS[i].3)
        .collect();
    let noun = nouns[rng.random_range(0..nouns.len())];
    let plural = rng.random_bool(0.4);
    let det = match (plural, rng.random_bool(0.6)) {
        (_, true) => Det::The,
        (false, false) => Det::A,
        (true, false) => Det::Some,
    };
    let adj = rng
        .random_bool(0.6)
        .then(|| rng.random_range(0..ADJECTIVES.len()));
    Np {
        det,
        adj,
        noun,
        plural,
    }
}

fn sample_sentence(rng: &mut StdRng) -> Sentence {
    let subj = sample_np(rng, true);
    let verb = rng.random_range(0..VERBS.len());
    let obj = sample_np(rng, false);
    Sentence { subj, verb, obj }
}

fn source_np(np: &Np, out: &mut Vec<String>) {
    let noun = NOUNS[np.noun].0;
    let noun = if np.plural {
        format!("{noun}s")
    } else {
        noun.to_string()
    };
    let adj = np.adj.map(|a| ADJECTIVES[a].0);
    let next = adj.unwrap_or(&noun);
    out.push(
        match np.det {
            Det::The => "the",
            Det::A if next.starts_with(['a', 'e', 'i', 'o', 'u']) => "an",
            Det::A => "a",
            Det::Some => "some",
        }
        .to_string(),
    );
    out.extend(adj.map(str::to_string));
    out.push(noun);
}

fn source(s: &Sentence) -> String {
    let mut out = vec!["translate".to_string(), ":".to_string()];
    source_np(&s.subj, &mut out);
    let (pl, sg, _) = VERBS[s.verb];
    out.push(if s.subj.plural { pl } else { sg }.to_string());
    source_np(&s.obj, &mut out);
    out.push(".".to_string());
    out.join(" ")
}

fn parse_np(words: &[&str]) -> Option<(Np, usize)> {
    let det = match *words.first()? {
        "the" => Det::The,
        "a" | "an" => Det::A,
        "some" => Det::Some,
        _ => return None,
    };
    let mut k = 1;
    let adj = ADJECTIVES.iter().position(|(a, _)| Some(a) == words.get(k));
    if adj.is_some() {
        k += 1;
    }
    let w = *words.get(k)?;
    let (noun, plural) = NOUNS.iter().enumerate().find_map(|(i, (src, ..))| {
        if w == *src {
            Some((i, false))
        } else if w.strip_suffix('s') == Some(*src) {
            Some((i, true))
        } else {
            None
        }
    })?;
    Some((
        Np {
            det,
            adj,
            noun,
            plural,
        },
        k + 1,
    ))
}

fn parse(prompt: &str) -> Option<Sentence> {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let rest = words.strip_prefix(&["translate", ":"][..])?;
    let rest = rest.strip_suffix(&["."][..])?;
    let (subj, k) = parse_np(rest)?;
    let v = *rest.get(k)?;
    let verb = VERBS.iter().position(|(pl, sg, _)| v == *pl || v == *sg)?;
    let (obj, j) = parse_np(&rest[k + 1..])?;
    (k + 1 + j == rest.len()).then_some(Sentence { subj, verb, obj })
}

/// Mistakes a mediocre translator makes (all false: the reference).
#[derive(Clone, Copy, Default)]
struct Flaws {
    adj_before_noun: bool,
    verb_second: bool,
    wrong_verb_number: bool,
    untranslated_verb: bool,
}

/// Per noun phrase mistakes.
#[derive(Clone, Copy, Default)]
struct NpFlaws {
    wrong_article_gender: bool,
    wrong_adj_gender: bool,
    missing_marker: bool,
    wrong_noun: Option<usize>,
}

fn target_np(np: &Np, adj_first: bool, f: NpFlaws, out: &mut Vec<String>) {
    let (_, tgt, gender, _) = NOUNS[np.noun];
    let flip = |g: Gender| if g == Gender::M { Gender::F } else { Gender::M };
    let art_gender = if f.wrong_article_gender {
        flip(gender)
    } else {
        gender
    };
    let article = match (np.det, art_gender, np.plural) {
        (Det::The, Gender::M, false) => "lo",
        (Det::The, Gender::F, false) => "la",
        (Det::The, Gender::M, true) => "los",
        (Det::The, Gender::F, true) => "las",
        (Det::A | Det::Some, Gender::M, false) => "un",
        (Det::A | Det::Some, Gender::F, false) => "una",
        (Det::A | Det::Some, Gender::M, true) => "unos",
        (Det::A | Det::Some, Gender::F, true) => "unas",
    };
    out.push(article.to_string());
    let adj = np.adj.map(|a| {
        let g = if f.wrong_adj_gender {
            flip(gender)
        } else {
            gender
        };
        format!(
            "{}{}",
            ADJECTIVES[a].1,
            if g == Gender::M { "o" } else { "a" }
        )
    });
    if adj_first {
        out.extend(adj.clone());
    }
    out.push(f.wrong_noun.map_or(tgt, |n| NOUNS[n].1).to_string());
    if np.plural && !f.missing_marker {
        out.push(PLURAL_MARKER.to_string());
    }
    if !adj_first {
        out.extend(adj);
    }
}

fn target(s: &Sentence, f: Flaws, subj_f: NpFlaws, obj_f: NpFlaws) -> String {
    let mut out = Vec::new();
    target_np(&s.subj, f.adj_before_noun, subj_f, &mut out);
    let (pl, sg, stem) = VERBS[s.verb];
    let plural = s.subj.plural != f.wrong_verb_number;
    let verb = if f.untranslated_verb {
        if plural { pl } else { sg }.to_string()
    } else {
        format!("{stem}{}", if plural { "an" } else { "as" })
    };
    if f.verb_second {
        out.push(verb.clone());
    }
    target_np(&s.obj, f.adj_before_noun, obj_f, &mut out);
    if !f.verb_second {
        out.push(verb);
    }
    out.push(".".to_string());
    out.join(" ")
}

/// The reference translation of a prompt, or `None` if it does not parse.
pub fn reference(prompt: &str) -> Option<String> {
    parse(prompt).map(|s| target(&s, Flaws::default(), NpFlaws::default(), NpFlaws::default()))
}

fn mediocre(s: &Sentence, rng: &mut StdRng) -> String {
    let f = Flaws {
        adj_before_noun: rng.random_bool(0.35),
        verb_second: rng.random_bool(0.35),
        wrong_verb_number: rng.random_bool(0.2),
        untranslated_verb: rng.random_bool(0.1),
    };
    let np = |rng: &mut StdRng| NpFlaws {
        wrong_article_gender: rng.random_bool(0.2),
        wrong_adj_gender: rng.random_bool(0.25),
        missing_marker: rng.random_bool(0.3),
        wrong_noun: rng
            .random_bool(0.1)
            .then(|| rng.random_range(0..NOUNS.len())),
    };
    let subj_f = np(rng);
    let obj_f = np(rng);
    target(s, f, subj_f, obj_f)
}

pub struct TranslateTask {
    train: Vec<String>,
    eval: Vec<String>,
    demos: Vec<(String, String)>,
}

impl TranslateTask {
    pub fn new(seed: u64, size: TaskSize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7a45_0000_0000_0003);
        let (train, eval) = split_prompts(&mut rng, &size, |r| source(&sample_sentence(r)));
        let demos = (0..size.demonstrations)
            .map(|i| {
                let prompt = train[i % train.len()].clone();
                let s = parse(&prompt).expect("generated prompts parse");
                let response = mediocre(&s, &mut rng);
                (prompt, response)
            })
            .collect();
        TranslateTask { train, eval, demos }
    }
}

impl Task for TranslateTask {
    fn name(&self) -> &'static str {
        "translate"
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
        match reference(prompt) {
            Some(r) => super::chrf::chrf(response, &r),
            None => 0.0,
        }
    }
    fn max_response_words(&self) -> usize {
        MAX_RESPONSE_WORDS
    }
    fn reference(&self, prompt: &str) -> Option<String> {
        reference(prompt)
    }
    fn annotator_temperature(&self) -> f64 {
        0.1
    }
    /// The same content: the same multiset of words, in any order (a word-order mistake keeps the
    /// meaning; a wrong noun, article or agreement ending changes it).
    fn equivalent(&self, _prompt: &str, a: &str, b: &str) -> bool {
        let bag = |s: &str| {
            let mut w: Vec<String> = super::normalised_text(s)
                .split_whitespace()
                .map(String::from)
                .collect();
            w.sort();
            w
        };
        bag(a) == bag(b)
    }
}
