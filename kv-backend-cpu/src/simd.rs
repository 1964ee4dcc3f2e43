//! The attention kernels written once over the vector width, on kv-quant's SIMD layer
//! ([`kv_quant::simd`]): [`Isa::run`](kv_quant::simd::Isa::run) compiles each for every
//! level (8 f32 lanes at AVX2, 16 at AVX-512) and [`crate::kernels`] holds the portable
//! versions they are tested against.
//!
//! - Decode ([`ScoreRows`], [`AccumulateRows`]): stored rows (f32, f16 or bf16) are read in
//!   their format and widened in registers, each row once for a block of up to
//!   [`HEAD_BLOCK`] query heads; several rows' dot products are reduced together
//!   ([`Simd::reduce8`], [`Simd::reduce16`]). At 16 lanes, head dims 64 and 128 (most models)
//!   have a kernel compiled for them, with the query rows held in registers.
//! - Softmax ([`Max`], [`ExpSum`]): a polynomial `exp` over whole vectors.
//! - Prefill ([`QkTile`], [`PvTile`]): outer-product micro-kernels over f32 tiles, a block
//!   of lanes by two vectors of columns with the accumulators in registers, the ragged last
//!   columns in one masked vector ([`Simd::load_first`]).
//!
//! Register tiles are fixed-size arrays of vectors indexed by constants after unrolling
//! (const generics), so they stay in registers; their sizes follow the width (half as many
//! lanes per block at 8 lanes, where there are 16 registers instead of 32). Every access
//! goes through slices and fixed-size arrays: the callers in [`crate::kernels`] check the
//! one predicate per kernel, so the checks here never fail, and the slices are cut to their
//! exact lengths before the loops so that the compiler drops the checks inside them.
//!
//! No `unsafe` here: the level tokens of [`kv_quant::simd`] make the vector operations safe.
// The kernels index small arrays of registers by head, lane and row, as the math reads.
#![allow(clippy::needless_range_loop)]

use kv_quant::simd::{Kernel, Prefetch, Simd};

use crate::kernels::{
    exp_sum_scalar, max_scalar, pv_tile_scalar, qk_tile_scalar, scalar_accumulate_rows,
    scalar_score_rows, Elem,
};

/// Query heads whose accumulators one pass over a row keeps in registers.
pub(crate) const HEAD_BLOCK: usize = 4;

/// `kernel::<M>(args)` for the run-time lane count `m`: one of the listed counts, else 1
/// (the tile kernels' blocks of lanes).
macro_rules! by_lanes {
    ($m:expr, [$($n:literal)*], $kernel:ident::<$s:ty> $args:tt) => {
        match $m {
            $($n => $kernel::<$s, $n> $args,)*
            _ => $kernel::<$s, 1> $args,
        }
    };
}

/// Whether the width is 512 bits: register tiles twice as large fit its 32 registers.
#[inline(always)]
fn wide<S: Simd>() -> bool {
    S::LANES >= 16
}

// ---------------------------------------------------------------------------------------
// Decode: scores.

/// [`crate::kernels::score_rows`]'s arguments (checked by the caller with `rows_fit`).
pub(crate) struct ScoreRows<'a, E> {
    pub q: &'a [f32],
    pub d: usize,
    pub rows: &'a [E],
    pub scores: &'a mut [f32],
    pub stride: usize,
    pub ahead: &'a [E],
}

