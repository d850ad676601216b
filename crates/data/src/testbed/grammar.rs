//! A tiny weighted context-free grammar: sampling, the set of word bigrams it can produce, and
//! recognition (does a symbol derive exactly this word sequence?).
//!
//! Rules are written one per line as `NAME -> alt | [w] alt | ...`: words that start with an ASCII
//! capital and contain no lowercase letter are nonterminals, everything else is a terminal word;
//! `[w]` gives an alternative a sampling weight (default 1). A name may appear on several lines;
//! its alternatives accumulate. Empty alternatives and recursion are not allowed (checked when the
//! grammar is built), which keeps every analysis here exact and finite.

use std::collections::{BTreeSet, HashMap, HashSet};

use rand::Rng;

#[derive(Clone, Debug)]
enum Sym {
    T(String),
    N(usize),
}

#[derive(Debug)]
pub(crate) struct Grammar {
    names: Vec<String>,
    index: HashMap<String, usize>,
    /// Per nonterminal: its alternatives with their weights.
    rules: Vec<Vec<(f64, Vec<Sym>)>>,
    first: Vec<HashSet<String>>,
    last: Vec<HashSet<String>>,
    min_len: Vec<usize>,
    max_len: Vec<usize>,
}

fn is_nonterminal(word: &str) -> bool {
    word.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && !word.chars().any(|c| c.is_lowercase())
}

