//! The decoder trains (every parameter gets a gradient; gradients match finite differences) and
//! generation reports the same log-probs that teacher-forced scoring computes.

#[path = "support/compare.rs"]
mod compare;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use compare::max_diff;
use rlhf_lm::batch::TokenBatch;
use rlhf_lm::config::{Family, LlamaConfig, RopeScaling};
use rlhf_lm::generate::{generate, SamplingParams};
use rlhf_lm::llama::{random_weights, Llama, Trainable};
use rlhf_lm::score::{completion_logprobs, per_row, score_pairs, CompletionBatch};

fn tiny(family: Family, tied: bool) -> LlamaConfig {
    LlamaConfig {
        family,
        vocab_size: 48,
        hidden_size: 32,
        intermediate_size: 40,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 128,
        tie_word_embeddings: tied,
        qkv_bias: family == Family::Qwen2,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: Some(0),
        sliding_window: None,
    }
}

/// Random weights, with random (non-zero) biases so their gradients are tested too.
/// Random weights with norms and biases spread around 1 and 0, all drawn from `seed` (candle's
/// own `Tensor::rand` is unseeded, which made the samples, and the tests that look at their
/// lengths, differ from process to process).
fn weights(c: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    use rand::{Rng, SeedableRng};
    let mut w = random_weights(c, seed, 0.3, &Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut names: Vec<String> = w.keys().cloned().collect();
    names.sort();
    for name in names {
        let centre = if name.ends_with(".bias") {
            0.0
        } else if name.ends_with("norm.weight") {
            1.0
        } else {
            continue;
        };
        let t = &w[&name];
        let values: Vec<f32> = (0..t.elem_count())
            .map(|_| centre + rng.random_range(-0.3f32..0.3))
            .collect();
        let fresh = Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap();
        w.insert(name, fresh);
    }
    w
}

fn pairs() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        (vec![1, 5, 9, 13], vec![7, 8, 30, 2]),
        (vec![1, 40], vec![3, 3, 4, 5, 6, 2]),
        (vec![1, 11, 12, 17, 19, 21, 23], vec![44]),
    ]
}

#[test]
fn every_parameter_gets_a_gradient() {
    for (family, tied) in [
        (Family::Llama, false),
        (Family::Qwen2, true),
        (Family::Mistral, false),
    ] {
        let c = tiny(family, tied);
        let trainable = Trainable::new(&weights(&c, 7)).unwrap();
        let model = Llama::from_weights(&c, &trainable.tensors(), &Device::Cpu).unwrap();
        let batch = CompletionBatch::new(&pairs(), 0, &Device::Cpu).unwrap();
        let loss = completion_logprobs(&model, &batch, 1.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let grads = loss.backward().unwrap();
        let mut checked = 0;
        for (name, var) in &trainable.vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{family:?}: no gradient for `{name}`"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{family:?}: zero/non-finite gradient for `{name}`"
            );
            checked += 1;
        }
        assert_eq!(checked, rlhf_lm::pretrained::expected_shapes(&c).len());
    }
}

/// Central finite differences in f64 against autodiff, for a handful of coordinates of every
/// kind of parameter (embeddings, norms, attention, MLP, biases).
#[test]
fn gradients_match_finite_differences() {
    let mut c = tiny(Family::Qwen2, false);
    c.rope_scaling = Some(RopeScaling {
        rope_type: "linear".into(),
        factor: Some(2.0),
        low_freq_factor: None,
        high_freq_factor: None,
        original_max_position_embeddings: None,
    });
    let w64: HashMap<String, Tensor> = weights(&c, 3)
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::F64).unwrap()))
        .collect();
    let batch = CompletionBatch::new(&pairs(), 0, &Device::Cpu).unwrap();
    let loss_of = |w: &HashMap<String, Tensor>| -> Tensor {
        let model = Llama::from_weights(&c, w, &Device::Cpu).unwrap();
        let lp = completion_logprobs(&model, &batch, 0.9).unwrap();
        // A non-trivial scalar: weighted sum so every position matters differently.
        let weights = Tensor::arange(0f64, lp.elem_count() as f64, &Device::Cpu)
            .unwrap()
            .reshape(lp.dims())
            .unwrap();
        ((lp * (weights * 0.01).unwrap().cos().unwrap()).unwrap())
            .sum_all()
            .unwrap()
    };
    let trainable = Trainable::new(&w64).unwrap();
    let loss = loss_of(&trainable.tensors());
    let grads = loss.backward().unwrap();
    let names = [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ];
    let eps = 1e-5;
    for name in names {
        let var = &trainable.vars.iter().find(|(n, _)| n == name).unwrap().1;
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let base = w64[name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for idx in [0, base.len() / 3, base.len() - 1] {
            let shifted = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                let mut w = w64.clone();
                w.insert(
                    name.to_string(),
                    Tensor::from_vec(v, w64[name].dims(), &Device::Cpu).unwrap(),
                );
                loss_of(&w).to_scalar::<f64>().unwrap()
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            let err = (numeric - analytic[idx]).abs();
            assert!(
                err <= 1e-6 + 1e-5 * numeric.abs(),
                "{name}[{idx}]: autodiff {} vs finite difference {numeric}",
                analytic[idx]
            );
        }
    }
}

