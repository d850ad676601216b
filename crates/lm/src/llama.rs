//! The Llama-family decoder (Llama, Mistral, SmolLM, Qwen2) with an LM head and an optional
//! scalar head, written so that the same code trains (every op differentiable when a gradient is
//! needed) and generates (fused kernels and a KV cache when none is).
//!
//! Shapes: b = batch, t = query length, s = key length (cache + t), h = hidden size,
//! nh / nkv = query / key-value heads, d = head dim, v = vocab.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{kv_cache::KvCache, Linear};

use crate::attention::{self, AttentionMask};
use crate::config::LlamaConfig;
use crate::error::{LmError, Result};
use crate::kv_cache::LayerKv;
use crate::lora::{Adapters, Dropout};
use candle_core::quantized::QTensor;

/// Quantised frozen weights by name (`model.layers.0.mlp.up_proj.weight`, ...).
pub type QuantizedWeights = HashMap<String, Arc<QTensor>>;
use crate::{fused, ops};

/// Additive value for masked attention scores. Finite (not -inf) so that a row with every key
/// masked (a padding query) gives a uniform softmax instead of NaN; exp(-1e9) is exactly 0 in f32.
pub const MASKED: f32 = -1e9;

fn param(weights: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    weights
        .get(name)
        .cloned()
        .ok_or_else(|| LmError::Invalid(format!("missing parameter `{name}`")))
}

