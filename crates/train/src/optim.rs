//! AdamW with decoupled weight decay, matching `torch.optim.AdamW` (the single-tensor CPU path)
//! operation for operation:
//!
//! ```text
//! p   <- p * (1 - lr * weight_decay)
//! m   <- lerp(m, g, 1 - beta1)                    (= beta1 * m + (1 - beta1) * g)
//! v   <- v * beta2 + (1 - beta2) * g * g
//! p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! `t` counts the steps in which that parameter had a gradient (torch keeps it per parameter too).
//! On the CPU with f32 parameters every update is done in place (parameters, first and second
//! moments) in three passes over memory without allocating; other devices and dtypes use plain
//! tensor ops with the same arithmetic.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Optimiser hyper-parameters. `lr` is the base learning rate (a schedule scales it; the value
/// actually used is the one passed to [`AdamW::step`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `lr` 5e-5 (the Hugging Face Trainer's default), betas (0.9, 0.999), eps 1e-8, no decay.
    fn default() -> Self {
        AdamWConfig {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: &str| {
            Err(TrainError::invalid(format!("optimizer `{field}`: {msg}")))
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", "must be a finite number >= 0");
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", "must be in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", "must be a finite number >= 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", "must be a finite number >= 0");
        }
        Ok(())
    }
}

struct Param {
    name: String,
    var: Var,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    /// Steps in which this parameter had a gradient (torch's per-parameter `step`).
    steps: u64,
    decay: bool,
}

/// AdamW over a fixed list of named `Var`s (e.g. `Trainable::vars`). Moments are allocated on the
/// first gradient a parameter receives.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Param>,
    step_count: u64,
}

