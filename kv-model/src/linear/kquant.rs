//! The GGUF block types that add a fifth or sixth bit or mix scales within a block: Q5_0,
//! Q5_1 (32 weights) and the K-quants Q4_K, Q5_K, Q6_K (256-weight super-blocks), the types
//! a Q4_K_M file mixes. Each is a [`Format`] for the kernels of `linear/matvec.rs`.
//!
//! Decoding follows the 4-bit blocks': a code of 4 or 5 bits stands for one of 16 or 32
//! weights of its chunk (`code * scale + min`), computed once per chunk into a table that
//! [`Simd::lookup16_nibbles`] / [`Simd::lookup32`] / [`Simd::lookup32_split`] read with
//! lane permutes at 512 bits (Q5_K's 5-bit codes assembled in registers with
//! [`Simd::Bytes32`]'s bit operations). Q6_K's 64 possible weights change every 16
//! weights, so its assembled codes are converted and scaled instead. The K-quants' scales
//! (and minimums) are unpacked and multiplied once per super-block, not per chunk. Weights equal candle's `dequantize` bit for bit: every scale is an f16
//! times an integer of at most 8 bits, exact in f32, and a code of at most 6 bits times it
//! is exact again, so `code * scale + min` rounds once however it is computed (fused or
//! not). The symmetric types multiply only (no `+ 0.0`, which would turn candle's `-0.0`
//! into `+0.0`).
//!
//! Q5_0's dot products (the matrix-vector kernel's sinks, [`Sink::sums_products`]) take
//! a shortcut: a 5-bit code's low 4 bits looked up in a 16-entry table and `16 d` added
//! under the fifth-bit mask (exact, but `+0.0` where candle's product is `-0.0`, which no
//! sum can see). Dequantization keeps candle's bits.
//!
//! The matrix-vector kernel does not take Q4_K, Q5_K or Q6_K chunk by chunk at all
//! ([`Format::WORDS`]): their `dot_words` load the packed nibbles as 32-bit lanes, take one
//! vector of codes per shift ([`Simd::nibble_f32`], [`Simd::field6_f32`]; Q5_K's fifth
//! bits joined to the nibbles in bytes, 4 vectors at a time, [`Simd::nibble_bit4_i32`],
//! then [`Simd::code5_f32`]) and multiply it with
//! activations reordered once per call to match ([`Format::word_order`]); each vector's
//! partial sum is then scaled once by its chunks' scales ([`Simd::permute_f32`]), and
//! the minimums (Q6_K's `-32 d sc`) go against per-call activation sums. Measured
//! against the chunk-by-chunk kernels in docs/measurements.md ("K-quant kernels: codes
//! straight from words").

use kv_quant::simd::Simd;

use core::marker::PhantomData;

use super::matvec::{
    bytes, f16_at, fma_sums, slot, xvec, Chunk, Format, Sink, XChunk, CHUNK, SUMS,
};

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

/// Makes the compiler read a super-block's table of scales back from memory: each chunk's
/// scale then is one broadcast from memory (a load), where the compiler would otherwise
/// take it out of the vector it stored with two lane shuffles (seen in the profile).
/// Measured faster for Q6_K (16 scales, two per chunk), slower for Q4_K/Q5_K.
#[inline(always)]
fn memory_operands(t: &mut [f32; 32]) {
    core::hint::black_box(t);
}

