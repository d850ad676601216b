//! Loaders for TRL's field conventions: exact parsed strings for every format, errors that name
//! file / line / field for every kind of bad line, skip mode, and Parquet = JSON Lines.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use rlhf_data::loaders::{
    load_pairs, load_prompt_completion, load_prompts, load_unpaired, LoadOptions, Loaded, Pair,
    PromptCompletion, SkippedLine, Unpaired,
};
use rlhf_lm::{ChatTemplate, LmError};
use serde_json::{json, Value};

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn chatml() -> ChatTemplate {
    ChatTemplate::new(CHATML, None, None).unwrap()
}

const STRICT: LoadOptions = LoadOptions {
    skip_bad_lines: false,
};
const SKIP: LoadOptions = LoadOptions {
    skip_bad_lines: true,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A scratch file path unique to this test binary.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rlhf-data-loaders");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write(name: &str, text: &str) -> PathBuf {
    let path = scratch(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn pc(prompt: &str, completion: &str) -> PromptCompletion {
    PromptCompletion {
        prompt: prompt.into(),
        completion: completion.into(),
    }
}

fn pair(prompt: &str, chosen: &str, rejected: &str, margin: Option<f64>) -> Pair {
    Pair {
        prompt: prompt.into(),
        chosen: chosen.into(),
        rejected: rejected.into(),
        margin,
    }
}

fn unpaired(prompt: &str, completion: &str, label: bool) -> Unpaired {
    Unpaired {
        prompt: prompt.into(),
        completion: completion.into(),
        label,
    }
}

fn only<T>(loaded: Loaded<T>) -> Vec<T> {
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    loaded.items
}

// Rendered pieces of the ChatML template, written out by hand.
const SYS: &str = "<|im_start|>system\nBe brief.<|im_end|>\n";
const HI: &str = "<|im_start|>user\nHi<|im_end|>\n";
const Q: &str = "<|im_start|>user\n2+2?<|im_end|>\n";
const HELLO: &str = "<|im_start|>assistant\nHello!<|im_end|>\n";
const GEN: &str = "<|im_start|>assistant\n";

// ---------------------------------------------------------------------------------------------
// Each format, parsed to the exact expected strings.

#[test]
fn sft_plain() {
    let got = only(load_prompt_completion(&fixture("sft_plain.jsonl"), None, &STRICT).unwrap());
    assert_eq!(
        got,
        vec![pc("The capital of France is", " Paris."), pc("2+2=", "4")]
    );
}

#[test]
fn sft_messages() {
    let t = chatml();
    let got =
        only(load_prompt_completion(&fixture("sft_messages.jsonl"), Some(&t), &STRICT).unwrap());
    assert_eq!(
        got,
        vec![
            pc(
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
                "4<|im_end|>\n"
            ),
            pc(
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                "Hello!<|im_end|>\n"
            ),
        ]
    );
}

#[test]
fn sft_conversational_prompt_completion() {
    let t = chatml();
    let got = only(
        load_prompt_completion(&fixture("sft_conversational.jsonl"), Some(&t), &STRICT).unwrap(),
    );
    assert_eq!(
        got,
        vec![
            pc(&format!("{HI}{GEN}"), "Hello!<|im_end|>\n"),
            pc(&format!("{SYS}{Q}{GEN}"), "4<|im_end|>\n"),
        ]
    );
}

#[test]
fn pairs_plain_with_margin_and_blank_line() {
    let got = only(load_pairs(&fixture("pairs_plain.jsonl"), None, &STRICT).unwrap());
    assert_eq!(
        got,
        vec![
            pair("2+2=", "4", "5", Some(1.5)),
            pair("Sky colour?", " Blue.", " Green.", None),
            pair("Hi", "Hello!", "Go away.", None),
        ]
    );
}

#[test]
fn pairs_conversational() {
    let t = chatml();
    let got = only(load_pairs(&fixture("pairs_conversational.jsonl"), Some(&t), &STRICT).unwrap());
    assert_eq!(
        got,
        vec![
            pair(
                "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
                "4<|im_end|>\n",
                "5<|im_end|>\n",
                Some(2.0)
            ),
            pair(
                &format!("{SYS}{HI}{GEN}"),
                "Hello!<|im_end|>\n",
                "Go away.<|im_end|>\n",
                None
            ),
        ]
    );
}

#[test]
fn pairs_implicit_prompt_is_the_longest_common_prefix() {
    let t = chatml();
    let got = only(load_pairs(&fixture("pairs_implicit.jsonl"), Some(&t), &STRICT).unwrap());
    assert_eq!(
        got,
        vec![
            pair(&format!("{Q}{GEN}"), "4<|im_end|>\n", "5<|im_end|>\n", None),
            pair(
                &format!("{HI}{HELLO}{Q}{GEN}"),
                "4<|im_end|>\n",
                "Five.<|im_end|>\n",
                None
            ),
        ]
    );
}

#[test]
fn unpaired_plain_and_conversational() {
    let got = only(load_unpaired(&fixture("unpaired_plain.jsonl"), None, &STRICT).unwrap());
    assert_eq!(
        got,
        vec![unpaired("2+2=", "4", true), unpaired("2+2=", "5", false)]
    );
    let t = chatml();
    let got =
        only(load_unpaired(&fixture("unpaired_conversational.jsonl"), Some(&t), &STRICT).unwrap());
    assert_eq!(
        got,
        vec![
            unpaired(&format!("{Q}{GEN}"), "4<|im_end|>\n", true),
            unpaired(&format!("{HI}{GEN}"), "Go away.<|im_end|>\n", false),
        ]
    );
}

#[test]
fn prompts_plain_conversational_and_messages() {
    let got = only(load_prompts(&fixture("prompts_plain.jsonl"), None, &STRICT).unwrap());
    assert_eq!(got, vec!["Once upon a time".to_string(), "2+2=".into()]);
    let t = chatml();
    let got =
        only(load_prompts(&fixture("prompts_conversational.jsonl"), Some(&t), &STRICT).unwrap());
    assert_eq!(got, vec![format!("{SYS}{HI}{GEN}"), format!("{Q}{GEN}")]);
    // A final assistant message is the reply, not part of the prompt.
    let got = only(load_prompts(&fixture("prompts_messages.jsonl"), Some(&t), &STRICT).unwrap());
    assert_eq!(
        got,
        vec![format!("{HI}{GEN}"), format!("{HI}{HELLO}{Q}{GEN}")]
    );
}

// ---------------------------------------------------------------------------------------------
// Bad lines: the error names the file, the line and the field.

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sft,
    Pairs,
    Unpaired,
    Prompts,
}

fn load_any(
    kind: Kind,
    path: &Path,
    t: Option<&ChatTemplate>,
    opts: &LoadOptions,
) -> Result<usize, LmError> {
    match kind {
        Kind::Sft => load_prompt_completion(path, t, opts).map(|l| l.items.len()),
        Kind::Pairs => load_pairs(path, t, opts).map(|l| l.items.len()),
        Kind::Unpaired => load_unpaired(path, t, opts).map(|l| l.items.len()),
        Kind::Prompts => load_prompts(path, t, opts).map(|l| l.items.len()),
    }
}

fn good_line(kind: Kind) -> &'static str {
    match kind {
        Kind::Sft => r#"{"prompt": "p", "completion": "c"}"#,
        Kind::Pairs => r#"{"prompt": "p", "chosen": "c", "rejected": "r"}"#,
        Kind::Unpaired => r#"{"prompt": "p", "completion": "c", "label": true}"#,
        Kind::Prompts => r#"{"prompt": "p"}"#,
    }
}

