//! Scores of queries against a quantized KIVI key block, written once over the vector
//! width ([`Simd`]) and run at each SIMD level by [`crate::Kernels::kivi_scores`] and
//! [`crate::Kernels::kivi_scores_heads`].
//!
//! A block stores per-channel f16 scales `s[c]` and minimums `m[c]`, then each token's
//! codes. `q · k̂_t = sum_c (q[c] s[c]) code[t][c] + sum_c q[c] m[c]`: the scaled query and
//! the bias are formed once per call, then each token costs one pass over its codes. 4-bit
//! codes unpack in the order of [`Simd::perm32`] (the scaled queries are permuted alike).
//!
//! Lengths are those the public API checked (`q.len()` a multiple of 32, `block` a whole
//! block); a wrong length gives a wrong result, never an out-of-bounds access.

use crate::kivi::KiviBits;
use crate::rows::{Codes, U2, U4};
use crate::simd::{Prefetch, Simd};

/// Channels per tile: `q * s` for one tile lives in a stack buffer (2 KiB).
const TILE: usize = 512;

/// Heads one pass over a block serves; more heads take further passes.
const HEAD_BLOCK: usize = 4;

/// Query rows of at most this many channels use a small stack buffer per head.
const SMALL: usize = 128;

/// `qs = q * s` (f16 scales `s`, in the order `C`'s codes unpack in,
/// [`Codes::unpack_perm`]) and returns `sum q * m` (f16 minimums `m`); `q.len()` a
/// multiple of 32, `qs` as long.
#[inline(always)]
fn scale_query<S: Simd, C: Codes>(
    s: S,
    q: &[f32],
    scales: &[u8],
    mins: &[u8],
    qs: &mut [f32],
) -> f32 {
    debug_assert!(scales.len() == 2 * q.len() && mins.len() == 2 * q.len());
    let mut bias = s.zero32();
    let q32 = q.as_chunks::<32>().0;
    let s32 = scales.as_chunks::<64>().0;
    let m32 = mins.as_chunks::<64>().0;
    for (((qv, sv), mv), o) in q32.iter().zip(s32).zip(m32).zip(qs.as_chunks_mut::<32>().0) {
        let (mut qv, sv, mv) = (s.load32(qv), s.load32_f16(sv), s.load32_f16(mv));
        for ((b, q), m) in bias.as_mut().iter_mut().zip(qv.as_ref()).zip(mv.as_ref()) {
            *b = s.fma(*q, *m, *b);
        }
        for (q, sc) in qv.as_mut().iter_mut().zip(sv.as_ref()) {
            *q = s.mul(*q, *sc);
        }
        s.store32(o, if C::permuted::<S>() { s.perm32(qv) } else { qv });
    }
    s.sum32(bias)
}

/// `sum qs[i] * code[i]` over one token's codes (`qs.len()` a multiple of 32, in the
/// order the codes unpack in).
#[inline(always)]
fn dot_codes<S: Simd, C: Codes>(s: S, qs: &[f32], codes: &[u8]) -> f32 {
    let mut acc = s.zero32();
    for (q32, c) in qs.as_chunks::<32>().0.iter().zip(C::chunks(codes)) {
        let (qv, x) = (s.load32(q32), C::unpack_perm(s, c));
        for ((a, q), x) in acc.as_mut().iter_mut().zip(qv.as_ref()).zip(x.as_ref()) {
            *a = s.fma(*q, *x, *a);
        }
    }
    s.sum32(acc)
}

/// Scores of `q` against every token of a KIVI block: `out[t] = q · k̂_t`.
#[inline(always)]
pub(crate) fn kivi_scores<S: Simd>(s: S, bits: KiviBits, q: &[f32], block: &[u8], out: &mut [f32]) {
    match bits {
        KiviBits::B4 => scores_one::<S, U4>(s, q, block, out),
        KiviBits::B2 => scores_one::<S, U2>(s, q, block, out),
    }
}

/// [`kivi_scores`] for `C`'s codes, in tiles of [`TILE`] channels.
#[inline(always)]
fn scores_one<S: Simd, C: Codes>(s: S, q: &[f32], block: &[u8], out: &mut [f32]) {
    let d = q.len();
    let nbits = 8 * core::mem::size_of::<C::Bytes32>() / 32;
    let (scales, rest) = block.split_at(2 * d);
    let (mins, codes) = rest.split_at(2 * d);
    let tcb = d / 8 * nbits;
    out.fill(0.0);
    let mut bias = 0.0f32;
    let mut qs = [0.0f32; TILE];
    for c0 in (0..d).step_by(TILE) {
        let n = (d - c0).min(TILE);
        bias += scale_query::<S, C>(
            s,
            &q[c0..c0 + n],
            &scales[2 * c0..2 * (c0 + n)],
            &mins[2 * c0..2 * (c0 + n)],
            &mut qs[..n],
        );
        let (lo, hi) = (c0 * nbits / 8, (c0 + n) * nbits / 8);
        for (t, o) in out.iter_mut().enumerate() {
            *o += dot_codes::<S, C>(s, &qs[..n], &codes[t * tcb + lo..t * tcb + hi]);
        }
    }
    for o in out.iter_mut() {
        *o += bias;
    }
}

