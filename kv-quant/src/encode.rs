//! The quantizers (the write path), written once over the vector width ([`Simd`]) and run
//! at each SIMD level by [`crate::Kernels::quantize_row`].
//!
//! Same f32 operations in the same order as the scalar code (division, round half to
//! even, clamp), with scales chosen by the same shared functions ([`sym_scale`],
//! [`asym_params`]) from the same extrema (a maximum is the same in any order; the one
//! order-dependent case, the zero's sign, is normalised by [`asym_params`]), so the bytes
//! are identical at every level. On any problem the scalar quantizer is asked instead: it
//! is the one source of the (identical) error, and writes nothing.
//!
//! Lengths are those the public API checked (`out.len() == row_bytes(x.len())`); a wrong
//! length gives wrong bytes, never an out-of-bounds access (slices and fixed-size arrays).

use crate::error::{QuantError, Result};
use crate::format::RowFormat;
use crate::layout::{asym_params, sym_scale};
use crate::scalar;
use crate::simd::Simd;

/// Bits of +infinity: every finite |x| is below, NaN above.
const INF_BITS: u32 = 0x7f80_0000;

/// The largest `|x|` bit pattern of `x` (0 when empty), compared as an integer so that
/// NaN and infinities (`>= INF_BITS`) are found by the same pass. A loop the compiler
/// vectorises at the level it is inlined into.
#[inline(always)]
fn max_abs_bits(x: &[f32]) -> u32 {
    let mut m = 0;
    for v in x {
        m = m.max(v.to_bits() & 0x7fff_ffff);
    }
    m
}

/// Quantizes (or converts) a row; identical bytes and errors to the scalar code.
#[inline(always)]
pub(crate) fn quantize<S: Simd>(s: S, format: RowFormat, x: &[f32], out: &mut [u8]) -> Result<()> {
    match format {
        RowFormat::F32 => scalar::quantize(format, x, out),
        RowFormat::F16 | RowFormat::Bf16 => quantize_half(s, format, x, out),
        RowFormat::Int8 { group } => quantize_i8(s, format, group.size(), x, out),
        RowFormat::Int4 { group } => quantize_asym(s, format, group.size(), 4, x, out),
        RowFormat::Int2 { group } => quantize_asym(s, format, group.size(), 2, x, out),
    }
}

/// Largest |x| of a group (a multiple of 32 elements, NaN-free).
#[inline(always)]
fn amax<S: Simd>(s: S, xg: &[f32]) -> f32 {
    let mut m = s.zero();
    for c in S::lanes(xg).0 {
        m = s.max(m, s.abs(s.load(c)));
    }
    s.max_lane(m)
}

/// Smallest and largest element of a group (a multiple of 32 elements, NaN-free).
#[inline(always)]
fn range<S: Simd>(s: S, xg: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = (s.splat(f32::INFINITY), s.splat(f32::NEG_INFINITY));
    for c in S::lanes(xg).0 {
        let v = s.load(c);
        lo = s.min(lo, v);
        hi = s.max(hi, v);
    }
    (s.min_lane(lo), s.max_lane(hi))
}

#[inline(always)]
fn quantize_i8<S: Simd>(
    s: S,
    format: RowFormat,
    group: usize,
    x: &[f32],
    out: &mut [u8],
) -> Result<()> {
    // Pass 1: validate; any problem goes to the scalar code for its error. (Plain loops:
    // a closure passed to an iterator adapter may be compiled outside the level's
    // features.)
    if max_abs_bits(x) >= INF_BITS {
        return scalar::quantize(format, x, out);
    }
    for xg in x.chunks_exact(group) {
        if sym_scale(amax(s, xg)).is_none() {
            return scalar::quantize(format, x, out);
        }
    }
    let (lo, hi) = (s.splat(-127.0), s.splat(127.0));
    for (xg, og) in x.chunks_exact(group).zip(out.chunks_exact_mut(2 + group)) {
        let Some(scale) = sym_scale(amax(s, xg)) else {
            return scalar::quantize(format, x, out);
        };
        let (head, codes) = og.split_at_mut(2);
        head.copy_from_slice(&scale.to_le_bytes());
        let sf = scale.to_f32();
        let sv = s.splat(sf);
        let (c32, _) = codes.as_chunks_mut::<32>();
        for (o, x32) in c32.iter_mut().zip(xg.as_chunks::<32>().0) {
            *o = if sf == 0.0 {
                [0; 32]
            } else {
                let mut v = s.load32(x32);
                for v in v.as_mut() {
                    *v = s.round_clamp(s.div(*v, sv), lo, hi);
                }
                s.pack32_i8(v)
            };
        }
    }
    Ok(())
}

