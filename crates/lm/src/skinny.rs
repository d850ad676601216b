//! y = x · Wᵀ for a few rows of x, the matrix product of decoding (one row per sequence), with
//! the weight read in its stored (n, k) row-major layout.
//!
//! A general matrix multiply (gemm, behind candle's `Linear`) repacks the weight into panels on
//! every call. That is cheap when many rows of x share the packed panels, but at decode time x has
//! 1-64 rows and the repacking (read and write the whole weight) cost more than the product itself
//! (60% of a batch-8 decode step in the profile). Here every weight row is streamed once and dotted
//! with every row of x, which stays in cache: the weight is read once per call. With a row or two
//! that runs at memory bandwidth; with 32 rows at about 60 GFLOP/s per core, about gemm's own rate
//! on this kind of machine (docs/performance.md, "What is left").
//!
//! The kernel works on tiles of 4 rows of x by 4 rows of W: 16 accumulators of one vector each
//! along k (16 lanes with AVX-512, 8 with AVX2), summed across lanes at the end. The vector kernel is
//! chosen at run time, so the binary runs on any x86-64; other CPUs take a plain loop.

use candle_core::{bail, CpuStorage, Layout, Tensor};
use rayon::prelude::*;

/// Rows of x up to which decoding's products take this path. At 64 rows each weight element
/// already feeds 64 multiply-adds, enough for gemm's one repacking of the weight to be cheap next
/// to the product (a batch-8 prefill of 20-token prompts, 160 rows, goes to gemm).
pub const MAX_ROWS: usize = 64;

/// Below this many multiply-adds a call stays on the calling thread (waking a worker costs more).
const PAR_MIN_MACS: usize = 1 << 18;

/// y (m × n, row-major) = x (m × k, row-major) · Wᵀ for W (n × k, row-major). Spread over rayon's
/// pool by blocks of W's rows when the product is large enough.
pub fn xwt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    xwt_many(x, m, k, &[(w, n)])
        .pop()
        .expect("one weight, one output")
}

/// [`xwt`] for several weights (n_i × k) applied to the same x, in one pass: one dispatch to the
/// thread pool for all of them (q, k and v; gate and up), each thread taking its share of every
/// weight's rows. Returns one (m × n_i) output per weight.
pub fn xwt_many(x: &[f32], m: usize, k: usize, weights: &[(&[f32], usize)]) -> Vec<Vec<f32>> {
    assert_eq!(x.len(), m * k, "xwt: x is not {m} x {k}");
    for (w, n) in weights {
        assert_eq!(w.len(), n * k, "xwt: W is not {n} x {k}");
    }
    let mut ys: Vec<Vec<f32>> = weights.iter().map(|(_, n)| vec![0.0f32; m * n]).collect();
    let total_n: usize = weights.iter().map(|(_, n)| n).sum();
    let threads = rayon::current_num_threads();
    // Tasks: the same number per thread (a few, for balance), each a share of every weight.
    let tasks = if threads > 1 && m * total_n * k >= PAR_MIN_MACS {
        threads * (total_n / (64 * threads)).clamp(1, 4)
    } else {
        1
    };
    let outs: Vec<SharedOut> = ys.iter_mut().map(|y| SharedOut(y.as_mut_ptr())).collect();
    let run = |t: usize| {
        for ((w, n), out) in weights.iter().zip(&outs) {
            let share = n.div_ceil(tasks).next_multiple_of(TILE_W);
            let (j0, j1) = ((t * share).min(*n), ((t + 1) * share).min(*n));
            if j0 < j1 {
                // SAFETY: task t writes only columns j0..j1 of this output, which no other task
                // writes; the outputs outlive the tasks, and x and W are read-only.
                unsafe { columns(x, m, k, w, j0, j1, out.ptr(), *n) };
            }
        }
    };
    if tasks > 1 {
        (0..tasks).into_par_iter().for_each(run);
    } else {
        run(0);
    }
    ys
}

/// [`xwt_many`] on tensors: `x` (..., k) times each weight (n_i, k) transposed, f32 on the CPU,
/// contiguous weights, no gradient. Returns one (..., n_i) tensor per weight.
pub fn linear_many(x: &Tensor, weights: &[&Tensor]) -> candle_core::Result<Vec<Tensor>> {
    let x = x.contiguous()?;
    let k = x.dim(candle_core::D::Minus1)?;
    let m = x.elem_count() / k.max(1);
    let lead = &x.dims()[..x.rank() - 1];
    let (xs, xl) = x.storage_and_layout();
    let x_host = host_f32(&xs, xl, "x")?;
    let guards: Vec<_> = weights.iter().map(|w| w.storage_and_layout()).collect();
    let mut ws = Vec::with_capacity(weights.len());
    for (s, l) in &guards {
        let (n, wk) = l.shape().dims2()?;
        if wk != k {
            bail!("linear_many: weight {n} x {wk} does not take rows of {k}");
        }
        ws.push((host_f32(s, l, "weight")?, n));
    }
    xwt_many(x_host, m, k, &ws)
        .into_iter()
        .zip(&ws)
        .map(|(y, (_, n))| {
            let mut dims = lead.to_vec();
            dims.push(*n);
            Tensor::from_vec(y, dims, x.device())
        })
        .collect()
}

