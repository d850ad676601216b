//! Loading user data with TRL's field conventions, from JSON Lines (`.jsonl`, `.json`) or Parquet
//! (`.parquet`); the file's extension picks the reader.
//!
//! | loader | fields |
//! | --- | --- |
//! | [`load_prompt_completion`] | `prompt` / `completion` (text, or both lists of messages), or `messages` |
//! | [`load_pairs`] | `prompt` / `chosen` / `rejected` (text, or lists of messages), or only `chosen` / `rejected` as full conversations; optional `margin` |
//! | [`load_unpaired`] | `prompt` / `completion` (text, or lists of messages) / `label` (boolean) |
//! | [`load_prompts`] | `prompt` (text or messages), or `messages` |
//!
//! Conversational records (lists of `{role, content}`) are rendered with the chat template as TRL
//! does: the prompt with `add_generation_prompt=true`, and the reply as the rendering of the whole
//! conversation (`add_generation_prompt=false`) minus the rendered prompt at its front. They need a
//! template.
//!
//! Every record goes through the same checks, whatever the file format: a Parquet row is first
//! turned into the JSON object a JSON line would hold ([`crate::parquet`]). An error names the
//! file, the line (the 1-based line of a JSON Lines file, or the row index + 1 of a Parquet file)
//! and the field. By default the first bad line is the error; with
//! [`LoadOptions::skip_bad_lines`] bad lines are collected in [`Loaded::skipped`] instead.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rlhf_lm::{ChatTemplate, LmError, Message, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jsonl::Line;

/// A prompt and its reply (SFT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptCompletion {
    pub prompt: String,
    pub completion: String,
}

/// A preference pair (DPO and friends), with TRL's optional `margin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub margin: Option<f64>,
}

/// A reply labelled desirable (`true`) or not (KTO).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unpaired {
    pub prompt: String,
    pub completion: String,
    pub label: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Collect bad lines in [`Loaded::skipped`] and go on, instead of failing on the first one.
    /// Problems with the file as a whole (unreadable, an unsupported extension, a Parquet file
    /// that cannot be decoded) are errors either way.
    pub skip_bad_lines: bool,
}

/// A line left out under [`LoadOptions::skip_bad_lines`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    /// 1-based line (JSON Lines) or row index + 1 (Parquet).
    pub line: usize,
    /// "field `name`: what is wrong".
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<T> {
    pub items: Vec<T>,
    pub skipped: Vec<SkippedLine>,
}

/// SFT data: `prompt` / `completion` as text, or both as lists of messages, or `messages` (a whole
/// conversation whose last message is the assistant's reply: the prompt is everything before it).
pub fn load_prompt_completion(
    path: &Path,
    template: Option<&ChatTemplate>,
    opts: &LoadOptions,
) -> Result<Loaded<PromptCompletion>> {
    load(path, &["prompt", "completion", "messages"], opts, |line| {
        parse_prompt_completion(line, template)
    })
}

/// Preference pairs: `prompt` / `chosen` / `rejected` as text, or `prompt` as a list of messages
/// and `chosen` / `rejected` as lists of assistant messages, or (no `prompt`) `chosen` / `rejected`
/// as whole conversations whose longest common prefix of messages is the prompt. An optional
/// numeric `margin`.
pub fn load_pairs(
    path: &Path,
    template: Option<&ChatTemplate>,
    opts: &LoadOptions,
) -> Result<Loaded<Pair>> {
    load(
        path,
        &["prompt", "chosen", "rejected", "margin"],
        opts,
        |line| parse_pair(line, template),
    )
}

/// Unpaired (KTO) data: `prompt` / `completion` as text or lists of messages, and a boolean
/// `label`.
pub fn load_unpaired(
    path: &Path,
    template: Option<&ChatTemplate>,
    opts: &LoadOptions,
) -> Result<Loaded<Unpaired>> {
    load(path, &["prompt", "completion", "label"], opts, |line| {
        parse_unpaired(line, template)
    })
}

