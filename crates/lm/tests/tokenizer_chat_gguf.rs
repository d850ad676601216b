//! Tokenizer, chat template and GGUF loading.
//!
//! Parity tests compare with `tests/fixtures/smollm2_tokenizer.json`, written by
//! `tools/make_tokenizer_fixtures.py` from transformers. Tests that need the SmolLM2 GGUF skip with a
//! message when it is absent (run `scripts/fetch-smollm2.sh`), or fail if `RLHF_REQUIRE_SMOLLM2=1`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value as GV};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rlhf_lm::gguf::{llama_cpp_permute, llama_cpp_unpermute, load_gguf};
use rlhf_lm::testing::smollm2_gguf_or_skip;
use rlhf_lm::{ChatTemplate, Family, LmError, Message, Pretrained, Tokenizer};
use serde_json::Value as Json;

fn fixture() -> Json {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_tokenizer.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// A fresh, empty directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("rlhf-lm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn messages(v: &Json) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Tokenizer and chat template of the SmolLM2 GGUF, from its metadata only (no weights).
fn smollm2_tokenizer(path: &Path) -> (Tokenizer, ChatTemplate) {
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let tok = Tokenizer::from_gguf_metadata(&content.metadata, path).unwrap();
    let src = content.metadata["tokenizer.chat_template"]
        .to_string()
        .unwrap()
        .clone();
    let tmpl = ChatTemplate::new(src, tok.bos_token.clone(), tok.eos_token.clone()).unwrap();
    (tok, tmpl)
}

/// Every encode case and chat case of the fixture, checked against `tok` and `tmpl`.
fn check_against_fixture(tok: &Tokenizer, tmpl: &ChatTemplate, fx: &Json) {
    for case in fx["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        // transformers' GGUF loader pre-tokenizes with plain ByteLevel, SmolLM2's own tokenizer.json
        // (and llama.cpp's `smollm`) split digits off first; the fixture records both where they
        // differ (e.g. " ²"), and we follow the original tokenizer.
        let want = ids(&case["ids_digits_pretokenizer"]);
        let want_tf = ids(&case["ids_no_special"]);
        if want != want_tf {
            eprintln!("note: {text:?}: following SmolLM2's Digits pre-tokenizer, not transformers' GGUF loader");
        }
        assert_eq!(
            tok.encode(text, false).unwrap(),
            want,
            "ids without special tokens for {text:?}"
        );
        let with = tok.encode(text, true).unwrap();
        if want == want_tf {
            assert_eq!(
                with,
                ids(&case["ids_with_special"]),
                "ids with special tokens for {text:?}"
            );
        } else {
            assert_eq!(with, want, "SmolLM2 adds no special tokens ({text:?})");
        }
        let fx_ids = ids(&case["ids_with_special"]);
        assert_eq!(
            tok.decode(&fx_ids, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
        assert_eq!(
            tok.decode(&fx_ids, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode (skip special) of {text:?}"
        );
    }
    for case in fx["chat"].as_array().unwrap() {
        let msgs = messages(&case["messages"]);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tmpl.render(&msgs, gen).unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "chat {msgs:?} gen={gen}"
        );
        assert_eq!(
            tok.encode(&rendered, false).unwrap(),
            ids(&case["ids"]),
            "ids of chat {msgs:?}"
        );
    }
}

#[test]
fn smollm2_tokenizer_and_template_match_transformers() {
    let Some(path) = smollm2_gguf_or_skip("smollm2_tokenizer_and_template_match_transformers")
    else {
        return;
    };
    let fx = fixture();
    let (tok, tmpl) = smollm2_tokenizer(&path);
    assert_eq!(
        tok.vocab_size(),
        fx["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(tok.bos_token.as_deref(), fx["bos_token"].as_str());
    assert_eq!(tok.eos_token.as_deref(), fx["eos_token"].as_str());
    assert_eq!(tok.pad_token.as_deref(), fx["pad_token"].as_str());
    assert_eq!(tok.unk_token.as_deref(), fx["unk_token"].as_str());
    assert_eq!(tok.eos_token_ids, vec![2]);
    assert_eq!(tok.pad_token_id, Some(2));
    assert!(!tok.add_bos && !tok.add_eos);
    assert_eq!(tmpl.source, fx["chat_template"].as_str().unwrap());
    for id in ids(&fx["special_ids"]) {
        assert!(tok.is_special(id), "id {id} should be special");
    }
    assert!(
        (0..17).all(|id| tok.is_special(id)),
        "SmolLM2's 17 control tokens are special"
    );
    assert!(!tok.is_special(17) && !tok.is_special(19556));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(2).as_deref(), Some("<|im_end|>"));
    assert!(
        tok.decode(&[49152], false).is_err(),
        "out-of-range id is an error"
    );
    check_against_fixture(&tok, &tmpl, &fx);
}

#[test]
fn tiny_template_matches_transformers() {
    let fx = fixture();
    let tiny = &fx["tiny_template"];
    let tmpl = ChatTemplate::new(
        tiny["template"].as_str().unwrap(),
        tiny["bos_token"].as_str().map(String::from),
        tiny["eos_token"].as_str().map(String::from),
    )
    .unwrap();
    for case in tiny["cases"].as_array().unwrap() {
        let msgs = messages(&case["messages"]);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = tmpl.render(&msgs, gen).unwrap();
        let want = case["rendered"].as_str().unwrap();
        assert_eq!(got, want, "tiny template, messages {msgs:?}, gen={gen}");
    }
    let err = &tiny["error_case"];
    let e = tmpl
        .render(&messages(&err["messages"]), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(err["error"].as_str().unwrap()),
        "raise_exception message lost: {e}"
    );
}

#[test]
fn template_basics_without_fixture() {
    let tmpl = ChatTemplate::new(
        "{% for m in messages %}{{ bos_token }}{{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}\
         {% if add_generation_prompt %}assistant:{% endif %}\n",
        Some("<s>".into()),
        Some("</s>".into()),
    )
    .unwrap();
    let msgs = [Message::new("user", "hi"), Message::new("assistant", "yo")];
    assert_eq!(
        tmpl.render(&msgs, true).unwrap(),
        "<s>user: hi</s>\n<s>assistant: yo</s>\nassistant:"
    );
    // The final newline of a template is dropped, as Jinja's keep_trailing_newline=False does.
    assert_eq!(tmpl.render(&msgs[..1], false).unwrap(), "<s>user: hi</s>\n");
}

#[test]
fn template_syntax_error_is_reported() {
    let e = ChatTemplate::new(
        "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
        None,
        None,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, LmError::Invalid(_)), "{e:?}");
    assert!(msg.contains("syntax error"), "{msg}");
    assert!(msg.contains("line 2"), "{msg}");
    let e = ChatTemplate::new("{% if x %}never closed", None, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("syntax error"), "{e}");
}

#[test]
fn template_from_hf_dir_variants() {
    let dir = TempDir::new("template-variants");
    // A minimal word-level tokenizer, enough to carry the special tokens.
    let spec = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.0.join("tokenizer.json"), spec.to_string()).unwrap();
    let cfg = |extra: Json| {
        let mut v = serde_json::json!({"bos_token": {"content": "<s>", "special": true}, "eos_token": "</s>"});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        std::fs::write(dir.0.join("tokenizer_config.json"), v.to_string()).unwrap();
    };

    // No template anywhere.
    cfg(serde_json::json!({}));
    let tok = Tokenizer::from_hf_dir(&dir.0).unwrap();
    assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
    assert_eq!(tok.eos_token_ids, vec![1]);
    assert!(ChatTemplate::from_hf_dir(&dir.0, &tok).unwrap().is_none());
    assert_eq!(tok.encode("hello world", true).unwrap(), vec![2, 3]);

    // A list of named templates: "default" is taken.
    cfg(serde_json::json!({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}
    ]}));
    let t = ChatTemplate::from_hf_dir(&dir.0, &tok).unwrap().unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "x")], false).unwrap(),
        "<s>x"
    );

    // As in transformers 5, tokenizer.json's post-processor decides about BOS, not add_bos_token.
    cfg(serde_json::json!({"add_bos_token": true, "chat_template": "{{ eos_token }}"}));
    assert!(!Tokenizer::from_hf_dir(&dir.0).unwrap().add_bos);
    let mut with_bos = spec.clone();
    with_bos["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
    });
    std::fs::write(dir.0.join("tokenizer.json"), with_bos.to_string()).unwrap();
    let tok2 = Tokenizer::from_hf_dir(&dir.0).unwrap();
    assert!(tok2.add_bos && !tok2.add_eos);
    assert_eq!(tok2.encode("hello world", true).unwrap(), vec![0, 2, 3]);
    assert_eq!(tok2.encode("hello world", false).unwrap(), vec![2, 3]);
    assert_eq!(tok2.decode(&[0, 2, 3], true).unwrap(), "hello world");

    // chat_template.jinja wins over tokenizer_config.json.
    std::fs::write(
        dir.0.join("chat_template.jinja"),
        "J{{ messages|length }}\n",
    )
    .unwrap();
    let t = ChatTemplate::from_hf_dir(&dir.0, &tok2).unwrap().unwrap();
    assert_eq!(t.render(&[Message::new("user", "x")], false).unwrap(), "J1");

    // A broken template names its file.
    std::fs::write(dir.0.join("chat_template.jinja"), "{% if %}").unwrap();
    let e = ChatTemplate::from_hf_dir(&dir.0, &tok2)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chat_template.jinja") && e.contains("syntax error"),
        "{e}"
    );

    // An unknown special token names the file and field.
    cfg(serde_json::json!({"pad_token": "<pad>"}));
    let e = Tokenizer::from_hf_dir(&dir.0).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("pad_token"),
        "{e}"
    );
}

