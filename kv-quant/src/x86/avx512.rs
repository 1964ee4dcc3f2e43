//! AVX-512F kernels (16 f32 lanes) for the read path: dot, axpy, dequantize, KIVI scores.
//! Quantization at this level uses the AVX2 code (it runs once per token, off the hot
//! path, and its bytes must match the scalar quantizer's anyway).
//!
//! Every `unsafe fn` here has the same contract, stated once:
//!
//! # Safety
//! The CPU must support AVX-512F, AVX2, FMA and F16C, and the slices must have the lengths
//! the public API checks. Wrong lengths make results wrong, never memory unsafe: all memory
//! access goes through bounds-checked slices and fixed-size arrays.

use core::arch::x86_64::*;

use crate::format::RowFormat;
use crate::kivi::KiviBits;

use crate::simd::{reduce16_512 as reduce16, reduce8_512 as reduce8, Prefetch};

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn load(a: &[f32; 16]) -> __m512 {
    // SAFETY: `a` is 16 readable f32; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_ps(a.as_ptr()) }
}

/// `a + q . x` over one 32-value chunk (2 vectors): a head's share of a chunk of codes
/// that every head of the group reads.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn fma_x32(a: __m512, q: &[[f32; 16]], x: &[__m512; 2]) -> __m512 {
    let mut a = a;
    for (q, x) in q[..2].iter().zip(x) {
        a = _mm512_fmadd_ps(load(q), *x, a);
    }
    a
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn store(a: &mut [f32; 16], v: __m512) {
    // SAFETY: `a` is 16 writable f32; `storeu` has no alignment requirement.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn load_256(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// 16 f16 → f32 (exact).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn load_f16(b: &[u8; 32]) -> __m512 {
    _mm512_cvtph_ps(load_256(b))
}

/// 16 4-bit codes (8 bytes, low nibble first) → f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn codes_u4(b: &[u8; 8]) -> __m512 {
    let v = _mm_cvtsi64_si128(i64::from_le_bytes(*b));
    let dup = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7),
    );
    let wide = _mm512_cvtepu8_epi32(dup);
    let shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    let c = _mm512_and_si512(_mm512_srlv_epi32(wide, shifts), _mm512_set1_epi32(0xf));
    _mm512_cvtepi32_ps(c)
}

/// 16 2-bit codes (4 bytes, low bits first) → f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn codes_u2(b: &[u8; 4]) -> __m512 {
    let v = _mm_cvtsi32_si128(i32::from_le_bytes(*b));
    let dup = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
    );
    let wide = _mm512_cvtepu8_epi32(dup);
    let shifts = _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6);
    let c = _mm512_and_si512(_mm512_srlv_epi32(wide, shifts), _mm512_set1_epi32(0x3));
    _mm512_cvtepi32_ps(c)
}

/// Scale and minimum of a quantized group (minimum 0 for the symmetric header), converted
/// with F16C and broadcast.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn group_params(g: &[u8], asym: bool) -> (__m512, __m512) {
    // Lanes 0 and 1: scale and minimum (for INT8, lane 1 is code bytes and unused).
    let header = _mm_cvtsi32_si128(i32::from_le_bytes([g[0], g[1], g[2], g[3]]));
    let f = _mm_cvtph_ps(header);
    let s = _mm512_broadcastss_ps(f);
    let m = if asym {
        _mm512_broadcastss_ps(_mm_movehdup_ps(f))
    } else {
        _mm512_setzero_ps()
    };
    (s, m)
}

