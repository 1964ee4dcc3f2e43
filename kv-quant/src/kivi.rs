//! KIVI-style keys: quantized per *channel* across the tokens of a block.
//!
//! Keys of real models have outlier channels: a few of the `head_dim` coordinates are large
//! for every token. Per-token quantization (one scale per group of a row) then spends its 16
//! or 4 levels on that outlier, and the ordinary channels of the same group collapse onto a
//! couple of codes. KIVI (Liu et al., 2024) quantizes keys per channel instead: for each
//! channel, one scale and minimum over the `T` tokens of a block, so an outlier channel only
//! costs itself. Values have no such channels and stay per token ([`RowFormat::Int4`] /
//! [`RowFormat::Int2`]).
//!
//! A per-channel scale needs all `T` tokens, so a block is quantized once it is full. Until
//! then its tokens live in a small f16 *residual window* (one partial block per sequence,
//! head and layer, at most `T - 1` tokens, scored with [`RowFormat::F16`] rows). This crate
//! provides the block kernels; the backend owns the window: append f16 rows, and when `T`
//! are there call [`KiviKeyFormat::quantize_block`] and drop them.
//!
//! # Byte layout of a block (`D = head_dim`, `T = block_tokens`, `b` = 2 or 4 bits)
//!
//! | offset                 | bytes      | contents                                      |
//! |------------------------|------------|-----------------------------------------------|
//! | 0                      | `2 D`      | per-channel scale `s[c]`, f16 little-endian   |
//! | `2 D`                  | `2 D`      | per-channel minimum `m[c]`, f16 little-endian |
//! | `4 D + t * D b / 8`    | `D b / 8`  | token `t`'s codes, channel order, low bits first |
//!
//! `k̂[t][c] = m[c] + s[c] * code[t][c]`. Scale and minimum are chosen per channel exactly as
//! for an asymmetric row group (see [`crate::layout`]), so the same error bound holds per
//! element: `|k - k̂| <= s[c] (1/2 + 2^-19) + 2^-24 (|m[c]| + L s[c])`, `L = 2^b - 1`.
//!
//! Block bytes `= 4 D + T D b / 8`; amortised per token `D b / 8 + 4 D / T`. For `D = 64`:
//!
//! | layout        | T = 32 | T = 64 | T = 128 | (per-token int4-g32 row: 40; f16: 128) |
//! |---------------|-------:|-------:|--------:|------|
//! | 4-bit (bytes/token) | 40 | 36 | 34 | |
//! | 2-bit (bytes/token) | 24 | 20 | 18 | |
//!
//! plus, per sequence, the residual window of up to `T - 1` f16 rows (`2 D` bytes each).
//!
//! Token codes are token-major so a score is, per token, a dot product of the f32 vector
//! `q[c] * s[c]` (computed once per block) with that token's codes, plus the block constant
//! `sum q[c] m[c]`: one multiply-add per element, the same work as an int4 row.

use std::fmt;

use half::f16;

use crate::error::{checked_len, expect_len, QuantError, Result};
use crate::kernels::Kernels;
use crate::layout::{asym_bound, asym_code, asym_params, f16_bits_to_f32};
#[cfg(doc)]
use crate::RowFormat;

/// Code width of a KIVI key block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KiviBits {
    /// 2 bits: codes 0..=3.
    B2,
    /// 4 bits: codes 0..=15.
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

    /// Largest code, the number of steps above the minimum.
    pub const fn levels(self) -> u8 {
        match self {
            KiviBits::B2 => 3,
            KiviBits::B4 => 15,
        }
    }
}

/// A KIVI key block format: `block_tokens` keys of one head quantized per channel with
/// `bits`-bit codes (layout in the [module docs](crate::kivi)).
///
/// ```
/// use kv_quant::{KiviBits, KiviKeyFormat};
///
/// let fmt = KiviKeyFormat::new(KiviBits::B4, 32);
/// let head_dim = 64;
/// // 32 tokens x 64 channels; channel 3 is an outlier channel.
/// let keys: Vec<f32> = (0..32 * head_dim)
///     .map(|i| if i % head_dim == 3 { 40.0 } else { ((i * 7) % 13) as f32 * 0.1 - 0.6 })
///     .collect();
/// let mut block = vec![0u8; fmt.block_bytes(head_dim)?];
/// fmt.quantize_block(&keys, head_dim, &mut block)?;
/// assert_eq!(block.len(), 4 * 64 + 32 * 32); // 40 bytes per token
///
/// let q = vec![0.25f32; head_dim];
/// let mut scores = vec![0.0f32; 32];
/// fmt.scores(&q, &block, &mut scores)?;
///
/// let mut k_hat = vec![0.0f32; keys.len()];
/// fmt.dequantize_block(&block, head_dim, &mut k_hat)?;
/// let exact: f32 = q.iter().zip(&k_hat[..head_dim]).map(|(a, b)| a * b).sum();
/// assert!((scores[0] - exact).abs() < 1e-3);
/// # Ok::<(), kv_quant::QuantError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KiviKeyFormat {
    /// Code width.
    pub bits: KiviBits,
    /// Tokens per block `T`, the span of each channel scale (KIVI uses 32).
    pub block_tokens: usize,
}

