//! The fuzzing harness shared by the loader fuzz tests of `rlhf-lm`, `rlhf-data` and
//! `rlhf-methods` (included with `#[path]`, since test helpers cannot cross crates otherwise).
//!
//! Inputs are proptest values: a valid seed plus a list of edits, so that most inputs get past the
//! first bytes of a parser and reach its deeper checks. Each input is written to a file on tmpfs
//! and loaded through the public loader, because the error must name that file. The harness
//! catches panics (proptest reports the input and shrinks it), fails on any input slower than
//! [`SLOW`], aborts the process with the input when one takes longer than [`HANG`] (a real hang
//! never returns to be timed), and prints per loader: inputs tried, accepted, rejected and the
//! slowest input's time.
//!
//! `RLHF_FUZZ_CASES` sets the number of inputs per loader (the default is the CI size);
//! `RLHF_FUZZ_SEED` changes the otherwise fixed random seed, so CI runs the same inputs every time
//! while an on-demand run can explore new ones.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value as Json;

/// An input slower than this fails the test (a loader of a small file has no reason to be).
pub const SLOW: Duration = Duration::from_secs(2);
/// An input still running after this is a hang: the watchdog prints it and aborts the process.
pub const HANG: Duration = Duration::from_secs(20);

/// Inputs per loader: `RLHF_FUZZ_CASES`, else `ci_default`.
pub fn cases(ci_default: u32) -> u32 {
    std::env::var("RLHF_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(ci_default)
}

fn seed() -> u64 {
    std::env::var("RLHF_FUZZ_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0x5eed_f022)
}

/// A scratch directory on tmpfs where there is one (inputs are written and read millions of
/// times), unique to this process and loader.
pub fn scratch_dir(loader: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("rlhf-fuzz-{}-{loader}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the loader made of one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Rejected,
}

/// The check of one input: `Err` is a property violation (an error that does not name the file,
/// a wrong line number, ...), with the reason.
pub type Check = std::result::Result<Verdict, String>;

/// The error's message and its whole `source()` chain, as a user would read them.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// A rejection must name `path`.
pub fn names_file(e: &dyn std::error::Error, path: &Path) -> Check {
    let msg = chain(e);
    if msg.contains(&path.display().to_string()) {
        Ok(Verdict::Rejected)
    } else {
        Err(format!("error does not name {}: {msg}", path.display()))
    }
}

/// Run `check` on `cases` inputs from `strategy`, timing each; print the figures; fail on a
/// panic, a violated check or a slow input.
pub fn fuzz<S>(loader: &str, ci_cases: u32, strategy: S, check: impl Fn(&S::Value) -> Check)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let cases = cases(ci_cases);
    let config = Config {
        cases,
        // Every case is a fresh generated input; regressions are kept as named tests instead of
        // files written into the source tree.
        failure_persistence: None,
        max_shrink_iters: 2000,
        // Shrinking a slow input re-runs slow inputs: bound it, the input is printed anyway.
        max_shrink_time: 60_000,
        max_global_rejects: cases.saturating_mul(2),
        ..Config::default()
    };
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed().to_le_bytes());
    key[8..8 + loader.len().min(24)].copy_from_slice(&loader.as_bytes()[..loader.len().min(24)]);
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));

    let tried = AtomicU64::new(0);
    let accepted = AtomicU64::new(0);
    let max_nanos = AtomicU64::new(0);
    let watch = Watchdog::start(loader);
    let started = Instant::now();
    let result = runner.run(&strategy, |input| {
        watch.begin(&input);
        let t = Instant::now();
        let verdict = check(&input);
        let took = t.elapsed();
        watch.end();
        tried.fetch_add(1, Ordering::Relaxed);
        max_nanos.fetch_max(took.as_nanos() as u64, Ordering::Relaxed);
        if took > SLOW {
            eprintln!("fuzz {loader}: slow input ({took:?}): {input:?}");
            return Err(TestCaseError::fail(format!(
                "{loader}: one input took {took:?} (more than {SLOW:?})"
            )));
        }
        match verdict {
            Ok(Verdict::Accepted) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Verdict::Rejected) => Ok(()),
            Err(why) => Err(TestCaseError::fail(format!("{loader}: {why}"))),
        }
    });
    let total = started.elapsed();
    watch.stop();
    let tried = tried.into_inner();
    let accepted = accepted.into_inner();
    println!(
        "fuzz {loader}: {tried} inputs, {accepted} accepted, {} rejected, max {:.2} ms per input, \
         {:.1} s in all ({:.0} us per input)",
        tried - accepted,
        max_nanos.into_inner() as f64 / 1e6,
        total.as_secs_f64(),
        total.as_secs_f64() * 1e6 / tried.max(1) as f64,
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Aborts the process with the running input when one runs past [`HANG`]: a loader stuck in a loop
/// never returns, so timing after the fact cannot catch it.
struct Watchdog {
    current: Arc<Mutex<Option<(Instant, String)>>>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(loader: &str) -> Self {
        let current: Arc<Mutex<Option<(Instant, String)>>> = Arc::new(Mutex::new(None));
        let done = Arc::new(AtomicBool::new(false));
        let (c, d, name) = (current.clone(), done.clone(), loader.to_string());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::Relaxed) {
                std::thread::park_timeout(Duration::from_millis(200));
                if let Some((since, input)) = &*c.lock().unwrap_or_else(|p| p.into_inner()) {
                    if since.elapsed() > HANG {
                        eprintln!("fuzz {name}: HANG: an input ran past {HANG:?}: {input}");
                        std::process::abort();
                    }
                }
            }
        });
        Watchdog {
            current,
            done,
            thread: Some(thread),
        }
    }

    fn begin(&self, input: &impl std::fmt::Debug) {
        // Formatting every input costs more than most loads; keep a bounded prefix.
        let mut text = format!("{input:?}");
        text.truncate(text.floor_char_boundary(4000));
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), text));
    }

    fn end(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn stop(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            t.join().ok();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Byte-level edits: what a corrupt download, a bad editor or a truncated copy does to a file.

/// Integers at the edges where length and offset checks go wrong.
pub const EDGE_INTS: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    (1 << 53) + 1,
    i64::MAX as u64,
    (i64::MAX as u64) + 1,
    u64::MAX - 7,
    u64::MAX,
];

#[derive(Debug, Clone)]
pub enum ByteEdit {
    FlipBit {
        at: Index,
        bit: u8,
    },
    SetByte {
        at: Index,
        byte: u8,
    },
    Truncate {
        at: Index,
    },
    Delete {
        at: Index,
        len: u16,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    /// Insert a token from the loader's dictionary (JSON punctuation, Jinja tags, keys, ...).
    InsertToken {
        at: Index,
        token: Index,
    },
    /// Copy a chunk of the input to another place.
    Duplicate {
        from: Index,
        to: Index,
        len: u16,
    },
    /// Overwrite 1, 2, 4 or 8 bytes with a little-endian edge integer (binary headers).
    SetInt {
        at: Index,
        width: u8,
        value: u64,
    },
}

pub fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| ByteEdit::FlipBit { at, bit }),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| ByteEdit::SetByte { at, byte }),
        2 => any::<Index>().prop_map(|at| ByteEdit::Truncate { at }),
        2 => (any::<Index>(), 1u16..64).prop_map(|(at, len)| ByteEdit::Delete { at, len }),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| ByteEdit::Insert { at, bytes }),
        3 => (any::<Index>(), any::<Index>())
            .prop_map(|(at, token)| ByteEdit::InsertToken { at, token }),
        1 => (any::<Index>(), any::<Index>(), 1u16..256)
            .prop_map(|(from, to, len)| ByteEdit::Duplicate { from, to, len }),
        3 => (
            any::<Index>(),
            prop::sample::select(vec![1u8, 2, 4, 8]),
            prop_oneof![prop::sample::select(EDGE_INTS.to_vec()), any::<u64>()]
        )
            .prop_map(|(at, width, value)| ByteEdit::SetInt { at, width, value }),
    ]
}

