//! The matrix-vector and dequantization kernels of every GGUF block type kv keeps in blocks,
//! written once over kv-quant's width-generic [`Simd`] layer and run through `Isa::run`
//! (one dispatch per task of weight rows, not per row). A block type says only how its
//! block becomes 32-weight chunks ([`Format`]); the loops over rows, blocks and
//! activation rows are here, once.
//!
//! Weights are dequantized in registers exactly as candle's `dequantize` gives them (see
//! each format); activations stay f32. [`Kernel::scalar`] is the portable reference every
//! level is tested against.
//!
//! Why this is as fast as the per-width kernels it replaced: every operation is
//! `#[inline(always)]` down to the intrinsics, so the whole loop nest is one function
//! compiled for the level (no call per block, no vector passed through memory); blocks and
//! activation chunks are walked by iterators over fixed-size arrays (no bounds checks in the
//! loops); the horizontal sum is paid once per output, not per block.

use core::marker::PhantomData;

use kv_quant::simd::{Kernel, Simd};

/// Weights per chunk: the unit every format decodes into.
pub(super) const CHUNK: usize = 32;

/// One chunk of decoded weights: `w`, or `w * scale` when a scale is given (Q8_0 keeps its
/// integers unscaled and applies the block's scale once to the chunk's partial sum).
pub(super) struct Chunk<S: Simd> {
    pub(super) w: S::X32,
    pub(super) scale: Option<S::F32>,
}

impl<S: Simd> Chunk<S> {
    /// Weights already scaled.
    #[inline(always)]
    pub(super) fn weights(w: S::X32) -> Self {
        Self { w, scale: None }
    }
}

/// Bytes `at..at + N` of a block (zeros if `b` is short; callers pass whole blocks, whose
/// length the compiler knows, so the check folds away).
#[inline(always)]
pub(super) fn bytes<const N: usize>(b: &[u8], at: usize) -> &[u8; N] {
    b.get(at..)
        .and_then(<[u8]>::first_chunk::<N>)
        .unwrap_or(&[0; N])
}

/// The f16 at `b[at..at + 2]` (little-endian), as f32.
#[inline(always)]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes(*bytes::<2>(b, at))).to_f32()
}

/// One GGUF block type.
pub(super) trait Format {
    /// Bytes per block.
    const BYTES: usize;
    /// 32-weight chunks per block.
    const CHUNKS: usize;
    /// The block's `32 * CHUNKS` weights into `out`, portable: candle's values, bit for bit.
    fn block_scalar(b: &[u8], out: &mut [f32]);
    /// The block's chunks, in order, to `sink`, at the width of `s`.
    fn block_simd<S: Simd>(s: S, b: &[u8], sink: &mut impl Sink<S>);
}

/// Where a block's decoded chunks go: a trait with an `#[inline(always)]` method rather
/// than a closure, because a closure is a function of its own, neither always inlined nor
/// compiled with the level's features, and a kernel whose inner loop calls one pays a call
/// per chunk with every vector passed through memory (measured: 20x slower).
pub(super) trait Sink<S: Simd> {
    /// Chunk `c` of the block.
    fn chunk(&mut self, c: usize, ch: Chunk<S>);
}

/// Stores each chunk's weights (a scaled chunk's weights times its scale: rounded once,
/// as candle's product).
struct Store<'a, S> {
    s: S,
    out: &'a mut [[f32; CHUNK]],
}

impl<S: Simd> Sink<S> for Store<'_, S> {
    #[inline(always)]
    fn chunk(&mut self, c: usize, ch: Chunk<S>) {
        let s = self.s;
        let w = match ch.scale {
            Some(d) => scaled(s, ch.w, d),
            None => ch.w,
        };
        if let Some(o) = self.out.get_mut(c) {
            s.store32(o, w);
        }
    }
}

/// Each chunk's FMAs with one activation row's chunks of the block.
struct Dot1<'a, S: Simd> {
    s: S,
    x: &'a [[f32; CHUNK]],
    acc: &'a mut S::X32,
}

impl<S: Simd> Sink<S> for Dot1<'_, S> {
    #[inline(always)]
    fn chunk(&mut self, c: usize, ch: Chunk<S>) {
        if let Some(x) = self.x.get(c) {
            fma_chunk(self.s, &ch, x, self.acc);
        }
    }
}

/// Each chunk's FMAs with two activation rows' chunks of the block.
struct Dot2<'a, S: Simd> {
    s: S,
    x: (&'a [[f32; CHUNK]], &'a [[f32; CHUNK]]),
    acc: (&'a mut S::X32, &'a mut S::X32),
}

