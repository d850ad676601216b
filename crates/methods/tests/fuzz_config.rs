//! Fuzzing of the TOML configuration every `rlhf <method> --config x.toml --set k=v` goes through
//! (the registry's `resolved_toml`, which resolves defaults < file < `--set` exactly as `run`
//! does, without running): no panic, no hang, a rejected file is named, a rejected `--set` is
//! named. `RLHF_FUZZ_CASES` sets the inputs per method (see `scripts/fuzz.sh`).

#[path = "../../lm/tests/support/fuzz.rs"]
mod fuzz;

use std::path::{Path, PathBuf};

use fuzz::{apply_bytes, apply_json, byte_edits, json_edit, Check, Verdict};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value as Json;

/// Inputs per method in CI: the binary takes about 6 s on two cores.
const CI_CASES: u32 = 30_000;

/// TOML syntax for insertions into the text.
const TOML_TOKENS: &[&[u8]] = &[
    b"[",
    b"]",
    b"[[",
    b"]]",
    b"=",
    b"\"",
    b"'''",
    b"\"\"\"",
    b".",
    b",",
    b"#",
    b"\n",
    b"{",
    b"}",
    b"inf",
    b"nan",
    b"-0",
    b"1e999",
    b"99999999999999999999",
    b"0x7fffffffffffffff",
    b"1979-05-27T07:32:00Z",
    b"true",
    b"[optim]",
    b"[eval]",
    b"[rollout]",
    b"[lora]",
    b"lr = ",
    b"\\u0000",
    b"\xff",
];

#[derive(Debug, Clone)]
struct TomlInput {
    seed: Index,
    edits: Vec<fuzz::JsonEdit>,
    bytes: Vec<fuzz::ByteEdit>,
    sets: Vec<(Index, Index)>,
}

/// Every key (dotted for nested tables) and table name of a TOML table.
fn keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in table {
        let full = format!("{prefix}{k}");
        if let toml::Value::Table(t) = v {
            keys(t, &format!("{full}."), out);
        }
        out.push(full);
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn fuzz_method(name: &'static str, config_files: &[&str]) {
    let method = rlhf_methods::method(name).unwrap();
    let mut seeds: Vec<String> = vec![method.print_config().unwrap()];
    for f in config_files {
        seeds.push(std::fs::read_to_string(repo(f)).unwrap());
    }
    let default: toml::Table = toml::from_str(&seeds[0]).unwrap();
    let mut all_keys = Vec::new();
    keys(&default, "", &mut all_keys);
    // Field names for the JSON edits: the last part of each key (the edits work per table).
    let mut names: Vec<&'static str> = all_keys
        .iter()
        .map(|k| &*k.rsplit('.').next().unwrap().to_string().leak())
        .collect();
    names.sort();
    names.dedup();
    let names: &'static [&'static str] = names.leak();
    let set_values: &[&str] = &[
        "0",
        "-1",
        "1e-4",
        "nan",
        "inf",
        "true",
        "\"x\"",
        "[1, 2]",
        "{a = 1}",
        "",
        "[",
        "dpo",
        "18446744073709551616",
    ];
    let seeds_json: Vec<Option<Json>> = seeds
        .iter()
        .map(|s| {
            toml::from_str::<toml::Table>(s)
                .ok()
                .and_then(|t| serde_json::to_value(t).ok())
        })
        .collect();
    let strategy = (
        any::<Index>(),
        prop::collection::vec(json_edit(names), 0..4),
        byte_edits(3),
        prop::option::weighted(
            0.3,
            prop::collection::vec((any::<Index>(), any::<Index>()), 1..3),
        )
        .prop_map(Option::unwrap_or_default),
    )
        .prop_map(|(seed, edits, bytes, sets)| TomlInput {
            seed,
            edits,
            bytes,
            sets,
        });
    let path = fuzz::scratch_dir(name).join("config.toml");
    fuzz::fuzz(&format!("toml {name}"), CI_CASES, strategy, |input| {
        let i = input.seed.index(seeds.len());
        // Structured edits through JSON (a null has no TOML form: such a document keeps the
        // seed's text and relies on the byte edits).
        let text = match (&seeds_json[i], input.edits.is_empty()) {
            (Some(doc), false) => {
                let edited = apply_json(doc.clone(), &input.edits, names);
                toml::Value::try_from(edited)
                    .ok()
                    .and_then(|v| toml::to_string(&v).ok())
                    .unwrap_or_else(|| seeds[i].clone())
            }
            _ => seeds[i].clone(),
        };
        std::fs::write(
            &path,
            apply_bytes(text.into_bytes(), &input.bytes, TOML_TOKENS),
        )
        .unwrap();
        let sets: Vec<String> = input
            .sets
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    all_keys[k.index(all_keys.len())],
                    set_values[v.index(set_values.len())]
                )
            })
            .collect();
        match method.resolved_toml(Some(&path), &sets) {
            Ok(_) => Ok(Verdict::Accepted),
            Err(e) => named(&e, &path, &sets),
        }
    });
}

/// A rejection names the file, or (when only the overrides are wrong) the `--set`.
fn named(e: &rlhf_train::TrainError, path: &Path, sets: &[String]) -> Check {
    let msg = fuzz::chain(e);
    if msg.contains(&path.display().to_string()) || (!sets.is_empty() && msg.contains("--set")) {
        Ok(Verdict::Rejected)
    } else {
        Err(format!(
            "error names neither {} nor a --set: {msg}",
            path.display()
        ))
    }
}

#[test]
fn fuzz_toml_sft() {
    fuzz_method("sft", &[]);
}

#[test]
fn fuzz_toml_dpo() {
    fuzz_method(
        "dpo",
        &[
            "configs/offline/dpo-sentiment.toml",
            "configs/offline/ipo-sentiment.toml",
        ],
    );
}

#[test]
fn fuzz_toml_rloo() {
    fuzz_method("rloo", &["configs/online/rloo-sentiment.toml"]);
}

#[test]
fn fuzz_toml_ppo() {
    fuzz_method(
        "ppo",
        &[
            "configs/online/ppo-long-sentiment.toml",
            "configs/online/ppo-long-sentiment-pair.toml",
        ],
    );
}