/// Zero to `max` byte edits, none in about half the inputs (so the structured edits before them
/// reach the loader intact).
pub fn byte_edits(max: usize) -> impl Strategy<Value = Vec<ByteEdit>> {
    prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(byte_edit(), 1..=max.max(1)),
    ]
}

/// Apply `edits` in order; `tokens` is the dictionary of [`ByteEdit::InsertToken`].
pub fn apply_bytes(mut data: Vec<u8>, edits: &[ByteEdit], tokens: &[&[u8]]) -> Vec<u8> {
    for edit in edits {
        let n = data.len();
        match edit {
            ByteEdit::FlipBit { at, bit } if n > 0 => data[at.index(n)] ^= 1 << bit,
            ByteEdit::SetByte { at, byte } if n > 0 => data[at.index(n)] = *byte,
            ByteEdit::Truncate { at } => data.truncate(at.index(n + 1)),
            ByteEdit::Delete { at, len } if n > 0 => {
                let start = at.index(n);
                let end = (start + *len as usize).min(n);
                data.drain(start..end);
            }
            ByteEdit::Insert { at, bytes } => {
                let i = at.index(n + 1);
                data.splice(i..i, bytes.iter().copied());
            }
            ByteEdit::InsertToken { at, token } if !tokens.is_empty() => {
                let i = at.index(n + 1);
                data.splice(i..i, tokens[token.index(tokens.len())].iter().copied());
            }
            ByteEdit::Duplicate { from, to, len } if n > 0 => {
                let start = from.index(n);
                let chunk = data[start..(start + *len as usize).min(n)].to_vec();
                let i = to.index(n + 1);
                data.splice(i..i, chunk);
            }
            ByteEdit::SetInt { at, width, value } => {
                let w = *width as usize;
                if n >= w {
                    let i = at.index(n - w + 1);
                    data[i..i + w].copy_from_slice(&value.to_le_bytes()[..w]);
                }
            }
            _ => {}
        }
    }
    data
}

