//! AVX-512F kernels (16 f32 lanes).
//!
//! The contract is the AVX2 file's: the CPU must support AVX-512F and F16C (checked by
//! [`super::Kernels`] before any call), and every raw load reads from a fixed-size array.
//!
//! A 4-bit block has only 16 possible weights, `d * q + m` (Q4_1) or `(q - 8) * d` (Q4_0)
//! for `q` in `0..16`. They are computed once per block into one register, and each 16
//! weights are looked up with a lane permute indexed by the nibbles: no int-to-float
//! conversion per weight, which is what bounds the AVX2 kernel. The table holds the same
//! values candle's `to_float` computes (`q * d` is exact in f32, so `fma(q, d, m)` rounds
//! like `q * d + m`), so the weights are bit-for-bit candle's.

use core::arch::x86_64::*;

use super::avx2::{Q4_1, Q8_0};
use super::BLOCK;

/// The two f16 at `b` (little-endian) as f32 in lanes 0 and 1: one narrow conversion for a
/// block's scale and minimum instead of a 16-lane conversion for each.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn f16_pair(b: [u8; 4]) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(b)))
}

#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn load_16(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

/// The 32 f32 of `x` as two vectors, in order.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn load_x(x: &[f32; BLOCK]) -> [__m512; 2] {
    let p = x.as_ptr();
    // SAFETY: `x` is 32 readable f32 and each load reads 16 of them at offsets 0 and 16;
    // `loadu` has no alignment requirement.
    unsafe { [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))] }
}

/// 16 signed bytes as f32.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn i8_lanes(q: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))
}

/// The 32 weights of one block (`BYTES` bytes of type `TY`) as two vectors, in order.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn weights<const TY: u8, const BYTES: usize>(b: &[u8; BYTES]) -> [__m512; 2] {
    let dm = f16_pair([b[0], b[1], b[2], b[3]]);
    let d = _mm512_broadcastss_ps(dm);
    if TY == Q8_0 {
        let mut lo = [0u8; 16];
        let mut hi = [0u8; 16];
        lo.copy_from_slice(&b[2..18]);
        hi.copy_from_slice(&b[18..34]);
        return [
            _mm512_mul_ps(i8_lanes(load_16(&lo)), d),
            _mm512_mul_ps(i8_lanes(load_16(&hi)), d),
        ];
    }
    let iota = _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    );
    let (table, at) = if TY == Q4_1 {
        let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
        (_mm512_fmadd_ps(iota, d, m), 4)
    } else {
        // (q - 8) * d like candle: a product, so q = 8 gives -0.0 when d < 0.
        (
            _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(8.0)), d),
            2,
        )
    };
    let mut qs = [0u8; 16];
    qs.copy_from_slice(&b[at..at + 16]);
    // Byte j holds weight j (low nibble) and weight j + 16 (high nibble). The permute reads
    // only an index's low 4 bits, so the low nibbles need no mask.
    let q = _mm512_cvtepu8_epi32(load_16(&qs));
    [
        _mm512_permutexvar_ps(q, table),
        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), table),
    ]
}

/// A block as the dot products use it: Q4 weights as [`weights`] gives them; Q8_0's
/// integers unscaled with the scale `d` apart, applied once to the block's partial sum (a
/// multiply per block, not per 16 weights).
#[derive(Clone, Copy)]
struct Block {
    w: [__m512; 2],
    d: __m512,
}

#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn block<const TY: u8, const BYTES: usize>(b: &[u8; BYTES]) -> Block {
    if TY != Q8_0 {
        return Block {
            w: weights::<TY, BYTES>(b),
            d: _mm512_setzero_ps(),
        };
    }
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    lo.copy_from_slice(&b[2..18]);
    hi.copy_from_slice(&b[18..34]);
    Block {
        w: [i8_lanes(load_16(&lo)), i8_lanes(load_16(&hi))],
        d: _mm512_broadcastss_ps(f16_pair([b[0], b[1], b[2], b[3]])),
    }
}

/// One block's FMAs into the accumulator pair `acc` (Q8_0: into `acc[0]` only).
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn fma_block<const TY: u8>(blk: Block, x: &[f32; BLOCK], acc: &mut [__m512; 2]) {
    let xv = load_x(x);
    if TY == Q8_0 {
        let t = _mm512_fmadd_ps(blk.w[1], xv[1], _mm512_mul_ps(blk.w[0], xv[0]));
        acc[0] = _mm512_fmadd_ps(t, blk.d, acc[0]);
        return;
    }
    acc[0] = _mm512_fmadd_ps(blk.w[0], xv[0], acc[0]);
    acc[1] = _mm512_fmadd_ps(blk.w[1], xv[1], acc[1]);
}

/// Sum of the two accumulator pairs in a fixed order, then of the 16 lanes: the same for
/// every row count, so a row's result does not depend on which rows it was computed with.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn reduce(a: [__m512; 2], b: [__m512; 2]) -> f32 {
    let v = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(b[0], b[1]));
    _mm512_reduce_add_ps(v)
}