#[inline(always)]
fn quantize_asym<S: Simd>(
    s: S,
    format: RowFormat,
    group: usize,
    bits: usize,
    x: &[f32],
    out: &mut [u8],
) -> Result<()> {
    let levels = ((1u32 << bits) - 1) as f32;
    let params = |xg: &[f32]| {
        let (lo, hi) = range(s, xg);
        asym_params(lo, hi, levels)
    };
    if max_abs_bits(x) >= INF_BITS {
        return scalar::quantize(format, x, out);
    }
    for xg in x.chunks_exact(group) {
        if params(xg).is_none() {
            return scalar::quantize(format, x, out);
        }
    }
    let gbytes = 4 + group * bits / 8;
    let (zero, top) = (s.zero(), s.splat(levels));
    for (xg, og) in x.chunks_exact(group).zip(out.chunks_exact_mut(gbytes)) {
        let Some((scale, min)) = params(xg) else {
            return scalar::quantize(format, x, out);
        };
        let (head, codes) = og.split_at_mut(4);
        head[..2].copy_from_slice(&scale.to_le_bytes());
        head[2..].copy_from_slice(&min.to_le_bytes());
        let (sv, mv) = (s.splat(scale.to_f32()), s.splat(min.to_f32()));
        let zero_scale = scale.to_f32() == 0.0;
        // Each 32 elements make 32 * bits / 8 bytes.
        for (x32, o) in xg
            .as_chunks::<32>()
            .0
            .iter()
            .zip(codes.chunks_exact_mut(4 * bits))
        {
            if zero_scale {
                o.fill(0);
                continue;
            }
            let mut v = s.load32(x32);
            for v in v.as_mut() {
                *v = s.round_clamp(s.div(s.sub(*v, mv), sv), zero, top);
            }
            let b = s.pack32_i8(v);
            if bits == 4 {
                o.copy_from_slice(&pack_nibbles(&b));
            } else {
                o.copy_from_slice(&pack_crumbs(&b));
            }
        }
    }
    Ok(())
}

/// 32 codes below 16, one per byte → 16 bytes, low nibble first.
#[inline(always)]
fn pack_nibbles(c: &[u8; 32]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, c8) in out
        .as_chunks_mut::<4>()
        .0
        .iter_mut()
        .zip(c.as_chunks::<8>().0)
    {
        let v = u64::from_le_bytes(*c8);
        // Byte 2j: code 2j | code 2j+1 << 4; then the even bytes moved together.
        let x = (v | v >> 4) & 0x00ff_00ff_00ff_00ff;
        let y = (x | x >> 8) & 0x0000_ffff_0000_ffff;
        *o = ((y | y >> 16) as u32).to_le_bytes();
    }
    out
}

/// 32 codes below 4, one per byte → 8 bytes, low bits first.
#[inline(always)]
fn pack_crumbs(c: &[u8; 32]) -> [u8; 8] {
    let mut out = [0u8; 8];
    for (o, c8) in out
        .as_chunks_mut::<2>()
        .0
        .iter_mut()
        .zip(c.as_chunks::<8>().0)
    {
        let v = u64::from_le_bytes(*c8);
        // 16-bit lane k: codes 2k | 2k+1 << 2; 32-bit lane: a byte of four codes; then two.
        let x = (v | v >> 6) & 0x000f_000f_000f_000f;
        let y = (x | x >> 12) & 0x0000_00ff_0000_00ff;
        *o = ((y | y >> 24) as u16).to_le_bytes();
    }
    out
}

/// f16 and bf16 conversion (round to nearest even, like `half`).
#[inline(always)]
fn quantize_half<S: Simd>(s: S, format: RowFormat, x: &[f32], out: &mut [u8]) -> Result<()> {
    let f16 = format == RowFormat::F16;
    let limit = if f16 {
        scalar::F16_LIMIT.to_bits()
    } else {
        scalar::BF16_LIMIT_BITS
    };
    if max_abs_bits(x) >= limit {
        return scalar::quantize(format, x, out);
    }
    let (xl, xt) = S::lanes(x);
    let (ol, ot) = S::halves_mut(out);
    for (o, c) in ol.iter_mut().zip(xl) {
        if f16 {
            s.to_f16(s.load(c), o);
        } else {
            s.to_bf16(s.load(c), o);
        }
    }
    // Tail: scalar conversion of the last elements (already range-checked).
    let tail_start = x.len() - xt.len();
    scalar::quantize(format, xt, ot).map_err(|e| shift_index(e, tail_start))
}

/// Re-bases the index of an error from a sub-slice (defensive: the tail was checked).
fn shift_index(e: QuantError, by: usize) -> QuantError {
    match e {
        QuantError::NonFinite { index, value } => QuantError::NonFinite {
            index: index + by,
            value,
        },
        QuantError::OutOfRange {
            format,
            index,
            value,
        } => QuantError::OutOfRange {
            format,
            index: index + by,
            value,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_matches_the_element_order() {
        let c: [u8; 32] = core::array::from_fn(|i| (i * 7 % 16) as u8);
        let want: Vec<u8> = c.chunks(2).map(|p| p[0] | p[1] << 4).collect();
        assert_eq!(pack_nibbles(&c).to_vec(), want);
        let c: [u8; 32] = core::array::from_fn(|i| (i * 5 % 4) as u8);
        let want: Vec<u8> = c
            .chunks(4)
            .map(|p| p[0] | p[1] << 2 | p[2] << 4 | p[3] << 6)
            .collect();
        assert_eq!(pack_crumbs(&c).to_vec(), want);
    }
}
