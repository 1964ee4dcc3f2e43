//! AVX2 + FMA + F16C kernels (8 f32 lanes).
//!
//! Every function here has the same contract, stated once: the CPU must support AVX2, FMA
//! and F16C (the `#[target_feature]` functions are only called through
//! [`super::Kernels`], which checks). Slice lengths are the caller's business: a wrong
//! length gives a wrong result or a panic, never an out-of-bounds access, because every
//! raw load reads from a fixed-size array.
//!
//! Weights are dequantized in registers exactly as candle's `to_float` does (`q * d` is
//! exact in f32, so Q4_1's `fma(q, d, m)` rounds once, like `q * d + m`); activations stay
//! f32.

use core::arch::x86_64::*;

use super::BLOCK;

/// [`super::BlockType`] as a const generic parameter.
pub(super) const Q4_0: u8 = 0;
/// See [`Q4_0`].
pub(super) const Q4_1: u8 = 1;
/// See [`Q4_0`].
pub(super) const Q8_0: u8 = 2;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn broadcast_f16(b: [u8; 2]) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes(b)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_16(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_32(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// The 32 f32 of `x` as four vectors, in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_x(x: &[f32; BLOCK]) -> [__m256; 4] {
    let p = x.as_ptr();
    // SAFETY: `x` is 32 readable f32 and each load reads 8 of them at offsets 0, 8, 16 and
    // 24; `loadu` has no alignment requirement.
    unsafe {
        [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ]
    }
}

/// Low 8 bytes of `q` as unsigned integers, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn u8_lanes(q: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q))
}

/// Low 8 bytes of `q` as signed integers, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i8_lanes(q: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
}

/// The 32 weights of one block (`BYTES` bytes of type `TY`) as four vectors, in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn weights<const TY: u8, const BYTES: usize>(b: &[u8; BYTES]) -> [__m256; 4] {
    let d = broadcast_f16([b[0], b[1]]);
    if TY == Q8_0 {
        let mut qs = [0u8; 32];
        qs.copy_from_slice(&b[2..34]);
        let v = load_32(&qs);
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256::<1>(v);
        return [
            _mm256_mul_ps(i8_lanes(lo), d),
            _mm256_mul_ps(i8_lanes(_mm_unpackhi_epi64(lo, lo)), d),
            _mm256_mul_ps(i8_lanes(hi), d),
            _mm256_mul_ps(i8_lanes(_mm_unpackhi_epi64(hi, hi)), d),
        ];
    }
    let mut qs = [0u8; 16];
    let at = if TY == Q4_1 { 4 } else { 2 };
    qs.copy_from_slice(&b[at..at + 16]);
    let v = load_16(&qs);
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(v, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    if TY == Q4_0 {
        // (q - 8) * d like candle: a product, so q = 8 gives -0.0 when d < 0.
        let (lo, hi) = (
            _mm_sub_epi8(lo, _mm_set1_epi8(8)),
            _mm_sub_epi8(hi, _mm_set1_epi8(8)),
        );
        return [
            _mm256_mul_ps(i8_lanes(lo), d),
            _mm256_mul_ps(i8_lanes(_mm_unpackhi_epi64(lo, lo)), d),
            _mm256_mul_ps(i8_lanes(hi), d),
            _mm256_mul_ps(i8_lanes(_mm_unpackhi_epi64(hi, hi)), d),
        ];
    }
    let m = broadcast_f16([b[2], b[3]]);
    [
        _mm256_fmadd_ps(u8_lanes(lo), d, m),
        _mm256_fmadd_ps(u8_lanes(_mm_unpackhi_epi64(lo, lo)), d, m),
        _mm256_fmadd_ps(u8_lanes(hi), d, m),
        _mm256_fmadd_ps(u8_lanes(_mm_unpackhi_epi64(hi, hi)), d, m),
    ]
}

/// Sum of four accumulators, then of the 8 lanes: the same order for every row count, so
/// a row's result does not depend on which rows it was computed with.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce(acc: [__m256; 4]) -> f32 {
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// `dot(row, x)` for one activation row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot1<const TY: u8, const BYTES: usize>(blocks: &[[u8; BYTES]], x: &[[f32; BLOCK]]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (b, xb) in blocks.iter().zip(x) {
        let w = weights::<TY, BYTES>(b);
        let xv = load_x(xb);
        for k in 0..4 {
            acc[k] = _mm256_fmadd_ps(w[k], xv[k], acc[k]);
        }
    }
    reduce(acc)
}

/// `dot(row, x0)` and `dot(row, x1)`, dequantizing each block once.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot2<const TY: u8, const BYTES: usize>(
    blocks: &[[u8; BYTES]],
    x0: &[[f32; BLOCK]],
    x1: &[[f32; BLOCK]],
) -> (f32, f32) {
    let mut a0 = [_mm256_setzero_ps(); 4];
    let mut a1 = [_mm256_setzero_ps(); 4];
    for ((b, xb0), xb1) in blocks.iter().zip(x0).zip(x1) {
        let w = weights::<TY, BYTES>(b);
        let xv0 = load_x(xb0);
        let xv1 = load_x(xb1);
        for k in 0..4 {
            a0[k] = _mm256_fmadd_ps(w[k], xv0[k], a0[k]);
            a1[k] = _mm256_fmadd_ps(w[k], xv1[k], a1[k]);
        }
    }
    (reduce(a0), reduce(a1))
}

/// `out[i] = dot(row, x[i * cols..][..cols])` for every `i < out.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
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
#[target_feature(enable = "avx2,fma,f16c")]
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
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dequantize_row<const TY: u8, const BYTES: usize>(row: &[u8], out: &mut [f32]) {
    let blocks = row.as_chunks::<BYTES>().0;
    for (b, o) in blocks.iter().zip(out.as_chunks_mut::<BLOCK>().0) {
        let w = weights::<TY, BYTES>(b);
        let p = o.as_mut_ptr();
        // SAFETY: `o` is 32 writable f32 and each store writes 8 of them at offsets 0, 8,
        // 16 and 24; `storeu` has no alignment requirement.
        unsafe {
            _mm256_storeu_ps(p, w[0]);
            _mm256_storeu_ps(p.add(8), w[1]);
            _mm256_storeu_ps(p.add(16), w[2]);
            _mm256_storeu_ps(p.add(24), w[3]);
        }
    }
}