impl<E: Elem> Kernel for ScoreRows<'_, E> {
    type Output = ();

    fn scalar(self) {
        Prefetch::all(self.ahead);
        scalar_score_rows(self.q, self.d, self.rows, self.scores, self.stride)
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        let Self {
            q,
            d,
            rows,
            scores,
            stride,
            ahead,
        } = self;
        if d == 0 {
            return;
        }
        let n = rows.len() / d;
        let rows = &rows[..n * d];
        // Only the first head block prefetches; later ones read rows already cached.
        let mut pf = Prefetch::new(ahead);
        for (b, qb) in q.chunks(HEAD_BLOCK * d).enumerate() {
            let hb = qb.len() / d;
            if hb == 0 {
                break;
            }
            let Some(sb) = scores.get_mut(b * HEAD_BLOCK * stride..) else {
                return;
            };
            let pf = &mut pf;
            let done = wide::<S>()
                && match (hb, d) {
                    (4, 64) => score_fixed::<S, E, 4, 4, 64>(s, qb, rows, sb, stride, pf),
                    (3, 64) => score_fixed::<S, E, 3, 5, 64>(s, qb, rows, sb, stride, pf),
                    (2, 64) => score_fixed::<S, E, 2, 8, 64>(s, qb, rows, sb, stride, pf),
                    (1, 64) => score_fixed::<S, E, 1, 16, 64>(s, qb, rows, sb, stride, pf),
                    (4, 128) => score_fixed::<S, E, 4, 4, 128>(s, qb, rows, sb, stride, pf),
                    (3, 128) => score_fixed::<S, E, 3, 5, 128>(s, qb, rows, sb, stride, pf),
                    (2, 128) => score_fixed::<S, E, 2, 8, 128>(s, qb, rows, sb, stride, pf),
                    (1, 128) => score_fixed::<S, E, 1, 16, 128>(s, qb, rows, sb, stride, pf),
                    _ => false,
                };
            if !done {
                match hb {
                    4 => score_block::<S, E, 4, 2>(s, qb, d, rows, sb, stride, pf),
                    3 => score_block::<S, E, 3, 2>(s, qb, d, rows, sb, stride, pf),
                    2 => score_block::<S, E, 2, 4>(s, qb, d, rows, sb, stride, pf),
                    _ => score_block::<S, E, 1, 8>(s, qb, d, rows, sb, stride, pf),
                }
            }
            *pf = Prefetch::none();
        }
    }
}

/// The horizontal sums of an `R x H` tile of accumulators, lane `r * H + h` for `[r][h]`.
#[inline(always)]
fn tile_sums<S: Simd, const H: usize, const R: usize>(s: S, acc: &[[S::F32; H]; R]) -> [f32; 16] {
    const { assert!(R * H <= 16) };
    let mut out = [0.0f32; 16];
    if R * H <= 8 {
        let mut flat = [s.zero(); 8];
        for r in 0..R {
            for h in 0..H {
                flat[r * H + h] = acc[r][h];
            }
        }
        out[..8].copy_from_slice(&s.reduce8(&flat));
    } else {
        let mut flat = [s.zero(); 16];
        for r in 0..R {
            for h in 0..H {
                flat[r * H + h] = acc[r][h];
            }
        }
        out = s.reduce16(&flat);
    }
    out
}