fn linear(weights: &HashMap<String, Tensor>, prefix: &str, bias: bool) -> Result<Linear> {
    let w = param(weights, &format!("{prefix}.weight"))?;
    let b = if bias {
        Some(param(weights, &format!("{prefix}.bias"))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}

/// A projection x·Wᵀ (+ b), with an optional LoRA adapter: + s · (dropout(x)·Aᵀ)·Bᵀ
/// (see [`crate::lora`]).
#[derive(Clone)]
struct Projection {
    linear: Linear,
    /// A frozen base kept quantised (QLoRA-style): used instead of `linear`'s weight, which is
    /// then an empty placeholder.
    quantized: Option<Arc<QTensor>>,
    lora: Option<LoraBranch>,
}

#[derive(Clone)]
struct LoraBranch {
    /// (r, in)
    a: Linear,
    /// (out, r)
    b: Linear,
    scale: f64,
    /// Only in models that train (see [`Llama::from_weights_with_adapters`]).
    dropout: Option<Dropout>,
}

impl Projection {
    fn new(
        w: &HashMap<String, Tensor>,
        prefix: &str,
        bias: bool,
        adapters: Option<&Adapters>,
        quantized: &QuantizedWeights,
    ) -> Result<Self> {
        let lora = match adapters {
            Some(ad) => ad.get(prefix)?.map(|(a, b)| LoraBranch {
                a: Linear::new(a, None),
                b: Linear::new(b, None),
                scale: ad.scale,
                dropout: ad.dropout.clone(),
            }),
            None => None,
        };
        if let Some(q) = quantized.get(&format!("{prefix}.weight")) {
            let b = match bias {
                true => Some(param(w, &format!("{prefix}.bias"))?),
                false => None,
            };
            let placeholder = Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu)?;
            return Ok(Projection {
                linear: Linear::new(placeholder, b),
                quantized: Some(q.clone()),
                lora,
            });
        }
        Ok(Projection {
            linear: linear(w, prefix, bias)?,
            quantized: None,
            lora,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.fused_lora(x)? {
            return Ok(y);
        }
        let y = match &self.quantized {
            Some(q) => {
                let y = ops::quantized_linear(q, x)?;
                match self.linear.bias() {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            None => ops::linear(&self.linear, x)?,
        };
        self.add_adapter(y, x)
    }

    /// Training through an adapter (f32 on the CPU, no dropout): the projection and its update
    /// as one node ([`crate::lora::fused_lora_linear`]). `None` when that does not apply.
    fn fused_lora(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(l) = &self.lora else {
            return Ok(None);
        };
        let (a, b) = (l.a.weight(), l.b.weight());
        let dropout = l.dropout.as_ref().is_some_and(|d| d.p > 0.0);
        if !self.adapter_trains(x) || dropout || ![x, a, b].iter().all(|t| fused::supported(t)) {
            return Ok(None);
        }
        let base = match &self.quantized {
            Some(q) => crate::lora::FrozenWeight::Quantized(q.clone()),
            None if !self.linear.weight().track_op() && fused::supported(self.linear.weight()) => {
                crate::lora::FrozenWeight::Dense(self.linear.weight().clone())
            }
            None => return Ok(None),
        };
        let y = crate::lora::fused_lora_linear(x, &base, a, b, l.scale)?;
        Ok(Some(match self.linear.bias() {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        }))
    }

    /// Whether a gradient flows through this projection's adapter on `x` (training).
    fn adapter_trains(&self, x: &Tensor) -> bool {
        self.lora
            .as_ref()
            .is_some_and(|l| x.track_op() || l.a.weight().track_op() || l.b.weight().track_op())
    }

    /// y + the adapter's update of x (y itself when there is no adapter).
    fn add_adapter(&self, y: Tensor, x: &Tensor) -> Result<Tensor> {
        let Some(l) = &self.lora else {
            return Ok(y);
        };
        let x = match &l.dropout {
            Some(d) if d.p > 0.0 => d.apply(x)?,
            _ => x.clone(),
        };
        let low = ops::linear(&l.a, &x)?; // (..., r)
        let update = ops::linear(&l.b, &low)?; // (..., out)
        Ok((y + (update * l.scale)?)?)
    }

    /// Several projections of the same x (q/k/v, gate/up): the frozen products in one pass.
    fn forward_many(layers: &[&Projection], x: &Tensor) -> Result<Vec<Tensor>> {
        if layers
            .iter()
            .any(|p| p.quantized.is_some() || p.adapter_trains(x))
        {
            return layers.iter().map(|p| p.forward(x)).collect();
        }
        let linears: Vec<&Linear> = layers.iter().map(|p| &p.linear).collect();
        ops::linear_many(&linears, x)?
            .into_iter()
            .zip(layers)
            .map(|(y, p)| p.add_adapter(y, x))
            .collect()
    }

    /// The same projection with no gradient graph and no dropout.
    fn detached(&self) -> Projection {
        let dl = |l: &Linear| Linear::new(l.weight().detach(), l.bias().map(|b| b.detach()));
        Projection {
            linear: dl(&self.linear),
            quantized: self.quantized.clone(),
            lora: self.lora.as_ref().map(|l| LoraBranch {
                a: dl(&l.a),
                b: dl(&l.b),
                scale: l.scale,
                dropout: None,
            }),
        }
    }

    /// The same projection drawing its dropout masks from a counter at `draws` (replay).
    fn replaying_dropout(&self, draws: u64) -> Projection {
        let mut p = self.clone();
        if let Some(l) = p.lora.as_mut() {
            l.dropout = l.dropout.as_ref().map(|d| d.replay_from(draws));
        }
        p
    }

    fn params(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        if self.quantized.is_none() {
            out.push(self.linear.weight().clone());
        }
        out.extend(self.linear.bias().cloned());
        if let Some(l) = &self.lora {
            out.push(l.a.weight().clone());
            out.push(l.b.weight().clone());
        }
        out
    }
}

/// Inverse RoPE frequencies, with HF's `linear` and `llama3` scaling.
fn rope_inv_freq(c: &LlamaConfig) -> Vec<f32> {
    let d = c.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    let Some(s) = &c.rope_scaling else {
        return base.iter().map(|&x| x as f32).collect();
    };
    let factor = s.factor.unwrap_or(1.0);
    match s.rope_type.as_str() {
        "linear" => base.iter().map(|&x| (x / factor) as f32).collect(),
        "llama3" => {
            let low = s.low_freq_factor.unwrap_or(1.0);
            let high = s.high_freq_factor.unwrap_or(4.0);
            let old_ctx = s.original_max_position_embeddings.unwrap_or(8192) as f64;
            let (low_wavelen, high_wavelen) = (old_ctx / low, old_ctx / high);
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    if wavelen < high_wavelen || wavelen > low_wavelen {
                        scaled as f32
                    } else {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    }
                })
                .collect()
        }
        _ => base.iter().map(|&x| x as f32).collect(),
    }
}

#[derive(Clone)]
struct Attention {
    q_proj: Projection,
    k_proj: Projection,
    v_proj: Projection,
    o_proj: Projection,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        fused_mask: Option<&Arc<AttentionMask>>,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        let scale = 1.0 / (d as f64).sqrt();
        let candle_cache = matches!(cache.as_deref(), Some(LayerCache::Candle(_)));
        if let (Some(fused_mask), false) = (fused_mask, candle_cache) {
            // f32 on the CPU, every tensor in the projections' (b, t, heads, d) layout: fused RoPE,
            // no transposed copies.
            let [q, k, v]: [Tensor; 3] =
                Projection::forward_many(&[&self.q_proj, &self.k_proj, &self.v_proj], x)?
                    .try_into()
                    .expect("three layers, three outputs");
            let q = fused::rope_time_first(&q.reshape((b, t, self.n_heads, d))?, cos, sin)?;
            let k = fused::rope_time_first(&k.reshape((b, t, self.n_kv_heads, d))?, cos, sin)?;
            let v = v.reshape((b, t, self.n_kv_heads, d))?;
            let out = match cache {
                // Whole sequences: the fused attention op (no score tensors kept, no K/V copies).
                None => attention::attention(&q, &k, &v, fused_mask.clone(), scale)?,
                // Decoding: keys and values appended to the host cache in place, attended there.
                Some(cache) => {
                    let host =
                        |x: Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
                    let (q, k, v) = (host(q)?, host(k)?, host(v)?);
                    let kv = cache_layer(cache, b, self.n_kv_heads, d)?;
                    let out =
                        kv.append_and_attend(&q, &k, &v, self.n_heads, fused_mask, scale as f32)?;
                    Tensor::from_vec(out, (b, t, self.n_heads * d), x.device())?
                }
            }; // (b, t, nh·d)
            return self.o_proj.forward(&out);
        }
        let cache = match cache {
            Some(LayerCache::Candle(kv)) => Some(kv),
            Some(_) => {
                return Err(LmError::Invalid(
                    "kv cache: a host cache needs f32 on the CPU".into(),
                ))
            }
            None => None,
        };
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, d))?.transpose(1, 2)?)
        };
        let q = heads(self.q_proj.forward(x)?, self.n_heads)?; // (b, nh, t, d)
        let k = heads(self.k_proj.forward(x)?, self.n_kv_heads)?; // (b, nkv, t, d)
        let v = heads(self.v_proj.forward(x)?, self.n_kv_heads)?;
        let q = ops::rope(&q, cos, sin)?;
        let k = ops::rope(&k, cos, sin)?;
        let v = v.contiguous()?;
        let (k, v) = match cache {
            Some(cache) => cache.append(&k.contiguous()?, &v)?, // (b, nkv, s, d)
            None => (k, v),
        };
        let n_rep = self.n_heads / self.n_kv_heads;
        let k = ops::repeat_kv(&k, n_rep)?.contiguous()?;
        let v = ops::repeat_kv(&v, n_rep)?.contiguous()?;
        let scores = (q.contiguous()?.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?; // (b, nh, t, s)
        let probs = ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // (b, nh, t, d)
        let out = out.transpose(1, 2)?.reshape((b, t, self.n_heads * d))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Clone)]
