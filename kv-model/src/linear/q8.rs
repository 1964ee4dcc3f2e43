//! Int8 activations ([`crate::Activations::Q8`], a named option; the default keeps them
//! exact): each activation row rounded to 8 bits per block of 32 values, one f32 scale per
//! block, and multiplied with Q4_0, Q4_1 and Q8_0 weight blocks by integer dot products
//! (kv-quant's [`Simd::dot_bytes32`]: AVX-512 VNNI's `vpdpbusd` where the CPU has it,
//! `maddubs` otherwise), as llama.cpp and candle's quantized matmul do.
//!
//! A weight block of 32 codes `q` with scale `d` (and minimum `m` for Q4_1, `-8d` for
//! Q4_0) against an activation block of 32 bytes `a` with scale `e`:
//! `Σ (q·d + m)·(a·e) = (d·e)·Σ q·a + m·(e·Σ a)`, the integer sum exact, `e·Σ a` computed
//! once per activation block. Q8_0's signed codes go in as `|q|` against `a` with `q`'s
//! sign.
//!
//! Every activation row is rounded the same way whatever its batch (prefill, decode, one
//! sequence or many), and each row's sums see the same operations in the same order in
//! every group of rows: a row's result does not depend on its batch, so cached and uncached
//! runs still agree with each other (not with exact activations). [`Kernel::scalar`] is
//! the portable reference.

use core::marker::PhantomData;

use kv_quant::simd::{vnni_available, Isa, Kernel, Simd};
use rayon::prelude::*;

use super::matvec::{bytes, f16_at};
use super::{BlockMatrix, BlockType, Kernels, WeightType, BLOCK};

/// Activation rows per pass over a weight row: each weight block decoded once for them.
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
}

impl Q8Rows {
    /// The `n` rows of `x` (`[n, cols]`, `cols` a multiple of [`BLOCK`]), each block of 32
    /// rounded to nearest on the grid `e = max|x| / 127` (ties away from zero), so bytes
    /// stay within ±127. A block of zeros gets scale 0; NaN becomes 0.
    pub(crate) fn quantize(x: &[f32], n: usize, cols: usize) -> Self {
        debug_assert!(cols.is_multiple_of(BLOCK) && x.len() >= n * cols);
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
                // `as` saturates and maps NaN to 0; the clamp keeps ±127 for `maddubs`.
                let a = ((v * inv).round() as i32).clamp(-127, 127);
                sum += a;
                *q = a as i8 as u8;
            }
            *d = e;
            *s = e * sum as f32;
        }
        Self { cols, q, d, s }
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

    /// Row `i`: its byte blocks, scales and minimum terms, all `cols / BLOCK` long.
    #[inline(always)]
    fn row(&self, i: usize) -> Row<'_> {
        let nb = self.cols / BLOCK;
        Row {
            q: self.q[i * self.cols..][..self.cols].as_chunks::<BLOCK>().0,
            d: &self.d[i * nb..][..nb],
            s: &self.s[i * nb..][..nb],
        }
    }
}

/// One rounded activation row.
#[derive(Clone, Copy)]
struct Row<'a> {
    q: &'a [[u8; BLOCK]],
    d: &'a [f32],
    s: &'a [f32],
}

/// A weight block type with an integer kernel.
pub(super) trait IntFormat {
    /// Bytes per block of 32 weights.
    const BYTES: usize;
    /// Whether codes are signed (Q8_0): they go in as `|q|`, the activations with their sign.
    const SIGNED: bool;
    /// The block's 32 integer codes (`w = code·d + m`), `d` and `m`: the portable decode.
    fn codes(b: &[u8]) -> ([i32; BLOCK], f32, f32);
    /// The block's codes in registers (unsigned, or signed for [`IntFormat::SIGNED`]), `d`
    /// and `m`.
    fn codes_simd<S: Simd>(s: S, b: &[u8]) -> (S::Bytes32, f32, f32);
}

/// The nibble codes of a 4-bit block at `at`, in GGUF's split order.
fn nibble_codes(b: &[u8], at: usize) -> [i32; BLOCK] {
    let q = bytes::<16>(b, at);
    core::array::from_fn(|j| i32::from(if j < 16 { q[j] & 15 } else { q[j - 16] >> 4 }))
}

impl IntFormat for super::blocks::Q4_0 {
    const BYTES: usize = 18;
    const SIGNED: bool = false;
    fn codes(b: &[u8]) -> ([i32; BLOCK], f32, f32) {
        let d = f16_at(b, 0);
        (nibble_codes(b, 2), d, -8.0 * d)
    }
    #[inline(always)]
    fn codes_simd<S: Simd>(s: S, b: &[u8]) -> (S::Bytes32, f32, f32) {
        let d = f16_at(b, 0);
        (s.split_nibbles32(bytes::<16>(b, 2)), d, -8.0 * d)
    }
}

