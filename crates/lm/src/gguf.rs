//! GGUF loading: a llama.cpp model file becomes the same [`Pretrained`] an HF directory gives.
//!
//! * Configuration from `general.architecture` and `<arch>.*` metadata (`llama` and `qwen2`).
//! * Tensors renamed to Hugging Face names (`blk.N.attn_q.weight` ->
//!   `model.layers.N.self_attn.q_proj.weight`, ...) and dequantised to f32.
//! * For `llama`, the q/k row permutation of llama.cpp's converter is undone (see
//!   [`llama_cpp_unpermute`]), so the weights are in HF's rotate-half layout and one RoPE serves both
//!   sources. Qwen2 files are not permuted by the converter.
//! * Tokenizer from `tokenizer.ggml.*`, chat template from `tokenizer.chat_template`.
//!
//! A truncated or corrupt file gives an [`LmError`] naming it, never a panic.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::{DType, Device, Tensor};

use crate::chat::ChatTemplate;
use crate::config::{Family, LlamaConfig, RopeScaling};
use crate::error::{LmError, Result};
use crate::pretrained::{check_weights, GenerationDefaults, Pretrained};
use crate::tokenizer::{Meta, Tokenizer};

/// Load a `.gguf` model file: configuration, f32 weights under HF names (on `device`), tokenizer
/// and chat template.
pub fn load_gguf(path: &Path, device: &Device) -> Result<Pretrained> {
    let file = std::fs::File::open(path).map_err(|e| LmError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| LmError::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    // candle's header reader panics on some corrupt headers (`general.alignment` = 0 divides by
    // zero, found by fuzzing): a panic there is a corrupt file too.
    let read =
        crate::error::without_panics(|| Content::read(&mut reader).map_err(|e| e.to_string()))
            .unwrap_or_else(|why| Err(format!("the GGUF reader failed on its header ({why})")));
    let content = read.map_err(|e| {
        LmError::bad_file(
            path,
            format!("not a valid GGUF file (truncated or corrupt?): {e}"),
        )
    })?;
    let md = Meta {
        md: &content.metadata,
        path,
    };

    let arch = md
        .string("general.architecture")?
        .ok_or_else(|| LmError::bad_field(path, "general.architecture", "missing"))?;
    let family = match arch {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        other => {
            return Err(LmError::bad_field(
                path,
                "general.architecture",
                format!("`{other}` is not supported (supported: llama, qwen2)"),
            ))
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<usize> {
        match md.uint(&key(k))? {
            Some(0) => Err(LmError::bad_field(path, key(k), "must be positive")),
            Some(x) => Ok(x as usize),
            None => Err(LmError::bad_field(path, key(k), "missing")),
        }
    };
    let hidden_size = need("embedding_length")?;
    let num_hidden_layers = need("block_count")?;
    let intermediate_size = need("feed_forward_length")?;
    let num_attention_heads = need("attention.head_count")?;
    let num_key_value_heads = match md.uint(&key("attention.head_count_kv"))? {
        Some(n) => n as usize,
        None => num_attention_heads,
    };
    if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(LmError::bad_field(
            path,
            key("attention.head_count_kv"),
            format!(
                "{num_key_value_heads} does not divide {} = {num_attention_heads}",
                key("attention.head_count")
            ),
        ));
    }
    let head_dim = match md.uint(&key("attention.key_length"))? {
        Some(d) => d as usize,
        None => {
            if hidden_size % num_attention_heads != 0 {
                return Err(LmError::bad_field(
                    path,
                    key("embedding_length"),
                    "not divisible by the attention head count",
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(LmError::bad_field(
            path,
            key("attention.key_length"),
            "head size must be even for RoPE",
        ));
    }
    if let Some(rot) = md.uint(&key("rope.dimension_count"))? {
        if rot as usize != head_dim {
            return Err(LmError::bad_field(
                path,
                key("rope.dimension_count"),
                format!(
                    "partial rotary embeddings ({rot} of {head_dim} dimensions) are not supported"
                ),
            ));
        }
    }
    let rms_norm_eps = md
        .float(&key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| {
            LmError::bad_field(path, key("attention.layer_norm_rms_epsilon"), "missing")
        })?;
    let rope_theta = md.float(&key("rope.freq_base"))?.unwrap_or(10_000.0);
    let max_position_embeddings = md
        .uint(&key("context_length"))?
        .map_or(2048, |n| n as usize);
    let rope_scaling = match md.string(&key("rope.scaling.type"))? {
        None | Some("none") => None,
        Some("linear") => {
            let factor = md
                .float(&key("rope.scaling.factor"))?
                .ok_or_else(|| LmError::bad_field(path, key("rope.scaling.factor"), "missing"))?;
            Some(RopeScaling {
                rope_type: "linear".into(),
                factor: Some(factor),
                low_freq_factor: None,
                high_freq_factor: None,
                original_max_position_embeddings: None,
            })
        }
        Some(other) => {
            return Err(LmError::bad_field(
                path,
                key("rope.scaling.type"),
                format!("`{other}` is not supported (none, linear)"),
            ))
        }
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(LmError::bad_file(
            path,
            "tensor `rope_freqs.weight` (Llama-3.1-style RoPE scaling) is not supported from GGUF; \
             use the model's HF directory",
        ));
    }

    let tokenizer = Tokenizer::from_gguf_metadata(&content.metadata, path)?;

    // Weights: HF names, f32, q/k rows back in rotate-half order.
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut weights = HashMap::with_capacity(names.len());
    for name in names {
        let hf = hf_tensor_name(name).ok_or_else(|| {
            LmError::bad_file(
                path,
                format!("tensor `{name}` has no Hugging Face counterpart (unsupported layout)"),
            )
        })?;
        let info = &content.tensor_infos[name];
        check_extent(name, info, content.tensor_data_offset, file_len, path)?;
        let tensor = info
            .read(&mut reader, content.tensor_data_offset, device)
            .and_then(|q| q.dequantize(device))
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| LmError::bad_file(path, format!("tensor `{name}`: {e}")))?;
        let is_qk = hf.ends_with("self_attn.q_proj.weight")
            || hf.ends_with("self_attn.q_proj.bias")
            || hf.ends_with("self_attn.k_proj.weight")
            || hf.ends_with("self_attn.k_proj.bias");
        let tensor = if family == Family::Llama && is_qk {
            let rows = tensor.dims().first().copied().unwrap_or(0);
            if rows == 0 || rows % head_dim != 0 {
                return Err(LmError::bad_file(
                    path,
                    format!("tensor `{name}`: {rows} rows is not a whole number of heads of size {head_dim}"),
                ));
            }
            llama_cpp_unpermute(&tensor, rows / head_dim)?
        } else {
            tensor
        };
        weights.insert(hf, tensor.to_device(device)?);
    }

    let embed_rows = weights
        .get("model.embed_tokens.weight")
        .map(|t| t.dims().first().copied().unwrap_or(0))
        .ok_or_else(|| LmError::bad_file(path, "tensor `token_embd.weight` is missing"))?;
    let vocab_size = match md.uint(&key("vocab_size"))? {
        Some(v) if v as usize != embed_rows => {
            return Err(LmError::bad_field(
                path,
                key("vocab_size"),
                format!("{v} disagrees with token_embd.weight, which has {embed_rows} rows"),
            ))
        }
        _ => embed_rows,
    };
    if tokenizer.vocab_size() > vocab_size {
        return Err(LmError::bad_field(
            path,
            "tokenizer.ggml.tokens",
            format!(
                "{} tokens but the embedding has only {vocab_size} rows",
                tokenizer.vocab_size()
            ),
        ));
    }
    let has = |n: &str| weights.contains_key(n);
    let config = LlamaConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        tie_word_embeddings: !has("lm_head.weight"),
        qkv_bias: family == Family::Qwen2 || has("model.layers.0.self_attn.q_proj.bias"),
        o_bias: family != Family::Qwen2 && has("model.layers.0.self_attn.o_proj.bias"),
        mlp_bias: has("model.layers.0.mlp.gate_proj.bias"),
        bos_token_id: tokenizer.bos_token_id(),
        eos_token_ids: tokenizer.eos_token_ids.clone(),
        pad_token_id: tokenizer.pad_token_id,
        sliding_window: None,
    };
    check_weights(&config, &weights, path)?;

    let chat_template = match md.string("tokenizer.chat_template")? {
        Some(src) => Some(
            ChatTemplate::new(
                src,
                tokenizer.bos_token.clone(),
                tokenizer.eos_token.clone(),
            )
            .map_err(|e| LmError::bad_field(path, "tokenizer.chat_template", e.to_string()))?,
        ),
        None => None,
    };

    Ok(Pretrained {
        config,
        weights,
        tokenizer,
        chat_template,
        generation: GenerationDefaults::default(),
        source: path.to_path_buf(),
        adapter: None,
    })
}

/// Check that a tensor's declared shape and type fit in the file before reading it. candle sizes
/// the data with unchecked arithmetic, so a crafted shape (2^63 elements of f32 is 0 bytes after
/// wrapping) passes its bounds check and then asks for the declared element count: a capacity
/// overflow panic, or an allocation of terabytes that aborts the process (found by fuzzing).
fn check_extent(
    name: &str,
    info: &TensorInfo,
    data_offset: u64,
    file_len: u64,
    path: &Path,
) -> Result<()> {
    let dims = info.shape.dims();
    let block = info.ggml_dtype.block_size() as u64;
    let bytes = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .filter(|n| n % block == 0)
        .and_then(|n| (n / block).checked_mul(info.ggml_dtype.type_size() as u64));
    let end = bytes.and_then(|b| data_offset.checked_add(info.offset)?.checked_add(b));
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(LmError::bad_file(
            path,
            format!(
                "tensor `{name}`: shape {dims:?} of {:?} at offset {} does not fit in the file \
                 ({file_len} bytes; truncated or corrupt?)",
                info.ggml_dtype, info.offset
            ),
        )),
    }
}

/// The Hugging Face parameter name for a llama.cpp tensor name (`None` if there is none).
pub fn hf_tensor_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let module = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{suffix}"))
}

/// What llama.cpp's `convert_hf_to_gguf.py` does to the rows of Llama's `q_proj`/`k_proj` (weight
/// or bias): within each of the `n_head` heads, row `j` of the first half moves to `2j` and row `j`
/// of the second half to `2j + 1` (rotate-half pairs `(j, j + d/2)` become interleaved pairs
/// `(2j, 2j + 1)`). In numpy terms: `w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2).reshape(w.shape)`.
pub fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    regroup_rows(w, n_head, true)
}

/// The inverse of [`llama_cpp_permute`]: `w.reshape(n_head, d/2, 2, ...).swapaxes(1, 2).reshape(w.shape)`.
pub fn llama_cpp_unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    regroup_rows(w, n_head, false)
}

