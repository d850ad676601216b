//! Fuzzing of the data loaders (JSON Lines in every TRL layout, and Parquet): no panic, no hang,
//! and every rejection names the file; a bad line is named by number and field, and it is really
//! the first bad line. `RLHF_FUZZ_CASES` sets the inputs per loader (see `scripts/fuzz.sh`).

#[path = "../../lm/tests/support/fuzz.rs"]
mod fuzz;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuzz::{apply_bytes, apply_json, byte_edits, edge_json, json_edit, names_file, Check, Verdict};
use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use proptest::prelude::*;
use proptest::sample::Index;
use rlhf_data::loaders::{
    load_pairs, load_prompt_completion, load_prompts, load_unpaired, LoadOptions, SkippedLine,
};
use rlhf_lm::{ChatTemplate, LmError};
use serde_json::Value as Json;

/// Inputs per loader in CI: the binary takes about 10 s on two cores.
const CI_CASES: u32 = 30_000;

const FIELDS: &[&str] = &[
    "prompt",
    "completion",
    "messages",
    "chosen",
    "rejected",
    "label",
    "margin",
    "role",
    "content",
];

/// The seeds: every layout of the fixtures, one file each.
const SEEDS: &[&str] = &[
    "pairs_conversational.jsonl",
    "pairs_implicit.jsonl",
    "pairs_plain.jsonl",
    "pairs_some_bad.jsonl",
    "prompts_conversational.jsonl",
    "prompts_messages.jsonl",
    "prompts_plain.jsonl",
    "sft_conversational.jsonl",
    "sft_messages.jsonl",
    "sft_plain.jsonl",
    "unpaired_conversational.jsonl",
    "unpaired_plain.jsonl",
];

/// Templates that render, that raise for some inputs, and that render the prompt differently from
/// the start of the conversation (so the reply cannot be cut out).
const TEMPLATES: &[&str] = &[
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m.content | trim }}\n{% endfor %}",
    "{% if add_generation_prompt %}GEN {% endif %}{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
    "{{ messages[5].content }}",
    "",
];

fn seed_lines(name: &str) -> Vec<Json> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        // A seed line that is not JSON (pairs_some_bad) is left to the byte edits to recreate.
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[derive(Debug, Clone)]
struct JsonlInput {
    seed: Index,
    /// JSON edits, each on one line of the seed.
    line_edits: Vec<(Index, Vec<fuzz::JsonEdit>)>,
    /// Whole lines generated from the field names, inserted among the seed's.
    generated: Vec<(Index, Vec<(Index, Json)>)>,
    /// "\n" or "\r\n" between lines, blank lines between some.
    crlf: bool,
    blank_after: Option<Index>,
    bytes: Vec<fuzz::ByteEdit>,
    template: Index,
    skip_bad_lines: bool,
}

fn jsonl_input() -> impl Strategy<Value = JsonlInput> {
    (
        any::<Index>(),
        prop::collection::vec(
            (
                any::<Index>(),
                prop::collection::vec(json_edit(FIELDS), 1..4),
            ),
            0..3,
        ),
        prop::collection::vec(
            (
                any::<Index>(),
                prop::collection::vec((any::<Index>(), edge_json(FIELDS)), 0..5),
            ),
            0..2,
        ),
        any::<bool>(),
        prop::option::of(any::<Index>()),
        byte_edits(3),
        any::<Index>(),
        any::<bool>(),
    )
        .prop_map(
            |(seed, line_edits, generated, crlf, blank_after, bytes, template, skip)| JsonlInput {
                seed,
                line_edits,
                generated,
                crlf,
                blank_after,
                bytes,
                template,
                skip_bad_lines: skip,
            },
        )
}

fn jsonl_bytes(input: &JsonlInput, seeds: &[Vec<Json>]) -> Vec<u8> {
    let mut lines = seeds[input.seed.index(seeds.len())].clone();
    for (at, edits) in &input.line_edits {
        let i = at.index(lines.len());
        lines[i] = apply_json(lines[i].take(), edits, FIELDS);
    }
    for (at, fields) in &input.generated {
        let obj: serde_json::Map<String, Json> = fields
            .iter()
            .map(|(k, v)| (FIELDS[k.index(FIELDS.len())].to_string(), v.clone()))
            .collect();
        lines.insert(at.index(lines.len() + 1), Json::Object(obj));
    }
    let mut text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    if let Some(at) = &input.blank_after {
        text.insert(at.index(text.len() + 1), "   ".into());
    }
    let sep = if input.crlf { "\r\n" } else { "\n" };
    apply_bytes(
        (text.join(sep) + sep).into_bytes(),
        &input.bytes,
        fuzz::JSON_TOKENS,
    )
}

