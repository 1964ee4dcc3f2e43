//! The workspace's one SIMD layer: which instruction set to run, the proof that the CPU has
//! it, width-generic vector operations, and the helpers every kernel crate shares.
//!
//! - **One switch.** [`Isa::best`] detects the CPU once and obeys one environment variable,
//!   `KV_ISA` (`scalar`, `avx2` or `avx512`, any case): a cap for benchmarks and for
//!   bisecting a suspected SIMD bug without rebuilding. A level above what the CPU has, or
//!   an unknown name, is ignored (the best level runs). kv-quant, kv-backend-cpu and
//!   kv-model all ask [`Isa::best`], so one process runs one level everywhere.
//! - **One definition of each level.** [`Isa::Avx2`] is AVX2 + FMA + F16C;
//!   [`Isa::Avx512`] is that plus AVX-512 F, BW, VL and DQ. Every `#[target_feature]` in the
//!   workspace enables a subset of its level's set ([`AVX2_FEATURES`], [`AVX512_FEATURES`]).
//! - **Tokens.** On x86-64, [`V256`] and [`V512`] are zero-sized values that exist only on a
//!   CPU with the level's features (their constructors ask the cached detection). Holding one
//!   is what makes calling that level's `#[target_feature]` code sound.
//! - **Width-generic kernels.** [`Simd`] is implemented by both tokens: 8 or 16 f32 lanes,
//!   with `#[inline(always)]` operations on one vector and on a 32-element chunk (the group
//!   and block size of every quantized layout in the workspace). A kernel is written once as
//!   `fn k<S: Simd>(s: S, ..)` and run through [`Isa::run`], which instantiates it inside a
//!   `#[target_feature]` entry point per level (the technique of the pulp crate): the
//!   operations inline into code compiled for the level.
//!
//! ```
//! use kv_quant::simd::{Isa, Kernel, Simd};
//!
//! /// `sum x[i] * y[i]`, written once over the vector width.
//! struct Dot<'a>(&'a [f32], &'a [f32]);
//!
//! impl Kernel for Dot<'_> {
//!     type Output = f32;
//!     fn scalar(self) -> f32 {
//!         self.0.iter().zip(self.1).map(|(a, b)| a * b).sum()
//!     }
//!     #[inline(always)]
//!     fn simd<S: Simd>(self, s: S) -> f32 {
//!         let (x, xt) = S::lanes(self.0);
//!         let (y, yt) = S::lanes(self.1);
//!         let mut acc = s.zero();
//!         for (a, b) in x.iter().zip(y) {
//!             acc = s.fma(s.load(a), s.load(b), acc);
//!         }
//!         s.sum(acc) + xt.iter().zip(yt).map(|(a, b)| a * b).sum::<f32>()
//!     }
//! }
//!
//! let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.25).collect();
//! let exact: f32 = x.iter().map(|a| a * a).sum();
//! for isa in Isa::available() {
//!     let got = isa.run(Dot(&x, &x));
//!     assert!((got - exact).abs() <= 1e-3 * exact, "{isa}");
//! }
//! ```

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};

/// The `#[target_feature]` set of [`Isa::Avx2`] (a function may enable a subset).
pub const AVX2_FEATURES: &str = "avx2,fma,f16c";

/// The `#[target_feature]` set of [`Isa::Avx512`] (a function may enable a subset).
pub const AVX512_FEATURES: &str = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c";

/// An instruction-set level the kernels are compiled for.
///
/// The levels are ordered: every CPU with `Avx512` here also has `Avx2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust: the reference every other level is tested against, and the fallback on
    /// every other architecture.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C (Intel Haswell, AMD Zen and later).
    Avx2,
    /// [`Isa::Avx2`] plus AVX-512 F, BW, VL and DQ (Intel Skylake-SP, AMD Zen 4 and later).
    Avx512,
}

/// Detection results, 0 until asked: bit 0 set once detected, bit 1 AVX2, bit 2 AVX-512.
static DETECTED: AtomicU8 = AtomicU8::new(0);

/// The levels this CPU has, as [`DETECTED`]'s bits (detected on the first call).
#[inline]
fn detected() -> u8 {
    let bits = DETECTED.load(Ordering::Relaxed);
    if bits != 0 {
        return bits;
    }
    let bits = 1 | detect_now();
    DETECTED.store(bits, Ordering::Relaxed);
    bits
}

