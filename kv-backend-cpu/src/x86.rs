//! AVX2 + FMA + F16C versions of the attention kernels: the only module of the crate with
//! `unsafe` code.
//!
//! Layering: the `unsafe fn`s below carry `#[target_feature]` and raw pointers; each is
//! reached only through a safe method of [`Avx2`], a token that exists only on a CPU that
//! has all three features (checked once, cached) and whose methods check every slice
//! bound before the first pointer is formed. The rest of the crate sees safe functions and
//! stays under `#![deny(unsafe_code)]`.
//!
//! Rows are read in their stored format (f32, f16 or bf16) and widened in registers:
//! `vcvtph2ps` for f16, a zero-extend and shift for bf16, so no row is ever copied to a
//! temporary buffer on the decode path. Each kernel handles any length; the last
//! `len % 8` elements go through a scalar tail.
#![allow(unsafe_code)]
// Before Rust 1.87 every intrinsic is an unsafe fn even where its features are enabled;
// from 1.87 on, value-only intrinsics are safe there. The blocks below wrap them so the
// module builds on both sides of that change; newer compilers call some blocks unused.
#![allow(unused_unsafe)]
// The kernels index small arrays of registers by head, lane and row, as the math reads.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use half::{bf16, f16};

use crate::kernels::{pv_fits, qk_fits};
use kv_quant::simd::{hsum_256 as hsum, reduce16_512, reduce8_256 as reduce8, Prefetch};
use kv_quant::simd::{V256, V512};

/// `kernel::<M>(args)` for the run-time lane count `m`: one of the listed counts, else 1
/// (the tile kernels' blocks of lanes).
macro_rules! by_lanes {
    ($m:expr, [$($n:literal)*], $kernel:ident $args:tt) => {
        match $m {
            $($n => $kernel::<$n> $args,)*
            _ => $kernel::<1> $args,
        }
    };
}

/// Query heads whose accumulators one pass over a row keeps in registers.
const HEAD_BLOCK: usize = 4;

/// Proof that the running CPU has AVX2, FMA and F16C (kv-quant's [`V256`] token, from the
/// workspace's one detection): the safe entry to this module's kernels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2(V256);

impl Avx2 {
    /// The token, when the CPU has the features.
    pub(crate) fn get() -> Option<Self> {
        V256::new().map(Self)
    }

    /// `scores[h * stride + r] = q[h] . rows[r]` for every query row `q[h]` (`q` holds
    /// `q.len() / d` rows of `d`) and every stored row of `rows` (`rows.len() / d` rows).
    /// While it reads row `r` it prefetches row `r` of `ahead` (the rows the caller will
    /// read next; may be empty). Does nothing when the slices do not hold what that needs
    /// (the callers size them).
    pub(crate) fn score_rows<E: Load>(
        self,
        q: &[f32],
        d: usize,
        rows: &[E],
        scores: &mut [f32],
        stride: usize,
        ahead: &[E],
    ) {
        if d == 0 {
            return;
        }
        let (heads, n) = (q.len() / d, rows.len() / d);
        let fits = stride >= n && (heads == 0 || scores.len() >= (heads - 1) * stride + n);
        if !fits || heads == 0 || n == 0 {
            return;
        }
        // Only the first head block prefetches; later ones read rows already cached.
        let mut pf = Prefetch::new(ahead);
        let mut h = 0;
        while h < heads {
            let hb = (heads - h).min(HEAD_BLOCK);
            let (qp, sp) = (q[h * d..].as_ptr(), scores[h * stride..].as_mut_ptr());
            // SAFETY: the token proves the CPU features. Heads h..h+hb have rows
            // q[(h + i) * d..][..d] inside `q` (h + hb <= q.len() / d) and score rows
            // scores[(h + i) * stride..][..n] inside `scores` (checked above); `rows` holds
            // n rows of d. The score rows do not overlap `q` or `rows` (distinct borrows).
            unsafe {
                let (rp, pf) = (rows.as_ptr(), &mut pf);
                match hb {
                    4 => score_block::<E, 4, 2>(qp, d, rp, n, sp, stride, pf),
                    3 => score_block::<E, 3, 2>(qp, d, rp, n, sp, stride, pf),
                    2 => score_block::<E, 2, 4>(qp, d, rp, n, sp, stride, pf),
                    _ => score_block::<E, 1, 8>(qp, d, rp, n, sp, stride, pf),
                }
            }
            pf = Prefetch::none();
            h += hb;
        }
    }

    /// `acc[h] += sum_r w[h * stride + r] * rows[r]` for every accumulator row `acc[h]`
    /// (`acc.len() / d` rows of `d`) and every stored row of `rows`, prefetching `ahead`
    /// as [`Avx2::score_rows`] does. Does nothing when the slices do not hold what that
    /// needs.
    pub(crate) fn accumulate_rows<E: Load>(
        self,
        w: &[f32],
        stride: usize,
        d: usize,
        rows: &[E],
        acc: &mut [f32],
        ahead: &[E],
    ) {
        if d == 0 {
            return;
        }
        let (heads, n) = (acc.len() / d, rows.len() / d);
        let fits = stride >= n && (heads == 0 || w.len() >= (heads - 1) * stride + n);
        if !fits || heads == 0 || n == 0 {
            return;
        }
        let mut pf = Prefetch::new(ahead);
        let mut h = 0;
        while h < heads {
            let hb = (heads - h).min(HEAD_BLOCK);
            let (wp, ap) = (w[h * stride..].as_ptr(), acc[h * d..].as_mut_ptr());
            // SAFETY: the token proves the CPU features. Heads h..h+hb have weight rows
            // w[(h + i) * stride..][..n] inside `w` (checked above) and accumulator rows
            // acc[(h + i) * d..][..d] inside `acc` (h + hb <= acc.len() / d); `rows` holds
            // n rows of d; `acc` is a distinct, exclusive borrow.
            unsafe {
                let (rp, pf) = (rows.as_ptr(), &mut pf);
                match hb {
                    4 => accumulate_block::<E, 4, 2>(wp, stride, d, rp, n, ap, pf),
                    3 => accumulate_block::<E, 3, 2>(wp, stride, d, rp, n, ap, pf),
                    2 => accumulate_block::<E, 2, 4>(wp, stride, d, rp, n, ap, pf),
                    _ => accumulate_block::<E, 1, 4>(wp, stride, d, rp, n, ap, pf),
                }
            }
            pf = Prefetch::none();
            h += hb;
        }
    }

