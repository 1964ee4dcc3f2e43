//! The one error type of kv-model.

use std::path::PathBuf;

use kv_core::KvError;

/// Everything that can go wrong loading a model, tokenizing, or generating.
///
/// Messages are one line each, written for the person at the command line: what failed,
/// what was expected, what was found, and where it helps, what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The model file does not exist.
    #[error(
        "model file not found: {} (run `cargo xtask fetch-model`, pass --model PATH, or set KV_MODEL_DIR)",
        path.display()
    )]
    ModelNotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// Reading a file failed for another reason than its absence.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Writing generated text failed (a closed pipe, a full disk).
    #[error("cannot write output: {0}")]
    Output(std::io::Error),
    /// The file is not a readable GGUF file (truncated, corrupt, or another format).
    #[error("{} is not a valid GGUF model: {detail}", path.display())]
    InvalidGguf {
        /// The file.
        path: PathBuf,
        /// What the reader found wrong.
        detail: String,
    },
    /// The GGUF header failed the pre-flight check ([`crate::check_gguf_bytes`]): a field
    /// truncated, out of bounds or inconsistent.
    #[error("{} is not a valid GGUF model: {what} at byte {offset}: {detail}", path.display())]
    MalformedGguf {
        /// The file (`<bytes>` for an in-memory header).
        path: PathBuf,
        /// Byte offset of the offending field.
        offset: u64,
        /// Which part: `header`, `metadata key "..."`, `tensor "..."`.
        what: String,
        /// The value found and the bound it breaks.
        detail: String,
    },
    /// A path that is not a regular file where a file is read (a directory, FIFO, device).
    #[error("{} is {kind}, not a regular file", path.display())]
    NotARegularFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The model file holds weights that are NaN or infinite, or its weights make the first
    /// forward pass non-finite: a corrupt or broken model file, not a cache problem.
    #[error("the model file is corrupt: {what} holds a non-finite value (NaN or infinity)")]
    NonFiniteWeights {
        /// The tensor, or the layer whose output went non-finite.
        what: String,
    },
    /// The file holds a model family this crate does not implement.
    #[error("unsupported model architecture {got:?}; supported: {}", supported.join(", "))]
    UnsupportedArchitecture {
        /// `general.architecture` of the file.
        got: String,
        /// What this crate can run.
        supported: &'static [&'static str],
    },
    /// The file uses a feature of its architecture this crate does not implement.
    #[error("unsupported {what}: {detail}")]
    Unsupported {
        /// Which feature.
        what: &'static str,
        /// The value found, and what is supported.
        detail: String,
    },
    /// A metadata key the model needs is absent.
    #[error("GGUF metadata key {key:?} is missing")]
    MissingMetadata {
        /// The key.
        key: String,
    },
    /// A metadata value of the wrong type or out of range.
    #[error("GGUF metadata key {key:?}: expected {expected}, got {got}")]
    BadMetadata {
        /// The key.
        key: String,
        /// What the model needs.
        expected: String,
        /// What the file holds.
        got: String,
    },
    /// A weight tensor the architecture needs is absent.
    #[error("tensor {name:?} is missing from the model file")]
    MissingTensor {
        /// The tensor's GGUF name.
        name: String,
    },
    /// A weight tensor whose shape does not match the metadata.
    #[error("tensor {name:?}: expected shape {expected}, got {got}")]
    TensorShape {
        /// The tensor's GGUF name.
        name: String,
        /// The shape the metadata implies.
        expected: String,
        /// The shape in the file.
        got: String,
    },
    /// Building the tokenizer, or encoding or decoding with it, failed.
    #[error("tokenizer: {detail}")]
    Tokenizer {
        /// The tokenizer library's message.
        detail: String,
    },
    /// A chat template that does not parse, fails to render, or refuses the conversation
    /// (`raise_exception`).
    #[error("chat template: {detail}")]
    ChatTemplate {
        /// What the template engine reported.
        detail: String,
    },
    /// A prompt with no tokens: there is nothing to continue.
    #[error("the prompt is empty: give some text to continue")]
    EmptyPrompt,
    /// The prompt, or the prompt plus the tokens asked for, does not fit the context.
    #[error(
        "{what}: {needed} tokens needed but the model's context holds {context} \
         (shorten the prompt or lower --max-tokens)"
    )]
    ContextOverflow {
        /// What did not fit.
        what: &'static str,
        /// Tokens it needs.
        needed: usize,
        /// The model's context length.
        context: usize,
    },
    /// A chat turn whose rendered conversation leaves no room for a reply in the session.
    #[error(
        "the conversation needs {needed} tokens but the chat session holds {capacity}: \
         start over (/reset) or allow more with --context"
    )]
    ConversationFull {
        /// Tokens the conversation and at least one reply token need.
        needed: usize,
        /// Tokens the session holds.
        capacity: usize,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab: usize,
    },
    /// An option or argument with a value the operation refuses.
    #[error("invalid {what}: expected {expected}, got {got}")]
    InvalidArgument {
        /// Which option.
        what: &'static str,
        /// The accepted values.
        expected: String,
        /// The value given.
        got: String,
    },
    /// A cache built for another model shape than this model's.
    #[error("cache does not fit the model: expected shape {expected}, got {got}")]
    CacheMismatch {
        /// The model's shape.
        expected: String,
        /// The cache's shape.
        got: String,
    },
    /// Logits with NaN or infinity: the model produced garbage.
    #[error("the model produced non-finite logits (NaN or infinity)")]
    NonFiniteLogits,
    /// The K/V file of a saved conversation (`kv chat --resume`) cannot be used: saved by
    /// another model, layout, block size or backend
    /// ([`CacheFileError::Mismatch`](kv_attention::cache_file::CacheFileError::Mismatch)),
    /// damaged, or unreadable. Nothing was loaded.
    #[error("saved conversation {}: {source}", path.display())]
    SavedChat {
        /// The K/V file.
        path: PathBuf,
        /// What the cache file reader found.
        source: kv_attention::cache_file::CacheFileError,
    },
    /// The conversation file of a saved conversation is not one `kv chat --save` wrote (or
    /// was saved for another model). Nothing was loaded.
    #[error("saved conversation {}: {detail}", path.display())]
    SavedChatInvalid {
        /// The conversation file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// An error from the cache (layout, capacity, backend).
    #[error("cache: {0}")]
    Cache(#[from] KvError),
    /// An error from the tensor library.
    #[error("tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::ModelNotFound { path }
        } else {
            ModelError::Io { path, source }
        }
    }

    pub(crate) fn tokenizer(e: impl std::fmt::Display) -> Self {
        ModelError::Tokenizer {
            detail: e.to_string(),
        }
    }
}
