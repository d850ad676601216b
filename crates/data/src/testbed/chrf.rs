//! Sentence-level chrF (Popović 2015): an F-score over character n-grams.
//!
//! Whitespace is removed first (as sacreBLEU does). For each order n = 1..=max_n that the reference
//! has n-grams of, precision P_n = matches / hypothesis n-grams (0 when the hypothesis has none)
//! and recall R_n = matches / reference n-grams, matches counting each n-gram at most as often as it
//! occurs in both (clipped). P and R are the means over those orders and
//! chrF = (1 + beta^2) P R / (beta^2 P + R), or 0 when P + R = 0. The result lies in [0, 1]. An
//! empty reference scores 1 against an empty hypothesis and 0 against anything else.

use std::collections::HashMap;

/// chrF with the usual settings: n-grams up to 6, beta = 2 (recall weighted twice precision).
pub fn chrf(hypothesis: &str, reference: &str) -> f64 {
    chrf_with(hypothesis, reference, 6, 2.0)
}

fn ngrams(chars: &[char], n: usize) -> HashMap<&[char], usize> {
    let mut out = HashMap::new();
    if chars.len() >= n {
        for g in chars.windows(n) {
            *out.entry(g).or_insert(0) += 1;
        }
    }
    out
}

pub fn chrf_with(hypothesis: &str, reference: &str, max_n: usize, beta: f64) -> f64 {
    let hyp: Vec<char> = hypothesis.chars().filter(|c| !c.is_whitespace()).collect();
    let reference: Vec<char> = reference.chars().filter(|c| !c.is_whitespace()).collect();
    if reference.is_empty() {
        return if hyp.is_empty() { 1.0 } else { 0.0 };
    }
    let (mut p_sum, mut r_sum, mut orders) = (0.0, 0.0, 0usize);
    for n in 1..=max_n.min(reference.len()) {
        let r = ngrams(&reference, n);
        let h = ngrams(&hyp, n);
        let r_total: usize = r.values().sum();
        let h_total: usize = h.values().sum();
        let matches: usize = h
            .iter()
            .map(|(g, c)| (*c).min(r.get(g).copied().unwrap_or(0)))
            .sum();
        if h_total > 0 {
            p_sum += matches as f64 / h_total as f64;
        }
        r_sum += matches as f64 / r_total as f64;
        orders += 1;
    }
    let p = p_sum / orders as f64;
    let r = r_sum / orders as f64;
    let b2 = beta * beta;
    if p + r == 0.0 {
        0.0
    } else {
        (1.0 + b2) * p * r / (b2 * p + r)
    }
}
