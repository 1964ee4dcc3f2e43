//! The kernel for a batch of activation rows (a decode step of many sequences): each
//! weight block is read and dequantized once per call, for every row of the batch.
//!
//! A task dequantizes a strip of [`STRIP`] weight rows into an f32 buffer that stays in L1
//! (the block types' own `dequantize_row`, so every weight is candle's, bit for bit), then
//! multiplies the strip with every activation row in register tiles of [`STRIP`] weight
//! rows by a few activation rows: each weight vector loaded serves several activation rows
//! and each activation vector several weight rows. Written once over kv-quant's [`Simd`]
//! width and run through `Isa::run`; [`Kernel::scalar`] is the portable reference.
//!
//! Every output element has its own accumulator and sees the same operations in the same
//! order (one vector of partial sums over the columns, then the level's lane sum), whatever
//! tile, strip or task it falls in: a row's result does not depend on the other rows of its
//! batch, nor on how many there are. Tiles at the edges are filled with copies of a real
//! row, whose results are dropped.

use kv_quant::simd::{Kernel, Simd};

/// Weight rows per strip, and per register tile.
pub(super) const STRIP: usize = 4;

/// `out[j * n + i] = dot(w row j, x row i)` for the `w.len() / cols` (at most [`STRIP`])
/// weight rows of `w` and the `n` activation rows of `x`, all f32 rows of `cols`.
pub(super) struct StripDot<'a> {
    /// The strip's weight rows, dequantized.
    pub(super) w: &'a [f32],
    /// `n` activation rows.
    pub(super) x: &'a [f32],
    /// Weights per row (a multiple of 32).
    pub(super) cols: usize,
    /// Activation rows.
    pub(super) n: usize,
    /// `[w rows, n]`.
    pub(super) out: &'a mut [f32],
}

impl Kernel for StripDot<'_> {
    type Output = ();

    fn scalar(self) {
        let (cols, n) = (self.cols, self.n);
        for (w, out) in self.w.chunks_exact(cols).zip(self.out.chunks_exact_mut(n)) {
            for (x, o) in self.x.chunks_exact(cols).zip(out.iter_mut()) {
                *o = w.iter().zip(x).map(|(a, b)| a * b).sum();
            }
        }
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        // Register tiles: 16 accumulators of 16 lanes at 512 bits (32 registers), 8 of 8
        // lanes at 256 bits (16 registers), leaving room for the loaded vectors.
        if S::LANES >= 16 {
            strip::<S, 4>(s, self);
        } else {
            strip::<S, 2>(s, self);
        }
    }
}

/// [`StripDot`] in tiles of [`STRIP`] weight rows by `XR` activation rows.
#[inline(always)]
fn strip<S: Simd, const XR: usize>(s: S, k: StripDot<'_>) {
    let (cols, n) = (k.cols, k.n);
    if cols == 0 || n == 0 {
        return;
    }
    let rows = (k.w.len() / cols).min(STRIP);
    if rows == 0 {
        return;
    }
    debug_assert!(cols.is_multiple_of(S::LANES), "rows of whole vectors");
    // Missing weight rows of a short strip repeat the last; their results are dropped.
    let w: [&[S::Lanes]; STRIP] =
        core::array::from_fn(|j| S::lanes(&k.w[j.min(rows - 1) * cols..][..cols]).0);
    let xrow = |i: usize| S::lanes(&k.x[i * cols..][..cols]).0;
    for i0 in (0..n).step_by(XR) {
        let x: [&[S::Lanes]; XR] = core::array::from_fn(|i| xrow((i0 + i).min(n - 1)));
        let sums = tile::<S, XR>(s, w, x);
        for (j, row) in sums.iter().enumerate().take(rows) {
            for (i, &v) in row.iter().enumerate().take(n - i0) {
                k.out[j * n + i0 + i] = v;
            }
        }
    }
}

/// The `STRIP x XR` dot products of the rows of `w` with the rows of `x` (all of one
/// length): one accumulator each, the columns in order, then the lanes' sum.
#[inline(always)]
fn tile<S: Simd, const XR: usize>(
    s: S,
    w: [&[S::Lanes]; STRIP],
    x: [&[S::Lanes]; XR],
) -> [[f32; XR]; STRIP] {
    let len = w[0].len();
    // Every row cut to one length, so the loop below needs no bounds checks.
    let w = w.map(|r| &r[..len]);
    let x = x.map(|r| &r[..len]);
    let mut acc = [[s.zero(); XR]; STRIP];
    for c in 0..len {
        let xv: [S::F32; XR] = core::array::from_fn(|i| s.load(&x[i][c]));
        for (a, wr) in acc.iter_mut().zip(&w) {
            let wv = s.load(&wr[c]);
            for (a, &xv) in a.iter_mut().zip(&xv) {
                *a = s.fma(wv, xv, *a);
            }
        }
    }
    acc.map(|row| row.map(|v| s.sum(v)))
}
