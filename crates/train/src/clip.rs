//! Global-norm gradient clipping (as `torch.nn.utils.clip_grad_norm_`) and gradient accumulation
//! over micro-batches.

use std::collections::HashSet;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Shape, Tensor, Var};
use rayon::prelude::*;

use crate::error::{Result, TrainError};
use crate::optim::{f32_slice, f32_slice_mut};

const CHUNK: usize = 1 << 16;

/// Sum of squares of a tensor, accumulated in f64, without a full-size temporary. Deterministic:
/// fixed chunks summed in order.
struct SumSq;

/// Eight independent f64 accumulators per chunk (so the adds pipeline), chunks summed in order.
fn sum_sq<T: Copy + Send + Sync + Into<f64>>(xs: &[T]) -> f64 {
    let chunk_sum = |c: &[T]| {
        let mut acc = [0f64; 8];
        let mut lanes = c.chunks_exact(8);
        for l in &mut lanes {
            for (a, &x) in acc.iter_mut().zip(l) {
                let x: f64 = x.into();
                *a += x * x;
            }
        }
        let tail: f64 = lanes.remainder().iter().map(|&x| x.into() * x.into()).sum();
        acc.iter().sum::<f64>() + tail
    };
    let partial: Vec<f64> = xs.par_chunks(CHUNK).map(chunk_sum).collect();
    partial.iter().sum()
}

impl CustomOp1 for SumSq {
    fn name(&self) -> &'static str {
        "sum-of-squares"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("sum-of-squares: operand is not contiguous".into())
        })?;
        let total = match s {
            CpuStorage::F32(v) => sum_sq(&v[a..b]),
            CpuStorage::F64(v) => sum_sq(&v[a..b]),
            _ => {
                return Err(candle_core::Error::Msg(
                    "sum-of-squares: operand is not f32/f64".into(),
                ))
            }
        };
        Ok((CpuStorage::F64(vec![total]), Shape::from(())))
    }
}

fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if g.device().is_cpu() && matches!(g.dtype(), DType::F32 | DType::F64) {
        let g = g.contiguous()?;
        Ok(g.apply_op1_no_bwd(&SumSq)?.to_scalar::<f64>()?)
    } else {
        Ok(g.to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?)
    }
}

/// The global L2 norm of the gradients of `vars` (vars without a gradient count as zero; a var
/// listed twice counts once).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut seen = HashSet::new();
    let mut total = 0.0f64;
    for v in vars {
        if !seen.insert(v.id()) {
            continue;
        }
        if let Some(g) = grads.get(v.as_tensor()) {
            total += sum_of_squares(g)?;
        }
    }
    Ok(total.sqrt())
}

/// Clip the gradients of `vars` to a global L2 norm of `max_norm`, returning the norm before
/// clipping. As torch: the gradients are multiplied by `max_norm / (norm + 1e-6)` when that is
/// below 1. A non-finite norm is returned as is and nothing is scaled (skip that step).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(TrainError::invalid(format!(
            "max_grad_norm must be > 0, got {max_norm}"
        )));
    }
    let norm = grad_norm(grads, vars)?;
    if !norm.is_finite() {
        return Ok(norm);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        let mut seen = HashSet::new();
        for v in vars {
            if !seen.insert(v.id()) {
                continue;
            }
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = g.affine(coef, 0.0)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// `a += b` on the CPU, in place.
struct AddAssign;

impl InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-assign"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let a = f32_slice_mut(s1, l1, self.name())?;
        let b = f32_slice(s2, l2, self.name())?;
        if a.len() != b.len() {
            return Err(candle_core::Error::Msg(format!(
                "add-assign: sizes differ ({} vs {})",
                a.len(),
                b.len()
            )));
        }
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .for_each(|(a, b)| {
                a.iter_mut().zip(b).for_each(|(a, &b)| *a += b);
            });
        Ok(())
    }
}

struct Slot {
    sum: Tensor,
    /// The sum is a buffer this accumulator allocated (so adding into it in place is safe).
    owned: bool,
}

