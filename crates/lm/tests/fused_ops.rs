//! The fused CPU ops (`rlhf_lm::fused`) compute the same values and the same gradients as the
//! composed differentiable ops they replace, and a whole model trained through them gets the same
//! gradients as the composed f64 path.

#[path = "support/compare.rs"]
mod compare;

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var, D};
use compare::max_diff;
use rlhf_lm::batch::TokenBatch;
use rlhf_lm::config::LlamaConfig;
use rlhf_lm::llama::{random_weights, Llama, Trainable};
use rlhf_lm::score::{completion_logprobs, gather_logprobs, next_token_logprobs, CompletionBatch};
use rlhf_lm::{fused, ops};

/// Deterministic uniform values in [lo, hi) (splitmix64), independent of candle's RNG.
fn uniform(shape: &[usize], seed: u64, lo: f32, hi: f32) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

/// Values agree to `tol` in absolute terms (forward outputs of order one).
fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let (diff, _) = max_diff(a, b);
    assert!(diff <= tol, "{what}: max |diff| {diff} > {tol}");
}

/// Gradients agree to `tol` relative to the reference's largest entry (they are sums of many terms).
fn assert_grad_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let (diff, scale) = max_diff(a, b);
    assert!(
        diff <= tol * scale.max(1.0),
        "{what}: max |diff| {diff} > {tol} x {scale}"
    );
    assert!(scale > 0.0, "{what}: reference gradient is all zeros");
}

/// Σ y · upstream: a scalar whose gradient into y is `upstream`.
fn weighted_sum(y: &Tensor, upstream: &Tensor) -> Tensor {
    (y * upstream).unwrap().sum_all().unwrap()
}

#[test]
fn rms_norm_matches_composed() {
    // Hidden sizes that are and are not multiples of the kernels' vector width; small cases that
    // run inline, a SmolLM2-sized step, and a large one that runs in parallel blocks.
    for (seed, shape) in [
        (1u64, vec![2usize, 5, 37]),
        (2, vec![3, 8]),
        (3, vec![2, 128, 576]),
        (4, vec![4, 512, 576]),
    ] {
        let h = *shape.last().unwrap();
        let x = var(&uniform(&shape, seed, -2.0, 2.0));
        let w = var(&uniform(&[h], seed + 100, 0.5, 1.5));
        let up = uniform(&shape, seed + 200, -1.0, 1.0);
        let fused_y = fused::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let dispatched = ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        let composed_y = ops::rms_norm_composed(x.as_tensor(), w.as_tensor(), 1e-5).unwrap();
        assert_close("rms_norm forward", &fused_y, &composed_y, 1e-5);
        assert_close("ops::rms_norm forward", &dispatched, &composed_y, 1e-5);
        let gf = weighted_sum(&fused_y, &up).backward().unwrap();
        let gc = weighted_sum(&composed_y, &up).backward().unwrap();
        for (name, v) in [("dx", &x), ("dweight", &w)] {
            let a = gf.get(v.as_tensor()).unwrap();
            let b = gc.get(v.as_tensor()).unwrap();
            assert_grad_close(&format!("rms_norm {name} {shape:?}"), a, b, 1e-5);
        }
    }
}

#[test]
fn rms_norm_gradient_reaches_upstream_graph() {
    // x is an intermediate (not a leaf): the gradient must flow through the op to the Var behind it.
    let a = var(&uniform(&[4, 16], 5, -1.0, 1.0));
    let w = var(&uniform(&[16], 6, 0.5, 1.5));
    let x = (a.as_tensor() * 3.0).unwrap().exp().unwrap();
    let yf = fused::rms_norm(&x, w.as_tensor(), 1e-6)
        .unwrap()
        .sum_all()
        .unwrap();
    let yc = ops::rms_norm_composed(&x, w.as_tensor(), 1e-6)
        .unwrap()
        .sum_all()
        .unwrap();
    let (gf, gc) = (yf.backward().unwrap(), yc.backward().unwrap());
    assert_grad_close(
        "rms_norm upstream",
        gf.get(a.as_tensor()).unwrap(),
        gc.get(a.as_tensor()).unwrap(),
        1e-5,
    );
}

