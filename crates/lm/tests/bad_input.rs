//! Bad input gets a clear error naming the file (and tensor or field), never a panic.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_lm::generate::{generate, SamplingParams};
use rlhf_lm::score::encode_pair;
use rlhf_lm::{LmError, Pretrained};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A scratch copy of a fixture model directory.
fn copy_model(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("rlhf-bad-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&dst).ok();
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn load_err(path: &Path) -> String {
    match Pretrained::load(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_path_is_named() {
    let msg = load_err(Path::new("/nonexistent/model-dir"));
    assert!(
        msg.contains("/nonexistent/model-dir") && msg.contains("not found"),
        "{msg}"
    );
}

#[test]
fn missing_config_and_weights_are_named() {
    let dir = copy_model("tiny-llama", "noconfig");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("config.json") && msg.contains("not found"),
        "{msg}"
    );

    let dir = copy_model("tiny-llama", "noweights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn unsupported_architecture_names_the_field() {
    let dir = copy_model("tiny-llama", "arch");
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let text = text
        .replace("LlamaForCausalLM", "GPT2LMHeadModel")
        .replace("\"llama\"", "\"gpt2\"");
    std::fs::write(&p, text).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("config.json")
            && msg.contains("architectures")
            && msg.contains("GPT2LMHeadModel"),
        "{msg}"
    );
}

#[test]
fn malformed_config_names_the_field() {
    let dir = copy_model("tiny-llama", "field");
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&p, v.to_string()).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("config.json") && msg.contains("hidden_size") && msg.contains("missing"),
        "{msg}"
    );

    std::fs::write(&p, "{ not json").unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("config.json") && msg.contains("invalid JSON"),
        "{msg}"
    );
}

#[test]
fn wrong_tensor_shape_names_the_tensor() {
    let dir = copy_model("tiny-llama", "shape");
    let st = dir.join("model.safetensors");
    let mut weights = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    weights.insert(
        name.into(),
        Tensor::zeros((7, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&weights, &st).unwrap();
    let err = Pretrained::load(&dir, &Device::Cpu)
        .err()
        .expect("must fail");
    match &err {
        LmError::BadShape {
            name: n,
            expected,
            actual,
            ..
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, &vec![160, 64]);
            assert_eq!(actual, &vec![7, 64]);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err.to_string().contains(name));

    weights.remove(name);
    candle_core::safetensors::save(&weights, &st).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains(name) && msg.contains("missing"), "{msg}");
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = copy_model("tiny-qwen2", "trunc");
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(&dir);
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
    std::fs::write(&st, &bytes[..5]).unwrap();
    let msg = load_err(&dir);
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn empty_prompt_is_refused() {
    let model = Pretrained::load(&fixture("tiny-llama"), &Device::Cpu).unwrap();
    let err = encode_pair(&model.tokenizer, "", "w5 w6")
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty prompt"), "{err}");
    let llama = model.model(&Device::Cpu).unwrap();
    let err = generate(
        &llama,
        &[vec![5, 6], vec![]],
        0,
        &SamplingParams::greedy(4),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("prompt 1 is empty"), "{err}");
}

#[test]
fn bad_sampling_parameters_are_refused() {
    let model = Pretrained::load(&fixture("tiny-llama"), &Device::Cpu).unwrap();
    let llama = model.model(&Device::Cpu).unwrap();
    for (params, needle) in [
        (
            SamplingParams {
                top_p: Some(1.5),
                ..Default::default()
            },
            "top_p",
        ),
        (
            SamplingParams {
                temperature: -1.0,
                ..Default::default()
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_k: Some(0),
                ..Default::default()
            },
            "top_k",
        ),
    ] {
        let err = generate(&llama, &[vec![5, 6]], 0, &params, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
}
