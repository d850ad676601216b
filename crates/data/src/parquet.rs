//! Parquet input, read row by row into the same JSON shape as a JSON Lines record, so that one code
//! path ([`crate::loaders`]) checks the fields of both.
//!
//! Uses the `parquet` crate's record API (no Arrow). A string column becomes a JSON string, a
//! `list<struct<role, content>>` column a JSON list of objects, a bool column a JSON boolean, and
//! an integer or floating-point column a JSON number; a null is JSON `null`. Rows are numbered from
//! 1 (row index + 1) and reported as the "line" of an error.
//!
//! Compression: uncompressed and Snappy (the default of pyarrow, pandas, `datasets` and Spark) are
//! read. Other codecs (zstd, gzip, lz4, brotli) are not compiled in, to keep the build small; such a
//! file is reported with the codec's name.
//!
//! Corrupt files: the `parquet` crate panics on some corrupt pages and footers (an index out of
//! range in its bit readers, found by fuzzing) instead of returning an error. Every call into its
//! decoder goes through [`decoder`], which turns such a panic into an error naming the file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::parquet::file::reader::{FileReader, SerializedFileReader};
use ::parquet::record::reader::RowIter;
use ::parquet::record::{Field, Row};
use ::parquet::schema::types::Type;
use rlhf_lm::{LmError, Result};
use serde_json::{Map, Number, Value};

use crate::jsonl::Line;

/// The rows of a Parquet file as [`Line`]s (`line` = row index + 1), reading only `columns`.
pub struct Rows {
    path: PathBuf,
    iter: RowIter<'static>,
    next_row: usize,
    failed: bool,
}

/// Open `path` and read the top-level columns named in `columns` (all columns when `None`). Columns
/// of that list that the file lacks are simply absent from each record (so a field check reports
/// them as missing); a file with none of them is an error that lists the columns it has.
pub fn rows(path: &Path, columns: Option<&[&str]>) -> Result<Rows> {
    let file = File::open(path).map_err(|e| LmError::io(path, e))?;
    let reader = decoder(path, || SerializedFileReader::new(file))?
        .map_err(|e| LmError::bad_file(path, format!("not a readable Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema();
    let projection = match columns {
        None => None,
        Some(wanted) => {
            let fields: Vec<Arc<Type>> = schema
                .get_fields()
                .iter()
                .filter(|f| wanted.contains(&f.name()))
                .cloned()
                .collect();
            if fields.is_empty() {
                let have: Vec<&str> = schema.get_fields().iter().map(|f| f.name()).collect();
                return Err(LmError::bad_file(
                    path,
                    format!(
                        "has none of the columns {} (its columns: {})",
                        quoted(wanted),
                        quoted(&have)
                    ),
                ));
            }
            let proj = Type::group_type_builder(schema.name())
                .with_fields(fields)
                .build()
                .map_err(|e| LmError::bad_file(path, format!("cannot select columns: {e}")))?;
            Some(proj)
        }
    };
    let iter = decoder(path, || {
        RowIter::from_file_into(Box::new(reader)).project(projection)
    })?
    .map_err(|e| LmError::bad_file(path, format!("cannot select columns: {e}")))?;
    Ok(Rows {
        path: path.to_path_buf(),
        iter,
        next_row: 1,
        failed: false,
    })
}

/// Run a call into the `parquet` crate's decoder, turning a panic of the decoder on corrupt data
/// into an error that names the file.
fn decoder<T>(path: &Path, call: impl FnOnce() -> T) -> Result<T> {
    rlhf_lm::error::without_panics(call).map_err(|why| {
        LmError::bad_file(
            path,
            format!("corrupt Parquet file: the decoder failed ({why})"),
        )
    })
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Iterator for Rows {
    type Item = Result<Line>;

    /// A row whose value cannot be represented (a non-UTF-8 binary, a date, ...) is a bad line
    /// (`BadLine`) and reading goes on; a row the decoder cannot read (corrupt data, a codec that
    /// is not compiled in) ends the iteration with a file error.
    fn next(&mut self) -> Option<Result<Line>> {
        if self.failed {
            return None;
        }
        let row = self.next_row;
        // After a decoder panic the iterator's state is unknown: it is never used again.
        let next = match decoder(&self.path, || self.iter.next()) {
            Ok(next) => next?,
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        };
        let item = match next {
            Ok(r) => {
                self.next_row += 1;
                row_to_line(&self.path, row, r)
            }
            Err(e) => {
                self.failed = true;
                let mut message = format!("row {row}: cannot decode: {e}");
                if e.to_string().contains("Disabled feature") {
                    message.push_str(
                        " (this build reads uncompressed and Snappy-compressed Parquet; rewrite \
                         the file with compression='snappy')",
                    );
                }
                Err(LmError::bad_file(&self.path, message))
            }
        };
        Some(item)
    }
}

fn row_to_line(path: &Path, line: usize, row: Row) -> Result<Line> {
    let mut obj = Map::new();
    for (name, field) in row.into_columns() {
        let value = to_json(&field).map_err(|message| LmError::BadLine {
            path: path.to_path_buf(),
            line,
            field: name.clone(),
            message,
        })?;
        obj.insert(name, value);
    }
    Ok(Line {
        path: path.to_path_buf(),
        line,
        value: Value::Object(obj),
    })
}

fn float(x: f64) -> std::result::Result<Value, String> {
    Number::from_f64(x)
        .map(Value::Number)
        .ok_or_else(|| format!("expected a finite number, found {x}"))
}

/// A Parquet value as JSON, or why it has no JSON form here.
fn to_json(field: &Field) -> std::result::Result<Value, String> {
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => Value::from(*n),
        Field::Short(n) => Value::from(*n),
        Field::Int(n) => Value::from(*n),
        Field::Long(n) => Value::from(*n),
        Field::UByte(n) => Value::from(*n),
        Field::UShort(n) => Value::from(*n),
        Field::UInt(n) => Value::from(*n),
        Field::ULong(n) => Value::from(*n),
        Field::Float16(x) => float(f64::from(*x))?,
        Field::Float(x) => float(f64::from(*x))?,
        Field::Double(x) => float(*x)?,
        Field::Str(s) => Value::String(s.clone()),
        // A binary column without the UTF-8 annotation: text if it is valid UTF-8.
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => return Err("expected text, found binary data that is not UTF-8".into()),
        },
        Field::Group(row) => {
            let mut obj = Map::new();
            for (name, f) in row.get_column_iter() {
                obj.insert(name.clone(), to_json(f)?);
            }
            Value::Object(obj)
        }
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(to_json)
                .collect::<std::result::Result<_, _>>()?,
        ),
        Field::MapInternal(map) => {
            let mut obj = Map::new();
            for (k, v) in map.entries() {
                let Field::Str(k) = k else {
                    return Err(format!("a map whose keys are not strings ({k})"));
                };
                obj.insert(k.clone(), to_json(v)?);
            }
            Value::Object(obj)
        }
        Field::Decimal(_)
        | Field::Date(_)
        | Field::TimeMillis(_)
        | Field::TimeMicros(_)
        | Field::TimestampMillis(_)
        | Field::TimestampMicros(_) => {
            return Err(format!(
                "unsupported Parquet value {field} (a decimal, date or time)"
            ))
        }
    })
}
