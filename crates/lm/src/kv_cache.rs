//! The key/value cache of decoding and the attention that reads it, for f32 on the CPU.
//!
//! Each layer keeps its keys and values in two buffers allocated once for the whole generation,
//! (b, capacity, nkv, d): the projections' own layout, so new positions are copied in as they come
//! and nothing is ever concatenated. Attention reads them in place, one (batch row, query head) at
//! a time: scores = scale · q·kⱼ + maskⱼ over the cached keys, a softmax, then Σ pⱼ vⱼ. The query
//! heads of a group read the same key/value rows, so no `repeat_kv` copy is made either.
//!
//! The composed path this replaces (candle's `KvCache`, then contiguous (b, nh, s, d) copies of K
//! and V per step, batched 1 × s matrix products) spent more time copying than computing.

use rayon::prelude::*;

use crate::attention::AttentionMask;
use crate::fused::dot;

/// One layer's cached keys and values.
pub struct LayerKv {
    keys: Vec<f32>,
    values: Vec<f32>,
    batch: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
}

impl LayerKv {
    pub fn new(batch: usize, capacity: usize, kv_heads: usize, head_dim: usize) -> Self {
        let n = batch * capacity * kv_heads * head_dim;
        LayerKv {
            keys: vec![0.0; n],
            values: vec![0.0; n],
            batch,
            capacity,
            kv_heads,
            head_dim,
            len: 0,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this cache was made for these dimensions.
    pub fn fits(&self, batch: usize, kv_heads: usize, head_dim: usize) -> bool {
        (self.batch, self.kv_heads, self.head_dim) == (batch, kv_heads, head_dim)
    }

    /// Keep rows `rows` of the batch, in that order (a row may repeat): the cache of a batch whose
    /// row r is this batch's row `rows[r]`. How prompts shared by several samples are run once.
    pub fn select_rows(&mut self, rows: &[usize]) -> crate::Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(crate::LmError::Invalid(format!(
                "kv cache: row {bad} of a batch of {}",
                self.batch
            )));
        }
        let per_row = self.capacity * self.kv_heads * self.head_dim;
        let used = self.len * self.kv_heads * self.head_dim;
        let gather = |src: &[f32]| {
            let mut out = vec![0.0f32; rows.len() * per_row];
            for (r, &from) in rows.iter().enumerate() {
                out[r * per_row..r * per_row + used]
                    .copy_from_slice(&src[from * per_row..from * per_row + used]);
            }
            out
        };
        self.keys = gather(&self.keys);
        self.values = gather(&self.values);
        self.batch = rows.len();
        Ok(())
    }

    /// Cache `k` and `v` ((b, t, nkv, d), row-major) at positions len..len + t, then attend with `q`
    /// ((b, t, nh, d)) to every cached key 0..len + t under `mask` (t rows of len + t keys per batch
    /// row). Returns the attention output, (b, t, nh · d).
    pub fn append_and_attend(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        query_heads: usize,
        mask: &AttentionMask,
        scale: f32,
    ) -> crate::Result<Vec<f32>> {
        let (b, nkv, d) = (self.batch, self.kv_heads, self.head_dim);
        let row = nkv * d;
        let t = k.len() / (b * row).max(1);
        if k.len() != b * t * row || v.len() != k.len() || q.len() != b * t * query_heads * d {
            return Err(crate::LmError::Invalid(format!(
                "kv cache: q/k/v of {}/{}/{} values do not fit batch {b}, {query_heads} query and {nkv} key/value heads of {d}",
                q.len(),
                k.len(),
                v.len()
            )));
        }
        if !query_heads.is_multiple_of(nkv) {
            return Err(crate::LmError::Invalid(format!(
                "kv cache: {query_heads} query heads are not groups of the {nkv} key/value heads"
            )));
        }
        let s = self.len + t;
        if s > self.capacity {
            return Err(crate::LmError::Invalid(format!(
                "kv cache: {s} positions exceed the capacity of {}",
                self.capacity
            )));
        }
        if mask.dims() != (t, s) {
            return Err(crate::LmError::Invalid(format!(
                "kv cache: mask of {:?} (rows, keys), expected ({t}, {s})",
                mask.dims()
            )));
        }
        for r in 0..b {
            let at = (r * self.capacity + self.len) * row;
            self.keys[at..at + t * row].copy_from_slice(&k[r * t * row..(r + 1) * t * row]);
            self.values[at..at + t * row].copy_from_slice(&v[r * t * row..(r + 1) * t * row]);
        }
        self.len = s;

        let nh = query_heads;
        let group = nh / nkv;
        let mut out = vec![0.0f32; b * t * nh * d];
        let this = &*self;
        let attend_row = |r: usize, out_r: &mut [f32]| {
            let keys = &this.keys[r * this.capacity * row..];
            let values = &this.values[r * this.capacity * row..];
            let mut p = vec![0.0f32; s];
            for i in 0..t {
                let m = mask.row(r, i);
                for h in 0..nh {
                    let g = h / group;
                    let qh = &q[((r * t + i) * nh + h) * d..][..d];
                    let mut max = f32::NEG_INFINITY;
                    for (j, pj) in p.iter_mut().enumerate() {
                        *pj = scale * dot(qh, &keys[(j * nkv + g) * d..][..d]) + m[j];
                        max = max.max(*pj);
                    }
                    for pj in p.iter_mut() {
                        *pj -= max;
                    }
                    crate::math::exp_in_place(&mut p);
                    let total: f32 = p.iter().sum();
                    let o = &mut out_r[(i * nh + h) * d..][..d];
                    for (j, &pj) in p.iter().enumerate() {
                        let w = pj / total;
                        for (oc, vc) in o.iter_mut().zip(&values[(j * nkv + g) * d..][..d]) {
                            *oc += w * vc;
                        }
                    }
                }
            }
        };
        let per_row = t * nh * d;
        if b > 1 && b * t * nh * s * d >= 1 << 18 && rayon::current_num_threads() > 1 {
            out.par_chunks_mut(per_row)
                .enumerate()
                .for_each(|(r, o)| attend_row(r, o));
        } else {
            for (r, o) in out.chunks_mut(per_row).enumerate() {
                attend_row(r, o);
            }
        }
        Ok(out)
    }
}
