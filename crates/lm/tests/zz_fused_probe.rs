use candle_core::{Device, Tensor};
use std::time::Instant;
#[test]
fn probe() {
    for n in [1usize << 16, 1 << 20, 12_500_000, 28_000_000] {
        let a = Tensor::rand(0f32, 1., n, &Device::Cpu).unwrap();
        let b = Tensor::rand(0f32, 1., n, &Device::Cpu).unwrap();
        let _ = (&a + &b).unwrap();
        let t = Instant::now();
        let k = 5;
        for _ in 0..k {
            let c = (&a + &b).unwrap();
            drop(c);
        }
        let dt = t.elapsed().as_secs_f64() / k as f64;
        let t = Instant::now();
        for _ in 0..k {
            let c = a.zeros_like().unwrap();
            drop(c);
        }
        let dz = t.elapsed().as_secs_f64() / k as f64;
        eprintln!(
            "n={n}: add {:.2} ms ({:.2} GB/s)  zeros {:.2} ms",
            dt * 1e3,
            12.0 * n as f64 / dt / 1e9,
            dz * 1e3
        );
    }
}