/// Scores of `H` query rows (`q`: `H` rows of `d`) against the stored rows of `rows`
/// (whole rows of `d`), `R` rows at a time (`R * H <= 16`): each stored row is loaded once
/// for all `H` heads, each query vector once for all `R` rows, and the `R * H` dot products
/// are reduced together. Writes `scores[h * stride + r]`; the last `d % LANES` columns go
/// through a scalar tail.
#[inline(always)]
fn score_block<S: Simd, E: Elem, const H: usize, const R: usize>(
    s: S,
    q: &[f32],
    d: usize,
    rows: &[E],
    scores: &mut [f32],
    stride: usize,
    pf: &mut Prefetch<'_>,
) {
    let nv = d / S::LANES;
    let dv = nv * S::LANES;
    // Filled in loops, not `array::from_fn`, whose closure may stay out of line and hide
    // the slices' lengths from the loops below (which then keep their bounds checks).
    let mut qh: [&[f32]; H] = [&[]; H];
    let mut qv: [&[S::Lanes]; H] = [&[]; H];
    for h in 0..H {
        qh[h] = &q[h * d..][..d];
        qv[h] = &S::lanes(qh[h]).0[..nv];
    }
    let mut blocks = rows.chunks_exact(R * d);
    let mut r0 = 0;
    for block in &mut blocks {
        pf.bytes(R * d * size_of::<E>());
        let mut kv: [&[E::Vector<S>]; R] = [&[]; R];
        for r in 0..R {
            kv[r] = &E::vectors::<S>(&block[r * d..][..d])[..nv];
        }
        let mut acc = [[s.zero(); H]; R];
        for c in 0..nv {
            let mut qc = [s.zero(); H];
            for h in 0..H {
                qc[h] = s.load(&qv[h][c]);
            }
            for r in 0..R {
                let k = E::load(s, &kv[r][c]);
                for h in 0..H {
                    acc[r][h] = s.fma(qc[h], k, acc[r][h]);
                }
            }
        }
        let sums = tile_sums::<S, H, R>(s, &acc);
        for r in 0..R {
            let row = &block[r * d..][..d];
            for h in 0..H {
                let mut x = sums[r * H + h];
                for j in dv..d {
                    x += qh[h][j] * row[j].widen();
                }
                scores[h * stride + r0 + r] = x;
            }
        }
        r0 += R;
    }
    for row in blocks.remainder().chunks_exact(d) {
        pf.bytes(d * size_of::<E>());
        let kv = &E::vectors::<S>(row)[..nv];
        let mut acc = [[s.zero(); H]; 1];
        for c in 0..nv {
            let k = E::load(s, &kv[c]);
            for h in 0..H {
                acc[0][h] = s.fma(s.load(&qv[h][c]), k, acc[0][h]);
            }
        }
        let sums = tile_sums::<S, H, 1>(s, &acc);
        for h in 0..H {
            let mut x = sums[h];
            for j in dv..d {
                x += qh[h][j] * row[j].widen();
            }
            scores[h * stride + r0] = x;
        }
        r0 += 1;
    }
}

/// [`score_block`] for a head dim `D` fixed at compile time (a multiple of 16, at most
/// 128, run at 16 lanes): no tail, the chunk loop unrolled, the `H` query rows loaded once
/// per call, and `R` rows' `R * H <= 16` dot products reduced together, which for SmolLM2's
/// 3 heads of 64 takes about half the reduction instructions per row of 8 at a time. Rows
/// past the last multiple of `R` go through [`score_block`]. Returns `true` (it ran).
#[inline(always)]
fn score_fixed<S: Simd, E: Elem, const H: usize, const R: usize, const D: usize>(
    s: S,
    q: &[f32],
    rows: &[E],
    scores: &mut [f32],
    stride: usize,
    pf: &mut Prefetch<'_>,
) -> bool {
    const { assert!(D.is_multiple_of(16) && D <= 128 && R * H <= 16) };
    let nv = D / S::LANES;
    let mut qv = [[s.zero(); 16]; H];
    for h in 0..H {
        let (lanes, _) = S::lanes(&q[h * D..][..D]);
        for c in 0..nv {
            qv[h][c] = s.load(&lanes[c]);
        }
    }
    let mut blocks = rows.chunks_exact(R * D);
    let mut r0 = 0;
    for block in &mut blocks {
        pf.bytes(R * D * size_of::<E>());
        let mut acc = [[s.zero(); H]; R];
        for r in 0..R {
            let kv = E::vectors::<S>(&block[r * D..][..D]);
            for c in 0..nv {
                let k = E::load(s, &kv[c]);
                for h in 0..H {
                    acc[r][h] = s.fma(qv[h][c], k, acc[r][h]);
                }
            }
        }
        let sums = tile_sums::<S, H, R>(s, &acc);
        for r in 0..R {
            for h in 0..H {
                scores[h * stride + r0 + r] = sums[r * H + h];
            }
        }
        r0 += R;
    }
    let rest = blocks.remainder();
    if !rest.is_empty() {
        score_block::<S, E, H, 1>(s, q, D, rest, &mut scores[r0..], stride, pf);
    }
    true
}

// ---------------------------------------------------------------------------------------
// Decode: weighted sums.

