//! Kernels for the GGUF block types that mix scales within a block or add a fifth or sixth
//! bit: Q5_0, Q5_1 (32 weights) and the K-quants Q4_K, Q5_K, Q6_K (256-weight super-blocks),
//! the types a Q4_K_M file mixes. Written once over kv-quant's width-generic [`Simd`] layer
//! and run through [`Isa::run`], with the portable [`Kernel::scalar`] bodies as the
//! reference the SIMD ones are tested against.
//!
//! Every type is read as 32-weight chunks: a chunk's codes are rebuilt as signed bytes (the
//! bit fiddling is plain Rust that the compiler vectorizes inside each level's entry point),
//! widened with [`Simd::codes32_i8`] and scaled per 16 weights (Q6_K has a scale per 16;
//! the others repeat theirs). Weights equal candle's `dequantize` bit for bit: every scale
//! is an f16 times an integer of at most 8 bits, exact in f32, and a code of at most 6 bits
//! times it is exact again, so `code * scale + min` rounds once however it is computed
//! (fused or not) and the order of candle's products does not matter. The symmetric types
//! multiply only (no `+ 0.0`, which would turn candle's `-0.0` into `+0.0`).

use kv_quant::simd::{Isa, Kernel, Simd};

/// The block types of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KType {
    /// 22 bytes per 32 weights: f16 `d`, 32 fifth bits, 16 bytes of nibbles;
    /// `w = d * (q - 16)`.
    Q5_0,
    /// 24 bytes per 32 weights: f16 `d`, f16 `m`, 32 fifth bits, nibbles; `w = d * q + m`.
    Q5_1,
    /// 144 bytes per 256 weights: f16 `d`, `dmin`, 8 pairs of 6-bit scale and minimum,
    /// nibbles; `w = d * sc * q - dmin * m` per 32 weights.
    Q4K,
    /// 176 bytes per 256 weights: Q4_K with a fifth bit per weight.
    Q5K,
    /// 210 bytes per 256 weights: low nibbles, 2 high bits, 16 signed 8-bit scales (one
    /// per 16 weights), f16 `d`; `w = d * sc * (q - 32)`.
    Q6K,
}

impl KType {
    /// Weights per block.
    pub(crate) const fn weights(self) -> usize {
        match self {
            Self::Q5_0 | Self::Q5_1 => 32,
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub(crate) const fn bytes(self) -> usize {
        match self {
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }
}

/// A block's integer multipliers per 16 weights, decoded once per block. With the block's
/// two f16 fields `d` and `e` ([`Layout::header`]) and the signed codes of chunk `c`
/// ([`Layout::codes`]): `w[32c + l] = code[l] * (d * sc[2c + l / 16]) (+ e * m[2c + l / 16])`,
/// every product exact (small integers times an f16).
#[derive(Clone, Copy)]
struct Scales {
    /// Scale multipliers of `d`.
    sc: [f32; 16],
    /// Minimum multipliers of `e` (signed: K-quants subtract).
    m: [f32; 16],
}

/// One block type's layout.
trait Layout {
    /// Bytes per block.
    const BYTES: usize;
    /// 32-weight chunks per block.
    const CHUNKS: usize;
    /// Whether weights add a minimum (`fma`) or are a plain product.
    const ASYM: bool;
    /// The block's f16 scale `d` and second f16 `e` (minimum or `dmin`; zero bytes if none),
    /// little-endian, as [`Simd::splat_f16_pair`] takes them.
    fn header(b: &[u8]) -> [u8; 4];
    /// The multipliers of block `b`.
    fn scales(b: &[u8]) -> Scales;
    /// The signed codes (bytes of `i8`) of chunk `c` (< `CHUNKS`) of block `b`.
    fn codes(b: &[u8], c: usize) -> [u8; 32];
}

/// The f16 pair of `header` as f32.
#[inline(always)]
fn f16_pair(h: [u8; 4]) -> (f32, f32) {
    let f = |a: u8, b: u8| half::f16::from_bits(u16::from_le_bytes([a, b])).to_f32();
    (f(h[0], h[1]), f(h[2], h[3]))
}

/// Bytes `at..at + N` of `b` as an array (zeros if `b` is short; callers pass whole blocks).
#[inline(always)]
fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b.get(at..)
        .and_then(|r| r.first_chunk::<N>())
        .copied()
        .unwrap_or([0; N])
}

/// The fifth bits and nibbles of Q5_0/Q5_1 (`qh` at `at`, 16 nibble bytes after it) as
/// codes 0..32 less `offset`: weight `j < 16` is byte `j`'s low nibble, `j + 16` its high
/// nibble; the fifth bit of weight `j` is bit `j` of `qh`.
#[inline(always)]
fn q5_codes(b: &[u8], at: usize, offset: u8) -> [u8; 32] {
    let qh = u32::from_le_bytes(array::<4>(b, at));
    let qs = array::<16>(b, at + 4);
    let mut codes = [0u8; 32];
    let (lo, hi) = codes.split_at_mut(16);
    for (j, ((l, h), q)) in lo.iter_mut().zip(hi.iter_mut()).zip(qs).enumerate() {
        let bit_lo = ((qh >> j) & 1) as u8;
        let bit_hi = ((qh >> (j + 16)) & 1) as u8;
        *l = ((q & 0x0F) | (bit_lo << 4)).wrapping_sub(offset);
        *h = ((q >> 4) | (bit_hi << 4)).wrapping_sub(offset);
    }
    codes
}

/// Q4_K/Q5_K's 6-bit scale and minimum of chunk `j` from the 12 packed bytes `q`
/// (llama.cpp's `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[(j + 4) % 12] & 0x0F) | ((q[(j + 8) % 12] >> 6) << 4),
            (q[(j + 4) % 12] >> 4) | ((q[j % 12] >> 6) << 4),
        )
    }
}

