//! AVX2 + FMA + F16C kernels (8 f32 lanes).
//!
//! Every `unsafe fn` here has the same contract, stated once:
//!
//! # Safety
//! The CPU must support AVX2, FMA and F16C, and the slices must have the lengths the
//! public API checks (`q`/`acc`/`out`: `head_dim` valid for the format; rows:
//! `row_bytes(head_dim)`). Wrong lengths make results wrong, never memory unsafe: all
//! memory access goes through bounds-checked slices and fixed-size arrays.

use core::arch::x86_64::*;

use crate::format::RowFormat;
use crate::kivi::KiviBits;

use crate::simd::{reduce8_256 as reduce8, Prefetch};

// ---------------------------------------------------------------------------------------
// Loads, stores and lane conversions. Safe functions: the arrays make every access in
// bounds; callers must themselves be AVX2/FMA/F16C functions.

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load(a: &[f32; 8]) -> __m256 {
    // SAFETY: `a` is 8 readable f32; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_ps(a.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store(a: &mut [f32; 8], v: __m256) {
    // SAFETY: `a` is 8 writable f32; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_128(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

/// 8 f16 → 8 f32 (exact).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_f16(b: &[u8; 16]) -> __m256 {
    _mm256_cvtph_ps(load_128(b))
}

/// 8 signed 8-bit codes → f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes_i8(b: &[u8; 8]) -> __m256 {
    let v = _mm_cvtsi64_si128(i64::from_le_bytes(*b));
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// 32 4-bit codes (16 bytes, low nibble first) → 4 x 8 f32, in element order. One load
/// and byte shuffles for all 32 instead of a shuffle per 8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes_u4_x32(b: &[u8; 16]) -> [__m256; 4] {
    let v = load_128(b);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, mask); // even elements
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask); // odd elements
    let first = _mm_unpacklo_epi8(lo, hi); // elements 0..16
    let second = _mm_unpackhi_epi8(lo, hi); // elements 16..32
    widen_x32(first, second)
}

/// 32 2-bit codes (8 bytes, low bits first) → 4 x 8 f32, in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes_u2_x32(b: &[u8; 8]) -> [__m256; 4] {
    let v = _mm_cvtsi64_si128(i64::from_le_bytes(*b));
    let mask = _mm_set1_epi8(0x03);
    // c_k holds element 4j + k of byte j.
    let c0 = _mm_and_si128(v, mask);
    let c1 = _mm_and_si128(_mm_srli_epi16::<2>(v), mask);
    let c2 = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    let c3 = _mm_and_si128(_mm_srli_epi16::<6>(v), mask);
    let c01 = _mm_unpacklo_epi8(c0, c1); // pairs (4j, 4j+1)
    let c23 = _mm_unpacklo_epi8(c2, c3); // pairs (4j+2, 4j+3)
    let first = _mm_unpacklo_epi16(c01, c23); // elements 0..16
    let second = _mm_unpackhi_epi16(c01, c23); // elements 16..32
    widen_x32(first, second)
}

/// Two vectors of 16 unsigned byte codes → 4 x 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_x32(first: __m128i, second: __m128i) -> [__m256; 4] {
    let cvt = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
    [
        cvt(first),
        cvt(_mm_unpackhi_epi64(first, first)),
        cvt(second),
        cvt(_mm_unpackhi_epi64(second, second)),
    ]
}

/// 32 signed 8-bit codes → 4 x 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes_i8_x32(b: &[u8; 32]) -> [__m256; 4] {
    let (b8, _) = b.as_chunks::<8>();
    [
        codes_i8(&b8[0]),
        codes_i8(&b8[1]),
        codes_i8(&b8[2]),
        codes_i8(&b8[3]),
    ]
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Scale and minimum of a quantized group (minimum 0 for the symmetric header).
/// Scale and minimum of a quantized group (minimum 0 for the symmetric header), converted
/// with F16C and broadcast.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group_params(g: &[u8], asym: bool) -> (__m256, __m256) {
    // Lanes 0 and 1: scale and minimum (for INT8, lane 1 is code bytes and unused).
    let header = _mm_cvtsi32_si128(i32::from_le_bytes([g[0], g[1], g[2], g[3]]));
    let f = _mm_cvtph_ps(header);
    let s = _mm256_broadcastss_ps(f);
    let m = if asym {
        _mm256_broadcastss_ps(_mm_movehdup_ps(f))
    } else {
        _mm256_setzero_ps()
    };
    (s, m)
}

