//! `arithmetic`: a verifiable reward. Numbers are written digit by digit as separate words:
//! prompt `compute : 4 7 + 8 5 =`, answer `1 3 2`. About 70% of prompts add two numbers in 0..=99,
//! the rest multiply a number in 2..=19 by one in 2..=9.
//!
//! Gold, in [-0.5, 1]: 1 for exactly the answer's digits; otherwise `0.5 * c / n - 0.1 * min(e, 5)`,
//! where `n` is the answer's digit count, `c` how many of the first `n` response words equal the
//! answer's digit in the same place (left-aligned) and `e` the number of words past `n`. So one wrong
//! digit of a two-digit answer gives 0.25, an empty response 0. A prompt that is not of this form
//! scores 0.
//!
//! Demonstrations are right about 60% of the time; the rest have one digit replaced.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{split_prompts, Task, TaskSize};

pub const MAX_RESPONSE_WORDS: usize = 6;
/// Fraction of demonstrations with the exact answer.
pub const DEMO_ACCURACY: f64 = 0.6;

pub struct ArithmeticTask {
    train: Vec<String>,
    eval: Vec<String>,
    demos: Vec<(String, String)>,
}

/// Every word the task can produce.
pub fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = ["compute", ":", "+", "*", "="]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend((0..10).map(|d| d.to_string()));
    v
}

fn spell(n: u64) -> String {
    n.to_string()
        .chars()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn sample_prompt(rng: &mut StdRng) -> String {
    if rng.random::<f64>() < 0.7 {
        let (a, b) = (rng.random_range(0..=99u64), rng.random_range(0..=99u64));
        format!("compute : {} + {} =", spell(a), spell(b))
    } else {
        let (a, b) = (rng.random_range(2..=19u64), rng.random_range(2..=9u64));
        format!("compute : {} * {} =", spell(a), spell(b))
    }
}

/// The exact answer's digits, or `None` if `prompt` is not `compute : A (+|*) B =`.
pub fn answer(prompt: &str) -> Option<Vec<String>> {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let rest = words.strip_prefix(&["compute", ":"][..])?;
    let rest = rest.strip_suffix(&["="][..])?;
    let op = rest.iter().position(|w| *w == "+" || *w == "*")?;
    let number = |ds: &[&str]| -> Option<u64> {
        if ds.is_empty()
            || ds.len() > 6
            || !ds
                .iter()
                .all(|d| d.len() == 1 && d.as_bytes()[0].is_ascii_digit())
        {
            return None;
        }
        ds.concat().parse().ok()
    };
    let a = number(&rest[..op])?;
    let b = number(&rest[op + 1..])?;
    let v = if rest[op] == "+" { a + b } else { a * b };
    Some(v.to_string().chars().map(|c| c.to_string()).collect())
}

/// Gold for a response given the answer's digits (see the module docs).
pub fn score(answer: &[String], response: &str) -> f64 {
    let words: Vec<&str> = response.split_whitespace().collect();
    if words.len() == answer.len() && words.iter().zip(answer).all(|(w, a)| w == a) {
        return 1.0;
    }
    let n = answer.len();
    let correct = words.iter().zip(answer).filter(|(w, a)| *w == a).count();
    let extra = words.len().saturating_sub(n).min(5);
    0.5 * correct as f64 / n as f64 - 0.1 * extra as f64
}

impl ArithmeticTask {
    pub fn new(seed: u64, size: TaskSize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xa417_0000_0000_0002);
        let (train, eval) = split_prompts(&mut rng, &size, sample_prompt);
        let demos = (0..size.demonstrations)
            .map(|i| {
                let prompt = train[i % train.len()].clone();
                let mut digits = answer(&prompt).expect("generated prompts parse");
                if rng.random::<f64>() >= DEMO_ACCURACY {
                    let k = rng.random_range(0..digits.len());
                    let old: u32 = digits[k].parse().expect("a digit");
                    // A different digit; never a leading zero on a multi-digit number.
                    let low = if k == 0 && digits.len() > 1 { 1 } else { 0 };
                    let mut d = rng.random_range(low..=9u32);
                    while d == old {
                        d = rng.random_range(low..=9u32);
                    }
                    digits[k] = d.to_string();
                }
                (prompt, digits.join(" "))
            })
            .collect();
        ArithmeticTask { train, eval, demos }
    }
}

impl Task for ArithmeticTask {
    fn name(&self) -> &'static str {
        "arithmetic"
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
        match answer(prompt) {
            Some(a) => score(&a, response),
            None => 0.0,
        }
    }
    fn max_response_words(&self) -> usize {
        MAX_RESPONSE_WORDS
    }
    fn reference(&self, prompt: &str) -> Option<String> {
        answer(prompt).map(|a| a.join(" "))
    }
    fn annotator_temperature(&self) -> f64 {
        0.25
    }
    /// The same stated answer: the same sequence of digit words (other words ignored), so
    /// `1 3 2` and `1 3 2 =` agree and `1 3 2` and `1 3` do not. Two responses without a digit
    /// fall back to normalised-text equality.
    fn equivalent(&self, _prompt: &str, a: &str, b: &str) -> bool {
        let (da, db) = (stated_digits(a), stated_digits(b));
        if da.is_empty() && db.is_empty() {
            super::normalised_text(a) == super::normalised_text(b)
        } else {
            da == db
        }
    }
}

/// The digit words of a response, in order.
pub fn stated_digits(response: &str) -> Vec<&str> {
    response
        .split_whitespace()
        .filter(|w| w.len() == 1 && w.as_bytes()[0].is_ascii_digit())
        .collect()
}