struct Mlp {
    gate_proj: Projection,
    up_proj: Projection,
    down_proj: Projection,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [gate, up]: [Tensor; 2] =
            Projection::forward_many(&[&self.gate_proj, &self.up_proj], x)?
                .try_into()
                .expect("two layers, two outputs");
        let gated = ops::swiglu(&gate, &up)?;
        self.down_proj.forward(&gated)
    }
}

#[derive(Clone)]
struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

impl DecoderLayer {
    /// x + attn(norm(x)), then + mlp(norm(·)): (b, t, h) -> (b, t, h).
    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        mask: &Tensor,
        fused_mask: Option<&Arc<AttentionMask>>,
        cache: Option<&mut LayerCache>,
        eps: f64,
    ) -> Result<Tensor> {
        let h = ops::rms_norm(x, &self.input_layernorm, eps)?;
        let x = (x + self
            .self_attn
            .forward(&h, rope.0, rope.1, mask, fused_mask, cache)?)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm, eps)?;
        Ok((&x + self.mlp.forward(&h)?)?)
    }

    /// Every parameter tensor of the layer.
    fn params(&self) -> Vec<Tensor> {
        let mut out = vec![
            self.input_layernorm.clone(),
            self.post_attention_layernorm.clone(),
        ];
        for l in self.projections() {
            out.extend(l.params());
        }
        out
    }

    fn projections(&self) -> [&Projection; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// Dropout masks drawn so far by this layer's model (None without adapter dropout).
    fn dropout_draws(&self) -> Option<u64> {
        self.projections().iter().find_map(|p| {
            p.lora
                .as_ref()
                .and_then(|l| l.dropout.as_ref())
                .map(|d| d.draws.load(std::sync::atomic::Ordering::Relaxed))
        })
    }

    /// The layer with every projection drawing from one fresh counter at `draws` (so a replay
    /// draws the masks its first run drew).
    fn replaying_dropout(&self, draws: u64) -> DecoderLayer {
        let mut l = self.clone();
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(draws));
        for p in [
            &mut l.self_attn.q_proj,
            &mut l.self_attn.k_proj,
            &mut l.self_attn.v_proj,
            &mut l.self_attn.o_proj,
            &mut l.mlp.gate_proj,
            &mut l.mlp.up_proj,
            &mut l.mlp.down_proj,
        ] {
            *p = p.replaying_dropout(draws);
            if let Some(d) = p.lora.as_mut().and_then(|l| l.dropout.as_mut()) {
                d.draws = counter.clone();
            }
        }
        l
    }
}

