//! SFT and reward-model losses against hand-computed values, and determinism of whole runs.

mod common;
use common::{curves_texts, metrics, scratch, sft_config, sft_data_and_init, tiny_lm};

use candle_core::{Device, Tensor};
use rlhf_methods::rm::pair_loss;
use rlhf_methods::sft;
use rlhf_rl::losses::neg_log_sigmoid;
use rlhf_rl::objectives::nll_sum;
use rlhf_rl::pairs::PairIds;
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::reward::{add_head, RewardModel};

/// With every weight zero the logits are zero, so each completion token costs exactly ln(V);
/// prompt tokens and padding cost nothing.
#[test]
fn sft_loss_is_masked_nll() {
    let lm = tiny_lm(0);
    for (_, var) in &lm.params.vars {
        var.set(&var.zeros_like().unwrap()).unwrap();
    }
    let rows = vec![
        (vec![1u32, 10, 11, 12, 13, 14], vec![20u32, 2]),
        (vec![1, 30], vec![31, 32, 33, 2]),
    ];
    let nll = nll_sum(&lm, &rows, &Device::Cpu)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let v = lm.config.vocab_size as f64;
    assert!(
        (nll - 6.0 * v.ln()).abs() < 1e-4,
        "{nll} vs {}",
        6.0 * v.ln()
    );
}

/// The masked NLL equals minus the sum of the scored completion log-probs, row by row.
#[test]
fn sft_loss_equals_scored_logprobs() {
    let lm = tiny_lm(0);
    let rows = vec![
        (vec![1u32, 10, 11], vec![20u32, 21, 2]),
        (vec![1, 30, 31, 32, 33], vec![40, 2]),
    ];
    let nll = nll_sum(&lm, &rows, &Device::Cpu)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let frozen = lm.model(&Device::Cpu).unwrap().detached();
    let scored: f64 = rlhf_lm::score::score_pairs(&frozen, &rows, 0, 1, 1.0)
        .unwrap()
        .iter()
        .flatten()
        .map(|&x| x as f64)
        .sum();
    assert!((nll + scored).abs() < 1e-4, "{nll} vs {}", -scored);
}

#[test]
fn bradley_terry_loss_with_margin_by_hand() {
    // diff = r_c - r_r - m = [1.0 - 0.2 - 0.5, -0.5 - 0.5 - 0.0] = [0.3, -1.0]
    // -log sigmoid(0.3) = ln(1 + e^-0.3) = 0.554355244; -log sigmoid(-1) = ln(1 + e) = 1.313261687
    let diff = Tensor::new(&[0.3f32, -1.0], &Device::Cpu).unwrap();
    let l = neg_log_sigmoid(&diff).unwrap().to_vec1::<f32>().unwrap();
    assert!(
        (l[0] - 0.554_355_24).abs() < 1e-6 && (l[1] - 1.313_261_7).abs() < 1e-6,
        "{l:?}"
    );
    // Stable far out in both tails.
    let far = neg_log_sigmoid(&Tensor::new(&[80f32, -80.0], &Device::Cpu).unwrap())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        far[0] >= 0.0 && far[0] < 1e-30 && (far[1] - 80.0).abs() < 1e-4,
        "{far:?}"
    );
}

/// The batched pair loss equals the hand formula applied to the reward model's own scores.
#[test]
fn pair_loss_matches_scores() {
    let lm = tiny_lm(0);
    let mut w = lm.snapshot().unwrap();
    add_head(&mut w, lm.config.hidden_size, 5, &Device::Cpu).unwrap();
    let lm = TrainableLm {
        params: rlhf_lm::llama::Trainable::new(&w).unwrap(),
        ..lm
    };
    let pairs = vec![
        PairIds {
            prompt: vec![1, 10, 11],
            chosen: vec![20, 21, 2],
            rejected: vec![22, 2],
            margin: 1.0,
        },
        PairIds {
            prompt: vec![1, 30],
            chosen: vec![31, 2],
            rejected: vec![32, 33, 34, 2],
            margin: 0.0,
        },
    ];
    let out = pair_loss(&lm, &pairs, 0.5, 0.0, &Device::Cpu).unwrap();
    let rm = RewardModel::from_trainable(&lm, None, &Device::Cpu).unwrap();
    let c = rm
        .score_raw(
            &pairs
                .iter()
                .map(|p| (p.prompt.clone(), p.chosen.clone()))
                .collect::<Vec<_>>(),
            4,
        )
        .unwrap();
    let r = rm
        .score_raw(
            &pairs
                .iter()
                .map(|p| (p.prompt.clone(), p.rejected.clone()))
                .collect::<Vec<_>>(),
            4,
        )
        .unwrap();
    let softplus = |x: f64| (1.0 + x.exp()).ln();
    let want = (softplus(-(c[0] - r[0] - 0.5)) + softplus(-(c[1] - r[1]))) / 2.0;
    let got = out.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    let acc = ((c[0] > r[0]) as u8 + (c[1] > r[1]) as u8) as f64 / 2.0;
    assert_eq!(out.accuracy, acc);
    // The LM term adds beta * mean NLL of the chosen completions.
    let with_lm = pair_loss(&lm, &pairs, 0.5, 0.3, &Device::Cpu)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap() as f64;
    let rows: Vec<_> = pairs
        .iter()
        .map(|p| (p.prompt.clone(), p.chosen.clone()))
        .collect();
    // 5 chosen completion tokens: [20, 21, 2] and [31, 2].
    let nll = nll_sum(&lm, &rows, &Device::Cpu)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
        / 5.0;
    assert!(
        (with_lm - (want + 0.3 * nll)).abs() < 1e-4,
        "{with_lm} vs {}",
        want + 0.3 * nll
    );
}