/// Prompts for generation (online methods): `prompt` as text, or as a list of messages rendered
/// with the generation prompt; or `messages`, rendered with the generation prompt after dropping a
/// final assistant message (so an SFT conversation gives the prompt of its last reply).
pub fn load_prompts(
    path: &Path,
    template: Option<&ChatTemplate>,
    opts: &LoadOptions,
) -> Result<Loaded<String>> {
    load(path, &["prompt", "messages"], opts, |line| {
        parse_prompt(line, template)
    })
}

/// The records of a data file as [`Line`]s, by extension: `.jsonl` / `.json` (one JSON object a
/// line) or `.parquet` (reading only `columns`, all when `None`). A line that is not a JSON object
/// is an `Err` item (`LmError::BadLine`) and iteration goes on; a file-level problem is the
/// returned error, or a final `Err` item that is not a `BadLine`.
pub fn records(
    path: &Path,
    columns: Option<&[&str]>,
) -> Result<Box<dyn Iterator<Item = Result<Line>>>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("jsonl") | Some("json") => Ok(Box::new(json_lines(path)?)),
        Some("parquet") => Ok(Box::new(crate::parquet::rows(path, columns)?)),
        _ => Err(LmError::bad_file(
            path,
            "unsupported data file: expected a .jsonl or .json (JSON Lines) or .parquet file",
        )),
    }
}

fn load<T>(
    path: &Path,
    columns: &[&str],
    opts: &LoadOptions,
    mut parse: impl FnMut(&Line) -> Result<T>,
) -> Result<Loaded<T>> {
    let mut out = Loaded {
        items: Vec::new(),
        skipped: Vec::new(),
    };
    for record in records(path, Some(columns))? {
        match record.and_then(|line| parse(&line)) {
            Ok(item) => out.items.push(item),
            Err(LmError::BadLine {
                line,
                field,
                message,
                ..
            }) if opts.skip_bad_lines => out.skipped.push(SkippedLine {
                line,
                reason: format!("field `{field}`: {message}"),
            }),
            Err(e) => return Err(e),
        }
    }
    if out.items.is_empty() {
        return Err(match out.skipped.first() {
            None => LmError::bad_file(path, "no records"),
            Some(first) => LmError::bad_file(
                path,
                format!(
                    "no usable records: all {} were bad; the first, line {}: {}",
                    out.skipped.len(),
                    first.line,
                    first.reason
                ),
            ),
        });
    }
    Ok(out)
}

/// JSON Lines, read a line at a time. Blank lines are ignored (but counted).
struct JsonLines {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    line: usize,
    done: bool,
}

fn json_lines(path: &Path) -> Result<JsonLines> {
    let file = File::open(path).map_err(|e| LmError::io(path, e))?;
    Ok(JsonLines {
        path: path.to_path_buf(),
        lines: BufReader::new(file).lines(),
        line: 0,
        done: false,
    })
}

impl Iterator for JsonLines {
    type Item = Result<Line>;

    fn next(&mut self) -> Option<Result<Line>> {
        loop {
            if self.done {
                return None;
            }
            let raw = self.lines.next()?;
            self.line += 1;
            let bad = |message: String| LmError::BadLine {
                path: self.path.clone(),
                line: self.line,
                field: "(line)".into(),
                message,
            };
            let raw = match raw {
                Ok(raw) => raw,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Some(Err(bad("not valid UTF-8".into())));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(LmError::io(&self.path, e)));
                }
            };
            let text = if self.line == 1 {
                raw.strip_prefix('\u{feff}').unwrap_or(&raw)
            } else {
                &raw
            };
            if text.trim().is_empty() {
                continue;
            }
            let hint = if self.line == 1 && text.trim_start().starts_with('[') {
                " (a JSON array? this reader wants JSON Lines: one object a line)"
            } else {
                ""
            };
            let value: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => return Some(Err(bad(format!("not valid JSON: {e}{hint}")))),
            };
            if !value.is_object() {
                return Some(Err(bad(format!(
                    "expected a JSON object, found {}{hint}",
                    kind(&value)
                ))));
            }
            return Some(Ok(Line {
                path: self.path.clone(),
                line: self.line,
                value,
            }));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Field checks, shared by every format.