/// Gradient checkpointing (`gradient_checkpointing` in transformers): a decoder layer run as one
/// op that keeps only its input. The forward pass runs the layer and lets its graph go; the backward
/// pass runs it again with a graph, backpropagates the incoming gradient through it, returns the
/// input's gradient and hands the layer's parameter gradients to [`backward`] (a custom op can only
/// return gradients for its own inputs). Costs one more forward pass per step; saves every
/// activation inside the layers.
struct CheckpointedLayer {
    layer: DecoderLayer,
    /// Adapter-dropout masks drawn before this layer's forward pass, so the backward pass's
    /// replay draws the same masks.
    dropout_draws: Option<u64>,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    fused_mask: Arc<AttentionMask>,
    eps: f64,
}

thread_local! {
    /// Parameter gradients from checkpointed layers, collected during a [`backward`] call on this
    /// thread (candle runs a backward pass on the calling thread). `None` outside one.
    static CHECKPOINT_GRADS: std::cell::RefCell<Option<Vec<(Tensor, Tensor)>>> =
        const { std::cell::RefCell::new(None) };
}

/// `loss.backward()`, plus the parameter gradients of gradient-checkpointed layers. Every training
/// loop calls this instead of `Tensor::backward` (identical when no layer is checkpointed).
pub fn backward(loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
    CHECKPOINT_GRADS.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let result = loss.backward();
    let pending = CHECKPOINT_GRADS
        .with(|c| c.borrow_mut().take())
        .unwrap_or_default();
    let mut grads = result?;
    for (param, g) in pending {
        let merged = match grads.get(&param) {
            Some(existing) => (existing + &g)?,
            None => g,
        };
        grads.insert(&param, merged);
    }
    Ok(grads)
}

impl CheckpointedLayer {
    /// The layer on `x`, with a graph when its weights (or `x`) carry one.
    fn run(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.layer
            .forward(
                x,
                (&self.cos, &self.sin),
                &self.mask,
                Some(&self.fused_mask),
                None,
                self.eps,
            )
            .map_err(candle_core::Error::wrap)
    }
}

impl candle_core::CustomOp1 for CheckpointedLayer {
    fn name(&self) -> &'static str {
        "checkpointed-decoder-layer"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = fused::input_tensor(storage, layout, self.name())?;
        fused::output_storage(&self.run(&x)?)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if CHECKPOINT_GRADS.with(|c| c.borrow().is_none()) {
            candle_core::bail!(
                "gradient checkpointing: backpropagate with rlhf_lm::llama::backward(&loss), not \
                 loss.backward() (the checkpointed layers' parameter gradients are merged there)"
            );
        }
        let input = Var::from_tensor(&x.detach())?;
        let replay = CheckpointedLayer {
            layer: match self.dropout_draws {
                Some(draws) => self.layer.replaying_dropout(draws),
                None => self.layer.clone(),
            },
            dropout_draws: None,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            mask: self.mask.clone(),
            fused_mask: self.fused_mask.clone(),
            eps: self.eps,
        };
        let y = replay.run(input.as_tensor())?;
        let grads = (y * grad)?.sum_all()?.backward()?;
        let params: Vec<(Tensor, Tensor)> = self
            .layer
            .params()
            .into_iter()
            .filter_map(|p| grads.get(&p).map(|g| (p.clone(), g.clone())))
            .collect();
        CHECKPOINT_GRADS.with(|c| {
            if let Some(pending) = c.borrow_mut().as_mut() {
                pending.extend(params);
            }
        });
        Ok(grads.get(input.as_tensor()).cloned())
    }
}

