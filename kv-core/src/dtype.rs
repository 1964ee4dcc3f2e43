//! How one K or V row is stored.

use std::fmt;
use std::str::FromStr;

use crate::{KvError, Result};

/// The storage layout of cached K and V rows.
///
/// A *row* is one head's vector for one token (`head_dim` elements). Every layout knows its
/// exact size in bytes, scales included, so memory accounting is exact.
///
/// ```
/// use kv_core::KvDType;
/// let dt: KvDType = "f16".parse()?;
/// assert_eq!(dt.row_bytes(64)?, 128);
/// # Ok::<(), kv_core::KvError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KvDType {
    /// 32-bit float: the exact reference.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16: f32's range with 8 bits of mantissa.
    BF16,
}

impl KvDType {
    /// Every layout, in the order tables list them.
    pub const ALL: &'static [KvDType] = &[KvDType::F32, KvDType::F16, KvDType::BF16];

    /// Bytes one row of `head_dim` elements takes, scales included.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when `head_dim` does not fit the layout (zero, or not a
    /// multiple of a quantization group).
    pub fn row_bytes(&self, head_dim: usize) -> Result<usize> {
        if head_dim == 0 {
            return Err(KvError::InvalidArgument {
                what: "head_dim",
                detail: "must be at least 1".into(),
            });
        }
        Ok(head_dim * self.element_bytes())
    }

    fn element_bytes(&self) -> usize {
        match self {
            KvDType::F32 => 4,
            KvDType::F16 | KvDType::BF16 => 2,
        }
    }

    /// Short name, the one the command line accepts.
    pub fn name(&self) -> &'static str {
        match self {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
            KvDType::BF16 => "bf16",
        }
    }
}

impl fmt::Display for KvDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDType {
    type Err = KvError;

    fn from_str(s: &str) -> Result<Self> {
        KvDType::ALL
            .iter()
            .copied()
            .find(|d| d.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| KvError::InvalidArgument {
                what: "dtype",
                detail: format!(
                    "unknown cache layout {s:?}; known: {}",
                    KvDType::ALL
                        .iter()
                        .map(|d| d.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }
}
