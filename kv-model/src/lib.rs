//! Llama-family language models from GGUF files, generating text with or without a KV
//! cache: the end-to-end user of the kv workspace.
//!
//! - [`Model`]: weights (GGUF blocks or f32, see [`WeightFormat`]), RoPE, RMSNorm, SwiGLU; a forward
//!   pass over a [`kv_attention::PagedCache`] on any [`kv_core::CacheBackend`], and an
//!   independent forward pass that stores nothing.
//! - [`Tokenizer`]: the SentencePiece or byte-level BPE stored in the file, and its
//!   Jinja [`ChatTemplate`].
//! - [`ChatSession`]: a multi-turn conversation that keeps its cache between turns and
//!   prefills only what the cache does not hold (`kv chat`).
//! - [`Sampler`]: greedy, temperature, top-k, top-p, seeded.
//! - [`Model::generate`] / [`Model::generate_uncached`]: the two generation loops and the
//!   [`Summary`] of what each cost.
//! - [`batch`]: many sequences at once, a ragged batched forward pass, continuous batching
//!   with prefix reuse and preemption ([`Model::generate_batch`], `kv batch`).
//! - [`window`]: StreamingLLM's sliding window with attention sinks, for sequences longer
//!   than the context in a cache of fixed size ([`Model::forward_windowed`]).
//! - [`ppl`]: perplexity with the KV cache in each layout, scored like llama.cpp
//!   (`kv ppl`).
//! - Hostile input: [`check_gguf_bytes`] / [`check_gguf_file`] walk a GGUF header with
//!   bounded reads before candle parses it, [`LlamaConfig::from_metadata`] bounds every
//!   size by [`MetadataLimits`], [`open_regular`] opens only regular files, and weights
//!   that are NaN or infinite are reported as [`ModelError::NonFiniteWeights`].
//!
//! ```no_run
//! use kv_backend_cpu::CpuBackend;
//! use kv_model::{CacheLayout, GenerateOptions, Model, Tokenizer};
//!
//! let path = kv_model::default_model_path();
//! let model = Model::load(&path)?;
//! let tokenizer = Tokenizer::from_gguf_file(&path)?;
//! let chat = tokenizer.chat_template().expect("an instruct model");
//! let prompt = tokenizer.encode(&chat.render("Why is the sky blue?")?)?;
//! let options = GenerateOptions {
//!     max_tokens: 64,
//!     stop_tokens: tokenizer.stop_tokens().to_vec(),
//!     ..GenerateOptions::default()
//! };
//! let mut text = tokenizer.stream();
//! let run = model.generate(CpuBackend::new(), CacheLayout::default(), &prompt, &options, |t| {
//!     if let Some(piece) = text.push(t)? {
//!         print!("{piece}");
//!     }
//!     Ok(())
//! })?;
//! println!("\n{}", run.summary);
//! # Ok::<(), kv_model::ModelError>(())
//! ```
// Unsafe only in `linear` (SIMD intrinsics, the GEMM call) and `mapped` (mapping the model
// file), which allow it for themselves.
#![deny(unsafe_code)]
// Tests unwrap: a panic is how they fail.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod batch;
mod chat;
mod chat_session;
mod config;
mod device;
mod error;
mod escape;
mod files;
mod generate;
mod gguf_check;
mod linear;
mod mapped;
mod model;
pub mod ppl;
mod prompt_cache;
mod rope;
mod sampler;
mod tokenizer;
pub mod window;

use std::path::{Path, PathBuf};

pub use batch::{BatchOptions, BatchRun, SeqOutcome};
pub use chat::{ChatMessage, ChatTemplate};
pub use chat_session::{
    reusable_prefix, saved_kv_path, saved_window_path, ChatOptions, ChatSession, ChatTurn,
    SavedChat, TurnReport,
};
pub use config::{Family, Llama3Rope, LlamaConfig, MetadataLimits, SUPPORTED_ARCHITECTURES};
#[cfg(feature = "cuda")]
pub use device::cuda_backend;
pub use device::{device_weight_format, greedy_rows, greedy_token, load_on};
pub use error::{ModelError, Result};
pub use escape::escape_controls;
pub use files::{open_regular, read_text, MAX_TEXT_BYTES};
pub use generate::{
    window_saving, CacheLayout, CacheReport, GenerateOptions, Generation, StopReason, Summary,
};
pub use gguf_check::{
    check_gguf_bytes, check_gguf_file, GgufSummary, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN,
    MAX_METADATA, MAX_NAME_BYTES, MAX_STRING_BYTES, MAX_TENSORS, MAX_TENSOR_DIMS,
    MAX_TENSOR_ELEMENTS,
};
#[doc(hidden)]
pub use linear::{matmul_path_seconds, matmul_seconds, matmul_seconds_from_memory};
pub use model::{Activations, Logits, Model, WeightFormat};
pub use prompt_cache::{model_fingerprint, PromptCacheReport, StoreReport};
pub use sampler::{Sampler, SamplingConfig};
pub use tokenizer::{TextStream, Tokenizer};
pub use window::{StreamingScore, WindowConfig, WindowReport, WindowedSequence};

/// Loads the model (default [`WeightFormat`]) and its tokenizer from one GGUF
/// file, reading the header once, onto the CPU.
///
/// ```no_run
/// let (model, tokenizer) = kv_model::load(kv_model::default_model_path())?;
/// assert_eq!(model.config().vocab_size, tokenizer.vocab_size());
/// # Ok::<(), kv_model::ModelError>(())
/// ```
///
/// # Errors
/// Those of [`Model::load`] and [`Tokenizer::from_metadata`].
pub fn load(path: impl AsRef<Path>) -> Result<(Model, Tokenizer)> {
    load_with(path, WeightFormat::default())
}

/// As [`load`], with the projection weights in `format`.
///
/// # Errors
/// As [`load`].
pub fn load_with(path: impl AsRef<Path>, format: WeightFormat) -> Result<(Model, Tokenizer)> {
    let path = path.as_ref();
    let (content, map) = mapped::GgufMap::open(path)?;
    // The architecture decides whether anything else is worth reading.
    LlamaConfig::from_metadata(&content.metadata)?;
    let tokenizer = Tokenizer::from_metadata(&content.metadata)?;
    let model = Model::from_content(&content, &map, path, &candle_core::Device::Cpu, format)?;
    Ok((model, tokenizer))
}

/// File name of the default model, SmolLM2-135M-Instruct quantized to Q4_1.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Environment variable naming the directory models are kept in.
pub const MODEL_DIR_ENV: &str = "KV_MODEL_DIR";

/// Where the default model lives: `$KV_MODEL_DIR`, else `$HOME/.cache/kv/models`, joined
/// with [`DEFAULT_MODEL_FILE`]. `cargo xtask fetch-model` downloads it there.
///
/// ```
/// let path = kv_model::default_model_path();
/// assert!(path.ends_with(kv_model::DEFAULT_MODEL_FILE));
/// ```
pub fn default_model_path() -> PathBuf {
    model_dir().join(DEFAULT_MODEL_FILE)
}

fn model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(MODEL_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("kv").join("models")
}

/// The README's examples, compiled and run as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