/// The key of the global step count in [`AdamW::state`].
const STEP_KEY: &str = "step";

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let mut seen = HashSet::new();
        let mut ids = HashMap::new();
        for (n, v) in &vars {
            if !seen.insert(n.as_str()) {
                return Err(TrainError::invalid(format!(
                    "optimizer: parameter `{n}` listed twice"
                )));
            }
            if let Some(first) = ids.insert(v.id(), n.as_str()) {
                return Err(TrainError::invalid(format!(
                    "optimizer: `{n}` is the same tensor as `{first}` (it would be stepped twice)"
                )));
            }
        }
        let params = vars
            .into_iter()
            .map(|(name, var)| Param {
                name,
                var,
                exp_avg: None,
                exp_avg_sq: None,
                steps: 0,
                decay: true,
            })
            .collect();
        Ok(AdamW {
            cfg,
            params,
            step_count: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// How many times [`AdamW::step`] ran (restored by [`AdamW::load_state`]).
    pub fn step_count(&self) -> u64 {
        self.step_count
    }

    /// The optimised variables, in order (cheap handles; e.g. for [`crate::clip_grad_norm`]).
    pub fn vars(&self) -> Vec<Var> {
        self.params.iter().map(|p| p.var.clone()).collect()
    }

    /// Parameter names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.params.iter().map(|p| p.name.as_str()).collect()
    }

    /// Apply no weight decay to the parameters whose name matches (the usual choice is biases and
    /// norm weights: `|n| n.ends_with(".bias") || n.ends_with("norm.weight")`).
    pub fn exclude_from_weight_decay(&mut self, pred: impl Fn(&str) -> bool) {
        for p in &mut self.params {
            if pred(&p.name) {
                p.decay = false;
            }
        }
    }

    /// One update with learning rate `lr` (the schedule's value for this step). Parameters without a
    /// gradient in `grads` are left alone (their moments and step count too).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        if !lr.is_finite() || lr < 0.0 {
            return Err(TrainError::invalid(format!(
                "optimizer step: learning rate {lr} is not a finite number >= 0"
            )));
        }
        self.step_count += 1;
        let c = &self.cfg;
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            if g.dims() != p.var.dims() {
                return Err(TrainError::invalid(format!(
                    "optimizer: gradient of `{}` has shape {:?}, parameter has {:?}",
                    p.name,
                    g.dims(),
                    p.var.dims()
                )));
            }
            let g = if g.dtype() == p.var.dtype() {
                g.contiguous()?
            } else {
                g.to_dtype(p.var.dtype())?
            };
            if p.exp_avg.is_none() {
                // Zeros written now (ones scaled by 0), not `zeros_like`'s untouched zero pages:
                // the in-place update reads each page before writing it, and a read-then-write of
                // a fresh zero page costs a second fault with a TLB flush on every core (2.6 s of
                // the first SmolLM2 step went there).
                let zeros =
                    || -> Result<Tensor> { Ok(p.var.ones_like()?.affine(0.0, 0.0)?.detach()) };
                p.exp_avg = Some(zeros()?);
                p.exp_avg_sq = Some(zeros()?);
            }
            p.steps += 1;
            let t = p.steps as f64;
            let bias_correction1 = 1.0 - c.beta1.powf(t);
            let bias_correction2 = 1.0 - c.beta2.powf(t);
            let step_size = lr / bias_correction1;
            let bc2_sqrt = bias_correction2.sqrt();
            let decay = if p.decay {
                1.0 - lr * c.weight_decay
            } else {
                1.0
            };
            let (m, v) = (p.exp_avg.as_mut().unwrap(), p.exp_avg_sq.as_mut().unwrap());
            let fast =
                p.var.device().is_cpu() && p.var.dtype() == DType::F32 && p.var.is_contiguous();
            if fast {
                m.inplace_op2(
                    &g,
                    &LerpInPlace {
                        weight: (1.0 - c.beta1) as f32,
                    },
                )?;
                v.inplace_op2(
                    &g,
                    &SqAvgInPlace {
                        beta2: c.beta2 as f32,
                        one_minus_beta2: (1.0 - c.beta2) as f32,
                    },
                )?;
                p.var.as_tensor().inplace_op3(
                    m,
                    v,
                    &ParamUpdate {
                        decay: decay as f32,
                        bc2_sqrt: bc2_sqrt as f32,
                        eps: c.eps as f32,
                        neg_step_size: -step_size as f32,
                    },
                )?;
            } else {
                let mut w = p.var.as_tensor().detach();
                if decay != 1.0 {
                    w = w.affine(decay, 0.0)?;
                }
                let weight = 1.0 - c.beta1;
                *m = if weight < 0.5 {
                    m.add(&g.sub(m)?.affine(weight, 0.0)?)?
                } else {
                    g.sub(&g.sub(m)?.affine(1.0 - weight, 0.0)?)?
                };
                *v = v
                    .affine(c.beta2, 0.0)?
                    .add(&g.affine(1.0 - c.beta2, 0.0)?.mul(&g)?)?;
                let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, 0.0)?.affine(1.0, c.eps)?;
                w = w.add(&m.div(&denom)?.affine(-step_size, 0.0)?)?;
                p.var.set(&w)?;
            }
        }
        Ok(())
    }

    /// The optimiser state for a checkpoint, as deep copies: `exp_avg.<name>`, `exp_avg_sq.<name>`
    /// and `step.<name>` (i64 scalar) for each parameter that has state, and `step` (i64 scalar,
    /// [`AdamW::step_count`]).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let dev = self
            .params
            .first()
            .map(|p| p.var.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut out = HashMap::new();
        out.insert(
            STEP_KEY.to_string(),
            Tensor::new(self.step_count as i64, &dev)?,
        );
        for p in &self.params {
            if let (Some(m), Some(v)) = (&p.exp_avg, &p.exp_avg_sq) {
                out.insert(format!("exp_avg.{}", p.name), m.detach().copy()?);
                out.insert(format!("exp_avg_sq.{}", p.name), v.detach().copy()?);
                out.insert(
                    format!("step.{}", p.name),
                    Tensor::new(p.steps as i64, &dev)?,
                );
            }
        }
        Ok(out)
    }

    /// Restore what [`AdamW::state`] returned (tensors are copied onto each parameter's device and
    /// dtype). Every key must belong to a known parameter with the right shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let scalar = |key: &str| -> Result<u64> {
            let t = &state[key];
            if t.rank() != 0 {
                return Err(TrainError::invalid(format!(
                    "optimizer state: `{key}` is not a scalar"
                )));
            }
            let x = t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !(x >= 0.0 && x.fract() == 0.0) {
                return Err(TrainError::invalid(format!(
                    "optimizer state: `{key}` = {x} is not a step count"
                )));
            }
            Ok(x as u64)
        };
        let mut used = HashSet::new();
        let step_count = if state.contains_key(STEP_KEY) {
            used.insert(STEP_KEY.to_string());
            scalar(STEP_KEY)?
        } else {
            return Err(TrainError::invalid("optimizer state: no `step` entry"));
        };
        let mut restored = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let keys = [
                format!("exp_avg.{}", p.name),
                format!("exp_avg_sq.{}", p.name),
                format!("step.{}", p.name),
            ];
            let present = keys.iter().filter(|k| state.contains_key(*k)).count();
            if present == 0 {
                restored.push(None);
                continue;
            }
            if present != 3 {
                return Err(TrainError::invalid(format!(
                    "optimizer state for `{}` is incomplete (needs {}, {} and {})",
                    p.name, keys[0], keys[1], keys[2]
                )));
            }
            let moment = |key: &str| -> Result<Tensor> {
                let t = &state[key];
                if t.dims() != p.var.dims() {
                    return Err(TrainError::invalid(format!(
                        "optimizer state: `{key}` has shape {:?}, parameter has {:?}",
                        t.dims(),
                        p.var.dims()
                    )));
                }
                // A fresh, contiguous copy: the moments are updated in place.
                Ok(t.to_device(p.var.device())?
                    .to_dtype(p.var.dtype())?
                    .detach()
                    .copy()?)
            };
            let m = moment(&keys[0])?;
            let v = moment(&keys[1])?;
            let steps = scalar(&keys[2])?;
            used.extend(keys);
            restored.push(Some((m, v, steps)));
        }
        if let Some(k) = state.keys().filter(|k| !used.contains(*k)).min() {
            return Err(TrainError::invalid(format!(
                "optimizer state has `{k}`, which belongs to no optimised parameter (different model?)"
            )));
        }
        for (p, r) in self.params.iter_mut().zip(restored) {
            match r {
                Some((m, v, steps)) => {
                    p.exp_avg = Some(m);
                    p.exp_avg_sq = Some(v);
                    p.steps = steps;
                }
                None => {
                    p.exp_avg = None;
                    p.exp_avg_sq = None;
                    p.steps = 0;
                }
            }
        }
        self.step_count = step_count;
        Ok(())
    }
}