impl<S: Simd> Sink<S> for Dot2<'_, S> {
    #[inline(always)]
    fn chunk(&mut self, c: usize, ch: Chunk<S>) {
        if let (Some(x0), Some(x1)) = (self.x.0.get(c), self.x.1.get(c)) {
            fma_chunk(self.s, &ch, x0, self.acc.0);
            fma_chunk(self.s, &ch, x1, self.acc.1);
        }
    }
}

/// `out[j * n + i] = dot(weight row j of rows, x row i)` for whole weight rows of `F`
/// blocks (`row_bytes` each, `BYTES == F::BYTES`) and `n` activation rows of `cols`.
pub(super) struct DotMatrix<'a, F, const BYTES: usize> {
    pub(super) rows: &'a [u8],
    pub(super) row_bytes: usize,
    pub(super) x: &'a [f32],
    pub(super) cols: usize,
    pub(super) n: usize,
    pub(super) out: &'a mut [f32],
    pub(super) format: PhantomData<F>,
}

/// Weight row `row` (whole blocks of `F`) as f32 into `out`.
pub(super) struct Dequantize<'a, F, const BYTES: usize> {
    pub(super) row: &'a [u8],
    pub(super) out: &'a mut [f32],
    pub(super) format: PhantomData<F>,
}

impl<F: Format, const BYTES: usize> Kernel for Dequantize<'_, F, BYTES> {
    type Output = ();

    fn scalar(self) {
        for (b, o) in self
            .row
            .chunks_exact(F::BYTES)
            .zip(self.out.chunks_exact_mut(CHUNK * F::CHUNKS))
        {
            F::block_scalar(b, o);
        }
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        debug_assert_eq!(BYTES, F::BYTES);
        let blocks = self.row.as_chunks::<BYTES>().0;
        let out = self.out.as_chunks_mut::<CHUNK>().0;
        for (b, out) in blocks.iter().zip(out.chunks_exact_mut(F::CHUNKS)) {
            F::block_simd(s, b, &mut Store { s, out });
        }
    }
}

/// `w * d`, per vector.
#[inline(always)]
fn scaled<S: Simd>(s: S, mut w: S::X32, d: S::F32) -> S::X32 {
    for v in w.as_mut() {
        *v = s.mul(*v, d);
    }
    w
}

