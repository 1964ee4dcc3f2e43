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
use crate::scalar;

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn load(a: &[f32; 16]) -> __m512 {
    // SAFETY: `a` is 16 readable f32; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_ps(a.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn store(a: &mut [f32; 16], v: __m512) {
    // SAFETY: `a` is 16 writable f32; `storeu` has no alignment requirement.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn load_f32_bytes(b: &[u8; 64]) -> __m512 {
    // SAFETY: `b` is 64 readable bytes, exactly 16 f32; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_ps(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn load_256(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// 16 f16 → f32 (exact).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn load_f16(b: &[u8; 32]) -> __m512 {
    _mm512_cvtph_ps(load_256(b))
}

/// 16 bf16 → f32 (exact).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn load_bf16(b: &[u8; 32]) -> __m512 {
    let wide = _mm512_cvtepu16_epi32(load_256(b));
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
}

/// 16 signed 8-bit codes → f32.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn codes_i8(b: &[u8; 16]) -> __m512 {
    let v = u128::from_le_bytes(*b);
    let v = _mm_set_epi64x((v >> 64) as i64, v as i64);
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
}

/// 16 4-bit codes (8 bytes, low nibble first) → f32.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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

macro_rules! int_row_kernels {
    ($dot:ident, $axpy:ident, $deq:ident, header = $hb:literal, asym = $asym:literal,
     bytes_per_16 = $cb:literal, $codes:ident) => {
        /// Dot product of `q` with a quantized row of groups of `group` elements.
        ///
        /// # Safety
        /// See the module docs.
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn $dot(group: usize, q: &[f32], row: &[u8]) -> f32 {
            let gbytes = $hb + group / 16 * $cb;
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (qg, rg) in q.chunks_exact(group).zip(row.chunks_exact(gbytes)) {
                let (s, m) = group_params(rg, $asym);
                let (q32, _) = qg.as_chunks::<32>();
                let (c32, _) = rg[$hb..].as_chunks::<{ 2 * $cb }>();
                for (q32, c32) in q32.iter().zip(c32) {
                    let (q16, _) = q32.as_chunks::<16>();
                    let (c16, _) = c32.as_chunks::<$cb>();
                    a0 = _mm512_fmadd_ps(load(&q16[0]), _mm512_fmadd_ps($codes(&c16[0]), s, m), a0);
                    a1 = _mm512_fmadd_ps(load(&q16[1]), _mm512_fmadd_ps($codes(&c16[1]), s, m), a1);
                }
            }
            _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
        }

        /// `acc += w * x̂` for a quantized row.
        ///
        /// # Safety
        /// See the module docs.
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn $axpy(group: usize, w: f32, row: &[u8], acc: &mut [f32]) {
            let gbytes = $hb + group / 16 * $cb;
            let wv = _mm512_set1_ps(w);
            for (ag, rg) in acc.chunks_exact_mut(group).zip(row.chunks_exact(gbytes)) {
                let (s, m) = group_params(rg, $asym);
                let (a16, _) = ag.as_chunks_mut::<16>();
                let (c16, _) = rg[$hb..].as_chunks::<$cb>();
                for (a, c) in a16.iter_mut().zip(c16) {
                    let x = _mm512_fmadd_ps($codes(c), s, m);
                    store(a, _mm512_fmadd_ps(wv, x, load(a)));
                }
            }
        }

        /// `out = x̂` for a quantized row.
        ///
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn $deq(group: usize, row: &[u8], out: &mut [f32]) {
            let gbytes = $hb + group / 16 * $cb;
            for (og, rg) in out.chunks_exact_mut(group).zip(row.chunks_exact(gbytes)) {
                let (s, m) = group_params(rg, $asym);
                let (o16, _) = og.as_chunks_mut::<16>();
                let (c16, _) = rg[$hb..].as_chunks::<$cb>();
                for (o, c) in o16.iter_mut().zip(c16) {
                    store(o, _mm512_fmadd_ps($codes(c), s, m));
                }
            }
        }
    };
}

int_row_kernels!(
    dot_i8,
    axpy_i8,
    deq_i8,
    header = 2,
    asym = false,
    bytes_per_16 = 16,
    codes_i8
);
int_row_kernels!(
    dot_u4,
    axpy_u4,
    deq_u4,
    header = 4,
    asym = true,
    bytes_per_16 = 8,
    codes_u4
);
int_row_kernels!(
    dot_u2,
    axpy_u2,
    deq_u2,
    header = 4,
    asym = true,
    bytes_per_16 = 4,
    codes_u2
);

