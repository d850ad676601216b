//! JSON Lines input with errors that name the file, the line and the field.

use std::path::{Path, PathBuf};

use rlhf_lm::{LmError, Message, Result};
use serde_json::Value;

/// One parsed line, remembering where it came from so later errors can point at it.
#[derive(Debug, Clone)]
pub struct Line {
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    pub value: Value,
}

impl Line {
    fn error(&self, field: &str, message: impl Into<String>) -> LmError {
        LmError::BadLine {
            path: self.path.clone(),
            line: self.line,
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn has(&self, field: &str) -> bool {
        self.value.get(field).is_some_and(|v| !v.is_null())
    }

    /// A required string field.
    pub fn string(&self, field: &str) -> Result<String> {
        match self.value.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => {
                Err(self.error(field, format!("expected a string, found {}", kind(other))))
            }
            None => Err(self.error(field, "missing")),
        }
    }

    /// A required list of chat messages (`[{"role": ..., "content": ...}, ...]`).
    pub fn messages(&self, field: &str) -> Result<Vec<Message>> {
        let Some(v) = self.value.get(field) else {
            return Err(self.error(field, "missing"));
        };
        let Value::Array(items) = v else {
            return Err(self.error(
                field,
                format!("expected a list of messages, found {}", kind(v)),
            ));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let get = |k: &str| match m.get(k) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    _ => Err(self.error(&format!("{field}[{i}].{k}"), "missing or not a string")),
                };
                Ok(Message {
                    role: get("role")?,
                    content: get("content")?,
                })
            })
            .collect()
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

/// Read every non-blank line as a JSON object.
pub fn read(path: &Path) -> Result<Vec<Line>> {
    let text = std::fs::read_to_string(path).map_err(|e| LmError::io(path, e))?;
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(raw).map_err(|e| LmError::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            field: "(line)".into(),
            message: format!("not valid JSON: {e}"),
        })?;
        if !value.is_object() {
            return Err(LmError::BadLine {
                path: path.to_path_buf(),
                line: i + 1,
                field: "(line)".into(),
                message: format!("expected a JSON object, found {}", kind(&value)),
            });
        }
        out.push(Line {
            path: path.to_path_buf(),
            line: i + 1,
            value,
        });
    }
    Ok(out)
}
