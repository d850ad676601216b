use candle_core::Device;
#[test]
fn dump() {
    let p = rlhf_lm::testing::smollm2_gguf().unwrap();
    let m = rlhf_lm::gguf::load_gguf(&p, &Device::Cpu).unwrap();
    m.tokenizer.save_hf(std::path::Path::new("/tmp/smol_hf"), m.chat_template.as_ref()).unwrap();
    let mut out = std::collections::HashMap::new();
    for n in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.29.self_attn.k_proj.weight", "model.layers.3.self_attn.v_proj.weight", "model.embed_tokens.weight", "model.norm.weight", "model.layers.5.mlp.down_proj.weight"] {
        out.insert(n.to_string(), m.weights[n].clone());
    }
    candle_core::safetensors::save(&out, "/tmp/smol_dump.safetensors").unwrap();
    for t in ["/tmp/cut.gguf"] { let b = std::fs::read(&p).unwrap(); std::fs::write(t, &b[..b.len()/2]).unwrap();
      match rlhf_lm::gguf::load_gguf(std::path::Path::new(t), &Device::Cpu) { Err(e) => eprintln!("ERR1: {e}"), Ok(_) => panic!() } 
      std::fs::write(t, &b[..200000]).unwrap();
      match rlhf_lm::gguf::load_gguf(std::path::Path::new(t), &Device::Cpu) { Err(e) => eprintln!("ERR2: {e}"), Ok(_) => panic!() } }
    eprintln!("ERR3: {}", rlhf_lm::ChatTemplate::new("{% for m in messages %}\n{{ m.content }\n{% endfor %}", None, None).unwrap_err());
    eprintln!("ERR4: {}", rlhf_lm::ChatTemplate::new("{{ raise_exception('boom') }}", None, None).unwrap().render(&[], false).unwrap_err());
    eprintln!("ERR5: {}", rlhf_lm::Tokenizer::from_hf_dir(std::path::Path::new("/tmp")).unwrap_err());
}