#[test]
fn missing_tokenizer_json_is_an_error() {
    let dir = TempDir::new("no-tokenizer");
    match Tokenizer::from_hf_dir(&dir.0) {
        Err(LmError::Missing { path, .. }) => assert_eq!(path, dir.0.join("tokenizer.json")),
        other => panic!("expected LmError::Missing, got {other:?}"),
    }
    std::fs::write(dir.0.join("tokenizer.json"), "{ not json").unwrap();
    let e = Tokenizer::from_hf_dir(&dir.0).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn save_hf_round_trip() {
    let Some(path) = smollm2_gguf_or_skip("save_hf_round_trip") else {
        return;
    };
    let fx = fixture();
    let (tok, tmpl) = smollm2_tokenizer(&path);
    let dir = TempDir::new("save-hf");
    tok.save_hf(&dir.0, Some(&tmpl)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["tokenizer.json", "tokenizer_config.json"],
        "no temporary files left behind"
    );
    let cfg: Json = serde_json::from_str(
        &std::fs::read_to_string(dir.0.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(cfg["eos_token"], "<|im_end|>");
    assert_eq!(cfg["model_max_length"], 8192);

    let tok2 = Tokenizer::from_hf_dir(&dir.0).unwrap();
    let tmpl2 = ChatTemplate::from_hf_dir(&dir.0, &tok2)
        .unwrap()
        .expect("template saved");
    assert_eq!(tmpl2, tmpl);
    assert_eq!(tok2.bos_token, tok.bos_token);
    assert_eq!(tok2.eos_token_ids, tok.eos_token_ids);
    assert_eq!(tok2.pad_token_id, tok.pad_token_id);
    assert_eq!(tok2.unk_token, tok.unk_token);
    assert_eq!((tok2.add_bos, tok2.add_eos), (tok.add_bos, tok.add_eos));
    assert_eq!(tok2.model_max_length, Some(8192));
    assert_eq!(tok2.vocab_size(), tok.vocab_size());
    check_against_fixture(&tok2, &tmpl2, &fx);

    // Saving again over an existing directory works (atomic replace).
    tok2.save_hf(&dir.0, None).unwrap();
    let tok3 = Tokenizer::from_hf_dir(&dir.0).unwrap();
    assert!(ChatTemplate::from_hf_dir(&dir.0, &tok3).unwrap().is_none());
    assert_eq!(
        tok3.encode("Hello, world! 123", true).unwrap(),
        tok.encode("Hello, world! 123", true).unwrap()
    );
}

#[test]
fn gguf_load_smollm2() {
    let Some(path) = smollm2_gguf_or_skip("gguf_load_smollm2") else {
        return;
    };
    let m = Pretrained::load(&path, &Device::Cpu).unwrap();
    let c = &m.config;
    assert_eq!(c.family, Family::Llama);
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100_000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9, "{}", c.rms_norm_eps);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.rope_scaling.is_none());
    assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
    assert_eq!(c.pad_token_id, Some(2));
    assert_eq!(m.eos_token_ids(), vec![2]);
    // 30 layers x 9 tensors + embedding + final norm; no lm_head (tied).
    assert_eq!(m.weights.len(), 30 * 9 + 2);
    assert!(!m.weights.contains_key("lm_head.weight"));
    assert_eq!(
        m.weights["model.layers.0.self_attn.q_proj.weight"].dims(),
        &[576, 576]
    );
    assert_eq!(
        m.weights["model.layers.0.self_attn.k_proj.weight"].dims(),
        &[192, 576]
    );
    assert_eq!(
        m.weights["model.embed_tokens.weight"].dtype(),
        candle_core::DType::F32
    );
    assert_eq!(c.num_parameters(), 134_515_008);
    let tmpl = m
        .chat_template
        .as_ref()
        .expect("GGUF carries a chat template");
    let s = tmpl.render(&[Message::new("user", "Hi")], true).unwrap();
    assert!(
        s.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{s}"
    );
    assert_eq!(m.tokenizer.vocab_size(), 49152);
    assert_eq!(m.source, path);
}

#[test]
fn truncated_gguf_is_an_error() {
    let Some(path) = smollm2_gguf_or_skip("truncated_gguf_is_an_error") else {
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let dir = TempDir::new("truncated");
    // In the header, inside the token list, inside tensor data, one byte short.
    for keep in [10, 200_000, bytes.len() / 2, bytes.len() - 1] {
        let p = dir.0.join(format!("cut{keep}.gguf"));
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let e = match load_gguf(&p, &Device::Cpu) {
            Ok(_) => panic!("a GGUF cut to {keep} bytes loaded"),
            Err(e) => e,
        };
        let msg = e.to_string();
        assert!(
            msg.contains(&p.display().to_string()),
            "error does not name the file: {msg}"
        );
        assert!(
            matches!(e, LmError::BadFile { .. } | LmError::BadField { .. }),
            "{e:?}"
        );
    }
}

#[test]
fn corrupt_gguf_is_an_error() {
    let dir = TempDir::new("corrupt");
    let p = dir.0.join("garbage.gguf");
    std::fs::write(&p, b"this is not a gguf file at all").unwrap();
    let e = gguf_err(&p).to_string();
    assert!(
        e.contains("garbage.gguf") && e.contains("not a valid GGUF"),
        "{e}"
    );
    let missing = dir.0.join("absent.gguf");
    let e = gguf_err(&missing).to_string();
    assert!(e.contains("absent.gguf"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Synthetic GGUF files: exact checks of the weight mapping without the real model.

const H: usize = 16; // hidden
const NH: usize = 2; // heads
const NKV: usize = 1; // kv heads
const HD: usize = 8; // head dim
const FF: usize = 24;
const LAYERS: usize = 2;

fn tiny_tokenizer_meta(model: &str) -> Vec<(String, GV)> {
    let toks = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġab"];
    let strs = |v: &[&str]| GV::Array(v.iter().map(|s| GV::String(s.to_string())).collect());
    vec![
        ("tokenizer.ggml.model".into(), GV::String(model.into())),
        ("tokenizer.ggml.pre".into(), GV::String("default".into())),
        ("tokenizer.ggml.tokens".into(), strs(&toks)),
        (
            "tokenizer.ggml.token_type".into(),
            GV::Array([3, 3, 1, 1, 1, 1, 1].iter().map(|&t| GV::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), strs(&["a b", "Ġ ab"])),
        ("tokenizer.ggml.bos_token_id".into(), GV::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), GV::U32(1)),
        ("tokenizer.ggml.add_bos_token".into(), GV::Bool(true)),
        (
            "tokenizer.chat_template".into(),
            GV::String("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}".into()),
        ),
    ]
}

/// HF-layout weights of a tiny model (deterministic values) and the GGUF tensors made from them.
fn tiny_model(
    arch: &str,
    tied: bool,
    qkv_bias: bool,
) -> (HashMap<String, Tensor>, Vec<(String, Tensor)>) {
    let dev = Device::Cpu;
    let mut seed = 0f32;
    let mut t = |shape: &[usize]| {
        seed += 1.0;
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.37 + seed * 1.3).sin() * 0.5)
            .collect();
        Tensor::from_vec(data, shape, &dev).unwrap()
    };
    let v = 7;
    let mut hf = HashMap::new();
    let mut gg = Vec::new();
    let mut both = |hf_name: String, gg_name: String, w: Tensor, heads: Option<usize>| {
        let stored = match heads {
            Some(n) if arch == "llama" => llama_cpp_permute(&w, n).unwrap(),
            _ => w.clone(),
        };
        hf.insert(hf_name, w);
        gg.push((gg_name, stored));
    };
    both(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        t(&[v, H]),
        None,
    );
    both(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        t(&[H]),
        None,
    );
    if !tied {
        both(
            "lm_head.weight".into(),
            "output.weight".into(),
            t(&[v, H]),
            None,
        );
    }
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        both(
            format!("{p}.self_attn.q_proj.weight"),
            format!("{b}.attn_q.weight"),
            t(&[NH * HD, H]),
            Some(NH),
        );
        both(
            format!("{p}.self_attn.k_proj.weight"),
            format!("{b}.attn_k.weight"),
            t(&[NKV * HD, H]),
            Some(NKV),
        );
        both(
            format!("{p}.self_attn.v_proj.weight"),
            format!("{b}.attn_v.weight"),
            t(&[NKV * HD, H]),
            None,
        );
        if qkv_bias {
            both(
                format!("{p}.self_attn.q_proj.bias"),
                format!("{b}.attn_q.bias"),
                t(&[NH * HD]),
                Some(NH),
            );
            both(
                format!("{p}.self_attn.k_proj.bias"),
                format!("{b}.attn_k.bias"),
                t(&[NKV * HD]),
                Some(NKV),
            );
            both(
                format!("{p}.self_attn.v_proj.bias"),
                format!("{b}.attn_v.bias"),
                t(&[NKV * HD]),
                None,
            );
        }
        both(
            format!("{p}.self_attn.o_proj.weight"),
            format!("{b}.attn_output.weight"),
            t(&[H, NH * HD]),
            None,
        );
        both(
            format!("{p}.mlp.gate_proj.weight"),
            format!("{b}.ffn_gate.weight"),
            t(&[FF, H]),
            None,
        );
        both(
            format!("{p}.mlp.up_proj.weight"),
            format!("{b}.ffn_up.weight"),
            t(&[FF, H]),
            None,
        );
        both(
            format!("{p}.mlp.down_proj.weight"),
            format!("{b}.ffn_down.weight"),
            t(&[H, FF]),
            None,
        );
        both(
            format!("{p}.input_layernorm.weight"),
            format!("{b}.attn_norm.weight"),
            t(&[H]),
            None,
        );
        both(
            format!("{p}.post_attention_layernorm.weight"),
            format!("{b}.ffn_norm.weight"),
            t(&[H]),
            None,
        );
    }
    (hf, gg)
}

fn write_gguf(path: &Path, meta: &[(String, GV)], tensors: &[(String, Tensor)]) {
    let q: Vec<(String, QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).unwrap()))
        .collect();
    let meta_refs: Vec<(&str, &GV)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &t_refs).unwrap();
}