fn bad(line: &Line, field: &str, message: impl Into<String>) -> LmError {
    LmError::BadLine {
        path: line.path.clone(),
        line: line.line,
        field: field.into(),
        message: message.into(),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A present, non-null field.
fn get<'a>(line: &'a Line, field: &str) -> Option<&'a Value> {
    line.value.get(field).filter(|v| !v.is_null())
}

fn missing(line: &Line, field: &str) -> LmError {
    match line.value.get(field) {
        Some(Value::Null) => bad(line, field, "missing (null)"),
        _ => bad(line, field, "missing"),
    }
}

/// Text, or a conversation.
enum Text {
    Plain(String),
    Chat(Vec<Message>),
}

fn text_or_messages(line: &Line, field: &str) -> Result<Text> {
    match get(line, field) {
        None => Err(missing(line, field)),
        Some(Value::String(s)) => Ok(Text::Plain(s.clone())),
        Some(Value::Array(_)) => Ok(Text::Chat(line.messages(field)?)),
        Some(other) => Err(bad(
            line,
            field,
            format!(
                "expected a string or a list of messages, found {}",
                kind(other)
            ),
        )),
    }
}

/// A non-empty string; `context` explains why a string is wanted when a list came.
fn plain(line: &Line, field: &str, context: &str) -> Result<String> {
    let s = match get(line, field) {
        None => return Err(missing(line, field)),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            let mut message = format!("expected a string, found {}", kind(other));
            if other.is_array() && !context.is_empty() {
                message.push_str(&format!(" ({context})"));
            }
            return Err(bad(line, field, message));
        }
    };
    nonempty(line, field, s)
}

fn nonempty(line: &Line, field: &str, s: String) -> Result<String> {
    if s.trim().is_empty() {
        Err(bad(line, field, "empty"))
    } else {
        Ok(s)
    }
}

/// A non-empty list of messages; `context` explains why a list is wanted when a string came.
fn conversation(line: &Line, field: &str, context: &str) -> Result<Vec<Message>> {
    match get(line, field) {
        None => return Err(missing(line, field)),
        Some(Value::Array(_)) => {}
        Some(other) => {
            let mut message = format!("expected a list of messages, found {}", kind(other));
            if other.is_string() && !context.is_empty() {
                message.push_str(&format!(" ({context})"));
            }
            return Err(bad(line, field, message));
        }
    }
    let messages = line.messages(field)?;
    if messages.is_empty() {
        return Err(bad(line, field, "empty list of messages"));
    }
    Ok(messages)
}

/// The messages of a reply: a non-empty list starting with an assistant message.
fn reply(line: &Line, field: &str, context: &str) -> Result<Vec<Message>> {
    let messages = conversation(line, field, context)?;
    check_reply_starts(line, field, &messages, 0)?;
    Ok(messages)
}

fn check_reply_starts(line: &Line, field: &str, messages: &[Message], at: usize) -> Result<()> {
    match messages.get(at) {
        Some(m) if m.role == "assistant" => Ok(()),
        Some(m) => Err(bad(
            line,
            &format!("{field}[{at}].role"),
            format!(
                "the reply must start with an `assistant` message, found `{}`",
                m.role
            ),
        )),
        None => Err(bad(line, field, "no reply message")),
    }
}

fn need_template<'t>(
    line: &Line,
    field: &str,
    template: Option<&'t ChatTemplate>,
) -> Result<&'t ChatTemplate> {
    template.ok_or_else(|| {
        bad(
            line,
            field,
            "a list of messages needs a chat template, and there is none (the model has no chat \
             template and none was given)",
        )
    })
}