/// How many lines a line reader sees in `bytes`.
fn line_count(bytes: &[u8]) -> usize {
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
    newlines + usize::from(!bytes.is_empty() && bytes.last() != Some(&b'\n'))
}

/// Where the bytes of 1-based line `n` end (after its newline).
fn end_of_line(bytes: &[u8], n: usize) -> usize {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .nth(n - 1)
        .map_or(bytes.len(), |(i, _)| i + 1)
}

type Loader = fn(&Path, Option<&ChatTemplate>, &LoadOptions) -> Result<Vec<SkippedLine>, LmError>;

const LOADERS: &[(&str, Loader)] = &[
    ("jsonl-prompt-completion", |p, t, o| {
        load_prompt_completion(p, t, o).map(|l| l.skipped)
    }),
    ("jsonl-pairs", |p, t, o| {
        load_pairs(p, t, o).map(|l| l.skipped)
    }),
    ("jsonl-unpaired", |p, t, o| {
        load_unpaired(p, t, o).map(|l| l.skipped)
    }),
    ("jsonl-prompts", |p, t, o| {
        load_prompts(p, t, o).map(|l| l.skipped)
    }),
];

/// The fields of a data line (`FIELDS` without the message keys `role` and `content`).
const KNOWN_FIELDS: &[&str] = FIELDS.split_at(7).0;

fn known_field(field: &str) -> bool {
    field == "(line)"
        || KNOWN_FIELDS
            .iter()
            .any(|f| field == *f || field.starts_with(&format!("{f}[")))
}

/// A bad line's error: `<path>:<line>: field `<field>`: ...`, with a line that exists and a
/// field the loader knows.
fn check_bad_line(e: &LmError, path: &Path, lines: usize) -> Check {
    let LmError::BadLine { line, field, .. } = e else {
        return names_file(e, path);
    };
    let msg = e.to_string();
    let want = format!("{}:{line}: field `{field}`", path.display());
    if !msg.starts_with(&want) {
        return Err(format!(
            "a bad line's error should start with {want:?}: {msg}"
        ));
    }
    if *line == 0 || *line > lines {
        return Err(format!("line {line} of a file of {lines} lines: {msg}"));
    }
    if !known_field(field) {
        return Err(format!("unknown field `{field}`: {msg}"));
    }
    Ok(Verdict::Rejected)
}

fn check_skipped(skipped: &[SkippedLine], lines: usize) -> Result<(), String> {
    for s in skipped {
        if s.line == 0 || s.line > lines || !s.reason.starts_with("field `") {
            return Err(format!(
                "skipped line out of range or unnamed: {s:?} of {lines}"
            ));
        }
    }
    Ok(())
}

fn same_bad_line(a: &LmError, b: &LmError) -> bool {
    matches!(
        (a, b),
        (LmError::BadLine { line: l1, field: f1, .. }, LmError::BadLine { line: l2, field: f2, .. })
            if l1 == l2 && f1 == f2
    )
}

