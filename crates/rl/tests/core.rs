//! The shared core: the one `fit` loop (accumulation that does not change the update, the
//! micro-batch floor, resume-free history) and swapping the reward model inside a run.

mod common;
use common::{scratch, tiny_lm, CPU};
use std::path::PathBuf;

use candle_core::Tensor;
use rlhf_rl::fit::{fit, tail_mean, weighted_share, FitPlan};
use rlhf_rl::policy::TrainableLm;
use rlhf_rl::reward::{add_head, RewardModel};
use rlhf_rl::reward_source::{Query, RewardConfig, Rewarder, SourceKind};
use rlhf_rl::trainer::{OptimConfig, Trainer};

/// A loss whose value is known by hand: the sum over the micro-batch of (x_i * w)^2 where w is the
/// first embedding entry, weighted by the micro-batch's share of the batch.
fn toy_loss(
    lm: &TrainableLm,
    xs: &[f64],
    batch: &[usize],
    part: &[usize],
) -> (Tensor, Vec<(&'static str, f64)>) {
    let w = lm.params.vars[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .narrow(0, 0, 1)
        .unwrap();
    let v: Vec<f32> = part.iter().map(|&i| xs[i] as f32).collect();
    let x = Tensor::new(v.as_slice(), &CPU).unwrap();
    let per = x
        .broadcast_mul(&w)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let share = part.len() as f64 / batch.len() as f64;
    ((per * share).unwrap(), vec![("share", share)])
}

#[test]
fn fit_walks_every_example_once_per_epoch_and_accumulation_keeps_the_update() {
    let xs: Vec<f64> = (0..10).map(|i| 0.1 * i as f64 + 0.5).collect();
    let optim = OptimConfig {
        lr: 1e-2,
        warmup_ratio: 0.0,
        ..OptimConfig::default()
    };
    let run = |grad_accum: usize, name: &str| {
        let lm = tiny_lm(0);
        let plan = FitPlan {
            grad_accum,
            log_every: 1,
            ..FitPlan::new("toy", 2, 4, 3)
        };
        assert_eq!(
            plan.total_steps(xs.len()),
            6,
            "ceil(10 / 4) = 3 batches, 2 epochs"
        );
        let mut seen = vec![0usize; xs.len()];
        let mut trainer = Trainer::start(
            &scratch(name),
            &serde_json::json!({}),
            &lm,
            &optim,
            6,
            false,
        )
        .unwrap();
        let history = fit(
            &mut trainer,
            &lm,
            xs.len(),
            &plan,
            |lm, batch, part| {
                for &i in part {
                    seen[i] += 1;
                }
                Ok(toy_loss(lm, &xs, batch, part))
            },
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(trainer.step, 6);
        assert_eq!(seen, vec![2; xs.len()], "each example once per epoch");
        // The shares of a batch's micro-batches add up to one.
        for step in &history {
            let share = step.iter().find(|(k, _)| *k == "share").unwrap().1;
            assert!((share - 1.0).abs() < 1e-12, "{step:?}");
        }
        (history, lm.snapshot().unwrap())
    };
    let (h1, w1) = run(1, "a1");
    let (h2, w2) = run(2, "a2");
    // Same batches, same summed gradient: the same losses and weights whether or not split.
    for (a, b) in h1.iter().zip(&h2) {
        assert!((a[0].1 - b[0].1).abs() < 1e-6, "{a:?} vs {b:?}");
    }
    let key = "model.embed_tokens.weight";
    let d = (&w1[key] - &w2[key])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-6, "max weight difference {d}");
    // tail_mean averages the last n steps.
    let m = tail_mean(&h1, 2);
    let by_hand = (h1[4][0].1 + h1[5][0].1) / 2.0;
    assert!((m["loss"] - by_hand).abs() < 1e-12);
}

#[test]
fn fit_respects_the_micro_batch_floor_and_rejects_non_finite_losses() {
    let lm = tiny_lm(0);
    let optim = OptimConfig::default();
    let plan = FitPlan {
        grad_accum: 4,
        min_micro: 2,
        ..FitPlan::new("floor", 1, 4, 0)
    };
    let mut trainer = Trainer::start(
        &scratch("floor"),
        &serde_json::json!({}),
        &lm,
        &optim,
        1,
        false,
    )
    .unwrap();
    let mut sizes = Vec::new();
    fit(
        &mut trainer,
        &lm,
        4,
        &plan,
        |lm, batch, part| {
            sizes.push(part.len());
            Ok(toy_loss(lm, &[1.0; 4], batch, part))
        },
        |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(
        sizes,
        vec![2, 2],
        "4 micro-batches asked, but none smaller than 2"
    );

    // A loss that is always NaN: skipped (weights untouched) up to `max_nonfinite_skips` steps
    // in a row, then the run stops at the next one.
    let lm = tiny_lm(0);
    let before = lm.params.snapshot().unwrap();
    let mut trainer = Trainer::start(
        &scratch("nan"),
        &serde_json::json!({}),
        &lm,
        &optim,
        5,
        false,
    )
    .unwrap();
    let err = fit(
        &mut trainer,
        &lm,
        10,
        &FitPlan::new("nan-loss", 1, 2, 0),
        |_, _, _| Ok((Tensor::new(f32::NAN, &CPU).unwrap(), vec![])),
        |_, _| Ok(()),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("the loss is NaN at optimiser step 4")
            && err.to_string().contains("3 non-finite steps in a row"),
        "{err}"
    );
    let after = lm.params.snapshot().unwrap();
    for (k, t) in &before {
        let d = (t - &after[k]).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{k} changed");
    }
}

#[test]
fn the_reward_model_can_be_swapped_inside_a_run() {
    let dir = scratch("rm");
    let save_rm = |seed: u64, name: &str| {
        let lm = tiny_lm(seed);
        let mut w = lm.params.snapshot().unwrap();
        add_head(&mut w, lm.config.hidden_size, seed, &CPU).unwrap();
        let lm = TrainableLm {
            params: rlhf_lm::llama::Trainable::new(&w).unwrap(),
            ..lm
        };
        let path = dir.join(name);
        rlhf_rl::reward::save(&lm, None, &path).unwrap();
        path
    };
    let (a, b) = (save_rm(1, "a"), save_rm(2, "b"));
    let policy = tiny_lm(0);
    let cfg = RewardConfig {
        source: SourceKind::Model,
        model: Some(a.clone()),
        ..RewardConfig::default()
    };
    let mut rewarder = Rewarder::from_config(&cfg, None, 0, &policy.tokenizer, &CPU).unwrap();
    let (prompt, completion) = ("the movie was", "great fun");
    let (pi, ci) = policy.encode(prompt, completion, true, 64).unwrap();
    let q = [Query {
        prompt,
        completion,
        prompt_ids: &pi,
        completion_ids: &ci,
    }];
    let before = rewarder.score_raw(&q).unwrap()[0];
    let direct = |p: &PathBuf| {
        RewardModel::load(p, &CPU)
            .unwrap()
            .score_raw(&[(pi.clone(), ci.clone())], 1)
            .unwrap()[0]
    };
    assert!((before - direct(&a)).abs() < 1e-6);
    rewarder
        .replace_reward_model(
            RewardModel::load(&b, &CPU).unwrap(),
            b.clone(),
            &policy.tokenizer,
        )
        .unwrap();
    let after = rewarder.score_raw(&q).unwrap()[0];
    assert!(
        (after - direct(&b)).abs() < 1e-6,
        "{after} vs {}",
        direct(&b)
    );
    assert!(
        (after - before).abs() > 1e-6,
        "two different heads score differently"
    );
    // A gold source cannot be swapped for a model.
    let gold = RewardConfig {
        source: SourceKind::Gold,
        ..RewardConfig::default()
    };
    let mut g =
        Rewarder::from_config(&gold, Some("sentiment"), 0, &policy.tokenizer, &CPU).unwrap();
    assert!(g
        .replace_reward_model(RewardModel::load(&b, &CPU).unwrap(), b, &policy.tokenizer)
        .is_err());
}

#[test]
fn a_micro_batch_is_weighted_by_its_share_of_the_batch() {
    // One example of a batch of four: a quarter of its loss and of each metric.
    let (loss, m) = weighted_share(
        &[2],
        &[0, 1, 2, 3],
        Tensor::new(2.0f32, &CPU).unwrap(),
        vec![("accuracy", 1.0), ("margin", -0.8)],
    )
    .unwrap();
    assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.5);
    assert_eq!(m, vec![("accuracy", 0.25), ("margin", -0.2)]);
}