/// `sum qs[i] * code[i]` over 4-bit codes (`qs.len()` a multiple of 32).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn dot_codes_u4(qs: &[f32], codes: &[u8]) -> f32 {
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for (q32, c16) in qs.as_chunks::<32>().0.iter().zip(codes.as_chunks::<16>().0) {
        let (q16, _) = q32.as_chunks::<16>();
        let (c8, _) = c16.as_chunks::<8>();
        a0 = _mm512_fmadd_ps(load(&q16[0]), codes_u4(&c8[0]), a0);
        a1 = _mm512_fmadd_ps(load(&q16[1]), codes_u4(&c8[1]), a1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

/// `sum qs[i] * code[i]` over 2-bit codes (`qs.len()` a multiple of 32).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn dot_codes_u2(qs: &[f32], codes: &[u8]) -> f32 {
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for (q32, c8) in qs.as_chunks::<32>().0.iter().zip(codes.as_chunks::<8>().0) {
        let (q16, _) = q32.as_chunks::<16>();
        let (c4, _) = c8.as_chunks::<4>();
        a0 = _mm512_fmadd_ps(load(&q16[0]), codes_u2(&c4[0]), a0);
        a1 = _mm512_fmadd_ps(load(&q16[1]), codes_u2(&c4[1]), a1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

/// Channels per tile: `q * s` for one tile lives in a stack buffer (2 KiB).
const TILE: usize = 512;

/// Scores of `q` against every token of a KIVI block (see the AVX2 version).
///
/// # Safety
/// See the module docs; additionally `q.len()` is a multiple of 32 and `block` has
/// `4 q.len() + out.len() q.len() bits / 8` bytes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(crate) unsafe fn kivi_scores(bits: KiviBits, q: &[f32], block: &[u8], out: &mut [f32]) {
    let d = q.len();
    let nbits = bits.bits();
    let (scales, rest) = block.split_at(2 * d);
    let (mins, codes) = rest.split_at(2 * d);
    let stride = d / 8 * nbits;
    out.fill(0.0);
    let mut bias = 0.0f32;
    let mut qs = [0.0f32; TILE];
    for c0 in (0..d).step_by(TILE) {
        let n = (d - c0).min(TILE);
        let mut b = _mm512_setzero_ps();
        let q16 = q[c0..c0 + n].as_chunks::<16>().0;
        let s16 = scales[2 * c0..2 * (c0 + n)].as_chunks::<32>().0;
        let m16 = mins[2 * c0..2 * (c0 + n)].as_chunks::<32>().0;
        for (((qv, sv), mv), o) in q16.iter().zip(s16).zip(m16).zip(qs.as_chunks_mut::<16>().0) {
            let qv = load(qv);
            store(o, _mm512_mul_ps(qv, load_f16(sv)));
            b = _mm512_fmadd_ps(qv, load_f16(mv), b);
        }
        bias += _mm512_reduce_add_ps(b);
        let (lo, hi) = (c0 * nbits / 8, (c0 + n) * nbits / 8);
        for (t, o) in out.iter_mut().enumerate() {
            let tc = &codes[t * stride + lo..t * stride + hi];
            *o += match bits {
                KiviBits::B4 => dot_codes_u4(&qs[..n], tc),
                KiviBits::B2 => dot_codes_u2(&qs[..n], tc),
            };
        }
    }
    for o in out.iter_mut() {
        *o += bias;
    }
}

// ---------------------------------------------------------------------------------------
// Multi-head kernels: a GQA group's heads against a run of stored rows, each row unpacked
// once in registers for all of them, 16 lanes at a time (a 64-element row is 4 registers).

/// Heads one pass over a run of rows serves; more heads take further passes.
const HEAD_BLOCK: usize = 4;

/// Longest rows whose INT4 scores use split codes ([`codes_u4_x32_split`]): the split
/// queries live in a stack buffer filled on every call, so it stays small.
const SPLIT_MAX: usize = 128;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn load_128(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

/// Two vectors of 16 unsigned byte codes → 2 x 16 f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn widen_x32(first: __m128i, second: __m128i) -> [__m512; 2] {
    [
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(first)),
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(second)),
    ]
}

/// 32 signed 8-bit codes → 2 x 16 f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn codes_i8_x32(b: &[u8; 32]) -> [__m512; 2] {
    let (b16, _) = b.as_chunks::<16>();
    [
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load_128(&b16[0]))),
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load_128(&b16[1]))),
    ]
}

/// 32 4-bit codes (16 bytes, low nibble first) → 2 x 16 f32, in element order: one load
/// and byte shuffles for all 32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn codes_u4_x32(b: &[u8; 16]) -> [__m512; 2] {
    let v = load_128(b);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, mask); // even elements
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask); // odd elements
    widen_x32(_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi))
}

