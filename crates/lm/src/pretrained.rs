//! Everything a model path resolves to: configuration, named weights (in Hugging Face names and
//! layout), tokenizer, chat template and generation defaults. `PATH` is an HF directory or a
//! `.gguf` file; both end up here, so the rest of the toolkit never asks where a model came from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::chat::ChatTemplate;
use crate::config::LlamaConfig;
use crate::error::{LmError, Result};
use crate::tokenizer::Tokenizer;

/// Sampling defaults from `generation_config.json` (all optional).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
pub struct GenerationDefaults {
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub max_new_tokens: Option<usize>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default, deserialize_with = "ids_or_one")]
    pub eos_token_id: Vec<u32>,
}

fn ids_or_one<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match v {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    })
}

pub struct Pretrained {
    pub config: LlamaConfig,
    /// f32 tensors under Hugging Face parameter names (`model.layers.0.self_attn.q_proj.weight`, ...),
    /// in HF layout (q/k rows in rotate-half order).
    pub weights: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationDefaults,
    pub source: PathBuf,
    /// A `peft` LoRA adapter on these weights, when `source` is an adapter directory. `weights`
    /// are then the base model's (plus any module the adapter saved whole, e.g. a reward head) and
    /// [`Pretrained::model`] applies the adapter unmerged; [`Pretrained::merged_weights`] folds it in.
    pub adapter: Option<crate::lora::PeftAdapter>,
}

impl Pretrained {
    /// Load an HF directory, a `.gguf` file or a `peft` adapter directory (its
    /// `adapter_config.json` names the base model, as `AutoPeftModelForCausalLM` reads it).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(LmError::Missing {
                path: path.to_path_buf(),
                what: "model path (an HF directory or a .gguf file)".into(),
            });
        }
        if crate::lora::is_adapter_dir(path) {
            load_adapter_dir(path, device)
        } else if path.is_dir() {
            load_hf_dir(path, device)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            crate::gguf::load_gguf(path, device)
        } else {
            Err(LmError::bad_file(
                path,
                "not a directory and not a .gguf file",
            ))
        }
    }

    /// The tokens that end a completion: the config's, the generation config's and the tokenizer's.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = self.generation.eos_token_id.clone();
        ids.extend(self.config.eos_token_ids.iter().copied());
        ids.extend(self.tokenizer.eos_token_ids.iter().copied());
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// A `peft` adapter directory: the base model it names, the adapter on top. An adapter whose
/// base is itself an adapter directory gets that one merged into its base first. The adapter
/// directory's own tokenizer, chat template and generation defaults win when it has them (TRL
/// saves the tokenizer beside the adapter).
fn load_adapter_dir(dir: &Path, device: &Device) -> Result<Pretrained> {
    let adapter = crate::lora::PeftAdapter::load(dir, device)?;
    let base_path = adapter.base_path()?;
    let mut p = Pretrained::load(&base_path, device)?;
    if p.adapter.is_some() {
        p.weights = p.merged_weights()?;
        p.adapter = None;
    }
    adapter.check_shapes(&p.config)?;
    for (name, t) in &adapter.tensors {
        if !crate::lora::is_lora_tensor(name) {
            p.weights.insert(name.clone(), t.clone());
        }
    }
    if dir.join("tokenizer.json").exists() {
        p.tokenizer = Tokenizer::from_hf_dir(dir)?;
        p.chat_template = ChatTemplate::from_hf_dir(dir, &p.tokenizer)?;
    }
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        p.generation = read_generation_config(&gen_path)?;
    }
    p.source = dir.to_path_buf();
    p.adapter = Some(adapter);
    Ok(p)
}

fn read_generation_config(path: &Path) -> Result<GenerationDefaults> {
    let text = std::fs::read_to_string(path).map_err(|e| LmError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| LmError::bad_file(path, format!("invalid JSON: {e}")))
}

fn load_hf_dir(dir: &Path, device: &Device) -> Result<Pretrained> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        return Err(LmError::Missing {
            path: config_path,
            what: "model configuration".into(),
        });
    }
    let config = LlamaConfig::from_file(&config_path)?;
    let weights = load_safetensors_dir(dir, device)?;
    check_weights(&config, &weights, dir)?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let chat_template = ChatTemplate::from_hf_dir(dir, &tokenizer)?;
    let gen_path = dir.join("generation_config.json");
    let generation = if gen_path.exists() {
        read_generation_config(&gen_path)?
    } else {
        GenerationDefaults::default()
    };
    Ok(Pretrained {
        config,
        weights,
        tokenizer,
        chat_template,
        generation,
        source: dir.to_path_buf(),
        adapter: None,
    })
}

/// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
fn load_safetensors_dir(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let index = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    let files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| LmError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LmError::bad_file(&index, format!("invalid JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LmError::bad_field(&index, "weight_map", "missing or not an object"))?;
        let mut shards: Vec<String> = map
            .values()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|s| dir.join(s)).collect()
    } else if single.exists() {
        vec![single]
    } else {
        return Err(LmError::Missing {
            path: single,
            what: "weights (model.safetensors or model.safetensors.index.json)".into(),
        });
    };
    let mut weights = HashMap::new();
    for file in files {
        weights.extend(read_safetensors(&file, device)?);
    }
    Ok(weights)
}

/// Read one safetensors file into f32 tensors, with a clear error for a truncated or corrupt file.
pub fn read_safetensors(file: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(file).map_err(|e| LmError::io(file, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        LmError::bad_file(
            file,
            format!("not a valid safetensors file (truncated?): {e}"),
        )
    })?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            other => {
                return Err(LmError::bad_file(
                    file,
                    format!("tensor `{name}`: unsupported dtype {other:?}"),
                ))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)
            .map_err(|e| LmError::bad_file(file, format!("tensor `{name}`: {e}")))?
            .to_dtype(DType::F32)?;
        out.insert(name.to_string(), t);
    }
    Ok(out)
}

