//! How cached K and V rows are stored.

use std::fmt;
use std::str::FromStr;

use crate::{KvError, Result};

/// Consecutive elements of a row (along `head_dim`) that share one quantization scale.
///
/// Smaller groups follow the data more closely and pay more scale bytes. `head_dim` must be
/// a multiple of the group.
///
/// ```
/// use kv_core::QuantGroup;
/// assert_eq!(QuantGroup::G64.size(), 64);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuantGroup {
    /// 32 elements per scale.
    G32,
    /// 64 elements per scale.
    G64,
    /// 128 elements per scale (needs `head_dim` a multiple of 128).
    G128,
}

impl QuantGroup {
    /// Every group size, smallest first.
    pub const ALL: [QuantGroup; 3] = [QuantGroup::G32, QuantGroup::G64, QuantGroup::G128];

    /// Elements per group.
    pub const fn size(self) -> usize {
        match self {
            QuantGroup::G32 => 32,
            QuantGroup::G64 => 64,
            QuantGroup::G128 => 128,
        }
    }
}

/// Code width of the [`KvDType::Kivi`] layout.
///
/// ```
/// use kv_core::KiviBits;
/// assert_eq!(KiviBits::B2.bits(), 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KiviBits {
    /// 2-bit codes.
    B2,
    /// 4-bit codes.
    B4,
}

impl KiviBits {
    /// Bits per code.
    pub const fn bits(self) -> usize {
        match self {
            KiviBits::B2 => 2,
            KiviBits::B4 => 4,
        }
    }
}

/// Tokens a [`KvDType::Kivi`] layout keeps in f16 at the end of a sequence (KIVI's
/// *residual*, `R`), on top of the key block being filled.
///
/// The last `R` tokens of a sequence keep their values in f16 and their keys sit in f16
/// key blocks: a query reads the keys of its own 32-token block and of the `R / 32` blocks
/// before it in f16, and the values of the `R` tokens before it (itself included) in f16;
/// everything older it reads quantized. `R0` is the layout without a residual: only the
/// key block being filled is in f16, values are always read quantized.
///
/// ```
/// use kv_core::KiviResidual;
/// assert_eq!(KiviResidual::R128.tokens(), 128);
/// assert_eq!(KiviResidual::from_tokens(64), Some(KiviResidual::R64));
/// assert_eq!(KiviResidual::from_tokens(48), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum KiviResidual {
    /// No residual: only the key block being filled is kept in f16.
    #[default]
    R0,
    /// 32 tokens (one key block).
    R32,
    /// 64 tokens.
    R64,
    /// 128 tokens (the KIVI paper's choice).
    R128,
    /// 256 tokens.
    R256,
}

impl KiviResidual {
    /// Every residual length, shortest first.
    pub const ALL: [KiviResidual; 5] = [
        KiviResidual::R0,
        KiviResidual::R32,
        KiviResidual::R64,
        KiviResidual::R128,
        KiviResidual::R256,
    ];

    /// Tokens kept in f16: a multiple of the 32-token key block.
    pub const fn tokens(self) -> usize {
        match self {
            KiviResidual::R0 => 0,
            KiviResidual::R32 => 32,
            KiviResidual::R64 => 64,
            KiviResidual::R128 => 128,
            KiviResidual::R256 => 256,
        }
    }

    /// The residual of `tokens` tokens, `None` for a length this type does not name.
    pub fn from_tokens(tokens: usize) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.tokens() == tokens)
    }
}