/// 32 4-bit codes (16 bytes, low nibble first) → [even elements, odd elements]: one
/// widening of the 16 bytes, a mask and a shift. The caller holds its other operand in the
/// same split order ([`split_even_odd`]), which costs once per call instead of once per row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn codes_u4_x32_split(b: &[u8; 16]) -> [__m512; 2] {
    let wide = _mm512_cvtepu8_epi32(load_128(b));
    let even = _mm512_and_si512(wide, _mm512_set1_epi32(0x0f));
    let odd = _mm512_srli_epi32::<4>(wide);
    [_mm512_cvtepi32_ps(even), _mm512_cvtepi32_ps(odd)]
}

/// 32 elements in order (`a` = 0..16, `b` = 16..32) → [even elements, odd elements].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn split_even_odd(a: __m512, b: __m512) -> [__m512; 2] {
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    [
        _mm512_permutex2var_ps(a, even, b),
        _mm512_permutex2var_ps(a, odd, b),
    ]
}

/// The inverse of [`split_even_odd`]: [even, odd] → 32 elements in order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn merge_even_odd(even: __m512, odd: __m512) -> [__m512; 2] {
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    [
        _mm512_permutex2var_ps(even, lo, odd),
        _mm512_permutex2var_ps(even, hi, odd),
    ]
}

/// `out` = `x` with each 32 elements split into even and odd ones ([`split_even_odd`]);
/// `x.len()` a multiple of 32, `out` at least as long.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn split_rows(x: &[f32], out: &mut [f32]) {
    let (x32, _) = x.as_chunks::<32>();
    let (o32, _) = out.as_chunks_mut::<32>();
    for (x32, o32) in x32.iter().zip(o32) {
        let (x16, _) = x32.as_chunks::<16>();
        let [e, o] = split_even_odd(load(&x16[0]), load(&x16[1]));
        let (o16, _) = o32.as_chunks_mut::<16>();
        store(&mut o16[0], e);
        store(&mut o16[1], o);
    }
}

/// 32 2-bit codes (8 bytes, low bits first) → 2 x 16 f32, in element order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn codes_u2_x32(b: &[u8; 8]) -> [__m512; 2] {
    let v = _mm_cvtsi64_si128(i64::from_le_bytes(*b));
    let mask = _mm_set1_epi8(0x03);
    // c_k holds element 4j + k of byte j.
    let c0 = _mm_and_si128(v, mask);
    let c1 = _mm_and_si128(_mm_srli_epi16::<2>(v), mask);
    let c2 = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    let c3 = _mm_and_si128(_mm_srli_epi16::<6>(v), mask);
    let c01 = _mm_unpacklo_epi8(c0, c1); // pairs (4j, 4j+1)
    let c23 = _mm_unpacklo_epi8(c2, c3); // pairs (4j+2, 4j+3)
    widen_x32(_mm_unpacklo_epi16(c01, c23), _mm_unpackhi_epi16(c01, c23))
}