impl IntFormat for super::blocks::Q4_1 {
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    fn codes(b: &[u8]) -> ([i32; BLOCK], f32, f32) {
        (nibble_codes(b, 4), f16_at(b, 0), f16_at(b, 2))
    }
    #[inline(always)]
    fn codes_simd<S: Simd>(s: S, b: &[u8]) -> (S::Bytes32, f32, f32) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        (s.split_nibbles32(bytes::<16>(b, 4)), d, m)
    }
}

impl IntFormat for super::blocks::Q8_0 {
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    fn codes(b: &[u8]) -> ([i32; BLOCK], f32, f32) {
        let q = bytes::<32>(b, 2);
        (
            core::array::from_fn(|j| i32::from(q[j] as i8)),
            f16_at(b, 0),
            0.0,
        )
    }
    #[inline(always)]
    fn codes_simd<S: Simd>(s: S, b: &[u8]) -> (S::Bytes32, f32, f32) {
        (s.load_bytes32(bytes::<32>(b, 2)), f16_at(b, 0), 0.0)
    }
}

/// Whether weights of `ty` have an integer kernel (others run with exact activations).
pub(super) fn supports(ty: WeightType) -> bool {
    matches!(
        ty,
        WeightType::Block(BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q8_0)
    )
}

/// `out[j * n + i] = dot(weight row j, x row i)` for whole weight rows of `F` blocks and
/// the `n` rounded activation rows of `x`.
pub(super) struct DotQ8<'a, F, const BYTES: usize> {
    pub(super) rows: &'a [u8],
    pub(super) row_bytes: usize,
    pub(super) x: &'a Q8Rows,
    pub(super) n: usize,
    pub(super) out: &'a mut [f32],
    /// Whether to use `vpdpbusd` ([`vnni_available`]).
    pub(super) vnni: bool,
    pub(super) format: PhantomData<F>,
}

impl<F: IntFormat, const BYTES: usize> Kernel for DotQ8<'_, F, BYTES> {
    type Output = ();

    fn scalar(self) {
        let n = self.n;
        for (row, out) in self
            .rows
            .chunks_exact(self.row_bytes)
            .zip(self.out.chunks_exact_mut(n))
        {
            for (i, o) in out.iter_mut().enumerate() {
                let x = self.x.row(i);
                let (mut acc, mut min) = (0f32, 0f32);
                for (((b, q), &e), &s) in row.chunks_exact(F::BYTES).zip(x.q).zip(x.d).zip(x.s) {
                    let (codes, d, m) = F::codes(b);
                    let dot: i32 = codes
                        .iter()
                        .zip(q)
                        .map(|(&c, &a)| c * i32::from(a as i8))
                        .sum();
                    acc += (d * e) * dot as f32;
                    min += m * s;
                }
                *o = acc + min;
            }
        }
    }

    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        if self.vnni {
            rows_simd::<S, F, BYTES, true>(s, self);
        } else {
            rows_simd::<S, F, BYTES, false>(s, self);
        }
    }
}