impl fmt::Display for KiviKeyFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kivi{}-t{}", self.bits.bits(), self.block_tokens)
    }
}

/// Name used in errors.
const NAME: &str = "kivi-keys";

impl KiviKeyFormat {
    /// `bits`-bit codes, `block_tokens` tokens per block. Checked when used
    /// ([`validate`](Self::validate)).
    pub const fn new(bits: KiviBits, block_tokens: usize) -> Self {
        KiviKeyFormat { bits, block_tokens }
    }

    /// Checks the shape: `block_tokens >= 1` and `head_dim` a non-zero multiple of 32 (the
    /// SIMD step, and whole bytes of codes per token for both widths).
    ///
    /// # Errors
    /// [`QuantError::InvalidBlockTokens`] or [`QuantError::InvalidHeadDim`].
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        if self.block_tokens == 0 {
            return Err(QuantError::InvalidBlockTokens {
                block_tokens: self.block_tokens,
            });
        }
        if head_dim == 0 || !head_dim.is_multiple_of(32) {
            return Err(QuantError::InvalidHeadDim {
                format: NAME,
                head_dim,
                multiple_of: 32,
            });
        }
        Ok(())
    }

    /// Bytes of one token's codes: `head_dim * bits / 8`.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn token_code_bytes(&self, head_dim: usize) -> Result<usize> {
        self.validate(head_dim)?;
        Ok(head_dim / 8 * self.bits.bits())
    }

    /// Exact bytes of one full block, scales and minimums included: `4 D + T D b / 8`.
    ///
    /// # Errors
    /// As [`validate`](Self::validate); [`QuantError::SizeOverflow`] if it does not fit
    /// `usize`.
    pub fn block_bytes(&self, head_dim: usize) -> Result<usize> {
        let codes = self.token_code_bytes(head_dim)?;
        codes
            .checked_mul(self.block_tokens)
            .and_then(|c| c.checked_add(head_dim.checked_mul(4)?))
            .ok_or(QuantError::SizeOverflow {
                format: NAME,
                head_dim,
            })
    }

    /// Average bytes per token of a full block (codes plus amortised scales):
    /// `block_bytes / T`, as a float because it need not be whole.
    ///
    /// # Errors
    /// As [`block_bytes`](Self::block_bytes).
    pub fn bytes_per_token(&self, head_dim: usize) -> Result<f64> {
        Ok(self.block_bytes(head_dim)? as f64 / self.block_tokens as f64)
    }

    /// Checks a block's length for `head_dim`.
    pub(crate) fn check_block(&self, head_dim: usize, len: usize) -> Result<()> {
        expect_len("block", self.block_bytes(head_dim)?, len)
    }

    /// Quantizes a full block: `keys` is `block_tokens x head_dim`, token-major (each token's
    /// key row contiguous, as the model produces them). On error `out` is unchanged.
    ///
    /// Scalar at every level: it runs once per `T` tokens, off the decode hot path.
    ///
    /// # Errors
    /// Shape errors as [`validate`](Self::validate); [`QuantError::LengthMismatch`] for
    /// `keys` or `out`; [`QuantError::NonFinite`] (index into `keys`) for NaN/infinity;
    /// [`QuantError::OutOfRange`] if a channel's scale or minimum does not fit f16.
    pub fn quantize_block(&self, keys: &[f32], head_dim: usize, out: &mut [u8]) -> Result<()> {
        let bytes = self.block_bytes(head_dim)?;
        expect_len(
            "keys",
            checked_len("keys", self.block_tokens, head_dim)?,
            keys.len(),
        )?;
        expect_len("out", bytes, out.len())?;
        crate::scalar::check_finite(keys)?;

        // Pass 1: every channel's parameters, so a failure leaves `out` untouched.
        let levels = f32::from(self.bits.levels());
        let channel = |c: usize| keys.iter().skip(c).step_by(head_dim).copied();
        let params = |c: usize| -> Result<(f16, f16)> {
            let (lo, hi) = channel(c).fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
            asym_params(lo, hi, levels).ok_or_else(|| {
                let v = if hi.abs() >= lo.abs() { hi } else { lo };
                let t = channel(c).position(|x| x == v).unwrap_or(0);
                QuantError::OutOfRange {
                    format: NAME,
                    index: t * head_dim + c,
                    value: v,
                }
            })
        };
        for c in 0..head_dim {
            params(c)?;
        }

        // Pass 2: write.
        let (header, codes) = out.split_at_mut(4 * head_dim);
        let (scales, mins) = header.split_at_mut(2 * head_dim);
        codes.fill(0);
        let bits = self.bits.bits();
        let stride = head_dim / 8 * bits;
        for c in 0..head_dim {
            let (s, m) = params(c)?;
            scales[2 * c..2 * c + 2].copy_from_slice(&s.to_le_bytes());
            mins[2 * c..2 * c + 2].copy_from_slice(&m.to_le_bytes());
            let (s, m) = (s.to_f32(), m.to_f32());
            for (t, v) in channel(c).enumerate() {
                let code = asym_code(v, s, m, levels);
                codes[t * stride + c * bits / 8] |= code << ((c * bits) % 8);
            }
        }
        Ok(())
    }

    /// Writes the dequantized block (`block_tokens x head_dim`, token-major) into `out`.
    ///
    /// # Errors
    /// Shape errors as [`validate`](Self::validate); [`QuantError::LengthMismatch`] for
    /// `block` or `out`.
    pub fn dequantize_block(&self, block: &[u8], head_dim: usize, out: &mut [f32]) -> Result<()> {
        self.check_block(head_dim, block.len())?;
        expect_len(
            "out",
            checked_len("out", self.block_tokens, head_dim)?,
            out.len(),
        )?;
        for (t, row) in out.chunks_exact_mut(head_dim).enumerate() {
            for (c, o) in row.iter_mut().enumerate() {
                *o = self.value(block, head_dim, t, c);
            }
        }
        Ok(())
    }

    /// `k̂[t][c]` read from the bytes (shape already checked).
    #[inline]
    fn value(&self, block: &[u8], head_dim: usize, t: usize, c: usize) -> f32 {
        let bits = self.bits.bits();
        let s = f16::from_le_bytes([block[2 * c], block[2 * c + 1]]).to_f32();
        let mo = 2 * head_dim + 2 * c;
        let m = f16::from_le_bytes([block[mo], block[mo + 1]]).to_f32();
        let byte = block[4 * head_dim + t * (head_dim / 8 * bits) + c * bits / 8];
        let code = (byte >> ((c * bits) % 8)) & self.bits.levels();
        m + s * f32::from(code)
    }

    /// Scores of `q` (`head_dim`) against every key of the block: `out[t] = q · k̂_t`,
    /// at [`Isa::best`](crate::Isa::best).
    ///
    /// The SIMD levels compute `sum_c (q[c] s[c]) code[t][c] + sum_c q[c] m[c]`, which
    /// differs from the reference `sum_c q[c] k̂[t][c]` by rounding only: within
    /// `(2 head_dim + 8) 2^-24 sum_c |q[c]| (|m[c]| + s[c] code[t][c])`.
    ///
    /// # Errors
    /// As [`Kernels::kivi_scores`].
    pub fn scores(&self, q: &[f32], block: &[u8], out: &mut [f32]) -> Result<()> {
        Kernels::best().kivi_scores(*self, q, block, out)
    }

    /// The largest possible |k - k̂| of any element stored in `block` (the bound in the
    /// module docs, evaluated with its stored scales).
    ///
    /// # Errors
    /// Shape errors as [`validate`](Self::validate); [`QuantError::LengthMismatch`] for
    /// `block`.
    pub fn error_bound(&self, block: &[u8], head_dim: usize) -> Result<f64> {
        self.check_block(head_dim, block.len())?;
        let levels = f64::from(self.bits.levels());
        Ok((0..head_dim)
            .map(|c| {
                let s = f16::from_le_bytes([block[2 * c], block[2 * c + 1]]).to_f64();
                let mo = 2 * head_dim + 2 * c;
                let m = f16::from_le_bytes([block[mo], block[mo + 1]]).to_f64();
                asym_bound(s, m, levels)
            })
            .fold(0.0, f64::max))
    }
}

/// Reference scores: `out[t] = sum_c q[c] * k̂[t][c]`, summed over `c` in order for every
/// token (channels in the outer loop, so each channel's scale and minimum are decoded once;
/// the order of additions into each `out[t]` is still `c = 0, 1, ...`). Shape checked.
pub(crate) fn scores_reference(format: KiviKeyFormat, q: &[f32], block: &[u8], out: &mut [f32]) {
    let head_dim = q.len();
    let bits = format.bits.bits();
    let stride = head_dim / 8 * bits;
    let (params, codes) = block.split_at(4 * head_dim);
    let (scales, mins) = params.split_at(2 * head_dim);
    out.fill(0.0);
    for (c, &qc) in q.iter().enumerate() {
        let s = f16_bits_to_f32(u16::from_le_bytes([scales[2 * c], scales[2 * c + 1]]));
        let m = f16_bits_to_f32(u16::from_le_bytes([mins[2 * c], mins[2 * c + 1]]));
        let (byte, shift) = (c * bits / 8, (c * bits) % 8);
        for (o, tc) in out.iter_mut().zip(codes.chunks_exact(stride)) {
            let code = (tc[byte] >> shift) & format.bits.levels();
            *o += qc * (m + s * f32::from(code));
        }
    }
}
