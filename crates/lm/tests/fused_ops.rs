//! Fused CPU ops with backward agree with the composed differentiable ops, forward and gradient.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use rlhf_lm::batch::TokenBatch;
use rlhf_lm::config::{Family, LlamaConfig};
use rlhf_lm::llama::{random_weights, Llama, Trainable};
use rlhf_lm::score::next_token_logprobs;

fn smollm2_config() -> LlamaConfig {
    LlamaConfig {
        family: Family::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        rope_scaling: None,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: Some(2),
    }
}

/// Forward + backward time of a SmolLM2-sized training step (batch 2 x 128), random weights.
/// `cargo test --release -p rlhf-lm --test fused_ops -- --ignored --nocapture bench_step`
#[test]
#[ignore]
fn bench_step() {
    let c = smollm2_config();
    let dev = Device::Cpu;
    let trainable = Trainable::new(&random_weights(&c, 1, 0.02, &dev).unwrap()).unwrap();
    let model = Llama::from_weights(&c, &trainable.tensors(), &dev).unwrap();
    let (b, t) = (2, 128);
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|r| {
            (0..t)
                .map(|i| ((r * 7919 + i * 104_729) % c.vocab_size) as u32)
                .collect()
        })
        .collect();
    let real = vec![vec![true; t]; b];
    let batch = TokenBatch::new(ids, real, &dev).unwrap();
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for i in 0..=iters {
        let t0 = Instant::now();
        let loss = next_token_logprobs(&model, &batch, 1.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let _ = loss.to_scalar::<f32>().unwrap();
        let t1 = Instant::now();
        let grads = loss.backward().unwrap();
        let g = grads.get(trainable.vars[0].1.as_tensor()).unwrap();
        let _ = g.sum_all().unwrap().to_scalar::<f32>().unwrap();
        let t2 = Instant::now();
        if i > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (f, bw) = (med(&mut fwd), med(&mut bwd));
    eprintln!(
        "bench_step b={b} t={t}: forward {f:.3}s  backward {bw:.3}s  total {:.3}s",
        f + bw
    );
}