/// [`DotQ8`]'s SIMD body: per weight row, the activation rows in groups of [`GROUP`].
#[inline(always)]
fn rows_simd<S: Simd, F: IntFormat, const BYTES: usize, const V: bool>(
    s: S,
    k: DotQ8<'_, F, BYTES>,
) {
    debug_assert_eq!(BYTES, F::BYTES);
    let n = k.n;
    for (row, out) in k
        .rows
        .chunks_exact(k.row_bytes)
        .zip(k.out.chunks_exact_mut(n))
    {
        let blocks = row.as_chunks::<BYTES>().0;
        let mut groups = out.chunks_exact_mut(GROUP);
        let mut i = 0;
        for o in &mut groups {
            let x: [Row<'_>; GROUP] = core::array::from_fn(|r| k.x.row(i + r));
            o.copy_from_slice(&dots::<S, F, BYTES, V, GROUP>(s, blocks, x));
            i += GROUP;
        }
        for o in groups.into_remainder() {
            *o = dots::<S, F, BYTES, V, 1>(s, blocks, [k.x.row(i)])[0];
            i += 1;
        }
    }
}

/// The dot products of one weight row with `R` activation rows, each weight block decoded
/// once for all. Each row's sums: even blocks into one accumulator, odd into another (two
/// chains in flight), the minimum terms likewise, then `even + odd` lanes summed plus the
/// minimum terms: the same operations in the same order for every `R`.
#[inline(always)]
fn dots<S: Simd, F: IntFormat, const BYTES: usize, const V: bool, const R: usize>(
    s: S,
    blocks: &[[u8; BYTES]],
    x: [Row<'_>; R],
) -> [f32; R] {
    let nb = blocks.len();
    let x = x.map(|r| Row {
        q: &r.q[..nb],
        d: &r.d[..nb],
        s: &r.s[..nb],
    });
    let mut acc = [[s.zero_f32x8(); 2]; R];
    let mut min = [[0f32; 2]; R];
    // One block into set `SET` of every row's accumulators (a constant index, so the
    // accumulators stay in registers).
    #[inline(always)]
    fn block<S: Simd, F: IntFormat, const V: bool, const R: usize, const SET: usize>(
        s: S,
        b: &[u8],
        bi: usize,
        x: &[Row<'_>; R],
        acc: &mut [[S::F32x8; 2]; R],
        min: &mut [[f32; 2]; R],
    ) {
        let (w, d, m) = F::codes_simd(s, b);
        let u = if F::SIGNED { s.abs_bytes32(w) } else { w };
        for ((x, acc), min) in x.iter().zip(acc.iter_mut()).zip(min.iter_mut()) {
            let (Some(q), Some(&e), Some(&sum)) = (x.q.get(bi), x.d.get(bi), x.s.get(bi)) else {
                continue;
            };
            let a = s.load_bytes32(q);
            let a = if F::SIGNED { s.sign_bytes32(a, w) } else { a };
            acc[SET] = s.dot_bytes32::<V>(u, a, d * e, acc[SET]);
            if !F::SIGNED {
                min[SET] += m * sum;
            }
        }
    }
    let (pairs, rest) = blocks.as_chunks::<2>();
    for (p, b) in pairs.iter().enumerate() {
        block::<S, F, V, R, 0>(s, &b[0], 2 * p, &x, &mut acc, &mut min);
        block::<S, F, V, R, 1>(s, &b[1], 2 * p + 1, &x, &mut acc, &mut min);
    }
    if let [b] = rest {
        block::<S, F, V, R, 0>(s, b, 2 * pairs.len(), &x, &mut acc, &mut min);
    }
    core::array::from_fn(|r| {
        let [even, odd] = acc[r];
        let [me, mo] = min[r];
        s.sum_f32x8(even) + s.sum_f32x8(odd) + (me + mo)
    })
}

/// Whether kernels at `k` use `vpdpbusd`: at the AVX-512 level, where the CPU has VNNI.
pub(super) fn uses_vnni(k: Kernels) -> bool {
    k.isa == Isa::Avx512 && vnni_available()
}

/// [`DotQ8`] for the weight rows `rows` of type `ty` (one of [`supports`]), with
/// `vpdpbusd` if `vnni` (only where [`vnni_available`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn dot_rows(
    k: Kernels,
    vnni: bool,
    ty: WeightType,
    rows: &[u8],
    cols: usize,
    x: &Q8Rows,
    n: usize,
    out: &mut [f32],
) {
    use super::blocks::{Q4_0, Q4_1, Q8_0};
    debug_assert!(supports(ty) && (!vnni || vnni_available()));
    let row_bytes = ty.row_bytes(cols);
    if row_bytes == 0 || n == 0 {
        out.fill(0.0);
        return;
    }
    macro_rules! go {
        ($f:ty) => {
            k.isa.run(DotQ8::<$f, { <$f as IntFormat>::BYTES }> {
                rows,
                row_bytes,
                x,
                n,
                out,
                vnni,
                format: PhantomData,
            })
        };
    }
    match ty {
        WeightType::Block(BlockType::Q4_0) => go!(Q4_0),
        WeightType::Block(BlockType::Q4_1) => go!(Q4_1),
        WeightType::Block(BlockType::Q8_0) => go!(Q8_0),
        // Callers check `supports`; nothing else reaches here.
        _ => out.fill(f32::NAN),
    }
}

/// `x · mᵀ` for each `(m, out)` of `parts` (all of [`supports`]'s types, all with `x`'s
/// `cols`), into `out` as `[m.rows, n]`: one parallel loop over the rows of all parts, as
/// `matvec_parts` does for exact activations.
pub(super) fn q8_parts(k: Kernels, parts: &mut [(&BlockMatrix, &mut [f32])], x: &Q8Rows, n: usize) {
    if n == 0 {
        return;
    }
    let vnni = uses_vnni(k);
    let total: usize = parts.iter().map(|(m, _)| m.rows).sum();
    let chunk = total.div_ceil(rayon::current_num_threads() * 4).max(16);
    let mut tasks = Vec::new();
    for (m, out) in parts.iter_mut() {
        for (c, o) in out[..m.rows * n].chunks_mut(chunk * n).enumerate() {
            tasks.push((*m, c * chunk, o));
        }
    }
    tasks.into_par_iter().for_each(|(m, r0, o)| {
        let row_bytes = m.ty.row_bytes(m.cols);
        let rows = &m.data[r0 * row_bytes..][..o.len() / n * row_bytes];
        dot_rows(k, vnni, m.ty, rows, m.cols, x, n, o);
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
}
