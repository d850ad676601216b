//! LoRA adapters (Hu et al., 2021) in the layout Python `peft` uses, so that an adapter trained
//! here loads in `peft`, vLLM or llama.cpp's converter, and one trained there loads here.
//!
//! A targeted projection y = x·Wᵀ (+ b) becomes
//!
//!   y = x·Wᵀ (+ b) + s · (dropout(x)·Aᵀ)·Bᵀ,   A: (r, in), B: (out, r),
//!
//! with s = alpha / r (or alpha / √r with rsLoRA). W stays frozen; only A and B are trained. A
//! starts Kaiming-uniform as `peft` does (`kaiming_uniform_(a=√5)`, i.e. U(-1/√in, 1/√in)) and B at
//! zero, so a fresh adapter leaves the model unchanged and the base model with adapters off is
//! the reference policy with no second copy of the weights.
//!
//! Names: inside the toolkit an adapter's tensors sit beside the weights they modify,
//! `model.layers.N.self_attn.q_proj.lora_A.weight`; `adapter_model.safetensors` prefixes them with
//! `base_model.model.` as `peft` writes them (no adapter name inside the key).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::LlamaConfig;
use crate::error::{LmError, Result};

/// Whole modules a LoRA run can also train (`modules_to_save`).
pub const SAVABLE_MODULES: [&str; 2] = ["embed_tokens", "lm_head"];

/// The projections of a decoder layer that can carry an adapter, in `peft`'s names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The key prefix `peft` puts in front of every tensor of `adapter_model.safetensors`.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// `target_modules`: a list of projection names, or `"all-linear"` (every projection of every
/// decoder layer; the LM head is never adapted, as in `peft`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum TargetModules {
    /// `"all-linear"` (the only string accepted).
    Preset(String),
    /// Projection names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    Names(Vec<String>),
}

impl Default for TargetModules {
    /// `peft`'s default for Llama-family models.
    fn default() -> Self {
        TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
    }
}

impl TargetModules {
    /// The targeted projections, in [`PROJECTIONS`] order.
    pub fn resolve(&self) -> std::result::Result<Vec<&'static str>, String> {
        match self {
            TargetModules::Preset(s) if s == "all-linear" => Ok(PROJECTIONS.to_vec()),
            TargetModules::Preset(s) => Err(format!(
                "target_modules = \"{s}\": expected \"all-linear\" or a list of {PROJECTIONS:?}"
            )),
            TargetModules::Names(names) => {
                if names.is_empty() {
                    return Err("target_modules is empty".into());
                }
                for n in names {
                    // `peft` also accepts a full module path ending in the name.
                    let short = n.rsplit('.').next().unwrap_or(n);
                    if !PROJECTIONS.contains(&short) {
                        return Err(format!(
                            "target_modules: unknown module `{n}` (expected one of {PROJECTIONS:?} or \"all-linear\")"
                        ));
                    }
                }
                Ok(PROJECTIONS
                    .iter()
                    .copied()
                    .filter(|p| names.iter().any(|n| n.rsplit('.').next() == Some(p)))
                    .collect())
            }
        }
    }
}

/// LoRA settings of a training run (`[lora]` in a method's TOML). `r = 0` (the default) trains
/// every parameter instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Adapter rank; 0 turns LoRA off (full fine-tuning).
    pub r: usize,
    /// `lora_alpha`: the update is scaled by alpha / r (alpha / √r with `use_rslora`).
    pub alpha: f64,
    /// `lora_dropout`: dropout on the adapter's input while training.
    pub dropout: f64,
    /// Which projections get an adapter: names as `peft` (q_proj, ..., down_proj) or "all-linear".
    pub target_modules: TargetModules,
    /// rsLoRA's scale alpha / √r, which keeps the update's size steady as r grows.
    pub use_rslora: bool,
    /// Whole weights that train beside the adapters (`peft`'s `modules_to_save`): `embed_tokens`
    /// and/or `lm_head` (one tensor when the embeddings are tied). A reward or value head always
    /// trains whole.
    pub modules_to_save: Vec<String>,
    /// Keep the frozen base's projections quantised (QLoRA-style): "q8_0", "q4_0" or "q4_1"
    /// (ggml's blocks of 32 weights with a scale, and for q4_1 a minimum; a projection whose
    /// input size is not a multiple of 32 stays f32), or "none". A base read from a Q4_1 GGUF
    /// gets its own blocks back exactly with "q4_1". The adapters and activations stay f32.
    pub quantize_base: String,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 0,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::default(),
            use_rslora: false,
            modules_to_save: Vec::new(),
            quantize_base: "none".into(),
        }
    }
}

