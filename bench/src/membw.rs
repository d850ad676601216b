//! This machine's memory bandwidth, the ceiling of batch-1 decoding: each new token reads every
//! weight once (the LM head included), so tokens/s ≤ bandwidth / weight bytes.
//!
//! Two measurements over a buffer far larger than the caches (1 GiB by default), each the best of
//! a few passes, on 1 thread and on every thread of the pool:
//! * read: sum every f32 of the buffer (what decoding does to its weights);
//! * copy: copy it into a second buffer, counted as STREAM does (bytes read + bytes written).

use std::time::Instant;

use rayon::prelude::*;
use serde_json::{json, Value};

/// Sum of `xs` in 16 independent lanes (vectorised; enough parallel adds to be memory-bound).
fn sum(xs: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for chunk in xs.chunks_exact(16) {
        for (l, x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    lanes.iter().sum()
}

fn best_of(passes: usize, mut f: impl FnMut()) -> f64 {
    (0..passes)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// GB/s (10^9 bytes) read and copied with `threads` workers over `bytes` of f32.
fn measure(bytes: usize, threads: usize, passes: usize) -> (f64, f64) {
    let n = bytes / 4;
    // Written, not only allocated, so every page is mapped before timing.
    let src: Vec<f32> = (0..n).map(|i| (i % 251) as f32).collect();
    let mut dst = vec![1.0f32; n];
    let chunk = n.div_ceil(threads).next_multiple_of(16);
    let mut sink = 0.0f32;
    let read_s = best_of(passes, || {
        sink += if threads == 1 {
            sum(&src)
        } else {
            src.par_chunks(chunk).map(sum).sum::<f32>()
        };
    });
    let copy_s = best_of(passes, || {
        if threads == 1 {
            dst.copy_from_slice(&src);
        } else {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
        }
    });
    std::hint::black_box((sink, &dst));
    (
        (n * 4) as f64 / read_s / 1e9,
        (2 * n * 4) as f64 / copy_s / 1e9,
    )
}

/// One JSON line: read and copy bandwidth on 1 thread and on the pool's threads.
pub fn run(gib: f64, passes: usize, label: &str) -> Value {
    let bytes = (gib * (1u64 << 30) as f64) as usize;
    let pool = rayon::current_num_threads();
    let (read_1, copy_1) = measure(bytes, 1, passes);
    let (read_n, copy_n) = measure(bytes, pool, passes);
    json!({
        "side": "ours",
        "bench": "membw",
        "label": label,
        "buffer_gib": gib,
        "threads": pool,
        "read_gbps_1t": (read_1 * 10.0).round() / 10.0,
        "copy_gbps_1t": (copy_1 * 10.0).round() / 10.0,
        "read_gbps": (read_n * 10.0).round() / 10.0,
        "copy_gbps": (copy_n * 10.0).round() / 10.0,
    })
}
