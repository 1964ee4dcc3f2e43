//! The x86-64 widths: the level tokens, their `#[target_feature]` entry points, their
//! [`Simd`] operations, and the horizontal reductions the kernel crates share.
//!
//! Unsafe code here is of two kinds, each with one argument. Calls into `#[target_feature]`
//! code are sound because a token exists (its constructor asked the CPU). Loads and stores
//! go through fixed-size arrays, so every address they touch is in bounds by type.

use core::arch::x86_64::*;

use super::{quads, Isa, Kernel, Simd};

/// Proof that this CPU has [`Isa::Avx2`]'s features (AVX2, FMA, F16C): 8 f32 lanes.
#[derive(Debug, Clone, Copy)]
pub struct V256(());

/// Proof that this CPU has [`Isa::Avx512`]'s features (AVX-512 F/BW/VL/DQ besides AVX2, FMA,
/// F16C): 16 f32 lanes.
#[derive(Debug, Clone, Copy)]
pub struct V512(());

impl V256 {
    /// The token, if this CPU has the features.
    #[inline]
    pub fn new() -> Option<V256> {
        Isa::Avx2.is_available().then_some(V256(()))
    }
}

impl V512 {
    /// The token, if this CPU has the features.
    #[inline]
    pub fn new() -> Option<V512> {
        Isa::Avx512.is_available().then_some(V512(()))
    }

    /// The AVX2 token: every CPU with AVX-512 here has AVX2's features.
    #[inline]
    pub fn v256(self) -> V256 {
        V256(())
    }
}

/// [`Kernel::simd`] compiled for AVX2.
///
/// # Safety
/// None beyond holding `t`; `unsafe` only because of the `#[target_feature]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn run_256<K: Kernel>(t: V256, k: K) -> K::Output {
    k.simd(t)
}

/// [`Kernel::simd`] compiled for AVX-512.
///
/// # Safety
/// None beyond holding `t`; `unsafe` only because of the `#[target_feature]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn run_512<K: Kernel>(t: V512, k: K) -> K::Output {
    k.simd(t)
}

/// Runs `$e` as an unsafe block inside a token's method: the token proves the CPU has the features.
macro_rules! feat {
    ($e:expr) => {
        // SAFETY: `self` is a token, which exists only on a CPU with its level's features
        // (its constructor asked the cached detection); no pointer is involved.
        unsafe { $e }
    };
}

// ---------------------------------------------------------------------------------------
// GGUF weight codes (added for kv-model's matrix kernels, issue 18): the byte operations
// both widths share, and the 256-bit code-to-weight conversion.

/// How the 256-bit level turns codes into weights (its [`Simd::Lut16`] and
/// [`Simd::Lut32`]): with no 16-lane permute at 256 bits, each code is converted to f32 and
/// scaled, `fma(i, a, b)` or `(i - c) * a`, which round exactly as the 512-bit tables do.
#[derive(Debug, Clone, Copy)]
pub struct Codes256 {
    /// The scale `a`, in every lane.
    a: __m256,
    /// The offset `b`, in every lane (unused when centered).
    b: __m256,
    /// `Some(c)`: weights `(i - c) * a`; `None`: `fma(i, a, b)`.
    center: Option<i8>,
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_256i_bytes(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

/// Per byte `v >> n` (`n < 8`): a 16-bit shift, then the bits that crossed from the
/// neighbouring byte cleared.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn shr_bytes(v: __m256i, n: u32) -> __m256i {
    let n = n.min(7);
    let shifted = _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8((0xFFu8 >> n) as i8))
}

/// Per byte `v << n` (`n < 8`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn shl_bytes(v: __m256i, n: u32) -> __m256i {
    let n = n.min(7);
    let shifted = _mm256_sll_epi16(v, _mm_cvtsi32_si128(n as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8((0xFFu8 << n) as i8))
}

/// The nibbles of 16 bytes in GGUF's split order: low nibbles in the low 128 bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn split_nibbles(b: &[u8; 16]) -> __m256i {
    let v = load_128(b);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    _mm256_set_m128i(hi, lo)
}

/// Two vectors of 16 byte codes (`lo`: codes 0..16, `hi`: 16..32) as 32 weights of `t`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes_256(t: Codes256, lo: __m128i, hi: __m128i) -> [__m256; 4] {
    let (lo, hi) = match t.center {
        Some(c) => (
            _mm_sub_epi8(lo, _mm_set1_epi8(c)),
            _mm_sub_epi8(hi, _mm_set1_epi8(c)),
        ),
        None => (lo, hi),
    };
    [
        code_256(t, lo),
        code_256(t, _mm_unpackhi_epi64(lo, lo)),
        code_256(t, hi),
        code_256(t, _mm_unpackhi_epi64(hi, hi)),
    ]
}

/// The low 8 byte codes of `q` (already less the center, if any) as weights of `t`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn code_256(t: Codes256, q: __m128i) -> __m256 {
    match t.center {
        Some(_) => _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), t.a),
        None => _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), t.a, t.b),
    }
}

/// [`codes_256`] of 32 byte codes in one register.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes_256_of(t: Codes256, v: __m256i) -> [__m256; 4] {
    codes_256(
        t,
        _mm256_castsi256_si128(v),
        _mm256_extracti128_si256::<1>(v),
    )
}

/// 32 signed bytes as 4 x 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i8_bytes_256(v: __m256i) -> [__m256; 4] {
    let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let cvt = |q: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    [
        cvt(lo),
        cvt(_mm_unpackhi_epi64(lo, lo)),
        cvt(hi),
        cvt(_mm_unpackhi_epi64(hi, hi)),
    ]
}

/// Byte `j` = `value` where bit `j` of `bits` is set (AVX2: each byte picks its source
/// byte of `bits`, then tests its own bit).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bits_to_bytes_256(bits: u32, value: u8) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let pick = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let spread = _mm256_shuffle_epi8(v, pick);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let hit = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    _mm256_and_si256(hit, _mm256_set1_epi8(value as i8))
}

/// The byte operations of [`Simd::Bytes32`], the same at both widths.
macro_rules! bytes32_ops {
    () => {
        #[inline(always)]
        fn load_bytes32(self, b: &[u8; 32]) -> __m256i {
            feat!(load_256i_bytes(b))
        }
        #[inline(always)]
        fn split_nibbles32(self, b: &[u8; 16]) -> __m256i {
            feat!(split_nibbles(b))
        }
        #[inline(always)]
        fn and_bytes32(self, v: __m256i, mask: u8) -> __m256i {
            feat!(_mm256_and_si256(v, _mm256_set1_epi8(mask as i8)))
        }
        #[inline(always)]
        fn or_bytes32(self, a: __m256i, b: __m256i) -> __m256i {
            feat!(_mm256_or_si256(a, b))
        }
        #[inline(always)]
        fn shr_bytes32(self, v: __m256i, n: u32) -> __m256i {
            feat!(shr_bytes(v, n))
        }
        #[inline(always)]
        fn shl_bytes32(self, v: __m256i, n: u32) -> __m256i {
            feat!(shl_bytes(v, n))
        }
        #[inline(always)]
        fn sub_bytes32(self, v: __m256i, k: u8) -> __m256i {
            feat!(_mm256_sub_epi8(v, _mm256_set1_epi8(k as i8)))
        }
    };
}

/// `acc + scale * p`, `p` the i32 sums of 4 products of `u` (unsigned) by `x` (signed):
/// [`Simd::dot_bytes32`] at both widths.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_bytes_256<const VNNI: bool>(u: __m256i, x: __m256i, scale: f32, acc: __m256) -> __m256 {
    let p = if VNNI {
        let mut p = _mm256_setzero_si256();
        // SAFETY: the caller passes `VNNI` only where `vnni_available` found AVX-512 VNNI
        // and VL (the EVEX encoding of `vpdpbusd` on ymm registers); registers only, no
        // memory or stack.
        unsafe {
            core::arch::asm!(
                "{{evex}} vpdpbusd {p}, {u}, {x}",
                p = inout(ymm_reg) p,
                u = in(ymm_reg) u,
                x = in(ymm_reg) x,
                options(pure, nomem, nostack),
            );
        }
        p
    } else {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
    };
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(scale), acc)
}

/// `acc + Σ u·x` per lane of 4 bytes, `u` unsigned, `x` signed: [`Simd::dot_bcast_u8`]
/// at 256 bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_256<const VNNI: bool>(acc: __m256i, u: __m256i, x: __m256i) -> __m256i {
    if VNNI {
        let mut p = acc;
        // SAFETY: the caller passes `VNNI` only where `vnni_available` found AVX-512 VNNI
        // and VL (the EVEX encoding of `vpdpbusd` on ymm registers); registers only.
        unsafe {
            core::arch::asm!(
                "{{evex}} vpdpbusd {p}, {u}, {x}",
                p = inout(ymm_reg) p,
                u = in(ymm_reg) u,
                x = in(ymm_reg) x,
                options(pure, nomem, nostack),
            );
        }
        p
    } else {
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
        _mm256_add_epi32(acc, p)
    }
}