impl LoraConfig {
    pub fn enabled(&self) -> bool {
        self.r > 0
    }

    /// s in y += s · x·Aᵀ·Bᵀ.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "lora.dropout = {}: must be in [0, 1)",
                self.dropout
            ));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(format!("lora.alpha = {}: must be positive", self.alpha));
        }
        self.base_dtype()?;
        if let Some(m) = self
            .modules_to_save
            .iter()
            .find(|m| !SAVABLE_MODULES.contains(&m.as_str()))
        {
            return Err(format!(
                "modules_to_save: `{m}` (expected any of {SAVABLE_MODULES:?})"
            ));
        }
        self.target_modules.resolve().map(|_| ())
    }

    /// The block format of a quantised base (`None`: f32).
    pub fn base_dtype(&self) -> std::result::Result<Option<GgmlDType>, String> {
        match self.quantize_base.as_str() {
            "none" | "" => Ok(None),
            "q8_0" => Ok(Some(GgmlDType::Q8_0)),
            "q4_0" => Ok(Some(GgmlDType::Q4_0)),
            "q4_1" => Ok(Some(GgmlDType::Q4_1)),
            other => Err(format!(
                "quantize_base = \"{other}\": expected \"none\", \"q8_0\", \"q4_0\" or \"q4_1\""
            )),
        }
    }

    /// The weight names `modules_to_save` trains whole, for this model.
    pub fn saved_weights(&self, config: &LlamaConfig) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = self
            .modules_to_save
            .iter()
            .map(|m| match m.as_str() {
                "lm_head" if !config.tie_word_embeddings => "lm_head.weight",
                _ => "model.embed_tokens.weight",
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Fresh adapters for every targeted projection of every layer: A ~ U(-1/√in, 1/√in) (`peft`'s
/// Kaiming-uniform), B = 0. Deterministic in `seed`.
pub fn init_adapters(
    config: &LlamaConfig,
    lora: &LoraConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    let targets = lora.target_modules.resolve().map_err(LmError::Invalid)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for layer in 0..config.num_hidden_layers {
        for &proj in &targets {
            let (rows, cols) = projection_shape(config, proj);
            let bound = 1.0 / (cols as f64).sqrt();
            let a: Vec<f32> = (0..lora.r * cols)
                .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let module = module_path(layer, proj);
            out.insert(
                format!("{module}.lora_A.weight"),
                Tensor::from_vec(a, (lora.r, cols), device)?,
            );
            out.insert(
                format!("{module}.lora_B.weight"),
                Tensor::zeros((rows, lora.r), candle_core::DType::F32, device)?,
            );
        }
    }
    Ok(out)
}

/// Quantise the decoder's projection weights in `weights` (those whose rows are whole blocks),
/// moving them out of `weights`: (the quantised weights, bytes before, bytes after).
pub fn quantize_projections(
    weights: &mut HashMap<String, Tensor>,
    dtype: GgmlDType,
) -> Result<(crate::llama::QuantizedWeights, usize, usize)> {
    let mut out = crate::llama::QuantizedWeights::new();
    let (mut before, mut after) = (0, 0);
    let mut names: Vec<String> = weights
        .keys()
        .filter(|n| {
            n.starts_with("model.layers.")
                && PROJECTIONS
                    .iter()
                    .any(|p| n.ends_with(&format!("{p}.weight")))
        })
        .cloned()
        .collect();
    names.sort();
    for name in names {
        let w = &weights[&name];
        let k = w.dim(1)?;
        if k % dtype.block_size() != 0 {
            continue;
        }
        let q = QTensor::quantize(w, dtype)?;
        before += w.elem_count() * 4;
        after += q.storage_size_in_bytes();
        out.insert(name.clone(), Arc::new(q));
        weights.remove(&name);
    }
    Ok((out, before, after))
}

/// `model.layers.{layer}.self_attn.q_proj` and the like.
pub fn module_path(layer: usize, proj: &str) -> String {
    let block = if proj.ends_with("_proj") && ["q", "k", "v", "o"].contains(&&proj[..1]) {
        "self_attn"
    } else {
        "mlp"
    };
    format!("model.layers.{layer}.{block}.{proj}")
}

/// (out, in) of a projection's weight.
pub fn projection_shape(c: &LlamaConfig, proj: &str) -> (usize, usize) {
    let (h, d) = (c.hidden_size, c.head_dim);
    match proj {
        "q_proj" => (c.num_attention_heads * d, h),
        "k_proj" | "v_proj" => (c.num_key_value_heads * d, h),
        "o_proj" => (h, c.num_attention_heads * d),
        "gate_proj" | "up_proj" => (c.intermediate_size, h),
        "down_proj" => (h, c.intermediate_size),
        other => unreachable!("not a projection: {other}"),
    }
}

/// Dropout on an adapter's input, reproducible: the keep/drop decision for element i of the k-th
/// mask drawn is a hash of (seed, k, i), so the same run draws the same masks, and a
/// gradient-checkpointed layer, replayed from the counter it started at, draws them again.
#[derive(Clone, Debug)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
    /// Masks drawn so far (shared by every projection of a model, advanced in forward order).
    pub draws: Arc<AtomicU64>,
}

impl Dropout {
    /// x · mask / (1 - p), differentiable in x.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        use rayon::prelude::*;
        let k = self.draws.fetch_add(1, Ordering::Relaxed);
        let n = x.elem_count();
        let keep = 1.0 / (1.0 - self.p) as f32;
        // Keep when the hash's top 53 bits, read as a fraction, are at or above p.
        let threshold = (self.p * (1u64 << 53) as f64) as u64;
        let key = splitmix(self.seed ^ splitmix(k.wrapping_add(0x9e37_79b9)));
        let mut mask = vec![0f32; n];
        mask.par_chunks_mut(1 << 14)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (j, m) in chunk.iter_mut().enumerate() {
                    let i = (c << 14) + j;
                    let u = splitmix(key ^ i as u64) >> 11;
                    *m = if u >= threshold { keep } else { 0.0 };
                }
            });
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }

    /// The same dropout with its own counter starting at `draws` (replaying a checkpointed layer).
    pub fn replay_from(&self, draws: u64) -> Dropout {
        Dropout {
            draws: Arc::new(AtomicU64::new(draws)),
            ..self.clone()
        }
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Adapters to build a model with: tensors under the toolkit's names, their scale, and dropout
/// (training only).
#[derive(Clone, Debug)]
pub struct Adapters {
    pub tensors: HashMap<String, Tensor>,
    pub scale: f64,
    pub dropout: Option<Dropout>,
}

impl Adapters {
    /// (A, B) of one module, when it has an adapter.
    pub fn get(&self, module: &str) -> Result<Option<(Tensor, Tensor)>> {
        let a = self.tensors.get(&format!("{module}.lora_A.weight"));
        let b = self.tensors.get(&format!("{module}.lora_B.weight"));
        match (a, b) {
            (Some(a), Some(b)) => Ok(Some((a.clone(), b.clone()))),
            (None, None) => Ok(None),
            _ => Err(LmError::Invalid(format!(
                "adapter of `{module}` has only one of lora_A and lora_B"
            ))),
        }
    }
}

/// W + s · B·A for every adapted projection (`peft`'s `merge_and_unload`): new tensors, the
/// inputs untouched.
pub fn merge(
    weights: &HashMap<String, Tensor>,
    adapters: &HashMap<String, Tensor>,
    scale: f64,
) -> Result<HashMap<String, Tensor>> {
    let mut out = weights.clone();
    for (name, a) in adapters {
        let Some(module) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = adapters
            .get(&format!("{module}.lora_B.weight"))
            .ok_or_else(|| LmError::Invalid(format!("adapter of `{module}` lacks lora_B")))?;
        let key = format!("{module}.weight");
        let w = weights.get(&key).ok_or_else(|| {
            LmError::Invalid(format!("adapter for `{module}`, which the model lacks"))
        })?;
        let delta = (b.matmul(a)? * scale)?;
        out.insert(key, (w + delta.to_dtype(w.dtype())?)?);
    }
    Ok(out)
}

/// The `adapter_config.json` fields this toolkit reads and writes (`peft`'s `LoraConfig`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftConfig {
    pub peft_type: String,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: serde_json::Value,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// With tied embeddings, whether a saved `embed_tokens` also replaces the LM head (`peft`
    /// keeps the head on the original weight otherwise).
    #[serde(default)]
    pub ensure_weight_tying: bool,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    pub rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(default = "init_true")]
    pub init_lora_weights: serde_json::Value,
    #[serde(default)]
    pub revision: Option<String>,
}

