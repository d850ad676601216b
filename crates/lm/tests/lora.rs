//! LoRA adapters: `peft`'s directories load here with `peft`'s log-probs (fixtures from
//! `tools/make_lora_fixtures.py`), round-trip through our writer, and train with the gradients of
//! the reference (composed f64) path, dropout included.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rlhf_lm::batch::TokenBatch;
use rlhf_lm::llama::{random_weights, Llama};
use rlhf_lm::lora::{self, Adapters, Dropout, LoraConfig, PeftAdapter, TargetModules};
use rlhf_lm::score::next_token_logprobs;
use rlhf_lm::{LlamaConfig, Pretrained};
use serde_json::Value;

const CPU: Device = Device::Cpu;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn matrix<T>(v: &Value, f: impl Fn(&Value) -> T) -> Vec<Vec<T>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(&f).collect())
        .collect()
}

/// The left-padded batch of the tiny-llama parity fixture.
fn fixture_batch() -> (TokenBatch, Vec<Vec<bool>>) {
    let r = json(&fixtures().join("tiny-llama.reference.json"));
    let ids = matrix(&r["input_ids"], |x| x.as_u64().unwrap() as u32);
    let real = matrix(&r["attention_mask"], |x| x.as_u64().unwrap() == 1);
    (TokenBatch::new(ids, real.clone(), &CPU).unwrap(), real)
}

