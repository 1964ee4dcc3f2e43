//! What a stored row looks like: [`RowFormat`] and its exact byte size.

use std::fmt;
use std::str::FromStr;

use crate::error::{QuantError, Result};

/// Number of consecutive elements of a row (along `head_dim`) that share one scale (and one
/// minimum for the asymmetric formats).
///
/// Smaller groups follow the data more closely (less error) and pay more scale bytes; the
/// three sizes are the ones the cache offers. All are multiples of 32, which is what lets the
/// SIMD kernels process a group in whole 256-bit or 512-bit steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// 32 elements per group.
    G32,
    /// 64 elements per group.
    G64,
    /// 128 elements per group.
    G128,
}

impl Group {
    /// Every group size, smallest first.
    pub const ALL: [Group; 3] = [Group::G32, Group::G64, Group::G128];

    /// Elements per group.
    pub const fn size(self) -> usize {
        match self {
            Group::G32 => 32,
            Group::G64 => 64,
            Group::G128 => 128,
        }
    }
}

/// The storage format of one cached row (one head's `head_dim` vector for one token).
///
/// Every format has a stable little-endian byte layout, described on the variant and, for
/// the quantized ones, spelled out as `bytemuck::Pod` structs in [`crate::layout`]. A row is
/// self-contained: its scales travel with it, so a row can be copied between blocks (paged
/// cache, copy-on-write) as plain bytes.
///
/// Row sizes for common head dimensions (bytes, scales included):
///
/// | format     | head_dim 64 | head_dim 128 | bits/element (g = group) |
/// |------------|------------:|-------------:|--------------------------|
/// | f32        | 256         | 512          | 32                       |
/// | f16, bf16  | 128         | 256          | 16                       |
/// | int8-g32   | 68          | 136          | 8 + 16/g = 8.5           |
/// | int8-g64   | 66          | 132          | 8.25                     |
/// | int8-g128  | invalid     | 130          | 8.125                    |
/// | int4-g32   | 40          | 80           | 4 + 32/g = 5             |
/// | int4-g64   | 36          | 72           | 4.5                      |
/// | int4-g128  | invalid     | 68           | 4.25                     |
/// | int2-g32   | 24          | 48           | 2 + 32/g = 3             |
/// | int2-g64   | 20          | 40           | 2.5                      |
/// | int2-g128  | invalid     | 36           | 2.25                     |
///
/// ```
/// use kv_quant::{Group, RowFormat};
///
/// // SmolLM2-135M: head_dim 64.
/// assert_eq!(RowFormat::F16.row_bytes(64)?, 128);
/// assert_eq!(RowFormat::Int8 { group: Group::G32 }.row_bytes(64)?, 64 + 2 * 2);
/// assert_eq!(RowFormat::Int4 { group: Group::G32 }.row_bytes(64)?, 32 + 2 * 4);
/// // A group larger than the row is rejected, not silently padded.
/// assert!(RowFormat::Int4 { group: Group::G128 }.row_bytes(64).is_err());
/// # Ok::<(), kv_quant::QuantError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RowFormat {
    /// `head_dim` little-endian f32: the exact reference. `4 * head_dim` bytes.
    F32,
    /// `head_dim` little-endian IEEE binary16 (round to nearest even). `2 * head_dim` bytes.
    /// Inputs with |x| >= 65520 (which would round to infinity) are rejected.
    F16,
    /// `head_dim` little-endian bfloat16 (the top half of an f32, round to nearest even).
    /// `2 * head_dim` bytes.
    Bf16,
    /// Symmetric 8-bit: per group an f16 scale `s` then `g` signed codes `c` in -127..=127;
    /// `x̂ = s * c`. `s` is `max|x| / 127` rounded *up* to f16, so no code ever clamps.
    /// `head_dim / g * (2 + g)` bytes. Layout: [`crate::layout::Int8G32`] and siblings.
    Int8 {
        /// Elements per scale.
        group: Group,
    },
    /// Asymmetric 4-bit: per group an f16 scale `s`, an f16 minimum `m`, then `g` codes
    /// `c` in 0..=15 packed two per byte, element `2i` in the low nibble of byte `i`;
    /// `x̂ = m + s * c`. `head_dim / g * (4 + g / 2)` bytes. Layout:
    /// [`crate::layout::Int4G32`] and siblings.
    Int4 {
        /// Elements per scale and minimum.
        group: Group,
    },
    /// Asymmetric 2-bit, as `Int4` with codes 0..=3 packed four per byte, element `4i + k`
    /// in bits `2k..2k+2` of byte `i`. Meant for values next to KIVI keys; per-token 2-bit
    /// keys lose too much. `head_dim / g * (4 + g / 4)` bytes.
    Int2 {
        /// Elements per scale and minimum.
        group: Group,
    },
}

impl RowFormat {
    /// Every format, in the order tables list them.
    pub const ALL: [RowFormat; 12] = [
        RowFormat::F32,
        RowFormat::F16,
        RowFormat::Bf16,
        RowFormat::Int8 { group: Group::G32 },
        RowFormat::Int8 { group: Group::G64 },
        RowFormat::Int8 { group: Group::G128 },
        RowFormat::Int4 { group: Group::G32 },
        RowFormat::Int4 { group: Group::G64 },
        RowFormat::Int4 { group: Group::G128 },
        RowFormat::Int2 { group: Group::G32 },
        RowFormat::Int2 { group: Group::G64 },
        RowFormat::Int2 { group: Group::G128 },
    ];