fn arch_meta(arch: &str) -> Vec<(String, GV)> {
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        ("general.architecture".to_string(), GV::String(arch.into())),
        (k("block_count"), GV::U32(LAYERS as u32)),
        (k("context_length"), GV::U32(256)),
        (k("embedding_length"), GV::U32(H as u32)),
        (k("feed_forward_length"), GV::U32(FF as u32)),
        (k("attention.head_count"), GV::U32(NH as u32)),
        (k("attention.head_count_kv"), GV::U32(NKV as u32)),
        (k("rope.freq_base"), GV::F32(50_000.0)),
        (k("attention.layer_norm_rms_epsilon"), GV::F32(1e-6)),
    ];
    m.extend(tiny_tokenizer_meta("gpt2"));
    m
}

fn gguf_err(p: &Path) -> LmError {
    match load_gguf(p, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not have", p.display()),
        Err(e) => e,
    }
}

fn assert_same(a: &Tensor, b: &Tensor, name: &str) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b, "{name}");
}

#[test]
fn synthetic_llama_gguf_undoes_permutation() {
    let dir = TempDir::new("synthetic-llama");
    let p = dir.0.join("tiny.gguf");
    let (hf, gg) = tiny_model("llama", true, false);
    write_gguf(&p, &arch_meta("llama"), &gg);
    let m = load_gguf(&p, &Device::Cpu).unwrap();
    assert_eq!(m.config.family, Family::Llama);
    assert!(m.config.tie_word_embeddings);
    assert_eq!(
        (
            m.config.num_attention_heads,
            m.config.num_key_value_heads,
            m.config.head_dim
        ),
        (NH, NKV, HD)
    );
    assert_eq!(m.config.rope_theta, 50_000.0);
    assert_eq!(m.config.max_position_embeddings, 256);
    assert_eq!(m.config.vocab_size, 7);
    assert_eq!(m.weights.len(), hf.len());
    for (name, w) in &hf {
        assert_same(&m.weights[name], w, name);
    }
    // The permutation really moved q rows in the file (so the check above is not vacuous).
    let stored = &gg
        .iter()
        .find(|(n, _)| n == "blk.0.attn_q.weight")
        .unwrap()
        .1;
    let orig = &hf["model.layers.0.self_attn.q_proj.weight"];
    assert_ne!(
        stored.to_vec2::<f32>().unwrap(),
        orig.to_vec2::<f32>().unwrap()
    );
    // Tokenizer: BPE merges, add_bos_token, special tokens whole.
    assert!(m.tokenizer.add_bos);
    assert_eq!(m.tokenizer.encode("ab ab", true).unwrap(), vec![0, 4, 6]);
    assert_eq!(
        m.tokenizer.encode("<s>ab</s>", false).unwrap(),
        vec![0, 4, 1]
    );
    assert_eq!(m.tokenizer.decode(&[0, 4, 6, 1], true).unwrap(), "ab ab");
    let t = m.chat_template.unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "q")], false).unwrap(),
        "<s>q"
    );
}