/// Line 1 good, line 2 blank, line 3 `bad`: the error must be on line 3, in `field`.
fn assert_bad(
    case: &str,
    kind: Kind,
    template: Option<&ChatTemplate>,
    bad: &str,
    field: &str,
    message: &str,
) {
    let name = format!("bad_{case}.jsonl");
    let path = write(&name, &format!("{}\n\n{bad}\n", good_line(kind)));
    let err = load_any(kind, &path, template, &STRICT).expect_err(case);
    let text = err.to_string();
    assert!(text.contains(&name), "{case}: no file name in: {text}");
    assert!(
        text.contains(&format!(":3: field `{field}`: ")),
        "{case}: no line 3 / field `{field}` in: {text}"
    );
    assert!(text.contains(message), "{case}: no `{message}` in: {text}");
    match err {
        LmError::BadLine {
            path: p,
            line,
            field: f,
            ..
        } => {
            assert_eq!((p, line, f.as_str()), (path.clone(), 3, field), "{case}");
        }
        other => panic!("{case}: not a BadLine: {other:?}"),
    }
    // The same file in skip mode: line 3 skipped, line 1 kept.
    assert_eq!(load_any(kind, &path, template, &SKIP).unwrap(), 1, "{case}");
}

/// (case, loader, template, bad line, field, message).
type Case<'a> = (
    &'a str,
    Kind,
    Option<&'a ChatTemplate>,
    &'a str,
    &'a str,
    &'a str,
);