// ---- in-place CPU kernels ------------------------------------------------------------------------

/// Elements per parallel work item: large enough that scheduling costs nothing next to the memory
/// traffic, small enough to split a big matrix over the cores.
const CHUNK: usize = 1 << 16;

pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: operand is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => Err(candle_core::Error::Msg(format!("{op}: operand is not f32"))),
    }
}

pub(crate) fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: operand is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => Err(candle_core::Error::Msg(format!("{op}: operand is not f32"))),
    }
}

fn check_len(op: &str, a: usize, b: usize) -> candle_core::Result<()> {
    if a != b {
        return Err(candle_core::Error::Msg(format!(
            "{op}: operand sizes differ ({a} vs {b})"
        )));
    }
    Ok(())
}

/// `m <- lerp(m, g, weight)`, as torch's `lerp_` computes it.
struct LerpInPlace {
    weight: f32,
}

impl InplaceOp2 for LerpInPlace {
    fn name(&self) -> &'static str {
        "adamw-exp-avg"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let m = f32_slice_mut(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        check_len(self.name(), m.len(), g.len())?;
        let w = self.weight;
        let small = w.abs() < 0.5;
        let kernel = |m: &mut [f32], g: &[f32]| {
            if small {
                m.iter_mut().zip(g).for_each(|(m, &g)| *m += w * (g - *m));
            } else {
                let one_minus = 1.0 - w;
                m.iter_mut()
                    .zip(g)
                    .for_each(|(m, &g)| *m = g - (g - *m) * one_minus);
            }
        };
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| kernel(m, g));
        Ok(())
    }
}

