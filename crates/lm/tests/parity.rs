//! Parity with `transformers`: logits, log-probs and greedy generations against committed
//! fixtures made by `tools/make_model_fixtures.py` (CI needs no Python), for tiny random Llama,
//! Mistral and Qwen2 models and for SmolLM2-135M-Instruct (from its GGUF).

use std::path::{Path, PathBuf};

use candle_core::Device;
use rlhf_lm::batch::TokenBatch;
use rlhf_lm::generate::{generate, SamplingParams};
use rlhf_lm::pretrained::save_hf;
use rlhf_lm::score::{encode_pair, score_pairs};
use rlhf_lm::{Message, Pretrained};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference(name: &str) -> Value {
    let p = fixtures().join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}
fn rows<T>(v: &Value, f: fn(&Value) -> Vec<T>) -> Vec<Vec<T>> {
    v.as_array().unwrap().iter().map(f).collect()
}

fn assert_close(what: &str, ours: &[f32], theirs: &[f32], tol: f32) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: max |diff| = {worst} > {tol}");
}

/// Un-padded prompt rows from a left-padded batch and its attention mask.
fn unpad(ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Vec<Vec<u32>> {
    ids.iter()
        .zip(mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, &k)| k == 1)
                .map(|(&t, _)| t)
                .collect()
        })
        .collect()
}

