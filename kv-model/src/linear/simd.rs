//! The matrix-vector and dequantization kernels, written once over the vector width of
//! kv-quant's SIMD layer ([`Simd`]) and run at AVX2 or AVX-512 through [`Isa::run`].
//!
//! The only width-specific code is how one GGUF block becomes 32 f32 weights
//! ([`BlockSimd`]): at 256 bits the codes are converted to f32 and scaled; at 512 bits a
//! 4-bit block's 16 possible weights (`d * q + m` or `(q - 8) * d`) are computed once into
//! one register and each 16 weights are looked up with a lane permute indexed by the
//! nibbles, with no int-to-float conversion per weight. Both give the values candle's
//! `to_float` computes (`q * d` is exact in f32, so `fma(q, d, m)` rounds like
//! `q * d + m`), so the weights are bit-for-bit candle's; activations stay f32.
//!
//! Slice lengths are checked by the caller ([`super::Kernels`]) and `debug_assert!`ed
//! here; every load reads a fixed-size array, so a wrong length is never an out-of-bounds
//! access.
//!
//! [`Isa::run`]: kv_quant::simd::Isa::run

use core::arch::x86_64::*;

use kv_quant::simd::{Simd, V256, V512};

use super::BLOCK;

/// [`super::BlockType`] as a const generic parameter.
pub(super) const Q4_0: u8 = 0;
/// See [`Q4_0`].
pub(super) const Q4_1: u8 = 1;
/// See [`Q4_0`].
pub(super) const Q8_0: u8 = 2;

/// A block as the dot products use it: Q4 weights as [`BlockSimd::weights`] gives them;
/// Q8_0's integers unscaled with the scale `d` apart, applied once to the block's partial
/// sum (a multiply per block, not per vector of weights).
#[derive(Clone, Copy)]
pub(super) struct Block<S: Simd> {
    w: S::X32,
    d: S::F32,
}

/// How one GGUF block becomes f32 weights at one vector width.
pub(super) trait BlockSimd: Simd {
    /// The 32 weights of one block (`BYTES` bytes of type `TY`), in order.
    fn weights<const TY: u8, const BYTES: usize>(self, b: &[u8; BYTES]) -> Self::X32;
    /// The block for the dot products (see [`Block`]).
    fn block<const TY: u8, const BYTES: usize>(self, b: &[u8; BYTES]) -> Block<Self>;
}

/// The `N` bytes of `b` from `at` (a sub-array of a block; `at + N <= BYTES` for every
/// call below, so the copy is total; a shorter block would read zeros).
#[inline(always)]
fn bytes<const N: usize, const BYTES: usize>(b: &[u8; BYTES], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = b.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

// ---------------------------------------------------------------------------------------
// 256 bits.

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_16(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i8_lanes(q: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn u8_lanes(q: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q))
}

/// 32 signed bytes as 4 x 8 f32, in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i8x32_256(lo: __m128i, hi: __m128i) -> [__m256; 4] {
    [
        i8_lanes(lo),
        i8_lanes(_mm_unpackhi_epi64(lo, lo)),
        i8_lanes(hi),
        i8_lanes(_mm_unpackhi_epi64(hi, hi)),
    ]
}

/// Q4 nibbles (`lo` = weights 0..16, `hi` = 16..32, one per byte) as 4 x 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn weights_256<const TY: u8, const BYTES: usize>(b: &[u8; BYTES]) -> [__m256; 4] {
    let d = _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes(bytes(b, 0))));
    if TY == Q8_0 {
        let w = i8x32_256(load_16(&bytes(b, 2)), load_16(&bytes(b, 18)));
        return w.map(|w| _mm256_mul_ps(w, d));
    }
    let at = if TY == Q4_1 { 4 } else { 2 };
    let v = load_16(&bytes(b, at));
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(v, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    if TY == Q4_0 {
        // (q - 8) * d like candle: a product, so q = 8 gives -0.0 when d < 0.
        let eight = _mm_set1_epi8(8);
        let w = i8x32_256(_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight));
        return w.map(|w| _mm256_mul_ps(w, d));
    }
    let m = _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes(bytes(b, 2))));
    [
        u8_lanes(lo),
        u8_lanes(_mm_unpackhi_epi64(lo, lo)),
        u8_lanes(hi),
        u8_lanes(_mm_unpackhi_epi64(hi, hi)),
    ]
    .map(|q| _mm256_fmadd_ps(q, d, m))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_256<const TY: u8, const BYTES: usize>(b: &[u8; BYTES]) -> Block<V256> {
    if TY != Q8_0 {
        return Block {
            w: weights_256::<TY, BYTES>(b),
            d: _mm256_setzero_ps(),
        };
    }
    Block {
        w: i8x32_256(load_16(&bytes(b, 2)), load_16(&bytes(b, 18))),
        d: _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes(bytes(b, 0)))),
    }
}

