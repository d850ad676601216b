//! Fuzzing of the model-file loaders: config.json, tokenizer.json (with tokenizer_config.json),
//! chat templates, safetensors, GGUF and PEFT adapter configs. No panic, no hang, and every
//! rejection names the file. `RLHF_FUZZ_CASES` sets the inputs per loader (see `scripts/fuzz.sh`).

#[path = "support/fuzz.rs"]
mod fuzz;

use std::path::PathBuf;

use candle_core::quantized::gguf_file::Value as Gv;
use candle_core::Device;
use fuzz::{
    apply_bytes, apply_json, byte_edits, json_edit, lm_fixture, names_file, Check, Verdict,
    EDGE_INTS, JSON_TOKENS,
};
use proptest::prelude::*;
use proptest::sample::Index;
use rlhf_lm::gguf::load_gguf;
use rlhf_lm::lora::PeftAdapter;
use rlhf_lm::pretrained::{check_weights, read_safetensors};
use rlhf_lm::{ChatTemplate, LlamaConfig, LmError, Message, Tokenizer};
use serde_json::Value as Json;

/// Inputs per loader in CI: the binary takes about 17 s on two cores.
const CI_CASES: u32 = 30_000;

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn json_seed(path: PathBuf) -> Json {
    serde_json::from_slice(&read(path)).unwrap()
}

const MODELS: &[&str] = &["tiny-llama", "tiny-mistral", "tiny-qwen2"];

/// A JSON file: one of `seeds`, JSON edits with `fields`, then byte edits.
#[derive(Debug, Clone)]
struct JsonInput {
    seed: Index,
    edits: Vec<fuzz::JsonEdit>,
    bytes: Vec<fuzz::ByteEdit>,
}

fn json_input(fields: &'static [&'static str]) -> impl Strategy<Value = JsonInput> {
    (
        any::<Index>(),
        prop::collection::vec(json_edit(fields), 0..5),
        byte_edits(3),
    )
        .prop_map(|(seed, edits, bytes)| JsonInput { seed, edits, bytes })
}

fn json_bytes(input: &JsonInput, seeds: &[Json], fields: &[&str]) -> Vec<u8> {
    let doc = apply_json(
        seeds[input.seed.index(seeds.len())].clone(),
        &input.edits,
        fields,
    );
    let text = serde_json::to_vec_pretty(&doc).unwrap();
    apply_bytes(text, &input.bytes, JSON_TOKENS)
}

// ---------------------------------------------------------------------------------------------
// config.json

const CONFIG_FIELDS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_type",
    "factor",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sliding_window",
    "use_sliding_window",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
];

