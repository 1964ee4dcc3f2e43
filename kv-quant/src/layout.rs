//! The byte layouts of quantized groups, as `bytemuck::Pod` structs, and the rules that
//! choose their scales.
//!
//! A quantized row is `head_dim / g` of these groups back to back, nothing else: no row
//! header, no padding. Every field is a byte array, so the structs have alignment 1 and can
//! be viewed in place on any `&[u8]` of the right length (`bytemuck::cast_slice`), at any
//! offset in a block pool. Multi-byte fields are little-endian on every host.
//!
//! | struct       | bytes | fields (in order)                                  |
//! |--------------|------:|----------------------------------------------------|
//! | `Int8G32`    |    34 | scale f16, 32 x i8                                 |
//! | `Int8G64`    |    66 | scale f16, 64 x i8                                 |
//! | `Int8G128`   |   130 | scale f16, 128 x i8                                |
//! | `Int4G32`    |    20 | scale f16, min f16, 16 bytes of nibbles            |
//! | `Int4G64`    |    36 | scale f16, min f16, 32 bytes of nibbles            |
//! | `Int4G128`   |    68 | scale f16, min f16, 64 bytes of nibbles            |
//! | `Int2G32`    |    12 | scale f16, min f16, 8 bytes of 2-bit codes         |
//! | `Int2G64`    |    20 | scale f16, min f16, 16 bytes of 2-bit codes        |
//! | `Int2G128`   |    36 | scale f16, min f16, 32 bytes of 2-bit codes        |
//!
//! # How scales are chosen, and the error bound that follows
//!
//! Scales and minimums are stored as f16, so the quantizer rounds them in the direction that
//! keeps every code in range, and then quantizes against the *stored* values. The bounds
//! below are therefore stated with `s` and `m` the stored f16 values (as f32/f64 numbers),
//! and they hold exactly, f32 arithmetic of the quantizer and dequantizer included.
//! `u = 2^-24` is the unit roundoff of f32.
//!
//! **INT8 symmetric.** `s = ceil_f16(max|x| / 127)` (computed in f64, then the smallest f16
//! not below it). Codes `c = round_half_even(x / s)` in f32, `x̂ = s * c` (exact in f32: 7
//! by 11 significant bits). Since `s >= max|x| / 127`, `|x / s| <= 127` and no code clamps;
//! the only errors are the rounding to an integer and the f32 division, so
//!
//! `|x - x̂| <= s * (1/2 + 2^-17)`.
//!
//! Relative to the ideal scale `max|x| / 127`, the stored one is at most `2^-10` larger
//! (f16 has 11 significant bits), or at most `2^-24` larger in absolute terms when the
//! scale is an f16 subnormal (groups with `max|x| < 127 * 2^-14 ≈ 7.8e-3`). Tiny groups are
//! therefore never flushed to zero: a group of f32 subnormals gets scale `2^-24` and error
//! at most `2^-25`. A group whose scale would exceed 65504 (`max|x|` above about 8.3e6) is
//! rejected with [`QuantError::OutOfRange`].
//!
//! **INT4 / INT2 asymmetric**, `L = 15` or `3` levels above the minimum.
//! `m = floor_f16(min x)`, `s = ceil_f16((max x - m) / L)`: the minimum is rounded *down*
//! so `x - m >= 0`, and the scale is computed from the stored minimum and rounded *up*, so
//! `(x - m) / s <= L` (up to f32 rounding) and no code clamps. Codes
//! `c = round_half_even((x - m) / s)` in f32, `x̂ = m + s * c` (one f32 rounding, the
//! product being exact), so
//!
//! `|x - x̂| <= s * (1/2 + 2^-19) + 2^-24 * (|m| + L * s)`.
//!
//! The second term is the f32 rounding of the dequantized value itself (half an f32 ulp of
//! `x̂`). The cost of storing `m` in f16 shows up in `s`: `m` may sit below the true minimum
//! by up to one f16 ulp of it (`2^-10 * |min x|`, or `2^-24` near zero), which widens the
//! range the `L` steps cover. For a group far from zero with a narrow range (say values in
//! `[1000.3, 1000.8]`, where f16 steps are 0.5) this is visible: `m = 1000`, so
//! `s = 0.8 / 15` instead of `0.5 / 15`. Keys and values of real models are centred near
//! zero, where the effect is negligible. A group whose minimum is below -65504 or whose
//! scale would exceed 65504 is rejected with [`QuantError::OutOfRange`].
//!
//! [`RowFormat::error_bound`](crate::RowFormat::error_bound) evaluates these bounds for a
//! stored row, so tests and tolerances downstream can use them instead of guessing.

