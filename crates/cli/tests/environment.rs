//! Faults of the machine around a run: the output directory full (a small tmpfs) or read-only,
//! a reward command that hangs or dies mid-run, model files truncated. Each must end in a clear
//! error (or, where the run can carry on, a warning), and nothing already written may be lost:
//! the last checkpoint stays readable and `--resume` ends where an uninterrupted run does.
//!
//! The tmpfs is mounted in a private mount namespace (`unshare -rm`, so no root is needed where
//! user namespaces are allowed); where they are not, a full disk is simulated with a file-size
//! limit (`ulimit -f`, SIGXFSZ ignored: writes fail with EFBIG instead of ENOSPC) and a
//! read-only directory with permissions (skipped as root, which permissions do not stop).

mod common;
use common::{metrics, rlhf, run_method, scratch, small_sft, tiny_model};

use std::path::{Path, PathBuf};
use std::process::Command;

use rlhf_data::testbed::task_by_name;

fn sft(toml: &Path, out: &Path, resume: bool) -> (bool, String) {
    run_method("sft", toml, out, &[], resume, &[])
}

fn online(toml: &Path, out: &Path, resume: bool) -> (bool, String) {
    run_method("rloo", toml, out, &[], resume, &[])
}

/// `run` ended where the uninterrupted `clean` run ended: the same final weights, byte for byte,
/// and the same metrics rows (wall-clock columns aside).
fn assert_same_end(clean: &Path, run: &Path, what: &str) {
    assert!(
        bytes(clean.join("model/model.safetensors")) == bytes(run.join("model/model.safetensors")),
        "{what}: the final weights differ"
    );
    assert_eq!(
        metrics(&clean.join("metrics.jsonl")),
        metrics(&run.join("metrics.jsonl")),
        "{what}"
    );
}