macro_rules! int_heads_kernels {
    ($score:ident, $accumulate:ident, $columns:ident, header = $hb:literal,
     asym = $asym:literal, bytes_per_32 = $cb:literal, $codes32:ident,
     split = $split:literal) => {
        /// `scores[h * stride + r] = q_h · x̂_r` for `H` heads (`q` holds `H` rows of `d`)
        /// and every row of `rows` (rows of `rb` bytes), `R` rows at a time: each 32
        /// elements of a row dequantized once (two FMAs) for all `H` heads, the `R * H`
        /// dot products accumulated side by side and reduced together.
        ///
        /// # Safety
        /// See the module docs; `R * H <= 16`, `q.len() == H * d`, `rows` whole rows of
        /// `rb = row_bytes(d)`, `scores.len() >= (H - 1) * stride + rows`, `stride >= rows`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $score<const H: usize, const R: usize, const G: usize, const D: usize>(
            group: usize,
            d: usize,
            q: &[f32],
            rows: &[u8],
            rb: usize,
            scores: &mut [f32],
            stride: usize,
            pf: &mut Prefetch<'_>,
        ) {
            // Nonzero `G` and `D` fix the group size and row length at compile time (the
            // caller passes the same values), so the group and chunk loops unroll.
            let group = if G > 0 { G } else { group };
            let d = if D > 0 { D } else { d };
            let rb = if G > 0 && D > 0 {
                D / G * ($hb + G / 32 * $cb)
            } else {
                rb
            };
            let gbytes = $hb + group / 32 * $cb;
            // With split codes, the queries split alike (`d <= SPLIT_MAX` then).
            let mut qsplit = [[0.0f32; if $split { SPLIT_MAX } else { 0 }]; H];
            if $split {
                for (h, qs) in qsplit.iter_mut().enumerate() {
                    split_rows(&q[h * d..][..d], qs);
                }
            }
            let qh: [&[[f32; 16]]; H] = core::array::from_fn(|h| {
                let qh = if $split {
                    &qsplit[h][..d]
                } else {
                    &q[h * d..][..d]
                };
                qh.as_chunks::<16>().0
            });
            let n = rows.len() / rb;
            let mut r0 = 0;
            while r0 + R <= n {
                // The `R * H` accumulators, in registers across the rows' groups.
                let mut acc = [_mm512_setzero_ps(); 16];
                for r in 0..R {
                    let row = &rows[(r0 + r) * rb..][..rb];
                    for (gi, rg) in row.chunks_exact(gbytes).enumerate() {
                        let (s, m) = group_params(rg, $asym);
                        let (c32, _) = rg[$hb..].as_chunks::<$cb>();
                        for (j, c32) in c32.iter().enumerate() {
                            let [c0, c1] = $codes32(c32);
                            let x = if $asym {
                                [_mm512_fmadd_ps(c0, s, m), _mm512_fmadd_ps(c1, s, m)]
                            } else {
                                [_mm512_mul_ps(c0, s), _mm512_mul_ps(c1, s)]
                            };
                            let at = (gi * group + 32 * j) / 16;
                            for h in 0..H {
                                acc[h * R + r] = fma_x32(acc[h * R + r], &qh[h][at..], &x);
                            }
                        }
                    }
                }
                // Head-major, so that each head's `R` scores leave in one copy.
                let lanes = if R * H <= 8 {
                    let mut l = [0.0f32; 16];
                    l[..8].copy_from_slice(&reduce8(&acc.as_chunks::<8>().0[0]));
                    l
                } else {
                    reduce16(&acc)
                };
                for h in 0..H {
                    scores[h * stride + r0..][..R].copy_from_slice(&lanes[h * R..][..R]);
                }
                r0 += R;
                pf.bytes(R * rb);
            }
            if R > 1 && r0 < n {
                // SAFETY: this function's own contract, on the remaining rows.
                unsafe {
                    $score::<H, 1, G, D>(
                        group,
                        d,
                        q,
                        &rows[r0 * rb..],
                        rb,
                        &mut scores[r0..],
                        stride,
                        pf,
                    )
                }
            }
        }

        /// `acc[h][c0..c0 + 16 C] += sum_r w[h * stride + r] * x̂_r[c0..c0 + 16 C]` for `H`
        /// heads, the `H * C` accumulators in registers across all rows; each 32 columns
        /// of a row dequantized once (two FMAs) for all heads.
        ///
        /// # Safety
        /// See the module docs; `C` even, `c0 + 16 C <= d`, `c0` a multiple of 32,
        /// `acc.len() == H * d`, `rows` whole rows of `rb = row_bytes(d)`,
        /// `w.len() >= (H - 1) * stride + rows`, `stride >= rows`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        #[allow(clippy::too_many_arguments)]
        #[allow(dead_code)] // INT4's in-order instance serves only scores with d > SPLIT_MAX.
        unsafe fn $columns<const H: usize, const C: usize>(
            group: usize,
            d: usize,
            c0: usize,
            w: &[f32],
            stride: usize,
            rows: &[u8],
            rb: usize,
            acc: &mut [f32],
            pf: &mut Prefetch<'_>,
        ) {
            let gbytes = $hb + group / 32 * $cb;
            let n = rows.len() / rb;
            let wh: [&[f32]; H] = core::array::from_fn(|h| &w[h * stride..][..n]);
            // Per 32 columns: where the group header and the codes start in a row.
            let at: [(usize, usize); 4] = core::array::from_fn(|k| {
                let c = c0 + 32 * k;
                let (gi, off) = (c / group, c % group);
                (gi * gbytes, gi * gbytes + $hb + off / 32 * $cb)
            });
            let mut a = [[_mm512_setzero_ps(); C]; H];
            for (h, ah) in a.iter_mut().enumerate() {
                let (a16, _) = acc[h * d + c0..][..16 * C].as_chunks::<16>();
                for (v, a16) in ah.iter_mut().zip(a16) {
                    *v = load(a16);
                }
                if $split {
                    for k in 0..C / 2 {
                        [ah[2 * k], ah[2 * k + 1]] = split_even_odd(ah[2 * k], ah[2 * k + 1]);
                    }
                }
            }
            for (r, row) in rows.chunks_exact(rb).enumerate() {
                pf.bytes(rb);
                let mut wb = [_mm512_setzero_ps(); H];
                for (v, wh) in wb.iter_mut().zip(&wh) {
                    *v = _mm512_set1_ps(wh[r]);
                }
                for k in 0..C / 2 {
                    let (g, c) = at[k];
                    let (s, m) = group_params(&row[g..][..4], $asym);
                    let (c32, _) = row[c..][..$cb].as_chunks::<$cb>();
                    let [v0, v1] = $codes32(&c32[0]);
                    let x = [_mm512_fmadd_ps(v0, s, m), _mm512_fmadd_ps(v1, s, m)];
                    for h in 0..H {
                        a[h][2 * k] = _mm512_fmadd_ps(wb[h], x[0], a[h][2 * k]);
                        a[h][2 * k + 1] = _mm512_fmadd_ps(wb[h], x[1], a[h][2 * k + 1]);
                    }
                }
            }
            for (h, ah) in a.iter_mut().enumerate() {
                if $split {
                    for k in 0..C / 2 {
                        [ah[2 * k], ah[2 * k + 1]] = merge_even_odd(ah[2 * k], ah[2 * k + 1]);
                    }
                }
                let (a16, _) = acc[h * d + c0..][..16 * C].as_chunks_mut::<16>();
                for (v, a16) in ah.iter().zip(a16) {
                    store(a16, *v);
                }
            }
        }

        /// `acc[h] += sum_r w[h * stride + r] * x̂_r` for `H` heads (`acc` holds `H` rows of
        /// `d`), 64 columns at a time (32 for the last ones when `d` is not a multiple
        /// of 64).
        ///
        /// # Safety
        /// See the module docs; `d` a multiple of 32, `acc.len() == H * d`, `rows` whole
        /// rows of `rb = row_bytes(d)`, `w.len() >= (H - 1) * stride + rows`,
        /// `stride >= rows`.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
        #[allow(dead_code)] // INT4's in-order instance serves only scores with d > SPLIT_MAX.
        #[allow(clippy::too_many_arguments)]
        unsafe fn $accumulate<const H: usize>(
            group: usize,
            d: usize,
            w: &[f32],
            stride: usize,
            rows: &[u8],
            rb: usize,
            acc: &mut [f32],
            pf: &mut Prefetch<'_>,
        ) {
            // The first pass over the rows prefetches, the others find the lines requested.
            let mut done = Prefetch::none();
            let mut c0 = 0;
            while c0 < d {
                let pf = if c0 == 0 { &mut *pf } else { &mut done };
                // SAFETY: this function's own contract, on columns c0.. (64 or 32 of them,
                // inside `d`; `c0` stays a multiple of 32).
                unsafe {
                    if d - c0 >= 64 {
                        $columns::<H, 4>(group, d, c0, w, stride, rows, rb, acc, pf);
                        c0 += 64;
                    } else {
                        $columns::<H, 2>(group, d, c0, w, stride, rows, rb, acc, pf);
                        c0 += 32;
                    }
                }
            }
        }
    };
}