use bytemuck::{Pod, Zeroable};
use half::f16;

use crate::error::{QuantError, Result};
use crate::format::{Group, RowFormat};

/// Unit roundoff of f32.
pub(crate) const U32: f64 = 1.0 / 16_777_216.0; // 2^-24

/// Per-element error bound of INT8 symmetric with stored scale `s` (see module docs).
pub(crate) fn sym_bound(s: f64) -> f64 {
    s * (0.5 + 2f64.powi(-17))
}

/// Per-element error bound of an asymmetric format with `levels` steps, stored scale `s`
/// and minimum `m` (see module docs).
pub(crate) fn asym_bound(s: f64, m: f64, levels: f64) -> f64 {
    s * (0.5 + 2f64.powi(-19)) + U32 * (m.abs() + levels * s)
}

/// Exact f16 → f32 conversion of the bits `h`, inlined: `half`'s conversion asks the CPU
/// for F16C on every call, which dominated the scalar kernels (one call per element).
#[inline]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let rest = u32::from(h & 0x7fff);
    let magnitude = if rest >= 0x7c00 {
        // Infinity or NaN: all-ones exponent, payload kept.
        f32::from_bits(0x7f80_0000 | ((rest & 0x03ff) << 13))
    } else {
        // Shifted into f32 position the bits read as 2^-112 times the f16 value (an f32
        // subnormal for f16 subnormals); scaling by 2^112 is exact.
        f32::from_bits(rest << 13) * f32::from_bits(0x7780_0000)
    };
    f32::from_bits(magnitude.to_bits() | sign)
}

/// The next f16 above `h` (towards +infinity).
fn f16_next_up(h: f16) -> f16 {
    let b = h.to_bits();
    let up = if b & 0x7fff == 0 {
        0x0001 // from either zero to the smallest positive subnormal
    } else if b & 0x8000 == 0 {
        b + 1 // positive: one more ulp (0x7bff + 1 is +inf)
    } else {
        b - 1 // negative: one ulp towards zero
    };
    f16::from_bits(up)
}

/// The next f16 below `h` (towards -infinity).
fn f16_next_down(h: f16) -> f16 {
    let b = h.to_bits();
    let down = if b & 0x7fff == 0 {
        0x8001
    } else if b & 0x8000 == 0 {
        b - 1 // positive: towards zero (+inf - 1 is 65504)
    } else {
        b + 1 // negative: away from zero (0xfbff + 1 is -inf)
    };
    f16::from_bits(down)
}

/// The smallest f16 that is `>= v` (+inf when there is none). `v` must not be NaN.
pub(crate) fn f16_ceil(v: f64) -> f16 {
    let h = f16::from_f64(v);
    if h.to_f64() >= v {
        h
    } else {
        f16_next_up(h)
    }
}

/// The largest f16 that is `<= v` (-inf when there is none). `v` must not be NaN.
pub(crate) fn f16_floor(v: f64) -> f16 {
    let h = f16::from_f64(v);
    if h.to_f64() <= v {
        h
    } else {
        f16_next_down(h)
    }
}

/// INT8 scale for a group whose largest magnitude is `amax` (finite, >= 0); `None` if it
/// overflows f16. Shared by the scalar and SIMD quantizers so both store the same bytes.
pub(crate) fn sym_scale(amax: f32) -> Option<f16> {
    let s = f16_ceil(f64::from(amax) / 127.0);
    s.is_finite().then_some(s)
}