    /// Largest element of `s` (`-inf` when empty; NaN elements are skipped, like
    /// `f32::max`).
    pub(crate) fn max(self, s: &[f32]) -> f32 {
        // SAFETY: the token proves the CPU features; the pointer and length describe `s`.
        unsafe { max_of(s.as_ptr(), s.len()) }
    }

    /// `s[i] = exp(s[i] - m)` for every element; returns their sum.
    pub(crate) fn exp_sum(self, s: &mut [f32], m: f32) -> f32 {
        // SAFETY: the token proves the CPU features; the pointer and length describe `s`,
        // borrowed exclusively.
        unsafe { exp_sum(s.as_mut_ptr(), s.len(), m) }
    }

    /// `s[l * s_ld + j] = sum_k q[l * q_ld + k] * kt[k * kt_ld + j]` for `l < lanes`,
    /// `j < cols`, `k < d`: the scores of a tile of queries against a tile of keys stored
    /// transposed. `cols` must be a multiple of 8. Does nothing when the slices do not
    /// hold what that needs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn qk_tile(
        self,
        q: &[f32],
        q_ld: usize,
        lanes: usize,
        d: usize,
        kt: &[f32],
        kt_ld: usize,
        cols: usize,
        s: &mut [f32],
        s_ld: usize,
    ) {
        let fits = qk_fits(q, q_ld, lanes, d, kt, kt_ld, cols, s, s_ld);
        lane_blocks(fits, lanes, 4, q, q_ld, kt, s, s_ld, |m, qp, kp, sp| {
            // SAFETY: the token proves the CPU features; `lane_blocks` hands over `m`
            // lanes the checks placed inside the slices, and the block reads and writes
            // only those lanes' rows and columns.
            unsafe { by_lanes!(m, [4 3 2], qk_block(qp, q_ld, d, kp, kt_ld, cols, sp, s_ld)) }
        })
    }

    /// `acc[l * acc_ld + c] += sum_r p[l * p_ld + r] * v[r * v_ld + c]` for `l < lanes`,
    /// `r < rows`, `c < cols`: a tile of weights times a tile of value rows. `cols` must be
    /// a multiple of 8. Does nothing when the slices do not hold what that needs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pv_tile(
        self,
        p: &[f32],
        p_ld: usize,
        lanes: usize,
        rows: usize,
        v: &[f32],
        v_ld: usize,
        cols: usize,
        acc: &mut [f32],
        acc_ld: usize,
    ) {
        let fits = pv_fits(p, p_ld, lanes, rows, v, v_ld, cols, acc, acc_ld);
        lane_blocks(fits, lanes, 4, p, p_ld, v, acc, acc_ld, |m, pp, vp, ap| {
            // SAFETY: the token proves the CPU features; `lane_blocks` hands over `m`
            // lanes the checks placed inside the slices, and the block reads and writes
            // only those lanes' rows and columns.
            unsafe { by_lanes!(m, [4 3 2], pv_block(pp, p_ld, rows, vp, v_ld, cols, ap, acc_ld)) }
        })
    }
}

/// The lane loop of every level's tile kernels: when `fits`, `block(m, a, b, c)` for each
/// block of at most `most` of the `lanes` lanes, with pointers to the block's first lane
/// in `a` (rows of `a_ld`) and `c` (rows of `c_ld`) and to the shared operand `b`.
#[allow(clippy::too_many_arguments)]
fn lane_blocks(
    fits: bool,
    lanes: usize,
    most: usize,
    a: &[f32],
    a_ld: usize,
    b: &[f32],
    c: &mut [f32],
    c_ld: usize,
    mut block: impl FnMut(usize, *const f32, *const f32, *mut f32),
) {
    if !fits {
        return;
    }
    let mut l = 0;
    while l < lanes {
        let m = (lanes - l).min(most);
        block(
            m,
            a[l * a_ld..].as_ptr(),
            b.as_ptr(),
            c[l * c_ld..].as_mut_ptr(),
        );
        l += m;
    }
}

/// Proof that the running CPU has AVX-512 F, BW, VL and DQ besides AVX2, FMA and F16C
/// (kv-quant's [`V512`] token): the safe entry to the 512-bit kernels, which read 16
/// elements per load and cover a row's last `len % 16` elements with one masked load
/// instead of a scalar tail.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512(V512);

impl Avx512 {
    /// The token, when the CPU has the features.
    pub(crate) fn get() -> Option<Self> {
        V512::new().map(Self)
    }

