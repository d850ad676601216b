//! Helpers shared by the command-line tests: the binary, a scratch directory, a run of a training
//! command (optionally killed after a step, or resumed), and a metrics reader without the
//! wall-clock columns. Each test file uses a subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `rlhf` binary, progress bars off.
pub fn rlhf() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rlhf"));
    c.env("RLHF_NO_PROGRESS", "1");
    c
}

/// An empty directory of its own for one test (`<tmp>/rlhf-cli-<tag>-<pid>`).
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rlhf-cli-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `rlhf <args> --config <root>/run.toml [--set ...]`, killed after optimiser step `kill_at`
/// (`RLHF_TEST_KILL_AT_STEP`) or continuing with `--resume`: (success, stderr).
pub fn train(
    root: &Path,
    args: &[&str],
    sets: &[String],
    kill_at: Option<u64>,
    resume: bool,
) -> (bool, String) {
    let mut c = rlhf();
    c.args(args).arg("--config").arg(root.join("run.toml"));
    for s in sets {
        c.arg("--set").arg(s);
    }
    if let Some(k) = kill_at {
        c.env("RLHF_TEST_KILL_AT_STEP", k.to_string());
    }
    if resume {
        c.arg("--resume");
    }
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// The rows of a `metrics.jsonl` without the columns that measure time (`wall_time`,
/// `tokens_per_s`, `time/*`), so that two runs can be compared exactly.
pub fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| k != "wall_time" && k != "tokens_per_s" && !k.starts_with("time/"));
            v
        })
        .collect()
}

/// The testbed's tiny model for `task`, freshly initialised from `seed`, saved at `<root>/init`.
pub fn tiny_model(root: &Path, task: &dyn rlhf_data::testbed::Task, seed: u64) -> PathBuf {
    let dir = root.join("init");
    rlhf_rl::policy::fresh_tiny(
        rlhf_data::testbed::tokenizer_for(task),
        seed,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .save(&dir)
    .unwrap();
    dir
}

/// The first `n` demonstrations of `task` as `prompt`/`completion` JSONL at `path`, each
/// completion after `separator`.
pub fn demonstrations_file(
    path: &Path,
    task: &dyn rlhf_data::testbed::Task,
    n: usize,
    separator: &str,
) {
    let lines: Vec<String> = task.demonstrations()[..n]
        .iter()
        .map(|(p, r)| {
            serde_json::json!({"prompt": p, "completion": format!("{separator}{r}")}).to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// `rlhf --threads 1 <method> --config <toml> --set output_dir=<out> [--set ...] [--resume]`,
/// with `env` set for that process: (success, stderr).
pub fn run_method(
    method: &str,
    toml: &Path,
    out: &Path,
    sets: &[String],
    resume: bool,
    env: &[(&str, &str)],
) -> (bool, String) {
    let mut c = rlhf();
    c.args(["--threads", "1", method, "--config"])
        .arg(toml)
        .arg("--set")
        .arg(format!("output_dir={}", out.display()));
    for s in sets {
        c.arg("--set").arg(s);
    }
    if resume {
        c.arg("--resume");
    }
    c.envs(env.iter().copied());
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// A small SFT run on the sentiment task (`n` demonstrations, the tiny model at `<root>/init`,
/// batch 4, a checkpoint every step): its config file.
pub fn small_sft(root: &Path, n: usize) -> PathBuf {
    let task = rlhf_data::testbed::task_by_name("sentiment", 0).unwrap();
    demonstrations_file(&root.join("sft.jsonl"), task.as_ref(), n, " ");
    let init = tiny_model(root, task.as_ref(), 3);
    let toml = root.join("sft.toml");
    std::fs::write(
        &toml,
        format!(
            "model = {init:?}\ntrain_file = {:?}\nepochs = 1\nbatch_size = 4\nmax_len = 48\nsave_every = 1\nlog_every = 1\nseed = 5\n[optim]\nlr = 1e-3\n",
            root.join("sft.jsonl")
        ),
    )
    .unwrap();
    toml
}

/// `rlhf testbed --task dialogue --out <dir>`: the game's logs, held-out logs, tokenizer and an
/// `init/` tiny model with its chat template.
pub fn dialogue_testbed(dir: &Path) {
    let o = rlhf()
        .args(["testbed", "--task", "dialogue", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `n` preference pairs of `task` as `prompt`/`chosen`/`rejected` JSONL at `path`: each
/// demonstration preferred to the next one's completion.
pub fn pairs_file(path: &Path, task: &dyn rlhf_data::testbed::Task, n: usize) {
    let d = task.demonstrations();
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({"prompt": d[i].0, "chosen": format!(" {}", d[i].1),
                               "rejected": format!(" {}", d[i + 1].1)})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

/// `2n` unpaired examples of `task` (KTO) as `prompt`/`completion`/`label` JSONL at `path`: each
/// demonstration desirable, the next one's completion undesirable.
pub fn unpaired_file(path: &Path, task: &dyn rlhf_data::testbed::Task, n: usize) {
    let d = task.demonstrations();
    let lines: Vec<String> = (0..n)
        .flat_map(|i| {
            [
                serde_json::json!({"prompt": d[i].0, "completion": format!(" {}", d[i].1), "label": true}),
                serde_json::json!({"prompt": d[i].0, "completion": format!(" {}", d[i + 1].1), "label": false}),
            ]
        })
        .map(|v| v.to_string())
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}