/// The storage layout of cached K and V rows.
///
/// A *row* is one head's vector for one token (`head_dim` elements). Every layout knows its
/// exact size in bytes, scales included, so memory accounting is exact. The quantized
/// layouts' byte formats are those of the `kv-quant` crate (whose `RowFormat::row_bytes`
/// the CPU backend's tests hold these sizes to):
///
/// | layout       | K                                  | V                     | bytes per row, `D = head_dim`  |
/// |--------------|------------------------------------|-----------------------|--------------------------------|
/// | `f32`        | f32                                | f32                   | `4 D`                          |
/// | `f16`, `bf16`| 16-bit floats                      | same                  | `2 D`                          |
/// | `int8-gG`    | per group of `G`: f16 scale, `G` x i8 | same               | `D / G x (2 + G)`              |
/// | `int4-gG`    | per group: f16 scale, f16 min, `G / 2` bytes | same        | `D / G x (4 + G / 2)`          |
/// | `int4h-gG`   | as `int4-gG` after a Hadamard rotation of the row | `int4-gG` | `D / G x (4 + G / 2)`   |
/// | `kivi4`      | 32-token blocks, per channel: f16 scale and min; 4-bit codes | `int4-g32` | `D / 2 + D / 8` |
/// | `kivi2`      | the same with 2-bit codes           | 2-bit groups of 32   | `D / 4 + D / 8`                |
/// | `kivi2-r128` | `kivi2`, the last 128 tokens also in f16 | the same        | as `kivi2`, plus the window    |
///
/// For SmolLM2-135M (`D = 64`) that is 128 bytes per row in f16, 68 in `int8-g32`, 40 in
/// `int4-g32` and `kivi4`, 24 in `kivi2`.
///
/// **KIVI** stores keys per *channel*: a block of 32 tokens shares, for each of the `D`
/// channels, one f16 scale and one f16 minimum (`4 D` bytes per block, `D / 8` per token
/// amortised), which is what real keys need (a few channels are large for every token).
/// Values have no such channels and are stored per token in groups of 32, whose scale and
/// minimum also cost `D / 8` bytes per token, so a K row and a V row cost the same and
/// [`row_bytes`](Self::row_bytes) holds for both. A block's keys can only be quantized once
/// all 32 tokens are there: until then they sit in an f16 *residual window* (see
/// [`crate::memory::residual_window_bytes`]). A storage's block size must be a multiple of
/// [`block_tokens`](Self::block_tokens) (32), so each 32-token key block lies in one cache
/// block and is copied and shared with it.
///
/// A KIVI layout with a [`KiviResidual`] `R` (`kivi2-r128`, `kivi4-r64`; `kivi2` is
/// `kivi2-r0`) keeps the last `R` tokens of a sequence in f16 too, K and V: every token is
/// still stored quantized (so [`row_bytes`](Self::row_bytes) is unchanged), and the f16
/// copies of the tokens near the end of a sequence are held on top, per key block, until
/// every sequence holding the block has moved `R` tokens past it
/// ([`crate::memory::residual_window_bytes`] says what one costs).
///
/// ```
/// use kv_core::{KiviBits, KvDType, QuantGroup};
/// let dt: KvDType = "f16".parse()?;
/// assert_eq!(dt.row_bytes(64)?, 128);
/// let int8: KvDType = "int8".parse()?;
/// assert_eq!(int8, KvDType::Int8 { group: QuantGroup::G32 });
/// assert_eq!(int8.to_string(), "int8-g32");
/// assert_eq!(int8.row_bytes(64)?, 68);
/// assert_eq!("int4-g64".parse::<KvDType>()?.row_bytes(64)?, 36);
/// assert_eq!("kivi4".parse::<KvDType>()?, KvDType::kivi(KiviBits::B4));
/// let r128: KvDType = "kivi2-r128".parse()?;
/// assert_eq!(r128.residual_tokens(), 128);
/// assert_eq!(r128.row_bytes(64)?, 24);
/// // A group larger than the row does not fit.
/// assert!(KvDType::Int8 { group: QuantGroup::G128 }.row_bytes(64).is_err());
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
    /// Symmetric 8-bit integers with one f16 scale per group, keys and values alike.
    Int8 {
        /// Elements per scale.
        group: QuantGroup,
    },
    /// Asymmetric 4-bit integers with an f16 scale and minimum per group, keys and values
    /// alike.
    Int4 {
        /// Elements per scale and minimum.
        group: QuantGroup,
    },
    /// [`KvDType::Int4`] with every key rotated by the normalized Hadamard transform before
    /// it is quantized (queries are rotated the same way, which leaves `q · k` unchanged):
    /// the rotation spreads a key's outlier channels over all channels. Values are stored
    /// as in `Int4`. `head_dim` must be a power of two.
    Int4Hadamard {
        /// Elements per scale and minimum.
        group: QuantGroup,
    },
    /// KIVI: keys quantized per channel over blocks of 32 tokens (the not yet full block
    /// kept in f16), values per token in groups of 32, both with `bits`-bit codes; the last
    /// `residual` tokens of a sequence are also kept in f16.
    Kivi {
        /// Code width of keys and values.
        bits: KiviBits,
        /// Tokens at the end of a sequence read in f16 (see [`KiviResidual`]).
        residual: KiviResidual,
    },
}

