//! Training with LoRA: only the adapters (and a head) train, the reference is the untouched base,
//! and what a run writes is a `peft` adapter directory that loads back as the trained model.

mod common;
use common::{scratch, sft_config, sft_data_and_init, tiny_lm, CPU};

use std::path::Path;

use rlhf_lm::llama::Llama;
use rlhf_lm::lora::{LoraConfig, TargetModules};
use rlhf_lm::score::score_pairs;
use rlhf_lm::Pretrained;
use rlhf_methods::sft::{self, SftConfig};
use rlhf_rl::reward::{self, add_head, RewardModel};

fn lora(r: usize) -> LoraConfig {
    LoraConfig {
        r,
        alpha: 2.0 * r as f64,
        target_modules: TargetModules::Preset("all-linear".into()),
        ..LoraConfig::default()
    }
}

fn rows() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![1u32, 10, 11, 12], vec![20u32, 21, 2]),
        (vec![1, 30, 31], vec![40, 41, 42, 2]),
    ]
}

fn logprobs(model: &rlhf_lm::llama::Llama) -> Vec<f32> {
    score_pairs(model, &rows(), 0, 2, 1.0)
        .unwrap()
        .into_iter()
        .flatten()
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Give every lora_B a value, as training would (uniform in ±0.08, seeded: the same values in
/// every run).
fn perturb_adapters(lm: &rlhf_rl::policy::TrainableLm) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (n, v) in &lm.params.vars {
        if n.ends_with("lora_B.weight") {
            let values: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.random_range(-0.08f32..0.08))
                .collect();
            v.set(&candle_core::Tensor::from_vec(values, v.shape(), &CPU).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn enable_lora_freezes_the_base_and_keeps_it_as_the_reference() {
    let mut lm = tiny_lm(3);
    let before = logprobs(&lm.model(&CPU).unwrap().detached());
    let full = lm.trainable_parameters();
    lm.enable_lora(&lora(4), 0).unwrap();
    // Only adapters train: 3 layers x 7 projections x (A, B), r = 4.
    let c = &lm.config;
    let (h, i, kv) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_key_value_heads * c.head_dim,
    );
    let per_layer = 4 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h));
    assert_eq!(lm.trainable_parameters(), 3 * per_layer);
    assert!(lm.trainable_parameters() * 10 < full);
    assert!(lm.params.vars.iter().all(|(n, _)| n.contains(".lora_")));
    // B = 0: the adapted model is the base model.
    assert_eq!(logprobs(&lm.model(&CPU).unwrap()), before);
    perturb_adapters(&lm);
    let trained = logprobs(&lm.model(&CPU).unwrap().detached());
    assert!(
        max_diff(&trained, &before) > 1e-3,
        "the adapters change nothing"
    );
    // The reference is the base: the log-probs of before, exactly.
    assert_eq!(logprobs(&lm.reference_model(&CPU).unwrap()), before);
    // The merged full weights give the adapted model.
    let merged =
        rlhf_lm::llama::Llama::from_weights(&lm.config, &lm.full_weights().unwrap(), &CPU).unwrap();
    assert!(max_diff(&logprobs(&merged), &trained) < 1e-5);
    // Bad settings are refused with the field named.
    let mut again = tiny_lm(3);
    let bad = LoraConfig {
        target_modules: TargetModules::Names(vec!["qkv_proj".into()]),
        ..lora(4)
    };
    let e = again.enable_lora(&bad, 0).unwrap_err().to_string();
    assert!(
        e.contains("target_modules") && e.contains("qkv_proj"),
        "{e}"
    );
}

#[test]
fn a_lora_reward_model_saves_its_head_and_scores_the_same_after_loading() {
    let root = scratch("lora-rm");
    let lm = tiny_lm(5);
    let mut w = lm.snapshot().unwrap();
    add_head(&mut w, lm.config.hidden_size, 1, &CPU).unwrap();
    let mut lm = rlhf_rl::policy::TrainableLm {
        params: rlhf_lm::llama::Trainable::new(&w).unwrap(),
        ..lm
    };
    // The saved adapter must name a real base: save the trunk first.
    let base = root.join("base");
    lm.save(&base).unwrap();
    lm.source = base.clone();
    lm.enable_lora(&lora(2), 0).unwrap();
    let names: Vec<&str> = lm.params.vars.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&reward::HEAD), "the head still trains");
    perturb_adapters(&lm);
    let dir = root.join("rm");
    reward::save(&lm, None, &dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    assert_eq!(config["modules_to_save"], serde_json::json!(["score"]));
    let ours = RewardModel::from_trainable(&lm, None, &CPU).unwrap();
    let loaded = RewardModel::load(&dir, &CPU).unwrap();
    let (a, b) = (
        ours.score_raw(&rows(), 2).unwrap(),
        loaded.score_raw(&rows(), 2).unwrap(),
    );
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    // `rlhf merge`'s path: the adapter folded into a plain reward model directory.
    let merged = root.join("merged");
    let p = Pretrained::load(&dir, &CPU).unwrap();
    let full = rlhf_rl::policy::TrainableLm::from_pretrained(p).unwrap();
    reward::save(&full, None, &merged).unwrap();
    assert!(merged.join("model.safetensors").exists());
    let c = RewardModel::load(&merged, &CPU)
        .unwrap()
        .score_raw(&rows(), 2)
        .unwrap();
    for (x, y) in a.iter().zip(&c) {
        assert!((x - y).abs() < 1e-4, "{a:?} vs {c:?}");
    }
}