fn bytes(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn namespaces_work() -> bool {
    // RLHF_TEST_NO_NAMESPACES=1 takes the fallbacks where namespaces would work.
    if std::env::var_os("RLHF_TEST_NO_NAMESPACES").is_some() {
        return false;
    }
    Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run `script` (sh) with `$RLHF` set to the binary, in a private mount namespace when
/// `namespace`; (exit status success, stderr).
fn sh(script: &str, namespace: bool) -> (bool, String) {
    let mut c = if namespace {
        let mut c = Command::new("unshare");
        c.args(["-rm", "sh", "-c", script]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    };
    c.env("RLHF", env!("CARGO_BIN_EXE_rlhf"))
        .env("RLHF_NO_PROGRESS", "1");
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// Every checkpoint left in `run` reads back (weights and optimiser state), and no temporary is
/// left behind; returns the steps.
fn readable_checkpoints(run: &Path) -> Vec<u64> {
    let ck = run.join("checkpoints");
    let mut steps = Vec::new();
    for e in std::fs::read_dir(&ck).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with(".tmp-"), "a temporary was left: {name}");
        if let Some(n) = name.strip_prefix("step-") {
            for f in ["model.safetensors", "optimizer.safetensors"] {
                rlhf_train::load_safetensors(&e.path().join(f), &candle_core::Device::Cpu)
                    .unwrap_or_else(|err| panic!("{name}/{f}: {err}"));
            }
            steps.push(n.parse().unwrap());
        }
    }
    steps.sort_unstable();
    steps
}

#[test]
fn a_full_disk_stops_the_run_cleanly_and_resume_finishes_it() {
    let root = scratch("env-full");
    let toml = small_sft(&root, 32);
    let clean = root.join("clean");
    let (ok, err) = sft(&toml, &clean, false);
    assert!(ok, "{err}");

    let copy = root.join("full-copy");
    let mnt = root.join("mnt");
    let (written_to, (ok, err)) = if namespaces_work() {
        // 17 MiB: the configuration, the logs and two checkpoints of 6.7 MiB fit; writing a
        // third before the oldest is pruned does not.
        std::fs::create_dir_all(&mnt).unwrap();
        let run = mnt.join("run");
        (
            run.clone(),
            sh(
                &format!(
                    "mount -t tmpfs -o size=17m tmpfs {mnt:?} || exit 99
                     \"$RLHF\" --threads 1 sft --config {toml:?} --set output_dir={run:?}; rc=$?
                     cp -a {run:?} {copy:?}
                     exit $rc"
                ),
                true,
            ),
        )
    } else {
        eprintln!("no mount namespace here: a full disk is simulated with `ulimit -f`");
        (
            copy.clone(),
            sh(
                &format!(
                    "trap '' XFSZ; ulimit -f 8000
                     exec \"$RLHF\" --threads 1 sft --config {toml:?} --set output_dir={copy:?}"
                ),
                false,
            ),
        )
    };
    assert!(!ok, "the run should not fit: {err}");
    assert!(
        (err.contains("No space left on device") || err.contains("too large"))
            && err.contains(&*written_to.to_string_lossy()),
        "the error names the file it could not write: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // What was written before is intact: complete, readable checkpoints, no temporaries.
    let steps = readable_checkpoints(&copy);
    eprintln!("checkpoints left after the disk filled: {steps:?}");
    // Room again (here: the copy on the real disk): resume ends where the clean run ended.
    let (ok, err) = sft(&toml, &copy, true);
    assert!(ok, "{err}");
    assert_same_end(&clean, &copy, "copy");
    std::fs::remove_dir_all(root).ok();
}

#[test]
fn a_read_only_output_directory_is_a_clear_error() {
    let root = scratch("env-ro");
    let toml = small_sft(&root, 32);
    let ro = root.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let (ok, err) = if namespaces_work() {
        sh(
            &format!(
                "mount -t tmpfs -o ro,size=1m tmpfs {ro:?} || exit 99
                 exec \"$RLHF\" --threads 1 sft --config {toml:?} --set output_dir={ro:?}/run"
            ),
            true,
        )
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        if std::fs::write(ro.join("probe"), b"x").is_ok() {
            eprintln!("skipped: running as root without mount namespaces");
            return;
        }
        sft(&toml, &ro.join("run"), false)
    };
    assert!(!ok);
    assert!(
        err.contains(&*ro.join("run").to_string_lossy())
            && (err.contains("Read-only file system") || err.contains("Permission denied")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(root).ok();
}

fn online_toml(root: &Path, command: &str, timeout_s: f64) -> PathBuf {
    let task = task_by_name("sentiment", 0).unwrap();
    let init = tiny_model(root, task.as_ref(), 4);
    let toml = root.join(format!("online-{}.toml", command.len()));
    std::fs::write(
        &toml,
        format!(
            "model = {init:?}\ntask = \"sentiment\"\nsteps = 4\nprompts_per_step = 4\nsave_every = 1\nseed = 3\n\
             [rollout]\nk = 2\nmax_new_tokens = 6\n\
             [reward]\nsource = \"command\"\ncommand = [\"sh\", \"-c\", {command:?}]\nnormalize = false\ntimeout_s = {timeout_s}\nretries = 0\n\
             [optim]\nlr = 1e-3\nwarmup_ratio = 0.0\n[eval]\nprompts = 4\n"
        ),
    )
    .unwrap();
    toml
}

/// A reward command that hangs (or dies) at its third call stops the run with an error naming
/// it; the checkpoints before stay, and resuming with a working command ends where a run with
/// that command throughout ends.
#[test]
fn a_reward_command_that_hangs_or_dies_mid_run_loses_nothing() {
    let root = scratch("env-reward");
    // Eight completions per request (4 prompts x k = 2): a constant score for each.
    let answer = "cat >/dev/null; echo '[0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5]'";
    let good = online_toml(&root, answer, 5.0);
    let clean = root.join("clean");
    let (ok, err) = online(&good, &clean, false);
    assert!(ok, "{err}");
    for (fault, expect) in [("sleep 60", "timed out"), ("kill -9 $$", "signal")] {
        let counter = root.join(format!("calls-{}", fault.len()));
        let script = format!(
            "n=$(cat {counter:?} 2>/dev/null || echo 0); echo $((n + 1)) > {counter:?}; \
             if [ \"$n\" -ge 2 ]; then {fault}; fi; {answer}"
        );
        let flaky = online_toml(&root, &script, 1.0);
        let dir = root.join(format!("flaky-{}", fault.len()));
        let started = std::time::Instant::now();
        let (ok, err) = online(&flaky, &dir, false);
        assert!(!ok);
        assert!(
            started.elapsed().as_secs_f64() < 30.0,
            "a hanging command is cut off by its timeout"
        );
        assert!(
            err.contains("reward.command") || err.contains("command"),
            "{err}"
        );
        assert!(err.contains(expect), "{fault}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        // Two rollout batches were scored, and RLOO takes 2 steps per batch: step 4 is kept.
        assert_eq!(readable_checkpoints(&dir).last(), Some(&4), "{fault}");
        // Resumed with the working command: the clean run's end.
        std::fs::copy(&good, &flaky).unwrap();
        let (ok, err) = online(&flaky, &dir, true);
        assert!(ok, "{err}");
        assert_same_end(&clean, &dir, fault);
    }
    std::fs::remove_dir_all(root).ok();
}

fn truncate(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len / 2).unwrap();
}

#[test]
fn truncated_model_files_are_named_or_passed_over() {
    let root = scratch("env-truncated");
    let toml = small_sft(&root, 32);
    let clean = root.join("clean");
    let (ok, err) = sft(&toml, &clean, false);
    assert!(ok, "{err}");

    // 1. The newest checkpoint damaged after it was written: resume says so, falls back to the
    //    one before, and still ends where the clean run ended.
    let dir = root.join("damaged");
    let killed = run_method(
        "sft",
        &toml,
        &dir,
        &[],
        false,
        &[("RLHF_TEST_KILL_AT_STEP", "5")],
    );
    assert!(!killed.0);
    truncate(&dir.join("checkpoints/step-4/model.safetensors"));
    let (ok, err) = sft(&toml, &dir, true);
    assert!(ok, "{err}");
    assert!(
        err.contains("step-4 cannot be resumed from")
            && err.contains("model.safetensors")
            && err.contains("truncated")
            && err.contains("resuming from the older checkpoint")
            && err.contains("step-3"),
        "{err}"
    );
    assert_same_end(&clean, &dir, "dir");

    // 2. The base model truncated while a run uses it: the run holds its weights in memory and
    //    finishes as the clean run does; a new run from the damaged file names it.
    let base = root.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for e in std::fs::read_dir(root.join("init")).unwrap().flatten() {
        std::fs::copy(e.path(), base.join(e.file_name())).unwrap();
    }
    let toml2 = root.join("sft-base.toml");
    std::fs::write(
        &toml2,
        std::fs::read_to_string(&toml).unwrap().replace(
            &*root.join("init").to_string_lossy(),
            &base.to_string_lossy(),
        ),
    )
    .unwrap();
    let during = root.join("during");
    let child = rlhf()
        .args(["--threads", "1", "sft", "--config"])
        .arg(&toml2)
        .arg("--set")
        .arg(format!("output_dir={}", during.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let first = during.join("checkpoints/step-1");
    let t0 = std::time::Instant::now();
    while !first.exists() && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    truncate(&base.join("model.safetensors"));
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_same_end(&clean, &during, "base truncated mid-run");
    let (ok, err) = sft(&toml2, &root.join("after"), false);
    assert!(!ok);
    assert!(
        err.contains(&*base.join("model.safetensors").to_string_lossy())
            && err.contains("truncated"),
        "{err}"
    );
    std::fs::remove_dir_all(root).ok();
}