#[test]
fn softmax_matches_composed() {
    for (seed, shape) in [
        (11u64, vec![2usize, 3, 7, 13]),
        (12, vec![5, 8]),
        (13, vec![2, 9, 128, 128]),
        (14, vec![2, 9, 256, 256]),
    ] {
        // Scores with a causal-style mask, including a fully masked row (uniform, not NaN).
        let v = *shape.last().unwrap();
        let rows: usize = shape.iter().product::<usize>() / v;
        let mut mask = vec![0f32; rows * v];
        for r in 0..rows {
            for j in 0..v {
                if j > r % v || r == 1 {
                    mask[r * v + j] = -1e9;
                }
            }
        }
        let mask = Tensor::from_vec(mask, shape.as_slice(), &Device::Cpu).unwrap();
        let s = var(&uniform(&shape, seed, -4.0, 4.0));
        let x = (s.as_tensor() + mask).unwrap();
        let up = uniform(&shape, seed + 1, -1.0, 1.0);
        let yf = fused::softmax_last_dim(&x).unwrap();
        let yd = ops::softmax_last_dim(&x).unwrap();
        let yc = ops::softmax_composed(&x).unwrap();
        assert_close("softmax forward", &yf, &yc, 1e-5);
        assert_close("ops::softmax_last_dim forward", &yd, &yc, 1e-5);
        let gf = weighted_sum(&yf, &up).backward().unwrap();
        let gc = weighted_sum(&yc, &up).backward().unwrap();
        let (a, b) = (
            gf.get(s.as_tensor()).unwrap(),
            gc.get(s.as_tensor()).unwrap(),
        );
        assert_grad_close(&format!("softmax dx {shape:?}"), a, b, 1e-5);
    }
}

/// The composed reference: log_softmax(logits / T) gathered at the targets.
fn logprobs_composed(logits: &Tensor, targets: &Tensor, temperature: f64) -> Tensor {
    let logp = candle_nn::ops::log_softmax(&(logits / temperature).unwrap(), D::Minus1).unwrap();
    logp.gather(&targets.unsqueeze(D::Minus1).unwrap(), D::Minus1)
        .unwrap()
        .squeeze(D::Minus1)
        .unwrap()
}

fn targets(n: usize, v: usize, seed: u64) -> Tensor {
    let t: Vec<u32> = (0..n)
        .map(|i| ((i as u64 * 2_654_435_761 + seed * 97) % v as u64) as u32)
        .collect();
    Tensor::from_vec(t, n, &Device::Cpu).unwrap()
}

#[test]
fn token_logprobs_match_composed() {
    for (seed, n, v, temperature) in [
        (21u64, 6usize, 50usize, 1.0f64),
        (22, 9, 37, 0.7),
        (23, 8, 49_152, 1.0),
        (25, 40, 49_152, 0.9),
        (24, 64, 4_099, 1.3),
    ] {
        let logits = var(&uniform(&[n, v], seed, -8.0, 8.0));
        let t = targets(n, v, seed);
        // Upstream gradient with zeros (masked positions) and signs of both kinds.
        let mut up = uniform(&[n], seed + 1, -1.0, 1.0).to_vec1::<f32>().unwrap();
        up[0] = 0.0;
        let up = Tensor::from_vec(up, n, &Device::Cpu).unwrap();
        let yf = fused::token_logprobs(logits.as_tensor(), &t, temperature).unwrap();
        let yc = logprobs_composed(logits.as_tensor(), &t, temperature);
        assert_close(
            "token_logprobs forward",
            &yf,
            &yc,
            1e-5 * (v as f32).ln().max(1.0),
        );
        // Against an f64 reference: the vocabulary-sized sum must not lose precision in f32.
        let l64 = logits.as_tensor().to_dtype(DType::F64).unwrap();
        let y64 = logprobs_composed(&l64, &t, temperature);
        assert_close("token_logprobs vs f64", &yf, &y64, 4e-6);
        let gf = weighted_sum(&yf, &up).backward().unwrap();
        let gc = weighted_sum(&yc, &up).backward().unwrap();
        let (a, b) = (
            gf.get(logits.as_tensor()).unwrap(),
            gc.get(logits.as_tensor()).unwrap(),
        );
        assert_grad_close(
            &format!("token_logprobs dlogits n={n} v={v} T={temperature}"),
            a,
            b,
            1e-5,
        );
    }
}

