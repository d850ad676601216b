//! The model core: a Llama-family decoder in candle that loads real models, trains, scores and
//! generates. Everything above it (data, rollouts, algorithms, the CLI) goes through this crate.

pub mod batch;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod ops;
pub mod pretrained;
pub mod score;
pub mod testing;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use config::{Family, LlamaConfig};
pub use error::{LmError, Result};
pub use pretrained::Pretrained;
pub use tokenizer::Tokenizer;
