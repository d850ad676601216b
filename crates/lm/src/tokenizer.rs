//! Tokenizer: a `tokenizers::Tokenizer` plus the special tokens the rest of the toolkit needs.
//!
//! Three ways in: an HF directory (`tokenizer.json` + `tokenizer_config.json`), GGUF metadata
//! (`tokenizer.ggml.*`, byte-level BPE only), or a ready `tokenizers::Tokenizer` (the built-in
//! testbed). One way out: [`Tokenizer::save_hf`] writes a directory that
//! `transformers.AutoTokenizer.from_pretrained` loads and that encodes identically.
//!
//! `add_special_tokens` behaves as in transformers 5 loading a `PreTrainedTokenizerFast`: the
//! post-processor in `tokenizer.json` alone decides whether BOS/EOS are added (`add_bos_token` in
//! `tokenizer_config.json` is ignored; `save_hf` writes it to match what the post-processor does).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value as GgufValue;
use serde_json::{json, Value as Json};

use crate::chat::ChatTemplate;
use crate::error::{LmError, Result};

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids that end a sequence (the EOS token's; `Pretrained::eos_token_ids` adds the configs').
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    /// Whether `encode(text, true)` puts the BOS token first.
    pub add_bos: bool,
    /// Whether `encode(text, true)` puts the EOS token last.
    pub add_eos: bool,
    /// `model_max_length` for `tokenizer_config.json` (the context length where known).
    pub model_max_length: Option<usize>,
    special_ids: HashSet<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("pad_token", &self.pad_token)
            .field("unk_token", &self.unk_token)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("pad_token_id", &self.pad_token_id)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish()
    }
}

/// The special tokens named in `tokenizer_config.json`.
#[derive(Default)]
struct SpecialNames {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
}

impl Tokenizer {
    /// Wrap a ready tokenizer. Each named token must be in its vocabulary.
    pub fn from_tokenizers(
        inner: tokenizers::Tokenizer,
        bos: Option<String>,
        eos: Option<String>,
        pad: Option<String>,
    ) -> Result<Self> {
        let names = SpecialNames {
            bos,
            eos,
            pad,
            unk: None,
        };
        Self::build(inner, names, None, |field, message| {
            LmError::Invalid(format!("tokenizer: {field}: {message}"))
        })
    }

    fn build(
        inner: tokenizers::Tokenizer,
        names: SpecialNames,
        model_max_length: Option<usize>,
        err: impl Fn(&str, String) -> LmError,
    ) -> Result<Self> {
        let id_of = |field: &str, token: &Option<String>| -> Result<Option<u32>> {
            match token {
                None => Ok(None),
                Some(t) => inner
                    .token_to_id(t)
                    .map(Some)
                    .ok_or_else(|| err(field, format!("token `{t}` is not in the vocabulary"))),
            }
        };
        let bos_id = id_of("bos_token", &names.bos)?;
        let eos_id = id_of("eos_token", &names.eos)?;
        let pad_token_id = id_of("pad_token", &names.pad)?;
        id_of("unk_token", &names.unk)?;
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let mut tok = Tokenizer {
            inner,
            eos_token_ids: eos_id.into_iter().collect(),
            pad_token_id,
            bos_token: names.bos,
            eos_token: names.eos,
            pad_token: names.pad,
            unk_token: names.unk,
            add_bos: false,
            add_eos: false,
            model_max_length,
            special_ids,
        };
        // Probe what the post-processor does rather than trusting flags: this is what `encode` gives.
        let probe = "a";
        // A tokenizer that cannot encode it (a WordLevel model without its unknown token, ...) is
        // the file's fault: say which file.
        let probe_err = |e: LmError| err("model", format!("cannot encode text: {e}"));
        let with = tok.encode(probe, true).map_err(probe_err)?;
        let without = tok.encode(probe, false).map_err(probe_err)?;
        tok.add_bos = bos_id.is_some()
            && with.first() == bos_id.as_ref()
            && without.first() != bos_id.as_ref();
        tok.add_eos =
            eos_id.is_some() && with.last() == eos_id.as_ref() && without.last() != eos_id.as_ref();
        Ok(tok)
    }