/// The f32 values of a contiguous CPU tensor, in place.
fn host_f32<'a>(
    s: &'a candle_core::Storage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("skinny: {what} must be contiguous f32 on the CPU"),
    }
}

/// Weight rows and x rows per tile (16 vector accumulators: 8 loads per 16 FMAs, and the weight
/// rows of a tile stay in L1 while every block of x rows passes over them).
const TILE_W: usize = 4;
const TILE_X: usize = 4;

/// How many weight rows ahead the first pass over a tile prefetches (into L2: the x rows that
/// stream through L1 meanwhile would evict them from there). Two tiles, about 18 KB. In a probe
/// over SmolLM2-sized layers, distances of 1 to 16 tiles were within noise of each other, and no
/// prefetch was 29-35% slower at 8 and 32 rows (single runs on a noisy machine).
const PREFETCH_ROWS: usize = 8;

/// The output pointer shared by the tasks of one [`xwt`] call (each writes its own columns).
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Columns j0..j1 of y = x · Wᵀ, dispatched to the best kernel this CPU runs.
///
/// # Safety
/// `y` must be valid for m rows of `ldy` elements and columns j0..j1 not written by anyone else.
#[allow(clippy::too_many_arguments)]
unsafe fn columns(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    j0: usize,
    j1: usize,
    y: *mut f32,
    ldy: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return avx512::columns(x, m, k, w, j0, j1, y, ldy);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return avx2::columns(x, m, k, w, j0, j1, y, ldy);
        }
    }
    baseline_columns(x, m, k, w, j0, j1, y, ldy)
}

/// Any CPU: one dot product at a time (`fused::dot`, partial sums the compiler vectorises).
#[allow(clippy::too_many_arguments)]
unsafe fn baseline_columns(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    j0: usize,
    j1: usize,
    y: *mut f32,
    ldy: usize,
) {
    for j in j0..j1 {
        let wj = &w[j * k..(j + 1) * k];
        for i in 0..m {
            *y.add(i * ldy + j) = crate::fused::dot(&x[i * k..(i + 1) * k], wj);
        }
    }
}

