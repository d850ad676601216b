//! Data parallelism from the outside: `mpirun -n 2 rlhf <method>` against one process with the
//! same global batch (SFT, DPO, RLOO), a rank killed mid-run and the run resumed at the same and
//! at another world size, and a build without MPI refusing to run as one of several ranks.
//!
//! The MPI tests need the `mpi` feature (`cargo test --release -p rlhf-cli --features mpi --test
//! dist`, which `scripts/test.sh` runs when an MPI library is installed) and Open MPI's `mpirun`.

#![allow(dead_code)] // without the `mpi` feature only the last test runs

mod common;
use std::path::{Path, PathBuf};

use common::{demonstrations_file, pairs_file, scratch, tiny_model, unpaired_file};
use rlhf_data::testbed::task_by_name;

/// A small run of every kind the issue names, on the sentiment task's tiny model: SFT on
/// demonstrations, DPO on pairs (each demonstration preferred to the next one's completion),
/// RLOO on the gold reward (explicitly asked for: the tests need no reward model), 2 generation
/// batches per rollout so that the 2 ranks each sample one. Returns (method, config file) pairs.
fn configs(root: &Path, demos: usize) -> Vec<(&'static str, PathBuf)> {
    let senti = task_by_name("sentiment", 0).unwrap();
    demonstrations_file(&root.join("sft.jsonl"), senti.as_ref(), demos, " ");
    let init = tiny_model(root, senti.as_ref(), 3);
    pairs_file(&root.join("pairs.jsonl"), senti.as_ref(), 48);
    let offline = |file: &str, extra: &str| offline_toml(root, &init, file, 1, extra);
    let online = online_toml(&init, 6, 16);
    let mut out = Vec::new();
    for (name, text) in [
        ("sft", offline("sft.jsonl", "")),
        (
            "dpo",
            offline(
                "pairs.jsonl",
                "[eval]\ntask = \"sentiment\"\nmax_prompts = 16\n",
            ),
        ),
        ("rloo", online),
    ] {
        let path = root.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        out.push((name, path));
    }
    out
}

/// An offline run's TOML: the tiny model at `init`, `file` under `root`, batches of 8, a
/// checkpoint every `save_every` steps, `extra` keys before `[optim]`.
fn offline_toml(root: &Path, init: &Path, file: &str, save_every: u64, extra: &str) -> String {
    format!(
        "model = {init:?}\ntrain_file = {:?}\nepochs = 1\nbatch_size = 8\nmax_len = 48\n\
         save_every = {save_every}\nlog_every = 1\nseed = 5\n{extra}[optim]\nlr = 1e-3\n",
        root.join(file)
    )
}

/// An online run's TOML on the sentiment task's gold reward: `steps` iterations of 4 prompts x 2
/// samples in 2 generation batches of 4 rows (one per rank), evaluated on `eval_prompts` prompts.
fn online_toml(init: &Path, steps: u64, eval_prompts: usize) -> String {
    format!(
        "model = {init:?}\ntask = \"sentiment\"\nsteps = {steps}\nprompts_per_step = 4\nsave_every = 2\nseed = 5\n\
         [rollout]\nk = 2\nmax_new_tokens = 6\nbatch_size = 4\n[reward]\nsource = \"gold\"\nnormalize_samples = 8\n\
         [optim]\nlr = 1e-3\nwarmup_ratio = 0.0\n[eval]\nprompts = {eval_prompts}\n"
    )
}

/// Numbers of two runs agree to float tolerance: |a - b| <= 1e-5 + 1e-4 |a| (measured: the
/// largest relative difference of a loss over these runs is a few 1e-6; sums are taken in another
/// order when a batch is split between ranks).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 + 1e-4 * a.abs()
}

/// Every numeric column of two metrics files (time columns left out) agrees row by row.
fn assert_metrics_close(a: &Path, b: &Path) {
    let (ra, rb) = (common::metrics(a), common::metrics(b));
    assert_eq!(ra.len(), rb.len(), "{} vs {}", a.display(), b.display());
    assert!(!ra.is_empty());
    for (x, y) in ra.iter().zip(&rb) {
        let (x, y) = (x.as_object().unwrap(), y.as_object().unwrap());
        assert_eq!(
            x.keys().collect::<Vec<_>>(),
            y.keys().collect::<Vec<_>>(),
            "{}",
            a.display()
        );
        for (k, v) in x {
            if let (Some(p), Some(q)) = (v.as_f64(), y[k].as_f64()) {
                assert!(
                    close(p, q),
                    "{} vs {}: {k} at step {}: {p} vs {q}",
                    a.display(),
                    b.display(),
                    x["step"]
                );
            }
        }
    }
}

