//! `rlhf generate`, `rlhf score`, `rlhf info`: the model core from the command line.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use rlhf_data::jsonl;
use rlhf_lm::generate::{generate as sample, SamplingParams};
use rlhf_lm::score::{encode_pair, score_pairs};
use rlhf_lm::{Message, Pretrained};

#[derive(Args)]
pub struct GenerateArgs {
    /// An HF model directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Treat each prompt as a user message and render it with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// One prompt.
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A JSONL file with `prompt` (text) or `messages` (chat) on each line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Prompts per generation batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print one JSON object per prompt instead of plain text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL with `prompt` and `completion` on each line (`prompt` may be a list of messages).
    #[arg(long)]
    pub data: PathBuf,
    /// Render text prompts as a user message with the chat template (generation prompt added).
    #[arg(long)]
    pub chat: bool,
    /// Output file (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

#[derive(Args)]
pub struct InfoArgs {
    #[arg(long)]
    pub model: PathBuf,
}

#[derive(Args)]
pub struct MergeArgs {
    /// A `peft` LoRA adapter directory (its adapter_config.json names the base model).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Where to write the merged Hugging Face model directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// `rlhf merge`: W + s·B·A for every adapted projection, written as a plain HF directory (a
/// reward model's adapter gives a reward model, with its head and normalisation).
pub fn merge(a: MergeArgs, device: &Device) -> Result<()> {
    let p = load(&a.adapter, device)?;
    let Some(adapter) = &p.adapter else {
        bail!(
            "{}: not a LoRA adapter directory (no {})",
            a.adapter.display(),
            rlhf_lm::lora::ADAPTER_CONFIG
        );
    };
    let (r, alpha) = (adapter.config.r, adapter.config.lora_alpha);
    let lm = rlhf_rl::policy::TrainableLm::from_pretrained(p)?;
    if lm
        .params
        .vars
        .iter()
        .any(|(n, _)| n == rlhf_rl::reward::HEAD)
    {
        let norm = rlhf_rl::reward::read_norm(&a.adapter)?;
        rlhf_rl::reward::save(&lm, norm, &a.out)?;
    } else {
        lm.save(&a.out)?;
    }
    eprintln!(
        "merged the adapter (r = {r}, alpha = {alpha}) into {}",
        a.out.display()
    );
    Ok(())
}

fn load(path: &std::path::Path, device: &Device) -> Result<Pretrained> {
    Ok(Pretrained::load(path, device)?)
}

/// The prompt text a line or argument stands for, rendered with the chat template where asked.
fn prompt_text(
    model: &Pretrained,
    text: Option<String>,
    messages: Option<Vec<Message>>,
    chat: bool,
    system: Option<&str>,
) -> Result<String> {
    match (text, messages) {
        (_, Some(messages)) => Ok(model.render_chat(&messages, true)?),
        (Some(text), None) if chat => {
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(Message {
                    role: "system".into(),
                    content: s.into(),
                });
            }
            messages.push(Message {
                role: "user".into(),
                content: text,
            });
            Ok(model.render_chat(&messages, true)?)
        }
        (Some(text), None) => Ok(text),
        (None, None) => bail!("no prompt"),
    }
}

pub fn generate(a: GenerateArgs, device: &Device) -> Result<()> {
    let model = load(&a.model, device)?;
    let mut prompts: Vec<String> = Vec::new();
    if let Some(p) = a.prompt.clone() {
        if p.is_empty() {
            bail!("--prompt: empty prompt");
        }
        prompts.push(prompt_text(
            &model,
            Some(p),
            None,
            a.chat,
            a.system.as_deref(),
        )?);
    } else if let Some(file) = &a.prompts {
        for line in jsonl::read(file)? {
            let (text, messages) = if line.has("messages") {
                (None, Some(line.messages("messages")?))
            } else {
                let t = line.string("prompt")?;
                if t.is_empty() {
                    bail!(
                        "{}:{}: field `prompt`: empty prompt",
                        file.display(),
                        line.line
                    );
                }
                (Some(t), None)
            };
            prompts.push(prompt_text(
                &model,
                text,
                messages,
                a.chat,
                a.system.as_deref(),
            )?);
        }
    } else {
        bail!("give --prompt TEXT or --prompts FILE.jsonl");
    }
    let params = SamplingParams {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop_strings: a.stop.clone(),
        eos_token_ids: model.eos_token_ids(),
    };
    let llama = model.model(device)?;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| model.tokenizer.encode(p, true))
        .collect::<rlhf_lm::Result<_>>()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for (chunk_no, chunk) in ids.chunks(a.batch_size.max(1)).enumerate() {
        let samples = sample(
            &llama,
            chunk,
            model.pad_id(),
            &params,
            Some(&model.tokenizer),
        )?;
        for (i, s) in samples.iter().enumerate() {
            let text = model.tokenizer.decode(&s.tokens, true)?;
            if a.json {
                let idx = chunk_no * a.batch_size.max(1) + i;
                let v = serde_json::json!({
                    "prompt": prompts[idx], "completion": text, "num_tokens": s.tokens.len(),
                    "finish_reason": s.finish, "sum_logprob": s.logprobs.iter().map(|&x| x as f64).sum::<f64>(),
                });
                writeln!(out, "{v}")?;
            } else {
                writeln!(out, "{text}")?;
            }
        }
    }
    Ok(())
}

