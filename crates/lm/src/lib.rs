//! The model core: a Llama-family decoder in candle that loads real models, trains, scores and
//! generates. Everything above it (data, rollouts, algorithms, the CLI) goes through this crate.

pub mod attention;
pub mod batch;
pub mod chat;
pub mod config;
pub mod episode;
pub mod error;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod kv_cache;
pub mod llama;
pub mod lora;
pub mod math;
pub mod ops;
pub mod pretrained;
pub mod score;
pub mod skinny;
pub mod testing;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use config::{Family, LlamaConfig};
pub use episode::{Episode, Role, Span};
pub use error::{LmError, Result};
pub use pretrained::Pretrained;
pub use tokenizer::Tokenizer;

/// Set the number of CPU threads for matrix multiplies and rayon work. Call before any tensor work.
/// On 2 cores, one thread decodes small batches faster than two (synchronisation dominates).
pub fn set_threads(n: usize) {
    let n = n.max(1).to_string();
    std::env::set_var("RAYON_NUM_THREADS", &n);
    std::env::set_var("CANDLE_NUM_THREADS", &n);
}

/// The machine's available cores.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
