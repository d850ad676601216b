//! Every committed configuration file names its command on its first line
//! (`# rlhf [--threads N] <command> --config <file>`) and resolves as that command's configuration.

use std::path::{Path, PathBuf};

fn config_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut out = Vec::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "toml") {
                out.push(f);
            }
        }
    }
    out.sort();
    out
}

/// The command a config file's first line runs it with.
fn command_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let first = text.lines().next().unwrap_or("");
    let words: Vec<&str> = first.trim_start_matches('#').split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "--config")
        .unwrap_or_else(|| panic!("{}: first line names no command", path.display()));
    words[at - 1].to_string()
}

#[test]
fn committed_configs_resolve_for_their_commands() {
    let files = config_files();
    assert!(files.len() >= 7, "{files:?}");
    for f in files {
        let cmd = command_of(&f);
        match rlhf_methods::method(&cmd) {
            Some(m) => {
                m.resolved_toml(Some(&f), &[])
                    .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            }
            None if cmd == "compare-online" => {
                let c = rlhf_train::config::resolve::<rlhf_recipes::compare::CompareConfig>(
                    Some(&f),
                    &[],
                )
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                // Every row (variants included) resolves as its method's configuration.
                for m in &c.methods {
                    rlhf_recipes::compare::run_settings(&c, m, 0, Path::new("out"))
                        .unwrap_or_else(|e| panic!("{}: {m}: {e}", f.display()));
                }
            }
            None if cmd == "compare-rest" => {
                rlhf_train::config::resolve::<rlhf_recipes::rest_table::RestTableConfig>(
                    Some(&f),
                    &[],
                )
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            }
            None if cmd == "compare-dialogue" => {
                rlhf_train::config::resolve::<rlhf_recipes::dialogue::CompareDialogueConfig>(
                    Some(&f),
                    &[],
                )
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            }
            None => panic!("{}: unknown command `{cmd}`", f.display()),
        }
    }
}

#[test]
fn a_misspelt_key_in_a_config_file_is_named() {
    let dir = std::env::temp_dir().join(format!("rlhf-configs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("dpo.toml");
    std::fs::write(&f, "# rlhf dpo --config dpo.toml\nepochz = 2\n").unwrap();
    let err = rlhf_methods::method("dpo")
        .unwrap()
        .resolved_toml(Some(&f), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("dpo.toml") && err.contains("epochz"), "{err}");
}
