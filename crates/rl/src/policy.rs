//! The model being trained, with its tokenizer and template, and the helpers every method needs to
//! turn text into token ids the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rlhf_lm::config::{Family, LlamaConfig};
use rlhf_lm::llama::{random_weights, Llama, QuantizedWeights, Trainable};
use rlhf_lm::lora::{is_lora_tensor, Adapters, Dropout, LoraConfig};
use rlhf_lm::pretrained::{
    save_hf_with, write_dir_atomic, write_generation_config, GenerationDefaults, SaveExtras,
};
use rlhf_lm::Result;
use rlhf_lm::{ChatTemplate, Pretrained, Tokenizer};

/// A language model whose parameters are `Var`s (plus any extra heads stored beside them). With
/// LoRA ([`TrainableLm::enable_lora`]) the decoder's weights are frozen and `params` holds only the
/// adapters (and any extra head), so the optimiser, its state and checkpoints cover just those.
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
    /// Where the weights came from (an adapter's `base_model_name_or_path`).
    pub source: PathBuf,
    /// LoRA: the frozen base and the adapters' settings (`None`: every parameter trains).
    pub lora: Option<LoraState>,
}

/// The frozen side of a LoRA run.
pub struct LoraState {
    pub config: LoraConfig,
    /// The decoder's weights, frozen (shared with every model built, never copied).
    pub frozen: HashMap<String, Tensor>,
    /// The starting values of the decoder weights `modules_to_save` trains whole (a copy: the
    /// reference policy reads them).
    pub initial: HashMap<String, Tensor>,
    /// Adapter dropout while training (its mask counter shared by the models built).
    pub dropout: Option<Dropout>,
    /// The projections kept quantised (`lora.quantize_base`), out of `frozen`.
    pub quantized: QuantizedWeights,
}

