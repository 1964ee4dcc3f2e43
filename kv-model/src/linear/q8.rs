//! Int8 activations ([`crate::Activations::Q8`], a named option; the default keeps them
//! exact): each activation row rounded to 8 bits per block of 32 values, one f32 scale per
//! block, and multiplied with Q4_0, Q4_1 and Q8_0 weight blocks by integer dot products
//! (AVX-512 VNNI's `vpdpbusd` where the CPU has it, `maddubs` otherwise), as llama.cpp and
//! candle's quantized matmul do.
//!
//! A weight block of 32 codes `q` with scale `d` (and minimum `m` for Q4_1, `-8d` for
//! Q4_0) against an activation block of 32 bytes `a` with scale `e`:
//! `Σ (q·d + m)·(a·e) = (d·e)·Σ q·a + m·(e·Σ a)`, the integer sum exact, `e·Σ a` computed
//! once per activation block.
//!
//! **Interleaved weights (issue 21).** At first use a matrix is repacked ([`Packed`]) into
//! groups of `L` output rows, `L` the SIMD width in i32 lanes (16 at AVX-512, 8 at AVX2):
//! for each block of 32 columns, one 32-bit lane holds 4 consecutive codes of one row, so
//! that broadcasting 4 activation bytes to every lane and one `vpdpbusd` adds 4 products
//! to each of `L` rows at once. After a block's 8 such steps every lane holds its row's
//! integer dot for the block: no horizontal sum at any row count, which is what made the
//! per-row kernel slow for batches (and a tiled one slow for one row). A weight block is
//! loaded and unpacked once for up to [`GROUP`] activation rows.
//!
//! Every activation row is rounded the same way whatever its batch (prefill, decode, one
//! sequence or many), and each output lane accumulates its blocks in column order with the
//! same operations (`acc = fma(Σ q·a, d·e, acc)`, `min = fma(m, e·Σ a, min)`, then
//! `acc + min`) at every row count, every `L` and every ISA level: a row's result does not
//! depend on its batch, so cached and uncached runs still agree with each other (not with
//! exact activations). [`Kernel::scalar`] is the portable reference, bit-exact with the
//! SIMD levels.

use kv_quant::simd::{dot_bcast_scalar, round32_i8_scalar, vnni_available, Isa, Kernel, Simd};
use rayon::prelude::*;

use super::matvec::{bytes, f16_at};
use super::{BlockType, Kernels, WeightType, BLOCK};

/// Activation rows per pass over a row group: each weight block unpacked once for them.
const GROUP: usize = 4;

/// Activation rows rounded to 8 bits per block of [`BLOCK`] values.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Q8Rows {
    /// Values per row (a multiple of [`BLOCK`]).
    cols: usize,
    /// `[n, cols]` signed bytes (as `u8` bits, for the byte loads).
    q: Vec<u8>,
    /// `[n, cols / BLOCK]`: each block's scale `e`, the value of a byte 1.
    d: Vec<f32>,
    /// `[n, cols / BLOCK]`: `e · Σ a` of each block (the minimum's term).
    s: Vec<f32>,
    /// `[n, cols / BLOCK]`: `Σ a` of each block, for Q8_0 codes offset by 128 (`-128 · Σ a`
    /// makes their dot exact again).
    sum: Vec<i32>,
}

impl Q8Rows {
    /// The `n` rows of `x` (`[n, cols]`, `cols` a multiple of [`BLOCK`]), each block of 32
    /// rounded to nearest on the grid `e = max|x| / 127` (ties away from zero), so bytes
    /// stay within ±127. A block of zeros gets scale 0; NaN becomes 0.
    pub(crate) fn quantize(x: &[f32], n: usize, cols: usize) -> Self {
        Self::quantize_at(Isa::best(), x, n, cols)
    }