fn render(
    line: &Line,
    field: &str,
    template: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<String> {
    template
        .render(messages, add_generation_prompt)
        .map_err(|e| bad(line, field, e.to_string()))
}

/// The rendered prompt (with the generation prompt) and the reply: the rendering of prompt +
/// reply with the rendered prompt removed from its front.
fn render_split(
    line: &Line,
    template: &ChatTemplate,
    prompt_field: &str,
    prompt: &[Message],
    replies: &[(&str, &[Message])],
) -> Result<(String, Vec<String>)> {
    let prompt_text = render(line, prompt_field, template, prompt, true)?;
    let mut out = Vec::with_capacity(replies.len());
    for (field, reply) in replies {
        let mut all = prompt.to_vec();
        all.extend_from_slice(reply);
        let full = render(line, field, template, &all, false)?;
        let Some(rest) = full.strip_prefix(&prompt_text) else {
            return Err(bad(
                line,
                field,
                "the chat template renders the prompt (with the generation prompt) differently \
                 from the start of the whole conversation, so the reply cannot be cut from it",
            ));
        };
        out.push(nonempty(line, field, rest.to_string())?);
    }
    Ok((prompt_text, out))
}

fn parse_prompt_completion(
    line: &Line,
    template: Option<&ChatTemplate>,
) -> Result<PromptCompletion> {
    if !line.has("prompt") && line.has("messages") {
        let messages = conversation(line, "messages", "")?;
        let last = messages.len() - 1;
        if messages[last].role != "assistant" {
            return Err(bad(
                line,
                &format!("messages[{last}].role"),
                format!(
                    "the last message must be the assistant's reply, found `{}`",
                    messages[last].role
                ),
            ));
        }
        if last == 0 {
            return Err(bad(
                line,
                "messages",
                "only an assistant message: no prompt before it",
            ));
        }
        let template = need_template(line, "messages", template)?;
        let (prompt, mut replies) = render_split(
            line,
            template,
            "messages",
            &messages[..last],
            &[("messages", &messages[last..])],
        )?;
        return Ok(PromptCompletion {
            prompt,
            completion: replies.remove(0),
        });
    }
    if !line.has("prompt") {
        return Err(bad(
            line,
            "prompt",
            "missing (expected `prompt` and `completion`, or `messages`)",
        ));
    }
    match text_or_messages(line, "prompt")? {
        Text::Plain(prompt) => Ok(PromptCompletion {
            prompt: nonempty(line, "prompt", prompt)?,
            completion: plain(
                line,
                "completion",
                "`prompt` is text, so `completion` must be",
            )?,
        }),
        Text::Chat(prompt) => {
            if prompt.is_empty() {
                return Err(bad(line, "prompt", "empty list of messages"));
            }
            let completion = reply(
                line,
                "completion",
                "`prompt` is a list of messages, so `completion` must be",
            )?;
            let template = need_template(line, "prompt", template)?;
            let (prompt, mut replies) = render_split(
                line,
                template,
                "prompt",
                &prompt,
                &[("completion", &completion)],
            )?;
            Ok(PromptCompletion {
                prompt,
                completion: replies.remove(0),
            })
        }
    }
}

fn margin(line: &Line) -> Result<Option<f64>> {
    match get(line, "margin") {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(bad(
            line,
            "margin",
            format!("expected a number, found {}", kind(other)),
        )),
    }
}

fn parse_pair(line: &Line, template: Option<&ChatTemplate>) -> Result<Pair> {
    let margin = margin(line)?;
    if line.has("prompt") {
        return match text_or_messages(line, "prompt")? {
            Text::Plain(prompt) => {
                let context = "`prompt` is text, so it must be too";
                Ok(Pair {
                    prompt: nonempty(line, "prompt", prompt)?,
                    chosen: plain(line, "chosen", context)?,
                    rejected: plain(line, "rejected", context)?,
                    margin,
                })
            }
            Text::Chat(prompt) => {
                if prompt.is_empty() {
                    return Err(bad(line, "prompt", "empty list of messages"));
                }
                let context = "`prompt` is a list of messages, so it must be too";
                let chosen = reply(line, "chosen", context)?;
                let rejected = reply(line, "rejected", context)?;
                let template = need_template(line, "prompt", template)?;
                let (prompt, replies) = render_split(
                    line,
                    template,
                    "prompt",
                    &prompt,
                    &[("chosen", &chosen), ("rejected", &rejected)],
                )?;
                let [chosen, rejected] = <[String; 2]>::try_from(replies).expect("two replies");
                Ok(Pair {
                    prompt,
                    chosen,
                    rejected,
                    margin,
                })
            }
        };
    }
    // Implicit prompt: `chosen` and `rejected` are whole conversations sharing their prompt.
    let context = "without `prompt`, `chosen` and `rejected` must be whole conversations";
    if get(line, "chosen").is_some_and(Value::is_string) {
        return Err(bad(
            line,
            "prompt",
            format!("missing ({context}, and `chosen` is a string)"),
        ));
    }
    let chosen = conversation(line, "chosen", context)?;
    let rejected = conversation(line, "rejected", context)?;
    let k = chosen
        .iter()
        .zip(&rejected)
        .take_while(|(c, r)| c == r)
        .count();
    if k == 0 {
        return Err(bad(
            line,
            "prompt",
            "missing, and `chosen` and `rejected` differ from their first message: no shared \
             prompt",
        ));
    }
    if k == chosen.len() || k == rejected.len() {
        let message = if chosen.len() == rejected.len() {
            "`chosen` and `rejected` are the same conversation"
        } else {
            "one of `chosen` and `rejected` is the start of the other: no reply to compare"
        };
        let field = if k == chosen.len() {
            "chosen"
        } else {
            "rejected"
        };
        return Err(bad(line, field, message));
    }
    check_reply_starts(line, "chosen", &chosen, k)?;
    check_reply_starts(line, "rejected", &rejected, k)?;
    let template = need_template(line, "chosen", template)?;
    let (prompt, replies) = render_split(
        line,
        template,
        "chosen",
        &chosen[..k],
        &[("chosen", &chosen[k..]), ("rejected", &rejected[k..])],
    )?;
    let [chosen, rejected] = <[String; 2]>::try_from(replies).expect("two replies");
    Ok(Pair {
        prompt,
        chosen,
        rejected,
        margin,
    })
}

fn parse_unpaired(line: &Line, template: Option<&ChatTemplate>) -> Result<Unpaired> {
    let label = match get(line, "label") {
        None => return Err(missing(line, "label")),
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(
                line,
                "label",
                format!("expected a boolean (true or false), found {}", kind(other)),
            ))
        }
    };
    let (prompt, completion) = match text_or_messages(line, "prompt")? {
        Text::Plain(prompt) => (
            nonempty(line, "prompt", prompt)?,
            plain(
                line,
                "completion",
                "`prompt` is text, so `completion` must be",
            )?,
        ),
        Text::Chat(prompt) => {
            if prompt.is_empty() {
                return Err(bad(line, "prompt", "empty list of messages"));
            }
            let completion = reply(
                line,
                "completion",
                "`prompt` is a list of messages, so `completion` must be",
            )?;
            let template = need_template(line, "prompt", template)?;
            let (prompt, mut replies) = render_split(
                line,
                template,
                "prompt",
                &prompt,
                &[("completion", &completion)],
            )?;
            (prompt, replies.remove(0))
        }
    };
    Ok(Unpaired {
        prompt,
        completion,
        label,
    })
}

fn parse_prompt(line: &Line, template: Option<&ChatTemplate>) -> Result<String> {
    let (field, messages) = if line.has("prompt") {
        match text_or_messages(line, "prompt")? {
            Text::Plain(prompt) => return nonempty(line, "prompt", prompt),
            Text::Chat(messages) => ("prompt", messages),
        }
    } else if line.has("messages") {
        let mut messages = conversation(line, "messages", "")?;
        if messages.last().is_some_and(|m| m.role == "assistant") {
            messages.pop();
        }
        ("messages", messages)
    } else {
        return Err(bad(
            line,
            "prompt",
            "missing (expected `prompt`, or `messages`)",
        ));
    };
    if messages.is_empty() {
        return Err(bad(line, field, "empty list of messages (no prompt)"));
    }
    let template = need_template(line, field, template)?;
    let text = render(line, field, template, &messages, true)?;
    nonempty(line, field, text)
}