/// [`crate::kernels::accumulate_rows`]'s arguments (checked by the caller with
/// `rows_fit`).
pub(crate) struct AccumulateRows<'a, E> {
    pub w: &'a [f32],
    pub stride: usize,
    pub d: usize,
    pub rows: &'a [E],
    pub acc: &'a mut [f32],
    pub ahead: &'a [E],
}

impl<E: Elem> Kernel for AccumulateRows<'_, E> {
    type Output = ();

    fn scalar(self) {
        Prefetch::all(self.ahead);
        scalar_accumulate_rows(self.w, self.stride, self.d, self.rows, self.acc)
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        let Self {
            w,
            stride,
            d,
            rows,
            acc,
            ahead,
        } = self;
        if d == 0 {
            return;
        }
        let n = rows.len() / d;
        let rows = &rows[..n * d];
        let mut pf = Prefetch::new(ahead);
        for (b, ab) in acc.chunks_mut(HEAD_BLOCK * d).enumerate() {
            let hb = ab.len() / d;
            if hb == 0 {
                break;
            }
            let Some(wb) = w.get(b * HEAD_BLOCK * stride..) else {
                return;
            };
            let pf = &mut pf;
            // `H * V` independent FMA chains, so a small head group still keeps both FMA
            // pipes busy; twice the vectors at 512 bits, with twice the registers.
            match (hb, wide::<S>()) {
                (4, false) => accumulate_block::<S, E, 4, 2>(s, wb, stride, d, rows, ab, pf),
                (3, false) => accumulate_block::<S, E, 3, 2>(s, wb, stride, d, rows, ab, pf),
                (2, false) => accumulate_block::<S, E, 2, 4>(s, wb, stride, d, rows, ab, pf),
                (_, false) => accumulate_block::<S, E, 1, 4>(s, wb, stride, d, rows, ab, pf),
                (4, true) => accumulate_block::<S, E, 4, 4>(s, wb, stride, d, rows, ab, pf),
                (3, true) => accumulate_block::<S, E, 3, 4>(s, wb, stride, d, rows, ab, pf),
                (2, true) => accumulate_block::<S, E, 2, 8>(s, wb, stride, d, rows, ab, pf),
                (_, true) => accumulate_block::<S, E, 1, 8>(s, wb, stride, d, rows, ab, pf),
            }
            *pf = Prefetch::none();
        }
    }
}

/// Weighted sum of the stored rows of `rows` (whole rows of `d`) into `H` accumulator rows
/// (`acc`: `H` rows of `d`) with weights `w[h * stride + r]`, `V` vectors of columns at a
/// time with the accumulators in registers across all rows; the last `d % LANES` columns
/// through a scalar tail. The first pass over the rows prefetches from `pf`.
#[inline(always)]
fn accumulate_block<S: Simd, E: Elem, const H: usize, const V: usize>(
    s: S,
    w: &[f32],
    stride: usize,
    d: usize,
    rows: &[E],
    acc: &mut [f32],
    pf: &mut Prefetch<'_>,
) {
    let n = rows.len() / d;
    let mut wh: [&[f32]; H] = [&[]; H];
    for h in 0..H {
        wh[h] = &w[h * stride..][..n];
    }
    let mut c = 0;
    while c + V * S::LANES <= d {
        accumulate_cols::<S, E, H, V>(s, &wh, d, rows, acc, c, pf, c == 0);
        c += V * S::LANES;
    }
    while c + S::LANES <= d {
        accumulate_cols::<S, E, H, 1>(s, &wh, d, rows, acc, c, pf, c == 0);
        c += S::LANES;
    }
    if c < d {
        for h in 0..H {
            let ah = &mut acc[h * d..][..d];
            for (r, row) in rows.chunks_exact(d).enumerate() {
                let wt = wh[h][r];
                for (a, x) in ah[c..].iter_mut().zip(&row[c..]) {
                    *a += wt * x.widen();
                }
            }
        }
    }
}