// ---------------------------------------------------------------------------------------------
// JSON edits: the same document with one value of the wrong type, out of range, missing or
// doubled; what a hand-edited config or a converter with a bug produces.

#[derive(Debug, Clone)]
pub enum JsonEdit {
    /// Replace the `at`-th value (pre-order over the whole document) with `value`.
    Replace { at: Index, value: Json },
    /// Remove the `at`-th value from its object or list.
    Remove { at: Index },
    /// Into the `at`-th object, set `key` (from the loader's field names) to `value`.
    SetKey { at: Index, key: Index, value: Json },
    /// Wrap the `at`-th value in `depth` single-element lists.
    Nest { at: Index, depth: u16 },
}

/// Strings that parsers and number conversions trip over.
const EDGE_STRINGS: &[&str] = &[
    "",
    " ",
    "\n",
    "NaN",
    "nan",
    "inf",
    "-Infinity",
    "1e999",
    "-1",
    "0",
    "true",
    "null",
    "\u{0}",
    "\u{feff}",
    "é",
    "🦀",
    "{{",
    "{%",
    "<s>",
    "assistant",
    "user",
    "system",
    "LORA",
    "llama",
    "qwen2",
    "mistral",
    "silu",
    "linear",
    "llama3",
    "none",
    "all-linear",
];

/// A JSON value chosen to stress a loader: edge numbers, edge strings, message lists,
/// nested containers.
pub fn edge_json(field_names: &'static [&'static str]) -> BoxedStrategy<Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        prop::sample::select(EDGE_INTS.to_vec()).prop_map(Json::from),
        prop::sample::select(EDGE_INTS.to_vec())
            .prop_map(|x| Json::from((x as i64).wrapping_neg())),
        any::<i64>().prop_map(Json::from),
        prop::sample::select(vec![0.0f64, -0.0, 0.5, -1.5, 1e-320, 1e308, -1e308, 3.0e38])
            .prop_map(Json::from),
        prop::sample::select(EDGE_STRINGS.to_vec()).prop_map(Json::from),
        prop::sample::select(field_names.to_vec()).prop_map(Json::from),
        (
            1usize..3,
            prop::sample::select(vec!["a", "é", " ", "{{ x }}"])
        )
            .prop_map(|(k, s)| Json::from(s.repeat(k * 5000))),
        ".{0,12}".prop_map(Json::from),
    ];
    let message = (
        prop::sample::select(vec!["user", "assistant", "system", "tool", "", "USER"]),
        prop_oneof![
            prop::sample::select(vec!["hi", "", " ", "a reply", "{{ raise_exception('x') }}"])
                .prop_map(Json::from),
            leaf.clone(),
        ],
        any::<u8>(),
    )
        .prop_map(|(role, content, shape)| match shape % 8 {
            0 => serde_json::json!({ "content": content }),
            1 => serde_json::json!({ "role": role }),
            2 => serde_json::json!({ "role": content, "content": role }),
            _ => serde_json::json!({ "role": role, "content": content }),
        });
    prop_oneof![
        6 => leaf.clone(),
        2 => prop::collection::vec(message, 0..4).prop_map(Json::Array),
        1 => prop::collection::vec(leaf.clone(), 0..4).prop_map(Json::Array),
        1 => prop::collection::vec((prop::sample::select(field_names.to_vec()), leaf), 0..4)
            .prop_map(|kv| Json::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
    ]
    .boxed()
}