int_heads_kernels!(
    score_heads_i8,
    accumulate_heads_i8,
    columns_i8,
    header = 2,
    asym = false,
    bytes_per_32 = 32,
    codes_i8_x32,
    split = false
);
int_heads_kernels!(
    score_heads_u4,
    accumulate_heads_u4,
    columns_u4,
    header = 4,
    asym = true,
    bytes_per_32 = 16,
    codes_u4_x32,
    split = false
);
int_heads_kernels!(
    score_heads_u4_split,
    accumulate_heads_u4_split,
    columns_u4_split,
    header = 4,
    asym = true,
    bytes_per_32 = 16,
    codes_u4_x32_split,
    split = true
);
int_heads_kernels!(
    score_heads_u2,
    accumulate_heads_u2,
    columns_u2,
    header = 4,
    asym = true,
    bytes_per_32 = 8,
    codes_u2_x32,
    split = false
);

/// `scores[h * stride + r] = q_h · x̂_r` for every query row `q_h` of `q` (rows of `d`) and
/// every stored row of `rows` (rows of `rb` bytes), each row unpacked once per block of
/// [`HEAD_BLOCK`] heads. Float formats score head by head.
///
/// # Safety
/// See the module docs; `q.len()` a multiple of `d`, `rb = format.row_bytes(d)`, `rows`
/// whole rows, `stride >= rows`, `scores.len() >= (heads - 1) * stride + rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dot_heads(
    format: RowFormat,
    d: usize,
    q: &[f32],
    rows: &[u8],
    rb: usize,
    scores: &mut [f32],
    stride: usize,
    ahead: &[u8],
) {
    // SAFETY: this function's contract: the CPU has the AVX-512 level's features.
    let t = unsafe { crate::simd::V512::new_unchecked() };
    let heads = q.len() / d;
    let n = rows.len() / rb;
    let mut h0 = 0;
    while h0 < heads {
        let hb = (heads - h0).min(HEAD_BLOCK);
        // The first block of heads reads every row: it prefetches the next ones.
        let mut pf = Prefetch::new(if h0 == 0 { ahead } else { &[][..] });
        let qb = &q[h0 * d..(h0 + hb) * d];
        let sb = &mut scores[h0 * stride..];
        // Compile-time group size and row length for the common head dims (64, 128),
        // run-time ones for the rest.
        macro_rules! heads {
            ($k:ident, $g:expr, $G:literal, $D:literal, $wide:literal) => {
                match hb {
                    4 => $k::<4, 2, $G, $D>($g, d, qb, rows, rb, sb, stride, &mut pf),
                    3 if $wide => $k::<3, 4, $G, $D>($g, d, qb, rows, rb, sb, stride, &mut pf),
                    3 => $k::<3, 2, $G, $D>($g, d, qb, rows, rb, sb, stride, &mut pf),
                    2 => $k::<2, 4, $G, $D>($g, d, qb, rows, rb, sb, stride, &mut pf),
                    _ => $k::<1, 8, $G, $D>($g, d, qb, rows, rb, sb, stride, &mut pf),
                }
            };
        }
        // `wide`: 3 heads take 4 rows at a time (12 sums reduced together), which pays
        // for 4-bit codes and not for 8-bit ones (measured).
        macro_rules! blocks {
            ($k:ident, $g:expr) => {
                blocks!($k, $g, false)
            };
            ($k:ident, $g:expr, $wide:literal) => {
                match ($g, d) {
                    (32, 64) => heads!($k, $g, 32, 64, $wide),
                    (64, 64) => heads!($k, $g, 64, 64, $wide),
                    (32, 128) => heads!($k, $g, 32, 128, $wide),
                    (64, 128) => heads!($k, $g, 64, 128, $wide),
                    (128, 128) => heads!($k, $g, 128, 128, $wide),
                    _ => heads!($k, $g, 0, 0, $wide),
                }
            };
        }
        // SAFETY: every arm calls a kernel with this function's own contract on heads
        // h0..h0 + hb, whose queries and score rows lie inside `q` and `scores`.
        unsafe {
            match format {
                RowFormat::Int8 { group } => blocks!(score_heads_i8, group.size()),
                RowFormat::Int4 { group } if d <= SPLIT_MAX => {
                    blocks!(score_heads_u4_split, group.size(), true)
                }
                RowFormat::Int4 { group } => blocks!(score_heads_u4, group.size()),
                RowFormat::Int2 { group } => blocks!(score_heads_u2, group.size()),
                _ => {
                    for h in 0..hb {
                        let out = &mut sb[h * stride..][..n];
                        crate::rows::dot_many(t, format, &qb[h * d..][..d], rows, rb, out);
                    }
                }
            }
        }
        h0 += hb;
    }
}