impl BlockSimd for V256 {
    #[inline(always)]
    fn weights<const TY: u8, const BYTES: usize>(self, b: &[u8; BYTES]) -> [__m256; 4] {
        // SAFETY: `self` is kv-quant's AVX2 token: the CPU has AVX2, FMA and F16C.
        unsafe { weights_256::<TY, BYTES>(b) }
    }
    #[inline(always)]
    fn block<const TY: u8, const BYTES: usize>(self, b: &[u8; BYTES]) -> Block<V256> {
        // SAFETY: as for `weights`.
        unsafe { block_256::<TY, BYTES>(b) }
    }
}

// ---------------------------------------------------------------------------------------
// 512 bits.

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn i8x16_512(b: &[u8; 16]) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load_16(b)))
}

/// Scale (lane 0) and minimum (lane 1) of a block: one narrow conversion for both.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn f16_pair(b: [u8; 4]) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(b)))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn weights_512<const TY: u8, const BYTES: usize>(b: &[u8; BYTES]) -> [__m512; 2] {
    let dm = f16_pair(bytes(b, 0));
    let d = _mm512_broadcastss_ps(dm);
    if TY == Q8_0 {
        return [
            _mm512_mul_ps(i8x16_512(&bytes(b, 2)), d),
            _mm512_mul_ps(i8x16_512(&bytes(b, 18)), d),
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
    // Byte j holds weight j (low nibble) and weight j + 16 (high nibble). The permute reads
    // only an index's low 4 bits, so the low nibbles need no mask.
    let q = _mm512_cvtepu8_epi32(load_16(&bytes(b, at)));
    [
        _mm512_permutexvar_ps(q, table),
        _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), table),
    ]
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn block_512<const TY: u8, const BYTES: usize>(b: &[u8; BYTES]) -> Block<V512> {
    if TY != Q8_0 {
        return Block {
            w: weights_512::<TY, BYTES>(b),
            d: _mm512_setzero_ps(),
        };
    }
    Block {
        w: [i8x16_512(&bytes(b, 2)), i8x16_512(&bytes(b, 18))],
        d: _mm512_broadcastss_ps(f16_pair(bytes(b, 0))),
    }
}

impl BlockSimd for V512 {
    #[inline(always)]
    fn weights<const TY: u8, const BYTES: usize>(self, b: &[u8; BYTES]) -> [__m512; 2] {
        // SAFETY: `self` is kv-quant's AVX-512 token: the CPU has AVX-512F, AVX2, FMA, F16C.
        unsafe { weights_512::<TY, BYTES>(b) }
    }
    #[inline(always)]
    fn block<const TY: u8, const BYTES: usize>(self, b: &[u8; BYTES]) -> Block<V512> {
        // SAFETY: as for `weights`.
        unsafe { block_512::<TY, BYTES>(b) }
    }
}

// ---------------------------------------------------------------------------------------
// The kernels, once.

/// One block's FMAs into the accumulators `acc` (Q8_0: the block's sum times `d`, into the
/// first vector only).
#[inline(always)]
fn fma_block<S: Simd, const TY: u8>(s: S, blk: Block<S>, x: &[f32; BLOCK], acc: &mut S::X32) {
    let xv = s.load32(x);
    let (w, xv) = (blk.w.as_ref(), xv.as_ref());
    if TY == Q8_0 {
        let mut t = s.zero();
        for (w, x) in w.iter().zip(xv) {
            t = s.fma(*w, *x, t);
        }
        if let Some(a) = acc.as_mut().first_mut() {
            *a = s.fma(t, blk.d, *a);
        }
        return;
    }
    for ((a, w), x) in acc.as_mut().iter_mut().zip(w).zip(xv) {
        *a = s.fma(*w, *x, *a);
    }
}

/// Sum of the two accumulator sets in a fixed order, then of the lanes: the same for every
/// row count, so a row's result does not depend on which rows it was computed with.
#[inline(always)]
fn reduce<S: Simd>(s: S, a: S::X32, b: S::X32) -> f32 {
    let mut v = s.zero();
    for (a, b) in a.as_ref().iter().zip(b.as_ref()) {
        v = s.add(v, s.add(*a, *b));
    }
    s.sum(v)
}

/// Whether odd blocks get their own accumulators: at 512 bits (2 vectors per 32 weights)
/// that puts more FMA chains in flight; at 256 bits one set is already 4 chains, and two
/// sets for two rows would not fit the 16 registers.
#[inline(always)]
const fn split<S: Simd>() -> bool {
    S::LANES >= 16
}

