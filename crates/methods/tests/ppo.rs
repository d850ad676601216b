//! PPO / PPO-max: the math against hand-computed values (GAE, the clipped surrogate and value
//! loss at and past the clip boundary, running moments, where the KL penalty and the score go),
//! the tensor losses against the scalar ones, and short runs on the tiny model (run layout and
//! monitors, resume, the trip-wire).

mod common;
use common::{assert_all_close, close, curves_texts, metrics, scratch, tiny_model};

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use rlhf_methods::ppo::{
    self, clipped_surrogate, clipped_value_loss, explained_variance, gae, normalize_scores,
    quantile, surrogate_loss, token_rewards, value_loss_tensor, whiten, PpoConfig, PpoParams,
    RewardScaling, RunningMoments, Whiten,
};
use rlhf_rl::online::{OnlineConfig, Session};
use rlhf_rl::reward_source::SourceKind;
use rlhf_rl::tripwire::TripAction;
use rlhf_rl::value::ValueModel;

// ---- GAE ---------------------------------------------------------------------------------------------

/// rewards [0, 0, 1], values [0.5, 0.2, 0.4], gamma 0.9, lambda 0.8, V after the end = 0:
/// delta_2 = 1 - 0.4 = 0.6;            A_2 = 0.6
/// delta_1 = 0 + 0.9*0.4 - 0.2 = 0.16; A_1 = 0.16 + 0.72*0.6 = 0.592
/// delta_0 = 0 + 0.9*0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.72*0.592 = 0.10624
#[test]
fn gae_on_a_fixed_sequence() {
    let (a, r) = gae(&[0.0, 0.0, 1.0], &[0.5, 0.2, 0.4], 0.9, 0.8);
    assert_all_close(&a, &[0.10624, 0.592, 0.6], 1e-12);
    assert_all_close(&r, &[0.60624, 0.792, 1.0], 1e-12);
}

/// lambda = gamma = 1: advantages are returns-to-go minus values (Monte-Carlo); lambda = 0:
/// one-step TD errors.
#[test]
fn gae_limits() {
    let rewards = [0.1, -0.2, 1.5];
    let values = [0.3, 0.7, 0.9];
    let (a, r) = gae(&rewards, &values, 1.0, 1.0);
    assert_all_close(&r, &[1.4, 1.3, 1.5], 1e-12);
    assert_all_close(&a, &[1.1, 0.6, 0.6], 1e-12);
    let (a, _) = gae(&rewards, &values, 1.0, 0.0);
    assert_all_close(&a, &[0.1 + 0.7 - 0.3, -0.2 + 0.9 - 0.7, 1.5 - 0.9], 1e-12);
    let (a, r) = gae(&[], &[], 1.0, 0.95);
    assert!(a.is_empty() && r.is_empty());
}

// ---- clipped surrogate and value loss ---------------------------------------------------------------

#[test]
fn clipped_surrogate_at_and_past_the_boundary() {
    let eps = 0.2;
    // Positive advantage: gains stop at ratio 1.2.
    assert_eq!(clipped_surrogate(1.1, 2.0, eps), (-2.2, false));
    let (l, c) = clipped_surrogate(1.2, 2.0, eps); // exactly at the boundary: both branches agree
    assert!(close(l, -2.4, 1e-12) && !c);
    let (l, c) = clipped_surrogate(1.5, 2.0, eps); // past it: clipped, -A * 1.2
    assert!(close(l, -2.4, 1e-12) && c);
    // Below 1 - eps with a positive advantage the unclipped (larger) loss is kept: no clip.
    let (l, c) = clipped_surrogate(0.5, 2.0, eps);
    assert!(close(l, -1.0, 1e-12) && !c);
    // Negative advantage: clipped below 1 - eps, unclipped above 1 + eps (pessimistic bound).
    let (l, c) = clipped_surrogate(0.5, -1.0, eps);
    assert!(close(l, 0.8, 1e-12) && c);
    let (l, c) = clipped_surrogate(0.8, -1.0, eps);
    assert!(close(l, 0.8, 1e-12) && !c);
    let (l, c) = clipped_surrogate(1.5, -1.0, eps);
    assert!(close(l, 1.5, 1e-12) && !c);
}

