//! Fused f32 CPU kernels that keep their gradient.
//!
//! candle's own fused kernels (`candle_nn::ops::rms_norm`, `softmax_last_dim`, `rope`) have no
//! backward, and the composed differentiable versions (one tensor op per arithmetic step) are slow
//! and allocate a full-size tensor per step, forward and backward. Each op here is one custom op
//! with direct loops over rows, and a backward that is itself one direct-loop op.
//!
//! Every op takes contiguous f32 tensors on the CPU ([`supported`] says whether a tensor
//! qualifies); `crate::ops` and `crate::score` route everything else (f64 gradient checks, other
//! devices) to the composed versions. Rows are spread over rayon's pool when there are enough of
//! them to be worth it.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// Whether `x` can go through the fused kernels: f32 on the CPU (non-contiguous tensors are made
/// contiguous by the wrappers below).
pub fn supported(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu()
}

// ---------------------------------------------------------------------------------------------
// Row kernels (single-threaded, written so that the compiler vectorises the reductions: eight
// independent accumulators instead of one serial chain).

const LANES: usize = 8;

fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += c[k] * c[k];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|v| v * v).sum::<f32>()
}

/// Σ a·b in `LANES` partial sums (vectorised by the compiler); also the decode kernels' dot product.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ g·w·x over a row (the rms-norm backward's reduction).
fn dot3(g: &[f32], w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (cg, cw, cx) = (
        g.chunks_exact(LANES),
        w.chunks_exact(LANES),
        x.chunks_exact(LANES),
    );
    let tail: f32 = cg
        .remainder()
        .iter()
        .zip(cw.remainder())
        .zip(cx.remainder())
        .map(|((g, w), x)| g * w * x)
        .sum();
    for ((g, w), x) in cg.zip(cw).zip(cx) {
        for k in 0..LANES {
            acc[k] += g[k] * w[k] * x[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = acc[k].max(c[k]);
        }
    }
    tail.iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// log Σ exp(x · scale) over a row, stable (scale > 0). The sum is accumulated in f64: a
/// vocabulary-sized row (49k terms) summed in f32 loses ~1e-4 in the log-prob.
fn log_sum_exp(x: &[f32], scale: f32) -> f64 {
    let m = max(x) * scale;
    if m == f32::NEG_INFINITY || !m.is_finite() {
        // All -inf (or an inf/NaN in the row): the plain formula gives the IEEE answer.
        return x
            .iter()
            .map(|&v| ((v * scale) as f64).exp())
            .sum::<f64>()
            .ln();
    }
    m as f64 + crate::math::sum_exp(x, scale, m).ln()
}

// ---------------------------------------------------------------------------------------------
// Storage helpers.

/// A zero-filled buffer whose pages are written now, on the calling thread. `vec![0.0; n]` takes
/// fresh zero pages from the kernel without touching them; code that then reads a page before
/// writing it (an accumulation such as the attention backward's dK and dV) maps the shared zero
/// page and faults again on the write, and that second fault flushes the page from every core's
/// TLB. (That pattern cost the optimiser's first SmolLM2 step 2.6 s; for buffers that are only
/// written, the two allocations measured the same.)
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, 0f32);
    v
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: input must be contiguous")
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => bail!("{op}: expected f32, got {:?}", s.dtype()),
    }
}

/// A custom op's f32 input as a tensor of its own (a copy), for ops whose forward pass is made of
/// other tensor ops (a checkpointed layer, a quantised or LoRA projection).
pub(crate) fn input_tensor(s: &CpuStorage, l: &Layout, op: &str) -> Result<Tensor> {
    Tensor::from_slice(f32_slice(s, l, op)?, l.shape(), &candle_core::Device::Cpu)
}

/// A tensor's values as a custom op's f32 output.
pub(crate) fn output_storage(y: &Tensor) -> Result<(CpuStorage, Shape)> {
    Ok((
        CpuStorage::F32(y.flatten_all()?.to_vec1()?),
        y.shape().clone(),
    ))
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: input must be contiguous")
    };
    match s {
        CpuStorage::U32(v) => Ok(&v[a..b]),
        _ => bail!("{op}: expected u32 indices, got {:?}", s.dtype()),
    }
}

/// Below this many elements of work (a millisecond or less) an op runs on the calling thread:
/// waking rayon's workers costs more than it saves on small tensors, and much more on a loaded
/// 2-core machine, where a sleeping worker can take milliseconds to be scheduled.
const PAR_MIN_WORK: usize = 1 << 20;