#[test]
fn gather_logprobs_matches_composed_and_f64() {
    let (b, t, v) = (2, 5, 300);
    let logits = var(&uniform(&[b, t, v], 31, -6.0, 6.0));
    let tg = targets(b * t, v, 31).reshape((b, t)).unwrap();
    let up = uniform(&[b, t], 32, -1.0, 1.0);
    for temperature in [1.0, 0.9] {
        let yf = gather_logprobs(logits.as_tensor(), &tg, temperature).unwrap();
        assert_eq!(yf.dims(), [b, t]);
        let yc = logprobs_composed(logits.as_tensor(), &tg, temperature);
        assert_close("gather_logprobs forward", &yf, &yc, 1e-5);
        // f64 takes the composed path and agrees too.
        let y64 = gather_logprobs(
            &logits.as_tensor().to_dtype(DType::F64).unwrap(),
            &tg,
            temperature,
        )
        .unwrap();
        assert_eq!(y64.dtype(), DType::F64);
        assert_close("gather_logprobs f64", &yf, &y64, 1e-5);
        let gf = weighted_sum(&yf, &up).backward().unwrap();
        let gc = weighted_sum(&yc, &up).backward().unwrap();
        let (a, bb) = (
            gf.get(logits.as_tensor()).unwrap(),
            gc.get(logits.as_tensor()).unwrap(),
        );
        assert_grad_close("gather_logprobs dlogits", a, bb, 1e-5);
    }
    // Non-contiguous targets (as score.rs passes them: a narrowed view) work.
    let ids = Tensor::from_vec(
        (0..(b * (t + 1)) as u32).collect::<Vec<_>>(),
        (b, t + 1),
        &Device::Cpu,
    )
    .unwrap();
    let view = ids.narrow(1, 1, t).unwrap();
    let yf = gather_logprobs(logits.as_tensor(), &view, 1.0).unwrap();
    let yc = logprobs_composed(logits.as_tensor(), &view.contiguous().unwrap(), 1.0);
    assert_close("gather_logprobs strided targets", &yf, &yc, 1e-5);
}

#[test]
fn token_logprobs_rejects_bad_input() {
    let logits = uniform(&[3, 10], 41, -1.0, 1.0);
    let bad = Tensor::from_vec(vec![1u32, 10, 2], 3, &Device::Cpu).unwrap();
    assert!(fused::token_logprobs(&logits, &bad, 1.0).is_err());
    let ok = Tensor::from_vec(vec![1u32, 9, 2], 3, &Device::Cpu).unwrap();
    assert!(fused::token_logprobs(&logits, &ok, 0.0).is_err());
    assert!(fused::token_logprobs(&logits, &ok.narrow(0, 0, 2).unwrap(), 1.0).is_err());
}

#[test]
fn rope_matches_composed() {
    for (seed, (b, h, t, d)) in [
        (51u64, (2usize, 3usize, 5usize, 8usize)),
        (52, (1, 2, 4, 6)),
        (53, (2, 9, 128, 64)),
        (54, (4, 16, 256, 64)),
    ] {
        let half = d / 2;
        let angles = uniform(&[b, t, half], seed, -3.0, 3.0);
        let cos = var(&angles.cos().unwrap());
        let sin = var(&angles.sin().unwrap());
        // x as the model passes it: a transposed (non-contiguous) view of (b, t, h, d).
        let base = var(&uniform(&[b, t, h, d], seed + 1, -2.0, 2.0));
        let x = base.as_tensor().transpose(1, 2).unwrap();
        let up = uniform(&[b, h, t, d], seed + 2, -1.0, 1.0);
        let yf = fused::rope(&x, cos.as_tensor(), sin.as_tensor()).unwrap();
        let yd = ops::rope(&x, cos.as_tensor(), sin.as_tensor()).unwrap();
        let yc = ops::rope_composed(&x, cos.as_tensor(), sin.as_tensor()).unwrap();
        assert_close("rope forward", &yf, &yc, 1e-5);
        // The same rotation on the (b, t, h, d) layout itself.
        let yt =
            fused::rope_time_first(base.as_tensor(), cos.as_tensor(), sin.as_tensor()).unwrap();
        assert_close(
            "rope time-first forward",
            &yt.transpose(1, 2).unwrap(),
            &yc,
            1e-5,
        );
        let gt = weighted_sum(&yt, &up.transpose(1, 2).unwrap())
            .backward()
            .unwrap();
        assert_close("ops::rope forward", &yd, &yc, 1e-5);
        let gf = weighted_sum(&yf, &up).backward().unwrap();
        let gc = weighted_sum(&yc, &up).backward().unwrap();
        for (name, v) in [("dx", &base), ("dcos", &cos), ("dsin", &sin)] {
            let (a, bb) = (
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
            );
            assert_grad_close(&format!("rope {name} {:?}", (b, h, t, d)), a, bb, 1e-5);
            let at = gt.get(v.as_tensor()).unwrap();
            assert_grad_close(
                &format!("rope time-first {name} {:?}", (b, h, t, d)),
                at,
                bb,
                1e-5,
            );
        }
    }
}

