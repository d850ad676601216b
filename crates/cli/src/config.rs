//! Run configuration: the method's typed defaults, overlaid by a TOML file (`--config`), overlaid
//! by `--set key=value` overrides (dotted keys reach nested tables, e.g. `--set optim.lr=1e-4`).
//! Unknown keys are errors that name the key, so a typo never silently does nothing.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use toml::{Table, Value};

pub fn resolve<T: Serialize + DeserializeOwned + Default>(
    file: Option<&Path>,
    sets: &[String],
) -> Result<T> {
    let mut table: Table = Table::try_from(T::default()).context("default configuration")?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let user: Table =
            toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?;
        merge(&mut table, user);
        let config: T = Value::Table(table.clone())
            .try_into()
            .with_context(|| format!("{}: invalid configuration", path.display()))?;
        table = Table::try_from(config)?;
    }
    for set in sets {
        let Some((key, raw)) = set.split_once('=') else {
            bail!("--set {set}: expected key=value");
        };
        let value = parse_value(raw);
        set_dotted(&mut table, key.trim(), value).with_context(|| format!("--set {set}"))?;
    }
    Value::Table(table)
        .try_into()
        .context("invalid configuration (from --set)")
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

fn set_dotted(table: &mut Table, key: &str, value: Value) -> Result<()> {
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
            _ => bail!("`{head}` is not a table"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        lr: f64,
        steps: u64,
    }
    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Outer {
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
}