/// Rows per parallel task: whole rows, a few tasks per thread, none too small to pay for itself.
/// Returns `rows` (one task: run inline) when the work is small.
fn rows_per_task(rows: usize, work_per_row: usize) -> usize {
    let work = rows * work_per_row.max(1);
    let threads = rayon::current_num_threads();
    if rows < 2 || work < PAR_MIN_WORK || threads < 2 {
        return rows.max(1);
    }
    let by_size = (work / (PAR_MIN_WORK / 8)).max(1);
    let tasks = (threads * 4).min(by_size).min(rows).max(1);
    rows.div_ceil(tasks)
}

/// Fill `out` (rows of `out_width`) block by block: `f(first_row, block)` gets whole rows.
fn par_rows<T, F>(out: &mut [T], out_width: usize, work_per_row: usize, f: F)
where
    T: Send,
    F: Fn(usize, &mut [T]) + Sync + Send,
{
    if out_width == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / out_width;
    let rpt = rows_per_task(rows, work_per_row);
    if rpt >= rows {
        f(0, out);
    } else {
        out.par_chunks_mut(rpt * out_width)
            .enumerate()
            .for_each(|(i, block)| f(i * rpt, block));
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.

/// RMSNorm over the last dimension with gradients for `x` and `weight`:
/// y = x / sqrt(mean(x²) + eps) · weight. `x`: (..., h), `weight`: (h), both f32 on the CPU.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    if weight.dims() != [h] {
        bail!(
            "rms_norm: weight shape {:?} does not match hidden size {h}",
            weight.dims()
        );
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let h = w.len();
        if h == 0 || x.len() % h != 0 {
            bail!("{}: {} elements are not rows of {h}", self.name(), x.len());
        }
        let eps = self.eps;
        let mut y = zeroed(x.len());
        par_rows(&mut y, h, h, |r0, block| {
            for (i, yr) in block.chunks_exact_mut(h).enumerate() {
                let xr = &x[(r0 + i) * h..(r0 + i + 1) * h];
                let r = 1.0 / (sum_sq(xr) / h as f32 + eps).sqrt();
                for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
                    *y = x * r * w;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let h = w.elem_count();
        // One op returns [dx (n) | dw (h)] in a single buffer; both are views of it.
        let both = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormBwd { eps: self.eps })?;
        let dx = both.narrow(0, 0, n)?.reshape(x.shape())?;
        // A frozen weight (LoRA's base) gets no gradient to add up.
        let dw = match w.track_op() {
            true => Some(both.narrow(0, n, h)?.reshape(w.shape())?),
            false => None,
        };
        Ok((Some(dx), dw))
    }
}

/// r = 1/sqrt(mean(x²)+eps); dx = r·(g·w) − x·r³·mean(g·w·x); dw = Σ_rows g·x·r.
struct RmsNormBwd {
    eps: f32,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "fused-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let (n, h) = (x.len(), w.len());
        if h == 0 || n % h != 0 || g.len() != n {
            bail!(
                "{}: shapes do not match ({n} / {h} / {})",
                self.name(),
                g.len()
            );
        }
        let rows = n / h;
        let eps = self.eps;
        let inv_h = 1.0 / h as f32;
        let mut out = zeroed(n + h);
        let (dx, dw) = out.split_at_mut(n);
        // Each block of rows writes its dx rows and returns its partial dw.
        let block = |r0: usize, dxb: &mut [f32]| -> Vec<f32> {
            let mut dw = zeroed(h);
            for (i, dxr) in dxb.chunks_exact_mut(h).enumerate() {
                let row = (r0 + i) * h..(r0 + i + 1) * h;
                let (xr, gr) = (&x[row.clone()], &g[row]);
                let r = 1.0 / (sum_sq(xr) * inv_h + eps).sqrt();
                let c = r * r * r * dot3(gr, w, xr) * inv_h;
                for (((d, &g), &w), &x) in dxr.iter_mut().zip(gr).zip(w).zip(xr) {
                    *d = r * g * w - x * c;
                }
                for ((dw, &g), &x) in dw.iter_mut().zip(gr).zip(xr) {
                    *dw += g * x * r;
                }
            }
            dw
        };
        let rpt = rows_per_task(rows, 2 * h);
        let partial = if rpt >= rows {
            block(0, dx)
        } else {
            dx.par_chunks_mut(rpt * h)
                .enumerate()
                .map(|(i, dxb)| block(i * rpt, dxb))
                .reduce(
                    || zeroed(h),
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                        a
                    },
                )
        };
        dw.copy_from_slice(&partial);
        Ok((CpuStorage::F32(out), Shape::from(n + h)))
    }
}

