//! The kill drill: SFT, RM, DPO, KTO, online DPO, RLOO, PPO and ReST runs are killed with SIGKILL
//! at random instants (checkpoint writes included: every run checkpoints at every step), resumed
//! with `--resume`, killed again, and so on; the run that finally completes must end with the weights
//! and the metrics of an uninterrupted run, bit for bit. After every kill each checkpoint on disk
//! must be complete and readable, and `metrics.jsonl` must never repeat or skip a step.
//!
//! Sizes: `RLHF_DRILL_KILLS` kills per method (default 5, what CI runs; `scripts/drill-kill.sh`
//! runs 20), kill instants drawn from `RLHF_DRILL_SEED` (default: the process id; printed, so a
//! failing drill can be replayed), `RLHF_DRILL_METHODS` (comma-separated) to run a subset.

mod common;
use common::{demonstrations_file, metrics, pairs_file, rlhf, scratch, tiny_model, unpaired_file};

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rlhf_data::testbed::task_by_name;

/// One method's drill: the command, its configuration, and what must come out identical.
struct Drill {
    name: &'static str,
    args: Vec<&'static str>,
    toml: String,
    /// Files (relative to the run directory) that must be byte-identical to the clean run's.
    same_bytes: Vec<&'static str>,
    /// `metrics.jsonl` files (relative) that must hold the clean run's rows (time columns aside).
    same_metrics: Vec<&'static str>,
}

/// A small deterministic generator for the kill instants (splitmix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `rlhf <args> --config <root>/<name>.toml --set output_dir=<out> [--resume]`, not waited for.
fn spawn(root: &Path, d: &Drill, out: &Path, resume: bool) -> std::process::Child {
    let mut c = rlhf();
    c.args(&d.args)
        .arg("--config")
        .arg(root.join(format!("{}.toml", d.name)))
        .arg("--set")
        .arg(format!("output_dir={}", out.display()));
    if resume {
        c.arg("--resume");
    }
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c.spawn().unwrap()
}

fn finish(child: std::process::Child, what: &str) {
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Every directory named `checkpoints` under `dir`.
fn checkpoint_dirs(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "checkpoints") {
                found.push(p.clone());
            }
            checkpoint_dirs(&p, found);
        }
    }
}

fn readable_safetensors(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// What a kill may leave: temporaries (`.tmp-*`), which loading ignores, and complete
/// checkpoints. Returns how many complete checkpoints were checked, and whether a temporary was
/// found (the kill landed in the middle of a checkpoint write).
fn assert_checkpoints_sound(out: &Path) -> (usize, bool) {
    let mut dirs = Vec::new();
    checkpoint_dirs(out, &mut dirs);
    let (mut checked, mut mid_write) = (0, false);
    for ck in dirs {
        for e in std::fs::read_dir(&ck).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            mid_write |= name.starts_with(".tmp-");
            if !name.starts_with("step-") {
                continue;
            }
            let d = e.path();
            for f in ["model.safetensors", "optimizer.safetensors"] {
                readable_safetensors(&d.join(f))
                    .unwrap_or_else(|e| panic!("a visible checkpoint is unreadable: {e}"));
            }
            let state = std::fs::read_to_string(d.join("state.json"))
                .unwrap_or_else(|e| panic!("{}: state.json: {e}", d.display()));
            serde_json::from_str::<serde_json::Value>(&state)
                .unwrap_or_else(|e| panic!("{}: state.json: {e}", d.display()));
            checked += 1;
        }
        let latest = ck.join("latest");
        if latest.exists() {
            // Replaced through a rename: never torn. (It may name a step being swapped for a
            // re-save of the same step for an instant; loading then takes the newest complete one.)
            let name = std::fs::read_to_string(&latest).unwrap();
            assert!(
                name.ends_with('\n')
                    && name
                        .trim()
                        .strip_prefix("step-")
                        .is_some_and(|n| n.parse::<u64>().is_ok()),
                "{}: torn `latest`: {name:?}",
                latest.display()
            );
        }
    }
    (checked, mid_write)
}

/// The steps of a `metrics.jsonl`: strictly increasing within each kind of row (rows logged at
/// the same step by different parts of a method, e.g. an evaluation, share a step).
fn assert_no_repeated_rows(path: &Path) {
    let rows = metrics(path);
    for (i, a) in rows.iter().enumerate() {
        for b in &rows[i + 1..] {
            assert!(a != b, "{}: a row appears twice: {a}", path.display());
        }
    }
}