// ---------------------------------------------------------------------------------------
// KIVI key blocks.

/// `sum qs[i] * code[i]` over 4-bit codes (`qs.len()` a multiple of 32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_codes_u4(qs: &[f32], codes: &[u8]) -> f32 {
    let z = _mm256_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    for (q32, c16) in qs.as_chunks::<32>().0.iter().zip(codes.as_chunks::<16>().0) {
        let (q8, _) = q32.as_chunks::<8>();
        let [c0, c1, c2, c3] = codes_u4_x32(c16);
        a0 = _mm256_fmadd_ps(load(&q8[0]), c0, a0);
        a1 = _mm256_fmadd_ps(load(&q8[1]), c1, a1);
        a2 = _mm256_fmadd_ps(load(&q8[2]), c2, a2);
        a3 = _mm256_fmadd_ps(load(&q8[3]), c3, a3);
    }
    hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)))
}

/// `sum qs[i] * code[i]` over 2-bit codes (`qs.len()` a multiple of 32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_codes_u2(qs: &[f32], codes: &[u8]) -> f32 {
    let z = _mm256_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    for (q32, c8) in qs.as_chunks::<32>().0.iter().zip(codes.as_chunks::<8>().0) {
        let (q8, _) = q32.as_chunks::<8>();
        let [c0, c1, c2, c3] = codes_u2_x32(c8);
        a0 = _mm256_fmadd_ps(load(&q8[0]), c0, a0);
        a1 = _mm256_fmadd_ps(load(&q8[1]), c1, a1);
        a2 = _mm256_fmadd_ps(load(&q8[2]), c2, a2);
        a3 = _mm256_fmadd_ps(load(&q8[3]), c3, a3);
    }
    hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)))
}

/// Channels per tile: `q * s` for one tile lives in a stack buffer (2 KiB).
const TILE: usize = 512;

/// Scores of `q` against every token of a KIVI block:
/// `out[t] = sum_c (q[c] s[c]) code[t][c] + sum_c q[c] m[c]`.
///
/// # Safety
/// See the module docs; additionally `q.len()` is a multiple of 32 and `block` has
/// `4 q.len() + out.len() q.len() bits / 8` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
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
        let mut b = _mm256_setzero_ps();
        let q8 = q[c0..c0 + n].as_chunks::<8>().0;
        let s8 = scales[2 * c0..2 * (c0 + n)].as_chunks::<16>().0;
        let m8 = mins[2 * c0..2 * (c0 + n)].as_chunks::<16>().0;
        for (((qv, sv), mv), o) in q8.iter().zip(s8).zip(m8).zip(qs.as_chunks_mut::<8>().0) {
            let qv = load(qv);
            store(o, _mm256_mul_ps(qv, load_f16(sv)));
            b = _mm256_fmadd_ps(qv, load_f16(mv), b);
        }
        bias += hsum(b);
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
// Several query heads against the same rows (a GQA group in a decode step). Each stored
// row is unpacked once, in registers, and read by every head of the group; the f32 row
// never reaches memory. `x̂ = fma(code, s, m)` as above, so scores and sums differ from
// the one-head kernels only in summation order.

/// Heads one pass over a run of rows serves; more heads take further passes.
const HEAD_BLOCK: usize = 4;

/// The eight sums of [`reduce8`] as plain floats, lane `p` for `a[p]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn reduce8_lanes(a: &[__m256; 8]) -> [f32; 8] {
    let mut lanes = [0.0f32; 8];
    store(&mut lanes, reduce8(a));
    lanes
}

/// `a + q . x` over one 32-value chunk (4 vectors): a head's share of a chunk of codes
/// that every head of the group reads.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fma_x32(a: __m256, q: &[[f32; 8]], x: &[__m256; 4]) -> __m256 {
    let mut a = a;
    for (q, x) in q[..4].iter().zip(x) {
        a = _mm256_fmadd_ps(load(q), *x, a);
    }
    a
}

