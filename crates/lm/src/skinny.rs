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
//!
//! With more than 8 rows (a batch of 32 samples) the product is bound by arithmetic, not by reading
//! the weight, and the dot-product tiles above reach only about 60 GFLOP/s per core: every
//! multiply-add needs half a load and each output ends in a sum across lanes. Inside a generation
//! ([`PackedScope`]) each weight is then repacked once into panels of 48 of its rows, stored
//! column by column, and the product runs as outer products: per step along k, three vector loads
//! of the panel and eight broadcasts of x feed 24 accumulators (8 rows of x by 48 outputs), with no
//! sum across lanes. In a probe over SmolLM2's layers with 32 rows on one core that ran at about
//! 89 GFLOP/s against 61 (docs/performance.md). The packed copies live as long as the scope.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{bail, CpuStorage, Layout, Tensor, TensorId};
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
    let weights: Vec<Weight> = weights.iter().map(|&(w, n)| Weight::Rows(w, n)).collect();
    product(x, m, k, &weights)
}

/// y (m × n) = x (m × k) · Wᵀ for a weight packed by [`PackedWeight::new`].
pub fn xwt_packed(x: &[f32], m: usize, k: usize, w: &PackedWeight) -> Vec<f32> {
    product(x, m, k, &[Weight::Packed(w)])
        .pop()
        .expect("one weight, one output")
}

/// A weight as the product reads it: its stored (n × k) rows, or panels made by [`PackedWeight`].
#[derive(Clone, Copy)]
enum Weight<'a> {
    Rows(&'a [f32], usize),
    Packed(&'a PackedWeight),
}

impl Weight<'_> {
    fn n(&self) -> usize {
        match self {
            Weight::Rows(_, n) => *n,
            Weight::Packed(p) => p.n,
        }
    }
}

/// The products of one x with every weight, over the thread pool (see [`xwt_many`]).
fn product(x: &[f32], m: usize, k: usize, weights: &[Weight]) -> Vec<Vec<f32>> {
    assert_eq!(x.len(), m * k, "xwt: x is not {m} x {k}");
    for w in weights {
        match w {
            Weight::Rows(w, n) => assert_eq!(w.len(), n * k, "xwt: W is not {n} x {k}"),
            Weight::Packed(p) => assert_eq!(p.k, k, "xwt: packed W takes rows of {}, not {k}", p.k),
        }
    }
    let mut ys: Vec<Vec<f32>> = weights.iter().map(|w| vec![0.0f32; m * w.n()]).collect();
    let total_n: usize = weights.iter().map(Weight::n).sum();
    // The packed products read x in groups of rows, each group stored column by column.
    let grouped = weights
        .iter()
        .any(|w| matches!(w, Weight::Packed(_)))
        .then(|| group_rows(x, m, k));
    let threads = rayon::current_num_threads();
    // Tasks: the same number per thread (a few, for balance), each a share of every weight.
    let tasks = if threads > 1 && m * total_n * k >= PAR_MIN_MACS {
        threads * (total_n / (64 * threads)).clamp(1, 4)
    } else {
        1
    };
    let outs: Vec<SharedOut> = ys.iter_mut().map(|y| SharedOut(y.as_mut_ptr())).collect();
    let run = |t: usize| {
        for (w, out) in weights.iter().zip(&outs) {
            match w {
                Weight::Rows(w, n) => {
                    let share = n.div_ceil(tasks).next_multiple_of(TILE_W);
                    let (j0, j1) = ((t * share).min(*n), ((t + 1) * share).min(*n));
                    if j0 < j1 {
                        // SAFETY: task t writes only columns j0..j1 of this output, which no
                        // other task writes; the outputs outlive the tasks, and x and W are
                        // read-only.
                        unsafe { columns(x, m, k, w, j0, j1, out.ptr(), *n) };
                    }
                }
                Weight::Packed(p) => {
                    let count = p.panels();
                    let share = count.div_ceil(tasks);
                    let (p0, p1) = ((t * share).min(count), ((t + 1) * share).min(count));
                    if p0 < p1 {
                        let grouped = grouped.as_deref().expect("x grouped for packed weights");
                        // SAFETY: as above, for the columns of panels p0..p1.
                        unsafe { packed_columns(grouped, m, k, p, p0, p1, out.ptr()) };
                    }
                }
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
    let pack = m >= PACK_MIN_ROWS && packing_pays();
    let mut packed: Vec<Option<Arc<PackedWeight>>> = Vec::with_capacity(weights.len());
    let mut rows = Vec::with_capacity(weights.len());
    for (weight, (s, l)) in weights.iter().zip(&guards) {
        let (n, wk) = l.shape().dims2()?;
        if wk != k {
            bail!("linear_many: weight {n} x {wk} does not take rows of {k}");
        }
        let w = host_f32(s, l, "weight")?;
        packed.push(if pack && n >= PANEL {
            PackedScope::get_or_pack(weight.id(), w, n, k)
        } else {
            None
        });
        rows.push((w, n));
    }
    let ws: Vec<Weight> = rows
        .iter()
        .zip(&packed)
        .map(|(&(w, n), p)| match p {
            Some(p) => Weight::Packed(p),
            None => Weight::Rows(w, n),
        })
        .collect();
    product(x_host, m, k, &ws)
        .into_iter()
        .zip(&ws)
        .map(|(y, w)| {
            let mut dims = lead.to_vec();
            dims.push(w.n());
            Tensor::from_vec(y, dims, x.device())
        })
        .collect()
}

/// Rows of x from which a product inside a [`PackedScope`] reads packed weights. At 8 rows and
/// fewer the product waits on memory, not arithmetic, and the stored layout is as fast (probe:
/// 47 vs 46 ms for SmolLM2's weights at 8 rows).
pub const PACK_MIN_ROWS: usize = 9;

/// Output columns (weight rows) per packed panel: three 16-lane vectors.
const PANEL: usize = 48;

/// Rows of x per pass over a panel: 8 rows x 3 vectors = 24 accumulators of the 32 registers.
const GROUP: usize = 8;

/// Panels ahead that the first pass over a panel prefetches (into L1; the panel of the next few
/// steps is about 110 KB for k = 576). Probe at 32 rows: 2 ahead 89 GFLOP/s, 1 ahead 75, 4 ahead
/// 82, none 68.
const PREFETCH_PANELS: usize = 2;

/// Whether packing pays on this CPU: the packed kernel needs AVX-512's 32 vector registers; on
/// other CPUs the stored layout's kernel is used (the packed product still computes the same
/// numbers there, through a plain loop).
fn packing_pays() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight (n × k) repacked for the outer-product kernel: panel p holds rows 48p..48p+48, stored
/// column by column (element c·48 + j is W[48p + j, c]), the last panel padded with zero rows.
pub struct PackedWeight {
    n: usize,
    k: usize,
    data: Vec<f32>,
}

impl PackedWeight {
    /// Pack W (n × k, row-major), in parallel over panels.
    pub fn new(w: &[f32], n: usize, k: usize) -> PackedWeight {
        assert_eq!(w.len(), n * k, "pack: W is not {n} x {k}");
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0.0f32; panels * PANEL * k];
        data.par_chunks_mut(PANEL * k)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..PANEL.min(n - p * PANEL) {
                    let row = &w[(p * PANEL + j) * k..(p * PANEL + j + 1) * k];
                    for (c, &v) in row.iter().enumerate() {
                        panel[c * PANEL + j] = v;
                    }
                }
            });
        PackedWeight { n, k, data }
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL)
    }
}

