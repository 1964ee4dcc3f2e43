//! Portable kernels: the reference the SIMD kernels are tested against, and the fallback on
//! CPUs without AVX2.

use super::{BlockType, BLOCK};

/// The f16 at `b[0..2]` (little-endian), as f32.
fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Expands one block (`ty.bytes()` bytes) into 32 weights, exactly as candle's `to_float`
/// does. Q4_1's `q * d + m` has `q * d` exact in f32 (a 4-bit integer times an f16), so the
/// fused `fma(q, d, m)` of the SIMD kernels rounds identically.
pub(super) fn dequantize_block(ty: BlockType, b: &[u8], out: &mut [f32; BLOCK]) {
    let d = f16_at(b);
    match ty {
        BlockType::Q4_0 => {
            // A product like candle's: q = 8 gives -0.0 when d < 0.
            for (j, &q) in b[2..18].iter().enumerate() {
                out[j] = f32::from((q & 0x0F) as i8 - 8) * d;
                out[j + BLOCK / 2] = f32::from((q >> 4) as i8 - 8) * d;
            }
        }
        BlockType::Q4_1 => {
            let m = f16_at(&b[2..]);
            for (j, &q) in b[4..20].iter().enumerate() {
                out[j] = f32::from(q & 0x0F) * d + m;
                out[j + BLOCK / 2] = f32::from(q >> 4) * d + m;
            }
        }
        BlockType::Q8_0 => {
            for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                *o = f32::from(q as i8) * d;
            }
        }
    }
}

/// Expands one row of blocks into `out` (`out.len()` weights, a multiple of 32).
pub(super) fn dequantize_row(ty: BlockType, row: &[u8], out: &mut [f32]) {
    for (b, o) in row
        .chunks_exact(ty.bytes())
        .zip(out.as_chunks_mut::<BLOCK>().0)
    {
        dequantize_block(ty, b, o);
    }
}

/// `out[i] = dot(row, x[i * cols..][..cols])` for every `i < out.len()`.
pub(super) fn dot_rows(ty: BlockType, row: &[u8], x: &[f32], cols: usize, out: &mut [f32]) {
    let mut w = [0f32; BLOCK];
    out.fill(0.0);
    for (bi, b) in row.chunks_exact(ty.bytes()).enumerate() {
        dequantize_block(ty, b, &mut w);
        for (i, o) in out.iter_mut().enumerate() {
            let xs = &x[i * cols + bi * BLOCK..][..BLOCK];
            *o += w.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
        }
    }
}

/// [`dot_rows`] for each weight row of `rows` (`row_bytes` bytes each) into successive
/// `n`-element chunks of `out` (`row_bytes`, `n` > 0).
pub(super) fn dot_matrix(
    ty: BlockType,
    rows: &[u8],
    row_bytes: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &mut [f32],
) {
    for (row, o) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        dot_rows(ty, row, x, cols, o);
    }
}
