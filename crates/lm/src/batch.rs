//! Padded token batches: ids, positions and the additive attention mask, built once on the host.
//!
//! Positions count only real tokens (cumulative sum of the attention mask minus one), so the same
//! sequence gets the same positions whether it is left-padded (generation) or right-padded
//! (training): rollout and scoring see the same numbers.

use candle_core::{Device, Tensor};

use crate::error::{LmError, Result};
use crate::llama::MASKED;

pub struct TokenBatch {
    /// (b, t) u32
    pub ids: Tensor,
    /// (b, t) u32
    pub positions: Tensor,
    /// (b, 1, t, t) f32, 0 where query i may attend key j (j <= i and j is not padding), else MASKED.
    pub mask: Tensor,
    /// Host copy of the attention mask: true for real tokens.
    pub real: Vec<Vec<bool>>,
    pub ids_host: Vec<Vec<u32>>,
}

impl TokenBatch {
    /// Build from explicit ids and attention mask rows (all the same length).
    pub fn new(ids: Vec<Vec<u32>>, real: Vec<Vec<bool>>, device: &Device) -> Result<Self> {
        let b = ids.len();
        let t = ids.first().map_or(0, |r| r.len());
        if b == 0 || t == 0 {
            return Err(LmError::Invalid("empty batch".into()));
        }
        if ids.iter().any(|r| r.len() != t) || real.len() != b || real.iter().any(|r| r.len() != t)
        {
            return Err(LmError::Invalid(
                "ragged batch: rows must have equal length".into(),
            ));
        }
        let mut positions = Vec::with_capacity(b * t);
        let mut mask = vec![MASKED; b * t * t];
        for (r, row) in real.iter().enumerate() {
            // A real token's position is the number of real tokens before it; padding gets 0.
            let mut count = 0u32;
            for &is_real in row {
                positions.push(if is_real { count } else { 0 });
                if is_real {
                    count += 1;
                }
            }
            for i in 0..t {
                for j in 0..=i {
                    if row[j] {
                        mask[(r * t + i) * t + j] = 0.0;
                    }
                }
            }
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        Ok(TokenBatch {
            ids: Tensor::from_vec(flat, (b, t), device)?,
            positions: Tensor::from_vec(positions, (b, t), device)?,
            mask: Tensor::from_vec(mask, (b, 1, t, t), device)?,
            real,
            ids_host: ids,
        })
    }

    /// Rows padded on the right with `pad` (training layout).
    pub fn right_padded(rows: &[Vec<u32>], pad: u32, device: &Device) -> Result<Self> {
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let ids = rows.iter().map(|r| {
            let mut v = r.clone();
            v.resize(t, pad);
            v
        });
        let real = rows
            .iter()
            .map(|r| (0..t).map(|j| j < r.len()).collect())
            .collect();
        Self::new(ids.collect(), real, device)
    }

    /// Rows padded on the left with `pad` (generation layout: every row ends at the same column).
    pub fn left_padded(rows: &[Vec<u32>], pad: u32, device: &Device) -> Result<Self> {
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let ids = rows.iter().map(|r| {
            let mut v = vec![pad; t - r.len()];
            v.extend_from_slice(r);
            v
        });
        let real = rows
            .iter()
            .map(|r| (0..t).map(|j| j >= t - r.len()).collect())
            .collect();
        Self::new(ids.collect(), real, device)
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.real.len(), self.real.first().map_or(0, |r| r.len()))
    }

    /// Each row's number of real tokens, when every row is right-padded (its real tokens are a
    /// non-empty prefix); `None` for any other layout.
    pub fn right_padded_lengths(&self) -> Option<Vec<usize>> {
        self.real
            .iter()
            .map(|row| {
                let len = row.iter().take_while(|&&r| r).count();
                (len > 0 && row[len..].iter().all(|&r| !r)).then_some(len)
            })
            .collect()
    }

    /// The rows of a right-padded batch (`lengths` from [`Self::right_padded_lengths`]) packed
    /// several to a row of the same width, when that takes fewer rows: see [`PackedRows`].
    pub fn pack(&self, lengths: &[usize], device: &Device) -> Result<Option<PackedRows>> {
        let (b, t) = self.dims();
        // First fit, longest rows first (ties in row order): a row goes into the first packed row
        // with room for it.
        let mut order: Vec<usize> = (0..b).collect();
        order.sort_by_key(|&r| std::cmp::Reverse(lengths[r]));
        let mut used: Vec<usize> = Vec::new();
        let mut place = vec![(0, 0); b];
        for &r in &order {
            let bin = match used.iter().position(|&u| u + lengths[r] <= t) {
                Some(bin) => bin,
                None => {
                    used.push(0);
                    used.len() - 1
                }
            };
            place[r] = (bin, used[bin]);
            used[bin] += lengths[r];
        }
        let bins = used.len();
        if bins >= b {
            return Ok(None);
        }
        // The tail of a packed row holds a padding id the batch already uses.
        let pad = (0..b)
            .find(|&r| lengths[r] < t)
            .map_or(0, |r| self.ids_host[r][lengths[r]]);
        let mut ids = vec![pad; bins * t];
        let mut positions = vec![0u32; bins * t];
        let mut mask = vec![MASKED; bins * t * t];
        // Causal attention inside one span of a packed row, [start, end).
        let mut open = |bin: usize, start: usize, end: usize| {
            for i in start..end {
                let row = (bin * t + i) * t;
                mask[row + start..=row + i].fill(0.0);
            }
        };
        for (r, &(bin, off)) in place.iter().enumerate() {
            let len = lengths[r];
            ids[bin * t + off..bin * t + off + len].copy_from_slice(&self.ids_host[r][..len]);
            for (k, p) in positions[bin * t + off..bin * t + off + len]
                .iter_mut()
                .enumerate()
            {
                *p = k as u32;
            }
            open(bin, off, off + len);
        }
        // The padding tails attend among themselves; nothing reads their outputs.
        for (bin, &u) in used.iter().enumerate() {
            open(bin, u, t);
        }
        Ok(Some(PackedRows {
            ids: Tensor::from_vec(ids, (bins, t), device)?,
            positions: Tensor::from_vec(positions, (bins, t), device)?,
            mask: Tensor::from_vec(mask, (bins, 1, t, t), device)?,
            place,
        }))
    }
}

/// Right-padded rows packed end to end into fewer rows of the same width (sequence packing):
/// each original row keeps its own positions (from 0) and attends only within its own span, so
/// every real token's hidden state is the one its unpacked row gives, while the padding that
/// rows of different lengths carried is (mostly) not computed. Rollout batches, whose completions
/// run from a few tokens to the length cap, are padded by about a third.
pub struct PackedRows {
    /// (bins, t) u32
    pub ids: Tensor,
    /// (bins, t) u32
    pub positions: Tensor,
    /// (bins, 1, t, t) f32: block-diagonal causal.
    pub mask: Tensor,
    /// Per original row: (packed row, column of its first token).
    pub place: Vec<(usize, usize)>,
}