/// The SFT run of `sft_rm.rs` with LoRA r 8 (and a LoRA-sized learning rate).
fn lora_sft_config(dir: &Path, data: &Path, init: &Path) -> SftConfig {
    let mut c = sft_config(dir, data, init);
    c.fit.optim.lr = 1e-2;
    c.fit.lora = lora(8);
    c
}

/// SFT with LoRA learns, writes a `peft` adapter on an untouched base, and is deterministic.
#[test]
fn sft_with_lora_learns_and_writes_a_peft_adapter() {
    let root = scratch("lora-sft");
    let (data, init) = sft_data_and_init(&root, 48);
    let a = sft::run(&lora_sft_config(&root.join("a"), &data, &init), false, &CPU).unwrap();
    sft::run(&lora_sft_config(&root.join("b"), &data, &init), false, &CPU).unwrap();
    let first = common::metrics(&root.join("a/metrics.jsonl"))[0]["loss"]
        .as_f64()
        .unwrap();
    assert!(
        a.final_train_loss < first - 0.5,
        "loss {first} -> {}",
        a.final_train_loss
    );
    let model = root.join("a/model");
    assert!(model.join("adapter_config.json").exists());
    assert!(
        !model.join("model.safetensors").exists(),
        "an adapter, not a full model"
    );
    let same = |f: &str| {
        std::fs::read(root.join("a/model").join(f)).unwrap()
            == std::fs::read(root.join("b/model").join(f)).unwrap()
    };
    assert!(same("adapter_model.safetensors"), "same seed, same adapter");
    // Its base is the starting model, untouched, and the adapter is what moved the loss.
    let p = Pretrained::load(&model, &CPU).unwrap();
    let base = Pretrained::load(&init, &CPU).unwrap();
    assert_eq!(
        std::fs::canonicalize(p.adapter.as_ref().unwrap().base_path().unwrap()).unwrap(),
        std::fs::canonicalize(&init).unwrap()
    );
    for (n, t) in &base.weights {
        let d = (t - &p.weights[n])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{n} changed");
    }
    let adapted = logprobs(&p.model(&CPU).unwrap());
    assert!(max_diff(&adapted, &logprobs(&base.model(&CPU).unwrap())) > 1e-2);
    // Checkpoints hold the adapters only.
    let ck =
        rlhf_train::load_safetensors(&root.join("a/checkpoints/step-9/model.safetensors"), &CPU)
            .unwrap();
    assert!(
        ck.keys().all(|n| n.contains(".lora_")),
        "{:?}",
        ck.keys().collect::<Vec<_>>()
    );
}

/// With adapters on, sampling (decode path: KV cache, few-row kernels) and scoring (whole
/// sequences, with and without a gradient graph) give the same log-probs, so the online methods'
/// rollout and training log-probs agree.
#[test]
fn sampled_logprobs_equal_scored_logprobs_with_adapters() {
    let mut lm = tiny_lm(4);
    lm.enable_lora(&lora(4), 0).unwrap();
    perturb_adapters(&lm);
    let prompts = vec![vec![1u32, 10, 11, 12], vec![1, 30, 31], vec![1, 50]];
    let params = rlhf_lm::generate::SamplingParams {
        max_new_tokens: 8,
        temperature: 1.0,
        seed: 3,
        ..rlhf_lm::generate::SamplingParams::greedy(8)
    };
    let sampler = lm.model(&CPU).unwrap().detached();
    let samples = rlhf_lm::generate::generate(&sampler, &prompts, 0, &params, None).unwrap();
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = prompts
        .iter()
        .zip(&samples)
        .map(|(p, s)| (p.clone(), s.tokens.clone()))
        .collect();
    let scored = score_pairs(&sampler, &pairs, 0, 3, 1.0).unwrap();
    let tracked = score_pairs(&lm.model(&CPU).unwrap(), &pairs, 0, 3, 1.0).unwrap();
    for ((s, a), b) in samples.iter().zip(&scored).zip(&tracked) {
        assert_eq!(s.logprobs.len(), a.len());
        for ((x, y), z) in s.logprobs.iter().zip(a).zip(b) {
            assert!(
                (x - y).abs() < 1e-4 && (y - z).abs() < 1e-4,
                "sampled {x} scored {y} tracked {z}"
            );
        }
    }
}