/// `acc[h] += sum_r w[h * stride + r] * x̂_r` for every accumulator row of `acc` (rows of
/// `d`) and every stored row of `rows`, each row unpacked once per block of
/// [`HEAD_BLOCK`] heads and 64 columns. Float formats accumulate head by head.
///
/// # Safety
/// See the module docs; `acc.len()` a multiple of `d`, `rb = format.row_bytes(d)`, `rows`
/// whole rows, `stride >= rows`, `w.len() >= (heads - 1) * stride + rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn axpy_heads(
    format: RowFormat,
    d: usize,
    w: &[f32],
    stride: usize,
    rows: &[u8],
    rb: usize,
    acc: &mut [f32],
    ahead: &[u8],
) {
    // SAFETY: this function's contract: the CPU has the AVX-512 level's features.
    let t = unsafe { crate::simd::V512::new_unchecked() };
    let heads = acc.len() / d;
    let n = rows.len() / rb;
    let mut h0 = 0;
    while h0 < heads {
        let hb = (heads - h0).min(HEAD_BLOCK);
        // The first block of heads reads every row: it prefetches the next ones.
        let mut pf = Prefetch::new(if h0 == 0 { ahead } else { &[][..] });
        let wb = &w[h0 * stride..];
        let ab = &mut acc[h0 * d..(h0 + hb) * d];
        macro_rules! blocks {
            ($k:ident, $g:expr) => {
                match hb {
                    4 => $k::<4>($g, d, wb, stride, rows, rb, ab, &mut pf),
                    3 => $k::<3>($g, d, wb, stride, rows, rb, ab, &mut pf),
                    2 => $k::<2>($g, d, wb, stride, rows, rb, ab, &mut pf),
                    _ => $k::<1>($g, d, wb, stride, rows, rb, ab, &mut pf),
                }
            };
        }
        // SAFETY: every arm calls a kernel with this function's own contract on heads
        // h0..h0 + hb, whose weights and accumulators lie inside `w` and `acc`.
        unsafe {
            match format {
                RowFormat::Int8 { group } => blocks!(accumulate_heads_i8, group.size()),
                RowFormat::Int4 { group } => blocks!(accumulate_heads_u4_split, group.size()),
                RowFormat::Int2 { group } => blocks!(accumulate_heads_u2, group.size()),
                _ => {
                    for h in 0..hb {
                        crate::rows::axpy_many(
                            t,
                            format,
                            &wb[h * stride..][..n],
                            rows,
                            rb,
                            &mut ab[h * d..][..d],
                        );
                    }
                }
            }
        }
        h0 += hb;
    }
}

