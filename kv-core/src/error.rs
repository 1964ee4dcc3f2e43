//! The one error type of the cache API.

use crate::SeqId;

/// Everything that can go wrong when describing, filling or reading a KV cache.
///
/// Every failing operation of this workspace leaves the cache as it was before the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// A model shape that cannot exist (zero sizes, query heads not a multiple of KV heads).
    #[error("invalid model shape: {detail}")]
    InvalidShape {
        /// What is wrong, in words.
        detail: String,
    },
    /// An argument outside what the operation accepts.
    #[error("invalid {what}: {detail}")]
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// Why it was refused.
        detail: String,
    },
    /// A tensor or slice of the wrong size.
    #[error("{what}: expected shape {expected}, got {got}")]
    ShapeMismatch {
        /// Which input.
        what: &'static str,
        /// The shape the call needs.
        expected: String,
        /// The shape it was given.
        got: String,
    },
    /// Not enough free blocks for the request; nothing was allocated.
    #[error("cache full: {needed} blocks needed, {free} free")]
    CacheFull {
        /// Blocks the request needs.
        needed: usize,
        /// Blocks that were free.
        free: usize,
    },
    /// A sequence id that the manager does not know (never created, or already freed).
    #[error("unknown sequence {id}")]
    UnknownSequence {
        /// The id that was asked for.
        id: SeqId,
    },
    /// An index past the end of what exists.
    #[error("{what} {index} out of range (length {len})")]
    OutOfRange {
        /// What was indexed.
        what: &'static str,
        /// The index given.
        index: usize,
        /// The valid length.
        len: usize,
    },
    /// A size or memory formula whose result does not fit its integer type (a huge token
    /// count, layer count or head dimension): reported instead of a wrapped number.
    #[error("{what} overflows: {detail}")]
    Overflow {
        /// Which quantity.
        what: &'static str,
        /// The inputs that made it overflow.
        detail: String,
    },
    /// Input containing NaN or infinity, which a cache never stores.
    #[error("{what} contains a non-finite value (NaN or infinity)")]
    NonFinite {
        /// Which input.
        what: &'static str,
    },
    /// An optional capability this backend does not have; ask with `supports` first.
    #[error("backend {backend} does not support {what}")]
    Unsupported {
        /// The backend's name.
        backend: String,
        /// The capability asked for.
        what: String,
    },
    /// The backend cannot run on this machine or build.
    #[error("backend {backend} is unavailable: {reason}")]
    BackendUnavailable {
        /// The backend's name.
        backend: &'static str,
        /// Why, and what to do about it.
        reason: String,
    },
    /// An error from the tensor library.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Result with [`KvError`].
pub type Result<T, E = KvError> = std::result::Result<T, E>;
