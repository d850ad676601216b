//! e^x over a slice, written so the compiler vectorises it (no branches, no library calls).
//!
//! Sampling takes e^(logit − max) of every vocabulary entry (49,152 for SmolLM2) for every row at
//! every step, and decode attention one per cached key and head; through the C library's `expf`
//! (one call per value) that was 5-8% of a batch-32 decode step.

/// Below this e^x is 0 in f32 (also the masked-score case: `crate::llama::MASKED` is −1e9).
const UNDERFLOW: f32 = -87.33;
const OVERFLOW: f32 = 88.72;

/// xs[i] ← e^xs[i]. Relative error below 2.5e-7 (x = n·ln 2 + r with |r| ≤ ln 2 / 2, then
/// 2ⁿ · p(r) with p the degree-7 Taylor polynomial, whose remainder is below 2e-8 there); exactly 0
/// below −87.33 and exactly 1 at 0.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the copy is compiled for.
            return unsafe { exp_in_place_avx512(xs) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { exp_in_place_avx2(xs) };
        }
    }
    exp_loop(xs)
}

/// Σ e^(x·scale − shift) over `xs`, each term through [`exp_in_place`] (in blocks on the stack),
/// summed in f64 over eight independent partial sums: the normaliser of a log-softmax over a
/// vocabulary, where one running f32 sum would lose about 1e-4.
pub fn sum_exp(xs: &[f32], scale: f32, shift: f32) -> f64 {
    const BLOCK: usize = 1024;
    let mut buf = [0f32; BLOCK];
    let mut partial = [0f64; 8];
    let mut tail = 0f64;
    for block in xs.chunks(BLOCK) {
        let b = &mut buf[..block.len()];
        for (e, &x) in b.iter_mut().zip(block) {
            *e = x * scale - shift;
        }
        exp_in_place(b);
        let chunks = b.chunks_exact(8);
        tail += chunks.remainder().iter().map(|&e| e as f64).sum::<f64>();
        for chunk in chunks {
            for (s, &e) in partial.iter_mut().zip(chunk) {
                *s += e as f64;
            }
        }
    }
    partial.iter().sum::<f64>() + tail
}

/// The loop of [`exp_in_place`], compiled once per instruction set below. Nothing in it is
/// reordered or contracted by the compiler, so every copy gives the same bits; the wider ones take
/// 16 or 8 values per instruction instead of baseline x86-64's 4.
#[inline(always)]
fn exp_loop(xs: &mut [f32]) {
    for x in xs {
        *x = exp(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn exp_in_place_avx512(xs: &mut [f32]) {
    exp_loop(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn exp_in_place_avx2(xs: &mut [f32]) {
    exp_loop(xs)
}

#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n · LN2_HI is exact for |n| < 2^10.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest by the 1.5 · 2^23 trick (no `round` call on baseline x86-64).
    const ROUND: f32 = 12_582_912.0;
    let c = x.clamp(UNDERFLOW, OVERFLOW);
    let n = (c * LOG2E + ROUND) - ROUND;
    let r = (c - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < UNDERFLOW {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_exp() {
        let mut worst = 0.0f64;
        let xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + i as f32 * (175.0 / 200_000.0))
            .collect();
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            worst = worst.max(((y as f64) - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let xs: Vec<f32> = (0..10_007).map(|i| -90.0 + i as f32 * 0.0179).collect();
        let mut plain = xs.clone();
        exp_loop(&mut plain);
        let mut dispatched = xs.clone();
        exp_in_place(&mut dispatched);
        assert_eq!(plain, dispatched);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut wide = xs.clone();
            unsafe { exp_in_place_avx2(&mut wide) };
            assert_eq!(plain, wide);
        }
    }

    #[test]
    fn sum_exp_matches_f64_sum() {
        let xs: Vec<f32> = (0..49_152)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.02 - 10.0)
            .collect();
        let (scale, shift) = (0.8f32, 3.0f32);
        let want: f64 = xs.iter().map(|&x| ((x * scale - shift) as f64).exp()).sum();
        let got = sum_exp(&xs, scale, shift);
        assert!(((got - want) / want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn exact_at_zero_and_zero_when_masked() {
        let mut v = [0.0f32, -1e9, -100.0, f32::NEG_INFINITY, 1.0];
        exp_in_place(&mut v);
        assert_eq!(&v[..4], &[1.0, 0.0, 0.0, 0.0]);
        assert!((v[4] as f64 - std::f64::consts::E).abs() < 1e-6);
    }
}