/// Scores of `H` heads (`q` holds `H` rows of `d <= N`) against every token of a KIVI
/// block: the scaled queries `q_h * s` and the biases `sum_c q_h[c] m[c]` are formed once
/// (in a stack buffer of `N` channels per head, filled on every call: `N` fits `d`),
/// then each token's codes are unpacked once for all heads, `R` tokens reduced together.
/// `out[h * stride + t]`.
///
/// # Safety
/// See the module docs; `R * H <= 8`, `d` a multiple of 32 and at most `N`, `block`
/// a whole block of `tokens` tokens, `out.len() >= (H - 1) * stride + tokens`,
/// `stride >= tokens`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn kivi_heads<const H: usize, const R: usize, const N: usize>(
    bits: KiviBits,
    d: usize,
    q: &[f32],
    block: &[u8],
    tokens: usize,
    out: &mut [f32],
    stride: usize,
) {
    let nbits = bits.bits();
    let (scales, rest) = block.split_at(2 * d);
    let (mins, codes) = rest.split_at(2 * d);
    let tcb = d / 8 * nbits;
    let mut qs = [[0.0f32; N]; H];
    let mut bias = [0.0f32; H];
    for h in 0..H {
        let mut b = _mm512_setzero_ps();
        let q16 = q[h * d..][..d].as_chunks::<16>().0;
        let s16 = scales.as_chunks::<32>().0;
        let m16 = mins.as_chunks::<32>().0;
        for (((qv, sv), mv), o) in q16
            .iter()
            .zip(s16)
            .zip(m16)
            .zip(qs[h].as_chunks_mut::<16>().0)
        {
            let qv = load(qv);
            store(o, _mm512_mul_ps(qv, load_f16(sv)));
            b = _mm512_fmadd_ps(qv, load_f16(mv), b);
        }
        bias[h] = _mm512_reduce_add_ps(b);
        if bits == KiviBits::B4 {
            // 4-bit codes unpack split into even and odd channels: split the queries alike.
            let inorder = qs[h];
            split_rows(&inorder[..d], &mut qs[h]);
        }
    }
    let qs16: [&[[f32; 16]]; H] = core::array::from_fn(|h| qs[h][..d].as_chunks::<16>().0);
    let chunk = 4 * nbits; // code bytes of 32 channels
    let mut t0 = 0;
    while t0 < tokens {
        let r_n = (tokens - t0).min(R);
        // The tokens' accumulators, in registers across their channels.
        let mut acc = [_mm512_setzero_ps(); 8];
        for r in 0..r_n {
            let tc = &codes[(t0 + r) * tcb..][..tcb];
            for (j, c) in tc.chunks_exact(chunk).enumerate() {
                let x = match bits {
                    KiviBits::B4 => codes_u4_x32_split(&c.as_chunks::<16>().0[0]),
                    KiviBits::B2 => codes_u2_x32(&c.as_chunks::<8>().0[0]),
                };
                for h in 0..H {
                    acc[r * H + h] = fma_x32(acc[r * H + h], &qs16[h][2 * j..], &x);
                }
            }
        }
        let lanes = reduce8(&acc);
        for r in 0..r_n {
            for h in 0..H {
                out[h * stride + t0 + r] = lanes[r * H + h] + bias[h];
            }
        }
        t0 += r_n;
    }
}

