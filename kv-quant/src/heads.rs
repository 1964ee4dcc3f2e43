//! Several query heads against the same stored rows (a GQA group in a decode step), written
//! once over the vector width ([`Simd`]) and run at each SIMD level by
//! [`crate::Kernels::dot_heads`] / [`crate::Kernels::axpy_heads`].
//!
//! Each stored row is unpacked once, in registers, and read by every head of the group;
//! the f32 row never reaches memory. `x̂ = fma(code, s, m)` as in [`crate::rows`], so
//! scores and sums differ from the one-head kernels only in summation order.
//!
//! What differs by width is chosen by constants of the width, not by separate code:
//! - 4-bit codes may unpack out of element order where that is cheaper
//!   ([`Simd::U4_PERMUTED`], at 512 bits: even and odd elements); the queries (scores) or
//!   the accumulators (sums) are permuted alike once per call, never per row.
//! - Up to 16 dot products are reduced together ([`Simd::reduce16`]) when a width has the
//!   registers for them (3 heads x 4 rows of 4-bit codes at 512 bits, measured to pay).
//! - Sums keep 2 vectors per head and column block at 256 bits and 4 at 512 (16 and 32
//!   vector registers).
//!
//! Lengths are those the public API checked; inside they are `debug_assert!`ed. A wrong
//! length gives a wrong result, never an out-of-bounds access.

use crate::format::RowFormat;
use crate::rows::{self, dequant, group_bytes, params, Codes, I8, U2, U4};
use crate::simd::{Prefetch, Simd};

/// Heads one pass over a run of rows serves; more heads take further passes.
const HEAD_BLOCK: usize = 4;

/// Longest rows whose 4-bit scores use permuted codes: the permuted queries live in a
/// stack buffer filled on every call, so it stays small.
pub(crate) const SPLIT_MAX: usize = 128;

/// `scores[h * stride + r] = q_h · x̂_r` for `H` heads and the `R` rows of `rows` (each
/// `rb` bytes): the `R * H` dot products accumulated side by side and reduced together.
/// `qh[h]` are the queries in the order the codes unpack in (`perm`: [`Codes::unpack_perm`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_block<S: Simd, C: Codes, const H: usize, const R: usize>(
    s: S,
    perm: bool,
    group: usize,
    gbytes: usize,
    qh: &[&[[f32; 32]]; H],
    rows: &[u8],
    rb: usize,
    scores: &mut [f32],
    stride: usize,
) {
    debug_assert!(R * H <= 16 && rows.len() == R * rb);
    let mut acc = [s.zero(); 16];
    for r in 0..R {
        let row = &rows[r * rb..][..rb];
        for (gi, rg) in row.chunks_exact(gbytes).enumerate() {
            let (sv, mv) = params::<S, C>(s, rg);
            for (j, c32) in C::chunks(&rg[C::HEADER..]).iter().enumerate() {
                let x = if perm {
                    C::dequant_perm(s, c32, sv, mv)
                } else {
                    let mut x = C::unpack(s, c32);
                    for v in x.as_mut() {
                        *v = dequant::<S, C>(s, *v, sv, mv);
                    }
                    x
                };
                let at = gi * group / 32 + j;
                for h in 0..H {
                    let qv = s.load32(&qh[h][at]);
                    let a = &mut acc[h * R + r];
                    for (q, x) in qv.as_ref().iter().zip(x.as_ref()) {
                        *a = s.fma(*q, *x, *a);
                    }
                }
            }
        }
    }
    // Head-major, so that each head's `R` scores leave in one copy.
    let lanes = if R * H <= 8 {
        let mut l = [0.0f32; 16];
        l[..8].copy_from_slice(&s.reduce8(&acc.as_chunks::<8>().0[0]));
        l
    } else {
        s.reduce16(&acc)
    };
    for h in 0..H {
        scores[h * stride..][..R].copy_from_slice(&lanes[h * R..][..R]);
    }
}