impl TrainableLm {
    /// Every weight trainable; an adapter directory's adapter is merged into its base first.
    pub fn from_pretrained(p: Pretrained) -> Result<Self> {
        let eos_ids = p.eos_token_ids();
        let pad_id = p.pad_id();
        Ok(TrainableLm {
            params: Trainable::new(&p.merged_weights()?)?,
            source: p.source.clone(),
            lora: None,
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
        let dropout = self.lora.as_ref().and_then(|l| l.dropout.clone());
        let model = self.build(self.params.tensors(), dropout, device)?;
        Ok(model.with_gradient_checkpointing(checkpoint))
    }

    /// A frozen model of the weights as they are now, unaffected by later training: a deep copy
    /// of what trains (with LoRA only the adapters; the frozen base is shared).
    pub fn frozen_model(&self, device: &Device) -> Result<Llama> {
        self.build(self.snapshot()?, None, device)
    }

    /// A model over `trained` (the `Var`s themselves or a copy of them): with LoRA, the adapters
    /// among them on the frozen (or quantised) base, with `dropout`.
    fn build(
        &self,
        trained: HashMap<String, Tensor>,
        dropout: Option<Dropout>,
        device: &Device,
    ) -> Result<Llama> {
        let Some(l) = &self.lora else {
            return Llama::from_weights(&self.config, &trained, device);
        };
        let (adapters, mut weights): (HashMap<_, _>, HashMap<_, _>) =
            trained.into_iter().partition(|(n, _)| is_lora_tensor(n));
        weights.extend(l.frozen.iter().map(|(n, t)| (n.clone(), t.clone())));
        let adapters = Adapters {
            tensors: adapters,
            scale: l.config.scale(),
            dropout,
        };
        Llama::from_parts(
            &self.config,
            &weights,
            Some(&adapters),
            &l.quantized,
            device,
        )
    }

    /// The frozen reference policy: the initial weights. With LoRA, the base model with adapters
    /// off (the frozen weights themselves, no copy); otherwise a deep copy of the current weights,
    /// so take it before training moves them.
    pub fn reference_model(&self, device: &Device) -> Result<Llama> {
        match &self.lora {
            Some(l) => {
                let mut weights = l.frozen.clone();
                weights.extend(l.initial.iter().map(|(n, t)| (n.clone(), t.clone())));
                Llama::from_parts(&self.config, &weights, None, &l.quantized, device)
            }
            None => Llama::from_weights(&self.config, &self.snapshot()?, device),
        }
    }

    /// Train LoRA adapters instead of every weight (`lora.r = 0`: nothing changes). The decoder's
    /// weights become frozen (shared, not copied); any extra head (a reward or value model's
    /// `score.weight`) keeps training, as `peft`'s `modules_to_save`. Adapters start as `peft`
    /// initialises them, drawn from `seed`.
    pub fn enable_lora(&mut self, lora: &LoraConfig, seed: u64) -> Result<()> {
        if !lora.enabled() {
            return Ok(());
        }
        lora.validate()
            .map_err(|e| rlhf_lm::LmError::Invalid(format!("lora: {e}")))?;
        if self.lora.is_some() {
            return Err(rlhf_lm::LmError::Invalid(
                "lora: adapters are already on".into(),
            ));
        }
        let device = self.device();
        let decoder: std::collections::HashSet<String> =
            rlhf_lm::pretrained::expected_shapes(&self.config)
                .into_iter()
                .map(|(n, _)| n)
                .collect();
        let whole = lora.saved_weights(&self.config);
        let mut frozen = HashMap::new();
        let mut initial = HashMap::new();
        let mut trained = HashMap::new();
        for (name, var) in std::mem::take(&mut self.params.vars) {
            let t = var.as_tensor().detach();
            if decoder.contains(&name) && !whole.contains(&name.as_str()) {
                frozen.insert(name, t);
            } else {
                if decoder.contains(&name) {
                    initial.insert(name.clone(), t.copy()?);
                }
                trained.insert(name, t);
            }
        }
        trained.extend(rlhf_lm::lora::init_adapters(
            &self.config,
            lora,
            rlhf_train::rng::stream_seed(seed, "lora"),
            &device,
        )?);
        self.params = Trainable::new(&trained)?;
        let quantized = match lora.base_dtype().map_err(rlhf_lm::LmError::Invalid)? {
            None => QuantizedWeights::new(),
            Some(dtype) => {
                let (q, before, after) = rlhf_lm::lora::quantize_projections(&mut frozen, dtype)?;
                eprintln!(
                    "lora: base projections kept as {} ({} tensors): {:.1} MiB -> {:.1} MiB",
                    lora.quantize_base,
                    q.len(),
                    before as f64 / 1048576.0,
                    after as f64 / 1048576.0
                );
                q
            }
        };
        let dropout = (lora.dropout > 0.0).then(|| Dropout {
            p: lora.dropout,
            seed: rlhf_train::rng::stream_seed(seed, "lodr"),
            draws: Default::default(),
        });
        self.lora = Some(LoraState {
            config: lora.clone(),
            frozen,
            initial,
            dropout,
            quantized,
        });
        Ok(())
    }

    /// Every weight of the model as it stands (with LoRA: the adapters merged into a copy of the
    /// base), e.g. to save a full model or start another from it.
    pub fn full_weights(&self) -> Result<HashMap<String, Tensor>> {
        match &self.lora {
            None => self.snapshot(),
            Some(l) => {
                let (adapters, heads): (HashMap<_, _>, HashMap<_, _>) = self
                    .snapshot()?
                    .into_iter()
                    .partition(|(n, _)| is_lora_tensor(n));
                let mut base = l.frozen.clone();
                for (n, q) in &l.quantized {
                    base.insert(n.clone(), q.dequantize(&self.device())?);
                }
                let mut merged = rlhf_lm::lora::merge(&base, &adapters, l.config.scale())?;
                merged.extend(heads);
                Ok(merged)
            }
        }
    }

    /// Parameters the optimiser steps (all of them, or the adapters and heads with LoRA).
    pub fn trainable_parameters(&self) -> usize {
        self.params.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Gradient checkpointing for the models [`TrainableLm::model`] builds from now on (gradients
    /// must then come from `rlhf_lm::llama::backward`, as in every training loop here).
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.gradient_checkpointing
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A frozen deep copy of what trains: every weight, or with LoRA the adapters and any head
    /// (what a checkpoint holds and [`TrainableLm::load_weights`] puts back). For a model's full
    /// weights see [`TrainableLm::full_weights`].
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.params.snapshot()
    }

    /// Write the model: a Hugging Face directory, or with LoRA a `peft` adapter directory
    /// (`adapter_config.json`, `adapter_model.safetensors`, tokenizer, generation defaults) whose
    /// `base_model_name_or_path` is the model it was trained from.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_with(dir, &SaveExtras::default())
    }

    /// [`TrainableLm::save`] with extra files and config fields (a reward model's). An adapter
    /// directory has no `config.json` of its own: the config fields then go nowhere; `peft`'s
    /// `task_type` says SEQ_CLS for a model with a scalar head.
    pub fn save_with(&self, dir: &Path, extras: &SaveExtras) -> Result<()> {
        let Some(l) = &self.lora else {
            return save_hf_with(
                dir,
                &self.config,
                &self.params.snapshot()?,
                &self.tokenizer,
                self.chat_template.as_ref(),
                &self.generation,
                extras,
            );
        };
        let tensors = self.snapshot()?;
        let task = if tensors.contains_key("score.weight") {
            "SEQ_CLS"
        } else {
            "CAUSAL_LM"
        };
        let base = std::fs::canonicalize(&self.source).unwrap_or_else(|_| self.source.clone());
        write_dir_atomic(dir, |tmp| {
            rlhf_lm::lora::save_adapter(
                tmp,
                &l.config,
                &tensors,
                &base.to_string_lossy(),
                task,
                self.config.tie_word_embeddings,
            )?;
            self.tokenizer.save_hf(tmp, self.chat_template.as_ref())?;
            write_generation_config(tmp, &self.config, &self.generation)?;
            for (file, contents) in &extras.files {
                let p = tmp.join(file);
                std::fs::write(&p, contents).map_err(|e| rlhf_lm::LmError::io(&p, e))?;
            }
            Ok(())
        })
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
        source: PathBuf::from("fresh-tiny"),
        lora: None,
    })
}
