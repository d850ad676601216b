//! Fused scaled-dot-product attention for the CPU, with grouped-query heads and a backward that
//! recomputes the attention probabilities instead of keeping them.
//!
//! The composed path (`q·kᵀ`, × 1/√d, + mask, softmax, `·v`, with `repeat_kv` copies of K and V)
//! keeps four (b, nh, t, s) tensors per layer in the training graph (about 2.3 GB for SmolLM2 at
//! 8 × 256) and two expanded copies of K and V. This op keeps only its inputs q, k, v and its
//! output o, all (…, d)-sized, and works one (batch row, head) at a time on a (t, s) scratch:
//!
//! ```text
//! forward:   S = scale · Q Kᵀ + M          P = softmax_rows(S)        O = P V
//! backward:  recompute P;  dP = dO Vᵀ;  Dᵢ = Σ_d dOᵢ·Oᵢ;  dS = P ∘ (dP − D)
//!            dQ = scale · dS K;  dK = scale · dSᵀ Q;  dV = Pᵀ dO
//! ```
//!
//! (Dᵢ = Σⱼ Pᵢⱼ dPᵢⱼ, computed from O and dO in O(d) instead of O(s).) The query heads of one
//! key/value group read the same K and V rows in place, so no copy of K or V is made; their dK and
//! dV contributions are summed by the task that owns the group.
//!
//! The additive mask M (causal and key padding, `crate::batch::TokenBatch::mask`) is host data
//! shared by every layer of a forward pass: it carries no gradient.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::fused::{matmul, zeroed};

/// The additive attention mask as host rows: entry (i, row, key) at `values[(i·t + row)·s + key]`,
/// i over `batch` (1 = one mask broadcast over every batch row).
pub struct AttentionMask {
    values: Vec<f32>,
    batch: usize,
    t: usize,
    s: usize,
    /// Per mask row (`batch` of them): query blocks and the key span each needs.
    blocks: Vec<Vec<Block>>,
}

/// Query rows `rows` attend only to keys `keys`: every key outside is masked for all of them
/// (a causal mask leaves the upper triangle out, about half the work). A block holding a padding
/// query (every key masked: a uniform row over all keys, as in the composed path) spans all keys.
#[derive(Clone, Debug)]
struct Block {
    rows: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
}

/// Query rows per block: small enough that a causal block wastes little, large enough for the
/// matrix multiplies to run at speed.
const BLOCK_ROWS: usize = 32;

/// A mask value at or below this is a masked key (`crate::llama::MASKED` is -1e9).
const MASKED_BELOW: f32 = crate::llama::MASKED / 2.0;

fn blocks_of(mask: &[f32], t: usize, s: usize) -> Vec<Block> {
    let live = |row: usize| -> Option<(usize, usize)> {
        let r = &mask[row * s..(row + 1) * s];
        let lo = r.iter().position(|&m| m > MASKED_BELOW)?;
        let hi = s - r.iter().rev().position(|&m| m > MASKED_BELOW)?;
        Some((lo, hi))
    };
    (0..t)
        .step_by(BLOCK_ROWS)
        .map(|r0| {
            let rows = r0..(r0 + BLOCK_ROWS).min(t);
            let mut keys = s..0;
            for row in rows.clone() {
                match live(row) {
                    Some((lo, hi)) => keys = keys.start.min(lo)..keys.end.max(hi),
                    None => keys = 0..s,
                }
            }
            Block { rows, keys }
        })
        .collect()
}

impl AttentionMask {
    /// From an additive mask tensor broadcastable to (b, 1, t, s) (`TokenBatch::mask`'s layout).
    pub fn from_tensor(mask: &Tensor, b: usize, t: usize, s: usize) -> Result<Arc<Self>> {
        let dims = mask.dims();
        let mb = if dims.len() == 4 && dims[0] == b {
            b
        } else {
            1
        };
        let values = mask
            .to_dtype(candle_core::DType::F32)?
            .broadcast_as((mb, 1, t, s))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let blocks = (0..mb)
            .map(|i| blocks_of(&values[i * t * s..(i + 1) * t * s], t, s))
            .collect();
        Ok(Arc::new(AttentionMask {
            values,
            batch: mb,
            t,
            s,
            blocks,
        }))
    }

    /// (query rows, keys) of every batch row's mask.
    pub fn dims(&self) -> (usize, usize) {
        (self.t, self.s)
    }

