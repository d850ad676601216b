//! One error type for everything the model crate reads or computes.
//!
//! Every variant that comes from user input names the file (and line or field where there is one),
//! so a bad input is reported, never a panic.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LmError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not found ({what})")]
    Missing { path: PathBuf, what: String },
    #[error("{path}: field `{field}`: {message}")]
    BadField {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    BadShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}:{line}: field `{field}`: {message}")]
    BadLine {
        path: PathBuf,
        line: usize,
        field: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, LmError>;

impl LmError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LmError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn bad_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        LmError::BadFile {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn bad_field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        LmError::BadField {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Run a call into a dependency that panics on some malformed inputs instead of returning an
/// error (found by fuzzing: the parquet decoder, the tokenizers crate, minijinja, candle's GGUF
/// reader), turning such a panic into the message it carried, for an error that names the
/// user's file.
pub fn without_panics<T>(call: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "no message".into())
    })
}