struct Q5_0;
struct Q5_1;
struct Q4K;
struct Q5K;
struct Q6K;

impl Layout for Q5_0 {
    const BYTES: usize = 22;
    const CHUNKS: usize = 1;
    const ASYM: bool = false;
    #[inline(always)]
    fn header(b: &[u8]) -> [u8; 4] {
        let [d0, d1] = array::<2>(b, 0);
        [d0, d1, 0, 0]
    }
    #[inline(always)]
    fn scales(_: &[u8]) -> Scales {
        Scales {
            sc: [1.0; 16],
            m: [0.0; 16],
        }
    }
    #[inline(always)]
    fn codes(b: &[u8], _: usize) -> [u8; 32] {
        q5_codes(b, 2, 16)
    }
}

impl Layout for Q5_1 {
    const BYTES: usize = 24;
    const CHUNKS: usize = 1;
    const ASYM: bool = true;
    #[inline(always)]
    fn header(b: &[u8]) -> [u8; 4] {
        array::<4>(b, 0)
    }
    #[inline(always)]
    fn scales(_: &[u8]) -> Scales {
        Scales {
            sc: [1.0; 16],
            m: [1.0; 16],
        }
    }
    #[inline(always)]
    fn codes(b: &[u8], _: usize) -> [u8; 32] {
        q5_codes(b, 4, 0)
    }
}

/// Q4_K and Q5_K's multipliers: chunk `c` has scale `d * sc` and minimum `-(dmin * m)`.
#[inline(always)]
fn k4_scales(b: &[u8]) -> Scales {
    let packed = array::<12>(b, 4);
    let mut s = Scales {
        sc: [0.0; 16],
        m: [0.0; 16],
    };
    for c in 0..8 {
        let (sc, m) = scale_min_k4(c, &packed);
        s.sc[2 * c] = f32::from(sc);
        s.sc[2 * c + 1] = f32::from(sc);
        s.m[2 * c] = -f32::from(m);
        s.m[2 * c + 1] = -f32::from(m);
    }
    s
}