/// The x86 kernels: one body (tiles of up to 4 rows of x by 4 rows of W, one vector accumulator
/// per pair, the weight rows kept in L1 while every block of x rows passes over them), written once
/// for each vector width.
macro_rules! x86_kernel {
    ($name:ident, $features:literal, $lanes:literal, $vec:ident, $zero:ident, $load:ident,
     $fmadd:ident, $hsum:path) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            use std::arch::x86_64::*;

            /// See [`super::columns`].
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn columns(
                x: &[f32],
                m: usize,
                k: usize,
                w: &[f32],
                j0: usize,
                j1: usize,
                y: *mut f32,
                ldy: usize,
            ) {
                assert!(x.len() >= m * k && w.len() >= j1 * k);
                let (x, w) = (x.as_ptr(), w.as_ptr());
                let mut j = j0;
                while j < j1 {
                    let jb = (j1 - j).min(super::TILE_W);
                    let mut i = 0;
                    while i < m {
                        let ib = (m - i).min(super::TILE_X);
                        let (xs, ws, out) = (x.add(i * k), w.add(j * k), y.add(i * ldy + j));
                        // The first pass over a weight tile also pulls the weight rows a little
                        // further on into cache (decoding reads each weight once, straight from
                        // memory: without this the first pass waits on every cache line).
                        let ahead = super::PREFETCH_ROWS;
                        let next = if i == 0 && j + jb + ahead <= j1 {
                            w.add((j + ahead) * k)
                        } else {
                            std::ptr::null()
                        };
                        match (ib, jb) {
                            (4, 4) => tile::<4, 4>(xs, ws, k, out, ldy, next),
                            (3, 4) => tile::<3, 4>(xs, ws, k, out, ldy, next),
                            (2, 4) => tile::<2, 4>(xs, ws, k, out, ldy, next),
                            (1, 4) => tile::<1, 4>(xs, ws, k, out, ldy, next),
                            (ib, jb) => {
                                // The last 1-3 weight rows, one at a time.
                                for jj in 0..jb {
                                    let (ws, out) = (ws.add(jj * k), out.add(jj));
                                    match ib {
                                        4 => tile::<4, 1>(xs, ws, k, out, ldy, std::ptr::null()),
                                        3 => tile::<3, 1>(xs, ws, k, out, ldy, std::ptr::null()),
                                        2 => tile::<2, 1>(xs, ws, k, out, ldy, std::ptr::null()),
                                        _ => tile::<1, 1>(xs, ws, k, out, ldy, std::ptr::null()),
                                    }
                                }
                            }
                        }
                        i += ib;
                    }
                    j += jb;
                }
            }

            /// out[i·ldy + j] = Σ_c x[i·k + c] · w[j·k + c] for an IB × JB tile; when `next` is
            /// not null, the JB weight rows from there are prefetched along the way.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile<const IB: usize, const JB: usize>(
                x: *const f32,
                w: *const f32,
                k: usize,
                out: *mut f32,
                ldy: usize,
                next: *const f32,
            ) {
                let mut acc = [[$zero(); JB]; IB];
                let full = k - k % $lanes;
                let mut c = 0;
                while c < full {
                    let mut wv = [$zero(); JB];
                    for (jj, v) in wv.iter_mut().enumerate() {
                        *v = $load(w.add(jj * k + c));
                    }
                    if !next.is_null() && c % 16 == 0 {
                        // One 64-byte line per row every 16 floats.
                        for jj in 0..JB {
                            _mm_prefetch::<_MM_HINT_T1>(next.add(jj * k + c) as *const i8);
                        }
                    }
                    for (ii, acc_i) in acc.iter_mut().enumerate() {
                        let xv = $load(x.add(ii * k + c));
                        for (a, wj) in acc_i.iter_mut().zip(&wv) {
                            *a = $fmadd(xv, *wj, *a);
                        }
                    }
                    c += $lanes;
                }
                for (ii, acc_i) in acc.iter().enumerate() {
                    for (jj, a) in acc_i.iter().enumerate() {
                        let mut s = $hsum(*a);
                        for cc in full..k {
                            s = (*x.add(ii * k + cc)).mul_add(*w.add(jj * k + cc), s);
                        }
                        *out.add(ii * ldy + jj) = s;
                    }
                }
            }
        }
    };
}

x86_kernel!(
    avx512,
    "avx512f,avx2,fma",
    16,
    __m512,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    _mm512_reduce_add_ps
);
x86_kernel!(
    avx2,
    "avx2,fma",
    8,
    __m256,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    super::hsum256
);

/// Sum of the 8 lanes of an AVX register.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    let one = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
    _mm_cvtss_f32(one)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        // Small LCG: deterministic values in [-1, 1).
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_f64_reference_on_every_tile_shape_and_tail() {
        // m covers full and partial x blocks, n full and partial weight tiles, k full vectors and
        // a tail shorter than a vector.
        for &(m, k, n) in &[
            (1, 16, 4),
            (3, 37, 7),
            (4, 64, 9),
            (8, 576, 192),
            (13, 100, 66),
            (32, 48, 130),
        ] {
            let x = values(m * k, (m * 31 + k) as u32);
            let w = values(n * k, (n * 17 + k) as u32);
            let y = xwt(&x, m, k, &w, n);
            let want = reference(&x, m, k, &w, n);
            for i in 0..m {
                for j in 0..n {
                    let (got, exp) = (y[i * n + j] as f64, want[i * n + j]);
                    assert!(
                        (got - exp).abs() <= 1e-5 * (1.0 + (k as f64).sqrt()),
                        "m={m} k={k} n={n} at ({i}, {j}): {got} vs {exp}"
                    );
                }
            }
        }
    }

    #[test]
    fn each_kernel_agrees_with_the_reference() {
        let (m, k, n) = (6, 45, 11);
        let x = values(m * k, 1);
        let w = values(n * k, 2);
        let want = reference(&x, m, k, &w, n);
        type Kernel = unsafe fn(&[f32], usize, usize, &[f32], usize, usize, *mut f32, usize);
        let mut kernels: Vec<(&str, Kernel)> = vec![("baseline", baseline_columns)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(("avx512", avx512::columns));
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                kernels.push(("avx2", avx2::columns));
            }
        }
        for (name, kernel) in kernels {
            let mut y = vec![f32::NAN; m * n];
            unsafe { kernel(&x, m, k, &w, 0, n, y.as_mut_ptr(), n) };
            for (got, exp) in y.iter().zip(&want) {
                assert!((*got as f64 - exp).abs() < 1e-5, "{name}: {got} vs {exp}");
            }
        }
    }
}