    /// [`Q8Rows::quantize`] at `isa`: [`Simd::round32_i8`] per block, bit-identical at
    /// every level to the portable [`round32_i8_scalar`] (a profile of a 16-sequence
    /// batch had ~17% of its time in the scalar rounding).
    pub(crate) fn quantize_at(isa: Isa, x: &[f32], n: usize, cols: usize) -> Self {
        debug_assert!(cols.is_multiple_of(BLOCK) && x.len() >= n * cols);
        let blocks = n * (cols / BLOCK);
        let (mut q, mut d, mut s) = (vec![0u8; n * cols], vec![0f32; blocks], vec![0f32; blocks]);
        let mut sum = vec![0i32; blocks];
        isa.run(Quantize {
            x: x[..n * cols].as_chunks::<BLOCK>().0,
            q: q.as_chunks_mut::<BLOCK>().0,
            d: &mut d,
            s: &mut s,
            sum: &mut sum,
        });
        Self { cols, q, d, s, sum }
    }

    /// The rounded values as f32 (`a · e`), `[n, cols]`: what the kernels multiply.
    #[cfg(test)]
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks_exact(BLOCK)
            .zip(&self.d)
            .flat_map(|(q, &e)| q.iter().map(move |&a| f32::from(a as i8) * e))
            .collect()
    }

    /// Row `i`: its byte blocks, scales, minimum terms and sums, all `cols / BLOCK` long.
    #[inline(always)]
    fn row(&self, i: usize) -> Row<'_> {
        let nb = self.cols / BLOCK;
        Row {
            q: self.q[i * self.cols..][..self.cols].as_chunks::<BLOCK>().0,
            d: &self.d[i * nb..][..nb],
            s: &self.s[i * nb..][..nb],
            sum: &self.sum[i * nb..][..nb],
        }
    }
}

/// The kernel of [`Q8Rows::quantize_at`]: each block of `x` into its bytes `q`, scale `d`,
/// minimum term `s` and byte sum `sum`.
struct Quantize<'a> {
    x: &'a [[f32; BLOCK]],
    q: &'a mut [[u8; BLOCK]],
    d: &'a mut [f32],
    s: &'a mut [f32],
    sum: &'a mut [i32],
}

/// A block's scale `e = max|x| / 127` (NaN skipped, as `f32::max` skips it) and the factor
/// `1 / e` the values are multiplied by (0 for a block of zeros).
#[inline(always)]
fn scale(amax: f32) -> (f32, f32) {
    let e = amax / 127.0;
    (e, if e > 0.0 { 1.0 / e } else { 0.0 })
}

impl Kernel for Quantize<'_> {
    type Output = ();

    fn scalar(self) {
        let out = self.q.iter_mut().zip(self.d).zip(self.s).zip(self.sum);
        for (x, (((q, d), s), t)) in self.x.iter().zip(out) {
            let (e, inv) = scale(x.iter().fold(0f32, |m, v| m.max(v.abs())));
            let (bytes, sum) = round32_i8_scalar(x, inv);
            (*q, *d, *s, *t) = (bytes, e, e * sum as f32, sum);
        }
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        let out = self.q.iter_mut().zip(self.d).zip(self.s).zip(self.sum);
        for (x, (((q, d), sm), t)) in self.x.iter().zip(out) {
            let v = s.load32(x);
            // `max(|x|, acc)` keeps `acc` where `x` is NaN, as `f32::max` does; max is exact
            // and +0-based, so any order gives the scalar fold's value.
            let acc = v
                .as_ref()
                .iter()
                .fold(s.zero(), |acc, &v| s.max(s.abs(v), acc));
            let (e, inv) = scale(s.max_lane(acc));
            let (bytes, sum) = s.round32_i8(v, inv);
            (*q, *d, *sm, *t) = (bytes, e, e * sum as f32, sum);
        }
    }
}

/// One rounded activation row.
#[derive(Clone, Copy)]
struct Row<'a> {
    q: &'a [[u8; BLOCK]],
    d: &'a [f32],
    s: &'a [f32],
    sum: &'a [i32],
}