/// Q4_K and Q5_K: chunk `c` holds the low (even `c`) or high nibbles of bytes
/// `32 * (c / 2)..` of the quants `qs`, with bit `c` of `qh[l]` as the fifth bit when `qh`
/// is given.
#[inline(always)]
fn k4_codes(b: &[u8], c: usize, qh: Option<[u8; 32]>, qs: usize) -> [u8; 32] {
    let q = array::<32>(b, qs + 32 * (c / 2));
    let shift = 4 * (c % 2);
    let mut codes = [0u8; 32];
    for (code, q) in codes.iter_mut().zip(q) {
        *code = (q >> shift) & 0x0F;
    }
    // A separate pass, so that each loop is one straight vectorizable body.
    if let Some(qh) = qh {
        for (code, h) in codes.iter_mut().zip(qh) {
            *code |= ((h >> c) & 1) << 4;
        }
    }
    codes
}

impl Layout for Q4K {
    const BYTES: usize = 144;
    const CHUNKS: usize = 8;
    const ASYM: bool = true;
    #[inline(always)]
    fn header(b: &[u8]) -> [u8; 4] {
        array::<4>(b, 0)
    }
    #[inline(always)]
    fn scales(b: &[u8]) -> Scales {
        k4_scales(b)
    }
    #[inline(always)]
    fn codes(b: &[u8], c: usize) -> [u8; 32] {
        k4_codes(b, c, None, 16)
    }
}

impl Layout for Q5K {
    const BYTES: usize = 176;
    const CHUNKS: usize = 8;
    const ASYM: bool = true;
    #[inline(always)]
    fn header(b: &[u8]) -> [u8; 4] {
        array::<4>(b, 0)
    }
    #[inline(always)]
    fn scales(b: &[u8]) -> Scales {
        k4_scales(b)
    }
    #[inline(always)]
    fn codes(b: &[u8], c: usize) -> [u8; 32] {
        k4_codes(b, c, Some(array::<32>(b, 16)), 48)
    }
}

impl Layout for Q6K {
    const BYTES: usize = 210;
    const CHUNKS: usize = 8;
    const ASYM: bool = false;
    #[inline(always)]
    fn header(b: &[u8]) -> [u8; 4] {
        let [d0, d1] = array::<2>(b, 208);
        [d0, d1, 0, 0]
    }
    #[inline(always)]
    fn scales(b: &[u8]) -> Scales {
        // Scale `j` (of 16, one per 16 weights in order) is the signed byte 192 + j.
        let raw = array::<16>(b, 192);
        Scales {
            sc: raw.map(|x| f32::from(x as i8)),
            m: [0.0; 16],
        }
    }
    #[inline(always)]
    fn codes(b: &[u8], c: usize) -> [u8; 32] {
        // Half `h` of the block (128 weights) reads ql[64h..], qh[32h..], scales[8h..];
        // its chunk k takes nibble k / 2 of ql[32 * (k % 2) + l] and bits 2k..2k+2 of qh[l].
        let (h, k) = (c / 4, c % 4);
        let ql = array::<32>(b, 64 * h + 32 * (k % 2));
        let qh = array::<32>(b, 128 + 32 * h);
        let (nib_shift, high_shift) = (4 * (k / 2), 2 * k);
        let mut codes = [0u8; 32];
        for ((code, ql), qh) in codes.iter_mut().zip(ql).zip(qh) {
            let q = ((ql >> nib_shift) & 0x0F) | (((qh >> high_shift) & 3) << 4);
            *code = q.wrapping_sub(32);
        }
        codes
    }
}

/// Chunk `c` of block `b` as 32 f32, portable (`d`, `e`: the block's [`Layout::header`]).
#[inline(always)]
fn chunk_scalar<L: Layout>(
    b: &[u8],
    c: usize,
    (d, e): (f32, f32),
    sm: &Scales,
    out: &mut [f32; 32],
) {
    let codes = L::codes(b, c);
    for (l, (o, &q)) in out.iter_mut().zip(&codes).enumerate() {
        let h = (2 * c + l / 16) % 16;
        let w = f32::from(q as i8) * (d * sm.sc[h]);
        // The product is exact (see the module comment), so this rounds as `fma` does.
        *o = if L::ASYM { w + e * sm.m[h] } else { w };
    }
}