/// `scores[h * stride + r] = q_h · x̂_r` for `H` heads (`q` holds `H` rows of `d`) and
/// every row of `rows` (rows of `rb` bytes), `R` rows at a time. Nonzero `G` and `D` fix
/// the group size and row length at compile time (the caller passes the same values), so
/// the group and chunk loops unroll. `N > 0`: 4-bit codes unpack permuted and the
/// queries are permuted alike into a stack buffer of `N >= d` per head.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn score_heads<
    S: Simd,
    C: Codes,
    const H: usize,
    const R: usize,
    const G: usize,
    const D: usize,
    const N: usize,
>(
    s: S,
    group: usize,
    d: usize,
    q: &[f32],
    rows: &[u8],
    rb: usize,
    scores: &mut [f32],
    stride: usize,
    pf: &mut Prefetch<'_>,
) {
    let group = if G > 0 { G } else { group };
    let d = if D > 0 { D } else { d };
    let gbytes = group_bytes::<C>(group);
    let rb = if G > 0 && D > 0 { D / G * gbytes } else { rb };
    debug_assert!(q.len() == H * d && (N == 0 || d <= N) && rows.len().is_multiple_of(rb));
    let mut qperm = [[0.0f32; N]; H];
    if N > 0 {
        for (h, qp) in qperm.iter_mut().enumerate() {
            let (x32, _) = q[h * d..][..d].as_chunks::<32>();
            for (x, o) in x32.iter().zip(qp.as_chunks_mut::<32>().0) {
                s.store32(o, s.perm32(s.load32(x)));
            }
        }
    }
    let qh: [&[[f32; 32]]; H] = core::array::from_fn(|h| {
        let qh = if N > 0 {
            &qperm[h][..d]
        } else {
            &q[h * d..][..d]
        };
        qh.as_chunks::<32>().0
    });
    let n = rows.len() / rb;
    let (step_r, step_1) = (pf.share(R * rb), pf.share(rb));
    let mut r0 = 0;
    while r0 + R <= n {
        score_block::<S, C, H, R>(
            s,
            N > 0,
            group,
            gbytes,
            &qh,
            &rows[r0 * rb..][..R * rb],
            rb,
            &mut scores[r0..],
            stride,
        );
        r0 += R;
        pf.bytes(step_r);
    }
    while r0 < n {
        score_block::<S, C, H, 1>(
            s,
            N > 0,
            group,
            gbytes,
            &qh,
            &rows[r0 * rb..][..rb],
            rb,
            &mut scores[r0..],
            stride,
        );
        r0 += 1;
        pf.bytes(step_1);
    }
}

