//! The key/value cache of decoding and the attention that reads it, for f32 on the CPU.
//!
//! Each layer keeps its keys and values in two buffers allocated once for the whole generation,
//! so new positions are written in as they come and nothing is ever concatenated. Values are kept
//! in the projections' layout, (b, capacity, nkv, d); keys transposed, (b, nkv, d, capacity), so
//! that the scores of one query against all cached keys are d multiply-adds along contiguous rows
//! of keys (vectorised across positions), with no sum across vector lanes per key. Attention reads
//! them in place, one (batch row, key/value head) at a time: the query heads of that group
//! together (they read the same keys, so no `repeat_kv` copy is made), scores = scale · q·kⱼ +
//! maskⱼ, a softmax, then Σ pⱼ vⱼ. The kernel is compiled for AVX-512 and AVX2 as well as the
//! baseline and chosen at run time; all three compute the same sums in the same order.
//!
//! The composed path this replaces (candle's `KvCache`, then contiguous (b, nh, s, d) copies of K
//! and V per step, batched 1 × s matrix products) spent more time copying than computing.

use rayon::prelude::*;

use crate::attention::AttentionMask;

/// One layer's cached keys and values.
pub struct LayerKv {
    /// (b, nkv, d, capacity): position is the fastest axis.
    keys: Vec<f32>,
    /// (b, capacity, nkv, d).
    values: Vec<f32>,
    batch: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
}

