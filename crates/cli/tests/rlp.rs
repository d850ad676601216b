//! `rlhf rlp-rm`: a refresh killed in the middle resumes to exactly the numbers and weights of an
//! uninterrupted run, for both variants (UML: MIB heads and their noise; SPG: synthetic pairs).

mod common;
use common::{metrics, scratch, train};

use candle_core::Device;
use rlhf_data::testbed::{task_by_name, tokenizer_for};
use rlhf_rl::policy::{fresh_tiny, TrainableLm};

fn setup(tag: &str) -> std::path::PathBuf {
    let root = scratch(tag);
    let task = task_by_name("sentiment", 1).unwrap();
    let lm = fresh_tiny(tokenizer_for(task.as_ref()), 3, &Device::Cpu).unwrap();
    let mut w = lm.snapshot().unwrap();
    rlhf_rl::reward::add_head(&mut w, lm.config.hidden_size, 4, &Device::Cpu).unwrap();
    let lm = TrainableLm {
        params: rlhf_lm::llama::Trainable::new(&w).unwrap(),
        ..lm
    };
    rlhf_rl::reward::save(&lm, None, &root.join("rm")).unwrap();
    // Human pairs from the demonstrations (chosen: a demo, rejected: another prompt's demo).
    let demos = task.demonstrations();
    let pairs: Vec<String> = (0..24)
        .map(|i| {
            serde_json::json!({"prompt": demos[i].0, "chosen": format!(" {}", demos[i].1),
                "rejected": format!(" {}", demos[i + 30].1)})
            .to_string()
        })
        .collect();
    std::fs::write(root.join("prefs.jsonl"), pairs.join("\n")).unwrap();
    // Policy samples: 4 per prompt, drawn from the demonstrations' responses.
    let groups: Vec<String> = (0..12)
        .map(|i| {
            let s: Vec<&str> = (0..4).map(|j| demos[40 + 4 * i + j].1.as_str()).collect();
            serde_json::json!({"prompt": demos[i].0, "samples": s}).to_string()
        })
        .collect();
    std::fs::write(root.join("samples.jsonl"), groups.join("\n")).unwrap();
    std::fs::write(
        root.join("run.toml"),
        format!(
            "model = {:?}\ntrain_file = {:?}\nsamples_file = {:?}\ntask = \"sentiment\"\ntask_seed = 1\nz_dim = 4\nhead_width = 16\ngamma = 0.25\nepochs = 2\nbatch_size = 6\nmax_len = 48\nsave_every = 3\nlog_every = 1\nseed = 5\n[optim]\nlr = 1e-3\n",
            root.join("rm"),
            root.join("prefs.jsonl"),
            root.join("samples.jsonl")
        ),
    )
    .unwrap();
    root
}

fn killed_run_resumes(variant: &str) {
    let root = setup(&format!("rlp-resume-{variant}"));
    let set = |dir: &str| {
        vec![
            format!("output_dir={}", root.join(dir).display()),
            format!("variant={variant}"),
        ]
    };
    let (ok, err) = train(&root, &["rlp-rm"], &set("full"), None, false);
    assert!(ok, "{err}");
    let (ok, err) = train(&root, &["rlp-rm"], &set("killed"), Some(5), false);
    assert!(!ok && err.contains("killed at step 5"), "{err}");
    assert!(!root.join("killed/model").exists());
    let (ok, err) = train(&root, &["rlp-rm"], &set("killed"), None, true);
    assert!(ok, "{err}");
    assert!(
        err.contains("resuming from") && err.contains("step-3"),
        "{err}"
    );
    let full = metrics(&root.join("full/metrics.jsonl"));
    assert!(full.len() >= 8, "{full:?}");
    assert_eq!(full, metrics(&root.join("killed/metrics.jsonl")));
    let a = std::fs::read(root.join("full/model/model.safetensors")).unwrap();
    let b = std::fs::read(root.join("killed/model/model.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from the uninterrupted run");
    if variant == "spg" {
        let s = std::fs::read_to_string(root.join("full/spg_pairs.jsonl")).unwrap();
        assert!(
            !s.is_empty(),
            "no synthetic pairs: the test would not exercise SPG"
        );
        assert_eq!(
            s,
            std::fs::read_to_string(root.join("killed/spg_pairs.jsonl")).unwrap()
        );
    } else {
        assert!(full.iter().any(|m| m.get("mib/skl").is_some()));
    }
}

#[test]
fn killed_uml_refresh_resumes_to_the_same_result() {
    killed_run_resumes("uml");
}

#[test]
fn killed_spg_refresh_resumes_to_the_same_result() {
    killed_run_resumes("spg");
}

/// `rlhf rlp` refuses a configuration whose inputs are missing, naming them.
#[test]
fn rlp_pipeline_names_missing_inputs() {
    let root = scratch("rlp-missing");
    let o = common::rlhf()
        .args(["rlp", "--set"])
        .arg(format!("sft_model={}", root.join("nope").display()))
        .arg("--set")
        .arg(format!("out_dir={}", root.join("out").display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("sft_model") && err.contains("quickstart"),
        "{err}"
    );
}