    /// The additive mask of batch row `i`, query row `row`: one value per key.
    pub(crate) fn row(&self, i: usize, row: usize) -> &[f32] {
        let start = ((i % self.batch) * self.t + row) * self.s;
        &self.values[start..start + self.s]
    }

    fn blocks(&self, i: usize) -> &[Block] {
        &self.blocks[i % self.batch]
    }
}

/// Attention for `q` (b, t, nh, d), `k` and `v` (b, s, nkv, d) — the projections' own layout, so
/// no transposed copies — f32 on the CPU, any strides with a unit stride on d. Returns
/// (b, t, nh · d), the layout the output projection reads.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Arc<AttentionMask>,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, nh, d) = q.dims4()?;
    let (kb, s, nkv, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if nkv == 0 || nh % nkv != 0 {
        bail!("attention: {nh} query heads are not groups of {nkv} key/value heads");
    }
    if mask.t != t || mask.s != s || (mask.batch != 1 && mask.batch != b) {
        bail!(
            "attention: mask is ({}, {}, {}), scores are ({b}, {t}, {s})",
            mask.batch,
            mask.t,
            mask.s
        );
    }
    let unit = |x: &Tensor| -> Result<Tensor> {
        if x.stride()[3] == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    unit(q)?.apply_op3(
        &unit(k)?,
        &unit(v)?,
        Attention {
            mask,
            scale: scale as f32,
        },
    )
}

struct Attention {
    mask: Arc<AttentionMask>,
    scale: f32,
}

/// A 4-d f32 operand: its storage, dims, strides (elements) and start offset.
struct View<'a> {
    data: &'a [f32],
    dims: [usize; 4],
    stride: [usize; 4],
    offset: usize,
}

impl<'a> View<'a> {
    fn new(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Self> {
        let CpuStorage::F32(data) = s else {
            bail!("attention: {what} must be f32, got {:?}", s.dtype())
        };
        let (dims, stride) = (l.dims(), l.stride());
        if dims.len() != 4 || stride[3] != 1 {
            bail!("attention: {what} must be 4-d with a unit stride on the last dim");
        }
        // The furthest element read must lie inside the storage.
        let last = l.start_offset()
            + (0..4)
                .map(|i| dims[i].saturating_sub(1) * stride[i])
                .sum::<usize>();
        if dims.contains(&0) || last >= data.len() {
            bail!("attention: {what} layout does not fit its storage");
        }
        // Stored as (b, t, heads, d); viewed as (b, heads, t, d) matrices.
        Ok(View {
            data,
            dims: [dims[0], dims[2], dims[1], dims[3]],
            stride: [stride[0], stride[2], stride[1], stride[3]],
            offset: l.start_offset(),
        })
    }

    /// Pointer to row 0 of matrix (i, h) and the row stride.
    fn matrix(&self, i: usize, h: usize) -> (*const f32, isize) {
        let at = self.offset + i * self.stride[0] + h * self.stride[1];
        (self.data[at..].as_ptr(), self.stride[2] as isize)
    }
}

fn cpu_view<'a>(t: &'a Storage, l: &Layout, what: &str) -> Result<View<'a>> {
    match t {
        Storage::Cpu(s) => View::new(s, l, what),
        _ => bail!("attention: {what} must be on the CPU"),
    }
}

/// A raw pointer that may cross into rayon tasks: each task writes a region no other task writes.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its raw field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Per-thread (t, s) scratch: scores/probabilities and their gradient.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Run `f(task)` for every task, on rayon's pool when the work is worth it.
fn for_each_task(tasks: usize, work_per_task: usize, f: impl Fn(usize) + Sync + Send) {
    if tasks > 1 && tasks * work_per_task >= 1 << 20 && rayon::current_num_threads() > 1 {
        (0..tasks).into_par_iter().for_each(f);
    } else {
        (0..tasks).for_each(f);
    }
}

struct Shapes {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    s: usize,
    d: usize,
}