/// Scores of `H` heads against `R` tokens starting at `t0`, each token's codes unpacked
/// once for all heads; the `R * H <= 8` sums reduced together.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kivi_tokens<S: Simd, C: Codes, const H: usize, const R: usize>(
    s: S,
    qs: &[&[[f32; 32]]; H],
    bias: &[f32; H],
    codes: &[u8],
    tcb: usize,
    t0: usize,
    out: &mut [f32],
    stride: usize,
) {
    debug_assert!(R * H <= 8);
    let mut acc = [s.zero(); 8];
    for r in 0..R {
        let tc = &codes[(t0 + r) * tcb..][..tcb];
        for (j, c) in C::chunks(tc).iter().enumerate() {
            let x = C::unpack_perm(s, c);
            for h in 0..H {
                let qv = s.load32(&qs[h][j]);
                let a = &mut acc[r * H + h];
                for (q, x) in qv.as_ref().iter().zip(x.as_ref()) {
                    *a = s.fma(*q, *x, *a);
                }
            }
        }
    }
    let lanes = s.reduce8(&acc);
    for r in 0..R {
        for h in 0..H {
            out[h * stride + t0 + r] = lanes[r * H + h] + bias[h];
        }
    }
}

/// Scores of `H` heads (`q` holds `H` rows of `d <= N`) against every token of a KIVI
/// block: the scaled queries and biases formed once (in a stack buffer of `N` channels per
/// head), then `R` tokens at a time. `out[h * stride + t]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kivi_heads<S: Simd, C: Codes, const H: usize, const R: usize, const N: usize>(
    s: S,
    d: usize,
    q: &[f32],
    block: &[u8],
    tokens: usize,
    out: &mut [f32],
    stride: usize,
    pf: &mut Prefetch<'_>,
) {
    debug_assert!(d <= N && q.len() == H * d);
    let (scales, rest) = block.split_at(2 * d);
    let (mins, codes) = rest.split_at(2 * d);
    let tcb = d / 32 * core::mem::size_of::<C::Bytes32>();
    let mut qs = [[0.0f32; N]; H];
    let mut bias = [0.0f32; H];
    for (h, (qs, b)) in qs.iter_mut().zip(&mut bias).enumerate() {
        *b = scale_query::<S, C>(s, &q[h * d..][..d], scales, mins, &mut qs[..d]);
    }
    let qs32: [&[[f32; 32]]; H] = core::array::from_fn(|h| qs[h][..d].as_chunks::<32>().0);
    let mut t0 = 0;
    if pf.is_done() {
        // Nothing to ask for (most blocks of a step): the loops without the requests,
        // which cost plain 2-bit blocks (a few instructions per 8 tokens) ~3% of a step.
        while t0 + R <= tokens {
            kivi_tokens::<S, C, H, R>(s, &qs32, &bias, codes, tcb, t0, out, stride);
            t0 += R;
        }
        while t0 < tokens {
            kivi_tokens::<S, C, H, 1>(s, &qs32, &bias, codes, tcb, t0, out, stride);
            t0 += 1;
        }
        return;
    }
    let (step_r, step_1) = (pf.share(R * tcb), pf.share(tcb));
    while t0 + R <= tokens {
        kivi_tokens::<S, C, H, R>(s, &qs32, &bias, codes, tcb, t0, out, stride);
        t0 += R;
        pf.bytes(step_r);
    }
    while t0 < tokens {
        kivi_tokens::<S, C, H, 1>(s, &qs32, &bias, codes, tcb, t0, out, stride);
        t0 += 1;
        pf.bytes(step_1);
    }
}

/// Scores of every query row of `q` (rows of `d`) against every token of a KIVI block:
/// `out[h * stride + t]`, heads in blocks of [`HEAD_BLOCK`]; one head at a time through
/// [`kivi_scores`] when `d` exceeds [`TILE`]. The first block of heads prefetches `ahead`,
/// spread over its tokens' codes (all of it at once for `d` over [`TILE`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn kivi_scores_heads<S: Simd>(
    s: S,
    bits: KiviBits,
    d: usize,
    q: &[f32],
    block: &[u8],
    tokens: usize,
    out: &mut [f32],
    stride: usize,
    ahead: &[u8],
) {
    let heads = q.len() / d;
    debug_assert!(heads == 0 || out.len() >= (heads - 1) * stride + tokens);
    let mut h0 = 0;
    while h0 < heads {
        let hb = (heads - h0).min(HEAD_BLOCK);
        let qb = &q[h0 * d..(h0 + hb) * d];
        let ob = &mut out[h0 * stride..];
        // The codes the first block of heads reads: `ahead` is asked for as they are.
        let first = if h0 == 0 { ahead } else { &[][..] };
        let mut pf = Prefetch::spread(first, block.len().saturating_sub(4 * d));
        let pf = &mut pf;
        if d > TILE {
            Prefetch::all(first);
            for h in 0..hb {
                let o = &mut ob[h * stride..][..tokens];
                kivi_scores(s, bits, &qb[h * d..][..d], block, o);
            }
        } else {
            macro_rules! heads {
                ($c:ty, $n:expr) => {
                    match hb {
                        4 => kivi_heads::<S, $c, 4, 2, $n>(s, d, qb, block, tokens, ob, stride, pf),
                        3 => kivi_heads::<S, $c, 3, 2, $n>(s, d, qb, block, tokens, ob, stride, pf),
                        2 => kivi_heads::<S, $c, 2, 4, $n>(s, d, qb, block, tokens, ob, stride, pf),
                        _ => kivi_heads::<S, $c, 1, 8, $n>(s, d, qb, block, tokens, ob, stride, pf),
                    }
                };
            }
            match (bits, d <= SMALL) {
                (KiviBits::B4, true) => heads!(U4, SMALL),
                (KiviBits::B4, false) => heads!(U4, TILE),
                (KiviBits::B2, true) => heads!(U2, SMALL),
                (KiviBits::B2, false) => heads!(U2, TILE),
            }
        }
        h0 += hb;
    }
}
