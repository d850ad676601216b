//! The decoder configuration, read from a Hugging Face `config.json` (or built from GGUF metadata).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{LmError, Result};

/// Which member of the Llama family. They share one forward pass; the differences are flags here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
}

impl Family {
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Mistral => "MistralForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
        }
    }
}

/// `rope_scaling` as HF writes it. Only the types whose maths we implement are accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (always on for Qwen2, `attention_bias` for Llama).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Llama's `attention_bias` also covers o_proj).
    pub o_bias: bool,
    /// Bias on MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Mistral's sliding attention window. Attention is full up to this length, which is all we
    /// support: longer sequences are refused rather than silently computed differently.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

/// The raw shape of `config.json`: every field optional so that a missing one gets a clear error.
#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeScaling>,
    /// transformers >= 5 writes `rope_theta` and the scaling fields nested here.
    rope_parameters: Option<serde_json::Value>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pad_token_id: Option<serde_json::Value>,
    sliding_window: Option<serde_json::Value>,
    use_sliding_window: Option<bool>,
}

fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl LlamaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| LmError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let mut raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| LmError::bad_file(path, format!("invalid JSON: {e}")))?;
        if let Some(params) = raw.rope_parameters.take() {
            if raw.rope_theta.is_none() {
                raw.rope_theta = params.get("rope_theta").and_then(|v| v.as_f64());
            }
            if raw.rope_scaling.is_none() && params.get("rope_type").is_some() {
                raw.rope_scaling = Some(
                    serde_json::from_value(params)
                        .map_err(|e| LmError::bad_field(path, "rope_parameters", e.to_string()))?,
                );
            }
        }
        let need = |v: Option<usize>, field: &str| -> Result<usize> {
            match v {
                Some(0) => Err(LmError::bad_field(path, field, "must be positive")),
                Some(x) => Ok(x),
                None => Err(LmError::bad_field(path, field, "missing")),
            }
        };
        let model_type = raw.model_type.clone().unwrap_or_default();
        let arch = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .unwrap_or_default();
        let family = match (model_type.as_str(), arch.as_str()) {
            ("llama", _) | (_, "LlamaForCausalLM" | "LlamaForSequenceClassification") => {
                Family::Llama
            }
            ("mistral", _) | (_, "MistralForCausalLM" | "MistralForSequenceClassification") => {
                Family::Mistral
            }
            ("qwen2", _) | (_, "Qwen2ForCausalLM" | "Qwen2ForSequenceClassification") => {
                Family::Qwen2
            }
            _ => {
                let what = if arch.is_empty() {
                    model_type.clone()
                } else {
                    arch.clone()
                };
                return Err(LmError::bad_field(
                    path,
                    if arch.is_empty() { "model_type" } else { "architectures" },
                    format!(
                        "unsupported architecture `{what}`: supported are llama (LlamaForCausalLM), \
                         mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM)"
                    ),
                ));
            }
        };
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(LmError::bad_field(
                    path,
                    "hidden_act",
                    format!("`{act}` is not supported (only silu)"),
                ));
            }
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(LmError::bad_field(
                path,
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(LmError::bad_field(
                        path,
                        "hidden_size",
                        "not divisible by num_attention_heads",
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(LmError::bad_field(
                path,
                "head_dim",
                "must be even for RoPE",
            ));
        }
        if let Some(s) = &raw.rope_scaling {
            match s.rope_type.as_str() {
                "default" | "linear" | "llama3" => {}
                other => {
                    return Err(LmError::bad_field(
                        path,
                        "rope_scaling.rope_type",
                        format!("`{other}` is not supported (default, linear, llama3)"),
                    ))
                }
            }
            if s.rope_type != "default" && s.factor.is_none() {
                return Err(LmError::bad_field(path, "rope_scaling.factor", "missing"));
            }
        }
        let sliding_window = match (
            raw.use_sliding_window.unwrap_or(family == Family::Mistral),
            &raw.sliding_window,
        ) {
            (true, Some(serde_json::Value::Number(n))) => n.as_u64().map(|w| w as usize),
            _ => None,
        };
        let attention_bias = raw.attention_bias.unwrap_or(false);
        Ok(LlamaConfig {
            family,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling: raw.rope_scaling.filter(|s| s.rope_type != "default"),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            bos_token_id: token_ids(&raw.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id),
            pad_token_id: token_ids(&raw.pad_token_id).first().copied(),
            sliding_window,
        })
    }

    /// The `config.json` that `transformers` reads back for this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        });
        let obj = v.as_object_mut().expect("object literal");
        if self.family == Family::Llama {
            obj.insert("attention_bias".into(), self.qkv_bias.into());
            obj.insert("mlp_bias".into(), self.mlp_bias.into());
        }
        if self.family == Family::Mistral {
            obj.insert("sliding_window".into(), self.sliding_window.into());
        }
        if let Some(b) = self.bos_token_id {
            obj.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                obj.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        if let Some(p) = self.pad_token_id {
            obj.insert("pad_token_id".into(), p.into());
        }
        v
    }

    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias {
            per_layer += q + 2 * kv;
        }
        if self.o_bias {
            per_layer += h;
        }
        if self.mlp_bias {
            per_layer += 2 * i + h;
        }
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * per_layer + h + head
    }
}