    /// Short stable name (`"f16"`, `"int8-g32"`, `"int4-g64"`, ...), the one [`FromStr`]
    /// accepts and error messages use.
    pub const fn name(self) -> &'static str {
        match self {
            RowFormat::F32 => "f32",
            RowFormat::F16 => "f16",
            RowFormat::Bf16 => "bf16",
            RowFormat::Int8 { group: Group::G32 } => "int8-g32",
            RowFormat::Int8 { group: Group::G64 } => "int8-g64",
            RowFormat::Int8 { group: Group::G128 } => "int8-g128",
            RowFormat::Int4 { group: Group::G32 } => "int4-g32",
            RowFormat::Int4 { group: Group::G64 } => "int4-g64",
            RowFormat::Int4 { group: Group::G128 } => "int4-g128",
            RowFormat::Int2 { group: Group::G32 } => "int2-g32",
            RowFormat::Int2 { group: Group::G64 } => "int2-g64",
            RowFormat::Int2 { group: Group::G128 } => "int2-g128",
        }
    }

    /// The quantization group, `None` for the float formats.
    pub const fn group(self) -> Option<Group> {
        match self {
            RowFormat::F32 | RowFormat::F16 | RowFormat::Bf16 => None,
            RowFormat::Int8 { group } | RowFormat::Int4 { group } | RowFormat::Int2 { group } => {
                Some(group)
            }
        }
    }

    /// Whether the format quantizes (has group scales), as opposed to storing floats.
    pub const fn is_quantized(self) -> bool {
        self.group().is_some()
    }

    /// Bytes one group takes (scale, minimum and codes); `None` for the float formats.
    pub const fn group_bytes(self) -> Option<usize> {
        match self {
            RowFormat::F32 | RowFormat::F16 | RowFormat::Bf16 => None,
            RowFormat::Int8 { group } => Some(2 + group.size()),
            RowFormat::Int4 { group } => Some(4 + group.size() / 2),
            RowFormat::Int2 { group } => Some(4 + group.size() / 4),
        }
    }

    /// Checks that rows of `head_dim` elements can be stored in this format.
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] when `head_dim` is zero or not a multiple of the group.
    pub fn validate(self, head_dim: usize) -> Result<()> {
        let multiple_of = self.group().map_or(1, Group::size);
        if head_dim == 0 || !head_dim.is_multiple_of(multiple_of) {
            return Err(QuantError::InvalidHeadDim {
                format: self.name(),
                head_dim,
                multiple_of,
            });
        }
        Ok(())
    }

    /// Exact bytes of one row of `head_dim` elements, scales and minimums included: the
    /// number memory accounting must use.
    ///
    /// # Errors
    /// [`QuantError::InvalidHeadDim`] as [`validate`](Self::validate);
    /// [`QuantError::SizeOverflow`] if the size does not fit in `usize`.
    pub fn row_bytes(self, head_dim: usize) -> Result<usize> {
        self.validate(head_dim)?;
        let bytes = match (self, self.group(), self.group_bytes()) {
            (RowFormat::F32, _, _) => head_dim.checked_mul(4),
            (_, Some(group), Some(gb)) => (head_dim / group.size()).checked_mul(gb),
            _ => head_dim.checked_mul(2),
        };
        bytes.ok_or(QuantError::SizeOverflow {
            format: self.name(),
            head_dim,
        })
    }

    /// The `head_dim` whose rows take `row_len` bytes, if any: lets functions that only see
    /// a row (such as [`error_bound`](Self::error_bound)) check it.
    ///
    /// # Errors
    /// [`QuantError::LengthMismatch`] when no whole number of elements (or groups) gives
    /// `row_len` bytes, with `expected` the nearest valid length below it;
    /// [`QuantError::LengthOverflow`] when the element count would not fit `usize` (4-bit
    /// and 2-bit rows hold more elements than bytes).
    pub fn head_dim_of(self, row_len: usize) -> Result<usize> {
        let (unit_bytes, unit_elems) = match (self, self.group(), self.group_bytes()) {
            (RowFormat::F32, _, _) => (4, 1),
            (_, Some(group), Some(gb)) => (gb, group.size()),
            _ => (2, 1),
        };
        let units = row_len / unit_bytes;
        if units == 0 || !row_len.is_multiple_of(unit_bytes) {
            return Err(QuantError::LengthMismatch {
                what: "row",
                expected: units.max(1) * unit_bytes,
                got: row_len,
            });
        }
        crate::error::checked_len("row", units, unit_elems)
    }

    /// Checks `row_len == row_bytes(head_dim)`.
    pub(crate) fn check_row(
        self,
        head_dim: usize,
        what: &'static str,
        row_len: usize,
    ) -> Result<usize> {
        let rb = self.row_bytes(head_dim)?;
        crate::error::expect_len(what, rb, row_len)?;
        Ok(rb)
    }
}

impl fmt::Display for RowFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RowFormat {
    type Err = QuantError;

    /// Parses a [`name`](RowFormat::name), ignoring ASCII case and surrounding blanks.
    fn from_str(s: &str) -> Result<Self> {
        RowFormat::ALL
            .iter()
            .copied()
            .find(|f| f.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| QuantError::UnknownFormat {
                name: s.to_owned(),
                known: RowFormat::ALL
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}