/// Whether weights of `ty` have an integer kernel (others run with exact activations).
pub(super) fn supports(ty: WeightType) -> bool {
    matches!(
        ty,
        WeightType::Block(BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q8_0)
    )
}

/// [`Packed::format`] of Q4_0 (a const parameter of the kernel).
const Q4_0: u8 = 0;
/// [`Packed::format`] of Q4_1.
const Q4_1: u8 = 1;
/// [`Packed::format`] of Q8_0.
const Q8_0: u8 = 2;

/// The i32 lanes per vector at `isa`: the row-group size [`Packed`] uses there (any size
/// works for the portable kernel; 8 keeps padding small).
pub(super) fn lanes_for(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 16,
        _ => 8,
    }
}

/// A Q4_0, Q4_1 or Q8_0 matrix repacked for the interleaved kernel: groups of
/// [`Packed::lanes`] output rows (the last padded with zero rows), and for each group and
/// block of 32 columns, `chunks` registers of `4 · lanes` bytes where lane `r` holds 4
/// codes of row `r`, then the rows' f16 scales (and Q4_1's minimums) side by side.
///
/// For the 4-bit formats, chunk `c` lane `r` is row `r`'s packed bytes `4c..4c+4` as the
/// file stores them: their low nibbles are codes `4c..4c+4`, their high nibbles codes
/// `16+4c..16+4c+4` (GGUF's split order), so the same 16 bytes per row and block as the
/// file, unpacked with one mask and one shift per chunk. Q8_0 keeps its 32 signed codes
/// in 8 chunks. The copy is as large as the matrix's blocks in the file (plus padding to a
/// multiple of `lanes` rows); only q8 mode makes it.
#[derive(Debug, Clone)]
pub(crate) struct Packed {
    /// [`Q4_0`], [`Q4_1`] or [`Q8_0`].
    format: u8,
    /// Rows per group: lanes per vector of the level it was packed for.
    lanes: usize,
    /// The matrix's rows (outputs).
    rows: usize,
    /// Blocks per row (`cols / 32`).
    nb: usize,
    /// `[groups, nb, chunks, lanes, 4]` code bytes.
    codes: Vec<u8>,
    /// `[groups, nb, lanes]` f16 scales.
    d: Vec<u8>,
    /// Q4_1: `[groups, nb, lanes]` f16 minimums; empty otherwise.
    m: Vec<u8>,
}

impl Packed {
    /// Code registers per block: 4 for the 4-bit formats (two nibbles a byte), 8 for Q8_0.
    fn chunks(&self) -> usize {
        if self.format == Q8_0 {
            8
        } else {
            4
        }
    }

    /// Row groups.
    fn groups(&self) -> usize {
        self.rows.div_ceil(self.lanes)
    }

    /// The `[rows, cols]` matrix of `ty` (one of [`supports`]) in `data` (`rows` rows of
    /// `ty.row_bytes(cols)`, as [`super::BlockMatrix`] checked) in groups of `lanes` rows.
    /// `None` for any other type or too short data.
    pub(super) fn new(
        ty: WeightType,
        rows: usize,
        cols: usize,
        data: &[u8],
        lanes: usize,
    ) -> Option<Self> {
        let (format, bytes, at) = match ty {
            WeightType::Block(BlockType::Q4_0) => (Q4_0, 18, 2),
            WeightType::Block(BlockType::Q4_1) => (Q4_1, 20, 4),
            WeightType::Block(BlockType::Q8_0) => (Q8_0, 34, 2),
            _ => return None,
        };
        let nb = cols / BLOCK;
        let row_bytes = nb * bytes;
        if lanes == 0 || !cols.is_multiple_of(BLOCK) || data.len() < rows.checked_mul(row_bytes)? {
            return None;
        }
        let mut p = Self {
            format,
            lanes,
            rows,
            nb,
            codes: Vec::new(),
            d: Vec::new(),
            m: Vec::new(),
        };
        let chunks = p.chunks();
        let slots = p.groups().checked_mul(nb)?.checked_mul(lanes)?;
        p.codes = vec![0; slots.checked_mul(4 * chunks)?];
        p.d = vec![0; slots * 2];
        if format == Q4_1 {
            p.m = vec![0; slots * 2];
        }
        for (row, src) in data[..rows * row_bytes].chunks_exact(row_bytes).enumerate() {
            let (g, r) = (row / lanes, row % lanes);
            for (b, blk) in src.chunks_exact(bytes).enumerate() {
                let gb = g * nb + b;
                let slot = gb * lanes + r;
                p.d[2 * slot..][..2].copy_from_slice(&blk[..2]);
                if format == Q4_1 {
                    p.m[2 * slot..][..2].copy_from_slice(&blk[2..4]);
                }
                for c in 0..chunks {
                    let to = ((gb * chunks + c) * lanes + r) * 4;
                    p.codes[to..][..4].copy_from_slice(&blk[at + 4 * c..][..4]);
                }
            }
        }
        Some(p)
    }
}