    /// [`Avx2::qk_tile`] with 16 columns per register and 8 lanes per block: 16
    /// accumulators in registers, no horizontal sums (prefill attention's inner product).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn qk_tile(
        self,
        q: &[f32],
        q_ld: usize,
        lanes: usize,
        d: usize,
        kt: &[f32],
        kt_ld: usize,
        cols: usize,
        s: &mut [f32],
        s_ld: usize,
    ) {
        let fits = qk_fits(q, q_ld, lanes, d, kt, kt_ld, cols, s, s_ld);
        lane_blocks(fits, lanes, 8, q, q_ld, kt, s, s_ld, |m, qp, kp, sp| {
            // SAFETY: the token proves the CPU features; `lane_blocks` hands over `m`
            // lanes the checks placed inside the slices, and the block reads and writes
            // only those lanes' rows and columns.
            unsafe {
                by_lanes!(m, [8 7 6 5 4 3 2], qk_block_512(qp, q_ld, d, kp, kt_ld, cols, sp, s_ld))
            }
        })
    }

    /// [`Avx2::pv_tile`] with 16 columns per register and 8 lanes per block.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pv_tile(
        self,
        p: &[f32],
        p_ld: usize,
        lanes: usize,
        rows: usize,
        v: &[f32],
        v_ld: usize,
        cols: usize,
        acc: &mut [f32],
        acc_ld: usize,
    ) {
        let fits = pv_fits(p, p_ld, lanes, rows, v, v_ld, cols, acc, acc_ld);
        lane_blocks(fits, lanes, 8, p, p_ld, v, acc, acc_ld, |m, pp, vp, ap| {
            // SAFETY: the token proves the CPU features; `lane_blocks` hands over `m`
            // lanes the checks placed inside the slices, and the block reads and writes
            // only those lanes' rows and columns.
            unsafe {
                by_lanes!(m, [8 7 6 5 4 3 2], pv_block_512(pp, p_ld, rows, vp, v_ld, cols, ap, acc_ld))
            }
        })
    }

    /// [`Avx2::score_rows`] with 512-bit loads.
    pub(crate) fn score_rows<E: Load>(
        self,
        q: &[f32],
        d: usize,
        rows: &[E],
        scores: &mut [f32],
        stride: usize,
        ahead: &[E],
    ) {
        if d == 0 {
            return;
        }
        let (heads, n) = (q.len() / d, rows.len() / d);
        let fits = stride >= n && (heads == 0 || scores.len() >= (heads - 1) * stride + n);
        if !fits || heads == 0 || n == 0 {
            return;
        }
        let mut pf = Prefetch::new(ahead);
        let mut h = 0;
        while h < heads {
            let hb = (heads - h).min(HEAD_BLOCK);
            let (qp, sp) = (q[h * d..].as_ptr(), scores[h * stride..].as_mut_ptr());
            // SAFETY: the token proves the CPU features. Heads h..h+hb have rows
            // q[(h + i) * d..][..d] inside `q` (h + hb <= q.len() / d) and score rows
            // scores[(h + i) * stride..][..n] inside `scores` (checked above); `rows` holds
            // n rows of d. The score rows do not overlap `q` or `rows` (distinct borrows).
            unsafe {
                let (rp, pf) = (rows.as_ptr(), &mut pf);
                // Head dims 64 and 128 (most models) have a kernel compiled for them, with
                // as many rows at a time as fill 16 accumulators.
                match (hb, d) {
                    (4, 64) => score_fixed_512::<E, 4, 4, 64>(qp, rp, n, sp, stride, pf),
                    (3, 64) => score_fixed_512::<E, 3, 5, 64>(qp, rp, n, sp, stride, pf),
                    (2, 64) => score_fixed_512::<E, 2, 8, 64>(qp, rp, n, sp, stride, pf),
                    (1, 64) => score_fixed_512::<E, 1, 16, 64>(qp, rp, n, sp, stride, pf),
                    (4, 128) => score_fixed_512::<E, 4, 4, 128>(qp, rp, n, sp, stride, pf),
                    (3, 128) => score_fixed_512::<E, 3, 5, 128>(qp, rp, n, sp, stride, pf),
                    (2, 128) => score_fixed_512::<E, 2, 8, 128>(qp, rp, n, sp, stride, pf),
                    (1, 128) => score_fixed_512::<E, 1, 16, 128>(qp, rp, n, sp, stride, pf),
                    (4, _) => score_block_512::<E, 4, 2>(qp, d, rp, n, sp, stride, pf),
                    (3, _) => score_block_512::<E, 3, 2>(qp, d, rp, n, sp, stride, pf),
                    (2, _) => score_block_512::<E, 2, 4>(qp, d, rp, n, sp, stride, pf),
                    _ => score_block_512::<E, 1, 8>(qp, d, rp, n, sp, stride, pf),
                }
            }
            pf = Prefetch::none();
            h += hb;
        }
    }

    /// [`Avx2::accumulate_rows`] with 512-bit loads.
    pub(crate) fn accumulate_rows<E: Load>(
        self,
        w: &[f32],
        stride: usize,
        d: usize,
        rows: &[E],
        acc: &mut [f32],
        ahead: &[E],
    ) {
        if d == 0 {
            return;
        }
        let (heads, n) = (acc.len() / d, rows.len() / d);
        let fits = stride >= n && (heads == 0 || w.len() >= (heads - 1) * stride + n);
        if !fits || heads == 0 || n == 0 {
            return;
        }
        let mut pf = Prefetch::new(ahead);
        let mut h = 0;
        while h < heads {
            let hb = (heads - h).min(HEAD_BLOCK);
            let (wp, ap) = (w[h * stride..].as_ptr(), acc[h * d..].as_mut_ptr());
            // SAFETY: the token proves the CPU features. Heads h..h+hb have weight rows
            // w[(h + i) * stride..][..n] inside `w` (checked above) and accumulator rows
            // acc[(h + i) * d..][..d] inside `acc` (h + hb <= acc.len() / d); `rows` holds
            // n rows of d; `acc` is a distinct, exclusive borrow.
            unsafe {
                let (rp, pf) = (rows.as_ptr(), &mut pf);
                match hb {
                    4 => accumulate_block_512::<E, 4, 4>(wp, stride, d, rp, n, ap, pf),
                    3 => accumulate_block_512::<E, 3, 4>(wp, stride, d, rp, n, ap, pf),
                    2 => accumulate_block_512::<E, 2, 8>(wp, stride, d, rp, n, ap, pf),
                    _ => accumulate_block_512::<E, 1, 8>(wp, stride, d, rp, n, ap, pf),
                }
            }
            pf = Prefetch::none();
            h += hb;
        }
    }
}