/// Scores of every query row of `q` (rows of `d`) against every token of a KIVI block:
/// `out[h * stride + t]`, heads in blocks of [`HEAD_BLOCK`]; one head at a time through
/// [`kivi_scores`] when `d` exceeds [`TILE`].
///
/// # Safety
/// See the module docs; `q.len()` a multiple of `d`, `d` a multiple of 32, `block` a whole
/// block of `tokens` tokens, `stride >= tokens`, `out` holding every score row.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kivi_scores_heads(
    bits: KiviBits,
    d: usize,
    q: &[f32],
    block: &[u8],
    tokens: usize,
    out: &mut [f32],
    stride: usize,
) {
    let heads = q.len() / d;
    let mut h0 = 0;
    while h0 < heads {
        let hb = (heads - h0).min(HEAD_BLOCK);
        let qb = &q[h0 * d..(h0 + hb) * d];
        let ob = &mut out[h0 * stride..];
        // SAFETY: every call has this function's own contract on heads h0..h0 + hb, whose
        // queries and score rows lie inside `q` and `out`.
        unsafe {
            if d > TILE {
                for h in 0..hb {
                    kivi_scores(
                        bits,
                        &qb[h * d..][..d],
                        block,
                        &mut ob[h * stride..][..tokens],
                    );
                }
            } else {
                macro_rules! heads {
                    ($n:expr) => {
                        match hb {
                            4 => kivi_heads::<4, 2, $n>(bits, d, qb, block, tokens, ob, stride),
                            3 => kivi_heads::<3, 2, $n>(bits, d, qb, block, tokens, ob, stride),
                            2 => kivi_heads::<2, 4, $n>(bits, d, qb, block, tokens, ob, stride),
                            _ => kivi_heads::<1, 8, $n>(bits, d, qb, block, tokens, ob, stride),
                        }
                    };
                }
                if d <= SPLIT_MAX {
                    heads!(SPLIT_MAX)
                } else {
                    heads!(TILE)
                }
            }
        }
        h0 += hb;
    }
}