/// Load `bytes` as a JSON Lines file and check the outcome. In strict mode, the line an error
/// names must be the first bad one: the file cut after it fails the same way, and the file cut
/// before it has no bad line.
fn check_jsonl(
    load: Loader,
    dir: &Path,
    bytes: &[u8],
    template: Option<&ChatTemplate>,
    skip: bool,
) -> Check {
    let path = dir.join("data.jsonl");
    std::fs::write(&path, bytes).unwrap();
    let opts = LoadOptions {
        skip_bad_lines: skip,
    };
    let lines = line_count(bytes);
    let e = match load(&path, template, &opts) {
        Ok(skipped) => {
            check_skipped(&skipped, lines)?;
            return Ok(Verdict::Accepted);
        }
        Err(e) => e,
    };
    check_bad_line(&e, &path, lines)?;
    if skip {
        if matches!(e, LmError::BadLine { .. }) {
            return Err(format!(
                "a bad line was an error despite skip_bad_lines: {e}"
            ));
        }
        return Ok(Verdict::Rejected);
    }
    if let LmError::BadLine { line, .. } = &e {
        let cut = dir.join("cut.jsonl");
        std::fs::write(&cut, &bytes[..end_of_line(bytes, *line)]).unwrap();
        match load(&cut, template, &opts) {
            Err(again) if same_bad_line(&e, &again) => {}
            other => {
                return Err(format!(
                    "`{e}`, but the file cut after that line gives {:?}",
                    other.map(|_| ())
                ))
            }
        }
        if *line > 1 {
            std::fs::write(&cut, &bytes[..end_of_line(bytes, line - 1)]).unwrap();
            if let Err(before @ LmError::BadLine { .. }) = load(&cut, template, &opts) {
                return Err(format!("`{e}`, but an earlier line is bad: `{before}`"));
            }
        }
    }
    Ok(Verdict::Rejected)
}

fn templates() -> Vec<Option<ChatTemplate>> {
    let mut out: Vec<Option<ChatTemplate>> = TEMPLATES
        .iter()
        .map(|t| Some(ChatTemplate::new(*t, Some("<s>".into()), Some("</s>".into())).unwrap()))
        .collect();
    out.push(None);
    out
}