/// Largest |ours - theirs| over positions whose token and next token are real.
fn worst_diff(model: &Llama, theirs: &Value) -> f32 {
    let (batch, real) = fixture_batch();
    let ours = next_token_logprobs(model, &batch, 1.0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let theirs = matrix(theirs, |x| x.as_f64().unwrap() as f32);
    let mut worst = 0f32;
    for (b, row) in theirs.iter().enumerate() {
        for (t, &x) in row.iter().enumerate() {
            if real[b][t] && real[b][t + 1] {
                worst = worst.max((ours[b][t] - x).abs());
            }
        }
    }
    worst
}

#[test]
fn peft_adapters_give_peft_logprobs_unmerged_and_merged() {
    let reference = json(&fixtures().join("tiny-llama-lora.reference.json"));
    for name in ["qv", "all"] {
        let dir = fixtures().join(format!("tiny-llama-lora-{name}"));
        let p = Pretrained::load(&dir, &CPU).unwrap();
        assert!(p.adapter.is_some(), "{name}: loaded as an adapter");
        let unmerged = worst_diff(&p.model(&CPU).unwrap(), &reference[name]["peft"]);
        assert!(unmerged <= 1e-4, "{name}: unmerged max |diff| {unmerged}");
        let merged = Llama::from_weights(&p.config, &p.merged_weights().unwrap(), &CPU).unwrap();
        let merged = worst_diff(&merged, &reference[name]["merged"]);
        assert!(merged <= 1e-4, "{name}: merged max |diff| {merged}");
        // The adapter matters: the base model's log-probs are far from these.
        let base = Pretrained::load(&fixtures().join("tiny-llama"), &CPU).unwrap();
        let off = worst_diff(&base.model(&CPU).unwrap(), &reference[name]["peft"]);
        assert!(off > 0.5, "{name}: adapter moves log-probs by only {off}");
    }
    // The scales read from the configs: alpha / r, and rsLoRA's alpha / sqrt(r).
    let qv = PeftAdapter::load(&fixtures().join("tiny-llama-lora-qv"), &CPU).unwrap();
    assert_eq!(qv.scale(), 2.0);
    let all = PeftAdapter::load(&fixtures().join("tiny-llama-lora-all"), &CPU).unwrap();
    assert!((all.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    assert_eq!(all.lora_tensors().len(), 2 * 7 * 2);
}

#[test]
fn our_adapter_files_round_trip_with_peft_names() {
    let dir = fixtures().join("tiny-llama-lora-all");
    let theirs = PeftAdapter::load(&dir, &CPU).unwrap();
    let cfg = theirs.lora_config().unwrap();
    assert_eq!(
        cfg.target_modules.resolve().unwrap(),
        lora::PROJECTIONS.to_vec()
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapter");
    let base = fixtures().join("tiny-llama");
    std::fs::create_dir_all(&out).unwrap();
    lora::save_adapter(
        &out,
        &cfg,
        &theirs.tensors,
        &base.to_string_lossy(),
        "CAUSAL_LM",
        false,
    )
    .unwrap();
    // peft's key layout: prefix, no adapter name, A = (r, in), B = (out, r).
    let raw = candle_core::safetensors::load(out.join(lora::ADAPTER_WEIGHTS), &CPU).unwrap();
    let a = &raw["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"];
    let b = &raw["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(
        (a.dims(), b.dims()),
        (&[8usize, 160][..], &[64usize, 8][..])
    );
    let written = json(&out.join(lora::ADAPTER_CONFIG));
    assert_eq!(written["peft_type"], "LORA");
    assert_eq!(written["r"], 8);
    assert_eq!(written["lora_alpha"], 16.0);
    assert_eq!(written["use_rslora"], true);
    assert_eq!(written["task_type"], "CAUSAL_LM");
    let back = PeftAdapter::load(&out, &CPU).unwrap();
    assert_eq!(back.tensors.len(), theirs.tensors.len());
    for (n, t) in &theirs.tensors {
        let diff = (t - &back.tensors[n])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{n}");
    }
    // An absolute base path loads too, and gives the same model as the fixture.
    let reference = json(&fixtures().join("tiny-llama-lora.reference.json"));
    let p = Pretrained::load(&out, &CPU).unwrap();
    assert!(worst_diff(&p.model(&CPU).unwrap(), &reference["all"]["peft"]) <= 1e-4);
}

/// Copy an adapter fixture, edit its config, and return the load error's text.
fn load_error(edit: impl Fn(&mut Value)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixtures().join("tiny-llama-lora-qv");
    std::fs::copy(
        src.join(lora::ADAPTER_WEIGHTS),
        dir.join(lora::ADAPTER_WEIGHTS),
    )
    .unwrap();
    let mut cfg = json(&src.join(lora::ADAPTER_CONFIG));
    cfg["base_model_name_or_path"] = fixtures().join("tiny-llama").to_string_lossy().into();
    edit(&mut cfg);
    std::fs::write(dir.join(lora::ADAPTER_CONFIG), cfg.to_string()).unwrap();
    match Pretrained::load(&dir, &CPU) {
        Ok(_) => panic!("loaded a bad adapter"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_adapters_are_refused_naming_the_file_and_field() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|c| c["peft_type"] = "PREFIX_TUNING".into()),
            "peft_type",
        ),
        (Box::new(|c| c["use_dora"] = true.into()), "use_dora"),
        (Box::new(|c| c["bias"] = "all".into()), "bias"),
        (Box::new(|c| c["r"] = 5.into()), "(r = 5)"),
        (
            Box::new(|c| c["base_model_name_or_path"] = "org/some-hub-model".into()),
            "base_model_name_or_path",
        ),
        (
            Box::new(|c| c["target_modules"] = "every-linear".into()),
            "target_modules",
        ),
        (Box::new(|c| c["r"] = "four".into()), "adapter_config.json"),
    ];
    for (edit, want) in cases {
        let e = load_error(edit);
        assert!(e.contains(want), "error lacks `{want}`: {e}");
        assert!(e.contains("bad/adapter_"), "error lacks the file: {e}");
    }
}

fn tiny_config() -> LlamaConfig {
    let mut c: LlamaConfig = Pretrained::load(&fixtures().join("tiny-llama"), &CPU)
        .unwrap()
        .config;
    c.num_hidden_layers = 2;
    c
}

/// Sum of next-token log-probs of a fixed batch, and the gradients of every adapter tensor.
fn adapter_grads(
    config: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
    adapters: &HashMap<String, Tensor>,
    dtype: DType,
    dropout: Option<Dropout>,
    checkpointing: bool,
) -> (f64, HashMap<String, Vec<f64>>) {
    let w: HashMap<String, Tensor> = weights
        .iter()
        .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
        .collect();
    let vars: HashMap<String, Var> = adapters
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap(),
            )
        })
        .collect();
    let ad = Adapters {
        tensors: vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect(),
        scale: 1.5,
        dropout,
    };
    let model = Llama::from_weights_with_adapters(config, &w, Some(&ad), &CPU)
        .unwrap()
        .with_gradient_checkpointing(checkpointing);
    let (batch, real) = fixture_batch();
    let lp = next_token_logprobs(&model, &batch, 1.0).unwrap();
    // Only real positions: padding queries are computed differently by the two paths.
    let keep: Vec<Vec<f64>> = real
        .iter()
        .map(|r| r.windows(2).map(|w| (w[0] && w[1]) as u8 as f64).collect())
        .collect();
    let keep = Tensor::new(keep, &CPU).unwrap().to_dtype(dtype).unwrap();
    let loss = (lp * keep).unwrap().sum_all().unwrap();
    let grads = rlhf_lm::llama::backward(&loss).unwrap();
    for (n, t) in &w {
        assert!(grads.get(t).is_none(), "frozen `{n}` got a gradient");
    }
    let g = vars
        .iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {n}"));
            (
                n.clone(),
                g.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap(),
            )
        })
        .collect();
    (loss.to_dtype(DType::F64).unwrap().to_scalar().unwrap(), g)
}

fn random_adapters(config: &LlamaConfig) -> HashMap<String, Tensor> {
    let lcfg = LoraConfig {
        r: 3,
        target_modules: TargetModules::Preset("all-linear".into()),
        ..LoraConfig::default()
    };
    let mut ad = lora::init_adapters(config, &lcfg, 7, &CPU).unwrap();
    // B away from zero, so that A's gradient is not zero too (seeded, in name order).
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut names: Vec<String> = ad.keys().cloned().collect();
    names.sort();
    for n in names.iter().filter(|n| n.ends_with("lora_B.weight")) {
        let t = &ad[n];
        let values: Vec<f32> = (0..t.elem_count())
            .map(|_| rng.random_range(-0.08f32..0.08))
            .collect();
        let fresh = Tensor::from_vec(values, t.shape(), &CPU).unwrap();
        ad.insert(n.clone(), fresh);
    }
    ad
}