fn check_tiny(name: &str) {
    // The CPU, or the GPU `RLHF_TEST_DEVICE` names (docs/scale-out.md, "The CUDA build").
    let dev = rlhf_lm::testing::test_device();
    let model = Pretrained::load(&fixtures().join(name), &dev).unwrap();
    let llama = model.model(&dev).unwrap();
    let r = reference(&format!("{name}.reference.json"));
    let ids = rows(&r["input_ids"], u32s);
    let mask = rows(&r["attention_mask"], u32s);
    let real: Vec<Vec<bool>> = mask
        .iter()
        .map(|m| m.iter().map(|&k| k == 1).collect())
        .collect();
    let batch = TokenBatch::new(ids.clone(), real.clone(), &dev).unwrap();
    // Our positions equal the reference's at every real token.
    let ours_pos = batch.positions.to_vec2::<u32>().unwrap();
    for (b, row) in rows(&r["position_ids"], u32s).iter().enumerate() {
        for (t, &p) in row.iter().enumerate() {
            if real[b][t] {
                assert_eq!(ours_pos[b][t], p, "{name}: position [{b}][{t}]");
            }
        }
    }
    let hidden = llama
        .hidden_states(&batch.ids, &batch.positions, &batch.mask, None)
        .unwrap();
    let logits = llama.logits(&hidden).unwrap().to_vec3::<f32>().unwrap();
    let want = r["logits"].as_array().unwrap();
    for (b, row) in want.iter().enumerate() {
        for (t, l) in row.as_array().unwrap().iter().enumerate() {
            if real[b][t] {
                assert_close(
                    &format!("{name}: logits[{b}][{t}]"),
                    &logits[b][t],
                    &f32s(l),
                    TOL,
                );
            }
        }
    }
    let lp = rlhf_lm::score::next_token_logprobs(&llama, &batch, 1.0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (b, row) in rows(&r["token_logprobs"], f32s).iter().enumerate() {
        for (t, &x) in row.iter().enumerate() {
            if real[b][t] && real[b][t + 1] {
                assert!(
                    (lp[b][t] - x).abs() <= TOL,
                    "{name}: token_logprobs[{b}][{t}] {} vs {x}",
                    lp[b][t]
                );
            }
        }
    }
    let g = &r["greedy"];
    let prompts = unpad(
        &rows(&g["input_ids"], u32s),
        &rows(&g["attention_mask"], u32s),
    );
    let n = g["max_new_tokens"].as_u64().unwrap() as usize;
    let samples = generate(
        &llama,
        &prompts,
        model.pad_id(),
        &SamplingParams::greedy(n),
        None,
    )
    .unwrap();
    let got: Vec<Vec<u32>> = samples.into_iter().map(|s| s.tokens).collect();
    assert_eq!(got, rows(&g["new_ids"], u32s), "{name}: greedy generation");
}

#[test]
fn tiny_llama_matches_transformers() {
    check_tiny("tiny-llama");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check_tiny("tiny-qwen2");
}

#[test]
fn tiny_mistral_matches_transformers() {
    check_tiny("tiny-mistral");
}

/// Saved checkpoints load back to the same numbers (and `transformers` reads them: the layout is
/// the one the fixtures themselves were saved in).
#[test]
fn save_and_reload_round_trip() {
    let dev = Device::Cpu;
    let model = Pretrained::load(&fixtures().join("tiny-qwen2"), &dev).unwrap();
    let dir = std::env::temp_dir().join(format!("rlhf-roundtrip-{}", std::process::id()));
    let out = dir.join("saved");
    save_hf(
        &out,
        &model.config,
        &model.weights,
        &model.tokenizer,
        model.chat_template.as_ref(),
        &model.generation,
    )
    .unwrap();
    let again = Pretrained::load(&out, &dev).unwrap();
    assert_eq!(again.config, model.config);
    let pairs = vec![(vec![5u32, 6, 7], vec![8u32, 9, 10, 2])];
    let a = score_pairs(&model.model(&dev).unwrap(), &pairs, 0, 4, 1.0).unwrap();
    let b = score_pairs(&again.model(&dev).unwrap(), &pairs, 0, 4, 1.0).unwrap();
    assert_eq!(a, b);
    std::fs::remove_dir_all(dir).ok();
}

fn smollm2() -> Option<Pretrained> {
    let path = rlhf_lm::testing::smollm2_gguf()?;
    Some(Pretrained::load(&path, &rlhf_lm::testing::test_device()).unwrap())
}

#[test]
fn smollm2_matches_transformers() {
    let Some(model) = smollm2() else { return };
    let dev = rlhf_lm::testing::test_device();
    let llama = model.model(&dev).unwrap();
    let r = reference("smollm2.reference.json");

    // Chat: template text, ids, and the greedy answer.
    let chat = &r["chat"];
    let messages: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
    let text = model.render_chat(&messages, true).unwrap();
    assert_eq!(text, chat["prompt_text"].as_str().unwrap());
    let ids = model.tokenizer.encode(&text, false).unwrap();
    assert_eq!(ids, u32s(&chat["prompt_ids"]));
    let params = SamplingParams {
        eos_token_ids: model.eos_token_ids(),
        ..SamplingParams::greedy(32)
    };
    let sample = generate(&llama, &[ids], model.pad_id(), &params, None)
        .unwrap()
        .remove(0);
    assert_eq!(sample.tokens, u32s(&chat["greedy_new_ids"]));
    let answer = model.tokenizer.decode(&sample.tokens, true).unwrap();
    assert_eq!(answer, chat["greedy_text"].as_str().unwrap());
    assert_eq!(answer, "The capital of France is Paris.");

    // Teacher-forced completion log-probs, TRL-style tokenisation.
    let mut pairs = Vec::new();
    for p in r["pairs"].as_array().unwrap() {
        let (pi, ci) = encode_pair(
            &model.tokenizer,
            p["prompt"].as_str().unwrap(),
            p["completion"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(pi, u32s(&p["prompt_ids"]));
        assert_eq!(ci, u32s(&p["completion_ids"]));
        pairs.push((pi, ci));
    }
    let scored = score_pairs(&llama, &pairs, model.pad_id(), 4, 1.0).unwrap();
    for (i, p) in r["pairs"].as_array().unwrap().iter().enumerate() {
        assert_close(
            &format!("smollm2 pair {i} log-probs"),
            &scored[i],
            &f32s(&p["completion_logprobs"]),
            TOL,
        );
    }
    // Raw logits at the final position of each pair.
    for (i, (pi, ci)) in pairs.iter().enumerate() {
        let row = [pi.as_slice(), ci.as_slice()].concat();
        let batch = TokenBatch::right_padded(std::slice::from_ref(&row), 0, &dev).unwrap();
        let h = llama
            .hidden_states(&batch.ids, &batch.positions, &batch.mask, None)
            .unwrap();
        let last = llama
            .logits(&h.narrow(1, row.len() - 1, 1).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap();
        let head = last.narrow(0, 0, 64).unwrap().to_vec1::<f32>().unwrap();
        assert_close(
            &format!("smollm2 pair {i} last logits"),
            &head,
            &f32s(&r["pairs"][i]["last_logits_head"]),
            1e-3,
        );
    }

    // A left-padded batch decodes each row as transformers does.
    let g = &r["batch_greedy"];
    let prompts = unpad(
        &rows(&g["input_ids"], u32s),
        &rows(&g["attention_mask"], u32s),
    );
    let n = g["max_new_tokens"].as_u64().unwrap() as usize;
    let got: Vec<Vec<u32>> = generate(
        &llama,
        &prompts,
        model.pad_id(),
        &SamplingParams::greedy(n),
        None,
    )
    .unwrap()
    .into_iter()
    .map(|s| s.tokens)
    .collect();
    assert_eq!(got, rows(&g["new_ids"], u32s));
}

/// The GGUF and an HF directory written from the same weights give the same log-probs.
#[test]
fn smollm2_gguf_and_hf_directory_agree() {
    let Some(model) = smollm2() else { return };
    let dev = Device::Cpu;
    let dir = std::env::temp_dir().join(format!("rlhf-smollm2-hf-{}", std::process::id()));
    save_hf(
        &dir,
        &model.config,
        &model.weights,
        &model.tokenizer,
        model.chat_template.as_ref(),
        &model.generation,
    )
    .unwrap();
    let hf = Pretrained::load(&dir, &dev).unwrap();
    let pairs = vec![
        encode_pair(
            &model.tokenizer,
            "The quick brown fox",
            " jumps over the lazy dog.",
        )
        .unwrap(),
        encode_pair(
            &hf.tokenizer,
            "The quick brown fox",
            " jumps over the lazy dog.",
        )
        .unwrap(),
    ];
    assert_eq!(pairs[0], pairs[1], "same tokenisation");
    let a = score_pairs(&model.model(&dev).unwrap(), &pairs, model.pad_id(), 2, 1.0).unwrap();
    let b = score_pairs(&hf.model(&dev).unwrap(), &pairs, hf.pad_id(), 2, 1.0).unwrap();
    assert_close("gguf vs hf", &a[0], &b[0], 1e-6);
    let messages = [Message {
        role: "user".into(),
        content: "Hi".into(),
    }];
    assert_eq!(
        model.render_chat(&messages, true).unwrap(),
        hf.render_chat(&messages, true).unwrap()
    );
    std::fs::remove_dir_all(dir).ok();
}