#[test]
fn clipped_value_loss_at_and_past_the_boundary() {
    // v_old 1.0, clip 0.2, return 2.0.
    // v = 1.1 (inside): both branches equal, 1/2 (0.9)^2.
    let (l, c) = clipped_value_loss(1.1, 1.0, 2.0, 0.2);
    assert!(close(l, 0.405, 1e-12) && !c);
    // v = 1.2 (at the boundary): 1/2 (0.8)^2.
    let (l, c) = clipped_value_loss(1.2, 1.0, 2.0, 0.2);
    assert!(close(l, 0.32, 1e-12) && !c);
    // v = 1.5 moved toward the return past the clip: the clipped prediction 1.2 is worse, so the
    // loss is 1/2 (1.2 - 2)^2 = 0.32, not 1/2 (0.5)^2.
    let (l, c) = clipped_value_loss(1.5, 1.0, 2.0, 0.2);
    assert!(close(l, 0.32, 1e-12) && c);
    // v = 0.5 moved away from the return: the unclipped loss 1/2 (1.5)^2 = 1.125 is larger.
    let (l, c) = clipped_value_loss(0.5, 1.0, 2.0, 0.2);
    assert!(close(l, 1.125, 1e-12) && !c);
    // clip 0: plain.
    let (l, c) = clipped_value_loss(1.5, 1.0, 2.0, 0.0);
    assert!(close(l, 0.125, 1e-12) && !c);
}