/// The fused (no-grad) path and the differentiable path compute the same function.
#[test]
fn fused_and_differentiable_paths_agree() {
    let c = tiny(Family::Llama, true);
    let w = weights(&c, 11);
    let trainable = Trainable::new(&w).unwrap();
    let tracked = Llama::from_weights(&c, &trainable.tensors(), &Device::Cpu).unwrap();
    let frozen = Llama::from_weights(&c, &w, &Device::Cpu).unwrap();
    let batch = CompletionBatch::new(&pairs(), 0, &Device::Cpu).unwrap();
    let a = per_row(&completion_logprobs(&tracked, &batch, 1.0).unwrap(), &batch).unwrap();
    let b = per_row(&completion_logprobs(&frozen, &batch, 1.0).unwrap(), &batch).unwrap();
    for (ra, rb) in a.iter().zip(&b) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
}

/// Padding does not change a row's numbers: left- and right-padded batches and a lone row agree.
#[test]
fn padding_is_invisible() {
    let c = tiny(Family::Mistral, false);
    let model = Llama::from_weights(&c, &weights(&c, 5), &Device::Cpu).unwrap();
    let rows = vec![vec![1u32, 5, 9, 13, 7, 8], vec![1, 40, 3]];
    let logits_last = |batch: &TokenBatch, row: usize, col: usize| -> Vec<f32> {
        let h = model
            .hidden_states(&batch.ids, &batch.positions, &batch.mask, None)
            .unwrap();
        model
            .logits(&h)
            .unwrap()
            .get(row)
            .unwrap()
            .get(col)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let alone = TokenBatch::right_padded(&rows[1..], 0, &Device::Cpu).unwrap();
    let right = TokenBatch::right_padded(&rows, 0, &Device::Cpu).unwrap();
    let left = TokenBatch::left_padded(&rows, 0, &Device::Cpu).unwrap();
    let a = logits_last(&alone, 0, 2);
    let r = logits_last(&right, 1, 2);
    let l = logits_last(&left, 1, 5);
    for i in 0..a.len() {
        assert!(
            (a[i] - r[i]).abs() < 1e-5 && (a[i] - l[i]).abs() < 1e-5,
            "{} {} {}",
            a[i],
            r[i],
            l[i]
        );
    }
}

/// Sampled log-probs equal teacher-forced scoring of the same tokens (1e-4, f32), with the
/// cache, left padding, temperature and top-k/top-p in play; and sampling is seeded.
#[test]
fn sampled_logprobs_equal_scored_logprobs() {
    let c = tiny(Family::Qwen2, true);
    let w = weights(&c, 13);
    let model = Llama::from_weights(&c, &w, &Device::Cpu).unwrap();
    let trainable = Trainable::new(&w).unwrap();
    let tracked = Llama::from_weights(&c, &trainable.tensors(), &Device::Cpu).unwrap();
    // Repeated prompts (k samples per prompt) share one prefill whose cache rows are copied:
    // their samples must still score as sampled.
    let (a, b, c) = (
        vec![1u32, 5, 9, 13, 4],
        vec![1, 40],
        vec![1, 11, 12, 17, 19, 21, 23, 30],
    );
    let prompts = vec![a.clone(), b.clone(), c, a.clone(), b, a];
    for (temperature, top_k, top_p) in [
        (1.0, None, None),
        (0.7, Some(10), Some(0.9)),
        (0.0, None, None),
    ] {
        let params = SamplingParams {
            max_new_tokens: 12,
            temperature,
            top_k,
            top_p,
            seed: 42,
            eos_token_ids: vec![2],
            ..Default::default()
        };
        let samples = generate(&model, &prompts, 0, &params, None).unwrap();
        let again = generate(&model, &prompts, 0, &params, None).unwrap();
        assert_eq!(samples, again, "same seed, same samples");
        let pairs: Vec<_> = prompts
            .iter()
            .cloned()
            .zip(samples.iter().map(|s| s.tokens.clone()))
            .collect();
        let t = params.logprob_temperature();
        let scored = score_pairs(&model, &pairs, 0, 8, t).unwrap();
        let batch = CompletionBatch::new(&pairs, 0, &Device::Cpu).unwrap();
        let scored_tracked =
            per_row(&completion_logprobs(&tracked, &batch, t).unwrap(), &batch).unwrap();
        for ((s, a), b) in samples.iter().zip(&scored).zip(&scored_tracked) {
            assert_eq!(s.logprobs.len(), a.len());
            for ((x, y), z) in s.logprobs.iter().zip(a).zip(b) {
                assert!(
                    (x - y).abs() < 1e-4 && (x - z).abs() < 1e-4,
                    "sampled {x} scored {y} tracked {z}"
                );
            }
        }
    }
}

/// Rows that finish early leave the decoding batch (their cache rows are dropped): the rows that
/// go on must keep their own cache rows, positions and masks, so their sampled log-probs still
/// equal teacher-forced scoring, and the samples do not depend on the batch they were drawn in
/// beyond the random stream (same seed, same samples).
#[test]
fn rows_that_finish_early_leave_the_batch_without_disturbing_the_rest() {
    let c = tiny(Family::Llama, true);
    let prompts: Vec<Vec<u32>> = (0..12u32)
        .map(|i| (0..2 + i % 5).map(|j| 1 + (i * 7 + j * 3) % 40).collect())
        .collect();
    let params = SamplingParams {
        max_new_tokens: 24,
        temperature: 1.0,
        seed: 7,
        // Three of the 48 ids end a completion: rows finish at many different steps.
        eos_token_ids: vec![3, 17, 41],
        ..Default::default()
    };
    // The first weights (by seed) whose samples have rows finishing at several steps and some
    // running to the end, the situation under test.
    let (model, samples) = (29..60)
        .map(|seed| {
            let model = Llama::from_weights(&c, &weights(&c, seed), &Device::Cpu).unwrap();
            let samples = generate(&model, &prompts, 0, &params, None).unwrap();
            (model, samples)
        })
        .find(|(_, samples)| {
            let lengths: std::collections::BTreeSet<usize> =
                samples.iter().map(|s| s.tokens.len()).collect();
            lengths.len() >= 4 && samples.iter().any(|s| s.tokens.len() == 24)
        })
        .expect("some seed gives rows of several lengths");
    assert_eq!(
        samples,
        generate(&model, &prompts, 0, &params, None).unwrap()
    );
    // The streaming variant reports each row's tokens in order as they are drawn (rows leaving
    // the batch included), and returns the same samples.
    let mut streamed: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let again =
        rlhf_lm::generate::generate_with(&model, &prompts, 0, &params, None, &mut |r, t| {
            streamed[r].push(t)
        })
        .unwrap();
    assert_eq!(again, samples);
    for (s, row) in samples.iter().zip(&streamed) {
        assert_eq!(&s.tokens, row);
    }
    let pairs: Vec<_> = prompts
        .iter()
        .cloned()
        .zip(samples.iter().map(|s| s.tokens.clone()))
        .collect();
    let scored = score_pairs(&model, &pairs, 0, 12, 1.0).unwrap();
    for (s, want) in samples.iter().zip(&scored) {
        for (x, y) in s.logprobs.iter().zip(want) {
            assert!((x - y).abs() < 1e-4, "sampled {x} scored {y}");
        }
    }
}

/// A batch wide enough (16 rows) for decoding to read packed copies of the weights
/// (`rlhf_lm::skinny::PackedScope`, on CPUs with AVX-512), on a model whose projections span
/// whole and partial 48-row panels: the sampled log-probs still equal teacher-forced scoring.
#[test]
fn wide_batches_sample_what_scoring_scores() {
    let c = LlamaConfig {
        vocab_size: 100,
        hidden_size: 64,
        intermediate_size: 112,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        ..tiny(Family::Llama, false)
    };
    let model = Llama::from_weights(&c, &weights(&c, 5), &Device::Cpu).unwrap();
    let prompts: Vec<Vec<u32>> = (0..16u32)
        .map(|i| (0..3 + i % 4).map(|j| 3 + (i * 11 + j * 5) % 90).collect())
        .collect();
    let params = SamplingParams {
        max_new_tokens: 10,
        temperature: 1.0,
        seed: 3,
        eos_token_ids: vec![2],
        ..Default::default()
    };
    let samples = generate(&model, &prompts, 0, &params, None).unwrap();
    let pairs: Vec<_> = prompts
        .iter()
        .cloned()
        .zip(samples.iter().map(|s| s.tokens.clone()))
        .collect();
    let scored = score_pairs(&model, &pairs, 0, 16, 1.0).unwrap();
    let mut compared = 0;
    for (s, want) in samples.iter().zip(&scored) {
        assert_eq!(s.logprobs.len(), want.len());
        for (x, y) in s.logprobs.iter().zip(want) {
            assert!((x - y).abs() < 1e-4, "sampled {x} scored {y}");
            compared += 1;
        }
    }
    assert!(compared >= 100, "only {compared} tokens sampled");
}

/// Rows of different lengths are scored packed several to a row (`TokenBatch::pack`): their
/// log-probs and the gradient of a loss over them equal those of scoring each row alone.
#[test]
fn packed_rows_score_as_each_row_alone() {
    let c = tiny(Family::Qwen2, false);
    let trainable = Trainable::new(&weights(&c, 11)).unwrap();
    let model = Llama::from_weights(&c, &trainable.tensors(), &Device::Cpu).unwrap();
    // Lengths 12, 5, 4, 9, 3, 6, 10: first fit, longest first, into rows of 12 makes five rows
    // ([12], [10], [9, 3], [6, 5], [4]), three of them with a padding tail.
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = vec![
        (vec![1, 5, 9, 13, 17], vec![7, 8, 30, 31, 32, 33, 2]),
        (vec![1, 40], vec![3, 4, 2]),
        (vec![1, 11, 12], vec![44]),
        (vec![1, 2, 3, 4], vec![5, 6, 7, 8, 9]),
        (vec![1, 7], vec![8]),
        (vec![1, 3, 5], vec![6, 7, 2]),
        (vec![1, 9, 9, 9], vec![10, 11, 12, 13, 14, 15]),
    ];
    let batch = CompletionBatch::new(&pairs, 0, &Device::Cpu).unwrap();
    let lengths = batch.tokens.right_padded_lengths().unwrap();
    assert_eq!(lengths, vec![12, 5, 4, 9, 3, 6, 10]);
    let packed = batch.tokens.pack(&lengths, &Device::Cpu).unwrap().unwrap();
    assert_eq!(packed.ids.dims(), &[5, 12]);
    assert_eq!(
        packed.place,
        vec![(0, 0), (3, 6), (4, 0), (2, 0), (2, 9), (3, 0), (1, 0)]
    );

    // A loss that weighs every completion token differently: w(row, k) = cos(0.3 (7 row + k)).
    let w = |row: usize, k: usize| (0.3 * (7 * row + k) as f32).cos();
    let loss_over = |lp: &Tensor, batch: &CompletionBatch, rows: &[usize]| -> Tensor {
        let (b, width) = lp.dims2().unwrap();
        let mut weights = vec![0f32; b * width];
        for (i, (span, &row)) in batch.spans.iter().zip(rows).enumerate() {
            for (k, j) in span.clone().enumerate() {
                weights[i * width + j] = w(row, k);
            }
        }
        let weights = Tensor::from_vec(weights, (b, width), &Device::Cpu).unwrap();
        (lp * weights).unwrap().sum_all().unwrap()
    };
    let lp = completion_logprobs(&model, &batch, 0.9).unwrap();
    let all_rows: Vec<usize> = (0..pairs.len()).collect();
    let grads = loss_over(&lp, &batch, &all_rows).backward().unwrap();
    let packed_rows = per_row(&lp, &batch).unwrap();

    // Each row alone (a batch of one has nothing to pack), gradients summed over the rows.
    let mut alone_grads: HashMap<String, Tensor> = HashMap::new();
    for (row, pair) in pairs.iter().enumerate() {
        let one = CompletionBatch::new(std::slice::from_ref(pair), 0, &Device::Cpu).unwrap();
        let lp1 = completion_logprobs(&model, &one, 0.9).unwrap();
        let expected = &per_row(&lp1, &one).unwrap()[0];
        assert_eq!(packed_rows[row].len(), expected.len());
        for (k, (a, e)) in packed_rows[row].iter().zip(expected).enumerate() {
            assert!(
                (a - e).abs() < 1e-5,
                "row {row}, token {k}: packed {a}, alone {e}"
            );
        }
        let g1 = loss_over(&lp1, &one, &[row]).backward().unwrap();
        for (name, var) in &trainable.vars {
            let g = g1.get(var.as_tensor()).unwrap().clone();
            let sum = match alone_grads.remove(name) {
                Some(acc) => (acc + g).unwrap(),
                None => g,
            };
            alone_grads.insert(name.clone(), sum);
        }
    }
    for (name, var) in &trainable.vars {
        let got = grads.get(var.as_tensor()).unwrap();
        let want = &alone_grads[name];
        let (err, scale) = max_diff(got, want);
        assert!(scale > 0.0, "`{name}`: zero gradient");
        assert!(
            err <= 1e-4 * scale,
            "`{name}`: packed vs alone {err} (scale {scale})"
        );
    }
}