thread_local! {
    /// The packed copies of the current [`PackedScope`] on this thread, by weight tensor.
    static PACKED: RefCell<Option<HashMap<TensorId, Arc<PackedWeight>>>> =
        const { RefCell::new(None) };
}

/// While alive, products with more than 8 rows on this thread read packed copies of their
/// weights, made at first use and dropped with the scope (a generation: the weights do not change
/// while it runs; they change between generations, so nothing is kept across scopes). Nested
/// scopes share the outermost one's copies.
pub struct PackedScope {
    outermost: bool,
}

impl PackedScope {
    /// A scope for a generation of `rows` rows: packing pays only if its decode steps have more
    /// than 8 rows (a batch-1 prefill of 20 prompt tokens would otherwise pack every weight for
    /// one product). Fewer rows give a scope that packs nothing.
    pub fn for_rows(rows: usize) -> Option<PackedScope> {
        (rows >= PACK_MIN_ROWS).then(PackedScope::enter)
    }

    pub fn enter() -> PackedScope {
        let outermost = PACKED.with(|p| {
            let mut p = p.borrow_mut();
            let fresh = p.is_none();
            if fresh {
                *p = Some(HashMap::new());
            }
            fresh
        });
        PackedScope { outermost }
    }

    /// The packed copy of the weight `id` (whose values are `w`), packing it now if the scope has
    /// none yet; `None` outside a scope.
    fn get_or_pack(id: TensorId, w: &[f32], n: usize, k: usize) -> Option<Arc<PackedWeight>> {
        let known = PACKED.with(|p| {
            let p = p.borrow();
            p.as_ref().map(|map| map.get(&id).cloned())
        })?;
        if let Some(packed) = known {
            return Some(packed);
        }
        // Packed outside the borrow: packing runs on the thread pool, where this thread may pick
        // up other work that multiplies.
        let packed = Arc::new(PackedWeight::new(w, n, k));
        PACKED.with(|p| {
            if let Some(map) = p.borrow_mut().as_mut() {
                map.insert(id, packed.clone());
            }
        });
        Some(packed)
    }
}

