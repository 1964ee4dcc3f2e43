//! Scalar reference kernels: the definitions the SIMD kernels are tested against, and the
//! portable fallback on CPUs without them.
//!
//! Every function here takes arguments whose lengths the public API has already checked
//! (`q.len() == head_dim`, `row.len() == row_bytes(head_dim)`, ...). They are written for
//! clarity: a dot product is literally `sum q[i] * x̂[i]` with `x̂` the dequantized element,
//! summed left to right in f32.

use half::{bf16, f16};

use crate::error::{QuantError, Result};
use crate::format::RowFormat;
use crate::layout::{with_group, QuantGroup};

/// Largest |x| that rounds to a finite f16 is just below this (65504 + half an ulp; the
/// tie rounds to even, which is infinity).
pub(crate) const F16_LIMIT: f32 = 65520.0;

/// Bits of the smallest |x| that rounds to bf16 infinity (the tie above bf16::MAX).
pub(crate) const BF16_LIMIT_BITS: u32 = 0x7f7f_8000;

/// `Err(NonFinite)` at the first NaN or infinity.
pub(crate) fn check_finite(x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            index,
            value: x[index],
        }),
        None => Ok(()),
    }
}

/// Checks that every element of `x` has a finite image in the float `format`.
pub(crate) fn check_float_range(format: RowFormat, x: &[f32]) -> Result<()> {
    check_finite(x)?;
    let fits = |v: f32| match format {
        RowFormat::F16 => v.abs() < F16_LIMIT,
        RowFormat::Bf16 => v.abs().to_bits() < BF16_LIMIT_BITS,
        _ => true,
    };
    match x.iter().position(|&v| !fits(v)) {
        Some(index) => Err(QuantError::OutOfRange {
            format: format.name(),
            index,
            value: x[index],
        }),
        None => Ok(()),
    }
}

/// Validates every group of a quantized row (finite, scales fit f16) without writing.
pub(crate) fn check_groups<G: QuantGroup>(x: &[f32]) -> Result<()> {
    check_finite(x)?;
    for (gi, xg) in x.chunks_exact(G::LEN).enumerate() {
        G::params(xg, gi * G::LEN)?;
    }
    Ok(())
}

fn encode_groups<G: QuantGroup>(x: &[f32], out: &mut [u8]) -> Result<()> {
    // Validate the whole row first so that a rejected row leaves `out` untouched.
    check_groups::<G>(x)?;
    let gbytes = size_of::<G>();
    for (gi, (xg, og)) in x
        .chunks_exact(G::LEN)
        .zip(out.chunks_exact_mut(gbytes))
        .enumerate()
    {
        let (s, m) = G::params(xg, gi * G::LEN)?;
        og.copy_from_slice(bytemuck::bytes_of(&G::encode(xg, s, m)));
    }
    Ok(())
}

/// Quantizes (or converts) `x` into `out`; on error `out` is unchanged.
pub(crate) fn quantize(format: RowFormat, x: &[f32], out: &mut [u8]) -> Result<()> {
    with_group!(format, G => encode_groups::<G>(x, out), _ => {
        check_float_range(format, x)?;
        match format {
            RowFormat::F16 => {
                for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                    o.copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
            RowFormat::Bf16 => {
                for (o, &v) in out.chunks_exact_mut(2).zip(x) {
                    o.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
                }
            }
            _ => {
                for (o, &v) in out.chunks_exact_mut(4).zip(x) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        Ok(())
    })
}

/// The element decoders of the float formats.
#[inline]
pub(crate) fn f32_at(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}
#[inline]
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    crate::layout::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))
}
#[inline]
pub(crate) fn bf16_at(b: &[u8]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
}

/// Calls `f(i, x̂[i])` for every element of a row in order. Generic over `f` and matched
/// once per row, so every loop below is monomorphic and inlined.
#[inline]
fn for_each_value(format: RowFormat, row: &[u8], mut f: impl FnMut(usize, f32)) {
    with_group!(format, G => {
        for (gi, gb) in row.chunks_exact(size_of::<G>()).enumerate() {
            let g: &G = bytemuck::from_bytes(gb);
            // Scale and minimum once per group; `m + s * c` is `QuantGroup::value`.
            let (s, m) = g.scale_min();
            for i in 0..G::LEN {
                f(gi * G::LEN + i, m + s * g.code_f32(i));
            }
        }
    }, _ => match format {
        RowFormat::F16 => {
            for (i, b) in row.chunks_exact(2).enumerate() {
                f(i, f16_at(b));
            }
        }
        RowFormat::Bf16 => {
            for (i, b) in row.chunks_exact(2).enumerate() {
                f(i, bf16_at(b));
            }
        }
        _ => {
            for (i, b) in row.chunks_exact(4).enumerate() {
                f(i, f32_at(b));
            }
        }
    })
}

/// `out[i] = x̂[i]`.
pub(crate) fn dequantize(format: RowFormat, row: &[u8], out: &mut [f32]) {
    for_each_value(format, row, |i, v| out[i] = v);
}

/// `sum_i q[i] * x̂[i]`, left to right in f32.
pub(crate) fn dot(format: RowFormat, q: &[f32], row: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for_each_value(format, row, |i, v| sum += q[i] * v);
    sum
}

/// `acc[i] += w * x̂[i]`.
pub(crate) fn axpy(format: RowFormat, w: f32, row: &[u8], acc: &mut [f32]) {
    for_each_value(format, row, |i, v| acc[i] += w * v);
}

/// The error bound of a stored row (see [`crate::layout`]): the largest per-element bound.
pub(crate) fn error_bound(format: RowFormat, row: &[u8]) -> f64 {
    with_group!(format, G => {
        row.chunks_exact(size_of::<G>())
            .map(|gb| bytemuck::from_bytes::<G>(gb).bound())
            .fold(0.0, f64::max)
    }, _ => match format {
        RowFormat::F16 => row
            .chunks_exact(2)
            .map(|b| crate::layout::f16_half_ulp(f16::from_le_bytes([b[0], b[1]])))
            .fold(0.0, f64::max),
        RowFormat::Bf16 => row
            .chunks_exact(2)
            .map(|b| crate::layout::bf16_half_ulp(bf16::from_le_bytes([b[0], b[1]])))
            .fold(0.0, f64::max),
        _ => 0.0,
    })
}