fn tiny_config() -> LlamaConfig {
    let json = r#"{
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 40,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0
    }"#;
    LlamaConfig::from_json_str(json, std::path::Path::new("tiny.json")).unwrap()
}

/// A whole model trained through the fused f32 ops gets the gradients of the composed f64 path
/// (which `tests/model.rs` checks against finite differences).
#[test]
fn model_gradients_match_composed_f64() {
    let c = tiny_config();
    let mut w = random_weights(&c, 9, 0.3, &Device::Cpu).unwrap();
    for (i, (name, t)) in w.iter_mut().enumerate() {
        let centre = if name.ends_with(".bias") {
            0.0
        } else if name.ends_with("norm.weight") {
            1.0
        } else {
            continue;
        };
        *t = (uniform(t.dims(), 1000 + i as u64, -0.3, 0.3) + centre).unwrap();
    }
    let pairs = vec![
        (vec![1u32, 5, 9, 13], vec![7u32, 8, 30, 2]),
        (vec![1, 40], vec![3, 3, 4, 5, 6, 2]),
    ];
    let batch = CompletionBatch::new(&pairs, 0, &Device::Cpu).unwrap();
    let grads_of = |w: &HashMap<String, Tensor>| {
        let trainable = Trainable::new(w).unwrap();
        let model = Llama::from_weights(&c, &trainable.tensors(), &Device::Cpu).unwrap();
        let lp = completion_logprobs(&model, &batch, 0.9).unwrap();
        let weights = uniform(lp.dims(), 77, -1.0, 1.0)
            .to_dtype(lp.dtype())
            .unwrap();
        let grads = (lp * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        trainable
            .vars
            .iter()
            .map(|(n, v)| {
                (
                    n.clone(),
                    grads
                        .get(v.as_tensor())
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap(),
                )
            })
            .collect::<HashMap<_, _>>()
    };
    let g32 = grads_of(&w);
    let w64 = w
        .iter()
        .map(|(n, t)| (n.clone(), t.to_dtype(DType::F64).unwrap()))
        .collect();
    let g64 = grads_of(&w64);
    for (name, g) in &g32 {
        assert_grad_close(&format!("model {name}"), g, &g64[name], 1e-4);
    }
}

fn smollm2_config() -> LlamaConfig {
    let json = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2
    }"#;
    LlamaConfig::from_json_str(json, std::path::Path::new("smollm2.json")).unwrap()
}

/// CPU seconds used by this process so far (all threads), from /proc (Linux); 0 elsewhere.
/// On a loaded machine wall time is noise; CPU time of a single-threaded run is not.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').map_or(0, |p| p + 2)..];
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0 // clock ticks (USER_HZ = 100)
}

/// Forward + backward time of a SmolLM2-sized training step (batch 2 x 128), random weights:
/// median wall seconds and median process CPU seconds per step.
/// `cargo test --release -p rlhf-lm --test fused_ops -- --ignored --nocapture bench_step`
/// (`BENCH_ITERS=n` steps after one warm-up; `RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1` for a
/// single-threaded run).
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
    let batch = TokenBatch::new(ids, vec![vec![true; t]; b], &dev).unwrap();
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let (mut fwd, mut bwd, mut cpu_f, mut cpu_b) = (vec![], vec![], vec![], vec![]);
    for i in 0..=iters {
        let (t0, c0) = (Instant::now(), process_cpu_seconds());
        let lp = next_token_logprobs(&model, &batch, 1.0).unwrap();
        let loss = lp.sum_all().unwrap().neg().unwrap();
        let _ = loss.to_scalar::<f32>().unwrap();
        let (t1, c1) = (Instant::now(), process_cpu_seconds());
        let grads = loss.backward().unwrap();
        let g = grads.get(trainable.vars[0].1.as_tensor()).unwrap();
        let _ = g.sum_all().unwrap().to_scalar::<f32>().unwrap();
        drop(grads);
        let (t2, c2) = (Instant::now(), process_cpu_seconds());
        if i > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            cpu_f.push(c1 - c0);
            cpu_b.push(c2 - c1);
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (f, bw, cf, cb) = (med(fwd), med(bwd), med(cpu_f), med(cpu_b));
    eprintln!(
        "bench_step b={b} t={t}: wall forward {f:.3}s backward {bw:.3}s total {:.3}s | \
         cpu forward {cf:.2}s backward {cb:.2}s total {:.2}s",
        f + bw,
        cf + cb
    );
}

