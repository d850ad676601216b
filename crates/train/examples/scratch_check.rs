// Temporary: writes a run with a resume to argv[1], then times AdamW on 135M params.
use candle_core::{backprop::GradStore, Device, Tensor, Var};
use rlhf_train::*;
use std::collections::HashMap;

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let run = RunDir::create(&dir, &serde_json::json!({"lr": 1e-5})).unwrap();
    let mut log = MetricsLogger::new(&run).unwrap();
    for s in 1..=10u64 {
        log.log(s, &[("loss", s as f64), ("lr", 0.5)]).unwrap();
    }
    drop(log);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let run = RunDir::open_for_resume(&dir).unwrap();
    let mut log = MetricsLogger::resume(&run, 6).unwrap();
    for s in 7..=12u64 {
        log.log(s, &[("loss", 100.0 + s as f64)]).unwrap();
    }

    // timing
    let n = 135_000_000usize;
    let p = Var::from_tensor(&Tensor::randn(0f32, 0.02, n, &Device::Cpu).unwrap()).unwrap();
    let g = Tensor::randn(0f32, 0.001, n, &Device::Cpu).unwrap();
    let mut gs = GradStore::default();
    gs.insert(p.as_tensor(), g);
    let mut opt = AdamW::new(
        vec![("p".into(), p.clone())],
        AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..4 {
        let t = std::time::Instant::now();
        opt.step(&gs, 1e-5).unwrap();
        eprintln!("adamw step {i}: {:.3}s", t.elapsed().as_secs_f64());
    }
    let vars = [p.clone()];
    for i in 0..2 {
        let t = std::time::Instant::now();
        let norm = clip_grad_norm(&mut gs, &vars, 1e9).unwrap();
        eprintln!(
            "grad norm {i}: {norm:.4} in {:.3}s",
            t.elapsed().as_secs_f64()
        );
    }
    let t = std::time::Instant::now();
    let st = opt.state().unwrap();
    eprintln!("state copy {:.3}s", t.elapsed().as_secs_f64());
    let mut m = HashMap::new();
    m.insert("p".to_string(), p.as_tensor().clone());
    let t = std::time::Instant::now();
    run.save_checkpoint(12, &m, &st, &serde_json::json!({}))
        .unwrap();
    eprintln!("checkpoint save {:.3}s", t.elapsed().as_secs_f64());
}