/// `dot(row, x)` for one activation row. At 512 bits even blocks go to one accumulator
/// set, odd blocks to the other ([`split`]).
#[inline(always)]
fn dot1<S: BlockSimd, const TY: u8, const BYTES: usize>(
    s: S,
    blocks: &[[u8; BYTES]],
    x: &[[f32; BLOCK]],
) -> f32 {
    let (mut even, mut odd) = (s.zero32(), s.zero32());
    let (pairs, rest) = blocks.as_chunks::<2>();
    let (xpairs, xrest) = x.as_chunks::<2>();
    for (b, xb) in pairs.iter().zip(xpairs) {
        fma_block::<S, TY>(s, s.block::<TY, BYTES>(&b[0]), &xb[0], &mut even);
        let odd = if split::<S>() { &mut odd } else { &mut even };
        fma_block::<S, TY>(s, s.block::<TY, BYTES>(&b[1]), &xb[1], odd);
    }
    if let ([b], [xb, ..]) = (rest, xrest) {
        fma_block::<S, TY>(s, s.block::<TY, BYTES>(b), xb, &mut even);
    }
    reduce(s, even, odd)
}

/// `dot(row, x0)` and `dot(row, x1)`, dequantizing each block once; each row's sums in the
/// order [`dot1`] uses.
#[inline(always)]
fn dot2<S: BlockSimd, const TY: u8, const BYTES: usize>(
    s: S,
    blocks: &[[u8; BYTES]],
    x0: &[[f32; BLOCK]],
    x1: &[[f32; BLOCK]],
) -> (f32, f32) {
    let (mut even0, mut odd0) = (s.zero32(), s.zero32());
    let (mut even1, mut odd1) = (s.zero32(), s.zero32());
    let (pairs, rest) = blocks.as_chunks::<2>();
    let (x0pairs, x0rest) = x0.as_chunks::<2>();
    let (x1pairs, x1rest) = x1.as_chunks::<2>();
    for ((b, xb0), xb1) in pairs.iter().zip(x0pairs).zip(x1pairs) {
        let w = s.block::<TY, BYTES>(&b[0]);
        fma_block::<S, TY>(s, w, &xb0[0], &mut even0);
        fma_block::<S, TY>(s, w, &xb1[0], &mut even1);
        let w = s.block::<TY, BYTES>(&b[1]);
        let (o0, o1) = if split::<S>() {
            (&mut odd0, &mut odd1)
        } else {
            (&mut even0, &mut even1)
        };
        fma_block::<S, TY>(s, w, &xb0[1], o0);
        fma_block::<S, TY>(s, w, &xb1[1], o1);
    }
    if let ([b], [xb0, ..], [xb1, ..]) = (rest, x0rest, x1rest) {
        let w = s.block::<TY, BYTES>(b);
        fma_block::<S, TY>(s, w, xb0, &mut even0);
        fma_block::<S, TY>(s, w, xb1, &mut even1);
    }
    (reduce(s, even0, odd0), reduce(s, even1, odd1))
}

/// [`dot1`]/[`dot2`] for each weight row of `rows` (`row_bytes` bytes each) against the
/// `n` activation rows of `x` (`cols` each), into successive `n`-element chunks of `out`:
/// one call per task, not per row, so the per-row work is only the dot products.
#[inline(always)]
pub(super) fn dot_matrix<S: BlockSimd, const TY: u8, const BYTES: usize>(
    s: S,
    rows: &[u8],
    row_bytes: usize,
    x: &[f32],
    cols: usize,
    n: usize,
    out: &mut [f32],
) {
    debug_assert!(row_bytes > 0 && n > 0 && x.len() >= n * cols, "shapes");
    debug_assert_eq!(rows.len() / row_bytes, out.len() / n, "rows and out differ");
    let xrow = |i: usize| x[i * cols..][..cols].as_chunks::<BLOCK>().0;
    for (row, out) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(n)) {
        let blocks = row.as_chunks::<BYTES>().0;
        let mut pairs = out.chunks_exact_mut(2);
        let mut i = 0;
        for o in &mut pairs {
            let (a, b) = dot2::<S, TY, BYTES>(s, blocks, xrow(i), xrow(i + 1));
            o[0] = a;
            o[1] = b;
            i += 2;
        }
        if let [o] = pairs.into_remainder() {
            *o = dot1::<S, TY, BYTES>(s, blocks, xrow(i));
        }
    }
}

/// Expands one row of blocks into `out` (`out.len()` weights, a multiple of 32).
#[inline(always)]
pub(super) fn dequantize_row<S: BlockSimd, const TY: u8, const BYTES: usize>(
    s: S,
    row: &[u8],
    out: &mut [f32],
) {
    debug_assert_eq!(row.len() / BYTES * BLOCK, out.len(), "row and out differ");
    let blocks = row.as_chunks::<BYTES>().0;
    for (b, o) in blocks.iter().zip(out.as_chunks_mut::<BLOCK>().0) {
        s.store32(o, s.weights::<TY, BYTES>(b));
    }
}
