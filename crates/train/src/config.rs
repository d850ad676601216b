//! Run configuration: a method's typed defaults, overlaid by a TOML file (`--config`), overlaid by
//! `--set key=value` overrides (dotted keys reach nested tables, e.g. `--set optim.lr=1e-4`).
//! Unknown keys are errors that name the key, so a typo never silently does nothing.
//!
//! [`documented_toml`] prints the fully defaulted configuration as TOML with each key's doc comment
//! above it (from the config type's JSON schema), so keys can be discovered without the source.

use std::path::Path;

use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value as Json;
use toml::{Table, Value};

use crate::error::{Result, TrainError};

/// The configuration `T`: defaults, then `file`, then each `--set key=value` in order.
pub fn resolve<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    sets: &[String],
) -> Result<T> {
    let mut table: Table = Table::try_from(T::default())
        .map_err(|e| TrainError::invalid(format!("default configuration: {e}")))?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        let user: Table = toml::from_str(&text)
            .map_err(|e| TrainError::bad_file(path, format!("invalid TOML: {e}")))?;
        merge(&mut table, user);
        let config: T = Value::Table(table.clone())
            .try_into()
            .map_err(|e| TrainError::bad_file(path, format!("invalid configuration: {e}")))?;
        table = Table::try_from(config)
            .map_err(|e| TrainError::bad_file(path, format!("invalid configuration: {e}")))?;
    }
    for set in sets {
        let Some((key, raw)) = set.split_once('=') else {
            return Err(TrainError::invalid(format!(
                "--set {set}: expected key=value"
            )));
        };
        let value = parse_value(raw);
        set_dotted(&mut table, key.trim(), value)
            .map_err(|e| TrainError::invalid(format!("--set {set}: {e}")))?;
    }
    Value::Table(table)
        .try_into()
        .map_err(|e| TrainError::invalid(format!("invalid configuration (from --set): {e}")))
}

/// A TOML literal when it parses as one (numbers, booleans, arrays), else a plain string.
fn parse_value(raw: &str) -> Value {
    let raw = raw.trim();
    toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_string()))
}

fn merge(base: &mut Table, over: Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_dotted(table: &mut Table, key: &str, value: Value) -> std::result::Result<(), String> {
    match key.split_once('.') {
        None => {
            table.insert(key.to_string(), value);
            Ok(())
        }
        Some((head, rest)) => match table
            .entry(head.to_string())
            .or_insert_with(|| Value::Table(Table::new()))
        {
            Value::Table(inner) => set_dotted(inner, rest, value),
            _ => Err(format!("`{head}` is not a table")),
        },
    }
}

/// The default configuration of `T` as TOML, every key preceded by its doc comment; keys without a
/// default value (optional paths and numbers) are printed commented out as `# key = (unset)`.
pub fn documented_toml<T: Serialize + Default + JsonSchema>() -> Result<String> {
    let schema = serde_json::to_value(schemars::schema_for!(T))
        .map_err(|e| TrainError::invalid(format!("schema: {e}")))?;
    let defs = schema.get("$defs").cloned().unwrap_or(Json::Null);
    let table = Table::try_from(T::default())
        .map_err(|e| TrainError::invalid(format!("default configuration: {e}")))?;
    let mut out = String::new();
    if let Some(d) = description(&schema) {
        comment(&mut out, &d);
        out.push('\n');
    }
    write_table(&mut out, "", &table, &schema, &defs);
    Ok(out)
}

/// The schema a `$ref` (or `allOf: [$ref]`, or `anyOf` with null for options) points at.
fn resolve_ref<'a>(schema: &'a Json, defs: &'a Json) -> &'a Json {
    let mut s = schema;
    for _ in 0..4 {
        if let Some(r) = s.get("$ref").and_then(Json::as_str) {
            let name = r.rsplit('/').next().unwrap_or("");
            match defs.get(name) {
                Some(d) => s = d,
                None => break,
            }
        } else if let Some(Json::Array(parts)) = s.get("allOf").or_else(|| s.get("anyOf")) {
            match parts
                .iter()
                .find(|p| p.get("type") != Some(&Json::String("null".into())))
            {
                Some(p) => s = p,
                None => break,
            }
        } else {
            break;
        }
    }
    s
}

fn description(schema: &Json) -> Option<String> {
    schema
        .get("description")
        .and_then(Json::as_str)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn comment(out: &mut String, text: &str) {
    for line in text.lines() {
        out.push_str("# ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// The keys' order: as declared in the schema, then any others.
fn ordered_keys(table: &Table, props: Option<&serde_json::Map<String, Json>>) -> Vec<String> {
    let mut keys: Vec<String> = props
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for k in table.keys() {
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    }
    keys
}

fn write_table(out: &mut String, prefix: &str, table: &Table, schema: &Json, defs: &Json) {
    let schema = resolve_ref(schema, defs);
    let props = schema.get("properties").and_then(Json::as_object);
    let keys = ordered_keys(table, props);
    let mut nested = Vec::new();
    for key in &keys {
        let field = props.and_then(|p| p.get(key)).unwrap_or(&Json::Null);
        let doc = description(field).or_else(|| description(resolve_ref(field, defs)));
        match table.get(key) {
            Some(Value::Table(t)) => nested.push((key.clone(), t, field, doc)),
            Some(v) => {
                if let Some(d) = &doc {
                    comment(out, d);
                }
                out.push_str(&format!("{key} = {v}\n"));
            }
            None => {
                if let Some(d) = &doc {
                    comment(out, d);
                }
                out.push_str(&format!("# {key} = (unset)\n"));
            }
        }
    }
    for (key, t, field, doc) in nested {
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        out.push('\n');
        if let Some(d) = &doc {
            comment(out, d);
        }
        out.push_str(&format!("[{name}]\n"));
        write_table(out, &name, t, field, defs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        /// Learning rate.
        lr: f64,
        steps: u64,
    }
    /// A test configuration.
    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize, schemars::JsonSchema)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
        /// Who it is.
        name: String,
        flag: bool,
        inner: Inner,
    }

    #[test]
    fn file_then_overrides() {
        let dir = std::env::temp_dir().join(format!("rlhf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("run.toml");
        std::fs::write(&p, "name = \"a\"\n[inner]\nlr = 0.5\n").unwrap();
        let c: Outer = resolve(
            Some(&p),
            &[
                "inner.steps=7".into(),
                "flag=true".into(),
                "name=b c".into(),
            ],
        )
        .unwrap();
        assert_eq!(
            c,
            Outer {
                name: "b c".into(),
                flag: true,
                inner: Inner { lr: 0.5, steps: 7 }
            }
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = resolve::<Outer>(None, &["inner.lrr=1".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("lrr"), "{err:#}");
        let dir = std::env::temp_dir().join(format!("rlhf-config2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.toml");
        std::fs::write(&p, "nme = \"a\"\n").unwrap();
        let err = resolve::<Outer>(Some(&p), &[]).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("bad.toml") && msg.contains("nme"), "{msg}");
    }

    #[test]
    fn documented_defaults_round_trip() {
        let text = documented_toml::<Outer>().unwrap();
        assert_eq!(
            text,
            "# A test configuration.\n\nflag = false\n# Who it is.\nname = \"\"\n\n[inner]\n# Learning rate.\nlr = 0.0\nsteps = 0\n"
        );
        let back: Outer = toml::from_str(&text).unwrap();
        assert_eq!(back, Outer::default());
    }
}
