//! The few tensor operations the decoder needs, each with two paths.
//!
//! candle's fused CPU kernels (`rms_norm`, `softmax_last_dim`, `rope`) are fast but have no backward:
//! they silently detach their output. So every op here checks whether its inputs are part of a
//! gradient graph (`track_op`) and only takes the fused kernel when nothing upstream needs a gradient
//! (generation, reference-model scoring). The training graph always goes through differentiable ops:
//! for f32 on the CPU, the fused kernels with a backward in [`crate::fused`]; otherwise (f64
//! gradient checks, other devices) the composed versions (`*_composed`), one tensor op per step.

use candle_core::quantized::QTensor;
use candle_core::{Tensor, D};

use crate::error::Result;
use crate::{fused, skinny};

/// True when no gradient can flow through any of `xs` (so a fused kernel is safe) and they are
/// f32 (the fused kernels' dtype; f64 is used by gradient checks).
pub fn no_grad(xs: &[&Tensor]) -> bool {
    xs.iter()
        .all(|x| !x.track_op() && x.dtype() == candle_core::DType::F32)
}

/// RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if no_grad(&[x, weight]) {
        return Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            weight,
            eps as f32,
        )?);
    }
    if fused::supported(x) && fused::supported(weight) {
        return Ok(fused::rms_norm(x, weight, eps)?);
    }
    rms_norm_composed(x, weight, eps)
}

/// RMSNorm from differentiable tensor ops (any dtype / device).
pub fn rms_norm_composed(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = x.dim(D::Minus1)? as f64;
    let mean_sq = (x.sqr()?.sum_keepdim(D::Minus1)? / hidden)?;
    let normed = x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// x · Wᵀ (+ b) for a `Linear` layer. While training (a gradient flows through x or W) f32 on the
/// CPU goes through [`fused::linear`], whose backward writes dW directly; without a gradient, a few
/// rows of x (decoding) go through [`skinny::linear_many`]; otherwise candle's `Linear`.
pub fn linear(layer: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    let w = layer.weight();
    if (x.track_op() || w.track_op()) && fused::supported(x) && fused::supported(w) {
        let y = fused::linear(x, w)?;
        return Ok(match layer.bias() {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        });
    }
    if let Some(mut ys) = few_rows_linear(&[layer], x)? {
        return Ok(ys.remove(0));
    }
    Ok(layer.forward(x)?)
}

/// [`linear`] for several layers that read the same `x` (q, k and v; gate and up): without a
/// gradient and with few rows, all of them in one pass of [`skinny::linear_many`].
pub fn linear_many(layers: &[&candle_nn::Linear], x: &Tensor) -> Result<Vec<Tensor>> {
    if let Some(ys) = few_rows_linear(layers, x)? {
        return Ok(ys);
    }
    layers.iter().map(|l| linear(l, x)).collect()
}

/// Decoding's products: a few rows of `x` and no gradient, f32 on the CPU. The weights are streamed
/// in place instead of repacked for gemm ([`skinny`]). `None` when that path does not apply.
fn few_rows_linear(layers: &[&candle_nn::Linear], x: &Tensor) -> Result<Option<Vec<Tensor>>> {
    let weights: Vec<&Tensor> = layers.iter().map(|l| l.weight()).collect();
    let mut all: Vec<&Tensor> = weights.clone();
    all.push(x);
    let k = x.dim(D::Minus1)?;
    let applies = no_grad(&all)
        && x.device().is_cpu()
        && k > 0
        && x.elem_count() / k <= skinny::MAX_ROWS
        && weights
            .iter()
            .all(|w| w.is_contiguous() && w.dims().get(1) == Some(&k));
    if !applies {
        return Ok(None);
    }
    let ys = skinny::linear_many(x, &weights)?;
    let ys = ys
        .into_iter()
        .zip(layers)
        .map(|(y, l)| match l.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(ys))
}

/// x · Wᵀ for a quantised, frozen W (`(n, k)` blocks; QLoRA's base). Decoding (a few rows, no
/// gradient) uses candle's quantised product, which also rounds x's rows to 8-bit blocks as
/// llama.cpp does and reads only the blocks; everything else (scoring, training) dequantises W
/// for one f32 product and drops it, with a backward for x only (dx = g · dequant(W), W
/// dequantised again), so no f32 copy of the base outlives its layer.
pub fn quantized_linear(w: &std::sync::Arc<QTensor>, x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let k = x.dim(D::Minus1)?;
    if !x.track_op() && k > 0 && x.elem_count() / k <= skinny::MAX_ROWS {
        return Ok(x.apply_op1_no_bwd(w.as_ref())?);
    }
    Ok(x.apply_op1(QuantizedLinear(w.clone()))?)
}

struct QuantizedLinear(std::sync::Arc<QTensor>);

impl candle_core::CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = fused::input_tensor(storage, layout, self.name())?;
        let w = self.0.dequantize(&candle_core::Device::Cpu)?;
        fused::output_storage(&fused::linear(&x, &w)?)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.0.dequantize(x.device())?; // (n, k)
        let n = w.dim(0)?;
        let m = g.elem_count() / n;
        let dx = g.contiguous()?.reshape((m, n))?.matmul(&w)?; // (m, k)
        Ok(Some(dx.reshape(x.shape())?))
    }
}

/// silu(gate) · up (the SwiGLU feed-forward's gating): fused for f32 on the CPU (with a backward),
/// composed otherwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fused::supported(gate) && fused::supported(up) {
        return Ok(fused::swiglu(gate, up)?);
    }
    swiglu_composed(gate, up)
}

/// silu(gate) · up from differentiable tensor ops (any dtype / device).
pub fn swiglu_composed(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if no_grad(&[x]) {
        return Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?);
    }
    if fused::supported(x) {
        return Ok(fused::softmax_last_dim(x)?);
    }
    softmax_composed(x)
}

/// Softmax over the last dimension from differentiable tensor ops (any dtype / device).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// Rotary position embedding in Hugging Face's rotate-half layout.
/// `x`: (batch, heads, seq, head_dim); `cos`, `sin`: (batch, seq, head_dim / 2).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if no_grad(&[x]) {
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
    }
    let (b, _, t, d) = x.dims4()?;
    let table = [b, t, d / 2];
    if [x, cos, sin].iter().all(|v| fused::supported(v))
        && cos.dims() == table
        && sin.dims() == table
        && d % 2 == 0
    {
        return Ok(fused::rope(x, cos, sin)?);
    }
    rope_composed(x, cos, sin)
}

/// Rotary position embedding from differentiable tensor ops (any dtype / device).
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// Grouped-query attention: repeat each key/value head `n_rep` times along the head axis.
/// (batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim)
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n_rep, s, d))?
        .reshape((b, kv * n_rep, s, d))?)
}