fn bias_none() -> String {
    "none".into()
}

fn init_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

/// The adapter configuration and tensors of a `peft` LoRA directory.
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: PeftConfig,
    /// Tensors under the toolkit's names (prefix and any adapter name removed); extra trained
    /// modules (`modules_to_save`, e.g. a reward model's `score.weight`) included.
    pub tensors: HashMap<String, Tensor>,
    pub dir: PathBuf,
}

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// Whether `path` is a `peft` adapter directory.
pub fn is_adapter_dir(path: &Path) -> bool {
    path.is_dir() && path.join(ADAPTER_CONFIG).exists()
}

impl PeftAdapter {
    /// The LoRA settings of this adapter as a training configuration.
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let path = self.dir.join(ADAPTER_CONFIG);
        let targets: TargetModules = serde_json::from_value(self.config.target_modules.clone())
            .map_err(|e| LmError::bad_field(&path, "target_modules", e.to_string()))?;
        Ok(LoraConfig {
            r: self.config.r,
            alpha: self.config.lora_alpha,
            dropout: self.config.lora_dropout,
            target_modules: targets,
            use_rslora: self.config.use_rslora,
            modules_to_save: Vec::new(),
            quantize_base: "none".into(),
        })
    }

    pub fn scale(&self) -> f64 {
        LoraConfig {
            r: self.config.r,
            alpha: self.config.lora_alpha,
            use_rslora: self.config.use_rslora,
            ..LoraConfig::default()
        }
        .scale()
    }

    /// The base model's path: `base_model_name_or_path`, read relative to the adapter directory
    /// when it is relative and exists there.
    pub fn base_path(&self) -> Result<PathBuf> {
        let path = self.dir.join(ADAPTER_CONFIG);
        let base = self
            .config
            .base_model_name_or_path
            .as_deref()
            .ok_or_else(|| {
                LmError::bad_field(
                    &path,
                    "base_model_name_or_path",
                    "missing: which model does this adapter modify?",
                )
            })?;
        let p = PathBuf::from(base);
        let beside = self.dir.join(&p);
        if p.is_relative() && beside.exists() {
            return Ok(beside);
        }
        if p.exists() {
            return Ok(p);
        }
        Err(LmError::bad_field(
            &path,
            "base_model_name_or_path",
            format!("`{base}` is not a local model directory or .gguf file (models are never downloaded)"),
        ))
    }

    /// Read `adapter_config.json` and `adapter_model.safetensors`, refusing what this toolkit does
    /// not implement (other PEFT methods, DoRA, trained biases, per-layer ranks) with the field.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|e| LmError::io(&path, e))?;
        let config: PeftConfig = serde_json::from_str(&text)
            .map_err(|e| LmError::bad_file(&path, format!("invalid adapter config: {e}")))?;
        let refuse = |field: &str, why: &str| Err(LmError::bad_field(&path, field, why));
        if config.peft_type != "LORA" {
            return refuse("peft_type", "only LORA adapters are supported");
        }
        if config.r == 0 {
            return refuse("r", "must be positive");
        }
        if config.use_dora {
            return refuse("use_dora", "DoRA is not supported");
        }
        if config.lora_bias {
            return refuse("lora_bias", "a bias on lora_B is not supported");
        }
        if config.fan_in_fan_out {
            return refuse(
                "fan_in_fan_out",
                "only Linear layers (fan_in_fan_out = false)",
            );
        }
        if config.bias != "none" {
            return refuse("bias", "trained biases are not supported (bias = \"none\")");
        }
        if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
            return refuse(
                "rank_pattern",
                "per-module ranks or alphas are not supported",
            );
        }
        if config
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return refuse(
                "layers_to_transform",
                "adapters on a subset of layers are not supported",
            );
        }
        let file = dir.join(ADAPTER_WEIGHTS);
        if !file.exists() {
            return Err(LmError::Missing {
                path: file,
                what: "adapter weights".into(),
            });
        }
        let raw = crate::pretrained::read_safetensors(&file, device)?;
        let mut tensors = HashMap::new();
        for (key, t) in raw {
            let name = toolkit_name(&key).ok_or_else(|| {
                LmError::bad_file(
                    &file,
                    format!("tensor `{key}` is not a LoRA or saved-module tensor of a causal LM"),
                )
            })?;
            tensors.insert(name, t);
        }
        let adapter = PeftAdapter {
            config,
            tensors,
            dir: dir.to_path_buf(),
        };
        adapter
            .lora_config()?
            .validate()
            .map_err(|e| LmError::bad_file(&path, e))?;
        Ok(adapter)
    }

    /// Check every tensor's shape against the base model's configuration.
    pub fn check_shapes(&self, config: &LlamaConfig) -> Result<()> {
        let file = self.dir.join(ADAPTER_WEIGHTS);
        if config.tie_word_embeddings
            && self.tensors.contains_key("model.embed_tokens.weight")
            && !self.config.ensure_weight_tying
        {
            return Err(LmError::bad_field(
                self.dir.join(ADAPTER_CONFIG),
                "ensure_weight_tying",
                "the base ties its embeddings and the adapter saves embed_tokens without \
                 ensure_weight_tying: peft would change the input embeddings only, which one \
                 tied tensor cannot express",
            ));
        }
        for (name, t) in &self.tensors {
            let Some((module, which)) = name
                .strip_suffix(".lora_A.weight")
                .map(|m| (m, 'A'))
                .or_else(|| name.strip_suffix(".lora_B.weight").map(|m| (m, 'B')))
            else {
                continue;
            };
            let proj = module.rsplit('.').next().unwrap_or("");
            let layer: Option<usize> = module
                .strip_prefix("model.layers.")
                .and_then(|s| s.split('.').next())
                .and_then(|s| s.parse().ok());
            if !PROJECTIONS.contains(&proj)
                || layer.is_none_or(|l| l >= config.num_hidden_layers)
                || module != module_path(layer.unwrap_or(0), proj)
            {
                return Err(LmError::bad_file(
                    &file,
                    format!("`{name}`: no such projection in this model"),
                ));
            }
            let (rows, cols) = projection_shape(config, proj);
            let want = match which {
                'A' => vec![self.config.r, cols],
                _ => vec![rows, self.config.r],
            };
            if t.dims() != want.as_slice() {
                return Err(LmError::bad_file(
                    &file,
                    format!(
                        "`{name}` has shape {:?}, expected {want:?} (r = {})",
                        t.dims(),
                        self.config.r
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The adapter tensors alone (A and B), without saved modules.
    pub fn lora_tensors(&self) -> HashMap<String, Tensor> {
        self.tensors
            .iter()
            .filter(|(n, _)| is_lora_tensor(n))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    }
}

/// Whether a toolkit name is an adapter matrix.
pub fn is_lora_tensor(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (or with an adapter name,
/// `...lora_A.default.weight`) -> `model.layers.0.self_attn.q_proj.lora_A.weight`;
/// `base_model.model.score.weight` (a saved module) -> `score.weight`.
fn toolkit_name(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PEFT_PREFIX)?;
    let rest = rest
        .replace(".modules_to_save.default.", ".")
        .replace(".modules_to_save.", ".");
    for ab in ["lora_A", "lora_B"] {
        if let Some(idx) = rest.find(&format!(".{ab}.")) {
            return Some(format!("{}.{ab}.weight", &rest[..idx]));
        }
    }
    Some(rest)
}

/// Write a `peft` LoRA directory: `adapter_config.json` and `adapter_model.safetensors`
/// (`tensors` under the toolkit's names; anything that is not an adapter matrix, such as a reward
/// head, is listed in `modules_to_save`). Into `dir` as it is: callers that need the directory to
/// appear whole wrap this in [`crate::pretrained::write_dir_atomic`].
pub fn save_adapter(
    dir: &Path,
    lora: &LoraConfig,
    tensors: &HashMap<String, Tensor>,
    base_model: &str,
    task_type: &str,
    tied_embeddings: bool,
) -> Result<()> {
    let mut saved: Vec<String> = tensors
        .keys()
        .filter(|n| !is_lora_tensor(n))
        .map(|n| {
            let module = n.trim_end_matches(".weight");
            module.rsplit('.').next().unwrap_or(module).to_string()
        })
        .collect();
    saved.sort();
    let targets: Vec<&str> = lora.target_modules.resolve().map_err(LmError::Invalid)?;
    let config = PeftConfig {
        peft_type: "LORA".into(),
        task_type: Some(task_type.into()),
        base_model_name_or_path: Some(base_model.into()),
        r: lora.r,
        lora_alpha: lora.alpha,
        lora_dropout: lora.dropout,
        target_modules: serde_json::json!(targets),
        bias: "none".into(),
        use_rslora: lora.use_rslora,
        use_dora: false,
        lora_bias: false,
        fan_in_fan_out: false,
        // One tensor is both embedding and head here; peft must keep them tied too.
        ensure_weight_tying: tied_embeddings && saved.iter().any(|m| m == "embed_tokens"),
        modules_to_save: (!saved.is_empty()).then_some(saved),
        layers_to_transform: None,
        rank_pattern: HashMap::new(),
        alpha_pattern: HashMap::new(),
        inference_mode: true,
        init_lora_weights: serde_json::Value::Bool(true),
        revision: None,
    };
    let json = serde_json::to_string_pretty(&config).expect("serialisable");
    let config_path = dir.join(ADAPTER_CONFIG);
    std::fs::write(&config_path, json).map_err(|e| LmError::io(&config_path, e))?;
    let named = tensors
        .iter()
        .map(|(n, t)| Ok((format!("{PEFT_PREFIX}{n}"), t.detach().contiguous()?)))
        .collect::<Result<HashMap<String, Tensor>>>()?;
    let file = dir.join(ADAPTER_WEIGHTS);
    candle_core::safetensors::save(&named, &file)
        .map_err(|e| LmError::bad_file(&file, e.to_string()))
}

/// A frozen base weight as a fused LoRA projection reads it.
#[derive(Clone)]
pub enum FrozenWeight {
    /// (out, in) f32.
    Dense(Tensor),
    /// ggml blocks, dequantised for each product and dropped.
    Quantized(Arc<QTensor>),
}

impl FrozenWeight {
    fn dense(&self) -> candle_core::Result<Tensor> {
        match self {
            FrozenWeight::Dense(w) => Ok(w.detach()),
            FrozenWeight::Quantized(q) => q.dequantize(&Device::Cpu),
        }
    }
}

/// y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ as ONE graph node (f32 on the CPU, no dropout): only x, A and B are
/// kept for the backward pass, as for a plain projection, instead of the base output, the
/// low-rank product, the update and its scaled copy of the composed form (three more tensors
/// of the output's size per projection, which made LoRA use more memory than full
/// fine-tuning). The backward pass computes, with g = dL/dy and gB = g·B:
///
///   dx = g·W + s·gB·A,   dA = s·gBᵀ·x,   dB = s·gᵀ·(x·Aᵀ),
///
/// each only for an input that takes a gradient; W never gets one.
pub fn fused_lora_linear(
    x: &Tensor,
    w: &FrozenWeight,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = LoraLinear {
        w: w.clone(),
        scale,
    };
    Ok(x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

struct LoraLinear {
    w: FrozenWeight,
    scale: f64,
}

/// (rows, k) view of x's values.
fn rows_of(t: &Tensor) -> candle_core::Result<Tensor> {
    let k = t.dim(candle_core::D::Minus1)?;
    t.reshape((t.elem_count() / k.max(1), k))
}

impl candle_core::CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use crate::fused::input_tensor;
        let name = self.name();
        let (x, a, b) = (
            input_tensor(s1, l1, name)?,
            input_tensor(s2, l2, name)?,
            input_tensor(s3, l3, name)?,
        );
        let x2 = rows_of(&x)?;
        let y = crate::fused::linear(&x2, &self.w.dense()?)?; // (m, out)
        let low = (crate::fused::linear(&x2, &a)? * self.scale)?; // (m, r), scaled while small
        let y = (y + crate::fused::linear(&low, &b)?)?;
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = b.dim(0)?;
        crate::fused::output_storage(&y.reshape(dims)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (xd, ad, bd) = (x.detach(), a.detach(), b.detach());
        let x2 = rows_of(&xd)?;
        let g2 = rows_of(&g.detach().contiguous()?)?; // (m, out)
        let gb = (g2.matmul(&bd)? * self.scale)?; // s·g·B, (m, r)
        let dx = if x.track_op() {
            let w = self.w.dense()?;
            Some((g2.matmul(&w)? + gb.matmul(&ad)?)?.reshape(x.shape())?)
        } else {
            None
        };
        let da = if a.track_op() {
            Some(gb.t()?.matmul(&x2)?) // (r, k)
        } else {
            None
        };
        let db = if b.track_op() {
            let low = (crate::fused::linear(&x2, &ad)? * self.scale)?; // (m, r)
            Some(g2.t()?.matmul(&low)?) // (out, r)
        } else {
            None
        };
        Ok((dx, da, db))
    }
}