// ---------------------------------------------------------------------------------------------
// Linear map.

/// dst (m × n, row stride `dst_rs`) = [dst +] scale · A (m × k) · B (k × n) on the calling thread
/// (callers that spread whole matrices over rayon's pool). A and B are (pointer, row stride, column
/// stride), strides in elements, so transposed operands are read in place.
///
/// # Safety
/// Every pointer must be valid for the rows and columns its strides reach, and `dst` must not
/// alias `a` or `b` or be written by another thread meanwhile.
pub(crate) unsafe fn matmul(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    accumulate: bool,
    scale: f32,
) {
    matmul_with(
        gemm::Parallelism::None,
        dims,
        dst,
        dst_rs,
        a,
        b,
        accumulate,
        scale,
    )
}

/// [`matmul`] with the given threading (`gemm_parallelism()`: rayon's pool).
///
/// # Safety
/// As for [`matmul`].
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_with(
    parallelism: gemm::Parallelism,
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: isize,
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    accumulate: bool,
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        accumulate,
        a.0,
        a.2,
        a.1,
        b.0,
        b.2,
        b.1,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

fn gemm_parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// x · Wᵀ for `x` (..., k) and `weight` (n, k), f32 on the CPU, as one op with its own backward:
/// dx = g · W and dW = gᵀ · x, each one matrix multiply written straight into a contiguous
/// buffer. Through candle's `Linear` the same product is five graph nodes (two reshapes, a
/// transpose, the matmul) whose backward also builds Wᵀ-shaped gradients and adds them to W's
/// through a strided view.
pub fn linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (n, k) = weight.dims2()?;
    if x.dim(D::Minus1)? != k {
        bail!(
            "linear: input {:?} does not end in the weight's {k} columns ({n} x {k})",
            x.dims()
        );
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, Linear)
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let (n, k) = l2.shape().dims2()?;
        if k == 0 || x.len() % k != 0 || w.len() != n * k {
            bail!("{}: {} inputs are not rows of {k}", self.name(), x.len());
        }
        let m = x.len() / k;
        let mut y = zeroed(m * n);
        // y (m × n) = x (m × k) · Wᵀ, Wᵀ read in place: element (c, j) = W[j, c].
        let (xr, wt) = ((x.as_ptr(), k as isize, 1), (w.as_ptr(), 1, k as isize));
        unsafe {
            matmul_with(
                gemm_parallelism(),
                (m, n, k),
                y.as_mut_ptr(),
                n as isize,
                xr,
                wt,
                false,
                1.0,
            )
        };
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("checked: rank >= 1") = n;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = if x.track_op() {
            Some(
                g.apply_op2_no_bwd(w, &LinearInputGrad)?
                    .reshape(x.shape())?,
            )
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(g.apply_op2_no_bwd(x, &LinearWeightGrad)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// dx (m × k) = g (m × n) · W (n × k).
struct LinearInputGrad;

impl CustomOp2 for LinearInputGrad {
    fn name(&self) -> &'static str {
        "fused-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let (n, k) = l2.shape().dims2()?;
        if n == 0 || g.len() % n != 0 {
            bail!("{}: {} gradients are not rows of {n}", self.name(), g.len());
        }
        let m = g.len() / n;
        let mut dx = zeroed(m * k);
        let (gr, wr) = ((g.as_ptr(), n as isize, 1), (w.as_ptr(), k as isize, 1));
        unsafe {
            matmul_with(
                gemm_parallelism(),
                (m, k, n),
                dx.as_mut_ptr(),
                k as isize,
                gr,
                wr,
                false,
                1.0,
            )
        };
        Ok((CpuStorage::F32(dx), Shape::from((m, k))))
    }
}

/// dW (n × k) = gᵀ (n × m) · x (m × k).
struct LinearWeightGrad;

impl CustomOp2 for LinearWeightGrad {
    fn name(&self) -> &'static str {
        "fused-linear-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s1, l1, self.name())?;
        let x = f32_slice(s2, l2, self.name())?;
        let n = *l1.shape().dims().last().unwrap_or(&0);
        let k = *l2.shape().dims().last().unwrap_or(&0);
        if n == 0 || k == 0 || g.len() % n != 0 || x.len() != (g.len() / n) * k {
            bail!(
                "{}: gradient {:?} and input {:?} do not match",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let m = g.len() / n;
        let mut dw = zeroed(n * k);
        // gᵀ read in place: element (j, r) = g[r, j].
        let (gt, xr) = ((g.as_ptr(), 1, n as isize), (x.as_ptr(), k as isize, 1));
        unsafe {
            matmul_with(
                gemm_parallelism(),
                (n, k, m),
                dw.as_mut_ptr(),
                k as isize,
                gt,
                xr,
                false,
                1.0,
            )
        };
        Ok((CpuStorage::F32(dw), Shape::from((n, k))))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU.

/// silu(gate) · up, elementwise, with gradients for both: one pass instead of the composed
/// silu (itself several ops, each saved for backward) and product.
/// With σ = sigmoid(a): d/da = g·u·σ·(1 + a·(1 − σ)), d/du = g·a·σ.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, self.name())?;
        let u = f32_slice(s2, l2, self.name())?;
        if a.len() != u.len() {
            bail!("{}: {} vs {} elements", self.name(), a.len(), u.len());
        }
        let mut y = zeroed(a.len());
        let width = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        par_rows(&mut y, width, 4 * width, |r0, block| {
            let at = r0 * width;
            // e^(−a) for the whole block first (vectorised), then y = a · σ(a) · u.
            for (y, &a) in block.iter_mut().zip(&a[at..]) {
                *y = -a;
            }
            crate::math::exp_in_place(block);
            for ((y, &a), &u) in block.iter_mut().zip(&a[at..]).zip(&u[at..]) {
                *y = a * (1.0 / (1.0 + *y)) * u;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = gate.elem_count();
        // One op returns [d gate (n) | d up (n)]; both are views of it.
        let both = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SwiGluBwd)?;
        let da = both.narrow(0, 0, n)?.reshape(gate.shape())?;
        let du = both.narrow(0, n, n)?.reshape(up.shape())?;
        Ok((Some(da), Some(du)))
    }
}

struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "fused-swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = f32_slice(s1, l1, self.name())?;
        let u = f32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let n = a.len();
        if u.len() != n || g.len() != n {
            bail!("{}: {n} / {} / {} elements", self.name(), u.len(), g.len());
        }
        let width = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = zeroed(2 * n);
        let (da, du) = out.split_at_mut(n);
        let block = |r0: usize, da: &mut [f32], du: &mut [f32]| {
            let at = r0 * width;
            // e^(−a) into da first (vectorised), then σ(a) from it.
            for (da, &a) in da.iter_mut().zip(&a[at..]) {
                *da = -a;
            }
            crate::math::exp_in_place(da);
            for (((da, du), (&a, &u)), &g) in da
                .iter_mut()
                .zip(du.iter_mut())
                .zip(a[at..].iter().zip(&u[at..]))
                .zip(&g[at..])
            {
                let sg = 1.0 / (1.0 + *da);
                *du = g * a * sg;
                *da = g * u * sg * (1.0 + a * (1.0 - sg));
            }
        };
        let rows = n / width;
        let rpt = rows_per_task(rows, 6 * width);
        if rpt >= rows {
            block(0, da, du);
        } else {
            da.par_chunks_mut(rpt * width)
                .zip(du.par_chunks_mut(rpt * width))
                .enumerate()
                .for_each(|(i, (da, du))| block(i * rpt, da, du));
        }
        Ok((CpuStorage::F32(out), Shape::from(2 * n)))
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension.

/// Softmax over the last dimension with a gradient: dx = y·(g − Σ g·y).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let dims = l.shape().dims();
        let v = *dims.last().unwrap_or(&1);
        let mut y = zeroed(x.len());
        par_rows(&mut y, v, v, |r0, block| {
            for (i, yr) in block.chunks_exact_mut(v).enumerate() {
                let xr = &x[(r0 + i) * v..(r0 + i + 1) * v];
                let m = max(xr);
                for (y, &x) in yr.iter_mut().zip(xr) {
                    *y = x - m;
                }
                crate::math::exp_in_place(yr);
                let s: f64 = yr.iter().map(|&y| y as f64).sum();
                let inv = (1.0 / s) as f32;
                yr.iter_mut().for_each(|y| *y *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxBwd)?))
    }
}

struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        if y.len() != g.len() {
            bail!(
                "{}: gradient has {} elements, output {}",
                self.name(),
                g.len(),
                y.len()
            );
        }
        let v = *l1.shape().dims().last().unwrap_or(&1);
        let mut dx = zeroed(y.len());
        par_rows(&mut dx, v, 2 * v, |r0, block| {
            for (i, dr) in block.chunks_exact_mut(v).enumerate() {
                let row = (r0 + i) * v..(r0 + i + 1) * v;
                let (yr, gr) = (&y[row.clone()], &g[row]);
                let s = dot(gr, yr);
                for ((d, &y), &g) in dr.iter_mut().zip(yr).zip(gr) {
                    *d = y * (g - s);
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Token log-probs.

/// log softmax(logits / temperature)[target] per row, without materialising the log-softmax.
/// `logits`: (n, v) f32, `targets`: (n) u32 -> (n). The gradient flows to `logits` only:
/// dlogits = g · (onehot(target) − softmax(logits / T)) / T.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] {
        bail!(
            "token_logprobs: targets shape {:?}, expected [{n}]",
            targets.dims()
        );
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        bail!("token_logprobs: temperature must be positive and finite, got {temperature}");
    }
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    logits.contiguous()?.apply_op2(
        &targets,
        TokenLogprobs {
            inv_t: (1.0 / temperature) as f32,
            lse: std::sync::Mutex::new(None),
        },
    )
}

struct TokenLogprobs {
    inv_t: f32,
    /// Each row's log-sum-exp of logits / T, kept from the forward pass for the backward.
    lse: std::sync::Mutex<Option<Vec<f32>>>,
}

fn check_targets(targets: &[u32], v: usize, op: &str) -> Result<()> {
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("{op}: target {t} out of range for vocabulary {v}");
    }
    Ok(())
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "fused-token-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let t = u32_slice(s2, l2, self.name())?;
        let (n, v) = l1.shape().dims2()?;
        if t.len() != n {
            bail!("{}: {} targets for {n} rows", self.name(), t.len());
        }
        check_targets(t, v, self.name())?;
        let inv_t = self.inv_t;
        let mut lse = vec![0f64; n];
        par_rows(&mut lse, 1, v, |r0, block| {
            for (i, l) in block.iter_mut().enumerate() {
                *l = log_sum_exp(&x[(r0 + i) * v..(r0 + i + 1) * v], inv_t);
            }
        });
        let out: Vec<f32> = (0..n)
            .map(|i| ((x[i * v + t[i] as usize] * inv_t) as f64 - lse[i]) as f32)
            .collect();
        let lse = lse.into_iter().map(|l| l as f32).collect();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let op = TokenLogprobsBwd {
            inv_t: self.inv_t,
            lse,
        };
        let dlogits = logits.apply_op3_no_bwd(targets, &g.contiguous()?, &op)?;
        Ok((Some(dlogits), None))
    }
}

struct TokenLogprobsBwd {
    inv_t: f32,
    /// From the forward pass; recomputed when absent.
    lse: Option<Vec<f32>>,
}

impl CustomOp3 for TokenLogprobsBwd {
    fn name(&self) -> &'static str {
        "fused-token-logprobs-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let t = u32_slice(s2, l2, self.name())?;
        let g = f32_slice(s3, l3, self.name())?;
        let (n, v) = l1.shape().dims2()?;
        if t.len() != n || g.len() != n {
            bail!(
                "{}: {} targets and {} gradients for {n} rows",
                self.name(),
                t.len(),
                g.len()
            );
        }
        check_targets(t, v, self.name())?;
        let lse = self.lse.as_deref().filter(|l| l.len() == n);
        let inv_t = self.inv_t;
        let mut dx = zeroed(n * v);
        par_rows(&mut dx, v, v, |r0, block| {
            for (i, dr) in block.chunks_exact_mut(v).enumerate() {
                let r = r0 + i;
                let xr = &x[r * v..(r + 1) * v];
                let scale = g[r] * inv_t;
                if scale == 0.0 {
                    // Masked-out position: the buffer is already zero.
                    continue;
                }
                let lse = match lse {
                    Some(l) => l[r],
                    None => log_sum_exp(xr, inv_t) as f32,
                };
                for (d, &x) in dr.iter_mut().zip(xr) {
                    *d = x * inv_t - lse;
                }
                crate::math::exp_in_place(dr);
                for d in dr.iter_mut() {
                    *d *= -scale;
                }
                dr[t[r] as usize] += scale;
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------------
// Rotary position embedding (rotate-half layout).

/// RoPE in Hugging Face's rotate-half layout with a gradient for `x` (and for `cos` / `sin` in the
/// unusual case that they are part of a gradient graph). `x`: (b, heads, t, d); `cos`, `sin`:
/// (b, t, d / 2). The backward of rope with (cos, sin) is rope with (cos, −sin).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_layout(x, cos, sin, false)
}

/// [`rope`] for `x` in the projections' own layout (batch, seq, heads, head_dim): no transposed
/// copy of q and k, and none of their gradients, is ever made.
pub fn rope_time_first(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_layout(x, cos, sin, true)
}

fn rope_layout(x: &Tensor, cos: &Tensor, sin: &Tensor, time_first: bool) -> Result<Tensor> {
    let (b, a1, a2, d) = x.dims4()?;
    let t = if time_first { a1 } else { a2 };
    if d % 2 != 0 || cos.dims() != [b, t, d / 2] || sin.dims() != [b, t, d / 2] {
        let layout = if time_first {
            "(b, t, heads, d)"
        } else {
            "(b, heads, t, d)"
        };
        bail!(
            "rope: x {:?} {layout} with cos {:?} / sin {:?}, expected (b, t, d/2) tables",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    x.contiguous()?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope {
            inverse: false,
            time_first,
        },
    )
}

/// `inverse`: rotate by −angle (sin negated): the backward of the forward rotation.
/// `time_first`: x is (b, t, heads, d) instead of (b, heads, t, d).
struct Rope {
    inverse: bool,
    time_first: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let cos = f32_slice(s2, l2, self.name())?;
        let sin = f32_slice(s3, l3, self.name())?;
        let (b, a1, a2, d) = l1.shape().dims4()?;
        let (nh, t) = if self.time_first { (a2, a1) } else { (a1, a2) };
        let time_first = self.time_first;
        let half = d / 2;
        if d % 2 != 0 || cos.len() != b * t * half || sin.len() != cos.len() {
            bail!(
                "{}: tables do not match x {:?}",
                self.name(),
                l1.shape().dims()
            );
        }
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let mut y = zeroed(x.len());
        par_rows(&mut y, d, d, |r0, block| {
            for (i, yr) in block.chunks_exact_mut(d).enumerate() {
                let r = r0 + i; // row index over (b, nh, t), or (b, t, nh) time first
                let (bi, ti) = if time_first {
                    (r / (nh * t), (r / nh) % t)
                } else {
                    (r / (nh * t), r % t)
                };
                let tab = (bi * t + ti) * half..(bi * t + ti + 1) * half;
                let (c, s) = (&cos[tab.clone()], &sin[tab]);
                let (x1, x2) = x[r * d..(r + 1) * d].split_at(half);
                let (y1, y2) = yr.split_at_mut(half);
                for k in 0..half {
                    let sk = sign * s[k];
                    y1[k] = x1[k] * c[k] - x2[k] * sk;
                    y2[k] = x2[k] * c[k] + x1[k] * sk;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = g.apply_op3_no_bwd(
            cos,
            sin,
            &Rope {
                inverse: !self.inverse,
                time_first: self.time_first,
            },
        )?;
        if !cos.track_op() && !sin.track_op() {
            return Ok((Some(dx), None, None));
        }
        // Table gradients (never needed by the model, whose tables come from integer positions):
        // y1 = x1·c − x2·s', y2 = x2·c + x1·s' with s' = ±s, summed over heads.
        let half = x.dim(D::Minus1)? / 2;
        let (x1, x2) = (
            x.narrow(D::Minus1, 0, half)?,
            x.narrow(D::Minus1, half, half)?,
        );
        let (g1, g2) = (
            g.narrow(D::Minus1, 0, half)?,
            g.narrow(D::Minus1, half, half)?,
        );
        let heads_axis = if self.time_first { 2 } else { 1 };
        let dcos = ((&g1 * &x1)? + (&g2 * &x2)?)?.sum(heads_axis)?;
        let mut dsin = ((&g2 * &x1)? - (&g1 * &x2)?)?.sum(heads_axis)?;
        if self.inverse {
            dsin = dsin.neg()?;
        }
        Ok((Some(dx), Some(dcos), Some(dsin)))
    }
}