pub fn json_edit(field_names: &'static [&'static str]) -> impl Strategy<Value = JsonEdit> {
    let value = edge_json(field_names);
    prop_oneof![
        4 => (any::<Index>(), value.clone()).prop_map(|(at, value)| JsonEdit::Replace { at, value }),
        2 => any::<Index>().prop_map(|at| JsonEdit::Remove { at }),
        3 => (any::<Index>(), any::<Index>(), value)
            .prop_map(|(at, key, value)| JsonEdit::SetKey { at, key, value }),
        1 => (any::<Index>(), prop_oneof![1u16..8, 100u16..300])
            .prop_map(|(at, depth)| JsonEdit::Nest { at, depth }),
    ]
}

fn count_nodes(v: &Json) -> usize {
    1 + match v {
        Json::Array(a) => a.iter().map(count_nodes).sum(),
        Json::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// The `n`-th value in pre-order (0 is the root).
fn nth_mut<'a>(v: &'a mut Json, n: &mut usize) -> Option<&'a mut Json> {
    if *n == 0 {
        return Some(v);
    }
    *n -= 1;
    match v {
        Json::Array(a) => a.iter_mut().find_map(|c| nth_mut(c, n)),
        Json::Object(o) => o.values_mut().find_map(|c| nth_mut(c, n)),
        _ => None,
    }
}

fn node<'a>(v: &'a mut Json, at: &Index) -> &'a mut Json {
    let mut n = at.index(count_nodes(v));
    nth_mut(v, &mut n).expect("index within the node count")
}

/// Remove the `n`-th non-root value (pre-order) from its parent.
fn remove_nth(v: &mut Json, n: &mut usize) -> bool {
    let take = |n: &mut usize| {
        if *n == 0 {
            true
        } else {
            *n -= 1;
            false
        }
    };
    match v {
        Json::Array(a) => {
            for i in 0..a.len() {
                if take(n) {
                    a.remove(i);
                    return true;
                }
                if remove_nth(&mut a[i], n) {
                    return true;
                }
            }
            false
        }
        Json::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for k in keys {
                if take(n) {
                    o.remove(&k);
                    return true;
                }
                if remove_nth(o.get_mut(&k).expect("key just listed"), n) {
                    return true;
                }
            }
            false
        }
        _ => false,
    }
}

pub fn apply_json(mut doc: Json, edits: &[JsonEdit], field_names: &[&str]) -> Json {
    for edit in edits {
        match edit {
            JsonEdit::Replace { at, value } => *node(&mut doc, at) = value.clone(),
            JsonEdit::Remove { at } => {
                let total = count_nodes(&doc);
                if total > 1 {
                    let mut n = at.index(total - 1);
                    remove_nth(&mut doc, &mut n);
                }
            }
            JsonEdit::SetKey { at, key, value } => {
                if field_names.is_empty() {
                    continue;
                }
                // The first object at or after the chosen node (pre-order, wrapping around).
                let total = count_nodes(&doc);
                let start = at.index(total);
                let target = (start..total).chain(0..start).find(|&i| {
                    let mut n = i;
                    nth_mut(&mut doc, &mut n).is_some_and(|v| v.is_object())
                });
                if let Some(i) = target {
                    let mut n = i;
                    if let Some(Json::Object(obj)) = nth_mut(&mut doc, &mut n) {
                        obj.insert(
                            field_names[key.index(field_names.len())].to_string(),
                            value.clone(),
                        );
                    }
                }
            }
            JsonEdit::Nest { at, depth } => {
                let slot = node(&mut doc, at);
                let mut v = slot.take();
                for _ in 0..*depth {
                    v = Json::Array(vec![v]);
                }
                *slot = v;
            }
        }
    }
    doc
}

/// JSON punctuation and literals for [`ByteEdit::InsertToken`] on JSON files.
pub const JSON_TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b"-",
    b"1e400",
    b"-1e400",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"0.0000000000000000000000001",
    b"NaN",
    b"\xff",
    b"\xc3",
    b"\xef\xbb\xbf",
    b"\n",
    b"\r\n",
    b"[[[[[[[[[[[[[[[[[[[[",
];

/// The fixture file `name` of `rlhf-lm`'s tests.
pub fn lm_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lm/tests/fixtures")
        .join(name)
}
