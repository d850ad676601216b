//! End to end: a small regression trained with every piece of this crate (Trainable vars, AdamW,
//! a cosine schedule, gradient accumulation, clipping, the RNG, metrics, checkpoints). A run that
//! is killed and resumed from its last checkpoint must end with exactly the weights and the
//! metrics log of a run that was never interrupted.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::Rng;
use rlhf_lm::llama::Trainable;
use rlhf_train::{
    clip_grad_norm, AdamW, AdamWConfig, GradAccumulator, LrSchedule, MetricsLogger, RunDir,
    ScheduleKind, TrainRng,
};

const TOTAL: u64 = 20;
const SAVE_EVERY: u64 = 5;
const ROWS: usize = 32;

fn data() -> (Tensor, Tensor) {
    let mut rng = TrainRng::seed_from_u64(99);
    let x: Vec<f32> = (0..ROWS * 4)
        .map(|_| rng.random::<f32>() * 2.0 - 1.0)
        .collect();
    let x = Tensor::from_vec(x, (ROWS, 4), &Device::Cpu).unwrap();
    let w_true = Tensor::new(&[[1.5f32], [-2.0], [0.5], [3.0]], &Device::Cpu).unwrap();
    let y = x.matmul(&w_true).unwrap().affine(1.0, 0.25).unwrap();
    (x, y)
}

fn config() -> (AdamWConfig, LrSchedule) {
    (
        AdamWConfig {
            lr: 0.3,
            weight_decay: 0.01,
            ..Default::default()
        },
        LrSchedule {
            kind: ScheduleKind::Cosine,
            warmup_steps: 3,
            total_steps: TOTAL,
            min_lr_ratio: 0.1,
        },
    )
}

/// Train from `start` (a fresh run, or the latest checkpoint of `dir`) up to step `stop`.
fn train(dir: &Path, resume: bool, stop: u64) -> HashMap<String, Vec<f32>> {
    let (x, y) = data();
    let (opt_cfg, sched) = config();
    let (run, trainable, mut opt, mut rng, mut log, start) = if resume {
        let run = RunDir::open_for_resume(dir).unwrap();
        let ck = run.latest_checkpoint().unwrap().expect("a checkpoint");
        let trainable = Trainable::new(&ck.load_model(&Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(trainable.vars.clone(), opt_cfg).unwrap();
        opt.load_state(&ck.load_optimizer(&Device::Cpu).unwrap())
            .unwrap();
        let rng = TrainRng::from_json(&ck.state["rng"]).unwrap();
        assert_eq!(ck.state["step"], ck.step);
        let log = MetricsLogger::resume(&run, ck.step).unwrap();
        (run, trainable, opt, rng, log, ck.step)
    } else {
        let run = RunDir::create(
            dir,
            &serde_json::json!({"optim": opt_cfg, "schedule": sched}),
        )
        .unwrap();
        let mut init = HashMap::new();
        init.insert(
            "w".to_string(),
            Tensor::zeros((4, 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        init.insert(
            "b".to_string(),
            Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        let trainable = Trainable::new(&init).unwrap();
        let opt = AdamW::new(trainable.vars.clone(), opt_cfg).unwrap();
        let log = MetricsLogger::new(&run).unwrap();
        (run, trainable, opt, TrainRng::seed_from_u64(7), log, 0)
    };
    let vars = opt.vars();
    let t = trainable.tensors();
    for step in start + 1..=stop {
        let mut acc = GradAccumulator::new(&vars);
        let mut loss_sum = 0.0;
        for _micro in 0..2 {
            let idx: Vec<u32> = (0..4).map(|_| rng.random_range(0..ROWS as u32)).collect();
            let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
            let (xb, yb) = (
                x.index_select(&idx, 0).unwrap(),
                y.index_select(&idx, 0).unwrap(),
            );
            let pred = xb.matmul(&t["w"]).unwrap().broadcast_add(&t["b"]).unwrap();
            let loss = pred
                .sub(&yb)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .affine(0.5, 0.0)
                .unwrap();
            loss_sum += loss.to_scalar::<f32>().unwrap() as f64;
            acc.add(loss.backward().unwrap()).unwrap();
        }
        let mut grads = acc.finish();
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        let lr = sched.lr_at(step - 1, opt.config().lr);
        opt.step(&grads, lr).unwrap();
        log.log(step, &[("loss", loss_sum), ("grad_norm", norm), ("lr", lr)])
            .unwrap();
        if step % SAVE_EVERY == 0 {
            let state = serde_json::json!({"step": step, "rng": rng.to_json()});
            run.save_checkpoint(step, &trainable.tensors(), &opt.state().unwrap(), &state)
                .unwrap();
        }
    }
    trainable
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn metrics_without_time(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("wall_time");
            v
        })
        .collect()
}

#[test]
fn killed_and_resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let straight = train(&a, false, TOTAL);

    // "Killed" after step 13: steps 11-13 were logged but never checkpointed, and a save of step
    // 15 was cut short, leaving its temporary directory.
    train(&b, false, 13);
    std::fs::create_dir(b.join("checkpoints/.tmp-step-15-4242")).unwrap();
    std::fs::write(
        b.join("checkpoints/.tmp-step-15-4242/model.safetensors"),
        b"garbage",
    )
    .unwrap();
    let resumed = train(&b, true, TOTAL);

    assert_eq!(straight, resumed, "weights differ after resume");
    let (ma, mb) = (metrics_without_time(&a), metrics_without_time(&b));
    assert_eq!(ma.len(), TOTAL as usize);
    assert_eq!(ma, mb, "metrics differ after resume");
    // it learned something: the loss fell (means of the first and last three steps)
    let loss =
        |r: std::ops::Range<usize>| r.map(|i| ma[i]["loss"].as_f64().unwrap()).sum::<f64>() / 3.0;
    let (first, last) = (loss(0..3), loss(17..20));
    assert!(last < first * 0.25, "{first} -> {last}");
    // the last two checkpoints are kept, and the stray is gone
    let rb = RunDir::open_for_resume(&b).unwrap();
    assert_eq!(rb.checkpoint_steps().unwrap(), vec![15, 20]);
    assert!(!b.join("checkpoints/.tmp-step-15-4242").exists());
}