/// Columns `c..c + V * LANES` of [`accumulate_block`], prefetching a row of `pf` per row
/// read when `prefetch` is set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn accumulate_cols<S: Simd, E: Elem, const H: usize, const V: usize>(
    s: S,
    wh: &[&[f32]; H],
    d: usize,
    rows: &[E],
    acc: &mut [f32],
    c: usize,
    pf: &mut Prefetch<'_>,
    prefetch: bool,
) {
    let width = V * S::LANES;
    let mut a = [[s.zero(); V]; H];
    for h in 0..H {
        let (av, _) = S::lanes(&acc[h * d + c..][..width]);
        for v in 0..V {
            a[h][v] = s.load(&av[v]);
        }
    }
    let n = rows.len() / d;
    for (r, row) in (0..n).zip(rows.chunks_exact(d)) {
        if prefetch {
            pf.bytes(d * size_of::<E>());
        }
        let xv = E::vectors::<S>(&row[c..][..width]);
        let mut x = [s.zero(); V];
        for v in 0..V {
            x[v] = E::load(s, &xv[v]);
        }
        for h in 0..H {
            let wb = s.splat(wh[h][r]);
            for v in 0..V {
                a[h][v] = s.fma(wb, x[v], a[h][v]);
            }
        }
    }
    for h in 0..H {
        let (av, _) = S::lanes_mut(&mut acc[h * d + c..][..width]);
        for v in 0..V {
            s.store(&mut av[v], a[h][v]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Softmax.

/// [`crate::kernels::max`]: the largest element (`-inf` for none; NaN skipped).
pub(crate) struct Max<'a>(pub &'a [f32]);

impl Kernel for Max<'_> {
    type Output = f32;

    fn scalar(self) -> f32 {
        max_scalar(self.0)
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) -> f32 {
        let (vs, tail) = S::lanes(self.0);
        let mut m = f32::NEG_INFINITY;
        if !vs.is_empty() {
            let mut v = s.splat(f32::NEG_INFINITY);
            for x in vs {
                // max(x, v) keeps v where x is NaN, like f32::max.
                v = s.max(s.load(x), v);
            }
            m = s.max_lane(v);
        }
        tail.iter().fold(m, |m, &x| m.max(x))
    }
}

/// [`crate::kernels::exp_sum`]: `s[i] = exp(s[i] - m)`, returning the sum.
pub(crate) struct ExpSum<'a>(pub &'a mut [f32], pub f32);

impl Kernel for ExpSum<'_> {
    type Output = f32;

    fn scalar(self) -> f32 {
        exp_sum_scalar(self.0, self.1)
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) -> f32 {
        let mv = s.splat(self.1);
        let (vs, tail) = S::lanes_mut(self.0);
        let mut total = s.zero();
        for x in vs {
            let e = exp(s, s.sub(s.load(x), mv));
            s.store(x, e);
            total = s.add(total, e);
        }
        if !tail.is_empty() {
            // Padded with -inf, whose exp is 0.
            let mut buf = [f32::NEG_INFINITY; 16];
            buf[..tail.len()].copy_from_slice(tail);
            let (b, _) = S::lanes_mut(&mut buf);
            let e = exp(s, s.sub(s.load(&b[0]), mv));
            s.store(&mut b[0], e);
            total = s.add(total, e);
            tail.copy_from_slice(&buf[..tail.len()]);
        }
        s.sum(total)
    }
}