/// The tensor losses (used for training) equal the scalar ones, and their gradients are zero on
/// clipped tokens.
#[test]
fn tensor_losses_match_the_scalar_ones() {
    let dev = Device::Cpu;
    let eps = 0.2;
    let ratios = [1.1f64, 1.5, 0.5, 0.5, 1.5, 1.0];
    let adv = [2.0f64, 2.0, 2.0, -1.0, -1.0, 0.7];
    let mask = [1f32, 1., 1., 1., 1., 0.];
    let old = [-1.0f32, -2.0, -0.5, -1.5, -0.3, -0.9];
    let new: Vec<f32> = old
        .iter()
        .zip(&ratios)
        .map(|(o, r)| o + r.ln() as f32)
        .collect();
    let logp = Var::from_vec(new.clone(), (2, 3), &dev).unwrap();
    let t = |v: Vec<f32>| Tensor::from_vec(v, (2, 3), &dev).unwrap();
    let a = t(adv.iter().map(|&x| x as f32).collect());
    let m = t(mask.to_vec());
    let loss = surrogate_loss(logp.as_tensor(), &t(old.to_vec()), &a, &m, eps, 5.0).unwrap();
    let want: f64 = (0..5)
        .map(|i| clipped_surrogate(ratios[i], adv[i], eps).0)
        .sum::<f64>()
        / 5.0;
    assert!(close(loss.to_scalar::<f32>().unwrap() as f64, want, 1e-5));
    let g = loss.backward().unwrap();
    let g: Vec<f32> = g
        .get(logp.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // d/dlogp of -A * ratio = -A * ratio / n on unclipped tokens; 0 on clipped and masked ones.
    for i in 0..6 {
        let clipped = clipped_surrogate(ratios[i], adv[i], eps).1 || mask[i] == 0.0;
        let want = if clipped {
            0.0
        } else {
            -adv[i] * ratios[i] / 5.0
        };
        assert!(
            close(g[i] as f64, want, 1e-4),
            "token {i}: {} vs {want}",
            g[i]
        );
    }

    let v = [1.1f32, 1.2, 1.5, 0.5, 3.0, 7.0];
    let v_old = [1.0f32; 6];
    let ret = [2.0f32, 2.0, 2.0, 2.0, 2.0, 2.0];
    let l = value_loss_tensor(
        &t(v.to_vec()),
        &t(v_old.to_vec()),
        &t(ret.to_vec()),
        &m,
        0.2,
        5.0,
    )
    .unwrap();
    let want: f64 = (0..5)
        .map(|i| clipped_value_loss(v[i] as f64, 1.0, 2.0, 0.2).0)
        .sum::<f64>()
        / 5.0;
    assert!(close(l.to_scalar::<f32>().unwrap() as f64, want, 1e-5));
}

// ---- reward normalisation ------------------------------------------------------------------------------

/// Chan's parallel update equals the moments of everything seen at once.
#[test]
fn running_moments_by_hand() {
    let mut m = RunningMoments::default();
    m.update(&[1.0, 2.0, 3.0]); // mean 2, M2 2
    assert_eq!((m.n, m.mean, m.m2), (3.0, 2.0, 2.0));
    m.update(&[10.0]); // n 4, d 8: mean 2 + 8/4 = 4, M2 2 + 0 + 64 * 3 / 4 = 50
    assert!(close(m.mean, 4.0, 1e-12) && close(m.m2, 50.0, 1e-12));
    assert!(close(m.var(), 12.5, 1e-12));
    // Same as all at once.
    let all = [1.0, 2.0, 3.0, 10.0];
    let mean = all.iter().sum::<f64>() / 4.0;
    let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
    assert!(close(m.var(), var, 1e-12));
    m.update(&[]);
    assert_eq!(m.n, 4.0);
}

/// The batch joins the history first; then (s - mean) / std, clipped; "scale" only divides.
#[test]
fn reward_normalisation_uses_the_history() {
    let mut m = RunningMoments::default();
    m.update(&[1.0, 2.0, 3.0]);
    let mut scaled = m;
    // History + batch [10]: mean 4, std sqrt(12.5) = 3.5355
    let out = normalize_scores(&[10.0], &mut m, RewardScaling::Normalize, 0.0);
    assert!(close(out[0], 6.0 / 12.5f64.sqrt(), 1e-12));
    let mut m2 = RunningMoments::default();
    m2.update(&[1.0, 2.0, 3.0]);
    let out = normalize_scores(&[10.0], &mut m2, RewardScaling::Normalize, 1.5);
    assert_eq!(out[0], 1.5);
    let out = normalize_scores(&[10.0], &mut scaled, RewardScaling::Scale, 0.0);
    assert!(close(out[0], 10.0 / 12.5f64.sqrt(), 1e-12));
    let mut untouched = RunningMoments::default();
    assert_eq!(
        normalize_scores(&[3.0, 4.0], &mut untouched, RewardScaling::None, 1.0),
        vec![3.0, 4.0]
    );
    assert_eq!(untouched.n, 0.0);
}

// ---- token rewards -------------------------------------------------------------------------------------

/// The score sits at the last completion token only; the KL penalty at every token (PPO-max) or
/// summed at the last one.
#[test]
fn token_level_kl_placement() {
    let logp = [-1.0f32, -0.5, -2.0];
    let refp = [-1.5f32, -0.5, -1.0];
    // logp - ref = [0.5, 0, -1]; beta 0.1
    let r = token_rewards(3.0, &logp, &refp, 0.1, true);
    assert_all_close(&r, &[-0.05, 0.0, 0.1 + 3.0], 1e-7);
    let r = token_rewards(3.0, &logp, &refp, 0.1, false);
    assert_all_close(&r, &[0.0, 0.0, 3.0 - 0.1 * (-0.5)], 1e-7);
    // beta 0: only the score, at the last token.
    assert_eq!(
        token_rewards(2.0, &logp, &refp, 0.0, true),
        vec![0.0, 0.0, 2.0]
    );
    let r = token_rewards(2.0, &[-1.0], &[-1.25], 0.1, true);
    assert_all_close(&r, &[2.0 - 0.025], 1e-7);
}

#[test]
fn whitening_explained_variance_and_quantiles() {
    let mut x = vec![1.0, 2.0, 3.0, 4.0];
    whiten(&mut x, 0.0);
    let s = 1.25f64.sqrt();
    assert_all_close(&x, &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], 1e-7);
    let mut y = vec![1.0, 2.0, 3.0, 4.0];
    whiten(&mut y, 1.0);
    assert_eq!(y[0], -1.0);
    assert!(close(
        explained_variance(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]),
        1.0,
        1e-12
    ));
    assert!(close(
        explained_variance(&[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0]),
        0.0,
        1e-12
    ));
    assert!(close(
        quantile(&[4.0, 1.0, 3.0, 2.0, 5.0], 0.95),
        4.8,
        1e-12
    ));
    assert_eq!(quantile(&[4.0, 1.0, 3.0], 0.5), 3.0);
}

// ---- configuration -------------------------------------------------------------------------------------