fn regroup_rows(w: &Tensor, n_head: usize, to_interleaved: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    if n_head == 0 || rows % (2 * n_head) != 0 {
        return Err(LmError::Invalid(format!(
            "cannot regroup {rows} rows into {n_head} heads of an even size"
        )));
    }
    let half = rows / n_head / 2;
    let mut shape = if to_interleaved {
        vec![n_head, 2, half]
    } else {
        vec![n_head, half, 2]
    };
    shape.extend_from_slice(&dims[1..]);
    Ok(w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows_of(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().unwrap()
    }

    #[test]
    fn permute_matches_llama_cpp_order() {
        // One head of size 8: rotate-half pairs (0,4) (1,5) (2,6) (3,7) become adjacent.
        let x = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
        let p = llama_cpp_permute(&x, 1).unwrap();
        assert_eq!(rows_of(&p), vec![0., 4., 1., 5., 2., 6., 3., 7.]);
        let u = llama_cpp_unpermute(&x, 1).unwrap();
        assert_eq!(rows_of(&u), vec![0., 2., 4., 6., 1., 3., 5., 7.]);
        // Two heads of size 4: each head separately.
        let y = Tensor::arange(0f32, 8., &Device::Cpu).unwrap();
        assert_eq!(
            rows_of(&llama_cpp_permute(&y, 2).unwrap()),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
    }

    #[test]
    fn unpermute_inverts_permute_on_matrices() {
        let w = Tensor::randn(0f32, 1., (3 * 16, 5), &Device::Cpu).unwrap();
        let back = llama_cpp_unpermute(&llama_cpp_permute(&w, 3).unwrap(), 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        let back = llama_cpp_permute(&llama_cpp_unpermute(&w, 3).unwrap(), 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        assert!(llama_cpp_permute(&w, 5).is_err());
    }

    #[test]
    fn tensor_names() {
        assert_eq!(
            hf_tensor_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            hf_tensor_name("blk.12.attn_q.bias").unwrap(),
            "model.layers.12.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_tensor_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(hf_tensor_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_tensor_name("blk.x.attn_q.weight").is_none());
        assert!(hf_tensor_name("blk.0.attn_qkv.weight").is_none());
        assert!(hf_tensor_name("rope_freqs.weight").is_none());
    }
}