/// `acc + Σ u·x` per lane of 4 bytes, `u` unsigned, `x` signed: [`Simd::dot_bcast_u8`]
/// at 512 bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn dot4_512<const VNNI: bool>(acc: __m512i, u: __m512i, x: __m512i) -> __m512i {
    if VNNI {
        let mut p = acc;
        // SAFETY: the caller passes `VNNI` only where `vnni_available` found AVX-512 VNNI
        // (`vpdpbusd` on zmm registers); registers only.
        unsafe {
            core::arch::asm!(
                "vpdpbusd {p}, {u}, {x}",
                p = inout(zmm_reg) p,
                u = in(zmm_reg) u,
                x = in(zmm_reg) x,
                options(pure, nomem, nostack),
            );
        }
        p
    } else {
        let p = _mm512_madd_epi16(_mm512_maddubs_epi16(u, x), _mm512_set1_epi16(1));
        _mm512_add_epi32(acc, p)
    }
}

/// Defines `$name`: `acc + Σ_t Σ_j u[t][4k + j] · x[4t + j]` per lane of 4 bytes with
/// `vpdpbusd` on `$reg` registers, each word of `x` broadcast by the instruction's own memory
/// operand (`$bcast`): [`Simd::dot_bcast4_u8`] with VNNI, once per register width.
macro_rules! dot16_vnni {
    ($(#[$doc:meta])* $name:ident, $vec:ty, $reg:ident, $bcast:literal, $features:literal) => {
        $(#[$doc])*
        #[inline]
        #[target_feature(enable = $features)]
        fn $name(acc: $vec, u: [$vec; 4], x: &[u8; 16]) -> $vec {
            let mut p = acc;
            // SAFETY: the caller passes `VNNI` only where `vnni_available` found AVX-512
            // VNNI and VL (`vpdpbusd` in its EVEX encoding, with broadcasts, on ymm and zmm
            // registers); `x` is 16 readable bytes, of which the four words at 0, 4, 8 and
            // 12 are read.
            unsafe {
                core::arch::asm!(
                    concat!("vpdpbusd {p}, {u0}, dword ptr [{x}]", $bcast),
                    concat!("vpdpbusd {p}, {u1}, dword ptr [{x} + 4]", $bcast),
                    concat!("vpdpbusd {p}, {u2}, dword ptr [{x} + 8]", $bcast),
                    concat!("vpdpbusd {p}, {u3}, dword ptr [{x} + 12]", $bcast),
                    p = inout($reg) p,
                    u0 = in($reg) u[0],
                    u1 = in($reg) u[1],
                    u2 = in($reg) u[2],
                    u3 = in($reg) u[3],
                    x = in(reg) x.as_ptr(),
                    options(pure, readonly, nostack, preserves_flags),
                );
            }
            p
        }
    };
}

dot16_vnni!(
    /// [`Simd::dot_bcast4_u8`] at 256 bits with VNNI (`{1to8}` broadcasts).
    dot16_256_vnni,
    __m256i,
    ymm_reg,
    "{{1to8}}",
    "avx2,fma,f16c"
);
dot16_vnni!(
    /// [`Simd::dot_bcast4_u8`] at 512 bits with VNNI (`{1to16}` broadcasts).
    dot16_512_vnni,
    __m512i,
    zmm_reg,
    "{{1to16}}",
    "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
);

/// `x` negated in the bytes where `w < 0` (AVX-512 has no `vpsignb`; where `w == 0` the
/// byte is kept, which the product with `|w| = 0` ignores).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn sign_512(x: __m512i, w: __m512i) -> __m512i {
    _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_256i_words(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn load_512i_words(b: &[u8; 64]) -> __m512i {
    // SAFETY: `b` is 64 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }
}

/// The first 8 of 16 words.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_256i_u32(n: &[u32; 16]) -> __m256i {
    // SAFETY: `n` is 64 readable bytes, of which 32 are read; `loadu` has no alignment
    // requirement.
    unsafe { _mm256_loadu_si256(n.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn load_512i_u32(n: &[u32; 16]) -> __m512i {
    // SAFETY: `n` is 64 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_si512(n.as_ptr().cast()) }
}

/// The 2-bit field of `hi` at bit `at` moved to bits 4..6 (other bits cleared).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn field2_to_4_256(hi: __m256i, at: u32) -> __m256i {
    let moved = if at >= 4 {
        _mm256_srl_epi32(hi, _mm_cvtsi32_si128((at - 4) as i32))
    } else {
        _mm256_sll_epi32(hi, _mm_cvtsi32_si128((4 - at) as i32))
    };
    _mm256_and_si256(moved, _mm256_set1_epi32(0x30))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn field2_to_4_512(hi: __m512i, at: u32) -> __m512i {
    let moved = if at >= 4 {
        _mm512_srl_epi32(hi, _mm_cvtsi32_si128((at - 4) as i32))
    } else {
        _mm512_sll_epi32(hi, _mm_cvtsi32_si128((4 - at) as i32))
    };
    _mm512_and_si512(moved, _mm512_set1_epi32(0x30))
}

/// The integer dot products of [`Simd`], the same at both widths (8 lanes).
macro_rules! int_dot_ops {
    () => {
        type F32x8 = __m256;
        #[inline(always)]
        fn zero_f32x8(self) -> __m256 {
            feat!(_mm256_setzero_ps())
        }
        #[inline(always)]
        fn sum_f32x8(self, v: __m256) -> f32 {
            feat!(hsum_256(v))
        }
        #[inline(always)]
        fn abs_bytes32(self, v: __m256i) -> __m256i {
            feat!(_mm256_abs_epi8(v))
        }
        #[inline(always)]
        fn sign_bytes32(self, x: __m256i, of: __m256i) -> __m256i {
            feat!(_mm256_sign_epi8(x, of))
        }
        #[inline(always)]
        fn dot_bytes32<const VNNI: bool>(
            self,
            u: __m256i,
            x: __m256i,
            scale: f32,
            acc: __m256,
        ) -> __m256 {
            feat!(dot_bytes_256::<VNNI>(u, x, scale, acc))
        }
    };
}

// ---------------------------------------------------------------------------------------
// 256 bits.

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_128(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is 16 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_256(a: &[f32; 8]) -> __m256 {
    // SAFETY: `a` is 8 readable f32; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_ps(a.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_256(a: &mut [f32; 8], v: __m256) {
    // SAFETY: `a` is 8 writable f32; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f32_bytes_256(b: &[u8; 32]) -> __m256 {
    // SAFETY: `b` is 32 readable bytes, exactly 8 f32; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_ps(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_256(b: &[u8; 16]) -> __m256 {
    _mm256_cvtph_ps(load_128(b))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bf16_256(b: &[u8; 16]) -> __m256 {
    // A bf16 is the top half of an f32.
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(load_128(b))))
}

/// Sum of the eight lanes.
///
/// # Safety
/// Callable without `unsafe` from code compiled with AVX2, FMA and F16C (another
/// `#[target_feature]` function); elsewhere the caller must hold a [`V256`] or know the CPU
/// has the features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn hsum_256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// Two vectors of 16 unsigned byte codes → 4 x 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_256(first: __m128i, second: __m128i) -> [__m256; 4] {
    let cvt = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
    [
        cvt(first),
        cvt(_mm_unpackhi_epi64(first, first)),
        cvt(second),
        cvt(_mm_unpackhi_epi64(second, second)),
    ]
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn i8_256(b: &[u8; 32]) -> [__m256; 4] {
    let (b16, _) = b.as_chunks::<16>();
    let (lo, hi) = (load_128(&b16[0]), load_128(&b16[1]));
    let cvt = |x: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x));
    [
        cvt(lo),
        cvt(_mm_unpackhi_epi64(lo, lo)),
        cvt(hi),
        cvt(_mm_unpackhi_epi64(hi, hi)),
    ]
}

/// 32 4-bit codes in element order as two vectors of 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles(b: &[u8; 16]) -> (__m128i, __m128i) {
    let v = load_128(b);
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, mask); // even elements
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask); // odd elements
    (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi))
}

/// 32 2-bit codes in element order as two vectors of 16 bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn crumbs(b: &[u8; 8]) -> (__m128i, __m128i) {
    let v = _mm_cvtsi64_si128(i64::from_le_bytes(*b));
    let mask = _mm_set1_epi8(0x03);
    // c_k holds element 4j + k of byte j.
    let c0 = _mm_and_si128(v, mask);
    let c1 = _mm_and_si128(_mm_srli_epi16::<2>(v), mask);
    let c2 = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    let c3 = _mm_and_si128(_mm_srli_epi16::<6>(v), mask);
    let c01 = _mm_unpacklo_epi8(c0, c1); // pairs (4j, 4j+1)
    let c23 = _mm_unpacklo_epi8(c2, c3); // pairs (4j+2, 4j+3)
    (_mm_unpacklo_epi16(c01, c23), _mm_unpackhi_epi16(c01, c23))
}

