//! The x86-64 widths: the level tokens, their `#[target_feature]` entry points, their
//! [`Simd`] operations, and the horizontal reductions the kernel crates share.
//!
//! Unsafe code here is of two kinds, each with one argument. Calls into `#[target_feature]`
//! code are sound because a token exists (its constructor asked the CPU). Loads and stores
//! go through fixed-size arrays, so every address they touch is in bounds by type.

use core::arch::x86_64::*;

use super::{Isa, Kernel, Simd};

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

    /// The token without asking, inside this crate's `#[target_feature]` kernels.
    ///
    /// # Safety
    /// The CPU must have [`Isa::Avx2`]'s features (a caller's own contract says so).
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> V256 {
        V256(())
    }
}

impl V512 {
    /// The token, if this CPU has the features.
    #[inline]
    pub fn new() -> Option<V512> {
        Isa::Avx512.is_available().then_some(V512(()))
    }

    /// The token without asking, inside this crate's `#[target_feature]` kernels.
    ///
    /// # Safety
    /// The CPU must have [`Isa::Avx512`]'s features (a caller's own contract says so).
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> V512 {
        V512(())
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

/// `unsafe { $e }` inside a token's method: the token proves the CPU has the features.
macro_rules! feat {
    ($e:expr) => {
        // SAFETY: `self` is a token, which exists only on a CPU with its level's features
        // (its constructor asked the cached detection); no pointer is involved.
        unsafe { $e }
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

/// Largest of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn max_lanes_256(v: __m256) -> f32 {
    let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps::<1>(h, h)))
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
        let (a, _) = a.as_chunks::<8>();
        core::array::from_fn(|i| self.load(&a[i]))
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
        core::array::from_fn(|i| feat!(f32_bytes_256(&b[i])))
    }
    #[inline(always)]
    fn load32_f16(self, b: &[u8; 64]) -> [__m256; 4] {
        let (b, _) = b.as_chunks::<16>();
        core::array::from_fn(|i| self.load_f16(&b[i]))
    }
    #[inline(always)]
    fn load32_bf16(self, b: &[u8; 64]) -> [__m256; 4] {
        let (b, _) = b.as_chunks::<16>();
        core::array::from_fn(|i| self.load_bf16(&b[i]))
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
    // --- simdc: begin
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        feat!(_mm256_sub_ps(a, b))
    }
    #[inline(always)]
    fn fnma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        feat!(_mm256_fnmadd_ps(a, b, c))
    }
    #[inline(always)]
    fn min(self, a: __m256, b: __m256) -> __m256 {
        feat!(_mm256_min_ps(a, b))
    }
    #[inline(always)]
    fn max(self, a: __m256, b: __m256) -> __m256 {
        feat!(_mm256_max_ps(a, b))
    }
    #[inline(always)]
    fn max_lanes(self, v: __m256) -> f32 {
        feat!(max_lanes_256(v))
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
    fn sums8(self, v: &[__m256; 8]) -> [f32; 8] {
        let mut out = [0.0; 8];
        feat!(store_256(&mut out, reduce8_256(v)));
        out
    }
    #[inline(always)]
    fn sums16(self, v: &[__m256; 16]) -> [f32; 16] {
        let (v, _) = v.as_chunks::<8>();
        let (lo, hi) = (self.sums8(&v[0]), self.sums8(&v[1]));
        core::array::from_fn(|i| if i < 8 { lo[i] } else { hi[i - 8] })
    }
    // --- simdc: end
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
    // --- simdc: begin
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_sub_ps(a, b))
    }
    #[inline(always)]
    fn fnma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        feat!(_mm512_fnmadd_ps(a, b, c))
    }
    #[inline(always)]
    fn min(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_min_ps(a, b))
    }
    #[inline(always)]
    fn max(self, a: __m512, b: __m512) -> __m512 {
        feat!(_mm512_max_ps(a, b))
    }
    #[inline(always)]
    fn max_lanes(self, v: __m512) -> f32 {
        feat!(max_lanes_256(_mm256_max_ps(
            _mm512_castps512_ps256(v),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
        )))
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
    fn sums8(self, v: &[__m512; 8]) -> [f32; 8] {
        feat!(reduce8_512(v))
    }
    #[inline(always)]
    fn sums16(self, v: &[__m512; 16]) -> [f32; 16] {
        feat!(reduce16_512(v))
    }
    // --- simdc: end
    #[inline(always)]
    fn v512(self) -> Option<V512> {
        Some(self)
    }
    #[inline(always)]
    fn v256(self) -> V256 {
        V256(())
    }
}