#[test]
fn fuzz_config_json() {
    let seeds: Vec<Json> = MODELS
        .iter()
        .map(|m| json_seed(lm_fixture(&format!("{m}/config.json"))))
        .collect();
    // What `Pretrained::load` does next with the configuration: check the weights against it.
    let weights: Vec<_> = MODELS
        .iter()
        .map(|m| {
            read_safetensors(&lm_fixture(&format!("{m}/model.safetensors")), &Device::Cpu).unwrap()
        })
        .collect();
    let path = fuzz::scratch_dir("config").join("config.json");
    fuzz::fuzz(
        "config.json",
        CI_CASES,
        json_input(CONFIG_FIELDS),
        |input| {
            std::fs::write(&path, json_bytes(input, &seeds, CONFIG_FIELDS)).unwrap();
            let weights = &weights[input.seed.index(MODELS.len())];
            match LlamaConfig::from_file(&path).and_then(|c| check_weights(&c, weights, &path)) {
                Ok(()) => Ok(Verdict::Accepted),
                Err(e) => names_file(&e, &path),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json and tokenizer_config.json (read together by `Tokenizer::from_hf_dir`)

const TOKENIZER_FIELDS: &[&str] = &[
    "model",
    "type",
    "vocab",
    "merges",
    "added_tokens",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "id",
    "content",
    "special",
    "unk_token",
    "byte_fallback",
    "BPE",
    "WordPiece",
    "WordLevel",
    "Unigram",
    "ByteLevel",
    "Sequence",
    "TemplateProcessing",
    "single",
    "pair",
    "special_tokens",
    "ids",
    "tokens",
    "bos_token",
    "eos_token",
    "pad_token",
    "model_max_length",
    "chat_template",
    "<s>",
    "</s>",
];

#[derive(Debug, Clone)]
struct TokenizerInput {
    tokenizer: JsonInput,
    config: Option<JsonInput>,
    special_map: Option<JsonInput>,
}

#[test]
fn fuzz_tokenizer_json() {
    let tokenizers: Vec<Json> = MODELS
        .iter()
        .map(|m| json_seed(lm_fixture(&format!("{m}/tokenizer.json"))))
        .collect();
    let configs: Vec<Json> = MODELS
        .iter()
        .map(|m| json_seed(lm_fixture(&format!("{m}/tokenizer_config.json"))))
        .collect();
    let dir = fuzz::scratch_dir("tokenizer");
    let strategy = (
        json_input(TOKENIZER_FIELDS),
        prop::option::of(json_input(TOKENIZER_FIELDS)),
        prop::option::weighted(0.2, json_input(TOKENIZER_FIELDS)),
    )
        .prop_map(|(tokenizer, config, special_map)| TokenizerInput {
            tokenizer,
            config,
            special_map,
        });
    let files = [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    .map(|f| dir.join(f));
    fuzz::fuzz("tokenizer.json", CI_CASES, strategy, |input| {
        let parts = [
            Some((&input.tokenizer, &tokenizers)),
            input.config.as_ref().map(|c| (c, &configs)),
            input.special_map.as_ref().map(|c| (c, &configs)),
        ];
        for (file, part) in files.iter().zip(parts) {
            match part {
                Some((j, seeds)) => {
                    std::fs::write(file, json_bytes(j, seeds, TOKENIZER_FIELDS)).unwrap()
                }
                None => {
                    std::fs::remove_file(file).ok();
                }
            }
        }
        match Tokenizer::from_hf_dir(&dir) {
            Ok(tok) => {
                // A tokenizer that loads must encode and decode without panicking.
                if let Ok(ids) = tok.encode("hello <s> wörld 🦀", true) {
                    tok.decode(&ids, false).ok();
                }
                Ok(Verdict::Accepted)
            }
            Err(e) => names_one_of(&e, &files),
        }
    });
}

fn names_one_of(e: &LmError, files: &[PathBuf]) -> Check {
    let msg = fuzz::chain(e);
    if files.iter().any(|f| msg.contains(&f.display().to_string())) {
        Ok(Verdict::Rejected)
    } else {
        Err(format!("error names none of {files:?}: {msg}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Chat templates: chat_template.jinja, or `chat_template` in chat_template.json or
// tokenizer_config.json; a template that loads is rendered on a few conversations.

/// Jinja syntax and the names templates use, for insertions into template sources.
const JINJA_TOKENS: &[&[u8]] = &[
    b"{%",
    b"%}",
    b"{{",
    b"}}",
    b"{#",
    b"#}",
    b"{%- ",
    b" -%}",
    b"{% for m in messages %}",
    b"{% endfor %}",
    b"{% if ",
    b"{% elif x %}",
    b"{% else %}",
    b"{% endif %}",
    b"{% set x = ",
    b"{% macro f(a) %}{{ f(a) }}{% endmacro %}{{ f(1) }}",
    b"{% for x in range(100000) %}",
    b"{% break %}",
    b"{% continue %}",
    b"loop.index",
    b"loop.cycle(1, 2)",
    b"messages[0]",
    b"messages[-1]['content']",
    b"message['role']",
    b"raise_exception('bad')",
    b"strftime_now('%Y-%m-%d')",
    b" | tojson",
    b" | length",
    b" | trim",
    b".strip()",
    b".split(' ')",
    b".items()",
    b"[::-1]",
    b" ~ ",
    b" * 1000000",
    b" ** 100",
    b" / 0",
    b" // 0",
    b" % 0",
    b"9223372036854775807",
    b"namespace(a=1)",
    b"bos_token",
    b"eos_token",
    b"add_generation_prompt",
    b"tools",
    b"{% include 'x' %}",
    b"{% extends 'x' %}",
    b"{% import 'x' as y %}",
    b"{% raw %}",
    b"{% endraw %}",
    b"{% filter upper %}",
    b"{% call f() %}",
    b"(",
    b")",
    b"[",
    b"]",
    b"'",
    b"\"",
    b"\n",
    b"\xff",
];

#[derive(Debug, Clone)]
struct TemplateInput {
    /// 0: chat_template.jinja, 1: chat_template.json, 2: tokenizer_config.json.
    file: u8,
    seed: Index,
    bytes: Vec<fuzz::ByteEdit>,
    /// For the JSON files: edits of the document that holds the template.
    edits: Vec<fuzz::JsonEdit>,
}

const TEMPLATE_FIELDS: &[&str] = &["chat_template", "name", "template", "default"];

#[test]
fn fuzz_chat_template() {
    let mut sources: Vec<String> = MODELS
        .iter()
        .map(|m| std::fs::read_to_string(lm_fixture(&format!("{m}/chat_template.jinja"))).unwrap())
        .collect();
    // A template of the Llama-3 / Qwen kind: system handling, loop variables, namespaces.
    sources.push(
        "{%- set ns = namespace(sys='') -%}{%- for m in messages -%}{%- if m.role == 'system' -%}\
         {%- set ns.sys = m.content -%}{%- elif m.role not in ['user', 'assistant'] -%}\
         {{ raise_exception('bad role ' ~ m.role) }}{%- else -%}<|{{ m.role }}|>{{ m.content | trim }}\
         {%- if loop.last and not add_generation_prompt %}{{ eos_token }}{% endif -%}{%- endif -%}\
         {%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
            .into(),
    );
    let tokenizer = Tokenizer::from_hf_dir(&lm_fixture("tiny-llama")).unwrap();
    let dir = fuzz::scratch_dir("template");
    let names = [
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer_config.json",
    ];
    let conversations = [
        vec![Message::new("user", "hi")],
        vec![
            Message::new("system", "be brief"),
            Message::new("user", "hi"),
            Message::new("assistant", "hello"),
        ],
        vec![],
    ];
    let strategy = (
        0u8..3,
        any::<Index>(),
        prop::collection::vec(
            prop_oneof![
                3 => fuzz::byte_edit(),
                1 => (any::<Index>(), any::<Index>())
                    .prop_map(|(at, token)| fuzz::ByteEdit::InsertToken { at, token }),
            ],
            0..5,
        ),
        prop::collection::vec(json_edit(TEMPLATE_FIELDS), 0..2),
    )
        .prop_map(|(file, seed, bytes, edits)| TemplateInput {
            file,
            seed,
            bytes,
            edits,
        });
    fuzz::fuzz("chat template", CI_CASES, strategy, |input| {
        for n in names {
            std::fs::remove_file(dir.join(n)).ok();
        }
        let source = apply_bytes(
            sources[input.seed.index(sources.len())]
                .clone()
                .into_bytes(),
            &input.bytes,
            JINJA_TOKENS,
        );
        let path = dir.join(names[input.file as usize]);
        let contents = if input.file == 0 {
            source
        } else {
            let text = String::from_utf8_lossy(&source).into_owned();
            let doc = if input.file == 1 {
                serde_json::json!({ "chat_template": text })
            } else {
                serde_json::json!({ "bos_token": "<s>", "chat_template": [
                    { "name": "default", "template": text },
                    { "name": "tool_use", "template": "{{ x }}" },
                ]})
            };
            serde_json::to_vec(&apply_json(doc, &input.edits, TEMPLATE_FIELDS)).unwrap()
        };
        std::fs::write(&path, contents).unwrap();
        match ChatTemplate::from_hf_dir(&dir, &tokenizer) {
            Ok(Some(t)) => {
                for c in &conversations {
                    for generation in [false, true] {
                        // A render error is the data loader's to report (with the data file's
                        // line and field); here it only must not panic or hang.
                        t.render(c, generation).ok();
                    }
                }
                Ok(Verdict::Accepted)
            }
            Ok(None) => Ok(Verdict::Accepted),
            Err(e) => names_file(&e, &path),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// safetensors: an 8-byte header length, a JSON header (dtype, shape, data_offsets per tensor),
// the data.

const SAFETENSORS_FIELDS: &[&str] = &[
    "dtype",
    "shape",
    "data_offsets",
    "__metadata__",
    "format",
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "U8",
    "BOOL",
    "F8_E4M3",
    "model.embed_tokens.weight",
];

#[derive(Debug, Clone)]
struct HeaderInput {
    seed: Index,
    edits: Vec<fuzz::JsonEdit>,
    /// Pad the header with spaces (as the format allows) or not.
    pad: u8,
    bytes: Vec<fuzz::ByteEdit>,
}

fn header_input() -> impl Strategy<Value = HeaderInput> {
    (
        any::<Index>(),
        prop::collection::vec(json_edit(SAFETENSORS_FIELDS), 0..4),
        0u8..9,
        byte_edits(3),
    )
        .prop_map(|(seed, edits, pad, bytes)| HeaderInput {
            seed,
            edits,
            pad,
            bytes,
        })
}

/// A safetensors file with tensors of every dtype the loader converts.
fn small_safetensors() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let f16s: Vec<u8> = (0..4)
        .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = (0..4)
        .flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes())
        .collect();
    let f64s: Vec<u8> = 1.5f64.to_le_bytes().to_vec();
    let views = vec![
        ("a", TensorView::new(Dtype::F32, vec![2, 3], &f32s).unwrap()),
        ("b", TensorView::new(Dtype::F16, vec![4], &f16s).unwrap()),
        (
            "c",
            TensorView::new(Dtype::BF16, vec![2, 2], &bf16s).unwrap(),
        ),
        ("d", TensorView::new(Dtype::F64, vec![], &f64s).unwrap()),
    ];
    safetensors::serialize(views, None).unwrap()
}

/// (header JSON, data) of a safetensors file.
fn split_safetensors(bytes: &[u8]) -> (Json, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn safetensors_bytes(input: &HeaderInput, seeds: &[(Json, Vec<u8>)]) -> Vec<u8> {
    let (header, data) = &seeds[input.seed.index(seeds.len())];
    let header = apply_json(header.clone(), &input.edits, SAFETENSORS_FIELDS);
    let mut text = serde_json::to_vec(&header).unwrap();
    text.resize(text.len() + input.pad as usize, b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    apply_bytes(out, &input.bytes, JSON_TOKENS)
}

#[test]
fn fuzz_safetensors() {
    let seeds: Vec<(Json, Vec<u8>)> = [
        small_safetensors(),
        read(lm_fixture("tiny-llama-lora-qv/adapter_model.safetensors")),
    ]
    .iter()
    .map(|b| split_safetensors(b))
    .collect();
    let path = fuzz::scratch_dir("safetensors").join("model.safetensors");
    fuzz::fuzz("safetensors", CI_CASES, header_input(), |input| {
        std::fs::write(&path, safetensors_bytes(input, &seeds)).unwrap();
        match read_safetensors(&path, &Device::Cpu) {
            Ok(_) => Ok(Verdict::Accepted),
            Err(e) => names_file(&e, &path),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// GGUF: a tiny llama model written by the serializer below (which, unlike candle's writer, can
// also write what a broken converter would: wrong types, counts, dims, dtypes and offsets).

const H: usize = 8;
const NH: usize = 2;
const HD: usize = 4;
const FF: usize = 12;
const VOCAB: usize = 7;

#[derive(Debug, Clone)]
struct GgufTensor {
    name: String,
    /// In GGUF order (fastest-varying first).
    dims: Vec<u64>,
    dtype: u32,
    offset: u64,
}

#[derive(Debug, Clone)]
struct Gguf {
    version: u32,
    metadata: Vec<(String, Gv)>,
    tensors: Vec<GgufTensor>,
    data: Vec<u8>,
    /// Overrides of the declared tensor and metadata counts.
    counts: Option<(u64, u64)>,
}

fn tiny_gguf() -> Gguf {
    let strs = |v: &[&str]| Gv::Array(v.iter().map(|s| Gv::String(s.to_string())).collect());
    let metadata: Vec<(String, Gv)> = vec![
        ("general.architecture".into(), Gv::String("llama".into())),
        ("llama.block_count".into(), Gv::U32(1)),
        ("llama.context_length".into(), Gv::U32(64)),
        ("llama.embedding_length".into(), Gv::U32(H as u32)),
        ("llama.feed_forward_length".into(), Gv::U32(FF as u32)),
        ("llama.attention.head_count".into(), Gv::U32(NH as u32)),
        ("llama.attention.head_count_kv".into(), Gv::U32(1)),
        ("llama.rope.freq_base".into(), Gv::F32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Gv::F32(1e-6),
        ),
        ("tokenizer.ggml.model".into(), Gv::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Gv::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            strs(&["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġab"]),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Gv::Array([3, 3, 1, 1, 1, 1, 1].iter().map(|&t| Gv::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strs(&["a b", "Ġ ab"])),
        ("tokenizer.ggml.bos_token_id".into(), Gv::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Gv::U32(1)),
        ("tokenizer.ggml.add_bos_token".into(), Gv::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            Gv::String("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ),
    ];
    let kv = HD; // one kv head
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("token_embd.weight", vec![VOCAB, H]),
        ("output_norm.weight", vec![H]),
        ("blk.0.attn_norm.weight", vec![H]),
        ("blk.0.ffn_norm.weight", vec![H]),
        ("blk.0.attn_q.weight", vec![NH * HD, H]),
        ("blk.0.attn_k.weight", vec![kv, H]),
        ("blk.0.attn_v.weight", vec![kv, H]),
        ("blk.0.attn_output.weight", vec![H, NH * HD]),
        ("blk.0.ffn_gate.weight", vec![FF, H]),
        ("blk.0.ffn_up.weight", vec![FF, H]),
        ("blk.0.ffn_down.weight", vec![H, FF]),
    ];
    let mut data = Vec::new();
    let mut tensors = Vec::new();
    for (name, shape) in shapes {
        let n: usize = shape.iter().product();
        tensors.push(GgufTensor {
            name: name.into(),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            dtype: 0, // f32
            offset: data.len() as u64,
        });
        for i in 0..n {
            data.extend(((i as f32 * 0.37).sin() * 0.5).to_le_bytes());
        }
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
    }
    Gguf {
        version: 3,
        metadata,
        tensors,
        data,
        counts: None,
    }
}

fn gguf_type(v: &Gv) -> u32 {
    match v {
        Gv::U8(_) => 0,
        Gv::I8(_) => 1,
        Gv::U16(_) => 2,
        Gv::I16(_) => 3,
        Gv::U32(_) => 4,
        Gv::I32(_) => 5,
        Gv::F32(_) => 6,
        Gv::Bool(_) => 7,
        Gv::String(_) => 8,
        Gv::Array(_) => 9,
        Gv::U64(_) => 10,
        Gv::I64(_) => 11,
        Gv::F64(_) => 12,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Gv) {
    match v {
        Gv::U8(x) => out.push(*x),
        Gv::I8(x) => out.push(*x as u8),
        Gv::U16(x) => out.extend(x.to_le_bytes()),
        Gv::I16(x) => out.extend(x.to_le_bytes()),
        Gv::U32(x) => out.extend(x.to_le_bytes()),
        Gv::I32(x) => out.extend(x.to_le_bytes()),
        Gv::F32(x) => out.extend(x.to_le_bytes()),
        Gv::Bool(x) => out.push(u8::from(*x)),
        Gv::String(s) => put_string(out, s),
        Gv::U64(x) => out.extend(x.to_le_bytes()),
        Gv::I64(x) => out.extend(x.to_le_bytes()),
        Gv::F64(x) => out.extend(x.to_le_bytes()),
        Gv::Array(items) => {
            // The element type is the first element's: a mixed array is written as a broken
            // converter would, each element in its own encoding.
            out.extend(items.first().map_or(4, gguf_type).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}

impl Gguf {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        let (nt, nkv) = self
            .counts
            .unwrap_or((self.tensors.len() as u64, self.metadata.len() as u64));
        out.extend(nt.to_le_bytes());
        out.extend(nkv.to_le_bytes());
        for (k, v) in &self.metadata {
            put_string(&mut out, k);
            out.extend(gguf_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        for t in &self.tensors {
            put_string(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.dtype.to_le_bytes());
            out.extend(t.offset.to_le_bytes());
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(&self.data);
        out
    }
}

#[derive(Debug, Clone)]
enum GgufEdit {
    SetMeta { key: Index, value: Gv },
    RemoveMeta { at: Index },
    Dims { at: Index, dims: Vec<u64> },
    Dtype { at: Index, dtype: u32 },
    Offset { at: Index, offset: u64 },
    Rename { at: Index, name: Index },
    DropTensor { at: Index },
    Counts { tensors: u64, metadata: u64 },
    Version(u32),
}

const GGUF_KEYS: &[&str] = &[
    "general.architecture",
    "general.alignment",
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.rope.dimension_count",
    "llama.rope.freq_base",
    "llama.rope.scaling.type",
    "llama.rope.scaling.factor",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.vocab_size",
    "qwen2.embedding_length",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.chat_template",
];

const GGUF_TENSOR_NAMES: &[&str] = &[
    "token_embd.weight",
    "output.weight",
    "output_norm.weight",
    "rope_freqs.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_q.bias",
    "blk.0.attn_k.weight",
    "blk.0.attn_output.bias",
    "blk.1.attn_norm.weight",
    "blk.99999999999999999999.attn_q.weight",
    "blk.0.ffn_gate.bias",
    "",
];

fn gguf_value() -> impl Strategy<Value = Gv> {
    let int = prop_oneof![prop::sample::select(EDGE_INTS.to_vec()), 0u64..40,];
    let leaf = prop_oneof![
        int.clone().prop_map(|x| Gv::U32(x as u32)),
        int.clone().prop_map(Gv::U64),
        int.clone().prop_map(|x| Gv::I32(x as i32)),
        int.clone().prop_map(|x| Gv::I64((x as i64).wrapping_neg())),
        int.clone().prop_map(|x| Gv::U8(x as u8)),
        int.clone().prop_map(|x| Gv::I16(x as i16)),
        prop::sample::select(vec![0.0f32, -1.0, 1e-6, f32::NAN, f32::INFINITY, 1e30])
            .prop_map(Gv::F32),
        prop::sample::select(vec![0.0f64, -0.5, f64::NAN]).prop_map(Gv::F64),
        any::<bool>().prop_map(Gv::Bool),
        prop::sample::select(vec![
            "", "llama", "qwen2", "gpt2", "linear", "none", "yarn", "default", "qwen2", "a b",
            "ab", "{{ x", "<s>",
        ])
        .prop_map(|s| Gv::String(s.into())),
    ];
    prop_oneof![
        4 => leaf.clone(),
        1 => prop::collection::vec(leaf, 0..4).prop_map(Gv::Array),
        1 => prop::collection::vec(
            prop::sample::select(vec!["<s>", "</s>", "a", "b", "a b", "ab", "Ġ", "", "a"]),
            0..9,
        )
        .prop_map(|v| Gv::Array(v.into_iter().map(|s| Gv::String(s.into())).collect())),
        1 => prop::collection::vec(0i32..8, 0..9)
            .prop_map(|v| Gv::Array(v.into_iter().map(Gv::I32).collect())),
    ]
}

fn gguf_edit() -> impl Strategy<Value = GgufEdit> {
    let int = prop_oneof![prop::sample::select(EDGE_INTS.to_vec()), 0u64..64];
    prop_oneof![
        4 => (any::<Index>(), gguf_value()).prop_map(|(key, value)| GgufEdit::SetMeta { key, value }),
        2 => any::<Index>().prop_map(|at| GgufEdit::RemoveMeta { at }),
        3 => (any::<Index>(), prop::collection::vec(int.clone(), 0..6))
            .prop_map(|(at, dims)| GgufEdit::Dims { at, dims }),
        2 => (any::<Index>(), prop_oneof![0u32..42, Just(u32::MAX)])
            .prop_map(|(at, dtype)| GgufEdit::Dtype { at, dtype }),
        2 => (any::<Index>(), int.clone()).prop_map(|(at, offset)| GgufEdit::Offset { at, offset }),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(at, name)| GgufEdit::Rename { at, name }),
        1 => any::<Index>().prop_map(|at| GgufEdit::DropTensor { at }),
        1 => (int.clone(), int).prop_map(|(tensors, metadata)| GgufEdit::Counts { tensors, metadata }),
        1 => prop_oneof![0u32..5, Just(u32::MAX)].prop_map(GgufEdit::Version),
    ]
}

fn apply_gguf(mut g: Gguf, edits: &[GgufEdit]) -> Gguf {
    for e in edits {
        let nt = g.tensors.len();
        match e {
            GgufEdit::SetMeta { key, value } => {
                let k = GGUF_KEYS[key.index(GGUF_KEYS.len())];
                match g.metadata.iter_mut().find(|(n, _)| n == k) {
                    Some(slot) => slot.1 = value.clone(),
                    None => g.metadata.push((k.into(), value.clone())),
                }
            }
            GgufEdit::RemoveMeta { at } if !g.metadata.is_empty() => {
                g.metadata.remove(at.index(g.metadata.len()));
            }
            GgufEdit::Dims { at, dims } if nt > 0 => g.tensors[at.index(nt)].dims = dims.clone(),
            GgufEdit::Dtype { at, dtype } if nt > 0 => g.tensors[at.index(nt)].dtype = *dtype,
            GgufEdit::Offset { at, offset } if nt > 0 => g.tensors[at.index(nt)].offset = *offset,
            GgufEdit::Rename { at, name } if nt > 0 => {
                g.tensors[at.index(nt)].name =
                    GGUF_TENSOR_NAMES[name.index(GGUF_TENSOR_NAMES.len())].into()
            }
            GgufEdit::DropTensor { at } if nt > 0 => {
                g.tensors.remove(at.index(nt));
            }
            GgufEdit::Counts { tensors, metadata } => g.counts = Some((*tensors, *metadata)),
            GgufEdit::Version(v) => g.version = *v,
            _ => {}
        }
    }
    g
}

#[test]
fn fuzz_gguf() {
    let seed = tiny_gguf();
    let path = fuzz::scratch_dir("gguf").join("model.gguf");
    // The seed itself must load, or the fuzzing would only ever exercise rejections.
    std::fs::write(&path, seed.to_bytes()).unwrap();
    load_gguf(&path, &Device::Cpu).expect("the seed GGUF loads");
    let strategy = (prop::collection::vec(gguf_edit(), 0..4), byte_edits(3));
    fuzz::fuzz("gguf", CI_CASES, strategy, |(edits, bytes)| {
        let g = apply_gguf(seed.clone(), edits);
        std::fs::write(
            &path,
            apply_bytes(g.to_bytes(), bytes, &[b"GGUF", b"\x09\0\0\0"]),
        )
        .unwrap();
        match load_gguf(&path, &Device::Cpu) {
            Ok(_) => Ok(Verdict::Accepted),
            Err(e) => names_file(&e, &path),
        }
    });
}

// ---------------------------------------------------------------------------------------------
// PEFT adapter configs (adapter_config.json beside a valid adapter_model.safetensors), checked
// against the base model's configuration as `Pretrained::load` does.

const ADAPTERS: &[&str] = &[
    "tiny-llama-lora-qv",
    "tiny-llama-lora-all",
    "tiny-llama-lora-ours",
];

const PEFT_FIELDS: &[&str] = &[
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "bias",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "ensure_weight_tying",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "inference_mode",
    "init_lora_weights",
    "revision",
    "q_proj",
    "v_proj",
    "all-linear",
    "LORA",
    "CAUSAL_LM",
    "../tiny-llama",
];

#[test]
fn fuzz_peft_adapter_config() {
    let seeds: Vec<Json> = ADAPTERS
        .iter()
        .map(|a| json_seed(lm_fixture(&format!("{a}/adapter_config.json"))))
        .collect();
    let base = LlamaConfig::from_file(&lm_fixture("tiny-llama/config.json")).unwrap();
    let root = fuzz::scratch_dir("peft");
    // One directory per adapter, its weights copied once; the base model beside them so that
    // `../tiny-llama` resolves.
    let base_dir = root.join("tiny-llama");
    std::fs::create_dir_all(&base_dir).unwrap();
    std::fs::copy(
        lm_fixture("tiny-llama/config.json"),
        base_dir.join("config.json"),
    )
    .unwrap();
    let dirs: Vec<PathBuf> = ADAPTERS
        .iter()
        .map(|a| {
            let d = root.join(a);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::copy(
                lm_fixture(&format!("{a}/adapter_model.safetensors")),
                d.join("adapter_model.safetensors"),
            )
            .unwrap();
            d
        })
        .collect();
    let strategy = (any::<Index>(), json_input(PEFT_FIELDS));
    fuzz::fuzz(
        "adapter_config.json",
        CI_CASES,
        strategy,
        |(which, input)| {
            let i = which.index(ADAPTERS.len());
            let dir = &dirs[i];
            let config = dir.join("adapter_config.json");
            // Each directory's own config is the seed, so its weights match it until edited.
            let bytes = json_bytes(input, std::slice::from_ref(&seeds[i]), PEFT_FIELDS);
            std::fs::write(&config, bytes).unwrap();
            let files = [config.clone(), dir.join("adapter_model.safetensors")];
            let adapter = match PeftAdapter::load(dir, &Device::Cpu) {
                Ok(a) => a,
                Err(e) => return names_one_of(&e, &files),
            };
            let later = adapter
                .base_path()
                .and_then(|_| adapter.lora_config())
                .and_then(|_| adapter.check_shapes(&base));
            match later {
                Ok(()) => Ok(Verdict::Accepted),
                Err(e) => names_one_of(&e, &files),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Regressions: the inputs fuzzing found, each fixed in the loader.

fn err_text(r: Result<impl Sized, LmError>) -> String {
    match r {
        Ok(_) => panic!("accepted an input that must be rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn chat_template_with_overlapping_tag_marks_is_a_syntax_error() {
    // `{%}`: the `%}` overlaps the `{%`; rewriting `{% generation %}` tags sliced backwards.
    let dir = fuzz::scratch_dir("regression-template");
    std::fs::write(dir.join("chat_template.jinja"), "{%} message['content'] }}").unwrap();
    let tokenizer = Tokenizer::from_hf_dir(&lm_fixture("tiny-llama")).unwrap();
    let msg = err_text(ChatTemplate::from_hf_dir(&dir, &tokenizer));
    assert!(
        msg.contains("chat_template.jinja") && msg.contains("syntax error"),
        "{msg}"
    );
}

#[test]
fn tokenizer_json_with_malformed_decoder_is_an_error() {
    // The tokenizers crate `expect`s its decoder helper to deserialize: a syntax error inside
    // `decoder` panicked.
    let dir = fuzz::scratch_dir("regression-tokenizer");
    let text = std::fs::read_to_string(lm_fixture("tiny-llama/tokenizer.json")).unwrap();
    let broken = text.replace("\"decoder\": null", "\"decoder\": {\"type\": }");
    assert_ne!(text, broken);
    std::fs::write(dir.join("tokenizer.json"), broken).unwrap();
    let msg = err_text(Tokenizer::from_hf_dir(&dir));
    assert!(
        msg.contains(&dir.join("tokenizer.json").display().to_string())
            && msg.contains("not a valid tokenizer.json"),
        "{msg}"
    );
}

fn gguf_err(g: &Gguf, tag: &str) -> String {
    let path = fuzz::scratch_dir(tag).join("model.gguf");
    std::fs::write(&path, g.to_bytes()).unwrap();
    let msg = err_text(load_gguf(&path, &Device::Cpu));
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    msg
}

/// The tiny model with token_embd.weight's dims replaced.
fn with_embedding_dims(dims: Vec<u64>) -> Gguf {
    let mut g = tiny_gguf();
    let t = g
        .tensors
        .iter_mut()
        .find(|t| t.name == "token_embd.weight")
        .unwrap();
    t.dims = dims;
    g
}

#[test]
fn gguf_tensor_with_wrapping_size_is_an_error() {
    // 2^63 f32 elements is 0 bytes in wrapping arithmetic: candle's bounds check passed and the
    // allocation of the declared elements panicked (capacity overflow).
    let msg = gguf_err(&with_embedding_dims(vec![1 << 63]), "regression-gguf-size");
    assert!(msg.contains("does not fit in the file"), "{msg}");
}

#[test]
fn gguf_scalar_token_embedding_is_an_error() {
    // Rejected by candle already; `load_gguf` no longer indexes the embedding's dims()[0] either.
    let msg = gguf_err(&with_embedding_dims(vec![]), "regression-gguf-scalar");
    assert!(msg.contains("token_embd"), "{msg}");
}

#[test]
fn gguf_huge_block_count_is_an_error_not_a_hang() {
    // 2^31 layers: checking the weights listed every expected tensor name first.
    let start = std::time::Instant::now();
    let mut g = tiny_gguf();
    for (k, v) in &mut g.metadata {
        if k == "llama.block_count" {
            *v = Gv::U64(1 << 31);
        }
    }
    let msg = gguf_err(&g, "regression-gguf-layers");
    assert!(
        msg.contains("model.layers.1.") && msg.contains("missing"),
        "{msg}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn chat_template_reversing_an_empty_list_is_an_error_not_a_panic() {
    // minijinja panics iterating `messages[::-1]` when there are no messages.
    let t = ChatTemplate::new(
        "{% for m in messages[::-1] %}{{ m.content }}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let _ = t.render(&[], false);
    assert!(t.render(&[Message::new("user", "hi")], false).is_ok());
}

#[test]
fn gguf_alignment_zero_is_an_error() {
    // candle divides the header's end by `general.alignment`.
    let mut g = tiny_gguf();
    g.metadata.push(("general.alignment".into(), Gv::U8(0)));
    let msg = gguf_err(&g, "regression-gguf-alignment");
    assert!(msg.contains("not a valid GGUF file"), "{msg}");
}

#[test]
fn tokenizer_that_cannot_encode_names_its_file() {
    // A WordLevel model whose vocabulary lacks its unknown token fails on the first encode.
    let dir = fuzz::scratch_dir("regression-tokenizer-encode");
    let mut doc = json_seed(lm_fixture("tiny-llama/tokenizer.json"));
    doc["model"] =
        serde_json::json!({ "type": "WordLevel", "vocab": { "b": 0 }, "unk_token": "[UNK]" });
    doc["added_tokens"] = serde_json::json!([]);
    std::fs::write(dir.join("tokenizer.json"), doc.to_string()).unwrap();
    let msg = err_text(Tokenizer::from_hf_dir(&dir));
    assert!(
        msg.contains(&dir.join("tokenizer.json").display().to_string())
            && msg.contains("cannot encode"),
        "{msg}"
    );
}

#[test]
fn runaway_chat_template_stops_with_an_error() {
    // Nested loops of 10^10 iterations rendered for hours before the template got a fuel bound.
    let t = ChatTemplate::new(
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
        None,
        None,
    )
    .unwrap();
    let start = std::time::Instant::now();
    let msg = err_text(t.render(&[Message::new("user", "hi")], false));
    assert!(msg.contains("fuel"), "{msg}");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn chat_template_the_compiler_panics_on_is_an_error() {
    // minijinja parses `{% import 'x' as y.z() %}` and then hits `unreachable!` compiling it.
    let dir = fuzz::scratch_dir("regression-template-compile");
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{% for m in messages %}{% import 'x' as yloop.cycle(1, 2) %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    let tokenizer = Tokenizer::from_hf_dir(&lm_fixture("tiny-llama")).unwrap();
    let msg = err_text(ChatTemplate::from_hf_dir(&dir, &tokenizer));
    assert!(msg.contains("chat_template.jinja"), "{msg}");
}