pub fn score(a: ScoreArgs, device: &Device) -> Result<()> {
    let model = load(&a.model, device)?;
    let lines = jsonl::read(&a.data)?;
    let mut pairs = Vec::with_capacity(lines.len());
    for line in &lines {
        let prompt = if matches!(line.value.get("prompt"), Some(serde_json::Value::Array(_))) {
            prompt_text(&model, None, Some(line.messages("prompt")?), true, None)?
        } else {
            let t = line.string("prompt")?;
            if t.is_empty() {
                bail!(
                    "{}:{}: field `prompt`: empty prompt",
                    a.data.display(),
                    line.line
                );
            }
            prompt_text(&model, Some(t), None, a.chat, None)?
        };
        let completion = line.string("completion")?;
        let pair = encode_pair(&model.tokenizer, &prompt, &completion)
            .with_context(|| format!("{}:{}", a.data.display(), line.line))?;
        pairs.push(pair);
    }
    let llama = model.model(device)?;
    let scored = score_pairs(&llama, &pairs, model.pad_id(), a.batch_size, 1.0)?;
    let mut sink: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("{}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    for lp in scored {
        let sum: f64 = lp.iter().map(|&x| x as f64).sum();
        let v = serde_json::json!({ "completion_logprobs": lp, "sum_logprob": sum, "num_tokens": lp.len() });
        writeln!(sink, "{v}")?;
    }
    sink.flush()?;
    Ok(())
}

pub fn info(a: InfoArgs, device: &Device) -> Result<()> {
    let model = load(&a.model, device)?;
    let c = &model.config;
    println!("source:        {}", model.source.display());
    println!(
        "architecture:  {} ({:?})",
        c.family.architecture(),
        c.family
    );
    println!(
        "parameters:    {} ({:.1} M)",
        c.num_parameters(),
        c.num_parameters() as f64 / 1e6
    );
    println!(
        "layers:        {}  hidden {}  intermediate {}  heads {} (kv {})  head_dim {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    println!(
        "rope:          theta {}  scaling {:?}",
        c.rope_theta,
        c.rope_scaling.as_ref().map(|s| &s.rope_type)
    );
    println!("context:       {}", c.max_position_embeddings);
    if let Some(ad) = &model.adapter {
        let c = &ad.config;
        println!(
            "LoRA adapter:  r {}  alpha {}  scale {:.4}{}  targets {}  on {}",
            c.r,
            c.lora_alpha,
            ad.scale(),
            if c.use_rslora { " (rsLoRA)" } else { "" },
            c.target_modules,
            c.base_model_name_or_path.as_deref().unwrap_or("?")
        );
    }
    println!("tied embeddings: {}", c.tie_word_embeddings);
    let t = &model.tokenizer;
    println!(
        "tokenizer:     vocab {}  bos {:?}  eos {:?}  pad {:?} (id {})",
        t.vocab_size(),
        t.bos_token,
        t.eos_token,
        t.pad_token,
        model.pad_id()
    );
    println!("eos ids:       {:?}", model.eos_token_ids());
    match &model.chat_template {
        Some(tpl) => {
            let sample = tpl.render(
                &[Message {
                    role: "user".into(),
                    content: "Hi".into(),
                }],
                true,
            )?;
            println!(
                "chat template: {} chars; renders a user turn as {:?}",
                tpl.source.len(),
                sample
            );
        }
        None => println!("chat template: none"),
    }
    Ok(())
}