/// Every tensor the config implies, present and with the right shape; the error names file and tensor.
pub fn check_weights(
    config: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    // Lazily, layer by layer: a corrupt layer count (2^31 in a fuzzed GGUF or config.json) must
    // fail at the first missing layer, not list billions of names first (which hung).
    for (name, shape) in shapes(config) {
        match weights.get(&name) {
            None => {
                return Err(LmError::bad_file(
                    source,
                    format!("tensor `{name}` is missing"),
                ));
            }
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(LmError::BadShape {
                    path: source.to_path_buf(),
                    name,
                    expected: shape,
                    actual: t.dims().to_vec(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Parameter names and shapes (HF names, `[out, in]` for linear weights).
pub fn expected_shapes(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    shapes(c).collect()
}

/// [`expected_shapes`], one layer at a time.
fn shapes(c: &LlamaConfig) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let head = std::iter::once(("model.embed_tokens.weight".to_string(), vec![v, h]));
    let layers = (0..c.num_hidden_layers).flat_map(move |l| layer_shapes(c, l));
    let mut tail = vec![("model.norm.weight".to_string(), vec![h])];
    if !c.tie_word_embeddings {
        tail.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    head.chain(layers).chain(tail)
}

fn layer_shapes(c: &LlamaConfig, l: usize) -> Vec<(String, Vec<usize>)> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    // Saturating: a corrupt config's sizes must give a shape mismatch, not an overflow panic.
    let q = c.num_attention_heads.saturating_mul(c.head_dim);
    let kv = c.num_key_value_heads.saturating_mul(c.head_dim);
    let p = format!("model.layers.{l}");
    let mut out = vec![
        (format!("{p}.input_layernorm.weight"), vec![h]),
        (format!("{p}.post_attention_layernorm.weight"), vec![h]),
    ];
    for (n, o) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
        out.push((format!("{p}.self_attn.{n}.weight"), vec![o, h]));
        if c.qkv_bias {
            out.push((format!("{p}.self_attn.{n}.bias"), vec![o]));
        }
    }
    out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
    if c.o_bias {
        out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
    }
    for (n, o, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
        out.push((format!("{p}.mlp.{n}.weight"), vec![o, inp]));
        if c.mlp_bias {
            out.push((format!("{p}.mlp.{n}.bias"), vec![o]));
        }
    }
    out
}

impl Pretrained {
    /// The padding id: the tokenizer's, else the config's, else the first EOS (as HF does when a
    /// model has no pad token).
    pub fn pad_id(&self) -> u32 {
        self.tokenizer
            .pad_token_id
            .or(self.config.pad_token_id)
            .or_else(|| self.eos_token_ids().first().copied())
            .unwrap_or(0)
    }

    /// A frozen model over these weights (with the adapter, unmerged, when there is one).
    pub fn model(&self, device: &Device) -> Result<crate::llama::Llama> {
        let adapters = self.adapter.as_ref().map(|a| crate::lora::Adapters {
            tensors: a.lora_tensors(),
            scale: a.scale(),
            dropout: None,
        });
        crate::llama::Llama::from_weights_with_adapters(
            &self.config,
            &self.weights,
            adapters.as_ref(),
            device,
        )
    }

    /// The weights with the adapter folded in (W + s·B·A; `peft`'s `merge_and_unload`), or the
    /// weights themselves without one.
    pub fn merged_weights(&self) -> Result<HashMap<String, Tensor>> {
        match &self.adapter {
            Some(a) => crate::lora::merge(&self.weights, &a.lora_tensors(), a.scale()),
            None => Ok(self.weights.clone()),
        }
    }

    /// Render a chat for generation with the model's template; a clear error when it has none.
    pub fn render_chat(
        &self,
        messages: &[crate::chat::Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            LmError::bad_file(
                &self.source,
                "the model has no chat template (tokenizer_config.json `chat_template`)",
            )
        })?;
        template.render(messages, add_generation_prompt)
    }
}

/// Write a Hugging Face model directory (`config.json`, `model.safetensors`, tokenizer files,
/// `generation_config.json`) that `transformers` loads as is. The directory appears whole or not
/// at all: everything is written into a temporary sibling that is renamed into place.
pub fn save_hf(
    dir: &Path,
    config: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
    chat_template: Option<&ChatTemplate>,
    generation: &GenerationDefaults,
) -> Result<()> {
    save_hf_with(
        dir,
        config,
        weights,
        tokenizer,
        chat_template,
        generation,
        &SaveExtras::default(),
    )
}

/// What a head or a method adds to a saved model directory.
#[derive(Debug, Clone, Default)]
pub struct SaveExtras {
    /// Fields merged into `config.json` (e.g. `architectures` and `num_labels` of a reward model).
    pub config_fields: serde_json::Map<String, serde_json::Value>,
    /// Extra files (name, contents) written beside the model.
    pub files: Vec<(String, String)>,
}

/// [`save_hf`] with extra config fields and files, written inside the same atomic swap.
pub fn save_hf_with(
    dir: &Path,
    config: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
    chat_template: Option<&ChatTemplate>,
    generation: &GenerationDefaults,
    extras: &SaveExtras,
) -> Result<()> {
    write_dir_atomic(dir, |tmp| {
        let mut to_save: HashMap<String, Tensor> = HashMap::new();
        for (n, t) in weights {
            if config.tie_word_embeddings && n == "lm_head.weight" {
                continue;
            }
            to_save.insert(n.clone(), t.detach().to_dtype(DType::F32)?.contiguous()?);
        }
        let st = tmp.join("model.safetensors");
        candle_core::safetensors::save(&to_save, &st)
            .map_err(|e| LmError::bad_file(&st, e.to_string()))?;
        let write_json = |file: &str, v: &serde_json::Value| -> Result<()> {
            let p = tmp.join(file);
            let text = serde_json::to_string_pretty(v).expect("JSON value serialises");
            std::fs::write(&p, text).map_err(|e| LmError::io(&p, e))
        };
        let mut config_json = config.to_hf_json();
        if let Some(obj) = config_json.as_object_mut() {
            for (k, v) in &extras.config_fields {
                obj.insert(k.clone(), v.clone());
            }
        }
        write_json("config.json", &config_json)?;
        for (file, contents) in &extras.files {
            let p = tmp.join(file);
            std::fs::write(&p, contents).map_err(|e| LmError::io(&p, e))?;
        }
        write_generation_config(tmp, config, generation)?;
        tokenizer.save_hf(tmp, chat_template)?;
        Ok(())
    })
}

/// `generation_config.json`: the defaults, with the model's EOS (and BOS) ids filled in.
pub fn write_generation_config(
    dir: &Path,
    config: &LlamaConfig,
    generation: &GenerationDefaults,
) -> Result<()> {
    let mut gen = serde_json::to_value(generation).expect("serialisable");
    if let Some(obj) = gen.as_object_mut() {
        obj.retain(|_, v| !v.is_null());
        let eos = if generation.eos_token_id.is_empty() {
            config.eos_token_ids.clone()
        } else {
            generation.eos_token_id.clone()
        };
        obj.insert("eos_token_id".into(), eos.into());
        if let Some(b) = config.bos_token_id {
            obj.insert("bos_token_id".into(), b.into());
        }
    }
    let p = dir.join("generation_config.json");
    let text = serde_json::to_string_pretty(&gen).expect("JSON value serialises");
    std::fs::write(&p, text).map_err(|e| LmError::io(&p, e))
}

/// Write a directory whole or not at all: `fill` writes into a temporary sibling that is then
/// swapped into place (the old directory aside, the new one in, the old one removed).
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| LmError::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| LmError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| LmError::io(&tmp, e))?;
    fill(&tmp)?;
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    // Another process may save the same directory at the same moment (data-parallel replicas
    // write the same model): it can move `dir` away before we do, or put its copy in place
    // between our two renames. Either way the last copy in place is a whole one.
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let mut attempts = 0;
    loop {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| LmError::io(&old, e))?;
        }
        if dir.exists() {
            match std::fs::rename(dir, &old) {
                Err(e) if !gone(&e) => return Err(LmError::io(dir, e)),
                _ => {}
            }
        }
        match std::fs::rename(&tmp, dir) {
            Ok(()) => break,
            Err(_) if attempts < 8 && dir.exists() => attempts += 1,
            Err(e) => return Err(LmError::io(dir, e)),
        }
    }
    match std::fs::remove_dir_all(&old) {
        Err(e) if !gone(&e) => Err(LmError::io(&old, e)),
        _ => Ok(()),
    }
}