fn run_drill(root: &Path, d: &Drill, kills: usize, rng: &mut Rng) -> DrillCount {
    let clean = root.join(format!("{}-clean", d.name));
    let started = Instant::now();
    finish(spawn(root, d, &clean, false), "the uninterrupted run");
    let clean_secs = started.elapsed().as_secs_f64();

    let drilled = root.join(format!("{}-drilled", d.name));
    let (mut killed, mut completed, mut checkpoints_checked, mut mid_write) = (0, 0, 0, 0);
    let compare = |out: &Path| {
        for f in &d.same_bytes {
            let a = std::fs::read(clean.join(f)).unwrap();
            let b = std::fs::read(out.join(f))
                .unwrap_or_else(|e| panic!("{}: {}: {e}", d.name, out.join(f).display()));
            assert!(
                a == b,
                "{}: {f} differs from the uninterrupted run's",
                d.name
            );
            if f.ends_with("checkpoints/latest") {
                // ... and the checkpoint it names (a model whose run writes no final copy).
                let named = Path::new(f)
                    .with_file_name(String::from_utf8_lossy(&a).trim())
                    .join("model.safetensors");
                let a = std::fs::read(clean.join(&named)).unwrap();
                let b = std::fs::read(out.join(&named)).unwrap();
                assert!(a == b, "{}: {} differs", d.name, named.display());
            }
        }
        for f in &d.same_metrics {
            assert_no_repeated_rows(&out.join(f));
            assert_eq!(
                metrics(&clean.join(f)),
                metrics(&out.join(f)),
                "{}: {f} differs from the uninterrupted run's",
                d.name
            );
        }
    };
    let mut fresh = true;
    while killed < kills {
        if fresh {
            std::fs::remove_dir_all(&drilled).ok();
        }
        // Always `--resume`: on a directory with nothing to resume it starts the run.
        let mut child = spawn(root, d, &drilled, true);
        fresh = false;
        let at = Duration::from_secs_f64(rng.uniform() * 0.7 * clean_secs);
        let t0 = Instant::now();
        let exited = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if t0.elapsed() >= at {
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        match exited {
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                killed += 1;
                let (checked, torn) = assert_checkpoints_sound(&drilled);
                checkpoints_checked += checked;
                mid_write += usize::from(torn);
            }
            Some(status) => {
                let mut err = String::new();
                use std::io::Read;
                child.stderr.take().unwrap().read_to_string(&mut err).ok();
                assert!(status.success(), "{}: a resumed run failed: {err}", d.name);
                compare(&drilled);
                completed += 1;
                fresh = true;
            }
        }
    }
    finish(spawn(root, d, &drilled, true), "the last resume");
    compare(&drilled);
    completed += 1;
    DrillCount {
        killed,
        mid_write,
        completed,
        checkpoints_checked,
        clean_secs,
    }
}

struct DrillCount {
    killed: usize,
    /// Kills that left a checkpoint's temporary behind (they landed mid-write).
    mid_write: usize,
    /// Runs that reached their end, each checked against the uninterrupted run.
    completed: usize,
    checkpoints_checked: usize,
    clean_secs: f64,
}