/// The composed attention the fused op replaces: repeat K/V per query head, scores, mask, softmax,
/// weighted values; returned in the fused op's (b, t, nh·d) layout.
fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
    let (b, nh, t, d) = q.dims4().unwrap();
    let n_rep = nh / k.dim(1).unwrap();
    let k = ops::repeat_kv(k, n_rep).unwrap().contiguous().unwrap();
    let v = ops::repeat_kv(v, n_rep).unwrap().contiguous().unwrap();
    let scores = (q.contiguous().unwrap().matmul(&k.t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&mask.to_dtype(q.dtype()).unwrap())
        .unwrap();
    let probs = ops::softmax_composed(&scores).unwrap();
    probs
        .matmul(&v)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, t, nh * d))
        .unwrap()
}

/// The fused attention op against the composed ops (f64, so the reference is exact to f32 noise),
/// values and gradients for q, k, v: grouped-query and plain heads, right- and left-padded rows
/// (a padding query attends to nothing and gets a uniform row, as in the composed path), q given as
/// the transposed view the model passes, and a key length longer than the query length.
#[test]
fn attention_matches_composed() {
    use rlhf_lm::attention::{attention, AttentionMask};
    let cases: [(u64, usize, usize, usize, usize, usize, bool); 4] = [
        // seed, b, nh, nkv, t, d, left-padded
        (61, 2, 6, 2, 7, 8, false),
        (62, 3, 4, 4, 5, 4, true),
        (63, 2, 9, 3, 33, 16, false),
        (64, 1, 2, 1, 64, 64, true),
    ];
    for (seed, b, nh, nkv, t, d, left) in cases {
        // Row r has t - 2r real tokens (at least 1).
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                (0..(t - (2 * r).min(t - 1)))
                    .map(|j| j as u32 + 3)
                    .collect()
            })
            .collect();
        let batch = if left {
            TokenBatch::left_padded(&rows, 0, &Device::Cpu).unwrap()
        } else {
            TokenBatch::right_padded(&rows, 0, &Device::Cpu).unwrap()
        };
        let scale = 1.0 / (d as f64).sqrt();
        let qb = var(&uniform(&[b, t, nh, d], seed, -2.0, 2.0));
        // The fused op reads (b, t, heads, d); the composed path the (b, heads, t, d) views.
        let k = var(&uniform(&[b, t, nkv, d], seed + 1, -2.0, 2.0));
        let v = var(&uniform(&[b, t, nkv, d], seed + 2, -2.0, 2.0));
        let tr = |x: &Tensor| x.transpose(1, 2).unwrap();
        let q = qb.as_tensor().clone();
        // A padding query attends to nothing: in f32 its scores (all ≈ -1e9) give a uniform row in
        // both paths, in f64 they do not; compare real query rows only (weight 0 elsewhere).
        let real: Vec<f32> = batch
            .real
            .iter()
            .flat_map(|r| r.iter().map(|&x| if x { 1.0 } else { 0.0 }))
            .collect();
        let real = Tensor::from_vec(real, (b, t, 1), &Device::Cpu).unwrap();
        let up = uniform(&[b, t, nh * d], seed + 3, -1.0, 1.0)
            .broadcast_mul(&real)
            .unwrap();
        let mask = AttentionMask::from_tensor(&batch.mask, b, t, t).unwrap();
        let yf = attention(&q, k.as_tensor(), v.as_tensor(), mask, scale).unwrap();
        let f64v = |x: &Tensor| var(&x.to_dtype(DType::F64).unwrap());
        let (qb64, k64, v64) = (
            f64v(qb.as_tensor()),
            f64v(k.as_tensor()),
            f64v(v.as_tensor()),
        );
        let yc = attention_composed(
            &tr(qb64.as_tensor()),
            &tr(k64.as_tensor()),
            &tr(v64.as_tensor()),
            &batch.mask,
            scale,
        );
        let real64 = real.to_dtype(DType::F64).unwrap();
        assert_close(
            &format!("attention forward {seed}"),
            &yf.broadcast_mul(&real).unwrap(),
            &yc.broadcast_mul(&real64).unwrap(),
            2e-5,
        );
        // All rows, padding queries included, against the composed f32 path.
        let yc32 = attention_composed(
            &tr(&q),
            &tr(k.as_tensor()),
            &tr(v.as_tensor()),
            &batch.mask,
            scale,
        );
        assert_close(&format!("attention forward f32 {seed}"), &yf, &yc32, 2e-5);
        let gf = weighted_sum(&yf, &up).backward().unwrap();
        let gc = weighted_sum(&yc, &up.to_dtype(DType::F64).unwrap())
            .backward()
            .unwrap();
        for (name, a, c) in [("dq", &qb, &qb64), ("dk", &k, &k64), ("dv", &v, &v64)] {
            assert_grad_close(
                &format!("attention {name} {seed}"),
                gf.get(a.as_tensor()).unwrap(),
                gc.get(c.as_tensor()).unwrap(),
                2e-5,
            );
        }
    }
    // Keys longer than queries (s > t), one mask for the whole batch.
    let (b, nh, nkv, t, s, d) = (2, 4, 2, 3, 6, 8);
    let mut m = vec![0f32; t * s];
    for i in 0..t {
        for j in 0..s {
            if j > i + (s - t) {
                m[i * s + j] = rlhf_lm::llama::MASKED;
            }
        }
    }
    let mask_t = Tensor::from_vec(m, (1, 1, t, s), &Device::Cpu).unwrap();
    let q = var(&uniform(&[b, t, nh, d], 71, -1.0, 1.0));
    let k = var(&uniform(&[b, s, nkv, d], 72, -1.0, 1.0));
    let v = var(&uniform(&[b, s, nkv, d], 73, -1.0, 1.0));
    let mask = AttentionMask::from_tensor(&mask_t, b, t, s).unwrap();
    let yf = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask, 0.3).unwrap();
    let tr = |x: &Var| x.as_tensor().transpose(1, 2).unwrap();
    let yc = attention_composed(&tr(&q), &tr(&k), &tr(&v), &mask_t, 0.3);
    assert_close("attention forward s > t", &yf, &yc, 1e-5);
    let up = uniform(&[b, t, nh * d], 74, -1.0, 1.0);
    let gf = weighted_sum(&yf, &up).backward().unwrap();
    let gc = weighted_sum(&yc, &up).backward().unwrap();
    for (name, x) in [("dq", &q), ("dk", &k), ("dv", &v)] {
        assert_grad_close(
            &format!("attention {name} s > t"),
            gf.get(x.as_tensor()).unwrap(),
            gc.get(x.as_tensor()).unwrap(),
            1e-5,
        );
    }
}