impl<F: Format, const BYTES: usize> Kernel for DotMatrix<'_, F, BYTES> {
    type Output = ();

    fn scalar(self) {
        let (cols, n) = (self.cols, self.n);
        let mut w = vec![0f32; CHUNK * F::CHUNKS];
        for (row, out) in self
            .rows
            .chunks_exact(self.row_bytes)
            .zip(self.out.chunks_exact_mut(n))
        {
            out.fill(0.0);
            for (bi, b) in row.chunks_exact(F::BYTES).enumerate() {
                F::block_scalar(b, &mut w);
                for (c, w) in w.chunks_exact(CHUNK).enumerate() {
                    let at = (bi * F::CHUNKS + c) * CHUNK;
                    for (i, o) in out.iter_mut().enumerate() {
                        let xs = &self.x[i * cols + at..][..CHUNK];
                        *o += w.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        debug_assert_eq!(BYTES, F::BYTES);
        debug_assert!(self.x.len() >= self.n * self.cols, "x holds n rows");
        let (cols, n) = (self.cols, self.n);
        let xrow = |i: usize| self.x[i * cols..][..cols].as_chunks::<CHUNK>().0;
        for (row, out) in self
            .rows
            .chunks_exact(self.row_bytes)
            .zip(self.out.chunks_exact_mut(n))
        {
            let blocks = row.as_chunks::<BYTES>().0;
            let mut pairs = out.chunks_exact_mut(2);
            let mut i = 0;
            for o in &mut pairs {
                let (a, b) = dot2::<S, F, BYTES>(s, blocks, xrow(i), xrow(i + 1));
                o[0] = a;
                o[1] = b;
                i += 2;
            }
            if let [o] = pairs.into_remainder() {
                *o = dot1::<S, F, BYTES>(s, blocks, xrow(i));
            }
        }
    }
}

/// Whether blocks alternate between two accumulator sets: at 512 bits a chunk is 2 vectors,
/// so two sets keep 4 FMA chains in flight; at 256 bits one set already has 4 (and two
/// would not fit 16 registers for two activation rows).
#[inline(always)]
const fn two_sets<S: Simd>() -> bool {
    S::LANES >= 16
}

/// One chunk's FMAs into `acc` (a scaled chunk: its sum times the scale, into the first
/// vector).
#[inline(always)]
fn fma_chunk<S: Simd>(s: S, ch: &Chunk<S>, x: &[f32; CHUNK], acc: &mut S::X32) {
    let xv = s.load32(x);
    let (w, xv) = (ch.w.as_ref(), xv.as_ref());
    match ch.scale {
        Some(d) => {
            let mut t = s.zero();
            for (w, x) in w.iter().zip(xv) {
                t = s.fma(*w, *x, t);
            }
            if let Some(a) = acc.as_mut().first_mut() {
                *a = s.fma(t, d, *a);
            }
        }
        None => {
            for ((a, w), x) in acc.as_mut().iter_mut().zip(w).zip(xv) {
                *a = s.fma(*w, *x, *a);
            }
        }
    }
}

/// The chunks of one block into `acc`, with the block's activations `x`.
#[inline(always)]
fn fma_block<S: Simd, F: Format>(s: S, b: &[u8], x: &[[f32; CHUNK]], acc: &mut S::X32) {
    F::block_simd(s, b, &mut Dot1 { s, x, acc });
}

/// The chunks of one block into `acc0` and `acc1`, with two activation rows' `x0`, `x1`.
#[inline(always)]
fn fma_block2<S: Simd, F: Format>(
    s: S,
    b: &[u8],
    x: (&[[f32; CHUNK]], &[[f32; CHUNK]]),
    acc0: &mut S::X32,
    acc1: &mut S::X32,
) {
    F::block_simd(
        s,
        b,
        &mut Dot2 {
            s,
            x,
            acc: (acc0, acc1),
        },
    );
}

/// The sum of a row's accumulator sets in a fixed order, then of the lanes: the same for
/// every row count, so a row's result does not depend on which rows it was computed with.
#[inline(always)]
fn reduce<S: Simd>(s: S, even: S::X32, odd: S::X32) -> f32 {
    if !two_sets::<S>() {
        return s.sum32(even);
    }
    let mut v = even;
    for (a, b) in v.as_mut().iter_mut().zip(odd.as_ref()) {
        *a = s.add(*a, *b);
    }
    s.sum32(v)
}

/// `dot(row, x)` for one activation row: even blocks into one accumulator set, odd blocks
/// into the other (at 512 bits), so that enough FMA chains are in flight.
#[inline(always)]
fn dot1<S: Simd, F: Format, const BYTES: usize>(
    s: S,
    blocks: &[[u8; BYTES]],
    x: &[[f32; CHUNK]],
) -> f32 {
    let (mut even, mut odd) = (s.zero32(), s.zero32());
    let (pairs, rest) = blocks.as_chunks::<2>();
    let xs = x.chunks_exact(2 * F::CHUNKS);
    let last = xs.remainder();
    for (b, x) in pairs.iter().zip(xs) {
        let (x0, x1) = x.split_at(F::CHUNKS);
        fma_block::<S, F>(s, &b[0], x0, &mut even);
        let acc = if two_sets::<S>() { &mut odd } else { &mut even };
        fma_block::<S, F>(s, &b[1], x1, acc);
    }
    if let [b] = rest {
        fma_block::<S, F>(s, b, last, &mut even);
    }
    reduce(s, even, odd)
}

/// `dot(row, x0)` and `dot(row, x1)`, each block decoded once for both; each row's sums in
/// the order [`dot1`] uses.
#[inline(always)]
fn dot2<S: Simd, F: Format, const BYTES: usize>(
    s: S,
    blocks: &[[u8; BYTES]],
    x0: &[[f32; CHUNK]],
    x1: &[[f32; CHUNK]],
) -> (f32, f32) {
    let (mut even0, mut odd0) = (s.zero32(), s.zero32());
    let (mut even1, mut odd1) = (s.zero32(), s.zero32());
    let (pairs, rest) = blocks.as_chunks::<2>();
    let (xs0, xs1) = (
        x0.chunks_exact(2 * F::CHUNKS),
        x1.chunks_exact(2 * F::CHUNKS),
    );
    let (last0, last1) = (xs0.remainder(), xs1.remainder());
    for ((b, x0), x1) in pairs.iter().zip(xs0).zip(xs1) {
        let ((x00, x01), (x10, x11)) = (x0.split_at(F::CHUNKS), x1.split_at(F::CHUNKS));
        fma_block2::<S, F>(s, &b[0], (x00, x10), &mut even0, &mut even1);
        let (a0, a1) = if two_sets::<S>() {
            (&mut odd0, &mut odd1)
        } else {
            (&mut even0, &mut even1)
        };
        fma_block2::<S, F>(s, &b[1], (x01, x11), a0, a1);
    }
    if let [b] = rest {
        fma_block2::<S, F>(s, b, (last0, last1), &mut even0, &mut even1);
    }
    (reduce(s, even0, odd0), reduce(s, even1, odd1))
}
