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
}