/// Sums the gradients of a fixed set of vars over micro-batches: `add` each micro-batch's
/// `GradStore` (from `loss.backward()`), then `finish` for the store to clip and step with.
/// Gradients of other tensors in the stores are dropped. Scale each micro-batch's loss (e.g. by
/// 1 / micro-batches, or by its share of the tokens) before `backward`, or use `finish_mean`.
pub struct GradAccumulator {
    vars: Vec<Var>,
    slots: Vec<Option<Slot>>,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new(vars: &[Var]) -> Self {
        let mut seen = HashSet::new();
        let vars: Vec<Var> = vars
            .iter()
            .filter(|v| seen.insert(v.id()))
            .cloned()
            .collect();
        let slots = vars.iter().map(|_| None).collect();
        GradAccumulator {
            vars,
            slots,
            micro_batches: 0,
        }
    }

    /// How many stores were added.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    pub fn add(&mut self, mut grads: GradStore) -> Result<()> {
        for (v, slot) in self.vars.iter().zip(self.slots.iter_mut()) {
            let Some(g) = grads.remove(v.as_tensor()) else {
                continue;
            };
            if g.dims() != v.dims() {
                return Err(TrainError::invalid(format!(
                    "gradient accumulation: gradient has shape {:?}, parameter {:?}",
                    g.dims(),
                    v.dims()
                )));
            }
            match slot {
                None => {
                    *slot = Some(Slot {
                        sum: g.detach(),
                        owned: false,
                    })
                }
                Some(s) => {
                    let in_place = s.owned
                        && s.sum.device().is_cpu()
                        && s.sum.dtype() == DType::F32
                        && g.dtype() == DType::F32
                        && s.sum.is_contiguous();
                    if in_place {
                        s.sum.inplace_op2(&g.contiguous()?, &AddAssign)?;
                    } else {
                        // The first sum: a fresh buffer of our own, added into in place from now on.
                        s.sum = s.sum.add(&g.to_dtype(s.sum.dtype())?)?.detach();
                        s.owned = true;
                    }
                }
            }
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// The summed gradients (only vars that received at least one gradient).
    pub fn finish(self) -> GradStore {
        let mut out = GradStore::default();
        for (v, slot) in self.vars.iter().zip(self.slots) {
            if let Some(s) = slot {
                out.insert(v.as_tensor(), s.sum);
            }
        }
        out
    }

    /// The summed gradients of every rank's accumulator ([`crate::dist`]): each rank added the
    /// gradients of its share of the batch, and all end with the same sum. A parameter that got a
    /// gradient on no rank is left out, as [`GradAccumulator::finish`] leaves it out (AdamW then
    /// does not touch it); one that got a gradient on some rank counts as zero on the others.
    /// In a world of one this is [`GradAccumulator::finish`].
    pub fn finish_across_ranks(self) -> Result<GradStore> {
        let world = crate::dist::world();
        if world.size() == 1 {
            return Ok(self.finish());
        }
        #[cfg(feature = "nccl")]
        if self.vars.first().is_some_and(|v| v.device().is_cuda()) {
            return self.finish_on_gpus(world);
        }
        // One flat buffer: a presence flag per parameter, then every parameter's values.
        let sizes: Vec<usize> = self.vars.iter().map(|v| v.elem_count()).collect();
        let mut flat = Vec::with_capacity(self.vars.len() + sizes.iter().sum::<usize>());
        flat.extend(self.slots.iter().map(|s| s.is_some() as u8 as f32));
        for (slot, &n) in self.slots.iter().zip(&sizes) {
            match slot {
                Some(s) => {
                    let t = s.sum.to_dtype(DType::F32)?.contiguous()?;
                    let (storage, layout) = t.storage_and_layout();
                    match &*storage {
                        // One copy, straight from the sum's buffer.
                        candle_core::Storage::Cpu(c) => {
                            flat.extend_from_slice(f32_slice(c, layout, "gradient sum")?)
                        }
                        _ => flat.extend(t.flatten_all()?.to_vec1::<f32>()?),
                    }
                }
                None => flat.extend(std::iter::repeat_n(0.0f32, n)),
            }
        }
        world.sum_f32(&mut flat)?;
        let mut out = GradStore::default();
        let mut at = self.vars.len();
        for (i, (v, &n)) in self.vars.iter().zip(&sizes).enumerate() {
            if flat[i] > 0.0 {
                let g = Tensor::from_slice(&flat[at..at + n], v.dims(), v.device())?
                    .to_dtype(v.dtype())?;
                out.insert(v.as_tensor(), g);
            }
            at += n;
        }
        Ok(out)
    }

    /// [`GradAccumulator::finish_across_ranks`] with the gradients on GPUs: the presence flags go
    /// over MPI, the values stay on the device and are summed by NCCL in one flat buffer.
    #[cfg(feature = "nccl")]
    fn finish_on_gpus(self, world: crate::dist::World) -> Result<GradStore> {
        let mut present: Vec<f32> = self
            .slots
            .iter()
            .map(|s| s.is_some() as u8 as f32)
            .collect();
        world.sum_f32(&mut present)?;
        let parts: Vec<Tensor> = self
            .vars
            .iter()
            .zip(&self.slots)
            .map(|(v, slot)| match slot {
                Some(s) => Ok(s.sum.to_dtype(DType::F32)?.flatten_all()?),
                None => Ok(Tensor::zeros(v.elem_count(), DType::F32, v.device())?),
            })
            .collect::<Result<_>>()?;
        let summed = crate::dist::nccl::sum(&Tensor::cat(&parts, 0)?)?;
        let mut out = GradStore::default();
        let mut at = 0;
        for (v, flag) in self.vars.iter().zip(&present) {
            let n = v.elem_count();
            if *flag > 0.0 {
                let g = summed
                    .narrow(0, at, n)?
                    .reshape(v.dims())?
                    .to_dtype(v.dtype())?;
                out.insert(v.as_tensor(), g);
            }
            at += n;
        }
        Ok(out)
    }

    /// The mean over micro-batches (the sum divided by `micro_batches()`).
    pub fn finish_mean(self) -> Result<GradStore> {
        let n = self.micro_batches.max(1) as f64;
        let mut out = GradStore::default();
        for (v, slot) in self.vars.iter().zip(self.slots) {
            if let Some(s) = slot {
                out.insert(v.as_tensor(), s.sum.affine(1.0 / n, 0.0)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(xs: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(xs, &Device::Cpu).unwrap()).unwrap()
    }

    fn store(pairs: &[(&Var, &[f32])]) -> GradStore {
        let mut s = GradStore::default();
        for (v, g) in pairs {
            s.insert(v.as_tensor(), Tensor::new(*g, &Device::Cpu).unwrap());
        }
        s
    }

    fn get(s: &GradStore, v: &Var) -> Vec<f32> {
        s.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn clips_to_max_norm() {
        // grads [3, 4] and [12]: norm = sqrt(9 + 16 + 144) = sqrt(169) = 13.
        let (a, b, c) = (var(&[0., 0.]), var(&[0.]), var(&[0.]));
        let mut s = store(&[(&a, &[3., 4.]), (&b, &[12.])]);
        let vars = [a.clone(), b.clone(), c.clone()]; // c has no gradient
        assert_eq!(grad_norm(&s, &vars).unwrap(), 13.0);
        // max 6.5: coef = 6.5 / (13 + 1e-6) = 0.49999996..., grads halve (to 1e-7 relative)
        let norm = clip_grad_norm(&mut s, &vars, 6.5).unwrap();
        assert_eq!(norm, 13.0);
        let coef = 6.5 / (13.0 + 1e-6);
        let ga = get(&s, &a);
        assert!(
            (ga[0] as f64 - 3.0 * coef).abs() < 1e-6 && (ga[1] as f64 - 4.0 * coef).abs() < 1e-6,
            "{ga:?}"
        );
        assert!((get(&s, &b)[0] as f64 - 12.0 * coef).abs() < 1e-6);
        assert!((grad_norm(&s, &vars).unwrap() - 6.5).abs() < 1e-5);
        assert!(s.get(c.as_tensor()).is_none());
    }

    #[test]
    fn leaves_small_gradients_alone() {
        let a = var(&[0., 0.]);
        let mut s = store(&[(&a, &[3., 4.])]);
        let norm = clip_grad_norm(&mut s, &[a.clone(), a.clone()], 5.0).unwrap(); // listed twice: counted once
        assert_eq!(norm, 5.0);
        // at the limit torch still scales by 5 / (5 + 1e-6): a hair below 1
        let g = get(&s, &a);
        assert!(
            g[0] < 3.0 && (g[0] - 3.0).abs() < 1e-5 && (g[1] - 4.0).abs() < 1e-5,
            "{g:?}"
        );
        let mut s = store(&[(&a, &[3., 4.])]);
        let norm = clip_grad_norm(&mut s, std::slice::from_ref(&a), 100.0).unwrap();
        assert_eq!(norm, 5.0);
        assert_eq!(get(&s, &a), vec![3., 4.]);
        assert!(clip_grad_norm(&mut s, &[a], 0.0).is_err());
    }

    #[test]
    fn non_finite_norm_is_reported_not_applied() {
        let a = var(&[0., 0.]);
        let mut s = store(&[(&a, &[f32::NAN, 1.])]);
        assert!(clip_grad_norm(&mut s, std::slice::from_ref(&a), 1.0)
            .unwrap()
            .is_nan());
        assert_eq!(get(&s, &a)[1], 1.0);
    }

    #[test]
    fn accumulates_over_micro_batches() {
        let (a, b) = (var(&[0., 0.]), var(&[0.]));
        let other = var(&[0.]);
        let mut acc = GradAccumulator::new(&[a.clone(), b.clone()]);
        acc.add(store(&[(&a, &[1., 2.]), (&other, &[9.])])).unwrap(); // b: no gradient this time
        acc.add(store(&[(&a, &[0.5, -1.]), (&b, &[3.])])).unwrap();
        acc.add(store(&[(&a, &[0.25, 4.]), (&b, &[1.])])).unwrap(); // in place into our own buffer
        acc.add(store(&[(&a, &[0.25, 1.])])).unwrap();
        assert_eq!(acc.micro_batches(), 4);
        let s = acc.finish();
        assert_eq!(get(&s, &a), vec![2.0, 6.0]); // 1 + 0.5 + 0.25 + 0.25, 2 - 1 + 4 + 1
        assert_eq!(get(&s, &b), vec![4.0]);
        assert!(s.get(other.as_tensor()).is_none());

        let mut acc = GradAccumulator::new(std::slice::from_ref(&a));
        acc.add(store(&[(&a, &[1., 2.])])).unwrap();
        acc.add(store(&[(&a, &[3., 2.])])).unwrap();
        assert_eq!(get(&acc.finish_mean().unwrap(), &a), vec![2.0, 2.0]);
    }

    #[test]
    fn accumulation_does_not_touch_the_callers_tensors() {
        let a = var(&[0.]);
        let first = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        let mut s1 = GradStore::default();
        s1.insert(a.as_tensor(), first.clone());
        let mut acc = GradAccumulator::new(std::slice::from_ref(&a));
        acc.add(s1).unwrap();
        for _ in 0..3 {
            acc.add(store(&[(&a, &[1.])])).unwrap();
        }
        assert_eq!(get(&acc.finish(), &a), vec![4.0]);
        assert_eq!(first.to_vec1::<f32>().unwrap(), vec![1.0]);
    }

    #[test]
    fn accumulated_equals_full_batch_gradient() {
        // d/dw sum_i (w * x_i)^2 = sum_i 2 w x_i^2, split over two micro-batches.
        let w = var(&[0.5, -1.0]);
        let xs = Tensor::new(&[[1f32, 2.], [3., -1.], [0.5, 0.5], [2., 1.]], &Device::Cpu).unwrap();
        let loss_of = |x: &Tensor| {
            x.broadcast_mul(w.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let full = loss_of(&xs).backward().unwrap();
        let mut acc = GradAccumulator::new(std::slice::from_ref(&w));
        acc.add(loss_of(&xs.narrow(0, 0, 2).unwrap()).backward().unwrap())
            .unwrap();
        acc.add(loss_of(&xs.narrow(0, 2, 2).unwrap()).backward().unwrap())
            .unwrap();
        let summed = acc.finish();
        let (f, s) = (get(&full, &w), get(&summed, &w));
        for (x, y) in f.iter().zip(&s) {
            assert!((x - y).abs() < 1e-5, "{f:?} vs {s:?}");
        }
    }
}