/// The lanes `0..min(left, 16)` of a 16-lane mask.
#[inline]
fn mask16(left: usize) -> __mmask16 {
    if left >= 16 {
        0xffff
    } else {
        ((1u32 << left) - 1) as __mmask16
    }
}

/// The 512-bit sum folded to 256 bits (lane `i` + lane `i + 8`).
///
/// # Safety
/// The CPU must have the features of [`Avx512`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn fold256(v: __m512) -> __m256 {
    // SAFETY: register-only intrinsics; the caller guarantees the CPU features.
    unsafe {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        _mm256_add_ps(lo, hi)
    }
}

/// [`score_block`] with 16 columns per load and the last `d % 16` in one masked load.
///
/// # Safety
/// As [`score_block`], with the CPU features of [`Avx512`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn score_block_512<E: Load, const H: usize, const R: usize>(
    q: *const f32,
    d: usize,
    rows: *const E,
    n: usize,
    scores: *mut f32,
    stride: usize,
    pf: &mut Prefetch<'_>,
) {
    let mut r0 = 0;
    // SAFETY: (both loops) rows r0..r0+R (or r0 alone) are below n; every load covers the
    // columns c..c + 16 masked to those below d, inside `rows` and q[h * d..][..d] (masked
    // lanes are not read); score writes are inside `scores` by the contract; the stack
    // buffer holds the 8 lanes of one reduction.
    unsafe {
        while r0 + R <= n {
            pf.bytes(R * d * size_of::<E>());
            let mut acc = [_mm512_setzero_ps(); 8];
            let mut c = 0;
            while c < d {
                let m = mask16(d - c);
                let mut qv = [_mm512_setzero_ps(); H];
                for (h, v) in qv.iter_mut().enumerate() {
                    *v = _mm512_maskz_loadu_ps(m, q.add(h * d + c));
                }
                for r in 0..R {
                    let k = E::load16(rows.add((r0 + r) * d + c), m);
                    for h in 0..H {
                        acc[r * H + h] = _mm512_fmadd_ps(qv[h], k, acc[r * H + h]);
                    }
                }
                c += 16;
            }
            let mut half = [_mm256_setzero_ps(); 8];
            for (x, a) in half.iter_mut().zip(&acc).take(R * H) {
                *x = fold256(*a);
            }
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), reduce8(&half));
            for r in 0..R {
                for h in 0..H {
                    *scores.add(h * stride + r0 + r) = lanes[r * H + h];
                }
            }
            r0 += R;
        }
        while r0 < n {
            pf.bytes(d * size_of::<E>());
            let row = rows.add(r0 * d);
            let mut acc = [_mm512_setzero_ps(); H];
            let mut c = 0;
            while c < d {
                let m = mask16(d - c);
                let k = E::load16(row.add(c), m);
                for h in 0..H {
                    let qv = _mm512_maskz_loadu_ps(m, q.add(h * d + c));
                    acc[h] = _mm512_fmadd_ps(qv, k, acc[h]);
                }
                c += 16;
            }
            for h in 0..H {
                *scores.add(h * stride + r0) = _mm512_reduce_add_ps(acc[h]);
            }
            r0 += 1;
        }
    }
}

/// [`score_block_512`] for a head dim `D` fixed at compile time (a multiple of 16, at most
/// 128): no masks, the chunk loop unrolled, the `H` query rows loaded once per call, and
/// the `R * H` dot products of `R` rows reduced together in 512-bit registers
/// ([`reduce16_512`]), which for SmolLM2's 3 heads of 64 takes about half the reduction
/// instructions per row of folding each to 256 bits first. Rows past the last multiple of
/// `R` go through [`score_block_512`].
///
/// # Safety
/// As [`score_block_512`] with `d == D`, and `R * H <= 16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn score_fixed_512<E: Load, const H: usize, const R: usize, const D: usize>(
    q: *const f32,
    rows: *const E,
    n: usize,
    scores: *mut f32,
    stride: usize,
    pf: &mut Prefetch<'_>,
) {
    const { assert!(D & 15 == 0 && D <= 128 && R * H <= 16) };
    let chunks = D / 16;
    // SAFETY: q holds H rows of D (the contract), read whole; rows r0..r0 + R are below n
    // and each holds D elements; score writes are inside `scores` by the contract; the
    // remainder call has this function's own contract on rows r0.. and their scores.
    unsafe {
        let mut qv = [[_mm512_setzero_ps(); 8]; H];
        for (h, qh) in qv.iter_mut().enumerate() {
            for (c, v) in qh.iter_mut().enumerate().take(chunks) {
                *v = _mm512_loadu_ps(q.add(h * D + 16 * c));
            }
        }
        let mut r0 = 0;
        while r0 + R <= n {
            pf.bytes(R * D * size_of::<E>());
            let mut acc = [_mm512_setzero_ps(); 16];
            for r in 0..R {
                let row = rows.add((r0 + r) * D);
                for c in 0..chunks {
                    let k = E::load16(row.add(16 * c), 0xffff);
                    for h in 0..H {
                        acc[r * H + h] = _mm512_fmadd_ps(qv[h][c], k, acc[r * H + h]);
                    }
                }
            }
            let lanes = reduce16_512(&acc);
            for r in 0..R {
                for h in 0..H {
                    *scores.add(h * stride + r0 + r) = lanes[r * H + h];
                }
            }
            r0 += R;
        }
        if r0 < n {
            score_block_512::<E, H, 1>(q, D, rows.add(r0 * D), n - r0, scores.add(r0), stride, pf);
        }
    }
}