/// Lane `p` of the result is the sum of the eight lanes of `a[p]`: eight horizontal sums
/// for the price of about two.
///
/// # Safety
/// Callable without `unsafe` from code compiled with AVX2, FMA and F16C (another
/// `#[target_feature]` function); elsewhere the caller must hold a [`V256`] or know the CPU
/// has the features.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub fn reduce8_256(a: &[__m256; 8]) -> __m256 {
    // hadd(x, y) = [x0+x1, x2+x3, y0+y1, y2+y3 | x4+x5, x6+x7, y4+y5, y6+y7].
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
    let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
    _mm256_add_ps(lo, hi)
}

// ---- simdq additions: 256-bit helpers of the quantizers and multi-head kernels. ----

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_128i(b: &mut [u8; 16], v: __m128i) {
    // SAFETY: `b` is 16 writable bytes; `storeu` has no alignment requirement.
    unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_256i(b: &mut [u8; 32], v: __m256i) {
    // SAFETY: `b` is 32 writable bytes; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(b.as_mut_ptr().cast(), v) }
}

/// Largest of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax_256(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
}

/// Smallest of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmin_256(v: __m256) -> f32 {
    let s = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_min_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_min_ss(s, _mm_movehdup_ps(s)))
}

/// Packs 4 x 8 i32 lanes (each in i8 range) into 32 bytes in lane order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pack_bytes_256(v: [__m256i; 4]) -> __m256i {
    // The packs interleave 128-bit halves: dwords come out as a0-3 b0-3 c0-3 d0-3 |
    // a4-7 b4-7 c4-7 d4-7; the permutation restores a, b, c, d order.
    let ab = _mm256_packs_epi32(v[0], v[1]);
    let cd = _mm256_packs_epi32(v[2], v[3]);
    let bytes = _mm256_packs_epi16(ab, cd);
    _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// [`Simd::round32_i8`] at 256 bits: per lane `t = v * inv` clamped to ±127 (NaN lanes
/// masked to 0 at the end), truncated, plus the sign where the dropped fraction is at least
/// 0.5 (exact: `c - trunc(c)` is representable), so ties go away from zero as
/// `f32::round` rounds them.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn round32_i8_256(x: [__m256; 4], inv: f32) -> ([u8; 32], i32) {
    let inv = _mm256_set1_ps(inv);
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    let (half, one, sign) = (
        _mm256_set1_ps(0.5),
        _mm256_set1_ps(1.0),
        _mm256_set1_ps(-0.0),
    );
    let mut q = [_mm256_setzero_si256(); 4];
    for (q, &v) in q.iter_mut().zip(&x) {
        let t = _mm256_mul_ps(v, inv);
        // `max` gives its second operand for a NaN lane: -127 here, masked off below.
        let c = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(c);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(c, r));
        let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, half);
        let step = _mm256_and_ps(up, _mm256_or_ps(_mm256_and_ps(c, sign), one));
        let ord = _mm256_cmp_ps::<_CMP_ORD_Q>(t, t);
        *q = _mm256_cvtps_epi32(_mm256_and_ps(_mm256_add_ps(r, step), ord));
    }
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    let mut out = [0u8; 32];
    store_256i(&mut out, pack_bytes_256(q));
    (out, _mm_cvtsi128_si32(s))
}

/// The two halves of 16 byte codes widened to 2 x 8 f32 (`cvt` widens 8 bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen16_256(all: __m128i, cvt: impl Fn(__m128i) -> __m256i) -> [__m256; 2] {
    [
        _mm256_cvtepi32_ps(cvt(all)),
        _mm256_cvtepi32_ps(cvt(_mm_unpackhi_epi64(all, all))),
    ]
}

/// 16 4-bit codes (8 bytes, low nibble first) as 16 bytes in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibbles16(b: &[u8; 8]) -> __m128i {
    let v = _mm_cvtsi64_si128(i64::from_le_bytes(*b));
    let mask = _mm_set1_epi8(0x0f);
    let lo = _mm_and_si128(v, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    _mm_unpacklo_epi8(lo, hi)
}

/// 16 2-bit codes (4 bytes, low bits first) as 16 bytes in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn crumbs16(b: &[u8; 4]) -> __m128i {
    let v = _mm_cvtsi32_si128(i32::from_le_bytes(*b));
    let mask = _mm_set1_epi8(0x03);
    let c0 = _mm_and_si128(v, mask);
    let c1 = _mm_and_si128(_mm_srli_epi16::<2>(v), mask);
    let c2 = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
    let c3 = _mm_and_si128(_mm_srli_epi16::<6>(v), mask);
    _mm_unpacklo_epi16(_mm_unpacklo_epi8(c0, c1), _mm_unpacklo_epi8(c2, c3))
}

/// bf16 bits (round to nearest even) of 8 or 16 finite f32 in the low 16 bits of each
/// 32-bit lane: add `0x7fff` plus the lowest kept bit, then shift.
macro_rules! bf16_bits {
    ($v:expr, $cast:ident, $srli:ident, $and:ident, $add:ident, $set1:ident) => {{
        let bits = $cast($v);
        let lsb = $and($srli::<16>(bits), $set1(1));
        $srli::<16>($add($add(bits, $set1(0x7fff)), lsb))
    }};
}

// --- simdc (kv-backend-cpu attention kernels): begin ---------------------------------

/// All-ones in the lanes `0..n` of a 256-bit mask (`n < 8`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn first_256(n: usize) -> __m256i {
    // `n < 8`, so the cast is exact.
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The first `a.len() < 8` elements of `a`, zero elsewhere.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_first_256(a: &[f32]) -> __m256 {
    let m = first_256(a.len().min(7));
    // SAFETY: the lanes of `m` are set only below `a.len()`, inside the slice; a masked
    // load neither reads nor faults on the others.
    unsafe { _mm256_maskload_ps(a.as_ptr(), m) }
}

/// Stores the first `a.len() < 8` lanes of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_first_256(a: &mut [f32], v: __m256) {
    let m = first_256(a.len().min(7));
    // SAFETY: the lanes of `m` are set only below `a.len()`, inside the slice, borrowed
    // exclusively; a masked store neither writes nor faults on the others.
    unsafe { _mm256_maskstore_ps(a.as_mut_ptr(), m, v) }
}

// --- simdc: end -------------------------------------------------------------------------

impl Simd for V256 {
    const LANES: usize = 8;
    const ISA: Isa = Isa::Avx2;
    type F32 = __m256;
    type Lanes = [f32; 8];
    type Halves = [u8; 16];
    type Words = [u8; 32];
    type X32 = [__m256; 4];

