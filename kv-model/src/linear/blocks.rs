//! The 32-weight GGUF block types of the first quantized files: Q4_0, Q4_1 and Q8_0.
//!
//! A 4-bit block has only 16 possible weights, `q * d + m` (Q4_1) or `(q - 8) * d` (Q4_0);
//! [`Simd::lookup16_split`] gets them with a lane permute from a table computed once per
//! block at 512 bits, and by converting and scaling the codes at 256 bits. Both give the
//! values candle's `to_float` computes (`q * d` is exact in f32, so `fma(q, d, m)` rounds
//! like `q * d + m`): the weights are candle's, bit for bit. Q8_0's integers are kept
//! unscaled for the dot products, its scale applied once to each block's partial sum.

use kv_quant::simd::Simd;

use super::matvec::{bytes, f16_at, Chunk, Format, Sink, CHUNK};

/// 18 bytes: f16 scale `d`, 16 bytes of nibbles; `w = (q - 8) * d`.
pub(super) struct Q4_0;
/// 20 bytes: f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles; `w = q * d + m`.
pub(super) struct Q4_1;
/// 34 bytes: f16 scale `d`, 32 signed bytes; `w = q * d`.
pub(super) struct Q8_0;

/// Byte `j` of the 16 at `at` holds weight `j` (low nibble) and weight `j + 16` (high).
fn nibbles(b: &[u8], at: usize, out: &mut [f32], w: impl Fn(u8) -> f32) {
    for (j, &q) in bytes::<16>(b, at).iter().enumerate() {
        out[j] = w(q & 0x0F);
        out[j + CHUNK / 2] = w(q >> 4);
    }
}

impl Format for Q4_0 {
    const BYTES: usize = 18;
    const CHUNKS: usize = 1;
    fn block_scalar(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        // A product like candle's: q = 8 gives -0.0 when d < 0.
        nibbles(b, 2, out, |q| f32::from(q as i8 - 8) * d);
    }
    #[inline(always)]
    fn block_simd<S: Simd>(s: S, b: &[u8], sink: &mut impl Sink<S>) {
        let (d, _) = s.splat_f16_pair(*bytes::<4>(b, 0));
        let w = s.lookup16_split(s.lut16_centered(d), bytes::<16>(b, 2));
        sink.chunk(0, Chunk::weights(w));
    }
}

impl Format for Q4_1 {
    const BYTES: usize = 20;
    const CHUNKS: usize = 1;
    fn block_scalar(b: &[u8], out: &mut [f32]) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        nibbles(b, 4, out, |q| f32::from(q) * d + m);
    }
    #[inline(always)]
    fn block_simd<S: Simd>(s: S, b: &[u8], sink: &mut impl Sink<S>) {
        let (d, m) = s.splat_f16_pair(*bytes::<4>(b, 0));
        let w = s.lookup16_split(s.lut16_affine(d, m), bytes::<16>(b, 4));
        sink.chunk(0, Chunk::weights(w));
    }
}

impl Format for Q8_0 {
    const BYTES: usize = 34;
    const CHUNKS: usize = 1;
    fn block_scalar(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 0);
        for (o, &q) in out.iter_mut().zip(bytes::<32>(b, 2)) {
            *o = f32::from(q as i8) * d;
        }
    }
    #[inline(always)]
    fn block_simd<S: Simd>(s: S, b: &[u8], sink: &mut impl Sink<S>) {
        let (d, _) = s.splat_f16_pair(*bytes::<4>(b, 0));
        sink.chunk(
            0,
            Chunk {
                w: s.codes32_i8(bytes::<32>(b, 2)),
                scale: Some(d),
            },
        );
    }
}