/// `scores[h * stride + r] = q_h · x̂_r` for every query row `q_h` of `q` (rows of `d`) and
/// every stored row of `rows` (rows of `rb` bytes), each row unpacked once per block of
/// [`HEAD_BLOCK`] heads. Float formats score head by head. Prefetches `ahead` while the
/// first block of heads reads the rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_heads<S: Simd>(
    s: S,
    format: RowFormat,
    d: usize,
    q: &[f32],
    rows: &[u8],
    rb: usize,
    scores: &mut [f32],
    stride: usize,
    ahead: &[u8],
) {
    let heads = q.len() / d;
    let n = rows.len() / rb;
    debug_assert!(heads == 0 || scores.len() >= (heads - 1) * stride + n);
    let mut h0 = 0;
    while h0 < heads {
        let hb = (heads - h0).min(HEAD_BLOCK);
        // The first block of heads reads every row: it prefetches the next ones.
        let mut pf = Prefetch::spread(if h0 == 0 { ahead } else { &[][..] }, rows.len());
        let qb = &q[h0 * d..(h0 + hb) * d];
        let sb = &mut scores[h0 * stride..];
        // `wide`: 3 heads take 4 rows at a time (12 sums reduced together), which pays
        // for permuted 4-bit codes and not for 8-bit ones (measured at 512 bits).
        macro_rules! heads {
            ($c:ty, $g:expr, $G:literal, $D:literal, $N:expr) => {
                match hb {
                    4 => score_heads::<S, $c, 4, 2, $G, $D, $N>(
                        s, $g, d, qb, rows, rb, sb, stride, &mut pf,
                    ),
                    3 if $N > 0 => score_heads::<S, $c, 3, 4, $G, $D, $N>(
                        s, $g, d, qb, rows, rb, sb, stride, &mut pf,
                    ),
                    3 => score_heads::<S, $c, 3, 2, $G, $D, $N>(
                        s, $g, d, qb, rows, rb, sb, stride, &mut pf,
                    ),
                    2 => score_heads::<S, $c, 2, 4, $G, $D, $N>(
                        s, $g, d, qb, rows, rb, sb, stride, &mut pf,
                    ),
                    _ => score_heads::<S, $c, 1, 8, $G, $D, $N>(
                        s, $g, d, qb, rows, rb, sb, stride, &mut pf,
                    ),
                }
            };
        }
        // Compile-time group size and row length for the common head dims (64, 128),
        // run-time ones for the rest.
        macro_rules! blocks {
            ($c:ty, $g:expr, $N:expr) => {
                match ($g, d) {
                    (32, 64) => heads!($c, $g, 32, 64, $N),
                    (64, 64) => heads!($c, $g, 64, 64, $N),
                    (32, 128) => heads!($c, $g, 32, 128, $N),
                    (64, 128) => heads!($c, $g, 64, 128, $N),
                    (128, 128) => heads!($c, $g, 128, 128, $N),
                    _ => heads!($c, $g, 0, 0, $N),
                }
            };
        }
        match format {
            RowFormat::Int8 { group } => blocks!(I8, group.size(), 0),
            RowFormat::Int4 { group } if S::U4_PERMUTED && d <= SPLIT_MAX => {
                blocks!(U4, group.size(), SPLIT_MAX)
            }
            RowFormat::Int4 { group } => blocks!(U4, group.size(), 0),
            RowFormat::Int2 { group } => blocks!(U2, group.size(), 0),
            _ => {
                for h in 0..hb {
                    let out = &mut sb[h * stride..][..n];
                    rows::dot_many(s, format, &qb[h * d..][..d], rows, rb, out);
                }
            }
        }
        h0 += hb;
    }
}

/// `acc[h][c0..c0 + P * 2 * LANES] += sum_r w[h * stride + r] * x̂_r[..]` for `H` heads
/// (`acc` holds `H` rows of `d`): the `H * P` pairs of accumulators in registers across
/// all rows, each pair of vectors of a row dequantized once for all heads.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate_cols<S: Simd, C: Codes, const H: usize, const P: usize>(
    s: S,
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
    let gbytes = group_bytes::<C>(group);
    let n = rows.len() / rb;
    let pw = 2 * S::LANES;
    let pb = core::mem::size_of::<C::Pair<S>>();
    debug_assert!(c0 + P * pw <= d && acc.len().is_multiple_of(d));
    let wh: [&[f32]; H] = core::array::from_fn(|h| &w[h * stride..][..n]);
    // Per pair of vectors: where its group header and its codes start in a row.
    let at: [(usize, usize); P] = core::array::from_fn(|k| {
        let c = c0 + pw * k;
        let (gi, off) = (c / group, c % group);
        (gi * gbytes, gi * gbytes + C::HEADER + off / pw * pb)
    });
    let mut a = [[[s.zero(); 2]; P]; H];
    for (h, ah) in a.iter_mut().enumerate() {
        for (k, ak) in ah.iter_mut().enumerate() {
            let (l, _) = S::lanes(&acc[h * d + c0 + pw * k..][..pw]);
            let v = [s.load(&l[0]), s.load(&l[1])];
            *ak = if C::permuted::<S>() { s.perm2(v) } else { v };
        }
    }
    let step = pf.share(rb);
    for (r, row) in rows.chunks_exact(rb).enumerate() {
        pf.bytes(step);
        let wb: [S::F32; H] = core::array::from_fn(|h| s.splat(wh[h][r]));
        for (k, &(g, c)) in at.iter().enumerate() {
            let (sv, mv) = params::<S, C>(s, &row[g..]);
            let x = C::dequant_pair(s, &C::pairs::<S>(&row[c..])[0], sv, mv);
            for h in 0..H {
                a[h][k][0] = s.fma(wb[h], x[0], a[h][k][0]);
                a[h][k][1] = s.fma(wb[h], x[1], a[h][k][1]);
            }
        }
    }
    for (h, ah) in a.iter().enumerate() {
        for (k, ak) in ah.iter().enumerate() {
            let v = if C::permuted::<S>() {
                s.unperm2(*ak)
            } else {
                *ak
            };
            let (l, _) = S::lanes_mut(&mut acc[h * d + c0 + pw * k..][..pw]);
            s.store(&mut l[0], v[0]);
            s.store(&mut l[1], v[1]);
        }
    }
}