/// Central finite differences of Σ up·attention(q, k, v) in a few coordinates of q, k and v agree
/// with the fused backward (f32, step 1e-2, so the bound is loose but independent of any other
/// implementation).
#[test]
fn attention_gradient_matches_finite_differences() {
    use rlhf_lm::attention::{attention, AttentionMask};
    let (b, nh, nkv, t, d) = (1, 2, 1, 4, 4);
    let batch = TokenBatch::right_padded(&[vec![3u32, 4, 5, 6]], 0, &Device::Cpu).unwrap();
    let mask = AttentionMask::from_tensor(&batch.mask, b, t, t).unwrap();
    let up = uniform(&[b, t, nh * d], 81, -1.0, 1.0);
    let base = [
        uniform(&[b, t, nh, d], 82, -1.0, 1.0),
        uniform(&[b, t, nkv, d], 83, -1.0, 1.0),
        uniform(&[b, t, nkv, d], 84, -1.0, 1.0),
    ];
    let loss = |xs: &[Tensor]| -> f64 {
        let y = attention(&xs[0], &xs[1], &xs[2], mask.clone(), 0.5).unwrap();
        weighted_sum(&y, &up).to_scalar::<f32>().unwrap() as f64
    };
    let vars: Vec<Var> = base.iter().map(var).collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = attention(&tensors[0], &tensors[1], &tensors[2], mask.clone(), 0.5).unwrap();
    let grads = weighted_sum(&y, &up).backward().unwrap();
    let eps = 1e-2f32;
    for (which, v) in vars.iter().enumerate() {
        let analytic = grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let flat = base[which].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for idx in [0, 5, flat.len() - 1] {
            let shifted = |delta: f32| {
                let mut f = flat.clone();
                f[idx] += delta;
                let mut xs = base.to_vec();
                xs[which] = Tensor::from_vec(f, base[which].dims(), &Device::Cpu).unwrap();
                loss(&xs)
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            assert!(
                (numeric - analytic[idx] as f64).abs() <= 2e-3 + 2e-3 * numeric.abs(),
                "input {which} index {idx}: finite difference {numeric} vs backward {}",
                analytic[idx]
            );
        }
    }
}

#[test]
fn swiglu_matches_composed() {
    for (seed, shape) in [(91u64, vec![3usize, 5]), (92, vec![2, 64, 1536])] {
        let a = var(&uniform(&shape, seed, -6.0, 6.0));
        let u = var(&uniform(&shape, seed + 1, -2.0, 2.0));
        let up = uniform(&shape, seed + 2, -1.0, 1.0);
        let yf = fused::swiglu(a.as_tensor(), u.as_tensor()).unwrap();
        let yc = ops::swiglu_composed(a.as_tensor(), u.as_tensor()).unwrap();
        assert_close("swiglu forward", &yf, &yc, 1e-5);
        let gf = weighted_sum(&yf, &up).backward().unwrap();
        let gc = weighted_sum(&yc, &up).backward().unwrap();
        for (name, x) in [("d gate", &a), ("d up", &u)] {
            assert_grad_close(
                &format!("swiglu {name} {shape:?}"),
                gf.get(x.as_tensor()).unwrap(),
                gc.get(x.as_tensor()).unwrap(),
                1e-5,
            );
        }
    }
    // Hand-computed: silu(1)·2 = 2σ(1) = 1.4621172; d gate = 2σ(1)(1 + 1 − σ(1)) = 1.7864...,
    // d up = σ(1) = 0.7310586.
    let a = var(&Tensor::new(&[1f32], &Device::Cpu).unwrap());
    let u = var(&Tensor::new(&[2f32], &Device::Cpu).unwrap());
    let y = fused::swiglu(a.as_tensor(), u.as_tensor()).unwrap();
    assert!((y.to_vec1::<f32>().unwrap()[0] - 1.462_117_2).abs() < 1e-6);
    let g = y.sum_all().unwrap().backward().unwrap();
    let s = 1.0 / (1.0 + (-1f32).exp());
    let da = g.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
    let du = g.get(u.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((da - 2.0 * s * (2.0 - s)).abs() < 1e-6, "d gate {da}");
    assert!((du - 0.731_058_6).abs() < 1e-6, "d up {du}");
}

/// Log-probs computed only at the masked-in targets equal the full computation times the mask,
/// in value and in every parameter's gradient.
#[test]
fn masked_logprobs_match_full_times_mask() {
    let c = tiny_config();
    let w = random_weights(&c, 21, 0.3, &Device::Cpu).unwrap();
    let pairs = vec![
        (vec![1u32, 5, 9, 13], vec![7u32, 8, 30, 2]),
        (vec![1, 40], vec![3, 3, 4, 5, 6, 2]),
    ];
    let batch = CompletionBatch::new(&pairs, 0, &Device::Cpu).unwrap();
    let trainable = Trainable::new(&w).unwrap();
    let model = Llama::from_weights(&c, &trainable.tensors(), &Device::Cpu).unwrap();
    let masked = completion_logprobs(&model, &batch, 0.8).unwrap();
    let full = next_token_logprobs(&model, &batch.tokens, 0.8)
        .unwrap()
        .broadcast_mul(&batch.completion_mask)
        .unwrap();
    assert_close("masked log-probs", &masked, &full, 1e-6);
    // Row 0's completion targets are indices 3..7, row 1's 1..7; nothing else is nonzero.
    let rows = masked.to_vec2::<f32>().unwrap();
    assert!(rows[0][..3].iter().all(|&x| x == 0.0) && rows[0][3..].iter().all(|&x| x < 0.0));
    assert!(rows[1][0] == 0.0 && rows[1][1..].iter().all(|&x| x < 0.0));
    let weights = uniform(masked.dims(), 5, -1.0, 1.0);
    let gm = weighted_sum(&masked, &weights).backward().unwrap();
    let gfull = weighted_sum(&full, &weights).backward().unwrap();
    for (name, v) in &trainable.vars {
        assert_grad_close(
            &format!("masked {name}"),
            gm.get(v.as_tensor()).unwrap(),
            gfull.get(v.as_tensor()).unwrap(),
            1e-5,
        );
    }
}

/// Gradient checkpointing recomputes each layer in the backward pass: the loss and every
/// parameter's gradient equal the plain path's; a plain `Tensor::backward` is refused with a message
/// instead of silently dropping the layers' gradients.
#[test]
fn gradient_checkpointing_matches_plain_backward() {
    let c = tiny_config();
    let w = random_weights(&c, 31, 0.3, &Device::Cpu).unwrap();
    let pairs = vec![
        (vec![1u32, 5, 9, 13], vec![7u32, 8, 30, 2]),
        (vec![1, 40], vec![3, 3, 4, 5, 6, 2]),
    ];
    let batch = CompletionBatch::new(&pairs, 0, &Device::Cpu).unwrap();
    let trainable = Trainable::new(&w).unwrap();
    let weights = uniform(batch.completion_mask.dims(), 6, -1.0, 1.0);
    let loss_of = |checkpoint: bool| {
        let model = Llama::from_weights(&c, &trainable.tensors(), &Device::Cpu)
            .unwrap()
            .with_gradient_checkpointing(checkpoint);
        let lp = completion_logprobs(&model, &batch, 1.0).unwrap();
        weighted_sum(&lp, &weights)
    };
    let (plain, ckpt) = (loss_of(false), loss_of(true));
    assert_eq!(
        plain.to_scalar::<f32>().unwrap(),
        ckpt.to_scalar::<f32>().unwrap()
    );
    let Err(err) = ckpt.backward() else {
        panic!("plain backward must be refused")
    };
    assert!(
        err.to_string().contains("rlhf_lm::llama::backward"),
        "{err}"
    );
    let gp = rlhf_lm::llama::backward(&plain).unwrap();
    let gc = rlhf_lm::llama::backward(&ckpt).unwrap();
    for (name, v) in &trainable.vars {
        let (a, b) = (gc.get(v.as_tensor()), gp.get(v.as_tensor()));
        let (a, b) = (
            a.unwrap_or_else(|| panic!("{name}: no gradient with checkpointing")),
            b.unwrap(),
        );
        assert_grad_close(&format!("checkpointed {name}"), a, b, 1e-6);
    }
}

/// The fused linear op against candle's `Linear` (values, dx, dW), on a 3-d input as the model
/// passes it and on the LM head's shape; with a frozen weight only dx is produced.
#[test]
fn linear_matches_candle() {
    use candle_core::Module;
    for (seed, (b, t, k, n)) in [
        (101u64, (2usize, 3usize, 5usize, 4usize)),
        (102, (2, 64, 576, 1536)),
    ] {
        let x = var(&uniform(&[b, t, k], seed, -1.0, 1.0));
        let w = var(&uniform(&[n, k], seed + 1, -0.5, 0.5));
        let up = uniform(&[b, t, n], seed + 2, -1.0, 1.0);
        let yf = fused::linear(x.as_tensor(), w.as_tensor()).unwrap();
        let yc = candle_nn::Linear::new(w.as_tensor().clone(), None)
            .forward(x.as_tensor())
            .unwrap();
        assert_close("linear forward", &yf, &yc, 1e-4);
        let gf = weighted_sum(&yf, &up).backward().unwrap();
        let gc = weighted_sum(&yc, &up).backward().unwrap();
        for (name, v) in [("dx", &x), ("dW", &w)] {
            assert_grad_close(
                &format!("linear {name} {:?}", (b, t, k, n)),
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
                1e-5,
            );
        }
    }
    // Hand-computed: x = [1, 2], W = [[3, 4], [5, 6]] -> y = [11, 17]; with Σy: dx = [8, 10].
    let x = var(&Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap());
    let w = Tensor::new(&[[3f32, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
    let y = fused::linear(x.as_tensor(), &w).unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![11.0, 17.0]]);
    let g = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(
        g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap(),
        vec![vec![8.0, 10.0]]
    );
    assert!(g.get(&w).is_none());
}