/// Asymmetric `(scale, min)` for a group spanning `[lo, hi]` (finite) with `levels` steps;
/// `None` if either overflows f16. Shared by the scalar and SIMD quantizers.
pub(crate) fn asym_params(lo: f32, hi: f32, levels: f32) -> Option<(f16, f16)> {
    // `+ 0.0` turns -0.0 into +0.0: a SIMD min may pick either zero of a group holding
    // both, and the stored bytes must not depend on which.
    let m = f16_floor(f64::from(lo) + 0.0);
    if !m.is_finite() {
        return None;
    }
    let s = f16_ceil((f64::from(hi) - m.to_f64()) / f64::from(levels) + 0.0);
    s.is_finite().then_some((s, m))
}

/// INT8 code of `x` for stored scale `s` (as f32). The SIMD quantizers do the same f32
/// operations in the same order, which is what makes their bytes identical.
#[inline]
pub(crate) fn sym_code(x: f32, s: f32) -> i8 {
    if s == 0.0 {
        0
    } else {
        (x / s).round_ties_even().clamp(-127.0, 127.0) as i8
    }
}

/// Asymmetric code of `x` for stored scale `s` and minimum `m`, in `0..=levels`.
#[inline]
pub(crate) fn asym_code(x: f32, s: f32, m: f32, levels: f32) -> u8 {
    if s == 0.0 {
        0
    } else {
        ((x - m) / s).round_ties_even().clamp(0.0, levels) as u8
    }
}

/// Index and value of the element of largest magnitude (first on ties).
fn argmax_abs(x: &[f32]) -> (usize, f32) {
    let mut best = (0, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        if v.abs() > best.1.abs() {
            best = (i, v);
        }
    }
    best
}

/// Indices of the smallest and largest element (first on ties).
fn argmin_max(x: &[f32]) -> (usize, usize) {
    let (mut lo, mut hi) = (0, 0);
    for (i, &v) in x.iter().enumerate() {
        if v < x[lo] {
            lo = i;
        }
        if v > x[hi] {
            hi = i;
        }
    }
    (lo, hi)
}

/// One quantization group of a row: what the generic scalar kernels need to know about a
/// layout. Sealed inside the crate; the public face is the structs' fields and methods.
pub(crate) trait QuantGroup: Pod {
    /// Elements per group.
    const LEN: usize;
    /// The row format this group belongs to (for error messages and bounds).
    const FORMAT: RowFormat;

    /// Scale and minimum for the (finite) elements `x`, `x[0]` being element `base` of the
    /// row; fails with `OutOfRange` if they do not fit f16.
    fn params(x: &[f32], base: usize) -> Result<(f16, f16)>;
    /// The group storing `x` with those parameters.
    fn encode(x: &[f32], scale: f16, min: f16) -> Self;
    /// Stored scale and minimum (minimum 0 for symmetric), as f32.
    fn scale_min(&self) -> (f32, f32);
    /// Code of element `i < LEN`, as f32.
    fn code_f32(&self, i: usize) -> f32;
    /// The per-element error bound of this group (module docs).
    fn bound(&self) -> f64;

    /// Dequantized element `i < LEN`: `m + s * c`, the definition every kernel reproduces.
    #[inline]
    fn value(&self, i: usize) -> f32 {
        let (s, m) = self.scale_min();
        m + s * self.code_f32(i)
    }
}