/// Tokens of one KIVI key block.
const KIVI_BLOCK_TOKENS: usize = 32;

impl KvDType {
    /// Every layout, in the order tables list them. Layouts with 128-element groups only
    /// fit head dimensions that are multiples of 128.
    pub const ALL: &'static [KvDType] = &[
        KvDType::F32,
        KvDType::F16,
        KvDType::BF16,
        KvDType::Int8 {
            group: QuantGroup::G32,
        },
        KvDType::Int8 {
            group: QuantGroup::G64,
        },
        KvDType::Int8 {
            group: QuantGroup::G128,
        },
        KvDType::Int4 {
            group: QuantGroup::G32,
        },
        KvDType::Int4 {
            group: QuantGroup::G64,
        },
        KvDType::Int4 {
            group: QuantGroup::G128,
        },
        KvDType::Int4Hadamard {
            group: QuantGroup::G32,
        },
        KvDType::Int4Hadamard {
            group: QuantGroup::G64,
        },
        KvDType::Int4Hadamard {
            group: QuantGroup::G128,
        },
        KvDType::kivi(KiviBits::B4),
        KvDType::kivi(KiviBits::B2),
        KvDType::Kivi {
            bits: KiviBits::B4,
            residual: KiviResidual::R128,
        },
        KvDType::Kivi {
            bits: KiviBits::B2,
            residual: KiviResidual::R128,
        },
    ];

    /// Every layout the parser knows: [`ALL`](Self::ALL) and the KIVI layouts of every
    /// other [`KiviResidual`] (which tables and suites leave out to stay short).
    pub fn every() -> impl Iterator<Item = KvDType> {
        let more = [KiviBits::B4, KiviBits::B2].into_iter().flat_map(|bits| {
            KiviResidual::ALL
                .into_iter()
                .map(move |residual| KvDType::Kivi { bits, residual })
        });
        let mut seen = Vec::new();
        Self::ALL.iter().copied().chain(more).filter(move |d| {
            let new = !seen.contains(d);
            seen.push(*d);
            new
        })
    }

    /// The KIVI layout of `bits`-bit codes without a residual (`kivi4`, `kivi2`).
    pub const fn kivi(bits: KiviBits) -> KvDType {
        KvDType::Kivi {
            bits,
            residual: KiviResidual::R0,
        }
    }

    /// Tokens at the end of a sequence that a KIVI layout keeps in f16 besides the key
    /// block being filled (its [`KiviResidual`]); 0 for every other layout.
    ///
    /// ```
    /// use kv_core::KvDType;
    /// assert_eq!("kivi4-r64".parse::<KvDType>()?.residual_tokens(), 64);
    /// assert_eq!("kivi4".parse::<KvDType>()?.residual_tokens(), 0);
    /// assert_eq!(KvDType::F16.residual_tokens(), 0);
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    pub const fn residual_tokens(&self) -> usize {
        match self {
            KvDType::Kivi { residual, .. } => residual.tokens(),
            _ => 0,
        }
    }

    /// Bytes one row of `head_dim` elements takes, scales included. For [`KvDType::Kivi`]
    /// keys it is the amortised size of a full 32-token block (scales over 32 tokens),
    /// which equals the size of a value row (see the type's docs); the f16 residual window
    /// of a block being filled is counted separately.
    ///
    /// ```
    /// use kv_core::KvDType;
    /// assert_eq!("int4".parse::<KvDType>()?.row_bytes(128)?, 80);
    /// assert_eq!("kivi2".parse::<KvDType>()?.row_bytes(64)?, 24);
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when `head_dim` does not fit the layout (zero, not a
    /// multiple of a quantization group, or not a power of two for a Hadamard layout);
    /// [`KvError::Overflow`] when the row's size does not fit `usize`.
    pub fn row_bytes(&self, head_dim: usize) -> Result<usize> {
        self.check_head_dim(head_dim)?;
        let d = head_dim;
        // Units of the row and bytes per unit: elements for floats, groups for the
        // quantized layouts, 8-element runs (codes plus amortised scales) for KIVI.
        let (units, unit_bytes) = match *self {
            KvDType::F32 => (d, 4),
            KvDType::F16 | KvDType::BF16 => (d, 2),
            KvDType::Int8 { group } => (d / group.size(), 2 + group.size()),
            KvDType::Int4 { group } | KvDType::Int4Hadamard { group } => {
                (d / group.size(), 4 + group.size() / 2)
            }
            KvDType::Kivi { bits, .. } => (d / 8, bits.bits() + 1),
        };
        units
            .checked_mul(unit_bytes)
            .ok_or_else(|| KvError::Overflow {
                what: "row size",
                detail: format!(
                    "a {self} row of {head_dim} elements is more than usize::MAX bytes"
                ),
            })
    }

    /// Checks that rows of `head_dim` elements fit the layout.
    fn check_head_dim(&self, head_dim: usize) -> Result<()> {
        let multiple = match *self {
            KvDType::F32 | KvDType::F16 | KvDType::BF16 => 1,
            KvDType::Int8 { group } | KvDType::Int4 { group } | KvDType::Int4Hadamard { group } => {
                group.size()
            }
            KvDType::Kivi { .. } => 32,
        };
        if head_dim == 0 || !head_dim.is_multiple_of(multiple) {
            return Err(KvError::InvalidArgument {
                what: "head_dim",
                detail: format!(
                    "{head_dim} does not fit the {self} layout: it must be a non-zero multiple \
                     of {multiple}"
                ),
            });
        }
        if matches!(self, KvDType::Int4Hadamard { .. }) && !head_dim.is_power_of_two() {
            return Err(KvError::InvalidArgument {
                what: "head_dim",
                detail: format!(
                    "{head_dim} does not fit the {self} layout: the Hadamard rotation needs a \
                     power of two"
                ),
            });
        }
        Ok(())
    }

    /// Tokens whose keys are quantized together: 32 for [`KvDType::Kivi`], 1 for every
    /// layout that stores each row on its own. A cache's block size must be a multiple.
    ///
    /// ```
    /// use kv_core::KvDType;
    /// assert_eq!(KvDType::F16.block_tokens(), 1);
    /// assert_eq!("kivi4".parse::<KvDType>()?.block_tokens(), 32);
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    pub const fn block_tokens(&self) -> usize {
        match self {
            KvDType::Kivi { .. } => KIVI_BLOCK_TOKENS,
            _ => 1,
        }
    }

    /// Whether rows are stored as integer codes with scales (as opposed to floats).
    pub const fn is_quantized(&self) -> bool {
        !matches!(self, KvDType::F32 | KvDType::F16 | KvDType::BF16)
    }

    /// Short name, the one the command line accepts and [`fmt::Display`] prints
    /// (`"int8-g32"`); `"int8"`, `"int4"` and `"int4h"` are accepted for the 32-element
    /// groups, and `"kivi2-r0"` for `"kivi2"` (the same for `kivi4`).
    pub const fn name(&self) -> &'static str {
        use QuantGroup::{G128, G32, G64};
        match self {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
            KvDType::BF16 => "bf16",
            KvDType::Int8 { group: G32 } => "int8-g32",
            KvDType::Int8 { group: G64 } => "int8-g64",
            KvDType::Int8 { group: G128 } => "int8-g128",
            KvDType::Int4 { group: G32 } => "int4-g32",
            KvDType::Int4 { group: G64 } => "int4-g64",
            KvDType::Int4 { group: G128 } => "int4-g128",
            KvDType::Int4Hadamard { group: G32 } => "int4h-g32",
            KvDType::Int4Hadamard { group: G64 } => "int4h-g64",
            KvDType::Int4Hadamard { group: G128 } => "int4h-g128",
            KvDType::Kivi { bits, residual } => {
                const B4: [&str; 5] = [
                    "kivi4",
                    "kivi4-r32",
                    "kivi4-r64",
                    "kivi4-r128",
                    "kivi4-r256",
                ];
                const B2: [&str; 5] = [
                    "kivi2",
                    "kivi2-r32",
                    "kivi2-r64",
                    "kivi2-r128",
                    "kivi2-r256",
                ];
                let names = match bits {
                    KiviBits::B4 => B4,
                    KiviBits::B2 => B2,
                };
                names[*residual as usize]
            }
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

    /// Parses a [`name`](KvDType::name) or one of the short aliases, ignoring ASCII case
    /// and surrounding blanks.
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let canonical = match lower.as_str() {
            "int8" => "int8-g32",
            "int4" => "int4-g32",
            "int4h" => "int4h-g32",
            "kivi4-r0" => "kivi4",
            "kivi2-r0" => "kivi2",
            other => other,
        };
        KvDType::every()
            .find(|d| d.name() == canonical)
            .ok_or_else(|| KvError::InvalidArgument {
                what: "dtype",
                detail: format!(
                    "unknown cache layout {s:?}; known: {} (and int8, int4, int4h for their \
                     32-element groups; kivi4-rR and kivi2-rR for a residual R of 0, 32, 64, \
                     128 or 256 tokens)",
                    KvDType::ALL
                        .iter()
                        .map(|d| d.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases_parse() {
        for d in KvDType::every() {
            assert_eq!(d.name().parse::<KvDType>().ok(), Some(d));
            assert_eq!(
                d.to_string().to_uppercase().parse::<KvDType>().ok(),
                Some(d)
            );
        }
        let g32 = QuantGroup::G32;
        assert_eq!(
            " INT8 ".parse::<KvDType>().ok(),
            Some(KvDType::Int8 { group: g32 })
        );
        assert_eq!(
            "int4".parse::<KvDType>().ok(),
            Some(KvDType::Int4 { group: g32 })
        );
        assert_eq!(
            "int4h".parse::<KvDType>().ok(),
            Some(KvDType::Int4Hadamard { group: g32 })
        );
        assert_eq!(
            "KIVI2-R0".parse::<KvDType>().ok(),
            Some(KvDType::kivi(KiviBits::B2))
        );
        assert_eq!(
            "kivi4-r32".parse::<KvDType>().ok(),
            Some(KvDType::Kivi {
                bits: KiviBits::B4,
                residual: KiviResidual::R32
            })
        );
        assert_eq!(KvDType::every().count(), KvDType::ALL.len() + 6);
        for bad in [
            "",
            "int8-g16",
            "int3",
            "kivi8",
            "f8",
            "int8-",
            "kivi2-r48",
            "kivi2-r",
            "kivi2r128",
            "int8-r32",
            "kivi2-r1024",
        ] {
            assert!(
                matches!(
                    bad.parse::<KvDType>(),
                    Err(KvError::InvalidArgument { what: "dtype", .. })
                ),
                "{bad:?}"
            );
        }
        let names: std::collections::HashSet<_> = KvDType::every().map(|d| d.name()).collect();
        assert_eq!(names.len(), KvDType::every().count(), "names are unique");
        for r in KiviResidual::ALL {
            assert_eq!(KiviResidual::from_tokens(r.tokens()), Some(r));
            assert_eq!(r.tokens() % 32, 0);
            for bits in [KiviBits::B2, KiviBits::B4] {
                let d = KvDType::Kivi { bits, residual: r };
                assert_eq!(d.residual_tokens(), r.tokens());
                assert_eq!(d.row_bytes(64).ok(), KvDType::kivi(bits).row_bytes(64).ok());
                assert_eq!(d.block_tokens(), 32);
            }
        }
    }

    #[test]
    fn row_bytes_count_every_scale() {
        let bytes = |name: &str, d: usize| name.parse::<KvDType>().unwrap().row_bytes(d).ok();
        // head_dim 64: 2 groups of 32 or 1 of 64.
        assert_eq!(bytes("int8-g32", 64), Some(2 * (2 + 32)));
        assert_eq!(bytes("int8-g64", 64), Some(2 + 64));
        assert_eq!(bytes("int4-g32", 64), Some(2 * (4 + 16)));
        assert_eq!(bytes("int4-g64", 64), Some(4 + 32));
        assert_eq!(bytes("int4h-g32", 64), Some(40));
        assert_eq!(bytes("int8-g128", 128), Some(130));
        assert_eq!(bytes("int4-g128", 128), Some(68));
        // KIVI keys: (4 D + 32 D b / 8) / 32 per token; values: D / 32 groups of
        // (4 + 32 b / 8). Both are D b / 8 + D / 8.
        for (name, b) in [("kivi4", 4), ("kivi2", 2)] {
            for d in [32, 64, 128, 256] {
                let key = (4 * d + 32 * d * b / 8) / 32;
                let value = d / 32 * (4 + 32 * b / 8);
                assert_eq!(key, value);
                assert_eq!(bytes(name, d), Some(key), "{name} {d}");
            }
        }
        for (name, d) in [
            ("int8-g32", 48),
            ("int8-g128", 64),
            ("int4-g64", 32),
            ("kivi4", 16),
            ("int4h-g32", 96),
            ("f16", 0),
        ] {
            assert!(
                matches!(
                    name.parse::<KvDType>().unwrap().row_bytes(d),
                    Err(KvError::InvalidArgument {
                        what: "head_dim",
                        ..
                    })
                ),
                "{name} {d}"
            );
        }
    }

    #[test]
    fn huge_head_dims_overflow_instead_of_wrapping() {
        // A head dim near usize::MAX (a multiple of every group, not a power of two):
        // only the layouts whose rows take fewer bytes than elements fit, exactly.
        let huge = usize::MAX / 256 * 256;
        for &d in KvDType::ALL {
            match d.row_bytes(huge) {
                Ok(bytes) => {
                    assert!(bytes < huge, "{d}: {bytes}");
                    assert!(
                        matches!(d, KvDType::Int4 { .. } | KvDType::Kivi { .. }),
                        "{d}"
                    );
                }
                Err(KvError::Overflow { what, .. }) => assert_eq!(what, "row size"),
                // int4h needs a power of two.
                Err(KvError::InvalidArgument { what, .. }) => {
                    assert_eq!(what, "head_dim");
                    assert!(matches!(d, KvDType::Int4Hadamard { .. }), "{d}");
                }
                Err(e) => panic!("{d}: {e}"),
            }
        }
        // At the edge: f32 rows of usize::MAX / 4 elements fit exactly, one group more
        // does not.
        let edge = usize::MAX / 4;
        assert_eq!(KvDType::F32.row_bytes(edge).unwrap(), edge * 4);
        assert!(matches!(
            KvDType::F32.row_bytes(edge + 1),
            Err(KvError::Overflow { .. })
        ));
        let int8 = KvDType::Int8 {
            group: QuantGroup::G32,
        };
        let groups = usize::MAX / 34;
        assert_eq!(int8.row_bytes(groups * 32).unwrap(), groups * 34);
        assert!(matches!(
            int8.row_bytes((groups + 1) * 32),
            Err(KvError::Overflow { .. })
        ));
        let hadamard = KvDType::Int4Hadamard {
            group: QuantGroup::G32,
        };
        assert!(matches!(
            hadamard.row_bytes(1 << (usize::BITS - 1)),
            Ok(b) if b == (1usize << (usize::BITS - 6)) * 20
        ));
    }

    #[test]
    fn only_kivi_quantizes_over_tokens() {
        for &d in KvDType::ALL {
            let kivi = matches!(d, KvDType::Kivi { .. });
            assert_eq!(d.block_tokens(), if kivi { 32 } else { 1 }, "{d}");
            if !kivi {
                assert_eq!(d.residual_tokens(), 0, "{d}");
            }
            assert_eq!(
                d.is_quantized(),
                d.row_bytes(64).map_or(true, |b| b < 128),
                "{d}"
            );
        }
    }
}