fn fuzz_jsonl(which: usize) {
    let (name, load) = LOADERS[which];
    let seeds: Vec<Vec<Json>> = SEEDS.iter().map(|s| seed_lines(s)).collect();
    let templates = templates();
    let dir = fuzz::scratch_dir(name);
    fuzz::fuzz(name, CI_CASES, jsonl_input(), |input| {
        let bytes = jsonl_bytes(input, &seeds);
        let template = templates[input.template.index(templates.len())].as_ref();
        check_jsonl(load, &dir, &bytes, template, input.skip_bad_lines)
    });
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn fuzz_jsonl_prompt_completion() {
    fuzz_jsonl(0);
}

#[test]
fn fuzz_jsonl_pairs() {
    fuzz_jsonl(1);
}

#[test]
fn fuzz_jsonl_unpaired() {
    fuzz_jsonl(2);
}

#[test]
fn fuzz_jsonl_prompts() {
    fuzz_jsonl(3);
}

// ---------------------------------------------------------------------------------------------
// Parquet: files written by the parquet crate's writer from generated records (text or message
// columns, label, margin), then corrupted byte-wise.

#[derive(Debug, Clone, Copy)]
enum Col {
    Str,
    Bool,
    Double,
    Messages,
}

#[derive(Debug, Clone)]
struct ParquetInput {
    /// Which loader's layout the columns follow (its fields, all text or all messages), and
    /// extra columns of any field and type.
    chat: bool,
    extra_columns: Vec<(Index, u8)>,
    rows: Vec<Vec<Cell>>,
    snappy: bool,
    rows_per_group: u8,
    bytes: Vec<fuzz::ByteEdit>,
    loader: Index,
    template: Index,
    skip_bad_lines: bool,
}

/// One generated cell, in every column type; the column's type picks which part is written.
#[derive(Debug, Clone)]
struct Cell {
    present: bool,
    text: &'static str,
    messages: Vec<(&'static str, &'static str)>,
    flag: bool,
    number: f64,
}

fn cell() -> impl Strategy<Value = Cell> {
    (
        prop::bool::weighted(0.9),
        prop::sample::select(vec!["hi", "", " ", "a reply", "é🦀", "{{"]),
        prop::collection::vec(
            (
                prop::sample::select(vec!["user", "assistant", "assistant", "system", ""]),
                prop::sample::select(vec!["hi", "", "yes", "no"]),
            ),
            0..4,
        ),
        any::<bool>(),
        prop::sample::select(vec![0.0, -1.0, 0.5, 1e308, f64::NAN, f64::INFINITY]),
    )
        .prop_map(|(present, text, messages, flag, number)| Cell {
            present,
            text,
            messages,
            flag,
            number,
        })
}

fn parquet_input() -> impl Strategy<Value = ParquetInput> {
    (
        any::<bool>(),
        prop::collection::vec((any::<Index>(), 0u8..4), 0..3),
        prop::collection::vec(prop::collection::vec(cell(), 8), 0..5),
        any::<bool>(),
        1u8..4,
        prop_oneof![
            Just(Vec::new()),
            prop::collection::vec(fuzz::byte_edit(), 1..4)
        ],
        any::<Index>(),
        any::<Index>(),
        any::<bool>(),
    )
        .prop_map(
            |(chat, extra_columns, rows, snappy, rows_per_group, bytes, loader, template, skip)| {
                ParquetInput {
                    chat,
                    extra_columns,
                    rows,
                    snappy,
                    rows_per_group,
                    bytes,
                    loader,
                    template,
                    skip_bad_lines: skip,
                }
            },
        )
}

/// The fields each loader of [`LOADERS`] reads, in its layout with a prompt.
const LAYOUTS: &[&[&str]] = &[
    &["prompt", "completion"],
    &["prompt", "chosen", "rejected"],
    &["prompt", "completion"],
    &["prompt"],
];

fn write_parquet(path: &Path, input: &ParquetInput, loader: usize) -> Vec<u8> {
    let text = if input.chat { Col::Messages } else { Col::Str };
    let mut columns: Vec<(&str, Col)> = LAYOUTS[loader].iter().map(|f| (*f, text)).collect();
    if loader == 1 {
        columns.push(("margin", Col::Double));
    }
    if loader == 2 {
        columns.push(("label", Col::Bool));
    }
    for (name, kind) in &input.extra_columns {
        let name = KNOWN_FIELDS[name.index(KNOWN_FIELDS.len())];
        if columns.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let col = [Col::Str, Col::Bool, Col::Double, Col::Messages][*kind as usize];
        columns.push((name, col));
    }
    let mut schema = String::from("message schema {\n");
    for (name, col) in &columns {
        schema.push_str(&match col {
            Col::Str => format!("OPTIONAL BYTE_ARRAY {name} (UTF8);\n"),
            Col::Bool => format!("OPTIONAL BOOLEAN {name};\n"),
            Col::Double => format!("OPTIONAL DOUBLE {name};\n"),
            Col::Messages => format!(
                "OPTIONAL group {name} (LIST) {{ REPEATED group list {{ OPTIONAL group element {{ \
                 OPTIONAL BYTE_ARRAY role (UTF8); OPTIONAL BYTE_ARRAY content (UTF8); }} }} }}\n"
            ),
        });
    }
    schema.push('}');
    let schema = Arc::new(parse_message_type(&schema).unwrap());
    let codec = if input.snappy {
        Compression::SNAPPY
    } else {
        Compression::UNCOMPRESSED
    };
    let props = Arc::new(WriterProperties::builder().set_compression(codec).build());
    let mut writer = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
    for group in input.rows.chunks(input.rows_per_group as usize) {
        let mut rg = writer.next_row_group().unwrap();
        for (ci, (_, col)) in columns.iter().enumerate() {
            let cells: Vec<Option<&Cell>> = group
                .iter()
                .map(|r| Some(&r[ci % r.len()]).filter(|c| c.present))
                .collect();
            let leaves: &[&str] = match col {
                Col::Messages => &["role", "content"],
                _ => &[""],
            };
            for leaf in leaves {
                let mut w = rg.next_column().unwrap().unwrap();
                let mut def = Vec::new();
                let mut rep = Vec::new();
                match col {
                    Col::Messages => {
                        let mut values = Vec::new();
                        for cell in &cells {
                            let Some(v) = cell else {
                                def.push(0);
                                rep.push(0);
                                continue;
                            };
                            if v.messages.is_empty() {
                                def.push(1);
                                rep.push(0);
                            }
                            for (i, (role, content)) in v.messages.iter().enumerate() {
                                rep.push(i16::from(i > 0));
                                def.push(4);
                                let text = if *leaf == "role" { role } else { content };
                                values.push(ByteArray::from(*text));
                            }
                        }
                        w.typed::<ByteArrayType>()
                            .write_batch(&values, Some(&def), Some(&rep))
                            .unwrap();
                    }
                    _ => {
                        def.extend(cells.iter().map(|c| i16::from(c.is_some())));
                        let present = cells.iter().flatten();
                        match col {
                            Col::Str => {
                                let v: Vec<ByteArray> =
                                    present.map(|c| ByteArray::from(c.text)).collect();
                                w.typed::<ByteArrayType>().write_batch(&v, Some(&def), None)
                            }
                            Col::Bool => {
                                let v: Vec<bool> = present.map(|c| c.flag).collect();
                                w.typed::<BoolType>().write_batch(&v, Some(&def), None)
                            }
                            _ => {
                                let v: Vec<f64> = present.map(|c| c.number).collect();
                                w.typed::<DoubleType>().write_batch(&v, Some(&def), None)
                            }
                        }
                        .unwrap();
                    }
                }
                w.close().unwrap();
            }
        }
        rg.close().unwrap();
    }
    writer.close().unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn fuzz_parquet() {
    let templates = templates();
    let dir = fuzz::scratch_dir("parquet");
    let clean = dir.join("clean.parquet");
    let path: PathBuf = dir.join("data.parquet");
    fuzz::fuzz("parquet", CI_CASES, parquet_input(), |input| {
        let loader = input.loader.index(LOADERS.len());
        let bytes = write_parquet(&clean, input, loader);
        let bytes = apply_bytes(
            bytes,
            &input.bytes,
            &[b"PAR1", b"\0\0\0\0", b"\xff\xff\xff\x7f"],
        );
        std::fs::write(&path, &bytes).unwrap();
        let (_, load) = LOADERS[loader];
        let opts = LoadOptions {
            skip_bad_lines: input.skip_bad_lines,
        };
        let template = templates[input.template.index(templates.len())].as_ref();
        // A row is a "line": an intact file has exactly the rows written; a corrupted one may
        // claim any number.
        let rows = if input.bytes.is_empty() {
            input.rows.len()
        } else {
            usize::MAX
        };
        match load(&path, template, &opts) {
            Ok(skipped) => check_skipped(&skipped, rows).map(|_| Verdict::Accepted),
            Err(e) => check_bad_line(&e, &path, rows),
        }
    });
    std::fs::remove_dir_all(&dir).ok();
}

/// An `Index` for a hand-written input (it has no public constructor); unused by `write_parquet`.
fn an_index() -> Index {
    use proptest::strategy::ValueTree;
    any::<Index>()
        .new_tree(&mut proptest::test_runner::TestRunner::deterministic())
        .unwrap()
        .current()
}

/// Regression: the `parquet` crate panics on some corrupt files (an index out of range in its
/// bit reader, "column start and length should not be negative", ...). Every single-byte
/// corruption of a small file must load or be an error naming the file, and some of them are
/// exactly those decoder panics, now reported as errors.
#[test]
fn corrupt_parquet_bytes_are_errors_naming_the_file() {
    let dir = fuzz::scratch_dir("regression-parquet");
    let clean = dir.join("clean.parquet");
    let path = dir.join("data.parquet");
    let cell = |text: &'static str, role: &'static str| Cell {
        present: true,
        text,
        messages: vec![("user", "hi"), (role, text)],
        flag: true,
        number: 0.5,
    };
    let input = ParquetInput {
        chat: false,
        extra_columns: Vec::new(),
        rows: vec![vec![cell("a", "assistant"), cell("b", "user")]; 3],
        snappy: false,
        rows_per_group: 2,
        bytes: Vec::new(),
        loader: an_index(),
        template: an_index(),
        skip_bad_lines: false,
    };
    let bytes = write_parquet(&clean, &input, 0);
    let mut decoder_failures = 0;
    for at in 0..bytes.len() {
        for value in [0x00u8, 0xff, 0x7f] {
            let mut corrupt = bytes.clone();
            corrupt[at] = value;
            std::fs::write(&path, &corrupt).unwrap();
            if let Err(e) = load_prompt_completion(&path, None, &LoadOptions::default()) {
                let msg = e.to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
                decoder_failures += usize::from(msg.contains("the decoder failed"));
            }
        }
    }
    assert!(
        decoder_failures > 0,
        "no corruption reached a decoder panic"
    );
}