/// [`accumulate_block`] with 16 columns per register and the last `d % 16` masked.
///
/// # Safety
/// As [`accumulate_block`], with `H * V <= 16` and the CPU features of [`Avx512`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn accumulate_block_512<E: Load, const H: usize, const V: usize>(
    w: *const f32,
    stride: usize,
    d: usize,
    rows: *const E,
    n: usize,
    acc: *mut f32,
    pf: &mut Prefetch<'_>,
) {
    let mut c = 0;
    // SAFETY: each pass covers columns c..c + 16 * V (or c..c + 16 masked to d) inside
    // every row of `rows` and `acc`; weight reads are inside `w` by the contract.
    unsafe {
        while c + 16 * V <= d {
            accumulate_cols_512::<E, H, V>(w, stride, d, rows, n, acc, c, pf, c == 0);
            c += 16 * V;
        }
        while c < d {
            accumulate_cols_512::<E, H, 1>(w, stride, d, rows, n, acc, c, pf, c == 0);
            c += 16;
        }
    }
}

/// Columns `c..c + 16 * V` (masked to those below `d`) of [`accumulate_block_512`],
/// prefetching a row of `pf` per row read when `prefetch` is set.
///
/// # Safety
/// As [`accumulate_block_512`], with `c < d`; when `V > 1`, `c + 16 * V <= d`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn accumulate_cols_512<E: Load, const H: usize, const V: usize>(
    w: *const f32,
    stride: usize,
    d: usize,
    rows: *const E,
    n: usize,
    acc: *mut f32,
    c: usize,
    pf: &mut Prefetch<'_>,
    prefetch: bool,
) {
    // SAFETY: the lanes of `m[v]` are the columns of c + 16 * v.. below d, inside every row
    // of `rows` and `acc` (masked lanes are neither read nor written); row r < n and head
    // h < H keep every other access inside the contract.
    unsafe {
        let mut m = [0 as __mmask16; V];
        for v in 0..V {
            m[v] = mask16(d.saturating_sub(c + 16 * v));
        }
        let mut a = [[_mm512_setzero_ps(); V]; H];
        for h in 0..H {
            for v in 0..V {
                a[h][v] = _mm512_maskz_loadu_ps(m[v], acc.add(h * d + c + 16 * v));
            }
        }
        for r in 0..n {
            if prefetch {
                pf.bytes(d * size_of::<E>());
            }
            let mut x = [_mm512_setzero_ps(); V];
            for v in 0..V {
                x[v] = E::load16(rows.add(r * d + c + 16 * v), m[v]);
            }
            for h in 0..H {
                let wb = _mm512_set1_ps(*w.add(h * stride + r));
                for v in 0..V {
                    a[h][v] = _mm512_fmadd_ps(wb, x[v], a[h][v]);
                }
            }
        }
        for h in 0..H {
            for v in 0..V {
                _mm512_mask_storeu_ps(acc.add(h * d + c + 16 * v), m[v], a[h][v]);
            }
        }
    }
}

/// A stored element type the kernels read directly, eight at a time.
pub(crate) trait Load: Copy + crate::kernels::Widen {
    /// Eight elements from `p` widened to f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable, and the CPU must have AVX2, FMA and F16C.
    unsafe fn load8(p: *const Self) -> __m256;

    /// The elements `p + i` for the set bits `i` of `mask`, widened to f32; zero in the
    /// other lanes. Masked-off elements are not read (they may lie past the end of a slice).
    ///
    /// # Safety
    /// `p + i` must be readable for every set bit `i` of `mask`, and the CPU must have the
    /// features of [`Avx512`].
    unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512;
}

impl Load for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees eight readable f32 at `p`; loadu has no alignment
        // requirement.
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn load16(p: *const f32, mask: __mmask16) -> __m512 {
        // SAFETY: the caller guarantees the unmasked f32 at `p` readable; masked-off lanes
        // are neither read nor fault; no alignment requirement.
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    }
}

impl Load for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees eight readable f16 (16 bytes) at `p`; f16 is a
        // transparent u16, the bit layout vcvtph2ps reads; loadu has no alignment
        // requirement.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())) }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn load16(p: *const f16, mask: __mmask16) -> __m512 {
        // SAFETY: the caller guarantees the unmasked f16 at `p` readable; masked-off lanes
        // are neither read nor fault (and load as +0, which widens to 0.0); f16 is a
        // transparent u16, the bit layout vcvtph2ps reads.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast::<i16>())) }
    }
}

impl Load for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees eight readable bf16 (16 bytes) at `p`; bf16 is a
        // transparent u16 holding the upper half of an f32, so zero-extending each to 32
        // bits and shifting it up 16 is the exact widening.
        unsafe {
            let h = _mm_loadu_si128(p.cast::<__m128i>());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
    unsafe fn load16(p: *const bf16, mask: __mmask16) -> __m512 {
        // SAFETY: the caller guarantees the unmasked bf16 at `p` readable; masked-off lanes
        // are neither read nor fault (and load as 0); widening as in `load8`.
        unsafe {
            let h = _mm256_maskz_loadu_epi16(mask, p.cast::<i16>());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

/// Scores of `H` query rows against `n` stored rows, `R` rows at a time (`R * H <= 8`):
/// each stored row is loaded once for all `H` heads, each query chunk once for all `R`
/// rows, and the `R * H` dot products are reduced together by [`reduce8`].
///
/// # Safety
/// `q` holds `H` rows of `d` f32 (row `h` at `q + h * d`); `rows` holds `n` rows of `d`
/// elements; `scores + h * stride + r` is writable for `h < H`, `r < n`; `R * H <= 8`; the
/// CPU has AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn score_block<E: Load, const H: usize, const R: usize>(
    q: *const f32,
    d: usize,
    rows: *const E,
    n: usize,
    scores: *mut f32,
    stride: usize,
    pf: &mut Prefetch<'_>,
) {
    let d8 = d & !7;
    let mut r0 = 0;
    // SAFETY: (both loops) rows r0..r0+R (or r0 alone) are below n, so every row pointer
    // and every column c + 8 <= d8 <= d, j < d stays inside `rows`; query reads stay inside
    // q[h * d..][..d]; score writes are inside `scores` by the contract; the stack buffer
    // holds the 8 lanes of one reduction.
    unsafe {
        while r0 + R <= n {
            pf.bytes(R * d * size_of::<E>());
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c < d8 {
                let mut qv = [_mm256_setzero_ps(); H];
                for (h, v) in qv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(q.add(h * d + c));
                }
                for r in 0..R {
                    let k = E::load8(rows.add((r0 + r) * d + c));
                    for h in 0..H {
                        acc[r * H + h] = _mm256_fmadd_ps(qv[h], k, acc[r * H + h]);
                    }
                }
                c += 8;
            }
            let sums = reduce8(&acc);
            if H == 1 && R == 8 && d8 == d {
                _mm256_storeu_ps(scores.add(r0), sums);
            } else {
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
                for r in 0..R {
                    let row = rows.add((r0 + r) * d);
                    for h in 0..H {
                        let mut s = lanes[r * H + h];
                        for j in d8..d {
                            s += *q.add(h * d + j) * (*row.add(j)).widen();
                        }
                        *scores.add(h * stride + r0 + r) = s;
                    }
                }
            }
            r0 += R;
        }
        while r0 < n {
            pf.bytes(d * size_of::<E>());
            let row = rows.add(r0 * d);
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c < d8 {
                let k = E::load8(row.add(c));
                for h in 0..H {
                    acc[h] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(h * d + c)), k, acc[h]);
                }
                c += 8;
            }
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), reduce8(&acc));
            for (h, &lane) in lanes.iter().enumerate().take(H) {
                let mut s = lane;
                for j in d8..d {
                    s += *q.add(h * d + j) * (*row.add(j)).widen();
                }
                *scores.add(h * stride + r0) = s;
            }
            r0 += 1;
        }
    }
}