#[cfg(target_arch = "x86_64")]
fn detect_now() -> u8 {
    let avx2 = is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq");
    (u8::from(avx2) << 1) | (u8::from(avx512) << 2)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_now() -> u8 {
    0
}

impl Isa {
    /// Every level, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    /// Short name, as `KV_ISA` takes it: `"scalar"`, `"avx2"`, `"avx512"`.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// The level called `name` (as [`Isa::name`] writes it, any case, spaces trimmed).
    ///
    /// ```
    /// use kv_quant::simd::Isa;
    /// assert_eq!(Isa::from_name(" AVX2 "), Some(Isa::Avx2));
    /// assert_eq!(Isa::from_name("sse"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether this CPU can run the level (detected once, then a relaxed atomic load).
    #[inline]
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => detected() & 2 != 0,
            Isa::Avx512 => detected() & 4 != 0,
        }
    }

    /// The levels this CPU can run, lowest first (always starting with [`Isa::Scalar`]).
    /// Tests iterate over these to hold every compiled path to the scalar reference.
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The level every kernel of the workspace runs at by default, decided once per process:
    /// the highest this CPU has, capped by the environment variable `KV_ISA` when it names a
    /// lower level (`scalar`, `avx2`). An unknown name, or a level the CPU lacks, is ignored.
    pub fn best() -> Isa {
        static BEST: AtomicU8 = AtomicU8::new(u8::MAX);
        let cached = BEST.load(Ordering::Relaxed);
        if let Some(&isa) = Isa::ALL.get(usize::from(cached)) {
            return isa;
        }
        let top = Isa::ALL
            .into_iter()
            .rev()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Scalar);
        let wanted = std::env::var("KV_ISA")
            .ok()
            .and_then(|v| Isa::from_name(&v));
        let isa = wanted.map_or(top, |w| w.min(top));
        BEST.store(isa as u8, Ordering::Relaxed);
        isa
    }

    /// The highest available level not above `self` (a level the CPU lacks falls back).
    pub fn or_lower(self) -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|i| *i <= self && i.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// Runs `kernel` at this level: [`Kernel::simd`] compiled for the level's features
    /// when this CPU has them, [`Kernel::scalar`] at [`Isa::Scalar`]. A level the CPU lacks
    /// runs the highest one below it, so no caller can reach code the CPU cannot execute.
    #[inline]
    pub fn run<K: Kernel>(self, kernel: K) -> K::Output {
        #[cfg(target_arch = "x86_64")]
        match self {
            Isa::Avx512 => {
                if let Some(t) = V512::new() {
                    // SAFETY: `t` exists, so the CPU has every feature of the entry point.
                    return unsafe { x86::run_512(t, kernel) };
                }
                if let Some(t) = V256::new() {
                    // SAFETY: as above, for the AVX2 features.
                    return unsafe { x86::run_256(t, kernel) };
                }
            }
            Isa::Avx2 => {
                if let Some(t) = V256::new() {
                    // SAFETY: `t` exists, so the CPU has every feature of the entry point.
                    return unsafe { x86::run_256(t, kernel) };
                }
            }
            Isa::Scalar => {}
        }
        kernel.scalar()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel with a scalar reference and one width-generic SIMD body, run by [`Isa::run`].
///
/// `simd` should be `#[inline(always)]` (and so should what it calls): it is instantiated
/// inside a `#[target_feature]` entry point, and only code inlined there is compiled for
/// the level.
pub trait Kernel: Sized {
    /// What the kernel returns.
    type Output;
    /// The portable version: the reference the SIMD body is tested against.
    fn scalar(self) -> Self::Output;
    /// The SIMD version, written once over the vector width of `s`.
    fn simd<S: Simd>(self, s: S) -> Self::Output;
}

/// Width-generic f32 vector operations, implemented by the level tokens.
///
/// Loads and stores take fixed-size arrays (`Lanes`, `Halves`, ...), cut from slices with
/// the `lanes`/`halves`/... functions, so every access is in bounds by type. The `*32`
/// operations work on a chunk of 32 elements (`X32`: 4 vectors at 256 bits, 2 at 512), the
/// group or block of every quantized layout: a kernel written over chunks needs no
/// per-width lane count.
pub trait Simd: Copy + Send + Sync + 'static {
    /// f32 lanes per vector.
    const LANES: usize;
    /// The level this width runs at.
    const ISA: Isa;
    /// A vector of `LANES` f32.
    type F32: Copy;
    /// `[f32; LANES]`.
    type Lanes: Copy;
    /// `[u8; 2 * LANES]`: `LANES` f16 or bf16, little-endian.
    type Halves: Copy;
    /// `[u8; 4 * LANES]`: `LANES` f32, little-endian.
    type Words: Copy;
    /// 32 f32 as vectors, in element order.
    type X32: Copy + AsRef<[Self::F32]> + AsMut<[Self::F32]>;

    /// The slice's whole vectors and the rest.
    fn lanes(s: &[f32]) -> (&[Self::Lanes], &[f32]);
    /// The slice's whole vectors and the rest.
    fn lanes_mut(s: &mut [f32]) -> (&mut [Self::Lanes], &mut [f32]);
    /// The bytes' whole vectors of 16-bit floats and the rest.
    fn halves(b: &[u8]) -> (&[Self::Halves], &[u8]);
    /// The bytes' whole vectors of f32 and the rest.
    fn words(b: &[u8]) -> (&[Self::Words], &[u8]);

    /// All lanes `x`.
    fn splat(self, x: f32) -> Self::F32;
    /// All lanes zero.
    fn zero(self) -> Self::F32;
    /// `a + b`.
    fn add(self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// `a * b`.
    fn mul(self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// `a * b + c`, rounded once.
    fn fma(self, a: Self::F32, b: Self::F32, c: Self::F32) -> Self::F32;
    /// Sum of the lanes.
    fn sum(self, v: Self::F32) -> f32;
    /// Loads a vector.
    fn load(self, a: &Self::Lanes) -> Self::F32;
    /// Stores a vector.
    fn store(self, a: &mut Self::Lanes, v: Self::F32);
    /// Widens `LANES` f16 (exact).
    fn load_f16(self, b: &Self::Halves) -> Self::F32;
    /// Widens `LANES` bf16 (exact).
    fn load_bf16(self, b: &Self::Halves) -> Self::F32;
    /// Loads `LANES` f32 stored as little-endian bytes.
    fn load_f32_bytes(self, b: &Self::Words) -> Self::F32;
    /// The two f16 of `b` (little-endian) widened and broadcast: `(all b[0..2], all b[2..4])`.
    /// A quantized group's scale and minimum.
    fn splat_f16_pair(self, b: [u8; 4]) -> (Self::F32, Self::F32);

    /// 32 zeros.
    fn zero32(self) -> Self::X32;
    /// Sum of the 32 lanes, in a fixed order per width.
    fn sum32(self, v: Self::X32) -> f32;

    /// 32 f32.
    fn load32(self, a: &[f32; 32]) -> Self::X32;
    /// Stores 32 f32.
    fn store32(self, a: &mut [f32; 32], v: Self::X32);
    /// 32 f32 stored as little-endian bytes.
    fn load32_f32_bytes(self, b: &[u8; 128]) -> Self::X32;
    /// 32 f16 widened (exact).
    fn load32_f16(self, b: &[u8; 64]) -> Self::X32;
    /// 32 bf16 widened (exact).
    fn load32_bf16(self, b: &[u8; 64]) -> Self::X32;
    /// 32 signed 8-bit codes as f32.
    fn codes32_i8(self, b: &[u8; 32]) -> Self::X32;
    /// 32 unsigned 4-bit codes (low nibble first) as f32.
    fn codes32_u4(self, b: &[u8; 16]) -> Self::X32;
    /// 32 unsigned 2-bit codes (low bits first) as f32.
    fn codes32_u2(self, b: &[u8; 8]) -> Self::X32;

    // -----------------------------------------------------------------------------------
    // Added for kv-quant's quantizers, multi-head and KIVI kernels (helper simdq).
    // Every operation is exact unless it says how it rounds.

    /// `[u8; LANES]`: the bytes of `2 * LANES` 4-bit codes.
    type Bytes: Copy;
    /// `[u8; LANES / 2]`: the bytes of `2 * LANES` 2-bit codes.
    type Quarters: Copy;
    /// Whether [`Simd::pair_u4`] and [`Simd::codes32_u4_perm`] unpack 4-bit codes out of
    /// element order (then data they meet must go through [`Simd::perm32`] /
    /// [`Simd::perm2`]); when `false` those permutations are the identity and kernels may
    /// skip them.
    const U4_PERMUTED: bool;

    /// The slice's whole `Bytes` and the rest.
    fn bytes(b: &[u8]) -> (&[Self::Bytes], &[u8]);
    /// The slice's whole `Quarters` and the rest.
    fn quarters(b: &[u8]) -> (&[Self::Quarters], &[u8]);

    /// `a - b`.
    fn sub(self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// `a / b`, correctly rounded (as scalar `/`).
    fn div(self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// Lane-wise maximum; where either lane is NaN, `b`'s lane (as `vmaxps` does), so
    /// `max(x, acc)` skips a NaN `x` as `f32::max` does and `max(bound, x)` keeps it.
    /// Which zero of `-0.0`/`+0.0` is unspecified.
    fn max(self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// Lane-wise minimum; where either lane is NaN, `b`'s lane (as `vminps` does), so
    /// `min(bound, x)` keeps a NaN `x`.
    fn min(self, a: Self::F32, b: Self::F32) -> Self::F32;
    /// `|a|` (the sign bit cleared).
    fn abs(self, a: Self::F32) -> Self::F32;
    /// Largest lane (NaN-free input).
    fn max_lane(self, v: Self::F32) -> f32;
    /// Smallest lane (NaN-free input).
    fn min_lane(self, v: Self::F32) -> f32;
    /// Each lane rounded to the nearest integer, ties to even (`f32::round_ties_even`),
    /// then clamped to `[lo, hi]`: the quantizers' code arithmetic.
    fn round_clamp(self, v: Self::F32, lo: Self::F32, hi: Self::F32) -> Self::F32;
    /// 32 lanes holding integers in `-128..=127` as 32 bytes (two's complement), in order.
    fn pack32_i8(self, v: Self::X32) -> [u8; 32];
    /// Each of 32 lanes `v` as the signed byte `round(v * inv)` (`v * inv` rounded to f32
    /// first, then to the nearest integer with ties away from zero, as `f32::round`),
    /// clamped to `-127..=127`, NaN giving 0; and the sum of those bytes. Bit-identical to
    /// its portable twin [`round32_i8_scalar`] for every input: the activation rounding
    /// of kv-model's int8 mode (issue 19).
    fn round32_i8(self, x: Self::X32, inv: f32) -> ([u8; 32], i32);
    /// The lanes as f16, rounded to nearest even (as `half::f16::from_f32`), little-endian.
    /// Lanes must be finite and below f16's overflow threshold.
    fn to_f16(self, v: Self::F32, out: &mut Self::Halves);
    /// The lanes as bf16, rounded to nearest even (as `half::bf16::from_f32`),
    /// little-endian. Lanes must be finite and below bf16's overflow threshold.
    fn to_bf16(self, v: Self::F32, out: &mut Self::Halves);
    /// The bytes' whole vectors of 16-bit floats and the rest, to write.
    fn halves_mut(b: &mut [u8]) -> (&mut [Self::Halves], &mut [u8]);
    /// Lane `i` = sum of the lanes of `a[i]`.
    fn reduce8(self, a: &[Self::F32; 8]) -> [f32; 8];
    /// Lane `i` = sum of the lanes of `a[i]`.
    fn reduce16(self, a: &[Self::F32; 16]) -> [f32; 16];
    /// `2 * LANES` signed 8-bit codes as f32, in element order.
    fn pair_i8(self, b: &Self::Halves) -> [Self::F32; 2];
    /// `2 * LANES` 4-bit codes (low nibble first) as f32, in the order of [`Simd::perm2`].
    fn pair_u4(self, b: &Self::Bytes) -> [Self::F32; 2];
    /// `2 * LANES` 2-bit codes (low bits first) as f32, in element order.
    fn pair_u2(self, b: &Self::Quarters) -> [Self::F32; 2];
    /// 32 4-bit codes as f32, in the order of [`Simd::perm32`] (cheaper to unpack than
    /// [`Simd::codes32_u4`] where that order differs).
    fn codes32_u4_perm(self, b: &[u8; 16]) -> Self::X32;
    /// 32 elements in element order → the order [`Simd::codes32_u4_perm`] unpacks codes in.
    fn perm32(self, v: Self::X32) -> Self::X32;
    /// `2 * LANES` elements → the order [`Simd::pair_u4`] unpacks codes in.
    fn perm2(self, v: [Self::F32; 2]) -> [Self::F32; 2];
    /// The inverse of [`Simd::perm2`].
    fn unperm2(self, v: [Self::F32; 2]) -> [Self::F32; 2];
    // End of simdq's additions.

    // Added for kv-backend-cpu's attention kernels (helper simdc).
    /// `c - a * b`, rounded once.
    fn fnma(self, a: Self::F32, b: Self::F32, c: Self::F32) -> Self::F32;
    /// Each lane rounded to the nearest integer, ties to even.
    fn round(self, v: Self::F32) -> Self::F32;
    /// `2^n` for lanes `n` holding integers in `-126..=127`, built in the exponent bits
    /// (the scaling step of a polynomial `exp`).
    fn pow2i(self, n: Self::F32) -> Self::F32;
    /// `v` with the lanes where `x < low` (an ordered comparison: not where `x` is NaN)
    /// set to zero.
    fn zero_below(self, v: Self::F32, x: Self::F32, low: f32) -> Self::F32;
    /// The first `min(a.len(), LANES)` elements of `a`, zero in the other lanes; elements
    /// past the slice are not read (a masked load, for the ragged end of a row or tile).
    fn load_first(self, a: &[f32]) -> Self::F32;
    /// Stores the first `min(a.len(), LANES)` lanes of `v`; nothing past the slice is
    /// written.
    fn store_first(self, a: &mut [f32], v: Self::F32);
    // End of simdc's additions.

    // GGUF weight codes (added for kv-model's matrix kernels, issue 18). A 4- or 5-bit
    // code stands for one of only 16 or 32 weights of its block (`i * a + b` or
    // `(i - c) * a`). At 512 bits those weights are computed once per block into registers
    // ([`Simd::Lut16`], [`Simd::Lut32`]) and each 16 codes are looked up with one lane
    // permute; at 256 bits (no 16-lane permute) the same operations convert the codes to
    // f32 and scale them. Either way a weight is rounded once, as `fma(i, a, b)` or
    // `(i - c) * a` round it. [`Simd::Bytes32`] holds 32 codes or bit fields in registers
    // for the bit operations that assemble 5- and 6-bit codes.

    /// 32 bytes in registers (codes, bit fields).
    type Bytes32: Copy;
    /// The 16 weights a 4-bit code stands for, ready for lookups.
    type Lut16: Copy;
    /// The 32 weights a 5-bit code stands for, ready for lookups.
    type Lut32: Copy;

    /// Loads 32 bytes.
    fn load_bytes32(self, b: &[u8; 32]) -> Self::Bytes32;
    /// The nibbles of 16 bytes in GGUF's split order: byte `j` of the result is the low
    /// nibble of `b[j]`, byte `16 + j` its high nibble.
    fn split_nibbles32(self, b: &[u8; 16]) -> Self::Bytes32;
    /// Byte `j` is `value` where bit `j` of `bits` is set, else 0.
    fn bits_to_bytes32(self, bits: u32, value: u8) -> Self::Bytes32;
    /// Per byte `v & mask`.
    fn and_bytes32(self, v: Self::Bytes32, mask: u8) -> Self::Bytes32;
    /// Per byte `a | b`.
    fn or_bytes32(self, a: Self::Bytes32, b: Self::Bytes32) -> Self::Bytes32;
    /// Per byte `v >> n` (logical; `n < 8`).
    fn shr_bytes32(self, v: Self::Bytes32, n: u32) -> Self::Bytes32;
    /// Per byte `v << n` (`n < 8`).
    fn shl_bytes32(self, v: Self::Bytes32, n: u32) -> Self::Bytes32;
    /// Per byte `v - k`, wrapping.
    fn sub_bytes32(self, v: Self::Bytes32, k: u8) -> Self::Bytes32;
    /// The 32 bytes as signed integers, as f32 (exact).
    fn i8_to_f32_32(self, v: Self::Bytes32) -> Self::X32;

    /// The table `fma(i, a, b)`, `i < 16` (lanes of `a` and `b` all equal).
    fn lut16_affine(self, a: Self::F32, b: Self::F32) -> Self::Lut16;
    /// The table `(i - 8) * a`, `i < 16`: a product, so `i = 8` gives `-0.0` when `a < 0`.
    fn lut16_centered(self, a: Self::F32) -> Self::Lut16;
    /// The table `fma(i, a, b)`, `i < 32`.
    fn lut32_affine(self, a: Self::F32, b: Self::F32) -> Self::Lut32;
    /// The table `(i - 16) * a`, `i < 32`.
    fn lut32_centered(self, a: Self::F32) -> Self::Lut32;
    /// `t[code]` for the 32 codes of `b` in GGUF's split order (see
    /// [`Simd::split_nibbles32`]): the 4-bit blocks' decoding in the fewest operations.
    fn lookup16_split(self, t: Self::Lut16, b: &[u8; 16]) -> Self::X32;
    /// `(lo[b[j] & 15], hi[b[j] >> 4])` for the 32 bytes of `b`: the low nibbles through one
    /// table, the high nibbles through another.
    fn lookup16_nibbles(
        self,
        lo: Self::Lut16,
        hi: Self::Lut16,
        b: &[u8; 32],
    ) -> (Self::X32, Self::X32);
    /// `t[v[j]]` for the 32 bytes of `v` (each `< 32`).
    fn lookup32(self, t: Self::Lut32, v: Self::Bytes32) -> Self::X32;
    /// `t[code]` for the 32 4-bit codes of a row group's 16 bytes (low nibble first, kv's
    /// row layouts), in the order of [`Simd::codes32_u4_perm`]: with `t` from
    /// [`Simd::lut16_affine`]`(s, m)` the dequantized values `fma(code, s, m)`, bit for bit,
    /// in fewer operations than unpacking and scaling (at 512 bits one widening, one shift
    /// and two permutes for 32 values; added for issue 19's decode attention).
    fn lookup16_u4_perm(self, t: Self::Lut16, b: &[u8; 16]) -> Self::X32;
    /// `t[code]` for the `2 * LANES` 4-bit codes of `b` (low nibble first), in the order of
    /// [`Simd::pair_u4`]: as [`Simd::lookup16_u4_perm`], a pair of vectors at a time.
    fn lookup16_pair_u4(self, t: Self::Lut16, b: &Self::Bytes) -> [Self::F32; 2];
    /// `t[code]` for the 32 5-bit codes of a Q5_0/Q5_1 block: the nibbles of `b` in GGUF's
    /// split order (see [`Simd::split_nibbles32`]), bit `j` of `high` code `j`'s fifth bit.
    /// Here the codes are assembled in bytes; 512 bits set the fifth bits in the widened
    /// indices under a mask register instead (fewer operations; added for issue 15).
    #[inline(always)]
    fn lookup32_split(self, t: Self::Lut32, b: &[u8; 16], high: u32) -> Self::X32 {
        self.lookup32(
            t,
            self.or_bytes32(self.split_nibbles32(b), self.bits_to_bytes32(high, 16)),
        )
    }
    /// `(code - 16) * a` for the 32 5-bit codes of a Q5_0 block (laid out as for
    /// [`Simd::lookup32_split`]), for dot products: `a` must have at most 11 significant
    /// bits (an f16 value), and a zero weight may come out `+0.0` where the product is
    /// `-0.0` (a zero term's sign cannot change a sum that is not zero). Here the lookup
    /// of [`Simd::lut32_centered`]; 512 bits look the low 4 bits up in a 16-entry table
    /// (one-table permutes) and add `16 a` where the fifth bit is set, under a mask:
    /// `(lo - 16) a + 16 a = lo a` exactly, since every term is exact in f32 (issue 15).
    #[inline(always)]
    fn lookup32_split_centered_dot(self, a: Self::F32, b: &[u8; 16], high: u32) -> Self::X32 {
        self.lookup32_split(self.lut32_centered(a), b, high)
    }
    // End of the GGUF weight codes.
    // -----------------------------------------------------------------------------------

    // Integer dot products (int8 activations, issue 19): 32 unsigned bytes against 32
    // signed bytes, summed exactly in i32 per group of 4, then scaled into 8 f32 lanes at
    // every width. With `VNNI` one `vpdpbusd` (AVX-512 VNNI, asked of the CPU with
    // [`vnni_available`]); without it `maddubs` + `madd`, which is exact only while every
    // pair sum fits an i16: `u <= 128` and `-127 <= x <= 127`, what the callers give.

    /// Eight f32 lanes at every width: the accumulators of [`Simd::dot_bytes32`].
    type F32x8: Copy;
    /// Eight zero lanes.
    fn zero_f32x8(self) -> Self::F32x8;
    /// The sum of the eight lanes, in the order [`Simd::sum`] uses at 256 bits.
    fn sum_f32x8(self, v: Self::F32x8) -> f32;
    /// Per byte `|v|` of a signed byte, as unsigned (`-128` gives 128).
    fn abs_bytes32(self, v: Self::Bytes32) -> Self::Bytes32;
    /// Per signed byte: `x` where `of > 0`, `-x` where `of < 0`, 0 where `of == 0`.
    fn sign_bytes32(self, x: Self::Bytes32, of: Self::Bytes32) -> Self::Bytes32;
    /// `acc + scale * p`, lane `k` of `p` the exact `Σ u[4k + j] * x[4k + j]` (`j < 4`) of
    /// unsigned `u <= 128` and signed `-127 <= x <= 127` ([`dot_bytes32_scalar`] is the
    /// portable twin). `VNNI` must be true only where [`vnni_available`] says so.
    fn dot_bytes32<const VNNI: bool>(
        self,
        u: Self::Bytes32,
        x: Self::Bytes32,
        scale: f32,
        acc: Self::F32x8,
    ) -> Self::F32x8;
    // End of the integer dot products.
    // -----------------------------------------------------------------------------------

    // Interleaved integer dot products (issue 21): weights stored so that one i32 lane
    // holds 4 consecutive codes of one output row, the activation's 4 bytes broadcast to
    // every lane. Each lane then accumulates its own row's dot product, so no horizontal
    // sum is needed at any row count ([`dot_bcast_scalar`] is the portable twin, for any
    // lane count).

    /// As many i32 lanes as [`Simd::F32`] has f32 lanes (8 or 16).
    type I32: Copy;
    /// All lanes 0.
    fn zero_i32(self) -> Self::I32;
    /// The lanes from their little-endian bytes (4 per lane).
    fn load_i32_bytes(self, b: &Self::Words) -> Self::I32;
    /// Per lane `a + b` (wrapping).
    fn add_i32(self, a: Self::I32, b: Self::I32) -> Self::I32;
    /// Per lane, the i32 as f32 (exact below 2^24 in magnitude).
    fn i32_to_f32(self, v: Self::I32) -> Self::F32;
    /// Per byte `(v & 15, v >> 4)`: the low and high nibbles of every byte.
    fn nibbles_i32(self, v: Self::I32) -> (Self::I32, Self::I32);
    /// Per lane `acc + Σ u[4k + j] * x[j]` (`j < 4`), `u`'s bytes unsigned, `x`'s signed
    /// and the same in every lane. Exact if `u <= 128` and `-127 <= x`, the range where
    /// `maddubs` (used without `VNNI`) cannot saturate. `VNNI` must be true only where
    /// [`vnni_available`] says so.
    fn dot_bcast_u8<const VNNI: bool>(self, acc: Self::I32, u: Self::I32, x: [u8; 4]) -> Self::I32;
    /// Per lane `acc + Σ w[4k + j] * x[j]`, both signed, `x` the same in every lane: `|w|`
    /// against `x` with `w`'s sign, exact if `-127 <= x` (any `w`).
    fn dot_bcast_i8<const VNNI: bool>(self, acc: Self::I32, w: Self::I32, x: [u8; 4]) -> Self::I32;
    /// Per lane `acc + Σ_t Σ_j u[t][4k + j] · x[4t + j]` (`t, j < 4`): four
    /// [`Simd::dot_bcast_u8`] in one call, `x[4t..4t + 4]` broadcast against `u[t]`. With
    /// `VNNI` each step is one `vpdpbusd` whose memory operand is the broadcast (`{1to16}`),
    /// so a broadcast costs no instruction of its own (issue 21: a q8 kernel step issued one
    /// broadcast per `vpdpbusd`). Exact for any `u` with `VNNI` (no saturation), for
    /// `u <= 128` without, as [`Simd::dot_bcast_u8`].
    fn dot_bcast4_u8<const VNNI: bool>(
        self,
        acc: Self::I32,
        u: [Self::I32; 4],
        x: &[u8; 16],
    ) -> Self::I32;
    /// Per byte `v ^ 0x80`: a signed byte `w` as the unsigned `w + 128`, so that signed
    /// codes go through [`Simd::dot_bcast4_u8`] (the caller subtracts `128 · Σ x`).
    fn flip_i8_u8(self, v: Self::I32) -> Self::I32;
    /// All lanes `v`.
    fn splat_i32(self, v: i32) -> Self::I32;
    // End of the interleaved integer dot products.
    // -----------------------------------------------------------------------------------

    // Codes read straight out of 32-bit words (issue 15, K-quant dot products): a block's
    // packed codes loaded as i32 lanes (four bytes, eight nibbles per lane) give one vector
    // of codes per shift and mask, converted to f32, with no widening load, no lookup and
    // no lane shuffle per code vector; the caller orders its activations to match. The
    // only shuffle left is [`Simd::permute_f32`], once per group of code vectors.

    /// Lane `i` is the little-endian word `i % 8` of `b` (at 512 bits the 32 bytes twice).
    fn load_i32_bytes32(self, b: &[u8; 32]) -> Self::I32;
    /// Per lane `v >> n[i]` (logical, `n[i] < 32`), from the first `LANES` entries of `n`.
    fn shr_i32_lanes(self, v: Self::I32, n: &[u32; 16]) -> Self::I32;
    /// Per lane `(v >> at) & mask` as f32 (logical, `at < 32`, `mask < 2^24`: exact).
    fn field_f32(self, v: Self::I32, at: u32, mask: u32) -> Self::F32;
    /// Per lane `(v >> at) & 15` as f32: [`Simd::field_f32`] with mask 15, where 512 bits
    /// look the nibble up (a 16-lane permute of the table `0.0..16.0`, which reads only an
    /// index's low 4 bits: no mask) instead of masking and converting it: one operation
    /// fewer per vector of codes, on the shuffle unit rather than the others.
    #[inline(always)]
    fn nibble_f32(self, v: Self::I32, at: u32) -> Self::F32 {
        self.field_f32(v, at, 15)
    }
    /// Per lane `(v >> at) & 31` as f32: [`Simd::field_f32`] with mask 31, where 512 bits
    /// look the 5-bit code up in two 16-lane tables (`0.0..32.0`, a two-source permute
    /// reads an index's low 5 bits: no mask, no conversion), as [`Simd::nibble_f32`] does
    /// for nibbles. Q5_K's codes once [`Simd::nibble_bit4_i32`] has put them in bytes.
    #[inline(always)]
    fn code5_f32(self, v: Self::I32, at: u32) -> Self::F32 {
        self.field_f32(v, at, 31)
    }
    /// Per lane `((lo >> lo_at) & 0x0F0F_0F0F) | ((hi << hi_shl) & 0xF0F0_F0F0)` (`lo_at`,
    /// `hi_shl < 32`): each byte's low nibble from `lo`, its high nibble from `hi`, so that
    /// a nibble and a fifth bit become one 5-bit code per byte (bits above the fifth are
    /// whatever `hi` holds there: [`Simd::code5_f32`] ignores them). One three-way bit
    /// select at 512 bits: Q5_K's fifth bits joined to 4 vectors' nibbles at once instead
    /// of a test and a masked add per vector.
    fn nibble_bit4_i32(self, lo: Self::I32, lo_at: u32, hi: Self::I32, hi_shl: u32) -> Self::I32;
    /// Per lane `((lo >> lo_at) & 15) | (((hi >> hi_at) & 3) << 4)` as f32 (`lo_at`,
    /// `hi_at < 32`): a 6-bit code from a nibble and a 2-bit field (Q6_K).
    fn field6_f32(self, lo: Self::I32, lo_at: u32, hi: Self::I32, hi_at: u32) -> Self::F32;
    /// Lane `i` is lane `idx[i] % LANES` of `v` (the first `LANES` entries of `idx`).
    fn permute_f32(self, v: Self::F32, idx: &[u32; 16]) -> Self::F32;
    // End of the codes in words.
    // -----------------------------------------------------------------------------------

    /// The level's tokens, for code not yet written over the width: `Some` at 512 bits.
    #[cfg(target_arch = "x86_64")]
    fn v512(self) -> Option<V512>;
    /// The AVX2 token (every level with a `Simd` width has AVX2).
    #[cfg(target_arch = "x86_64")]
    fn v256(self) -> V256;
}

#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
pub use x86::{hsum_256, reduce16_512, reduce8_256, reduce8_512, Codes256, V256, V512};

/// The eight group sums of [`Simd::dot_bytes32`], portable: lane `k` is
/// `Σ u[4k + j] * x[4k + j]` for `j < 4`, exact in i32 for any bytes.
///
/// ```
/// use kv_quant::simd::dot_bytes32_scalar;
/// let u = [2u8; 32];
/// let x = [-3i8; 32];
/// assert_eq!(dot_bytes32_scalar(&u, &x), [-24; 8]);
/// ```
pub fn dot_bytes32_scalar(u: &[u8; 32], x: &[i8; 32]) -> [i32; 8] {
    let mut out = [0i32; 8];
    for ((o, u), x) in out.iter_mut().zip(u.chunks_exact(4)).zip(x.chunks_exact(4)) {
        *o = u
            .iter()
            .zip(x)
            .map(|(&u, &x)| i32::from(u) * i32::from(x))
            .sum();
    }
    out
}

/// The portable twin of [`Simd::round32_i8`]: each `x` as the byte
/// `round(x * inv)` (ties away from zero) clamped to ±127, NaN as 0, and the bytes' sum.
///
/// ```
/// use kv_quant::simd::round32_i8_scalar;
/// let mut x = [0f32; 32];
/// x[0] = 2.5;
/// x[1] = -0.5;
/// x[2] = 1e9;
/// x[3] = f32::NAN;
/// let (q, sum) = round32_i8_scalar(&x, 1.0);
/// assert_eq!([q[0], q[1], q[2], q[3]], [3, (-1i8) as u8, 127, 0]);
/// assert_eq!(sum, 3 - 1 + 127);
/// ```
pub fn round32_i8_scalar(x: &[f32; 32], inv: f32) -> ([u8; 32], i32) {
    let mut out = [0u8; 32];
    let mut sum = 0i32;
    for (q, &v) in out.iter_mut().zip(x) {
        // `as` saturates and maps NaN to 0; the clamp keeps ±127 for `maddubs`.
        let a = ((v * inv).round() as i32).clamp(-127, 127);
        sum += a;
        *q = a as i8 as u8;
    }
    (out, sum)
}

/// The portable twin of [`Simd::dot_bcast_u8`] (`SIGNED` false) and
/// [`Simd::dot_bcast_i8`] (`SIGNED` true) for any number of lanes: lane `k` of `acc` gains
/// `Σ w[4k + j] * x[j]`, `w`'s bytes read as unsigned or signed, `x`'s as signed. Exact
/// in i32 (wrapping only past ±2^31).
///
/// ```
/// use kv_quant::simd::dot_bcast_scalar;
/// let mut acc = [1i32, 2];
/// let w = [1u8, 2, 3, 4, 255, 0, 0, 0];
/// dot_bcast_scalar::<false>(&mut acc, &w, [1, 1, 1, 0xff]);
/// assert_eq!(acc, [1 + 1 + 2 + 3 - 4, 2 + 255]);
/// dot_bcast_scalar::<true>(&mut acc, &w, [1, 0, 0, 0]);
/// assert_eq!(acc, [1 + 1 + 2 + 3 - 4 + 1, 2 + 255 - 1]);
/// ```
pub fn dot_bcast_scalar<const SIGNED: bool>(acc: &mut [i32], w: &[u8], x: [u8; 4]) {
    for (a, w) in acc.iter_mut().zip(w.chunks_exact(4)) {
        let dot: i32 = w
            .iter()
            .zip(x)
            .map(|(&w, x)| {
                let w = if SIGNED {
                    i32::from(w as i8)
                } else {
                    i32::from(w)
                };
                w * i32::from(x as i8)
            })
            .sum();
        *a = a.wrapping_add(dot);
    }
}

/// `x` as its four little-endian words' bytes: the quads [`Simd::dot_bcast4_u8`] broadcasts.
#[inline(always)]
pub(crate) fn quads(x: &[u8; 16]) -> [[u8; 4]; 4] {
    core::array::from_fn(|t| core::array::from_fn(|j| x[4 * t + j]))
}

/// Whether [`Simd::dot_bytes32`] may run with `VNNI` (one `vpdpbusd` per call): this CPU
/// has AVX-512 VNNI and VL (Intel Ice Lake and later server parts, AMD Zen 4), and
/// `KV_VNNI` is not `0` (the switch that measures the `maddubs` path on such a CPU).
/// Detected once.
pub fn vnni_available() -> bool {
    static VNNI: AtomicU8 = AtomicU8::new(u8::MAX);
    match VNNI.load(Ordering::Relaxed) {
        0 => false,
        1 => true,
        _ => {
            let off = std::env::var("KV_VNNI").is_ok_and(|v| v.trim() == "0");
            let has = !off && Isa::Avx512.is_available() && vnni_detected();
            VNNI.store(u8::from(has), Ordering::Relaxed);
            has
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn vnni_detected() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni_detected() -> bool {
    false
}

/// Data to prefetch while a kernel reads other data: what the caller reads next, requested
/// a cache line at a time in step with the data read, so that the requests spread over the
/// computation instead of queueing all at once. A hint: nothing is read, no value changes,
/// and on other architectures nothing happens.
///
/// ```
/// use kv_quant::simd::Prefetch;
/// let next = vec![0f32; 256];
/// let mut pf = Prefetch::new(&next);
/// pf.bytes(256); // lines 0..4 requested
/// pf.bytes(4096); // the rest; asking past the end is fine
/// Prefetch::all(&next); // every line at once
/// // 1 KiB to ask for while 256 bytes are read: 4 bytes asked for per byte read.
/// let mut pf = Prefetch::spread(&next, 256);
/// let step = pf.share(64); // 256: what to ask for per 64 bytes read
/// pf.bytes(step); // lines 0..4 requested
/// ```
#[derive(Debug)]
pub struct Prefetch<'a> {
    /// The data's first byte (only ever an address for the prefetch hint).
    start: *const u8,
    /// The data's size in bytes.
    len: usize,
    /// Offset of the next line to request (after the first, a line boundary).
    next: usize,
    /// Bytes to request per byte read, in 1/65536ths (at least one: see
    /// [`Prefetch::spread`] and [`Prefetch::share`]).
    scale: usize,
    _data: PhantomData<&'a [u8]>,
}

/// `Prefetch::scale`'s fixed point: 16 fraction bits.
const SCALE_BITS: u32 = 16;

impl<'a> Prefetch<'a> {
    /// Prefetches from `ahead` (empty for nothing).
    #[inline]
    pub fn new<T>(ahead: &'a [T]) -> Self {
        Self {
            start: ahead.as_ptr().cast(),
            len: size_of_val(ahead),
            next: 0,
            scale: 1 << SCALE_BITS,
            _data: PhantomData,
        }
    }

    /// Prefetches from `ahead` while the kernel reads `over` bytes, all of it by the time
    /// they are read, when the kernel asks for [`Prefetch::share`] of what it reads: where
    /// `ahead` is longer than `over`, each byte read asks for proportionally more (a kernel
    /// reading 2 KiB of 4-bit codes can ask for an 8 KiB block of f16 rows); where it is
    /// shorter, one byte per byte read, as [`Prefetch::new`]. `over == 0` asks for
    /// everything at the first request.
    #[inline]
    pub fn spread<T>(ahead: &'a [T], over: usize) -> Self {
        let mut pf = Self::new(ahead);
        if pf.len > over {
            let scaled = ((pf.len as u128) << SCALE_BITS).div_ceil(over.max(1) as u128);
            pf.scale = usize::try_from(scaled).unwrap_or(usize::MAX);
        }
        pf
    }

    /// Nothing to prefetch.
    #[inline]
    pub fn none() -> Self {
        Self::new::<u8>(&[])
    }

    /// Requests every line of `data` at once.
    #[inline]
    pub fn all<T>(data: &[T]) {
        let mut pf = Prefetch::new(data);
        pf.bytes(pf.len);
    }

    /// How many bytes to ask for (with [`Prefetch::bytes`]) per `read` bytes the kernel
    /// reads: `read` itself, or more for data given with [`Prefetch::spread`]. Worked out
    /// once before a kernel's loop, so the loop costs what it did without `spread`.
    #[inline(always)]
    pub fn share(&self, read: usize) -> usize {
        if self.scale == 1 << SCALE_BITS {
            read
        } else {
            read.saturating_mul(self.scale) >> SCALE_BITS
        }
    }

    /// Whether every line has been requested (or there was nothing to request): a kernel
    /// can run its loop without the requests then.
    #[inline(always)]
    pub fn is_done(&self) -> bool {
        self.next >= self.len
    }

    /// Requests the lines of the next `bytes` bytes not yet requested, into L2.
    #[inline(always)]
    pub fn bytes(&mut self, bytes: usize) {
        const LINE: usize = 64;
        let end = self.next.saturating_add(bytes).min(self.len);
        #[cfg(target_arch = "x86_64")]
        {
            let misalign = self.start as usize % LINE;
            while self.next < end {
                // SAFETY: `next < len`, so the address is inside the borrowed data; a
                // prefetch neither reads the value nor faults, and SSE is part of the x86-64
                // baseline.
                unsafe {
                    core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(
                        self.start.add(self.next).cast(),
                    )
                };
                // The next line boundary of the data (its first line may start mid-line).
                self.next = ((self.next + misalign) / LINE + 1) * LINE - misalign;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self.next = end;
        }
    }
}

// SAFETY: a `Prefetch` is a shared borrow of its data (the `PhantomData`); the pointer is
// only ever used as a prefetch address.
unsafe impl Send for Prefetch<'_> {}
// SAFETY: as for `Send`.
unsafe impl Sync for Prefetch<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A xorshift64 generator from `state` (nonzero): the tests' pseudo-random inputs,
    /// the same sequence on every run.
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// Every GGUF weight-code operation of [`Simd`] on one input, results as bits in a
    /// fixed order; [`Kernel::scalar`] is their definition in plain Rust.
    struct CodeOps {
        bytes: [u8; 32],
        a: f32,
        b: f32,
        bits: u32,
    }

    /// `t[i]` of the affine and centered tables.
    fn affine(i: u8, a: f32, b: f32) -> f32 {
        f32::from(i).mul_add(a, b)
    }
    fn centered(i: u8, c: i8, a: f32) -> f32 {
        f32::from(i as i8 - c) * a
    }

    impl Kernel for CodeOps {
        type Output = Vec<u32>;
        fn scalar(self) -> Vec<u32> {
            let (a, b, v) = (self.a, self.b, self.bytes);
            let split: Vec<u8> = (0..32)
                .map(|j| {
                    let q = v[j % 16];
                    if j < 16 {
                        q & 15
                    } else {
                        q >> 4
                    }
                })
                .collect();
            let mut out = Vec::new();
            out.extend(split.iter().map(|&i| affine(i, a, b)));
            out.extend(split.iter().map(|&i| centered(i, 8, a)));
            out.extend(v.iter().map(|&q| affine(q & 15, a, b)));
            out.extend(v.iter().map(|&q| centered(q >> 4, 8, a)));
            out.extend(v.iter().map(|&q| affine(q & 31, a, b)));
            out.extend(split.iter().enumerate().map(|(j, &q)| {
                let high = if self.bits >> j & 1 == 1 { 16 } else { 0 };
                centered(q | high, 16, a)
            }));
            out.extend(split.iter().enumerate().map(|(j, &q)| {
                let high = if self.bits >> j & 1 == 1 { 16 } else { 0 };
                affine(q | high, a, b)
            }));
            out.extend(
                v.iter()
                    .map(|&q| f32::from((((q >> 3) << 2) | 0x81).wrapping_sub(7) as i8)),
            );
            out.into_iter().map(f32::to_bits).collect()
        }
        #[inline(always)]
        fn simd<S: Simd>(self, s: S) -> Vec<u32> {
            let (a, b) = (s.splat(self.a), s.splat(self.b));
            let (v, (half, _)) = (self.bytes, self.bytes.split_first_chunk::<16>().unwrap());
            let loaded = s.load_bytes32(&v);
            let (lo, hi) = s.lookup16_nibbles(s.lut16_affine(a, b), s.lut16_centered(a), &v);
            let five = s.or_bytes32(s.split_nibbles32(half), s.bits_to_bytes32(self.bits, 16));
            let bits = s.shl_bytes32(s.shr_bytes32(loaded, 3), 2);
            let chunks = [
                s.lookup16_split(s.lut16_affine(a, b), half),
                s.lookup16_split(s.lut16_centered(a), half),
                lo,
                hi,
                s.lookup32(s.lut32_affine(a, b), s.and_bytes32(loaded, 31)),
                s.lookup32(s.lut32_centered(a), five),
                s.lookup32_split(s.lut32_affine(a, b), half, self.bits),
                s.i8_to_f32_32(s.sub_bytes32(
                    s.or_bytes32(bits, s.and_bytes32(s.load_bytes32(&[0x81; 32]), 0xFF)),
                    7,
                )),
            ];
            let mut out = Vec::new();
            for c in chunks {
                let mut x = [0f32; 32];
                s.store32(&mut x, c);
                out.extend(x.map(f32::to_bits));
            }
            out
        }
    }

    /// The integer dot operations of [`Simd`] on one input: each group sum of
    /// `dot_bytes32(u, x)` alone (the other groups' `u` zeroed), then the whole
    /// `dot(|w|, sign(x, w))` (a signed-by-signed dot product), all as f32 bits.
    struct IntDotOps {
        u: [u8; 32],
        x: [i8; 32],
        w: [i8; 32],
        vnni: bool,
    }

    impl IntDotOps {
        fn groups(&self) -> impl Iterator<Item = [u8; 32]> + '_ {
            (0..8).map(|k| core::array::from_fn(|j| if j / 4 == k { self.u[j] } else { 0 }))
        }
    }

    impl Kernel for IntDotOps {
        type Output = Vec<u32>;
        fn scalar(self) -> Vec<u32> {
            let mut out: Vec<f32> = dot_bytes32_scalar(&self.u, &self.x)
                .iter()
                .map(|&v| v as f32)
                .collect();
            let ww: i32 = self
                .w
                .iter()
                .zip(&self.x)
                .map(|(&w, &x)| i32::from(w) * i32::from(x))
                .sum();
            out.push(ww as f32 * 0.5);
            out.into_iter().map(f32::to_bits).collect()
        }
        #[inline(always)]
        fn simd<S: Simd>(self, s: S) -> Vec<u32> {
            let go = |u: S::Bytes32, x: S::Bytes32, scale: f32| {
                let acc = if self.vnni {
                    s.dot_bytes32::<true>(u, x, scale, s.zero_f32x8())
                } else {
                    s.dot_bytes32::<false>(u, x, scale, s.zero_f32x8())
                };
                s.sum_f32x8(acc).to_bits()
            };
            let x = s.load_bytes32(&self.x.map(|v| v as u8));
            let mut out: Vec<u32> = self
                .groups()
                .map(|u| go(s.load_bytes32(&u), x, 1.0))
                .collect();
            let w = s.load_bytes32(&self.w.map(|v| v as u8));
            out.push(go(s.abs_bytes32(w), s.sign_bytes32(x, w), 0.5));
            out
        }
    }

    /// Each level's integer dot products equal the exact integer sums, with and without
    /// VNNI, at the extremes of their range (`u = 128`, `x = ±127`, `w = -128`) and on
    /// pseudo-random bytes.
    #[test]
    fn integer_dot_ops_equal_their_definition_at_every_level() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        let mut cases = vec![
            ([128u8; 32], [127i8; 32], [-128i8; 32]),
            ([128; 32], [-127; 32], [127; 32]),
        ];
        for _ in 0..200 {
            let u = core::array::from_fn(|_| (next() % 129) as u8);
            let x = core::array::from_fn(|_| (next() % 255) as i8 as i16 as i8);
            let x = x.map(|v: i8| v.max(-127));
            let w = core::array::from_fn(|_| next() as u8 as i8);
            cases.push((u, x, w));
        }
        let vnni = [false, vnni_available()];
        for (u, x, w) in cases {
            let want = IntDotOps {
                u,
                x,
                w,
                vnni: false,
            }
            .scalar();
            for isa in Isa::available() {
                for &v in &vnni {
                    let got = isa.run(IntDotOps { u, x, w, vnni: v });
                    assert_eq!(got, want, "{isa} vnni {v}: u {u:?} x {x:?} w {w:?}");
                }
            }
        }
    }

    /// The interleaved dot operations on 16 lanes' worth of bytes (a level uses its
    /// first `LANES * 4`), as f32 bits: `u8` and `i8` dots from a nonzero start, the
    /// nibbles' bytes one by one (dots against unit vectors), and a sum of two.
    struct BcastOps {
        w: [u8; 64],
        x: [u8; 4],
        acc: [i32; 16],
        vnni: bool,
    }

    impl Kernel for BcastOps {
        type Output = Vec<u32>;
        fn scalar(self) -> Vec<u32> {
            let lanes = 16;
            let w = &self.w[..4 * lanes];
            let mut out = Vec::new();
            let mut push = |v: &[i32]| out.extend(v.iter().map(|&v| (v as f32).to_bits()));
            let mut a = self.acc[..lanes].to_vec();
            dot_bcast_scalar::<false>(&mut a, w, self.x);
            push(&a);
            let mut a = self.acc[..lanes].to_vec();
            dot_bcast_scalar::<true>(&mut a, w, self.x);
            push(&a);
            for shift in [0, 4] {
                let nib: Vec<u8> = w.iter().map(|&b| (b >> shift) & 15).collect();
                for j in 0..4 {
                    let mut e = [0u8; 4];
                    e[j] = 1;
                    let mut a = vec![0; lanes];
                    dot_bcast_scalar::<false>(&mut a, &nib, e);
                    push(&a);
                }
            }
            let mut a = vec![0; lanes];
            dot_bcast_scalar::<false>(&mut a, w, [1, 0, 0, 0]);
            for (a, b) in a.iter_mut().zip(&self.acc) {
                *a += b;
            }
            push(&a);
            out
        }
        #[inline(always)]
        fn simd<S: Simd>(self, s: S) -> Vec<u32> {
            let l = S::LANES;
            let (w, _) = S::words(&self.w[..4 * l]);
            let w = s.load_i32_bytes(&w[0]);
            let mut acc_bytes = [0u8; 64];
            for (b, a) in acc_bytes.chunks_exact_mut(4).zip(&self.acc) {
                b.copy_from_slice(&a.to_le_bytes());
            }
            let acc = s.load_i32_bytes(&S::words(&acc_bytes[..4 * l]).0[0]);
            let mut out = Vec::new();
            let mut push = |v: S::I32| {
                let mut f = [0f32; 16];
                s.store(&mut S::lanes_mut(&mut f[..l]).0[0], s.i32_to_f32(v));
                out.extend(f[..l].iter().map(|v| v.to_bits()));
            };
            let (u, i) = if self.vnni {
                (
                    s.dot_bcast_u8::<true>(acc, w, self.x),
                    s.dot_bcast_i8::<true>(acc, w, self.x),
                )
            } else {
                (
                    s.dot_bcast_u8::<false>(acc, w, self.x),
                    s.dot_bcast_i8::<false>(acc, w, self.x),
                )
            };
            push(u);
            push(i);
            let (lo, hi) = s.nibbles_i32(w);
            for v in [lo, hi] {
                for j in 0..4 {
                    let mut e = [0u8; 4];
                    e[j] = 1;
                    push(s.dot_bcast_u8::<false>(s.zero_i32(), v, e));
                }
            }
            push(s.add_i32(s.dot_bcast_u8::<false>(s.zero_i32(), w, [1, 0, 0, 0]), acc));
            out
        }
    }

    /// [`Simd::dot_bcast4_u8`] (from a nonzero start), then [`Simd::flip_i8_u8`]'s bytes
    /// through the same dot and [`Simd::splat_i32`] added, as i32 lanes (a level's first
    /// `LANES`).
    struct Bcast4Ops {
        u: [[u8; 64]; 4],
        x: [u8; 16],
        acc: [i32; 16],
        bias: i32,
        vnni: bool,
    }

    impl Kernel for Bcast4Ops {
        type Output = Vec<i32>;
        fn scalar(self) -> Vec<i32> {
            let mut a = self.acc.to_vec();
            let mut f = vec![self.bias; 16];
            for (u, q) in self.u.iter().zip(quads(&self.x)) {
                dot_bcast_scalar::<false>(&mut a, u, q);
                dot_bcast_scalar::<false>(&mut f, &u.map(|b| b ^ 0x80), q);
            }
            a.extend(f);
            a
        }
        #[inline(always)]
        fn simd<S: Simd>(self, s: S) -> Vec<i32> {
            let l = S::LANES;
            let u: [S::I32; 4] =
                core::array::from_fn(|t| s.load_i32_bytes(&S::words(&self.u[t][..4 * l]).0[0]));
            let mut acc_bytes = [0u8; 64];
            for (b, a) in acc_bytes.chunks_exact_mut(4).zip(&self.acc) {
                b.copy_from_slice(&a.to_le_bytes());
            }
            let acc = s.load_i32_bytes(&S::words(&acc_bytes[..4 * l]).0[0]);
            let flipped = u.map(|u| s.flip_i8_u8(u));
            let bias = s.splat_i32(self.bias);
            let (a, f) = if self.vnni {
                (
                    s.dot_bcast4_u8::<true>(acc, u, &self.x),
                    s.dot_bcast4_u8::<true>(bias, flipped, &self.x),
                )
            } else {
                (
                    s.dot_bcast4_u8::<false>(acc, u, &self.x),
                    s.dot_bcast4_u8::<false>(bias, flipped, &self.x),
                )
            };
            let mut out = Vec::new();
            for v in [a, f] {
                let mut lanes = [0f32; 16];
                // Exact as f32: every lane stays below 2^24 in magnitude here.
                s.store(&mut S::lanes_mut(&mut lanes[..l]).0[0], s.i32_to_f32(v));
                out.extend(lanes[..l].iter().map(|&v| v as i32));
            }
            out
        }
    }

    /// The `VNNI` settings the integer dot tests can run here: without, and with where the
    /// CPU has it.
    fn vnni_choices() -> Vec<bool> {
        if vnni_available() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    /// [`Simd::dot_bcast4_u8`], [`Simd::flip_i8_u8`] and [`Simd::splat_i32`] equal their
    /// portable definition at every level, with and without VNNI: the four quads of `x`
    /// in order, random codes and all-`0x80` / all-`0xff` codes (flipped: 0 and 127; the
    /// `maddubs` path needs unflipped codes <= 128, so it is checked on such codes only).
    #[test]
    fn four_broadcast_dots_equal_their_definition_at_every_level() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        let vnni = vnni_choices();
        for t in 0..48 {
            let mut u: [[u8; 64]; 4] =
                core::array::from_fn(|_| core::array::from_fn(|_| next() as u8));
            match t {
                0 => u = [[0x80; 64]; 4],
                1 => u = [[0xff; 64]; 4],
                _ if t % 3 == 1 => u = u.map(|u| u.map(|b| b.min(128))),
                _ if t % 3 == 2 => u = u.map(|u| u.map(|b| b | 0x80)),
                _ => {}
            }
            let x: [u8; 16] = match t {
                2 => [127; 16],
                3 => [(-127i8) as u8; 16],
                _ => core::array::from_fn(|_| (next() as u8).max(0x81)),
            };
            let acc: [i32; 16] = core::array::from_fn(|_| (next() % 20001) as i32 - 10000);
            let bias = -128 * (next() % 8129) as i32;
            let want = Bcast4Ops {
                u,
                x,
                acc,
                bias,
                vnni: false,
            }
            .scalar();
            for isa in Isa::available() {
                if isa == Isa::Scalar {
                    continue;
                }
                let lanes = if isa == Isa::Avx512 { 16 } else { 8 };
                for &v in &vnni {
                    let got = isa.run(Bcast4Ops {
                        u,
                        x,
                        acc,
                        bias,
                        vnni: v,
                    });
                    // Without VNNI a dot is exact only for codes <= 128: the plain one
                    // where every code is, the flipped one where every `b ^ 0x80` is.
                    let plain_ok = v || u.iter().flatten().all(|&b| b <= 128);
                    let flip_ok = v || u.iter().flatten().all(|&b| (b ^ 0x80) <= 128);
                    if plain_ok {
                        assert_eq!(
                            got[..lanes],
                            want[..lanes],
                            "{isa} vnni {v}: u {u:?} x {x:?}"
                        );
                    }
                    if flip_ok {
                        assert_eq!(
                            got[lanes..],
                            want[16..][..lanes],
                            "{isa} vnni {v} flipped: u {u:?} x {x:?}"
                        );
                    }
                }
            }
        }
    }

    /// Each level's interleaved dot operations equal their portable twin on every lane,
    /// with and without VNNI. Unsigned codes stay within `maddubs`' exact range (`<= 128`)
    /// for the `u8` dot; the signed dot takes any byte (`-128` included); `x` is at its
    /// extremes (`±127`) and random.
    #[test]
    fn interleaved_dot_ops_equal_their_definition_at_every_level() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        let vnni = vnni_choices();
        for t in 0..64 {
            let mut w: [u8; 64] = core::array::from_fn(|_| next() as u8);
            let x: [u8; 4] = match t {
                0 => [127; 4],
                1 => [(-127i8) as u8; 4],
                _ => core::array::from_fn(|_| (next() as u8).max(0x81)),
            };
            if t == 2 {
                w = [0x80; 64];
            }
            let acc: [i32; 16] = core::array::from_fn(|_| (next() % 20001) as i32 - 10000);
            // The `u8` dot without VNNI needs codes <= 128: check it on such bytes; the
            // other results (signed dot, nibbles) on the raw bytes.
            for w in [w, w.map(|b| b.min(128))] {
                let want = BcastOps {
                    w,
                    x,
                    acc,
                    vnni: false,
                }
                .scalar();
                for isa in Isa::available() {
                    if isa == Isa::Scalar {
                        continue;
                    }
                    for &v in &vnni {
                        let lanes = if isa == Isa::Avx512 { 16 } else { 8 };
                        let got = isa.run(BcastOps { w, x, acc, vnni: v });
                        // The level's lanes against the first as many of the twin's 16.
                        let per = got.len() / 11;
                        assert_eq!(per, lanes);
                        for k in 0..11 {
                            if k == 0 && !v && w.iter().any(|&b| b > 128) {
                                continue;
                            }
                            assert_eq!(
                                got[k * per..][..per],
                                want[k * 16..][..per],
                                "{isa} vnni {v} result {k}: w {w:?} x {x:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every operation on codes in 32-bit words on one input, results as f32 bits in a
    /// fixed order; [`WordOps::definition`] is their definition in plain Rust.
    struct WordOps {
        v: [u8; 64],
        hi: [u8; 32],
        n: [u32; 16],
        w: [f32; 16],
        idx: [u32; 16],
    }

    /// The word shifts and bits every case tries.
    const FIELD_AT: [u32; 10] = [0, 4, 8, 12, 16, 20, 24, 28, 3, 17];
    const FIELD6_HI_AT: [u32; 7] = [0, 2, 4, 6, 8, 14, 30];
    /// [`Simd::nibble_bit4_i32`]'s shifts (Q5_K's `(0, 4)` and `(4, 3)`, and odd ones).
    const BIT4_AT: [(u32, u32); 5] = [(0, 4), (4, 3), (0, 0), (7, 1), (28, 31)];

    impl WordOps {
        /// The results for `lanes` lanes, in plain Rust.
        fn definition(&self, lanes: usize) -> Vec<u32> {
            let word =
                |b: &[u8], i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
            let v: Vec<u32> = (0..lanes).map(|i| word(&self.v, i)).collect();
            let h: Vec<u32> = (0..lanes).map(|i| word(&self.hi, i % 8)).collect();
            let mut out = Vec::new();
            let mut fields = |x: &[u32]| {
                out.extend(x.iter().map(|&x| ((x & 0xFF_FFFF) as f32).to_bits()));
                out.extend(x.iter().map(|&x| ((x >> 24) as f32).to_bits()));
            };
            fields(&h);
            let shifted: Vec<u32> = v.iter().zip(&self.n).map(|(&v, &n)| v >> n).collect();
            fields(&shifted);
            for at in FIELD_AT {
                for mask in [15, 0x1F, 0xFF] {
                    out.extend(v.iter().map(|&v| (((v >> at) & mask) as f32).to_bits()));
                }
            }
            for at in FIELD_AT {
                out.extend(v.iter().map(|&v| (((v >> at) & 15) as f32).to_bits()));
            }
            for lo_at in FIELD_AT {
                for hi_at in FIELD6_HI_AT {
                    out.extend(v.iter().zip(&h).map(|(&lo, &hi)| {
                        ((((lo >> lo_at) & 15) | (((hi >> hi_at) & 3) << 4)) as f32).to_bits()
                    }));
                }
            }
            out.extend(
                self.idx[..lanes]
                    .iter()
                    .map(|&i| self.w[i as usize % lanes].to_bits()),
            );
            for at in FIELD_AT {
                out.extend(v.iter().map(|&v| (((v >> at) & 31) as f32).to_bits()));
            }
            for (lo_at, hi_shl) in BIT4_AT {
                for x in v.iter().zip(&h).map(|(&lo, &hi)| {
                    ((lo >> lo_at) & 0x0F0F_0F0F) | ((hi << hi_shl) & 0xF0F0_F0F0)
                }) {
                    out.push(((x & 0xFF_FFFF) as f32).to_bits());
                    out.push(((x >> 24) as f32).to_bits());
                }
            }
            out
        }
    }

    impl Kernel for WordOps {
        type Output = Vec<u32>;
        fn scalar(self) -> Vec<u32> {
            self.definition(16)
        }
        #[inline(always)]
        fn simd<S: Simd>(self, s: S) -> Vec<u32> {
            let l = S::LANES;
            let v = s.load_i32_bytes(&S::words(&self.v[..4 * l]).0[0]);
            let h = s.load_i32_bytes32(&self.hi);
            let w = s.load(&S::lanes(&self.w[..l]).0[0]);
            let mut out = Vec::new();
            let mut push = |x: S::F32| {
                let mut f = [0f32; 16];
                s.store(&mut S::lanes_mut(&mut f[..l]).0[0], x);
                out.extend(f[..l].iter().map(|v| v.to_bits()));
            };
            for x in [h, s.shr_i32_lanes(v, &self.n)] {
                push(s.field_f32(x, 0, 0xFF_FFFF));
                push(s.field_f32(x, 24, 0xFF));
            }
            for at in FIELD_AT {
                for mask in [15, 0x1F, 0xFF] {
                    push(s.field_f32(v, at, mask));
                }
            }
            for at in FIELD_AT {
                push(s.nibble_f32(v, at));
            }
            for lo_at in FIELD_AT {
                for hi_at in FIELD6_HI_AT {
                    push(s.field6_f32(v, lo_at, h, hi_at));
                }
            }
            push(s.permute_f32(w, &self.idx));
            for at in FIELD_AT {
                push(s.code5_f32(v, at));
            }
            for (lo_at, hi_shl) in BIT4_AT {
                let x = s.nibble_bit4_i32(v, lo_at, h, hi_shl);
                let (lo, hi) = (s.field_f32(x, 0, 0xFF_FFFF), s.field_f32(x, 24, 0xFF));
                let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
                s.store(&mut S::lanes_mut(&mut a[..l]).0[0], lo);
                s.store(&mut S::lanes_mut(&mut b[..l]).0[0], hi);
                for (a, b) in a[..l].iter().zip(&b[..l]) {
                    out.push(a.to_bits());
                    out.push(b.to_bits());
                }
            }
            out
        }
    }

    /// Each level's operations on codes in words equal their definition bit for bit, on
    /// pseudo-random words (all shifts the K-quant kernels use, and odd ones).
    #[test]
    fn word_code_ops_equal_their_definition_at_every_level() {
        let mut next = xorshift(0x51_7cc1_b727_220au64);
        for _ in 0..200 {
            let o = WordOps {
                v: core::array::from_fn(|_| next() as u8),
                hi: core::array::from_fn(|_| next() as u8),
                n: core::array::from_fn(|_| (next() % 32) as u32),
                w: core::array::from_fn(|_| (next() % 2001) as f32 / 64.0 - 15.0),
                idx: core::array::from_fn(|_| (next() % 64) as u32),
            };
            for isa in Isa::available() {
                if isa == Isa::Scalar {
                    continue;
                }
                let lanes = if isa == Isa::Avx512 { 16 } else { 8 };
                let want = o.definition(lanes);
                let got = isa.run(WordOps { ..o });
                assert_eq!(got, want, "{isa}");
            }
            assert_eq!(WordOps { ..o }.scalar(), o.definition(16));
        }
    }

    /// Each level's GGUF weight-code operations equal their plain-Rust definition bit for
    /// bit (negative scales included, where `-0.0` must survive), on pseudo-random inputs.
    #[test]
    fn weight_code_ops_equal_their_definition_at_every_level() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        for case in 0..200 {
            let mut bytes = [0u8; 32];
            bytes.iter_mut().for_each(|b| *b = next() as u8);
            let a = f32::from_bits(next() as u32 & 0x807f_ffff | 0x3f00_0000);
            let b = if case % 3 == 0 {
                0.0
            } else {
                (next() % 1000) as f32 / -7.0
            };
            let ops = || CodeOps {
                bytes,
                a,
                b,
                bits: next_bits(case, bytes),
            };
            let want = ops().scalar();
            for isa in Isa::available() {
                assert_eq!(isa.run(ops()), want, "{isa} case {case}");
            }
        }
    }

    /// [`Simd::lookup16_u4_perm`] and [`Simd::lookup16_pair_u4`] on one row group's 16
    /// bytes, as f32 bits, beside the definition in the same order: `fma(code, a, b)` per
    /// element in element order, then [`Simd::perm32`] / [`Simd::perm2`].
    struct RowNibbles {
        bytes: [u8; 16],
        a: f32,
        b: f32,
    }

    impl RowNibbles {
        /// `fma(code_i, a, b)` for the 32 codes, low nibble first, in element order.
        fn reference(&self) -> [f32; 32] {
            core::array::from_fn(|i| {
                let code = self.bytes[i / 2] >> (4 * (i % 2)) & 15;
                f32::from(code).mul_add(self.a, self.b)
            })
        }
    }

    impl Kernel for RowNibbles {
        /// (got, want): the lookups' bits, the definition's bits.
        type Output = (Vec<u32>, Vec<u32>);
        fn scalar(self) -> Self::Output {
            let want: Vec<u32> = self.reference().iter().map(|x| x.to_bits()).collect();
            (want.clone(), want)
        }
        #[inline(always)]
        fn simd<S: Simd>(self, s: S) -> Self::Output {
            let reference = self.reference();
            let t = s.lut16_affine(s.splat(self.a), s.splat(self.b));
            let mut got = [0f32; 32];
            s.store32(&mut got, s.lookup16_u4_perm(t, &self.bytes));
            let mut want = [0f32; 32];
            s.store32(&mut want, s.perm32(s.load32(&reference)));
            let (mut got, mut want) = (got.to_vec(), want.to_vec());
            // The first `2 * LANES` codes as a pair of vectors.
            let pair = s.lookup16_pair_u4(t, &S::bytes(&self.bytes).0[0]);
            let (l, _) = S::lanes(&reference[..2 * S::LANES]);
            let perm = s.perm2([s.load(&l[0]), s.load(&l[1])]);
            let mut v = vec![0f32; 2 * S::LANES];
            let mut w = vec![0f32; 2 * S::LANES];
            {
                let (lv, _) = S::lanes_mut(&mut v);
                let (lw, _) = S::lanes_mut(&mut w);
                for k in 0..2 {
                    s.store(&mut lv[k], pair[k]);
                    s.store(&mut lw[k], perm[k]);
                }
            }
            got.extend(v);
            want.extend(w);
            let bits = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect();
            (bits(got), bits(want))
        }
    }

    /// The 4-bit row lookups give each level's dequantized values bit for bit, in the order
    /// the decode kernels read them (negative scales and minima included).
    #[test]
    fn row_nibble_lookups_equal_fma_of_each_code_at_every_level() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        for case in 0..200 {
            let mut bytes = [0u8; 16];
            bytes.iter_mut().for_each(|b| *b = next() as u8);
            let a = f32::from_bits(next() as u32 & 0x807f_ffff | 0x3c00_0000);
            let b = (next() % 2000) as f32 / -7.0 + 100.0;
            for isa in Isa::available() {
                let (got, want) = isa.run(RowNibbles { bytes, a, b });
                assert_eq!(got, want, "{isa} case {case}");
            }
        }
    }

    /// [`Simd::lookup32_split_centered_dot`] on one input: its scalar twin is the plain
    /// product `(code - 16) * a`.
    struct CenteredDot {
        bytes: [u8; 16],
        a: f32,
        bits: u32,
    }

    impl Kernel for CenteredDot {
        type Output = Vec<f32>;
        fn scalar(self) -> Vec<f32> {
            (0..32)
                .map(|j| {
                    let q = self.bytes[j % 16];
                    let q = if j < 16 { q & 15 } else { q >> 4 };
                    let high = if self.bits >> j & 1 == 1 { 16 } else { 0 };
                    centered(q | high, 16, self.a)
                })
                .collect()
        }
        fn simd<S: Simd>(self, s: S) -> Vec<f32> {
            let mut out = [0f32; 32];
            let w = s.lookup32_split_centered_dot(s.splat(self.a), &self.bytes, self.bits);
            s.store32(&mut out, w);
            out.to_vec()
        }
    }

    /// The Q5_0 dot-product lookup equals the product at every level for f16 scales of
    /// either sign (zero included), up to the sign of a zero weight.
    #[test]
    fn centered_dot_lookup_equals_the_product_up_to_zero_sign() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        for case in 0..400u32 {
            let mut bytes = [0u8; 32];
            bytes.iter_mut().for_each(|b| *b = next() as u8);
            // Any finite f16 (subnormals, both signs, zero), as f32.
            let a = loop {
                let h = half::f16::from_bits(next() as u16);
                if h.is_finite() {
                    break h.to_f32();
                }
            };
            let ops = || CenteredDot {
                bytes: *bytes.first_chunk().unwrap_or(&[0; 16]),
                a,
                bits: next_bits(case, bytes),
            };
            let want = ops().scalar();
            for isa in Isa::available() {
                let got = isa.run(ops());
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(g == w, "{isa} case {case} weight {j}: {g} vs {w}");
                }
            }
        }
    }

    /// A fifth-bit mask for case `case`: all clear, all set, or from the bytes.
    fn next_bits(case: u32, b: [u8; 32]) -> u32 {
        match case % 4 {
            0 => 0,
            1 => u32::MAX,
            _ => u32::from_le_bytes([b[3], b[7], b[11], b[29]]),
        }
    }

    /// [`Simd::round32_i8`] on blocks, against [`round32_i8_scalar`].
    struct RoundOps<'a>(&'a [([f32; 32], f32)]);

    impl Kernel for RoundOps<'_> {
        type Output = Vec<([u8; 32], i32)>;
        fn scalar(self) -> Self::Output {
            self.0
                .iter()
                .map(|(x, inv)| round32_i8_scalar(x, *inv))
                .collect()
        }
        #[inline(always)]
        fn simd<S: Simd>(self, s: S) -> Self::Output {
            self.0
                .iter()
                .map(|(x, inv)| s.round32_i8(s.load32(x), *inv))
                .collect()
        }
    }

    /// Every level rounds to the same bytes and sum as the portable twin, bit for bit: on
    /// random blocks scaled as kv-model scales them and by random factors, and on the
    /// edges of round-half-away-from-zero (ties at every code, the floats either side of
    /// 0.5, which `+0.5` then truncate would get wrong), NaN, ±inf, ±0, huge values,
    /// subnormals, and factors 0, huge and infinite.
    #[test]
    fn round32_i8_equals_its_portable_twin_at_every_level() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        let half = 0.5f32;
        let edges = [
            0.0,
            -0.0,
            half,
            -half,
            f32::from_bits(half.to_bits() - 1),
            -f32::from_bits(half.to_bits() - 1),
            f32::from_bits(half.to_bits() + 1),
            1.5,
            -1.5,
            2.5,
            -2.5,
            126.5,
            -126.5,
            127.49999,
            127.5,
            -127.5,
            128.0,
            -128.5,
            8_388_607.5,
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            -f32::from_bits(0x0004_0000),
            1e30,
            -1e-30,
            63.5,
            -0.25,
        ];
        let mut blocks: Vec<([f32; 32], f32)> = Vec::new();
        for inv in [1.0, 0.0, 2.0, 0.5, 1e30, f32::INFINITY, f32::from_bits(1)] {
            blocks.push((edges, inv));
        }
        // Every tie from -128.5 to 127.5, and its neighbours.
        for k in -129..128 {
            let t = k as f32 + 0.5;
            let x = core::array::from_fn(|j| match j % 3 {
                0 => t,
                1 => f32::from_bits(t.to_bits() - 1),
                _ => f32::from_bits(t.to_bits() + 1),
            });
            blocks.push((x, 1.0));
        }
        for case in 0..2000 {
            let exp = (0x2000_0000 + (next() as u32 % 0x3000_0000)) & 0x7f80_0000;
            let mut x: [f32; 32] = core::array::from_fn(|_| {
                let b = next() as u32;
                f32::from_bits(b & 0x807f_ffff | exp)
            });
            if case % 5 == 0 {
                x[(next() % 32) as usize] = edges[(next() % edges.len() as u64) as usize];
            }
            let inv = if case % 3 == 0 {
                f32::from_bits((next() as u32 & 0x007f_ffff) | 0x3f00_0000) * 300.0
            } else {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let e = amax / 127.0;
                if e > 0.0 {
                    1.0 / e
                } else {
                    0.0
                }
            };
            blocks.push((x, inv));
        }
        let want = RoundOps(&blocks).scalar();
        for isa in Isa::available() {
            let got = isa.run(RoundOps(&blocks));
            for (b, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{isa} block {b}: {:?} x {}", blocks[b].0, blocks[b].1);
            }
        }
    }
}