impl Attention {
    /// P = softmax(scale · Q Kᵀ + M) for batch row `i`, query head `h`, the rows and keys of
    /// `block`, into `p` ((rows × keys), row stride = the block's key count). Keys outside the
    /// block's span have probability exactly 0 (exp of about -1e9 in f32), so they are skipped.
    fn probabilities(
        &self,
        q: &View,
        k: &View,
        sh: &Shapes,
        (i, h): (usize, usize),
        block: &Block,
        p: &mut [f32],
    ) {
        let d = sh.d;
        let (rows, w) = (block.rows.len(), block.keys.len());
        let group = h / (sh.nh / sh.nkv);
        let (qp, q_rs) = q.matrix(i, h);
        let (kp, k_rs) = k.matrix(i, group);
        let p = &mut p[..rows * w];
        // Kᵀ as a (d × keys) operand: element (c, j) = K[lo + j, c].
        unsafe {
            matmul(
                (rows, w, d),
                p.as_mut_ptr(),
                w as isize,
                (qp.offset(block.rows.start as isize * q_rs), q_rs, 1),
                (kp.offset(block.keys.start as isize * k_rs), 1, k_rs),
                false,
                self.scale,
            )
        };
        for (pr, row) in p.chunks_exact_mut(w).zip(block.rows.clone()) {
            for (x, &m) in pr
                .iter_mut()
                .zip(&self.mask.row(i, row)[block.keys.clone()])
            {
                *x += m;
            }
            softmax_in_place(pr);
        }
    }
}

/// p ← softmax(p) over one row of scores: e^(x − max) through the vectorised `math::exp_in_place`
/// (the C library's `expf`, one call per score, was 4% of a training step), the sum in f64 over
/// eight independent partial sums (vectorisable, unlike one running f64 sum).
fn softmax_in_place(p: &mut [f32]) {
    // Not f32::max, whose NaN rule keeps the loop scalar (a NaN score makes the row NaN anyway).
    let max = p
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| if x > a { x } else { a });
    for x in p.iter_mut() {
        *x -= max;
    }
    crate::math::exp_in_place(p);
    let mut partial = [0f64; 8];
    let chunks = p.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&x| x as f64).sum();
    for chunk in chunks {
        for (s, &x) in partial.iter_mut().zip(chunk) {
            *s += x as f64;
        }
    }
    let inv = (1.0 / (partial.iter().sum::<f64>() + tail)) as f32;
    p.iter_mut().for_each(|x| *x *= inv);
}

/// The contiguous f32 elements of a (b, t, nh·d) tensor.
fn contiguous_rows<'a>(st: &'a Storage, l: &Layout, n: usize, what: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(CpuStorage::F32(data)) = st else {
        bail!("attention backward: {what} must be f32 on the CPU")
    };
    match l.contiguous_offsets() {
        Some((from, to)) if to - from == n => Ok(&data[from..to]),
        _ => bail!("attention backward: {what} must be contiguous with {n} elements"),
    }
}