impl Drop for PackedScope {
    fn drop(&mut self) {
        if self.outermost {
            let bytes: usize = PACKED.with(|p| {
                p.borrow_mut()
                    .take()
                    .map_or(0, |m| m.values().map(|w| w.data.len() * 4).sum())
            });
            if bytes >= TRIM_MIN_BYTES {
                // Hand the copies' pages back to the system: many of them are small enough for
                // glibc to keep in its heap after they are freed, where they stayed resident and
                // added their size to the next training step's peak (RLOO: 4.5 -> 5.0 GiB).
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                // SAFETY: malloc_trim only releases free memory of the allocator.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        }
    }
}

/// Packed copies smaller than this in all are left to the allocator when a scope ends: trimming
/// after every generation of a small model (the testbed's, a few MB) made the following allocations
/// fault their pages in again (`compare-online`: system time 13 -> 29 s).
const TRIM_MIN_BYTES: usize = 64 << 20;

/// x (m × k) in groups of [`GROUP`] rows, each group column by column (element c·8 + i of group g
/// is x[8g + i, c]), the last group padded with zero rows.
fn group_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let groups = m.div_ceil(GROUP);
    let mut out = vec![0.0f32; groups * GROUP * k];
    for i in 0..m {
        let (g, r) = (i / GROUP, i % GROUP);
        let group = &mut out[g * GROUP * k..(g + 1) * GROUP * k];
        for (c, &v) in x[i * k..(i + 1) * k].iter().enumerate() {
            group[c * GROUP + r] = v;
        }
    }
    out
}

/// The columns of panels p0..p1 of y = x · Wᵀ (y is m × n), W packed, x grouped by
/// [`group_rows`]; dispatched to the AVX-512 kernel where the CPU has it.
///
/// # Safety
/// `y` must be valid for m rows of `w.n` elements, and those columns not written by anyone else.
unsafe fn packed_columns(
    grouped: &[f32],
    m: usize,
    k: usize,
    w: &PackedWeight,
    p0: usize,
    p1: usize,
    y: *mut f32,
) {
    assert!(grouped.len() >= m.div_ceil(GROUP) * GROUP * k && p1 <= w.panels());
    let mut tile = [0.0f32; GROUP * PANEL];
    for p in p0..p1 {
        let panel = &w.data[p * PANEL * k..(p + 1) * PANEL * k];
        let cols = PANEL.min(w.n - p * PANEL);
        for g in 0..m.div_ceil(GROUP) {
            let xs = &grouped[g * GROUP * k..(g + 1) * GROUP * k];
            // The first group's pass also pulls a panel further on (this task's own) into cache.
            let ahead = (g == 0 && p + PREFETCH_PANELS < p1)
                .then(|| w.data[(p + PREFETCH_PANELS) * PANEL * k..].as_ptr());
            panel_tile(xs, k, panel, &mut tile, ahead);
            for i in 0..GROUP.min(m - g * GROUP) {
                let row = y.add((g * GROUP + i) * w.n + p * PANEL);
                std::ptr::copy_nonoverlapping(tile[i * PANEL..].as_ptr(), row, cols);
            }
        }
    }
}

/// tile[i·48 + j] = Σ_c xs[c·8 + i] · panel[c·48 + j], the best kernel this CPU runs.
fn panel_tile(
    xs: &[f32],
    k: usize,
    panel: &[f32],
    tile: &mut [f32; GROUP * PANEL],
    ahead: Option<*const f32>,
) {
    assert!(xs.len() >= GROUP * k && panel.len() >= PANEL * k);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the lengths were checked above.
            return unsafe { avx512_panel::tile(xs.as_ptr(), k, panel.as_ptr(), tile, ahead) };
        }
    }
    let _ = ahead;
    portable_panel_tile(xs, k, panel, tile)
}