/// Weighted sum of `n` stored rows into `H` accumulator rows, `8 * V` columns at a time
/// with the accumulators in registers across all rows (`H * V` independent FMA chains, so
/// a small head group still keeps both FMA pipes busy).
///
/// # Safety
/// `w + h * stride + r` is readable for `h < H`, `r < n`; `rows` holds `n` rows of `d`
/// elements; `acc` holds `H` rows of `d` f32, writable; `H * V <= 8`; the CPU has AVX2,
/// FMA and F16C. The first pass over the rows prefetches from `pf`, a row per row read.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_block<E: Load, const H: usize, const V: usize>(
    w: *const f32,
    stride: usize,
    d: usize,
    rows: *const E,
    n: usize,
    acc: *mut f32,
    pf: &mut Prefetch<'_>,
) {
    let mut c = 0;
    // SAFETY: each pass covers columns c..c + 8 * V (or c..c + 8) below d, then the scalar
    // tail columns below d, inside every row of `rows` and `acc`; weight reads are inside
    // `w` by the contract.
    unsafe {
        while c + 8 * V <= d {
            accumulate_cols::<E, H, V>(w, stride, d, rows, n, acc, c, pf, c == 0);
            c += 8 * V;
        }
        while c + 8 <= d {
            accumulate_cols::<E, H, 1>(w, stride, d, rows, n, acc, c, pf, c == 0);
            c += 8;
        }
        for j in c..d {
            for h in 0..H {
                let mut s = *acc.add(h * d + j);
                for r in 0..n {
                    s += *w.add(h * stride + r) * (*rows.add(r * d + j)).widen();
                }
                *acc.add(h * d + j) = s;
            }
        }
    }
}

/// Columns `c..c + 8 * V` of [`accumulate_block`], prefetching a row of `pf` per row read
/// when `prefetch` is set.
///
/// # Safety
/// As [`accumulate_block`], with `c + 8 * V <= d`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_cols<E: Load, const H: usize, const V: usize>(
    w: *const f32,
    stride: usize,
    d: usize,
    rows: *const E,
    n: usize,
    acc: *mut f32,
    c: usize,
    pf: &mut Prefetch<'_>,
    prefetch: bool,
) {
    // SAFETY: columns c..c + 8 * V are inside every row of `rows` and `acc` (c + 8V <= d);
    // row r < n and head h < H keep every other access inside the contract.
    unsafe {
        let mut a = [[_mm256_setzero_ps(); V]; H];
        for h in 0..H {
            for v in 0..V {
                a[h][v] = _mm256_loadu_ps(acc.add(h * d + c + 8 * v));
            }
        }
        for r in 0..n {
            if prefetch {
                pf.bytes(d * size_of::<E>());
            }
            let mut x = [_mm256_setzero_ps(); V];
            for v in 0..V {
                x[v] = E::load8(rows.add(r * d + c + 8 * v));
            }
            for h in 0..H {
                let wb = _mm256_broadcast_ss(&*w.add(h * stride + r));
                for v in 0..V {
                    a[h][v] = _mm256_fmadd_ps(wb, x[v], a[h][v]);
                }
            }
        }
        for h in 0..H {
            for v in 0..V {
                _mm256_storeu_ps(acc.add(h * d + c + 8 * v), a[h][v]);
            }
        }
    }
}

/// Largest of `n` floats at `p`.
///
/// # Safety
/// `p..p + n` is readable; the CPU has AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn max_of(p: *const f32, n: usize) -> f32 {
    let n8 = n & !7;
    let mut m = f32::NEG_INFINITY;
    // SAFETY: every read is below p + n (i + 8 <= n8 <= n, then i < n).
    unsafe {
        if n8 > 0 {
            let mut v = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < n8 {
                // max(x, v) keeps v where x is NaN, like f32::max.
                v = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), v);
                i += 8;
            }
            let h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            let h = _mm_max_ss(h, _mm_shuffle_ps::<1>(h, h));
            m = _mm_cvtss_f32(h);
        }
        for i in n8..n {
            m = m.max(*p.add(i));
        }
    }
    m
}