/// Chunk `c` of block `b` as 32 f32 in vectors (`d`, `e`: the block's header, broadcast).
#[inline(always)]
fn chunk_simd<S: Simd, L: Layout>(
    s: S,
    b: &[u8],
    c: usize,
    (d, e): (S::F32, S::F32),
    sm: &Scales,
) -> S::X32 {
    let (h0, h1) = ((2 * c) % 16, (2 * c + 1) % 16);
    let scale = [s.mul(d, s.splat(sm.sc[h0])), s.mul(d, s.splat(sm.sc[h1]))];
    let min = [s.mul(e, s.splat(sm.m[h0])), s.mul(e, s.splat(sm.m[h1]))];
    let mut x = s.codes32_i8(&L::codes(b, c));
    for (i, v) in x.as_mut().iter_mut().enumerate() {
        let half = (i * S::LANES / 16) % 2;
        *v = if L::ASYM {
            s.fma(*v, scale[half], min[half])
        } else {
            s.mul(*v, scale[half])
        };
    }
    x
}

/// Dequantizes a row of blocks (`out.len()` a multiple of the block's weights).
struct Dequantize<'a, L> {
    row: &'a [u8],
    out: &'a mut [f32],
    _layout: core::marker::PhantomData<L>,
}

impl<L: Layout> Kernel for Dequantize<'_, L> {
    type Output = ();
    fn scalar(self) {
        let chunks = self.out.as_chunks_mut::<32>().0;
        for (bi, b) in self.row.chunks_exact(L::BYTES).enumerate() {
            let (de, sm) = (f16_pair(L::header(b)), L::scales(b));
            for c in 0..L::CHUNKS {
                if let Some(o) = chunks.get_mut(bi * L::CHUNKS + c) {
                    chunk_scalar::<L>(b, c, de, &sm, o);
                }
            }
        }
    }
    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        let chunks = self.out.as_chunks_mut::<32>().0;
        for (bi, b) in self.row.chunks_exact(L::BYTES).enumerate() {
            let (de, sm) = (s.splat_f16_pair(L::header(b)), L::scales(b));
            for c in 0..L::CHUNKS {
                if let Some(o) = chunks.get_mut(bi * L::CHUNKS + c) {
                    s.store32(o, chunk_simd::<S, L>(s, b, c, de, &sm));
                }
            }
        }
    }
}

/// Activation rows one pass over a weight row serves: each 32-weight chunk is unpacked once
/// for up to this many rows (4 accumulators of 32 lanes).
const ROWS_PER_PASS: usize = 4;

/// `out[j * n + i] = dot(weight row j, x row i)` for the weight rows of `rows`.
struct DotMatrix<'a, L> {
    rows: &'a [u8],
    row_bytes: usize,
    x: &'a [f32],
    cols: usize,
    n: usize,
    out: &'a mut [f32],
    _layout: core::marker::PhantomData<L>,
}

impl<L: Layout> Kernel for DotMatrix<'_, L> {
    type Output = ();
    fn scalar(self) {
        let (cols, n) = (self.cols, self.n);
        let mut w = [0f32; 32];
        for (row, out) in self
            .rows
            .chunks_exact(self.row_bytes)
            .zip(self.out.chunks_exact_mut(n))
        {
            out.fill(0.0);
            for (bi, b) in row.chunks_exact(L::BYTES).enumerate() {
                let (de, sm) = (f16_pair(L::header(b)), L::scales(b));
                for c in 0..L::CHUNKS {
                    chunk_scalar::<L>(b, c, de, &sm, &mut w);
                    let at = (bi * L::CHUNKS + c) * 32;
                    for (i, o) in out.iter_mut().enumerate() {
                        let xs = &self.x[i * cols + at..][..32];
                        *o += w.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
                    }
                }
            }
        }
    }
    #[inline(always)]
    fn simd<S: Simd>(self, s: S) {
        let (cols, n) = (self.cols, self.n);
        for (row, out) in self
            .rows
            .chunks_exact(self.row_bytes)
            .zip(self.out.chunks_exact_mut(n))
        {
            for (p, out) in out.chunks_mut(ROWS_PER_PASS).enumerate() {
                let mut acc = [s.zero32(); ROWS_PER_PASS];
                let first = p * ROWS_PER_PASS;
                for (bi, b) in row.chunks_exact(L::BYTES).enumerate() {
                    let (de, sm) = (s.splat_f16_pair(L::header(b)), L::scales(b));
                    for c in 0..L::CHUNKS {
                        let w = chunk_simd::<S, L>(s, b, c, de, &sm);
                        let at = (bi * L::CHUNKS + c) * 32;
                        for (i, a) in acc.iter_mut().take(out.len()).enumerate() {
                            let Some(xs) = self.x.get((first + i) * cols + at..) else {
                                continue;
                            };
                            let Some(xs) = xs.first_chunk::<32>() else {
                                continue;
                            };
                            let xv = s.load32(xs);
                            for ((a, x), w) in
                                a.as_mut().iter_mut().zip(xv.as_ref()).zip(w.as_ref())
                            {
                                *a = s.fma(*x, *w, *a);
                            }
                        }
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = s.sum32(a);
                }
            }
        }
    }
}