macro_rules! int8_group {
    ($name:ident, $group:ident, $n:literal) => {
        #[doc = concat!(
            "One group of ", stringify!($n), " elements of an INT8 symmetric row (`int8-g",
            stringify!($n), "`): ", stringify!($n), " + 2 bytes.\n\n",
            "`x̂[i] = scale * codes[i]`; codes are in -127..=127 (the quantizer never writes ",
            "-128, the dequantizer accepts it)."
        )]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
        #[repr(C)]
        pub struct $name {
            /// Scale, IEEE binary16 bits, little-endian.
            pub scale: [u8; 2],
            /// One signed code per element, in element order.
            pub codes: [i8; $n],
        }

        impl $name {
            /// Elements in the group.
            pub const LEN: usize = $n;
            /// Bytes of the group: `size_of::<Self>()`.
            pub const BYTES: usize = 2 + $n;

            /// The stored scale.
            pub fn scale(&self) -> f32 {
                f16::from_le_bytes(self.scale).to_f32()
            }

            /// The code of element `i`, `None` past the group.
            pub fn code(&self, i: usize) -> Option<i8> {
                self.codes.get(i).copied()
            }

            /// The dequantized element `i`, `None` past the group.
            pub fn get(&self, i: usize) -> Option<f32> {
                (i < $n).then(|| QuantGroup::value(self, i))
            }
        }

        impl QuantGroup for $name {
            const LEN: usize = $n;
            const FORMAT: RowFormat = RowFormat::Int8 { group: Group::$group };

            fn params(x: &[f32], base: usize) -> Result<(f16, f16)> {
                let (i, v) = argmax_abs(x);
                let s = sym_scale(v.abs()).ok_or(QuantError::OutOfRange {
                    format: Self::FORMAT.name(),
                    index: base + i,
                    value: v,
                })?;
                Ok((s, f16::ZERO))
            }

            fn encode(x: &[f32], scale: f16, _min: f16) -> Self {
                let s = scale.to_f32();
                let mut g = Self::zeroed();
                g.scale = scale.to_le_bytes();
                for (c, &v) in g.codes.iter_mut().zip(x) {
                    *c = sym_code(v, s);
                }
                g
            }

            #[inline]
            fn scale_min(&self) -> (f32, f32) {
                (f16_bits_to_f32(u16::from_le_bytes(self.scale)), 0.0)
            }

            #[inline]
            fn code_f32(&self, i: usize) -> f32 {
                f32::from(self.codes[i])
            }

            fn bound(&self) -> f64 {
                sym_bound(f64::from(self.scale()))
            }
        }
    };
}

macro_rules! asym_group {
    ($name:ident, $variant:ident, $group:ident, $n:literal, $bits:literal) => {
        #[doc = concat!(
            "One group of ", stringify!($n), " elements of an ", stringify!($bits),
            "-bit asymmetric row: 4 + ", stringify!($n), " * ", stringify!($bits),
            " / 8 bytes.\n\n",
            "`x̂[i] = min + scale * code[i]`, codes in 0..=2^", stringify!($bits), "-1 packed ",
            "low bits first: element `i` sits in byte `i * ", stringify!($bits), " / 8`, at bit ",
            "`(i * ", stringify!($bits), ") % 8`."
        )]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
        #[repr(C)]
        pub struct $name {
            /// Scale, IEEE binary16 bits, little-endian.
            pub scale: [u8; 2],
            /// Minimum, IEEE binary16 bits, little-endian.
            pub min: [u8; 2],
            /// Packed codes.
            pub codes: [u8; $n * $bits / 8],
        }

        impl $name {
            /// Elements in the group.
            pub const LEN: usize = $n;
            /// Bytes of the group: `size_of::<Self>()`.
            pub const BYTES: usize = 4 + $n * $bits / 8;
            /// Largest code: the number of steps above the minimum.
            pub const LEVELS: u8 = (1 << $bits) - 1;

            /// The stored scale.
            pub fn scale(&self) -> f32 {
                f16::from_le_bytes(self.scale).to_f32()
            }

            /// The stored minimum.
            pub fn min(&self) -> f32 {
                f16::from_le_bytes(self.min).to_f32()
            }

            /// The code of element `i`, `None` past the group.
            pub fn code(&self, i: usize) -> Option<u8> {
                let byte = self.codes.get(i * $bits / 8)?;
                Some((byte >> ((i * $bits) % 8)) & Self::LEVELS)
            }

            /// The dequantized element `i`, `None` past the group.
            pub fn get(&self, i: usize) -> Option<f32> {
                (i < $n).then(|| QuantGroup::value(self, i))
            }
        }

        impl QuantGroup for $name {
            const LEN: usize = $n;
            const FORMAT: RowFormat = RowFormat::$variant { group: Group::$group };

            fn params(x: &[f32], base: usize) -> Result<(f16, f16)> {
                let (lo, hi) = argmin_max(x);
                asym_params(x[lo], x[hi], f32::from(Self::LEVELS)).ok_or_else(|| {
                    let i = if x[hi].abs() >= x[lo].abs() { hi } else { lo };
                    QuantError::OutOfRange {
                        format: Self::FORMAT.name(),
                        index: base + i,
                        value: x[i],
                    }
                })
            }

            fn encode(x: &[f32], scale: f16, min: f16) -> Self {
                let (s, m) = (scale.to_f32(), min.to_f32());
                let levels = f32::from(Self::LEVELS);
                let mut g = Self::zeroed();
                g.scale = scale.to_le_bytes();
                g.min = min.to_le_bytes();
                for (i, &v) in x.iter().enumerate() {
                    let c = asym_code(v, s, m, levels);
                    g.codes[i * $bits / 8] |= c << ((i * $bits) % 8);
                }
                g
            }

            #[inline]
            fn scale_min(&self) -> (f32, f32) {
                (
                    f16_bits_to_f32(u16::from_le_bytes(self.scale)),
                    f16_bits_to_f32(u16::from_le_bytes(self.min)),
                )
            }

            #[inline]
            fn code_f32(&self, i: usize) -> f32 {
                let byte = self.codes[i * $bits / 8];
                f32::from((byte >> ((i * $bits) % 8)) & Self::LEVELS)
            }

            fn bound(&self) -> f64 {
                asym_bound(
                    f64::from(self.scale()),
                    f64::from(self.min()),
                    f64::from(Self::LEVELS),
                )
            }
        }
    };
}