impl LayerKv {
    pub fn new(batch: usize, capacity: usize, kv_heads: usize, head_dim: usize) -> Self {
        // Whole blocks of keys: the scores of the last, partial block are computed over a whole
        // block (of zeros or stale keys) and only its first positions kept.
        let capacity = capacity.next_multiple_of(KEY_BLOCK);
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
        let gather = |src: &[f32], used: usize| {
            let mut out = vec![0.0f32; rows.len() * per_row];
            for (r, &from) in rows.iter().enumerate() {
                out[r * per_row..r * per_row + used]
                    .copy_from_slice(&src[from * per_row..from * per_row + used]);
            }
            out
        };
        // Keys: every (head, channel) row holds positions 0..len, so the whole row block is copied.
        self.keys = gather(&self.keys, per_row);
        self.values = gather(&self.values, self.len * self.kv_heads * self.head_dim);
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
        let cap = self.capacity;
        for r in 0..b {
            let at = (r * cap + self.len) * row;
            self.values[at..at + t * row].copy_from_slice(&v[r * t * row..(r + 1) * t * row]);
            for tt in 0..t {
                let key = &k[(r * t + tt) * row..][..row];
                for (gc, &value) in key.iter().enumerate() {
                    // gc = g·d + c: the (head, channel) row of the transposed block.
                    self.keys[(r * row + gc) * cap + self.len + tt] = value;
                }
            }
        }
        self.len = s;

        let nh = query_heads;
        let group = nh / nkv;
        let mut out = vec![0.0f32; b * t * nh * d];
        let this = &*self;
        let attend_row = |r: usize, out_r: &mut [f32]| {
            let shape = GroupShape { group, d, s, scale };
            let mut scores = vec![0.0f32; group * s];
            for i in 0..t {
                let m = mask.row(r, i);
                for g in 0..nkv {
                    let keys = &this.keys[(r * row + g * d) * cap..][..d * cap];
                    let q_group = &q[((r * t + i) * nh + g * group) * d..][..group * d];
                    let o = &mut out_r[(i * nh + g * group) * d..][..group * d];
                    let group = Group {
                        shape,
                        q: q_group,
                        keys,
                        cap,
                        values: |j: usize| &this.values[((r * cap + j) * nkv + g) * d..][..d],
                        mask: m,
                    };
                    attend_group(&group, &mut scores, o);
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

/// The sizes one [`attend_group`] call works with.
#[derive(Clone, Copy)]
struct GroupShape {
    /// Query heads that share the key/value head.
    group: usize,
    /// Head dimension.
    d: usize,
    /// Keys to attend to.
    s: usize,
    scale: f32,
}

/// One [`attend_group`] call's inputs: the `group` query heads of one key/value head at one query
/// position, `q` (group × d); the keys transposed (d rows of `cap` positions, the first `s` used);
/// the values by position; the mask (s).
struct Group<'a, V> {
    shape: GroupShape,
    q: &'a [f32],
    keys: &'a [f32],
    cap: usize,
    values: V,
    mask: &'a [f32],
}

/// Attention of one [`Group`] into `out` (group × d, zeroed); `scores` is scratch of group × s.
fn attend_group<'v, V: Fn(usize) -> &'v [f32]>(g: &Group<V>, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { attend_group_avx512(g, scores, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { attend_group_avx2(g, scores, out) };
        }
    }
    attend_group_body(g, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_group_avx512<'v, V: Fn(usize) -> &'v [f32]>(
    g: &Group<V>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_group_body(g, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_group_avx2<'v, V: Fn(usize) -> &'v [f32]>(
    g: &Group<V>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_group_body(g, scores, out)
}

/// [`attend_group`]'s loops, written for the compiler to vectorise: along positions for the scores
/// (each channel's key row times one query value, added into every head's scores) and along the
/// head dimension for the weighted values. No sum is reordered, so every instruction set gives the
/// same bits. Inlined into each instruction set's copy.
#[inline(always)]
fn attend_group_body<'v, V: Fn(usize) -> &'v [f32]>(
    g: &Group<V>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (q, keys, cap, mask, values) = (g.q, g.keys, g.cap, g.mask, &g.values);
    let GroupShape { group, d, s, scale } = g.shape;
    let scores = &mut scores[..group * s];
    // Scores, 64 keys at a time in registers across the whole head dimension. The key rows are
    // whole blocks long (the capacity is), so the last block is computed whole and cut to s.
    debug_assert!(cap.is_multiple_of(KEY_BLOCK) && keys.len() >= d * cap);
    for h in 0..group {
        let qh = &q[h * d..(h + 1) * d];
        for j0 in (0..s).step_by(KEY_BLOCK) {
            let mut acc = [0.0f32; KEY_BLOCK];
            for (c, &qc) in qh.iter().enumerate() {
                let key_row = &keys[c * cap + j0..][..KEY_BLOCK];
                for (a, &kj) in acc.iter_mut().zip(key_row) {
                    *a += qc * kj;
                }
            }
            let used = KEY_BLOCK.min(s - j0);
            scores[h * s + j0..][..used].copy_from_slice(&acc[..used]);
        }
    }
    for h in 0..group {
        let p = &mut scores[h * s..(h + 1) * s];
        let mut max = f32::NEG_INFINITY;
        for (pj, &mj) in p.iter_mut().zip(&mask[..s]) {
            *pj = scale * *pj + mj;
            // Not f32::max, whose NaN rule keeps the loop from vectorising (a NaN score makes
            // the row NaN either way).
            max = if *pj > max { *pj } else { max };
        }
        for pj in p.iter_mut() {
            *pj -= max;
        }
        crate::math::exp_in_place(p);
        let total: f32 = p.iter().sum();
        let o = &mut out[h * d..(h + 1) * d];
        // The output row stays in registers while the values stream past (through memory, each
        // step would wait on the previous one's store).
        match d {
            64 => weighted_values::<64>(p, total, values, o),
            128 => weighted_values::<128>(p, total, values, o),
            _ => {
                for (j, &pj) in p.iter().enumerate() {
                    let w = pj / total;
                    for (oc, &vc) in o.iter_mut().zip(values(j)) {
                        *oc += w * vc;
                    }
                }
            }
        }
    }
}

/// Keys per block of scores kept in registers (four 16-lane vectors).
const KEY_BLOCK: usize = 64;

/// o = Σⱼ (pⱼ / total) · vⱼ for a head dimension of `D`, o zeroed on entry.
#[inline(always)]
fn weighted_values<'v, const D: usize>(
    p: &[f32],
    total: f32,
    values: &impl Fn(usize) -> &'v [f32],
    o: &mut [f32],
) {
    let mut acc = [0.0f32; D];
    for (j, &pj) in p.iter().enumerate() {
        let w = pj / total;
        for (a, &vc) in acc.iter_mut().zip(&values(j)[..D]) {
            *a += w * vc;
        }
    }
    o[..D].copy_from_slice(&acc);
}