/// `out[i * here + j] = dot(weight row g0·L + j, x row i)` for the `here = out.len() / n`
/// rows of [`Packed`] from group `g0` on (whole groups but the matrix's last) and the `n`
/// rounded activation rows of `x`: activation-row-major, so a group's 16 results for one
/// activation row are one vector store (the layout the model wants, with no transposition).
/// `F` is [`Packed::format`].
struct PackedDot<'a, const F: u8> {
    p: &'a Packed,
    g0: usize,
    x: &'a Q8Rows,
    n: usize,
    out: &'a mut [f32],
    /// Whether to use `vpdpbusd` ([`vnni_available`]).
    vnni: bool,
}

impl<const F: u8> Kernel for PackedDot<'_, F> {
    type Output = ();

    fn scalar(self) {
        let (p, n) = (self.p, self.n);
        let (l, nb, chunks) = (p.lanes, p.nb, p.chunks());
        let here = self.out.len() / n;
        for j in 0..here {
            let (g, r) = (self.g0 + j / l, j % l);
            for i in 0..n {
                let o = &mut self.out[i * here + j];
                let x = self.x.row(i);
                let (mut acc, mut min) = (0f32, 0f32);
                for b in 0..nb {
                    let gb = g * nb + b;
                    let slot = gb * l + r;
                    let d = f16_at(&p.d, 2 * slot);
                    let a = &x.q[b];
                    let quad = |k: usize| -> [u8; 4] { core::array::from_fn(|t| a[4 * k + t]) };
                    let mut isum = [0i32];
                    for c in 0..chunks {
                        let w: [u8; 4] = *bytes::<4>(&p.codes, ((gb * chunks + c) * l + r) * 4);
                        if F == Q8_0 {
                            dot_bcast_scalar::<true>(&mut isum, &w, quad(c));
                        } else {
                            dot_bcast_scalar::<false>(&mut isum, &w.map(|v| v & 15), quad(c));
                            dot_bcast_scalar::<false>(&mut isum, &w.map(|v| v >> 4), quad(c + 4));
                        }
                    }
                    acc = (isum[0] as f32).mul_add(d * x.d[b], acc);
                    let m = match F {
                        Q4_1 => f16_at(&p.m, 2 * slot),
                        _ => -8.0 * d,
                    };
                    if F != Q8_0 {
                        min = m.mul_add(x.s[b], min);
                    }
                }
                *o = if F == Q8_0 { acc } else { acc + min };
            }
        }
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        if S::LANES != self.p.lanes {
            // Packed for another level (a test's choice): the portable kernel.
            return self.scalar();
        }
        if self.vnni {
            groups_simd::<S, F, true>(s, self);
        } else {
            groups_simd::<S, F, false>(s, self);
        }
    }
}