/// Same config + seed -> identical metrics and weights; and SFT lowers the loss.
#[test]
fn sft_is_deterministic_and_learns() {
    let root = scratch("det");
    let (data, init) = sft_data_and_init(&root, 48);
    let a = sft::run(
        &sft_config(&root.join("a"), &data, &init),
        false,
        &Device::Cpu,
    )
    .unwrap();
    let _b = sft::run(
        &sft_config(&root.join("b"), &data, &init),
        false,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(a.steps, 12);
    let (ma, mb) = (
        metrics(&root.join("a/metrics.jsonl")),
        metrics(&root.join("b/metrics.jsonl")),
    );
    assert_eq!(ma, mb);
    let first = ma[0]["loss"].as_f64().unwrap();
    assert!(
        a.final_train_loss < first - 0.5,
        "loss {first} -> {}",
        a.final_train_loss
    );
    // The run drew its curves: the loss, learning-rate and gradient-norm panels of the fit loop.
    let texts = curves_texts(&root.join("a"));
    for t in [
        "loss",
        "learning rate",
        "gradient norm (before clipping)",
        "optimiser step",
    ] {
        assert!(texts.iter().any(|x| x == t), "{t} not in {texts:?}");
    }
    let wa = std::fs::read(root.join("a/model/model.safetensors")).unwrap();
    let wb = std::fs::read(root.join("b/model/model.safetensors")).unwrap();
    assert!(wa == wb, "identical weights");
}

/// `gradient_checkpointing = true` in a training config trains the same model: the same losses at
/// every step (to float rounding: the recomputed layers run the same kernels) and the same final
/// loss, through the shared `fit` loop and `rlhf_lm::llama::backward`.
#[test]
fn sft_with_gradient_checkpointing_matches_plain() {
    let root = scratch("ckpt");
    let (data, init) = sft_data_and_init(&root, 32);
    let plain = sft::run(
        &sft_config(&root.join("plain"), &data, &init),
        false,
        &Device::Cpu,
    )
    .unwrap();
    let mut cfg = sft_config(&root.join("ckpt"), &data, &init);
    cfg.fit.gradient_checkpointing = true;
    let ckpt = sft::run(&cfg, false, &Device::Cpu).unwrap();
    assert_eq!(plain.steps, ckpt.steps);
    let (mp, mc) = (
        metrics(&root.join("plain/metrics.jsonl")),
        metrics(&root.join("ckpt/metrics.jsonl")),
    );
    assert_eq!(mp.len(), mc.len());
    let losses = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter().filter_map(|r| r["loss"].as_f64()).collect()
    };
    let (lp, lc) = (losses(&mp), losses(&mc));
    assert_eq!(lp.len(), plain.steps as usize);
    for (a, b) in lp.iter().zip(&lc) {
        assert!((a - b).abs() < 1e-4 * a.abs().max(1.0), "loss {a} vs {b}");
    }
    assert!(
        (plain.final_train_loss - ckpt.final_train_loss).abs() < 1e-4,
        "{} vs {}",
        plain.final_train_loss,
        ckpt.final_train_loss
    );
    // The flag reaches the models the trainers build (`TrainableLm::model`): a plain
    // `Tensor::backward` through one is refused, `rlhf_lm::llama::backward` works.
    let lm = tiny_lm(0);
    lm.set_gradient_checkpointing(true);
    let rows = vec![(vec![1u32, 10, 11], vec![20u32, 21, 2])];
    let loss = nll_sum(&lm, &rows, &Device::Cpu).unwrap();
    assert!(loss.backward().is_err());
    assert!(rlhf_lm::llama::backward(&loss).is_ok());
    // And it learned (a broken gradient path would leave the loss where it started).
    assert!(
        ckpt.final_train_loss < lc[0] - 0.3,
        "loss {} -> {}",
        lc[0],
        ckpt.final_train_loss
    );
}