fn drills(root: &Path) -> Vec<Drill> {
    let senti = task_by_name("sentiment", 0).unwrap();
    demonstrations_file(&root.join("sft.jsonl"), senti.as_ref(), 48, " ");
    let init = tiny_model(root, senti.as_ref(), 3);
    pairs_file(&root.join("pairs.jsonl"), senti.as_ref(), 32);
    unpaired_file(&root.join("unpaired.jsonl"), senti.as_ref(), 32);
    let arith = task_by_name("arithmetic", 0).unwrap();
    let arith_root = root.join("arith");
    std::fs::create_dir_all(&arith_root).unwrap();
    demonstrations_file(&arith_root.join("d.jsonl"), arith.as_ref(), 24, "");
    let arith_init = tiny_model(&arith_root, arith.as_ref(), 3);

    let offline = |file: &str| {
        format!(
            "model = {init:?}\ntrain_file = {:?}\nepochs = 4\nbatch_size = 4\nmax_len = 48\nsave_every = 1\nlog_every = 1\nseed = 5\n[optim]\nlr = 1e-3\n",
            root.join(file)
        )
    };
    let online = format!(
        "model = {init:?}\ntask = \"sentiment\"\nsteps = 16\nprompts_per_step = 4\nsave_every = 1\nseed = 5\n\
         [rollout]\nk = 2\nmax_new_tokens = 6\n[reward]\nsource = \"gold\"\nnormalize_samples = 8\n\
         [optim]\nlr = 1e-3\nwarmup_ratio = 0.0\n[eval]\nprompts = 8\n"
    );
    let model = "model/model.safetensors";
    vec![
        Drill {
            name: "sft",
            args: vec!["--threads", "1", "sft"],
            toml: offline("sft.jsonl"),
            same_bytes: vec![model],
            same_metrics: vec!["metrics.jsonl"],
        },
        Drill {
            name: "rm",
            args: vec!["--threads", "1", "rm"],
            toml: offline("pairs.jsonl").replace("[optim]", "normalize_samples = 0\n[optim]"),
            same_bytes: vec![model],
            same_metrics: vec!["metrics.jsonl"],
        },
        Drill {
            name: "dpo",
            args: vec!["--threads", "1", "dpo"],
            toml: offline("pairs.jsonl"),
            same_bytes: vec![model],
            same_metrics: vec!["metrics.jsonl"],
        },
        Drill {
            name: "kto",
            args: vec!["--threads", "1", "kto"],
            toml: offline("unpaired.jsonl"),
            same_bytes: vec![model],
            same_metrics: vec!["metrics.jsonl"],
        },
        Drill {
            name: "online-dpo",
            args: vec!["--threads", "1", "online-dpo"],
            toml: format!(
                "model = {init:?}\ntask = \"sentiment\"\nrounds = 3\nprompts_per_round = 32\nmax_new_tokens = 6\nlabeler = \"annotators\"\nseed = 5\n\
                 [dpo]\nbatch_size = 4\nmax_len = 48\nsave_every = 1\nlog_every = 1\n[dpo.optim]\nlr = 1e-3\n"
            ),
            same_bytes: vec!["round-3/model/model.safetensors", "round-2/pairs.jsonl", "round-3/pairs.jsonl"],
            same_metrics: vec!["round-1/metrics.jsonl", "round-2/metrics.jsonl", "round-3/metrics.jsonl"],
        },
        Drill {
            name: "rloo",
            args: vec!["--threads", "1", "rloo"],
            toml: online.clone(),
            same_bytes: vec![model, "eval.json"],
            same_metrics: vec!["metrics.jsonl"],
        },
        Drill {
            name: "ppo",
            args: vec!["--threads", "1", "ppo"],
            toml: online.replace("[rollout]", "[method]\ncritic_pretrain_iterations = 2\n[rollout]"),
            same_bytes: vec![model, "value/checkpoints/latest", "eval.json"],
            same_metrics: vec!["metrics.jsonl"],
        },
        Drill {
            name: "rest",
            args: vec!["--threads", "1", "rest"],
            toml: format!(
                "model = {arith_init:?}\ntask = \"arithmetic\"\ntrain_file = {:?}\ngrow_steps = 2\nsamples_per_source = 2\ngrow_chunk = 8\nthresholds = [0.0, 0.5]\nepochs = 1\nbatch_size = 8\nmax_len = 32\nsave_every = 1\nlog_every = 1\nseed = 11\n[reward]\nsource = \"gold\"\n[validation]\nprompts = 8\n[optim]\nlr = 1e-3\n",
                arith_root.join("d.jsonl")
            ),
            same_bytes: vec![
                "grow-1/dataset.jsonl",
                "grow-2/dataset.jsonl",
                "grow-2/improve-1/model/model.safetensors",
            ],
            same_metrics: vec![
                "grow-1/improve-0/metrics.jsonl",
                "grow-1/improve-1/metrics.jsonl",
                "grow-2/improve-0/metrics.jsonl",
                "grow-2/improve-1/metrics.jsonl",
            ],
        },
    ]
}

#[test]
fn killed_at_random_instants_runs_resume_to_the_uninterrupted_result() {
    let root = scratch("drill-kill");
    let kills = env_usize("RLHF_DRILL_KILLS", 5);
    let seed = std::env::var("RLHF_DRILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(std::process::id() as u64);
    let only: Option<Vec<String>> = std::env::var("RLHF_DRILL_METHODS")
        .ok()
        .map(|s| s.split(',').map(|m| m.trim().to_string()).collect());
    eprintln!("kill drill: {kills} kills per method, RLHF_DRILL_SEED={seed}");
    let mut rng = Rng(seed);
    let mut report = Vec::new();
    for d in drills(&root) {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|m| m == d.name))
        {
            continue;
        }
        std::fs::write(root.join(format!("{}.toml", d.name)), &d.toml).unwrap();
        let t = Instant::now();
        let c = run_drill(&root, &d, kills, &mut rng);
        let line = format!(
            "{:<5} killed {:>3} (mid-checkpoint-write {:>2})  completed and identical {:>2}  checkpoints read after kills {:>4}  (clean run {:.1} s, drill {:.0} s)",
            d.name,
            c.killed,
            c.mid_write,
            c.completed,
            c.checkpoints_checked,
            c.clean_secs,
            t.elapsed().as_secs_f64()
        );
        eprintln!("{line}");
        report.push(line);
    }
    eprintln!("kill drill summary (seed {seed}):\n{}", report.join("\n"));
    std::fs::remove_dir_all(root).ok();
}