    type Bytes32 = __m256i;
    type Lut16 = Codes256;
    type Lut32 = Codes256;
    bytes32_ops!();
    int_dot_ops!();
    type I32 = __m256i;
    #[inline(always)]
    fn zero_i32(self) -> __m256i {
        feat!(_mm256_setzero_si256())
    }
    #[inline(always)]
    fn load_i32_bytes(self, b: &[u8; 32]) -> __m256i {
        feat!(load_256i_words(b))
    }
    #[inline(always)]
    fn add_i32(self, a: __m256i, b: __m256i) -> __m256i {
        feat!(_mm256_add_epi32(a, b))
    }
    #[inline(always)]
    fn i32_to_f32(self, v: __m256i) -> __m256 {
        feat!(_mm256_cvtepi32_ps(v))
    }
    #[inline(always)]
    fn nibbles_i32(self, v: __m256i) -> (__m256i, __m256i) {
        feat!({
            let m = _mm256_set1_epi8(15);
            (
                _mm256_and_si256(v, m),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v), m),
            )
        })
    }
    #[inline(always)]
    fn load_i32_bytes32(self, b: &[u8; 32]) -> __m256i {
        feat!(load_256i_words(b))
    }
    #[inline(always)]
    fn shr_i32_lanes(self, v: __m256i, n: &[u32; 16]) -> __m256i {
        feat!(_mm256_srlv_epi32(v, load_256i_u32(n)))
    }
    #[inline(always)]
    fn field_f32(self, v: __m256i, at: u32, mask: u32) -> __m256 {
        feat!(_mm256_cvtepi32_ps(_mm256_and_si256(
            _mm256_srl_epi32(v, _mm_cvtsi32_si128(at as i32)),
            _mm256_set1_epi32(mask as i32)
        )))
    }
    #[inline(always)]
    fn nibble_bit4_i32(self, lo: __m256i, lo_at: u32, hi: __m256i, hi_shl: u32) -> __m256i {
        feat!({
            let m = _mm256_set1_epi32(0x0F0F_0F0F);
            let lo = _mm256_srl_epi32(lo, _mm_cvtsi32_si128(lo_at as i32));
            let hi = _mm256_sll_epi32(hi, _mm_cvtsi32_si128(hi_shl as i32));
            _mm256_or_si256(_mm256_and_si256(lo, m), _mm256_andnot_si256(m, hi))
        })
    }
    #[inline(always)]
    fn field6_f32(self, lo: __m256i, lo_at: u32, hi: __m256i, hi_at: u32) -> __m256 {
        feat!({
            let lo = _mm256_and_si256(
                _mm256_srl_epi32(lo, _mm_cvtsi32_si128(lo_at as i32)),
                _mm256_set1_epi32(15),
            );
            _mm256_cvtepi32_ps(_mm256_or_si256(lo, field2_to_4_256(hi, hi_at)))
        })
    }
    #[inline(always)]
    fn permute_f32(self, v: __m256, idx: &[u32; 16]) -> __m256 {
        feat!(_mm256_permutevar8x32_ps(v, load_256i_u32(idx)))
    }
    #[inline(always)]
    fn dot_bcast_u8<const VNNI: bool>(self, acc: __m256i, u: __m256i, x: [u8; 4]) -> __m256i {
        feat!(dot4_256::<VNNI>(
            acc,
            u,
            _mm256_set1_epi32(i32::from_le_bytes(x))
        ))
    }
    #[inline(always)]
    fn dot_bcast_i8<const VNNI: bool>(self, acc: __m256i, w: __m256i, x: [u8; 4]) -> __m256i {
        feat!({
            let x = _mm256_sign_epi8(_mm256_set1_epi32(i32::from_le_bytes(x)), w);
            dot4_256::<VNNI>(acc, _mm256_abs_epi8(w), x)
        })
    }
    #[inline(always)]
    fn dot_bcast4_u8<const VNNI: bool>(
        self,
        acc: __m256i,
        u: [__m256i; 4],
        x: &[u8; 16],
    ) -> __m256i {
        if VNNI {
            feat!(dot16_256_vnni(acc, u, x))
        } else {
            quads(x)
                .iter()
                .zip(u)
                .fold(acc, |a, (&q, u)| self.dot_bcast_u8::<false>(a, u, q))
        }
    }
    #[inline(always)]
    fn flip_i8_u8(self, v: __m256i) -> __m256i {
        feat!(_mm256_xor_si256(v, _mm256_set1_epi8(i8::MIN)))
    }
    #[inline(always)]
    fn splat_i32(self, v: i32) -> __m256i {
        feat!(_mm256_set1_epi32(v))
    }
    #[inline(always)]
    fn bits_to_bytes32(self, bits: u32, value: u8) -> __m256i {
        feat!(bits_to_bytes_256(bits, value))
    }
    #[inline(always)]
    fn i8_to_f32_32(self, v: __m256i) -> [__m256; 4] {
        feat!(i8_bytes_256(v))
    }
    #[inline(always)]
    fn lut16_affine(self, a: __m256, b: __m256) -> Codes256 {
        Codes256 { a, b, center: None }
    }
    #[inline(always)]
    fn lut16_centered(self, a: __m256) -> Codes256 {
        Codes256 {
            a,
            b: self.zero(),
            center: Some(8),
        }
    }
    #[inline(always)]
    fn lut32_affine(self, a: __m256, b: __m256) -> Codes256 {
        Codes256 { a, b, center: None }
    }
    #[inline(always)]
    fn lut32_centered(self, a: __m256) -> Codes256 {
        Codes256 {
            a,
            b: self.zero(),
            center: Some(16),
        }
    }
    #[inline(always)]
    fn lookup16_u4_perm(self, t: Codes256, b: &[u8; 16]) -> [__m256; 4] {
        // At 256 bits the permuted order is element order ([`Simd::U4_PERMUTED`] is false).
        feat!({
            let (lo, hi) = nibbles(b);
            codes_256(t, lo, hi)
        })
    }
    #[inline(always)]
    fn lookup16_pair_u4(self, t: Codes256, b: &[u8; 8]) -> [__m256; 2] {
        feat!({
            let v = nibbles16(b);
            let v = match t.center {
                Some(c) => _mm_sub_epi8(v, _mm_set1_epi8(c)),
                None => v,
            };
            [code_256(t, v), code_256(t, _mm_unpackhi_epi64(v, v))]
        })
    }
    #[inline(always)]
    fn lookup16_split(self, t: Codes256, b: &[u8; 16]) -> [__m256; 4] {
        feat!({
            let v = load_128(b);
            let mask = _mm_set1_epi8(0x0f);
            let lo = _mm_and_si128(v, mask);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), mask);
            codes_256(t, lo, hi)
        })
    }
    #[inline(always)]
    fn lookup16_nibbles(
        self,
        lo: Codes256,
        hi: Codes256,
        b: &[u8; 32],
    ) -> ([__m256; 4], [__m256; 4]) {
        feat!({
            let v = load_256i_bytes(b);
            let mask = _mm256_set1_epi8(0x0f);
            let l = _mm256_and_si256(v, mask);
            let h = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            (codes_256_of(lo, l), codes_256_of(hi, h))
        })
    }
    #[inline(always)]
    fn lookup32(self, t: Codes256, v: __m256i) -> [__m256; 4] {
        feat!(codes_256_of(t, v))
    }

    #[inline(always)]
    fn lanes(s: &[f32]) -> (&[[f32; 8]], &[f32]) {
        s.as_chunks()
    }
    #[inline(always)]
    fn lanes_mut(s: &mut [f32]) -> (&mut [[f32; 8]], &mut [f32]) {
        s.as_chunks_mut()
    }
    #[inline(always)]
    fn halves(b: &[u8]) -> (&[[u8; 16]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn words(b: &[u8]) -> (&[[u8; 32]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn load_f32_bytes(self, b: &[u8; 32]) -> __m256 {
        feat!(f32_bytes_256(b))
    }
    #[inline(always)]
    fn splat_f16_pair(self, b: [u8; 4]) -> (__m256, __m256) {
        feat!({
            let f = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(b)));
            (
                _mm256_broadcastss_ps(f),
                _mm256_broadcastss_ps(_mm_movehdup_ps(f)),
            )
        })
    }
    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        feat!(_mm256_set1_ps(x))
    }
    #[inline(always)]
    fn zero(self) -> __m256 {
        feat!(_mm256_setzero_ps())
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        feat!(_mm256_add_ps(a, b))
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        feat!(_mm256_mul_ps(a, b))
    }
    #[inline(always)]
    fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        feat!(_mm256_fmadd_ps(a, b, c))
    }
    #[inline(always)]
    fn sum(self, v: __m256) -> f32 {
        feat!(hsum_256(v))
    }
    #[inline(always)]
    fn load(self, a: &[f32; 8]) -> __m256 {
        feat!(load_256(a))
    }
    #[inline(always)]
    fn store(self, a: &mut [f32; 8], v: __m256) {
        feat!(store_256(a, v))
    }
    #[inline(always)]
    fn load_f16(self, b: &[u8; 16]) -> __m256 {
        feat!(f16_256(b))
    }
    #[inline(always)]
    fn load_bf16(self, b: &[u8; 16]) -> __m256 {
        feat!(bf16_256(b))
    }
    #[inline(always)]
    fn zero32(self) -> [__m256; 4] {
        [self.zero(); 4]
    }
    #[inline(always)]
    fn sum32(self, v: [__m256; 4]) -> f32 {
        self.sum(self.add(self.add(v[0], v[1]), self.add(v[2], v[3])))
    }
    #[inline(always)]
    fn load32(self, a: &[f32; 32]) -> [__m256; 4] {
        // Written out, not `array::from_fn`: a closure is a function of its own, compiled
        // without the level's features and not always inlined (a kernel calling it pays a
        // call per vector).
        let (a, _) = a.as_chunks::<8>();
        [
            self.load(&a[0]),
            self.load(&a[1]),
            self.load(&a[2]),
            self.load(&a[3]),
        ]
    }
    #[inline(always)]
    fn store32(self, a: &mut [f32; 32], v: [__m256; 4]) {
        let (a, _) = a.as_chunks_mut::<8>();
        for (a, v) in a.iter_mut().zip(v) {
            self.store(a, v);
        }
    }
    #[inline(always)]
    fn load32_f32_bytes(self, b: &[u8; 128]) -> [__m256; 4] {
        let (b, _) = b.as_chunks::<32>();
        feat!([
            f32_bytes_256(&b[0]),
            f32_bytes_256(&b[1]),
            f32_bytes_256(&b[2]),
            f32_bytes_256(&b[3]),
        ])
    }
    #[inline(always)]
    fn load32_f16(self, b: &[u8; 64]) -> [__m256; 4] {
        let (b, _) = b.as_chunks::<16>();
        [
            self.load_f16(&b[0]),
            self.load_f16(&b[1]),
            self.load_f16(&b[2]),
            self.load_f16(&b[3]),
        ]
    }
    #[inline(always)]
    fn load32_bf16(self, b: &[u8; 64]) -> [__m256; 4] {
        let (b, _) = b.as_chunks::<16>();
        [
            self.load_bf16(&b[0]),
            self.load_bf16(&b[1]),
            self.load_bf16(&b[2]),
            self.load_bf16(&b[3]),
        ]
    }
    #[inline(always)]
    fn codes32_i8(self, b: &[u8; 32]) -> [__m256; 4] {
        feat!(i8_256(b))
    }
    #[inline(always)]
    fn codes32_u4(self, b: &[u8; 16]) -> [__m256; 4] {
        feat!({
            let (a, b) = nibbles(b);
            widen_256(a, b)
        })
    }
    #[inline(always)]
    fn codes32_u2(self, b: &[u8; 8]) -> [__m256; 4] {
        feat!({
            let (a, b) = crumbs(b);
            widen_256(a, b)
        })
    }
    // ---- simdq additions. ----
    type Bytes = [u8; 8];
    type Quarters = [u8; 4];
    const U4_PERMUTED: bool = false;

    #[inline(always)]
    fn bytes(b: &[u8]) -> (&[[u8; 8]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn quarters(b: &[u8]) -> (&[[u8; 4]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        feat!(_mm256_sub_ps(a, b))
    }
    #[inline(always)]
    fn div(self, a: __m256, b: __m256) -> __m256 {
        feat!(_mm256_div_ps(a, b))
    }
    #[inline(always)]
    fn max(self, a: __m256, b: __m256) -> __m256 {
        feat!(_mm256_max_ps(a, b))
    }
    #[inline(always)]
    fn min(self, a: __m256, b: __m256) -> __m256 {
        feat!(_mm256_min_ps(a, b))
    }
    #[inline(always)]
    fn abs(self, a: __m256) -> __m256 {
        feat!(_mm256_and_ps(
            a,
            _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff))
        ))
    }
    #[inline(always)]
    fn max_lane(self, v: __m256) -> f32 {
        feat!(hmax_256(v))
    }
    #[inline(always)]
    fn min_lane(self, v: __m256) -> f32 {
        feat!(hmin_256(v))
    }
    #[inline(always)]
    fn round_clamp(self, v: __m256, lo: __m256, hi: __m256) -> __m256 {
        feat!({
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm256_min_ps(_mm256_max_ps(r, lo), hi)
        })
    }
    #[inline(always)]
    fn round32_i8(self, x: [__m256; 4], inv: f32) -> ([u8; 32], i32) {
        feat!(round32_i8_256(x, inv))
    }
    #[inline(always)]
    fn pack32_i8(self, v: [__m256; 4]) -> [u8; 32] {
        let mut out = [0u8; 32];
        feat!(store_256i(
            &mut out,
            pack_bytes_256(v.map(|x| _mm256_cvtps_epi32(x)))
        ));
        out
    }
    #[inline(always)]
    fn to_f16(self, v: __m256, out: &mut [u8; 16]) {
        feat!(store_128i(
            out,
            _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v)
        ));
    }
    #[inline(always)]
    fn to_bf16(self, v: __m256, out: &mut [u8; 16]) {
        feat!({
            let r = bf16_bits!(
                v,
                _mm256_castps_si256,
                _mm256_srli_epi32,
                _mm256_and_si256,
                _mm256_add_epi32,
                _mm256_set1_epi32
            );
            let packed = _mm256_packus_epi32(r, r);
            let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
            store_128i(out, _mm256_castsi256_si128(ordered));
        });
    }
    #[inline(always)]
    fn halves_mut(b: &mut [u8]) -> (&mut [[u8; 16]], &mut [u8]) {
        b.as_chunks_mut()
    }
    #[inline(always)]
    fn reduce8(self, a: &[__m256; 8]) -> [f32; 8] {
        let mut lanes = [0.0f32; 8];
        feat!(store_256(&mut lanes, reduce8_256(a)));
        lanes
    }
    #[inline(always)]
    fn reduce16(self, a: &[__m256; 16]) -> [f32; 16] {
        let (a8, _) = a.as_chunks::<8>();
        let (lo, hi) = (self.reduce8(&a8[0]), self.reduce8(&a8[1]));
        core::array::from_fn(|i| if i < 8 { lo[i] } else { hi[i - 8] })
    }
    #[inline(always)]
    fn pair_i8(self, b: &[u8; 16]) -> [__m256; 2] {
        feat!(widen16_256(load_128(b), |x| _mm256_cvtepi8_epi32(x)))
    }
    #[inline(always)]
    fn pair_u4(self, b: &[u8; 8]) -> [__m256; 2] {
        feat!(widen16_256(nibbles16(b), |x| _mm256_cvtepu8_epi32(x)))
    }
    #[inline(always)]
    fn pair_u2(self, b: &[u8; 4]) -> [__m256; 2] {
        feat!(widen16_256(crumbs16(b), |x| _mm256_cvtepu8_epi32(x)))
    }
    #[inline(always)]
    fn codes32_u4_perm(self, b: &[u8; 16]) -> [__m256; 4] {
        self.codes32_u4(b)
    }
    #[inline(always)]
    fn perm32(self, v: [__m256; 4]) -> [__m256; 4] {
        v
    }
    #[inline(always)]
    fn perm2(self, v: [__m256; 2]) -> [__m256; 2] {
        v
    }
    #[inline(always)]
    fn unperm2(self, v: [__m256; 2]) -> [__m256; 2] {
        v
    }
    // ---- End of simdq additions. ----
    // ---- simdc additions. ----
    #[inline(always)]
    fn fnma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        feat!(_mm256_fnmadd_ps(a, b, c))
    }
    #[inline(always)]
    fn round(self, v: __m256) -> __m256 {
        feat!(_mm256_round_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(v))
    }
    #[inline(always)]
    fn pow2i(self, n: __m256) -> __m256 {
        feat!(_mm256_castsi256_ps(_mm256_slli_epi32::<23>(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127))
        )))
    }
    #[inline(always)]
    fn zero_below(self, v: __m256, x: __m256, low: f32) -> __m256 {
        feat!(_mm256_andnot_ps(
            _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(low)),
            v
        ))
    }
    #[inline(always)]
    fn load_first(self, a: &[f32]) -> __m256 {
        match a.first_chunk::<8>() {
            Some(a) => self.load(a),
            None => feat!(load_first_256(a)),
        }
    }
    #[inline(always)]
    fn store_first(self, a: &mut [f32], v: __m256) {
        match a.first_chunk_mut::<8>() {
            Some(a) => self.store(a, v),
            None => feat!(store_first_256(a, v)),
        }
    }
    #[inline(always)]
    fn v512(self) -> Option<V512> {
        None
    }
    #[inline(always)]
    fn v256(self) -> V256 {
        self
    }
}

