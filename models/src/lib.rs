//! Quantized LLM inference for Tessera nodes, on candle: the model catalogue and its
//! fetcher, GGUF loading, tokenizers and chat templates rebuilt from GGUF metadata, the
//! sampler, and an engine that streams text and commits to its transcript.

pub mod batch;
pub mod bench;
pub mod catalog;
pub mod chat;
pub mod engine;
pub mod fetch;
pub mod gemma3;
pub mod gguf;
pub mod kernels;
pub mod llama;
pub mod numerics;
pub mod requant;
pub mod sampler;
mod serving;
#[doc(hidden)]
pub mod test_support;
pub mod text;
pub mod tokenizer;
pub mod verify;
pub mod verify_bench;

pub use batch::{BatchConfig, StatsSnapshot, ThreadPolicy};
pub use catalog::{CatalogEntry, CATALOG};
pub use chat::{ChatError, ChatMessage, ChatTemplate};
pub use engine::{
    Completion, Engine, EngineHandle, EventStream, GenerateError, GenerateEvent, GenerateRequest,
    Model, ModelInfo, Prompt, ReplayRequest, Replayed, Timings, MAX_STOP_BYTES, MAX_STOP_SEQUENCES,
};
pub use fetch::{fetch, FetchError, FetchOptions, FetchProgress};
pub use gguf::{resolve, Architecture, Backend, LoadError, ModelFile, ResolvedModel};
pub use tokenizer::{Tokenizer, TokenizerError};

use std::path::Path;

/// Resolves a model name (alias or path) and loads it, checking catalogue files' hashes.
pub fn load(name: &str, home: &Path) -> Result<Model, LoadError> {
    load_with(name, home, Backend::default())
}

/// [`load`] with a chosen implementation.
pub fn load_with(name: &str, home: &Path, backend: Backend) -> Result<Model, LoadError> {
    let resolved = resolve(name, home)?;
    Model::load_with(&resolved.path, name, resolved.entry, backend)
}