int8_group!(Int8G32, G32, 32);
int8_group!(Int8G64, G64, 64);
int8_group!(Int8G128, G128, 128);
asym_group!(Int4G32, Int4, G32, 32, 4);
asym_group!(Int4G64, Int4, G64, 64, 4);
asym_group!(Int4G128, Int4, G128, 128, 4);
asym_group!(Int2G32, Int2, G32, 32, 2);
asym_group!(Int2G64, Int2, G64, 64, 2);
asym_group!(Int2G128, Int2, G128, 128, 2);

/// Runs `$body` with `$G` bound to the group struct of a quantized `$fmt`, or `$float` for
/// the float formats.
macro_rules! with_group {
    ($fmt:expr, $G:ident => $body:expr, _ => $float:expr) => {{
        use $crate::format::{Group, RowFormat};
        use $crate::layout::*;
        match $fmt {
            RowFormat::Int8 { group: Group::G32 } => {
                type $G = Int8G32;
                $body
            }
            RowFormat::Int8 { group: Group::G64 } => {
                type $G = Int8G64;
                $body
            }
            RowFormat::Int8 { group: Group::G128 } => {
                type $G = Int8G128;
                $body
            }
            RowFormat::Int4 { group: Group::G32 } => {
                type $G = Int4G32;
                $body
            }
            RowFormat::Int4 { group: Group::G64 } => {
                type $G = Int4G64;
                $body
            }
            RowFormat::Int4 { group: Group::G128 } => {
                type $G = Int4G128;
                $body
            }
            RowFormat::Int2 { group: Group::G32 } => {
                type $G = Int2G32;
                $body
            }
            RowFormat::Int2 { group: Group::G64 } => {
                type $G = Int2G64;
                $body
            }
            RowFormat::Int2 { group: Group::G128 } => {
                type $G = Int2G128;
                $body
            }
            RowFormat::F32 | RowFormat::F16 | RowFormat::Bf16 => $float,
        }
    }};
}
pub(crate) use with_group;

/// Half an f16 ulp at the stored value `h`: the round-to-nearest error bound of the f16
/// row format for the element stored as `h`.
pub(crate) fn f16_half_ulp(h: f16) -> f64 {
    let e = i32::from((h.to_bits() >> 10) & 0x1f);
    // Subnormals (e = 0) are spaced 2^-24 apart, like the smallest normal binade.
    2f64.powi(e.max(1) - 15 - 10 - 1)
}