/// `v <- v * beta2 + (1 - beta2) * g * g` (torch: `mul_(beta2).addcmul_(g, g, value=1 - beta2)`).
struct SqAvgInPlace {
    beta2: f32,
    one_minus_beta2: f32,
}

impl InplaceOp2 for SqAvgInPlace {
    fn name(&self) -> &'static str {
        "adamw-exp-avg-sq"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let v = f32_slice_mut(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        check_len(self.name(), v.len(), g.len())?;
        let (b2, c2) = (self.beta2, self.one_minus_beta2);
        v.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(v, g)| {
                v.iter_mut()
                    .zip(g)
                    .for_each(|(v, &g)| *v = *v * b2 + c2 * g * g);
            });
        Ok(())
    }
}

/// `p <- p * decay + neg_step_size * m / (sqrt(v) / bc2_sqrt + eps)`.
struct ParamUpdate {
    decay: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl InplaceOp3 for ParamUpdate {
    fn name(&self) -> &'static str {
        "adamw-update"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32_slice_mut(s1, l1, self.name())?;
        let m = f32_slice(s2, l2, self.name())?;
        let v = f32_slice(s3, l3, self.name())?;
        check_len(self.name(), p.len(), m.len())?;
        check_len(self.name(), p.len(), v.len())?;
        let ParamUpdate {
            decay,
            bc2_sqrt,
            eps,
            neg_step_size,
        } = *self;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK))
            .zip(v.par_chunks(CHUNK))
            .for_each(|((p, m), v)| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    *p = *p * decay + neg_step_size * (m / denom);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads_for(var: &Var, g: &[f64]) -> GradStore {
        let mut store = GradStore::default();
        let t = Tensor::new(g, &Device::Cpu)
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        store.insert(var.as_tensor(), t);
        store
    }

    fn values(var: &Var) -> Vec<f64> {
        var.as_tensor()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    /// Two steps by hand, lr 0.1, weight_decay 0.1, betas (0.9, 0.999), eps 1e-8,
    /// p0 = [1, -2], g1 = [0.5, -1], g2 = [-0.5, 0.25].
    ///
    /// Step 1 (t = 1): bc1 = 1 - 0.9 = 0.1, bc2 = 1 - 0.999 = 0.001, step size = lr / bc1 = 1.
    ///   decay:  p = p * (1 - 0.1 * 0.1) = [0.99, -1.98]
    ///   m1 = 0.1 * g1 = [0.05, -0.1];  v1 = 0.001 * g1^2 = [0.00025, 0.001]
    ///   sqrt(v1) / sqrt(bc2) = sqrt(v1 / 0.001) = [0.5, 1.0];  denom = [0.5 + 1e-8, 1 + 1e-8]
    ///   p1 = [0.99 - 0.05 / 0.50000001, -1.98 + 0.1 / 1.00000001]
    ///      = [0.99 - 0.099999998, -1.98 + 0.099999999] = [0.890000002, -1.880000001]
    /// Step 2 (t = 2): bc1 = 1 - 0.81 = 0.19, bc2 = 1 - 0.998001 = 0.001999, step size = 0.1 / 0.19.
    ///   decay:  p = p1 * 0.99 = [0.881100002, -1.861200001]
    ///   m2 = 0.9 * m1 + 0.1 * g2 = [0.045 - 0.05, -0.09 + 0.025] = [-0.005, -0.065]
    ///   v2 = 0.999 * v1 + 0.001 * g2^2 = [0.00024975 + 0.00025, 0.000999 + 0.0000625]
    ///      = [0.00049975, 0.0010615]
    ///   sqrt(v2 / bc2) = [sqrt(0.25), sqrt(0.531015508)] = [0.5, 0.728708109]
    ///   update = (0.1 / 0.19) * m2 / (that + 1e-8)
    ///          = [0.526315789 * -0.005 / 0.50000001, 0.526315789 * -0.065 / 0.728708119]
    ///          = [-0.005263158, -0.046946816]
    ///   p2 = [0.881100002 + 0.005263158, -1.861200001 + 0.046946816] = [0.886363160, -1.814253185]
    /// (torch.optim.AdamW in f32 gives [0.8863632083, -1.8142532110].)
    const EXPECTED_1: [f64; 2] = [0.890000002, -1.880000001];
    const EXPECTED_2: [f64; 2] = [0.886363160, -1.814253185];
    const EXP_AVG_2: [f64; 2] = [-0.005, -0.065];
    const EXP_AVG_SQ_2: [f64; 2] = [0.00049975, 0.0010615];

    fn run_two_steps(dtype: DType) -> AdamW {
        let var = Var::from_tensor(
            &Tensor::new(&[1.0f64, -2.0], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
        opt.step(&grads_for(&var, &[0.5, -1.0]), 0.1).unwrap();
        let p1 = values(&var);
        for (a, b) in p1.iter().zip(EXPECTED_1) {
            assert!(
                (a - b).abs() < 1e-6,
                "{dtype:?} step 1: {p1:?} vs {EXPECTED_1:?}"
            );
        }
        opt.step(&grads_for(&var, &[-0.5, 0.25]), 0.1).unwrap();
        let p2 = values(&var);
        for (a, b) in p2.iter().zip(EXPECTED_2) {
            assert!(
                (a - b).abs() < 1e-6,
                "{dtype:?} step 2: {p2:?} vs {EXPECTED_2:?}"
            );
        }
        assert_eq!(opt.step_count(), 2);
        let st = opt.state().unwrap();
        let m = st["exp_avg.w"]
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let v = st["exp_avg_sq.w"]
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (a, b) in m.iter().zip(EXP_AVG_2) {
            assert!((a - b).abs() < 1e-8, "{m:?}");
        }
        for (a, b) in v.iter().zip(EXP_AVG_SQ_2) {
            assert!((a - b).abs() < 1e-10, "{v:?}");
        }
        opt
    }

    #[test]
    fn matches_torch_adamw_f32_in_place() {
        run_two_steps(DType::F32);
    }

    #[test]
    fn matches_torch_adamw_f64_tensor_ops() {
        // f64 takes the generic (tensor-op) path: same numbers, tighter.
        let opt = run_two_steps(DType::F64);
        let p = values(&opt.vars()[0]);
        assert!(
            (p[0] - 0.886363159769).abs() < 1e-11 && (p[1] + 1.814253184513).abs() < 1e-11,
            "{p:?}"
        );
    }

    #[test]
    fn in_place_update_is_seen_by_tensors_sharing_the_var() {
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let alias = var.as_tensor().clone(); // e.g. a model built from Trainable::tensors()
        let mut opt = AdamW::new(
            vec![("w".into(), var.clone())],
            AdamWConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        opt.step(&grads_for(&var, &[1.0, 1.0]), 0.1).unwrap();
        let a = alias.to_vec1::<f32>().unwrap();
        assert!(
            (a[0] - 0.9).abs() < 1e-6 && (a[1] + 2.1).abs() < 1e-6,
            "{a:?}"
        );
    }

    #[test]
    fn vars_without_gradient_are_skipped_and_no_decay_respected() {
        let a = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(
            vec![("a.bias".into(), a.clone()), ("b".into(), b.clone())],
            cfg,
        )
        .unwrap();
        opt.exclude_from_weight_decay(|n| n.ends_with(".bias"));
        // zero gradient: only the decay moves a parameter.
        opt.step(&grads_for(&a, &[0.0]), 0.1).unwrap();
        assert_eq!(values(&a), vec![1.0]);
        assert_eq!(values(&b), vec![1.0]); // no gradient: untouched, no decay either
        let st = opt.state().unwrap();
        assert!(st.contains_key("exp_avg.a.bias") && !st.contains_key("exp_avg.b"));
        opt.step(&grads_for(&b, &[0.0]), 0.1).unwrap();
        assert!((values(&b)[0] - 0.95).abs() < 1e-7); // 1 * (1 - 0.1 * 0.5)
        let st = opt.state().unwrap();
        assert_eq!(st["step.a.bias"].to_scalar::<i64>().unwrap(), 1);
        assert_eq!(st["step.b"].to_scalar::<i64>().unwrap(), 1);
        assert_eq!(st["step"].to_scalar::<i64>().unwrap(), 2);
    }

    #[test]
    fn state_round_trip_gives_identical_continuation() {
        let mk =
            || Var::from_tensor(&Tensor::new(&[0.3f32, -0.7, 1.1], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig {
            lr: 0.01,
            weight_decay: 0.01,
            ..Default::default()
        };
        let gs = [
            [0.1, -0.2, 0.3],
            [0.5, 0.4, -0.1],
            [-0.3, 0.2, 0.9],
            [0.05, -0.6, 0.2],
        ];
        let (va, vb) = (mk(), mk());
        let mut a = AdamW::new(vec![("x".into(), va.clone())], cfg.clone()).unwrap();
        for g in &gs {
            a.step(&grads_for(&va, g), 0.01).unwrap();
        }
        let mut b = AdamW::new(vec![("x".into(), vb.clone())], cfg.clone()).unwrap();
        for g in &gs[..2] {
            b.step(&grads_for(&vb, g), 0.01).unwrap();
        }
        let saved = b.state().unwrap();
        let vc = Var::from_tensor(&vb.as_tensor().copy().unwrap()).unwrap();
        let mut c = AdamW::new(vec![("x".into(), vc.clone())], cfg).unwrap();
        c.load_state(&saved).unwrap();
        assert_eq!(c.step_count(), 2);
        for g in &gs[2..] {
            c.step(&grads_for(&vc, g), 0.01).unwrap();
        }
        assert_eq!(values(&va), values(&vc));
        // the loaded tensors are copies: stepping did not touch the saved map
        assert_eq!(
            saved["exp_avg.x"].to_vec1::<f32>().unwrap(),
            b.state().unwrap()["exp_avg.x"].to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn load_state_rejects_foreign_or_misshapen_state() {
        let v = Var::from_tensor(&Tensor::new(&[0.0f32, 0.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("x".into(), v.clone())], AdamWConfig::default()).unwrap();
        let mut st = HashMap::new();
        st.insert("step".to_string(), Tensor::new(3i64, &Device::Cpu).unwrap());
        st.insert(
            "exp_avg.y".to_string(),
            Tensor::new(&[0f32, 0.], &Device::Cpu).unwrap(),
        );
        let e = opt.load_state(&st).unwrap_err().to_string();
        assert!(e.contains("exp_avg.y"), "{e}");
        st.remove("exp_avg.y");
        st.insert(
            "exp_avg.x".to_string(),
            Tensor::new(&[0f32, 0., 0.], &Device::Cpu).unwrap(),
        );
        st.insert(
            "exp_avg_sq.x".to_string(),
            Tensor::new(&[0f32, 0., 0.], &Device::Cpu).unwrap(),
        );
        st.insert(
            "step.x".to_string(),
            Tensor::new(1i64, &Device::Cpu).unwrap(),
        );
        let e = opt.load_state(&st).unwrap_err().to_string();
        assert!(e.contains("shape"), "{e}");
        assert!(AdamW::new(
            vec![("x".into(), v.clone()), ("x".into(), v.clone())],
            AdamWConfig::default()
        )
        .is_err());
        let e = AdamW::new(
            vec![("x".into(), v.clone()), ("y".into(), v)],
            AdamWConfig::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("same tensor"), "{e}");
        assert!(AdamWConfig {
            beta2: 1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