/// One KV cache per layer, sized for the whole generation.
pub struct Cache {
    layers: Vec<LayerCache>,
}

/// A layer's cache: the host cache of [`crate::kv_cache`] for f32 on the CPU, candle's `KvCache`
/// elsewhere; which one is decided by the first forward pass that uses it.
pub enum LayerCache {
    Unused { capacity: usize },
    Host(LayerKv),
    Candle(KvCache),
}

impl LayerCache {
    fn len(&self) -> usize {
        match self {
            LayerCache::Unused { .. } => 0,
            LayerCache::Host(kv) => kv.len(),
            LayerCache::Candle(kv) => kv.current_seq_len(),
        }
    }
}

/// The host cache of `cache`, made on first use for these dimensions.
fn cache_layer(
    cache: &mut LayerCache,
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<&mut LayerKv> {
    if let LayerCache::Unused { capacity } = *cache {
        *cache = LayerCache::Host(LayerKv::new(batch, capacity, kv_heads, head_dim));
    }
    match cache {
        LayerCache::Host(kv) if kv.fits(batch, kv_heads, head_dim) => Ok(kv),
        _ => Err(LmError::Invalid(
            "kv cache: made for another batch or model".into(),
        )),
    }
}

impl Cache {
    pub fn new(num_layers: usize, max_len: usize) -> Self {
        Cache {
            layers: (0..num_layers)
                .map(|_| LayerCache::Unused { capacity: max_len })
                .collect(),
        }
    }
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep batch rows `rows`, in that order (see [`LayerKv::select_rows`]). Only the host cache
    /// (f32 on the CPU) can do this; see [`Llama::uses_host_cache`].
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        for layer in self.layers.iter_mut() {
            match layer {
                LayerCache::Unused { .. } => {}
                LayerCache::Host(kv) => kv.select_rows(rows)?,
                LayerCache::Candle(_) => {
                    return Err(LmError::Invalid(
                        "kv cache: selecting rows needs the host cache (f32 on the CPU)".into(),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// The decoder: embeddings, layers, final norm and LM head. A scalar head for reward/value
/// models is a separate [`ScalarHead`] on the same hidden states.
pub struct Llama {
    pub config: LlamaConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Tensor,
    inv_freq: Tensor,
    eps: f64,
    gradient_checkpointing: bool,
}

impl Llama {
    /// Recompute each decoder layer in the backward pass instead of keeping its activations
    /// (f32 on the CPU, whole sequences; see [`CheckpointedLayer`]). Gradients then come from
    /// [`backward`], not `Tensor::backward`.
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    /// Build from HF-named weights. The tensors are shared, not copied: pass `Var`-backed tensors
    /// (see [`TrainableLlama`]) and the model is trainable; pass plain tensors and it is frozen.
    pub fn from_weights(
        config: &LlamaConfig,
        w: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_weights_with_adapters(config, w, None, device)
    }

    /// [`Llama::from_weights`] with LoRA adapters on the projections that have one in
    /// `adapters` (their tensors shared, not copied; `Var`s train). With `adapters.dropout`, each
    /// forward pass drops adapter inputs (training); [`Llama::detached`] turns that off.
    pub fn from_weights_with_adapters(
        config: &LlamaConfig,
        w: &HashMap<String, Tensor>,
        adapters: Option<&Adapters>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_parts(config, w, adapters, &QuantizedWeights::new(), device)
    }

    /// [`Llama::from_weights_with_adapters`] with some projection weights kept quantised
    /// (`quantized`, by weight name, instead of their entries in `w`): a frozen QLoRA-style base.
    pub fn from_parts(
        config: &LlamaConfig,
        w: &HashMap<String, Tensor>,
        adapters: Option<&Adapters>,
        quantized: &QuantizedWeights,
        device: &Device,
    ) -> Result<Self> {
        let c = config;
        let proj = |name: &str, bias: bool| Projection::new(w, name, bias, adapters, quantized);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            layers.push(DecoderLayer {
                input_layernorm: param(w, &format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: param(
                    w,
                    &format!("{p}.post_attention_layernorm.weight"),
                )?,
                self_attn: Attention {
                    q_proj: proj(&format!("{p}.self_attn.q_proj"), c.qkv_bias)?,
                    k_proj: proj(&format!("{p}.self_attn.k_proj"), c.qkv_bias)?,
                    v_proj: proj(&format!("{p}.self_attn.v_proj"), c.qkv_bias)?,
                    o_proj: proj(&format!("{p}.self_attn.o_proj"), c.o_bias)?,
                    n_heads: c.num_attention_heads,
                    n_kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                mlp: Mlp {
                    gate_proj: proj(&format!("{p}.mlp.gate_proj"), c.mlp_bias)?,
                    up_proj: proj(&format!("{p}.mlp.up_proj"), c.mlp_bias)?,
                    down_proj: proj(&format!("{p}.mlp.down_proj"), c.mlp_bias)?,
                },
            });
        }
        let embed_tokens = param(w, "model.embed_tokens.weight")?;
        let lm_head = if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            param(w, "lm_head.weight")?
        };
        let inv_freq = Tensor::new(rope_inv_freq(c), device)?.reshape((1, 1, c.head_dim / 2))?;
        Ok(Llama {
            config: c.clone(),
            embed_tokens,
            layers,
            norm: param(w, "model.norm.weight")?,
            lm_head,
            inv_freq,
            eps: c.rms_norm_eps,
            gradient_checkpointing: false,
        })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Whether decoding keeps its keys and values in the host cache ([`crate::kv_cache`]): f32 on
    /// the CPU.
    pub fn uses_host_cache(&self) -> bool {
        self.embed_tokens.dtype() == DType::F32 && self.embed_tokens.device().is_cpu()
    }

    /// cos/sin tables for the given positions, (b, t) u32 -> two (b, t, d/2) f32 tensors.
    fn rope_tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let freqs = positions
            .to_dtype(DType::F32)?
            .unsqueeze(D::Minus1)?
            .broadcast_mul(&self.inv_freq)?;
        let dtype = self.embed_tokens.dtype();
        Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// Final-norm hidden states, (b, t, h).
    /// `ids`, `positions`: (b, t) u32. `mask`: additive, broadcastable to (b, 1, t, s).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut Cache>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if let Some(window) = self.config.sliding_window {
            let keys = t + cache.as_ref().map_or(0, |c| c.len());
            if keys > window {
                return Err(LmError::Invalid(format!(
                    "sequence of {keys} tokens exceeds the sliding window ({window}); sliding-window attention is not implemented"
                )));
            }
        }
        let (cos, sin) = self.rope_tables(positions)?;
        // f32 on the CPU: attention runs fused (whole sequences) or on the host cache (decoding),
        // reading the mask as host rows.
        let fused_mask = if self.uses_host_cache() {
            let past = cache.as_ref().map_or(0, |c| c.len());
            Some(AttentionMask::from_tensor(mask, b, t, past + t)?)
        } else {
            if let Some(c) = cache.as_deref_mut() {
                for layer in c.layers.iter_mut() {
                    if let LayerCache::Unused { capacity } = *layer {
                        *layer = LayerCache::Candle(KvCache::new(2, capacity));
                    }
                }
            }
            None
        };
        let mask = mask.to_dtype(self.embed_tokens.dtype())?;
        let mask = &mask;
        let mut x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            match &fused_mask {
                Some(fm) if self.gradient_checkpointing && x.track_op() => {
                    x = x.contiguous()?.apply_op1(CheckpointedLayer {
                        layer: layer.clone(),
                        dropout_draws: layer.dropout_draws(),
                        cos: cos.clone(),
                        sin: sin.clone(),
                        mask: mask.clone(),
                        fused_mask: fm.clone(),
                        eps: self.eps,
                    })?;
                }
                _ => {
                    let kv = cache.as_deref_mut().map(|c| &mut c.layers[i]);
                    x = layer.forward(&x, (&cos, &sin), mask, fused_mask.as_ref(), kv, self.eps)?;
                }
            }
        }
        ops::rms_norm(&x, &self.norm, self.eps)
    }

    /// LM logits for hidden states: (..., h) -> (..., v).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        ops::linear(&Linear::new(self.lm_head.clone(), None), hidden)
    }

    /// A view of the same weights with no gradient graph: fused kernels everywhere. For generation
    /// and reference scoring with a model that is also being trained.
    pub fn detached(&self) -> Llama {
        Llama {
            config: self.config.clone(),
            embed_tokens: self.embed_tokens.detach(),
            layers: self
                .layers
                .iter()
                .map(|l| DecoderLayer {
                    input_layernorm: l.input_layernorm.detach(),
                    post_attention_layernorm: l.post_attention_layernorm.detach(),
                    self_attn: Attention {
                        q_proj: l.self_attn.q_proj.detached(),
                        k_proj: l.self_attn.k_proj.detached(),
                        v_proj: l.self_attn.v_proj.detached(),
                        o_proj: l.self_attn.o_proj.detached(),
                        ..l.self_attn
                    },
                    mlp: Mlp {
                        gate_proj: l.mlp.gate_proj.detached(),
                        up_proj: l.mlp.up_proj.detached(),
                        down_proj: l.mlp.down_proj.detached(),
                    },
                })
                .collect(),
            norm: self.norm.detach(),
            lm_head: self.lm_head.detach(),
            inv_freq: self.inv_freq.clone(),
            eps: self.eps,
            gradient_checkpointing: false,
        }
    }
}

/// Scalar head (reward or value): a linear map h -> 1, HF's `score.weight` of
/// `LlamaForSequenceClassification` with `num_labels = 1`.
pub struct ScalarHead {
    pub weight: Tensor,
}

impl ScalarHead {
    pub fn from_weights(w: &HashMap<String, Tensor>) -> Result<Self> {
        Ok(ScalarHead {
            weight: param(w, "score.weight")?,
        })
    }

    /// Per-position scores, (b, t, h) -> (b, t).
    pub fn per_token(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(Linear::new(self.weight.clone(), None)
            .forward(hidden)?
            .squeeze(D::Minus1)?)
    }

    /// The score read at each row's last non-pad token. `last_index`: (b,) u32.
    pub fn at_last_token(&self, hidden: &Tensor, last_index: &Tensor) -> Result<Tensor> {
        let scores = self.per_token(hidden)?; // (b, t)
        Ok(scores.gather(&last_index.unsqueeze(1)?, 1)?.squeeze(1)?)
    }
}

/// Owns the `Var`s behind a trainable model (and optional scalar head), so an optimiser can step
/// them and a checkpoint can save them under their HF names.
pub struct Trainable {
    pub vars: Vec<(String, Var)>,
}

impl Trainable {
    /// Turn every tensor into a `Var` (a copy, so the source weights stay untouched).
    pub fn new(weights: &HashMap<String, Tensor>) -> Result<Self> {
        let mut names: Vec<&String> = weights.keys().collect();
        names.sort();
        let vars = names
            .into_iter()
            .map(|n| Ok((n.clone(), Var::from_tensor(&weights[n].copy()?)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Trainable { vars })
    }

    /// The current values as a name -> tensor map (the tensors are the `Var`s themselves, so a
    /// model built from this map is trainable).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// A frozen snapshot (deep copy), e.g. for a reference model or a checkpoint.
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }
}

/// Random weights for a fresh model (the built-in testbed's tiny model, tests): normal(0, std)
/// for matrices, ones for norms, zeros for biases. Deterministic in `seed`, independent of candle's
/// (unseeded) device RNG.
pub fn random_weights(
    config: &LlamaConfig,
    seed: u64,
    std: f64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (name, shape) in crate::pretrained::expected_shapes(config) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n)
                .map(|_| {
                    // Box-Muller
                    let u1: f64 = rng.random::<f64>().max(1e-12);
                    let u2: f64 = rng.random::<f64>();
                    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
                })
                .collect()
        };
        out.insert(name, Tensor::from_vec(values, shape, device)?);
    }
    Ok(out)
}