impl Grammar {
    /// Build from rule lines (see the module docs). Panics on a malformed grammar: grammars are
    /// constants of this crate, and the tests build every one of them.
    pub(crate) fn new(spec: &str) -> Grammar {
        let mut names: Vec<String> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut raw: Vec<Vec<(f64, Vec<String>)>> = Vec::new();
        let mut intern = |name: &str,
                          names: &mut Vec<String>,
                          raw: &mut Vec<Vec<(f64, Vec<String>)>>|
         -> usize {
            *index.entry(name.to_string()).or_insert_with(|| {
                names.push(name.to_string());
                raw.push(Vec::new());
                names.len() - 1
            })
        };
        for line in spec.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (lhs, rhs) = line
                .split_once("->")
                .unwrap_or_else(|| panic!("grammar line without `->`: {line}"));
            let lhs = lhs.trim();
            assert!(
                is_nonterminal(lhs),
                "left-hand side `{lhs}` is not a nonterminal name"
            );
            let id = intern(lhs, &mut names, &mut raw);
            for alt in rhs.split('|') {
                let mut words: Vec<&str> = alt.split_whitespace().collect();
                let mut weight = 1.0;
                if let Some(w) = words
                    .first()
                    .and_then(|w| w.strip_prefix('['))
                    .and_then(|w| w.strip_suffix(']'))
                {
                    weight = w
                        .parse()
                        .unwrap_or_else(|_| panic!("bad weight in `{line}`"));
                    words.remove(0);
                }
                assert!(!words.is_empty(), "empty alternative in `{line}`");
                assert!(weight > 0.0, "weights must be positive in `{line}`");
                raw[id].push((weight, words.iter().map(|w| w.to_string()).collect()));
            }
        }
        let index: HashMap<String, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let rules: Vec<Vec<(f64, Vec<Sym>)>> = raw
            .into_iter()
            .map(|alts| {
                alts.into_iter()
                    .map(|(w, words)| {
                        let syms = words
                            .into_iter()
                            .map(|word| {
                                if is_nonterminal(&word) {
                                    Sym::N(*index.get(&word).unwrap_or_else(|| {
                                        panic!("nonterminal `{word}` has no rule")
                                    }))
                                } else {
                                    Sym::T(word)
                                }
                            })
                            .collect();
                        (w, syms)
                    })
                    .collect()
            })
            .collect();
        let n = names.len();
        let mut g = Grammar {
            names,
            index,
            rules,
            first: vec![HashSet::new(); n],
            last: vec![HashSet::new(); n],
            min_len: vec![0; n],
            max_len: vec![0; n],
        };
        // Lengths, by depth-first search; finding a nonterminal on its own stack means recursion.
        let mut state = vec![0u8; n]; // 0 = unseen, 1 = on the stack, 2 = done
        for i in 0..n {
            g.analyse(i, &mut state);
        }
        g
    }

    fn analyse(&mut self, i: usize, state: &mut Vec<u8>) {
        match state[i] {
            2 => return,
            1 => panic!("grammar is recursive at `{}`", self.names[i]),
            _ => {}
        }
        state[i] = 1;
        let children: Vec<usize> = self.rules[i]
            .iter()
            .flat_map(|(_, alt)| alt.iter())
            .filter_map(|s| match s {
                Sym::N(j) => Some(*j),
                Sym::T(_) => None,
            })
            .collect();
        for j in children {
            self.analyse(j, state);
        }
        let (mut lo, mut hi) = (usize::MAX, 0);
        let mut first = HashSet::new();
        let mut last = HashSet::new();
        for (_, alt) in &self.rules[i] {
            let (mut a, mut b) = (0, 0);
            for s in alt {
                match s {
                    Sym::T(_) => {
                        a += 1;
                        b += 1;
                    }
                    Sym::N(j) => {
                        a += self.min_len[*j];
                        b += self.max_len[*j];
                    }
                }
            }
            lo = lo.min(a);
            hi = hi.max(b);
            first.extend(self.edge(&alt[0], true));
            last.extend(self.edge(&alt[alt.len() - 1], false));
        }
        self.min_len[i] = lo;
        self.max_len[i] = hi;
        self.first[i] = first;
        self.last[i] = last;
        state[i] = 2;
    }

    fn edge(&self, s: &Sym, first: bool) -> HashSet<String> {
        match s {
            Sym::T(t) => HashSet::from([t.clone()]),
            Sym::N(j) if first => self.first[*j].clone(),
            Sym::N(j) => self.last[*j].clone(),
        }
    }

    fn id(&self, name: &str) -> usize {
        *self
            .index
            .get(name)
            .unwrap_or_else(|| panic!("no nonterminal `{name}`"))
    }

    /// A random derivation of `start`, as words.
    pub(crate) fn sample<R: Rng>(&self, start: &str, rng: &mut R) -> Vec<String> {
        let mut out = Vec::new();
        self.expand(self.id(start), rng, &mut out);
        out
    }

    fn expand<R: Rng>(&self, i: usize, rng: &mut R, out: &mut Vec<String>) {
        let alts = &self.rules[i];
        let total: f64 = alts.iter().map(|(w, _)| w).sum();
        let mut r = rng.random::<f64>() * total;
        let mut chosen = &alts[alts.len() - 1].1;
        for (w, alt) in alts {
            if r < *w {
                chosen = alt;
                break;
            }
            r -= w;
        }
        for s in chosen {
            match s {
                Sym::T(t) => out.push(t.clone()),
                Sym::N(j) => self.expand(*j, rng, out),
            }
        }
    }

    /// Every terminal word reachable from `start`, sorted.
    pub(crate) fn terminals(&self, start: &str) -> BTreeSet<String> {
        let mut seen = vec![false; self.names.len()];
        let mut out = BTreeSet::new();
        let mut stack = vec![self.id(start)];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            for (_, alt) in &self.rules[i] {
                for s in alt {
                    match s {
                        Sym::T(t) => {
                            out.insert(t.clone());
                        }
                        Sym::N(j) => stack.push(*j),
                    }
                }
            }
        }
        out
    }

    /// The words that can begin a derivation of `start`.
    pub(crate) fn first_words(&self, start: &str) -> &HashSet<String> {
        &self.first[self.id(start)]
    }

    /// Every pair of adjacent words in some derivation of `start`.
    pub(crate) fn bigrams(&self, start: &str) -> HashSet<(String, String)> {
        let mut memo: Vec<Option<HashSet<(String, String)>>> = vec![None; self.names.len()];
        self.bigrams_of(self.id(start), &mut memo);
        memo[self.id(start)].take().expect("computed")
    }

    fn bigrams_of(&self, i: usize, memo: &mut Vec<Option<HashSet<(String, String)>>>) {
        if memo[i].is_some() {
            return;
        }
        let mut out = HashSet::new();
        for (_, alt) in &self.rules[i] {
            for s in alt {
                if let Sym::N(j) = s {
                    self.bigrams_of(*j, memo);
                    out.extend(memo[*j].as_ref().expect("computed").iter().cloned());
                }
            }
            for pair in alt.windows(2) {
                for a in self.edge(&pair[0], false) {
                    for b in self.edge(&pair[1], true) {
                        out.insert((a.clone(), b));
                    }
                }
            }
        }
        memo[i] = Some(out);
    }

    /// Whether `start` derives exactly `words`.
    pub(crate) fn derives(&self, start: &str, words: &[&str]) -> bool {
        let mut memo = HashMap::new();
        self.can(self.id(start), words, 0, words.len(), &mut memo)
    }

    fn can(
        &self,
        i: usize,
        w: &[&str],
        from: usize,
        to: usize,
        memo: &mut HashMap<(usize, usize, usize), bool>,
    ) -> bool {
        let len = to - from;
        if len < self.min_len[i] || len > self.max_len[i] {
            return false;
        }
        if let Some(&v) = memo.get(&(i, from, to)) {
            return v;
        }
        let ok = self.rules[i]
            .iter()
            .any(|(_, alt)| self.seq(alt, w, from, to, memo));
        memo.insert((i, from, to), ok);
        ok
    }

    fn seq(
        &self,
        alt: &[Sym],
        w: &[&str],
        from: usize,
        to: usize,
        memo: &mut HashMap<(usize, usize, usize), bool>,
    ) -> bool {
        let Some((head, rest)) = alt.split_first() else {
            return from == to;
        };
        let rest_min: usize = rest
            .iter()
            .map(|s| match s {
                Sym::T(_) => 1,
                Sym::N(j) => self.min_len[*j],
            })
            .sum();
        if to < from + rest_min {
            return false;
        }
        match head {
            Sym::T(t) => from < to && w[from] == t && self.seq(rest, w, from + 1, to, memo),
            Sym::N(j) => {
                let lo = from + self.min_len[*j];
                let hi = (from + self.max_len[*j]).min(to - rest_min);
                (lo..=hi)
                    .any(|mid| self.can(*j, w, from, mid, memo) && self.seq(rest, w, mid, to, memo))
            }
        }
    }
}