#[test]
fn adapter_gradients_match_the_f64_reference_path_and_skip_frozen_weights() {
    let config = tiny_config();
    let weights = random_weights(&config, 3, 0.05, &CPU).unwrap();
    let adapters = random_adapters(&config);
    let (l32, g32) = adapter_grads(&config, &weights, &adapters, DType::F32, None, false);
    let (l64, g64) = adapter_grads(&config, &weights, &adapters, DType::F64, None, false);
    assert!((l32 - l64).abs() < 1e-3 * l64.abs(), "loss {l32} vs {l64}");
    assert_eq!(g32.len(), 2 * 7 * 2);
    for (n, a) in &g32 {
        let b = &g64[n];
        let scale = b.iter().map(|x| x.abs()).fold(1e-3, f64::max);
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= 1e-3 * scale,
            "{n}: max |diff| {worst} (scale {scale})"
        );
    }
    // A finite difference on one entry of one A (f64), against its analytic gradient.
    let name = "model.layers.1.self_attn.v_proj.lora_A.weight";
    let h = 1e-5;
    let bumped = |d: f64| {
        let mut ad = adapters.clone();
        let t = ad[name].to_dtype(DType::F64).unwrap();
        let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        v[5] += d;
        ad.insert(name.into(), Tensor::from_vec(v, t.shape(), &CPU).unwrap());
        adapter_grads(&config, &weights, &ad, DType::F64, None, false).0
    };
    let numeric = (bumped(h) - bumped(-h)) / (2.0 * h);
    let analytic = g64[name][5];
    assert!(
        (numeric - analytic).abs() <= 1e-5 * analytic.abs().max(1.0),
        "finite difference {numeric} vs gradient {analytic}"
    );
}

#[test]
fn adapter_dropout_is_reproducible_and_replayed_by_gradient_checkpointing() {
    let config = tiny_config();
    let weights = random_weights(&config, 3, 0.05, &CPU).unwrap();
    let adapters = random_adapters(&config);
    let dropout = |seed| Dropout {
        p: 0.3,
        seed,
        draws: Default::default(),
    };
    let (plain, _) = adapter_grads(&config, &weights, &adapters, DType::F32, None, false);
    let (l1, g1) = adapter_grads(
        &config,
        &weights,
        &adapters,
        DType::F32,
        Some(dropout(1)),
        false,
    );
    let (l2, g2) = adapter_grads(
        &config,
        &weights,
        &adapters,
        DType::F32,
        Some(dropout(1)),
        true,
    );
    let (l3, _) = adapter_grads(
        &config,
        &weights,
        &adapters,
        DType::F32,
        Some(dropout(2)),
        false,
    );
    assert!((l1 - plain).abs() > 1e-3, "dropout changed nothing");
    assert!((l1 - l3).abs() > 1e-3, "another seed, the same masks");
    assert!(
        (l1 - l2).abs() <= 1e-4 * l1.abs(),
        "checkpointed loss {l2} vs {l1}"
    );
    for (n, a) in &g1 {
        let worst = a
            .iter()
            .zip(&g2[n])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        let scale = a.iter().map(|x| x.abs()).fold(1e-3, f64::max);
        assert!(
            worst <= 1e-4 * scale,
            "{n}: checkpointed gradient differs by {worst}"
        );
    }
    // Half the inputs kept on average at p = 0.5, each scaled by 2.
    let d = Dropout {
        p: 0.5,
        seed: 9,
        draws: Default::default(),
    };
    let x = Tensor::ones(100_000, DType::F32, &CPU).unwrap();
    let y = d.apply(&x).unwrap().to_vec1::<f32>().unwrap();
    assert!(y.iter().all(|&v| v == 0.0 || v == 2.0));
    let kept = y.iter().filter(|&&v| v == 2.0).count() as f64 / 1e5;
    assert!((kept - 0.5).abs() < 0.01, "kept {kept}");
}

/// An adapter this toolkit wrote (`rlhf sft` with LoRA and a saved embedding; see
/// `tools/make_lora_fixtures.py`) gives the log-probs Python `peft` computes from it.
#[test]
fn our_adapter_gives_in_peft_the_logprobs_it_gives_here() {
    let reference = json(&fixtures().join("tiny-llama-lora.reference.json"));
    let p = Pretrained::load(&fixtures().join("tiny-llama-lora-ours"), &CPU).unwrap();
    assert!(p
        .adapter
        .as_ref()
        .unwrap()
        .tensors
        .contains_key("model.embed_tokens.weight"));
    let worst = worst_diff(&p.model(&CPU).unwrap(), &reference["ours"]["peft"]);
    assert!(worst <= 1e-4, "max |diff| {worst}");
    let base = Pretrained::load(&fixtures().join("tiny-llama"), &CPU).unwrap();
    assert!(worst_diff(&base.model(&CPU).unwrap(), &reference["ours"]["peft"]) > 0.1);
}