// ---------------------------------------------------------------------------------------
// 512 bits.

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn load_512(a: &[f32; 16]) -> __m512 {
    // SAFETY: `a` is 16 readable f32; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_ps(a.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn store_512(a: &mut [f32; 16], v: __m512) {
    // SAFETY: `a` is 16 writable f32; `storeu` has no alignment requirement.
    unsafe { _mm512_storeu_ps(a.as_mut_ptr(), v) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn f32_bytes_512(b: &[u8; 64]) -> __m512 {
    // SAFETY: `b` is 64 readable bytes, exactly 16 f32; `loadu` has no alignment requirement.
    unsafe { _mm512_loadu_ps(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn load_256i(b: &[u8; 32]) -> __m256i {
    // SAFETY: `b` is 32 readable bytes; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn f16_512(b: &[u8; 32]) -> __m512 {
    _mm512_cvtph_ps(load_256i(b))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn bf16_512(b: &[u8; 32]) -> __m512 {
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(load_256i(b))))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn widen_512(first: __m128i, second: __m128i) -> [__m512; 2] {
    [
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(first)),
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(second)),
    ]
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn i8_512(b: &[u8; 32]) -> [__m512; 2] {
    let (b16, _) = b.as_chunks::<16>();
    [
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load_128(&b16[0]))),
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load_128(&b16[1]))),
    ]
}

/// Per 128-bit lane: `[x0 + x2, y0 + y2, x1 + x3, y1 + y3]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn pair(x: __m512, y: __m512) -> __m512 {
    _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
}