/// Half a bf16 ulp at the stored value `h` (bf16 has 8 significant bits).
pub(crate) fn bf16_half_ulp(h: half::bf16) -> f64 {
    let e = i32::from((h.to_bits() >> 7) & 0xff);
    2f64.powi(e.max(1) - 127 - 7 - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_documented_layout() {
        assert_eq!(size_of::<Int8G32>(), 34);
        assert_eq!(size_of::<Int8G64>(), 66);
        assert_eq!(size_of::<Int8G128>(), 130);
        assert_eq!(size_of::<Int4G32>(), 20);
        assert_eq!(size_of::<Int4G64>(), 36);
        assert_eq!(size_of::<Int4G128>(), 68);
        assert_eq!(size_of::<Int2G32>(), 12);
        assert_eq!(size_of::<Int2G64>(), 20);
        assert_eq!(size_of::<Int2G128>(), 36);
        assert_eq!(align_of::<Int4G128>(), 1);
        for f in RowFormat::ALL.iter().filter(|f| f.is_quantized()) {
            let size = with_group!(*f, G => size_of::<G>(), _ => 0);
            assert_eq!(Some(size), f.group_bytes(), "{f}");
        }
    }

    #[test]
    fn f16_directed_rounding() {
        for v in [0.1f64, -0.1, 1.0, 65504.0, 1e-9, -1e-9, 3.0e-8, 1000.3] {
            let c = f16_ceil(v).to_f64();
            let f = f16_floor(v).to_f64();
            assert!(c >= v && f <= v, "{v}: floor {f} ceil {c}");
            // They are adjacent (or equal when v is representable).
            assert!(f16_next_up(f16_floor(v)).to_f64() >= c, "{v}");
        }
        assert_eq!(f16_ceil(0.0).to_bits(), 0);
        assert_eq!(f16_ceil(1e-30).to_bits(), 1);
        assert_eq!(f16_floor(-1e-30).to_bits(), 0x8001);
        assert!(f16_ceil(65504.5).is_infinite());
        assert!(f16_floor(-65504.5).is_infinite());
        assert_eq!(f16_floor(70000.0).to_f32(), 65504.0);
    }

    #[test]
    fn f16_conversion_is_exact_for_every_bit_pattern() {
        for h in 0..=u16::MAX {
            let want = f16::from_bits(h).to_f32();
            let got = f16_bits_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
            }
        }
    }

    #[test]
    fn half_ulps() {
        assert_eq!(f16_half_ulp(f16::from_f32(1.0)), 2f64.powi(-11));
        assert_eq!(f16_half_ulp(f16::from_f32(1.5)), 2f64.powi(-11));
        assert_eq!(f16_half_ulp(f16::from_bits(1)), 2f64.powi(-25));
        assert_eq!(f16_half_ulp(f16::from_bits(0x0400)), 2f64.powi(-25));
        assert_eq!(bf16_half_ulp(half::bf16::from_f32(1.0)), 2f64.powi(-8));
    }

    #[test]
    fn nibble_and_crumb_order_is_low_bits_first() {
        let x: Vec<f32> = (0..32).map(|i| (i % 16) as f32).collect();
        let (s, m) = Int4G32::params(&x, 0).expect("finite");
        assert_eq!((s.to_f32(), m.to_f32()), (1.0, 0.0));
        let g = Int4G32::encode(&x, s, m);
        // Element 0 (code 0) in the low nibble, element 1 (code 1) in the high nibble.
        assert_eq!(g.codes[0], 0x10);
        assert_eq!(g.codes[7], 0xfe);
        assert_eq!(g.code(15), Some(15));
        assert_eq!(g.code(32), None);

        let x: Vec<f32> = (0..32).map(|i| (i % 4) as f32).collect();
        let (s, m) = Int2G32::params(&x, 0).expect("finite");
        let g = Int2G32::encode(&x, s, m);
        assert_eq!(g.codes[0], 0b11_10_01_00);
        assert_eq!(g.get(3), Some(3.0));
    }
}