    /// Load `tokenizer.json` and, where present, `tokenizer_config.json` (falling back to
    /// `special_tokens_map.json` for the special tokens).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(LmError::Missing {
                path: tok_path,
                what: "the tokenizer".into(),
            });
        }
        let text = std::fs::read_to_string(&tok_path).map_err(|e| LmError::io(&tok_path, e))?;
        let inner: tokenizers::Tokenizer =
            without_panics(&tok_path, || text.parse())?.map_err(|e| {
                LmError::bad_file(&tok_path, format!("not a valid tokenizer.json: {e}"))
            })?;

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json_object(&cfg_path)?;
        let map_path = dir.join("special_tokens_map.json");
        let map = read_json_object(&map_path)?;

        let mut names = SpecialNames::default();
        for (field, slot) in [
            ("bos_token", &mut names.bos),
            ("eos_token", &mut names.eos),
            ("pad_token", &mut names.pad),
            ("unk_token", &mut names.unk),
        ] {
            let from_cfg = match &cfg {
                Some(c) => token_content(c.get(field), &cfg_path, field)?,
                None => None,
            };
            *slot = match (from_cfg, &map) {
                (Some(t), _) => Some(t),
                (None, Some(m)) => token_content(m.get(field), &map_path, field)?,
                (None, None) => None,
            };
        }

        let model_max_length = cfg
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
            .and_then(|v| v.as_f64())
            .filter(|&x| x > 0.0 && x < 1e15)
            .map(|x| x as usize);
        let err_path = if cfg.is_some() {
            cfg_path.clone()
        } else {
            tok_path.clone()
        };
        Self::build(inner, names, model_max_length, |field, message| {
            LmError::bad_field(&err_path, field, message)
        })
    }

    /// Build the tokenizer that GGUF metadata (`tokenizer.ggml.*`) describes. `path` names the file
    /// in errors. Only byte-level BPE (`tokenizer.ggml.model` = "gpt2") is supported.
    pub fn from_gguf_metadata(metadata: &HashMap<String, GgufValue>, path: &Path) -> Result<Self> {
        let md = Meta { md: metadata, path };
        let model = md.string("tokenizer.ggml.model")?.ok_or_else(|| {
            LmError::bad_field(
                path,
                "tokenizer.ggml.model",
                "missing (the file carries no tokenizer)",
            )
        })?;
        match model {
            "gpt2" => {}
            "llama" => {
                return Err(LmError::bad_field(
                    path,
                    "tokenizer.ggml.model",
                    "`llama` (SentencePiece) tokenizers are not supported from GGUF; \
                     only byte-level BPE (`gpt2`) is. Use the model's HF directory instead",
                ))
            }
            other => {
                return Err(LmError::bad_field(
                    path,
                    "tokenizer.ggml.model",
                    format!("`{other}` is not supported; only byte-level BPE (`gpt2`) is"),
                ))
            }
        }
        let tokens = md
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| LmError::bad_field(path, "tokenizer.ggml.tokens", "missing"))?;
        if tokens.is_empty() {
            return Err(LmError::bad_field(
                path,
                "tokenizer.ggml.tokens",
                "is empty",
            ));
        }
        let token_types = md.ints("tokenizer.ggml.token_type")?;
        if let Some(tt) = &token_types {
            if tt.len() != tokens.len() {
                return Err(LmError::bad_field(
                    path,
                    "tokenizer.ggml.token_type",
                    format!("has {} entries for {} tokens", tt.len(), tokens.len()),
                ));
            }
        }
        let merges = md.strings("tokenizer.ggml.merges")?.ok_or_else(|| {
            LmError::bad_field(
                path,
                "tokenizer.ggml.merges",
                "missing (needed for byte-level BPE)",
            )
        })?;
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                LmError::bad_field(
                    path,
                    "tokenizer.ggml.merges",
                    format!("entry {i} `{m}` is not two tokens separated by a space"),
                )
            })?;
            merge_pairs.push(json!([a, b]));
        }

        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            if vocab.contains_key(*token) {
                return Err(LmError::bad_field(
                    path,
                    "tokenizer.ggml.tokens",
                    format!("token `{token}` appears twice (second time at id {id})"),
                ));
            }
            vocab.insert(token.to_string(), json!(id));
            // llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
            let ty = token_types.as_ref().map_or(1, |t| t[id]);
            if ty == 3 || ty == 4 {
                added.push(json!({
                    "id": id,
                    "content": token,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": ty == 3,
                }));
            }
        }

        let token_at = |field: &str| -> Result<Option<(String, u32)>> {
            match md.uint(field)? {
                None => Ok(None),
                Some(id) => match tokens.get(id as usize) {
                    Some(t) => Ok(Some((t.to_string(), id as u32))),
                    None => Err(LmError::bad_field(
                        path,
                        field,
                        format!("id {id} is outside the vocabulary of {}", tokens.len()),
                    )),
                },
            }
        };
        let bos = token_at("tokenizer.ggml.bos_token_id")?;
        let eos = token_at("tokenizer.ggml.eos_token_id")?;
        let pad = token_at("tokenizer.ggml.padding_token_id")?;
        let unk = token_at("tokenizer.ggml.unknown_token_id")?;
        let add_bos = md.boolean("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos = md.boolean("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(LmError::bad_field(
                path,
                "tokenizer.ggml.add_bos_token",
                "is true but tokenizer.ggml.bos_token_id is missing",
            ));
        }
        if add_eos && eos.is_none() {
            return Err(LmError::bad_field(
                path,
                "tokenizer.ggml.add_eos_token",
                "is true but tokenizer.ggml.eos_token_id is missing",
            ));
        }
        // Every special token must match whole in text, even if the file forgot to mark it control.
        for (id, t) in [&bos, &eos, &pad, &unk]
            .into_iter()
            .flatten()
            .map(|(t, id)| (*id, t))
        {
            let known = added.iter().any(|a| a["id"] == json!(id));
            if !known {
                added.push(json!({
                    "id": id, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true,
                }));
            }
        }
        added.sort_by_key(|a| a["id"].as_u64());

        let pre = md.string("tokenizer.ggml.pre")?.unwrap_or("default");
        let (normalizer, pre_tokenizer) = gguf_pre_tokenizer(pre).ok_or_else(|| {
            LmError::bad_field(
                path,
                "tokenizer.ggml.pre",
                format!(
                    "pre-tokenizer `{pre}` is not supported (supported: {})",
                    SUPPORTED_PRE.join(", ")
                ),
            )
        })?;
        let post_processor = if add_bos || add_eos {
            let bos = if add_bos { bos.clone() } else { None };
            let eos = if add_eos { eos.clone() } else { None };
            let single = template_json(bos.as_ref(), eos.as_ref());
            json!({
                "type": "Sequence",
                "processors": [byte_level_post(), single],
            })
        } else {
            byte_level_post()
        };

        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": true,
                "trim_offsets": true,
                "use_regex": true,
            },
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merge_pairs,
            },
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value(spec).map_err(|e| {
            LmError::bad_file(
                path,
                format!("cannot build the tokenizer from tokenizer.ggml.*: {e}"),
            )
        })?;
        let names = SpecialNames {
            bos: bos.map(|b| b.0),
            eos: eos.map(|e| e.0),
            pad: pad.map(|p| p.0),
            unk: unk.map(|u| u.0),
        };
        let model_max_length = md
            .string("general.architecture")?
            .and_then(|arch| md.uint(&format!("{arch}.context_length")).ok().flatten())
            .map(|n| n as usize);
        Self::build(inner, names, model_max_length, |field, message| {
            LmError::bad_field(path, format!("tokenizer.ggml ({field})"), message)
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| LmError::Invalid(format!("tokenizer: cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(LmError::Invalid(format!(
                "tokenizer: cannot decode id {bad}: the vocabulary has {vocab} tokens"
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| LmError::Invalid(format!("tokenizer: cannot decode: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token_ids.first().copied()
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Whether `id` is a special added token (skipped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` into `dir` (created if needed), each
    /// atomically, so that `transformers.AutoTokenizer.from_pretrained(dir)` loads this tokenizer.
    pub fn save_hf(&self, dir: &Path, chat_template: Option<&ChatTemplate>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| LmError::io(dir, e))?;
        let tok_path = dir.join("tokenizer.json");
        let text = self.inner.to_string(true).map_err(|e| {
            LmError::bad_file(&tok_path, format!("cannot serialise the tokenizer: {e}"))
        })?;
        write_atomic(&tok_path, text.as_bytes())?;

        let mut added_decoder = serde_json::Map::new();
        let mut added: Vec<_> = self.inner.get_added_tokens_decoder().into_iter().collect();
        added.sort_by_key(|(id, _)| *id);
        for (id, t) in added {
            added_decoder.insert(
                id.to_string(),
                json!({
                    "content": t.content,
                    "single_word": t.single_word,
                    "lstrip": t.lstrip,
                    "rstrip": t.rstrip,
                    "normalized": t.normalized,
                    "special": t.special,
                }),
            );
        }
        let mut cfg = serde_json::Map::new();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        cfg.insert("add_bos_token".into(), json!(self.add_bos));
        cfg.insert("add_eos_token".into(), json!(self.add_eos));
        cfg.insert("added_tokens_decoder".into(), Json::Object(added_decoder));
        cfg.insert("bos_token".into(), json!(self.bos_token));
        cfg.insert("eos_token".into(), json!(self.eos_token));
        cfg.insert("pad_token".into(), json!(self.pad_token));
        cfg.insert("unk_token".into(), json!(self.unk_token));
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(n) = self.model_max_length {
            cfg.insert("model_max_length".into(), json!(n));
        }
        if let Some(t) = chat_template {
            cfg.insert("chat_template".into(), json!(t.source));
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&Json::Object(cfg)).expect("JSON values serialise");
        write_atomic(&cfg_path, format!("{text}\n").as_bytes())?;
        Ok(())
    }
}

/// Write `bytes` to `path` through a temporary file in the same directory and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        LmError::io(path, e)
    })
}

/// Run a call into the `tokenizers` crate on a user's file. It panics on some malformed
/// tokenizer.json files instead of returning an error (an `expect` in its decoder deserializer,
/// found by fuzzing); such a file is reported as not a valid tokenizer.json, naming it.
fn without_panics<T>(path: &Path, call: impl FnOnce() -> T) -> Result<T> {
    crate::error::without_panics(call).map_err(|why| {
        LmError::bad_file(
            path,
            format!("not a valid tokenizer.json: the tokenizers library failed on it ({why})"),
        )
    })
}

fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Json>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| LmError::io(path, e))?;
    match serde_json::from_str::<Json>(&text) {
        Ok(Json::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(LmError::bad_file(path, "expected a JSON object")),
        Err(e) => Err(LmError::bad_file(path, format!("invalid JSON: {e}"))),
    }
}

/// A special token as `tokenizer_config.json` writes it: a string, or an AddedToken-like object.
fn token_content(v: Option<&Json>, path: &Path, field: &str) -> Result<Option<String>> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(LmError::bad_field(
                path,
                field,
                "object without a string `content`",
            )),
        },
        Some(other) => Err(LmError::bad_field(
            path,
            field,
            format!("expected a string or an object with `content`, got {other}"),
        )),
    }
}

fn byte_level_post() -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
}

/// `TemplateProcessing` adding `bos` in front and `eos` at the end, as transformers builds it.
fn template_json(bos: Option<&(String, u32)>, eos: Option<&(String, u32)>) -> Json {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq_id, type_id, out) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        if let Some((t, _)) = bos {
            out.push(special(t, type_id));
        }
        out.push(seq(seq_id, type_id));
        if let Some((t, _)) = eos {
            out.push(special(t, type_id));
        }
    }
    let pair: Vec<Json> = single.iter().cloned().chain(pair).collect();
    let mut special_tokens = serde_json::Map::new();
    for (t, id) in [bos, eos].into_iter().flatten() {
        special_tokens.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    })
}

/// Pre-tokenizer names (`tokenizer.ggml.pre`) this module knows.
const SUPPORTED_PRE: &[&str] = &[
    "default",
    "gpt2",
    "smollm",
    "llama-bpe",
    "llama3",
    "llama-v3",
    "qwen2",
    "deepseek-r1-qwen",
];

// The split patterns of the Llama-3 and Qwen2 tokenizers (their `tokenizer.json`s carry them as a
// `Split` pre-tokenizer in front of a regex-less `ByteLevel`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// (normalizer, pre-tokenizer) JSON for a `tokenizer.ggml.pre` value.
fn gguf_pre_tokenizer(pre: &str) -> Option<(Json, Json)> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split_then_bytes = |pattern: &str| {
        json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
                byte_level(false),
            ],
        })
    };
    Some(match pre {
        "default" | "gpt2" => (Json::Null, byte_level(true)),
        "smollm" => (
            Json::Null,
            json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)],
            }),
        ),
        "llama-bpe" | "llama3" | "llama-v3" => (Json::Null, split_then_bytes(LLAMA3_SPLIT)),
        "qwen2" | "deepseek-r1-qwen" => (json!({"type": "NFC"}), split_then_bytes(QWEN2_SPLIT)),
        _ => return None,
    })
}

/// Typed access to GGUF metadata with errors naming the file and key.
pub(crate) struct Meta<'a> {
    pub(crate) md: &'a HashMap<String, GgufValue>,
    pub(crate) path: &'a Path,
}

impl<'a> Meta<'a> {
    pub(crate) fn wrong(&self, key: &str, want: &str, got: &GgufValue) -> LmError {
        LmError::bad_field(
            self.path,
            key,
            format!("expected {want}, found {:?}", got.value_type()),
        )
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub(crate) fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => as_uint(v)
                .map(Some)
                .ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    pub(crate) fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a bool", v)),
        }
    }

    pub(crate) fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::F32(x)) => Ok(Some(*x as f64)),
            Some(GgufValue::F64(x)) => Ok(Some(*x)),
            Some(v) => as_int(v)
                .map(|x| Some(x as f64))
                .ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(items)) => items
                .iter()
                .map(|v| match v {
                    GgufValue::String(s) => Ok(s.as_str()),
                    other => Err(self.wrong(key, "an array of strings", other)),
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.wrong(key, "an array of strings", v)),
        }
    }

    pub(crate) fn ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(items)) => items
                .iter()
                .map(|v| as_int(v).ok_or_else(|| self.wrong(key, "an array of integers", v)))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.wrong(key, "an array of integers", v)),
        }
    }
}

pub(crate) fn as_int(v: &GgufValue) -> Option<i64> {
    Some(match v {
        GgufValue::U8(x) => *x as i64,
        GgufValue::I8(x) => *x as i64,
        GgufValue::U16(x) => *x as i64,
        GgufValue::I16(x) => *x as i64,
        GgufValue::U32(x) => *x as i64,
        GgufValue::I32(x) => *x as i64,
        GgufValue::U64(x) => i64::try_from(*x).ok()?,
        GgufValue::I64(x) => *x,
        _ => return None,
    })
}

pub(crate) fn as_uint(v: &GgufValue) -> Option<u64> {
    match v {
        GgufValue::U64(x) => Some(*x),
        other => as_int(other).and_then(|x| u64::try_from(x).ok()),
    }
}
