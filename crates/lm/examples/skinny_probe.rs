use std::time::Instant;
fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (m, k, n) = (args[0], args[1], args[2]);
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let reps = 50;
    let t = Instant::now();
    let mut s = 0.0;
    for _ in 0..reps {
        let y = rlhf_lm::skinny::xwt(&x, m, k, &w, n, None);
        s += y[0];
    }
    let dt = t.elapsed().as_secs_f64() / reps as f64;
    println!("m={m} k={k} n={n}: {:.3} ms, {:.1} GFLOP/s, {:.1} GB/s weight ({s})", dt * 1e3, 2.0 * (m * n * k) as f64 / dt / 1e9, (n * k * 4) as f64 / dt / 1e9);
}
