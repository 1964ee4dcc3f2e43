//! The one error type of this crate.

use crate::Isa;

/// Everything that can go wrong in kv-quant.
///
/// Every public function checks its arguments and answers with one of these instead of
/// panicking: the cache calls these kernels with lengths computed elsewhere, and a wrong
/// length must surface as a bug report, not as memory corruption or an abort in a worker
/// thread.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// A slice argument has the wrong length for the format and shape.
    #[error("{what}: expected length {expected}, got {got}")]
    LengthMismatch {
        /// Which argument (`"row"`, `"q"`, `"out"`, ...).
        what: &'static str,
        /// The length the format and shape require.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },

    /// `head_dim` does not fit the format: zero, or not a multiple of its group.
    #[error("head_dim {head_dim} does not fit {format}: it must be a non-zero multiple of {multiple_of}")]
    InvalidHeadDim {
        /// Short name of the format.
        format: &'static str,
        /// The rejected head dimension.
        head_dim: usize,
        /// What head_dim must be a multiple of.
        multiple_of: usize,
    },

    /// A KIVI key block must hold at least one token.
    #[error("a KIVI key block must hold at least one token, got {block_tokens}")]
    InvalidBlockTokens {
        /// The rejected token count.
        block_tokens: usize,
    },

    /// The byte size of a row or block does not fit in `usize`.
    #[error("{format} with head_dim {head_dim} is too large to address")]
    SizeOverflow {
        /// Short name of the format.
        format: &'static str,
        /// The head dimension that overflowed.
        head_dim: usize,
    },

    /// The length an argument would need does not fit in `usize`: no slice can have it, so
    /// the call is refused instead of comparing against a wrapped or saturated number.
    #[error("{what}: the required length ({detail}) does not fit usize")]
    LengthOverflow {
        /// Which argument (`"rows"`, `"out"`, ...).
        what: &'static str,
        /// The product that overflowed, in words.
        detail: String,
    },

    /// The input holds a NaN or an infinity. Such a value is never stored: a NaN in a key
    /// would poison every score of the block through the shared scale.
    #[error("input element {index} is {value}: NaN and infinities cannot be stored")]
    NonFinite {
        /// Index of the first offending element.
        index: usize,
        /// The offending value.
        value: f32,
    },

    /// A finite input lies beyond what the format can represent (for example |x| above
    /// 65504 in f16, or a group whose scale would overflow its f16 field).
    #[error("input element {index} ({value}) is beyond the range of {format}")]
    OutOfRange {
        /// Short name of the format.
        format: &'static str,
        /// Index of the element that set the range (the group's extreme).
        index: usize,
        /// Its value.
        value: f32,
    },

    /// The Hadamard transform is defined here for power-of-two lengths only.
    #[error("the Hadamard transform needs a power-of-two length, got {len}")]
    NotPowerOfTwo {
        /// The rejected length.
        len: usize,
    },

    /// Kernels for an instruction set this CPU does not have were asked for.
    #[error("{isa} kernels are not available on this CPU")]
    IsaUnavailable {
        /// The instruction set asked for.
        isa: Isa,
    },

    /// A format name that [`RowFormat`](crate::RowFormat) does not know.
    #[error("unknown row format {name:?}; known: {known}")]
    UnknownFormat {
        /// The name that was given.
        name: String,
        /// The accepted names, comma separated.
        known: String,
    },
}

/// `Result` with [`QuantError`].
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

/// `a * b`, or `Err(LengthOverflow)` naming `what` when it does not fit `usize`.
pub(crate) fn checked_len(what: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| QuantError::LengthOverflow {
        what,
        detail: format!("{a} x {b}"),
    })
}

/// `Err(LengthMismatch)` unless `got == expected`.
pub(crate) fn expect_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::LengthMismatch {
            what,
            expected,
            got,
        })
    }
}