/// Runs `$body` with `L` bound to the layout type of `$ty`.
macro_rules! with_layout {
    ($ty:expr, $body:ident!($($arg:tt)*)) => {
        match $ty {
            KType::Q5_0 => $body!(Q5_0, $($arg)*),
            KType::Q5_1 => $body!(Q5_1, $($arg)*),
            KType::Q4K => $body!(Q4K, $($arg)*),
            KType::Q5K => $body!(Q5K, $($arg)*),
            KType::Q6K => $body!(Q6K, $($arg)*),
        }
    };
}

/// Weight row `row` (whole blocks of `ty`) as f32 into `out` (as many weights), at `isa`.
pub(crate) fn dequantize_row(isa: Isa, ty: KType, row: &[u8], out: &mut [f32]) {
    macro_rules! go {
        ($l:ty,) => {
            isa.run(Dequantize::<$l> {
                row,
                out,
                _layout: core::marker::PhantomData,
            })
        };
    }
    with_layout!(ty, go!())
}

/// `out[j * n + i] = dot(weight row j of rows, x row i)` (weight rows of `cols` weights,
/// `n` activation rows), at `isa`.
pub(crate) fn dot_matrix(
    isa: Isa,
    ty: KType,
    rows: &[u8],
    x: &[f32],
    cols: usize,
    n: usize,
    out: &mut [f32],
) {
    let row_bytes = cols / ty.weights() * ty.bytes();
    if row_bytes == 0 || n == 0 {
        out.fill(0.0);
        return;
    }
    macro_rules! go {
        ($l:ty,) => {
            isa.run(DotMatrix::<$l> {
                rows,
                row_bytes,
                x,
                cols,
                n,
                out,
                _layout: core::marker::PhantomData,
            })
        };
    }
    with_layout!(ty, go!())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_agree_with_the_type_table() {
        assert_eq!(Q5_0::BYTES, KType::Q5_0.bytes());
        assert_eq!(Q5_1::BYTES, KType::Q5_1.bytes());
        assert_eq!(Q4K::BYTES, KType::Q4K.bytes());
        assert_eq!(Q5K::BYTES, KType::Q5K.bytes());
        assert_eq!(Q6K::BYTES, KType::Q6K.bytes());
        for (chunks, ty) in [
            (Q5_0::CHUNKS, KType::Q5_0),
            (Q5_1::CHUNKS, KType::Q5_1),
            (Q4K::CHUNKS, KType::Q4K),
            (Q5K::CHUNKS, KType::Q5K),
            (Q6K::CHUNKS, KType::Q6K),
        ] {
            assert_eq!(chunks * 32, ty.weights());
        }
    }

    #[test]
    fn scale_min_k4_unpacks_six_bit_pairs() {
        // Chunks 0..4 read the low 6 bits of bytes j and j + 4; chunks 4..8 combine a
        // nibble of byte j + 4 with the top 2 bits of bytes j - 4 and j.
        let mut q = [0u8; 12];
        q[1] = 0b11_000101; // scale of chunk 1 = 5, top bits 3 go to chunk 5's scale
        q[5] = 0b10_001001; // minimum of chunk 1 = 9, top bits 2 go to chunk 5's minimum
        q[9] = 0x7C; // chunk 5: scale nibble 0xC, minimum nibble 0x7
        assert_eq!(scale_min_k4(1, &q), (5, 9));
        assert_eq!(scale_min_k4(5, &q), (0x3C, 0x27));
    }
}