/// Per 128-bit lane, from two [`pair`]s: the partial sums of their 4 registers, in order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn quad(xy: __m512, zw: __m512) -> __m512 {
    let xy = _mm512_castps_pd(xy);
    let zw = _mm512_castps_pd(zw);
    _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(xy, zw)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(xy, zw)),
    )
}

/// The horizontal sums of 16 registers, lane `i` = sum of `a[i]`: a transposing tree of
/// adds that stays 512 bits wide (33 instructions instead of 48 for two [`reduce8_512`]).
///
/// # Safety
/// Callable without `unsafe` from code compiled with the AVX-512 level's features (another
/// `#[target_feature]` function); elsewhere the caller must hold a [`V512`] or know the CPU
/// has them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub fn reduce16_512(a: &[__m512; 16]) -> [f32; 16] {
    let q: [__m512; 4] = core::array::from_fn(|k| {
        let a = &a[4 * k..][..4];
        quad(pair(a[0], a[1]), pair(a[2], a[3]))
    });
    // 128-bit lanes: halves of the 4 partial sums of two quads.
    let halves = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        )
    };
    let t = halves(halves(q[0], q[1]), halves(q[2], q[3]));
    let mut lanes = [0.0f32; 16];
    store_512(&mut lanes, t);
    lanes
}

/// The horizontal sums of 8 registers, lane `i` = sum of `a[i]`: a transposing tree of
/// adds that keeps 512 bits wide until the last step (24 instructions for all 8, where
/// halving each to 256 bits first and reducing those takes about 39).
///
/// # Safety
/// Callable without `unsafe` from code compiled with the AVX-512 level's features (another
/// `#[target_feature]` function); elsewhere the caller must hold a [`V512`] or know the CPU
/// has them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub fn reduce8_512(a: &[__m512; 8]) -> [f32; 8] {
    let lo = quad(pair(a[0], a[1]), pair(a[2], a[3]));
    let hi = quad(pair(a[4], a[5]), pair(a[6], a[7]));
    // 128-bit lanes: [lo0 + lo1, lo2 + lo3, hi0 + hi1, hi2 + hi3].
    let z = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(lo, hi),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(lo, hi),
    );
    // Low 256 bits: [lo total, hi total].
    let t = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b00_00_10_00>(z, z),
        _mm512_shuffle_f32x4::<0b00_00_11_01>(z, z),
    );
    let mut lanes = [0.0f32; 8];
    store_256(&mut lanes, _mm512_castps512_ps256(t));
    lanes
}

// ---- simdq additions: 512-bit helpers of the quantizers and multi-head kernels. ----

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn store_256i_512(b: &mut [u8; 32], v: __m256i) {
    // SAFETY: `b` is 32 writable bytes; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(b.as_mut_ptr().cast(), v) }
}

/// [`Simd::round32_i8`] at 512 bits, the method of [`round32_i8_256`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn round32_i8_512(x: [__m512; 2], inv: f32) -> ([u8; 32], i32) {
    let inv = _mm512_set1_ps(inv);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let (half, one, sign) = (
        _mm512_set1_ps(0.5),
        _mm512_set1_ps(1.0),
        _mm512_set1_ps(-0.0),
    );
    let mut q = [_mm512_setzero_si512(); 2];
    for (q, &v) in q.iter_mut().zip(&x) {
        let t = _mm512_mul_ps(v, inv);
        // `max` gives its second operand for a NaN lane: -127 here, masked off below.
        let c = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(c);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(c, r)), half);
        let step = _mm512_or_ps(_mm512_and_ps(c, sign), one);
        let r = _mm512_mask_add_ps(r, up, r, step);
        let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(t, t);
        *q = _mm512_maskz_mov_epi32(ord, _mm512_cvtps_epi32(r));
    }
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
    let b = [_mm512_cvtepi32_epi8(q[0]), _mm512_cvtepi32_epi8(q[1])];
    let mut out = [0u8; 32];
    store_256i_512(&mut out, _mm256_set_m128i(b[1], b[0]));
    (out, sum)
}

/// 32 4-bit codes (16 bytes, low nibble first) → [even elements, odd elements]: one
/// widening of the 16 bytes, a mask and a shift ([`split_even_odd`] puts other data in
/// the same order).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn u4_split_512(b: &[u8; 16]) -> [__m512; 2] {
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

/// `[0.0, 1.0, ..., 15.0]`: the codes a 16-entry table is indexed by.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn iota_512() -> __m512 {
    _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    )
}

// --- simdc (kv-backend-cpu attention kernels): begin ---------------------------------

/// The lanes `0..n` of a 16-lane mask (`n < 16`).
#[inline]
fn first_16(n: usize) -> __mmask16 {
    // `n < 16`, so the mask fits.
    ((1u32 << n.min(15)) - 1) as __mmask16
}

/// The first `a.len() < 16` elements of `a`, zero elsewhere.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn load_first_512(a: &[f32]) -> __m512 {
    // SAFETY: the mask's lanes are set only below `a.len()`, inside the slice; a masked
    // load neither reads nor faults on the others.
    unsafe { _mm512_maskz_loadu_ps(first_16(a.len()), a.as_ptr()) }
}

/// Stores the first `a.len() < 16` lanes of `v`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn store_first_512(a: &mut [f32], v: __m512) {
    // SAFETY: the mask's lanes are set only below `a.len()`, inside the slice, borrowed
    // exclusively; a masked store neither writes nor faults on the others.
    unsafe { _mm512_mask_storeu_ps(a.as_mut_ptr(), first_16(a.len()), v) }
}

// --- simdc: end -------------------------------------------------------------------------

impl Simd for V512 {
    const LANES: usize = 16;
    const ISA: Isa = Isa::Avx512;
    type F32 = __m512;
    type Lanes = [f32; 16];
    type Halves = [u8; 32];
    type Words = [u8; 64];
    type X32 = [__m512; 2];