/// `exp` of every lane: Cody-Waite range reduction to `x = n ln2 + r`, |r| <= ln2 / 2, a
/// degree-7 polynomial for `e^r` and `2^n` built in the exponent bits. Relative error
/// within a few ulp for x in [-87.3, 88.7]; 0 below (where f32 underflows), NaN stays NaN.
#[inline(always)]
fn exp<S: Simd>(s: S, x: S::F32) -> S::F32 {
    const LOW: f32 = -87.336_54;
    const HIGH: f32 = 88.722_83;
    // max(LOW, x) and min(HIGH, x) return x when x is NaN.
    let xc = s.min(s.splat(HIGH), s.max(s.splat(LOW), x));
    let n = s.round(s.mul(xc, s.splat(std::f32::consts::LOG2_E)));
    // ln 2 split in a part exact in a few bits and the rest, so n * LN2_HI is exact.
    let r = s.fnma(n, s.splat(0.693_359_4), xc);
    let r = s.fnma(n, s.splat(-2.121_944_4e-4), r);
    let mut y = s.splat(1.987_569_1e-4);
    y = s.fma(y, r, s.splat(1.398_199_9e-3));
    y = s.fma(y, r, s.splat(8.333_452e-3));
    y = s.fma(y, r, s.splat(4.166_579_5e-2));
    y = s.fma(y, r, s.splat(0.166_666_65));
    y = s.fma(y, r, s.splat(0.5));
    y = s.fma(y, s.mul(r, r), s.add(r, s.splat(1.0)));
    s.zero_below(s.mul(y, s.pow2i(n)), x, LOW)
}

// ---------------------------------------------------------------------------------------
// Prefill tiles.

/// [`crate::kernels::qk_tile`]'s arguments (checked by the caller with `qk_fits`).
pub(crate) struct QkTile<'a> {
    pub q: &'a [f32],
    pub q_ld: usize,
    pub lanes: usize,
    pub d: usize,
    pub kt: &'a [f32],
    pub kt_ld: usize,
    pub cols: usize,
    pub s: &'a mut [f32],
    pub s_ld: usize,
}

impl Kernel for QkTile<'_> {
    type Output = ();

    fn scalar(self) {
        qk_tile_scalar(self)
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        let t = self;
        let most = if wide::<S>() { 8 } else { 4 };
        let mut l = 0;
        while l < t.lanes {
            let m = (t.lanes - l).min(most);
            let (q, out) = (&t.q[l * t.q_ld..], &mut t.s[l * t.s_ld..]);
            let (d, kt, kt_ld, cols, q_ld, s_ld) = (t.d, t.kt, t.kt_ld, t.cols, t.q_ld, t.s_ld);
            by_lanes!(m, [8 7 6 5 4 3 2], qk_block::<S>(s, q, q_ld, d, kt, kt_ld, cols, out, s_ld));
            l += m;
        }
    }
}

/// Scores of `M` query lanes (`q[i * q_ld..][..d]`) against `cols` keys stored transposed
/// (`kt[k * kt_ld + j]`): an outer-product micro-kernel, two vectors of keys by `M` lanes
/// per pass over `d`, then the last columns one (masked) vector at a time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn qk_block<S: Simd, const M: usize>(
    s: S,
    q: &[f32],
    q_ld: usize,
    d: usize,
    kt: &[f32],
    kt_ld: usize,
    cols: usize,
    out: &mut [f32],
    s_ld: usize,
) {
    let w = S::LANES;
    let mut qr: [&[f32]; M] = [&[]; M];
    for i in 0..M {
        qr[i] = &q[i * q_ld..][..d];
    }
    let mut j = 0;
    while j + 2 * w <= cols {
        let mut a0 = [s.zero(); M];
        let mut a1 = [s.zero(); M];
        for k in 0..d {
            let (b, _) = S::lanes(&kt[k * kt_ld + j..][..2 * w]);
            let (b0, b1) = (s.load(&b[0]), s.load(&b[1]));
            for i in 0..M {
                let a = s.splat(qr[i][k]);
                a0[i] = s.fma(a, b0, a0[i]);
                a1[i] = s.fma(a, b1, a1[i]);
            }
        }
        for i in 0..M {
            let (o, _) = S::lanes_mut(&mut out[i * s_ld + j..][..2 * w]);
            s.store(&mut o[0], a0[i]);
            s.store(&mut o[1], a1[i]);
        }
        j += 2 * w;
    }
    while j < cols {
        let width = (cols - j).min(w);
        let mut a0 = [s.zero(); M];
        for k in 0..d {
            let b0 = s.load_first(&kt[k * kt_ld + j..][..width]);
            for i in 0..M {
                a0[i] = s.fma(s.splat(qr[i][k]), b0, a0[i]);
            }
        }
        for i in 0..M {
            s.store_first(&mut out[i * s_ld + j..][..width], a0[i]);
        }
        j += width;
    }
}

