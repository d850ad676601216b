//! The `rlhf` binary end to end: model commands on a fixture model, and clear errors on bad input.

mod common;
use common::rlhf;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures/tiny-llama")
}

fn scratch(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlhf-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn score_writes_one_line_per_input_with_consistent_sums() {
    let data = scratch("score.jsonl", "{\"prompt\": \"w5 w6\", \"completion\": \"w7 w8 w9\"}\n\n{\"prompt\": \"w10\", \"completion\": \"w11\"}\n");
    let (ok, out, err) = run(rlhf()
        .args(["score", "--model"])
        .arg(tiny_model())
        .arg("--data")
        .arg(&data));
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (v, n) in lines.iter().zip([3usize, 1]) {
        let lps: Vec<f64> = v["completion_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(lps.len(), n);
        assert_eq!(v["num_tokens"].as_u64().unwrap() as usize, n);
        assert!(lps.iter().all(|&x| x < 0.0));
        assert!((lps.iter().sum::<f64>() - v["sum_logprob"].as_f64().unwrap()).abs() < 1e-4);
    }
}

#[test]
fn malformed_jsonl_names_file_line_and_field() {
    let data = scratch(
        "bad.jsonl",
        "{\"prompt\": \"w5\", \"completion\": \"w6\"}\n{\"prompt\": \"w5\"\n",
    );
    let (ok, _, err) = run(rlhf()
        .args(["score", "--model"])
        .arg(tiny_model())
        .arg("--data")
        .arg(&data));
    assert!(!ok);
    assert!(
        err.contains("bad.jsonl:2") && err.contains("not valid JSON"),
        "{err}"
    );

    let data = scratch(
        "nofield.jsonl",
        "{\"prompt\": \"w5\", \"completion\": \"w6\"}\n{\"prompt\": \"w5\", \"answer\": \"w6\"}\n",
    );
    let (ok, _, err) = run(rlhf()
        .args(["score", "--model"])
        .arg(tiny_model())
        .arg("--data")
        .arg(&data));
    assert!(!ok);
    assert!(
        err.contains("nofield.jsonl:2") && err.contains("`completion`") && err.contains("missing"),
        "{err}"
    );

    let data = scratch(
        "empty.jsonl",
        "{\"prompt\": \"\", \"completion\": \"w6\"}\n",
    );
    let (ok, _, err) = run(rlhf()
        .args(["score", "--model"])
        .arg(tiny_model())
        .arg("--data")
        .arg(&data));
    assert!(!ok);
    assert!(
        err.contains("empty.jsonl:1") && err.contains("empty prompt"),
        "{err}"
    );
}

#[test]
fn generate_is_deterministic_and_refuses_empty_prompts() {
    let args = |seed: &str| {
        let mut c = rlhf();
        c.args(["generate", "--model"]).arg(tiny_model()).args([
            "--prompt",
            "w5 w6",
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--json",
        ]);
        c
    };
    let (ok, a, err) = run(&mut args("3"));
    assert!(ok, "{err}");
    let (_, b, _) = run(&mut args("3"));
    assert_eq!(a, b, "same seed, same output");
    let v: serde_json::Value = serde_json::from_str(a.trim()).unwrap();
    assert_eq!(v["num_tokens"].as_u64().unwrap(), 6);

    let (ok, _, err) = run(rlhf()
        .args(["generate", "--model"])
        .arg(tiny_model())
        .args(["--prompt", ""]));
    assert!(!ok && err.contains("empty prompt"), "{err}");
}

#[test]
fn missing_model_is_a_clear_error() {
    let (ok, _, err) = run(rlhf().args(["info", "--model", "/no/such/model"]));
    assert!(
        !ok && err.contains("/no/such/model") && err.contains("not found"),
        "{err}"
    );
    let (ok, out, err) = run(rlhf().args(["info", "--model"]).arg(tiny_model()));
    assert!(ok, "{err}");
    assert!(
        out.contains("LlamaForCausalLM") && out.contains("layers:        2"),
        "{out}"
    );
}

#[test]
fn smollm2_answers_the_capital_of_france() {
    let Some(gguf) = rlhf_lm::testing::smollm2_gguf() else {
        return;
    };
    let (ok, out, err) = run(rlhf()
        .args([
            "generate",
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--model",
        ])
        .arg(gguf));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "The capital of France is Paris.");
}

#[test]
fn print_config_shows_every_default_with_its_comment() {
    let (ok, out, err) = run(rlhf().args(["rloo", "--print-config"]));
    assert!(ok, "{err}");
    assert!(
        out.contains("# Rollout batches (iterations).\nsteps = 100\n"),
        "{out}"
    );
    assert!(
        out.contains("\n[method]\n") && out.contains("minibatches = 2"),
        "{out}"
    );
    // Unset optional keys are shown commented out, with their comment.
    assert!(
        out.contains("# The frozen reference policy; default: `model`.\n# reference = (unset)\n"),
        "{out}"
    );
    let (ok, out, _) = run(rlhf().args(["dpo", "--print-config"]));
    assert!(ok && out.contains("loss = \"dpo\""), "{out}");
}

#[test]
fn device_option_is_checked() {
    let (ok, _, err) = run(rlhf()
        .args(["--device", "tpu", "info", "--model"])
        .arg(tiny_model()));
    assert!(
        !ok && err.contains("--device tpu: expected cpu, cuda or cuda:N"),
        "{err}"
    );
    let (ok, out, err) = run(rlhf()
        .args(["--device", "cpu", "info", "--model"])
        .arg(tiny_model()));
    assert!(ok, "{err}{out}");
    if !cfg!(feature = "cuda") {
        let (ok, _, err) = run(rlhf()
            .args(["--device", "cuda:0", "info", "--model"])
            .arg(tiny_model()));
        assert!(!ok && err.contains("no CUDA support"), "{err}");
    }
}

#[test]
fn method_shorthand_flags_set_their_key() {
    // `--loss` is `--set loss=...`: an unknown loss is refused by the configuration.
    let (ok, _, err) = run(rlhf().args(["dpo", "--loss", "nope", "--set", "model=x"]));
    assert!(!ok && err.contains("nope"), "{err}");
}

/// `rlhf plot`: one run redraws its own `curves.svg`; several are overlaid into `--out` with the
/// run directories' names as the legend; an unknown metric, a malformed line and a missing run
/// are errors that say which.
#[test]
fn plot_draws_one_run_or_overlays_several() {
    let root = std::env::temp_dir().join(format!("rlhf-cli-plot-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    let write = |name: &str, text: &str| -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        dir
    };
    let a = write(
        "beta-0.1",
        "{\"step\":1,\"loss\":1.0,\"kl\":0.5}\n{\"step\":2,\"loss\":0.5,\"kl\":0.75}\n",
    );
    let b = write(
        "beta-0.5",
        "{\"step\":1,\"loss\":1.25,\"kl\":0.25}\n{\"step\":2,\"loss\":1.0,\"kl\":0.5}\n",
    );

    let (ok, out, err) = run(rlhf().arg("plot").arg(&a));
    assert!(ok, "{err}");
    assert!(
        out.contains(&a.join("curves.svg").display().to_string()),
        "{out}"
    );
    assert!(std::fs::read_to_string(a.join("curves.svg"))
        .unwrap()
        .starts_with("<svg"));

    let fig = root.join("figs/kl.svg");
    let (ok, _, err) = run(rlhf()
        .arg("plot")
        .arg(&a)
        .arg(&b)
        .args(["--metrics", "kl,loss", "--out"])
        .arg(&fig));
    assert!(ok, "{err}");
    let svg = std::fs::read_to_string(&fig).unwrap();
    for text in ["\nbeta-0.1\n", "\nbeta-0.5\n", "\nkl\n", "\nloss\n"] {
        assert!(svg.contains(text), "{text:?} not in the picture");
    }

    let (ok, _, err) = run(rlhf()
        .arg("plot")
        .arg(&a)
        .args(["--metrics", "reward", "--out"])
        .arg(&fig));
    assert!(
        !ok && err.contains("`reward`") && err.contains("kl, loss"),
        "{err}"
    );
    let c = write("broken", "{\"step\":1,\"loss\":1.0}\n{oops\n{\"step\":3}\n");
    let (ok, _, err) = run(rlhf().arg("plot").arg(&c));
    assert!(
        !ok && err.contains("broken") && err.contains("line 2"),
        "{err}"
    );
    let (ok, _, err) = run(rlhf().arg("plot").arg(root.join("missing")));
    assert!(!ok && err.contains("missing"), "{err}");
    std::fs::remove_dir_all(&root).ok();
}

/// `rlhf merge` folds peft's adapter fixture into its base: the merged directory is a plain model
/// whose log-probs are those peft's `merge_and_unload` gives (`tools/make_lora_fixtures.py`), and
/// a directory that is not an adapter is refused by name.
#[test]
fn merge_writes_the_model_peft_merges() {
    use rlhf_lm::batch::TokenBatch;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lm/tests/fixtures");
    let out = common::scratch("merge").join("merged");
    let status = rlhf()
        .args(["merge", "--adapter"])
        .arg(fixtures.join("tiny-llama-lora-all"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(out.join("model.safetensors").exists() && !out.join("adapter_config.json").exists());
    let merged = rlhf_lm::Pretrained::load(&out, &candle_core::Device::Cpu).unwrap();
    assert!(merged.adapter.is_none());
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("tiny-llama.reference.json")).unwrap(),
    )
    .unwrap();
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("tiny-llama-lora.reference.json")).unwrap(),
    )
    .unwrap();
    let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    let ids: Vec<Vec<u32>> = rows(&r["input_ids"])
        .iter()
        .map(|r| r.iter().map(|&x| x as u32).collect())
        .collect();
    let real: Vec<Vec<bool>> = rows(&r["attention_mask"])
        .iter()
        .map(|r| r.iter().map(|&x| x == 1.0).collect())
        .collect();
    let batch = TokenBatch::new(ids, real.clone(), &candle_core::Device::Cpu).unwrap();
    let model = merged.model(&candle_core::Device::Cpu).unwrap();
    let ours = rlhf_lm::score::next_token_logprobs(&model, &batch, 1.0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (b, row) in rows(&want["all"]["merged"]).iter().enumerate() {
        for (t, &x) in row.iter().enumerate() {
            if real[b][t] && real[b][t + 1] {
                assert!(
                    (ours[b][t] as f64 - x).abs() < 1e-4,
                    "[{b}][{t}] {} vs {x}",
                    ours[b][t]
                );
            }
        }
    }
    let refused = rlhf()
        .args(["merge", "--adapter"])
        .arg(fixtures.join("tiny-llama"))
        .arg("--out")
        .arg(common::scratch("merge-bad"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("not a LoRA adapter directory"), "{err}");
}