/// 16 signed 8-bit codes → 2 x 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes_i8_x16(b: &[u8; 16]) -> [__m256; 2] {
    let (b8, _) = b.as_chunks::<8>();
    [codes_i8(&b8[0]), codes_i8(&b8[1])]
}

/// 16 4-bit codes (8 bytes, low nibble first) → 2 x 8 f32, in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes_u4_x16(b: &[u8; 8]) -> [__m256; 2] {
    let v = _mm_cvtsi64_si128(i64::from_le_bytes(*b));
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    let all = _mm_unpacklo_epi8(lo, hi); // elements 0..16
    let cvt = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
    [cvt(all), cvt(_mm_unpackhi_epi64(all, all))]
}

/// 16 2-bit codes (4 bytes, low bits first) → 2 x 8 f32, in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes_u2_x16(b: &[u8; 4]) -> [__m256; 2] {
    let v = _mm_cvtsi32_si128(i32::from_le_bytes(*b));
    let mask = _mm_set1_epi8(0x03);
    let c0 = _mm_and_si128(v, mask);
    let c1 = _mm_and_si128(_mm_srli_epi16::<2>(v), mask);
    let c2 = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    let c3 = _mm_and_si128(_mm_srli_epi16::<6>(v), mask);
    let c01 = _mm_unpacklo_epi8(c0, c1);
    let c23 = _mm_unpacklo_epi8(c2, c3);
    let all = _mm_unpacklo_epi16(c01, c23); // elements 0..16
    let cvt = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
    [cvt(all), cvt(_mm_unpackhi_epi64(all, all))]
}

macro_rules! int_heads_kernels {
    ($score:ident, $accumulate:ident, header = $hb:literal, asym = $asym:literal,
     bytes_per_8 = $cb:literal, $codes32:ident, $codes16:ident) => {
        /// `scores[h * stride + r] = q_h · x̂_r` for `H` heads (`q` holds `H` rows of `d`)
        /// and every row of `rows` (rows of `rb` bytes), `R` rows at a time: the `R * H`
        /// dot products are accumulated side by side and reduced together.
        ///
        /// # Safety
        /// See the module docs; `R * H <= 8`, `q.len() == H * d`, `rows` whole rows of
        /// `rb = row_bytes(d)`, `scores.len() >= (H - 1) * stride + rows`, `stride >= rows`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
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
                D / G * ($hb + G / 8 * $cb)
            } else {
                rb
            };
            let gbytes = $hb + group / 8 * $cb;
            let qh: [&[[f32; 8]]; H] = core::array::from_fn(|h| q[h * d..][..d].as_chunks::<8>().0);
            let n = rows.len() / rb;
            let mut r0 = 0;
            while r0 + R <= n {
                let mut acc = [_mm256_setzero_ps(); 8];
                for r in 0..R {
                    let row = &rows[(r0 + r) * rb..][..rb];
                    for (gi, rg) in row.chunks_exact(gbytes).enumerate() {
                        let (s, m) = group_params(rg, $asym);
                        let (c32, _) = rg[$hb..].as_chunks::<{ 4 * $cb }>();
                        for (j, c32) in c32.iter().enumerate() {
                            let x = $codes32(c32).map(|c| _mm256_fmadd_ps(c, s, m));
                            let at = (gi * group + 32 * j) / 8;
                            for h in 0..H {
                                acc[h * R + r] = fma_x32(acc[h * R + r], &qh[h][at..], &x);
                            }
                        }
                    }
                }
                // Head-major, so that each head's `R` scores leave in one copy.
                let lanes = reduce8_lanes(&acc);
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

        /// `acc[h] += sum_r w[h * stride + r] * x̂_r` for `H` heads (`acc` holds `H` rows of
        /// `d`), 16 columns at a time with the accumulators in registers across all rows.
        ///
        /// # Safety
        /// See the module docs; `acc.len() == H * d`, `rows` whole rows of
        /// `rb = row_bytes(d)`, `w.len() >= (H - 1) * stride + rows`, `stride >= rows`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
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
            let gbytes = $hb + group / 8 * $cb;
            let n = rows.len() / rb;
            let wh: [&[f32]; H] = core::array::from_fn(|h| &w[h * stride..][..n]);
            for c0 in (0..d).step_by(16) {
                let (gi, off) = (c0 / group, c0 % group);
                let codes_at = gi * gbytes + $hb + off / 8 * $cb;
                let mut a = [[_mm256_setzero_ps(); 2]; H];
                for (h, ah) in a.iter_mut().enumerate() {
                    let (a8, _) = acc[h * d + c0..][..16].as_chunks::<8>();
                    *ah = [load(&a8[0]), load(&a8[1])];
                }
                for (r, row) in rows.chunks_exact(rb).enumerate() {
                    // The first pass over the rows prefetches (later ones request nothing).
                    pf.bytes(rb);
                    let (s, m) = group_params(&row[gi * gbytes..][..gbytes], $asym);
                    let (c16, _) = row[codes_at..][..2 * $cb].as_chunks::<{ 2 * $cb }>();
                    let x = $codes16(&c16[0]).map(|c| _mm256_fmadd_ps(c, s, m));
                    for h in 0..H {
                        let wb = _mm256_set1_ps(wh[h][r]);
                        a[h][0] = _mm256_fmadd_ps(wb, x[0], a[h][0]);
                        a[h][1] = _mm256_fmadd_ps(wb, x[1], a[h][1]);
                    }
                }
                for (h, ah) in a.iter().enumerate() {
                    let (a8, _) = acc[h * d + c0..][..16].as_chunks_mut::<8>();
                    store(&mut a8[0], ah[0]);
                    store(&mut a8[1], ah[1]);
                }
            }
        }
    };
}