/// [`crate::kernels::pv_tile`]'s arguments (checked by the caller with `pv_fits`).
pub(crate) struct PvTile<'a> {
    pub p: &'a [f32],
    pub p_ld: usize,
    pub lanes: usize,
    pub rows: usize,
    pub v: &'a [f32],
    pub v_ld: usize,
    pub cols: usize,
    pub acc: &'a mut [f32],
    pub acc_ld: usize,
}

impl Kernel for PvTile<'_> {
    type Output = ();

    fn scalar(self) {
        pv_tile_scalar(self)
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        let t = self;
        let most = if wide::<S>() { 8 } else { 4 };
        let mut l = 0;
        while l < t.lanes {
            let m = (t.lanes - l).min(most);
            let (p, acc) = (&t.p[l * t.p_ld..], &mut t.acc[l * t.acc_ld..]);
            let (rows, v, v_ld, cols, p_ld, acc_ld) =
                (t.rows, t.v, t.v_ld, t.cols, t.p_ld, t.acc_ld);
            by_lanes!(m, [8 7 6 5 4 3 2], pv_block::<S>(s, p, p_ld, rows, v, v_ld, cols, acc, acc_ld));
            l += m;
        }
    }
}

/// `M` accumulator lanes (`acc[i * acc_ld..][..cols]`) plus weights
/// (`p[i * p_ld..][..rows]`) times `rows` value rows (`v[r * v_ld..][..cols]`), two
/// vectors of columns at a time with the accumulators in registers across all rows, then
/// the last columns one (masked) vector at a time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pv_block<S: Simd, const M: usize>(
    s: S,
    p: &[f32],
    p_ld: usize,
    rows: usize,
    v: &[f32],
    v_ld: usize,
    cols: usize,
    acc: &mut [f32],
    acc_ld: usize,
) {
    let w = S::LANES;
    let mut pr: [&[f32]; M] = [&[]; M];
    for i in 0..M {
        pr[i] = &p[i * p_ld..][..rows];
    }
    let mut c = 0;
    while c + 2 * w <= cols {
        let mut a0 = [s.zero(); M];
        let mut a1 = [s.zero(); M];
        for i in 0..M {
            let (a, _) = S::lanes(&acc[i * acc_ld + c..][..2 * w]);
            a0[i] = s.load(&a[0]);
            a1[i] = s.load(&a[1]);
        }
        for r in 0..rows {
            let (b, _) = S::lanes(&v[r * v_ld + c..][..2 * w]);
            let (b0, b1) = (s.load(&b[0]), s.load(&b[1]));
            for i in 0..M {
                let a = s.splat(pr[i][r]);
                a0[i] = s.fma(a, b0, a0[i]);
                a1[i] = s.fma(a, b1, a1[i]);
            }
        }
        for i in 0..M {
            let (o, _) = S::lanes_mut(&mut acc[i * acc_ld + c..][..2 * w]);
            s.store(&mut o[0], a0[i]);
            s.store(&mut o[1], a1[i]);
        }
        c += 2 * w;
    }
    while c < cols {
        let width = (cols - c).min(w);
        let mut a0 = [s.zero(); M];
        for i in 0..M {
            a0[i] = s.load_first(&acc[i * acc_ld + c..][..width]);
        }
        for r in 0..rows {
            let b0 = s.load_first(&v[r * v_ld + c..][..width]);
            for i in 0..M {
                a0[i] = s.fma(s.splat(pr[i][r]), b0, a0[i]);
            }
        }
        for i in 0..M {
            s.store_first(&mut acc[i * acc_ld + c..][..width], a0[i]);
        }
        c += width;
    }
}