/// `dot(row, x)` for one activation row. Even blocks go to one accumulator pair, odd
/// blocks to the other, so that four FMA chains are in flight.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn dot1<const TY: u8, const BYTES: usize>(blocks: &[[u8; BYTES]], x: &[[f32; BLOCK]]) -> f32 {
    let (mut even, mut odd) = ([_mm512_setzero_ps(); 2], [_mm512_setzero_ps(); 2]);
    let (pairs, rest) = blocks.as_chunks::<2>();
    let (xpairs, xrest) = x.as_chunks::<2>();
    for (b, xb) in pairs.iter().zip(xpairs) {
        fma_block::<TY>(block::<TY, BYTES>(&b[0]), &xb[0], &mut even);
        fma_block::<TY>(block::<TY, BYTES>(&b[1]), &xb[1], &mut odd);
    }
    if let ([b], [xb, ..]) = (rest, xrest) {
        fma_block::<TY>(block::<TY, BYTES>(b), xb, &mut even);
    }
    reduce(even, odd)
}

/// `dot(row, x0)` and `dot(row, x1)`, dequantizing each block once; each row's sums in the
/// order [`dot1`] uses.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn dot2<const TY: u8, const BYTES: usize>(
    blocks: &[[u8; BYTES]],
    x0: &[[f32; BLOCK]],
    x1: &[[f32; BLOCK]],
) -> (f32, f32) {
    let (mut even0, mut odd0) = ([_mm512_setzero_ps(); 2], [_mm512_setzero_ps(); 2]);
    let (mut even1, mut odd1) = ([_mm512_setzero_ps(); 2], [_mm512_setzero_ps(); 2]);
    let (pairs, rest) = blocks.as_chunks::<2>();
    let (x0pairs, x0rest) = x0.as_chunks::<2>();
    let (x1pairs, x1rest) = x1.as_chunks::<2>();
    for ((b, xb0), xb1) in pairs.iter().zip(x0pairs).zip(x1pairs) {
        let w = block::<TY, BYTES>(&b[0]);
        fma_block::<TY>(w, &xb0[0], &mut even0);
        fma_block::<TY>(w, &xb1[0], &mut even1);
        let w = block::<TY, BYTES>(&b[1]);
        fma_block::<TY>(w, &xb0[1], &mut odd0);
        fma_block::<TY>(w, &xb1[1], &mut odd1);
    }
    if let ([b], [xb0, ..], [xb1, ..]) = (rest, x0rest, x1rest) {
        let w = block::<TY, BYTES>(b);
        fma_block::<TY>(w, xb0, &mut even0);
        fma_block::<TY>(w, xb1, &mut even1);
    }
    (reduce(even0, odd0), reduce(even1, odd1))
}

/// `out[i] = dot(row, x[i * cols..][..cols])` for every `i < out.len()`.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn dot_rows<const TY: u8, const BYTES: usize>(row: &[u8], x: &[f32], cols: usize, out: &mut [f32]) {
    let blocks = row.as_chunks::<BYTES>().0;
    let xrow = |i: usize| x[i * cols..][..cols].as_chunks::<BLOCK>().0;
    let mut pairs = out.chunks_exact_mut(2);
    let mut i = 0;
    for o in &mut pairs {
        let (a, b) = dot2::<TY, BYTES>(blocks, xrow(i), xrow(i + 1));
        o[0] = a;
        o[1] = b;
        i += 2;
    }
    if let [o] = pairs.into_remainder() {
        *o = dot1::<TY, BYTES>(blocks, xrow(i));
    }
}

/// [`dot_rows`] for each weight row of `rows` (`row_bytes` bytes each) into successive
/// `n`-element chunks of `out` (`row_bytes`, `n` > 0): one call per task, not per row, so
/// the per-row work is only the dot products.
#[target_feature(enable = "avx512f,f16c")]
pub(super) fn dot_matrix<const TY: u8, const BYTES: usize>(
    rows: &[u8],
    row_bytes: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &mut [f32],
) {
    for (row, o) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        dot_rows::<TY, BYTES>(row, x, cols, o);
    }
}

/// Expands one row of blocks into `out` (`out.len()` weights, a multiple of 32).
#[target_feature(enable = "avx512f,f16c")]
pub(super) fn dequantize_row<const TY: u8, const BYTES: usize>(row: &[u8], out: &mut [f32]) {
    let blocks = row.as_chunks::<BYTES>().0;
    for (b, o) in blocks.iter().zip(out.as_chunks_mut::<BLOCK>().0) {
        let w = weights::<TY, BYTES>(b);
        let p = o.as_mut_ptr();
        // SAFETY: `o` is 32 writable f32 and each store writes 16 of them at offsets 0 and
        // 16; `storeu` has no alignment requirement.
        unsafe {
            _mm512_storeu_ps(p, w[0]);
            _mm512_storeu_ps(p.add(16), w[1]);
        }
    }
}