/// [`panel_tile`] for any CPU: the same sums in the same order, one lane at a time.
fn portable_panel_tile(xs: &[f32], k: usize, panel: &[f32], tile: &mut [f32; GROUP * PANEL]) {
    tile.fill(0.0);
    for c in 0..k {
        let wc = &panel[c * PANEL..(c + 1) * PANEL];
        for i in 0..GROUP {
            let xv = xs[c * GROUP + i];
            for (t, &wv) in tile[i * PANEL..(i + 1) * PANEL].iter_mut().zip(wc) {
                *t = xv.mul_add(wv, *t);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512_panel {
    use super::{GROUP, PANEL};
    use std::arch::x86_64::*;

    /// See [`super::panel_tile`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn tile(
        xs: *const f32,
        k: usize,
        panel: *const f32,
        tile: &mut [f32; GROUP * PANEL],
        ahead: Option<*const f32>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; GROUP];
        for c in 0..k {
            let w = panel.add(c * PANEL);
            let wv = [
                _mm512_loadu_ps(w),
                _mm512_loadu_ps(w.add(16)),
                _mm512_loadu_ps(w.add(32)),
            ];
            if let Some(next) = ahead {
                // The same step of the panel further on: three 64-byte lines.
                for v in 0..3 {
                    _mm_prefetch::<_MM_HINT_T0>(next.add(c * PANEL + 16 * v) as *const i8);
                }
            }
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xs.add(c * GROUP + i));
                for (a, w) in acc_i.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(xv, *w, *a);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (v, a) in acc_i.iter().enumerate() {
                _mm512_storeu_ps(tile.as_mut_ptr().add(i * PANEL + 16 * v), *a);
            }
        }
    }
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

    /// y (m × n) = x · Wᵀ within f32 rounding of the f64 sums (which grows with √k).
    fn assert_matches_reference(y: &[f32], x: &[f32], m: usize, k: usize, w: &[f32], n: usize) {
        let want = reference(x, m, k, w, n);
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
            assert_matches_reference(&y, &x, m, k, &w, n);
        }
    }

    #[test]
    fn packed_product_matches_f64_reference_on_every_panel_and_group_shape() {
        // Rows: one partial group, exact groups, a partial last group; columns: fewer than a
        // panel, exact panels, a partial last panel; k: odd, not a multiple of a vector.
        for &(m, k, n) in &[
            (9, 37, 48),
            (16, 64, 47),
            (17, 576, 200),
            (32, 100, 96),
            (33, 15, 145),
        ] {
            let x = values(m * k, (m * 7 + k) as u32);
            let w = values(n * k, (n * 3 + k) as u32);
            let y = xwt_packed(&x, m, k, &PackedWeight::new(&w, n, k));
            assert_matches_reference(&y, &x, m, k, &w, n);
        }
    }

    #[test]
    fn packed_tile_kernels_agree_with_the_portable_one() {
        let k = 29;
        let xs = values(GROUP * k, 5);
        let panel = values(PANEL * k, 6);
        let mut want = [0.0f32; GROUP * PANEL];
        portable_panel_tile(&xs, k, &panel, &mut want);
        // The portable tile against sums in f64.
        for i in 0..GROUP {
            for j in 0..PANEL {
                let exp: f64 = (0..k)
                    .map(|c| xs[c * GROUP + i] as f64 * panel[c * PANEL + j] as f64)
                    .sum();
                assert!((want[i * PANEL + j] as f64 - exp).abs() < 1e-5);
            }
        }
        let mut got = [f32::NAN; GROUP * PANEL];
        panel_tile(&xs, k, &panel, &mut got, None);
        // One multiply-add per step in the same order: the same bits.
        assert_eq!(got, want);
    }

    #[test]
    fn a_scope_packs_each_weight_once_and_forgets_it_on_exit() {
        let (m, k, n) = (12, 64, 96);
        let x = Tensor::from_vec(values(m * k, 8), (m, k), &candle_core::Device::Cpu).unwrap();
        let w = Tensor::from_vec(values(n * k, 9), (n, k), &candle_core::Device::Cpu).unwrap();
        let plain = linear_many(&x, &[&w]).unwrap().remove(0);
        let count = || PACKED.with(|p| p.borrow().as_ref().map(HashMap::len));
        assert_eq!(count(), None);
        {
            let _scope = PackedScope::enter();
            let packed = linear_many(&x, &[&w]).unwrap().remove(0);
            let again = linear_many(&x, &[&w]).unwrap().remove(0);
            let expected = usize::from(packing_pays());
            assert_eq!(count(), Some(expected));
            {
                let _inner = PackedScope::enter();
                linear_many(&x, &[&w]).unwrap();
                assert_eq!(count(), Some(expected));
            }
            // The inner scope left the outer one's copies alone.
            assert_eq!(count(), Some(expected));
            let diff = (packed - &plain).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
            let same = (again - &plain).unwrap().abs().unwrap().max_all().unwrap();
            assert!(same.to_scalar::<f32>().unwrap() < 1e-4);
        }
        assert_eq!(count(), None);
        // A generation of 8 rows packs nothing; of 9, it does.
        assert!(PackedScope::for_rows(PACK_MIN_ROWS - 1).is_none());
        let scope = PackedScope::for_rows(PACK_MIN_ROWS);
        assert!(scope.is_some() && count() == Some(0));
        drop(scope);
        assert_eq!(count(), None);
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