/// [`PackedDot`]'s SIMD body: per row group, the activation rows in groups of [`GROUP`].
#[inline(always)]
fn groups_simd<S: Simd, const F: u8, const V: bool>(s: S, k: PackedDot<'_, F>) {
    let (p, n, l) = (k.p, k.n, S::LANES);
    let (nb, chunks) = (p.nb, p.chunks());
    let codes = S::words(&p.codes).0;
    let d = S::halves(&p.d).0;
    let m = S::halves(&p.m).0;
    let here = k.out.len() / n;
    for gl in 0..here.div_ceil(l) {
        let g = k.g0 + gl;
        let w = &codes[g * nb * chunks..][..nb * chunks];
        let dg = &d[g * nb..][..nb];
        let mg = if F == Q4_1 {
            &m[g * nb..][..nb]
        } else {
            &[][..]
        };
        let (col, rows) = (gl * l, (here - gl * l).min(l));
        let mut i = 0;
        while i + GROUP <= n {
            let x: [Row<'_>; GROUP] = core::array::from_fn(|r| k.x.row(i + r));
            let v = dots::<S, F, V, GROUP>(s, w, dg, mg, x);
            for (r, v) in v.into_iter().enumerate() {
                emit(s, &mut k.out[(i + r) * here + col..][..rows], v);
            }
            i += GROUP;
        }
        while i < n {
            let [v] = dots::<S, F, V, 1>(s, w, dg, mg, [k.x.row(i)]);
            emit(s, &mut k.out[i * here + col..][..rows], v);
            i += 1;
        }
    }
}

/// A row group's results for one activation row into `out` (its `rows` outputs, all lanes
/// of `v` or the first of the matrix's last, short group).
#[inline(always)]
fn emit<S: Simd>(s: S, out: &mut [f32], v: S::F32) {
    if let Some(o) = S::lanes_mut(out).0.first_mut() {
        s.store(o, v);
    } else {
        let mut buf = [0f32; 16];
        s.store(&mut S::lanes_mut(&mut buf[..S::LANES]).0[0], v);
        let rows = out.len();
        out.copy_from_slice(&buf[..rows]);
    }
}

/// Runs `$body` once for each `$r` in `0..$n` (`$n` at most 8, a constant), with `$r` a
/// literal in each copy: the activation rows of [`dots`] unrolled, so their accumulators
/// are registers (a loop over them, not unrolled by the compiler, kept them on the stack:
/// one store and one reload per row and block, 12% of the kernel's samples in a
/// 16-sequence profile on the accumulator store alone). [`dots`] checks `R <= 8` at
/// compile time.
macro_rules! each_row {
    ($n:expr, $r:ident => $body:block) => {{
        each_row!(@ $n, $r, $body, 0 1 2 3 4 5 6 7)
    }};
    (@ $n:expr, $r:ident, $body:block, $($k:literal)*) => {{
        $(
            if $k < $n {
                let $r: usize = $k;
                $body
            }
        )*
    }};
}

/// A block's 32 activation bytes as the two halves [`Simd::dot_bcast4_u8`] reads: bytes
/// `0..16` (quads 0-3) and `16..32` (quads 4-7).
#[inline(always)]
fn halves(a: &[u8; BLOCK]) -> (&[u8; 16], &[u8; 16]) {
    let (h, _) = a.as_chunks::<16>();
    (&h[0], &h[1])
}

/// One row group's dot products with `R` activation rows, lane `r` row `r`'s: each block's
/// codes loaded and unpacked once for all `R`, written out, not by `array::from_fn`
/// (whose closure the compiler called out of line: a call per code register and block,
/// every vector register spilled around it).
///
/// Per row and block the integer dot is two [`Simd::dot_bcast4_u8`] (with VNNI: 8
/// `vpdpbusd`, each with its activation quad as a broadcast memory operand), then one
/// convert, one multiply and one FMA (and the minimum's FMA). Q8_0's signed codes go
/// through `vpdpbusd` as unsigned `w + 128` (one xor per code register and block, shared
/// by the `R` rows), the sum started at `-128 · Σ a`: the same exact integer as the
/// signed dot, so the same bits, without the sign emulation (two instructions per
/// `vpdpbusd`) that [`Simd::dot_bcast_i8`] needs. Without VNNI Q8_0 keeps the signed dot
/// (`maddubs` would saturate on codes up to 255).
#[inline(always)]
fn dots<S: Simd, const F: u8, const V: bool, const R: usize>(
    s: S,
    w: &[S::Words],
    d: &[S::Halves],
    m: &[S::Halves],
    x: [Row<'_>; R],
) -> [S::F32; R] {
    const { assert!(R <= 8, "each_row! unrolls at most 8 rows") };
    let nb = d.len();
    // Each row's slices cut to the `nb` blocks the loop visits, so its indexing by block
    // needs no bounds check per row.
    let xq: [&[[u8; BLOCK]]; R] = core::array::from_fn(|r| &x[r].q[..nb]);
    let xd: [&[f32]; R] = core::array::from_fn(|r| &x[r].d[..nb]);
    let xs: [&[f32]; R] = core::array::from_fn(|r| &x[r].s[..nb]);
    let xt: [&[i32]; R] = core::array::from_fn(|r| &x[r].sum[..nb]);
    let mut acc = [s.zero(); R];
    let mut min = [s.zero(); R];
    let quad = |a: &[u8; BLOCK], k: usize| -> [u8; 4] { core::array::from_fn(|t| a[4 * k + t]) };
    for (b, dh) in d.iter().enumerate() {
        let db = s.load_f16(dh);
        let mb = match F {
            Q4_1 => s.load_f16(&m[b]),
            Q4_0 => s.mul(db, s.splat(-8.0)),
            _ => db,
        };
        if F == Q8_0 && V {
            let wb = &w[b * 8..][..8];
            let u = |c: usize| s.flip_i8_u8(s.load_i32_bytes(&wb[c]));
            let (lo, hi) = ([u(0), u(1), u(2), u(3)], [u(4), u(5), u(6), u(7)]);
            each_row!(R, r => {
                let (a0, a1) = halves(&xq[r][b]);
                let p0 = s.dot_bcast4_u8::<true>(s.splat_i32(-128 * xt[r][b]), lo, a0);
                let p1 = s.dot_bcast4_u8::<true>(s.zero_i32(), hi, a1);
                let sum = s.i32_to_f32(s.add_i32(p0, p1));
                acc[r] = s.fma(sum, s.mul(db, s.splat(xd[r][b])), acc[r]);
            });
        } else if F == Q8_0 {
            let wb = &w[b * 8..][..8];
            let u = |c: usize| s.load_i32_bytes(&wb[c]);
            let c = [u(0), u(1), u(2), u(3), u(4), u(5), u(6), u(7)];
            each_row!(R, r => {
                let a = &xq[r][b];
                let (mut p0, mut p1) = (s.zero_i32(), s.zero_i32());
                for t in 0..4 {
                    p0 = s.dot_bcast_i8::<false>(p0, c[t], quad(a, t));
                    p1 = s.dot_bcast_i8::<false>(p1, c[t + 4], quad(a, t + 4));
                }
                let sum = s.i32_to_f32(s.add_i32(p0, p1));
                acc[r] = s.fma(sum, s.mul(db, s.splat(xd[r][b])), acc[r]);
            });
        } else {
            let wb = &w[b * 4..][..4];
            let u = |c: usize| s.nibbles_i32(s.load_i32_bytes(&wb[c]));
            let ((l0, h0), (l1, h1), (l2, h2), (l3, h3)) = (u(0), u(1), u(2), u(3));
            let (lo, hi) = ([l0, l1, l2, l3], [h0, h1, h2, h3]);
            each_row!(R, r => {
                let (a0, a1) = halves(&xq[r][b]);
                let p0 = s.dot_bcast4_u8::<V>(s.zero_i32(), lo, a0);
                let p1 = s.dot_bcast4_u8::<V>(s.zero_i32(), hi, a1);
                let sum = s.i32_to_f32(s.add_i32(p0, p1));
                acc[r] = s.fma(sum, s.mul(db, s.splat(xd[r][b])), acc[r]);
                min[r] = s.fma(mb, s.splat(xs[r][b]), min[r]);
            });
        }
    }
    core::array::from_fn(|r| {
        if F == Q8_0 {
            acc[r]
        } else {
            s.add(acc[r], min[r])
        }
    })
}

/// Whether kernels at `k` use `vpdpbusd`: at the AVX-512 level, where the CPU has VNNI.
pub(super) fn uses_vnni(k: Kernels) -> bool {
    k.isa == Isa::Avx512 && vnni_available()
}

/// `out[i * here + j]`: weight row `g0 · p.lanes + j` of `p` against activation row `i`,
/// for the `here = out.len() / n` rows from group `g0` on, with `vpdpbusd` if `vnni` (only
/// where [`vnni_available`]).
pub(super) fn dot_groups(
    k: Kernels,
    vnni: bool,
    p: &Packed,
    g0: usize,
    x: &Q8Rows,
    n: usize,
    out: &mut [f32],
) {
    debug_assert!(!vnni || vnni_available());
    if n == 0 || p.nb == 0 {
        out.fill(0.0);
        return;
    }
    macro_rules! go {
        ($f:expr) => {
            k.isa.run(PackedDot::<{ $f }> {
                p,
                g0,
                x,
                n,
                out,
                vnni,
            })
        };
    }
    match p.format {
        Q4_0 => go!(Q4_0),
        Q4_1 => go!(Q4_1),
        _ => go!(Q8_0),
    }
}

thread_local! {
    /// Each rayon worker's results of one task, `[n, its rows]`, reused across calls.
    static TASK_OUT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x · mᵀ` for each `(m, out)` of `parts` (all with `x`'s cols), into `out` as
/// `[n, m.rows]` (row-major, as the model uses it): one parallel loop over the row groups
/// of all parts, as `matvec_parts` does for exact activations. Each task computes its
/// rows for every activation row into its own buffer (`[n, its rows]`, whole vector
/// stores) and copies each activation row's run of results into place, instead of a
/// transposition of the whole output after the loop (single-threaded, and for the
/// 49152-row output head 38% of a 64-sequence profile).
pub(super) fn q8_parts(k: Kernels, parts: &mut [(&Packed, &mut [f32])], x: &Q8Rows, n: usize) {
    if n == 0 {
        return;
    }
    let vnni = uses_vnni(k);
    let total: usize = parts.iter().map(|(p, _)| p.groups()).sum();
    let chunk = total.div_ceil(rayon::current_num_threads() * 4).max(1);
    let mut tasks = Vec::new();
    for (p, out) in parts.iter_mut() {
        assert!(
            out.len() >= n * p.rows,
            "an output of n rows of the matrix's rows"
        );
        let dst = super::OutPtr(out.as_mut_ptr());
        for g0 in (0..p.groups()).step_by(chunk) {
            tasks.push((*p, g0, dst));
        }
    }
    tasks.into_par_iter().for_each(|(p, g0, dst)| {
        let r0 = g0 * p.lanes;
        let here = (chunk * p.lanes).min(p.rows - r0);
        TASK_OUT.with_borrow_mut(|buf| {
            buf.resize(n * here, 0.0);
            dot_groups(k, vnni, p, g0, x, n, &mut buf[..n * here]);
            for (i, row) in buf[..n * here].chunks_exact(here).enumerate() {
                // SAFETY: `dst` holds `n * p.rows` floats (checked above), alive and unused
                // elsewhere until the loop ends; this writes `here` floats at `i * p.rows +
                // r0` (`i < n`, `r0 + here <= p.rows`), columns no other task writes (the
                // tasks' row groups are disjoint).
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        row.as_ptr(),
                        dst.get().add(i * p.rows + r0),
                        here,
                    );
                }
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_rounds_each_block_to_its_own_grid() {
        let mut x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        x[40] = 0.0;
        x[32..64].fill(0.0);
        x[5] = f32::NAN;
        let r = Q8Rows::quantize(&x, 1, 64);
        let amax = x[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(r.d[0], amax / 127.0);
        assert_eq!(r.d[1], 0.0);
        assert!(r.q[32..].iter().all(|&q| q == 0));
        assert_eq!(r.q[5], 0, "NaN rounds to 0");
        for (j, (&v, &q)) in x[..32].iter().zip(&r.q).enumerate() {
            if j == 5 {
                continue;
            }
            let a = f32::from(q as i8);
            assert!(
                (a * r.d[0] - v).abs() <= r.d[0] / 2.0 * 1.0001,
                "{j}: {v} -> {a}"
            );
            assert!(a.abs() <= 127.0);
        }
        let sum: i32 = r.q[..32].iter().map(|&q| i32::from(q as i8)).sum();
        assert_eq!(r.s[0], r.d[0] * sum as f32);
    }

    /// `quantize` before issue 19's SIMD rounding, verbatim: what every level must still
    /// give, byte for byte.
    fn quantize_before(x: &[f32], n: usize, cols: usize) -> Q8Rows {
        let blocks = n * (cols / BLOCK);
        let (mut q, mut d, mut s) = (vec![0u8; n * cols], vec![0f32; blocks], vec![0f32; blocks]);
        for (((x, q), d), s) in x[..n * cols]
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(&mut d)
            .zip(&mut s)
        {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let e = amax / 127.0;
            let inv = if e > 0.0 { 1.0 / e } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in q.iter_mut().zip(x) {
                let a = ((v * inv).round() as i32).clamp(-127, 127);
                sum += a;
                *q = a as i8 as u8;
            }
            *d = e;
            *s = e * sum as f32;
        }
        let sum = q
            .chunks_exact(BLOCK)
            .map(|b| b.iter().map(|&a| i32::from(a as i8)).sum())
            .collect();
        Q8Rows { cols, q, d, s, sum }
    }

    /// Every level quantizes to the same bytes, scales and sums as the code before the
    /// SIMD rounding (compared as bits, so NaN scales count too): random rows of many
    /// magnitudes, a block of zeros, blocks with NaN, ±inf, subnormals and exact ties.
    #[test]
    fn quantize_is_unchanged_at_every_level() {
        let (n, cols) = (9, 256);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut x: Vec<f32> = (0..n * cols)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let exp = 0x3000_0000 + ((i as u32 / 32) % 24) * 0x0080_0000;
                f32::from_bits((state as u32 & 0x807f_ffff) | exp)
            })
            .collect();
        x[32..64].fill(0.0);
        x[70] = f32::NAN;
        x[100] = f32::INFINITY;
        x[140] = f32::NEG_INFINITY;
        x[160..192]
            .iter_mut()
            .for_each(|v| *v = f32::from_bits(v.to_bits() & 0x8000_00ff));
        // Ties: max 127 gives e = 1 and inv = 1, so k + 0.5 lands on a tie.
        for (j, v) in x[192..224].iter_mut().enumerate() {
            *v = if j == 0 { 127.0 } else { j as f32 - 16.5 };
        }
        x[230] = 1e38;
        let want = quantize_before(&x, n, cols);
        for isa in Isa::available() {
            let got = Q8Rows::quantize_at(isa, &x, n, cols);
            assert_eq!(got.q, want.q, "{isa}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.d), bits(&want.d), "{isa}");
            assert_eq!(bits(&got.s), bits(&want.s), "{isa}");
            assert_eq!(got.sum, want.sum, "{isa}");
        }
    }
}