/// `exp` of eight floats: Cody-Waite range reduction to `x = n ln2 + r`, |r| <= ln2 / 2,
/// a degree-7 polynomial for `e^r` and `2^n` built in the exponent bits. Relative error
/// within a few ulp for x in [-87.3, 88.7]; 0 below (where f32 underflows), NaN stays
/// NaN.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp8(x: __m256) -> __m256 {
    const LOW: f32 = -87.336_54;
    const HIGH: f32 = 88.722_83;
    // SAFETY: register-only intrinsics; the caller guarantees the CPU features.
    unsafe {
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOW));
        // max(LOW, x) and min(HIGH, x) return x when x is NaN.
        let x = _mm256_min_ps(_mm256_set1_ps(HIGH), _mm256_max_ps(_mm256_set1_ps(LOW), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        // ln 2 split in a part exact in a few bits and the rest, so n * LN2_HI is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.398_199_9e-3));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.333_452e-3));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.166_579_5e-2));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.166_666_65));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5));
        y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let y = _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
        _mm256_andnot_ps(underflow, y)
    }
}

/// `p[i] = exp(p[i] - m)` for `i < n`; returns the sum.
///
/// # Safety
/// `p..p + n` is readable and writable; the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_sum(p: *mut f32, n: usize, m: f32) -> f32 {
    let n8 = n & !7;
    let mv = _mm256_set1_ps(m);
    let mut total = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY: every access is below p + n (i + 8 <= n8 <= n); the tail goes through a
    // local buffer padded with -inf, whose exp is 0.
    unsafe {
        while i < n8 {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv));
            _mm256_storeu_ps(p.add(i), e);
            total = _mm256_add_ps(total, e);
            i += 8;
        }
        if i < n {
            let mut buf = [f32::NEG_INFINITY; 8];
            std::ptr::copy_nonoverlapping(p.add(i), buf.as_mut_ptr(), n - i);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), mv));
            _mm256_storeu_ps(buf.as_mut_ptr(), e);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p.add(i), n - i);
            total = _mm256_add_ps(total, e);
        }
        hsum(total)
    }
}

/// Scores of `M` query lanes against `cols` keys stored transposed (`kt[k * kt_ld + j]`):
/// an outer-product micro-kernel, 16 keys (two registers) by `M` lanes per pass over `d`.
///
/// # Safety
/// `q + i * q_ld + k` readable for `i < M`, `k < d`; `kt + k * kt_ld + j` readable for
/// `k < d`, `j < cols`; `s + i * s_ld + j` writable for `i < M`, `j < cols`; `cols` a
/// multiple of 8; the CPU has AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn qk_block<const M: usize>(
    q: *const f32,
    q_ld: usize,
    d: usize,
    kt: *const f32,
    kt_ld: usize,
    cols: usize,
    s: *mut f32,
    s_ld: usize,
) {
    let mut j = 0;
    // SAFETY: (both loops) column ranges j..j+16 and j..j+8 stay below `cols`, rows below
    // `d` and lanes below `M`, which the contract makes readable / writable.
    unsafe {
        while j + 16 <= cols {
            let mut a0 = [_mm256_setzero_ps(); M];
            let mut a1 = [_mm256_setzero_ps(); M];
            for k in 0..d {
                let b0 = _mm256_loadu_ps(kt.add(k * kt_ld + j));
                let b1 = _mm256_loadu_ps(kt.add(k * kt_ld + j + 8));
                for i in 0..M {
                    let a = _mm256_broadcast_ss(&*q.add(i * q_ld + k));
                    a0[i] = _mm256_fmadd_ps(a, b0, a0[i]);
                    a1[i] = _mm256_fmadd_ps(a, b1, a1[i]);
                }
            }
            for i in 0..M {
                _mm256_storeu_ps(s.add(i * s_ld + j), a0[i]);
                _mm256_storeu_ps(s.add(i * s_ld + j + 8), a1[i]);
            }
            j += 16;
        }
        if j < cols {
            let mut a0 = [_mm256_setzero_ps(); M];
            for k in 0..d {
                let b0 = _mm256_loadu_ps(kt.add(k * kt_ld + j));
                for i in 0..M {
                    let a = _mm256_broadcast_ss(&*q.add(i * q_ld + k));
                    a0[i] = _mm256_fmadd_ps(a, b0, a0[i]);
                }
            }
            for i in 0..M {
                _mm256_storeu_ps(s.add(i * s_ld + j), a0[i]);
            }
        }
    }
}

/// `M` accumulator lanes plus weights times `rows` value rows, 16 columns at a time with
/// the accumulators in registers across all rows.
///
/// # Safety
/// `p + i * p_ld + r` readable for `i < M`, `r < rows`; `v + r * v_ld + c` readable for
/// `r < rows`, `c < cols`; `acc + i * acc_ld + c` readable and writable for `i < M`,
/// `c < cols`; `cols` a multiple of 8; the CPU has AVX2 and FMA.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pv_block<const M: usize>(
    p: *const f32,
    p_ld: usize,
    rows: usize,
    v: *const f32,
    v_ld: usize,
    cols: usize,
    acc: *mut f32,
    acc_ld: usize,
) {
    let mut c = 0;
    // SAFETY: (both loops) column ranges c..c+16 and c..c+8 stay below `cols`, rows below
    // `rows` and lanes below `M`, which the contract makes accessible.
    unsafe {
        while c + 16 <= cols {
            let mut a0 = [_mm256_setzero_ps(); M];
            let mut a1 = [_mm256_setzero_ps(); M];
            for i in 0..M {
                a0[i] = _mm256_loadu_ps(acc.add(i * acc_ld + c));
                a1[i] = _mm256_loadu_ps(acc.add(i * acc_ld + c + 8));
            }
            for r in 0..rows {
                let b0 = _mm256_loadu_ps(v.add(r * v_ld + c));
                let b1 = _mm256_loadu_ps(v.add(r * v_ld + c + 8));
                for i in 0..M {
                    let a = _mm256_broadcast_ss(&*p.add(i * p_ld + r));
                    a0[i] = _mm256_fmadd_ps(a, b0, a0[i]);
                    a1[i] = _mm256_fmadd_ps(a, b1, a1[i]);
                }
            }
            for i in 0..M {
                _mm256_storeu_ps(acc.add(i * acc_ld + c), a0[i]);
                _mm256_storeu_ps(acc.add(i * acc_ld + c + 8), a1[i]);
            }
            c += 16;
        }
        if c < cols {
            let mut a0 = [_mm256_setzero_ps(); M];
            for i in 0..M {
                a0[i] = _mm256_loadu_ps(acc.add(i * acc_ld + c));
            }
            for r in 0..rows {
                let b0 = _mm256_loadu_ps(v.add(r * v_ld + c));
                for i in 0..M {
                    let a = _mm256_broadcast_ss(&*p.add(i * p_ld + r));
                    a0[i] = _mm256_fmadd_ps(a, b0, a0[i]);
                }
            }
            for i in 0..M {
                _mm256_storeu_ps(acc.add(i * acc_ld + c), a0[i]);
            }
        }
    }
}

