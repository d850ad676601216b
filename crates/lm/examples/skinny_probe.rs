use std::time::Instant;
fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (m, k, n, copies) = (args[0], args[1], args[2], args.get(3).copied().unwrap_or(1));
    let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let ws: Vec<Vec<f32>> = (0..copies).map(|c| (0..n * k).map(|i| ((i + c) % 5) as f32 * 0.1).collect()).collect();
    let reps = std::env::var("REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000usize).max(copies);
    let t = Instant::now();
    let mut s = 0.0;
    for r in 0..reps {
        let y = rlhf_lm::skinny::xwt(&x, m, k, &ws[r % copies], n, None);
        s += y[0];
    }
    let dt = t.elapsed().as_secs_f64() / reps as f64;
    println!("m={m} k={k} n={n} copies={copies}: {:.3} ms, {:.1} GFLOP/s, {:.1} GB/s weight ({s})", dt * 1e3, 2.0 * (m * n * k) as f64 / dt / 1e9, (n * k * 4) as f64 / dt / 1e9);
}