int_heads_kernels!(
    score_heads_i8,
    accumulate_heads_i8,
    header = 2,
    asym = false,
    bytes_per_8 = 8,
    codes_i8_x32,
    codes_i8_x16
);
int_heads_kernels!(
    score_heads_u4,
    accumulate_heads_u4,
    header = 4,
    asym = true,
    bytes_per_8 = 4,
    codes_u4_x32,
    codes_u4_x16
);
int_heads_kernels!(
    score_heads_u2,
    accumulate_heads_u2,
    header = 4,
    asym = true,
    bytes_per_8 = 2,
    codes_u2_x32,
    codes_u2_x16
);

/// `scores[h * stride + r] = q_h · x̂_r` for every query row `q_h` of `q` (rows of `d`) and
/// every stored row of `rows` (rows of `rb` bytes), each row unpacked once per block of
/// [`HEAD_BLOCK`] heads. Float formats score head by head.
///
/// # Safety
/// See the module docs; `q.len()` a multiple of `d`, `rb = format.row_bytes(d)`, `rows`
/// whole rows, `stride >= rows`, `scores.len() >= (heads - 1) * stride + rows`.
#[target_feature(enable = "avx2,fma,f16c")]
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
    // SAFETY: this function's contract: the CPU has AVX2, FMA and F16C.
    let t = unsafe { crate::simd::V256::new_unchecked() };
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
            ($k:ident, $g:expr, $G:literal, $D:literal) => {
                match hb {
                    4 => $k::<4, 2, $G, $D>($g, d, qb, rows, rb, sb, stride, &mut pf),
                    3 => $k::<3, 2, $G, $D>($g, d, qb, rows, rb, sb, stride, &mut pf),
                    2 => $k::<2, 4, $G, $D>($g, d, qb, rows, rb, sb, stride, &mut pf),
                    _ => $k::<1, 8, $G, $D>($g, d, qb, rows, rb, sb, stride, &mut pf),
                }
            };
        }
        macro_rules! blocks {
            ($k:ident, $g:expr) => {
                match ($g, d) {
                    (32, 64) => heads!($k, $g, 32, 64),
                    (64, 64) => heads!($k, $g, 64, 64),
                    (32, 128) => heads!($k, $g, 32, 128),
                    (64, 128) => heads!($k, $g, 64, 128),
                    (128, 128) => heads!($k, $g, 128, 128),
                    _ => heads!($k, $g, 0, 0),
                }
            };
        }
        // SAFETY: every arm calls a kernel with this function's own contract on heads
        // h0..h0 + hb, whose queries and score rows lie inside `q` and `scores`.
        unsafe {
            match format {
                RowFormat::Int8 { group } => blocks!(score_heads_i8, group.size()),
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
/// [`HEAD_BLOCK`] heads and 16 columns. Float formats accumulate head by head.
///
/// # Safety
/// See the module docs; `acc.len()` a multiple of `d`, `rb = format.row_bytes(d)`, `rows`
/// whole rows, `stride >= rows`, `w.len() >= (heads - 1) * stride + rows`.
#[target_feature(enable = "avx2,fma,f16c")]
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
    // SAFETY: this function's contract: the CPU has AVX2, FMA and F16C.
    let t = unsafe { crate::simd::V256::new_unchecked() };
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
                RowFormat::Int4 { group } => blocks!(accumulate_heads_u4, group.size()),
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

/// Scores of `H` heads (`q` holds `H` rows of `d <= TILE`) against every token of a KIVI
/// block, `R` tokens at a time: the scaled queries `q_h * s` and the biases
/// `sum_c q_h[c] m[c]` are formed once, then each token's codes are unpacked once for all
/// heads. `out[h * stride + t]`.
///
/// # Safety
/// See the module docs; `R * H <= 8`, `d` a multiple of 32 and at most [`TILE`], `block`
/// a whole block of `tokens` tokens, `out.len() >= (H - 1) * stride + tokens`,
/// `stride >= tokens`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn kivi_heads<const H: usize, const R: usize>(
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
    let mut qs = [[0.0f32; TILE]; H];
    let mut bias = [0.0f32; H];
    for h in 0..H {
        let mut b = _mm256_setzero_ps();
        let q8 = q[h * d..][..d].as_chunks::<8>().0;
        let s8 = scales.as_chunks::<16>().0;
        let m8 = mins.as_chunks::<16>().0;
        for (((qv, sv), mv), o) in q8.iter().zip(s8).zip(m8).zip(qs[h].as_chunks_mut::<8>().0) {
            let qv = load(qv);
            store(o, _mm256_mul_ps(qv, load_f16(sv)));
            b = _mm256_fmadd_ps(qv, load_f16(mv), b);
        }
        bias[h] = hsum(b);
    }
    let qs8: [&[[f32; 8]]; H] = core::array::from_fn(|h| qs[h][..d].as_chunks::<8>().0);
    let chunk = 4 * nbits; // code bytes of 32 channels
    let mut t0 = 0;
    let mut step = |t0: usize, r_n: usize| {
        let mut acc = [_mm256_setzero_ps(); 8];
        for r in 0..r_n {
            let tc = &codes[(t0 + r) * tcb..][..tcb];
            for (j, c) in tc.chunks_exact(chunk).enumerate() {
                let x = match bits {
                    KiviBits::B4 => codes_u4_x32(&c.as_chunks::<16>().0[0]),
                    KiviBits::B2 => codes_u2_x32(&c.as_chunks::<8>().0[0]),
                };
                for h in 0..H {
                    acc[r * H + h] = fma_x32(acc[r * H + h], &qs8[h][4 * j..], &x);
                }
            }
        }
        let lanes = reduce8_lanes(&acc);
        for r in 0..r_n {
            for h in 0..H {
                out[h * stride + t0 + r] = lanes[r * H + h] + bias[h];
            }
        }
    };
    while t0 + R <= tokens {
        step(t0, R);
        t0 += R;
    }
    if t0 < tokens {
        step(t0, tokens - t0);
    }
}

/// Scores of every query row of `q` (rows of `d`) against every token of a KIVI block:
/// `out[h * stride + t]`, heads in blocks of [`HEAD_BLOCK`]; one head at a time through
/// [`kivi_scores`] when `d` exceeds [`TILE`].
///
/// # Safety
/// See the module docs; `q.len()` a multiple of `d`, `d` a multiple of 32, `block` a whole
/// block of `tokens` tokens, `stride >= tokens`, `out` holding every score row.
#[target_feature(enable = "avx2,fma,f16c")]
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
                match hb {
                    4 => kivi_heads::<4, 2>(bits, d, qb, block, tokens, ob, stride),
                    3 => kivi_heads::<3, 2>(bits, d, qb, block, tokens, ob, stride),
                    2 => kivi_heads::<2, 4>(bits, d, qb, block, tokens, ob, stride),
                    _ => kivi_heads::<1, 8>(bits, d, qb, block, tokens, ob, stride),
                }
            }
        }
        h0 += hb;
    }
}