macro_rules! float_row_kernels {
    ($dot:ident, $axpy:ident, $deq:ident, width = $w:literal, $load:ident, $at:path) => {
        /// Dot product of `q` with a float row (16-element steps, scalar tail).
        ///
        /// # Safety
        /// See the module docs.
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn $dot(q: &[f32], row: &[u8]) -> f32 {
            let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let (q32, qt) = q.as_chunks::<32>();
            let (r32, rt) = row.as_chunks::<{ 32 * $w }>();
            for (q32, r32) in q32.iter().zip(r32) {
                let (q16, _) = q32.as_chunks::<16>();
                let (r16, _) = r32.as_chunks::<{ 16 * $w }>();
                a0 = _mm512_fmadd_ps(load(&q16[0]), $load(&r16[0]), a0);
                a1 = _mm512_fmadd_ps(load(&q16[1]), $load(&r16[1]), a1);
            }
            let (q16, qt) = qt.as_chunks::<16>();
            let (r16, rt16) = rt.as_chunks::<{ 16 * $w }>();
            for (q16, r16) in q16.iter().zip(r16) {
                a0 = _mm512_fmadd_ps(load(q16), $load(r16), a0);
            }
            let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            for (&qi, b) in qt.iter().zip(rt16.chunks_exact($w)) {
                sum += qi * $at(b);
            }
            sum
        }

        /// `acc += w * x` for a float row.
        ///
        /// # Safety
        /// See the module docs.
        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn $axpy(w: f32, row: &[u8], acc: &mut [f32]) {
            let wv = _mm512_set1_ps(w);
            let (a16, at) = acc.as_chunks_mut::<16>();
            let (r16, rt) = row.as_chunks::<{ 16 * $w }>();
            for (a, r) in a16.iter_mut().zip(r16) {
                store(a, _mm512_fmadd_ps(wv, $load(r), load(a)));
            }
            for (a, b) in at.iter_mut().zip(rt.chunks_exact($w)) {
                *a += w * $at(b);
            }
        }

        /// `out = x` for a float row.
        ///
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn $deq(row: &[u8], out: &mut [f32]) {
            let (o16, ot) = out.as_chunks_mut::<16>();
            let (r16, rt) = row.as_chunks::<{ 16 * $w }>();
            for (o, r) in o16.iter_mut().zip(r16) {
                store(o, $load(r));
            }
            for (o, b) in ot.iter_mut().zip(rt.chunks_exact($w)) {
                *o = $at(b);
            }
        }
    };
}

float_row_kernels!(
    dot_f32,
    axpy_f32,
    deq_f32,
    width = 4,
    load_f32_bytes,
    scalar::f32_at
);
float_row_kernels!(
    dot_f16,
    axpy_f16,
    deq_f16,
    width = 2,
    load_f16,
    scalar::f16_at
);
float_row_kernels!(
    dot_bf16,
    axpy_bf16,
    deq_bf16,
    width = 2,
    load_bf16,
    scalar::bf16_at
);

/// `q · x̂` for any row format.
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn dot(format: RowFormat, q: &[f32], row: &[u8]) -> f32 {
    // SAFETY: every arm calls a kernel with this function's own contract (features, lengths).
    unsafe {
        match format {
            RowFormat::F32 => dot_f32(q, row),
            RowFormat::F16 => dot_f16(q, row),
            RowFormat::Bf16 => dot_bf16(q, row),
            RowFormat::Int8 { group } => dot_i8(group.size(), q, row),
            RowFormat::Int4 { group } => dot_u4(group.size(), q, row),
            RowFormat::Int2 { group } => dot_u2(group.size(), q, row),
        }
    }
}

/// `acc += w * x̂` for any row format.
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn axpy(format: RowFormat, w: f32, row: &[u8], acc: &mut [f32]) {
    // SAFETY: every arm calls a kernel with this function's own contract (features, lengths).
    unsafe {
        match format {
            RowFormat::F32 => axpy_f32(w, row, acc),
            RowFormat::F16 => axpy_f16(w, row, acc),
            RowFormat::Bf16 => axpy_bf16(w, row, acc),
            RowFormat::Int8 { group } => axpy_i8(group.size(), w, row, acc),
            RowFormat::Int4 { group } => axpy_u4(group.size(), w, row, acc),
            RowFormat::Int2 { group } => axpy_u2(group.size(), w, row, acc),
        }
    }
}