    type Bytes32 = __m256i;
    type Lut16 = __m512;
    type Lut32 = [__m512; 2];
    bytes32_ops!();
    int_dot_ops!();
    type I32 = __m512i;
    #[inline(always)]
    fn zero_i32(self) -> __m512i {
        feat!(_mm512_setzero_si512())
    }
    #[inline(always)]
    fn load_i32_bytes(self, b: &[u8; 64]) -> __m512i {
        feat!(load_512i_words(b))
    }
    #[inline(always)]
    fn add_i32(self, a: __m512i, b: __m512i) -> __m512i {
        feat!(_mm512_add_epi32(a, b))
    }
    #[inline(always)]
    fn i32_to_f32(self, v: __m512i) -> __m512 {
        feat!(_mm512_cvtepi32_ps(v))
    }
    #[inline(always)]
    fn nibbles_i32(self, v: __m512i) -> (__m512i, __m512i) {
        feat!({
            let m = _mm512_set1_epi8(15);
            (
                _mm512_and_si512(v, m),
                _mm512_and_si512(_mm512_srli_epi16::<4>(v), m),
            )
        })
    }
    #[inline(always)]
    fn load_i32_bytes32(self, b: &[u8; 32]) -> __m512i {
        feat!(_mm512_broadcast_i64x4(load_256i_words(b)))
    }
    #[inline(always)]
    fn shr_i32_lanes(self, v: __m512i, n: &[u32; 16]) -> __m512i {
        feat!(_mm512_srlv_epi32(v, load_512i_u32(n)))
    }
    #[inline(always)]
    fn field_f32(self, v: __m512i, at: u32, mask: u32) -> __m512 {
        feat!(_mm512_cvtepi32_ps(_mm512_and_si512(
            _mm512_srl_epi32(v, _mm_cvtsi32_si128(at as i32)),
            _mm512_set1_epi32(mask as i32)
        )))
    }
    #[inline(always)]
    fn nibble_f32(self, v: __m512i, at: u32) -> __m512 {
        // The permute reads an index's low 4 bits: the table `i as f32` is the conversion.
        feat!(_mm512_permutexvar_ps(
            _mm512_srl_epi32(v, _mm_cvtsi32_si128(at as i32)),
            iota_512()
        ))
    }
    #[inline(always)]
    fn code5_f32(self, v: __m512i, at: u32) -> __m512 {
        // The two-source permute reads an index's low 5 bits: bit 4 picks the table
        // `16.0..32.0`, so the tables `i as f32` are the mask and the conversion.
        feat!(_mm512_permutex2var_ps(
            iota_512(),
            _mm512_srl_epi32(v, _mm_cvtsi32_si128(at as i32)),
            _mm512_add_ps(iota_512(), _mm512_set1_ps(16.0))
        ))
    }
    #[inline(always)]
    fn nibble_bit4_i32(self, lo: __m512i, lo_at: u32, hi: __m512i, hi_shl: u32) -> __m512i {
        // `m ? lo : hi` bit by bit, one `vpternlogd` (truth table of A = lo, B = hi,
        // C = m: A where C, else B).
        const SELECT: i32 = (0xF0 & 0xAA) | (0xCC & !0xAA & 0xFF);
        feat!(_mm512_ternarylogic_epi32::<SELECT>(
            _mm512_srl_epi32(lo, _mm_cvtsi32_si128(lo_at as i32)),
            _mm512_sll_epi32(hi, _mm_cvtsi32_si128(hi_shl as i32)),
            _mm512_set1_epi32(0x0F0F_0F0F)
        ))
    }
    #[inline(always)]
    fn field6_f32(self, lo: __m512i, lo_at: u32, hi: __m512i, hi_at: u32) -> __m512 {
        // (The and / or pair becomes one `vpternlogd`.)
        feat!({
            let lo = _mm512_and_si512(
                _mm512_srl_epi32(lo, _mm_cvtsi32_si128(lo_at as i32)),
                _mm512_set1_epi32(15),
            );
            _mm512_cvtepi32_ps(_mm512_or_si512(lo, field2_to_4_512(hi, hi_at)))
        })
    }
    #[inline(always)]
    fn permute_f32(self, v: __m512, idx: &[u32; 16]) -> __m512 {
        feat!(_mm512_permutexvar_ps(load_512i_u32(idx), v))
    }
    #[inline(always)]
    fn dot_bcast_u8<const VNNI: bool>(self, acc: __m512i, u: __m512i, x: [u8; 4]) -> __m512i {
        feat!(dot4_512::<VNNI>(
            acc,
            u,
            _mm512_set1_epi32(i32::from_le_bytes(x))
        ))
    }
    #[inline(always)]
    fn dot_bcast_i8<const VNNI: bool>(self, acc: __m512i, w: __m512i, x: [u8; 4]) -> __m512i {
        feat!({
            let x = sign_512(_mm512_set1_epi32(i32::from_le_bytes(x)), w);
            dot4_512::<VNNI>(acc, _mm512_abs_epi8(w), x)
        })
    }
    #[inline(always)]
    fn dot_bcast4_u8<const VNNI: bool>(
        self,
        acc: __m512i,
        u: [__m512i; 4],
        x: &[u8; 16],
    ) -> __m512i {
        if VNNI {
            feat!(dot16_512_vnni(acc, u, x))
        } else {
            quads(x)
                .iter()
                .zip(u)
                .fold(acc, |a, (&q, u)| self.dot_bcast_u8::<false>(a, u, q))
        }
    }
    #[inline(always)]
    fn flip_i8_u8(self, v: __m512i) -> __m512i {
        feat!(_mm512_xor_si512(v, _mm512_set1_epi8(i8::MIN)))
    }
    #[inline(always)]
    fn splat_i32(self, v: i32) -> __m512i {
        feat!(_mm512_set1_epi32(v))
    }
    #[inline(always)]
    fn bits_to_bytes32(self, bits: u32, value: u8) -> __m256i {
        feat!(_mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(value as i8)))
    }
    #[inline(always)]
    fn i8_to_f32_32(self, v: __m256i) -> [__m512; 2] {
        feat!([
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v))),
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(v))),
        ])
    }
    #[inline(always)]
    fn lut16_affine(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_fmadd_ps(iota_512(), a, b))
    }
    #[inline(always)]
    fn lut16_centered(self, a: __m512) -> __m512 {
        // A product like GGUF's reference `(i - 8) * a`: `i = 8` gives -0.0 when `a < 0`.
        feat!(_mm512_mul_ps(
            _mm512_sub_ps(iota_512(), _mm512_set1_ps(8.0)),
            a
        ))
    }
    #[inline(always)]
    fn lut32_affine(self, a: __m512, b: __m512) -> [__m512; 2] {
        feat!([
            _mm512_fmadd_ps(iota_512(), a, b),
            _mm512_fmadd_ps(_mm512_add_ps(iota_512(), _mm512_set1_ps(16.0)), a, b),
        ])
    }
    #[inline(always)]
    fn lut32_centered(self, a: __m512) -> [__m512; 2] {
        feat!([
            _mm512_mul_ps(_mm512_sub_ps(iota_512(), _mm512_set1_ps(16.0)), a),
            _mm512_mul_ps(iota_512(), a),
        ])
    }
    #[inline(always)]
    fn lookup16_u4_perm(self, t: __m512, b: &[u8; 16]) -> [__m512; 2] {
        // Byte j holds elements 2j (low nibble) and 2j + 1 (high nibble): the split order
        // of the nibbles is [`u4_split_512`]'s [even, odd], the permuted order here.
        self.lookup16_split(t, b)
    }
    #[inline(always)]
    fn lookup16_pair_u4(self, t: __m512, b: &[u8; 16]) -> [__m512; 2] {
        // [`Simd::pair_u4`] is [`u4_split_512`] too at this width.
        self.lookup16_split(t, b)
    }
    #[inline(always)]
    fn lookup16_split(self, t: __m512, b: &[u8; 16]) -> [__m512; 2] {
        // Byte j holds code j (low nibble) and code j + 16 (high nibble). The permute reads
        // only an index's low 4 bits, so the low nibbles need no mask.
        feat!({
            let q = _mm512_cvtepu8_epi32(load_128(b));
            [
                _mm512_permutexvar_ps(q, t),
                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), t),
            ]
        })
    }
    #[inline(always)]
    fn lookup16_nibbles(self, lo: __m512, hi: __m512, b: &[u8; 32]) -> ([__m512; 2], [__m512; 2]) {
        let (b, _) = b.as_chunks::<16>();
        feat!({
            let q0 = _mm512_cvtepu8_epi32(load_128(&b[0]));
            let q1 = _mm512_cvtepu8_epi32(load_128(&b[1]));
            (
                [_mm512_permutexvar_ps(q0, lo), _mm512_permutexvar_ps(q1, lo)],
                [
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q0), hi),
                    _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q1), hi),
                ],
            )
        })
    }
    #[inline(always)]
    fn lookup32_split(self, t: [__m512; 2], b: &[u8; 16], high: u32) -> [__m512; 2] {
        // Byte j holds code j's low 4 bits (low nibble) and code j + 16's (high nibble);
        // the fifth bits are OR-ed into the widened indices under a mask.
        feat!({
            let q = _mm512_cvtepu8_epi32(load_128(b));
            let (lo, hi) = (
                _mm512_and_si512(q, _mm512_set1_epi32(15)),
                _mm512_srli_epi32::<4>(q),
            );
            let five = _mm512_set1_epi32(16);
            let lo = _mm512_mask_or_epi32(lo, high as __mmask16, lo, five);
            let hi = _mm512_mask_or_epi32(hi, (high >> 16) as __mmask16, hi, five);
            [
                _mm512_permutex2var_ps(t[0], lo, t[1]),
                _mm512_permutex2var_ps(t[0], hi, t[1]),
            ]
        })
    }
    #[inline(always)]
    fn lookup32_split_centered_dot(self, a: __m512, b: &[u8; 16], high: u32) -> [__m512; 2] {
        // `(lo - 16) * a` from 16 entries (the permute reads an index's low 4 bits, so the
        // low nibbles need no mask), then `+ 16 a` under the fifth-bit masks.
        feat!({
            let t = _mm512_mul_ps(_mm512_sub_ps(iota_512(), _mm512_set1_ps(16.0)), a);
            let a16 = _mm512_mul_ps(a, _mm512_set1_ps(16.0));
            let q = _mm512_cvtepu8_epi32(load_128(b));
            let (lo, hi) = (
                _mm512_permutexvar_ps(q, t),
                _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(q), t),
            );
            [
                _mm512_mask_add_ps(lo, high as __mmask16, lo, a16),
                _mm512_mask_add_ps(hi, (high >> 16) as __mmask16, hi, a16),
            ]
        })
    }
    #[inline(always)]
    fn lookup32(self, t: [__m512; 2], v: __m256i) -> [__m512; 2] {
        // The two-table permute reads an index's low 5 bits: 32 entries.
        feat!([
            _mm512_permutex2var_ps(t[0], _mm512_cvtepu8_epi32(_mm256_castsi256_si128(v)), t[1]),
            _mm512_permutex2var_ps(
                t[0],
                _mm512_cvtepu8_epi32(_mm256_extracti128_si256::<1>(v)),
                t[1]
            ),
        ])
    }

    #[inline(always)]
    fn lanes(s: &[f32]) -> (&[[f32; 16]], &[f32]) {
        s.as_chunks()
    }
    #[inline(always)]
    fn lanes_mut(s: &mut [f32]) -> (&mut [[f32; 16]], &mut [f32]) {
        s.as_chunks_mut()
    }
    #[inline(always)]
    fn halves(b: &[u8]) -> (&[[u8; 32]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn words(b: &[u8]) -> (&[[u8; 64]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn load_f32_bytes(self, b: &[u8; 64]) -> __m512 {
        feat!(f32_bytes_512(b))
    }
    #[inline(always)]
    fn splat_f16_pair(self, b: [u8; 4]) -> (__m512, __m512) {
        feat!({
            let f = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(b)));
            (
                _mm512_broadcastss_ps(f),
                _mm512_broadcastss_ps(_mm_movehdup_ps(f)),
            )
        })
    }
    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        feat!(_mm512_set1_ps(x))
    }
    #[inline(always)]
    fn zero(self) -> __m512 {
        feat!(_mm512_setzero_ps())
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_add_ps(a, b))
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_mul_ps(a, b))
    }
    #[inline(always)]
    fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        feat!(_mm512_fmadd_ps(a, b, c))
    }
    #[inline(always)]
    fn sum(self, v: __m512) -> f32 {
        feat!(_mm512_reduce_add_ps(v))
    }
    #[inline(always)]
    fn load(self, a: &[f32; 16]) -> __m512 {
        feat!(load_512(a))
    }
    #[inline(always)]
    fn store(self, a: &mut [f32; 16], v: __m512) {
        feat!(store_512(a, v))
    }
    #[inline(always)]
    fn load_f16(self, b: &[u8; 32]) -> __m512 {
        feat!(f16_512(b))
    }
    #[inline(always)]
    fn load_bf16(self, b: &[u8; 32]) -> __m512 {
        feat!(bf16_512(b))
    }
    #[inline(always)]
    fn zero32(self) -> [__m512; 2] {
        [self.zero(); 2]
    }
    #[inline(always)]
    fn sum32(self, v: [__m512; 2]) -> f32 {
        self.sum(self.add(v[0], v[1]))
    }
    #[inline(always)]
    fn load32(self, a: &[f32; 32]) -> [__m512; 2] {
        let (a, _) = a.as_chunks::<16>();
        [self.load(&a[0]), self.load(&a[1])]
    }
    #[inline(always)]
    fn store32(self, a: &mut [f32; 32], v: [__m512; 2]) {
        let (a, _) = a.as_chunks_mut::<16>();
        self.store(&mut a[0], v[0]);
        self.store(&mut a[1], v[1]);
    }
    #[inline(always)]
    fn load32_f32_bytes(self, b: &[u8; 128]) -> [__m512; 2] {
        let (b, _) = b.as_chunks::<64>();
        feat!([f32_bytes_512(&b[0]), f32_bytes_512(&b[1])])
    }
    #[inline(always)]
    fn load32_f16(self, b: &[u8; 64]) -> [__m512; 2] {
        let (b, _) = b.as_chunks::<32>();
        [self.load_f16(&b[0]), self.load_f16(&b[1])]
    }
    #[inline(always)]
    fn load32_bf16(self, b: &[u8; 64]) -> [__m512; 2] {
        let (b, _) = b.as_chunks::<32>();
        [self.load_bf16(&b[0]), self.load_bf16(&b[1])]
    }
    #[inline(always)]
    fn codes32_i8(self, b: &[u8; 32]) -> [__m512; 2] {
        feat!(i8_512(b))
    }
    #[inline(always)]
    fn codes32_u4(self, b: &[u8; 16]) -> [__m512; 2] {
        feat!({
            let (a, b) = nibbles(b);
            widen_512(a, b)
        })
    }
    #[inline(always)]
    fn codes32_u2(self, b: &[u8; 8]) -> [__m512; 2] {
        feat!({
            let (a, b) = crumbs(b);
            widen_512(a, b)
        })
    }
    // ---- simdq additions. ----
    type Bytes = [u8; 16];
    type Quarters = [u8; 8];
    const U4_PERMUTED: bool = true;

    #[inline(always)]
    fn bytes(b: &[u8]) -> (&[[u8; 16]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn quarters(b: &[u8]) -> (&[[u8; 8]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_sub_ps(a, b))
    }
    #[inline(always)]
    fn div(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_div_ps(a, b))
    }
    #[inline(always)]
    fn max(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_max_ps(a, b))
    }
    #[inline(always)]
    fn min(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_min_ps(a, b))
    }
    #[inline(always)]
    fn abs(self, a: __m512) -> __m512 {
        feat!(_mm512_abs_ps(a))
    }
    #[inline(always)]
    fn max_lane(self, v: __m512) -> f32 {
        feat!(_mm512_reduce_max_ps(v))
    }
    #[inline(always)]
    fn min_lane(self, v: __m512) -> f32 {
        feat!(_mm512_reduce_min_ps(v))
    }
    #[inline(always)]
    fn round_clamp(self, v: __m512, lo: __m512, hi: __m512) -> __m512 {
        feat!({
            let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
            _mm512_min_ps(_mm512_max_ps(r, lo), hi)
        })
    }
    #[inline(always)]
    fn round32_i8(self, x: [__m512; 2], inv: f32) -> ([u8; 32], i32) {
        feat!(round32_i8_512(x, inv))
    }
    #[inline(always)]
    fn pack32_i8(self, v: [__m512; 2]) -> [u8; 32] {
        let mut out = [0u8; 32];
        feat!({
            let b = v.map(|x| _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(x)));
            store_256i_512(&mut out, _mm256_set_m128i(b[1], b[0]));
        });
        out
    }
    #[inline(always)]
    fn to_f16(self, v: __m512, out: &mut [u8; 32]) {
        feat!(store_256i_512(
            out,
            _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v)
        ));
    }
    #[inline(always)]
    fn to_bf16(self, v: __m512, out: &mut [u8; 32]) {
        feat!({
            let r = bf16_bits!(
                v,
                _mm512_castps_si512,
                _mm512_srli_epi32,
                _mm512_and_si512,
                _mm512_add_epi32,
                _mm512_set1_epi32
            );
            store_256i_512(out, _mm512_cvtepi32_epi16(r));
        });
    }
    #[inline(always)]
    fn halves_mut(b: &mut [u8]) -> (&mut [[u8; 32]], &mut [u8]) {
        b.as_chunks_mut()
    }
    #[inline(always)]
    fn reduce8(self, a: &[__m512; 8]) -> [f32; 8] {
        feat!(reduce8_512(a))
    }
    #[inline(always)]
    fn reduce16(self, a: &[__m512; 16]) -> [f32; 16] {
        feat!(reduce16_512(a))
    }
    #[inline(always)]
    fn pair_i8(self, b: &[u8; 32]) -> [__m512; 2] {
        feat!(i8_512(b))
    }
    #[inline(always)]
    fn pair_u4(self, b: &[u8; 16]) -> [__m512; 2] {
        feat!(u4_split_512(b))
    }
    #[inline(always)]
    fn pair_u2(self, b: &[u8; 8]) -> [__m512; 2] {
        self.codes32_u2(b)
    }
    #[inline(always)]
    fn codes32_u4_perm(self, b: &[u8; 16]) -> [__m512; 2] {
        feat!(u4_split_512(b))
    }
    #[inline(always)]
    fn perm32(self, v: [__m512; 2]) -> [__m512; 2] {
        feat!(split_even_odd(v[0], v[1]))
    }
    #[inline(always)]
    fn perm2(self, v: [__m512; 2]) -> [__m512; 2] {
        self.perm32(v)
    }
    #[inline(always)]
    fn unperm2(self, v: [__m512; 2]) -> [__m512; 2] {
        feat!(merge_even_odd(v[0], v[1]))
    }
    // ---- End of simdq additions. ----
    // ---- simdc additions. ----
    #[inline(always)]
    fn fnma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        feat!(_mm512_fnmadd_ps(a, b, c))
    }
    #[inline(always)]
    fn round(self, v: __m512) -> __m512 {
        feat!(_mm512_roundscale_ps::<
            { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
        >(v))
    }
    #[inline(always)]
    fn pow2i(self, n: __m512) -> __m512 {
        feat!(_mm512_castsi512_ps(_mm512_slli_epi32::<23>(
            _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127))
        )))
    }
    #[inline(always)]
    fn zero_below(self, v: __m512, x: __m512, low: f32) -> __m512 {
        feat!(_mm512_maskz_mov_ps(
            !_mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(low)),
            v
        ))
    }
    #[inline(always)]
    fn load_first(self, a: &[f32]) -> __m512 {
        match a.first_chunk::<16>() {
            Some(a) => self.load(a),
            None => feat!(load_first_512(a)),
        }
    }
    #[inline(always)]
    fn store_first(self, a: &mut [f32], v: __m512) {
        match a.first_chunk_mut::<16>() {
            Some(a) => self.store(a, v),
            None => feat!(store_first_512(a, v)),
        }
    }
    #[inline(always)]
    fn v512(self) -> Option<V512> {
        Some(self)
    }
    #[inline(always)]
    fn v256(self) -> V256 {
        V256(())
    }
}