#[test]
fn synthetic_qwen2_gguf_is_not_permuted() {
    let dir = TempDir::new("synthetic-qwen2");
    let p = dir.0.join("tiny.gguf");
    let (hf, gg) = tiny_model("qwen2", false, true);
    write_gguf(&p, &arch_meta("qwen2"), &gg);
    let m = load_gguf(&p, &Device::Cpu).unwrap();
    assert_eq!(m.config.family, Family::Qwen2);
    assert!(!m.config.tie_word_embeddings);
    assert!(m.config.qkv_bias && !m.config.o_bias);
    for (name, w) in &hf {
        assert_same(&m.weights[name], w, name);
    }
}

#[test]
fn synthetic_gguf_errors_name_the_field() {
    let dir = TempDir::new("synthetic-errors");
    let (_, gg) = tiny_model("llama", true, false);

    let p = dir.0.join("arch.gguf");
    let mut meta = arch_meta("llama");
    meta[0].1 = GV::String("falcon".into());
    write_gguf(&p, &meta, &gg);
    let e = gguf_err(&p).to_string();
    assert!(
        e.contains("arch.gguf") && e.contains("general.architecture") && e.contains("falcon"),
        "{e}"
    );

    let p = dir.0.join("spm.gguf");
    let mut meta = arch_meta("llama");
    meta.retain(|(k, _)| !k.starts_with("tokenizer."));
    meta.extend(tiny_tokenizer_meta("llama"));
    write_gguf(&p, &meta, &gg);
    let e = gguf_err(&p).to_string();
    assert!(
        e.contains("tokenizer.ggml.model") && e.contains("SentencePiece"),
        "{e}"
    );

    let p = dir.0.join("noheads.gguf");
    let mut meta = arch_meta("llama");
    meta.retain(|(k, _)| k != "llama.attention.head_count");
    write_gguf(&p, &meta, &gg);
    let e = gguf_err(&p).to_string();
    assert!(
        e.contains("llama.attention.head_count") && e.contains("missing"),
        "{e}"
    );

    let p = dir.0.join("pre.gguf");
    let mut meta = arch_meta("llama");
    for (k, v) in meta.iter_mut() {
        if k == "tokenizer.ggml.pre" {
            *v = GV::String("mystery".into());
        }
    }
    write_gguf(&p, &meta, &gg);
    let e = gguf_err(&p).to_string();
    assert!(
        e.contains("tokenizer.ggml.pre") && e.contains("mystery"),
        "{e}"
    );

    // A missing layer tensor is caught by check_weights.
    let p = dir.0.join("missing-tensor.gguf");
    let fewer: Vec<_> = gg
        .iter()
        .filter(|(n, _)| n != "blk.1.ffn_up.weight")
        .cloned()
        .collect();
    write_gguf(&p, &arch_meta("llama"), &fewer);
    let e = gguf_err(&p).to_string();
    assert!(e.contains("model.layers.1.mlp.up_proj.weight"), "{e}");

    // Truncated inside tensor data.
    let good = dir.0.join("good.gguf");
    write_gguf(&good, &arch_meta("llama"), &gg);
    let bytes = std::fs::read(&good).unwrap();
    let p = dir.0.join("cut.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = gguf_err(&p).to_string();
    assert!(e.contains("cut.gguf"), "{e}");
}

/// The point of the un-permutation: llama.cpp applies RoPE to adjacent pairs (2j, 2j+1) of its
/// permuted rows; HF applies it to pairs (j, j + d/2). Both give the same rotated vector, up to the
/// same row permutation, so loading un-permuted weights into a rotate-half RoPE is exact.
#[test]
fn permutation_maps_rotate_half_rope_to_interleaved_rope() {
    let d = 8;
    let n_head = 2;
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1., (n_head * d, 5), &dev).unwrap();
    let x = Tensor::randn(0f32, 1., (5, 1), &dev).unwrap();
    let pos = 3.0f32;
    let theta = |j: usize| pos * 10_000f32.powf(-2.0 * j as f32 / d as f32);

    // HF: q = W x, rotate-half RoPE per head.
    let q: Vec<f32> = w
        .matmul(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut hf = q.clone();
    for h in 0..n_head {
        for j in 0..d / 2 {
            let (a, b) = (q[h * d + j], q[h * d + j + d / 2]);
            let (s, c) = theta(j).sin_cos();
            hf[h * d + j] = a * c - b * s;
            hf[h * d + j + d / 2] = b * c + a * s;
        }
    }
    // llama.cpp: q' = permute(W) x, interleaved RoPE per head.
    let wp = llama_cpp_permute(&w, n_head).unwrap();
    let qp: Vec<f32> = wp
        .matmul(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut cpp = qp.clone();
    for h in 0..n_head {
        for j in 0..d / 2 {
            let (a, b) = (qp[h * d + 2 * j], qp[h * d + 2 * j + 1]);
            let (s, c) = theta(j).sin_cos();
            cpp[h * d + 2 * j] = a * c - b * s;
            cpp[h * d + 2 * j + 1] = b * c + a * s;
        }
    }
    // Un-permuting llama.cpp's result gives HF's.
    let back =
        llama_cpp_unpermute(&Tensor::from_vec(cpp, n_head * d, &dev).unwrap(), n_head).unwrap();
    for (a, b) in back.to_vec1::<f32>().unwrap().iter().zip(&hf) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // And the permutation is a bijection that the inverse undoes.
    let round = llama_cpp_unpermute(&wp, n_head).unwrap();
    assert_same(&round, &w, "unpermute(permute(w))");
}