/// The largest absolute difference between two saved models' tensors.
fn weights_diff(a: &Path, b: &Path) -> f32 {
    let dev = candle_core::Device::Cpu;
    let wa = candle_core::safetensors::load(a.join("model.safetensors"), &dev).unwrap();
    let wb = candle_core::safetensors::load(b.join("model.safetensors"), &dev).unwrap();
    assert_eq!(wa.len(), wb.len());
    wa.iter()
        .map(|(k, t)| {
            (t - &wb[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::*;
    use std::process::{Child, Command, Stdio};

    /// `mpirun -n <ranks> rlhf --threads 1 <method> --config <toml> --set output_dir=<out>`.
    fn mpirun(ranks: usize, method: &str, toml: &Path, out: &Path, resume: bool) -> Command {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-n"])
            .arg(ranks.to_string())
            .args(["-x", "RLHF_NO_PROGRESS=1", "-x"])
            // The ranks' scratch directories (see `Trainer::start`) go here, to be checked.
            .arg(format!("TMPDIR={}", tmp_of(out).display()))
            .arg(env!("CARGO_BIN_EXE_rlhf"))
            .args(["--threads", "1", method, "--config"])
            .arg(toml)
            .arg("--set")
            .arg(format!("output_dir={}", out.display()));
        if resume {
            c.arg("--resume");
        }
        c
    }

    /// The temporary directory of the ranks of the run at `out`.
    fn tmp_of(out: &Path) -> PathBuf {
        let d = out.with_extension("tmp");
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn run_ok(mut c: Command, what: &str) -> String {
        let o = c.output().expect("mpirun (Open MPI) on PATH");
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{what}: {err}");
        err
    }

    fn one_process(method: &str, toml: &Path, out: &Path) {
        let (ok, err) = common::run_method(method, toml, out, &[], false, &[]);
        assert!(ok, "{method}: {err}");
    }

    #[test]
    fn two_ranks_train_as_one_process_with_the_same_global_batch() {
        let root = scratch("dist-same");
        for (method, toml) in configs(&root, 96) {
            let (one, two) = (
                root.join(format!("{method}-1")),
                root.join(format!("{method}-2")),
            );
            one_process(method, &toml, &one);
            run_ok(mpirun(2, method, &toml, &two, false), method);
            assert_metrics_close(&one.join("metrics.jsonl"), &two.join("metrics.jsonl"));
            let diff = weights_diff(&one.join("model"), &two.join("model"));
            assert!(diff < 1e-4, "{method}: final weights differ by {diff}");
            // Bit for bit: one process whose batches are split in the ranks' two halves
            // (`optim.grad_accum = 2`) adds the same two gradients in the same order.
            let split = root.join(format!("{method}-ga2"));
            let split_toml = root.join(format!("{method}-ga2.toml"));
            let text = std::fs::read_to_string(&toml).unwrap();
            std::fs::write(
                &split_toml,
                text.replace("[optim]\n", "[optim]\ngrad_accum = 2\n"),
            )
            .unwrap();
            one_process(method, &split_toml, &split);
            assert_eq!(
                common::metrics(&split.join("metrics.jsonl")),
                common::metrics(&two.join("metrics.jsonl")),
                "{method}: 2 ranks vs one process with grad_accum = 2"
            );
            assert_eq!(
                std::fs::read(split.join("model/model.safetensors")).unwrap(),
                std::fs::read(two.join("model/model.safetensors")).unwrap(),
                "{method}: 2 ranks vs one process with grad_accum = 2"
            );
            if method != "sft" {
                // The final evaluation: samples of the same weights up to float tolerance.
                let read = |d: &Path| -> serde_json::Value {
                    serde_json::from_str(&std::fs::read_to_string(d.join("eval.json")).unwrap())
                        .unwrap()
                };
                let (a, b) = (read(&one), read(&two));
                assert_eq!(a["winrate"], b["winrate"], "{method}");
                assert_eq!(a["mean_len"], b["mean_len"], "{method}");
            }
            if method == "rloo" {
                // The two ranks sampled one generation batch each: the very same completions as
                // one process (same lengths, EOS, gold reward in every iteration).
                let (ra, rb) = (
                    common::metrics(&one.join("metrics.jsonl")),
                    common::metrics(&two.join("metrics.jsonl")),
                );
                for (x, y) in ra.iter().zip(&rb) {
                    for k in ["response_length", "eos_fraction", "gold"] {
                        assert_eq!(x.get(k), y.get(k), "rloo: {k}");
                    }
                }
            }
            // Rank 0 alone wrote the run directory; the other rank's scratch directory is gone.
            assert!(two.join("model/model.safetensors").is_file());
            let left: Vec<_> = std::fs::read_dir(tmp_of(&two))
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().starts_with("rlhf-rank"))
                .collect();
            assert!(
                left.is_empty(),
                "{method}: scratch directories left: {left:?}"
            );
        }
        std::fs::remove_dir_all(&root).ok();
    }

    /// Every other method on 2 ranks ends where one process ends: the same final weights (to
    /// float tolerance) from the same samples. Methods whose sampling is not sharded (online DPO's
    /// rounds, ReST's Grow steps, RLP's refresh, dialogue RL's conversations) sample the same on
    /// every rank, and still take their optimiser steps data-parallel.
    #[test]
    fn every_method_runs_on_two_ranks_as_on_one_process() {
        let root = scratch("dist-all");
        configs(&root, 16); // the tiny model at <root>/init, sft.jsonl, pairs.jsonl
        let init = root.join("init");
        let senti = task_by_name("sentiment", 0).unwrap();
        unpaired_file(&root.join("unpaired.jsonl"), senti.as_ref(), 24);
        let arith = task_by_name("arithmetic", 0).unwrap();
        let arith_root = root.join("arith");
        std::fs::create_dir_all(&arith_root).unwrap();
        demonstrations_file(&arith_root.join("d.jsonl"), arith.as_ref(), 24, "");
        let arith_init = tiny_model(&arith_root, arith.as_ref(), 3);
        // RLP: a reward model with a head, human pairs, policy samples (as crates/cli/tests/rlp.rs).
        let rlp_task = task_by_name("sentiment", 1).unwrap();
        let lm = rlhf_rl::policy::fresh_tiny(
            rlhf_data::testbed::tokenizer_for(rlp_task.as_ref()),
            3,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut w = lm.snapshot().unwrap();
        rlhf_rl::reward::add_head(&mut w, lm.config.hidden_size, 4, &candle_core::Device::Cpu)
            .unwrap();
        let lm = rlhf_rl::policy::TrainableLm {
            params: rlhf_lm::llama::Trainable::new(&w).unwrap(),
            ..lm
        };
        rlhf_rl::reward::save(&lm, None, &root.join("rlp-rm-init")).unwrap();
        let rd = rlp_task.demonstrations();
        let groups: Vec<String> = (0..12)
            .map(|i| {
                let s: Vec<&str> = (0..4).map(|j| rd[40 + 4 * i + j].1.as_str()).collect();
                serde_json::json!({"prompt": rd[i].0, "samples": s}).to_string()
            })
            .collect();
        std::fs::write(root.join("samples.jsonl"), groups.join("\n")).unwrap();
        let dialogue = root.join("dialogue");
        common::dialogue_testbed(&dialogue);

        let offline = |file: &str, extra: &str| offline_toml(&root, &init, file, 2, extra);
        let online = online_toml(&init, 4, 8);
        let runs: Vec<(&str, String, &str)> = vec![
            ("rm", offline("pairs.jsonl", "normalize_samples = 0\n"), "model"),
            ("kto", offline("unpaired.jsonl", ""), "model"),
            ("reinforce", online.clone(), "model"),
            ("grpo", online.clone(), "model"),
            ("raft", online.clone(), "model"),
            ("vanilla-pg", online.clone(), "model"),
            (
                "ppo",
                online.replace("[rollout]", "[method]\ncritic_pretrain_iterations = 2\n[rollout]"),
                "model",
            ),
            (
                "online-dpo",
                format!(
                    "model = {init:?}\ntask = \"sentiment\"\nrounds = 2\nprompts_per_round = 16\nmax_new_tokens = 6\n\
                     labeler = \"annotators\"\nseed = 5\n[dpo]\nbatch_size = 8\nmax_len = 48\nsave_every = 2\n\
                     log_every = 1\n[dpo.optim]\nlr = 1e-3\n"
                ),
                "round-2/model",
            ),
            (
                "rest",
                format!(
                    "model = {arith_init:?}\ntask = \"arithmetic\"\ntrain_file = {:?}\ngrow_steps = 2\n\
                     samples_per_source = 2\ngrow_chunk = 8\nthresholds = [0.0, 0.5]\nepochs = 1\nbatch_size = 8\n\
                     max_len = 32\nsave_every = 1\nlog_every = 1\nseed = 11\n[reward]\nsource = \"gold\"\n\
                     [validation]\nprompts = 8\n[optim]\nlr = 1e-3\n",
                    arith_root.join("d.jsonl")
                ),
                "grow-2/improve-1/model",
            ),
            (
                "rlp-rm",
                format!(
                    "model = {:?}\ntrain_file = {:?}\nsamples_file = {:?}\ntask = \"sentiment\"\ntask_seed = 1\n\
                     z_dim = 4\nhead_width = 16\ngamma = 0.25\nepochs = 1\nbatch_size = 6\nmax_len = 48\n\
                     save_every = 3\nlog_every = 1\nseed = 5\n[optim]\nlr = 1e-3\n",
                    root.join("rlp-rm-init"),
                    root.join("pairs.jsonl"),
                    root.join("samples.jsonl")
                ),
                "model",
            ),
            // lr 1e-3: Adam moves a parameter whose gradient is about 0 by about ±lr whatever the
            // gradient's size, so a float-level difference in such a gradient (the ranks add their
            // halves in another order) becomes an lr-sized difference in that one weight. At 1e-2
            // one weight in 16,384 of an output projection differed by 6.5e-4 while every logged
            // number agreed within 1e-5 (relative).
            (
                "dialogue-rl",
                format!(
                    "model = \"{}\"\ntask = \"dialogue\"\ntrain_file = \"{}\"\nuser_model = \"separate\"\n\
                     iterations = 3\nprompts_per_step = 2\nk = 2\nreal_every = 3\nsupervised_every = 2\n\
                     snapshot_every = 2\neval_games = 4\neval_conversations = 3\nsave_every = 2\nseed = 5\n\
                     [turns]\nturn_limit = 3\nmax_turn_tokens = 6\n[optim]\nlr = 0.001\n",
                    dialogue.join("init").display(),
                    dialogue.join("logs.jsonl").display()
                ),
                "model",
            ),
        ];
        for (method, toml, model) in runs {
            let path = root.join(format!("{method}.toml"));
            std::fs::write(&path, toml).unwrap();
            let (one, two) = (
                root.join(format!("{method}-1")),
                root.join(format!("{method}-2")),
            );
            // KTO's KL estimate and RLP's contrastive MIB term are batch-level terms, computed
            // over each rank's share as they are over each micro-batch: 2 ranks are one process
            // whose batches are split in 2 micro-batches (`optim.grad_accum = 2`).
            let one_toml = if ["kto", "rlp-rm"].contains(&method) {
                let p = root.join(format!("{method}-ga2.toml"));
                let text = std::fs::read_to_string(&path).unwrap();
                std::fs::write(&p, text.replace("[optim]\n", "[optim]\ngrad_accum = 2\n")).unwrap();
                p
            } else {
                path.clone()
            };
            one_process(method, &one_toml, &one);
            run_ok(mpirun(2, method, &path, &two, false), method);
            let diff = weights_diff(&one.join(model), &two.join(model));
            assert!(diff < 1e-4, "{method}: final weights differ by {diff}");
        }
        std::fs::remove_dir_all(&root).ok();
    }

    /// The process ids of the ranks of a run (the `rlhf` processes whose command line names
    /// `out`), without `mpirun` itself.
    fn ranks_of(out: &Path, mpirun_pid: u32) -> Vec<u32> {
        let o = Command::new("pgrep")
            .arg("-f")
            .arg(format!("rlhf --threads 1 .*output_dir={}", out.display()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|&p| p != mpirun_pid)
            .collect()
    }

    fn rows(out: &Path) -> usize {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Start a 2-rank run and SIGKILL one of its ranks (not rank 0's parent, `mpirun`) once
    /// `after` steps are logged; mpirun then ends the other rank. Returns how many steps were
    /// logged when the kill landed.
    fn kill_one_rank(method: &str, toml: &Path, out: &Path, resume: bool, after: usize) -> usize {
        let mut c = mpirun(2, method, toml, out, resume);
        let mut child: Child = c
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while rows(out) < after {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before {after} steps"
            );
            assert!(start.elapsed().as_secs() < 120, "no progress");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let ranks = ranks_of(out, child.id());
        assert_eq!(ranks.len(), 2, "ranks: {ranks:?}");
        let logged = rows(out);
        let victim = *ranks.iter().max().unwrap();
        Command::new("kill")
            .args(["-9", &victim.to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "mpirun succeeded after a rank was killed"
        );
        assert!(
            !out.join("model").exists(),
            "a killed run wrote its final model"
        );
        logged
    }

    #[test]
    fn a_killed_rank_resumes_at_the_same_or_another_world_size() {
        let root = scratch("dist-kill");
        let (_, toml) = configs(&root, 1200).remove(0); // SFT, 150 steps, a checkpoint every step
        let full = root.join("full");
        run_ok(mpirun(2, "sft", &toml, &full, false), "uninterrupted");

        // Killed, resumed on 2 ranks: exactly the uninterrupted 2-rank run.
        let killed = root.join("killed");
        let logged = kill_one_rank("sft", &toml, &killed, false, 30);
        let err = run_ok(mpirun(2, "sft", &toml, &killed, true), "resume on 2 ranks");
        assert!(err.contains("resuming from"), "{err}");
        assert!(logged < 150);
        assert_eq!(
            common::metrics(&full.join("metrics.jsonl")),
            common::metrics(&killed.join("metrics.jsonl"))
        );
        assert_eq!(
            std::fs::read(full.join("model/model.safetensors")).unwrap(),
            std::fs::read(killed.join("model/model.safetensors")).unwrap()
        );

        // Killed on 2 ranks, resumed as one process: the same run to float tolerance.
        let other = root.join("other");
        kill_one_rank("sft", &toml, &other, false, 30);
        let (ok, err) = common::run_method("sft", &toml, &other, &[], true, &[]);
        assert!(
            ok && err.contains("resuming from"),
            "resume as one process: {err}"
        );
        assert_metrics_close(&full.join("metrics.jsonl"), &other.join("metrics.jsonl"));
        let diff = weights_diff(&full.join("model"), &other.join("model"));
        assert!(diff < 1e-4, "final weights differ by {diff}");
        std::fs::remove_dir_all(&root).ok();
    }
}

/// Started by a launcher as one of two ranks, a build without MPI stops before it writes anything
/// (two such processes would each train alone and overwrite each other's run directory).
#[cfg(not(feature = "mpi"))]
#[test]
fn a_build_without_mpi_refuses_to_run_as_one_of_several_ranks() {
    let root = scratch("dist-nompi");
    let (_, toml) = configs(&root, 16).remove(0);
    let out = root.join("run");
    let as_rank = |rank: &str, size: &str| {
        let env = [
            ("OMPI_COMM_WORLD_SIZE", size),
            ("OMPI_COMM_WORLD_RANK", rank),
        ];
        common::run_method("sft", &toml, &out, &[], false, &env)
    };
    let (ok, err) = as_rank("1", "2");
    assert!(!ok);
    assert!(
        err.contains("rank 1 of 2") && err.contains("--features mpi"),
        "{err}"
    );
    assert!(!out.exists());
    // Launched as a world of one (mpirun -n 1), it runs as usual.
    let (ok, err) = as_rank("0", "1");
    assert!(ok, "{err}");
    std::fs::remove_dir_all(&root).ok();
}
