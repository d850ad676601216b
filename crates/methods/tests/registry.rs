//! The registry the command line is generated from: unique names, and `--print-config` output
//! that documents every key and parses back to the defaults.

use rlhf_methods::registry;

#[test]
fn names_are_unique_and_lookup_finds_each() {
    let names: Vec<&str> = registry().iter().map(|m| m.name()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "{names:?}");
    for n in &names {
        assert_eq!(rlhf_methods::method(n).unwrap().name(), *n);
    }
    assert!(rlhf_methods::method("no-such-method").is_none());
}

/// Every `key = value` line (set or `# key = (unset)`) and every `[table]` header is directly
/// preceded by a comment line.
fn undocumented_keys(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut missing = Vec::new();
    let mut table = String::new();
    for (i, line) in lines.iter().enumerate() {
        let is_header = line.starts_with('[');
        let is_key = !line.is_empty()
            && !is_header
            && (!line.starts_with('#') || line.ends_with("= (unset)"));
        if is_header {
            table = line.trim_matches(|c| c == '[' || c == ']').to_string();
        }
        if (is_key || is_header)
            && !(i > 0 && lines[i - 1].starts_with("# ") && !lines[i - 1].ends_with("= (unset)"))
        {
            missing.push(format!("{table}: {line}"));
        }
    }
    missing
}

#[test]
fn print_config_documents_every_key_and_parses_back() {
    let mut all_missing = Vec::new();
    for m in registry() {
        let text = m.print_config().unwrap();
        let missing = undocumented_keys(&text);
        if !missing.is_empty() {
            all_missing.push(format!("{}: {missing:?}", m.name()));
        }
        // The printed file is a valid configuration: resolving it gives the same TOML again.
        let dir = std::env::temp_dir().join(format!("rlhf-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", m.name()));
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            m.resolved_toml(Some(&path), &[]).unwrap(),
            m.resolved_toml(None, &[]).unwrap(),
            "{}",
            m.name()
        );
        // And an override lands where the printed key says.
        let with_seed = m.resolved_toml(Some(&path), &["seed=7".into()]).unwrap();
        assert!(with_seed.contains("seed = 7"), "{}: {with_seed}", m.name());
    }
    assert!(
        all_missing.is_empty(),
        "undocumented keys:\n{}",
        all_missing.join("\n")
    );
}

#[test]
fn undocumented_keys_are_found() {
    let text = "# doc\na = 1\nb = 2\n\n[t]\n# doc\nc = 3\n# d = (unset)\n";
    assert_eq!(
        undocumented_keys(text),
        vec![": b = 2", "t: [t]", "t: # d = (unset)"]
    );
}