/// `acc[h] += sum_r w[h * stride + r] * x̂_r` for `H` heads (`acc` holds `H` rows of `d`,
/// a multiple of 32), in column blocks of 2 vector pairs per head at 512 bits (32
/// registers) and 1 at 256 (16 registers).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate_heads<S: Simd, C: Codes, const H: usize>(
    s: S,
    group: usize,
    d: usize,
    w: &[f32],
    stride: usize,
    rows: &[u8],
    rb: usize,
    acc: &mut [f32],
    pf: &mut Prefetch<'_>,
) {
    let pw = 2 * S::LANES;
    let mut c0 = 0;
    // The first pass over the rows prefetches; later ones find every line requested.
    while c0 < d {
        if S::LANES >= 16 && d - c0 >= 2 * pw {
            accumulate_cols::<S, C, H, 2>(s, group, d, c0, w, stride, rows, rb, acc, pf);
            c0 += 2 * pw;
        } else {
            accumulate_cols::<S, C, H, 1>(s, group, d, c0, w, stride, rows, rb, acc, pf);
            c0 += pw;
        }
    }
}

/// `acc[h] += sum_r w[h * stride + r] * x̂_r` for every accumulator row of `acc` (rows of
/// `d`) and every stored row of `rows`, each row unpacked once per block of
/// [`HEAD_BLOCK`] heads and columns. Float formats accumulate head by head. Prefetches
/// `ahead` while the first block of heads reads the rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn axpy_heads<S: Simd>(
    s: S,
    format: RowFormat,
    d: usize,
    w: &[f32],
    stride: usize,
    rows: &[u8],
    rb: usize,
    acc: &mut [f32],
    ahead: &[u8],
) {
    let heads = acc.len() / d;
    let n = rows.len() / rb;
    debug_assert!(heads == 0 || w.len() >= (heads - 1) * stride + n);
    let mut h0 = 0;
    while h0 < heads {
        let hb = (heads - h0).min(HEAD_BLOCK);
        let mut pf = Prefetch::spread(if h0 == 0 { ahead } else { &[][..] }, rows.len());
        let wb = &w[h0 * stride..];
        let ab = &mut acc[h0 * d..(h0 + hb) * d];
        macro_rules! blocks {
            ($c:ty, $g:expr) => {
                match hb {
                    4 => accumulate_heads::<S, $c, 4>(s, $g, d, wb, stride, rows, rb, ab, &mut pf),
                    3 => accumulate_heads::<S, $c, 3>(s, $g, d, wb, stride, rows, rb, ab, &mut pf),
                    2 => accumulate_heads::<S, $c, 2>(s, $g, d, wb, stride, rows, rb, ab, &mut pf),
                    _ => accumulate_heads::<S, $c, 1>(s, $g, d, wb, stride, rows, rb, ab, &mut pf),
                }
            };
        }
        match format {
            RowFormat::Int8 { group } => blocks!(I8, group.size()),
            RowFormat::Int4 { group } => blocks!(U4, group.size()),
            RowFormat::Int2 { group } => blocks!(U2, group.size()),
            _ => {
                for h in 0..hb {
                    rows::axpy_many(
                        s,
                        format,
                        &wb[h * stride..][..n],
                        rows,
                        rb,
                        &mut ab[h * d..][..d],
                    );
                }
            }
        }
        h0 += hb;
    }
}