/// `modules_to_save = ["embed_tokens"]`: the (tied) embeddings train whole beside the adapters,
/// the reference keeps their starting values, and the saved adapter carries them, as `peft`'s
/// saved modules, so that loading it gives the trained model.
#[test]
fn modules_to_save_train_whole_and_travel_with_the_adapter() {
    let root = scratch("lora-mts");
    let init = root.join("init");
    tiny_lm(6).save(&init).unwrap();
    let mut lm = rlhf_rl::policy::TrainableLm::load(&init, &CPU).unwrap();
    let before = logprobs(&lm.model(&CPU).unwrap().detached());
    let cfg = LoraConfig {
        modules_to_save: vec!["embed_tokens".into()],
        ..lora(2)
    };
    lm.enable_lora(&cfg, 0).unwrap();
    let embed = "model.embed_tokens.weight";
    let v = &lm
        .params
        .vars
        .iter()
        .find(|(n, _)| n == embed)
        .expect("embeddings train")
        .1;
    v.set(&(v.as_tensor() * 1.5).unwrap()).unwrap();
    perturb_adapters(&lm);
    let trained = logprobs(&lm.model(&CPU).unwrap().detached());
    assert!(max_diff(&trained, &before) > 1e-2);
    assert_eq!(logprobs(&lm.reference_model(&CPU).unwrap()), before);
    let dir = root.join("adapter");
    lm.save(&dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["modules_to_save"],
        serde_json::json!(["embed_tokens"])
    );
    // The testbed's model ties its embeddings: peft must keep the head on the trained copy.
    assert_eq!(config["ensure_weight_tying"], true);
    let raw = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &CPU).unwrap();
    assert!(raw.contains_key("base_model.model.model.embed_tokens.weight"));
    let loaded = Pretrained::load(&dir, &CPU).unwrap().model(&CPU).unwrap();
    assert!(max_diff(&logprobs(&loaded), &trained) < 1e-5);
    let bad = LoraConfig {
        modules_to_save: vec!["norm".into()],
        ..lora(2)
    };
    let e = tiny_lm(6).enable_lora(&bad, 0).unwrap_err().to_string();
    assert!(e.contains("modules_to_save") && e.contains("norm"), "{e}");
}

/// QLoRA-style base: the frozen projections kept as q8_0 / q4_0 blocks. The model starts as the
/// quantised base (B = 0) and the reference is that same base; log-probs stay near the f32
/// model's (q8_0 closer than q4_0); gradients still reach every adapter; merging dequantises.
#[test]
fn a_quantised_base_trains_adapters_close_to_the_f32_model() {
    let f32_lp = logprobs(&tiny_lm(8).model(&CPU).unwrap().detached());
    let mut worst = Vec::new();
    for q in ["q8_0", "q4_0"] {
        let mut lm = tiny_lm(8);
        let cfg = LoraConfig {
            quantize_base: q.into(),
            ..lora(4)
        };
        lm.enable_lora(&cfg, 0).unwrap();
        let state = lm.lora.as_ref().unwrap();
        // Every projection whose input is whole blocks of 32: all but down_proj (344 inputs).
        assert_eq!(state.quantized.len(), 3 * 6);
        assert!(state.quantized.keys().all(|n| !n.contains("down_proj")));
        let start = logprobs(&lm.model(&CPU).unwrap().detached());
        assert_eq!(start, logprobs(&lm.reference_model(&CPU).unwrap()));
        worst.push(max_diff(&start, &f32_lp));
        // Gradients flow through the quantised products to the first layer's adapters.
        let batch = rlhf_lm::score::CompletionBatch::new(&rows(), 0, &CPU).unwrap();
        perturb_adapters(&lm);
        let lp =
            rlhf_lm::score::completion_logprobs(&lm.model(&CPU).unwrap(), &batch, 1.0).unwrap();
        let grads = rlhf_lm::llama::backward(&lp.sum_all().unwrap()).unwrap();
        for (n, v) in &lm.params.vars {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{q}: no gradient for {n}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{q}: zero gradient for {n}");
        }
        let merged = Llama::from_weights(&lm.config, &lm.full_weights().unwrap(), &CPU).unwrap();
        let adapted = logprobs(&lm.model(&CPU).unwrap().detached());
        assert!(
            max_diff(&logprobs(&merged), &adapted) < 0.05,
            "{q}: merged vs adapted"
        );
    }
    assert!(worst[0] < 0.02, "q8_0 moves log-probs by {}", worst[0]);
    assert!(
        worst[1] < 0.2 && worst[1] > worst[0],
        "q4_0 {} vs q8_0 {}",
        worst[1],
        worst[0]
    );
}