#[test]
fn the_default_is_the_ppo_max_preset() {
    let c = PpoConfig::default();
    let m = &c.method;
    assert_eq!(m.reward_scaling, RewardScaling::Normalize);
    assert!(m.reward_clip > 0.0 && m.value_clip > 0.0 && m.critic_pretrain_iterations > 0);
    assert!(m.token_kl && m.ptx_coef > 0.0 && m.entropy_coef == 0.0);
    assert_eq!((m.gamma, m.whiten), (1.0, Whiten::None));
    assert!(c.optim.max_grad_norm > 0.0);
    let p = PpoParams::plain();
    assert_eq!(p.reward_scaling, RewardScaling::None);
    assert_eq!(p.critic_pretrain_iterations, 0);
    assert_eq!(p.ptx_coef, PpoParams::default().ptx_coef);
    // Unknown keys are refused (the same serde rules as the TOML config).
    let bad: Result<PpoConfig, _> = serde_json::from_str(r#"{"method": {"clip_rnage": 0.1}}"#);
    assert!(bad.unwrap_err().to_string().contains("clip_rnage"));
    let ok: PpoConfig = serde_json::from_str(
        r#"{"method": {"whiten": "minibatch", "reward_scaling": "scale"}, "tripwire": {"max_kl": 8.0, "action": "rollback"}}"#,
    )
    .unwrap();
    assert_eq!(ok.method.whiten, Whiten::Minibatch);
    assert_eq!(ok.tripwire.action, TripAction::Rollback);
}

// ---- short runs on the tiny model ----------------------------------------------------------------------

fn tiny_config(model: &Path, out: &Path) -> PpoConfig {
    let mut c = OnlineConfig::<PpoParams>::default();
    c.model = model.to_path_buf();
    c.task = Some("sentiment".into());
    c.output_dir = out.to_path_buf();
    c.steps = 3;
    c.prompts_per_step = 4;
    c.rollout.max_new_tokens = 6;
    c.reward.source = SourceKind::Gold;
    c.reward.normalize_samples = 16;
    c.save_every = 1;
    c.optim.lr = 1e-3;
    c.optim.warmup_ratio = 0.0;
    c.eval.prompts = 6;
    c.method.critic_pretrain_iterations = 1;
    c.method.ptx_batch_size = 4;
    c
}

/// PPO-max end to end: run layout, every monitor finite, critic pre-training logged; and a run
/// stopped after two iterations and resumed matches an uninterrupted one.
#[test]
fn ppo_max_run_layout_monitors_and_resume() {
    let root = scratch("run");
    let model = tiny_model(&root, 2);
    let mut full = tiny_config(&model, &root.join("full"));
    full.method.entropy_coef = 0.01;
    full.method.whiten = Whiten::Minibatch;
    ppo::run(&full, false, &Device::Cpu).unwrap();
    let dir = root.join("full");
    for f in [
        "config.toml",
        "metrics.jsonl",
        "eval.json",
        "model/model.safetensors",
        "checkpoints/latest",
        "value/checkpoints",
    ] {
        assert!(dir.join(f).exists(), "no {f}");
    }
    let m = metrics(&dir.join("metrics.jsonl"));
    assert!(m
        .iter()
        .any(|v| v["critic_pretrain/value_loss"].as_f64().is_some()));
    let last = m.iter().rev().find(|v| v.get("reward").is_some()).unwrap();
    for key in [
        "reward",
        "kl",
        "response_length",
        "perplexity",
        "reward_p95",
        "clip_fraction",
        "approx_kl",
        "value_loss",
        "value_clip_fraction",
        "explained_variance",
        "entropy_full",
        "ptx_loss",
        "loss",
        "grad_norm",
        "gold",
        "reward_running_std",
    ] {
        assert!(
            last[key].as_f64().is_some_and(f64::is_finite),
            "{key} in {last}"
        );
    }
    assert!(last["perplexity"].as_f64().unwrap() >= 1.0);
    // The curves, drawn when the run ended: the final evaluation (logged after the model was
    // saved) is in them, and critic pre-training has its own panel.
    let texts = curves_texts(&dir);
    for t in [
        "reward",
        "KL to the reference",
        "completion length",
        "eval/winrate",
        "critic pre-training",
        "pre-training iteration",
    ] {
        assert!(texts.iter().any(|x| x == t), "{t} not in {texts:?}");
    }

    let mut short = full.clone();
    short.output_dir = root.join("resumed");
    short.steps = 2;
    ppo::run(&short, false, &Device::Cpu).unwrap();
    let mut rest = short.clone();
    rest.steps = 3;
    ppo::run(&rest, true, &Device::Cpu).unwrap();
    assert_eq!(
        metrics(&dir.join("metrics.jsonl")),
        metrics(&root.join("resumed/metrics.jsonl"))
    );
}

/// A bound the policy already breaks trips the wire on the first batch: the run stops, says why
/// in tripwire.json, and still writes its (restored) model and eval.json. Rollback restores and
/// carries on until `max_rollbacks`.
#[test]
fn tripwire_stops_or_rolls_back() {
    let root = scratch("trip");
    let model = tiny_model(&root, 2);
    let mut c = tiny_config(&model, &root.join("stop"));
    c.method.critic_pretrain_iterations = 0;
    c.tripwire.max_length = Some(0.5);
    ppo::run(&c, false, &Device::Cpu).unwrap();
    let trip: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("stop/tripwire.json")).unwrap())
            .unwrap();
    assert_eq!(trip["action"], "stopped");
    assert!(trip["reason"].as_str().unwrap().contains("max_length"));
    assert!(
        root.join("stop/eval.json").is_file()
            && root.join("stop/model/model.safetensors").is_file()
    );
    // Restored to the initial weights: the final model is the initial one.
    let a = rlhf_train::load_safetensors(&root.join("stop/model/model.safetensors"), &Device::Cpu)
        .unwrap();
    let b = rlhf_train::load_safetensors(&model.join("model.safetensors"), &Device::Cpu).unwrap();
    for (k, t) in &b {
        let d = (t - &a[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }

    let mut c = tiny_config(&model, &root.join("rollback"));
    c.method.critic_pretrain_iterations = 0;
    c.tripwire.max_length = Some(0.5);
    c.tripwire.action = TripAction::Rollback;
    c.tripwire.max_rollbacks = 2;
    ppo::run(&c, false, &Device::Cpu).unwrap();
    let m = metrics(&root.join("rollback/metrics.jsonl"));
    assert_eq!(
        m.iter()
            .filter(|v| v["tripwire/tripped"].as_f64() == Some(1.0))
            .count(),
        3
    );
    let trip: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("rollback/tripwire.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(trip["action"], "stopped");
}

// ---- approx-KL monitor ---------------------------------------------------------------------------------

/// k3 of KL(old || new) on a token drawn from the old policy: r = pi_new / pi_old,
/// (r - 1) - ln r. old logp -1.0, new -1.5: r = e^-0.5 = 0.6065306597, term 0.1065306597.
/// (The swapped form, (1/r - 1) + ln r = e^0.5 - 1.5 = 0.1487212707, estimates chi^2 - KL.)
#[test]
fn approx_kl_is_k3_of_old_versus_new() {
    assert!(close(ppo::approx_kl_token(-1.0, -1.5), 0.1065306597, 1e-9));
    // old -2.0, new -1.0: r = e, (e - 1) - 1 = 0.7182818285.
    assert!(close(ppo::approx_kl_token(-2.0, -1.0), 0.7182818285, 1e-9));
    assert_eq!(ppo::approx_kl_token(-0.7, -0.7), 0.0);
}

// ---- trip-wire rollback state --------------------------------------------------------------------------

fn state_equal(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> bool {
    a.len() == b.len()
        && a.iter().all(|(k, t)| {
            b.get(k).is_some_and(|u| {
                t.dims() == u.dims()
                    && t.to_dtype(candle_core::DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                        == u.to_dtype(candle_core::DType::F64)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
            })
        })
}

/// One optimiser step of the policy and one of the critic on a simple loss (sum of squared
/// weights), so every AdamW moment moves.
fn step_both(s: &mut Session<PpoParams>, value: &mut ValueModel) {
    s.optimizer_step(&[0], |lm, _| {
        let mut l = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (_, v) in &lm.params.vars {
            l = (l + v.as_tensor().sqr()?.sum_all()?)?;
        }
        Ok(l)
    })
    .unwrap();
    let mut acc = value.accumulator();
    let mut l = Tensor::new(0f32, &Device::Cpu).unwrap();
    for (_, v) in &value.lm.params.vars {
        l = (l + v.as_tensor().sqr().unwrap().sum_all().unwrap()).unwrap();
    }
    acc.add(l.backward().unwrap()).unwrap();
    value.step(acc.finish()).unwrap();
}

/// A rollback restores the AdamW moments of the policy and the critic, the KL coefficient and the
/// running reward moments to their values at the snapshot, not only the weights.
#[test]
fn rollback_restores_optimiser_moments_beta_and_reward_moments() {
    let root = scratch("restore");
    let model = tiny_model(&root, 2);
    let mut c = tiny_config(&model, &root.join("run"));
    c.reward.normalize = false;
    let dev = Device::Cpu;
    let mut s = Session::<PpoParams>::start(&c, false, &dev).unwrap();
    let mut value = ValueModel::start(
        &model,
        &root.join("run/value"),
        None,
        1e-3,
        1.0,
        0,
        &Default::default(),
        &dev,
    )
    .unwrap();
    let mut moments = RunningMoments::default();
    // Non-trivial state at the snapshot.
    step_both(&mut s, &mut value);
    moments.update(&[1.0, 3.0]);
    s.kl.beta = 0.07;
    let snap = s
        .snapshot(&serde_json::to_value(moments).unwrap(), Some(&value))
        .unwrap();
    let (p_opt, v_opt) = (
        s.trainer.optimizer_state().unwrap(),
        value.optimizer_state().unwrap(),
    );
    let (p_w, v_w) = (s.lm.snapshot().unwrap(), value.lm.snapshot().unwrap());
    // Everything moves on.
    step_both(&mut s, &mut value);
    moments.update(&[10.0]);
    s.kl.beta = 0.5;
    assert!(!state_equal(&p_opt, &s.trainer.optimizer_state().unwrap()));
    assert!(!state_equal(&v_opt, &value.optimizer_state().unwrap()));
    s.restore(&snap, &mut moments, Some(&mut value)).unwrap();
    assert!(state_equal(&p_w, &s.lm.snapshot().unwrap()));
    assert!(state_equal(&v_w, &value.lm.snapshot().unwrap()));
    assert!(
        state_equal(&p_opt, &s.trainer.optimizer_state().unwrap()),
        "policy AdamW"
    );
    assert!(
        state_equal(&v_opt, &value.optimizer_state().unwrap()),
        "critic AdamW"
    );
    assert_eq!(s.kl.beta, 0.07);
    assert_eq!((moments.n, moments.mean, moments.m2), (2.0, 2.0, 2.0));
    // The restored copies are independent of the live state: a step after the restore leaves
    // the snapshot as it was, and restoring again gives the same state.
    step_both(&mut s, &mut value);
    s.restore(&snap, &mut moments, Some(&mut value)).unwrap();
    assert!(state_equal(&p_opt, &s.trainer.optimizer_state().unwrap()));
    assert!(state_equal(&v_opt, &value.optimizer_state().unwrap()));
    std::fs::remove_dir_all(root).ok();
}

/// In a run: the first batch (policy = reference, KL ~ 0) passes, the update moves the policy
/// past `max_kl`, and the second batch trips the wire; the rollback restores the initial
/// snapshot, so the batch after it is learnt from with the initial beta (the adaptive controller
/// had lowered it) and running reward moments holding that batch alone.
#[test]
fn rollback_in_a_run_restores_beta_and_reward_moments() {
    let root = scratch("rollback-state");
    let model = tiny_model(&root, 2);
    let mut c = tiny_config(&model, &root.join("run"));
    c.steps = 2;
    // A large step, so the policy clearly moves away from the reference.
    c.optim.lr = 1e-2;
    c.prompts_per_step = 16;
    c.reward.normalize = false;
    c.method.critic_pretrain_iterations = 0;
    c.kl.beta = 0.1;
    c.kl.target = Some(1.0);
    c.kl.horizon = 100.0;
    c.tripwire.max_kl = Some(1e-3);
    c.tripwire.action = TripAction::Rollback;
    c.tripwire.max_rollbacks = 1;
    ppo::run(&c, false, &Device::Cpu).unwrap();
    let m = metrics(&root.join("run/metrics.jsonl"));
    let trips = m
        .iter()
        .filter(|v| v["tripwire/tripped"].as_f64() == Some(1.0))
        .count();
    let rows: Vec<_> = m.iter().filter(|v| v.get("reward").is_some()).collect();
    assert_eq!((trips, rows.len()), (1, 2), "{m:?}");
    // Without the rollback the second batch would see beta 0.1 * (1 - 0.2 * 16 / 100) = 0.0968.
    assert_eq!(rows[0]["beta"].as_f64(), Some(0.1));
    assert_eq!(rows[1]["beta"].as_f64(), Some(0.1));
    let (mean, reward) = (
        rows[1]["reward_running_mean"].as_f64().unwrap(),
        rows[1]["reward"].as_f64().unwrap(),
    );
    assert!(
        close(mean, reward, 1e-9),
        "running mean {mean} vs batch mean {reward}"
    );
    std::fs::remove_dir_all(root).ok();
}
