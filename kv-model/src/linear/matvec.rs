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
    /// Whether dot products read the block's codes straight from 32-bit words
    /// ([`Format::dot_words`], with [`Simd::field_f32`]'s shift, mask and conversion per
    /// vector of codes) against activations reordered once per call into the order those
    /// words give ([`Format::word_order`]), instead of [`Format::block_simd`]'s chunks:
    /// no widening load, lookup or scale broadcast per chunk (issue 15's K-quants, whose
    /// chunk-by-chunk decoding was bound by those shuffles). 256-weight blocks only.
    const WORDS: bool = false;
    /// Which [`Format::word_order`] a [`Format::WORDS`] format has (0: none): formats with
    /// the same nonzero id share one reordering of the activations per call.
    const WORD_ORDER: u8 = 0;
    /// Weights per activation sum ([`chunk_sums`]), when [`Format::WORDS`]: a chunk's 32,
    /// or 16 where a block's scales change every 16.
    const SUM_WEIGHTS: usize = CHUNK;
    /// The weight of the block (`< 256`) whose activation [`Format::dot_words`] expects at
    /// place `k` of the block's reordered activations, at `lanes` f32 lanes per vector
    /// (vector `k / lanes`, lane `k % lanes`). A [`Format::WORDS`] format's order.
    fn word_order(_lanes: usize, k: usize) -> usize {
        k
    }
    /// `acc[r] += block · x[r]` for `N` activation rows, `x[r]` the block's 256
    /// activations in [`Format::word_order`] and `sums[r]` their sums per
    /// [`Format::SUM_WEIGHTS`] (in natural order), into the accumulator slots of
    /// [`slot`]. Called only for a [`Format::WORDS`] format, which must define it; the
    /// default adds nothing.
    #[inline(always)]
    fn dot_words<S: Simd, const N: usize>(
        _s: S,
        _b: &[u8],
        _x: [&[XChunk; 8]; N],
        _sums: [&[f32; SUMS]; N],
        _acc: &mut [[S::X32; 2]; N],
    ) {
        debug_assert!(!Self::WORDS, "a WORDS format defines dot_words");
    }
}

/// 32 activations on a 64-byte boundary: a block's activations reordered for
/// [`Format::dot_words`] (every 512-bit load of them within one cache line).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct XChunk(pub(super) [f32; CHUNK]);

/// Vector `v` (of `CHUNK * 8 / LANES`) of a block's reordered activations.
#[inline(always)]
pub(super) fn xvec<S: Simd>(s: S, x: &[XChunk; 8], v: usize) -> S::F32 {
    let per = CHUNK / S::LANES;
    let (lanes, _) = S::lanes(&x[(v / per) % 8].0);
    match lanes.get(v % per) {
        Some(l) => s.load(l),
        None => s.zero(),
    }
}

/// Accumulator slot `k` of a row's sets: the sets' vectors in turn (only the first set
/// at 256 bits, where [`reduce`] reads one). [`Format::dot_words`] gives each of its
/// independent partial sums of a block a fixed slot, the same for any number of rows.
#[inline(always)]
pub(super) fn slot<S: Simd>(acc: &mut [S::X32; 2], k: usize) -> &mut S::F32 {
    let per = CHUNK / S::LANES;
    let sets = if two_sets::<S>() { 2 } else { 1 };
    let k = k % (per * sets);
    let set = &mut acc[(k / per) % 2];
    let v = set.as_mut();
    let n = v.len();
    &mut v[(k % per) % n]
}

/// `acc += Σ_k mins[k] * sums[k]`, vector by vector (a block's folded minimums or
/// offsets against its activation sums), into slot 0.
#[inline(always)]
pub(super) fn fma_sums<S: Simd>(s: S, mins: &[S::F32], sums: &[f32; SUMS], acc: &mut [S::X32; 2]) {
    let (v, _) = S::lanes(sums);
    for (m, x) in mins.iter().zip(v) {
        let a = slot::<S>(acc, 0);
        *a = s.fma(*m, s.load(x), *a);
    }
}

/// Floats of activation sums per block when [`Format::WORDS`]: one per sum (at most 16),
/// zeros after, as wide as one 512-bit vector so every width loads it whole.
pub(super) const SUMS: usize = 16;