#[test]
fn bad_lines_name_file_line_and_field() {
    let t = chatml();
    let t = Some(&t);
    use Kind::*;
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("invalid_json", Pairs, None, r#"{"prompt": "a""#, "(line)", "not valid JSON"),
        ("not_object", Pairs, None, r#"["a", "b"]"#, "(line)", "expected a JSON object, found a list"),
        ("chosen_number", Pairs, None, r#"{"prompt": "a", "chosen": 1, "rejected": "b"}"#, "chosen", "expected a string, found a number"),
        ("prompt_number", Pairs, None, r#"{"prompt": 7, "chosen": "a", "rejected": "b"}"#, "prompt", "expected a string or a list of messages, found a number"),
        ("rejected_missing", Pairs, None, r#"{"prompt": "a", "chosen": "b"}"#, "rejected", "missing"),
        ("rejected_null", Pairs, None, r#"{"prompt": "a", "chosen": "b", "rejected": null}"#, "rejected", "missing (null)"),
        ("empty_prompt", Pairs, None, r#"{"prompt": "  ", "chosen": "a", "rejected": "b"}"#, "prompt", "empty"),
        ("empty_chosen", Pairs, None, r#"{"prompt": "p", "chosen": "", "rejected": "b"}"#, "chosen", "empty"),
        ("margin_string", Pairs, None, r#"{"prompt": "a", "chosen": "b", "rejected": "c", "margin": "big"}"#, "margin", "expected a number, found a string"),
        ("plain_prompt_list_chosen", Pairs, t, r#"{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}"#, "chosen", "expected a string, found a list (`prompt` is text"),
        ("chat_prompt_string_chosen", Pairs, t, r#"{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]}"#, "chosen", "expected a list of messages, found a string"),
        ("chosen_from_user", Pairs, t, r#"{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]}"#, "chosen[0].role", "must start with an `assistant` message"),
        ("message_without_role", Pairs, t, r#"{"prompt": [{"content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]}"#, "prompt[0].role", "missing or not a string"),
        ("chat_without_template", Pairs, None, r#"{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]}"#, "prompt", "needs a chat template"),
        ("implicit_plain", Pairs, t, r#"{"chosen": "a", "rejected": "b"}"#, "prompt", "missing"),
        ("implicit_same", Pairs, t, r#"{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#, "chosen", "the same conversation"),
        ("implicit_no_shared_prompt", Pairs, t, r#"{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}]}"#, "prompt", "no shared prompt"),
        ("label_string", Unpaired, None, r#"{"prompt": "a", "completion": "b", "label": "yes"}"#, "label", "expected a boolean (true or false), found a string"),
        ("label_number", Unpaired, None, r#"{"prompt": "a", "completion": "b", "label": 1}"#, "label", "found a number"),
        ("label_missing", Unpaired, None, r#"{"prompt": "a", "completion": "b"}"#, "label", "missing"),
        ("completion_missing", Sft, None, r#"{"prompt": "a"}"#, "completion", "missing"),
        ("neither_prompt_nor_messages", Sft, None, r#"{"text": "a"}"#, "prompt", "missing (expected `prompt` and `completion`, or `messages`)"),
        ("messages_end_with_user", Sft, t, r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}"#, "messages[2].role", "the last message must be the assistant's reply, found `user`"),
        ("messages_only_reply", Sft, t, r#"{"messages": [{"role": "assistant", "content": "b"}]}"#, "messages", "no prompt"),
        ("messages_not_list", Sft, t, r#"{"messages": "hi"}"#, "messages", "expected a list of messages, found a string"),
        ("messages_without_template", Sft, None, r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#, "messages", "needs a chat template"),
        ("prompt_missing", Prompts, None, r#"{"text": "a"}"#, "prompt", "missing"),
        ("prompt_empty_list", Prompts, t, r#"{"prompt": []}"#, "prompt", "empty list of messages"),
    ];
    for (case, kind, template, bad, field, message) in cases {
        assert_bad(case, *kind, *template, bad, field, message);
    }
}

#[test]
fn prompt_that_is_not_a_prefix_of_the_conversation() {
    // The generation prompt opens a think block that the rendered conversation does not have.
    let t = ChatTemplate::new(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]<think>{% endif %}",
        None,
        None,
    )
    .unwrap();
    assert_bad(
        "not_prefix",
        Kind::Unpaired,
        Some(&t),
        r#"{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}], "label": false}"#,
        "completion",
        "cannot be cut from it",
    );
}

#[test]
fn template_errors_are_bad_lines() {
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}{{ m.content }}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    assert_bad(
        "raise_exception",
        Kind::Prompts,
        Some(&t),
        r#"{"prompt": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}"#,
        "prompt",
        "no system role",
    );
}

#[test]
fn invalid_utf8_is_a_bad_line() {
    let path = scratch("bad_utf8.jsonl");
    let mut bytes = b"{\"prompt\": \"ok\"}\n{\"prompt\": \"".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(b"\"}\n{\"prompt\": \"fine\"}\n");
    std::fs::write(&path, bytes).unwrap();
    let err = load_prompts(&path, None, &STRICT).unwrap_err().to_string();
    assert!(
        err.contains("bad_utf8.jsonl:2: field `(line)`: not valid UTF-8"),
        "{err}"
    );
    let loaded = load_prompts(&path, None, &SKIP).unwrap();
    assert_eq!(loaded.items, vec!["ok".to_string(), "fine".into()]);
    assert_eq!(loaded.skipped.len(), 1);
    assert_eq!(loaded.skipped[0].line, 2);
}

// ---------------------------------------------------------------------------------------------
// Skip mode.

#[test]
fn skip_mode_collects_bad_lines_and_keeps_going() {
    let path = fixture("pairs_some_bad.jsonl");
    let err = load_pairs(&path, None, &STRICT).unwrap_err().to_string();
    assert!(
        err.contains("pairs_some_bad.jsonl:2: field `chosen`: expected a string, found a number"),
        "{err}"
    );

    let loaded = load_pairs(&path, None, &SKIP).unwrap();
    assert_eq!(
        loaded.items,
        vec![
            pair("a", "b", "c", None),
            pair("d", "e", "f", None),
            pair("g", "h", "i", Some(-0.5)),
        ]
    );
    let lines: Vec<usize> = loaded.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, vec![2, 4, 6]);
    assert_eq!(
        loaded.skipped[0],
        SkippedLine {
            line: 2,
            reason: "field `chosen`: expected a string, found a number".into()
        }
    );
    assert!(loaded.skipped[1]
        .reason
        .starts_with("field `(line)`: not valid JSON"));
    assert_eq!(loaded.skipped[2].reason, "field `rejected`: missing");
}

#[test]
fn all_lines_bad_or_none_is_an_error() {
    let path = write(
        "all_bad.jsonl",
        "{\"prompt\": 1, \"completion\": \"a\"}\n{\"prompt\": \"a\"}\n",
    );
    let err = load_prompt_completion(&path, None, &SKIP)
        .unwrap_err()
        .to_string();
    assert!(err.contains("all_bad.jsonl"), "{err}");
    assert!(err.contains("all 2 were bad"), "{err}");
    let empty = write("empty.jsonl", "\n\n");
    let err = load_prompts(&empty, None, &SKIP).unwrap_err().to_string();
    assert!(err.contains("empty.jsonl: no records"), "{err}");
}

#[test]
fn file_level_errors() {
    let csv = write("data.csv", "prompt,completion\n");
    let err = load_prompts(&csv, None, &SKIP).unwrap_err().to_string();
    assert!(
        err.contains("data.csv") && err.contains("unsupported data file"),
        "{err}"
    );
    let missing = scratch("does_not_exist.jsonl");
    let err = load_prompts(&missing, None, &SKIP).unwrap_err().to_string();
    assert!(err.contains("does_not_exist.jsonl"), "{err}");
    let junk = write("junk.parquet", "this is not parquet");
    let err = load_prompts(&junk, None, &SKIP).unwrap_err().to_string();
    assert!(
        err.contains("junk.parquet") && err.contains("not a readable Parquet file"),
        "{err}"
    );
    let array = write("array.json", "[{\"prompt\": \"a\"}]\n");
    let err = load_prompts(&array, None, &STRICT).unwrap_err().to_string();
    assert!(
        err.contains("array.json:1:") && err.contains("JSON Lines"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Parquet: written here with the parquet crate's writer, in the layout pyarrow writes.

#[derive(Clone, Copy)]
enum Col {
    Str,
    Bool,
    Double,
    Long,
    /// INT32 annotated DATE: a type the loaders do not convert (so it must not be read).
    Date,
    /// `list<struct<role: string, content: string>>`, as pyarrow writes it.
    Messages,
}

/// Write `records` to a Snappy-compressed Parquet file, `per_group` rows in each row group.
fn write_parquet(
    name: &str,
    columns: &[(&str, Col)],
    records: &[Value],
    per_group: usize,
) -> PathBuf {
    let mut schema = String::from("message schema {\n");
    for (name, col) in columns {
        schema.push_str(&match col {
            Col::Str => format!("OPTIONAL BYTE_ARRAY {name} (UTF8);\n"),
            Col::Bool => format!("OPTIONAL BOOLEAN {name};\n"),
            Col::Double => format!("OPTIONAL DOUBLE {name};\n"),
            Col::Long => format!("OPTIONAL INT64 {name};\n"),
            Col::Date => format!("OPTIONAL INT32 {name} (DATE);\n"),
            Col::Messages => format!(
                "OPTIONAL group {name} (LIST) {{ REPEATED group list {{ OPTIONAL group element {{ \
                 OPTIONAL BYTE_ARRAY role (UTF8); OPTIONAL BYTE_ARRAY content (UTF8); }} }} }}\n"
            ),
        });
    }
    schema.push('}');
    let schema = Arc::new(parse_message_type(&schema).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let path = scratch(name);
    let mut writer =
        SerializedFileWriter::new(File::create(&path).unwrap(), schema, props).unwrap();
    for group in records.chunks(per_group) {
        let mut rg = writer.next_row_group().unwrap();
        for (name, col) in columns {
            let cells: Vec<Option<&Value>> = group
                .iter()
                .map(|r| r.get(*name).filter(|v| !v.is_null()))
                .collect();
            let leaves: &[Option<&str>] = match col {
                Col::Messages => &[Some("role"), Some("content")],
                _ => &[None],
            };
            for leaf in leaves {
                let mut w = rg.next_column().unwrap().unwrap();
                let mut def = Vec::new();
                let mut rep = Vec::new();
                match (col, leaf) {
                    (Col::Messages, Some(key)) => {
                        let mut values = Vec::new();
                        for cell in &cells {
                            match cell {
                                None => {
                                    def.push(0);
                                    rep.push(0);
                                }
                                Some(v) => {
                                    let items = v.as_array().expect("messages are a list");
                                    if items.is_empty() {
                                        def.push(1);
                                        rep.push(0);
                                    }
                                    for (i, m) in items.iter().enumerate() {
                                        rep.push(if i == 0 { 0 } else { 1 });
                                        match m.get(*key).and_then(Value::as_str) {
                                            Some(s) => {
                                                def.push(4);
                                                values.push(ByteArray::from(s));
                                            }
                                            None => def.push(3),
                                        }
                                    }
                                }
                            }
                        }
                        w.typed::<ByteArrayType>()
                            .write_batch(&values, Some(&def), Some(&rep))
                            .unwrap();
                    }
                    _ => {
                        for cell in &cells {
                            def.push(i16::from(cell.is_some()));
                        }
                        let present = cells.iter().flatten();
                        match col {
                            Col::Str => {
                                let v: Vec<ByteArray> = present
                                    .map(|v| ByteArray::from(v.as_str().unwrap()))
                                    .collect();
                                w.typed::<ByteArrayType>().write_batch(&v, Some(&def), None)
                            }
                            Col::Bool => {
                                let v: Vec<bool> = present.map(|v| v.as_bool().unwrap()).collect();
                                w.typed::<BoolType>().write_batch(&v, Some(&def), None)
                            }
                            Col::Double => {
                                let v: Vec<f64> = present.map(|v| v.as_f64().unwrap()).collect();
                                w.typed::<DoubleType>().write_batch(&v, Some(&def), None)
                            }
                            Col::Long => {
                                let v: Vec<i64> = present.map(|v| v.as_i64().unwrap()).collect();
                                w.typed::<Int64Type>().write_batch(&v, Some(&def), None)
                            }
                            Col::Date => {
                                let v: Vec<i32> =
                                    present.map(|v| v.as_i64().unwrap() as i32).collect();
                                w.typed::<Int32Type>().write_batch(&v, Some(&def), None)
                            }
                            Col::Messages => unreachable!(),
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
    path
}

fn jsonl_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The fixture, written to Parquet with `columns` (plus two columns no loader reads), one row a
/// row group so that row numbering across groups is exercised.
fn fixture_as_parquet(name: &str, columns: &[(&str, Col)]) -> PathBuf {
    let mut records = jsonl_records(&fixture(name));
    for (i, r) in records.iter_mut().enumerate() {
        r["id"] = json!(i);
        r["created"] = json!(19_000 + i);
    }
    let mut cols = columns.to_vec();
    cols.push(("id", Col::Long));
    cols.push(("created", Col::Date));
    write_parquet(&name.replace(".jsonl", ".parquet"), &cols, &records, 1)
}

#[test]
fn parquet_and_jsonl_load_identically() {
    use Col::*;
    let t = chatml();
    let t = Some(&t);
    type Cols<'a> = &'a [(&'a str, Col)];
    let sft: &[(&str, Cols)] = &[
        ("sft_plain.jsonl", &[("prompt", Str), ("completion", Str)]),
        ("sft_messages.jsonl", &[("messages", Messages)]),
        (
            "sft_conversational.jsonl",
            &[("prompt", Messages), ("completion", Messages)],
        ),
    ];
    for (name, cols) in sft {
        let pq = fixture_as_parquet(name, cols);
        let a = load_prompt_completion(&fixture(name), t, &STRICT).unwrap();
        let b = load_prompt_completion(&pq, t, &STRICT).unwrap();
        assert_eq!(a, b, "{name}");
    }
    let pairs: &[(&str, Cols)] = &[
        (
            "pairs_plain.jsonl",
            &[
                ("prompt", Str),
                ("chosen", Str),
                ("rejected", Str),
                ("margin", Double),
            ],
        ),
        (
            "pairs_conversational.jsonl",
            &[
                ("prompt", Messages),
                ("chosen", Messages),
                ("rejected", Messages),
                ("margin", Double),
            ],
        ),
        (
            "pairs_implicit.jsonl",
            &[("chosen", Messages), ("rejected", Messages)],
        ),
    ];
    for (name, cols) in pairs {
        let pq = fixture_as_parquet(name, cols);
        let a = load_pairs(&fixture(name), t, &STRICT).unwrap();
        let b = load_pairs(&pq, t, &STRICT).unwrap();
        assert_eq!(a, b, "{name}");
    }
    let unp: &[(&str, Cols)] = &[
        (
            "unpaired_plain.jsonl",
            &[("prompt", Str), ("completion", Str), ("label", Bool)],
        ),
        (
            "unpaired_conversational.jsonl",
            &[
                ("prompt", Messages),
                ("completion", Messages),
                ("label", Bool),
            ],
        ),
    ];
    for (name, cols) in unp {
        let pq = fixture_as_parquet(name, cols);
        let a = load_unpaired(&fixture(name), t, &STRICT).unwrap();
        let b = load_unpaired(&pq, t, &STRICT).unwrap();
        assert_eq!(a, b, "{name}");
    }
    let prompts: &[(&str, Cols)] = &[
        (
            "prompts_plain.jsonl",
            &[("prompt", Str), ("completion", Str)],
        ),
        ("prompts_conversational.jsonl", &[("prompt", Messages)]),
        ("prompts_messages.jsonl", &[("messages", Messages)]),
    ];
    for (name, cols) in prompts {
        let pq = fixture_as_parquet(name, cols);
        let a = load_prompts(&fixture(name), t, &STRICT).unwrap();
        let b = load_prompts(&pq, t, &STRICT).unwrap();
        assert_eq!(a, b, "{name}");
    }
    // And the exact strings once more, from Parquet alone.
    let got = only(load_pairs(&scratch("pairs_implicit.parquet"), t, &STRICT).unwrap());
    assert_eq!(
        got[0],
        pair(&format!("{Q}{GEN}"), "4<|im_end|>\n", "5<|im_end|>\n", None)
    );
}

#[test]
fn parquet_bad_rows_name_file_row_and_field() {
    use Col::*;
    let records = vec![
        json!({"prompt": "a", "completion": "b", "label": true}),
        json!({"prompt": "c", "completion": "d", "label": false}),
        json!({"prompt": "e", "completion": "f", "label": null}),
        json!({"prompt": "", "completion": "h", "label": true}),
        json!({"prompt": "i", "completion": "j", "label": false}),
    ];
    // Two rows a group: rows 3 and 4 are in the second group, row 5 in the third.
    let path = write_parquet(
        "unpaired_bad.parquet",
        &[("prompt", Str), ("completion", Str), ("label", Bool)],
        &records,
        2,
    );
    let err = load_unpaired(&path, None, &STRICT).unwrap_err().to_string();
    assert!(
        err.contains("unpaired_bad.parquet:3: field `label`: missing (null)"),
        "{err}"
    );
    let loaded = load_unpaired(&path, None, &SKIP).unwrap();
    assert_eq!(
        loaded.items,
        vec![
            unpaired("a", "b", true),
            unpaired("c", "d", false),
            unpaired("i", "j", false)
        ]
    );
    assert_eq!(
        loaded.skipped,
        vec![
            SkippedLine {
                line: 3,
                reason: "field `label`: missing (null)".into()
            },
            SkippedLine {
                line: 4,
                reason: "field `prompt`: empty".into()
            },
        ]
    );

    // A label column of strings: the same type error as JSON Lines gives.
    let records = vec![json!({"prompt": "a", "completion": "b", "label": "yes"})];
    let path = write_parquet(
        "label_strings.parquet",
        &[("prompt", Str), ("completion", Str), ("label", Str)],
        &records,
        10,
    );
    let err = load_unpaired(&path, None, &STRICT).unwrap_err().to_string();
    assert!(
        err.contains("label_strings.parquet:1: field `label`: expected a boolean (true or false), found a string"),
        "{err}"
    );

    // A messages row with a message lacking its content.
    let records = vec![
        json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
        json!({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}),
    ];
    let path = write_parquet(
        "messages_bad.parquet",
        &[("messages", Messages)],
        &records,
        10,
    );
    let t = chatml();
    let err = load_prompt_completion(&path, Some(&t), &STRICT)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "messages_bad.parquet:2: field `messages[0].content`: missing or not a string"
        ),
        "{err}"
    );

    // A date in a column a loader reads.
    let records = vec![json!({"prompt": 19000})];
    let path = write_parquet("date_prompt.parquet", &[("prompt", Date)], &records, 10);
    let err = load_prompts(&path, None, &STRICT).unwrap_err().to_string();
    assert!(
        err.contains("date_prompt.parquet:1: field `prompt`: unsupported Parquet value"),
        "{err}"
    );

    // None of the columns a loader reads.
    let records = vec![json!({"text": "a", "id": 1})];
    let path = write_parquet(
        "no_columns.parquet",
        &[("text", Str), ("id", Long)],
        &records,
        10,
    );
    let err = load_pairs(&path, None, &STRICT).unwrap_err().to_string();
    assert!(
        err.contains("no_columns.parquet: has none of the columns `prompt`, `chosen`, `rejected`, `margin` (its columns: `text`, `id`)"),
        "{err}"
    );
}
