//! The model being trained, with its tokenizer and template, and the helpers every method needs to
//! turn text into token ids the same way.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rlhf_lm::config::{Family, LlamaConfig};
use rlhf_lm::llama::{random_weights, Llama, Trainable};
use rlhf_lm::pretrained::{save_hf, GenerationDefaults};
use rlhf_lm::Result;
use rlhf_lm::{ChatTemplate, Pretrained, Tokenizer};

/// A language model whose parameters are `Var`s (plus any extra heads stored beside them).
pub struct TrainableLm {
    pub config: LlamaConfig,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation: GenerationDefaults,
    pub params: Trainable,
    pub eos_ids: Vec<u32>,
    pub pad_id: u32,
    /// Whether [`TrainableLm::model`] builds models that recompute their layers in backward.
    pub gradient_checkpointing: std::sync::atomic::AtomicBool,
}

impl TrainableLm {
    pub fn from_pretrained(p: Pretrained) -> Result<Self> {
        let eos_ids = p.eos_token_ids();
        let pad_id = p.pad_id();
        Ok(TrainableLm {
            params: Trainable::new(&p.weights)?,
            config: p.config,
            tokenizer: p.tokenizer,
            chat_template: p.chat_template,
            generation: p.generation,
            eos_ids,
            pad_id,
            gradient_checkpointing: Default::default(),
        })
    }

    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::from_pretrained(Pretrained::load(path, device)?)
    }

    /// Where the parameters live.
    pub fn device(&self) -> Device {
        self.params
            .vars
            .first()
            .map(|(_, v)| v.device().clone())
            .expect("a model has parameters")
    }

    /// A model whose forward pass records gradients for the parameters.
    pub fn model(&self, device: &Device) -> Result<Llama> {
        let checkpoint = self
            .gradient_checkpointing
            .load(std::sync::atomic::Ordering::Relaxed);
        Ok(
            Llama::from_weights(&self.config, &self.params.tensors(), device)?
                .with_gradient_checkpointing(checkpoint),
        )
    }

    /// Gradient checkpointing for the models [`TrainableLm::model`] builds from now on (gradients
    /// must then come from `rlhf_lm::llama::backward`, as in every training loop here).
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.gradient_checkpointing
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A frozen deep copy of the current weights (e.g. the reference policy).
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.params.snapshot()
    }

    /// Write the current weights as a Hugging Face directory.
    pub fn save(&self, dir: &Path) -> Result<()> {
        save_hf(
            dir,
            &self.config,
            &self.params.snapshot()?,
            &self.tokenizer,
            self.chat_template.as_ref(),
            &self.generation,
        )
    }

    /// Replace every parameter's value (checkpoint resume).
    pub fn load_weights(&self, weights: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.params.vars {
            let t = weights
                .get(name)
                .ok_or_else(|| rlhf_lm::LmError::Invalid(format!("checkpoint lacks `{name}`")))?;
            var.set(t)?;
        }
        Ok(())
    }

    /// Prompt and completion ids, TRL's way (prompt with special tokens, completion without),
    /// ended at EOS (see [`TrainableLm::end_at_eos`]), and the completion cut so the whole row
    /// fits `max_len` (the prompt is kept whole and its front cut only if it alone is too long).
    pub fn encode(
        &self,
        prompt: &str,
        completion: &str,
        add_eos: bool,
        max_len: usize,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let (mut p, mut c) = rlhf_lm::score::encode_pair(&self.tokenizer, prompt, completion)?;
        self.end_at_eos(&mut c, add_eos);
        truncate_pair(&mut p, &mut c, max_len);
        Ok((p, c))
    }

    /// A preference pair under ONE prompt: the prompt encoded once, both completions ended at
    /// EOS, then cut together by [`truncate_shared`] so prompt + chosen and prompt + rejected
    /// each fit `max_len`.
    pub fn encode_shared(
        &self,
        prompt: &str,
        chosen: &str,
        rejected: &str,
        add_eos: bool,
        max_len: usize,
    ) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
        let (mut p, mut c) = rlhf_lm::score::encode_pair(&self.tokenizer, prompt, chosen)?;
        let mut r = self.tokenizer.encode(rejected, false)?;
        self.end_at_eos(&mut c, add_eos);
        self.end_at_eos(&mut r, add_eos);
        truncate_shared(&mut p, &mut c, &mut r, max_len, &self.eos_ids);
        Ok((p, c, r))
    }

    /// No token after the first EOS is trained or scored: a completion is cut right after its
    /// first EOS id (a chat-rendered reply already ends with the template's end-of-turn token,
    /// often followed by a newline), and, when `add_eos`, EOS is appended only if it has none.
    /// A rollout ends at its first EOS the same way, so a reward model reads its score at the
    /// same position in training and in rollouts.
    pub fn end_at_eos(&self, completion: &mut Vec<u32>, add_eos: bool) {
        match completion.iter().position(|t| self.eos_ids.contains(t)) {
            Some(i) => completion.truncate(i + 1),
            None => {
                if add_eos {
                    if let Some(&eos) = self.eos_ids.first() {
                        completion.push(eos);
                    }
                }
            }
        }
    }

    pub fn encode_prompt(&self, prompt: &str, max_len: usize) -> Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(prompt, true)?;
        if ids.is_empty() {
            return Err(rlhf_lm::LmError::Invalid("empty prompt".into()));
        }
        if ids.len() > max_len {
            ids.drain(..ids.len() - max_len);
        }
        Ok(ids)
    }
}