/// Where a block's decoded chunks go: a trait with an `#[inline(always)]` method rather
/// than a closure, because a closure is a function of its own, neither always inlined nor
/// compiled with the level's features, and a kernel whose inner loop calls one pays a call
/// per chunk with every vector passed through memory (measured: 20x slower).
pub(super) trait Sink<S: Simd> {
    /// Chunk `c` of the block.
    fn chunk(&mut self, c: usize, ch: Chunk<S>);
    /// Whether the sink only sums the weights' products with activations, so that a zero
    /// weight's sign cannot matter (a dot product; storing weights keeps candle's bits).
    #[inline(always)]
    fn sums_products(&self) -> bool {
        false
    }
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

/// Each chunk's FMAs with one activation row's chunks of the block, into one of two
/// accumulator sets: chunk `c` into set `(first + c) % 2` ([`set_of`]).
struct Dot1<'a, S: Simd> {
    s: S,
    x: &'a [[f32; CHUNK]],
    sets: &'a mut [S::X32; 2],
    /// The set of the block's chunk 0 (a constant once inlined).
    first: usize,
}

/// The accumulator set of chunk `c` of a block whose chunk 0 goes to set `first`: the
/// sets alternate chunk by chunk (and block by block), so that a block of 8 chunks feeds
/// 4 independent FMA chains at 512 bits rather than 2 (measured: the K-quant kernels
/// waited on the FMA latency of one set). One set at 256 bits (see [`two_sets`]).
#[inline(always)]
const fn set_of<S: Simd>(first: usize, c: usize) -> usize {
    if two_sets::<S>() {
        (first + c) % 2
    } else {
        0
    }
}

impl<S: Simd> Sink<S> for Dot1<'_, S> {
    #[inline(always)]
    fn chunk(&mut self, c: usize, ch: Chunk<S>) {
        if let Some(x) = self.x.get(c) {
            fma_chunk(self.s, &ch, x, &mut self.sets[set_of::<S>(self.first, c)]);
        }
    }
    #[inline(always)]
    fn sums_products(&self) -> bool {
        true
    }
}

/// Each chunk's FMAs with two activation rows' chunks of the block (sets as [`Dot1`]'s,
/// per row).
struct Dot2<'a, S: Simd> {
    s: S,
    x: (&'a [[f32; CHUNK]], &'a [[f32; CHUNK]]),
    sets: (&'a mut [S::X32; 2], &'a mut [S::X32; 2]),
    /// The set of the block's chunk 0.
    first: usize,
}

impl<S: Simd> Sink<S> for Dot2<'_, S> {
    #[inline(always)]
    fn chunk(&mut self, c: usize, ch: Chunk<S>) {
        if let (Some(x0), Some(x1)) = (self.x.0.get(c), self.x.1.get(c)) {
            let set = set_of::<S>(self.first, c);
            fma_chunk(self.s, &ch, x0, &mut self.sets.0[set]);
            fma_chunk(self.s, &ch, x1, &mut self.sets.1[set]);
        }
    }
    #[inline(always)]
    fn sums_products(&self) -> bool {
        true
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
    /// The `n` rows of `x` reordered for a [`Format::WORDS`] format ([`Reorder`]), when
    /// the caller made them once for several calls; made here otherwise.
    pub(super) xr: Option<&'a [[XChunk; 8]]>,
    pub(super) format: PhantomData<F>,
}

/// The `n` activation rows (`cols` each) of `x` in [`Format::word_order`] at the level's
/// width, for [`DotMatrix::xr`]: empty for a format without one, or at the scalar level.
pub(super) struct Reorder<'a, F> {
    pub(super) x: &'a [f32],
    pub(super) cols: usize,
    pub(super) n: usize,
    pub(super) format: PhantomData<F>,
}