fn shapes(q: &View, k: &View) -> Shapes {
    Shapes {
        b: q.dims[0],
        nh: q.dims[1],
        t: q.dims[2],
        d: q.dims[3],
        nkv: k.dims[1],
        s: k.dims[2],
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let q = View::new(s1, l1, "q")?;
        let k = View::new(s2, l2, "k")?;
        let v = View::new(s3, l3, "v")?;
        let sh = shapes(&q, &k);
        let (b, nh, t, s, d) = (sh.b, sh.nh, sh.t, sh.s, sh.d);
        let n_rep = nh / sh.nkv;
        let mut out = zeroed(b * t * nh * d);
        let out_ptr = SendPtr(out.as_mut_ptr());
        for_each_task(b * nh, 2 * t * s * d, |task| {
            let (i, h) = (task / nh, task % nh);
            SCRATCH.with(|cell| {
                let mut scratch = cell.borrow_mut();
                let p = &mut scratch.0;
                p.resize(t * s, 0.0);
                let (vp, v_rs) = v.matrix(i, h / n_rep);
                for block in self.mask.blocks(i) {
                    self.probabilities(&q, &k, &sh, (i, h), block, p);
                    let (rows, w) = (block.rows.len(), block.keys.len());
                    // O rows of head h live at out[(i·t + row)·nh·d + h·d ..], row stride nh·d.
                    unsafe {
                        let dst = out_ptr
                            .get()
                            .add((i * t + block.rows.start) * nh * d + h * d);
                        matmul(
                            (rows, d, w),
                            dst,
                            (nh * d) as isize,
                            (p.as_ptr(), w as isize, 1),
                            (vp.offset(block.keys.start as isize * v_rs), v_rs, 1),
                            false,
                            1.0,
                        )
                    };
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, t, nh * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let qv = cpu_view(&qs, ql, "q")?;
        let kv = cpu_view(&ks, kl, "k")?;
        let vv = cpu_view(&vs, vl, "v")?;
        let sh = shapes(&qv, &kv);
        let (b, nh, nkv, t, s, d) = (sh.b, sh.nh, sh.nkv, sh.t, sh.s, sh.d);
        let n_rep = nh / nkv;
        // o and dO, both (b, t, nh·d), read in place.
        let o_rows = contiguous_rows(&os, ol, b * t * nh * d, "o")?;
        let g_rows = contiguous_rows(&gs, gl, b * t * nh * d, "dO")?;
        let n_q = b * nh * t * d;
        let n_kv = b * nkv * s * d;
        // One buffer [dq (b, t, nh, d) | dk (b, s, nkv, d) | dv (b, s, nkv, d)], the inputs' layout.
        let mut grads = zeroed(n_q + 2 * n_kv);
        let ptr = SendPtr(grads.as_mut_ptr());
        for_each_task(b * nkv, 5 * n_rep * t * s * d, |task| {
            let (i, group) = (task / nkv, task % nkv);
            SCRATCH.with(|cell| {
                let mut scratch = cell.borrow_mut();
                let (p, dp) = &mut *scratch;
                p.resize(t * s, 0.0);
                dp.resize(t * s, 0.0);
                let (kp, k_rs) = kv.matrix(i, group);
                let (vp, v_rs) = vv.matrix(i, group);
                let kv_rs = (nkv * d) as isize;
                let dk = unsafe { ptr.get().add(n_q + (i * s * nkv + group) * d) };
                let dv = unsafe { ptr.get().add(n_q + n_kv + (i * s * nkv + group) * d) };
                for r in 0..n_rep {
                    let h = group * n_rep + r;
                    let (qp, q_rs) = qv.matrix(i, h);
                    for block in self.mask.blocks(i) {
                        let (rows, w) = (block.rows.len(), block.keys.len());
                        let (lo, r0) = (block.keys.start as isize, block.rows.start);
                        self.probabilities(&qv, &kv, &sh, (i, h), block, p);
                        let row0 = (i * t + r0) * nh * d + h * d;
                        let g_h = (g_rows[row0..].as_ptr(), (nh * d) as isize);
                        let q_b = unsafe { qp.offset(r0 as isize * q_rs) };
                        let (k_b, v_b) = unsafe { (kp.offset(lo * k_rs), vp.offset(lo * v_rs)) };
                        let dp = &mut dp[..rows * w];
                        // dP = dO Vᵀ (rows × keys).
                        unsafe {
                            matmul(
                                (rows, w, d),
                                dp.as_mut_ptr(),
                                w as isize,
                                (g_h.0, g_h.1, 1),
                                (v_b, 1, v_rs),
                                false,
                                1.0,
                            )
                        };
                        // dS = P ∘ (dP − D), D = Σ_d dO·O per query row.
                        for (j, (pr, dr)) in
                            p.chunks_exact(w).zip(dp.chunks_exact_mut(w)).enumerate()
                        {
                            let at = row0 + j * nh * d;
                            let dsum: f32 = g_rows[at..at + d]
                                .iter()
                                .zip(&o_rows[at..at + d])
                                .map(|(a, b)| a * b)
                                .sum();
                            for (x, &pv) in dr.iter_mut().zip(pr) {
                                *x = pv * (*x - dsum);
                            }
                        }
                        unsafe {
                            // dQ rows of the block = scale · dS K (rows × d).
                            matmul(
                                (rows, d, w),
                                ptr.get().add(((i * t + r0) * nh + h) * d),
                                (nh * d) as isize,
                                (dp.as_ptr(), w as isize, 1),
                                (k_b, k_rs, 1),
                                false,
                                self.scale,
                            );
                            // dK_group[keys] += scale · dSᵀ Q (keys × d).
                            matmul(
                                (w, d, rows),
                                dk.offset(lo * kv_rs),
                                kv_rs,
                                (dp.as_ptr(), 1, w as isize),
                                (q_b, q_rs, 1),
                                true,
                                self.scale,
                            );
                            // dV_group[keys] += Pᵀ dO (keys × d).
                            matmul(
                                (w, d, rows),
                                dv.offset(lo * kv_rs),
                                kv_rs,
                                (p.as_ptr(), 1, w as isize),
                                (g_h.0, g_h.1, 1),
                                true,
                                1.0,
                            );
                        }
                    }
                }
            });
        });
        drop((qs, ks, vs, os, gs));
        let all = Tensor::from_vec(grads, n_q + 2 * n_kv, q.device())?;
        let dq = all.narrow(0, 0, n_q)?.reshape((b, t, nh, d))?;
        let dk = all.narrow(0, n_q, n_kv)?.reshape((b, s, nkv, d))?;
        let dv = all.narrow(0, n_q + n_kv, n_kv)?.reshape((b, s, nkv, d))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