/// Keep at least one completion token and the end of the prompt.
pub fn truncate_pair(prompt: &mut Vec<u32>, completion: &mut Vec<u32>, max_len: usize) {
    let max_len = max_len.max(2);
    if prompt.len() + completion.len() <= max_len {
        return;
    }
    let keep_prompt = prompt
        .len()
        .min(max_len - completion.len().min(max_len / 2).max(1));
    prompt.drain(..prompt.len() - keep_prompt);
    completion.truncate(max_len - prompt.len());
}

/// Cut a preference pair so that prompt + chosen and prompt + rejected each fit `max_len`, with
/// the same prompt ids for both (TRL's `truncate_tokens`): the prompt's front is cut only as far
/// as the longer completion needs (keeping at least half of `max_len` for completions when the
/// prompt is long), then both completions are cut to the room left. Where either completion is
/// cut it loses its EOS, and then the other one's final EOS (an id in `eos_ids`) is dropped too, so
/// truncation never leaves EOS on one side only. (TRL keeps the EOS of the side that fits; we
/// drop it, so neither side's log-ratio has an end-of-sequence term the other lacks.) A
/// completion that is only EOS keeps it (an empty completion would score nothing).
pub fn truncate_shared(
    prompt: &mut Vec<u32>,
    chosen: &mut Vec<u32>,
    rejected: &mut Vec<u32>,
    max_len: usize,
    eos_ids: &[u32],
) {
    let max_len = max_len.max(2);
    let longest = chosen.len().max(rejected.len());
    if prompt.len() + longest <= max_len {
        return;
    }
    let keep_prompt = prompt.len().min(max_len - longest.min(max_len / 2).max(1));
    prompt.drain(..prompt.len() - keep_prompt);
    let room = max_len - prompt.len();
    if longest <= room {
        return;
    }
    chosen.truncate(room);
    rejected.truncate(room);
    for side in [chosen, rejected] {
        if side.len() > 1 && side.last().is_some_and(|t| eos_ids.contains(t)) {
            side.pop();
        }
    }
}

/// The built-in testbed's tiny model: the same architecture as the real ones, only small.
pub fn tiny_config(vocab_size: usize) -> LlamaConfig {
    LlamaConfig {
        family: Family::Llama,
        vocab_size,
        hidden_size: 128,
        intermediate_size: 344,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: Some(0),
        sliding_window: None,
    }
}

/// A freshly initialised tiny model for a tokenizer (normal(0, 0.02) like HF's initialiser).
pub fn fresh_tiny(tokenizer: Tokenizer, seed: u64, device: &Device) -> Result<TrainableLm> {
    fresh_tiny_with_std(tokenizer, seed, 0.02, device)
}

/// [`fresh_tiny`] with weights drawn from normal(0, `std`).
pub fn fresh_tiny_with_std(
    tokenizer: Tokenizer,
    seed: u64,
    std: f64,
    device: &Device,
) -> Result<TrainableLm> {
    let config = tiny_config(tokenizer.vocab_size());
    let weights = random_weights(&config, seed, std, device)?;
    let pad_id = tokenizer.pad_token_id.unwrap_or(0);
    let eos_ids = tokenizer.eos_token_ids.clone();
    Ok(TrainableLm {
        params: Trainable::new(&weights)?,
        config,
        tokenizer,
        chat_template: None,
        generation: GenerationDefaults::default(),
        eos_ids,
        pad_id,
        gradient_checkpointing: Default::default(),
    })
}