impl<F: Format> Kernel for Reorder<'_, F> {
    type Output = Vec<[XChunk; 8]>;

    fn scalar(self) -> Self::Output {
        Vec::new()
    }

    #[inline(always)]
    fn simd<S: Simd>(self, _s: S) -> Self::Output {
        if F::WORDS && F::CHUNKS == 8 {
            reorder::<S, F>(self.x, self.cols, self.n)
        } else {
            Vec::new()
        }
    }
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
        // Each activation row's sums, `blocks` per row, for a words format's minimums or
        // offsets (computed once here for every weight row of the call).
        let blocks = cols / (CHUNK * F::CHUNKS);
        let sums = if F::WORDS {
            chunk_sums::<S, F>(s, self.x, cols, n)
        } else {
            Vec::new()
        };
        let srow = |i: usize| {
            sums.get(i * blocks..)
                .map_or(&[][..], |r| &r[..blocks.min(r.len())])
        };
        if F::WORDS && F::CHUNKS == 8 {
            let own;
            let xr = match self.xr {
                Some(xr) if xr.len() >= blocks * n => xr,
                _ => {
                    own = reorder::<S, F>(self.x, cols, n);
                    &own[..]
                }
            };
            let xrow = |i: usize| {
                xr.get(i * blocks..)
                    .map_or(&[][..], |r| &r[..blocks.min(r.len())])
            };
            for (row, out) in self
                .rows
                .chunks_exact(self.row_bytes)
                .zip(self.out.chunks_exact_mut(n))
            {
                let blocks = row.as_chunks::<BYTES>().0;
                let mut pairs = out.chunks_exact_mut(2);
                let mut i = 0;
                for o in &mut pairs {
                    let [a, b] = dot_words::<S, F, BYTES, 2>(
                        s,
                        blocks,
                        [xrow(i), xrow(i + 1)],
                        [srow(i), srow(i + 1)],
                    );
                    o[0] = a;
                    o[1] = b;
                    i += 2;
                }
                if let [o] = pairs.into_remainder() {
                    [*o] = dot_words::<S, F, BYTES, 1>(s, blocks, [xrow(i)], [srow(i)]);
                }
            }
            return;
        }
        for (row, out) in self
            .rows
            .chunks_exact(self.row_bytes)
            .zip(self.out.chunks_exact_mut(n))
        {
            let blocks = row.as_chunks::<BYTES>().0;
            let mut pairs = out.chunks_exact_mut(2);
            let mut i = 0;
            for o in &mut pairs {
                let (a, b) = dot2::<S, F, BYTES>(s, blocks, (xrow(i), xrow(i + 1)));
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

/// Each of the `n` activation rows' chunk sums, per block of `F` ([`SUMS`] floats: the
/// block's sums, then zeros), for [`Format::WORDS`] formats.
#[inline(always)]
fn chunk_sums<S: Simd, F: Format>(s: S, x: &[f32], cols: usize, n: usize) -> Vec<[f32; SUMS]> {
    let blocks = cols / (CHUNK * F::CHUNKS);
    let mut sums = vec![[0f32; SUMS]; blocks * n];
    for (sums, x) in sums
        .chunks_exact_mut(blocks.max(1))
        .zip(x.chunks_exact(cols.max(1)))
    {
        let chunks = x.as_chunks::<CHUNK>().0;
        for (sum, x) in sums.iter_mut().zip(chunks.chunks_exact(F::CHUNKS)) {
            if F::SUM_WEIGHTS == CHUNK {
                for (o, x) in sum.iter_mut().zip(x) {
                    *o = s.sum32(s.load32(x));
                }
            } else {
                // Groups of `SUM_WEIGHTS`: each the sum of its vectors, then of the lanes.
                let x = x.as_flattened();
                for (o, g) in sum.iter_mut().zip(x.chunks_exact(F::SUM_WEIGHTS.max(1))) {
                    let (v, rest) = S::lanes(g);
                    let mut acc = s.zero();
                    for v in v {
                        acc = s.add(acc, s.load(v));
                    }
                    *o = s.sum(acc) + rest.iter().sum::<f32>();
                }
            }
        }
    }
    sums
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

/// The chunks of one block into the accumulator `sets` (chunk 0 into set `first`), with
/// the block's activations `x`.
#[inline(always)]
fn fma_block<S: Simd, F: Format>(
    s: S,
    b: &[u8],
    x: &[[f32; CHUNK]],
    sets: &mut [S::X32; 2],
    first: usize,
) {
    F::block_simd(s, b, &mut Dot1 { s, x, sets, first });
}

/// The chunks of one block into two activation rows' accumulator sets, with their `x`.
#[inline(always)]
fn fma_block2<S: Simd, F: Format>(
    s: S,
    b: &[u8],
    x: (&[[f32; CHUNK]], &[[f32; CHUNK]]),
    sets: (&mut [S::X32; 2], &mut [S::X32; 2]),
    first: usize,
) {
    F::block_simd(s, b, &mut Dot2 { s, x, sets, first });
}

/// Each of the `n` activation rows (`cols` each) in [`Format::word_order`], block by
/// block: 8 [`XChunk`]s per block. Done once per call and shared by every weight row of
/// it (a gather of `cols` floats per row against `cols` weights per weight row).
fn reorder<S: Simd, F: Format>(x: &[f32], cols: usize, n: usize) -> Vec<[XChunk; 8]> {
    const W: usize = CHUNK * 8;
    let order: [usize; W] = core::array::from_fn(|k| F::word_order(S::LANES, k) % W);
    let blocks = cols / W;
    let mut xr = vec![[XChunk([0.0; CHUNK]); 8]; blocks * n];
    for (xr, x) in xr
        .chunks_exact_mut(blocks.max(1))
        .zip(x.chunks_exact(cols.max(1)))
    {
        for (xb, x) in xr.iter_mut().zip(x.as_chunks::<W>().0) {
            for (k, &w) in order.iter().enumerate() {
                xb[k / CHUNK].0[k % CHUNK] = x[w];
            }
        }
    }
    xr
}

/// `dot(row, x[r])` for `N` activation rows (reordered, with their sums), each block's
/// codes read once for all of them ([`Format::dot_words`]); a row's sums in the same
/// order for any `N`.
#[inline(always)]
fn dot_words<S: Simd, F: Format, const BYTES: usize, const N: usize>(
    s: S,
    blocks: &[[u8; BYTES]],
    x: [&[[XChunk; 8]]; N],
    sums: [&[[f32; SUMS]]; N],
) -> [f32; N] {
    const ZX: [XChunk; 8] = [XChunk([0.0; CHUNK]); 8];
    const ZS: [f32; SUMS] = [0.0; SUMS];
    let mut acc = [[s.zero32(), s.zero32()]; N];
    for (bi, b) in blocks.iter().enumerate() {
        let mut xb = [&ZX; N];
        let mut sb = [&ZS; N];
        for r in 0..N {
            xb[r] = x[r].get(bi).unwrap_or(&ZX);
            sb[r] = sums[r].get(bi).unwrap_or(&ZS);
        }
        F::dot_words::<S, N>(s, b, xb, sb, &mut acc);
    }
    let mut out = [0f32; N];
    for (o, a) in out.iter_mut().zip(acc) {
        *o = reduce(s, a);
    }
    out
}

/// The sum of a row's accumulator sets in a fixed order, then of the lanes: the same for
/// every row count, so a row's result does not depend on which rows it was computed with.
#[inline(always)]
fn reduce<S: Simd>(s: S, [even, odd]: [S::X32; 2]) -> f32 {
    if !two_sets::<S>() {
        return s.sum32(even);
    }
    let mut v = even;
    for (a, b) in v.as_mut().iter_mut().zip(odd.as_ref()) {
        *a = s.add(*a, *b);
    }
    s.sum32(v)
}

/// `dot(row, x)` for one activation row: at 512 bits the chunks alternate between two
/// accumulator sets (even blocks start with the first set, odd blocks with the second:
/// [`set_of`]), so that enough FMA chains are in flight.
#[inline(always)]
fn dot1<S: Simd, F: Format, const BYTES: usize>(
    s: S,
    blocks: &[[u8; BYTES]],
    x: &[[f32; CHUNK]],
) -> f32 {
    let mut sets = [s.zero32(), s.zero32()];
    let (pairs, rest) = blocks.as_chunks::<2>();
    let xs = x.chunks_exact(2 * F::CHUNKS);
    let last = xs.remainder();
    for (b, x) in pairs.iter().zip(xs) {
        let (x0, x1) = x.split_at(F::CHUNKS);
        fma_block::<S, F>(s, &b[0], x0, &mut sets, 0);
        fma_block::<S, F>(s, &b[1], x1, &mut sets, 1);
    }
    if let [b] = rest {
        fma_block::<S, F>(s, b, last, &mut sets, 0);
    }
    reduce(s, sets)
}

/// `dot(row, x0)` and `dot(row, x1)`, each block decoded once for both; each row's sums in
/// the order [`dot1`] uses.
#[inline(always)]
fn dot2<S: Simd, F: Format, const BYTES: usize>(
    s: S,
    blocks: &[[u8; BYTES]],
    (x0, x1): (&[[f32; CHUNK]], &[[f32; CHUNK]]),
) -> (f32, f32) {
    let mut sets0 = [s.zero32(), s.zero32()];
    let mut sets1 = [s.zero32(), s.zero32()];
    let (pairs, rest) = blocks.as_chunks::<2>();
    let (xs0, xs1) = (
        x0.chunks_exact(2 * F::CHUNKS),
        x1.chunks_exact(2 * F::CHUNKS),
    );
    let (last0, last1) = (xs0.remainder(), xs1.remainder());
    for ((b, x0), x1) in pairs.iter().zip(xs0).zip(xs1) {
        let ((x00, x01), (x10, x11)) = (x0.split_at(F::CHUNKS), x1.split_at(F::CHUNKS));
        fma_block2::<S, F>(s, &b[0], (x00, x10), (&mut sets0, &mut sets1), 0);
        fma_block2::<S, F>(s, &b[1], (x01, x11), (&mut sets0, &mut sets1), 1);
    }
    if let [b] = rest {
        fma_block2::<S, F>(s, b, (last0, last1), (&mut sets0, &mut sets1), 0);
    }
    (reduce(s, sets0), reduce(s, sets1))
}