/// Scores of `q` against every row of `rows` (`out.len()` rows of `rb` bytes).
///
/// # Safety
/// See the module docs; `rows.len() == out.len() * rb`, `rb = format.row_bytes(q.len())`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn dot_many(
    format: RowFormat,
    q: &[f32],
    rows: &[u8],
    rb: usize,
    out: &mut [f32],
) {
    let rows = rows.chunks_exact(rb);
    macro_rules! each {
        ($kernel:expr) => {
            for (o, row) in out.iter_mut().zip(rows) {
                *o = $kernel(row);
            }
        };
    }
    // SAFETY: every arm calls a kernel with this function's own contract (features,
    // lengths); each row has exactly `row_bytes(q.len())` bytes.
    unsafe {
        match format {
            RowFormat::F32 => each!(|r| dot_f32(q, r)),
            RowFormat::F16 => each!(|r| dot_f16(q, r)),
            RowFormat::Bf16 => each!(|r| dot_bf16(q, r)),
            RowFormat::Int8 { group } => each!(|r| dot_i8(group.size(), q, r)),
            RowFormat::Int4 { group } => each!(|r| dot_u4(group.size(), q, r)),
            RowFormat::Int2 { group } => each!(|r| dot_u2(group.size(), q, r)),
        }
    }
}

/// `acc += sum_t weights[t] * x̂_t` over `weights.len()` rows of `rb` bytes.
///
/// # Safety
/// See the module docs; `rows.len() == weights.len() * rb`, `rb = format.row_bytes(acc.len())`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn axpy_many(
    format: RowFormat,
    weights: &[f32],
    rows: &[u8],
    rb: usize,
    acc: &mut [f32],
) {
    let rows = rows.chunks_exact(rb);
    macro_rules! each {
        ($kernel:expr) => {
            for (&w, row) in weights.iter().zip(rows) {
                $kernel(w, row);
            }
        };
    }
    // SAFETY: every arm calls a kernel with this function's own contract (features,
    // lengths); each row has exactly `row_bytes(acc.len())` bytes.
    unsafe {
        match format {
            RowFormat::F32 => each!(|w, r| axpy_f32(w, r, acc)),
            RowFormat::F16 => each!(|w, r| axpy_f16(w, r, acc)),
            RowFormat::Bf16 => each!(|w, r| axpy_bf16(w, r, acc)),
            RowFormat::Int8 { group } => each!(|w, r| axpy_i8(group.size(), w, r, acc)),
            RowFormat::Int4 { group } => each!(|w, r| axpy_u4(group.size(), w, r, acc)),
            RowFormat::Int2 { group } => each!(|w, r| axpy_u2(group.size(), w, r, acc)),
        }
    }
}

/// `out = x̂` for any row format.
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn dequantize(format: RowFormat, row: &[u8], out: &mut [f32]) {
    // SAFETY: every arm calls a kernel with this function's own contract (features, lengths).
    unsafe {
        match format {
            RowFormat::F32 => deq_f32(row, out),
            RowFormat::F16 => deq_f16(row, out),
            RowFormat::Bf16 => deq_bf16(row, out),
            RowFormat::Int8 { group } => deq_i8(group.size(), row, out),
            RowFormat::Int4 { group } => deq_u4(group.size(), row, out),
            RowFormat::Int2 { group } => deq_u2(group.size(), row, out),
        }
    }
}

/// `out[r] = x̂[r]` for consecutive rows of `row_bytes` each, `out` holding rows of `d`:
/// one call (and one feature check by the caller) for a whole tile.
///
/// # Safety
/// See the module docs; `rows.len() / row_bytes == out.len() / d` rows of matching sizes.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(crate) unsafe fn dequantize_rows(
    format: RowFormat,
    rows: &[u8],
    row_bytes: usize,
    out: &mut [f32],
    d: usize,
) {
    for (row, dst) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(d)) {
        // SAFETY: this function's own contract; each row and output has the checked sizes.
        unsafe { dequantize(format, row, dst) }
    }
}

/// `sum qs[i] * code[i]` over 4-bit codes (`qs.len()` a multiple of 32).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
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