/// All 8 of Q4_K/Q5_K's 6-bit scales (bytes 0..8) and minimums (bytes 16..24) of the 12
/// packed bytes `q` at once, in 32-bit words: [`scale_min_k4`] for every chunk.
#[inline(always)]
fn scales_mins_k4(q: &[u8; 12]) -> [u8; 32] {
    const LOW6: u32 = 0x3F3F_3F3F;
    const LOW4: u32 = 0x0F0F_0F0F;
    const LOW2: u32 = 0x0303_0303;
    let (w0, w1, w2) = (
        u32::from_le_bytes(*bytes::<4>(q, 0)),
        u32::from_le_bytes(*bytes::<4>(q, 4)),
        u32::from_le_bytes(*bytes::<4>(q, 8)),
    );
    // Chunks 0..4: the low 6 bits of bytes j and j + 4. Chunks 4..8: a nibble of byte
    // j + 4 and the top 2 bits of byte j - 4 (scale) or j (minimum).
    let words = [
        w0 & LOW6,
        (w2 & LOW4) | (((w0 >> 6) & LOW2) << 4),
        w1 & LOW6,
        ((w2 >> 4) & LOW4) | (((w1 >> 6) & LOW2) << 4),
    ];
    let mut out = [0u8; 32];
    for (at, w) in [0, 4, 16, 20].into_iter().zip(words) {
        out[at..at + 4].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Where the codes of a 256-weight block come out when its 128 bytes of packed nibbles
/// are loaded `4 * lanes` bytes at a time as i32 lanes (load `z`) and vector `j` (`< 8`)
/// of that load is [`Simd::field_f32`] at bit `4 j`: lane `i` holds nibble `j % 2` of byte
/// `4 lanes z + 4 i + j / 2` of the 128. Returns (load `z`, byte, nibble) for place `k`
/// of the reordered activations ([`Format::word_order`]).
const fn word_place(lanes: usize, k: usize) -> (usize, usize, usize) {
    let (v, i) = (k / lanes, k % lanes);
    let (z, j) = (v / 8, v % 8);
    (z, 4 * lanes * z + 4 * i + j / 2, j % 2)
}

/// Per-lane constants of the [`Format::dot_words`] kernels at `S::LANES` lanes, by load
/// `z` of a block's nibbles (at most 4 loads: 128 bytes, 32 at a time at 256 bits).
struct WordLanes<S>(PhantomData<S>);

impl<S: Simd> WordLanes<S> {
    /// Q4_K/Q5_K: the 32-byte nibble group (pair of chunks) of lane `i` of load `z`.
    const fn k4_pair(z: usize, i: usize) -> usize {
        (4 * S::LANES * z + 4 * i) / 32
    }
    /// Q4_K/Q5_K: lane `i` of load `z`, nibble `n`, belongs to chunk `2 pair + n`: the
    /// lane of that chunk's scale in the block's scale vector.
    const K4_SCALE: [[[u32; 16]; 2]; 4] = {
        let mut t = [[[0u32; 16]; 2]; 4];
        let mut z = 0;
        while z < 4 {
            let mut i = 0;
            while i < 16 {
                let pair = Self::k4_pair(z, i) as u32;
                t[z][0][i] = 2 * pair;
                t[z][1][i] = 2 * pair + 1;
                i += 1;
            }
            z += 1;
        }
        t
    };
    /// Q6_K: bit `k % 2` of lane `i`'s chunk `k` within its half (the 32-byte half of
    /// the 64 bytes of `ql` the lane reads), times 2: the shift that brings its 2 high
    /// bits of `qh` to bit `8 (j / 2) + 4 (j % 2)` of vector `j`.
    const Q6_SHIFT: [[u32; 16]; 4] = {
        let mut t = [[0u32; 16]; 4];
        let mut z = 0;
        while z < 4 {
            let mut i = 0;
            while i < 16 {
                t[z][i] = 2 * (((4 * S::LANES * z + 4 * i) % 64) / 32) as u32;
                i += 1;
            }
            z += 1;
        }
        t
    };
    /// Q6_K: lane `i` of load `z`, nibble `n`: its 16-weight scale group modulo the lane
    /// count (within the scale vector [`Q6K::dot_words`] picks for the load).
    const Q6_SCALE: [[[u32; 16]; 2]; 4] = {
        let mut t = [[[0u32; 16]; 2]; 4];
        let mut z = 0;
        while z < 4 {
            let mut i = 0;
            while i < 16 {
                let q = 4 * S::LANES * z + 4 * i;
                let (h, p, l16) = (q / 64, (q % 64) / 32, (q % 32) / 16);
                let mut n = 0;
                while n < 2 {
                    t[z][n][i] = ((8 * h + 4 * n + 2 * p + l16) % S::LANES) as u32;
                    n += 1;
                }
                i += 1;
            }
            z += 1;
        }
        t
    };
}

/// Q5_0 (`MIN = false`; 22 bytes: f16 `d`, 32 fifth bits, 16 bytes of nibbles;
/// `w = (q - 16) * d`) and Q5_1 (`MIN = true`; 24 bytes: f16 `d`, f16 `m`, then the same;
/// `w = q * d + m`).
pub(super) struct Q5<const MIN: bool>;

impl<const MIN: bool> Q5<MIN> {
    /// Offset of the fifth bits (a little-endian `u32`, bit `j` for weight `j`), followed by
    /// the nibbles in GGUF's split order.
    const QH: usize = if MIN { 4 } else { 2 };
}

impl<const MIN: bool> Format for Q5<MIN> {
    const BYTES: usize = if MIN { 24 } else { 22 };
    const CHUNKS: usize = 1;
    fn block_scalar(b: &[u8], out: &mut [f32]) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let qh = u32::from_le_bytes(*bytes::<4>(b, Self::QH));
        for (j, &q) in bytes::<16>(b, Self::QH + 4).iter().enumerate() {
            let lo = (q & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
            let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            for (at, code) in [(j, lo), (j + CHUNK / 2, hi)] {
                out[at] = if MIN {
                    f32::from(code) * d + m
                } else {
                    f32::from(code as i8 - 16) * d
                };
            }
        }
    }
    #[inline(always)]
    fn block_simd<S: Simd>(s: S, b: &[u8], sink: &mut impl Sink<S>) {
        let (d, m) = s.splat_f16_pair(*bytes::<4>(b, 0));
        let qh = u32::from_le_bytes(*bytes::<4>(b, Self::QH));
        let q = bytes::<16>(b, Self::QH + 4);
        let w = if MIN {
            s.lookup32_split(s.lut32_affine(d, m), q, qh)
        } else if sink.sums_products() {
            // A dot product: a zero weight's sign does not matter (one-table lookups).
            s.lookup32_split_centered_dot(d, q, qh)
        } else {
            s.lookup32_split(s.lut32_centered(d), q, qh)
        };
        sink.chunk(0, Chunk::weights(w));
    }
}

/// Q5_0.
pub(super) type Q5_0 = Q5<false>;
/// Q5_1.
pub(super) type Q5_1 = Q5<true>;

/// Q4_K (`FIFTH = false`; 144 bytes) and Q5_K (`FIFTH = true`; 176 bytes): f16 `d` and
/// `dmin`, 8 pairs of 6-bit scale `sc` and minimum `m` packed in 12 bytes, (Q5_K: 32
/// bytes of fifth bits,) 128 bytes of nibbles; chunk `c` has `w = d * sc * q - dmin * m`.
/// Chunk `c` holds the low (even `c`) or high nibbles of bytes `32 * (c / 2)..` of the
/// nibbles, with bit `c` of the fifth-bit byte `l` as weight `l`'s fifth bit.
pub(super) struct K4<const FIFTH: bool>;

impl<const FIFTH: bool> K4<FIFTH> {
    /// Offset of the fifth bits (Q5_K).
    const QH: usize = 16;
    /// Offset of the nibbles.
    const QS: usize = if FIFTH { 48 } else { 16 };

    /// Chunk `c`'s integer scale and (negated) minimum, as f32.
    #[inline(always)]
    fn scale_min(b: &[u8], c: usize) -> (f32, f32) {
        let (sc, m) = scale_min_k4(c, bytes::<12>(b, 4));
        (f32::from(sc), -f32::from(m))
    }

    /// Every chunk's `d * sc` (`t[c]`) and `dmin * -m` (`t[16 + c]`), computed once per
    /// super-block: the 8 scale/minimum pairs unpacked with word-wide bit operations, then
    /// converted and multiplied in vectors (exact products, the values the scalar twin
    /// computes). The chunks then broadcast their pair from `t`.
    #[inline(always)]
    fn tables<S: Simd>(s: S, b: &[u8], t: &mut [f32; 32]) {
        let (d, dmin) = s.splat_f16_pair(*bytes::<4>(b, 0));
        let ndmin = s.mul(dmin, s.splat(-1.0));
        let mut v = s.codes32_i8(&scales_mins_k4(bytes::<12>(b, 4)));
        for (i, v) in v.as_mut().iter_mut().enumerate() {
            // Lanes 0..16 hold the scales (8 of them), 16..32 the minimums.
            *v = s.mul(*v, if i * S::LANES < 16 { d } else { ndmin });
        }
        // (Read back with lane shuffles, as the compiler chooses: measured faster here
        // than [`memory_operands`]' broadcasts from memory, unlike Q6_K's.)
        s.store32(t, v);
    }

    /// The block's `d * sc` (lane `c` chunk `c`'s) and `dmin * -m` vectors (lanes past 8
    /// zero): [`Self::tables`] without the store, for [`Format::dot_words`].
    #[inline(always)]
    fn scales_mins<S: Simd>(s: S, b: &[u8]) -> (S::F32, S::F32) {
        let (d, dmin) = s.splat_f16_pair(*bytes::<4>(b, 0));
        let v = s.codes32_i8(&scales_mins_k4(bytes::<12>(b, 4)));
        let v = v.as_ref();
        let sc = v.first().copied().unwrap_or(s.zero());
        let m = v.get(16 / S::LANES).copied().unwrap_or(s.zero());
        (s.mul(sc, d), s.mul(m, s.mul(dmin, s.splat(-1.0))))
    }

    /// The fifth bits of chunk `c` moved to bit 4 of each byte.
    #[inline(always)]
    fn fifth<S: Simd>(s: S, qh: S::Bytes32, c: usize) -> S::Bytes32 {
        let at = if c >= 4 {
            s.shr_bytes32(qh, (c - 4) as u32)
        } else {
            s.shl_bytes32(qh, (4 - c) as u32)
        };
        s.and_bytes32(at, 0x10)
    }
}

impl<const FIFTH: bool> Format for K4<FIFTH> {
    const BYTES: usize = if FIFTH { 176 } else { 144 };
    const CHUNKS: usize = 8;
    const WORDS: bool = true;
    const WORD_ORDER: u8 = 1;
    fn word_order(lanes: usize, k: usize) -> usize {
        // Byte `l` of nibble group `pair` holds weight `l` of chunks `2 pair` (low
        // nibble) and `2 pair + 1`.
        let (_, byte, n) = word_place(lanes, k);
        64 * (byte / 32) + 32 * n + byte % 32
    }
    #[inline(always)]
    fn dot_words<S: Simd, const N: usize>(
        s: S,
        b: &[u8],
        x: [&[XChunk; 8]; N],
        sums: [&[f32; SUMS]; N],
        acc: &mut [[S::X32; 2]; N],
    ) {
        // `Σ (a_c q - m_c) x = Σ_c a_c Σ q x - Σ_c m_c Σ x`: the codes' dot products per
        // vector of 16 (8) codes, which holds 2 chunks' (1 chunk's) lanes, scaled once
        // by a vector of those chunks' scales; the minimums against the sums. Q5_K adds
        // 16 where the fifth bit is set (exact).
        let (sc, mins) = Self::scales_mins(s, b);
        for r in 0..N {
            fma_sums(s, &[mins], sums[r], &mut acc[r]);
        }
        let (words, _) = S::words(bytes::<128>(b, Self::QS));
        let qh = s.load_i32_bytes32(bytes::<32>(b, Self::QH));
        for (z, w) in words.iter().enumerate() {
            let v = s.load_i32_bytes(w);
            // Q5_K: the fifth bits' words shifted right by `2 pair` per lane (the scale
            // lanes of nibble 0), so that bit `8 q + n` is the fifth bit of vector
            // `j = 2 q + n`'s lane (bit `c` of byte `l` is weight `l`'s of chunk `c`);
            // then moved to bit 4 of byte `q` under the nibbles of vector `j` (`n` = 0:
            // the low nibbles, 1: the high nibbles shifted down), 4 vectors' 5-bit codes
            // one byte each: a shift and a permute per vector, as Q4_K's nibbles.
            let five = if FIFTH {
                let h = s.shr_i32_lanes(qh, &WordLanes::<S>::K4_SCALE[z % 4][0]);
                [s.nibble_bit4_i32(v, 0, h, 4), s.nibble_bit4_i32(v, 4, h, 3)]
            } else {
                [v, v]
            };
            for (n, five) in five.into_iter().enumerate() {
                let mut t = [s.zero(); N];
                for q in 0..4 {
                    let j = 2 * q + n;
                    let c = if FIFTH {
                        s.code5_f32(five, 8 * q as u32)
                    } else {
                        s.nibble_f32(v, 4 * j as u32)
                    };
                    for r in 0..N {
                        t[r] = s.fma(c, xvec(s, x[r], 8 * z + j), t[r]);
                    }
                }
                let scale = s.permute_f32(sc, &WordLanes::<S>::K4_SCALE[z % 4][n]);
                for r in 0..N {
                    let a = slot::<S>(&mut acc[r], 2 * z + n);
                    *a = s.fma(t[r], scale, *a);
                }
            }
        }
    }
    fn block_scalar(b: &[u8], out: &mut [f32]) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let qh = bytes::<32>(b, Self::QH);
        for (c, out) in out.chunks_exact_mut(CHUNK).enumerate().take(8) {
            let (sc, m) = Self::scale_min(b, c);
            let (scale, min) = (d * sc, dmin * m);
            let qs = bytes::<32>(b, Self::QS + 32 * (c / 2));
            for ((o, q), h) in out.iter_mut().zip(qs).zip(qh) {
                let mut code = (q >> (4 * (c % 2))) & 0x0F;
                if FIFTH {
                    code |= ((h >> c) & 1) << 4;
                }
                // The product is exact (see the module comment): one rounding, as `fma`.
                *o = f32::from(code) * scale + min;
            }
        }
    }
    #[inline(always)]
    fn block_simd<S: Simd>(s: S, b: &[u8], sink: &mut impl Sink<S>) {
        // `d * sc` and `dmin * -m` of every chunk, once per super-block. (Dot products
        // never come here: [`Format::dot_words`] takes them.)
        let mut t = [0f32; 32];
        Self::tables(s, b, &mut t);
        let qh = s.load_bytes32(bytes::<32>(b, Self::QH));
        for k in 0..4 {
            let (c0, c1) = (2 * k, 2 * k + 1);
            let (m0, m1) = (s.splat(t[16 + c0]), s.splat(t[16 + c1]));
            let (a0, a1) = (s.splat(t[c0]), s.splat(t[c1]));
            let qs = bytes::<32>(b, Self::QS + 32 * k);
            if FIFTH {
                let q = s.load_bytes32(qs);
                let lo = s.or_bytes32(s.and_bytes32(q, 0x0F), Self::fifth(s, qh, c0));
                let hi = s.or_bytes32(s.shr_bytes32(q, 4), Self::fifth(s, qh, c1));
                sink.chunk(c0, Chunk::weights(s.lookup32(s.lut32_affine(a0, m0), lo)));
                sink.chunk(c1, Chunk::weights(s.lookup32(s.lut32_affine(a1, m1), hi)));
            } else {
                let (lo, hi) =
                    s.lookup16_nibbles(s.lut16_affine(a0, m0), s.lut16_affine(a1, m1), qs);
                sink.chunk(c0, Chunk::weights(lo));
                sink.chunk(c1, Chunk::weights(hi));
            }
        }
    }
}

/// Q4_K.
pub(super) type Q4K = K4<false>;
/// Q5_K.
pub(super) type Q5K = K4<true>;

/// Q6_K: 210 bytes per 256 weights: 128 bytes of low nibbles `ql`, 64 of 2-bit high parts
/// `qh`, 16 signed 8-bit scales (one per 16 weights), f16 `d`; `w = d * sc * (q - 32)`.
/// Half `h` of the block (128 weights) reads `ql[64h..]`, `qh[32h..]`; its chunk `k` takes
/// nibble `k / 2` of `ql[64h + 32 * (k % 2) + l]` and bits `2k..2k + 2` of `qh[32h + l]`.
pub(super) struct Q6K;

impl Q6K {
    /// Chunk `c`'s low nibbles and high bits: (`ql` offset, nibble shift, `qh` offset,
    /// high-bit shift).
    #[inline(always)]
    fn at(c: usize) -> (usize, u32, usize, u32) {
        let (h, k) = (c / 4, c % 4);
        (
            64 * h + 32 * (k % 2),
            4 * (k / 2) as u32,
            128 + 32 * h,
            2 * k as u32,
        )
    }

    /// Scale `j` (of 16), a signed byte, as f32.
    #[inline(always)]
    fn scale(b: &[u8], j: usize) -> f32 {
        f32::from(bytes::<16>(b, 192)[j % 16] as i8)
    }
}

impl Format for Q6K {
    const BYTES: usize = 210;
    const CHUNKS: usize = 8;
    const WORDS: bool = true;
    const SUM_WEIGHTS: usize = 16;
    const WORD_ORDER: u8 = 2;
    fn word_order(lanes: usize, k: usize) -> usize {
        // Byte `l` of the 32-byte quarter `2 h + p` of `ql` holds weight `l` of chunks
        // `4 h + p` (low nibble) and `4 h + p + 2` (high).
        let (_, byte, n) = word_place(lanes, k);
        let (h, p, l) = (byte / 64, (byte % 64) / 32, byte % 32);
        128 * h + 32 * (2 * n + p) + l
    }
    #[inline(always)]
    fn dot_words<S: Simd, const N: usize>(
        s: S,
        b: &[u8],
        x: [&[XChunk; 8]; N],
        sums: [&[f32; SUMS]; N],
        acc: &mut [[S::X32; 2]; N],
    ) {
        // `Σ a_g (q - 32) x = Σ_g a_g Σ q x - 32 Σ_g a_g Σ x`, `g` the 16-weight scale
        // groups: the 6-bit codes' dot products per vector (lanes of 4 groups), scaled
        // once by those groups' scales; the offsets against the groups' sums (exact
        // `-32 a_g`).
        let [d0, d1] = *bytes::<2>(b, 208);
        let (d, _) = s.splat_f16_pair([d0, d1, 0, 0]);
        let mut sc = [0u8; 32];
        sc[..16].copy_from_slice(bytes::<16>(b, 192));
        let v = s.codes32_i8(&sc);
        let v = v.as_ref();
        let scv = [
            s.mul(v.first().copied().unwrap_or(s.zero()), d),
            s.mul(v.get(1).copied().unwrap_or(s.zero()), d),
        ];
        let groups = (SUMS / S::LANES).clamp(1, 2);
        let m32 = s.splat(-32.0);
        let offs = [s.mul(scv[0], m32), s.mul(scv[1], m32)];
        for r in 0..N {
            fma_sums(s, &offs[..groups], sums[r], &mut acc[r]);
        }
        let (words, _) = S::words(bytes::<128>(b, 0));
        for (z, w) in words.iter().enumerate() {
            let v = s.load_i32_bytes(w);
            let half = (4 * S::LANES * z) / 64;
            let qh = s.shr_i32_lanes(
                s.load_i32_bytes32(bytes::<32>(b, 128 + 32 * (half % 2))),
                &WordLanes::<S>::Q6_SHIFT[z % 4],
            );
            let scales = scv[(8 * half / S::LANES) % 2];
            for n in 0..2 {
                let mut t = [s.zero(); N];
                for q in 0..4 {
                    let j = 2 * q + n;
                    let c = s.field6_f32(v, 4 * j as u32, qh, (8 * q + 4 * n) as u32);
                    for r in 0..N {
                        t[r] = s.fma(c, xvec(s, x[r], 8 * z + j), t[r]);
                    }
                }
                let scale = s.permute_f32(scales, &WordLanes::<S>::Q6_SCALE[z % 4][n]);
                for r in 0..N {
                    let a = slot::<S>(&mut acc[r], 2 * z + n);
                    *a = s.fma(t[r], scale, *a);
                }
            }
        }
    }
    fn block_scalar(b: &[u8], out: &mut [f32]) {
        let d = f16_at(b, 208);
        for (c, out) in out.chunks_exact_mut(CHUNK).enumerate().take(8) {
            let (ql, nib, qh, high) = Self::at(c);
            let (ql, qh) = (bytes::<32>(b, ql), bytes::<32>(b, qh));
            for (l, ((o, ql), qh)) in out.iter_mut().zip(ql).zip(qh).enumerate() {
                let q = ((ql >> nib) & 0x0F) | (((qh >> high) & 3) << 4);
                *o = d * Self::scale(b, 2 * c + l / 16) * f32::from(q as i8 - 32);
            }
        }
    }
    #[inline(always)]
    fn block_simd<S: Simd>(s: S, b: &[u8], sink: &mut impl Sink<S>) {
        // `d * sc` of all 16 scales once per super-block (exact products), each chunk
        // then broadcasting its two.
        let [d0, d1] = *bytes::<2>(b, 208);
        let (d, _) = s.splat_f16_pair([d0, d1, 0, 0]);
        let mut sc = [0u8; 32];
        sc[..16].copy_from_slice(bytes::<16>(b, 192));
        let mut t = [0f32; 32];
        let mut v = s.codes32_i8(&sc);
        for v in v.as_mut() {
            *v = s.mul(*v, d);
        }
        s.store32(&mut t, v);
        memory_operands(&mut t);
        for c in 0..8 {
            let (ql, nib, qh, high) = Self::at(c);
            let (ql, qh) = (s.load_bytes32(bytes(b, ql)), s.load_bytes32(bytes(b, qh)));
            let lo = if nib == 0 {
                s.and_bytes32(ql, 0x0F)
            } else {
                s.shr_bytes32(ql, 4)
            };
            // Bits `high..high + 2` of `qh` to bits 4..6.
            let hi = if high >= 4 {
                s.shr_bytes32(qh, high - 4)
            } else {
                s.shl_bytes32(qh, 4 - high)
            };
            let code = s.sub_bytes32(s.or_bytes32(lo, s.and_bytes32(hi, 0x30)), 32);
            let scale = [s.splat(t[2 * c]), s.splat(t[2 * c + 1])];
            let mut w = s.i8_to_f32_32(code);
            for (i, v) in w.as_mut().iter_mut().enumerate() {
                *v = s.mul(*v, scale[(i * S::LANES / 16) % 2]);
            }
            sink.chunk(c, Chunk::weights(w));
        }
    }
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

    #[test]
    fn scales_mins_k4_unpacks_all_pairs_as_scale_min_k4() {
        // 2000 pseudo-random packings (xorshift), every chunk of each.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2000 {
            let q: [u8; 12] = core::array::from_fn(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            });
            let all = scales_mins_k4(&q);
            for j in 0..8 {
                assert_eq!(
                    (all[j], all[16 + j]),
                    scale_min_k4(j, &q),
                    "chunk {j} of {q:?}"
                );
            }
            assert!(all[8..16].iter().chain(&all[24..]).all(|&b| b == 0));
        }
    }
}