/// Mask of the first `n.min(16)` lanes of a 512-bit register.
#[inline]
fn first_lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// [`qk_block`] with 32 columns (two registers) per pass and the last 16 or 8 in one
/// masked register.
///
/// # Safety
/// As [`qk_block`], with the CPU features of [`Avx512`].
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn qk_block_512<const M: usize>(
    q: *const f32,
    q_ld: usize,
    d: usize,
    kt: *const f32,
    kt_ld: usize,
    cols: usize,
    s: *mut f32,
    s_ld: usize,
) {
    let mut j = 0;
    // SAFETY: (both loops) column ranges j..j+32, and j..j+16 masked to those below `cols`,
    // stay below `cols`; rows below `d` and lanes below `M`, which the contract makes
    // readable / writable. Masked-off lanes are neither read nor written.
    unsafe {
        while j + 32 <= cols {
            let mut a0 = [_mm512_setzero_ps(); M];
            let mut a1 = [_mm512_setzero_ps(); M];
            for k in 0..d {
                let b0 = _mm512_loadu_ps(kt.add(k * kt_ld + j));
                let b1 = _mm512_loadu_ps(kt.add(k * kt_ld + j + 16));
                for i in 0..M {
                    let a = _mm512_set1_ps(*q.add(i * q_ld + k));
                    a0[i] = _mm512_fmadd_ps(a, b0, a0[i]);
                    a1[i] = _mm512_fmadd_ps(a, b1, a1[i]);
                }
            }
            for i in 0..M {
                _mm512_storeu_ps(s.add(i * s_ld + j), a0[i]);
                _mm512_storeu_ps(s.add(i * s_ld + j + 16), a1[i]);
            }
            j += 32;
        }
        while j < cols {
            let mask = first_lanes(cols - j);
            let mut a0 = [_mm512_setzero_ps(); M];
            for k in 0..d {
                let b0 = _mm512_maskz_loadu_ps(mask, kt.add(k * kt_ld + j));
                for i in 0..M {
                    let a = _mm512_set1_ps(*q.add(i * q_ld + k));
                    a0[i] = _mm512_fmadd_ps(a, b0, a0[i]);
                }
            }
            for i in 0..M {
                _mm512_mask_storeu_ps(s.add(i * s_ld + j), mask, a0[i]);
            }
            j += 16;
        }
    }
}

/// [`pv_block`] with 32 columns (two registers) per pass and the last 16 or 8 in one
/// masked register.
///
/// # Safety
/// As [`pv_block`], with the CPU features of [`Avx512`].
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn pv_block_512<const M: usize>(
    p: *const f32,
    p_ld: usize,
    rows: usize,
    v: *const f32,
    v_ld: usize,
    cols: usize,
    acc: *mut f32,
    acc_ld: usize,
) {
    let mut c = 0;
    // SAFETY: (both loops) column ranges c..c+32, and c..c+16 masked to those below
    // `cols`, stay below `cols`; rows below `rows` and lanes below `M`, which the contract
    // makes accessible. Masked-off lanes are neither read nor written.
    unsafe {
        while c + 32 <= cols {
            let mut a0 = [_mm512_setzero_ps(); M];
            let mut a1 = [_mm512_setzero_ps(); M];
            for i in 0..M {
                a0[i] = _mm512_loadu_ps(acc.add(i * acc_ld + c));
                a1[i] = _mm512_loadu_ps(acc.add(i * acc_ld + c + 16));
            }
            for r in 0..rows {
                let b0 = _mm512_loadu_ps(v.add(r * v_ld + c));
                let b1 = _mm512_loadu_ps(v.add(r * v_ld + c + 16));
                for i in 0..M {
                    let a = _mm512_set1_ps(*p.add(i * p_ld + r));
                    a0[i] = _mm512_fmadd_ps(a, b0, a0[i]);
                    a1[i] = _mm512_fmadd_ps(a, b1, a1[i]);
                }
            }
            for i in 0..M {
                _mm512_storeu_ps(acc.add(i * acc_ld + c), a0[i]);
                _mm512_storeu_ps(acc.add(i * acc_ld + c + 16), a1[i]);
            }
            c += 32;
        }
        while c < cols {
            let mask = first_lanes(cols - c);
            let mut a0 = [_mm512_setzero_ps(); M];
            for i in 0..M {
                a0[i] = _mm512_maskz_loadu_ps(mask, acc.add(i * acc_ld + c));
            }
            for r in 0..rows {
                let b0 = _mm512_maskz_loadu_ps(mask, v.add(r * v_ld + c));
                for i in 0..M {
                    let a = _mm512_set1_ps(*p.add(i * p_ld + r));
                    a0[i] = _mm512_fmadd_ps(a, b0, a0[i]);
                }
            }
            for i in 0..M {
                _mm512_mask_storeu_ps(acc.add(i * acc_ld + c), mask, a0[i]);
            }
            c += 16;
        }
    }
}
