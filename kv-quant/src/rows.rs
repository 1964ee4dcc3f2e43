//! The one-row kernels (dot, axpy, dequantize) of every row format, written once over the
//! vector width ([`Simd`]) and run at each SIMD level by [`crate::Kernels`].
//!
//! Quantized rows: `x̂ = fma(code, s, m)` is `m + s * code` rounded once, exactly the scalar
//! definition (the product is exact), so dequantized values match the reference bit for bit
//! and dot/axpy differ from it only in summation order. Float rows of any length: 32-element
//! chunks, then whole vectors, then a scalar tail.
//!
//! Every function takes the lengths the public API checked (`q`/`acc`/`out`: `head_dim`
//! valid for the format; rows: `row_bytes(head_dim)`); inside they are `debug_assert!`ed.
//! A wrong length gives a wrong result, never an out-of-bounds access: every access goes
//! through bounds-checked slices and fixed-size arrays.

use crate::format::RowFormat;
use crate::scalar;
use crate::simd::Simd;

/// The codes of a quantized format: how 32 of them are stored and unpacked.
pub(crate) trait Codes {
    /// Header bytes of a group: f16 scale (and f16 minimum when asymmetric).
    const HEADER: usize;
    /// Whether the header has a minimum (`x̂ = m + s * code`).
    const ASYM: bool;
    /// Bytes of 32 codes.
    type Bytes32: Copy;
    /// Bytes of `2 * S::LANES` codes (a pair of vectors).
    type Pair<S: Simd>: Copy;
    /// The whole 32-code chunks of `b`.
    fn chunks(b: &[u8]) -> &[Self::Bytes32];
    /// 32 codes as f32.
    fn unpack<S: Simd>(s: S, b: &Self::Bytes32) -> S::X32;
    /// The whole pairs of vectors of codes of `b`.
    fn pairs<S: Simd>(b: &[u8]) -> &[Self::Pair<S>];
    /// `2 * S::LANES` codes as f32, in the order of [`Simd::perm2`] when
    /// [`permuted`](Self::permuted), else in element order.
    fn unpack_pair<S: Simd>(s: S, b: &Self::Pair<S>) -> [S::F32; 2];
    /// Whether [`unpack_pair`](Self::unpack_pair) and [`unpack_perm`](Self::unpack_perm)
    /// leave element order at width `S`.
    #[inline(always)]
    fn permuted<S: Simd>() -> bool {
        false
    }
    /// 32 codes as f32, in the order of [`Simd::perm32`] when
    /// [`permuted`](Self::permuted), else in element order.
    #[inline(always)]
    fn unpack_perm<S: Simd>(s: S, b: &Self::Bytes32) -> S::X32 {
        Self::unpack(s, b)
    }
    /// [`unpack_perm`](Self::unpack_perm) dequantized with the group's scale `sv` and
    /// minimum `mv`: `fma(c, s, m)`, or `c * s` for the symmetric header.
    #[inline(always)]
    fn dequant_perm<S: Simd>(s: S, b: &Self::Bytes32, sv: S::F32, mv: S::F32) -> S::X32 {
        let mut x = Self::unpack_perm(s, b);
        for v in x.as_mut() {
            *v = dequant::<S, Self>(s, *v, sv, mv);
        }
        x
    }
    /// [`unpack_pair`](Self::unpack_pair) dequantized as in
    /// [`dequant_perm`](Self::dequant_perm).
    #[inline(always)]
    fn dequant_pair<S: Simd>(s: S, b: &Self::Pair<S>, sv: S::F32, mv: S::F32) -> [S::F32; 2] {
        let [x0, x1] = Self::unpack_pair(s, b);
        [
            dequant::<S, Self>(s, x0, sv, mv),
            dequant::<S, Self>(s, x1, sv, mv),
        ]
    }
}

/// `x̂` of unpacked codes: `fma(c, s, m)`, or `c * s` for the symmetric header.
#[inline(always)]
pub(crate) fn dequant<S: Simd, C: Codes + ?Sized>(
    s: S,
    c: S::F32,
    sv: S::F32,
    mv: S::F32,
) -> S::F32 {
    if C::ASYM {
        s.fma(c, sv, mv)
    } else {
        s.mul(c, sv)
    }
}

/// INT8: symmetric, signed codes.
pub(crate) struct I8;
/// INT4: asymmetric, 4-bit codes.
pub(crate) struct U4;
/// INT2: asymmetric, 2-bit codes.
pub(crate) struct U2;

impl Codes for I8 {
    const HEADER: usize = 2;
    const ASYM: bool = false;
    type Bytes32 = [u8; 32];
    type Pair<S: Simd> = S::Halves;
    #[inline(always)]
    fn chunks(b: &[u8]) -> &[[u8; 32]] {
        b.as_chunks().0
    }
    #[inline(always)]
    fn unpack<S: Simd>(s: S, b: &[u8; 32]) -> S::X32 {
        s.codes32_i8(b)
    }
    #[inline(always)]
    fn pairs<S: Simd>(b: &[u8]) -> &[S::Halves] {
        S::halves(b).0
    }
    #[inline(always)]
    fn unpack_pair<S: Simd>(s: S, b: &S::Halves) -> [S::F32; 2] {
        s.pair_i8(b)
    }
}

impl Codes for U4 {
    const HEADER: usize = 4;
    const ASYM: bool = true;
    type Bytes32 = [u8; 16];
    type Pair<S: Simd> = S::Bytes;
    #[inline(always)]
    fn chunks(b: &[u8]) -> &[[u8; 16]] {
        b.as_chunks().0
    }
    #[inline(always)]
    fn unpack<S: Simd>(s: S, b: &[u8; 16]) -> S::X32 {
        s.codes32_u4(b)
    }
    #[inline(always)]
    fn pairs<S: Simd>(b: &[u8]) -> &[S::Bytes] {
        S::bytes(b).0
    }
    #[inline(always)]
    fn unpack_pair<S: Simd>(s: S, b: &S::Bytes) -> [S::F32; 2] {
        s.pair_u4(b)
    }
    #[inline(always)]
    fn permuted<S: Simd>() -> bool {
        S::U4_PERMUTED
    }
    #[inline(always)]
    fn unpack_perm<S: Simd>(s: S, b: &[u8; 16]) -> S::X32 {
        s.codes32_u4_perm(b)
    }
    // A 4-bit code stands for one of 16 values of its group: computed once into a table
    // (one fma) and looked up, bit for bit the values the default computes per code.
    #[inline(always)]
    fn dequant_perm<S: Simd>(s: S, b: &[u8; 16], sv: S::F32, mv: S::F32) -> S::X32 {
        s.lookup16_u4_perm(s.lut16_affine(sv, mv), b)
    }
    #[inline(always)]
    fn dequant_pair<S: Simd>(s: S, b: &S::Bytes, sv: S::F32, mv: S::F32) -> [S::F32; 2] {
        s.lookup16_pair_u4(s.lut16_affine(sv, mv), b)
    }
}

impl Codes for U2 {
    const HEADER: usize = 4;
    const ASYM: bool = true;
    type Bytes32 = [u8; 8];
    type Pair<S: Simd> = S::Quarters;
    #[inline(always)]
    fn chunks(b: &[u8]) -> &[[u8; 8]] {
        b.as_chunks().0
    }
    #[inline(always)]
    fn unpack<S: Simd>(s: S, b: &[u8; 8]) -> S::X32 {
        s.codes32_u2(b)
    }
    #[inline(always)]
    fn pairs<S: Simd>(b: &[u8]) -> &[S::Quarters] {
        S::quarters(b).0
    }
    #[inline(always)]
    fn unpack_pair<S: Simd>(s: S, b: &S::Quarters) -> [S::F32; 2] {
        s.pair_u2(b)
    }
}

/// Scale and minimum of a group (minimum 0 for the symmetric header), broadcast.
#[inline(always)]
pub(crate) fn params<S: Simd, C: Codes>(s: S, g: &[u8]) -> (S::F32, S::F32) {
    let head = match g {
        [a, b, c, d, ..] => [*a, *b, *c, *d],
        // Every group has at least 4 bytes (2 of header and 32 codes); kept total.
        _ => [0; 4],
    };
    let (sv, mv) = s.splat_f16_pair(head);
    (sv, if C::ASYM { mv } else { s.zero() })
}

/// Bytes of a group of `group` elements.
#[inline(always)]
pub(crate) fn group_bytes<C: Codes>(group: usize) -> usize {
    C::HEADER + group / 32 * core::mem::size_of::<C::Bytes32>()
}

#[inline(always)]
fn dot_q<S: Simd, C: Codes>(s: S, group: usize, q: &[f32], row: &[u8]) -> f32 {
    let gb = group_bytes::<C>(group);
    debug_assert_eq!(row.len(), q.len() / group * gb, "row length");
    let mut acc = s.zero32();
    for (qg, rg) in q.chunks_exact(group).zip(row.chunks_exact(gb)) {
        let (sv, mv) = params::<S, C>(s, rg);
        for (q32, c32) in qg
            .as_chunks::<32>()
            .0
            .iter()
            .zip(C::chunks(&rg[C::HEADER..]))
        {
            let (qv, c) = (s.load32(q32), C::unpack(s, c32));
            for ((a, q), c) in acc.as_mut().iter_mut().zip(qv.as_ref()).zip(c.as_ref()) {
                *a = s.fma(*q, s.fma(*c, sv, mv), *a);
            }
        }
    }
    s.sum32(acc)
}

#[inline(always)]
fn axpy_q<S: Simd, C: Codes>(s: S, group: usize, w: f32, row: &[u8], acc: &mut [f32]) {
    let gb = group_bytes::<C>(group);
    debug_assert_eq!(row.len(), acc.len() / group * gb, "row length");
    let wv = s.splat(w);
    for (ag, rg) in acc.chunks_exact_mut(group).zip(row.chunks_exact(gb)) {
        let (sv, mv) = params::<S, C>(s, rg);
        let a32 = ag.as_chunks_mut::<32>().0;
        for (a32, c32) in a32.iter_mut().zip(C::chunks(&rg[C::HEADER..])) {
            let (mut av, c) = (s.load32(a32), C::unpack(s, c32));
            for (a, c) in av.as_mut().iter_mut().zip(c.as_ref()) {
                *a = s.fma(wv, s.fma(*c, sv, mv), *a);
            }
            s.store32(a32, av);
        }
    }
}

#[inline(always)]
fn deq_q<S: Simd, C: Codes>(s: S, group: usize, row: &[u8], out: &mut [f32]) {
    let gb = group_bytes::<C>(group);
    debug_assert_eq!(row.len(), out.len() / group * gb, "row length");
    for (og, rg) in out.chunks_exact_mut(group).zip(row.chunks_exact(gb)) {
        let (sv, mv) = params::<S, C>(s, rg);
        let o32 = og.as_chunks_mut::<32>().0;
        for (o32, c32) in o32.iter_mut().zip(C::chunks(&rg[C::HEADER..])) {
            let mut x = C::unpack(s, c32);
            for x in x.as_mut() {
                *x = s.fma(*x, sv, mv);
            }
            s.store32(o32, x);
        }
    }
}

/// A float format's stored elements.
trait Float {
    /// Bytes per element.
    const WIDTH: usize;
    /// Bytes of 32 elements.
    type Bytes32: Copy;
    /// The whole 32-element chunks of `b` and the rest.
    fn chunks(b: &[u8]) -> (&[Self::Bytes32], &[u8]);
    /// 32 elements as f32.
    fn load32<S: Simd>(s: S, b: &Self::Bytes32) -> S::X32;
    /// `f(i, vector i)` for the whole vectors of `b`; returns the bytes left.
    fn vectors<S: Simd>(s: S, b: &[u8], f: impl FnMut(usize, S::F32)) -> &[u8];
    /// One element.
    fn at(b: &[u8]) -> f32;
}

/// f32 rows.
struct F32;
/// f16 rows.
struct F16;
/// bf16 rows.
struct Bf16;

impl Float for F32 {
    const WIDTH: usize = 4;
    type Bytes32 = [u8; 128];
    #[inline(always)]
    fn chunks(b: &[u8]) -> (&[[u8; 128]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn load32<S: Simd>(s: S, b: &[u8; 128]) -> S::X32 {
        s.load32_f32_bytes(b)
    }
    #[inline(always)]
    fn vectors<S: Simd>(s: S, b: &[u8], mut f: impl FnMut(usize, S::F32)) -> &[u8] {
        let (v, rest) = S::words(b);
        for (i, v) in v.iter().enumerate() {
            f(i, s.load_f32_bytes(v));
        }
        rest
    }
    #[inline(always)]
    fn at(b: &[u8]) -> f32 {
        scalar::f32_at(b)
    }
}

impl Float for F16 {
    const WIDTH: usize = 2;
    type Bytes32 = [u8; 64];
    #[inline(always)]
    fn chunks(b: &[u8]) -> (&[[u8; 64]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn load32<S: Simd>(s: S, b: &[u8; 64]) -> S::X32 {
        s.load32_f16(b)
    }
    #[inline(always)]
    fn vectors<S: Simd>(s: S, b: &[u8], mut f: impl FnMut(usize, S::F32)) -> &[u8] {
        let (v, rest) = S::halves(b);
        for (i, v) in v.iter().enumerate() {
            f(i, s.load_f16(v));
        }
        rest
    }
    #[inline(always)]
    fn at(b: &[u8]) -> f32 {
        scalar::f16_at(b)
    }
}

impl Float for Bf16 {
    const WIDTH: usize = 2;
    type Bytes32 = [u8; 64];
    #[inline(always)]
    fn chunks(b: &[u8]) -> (&[[u8; 64]], &[u8]) {
        b.as_chunks()
    }
    #[inline(always)]
    fn load32<S: Simd>(s: S, b: &[u8; 64]) -> S::X32 {
        s.load32_bf16(b)
    }
    #[inline(always)]
    fn vectors<S: Simd>(s: S, b: &[u8], mut f: impl FnMut(usize, S::F32)) -> &[u8] {
        let (v, rest) = S::halves(b);
        for (i, v) in v.iter().enumerate() {
            f(i, s.load_bf16(v));
        }
        rest
    }
    #[inline(always)]
    fn at(b: &[u8]) -> f32 {
        scalar::bf16_at(b)
    }
}

#[inline(always)]
fn dot_f<S: Simd, F: Float>(s: S, q: &[f32], row: &[u8]) -> f32 {
    debug_assert_eq!(row.len(), q.len() * F::WIDTH, "row length");
    let mut acc = s.zero32();
    let (q32, qt) = q.as_chunks::<32>();
    let (r32, rt) = F::chunks(row);
    for (q32, r32) in q32.iter().zip(r32) {
        let (qv, x) = (s.load32(q32), F::load32(s, r32));
        for ((a, q), x) in acc.as_mut().iter_mut().zip(qv.as_ref()).zip(x.as_ref()) {
            *a = s.fma(*q, *x, *a);
        }
    }
    // Whole vectors past the last chunk go into the first accumulator (no second sum).
    let (ql, qt) = S::lanes(qt);
    let rt = F::vectors(s, rt, |i, x| {
        if let (Some(q), Some(a)) = (ql.get(i), acc.as_mut().first_mut()) {
            *a = s.fma(s.load(q), x, *a);
        }
    });
    let mut sum = s.sum32(acc);
    for (&qi, b) in qt.iter().zip(rt.chunks_exact(F::WIDTH)) {
        sum += qi * F::at(b);
    }
    sum
}

#[inline(always)]
fn axpy_f<S: Simd, F: Float>(s: S, w: f32, row: &[u8], acc: &mut [f32]) {
    debug_assert_eq!(row.len(), acc.len() * F::WIDTH, "row length");
    let wv = s.splat(w);
    let (al, at) = S::lanes_mut(acc);
    let rt = F::vectors(s, row, |i, x| {
        if let Some(a) = al.get_mut(i) {
            let v = s.fma(wv, x, s.load(a));
            s.store(a, v);
        }
    });
    for (a, b) in at.iter_mut().zip(rt.chunks_exact(F::WIDTH)) {
        *a += w * F::at(b);
    }
}

#[inline(always)]
fn deq_f<S: Simd, F: Float>(s: S, row: &[u8], out: &mut [f32]) {
    debug_assert_eq!(row.len(), out.len() * F::WIDTH, "row length");
    let (ol, ot) = S::lanes_mut(out);
    let rt = F::vectors(s, row, |i, x| {
        if let Some(o) = ol.get_mut(i) {
            s.store(o, x);
        }
    });
    for (o, b) in ot.iter_mut().zip(rt.chunks_exact(F::WIDTH)) {
        *o = F::at(b);
    }
}

/// `q · x̂` for any row format.
#[inline(always)]
pub(crate) fn dot<S: Simd>(s: S, format: RowFormat, q: &[f32], row: &[u8]) -> f32 {
    match format {
        RowFormat::F32 => dot_f::<S, F32>(s, q, row),
        RowFormat::F16 => dot_f::<S, F16>(s, q, row),
        RowFormat::Bf16 => dot_f::<S, Bf16>(s, q, row),
        RowFormat::Int8 { group } => dot_q::<S, I8>(s, group.size(), q, row),
        RowFormat::Int4 { group } => dot_q::<S, U4>(s, group.size(), q, row),
        RowFormat::Int2 { group } => dot_q::<S, U2>(s, group.size(), q, row),
    }
}

/// `acc += w * x̂` for any row format.
#[inline(always)]
pub(crate) fn axpy<S: Simd>(s: S, format: RowFormat, w: f32, row: &[u8], acc: &mut [f32]) {
    match format {
        RowFormat::F32 => axpy_f::<S, F32>(s, w, row, acc),
        RowFormat::F16 => axpy_f::<S, F16>(s, w, row, acc),
        RowFormat::Bf16 => axpy_f::<S, Bf16>(s, w, row, acc),
        RowFormat::Int8 { group } => axpy_q::<S, I8>(s, group.size(), w, row, acc),
        RowFormat::Int4 { group } => axpy_q::<S, U4>(s, group.size(), w, row, acc),
        RowFormat::Int2 { group } => axpy_q::<S, U2>(s, group.size(), w, row, acc),
    }
}

/// `out = x̂` for any row format.
#[inline(always)]
pub(crate) fn dequantize<S: Simd>(s: S, format: RowFormat, row: &[u8], out: &mut [f32]) {
    match format {
        RowFormat::F32 => deq_f::<S, F32>(s, row, out),
        RowFormat::F16 => deq_f::<S, F16>(s, row, out),
        RowFormat::Bf16 => deq_f::<S, Bf16>(s, row, out),
        RowFormat::Int8 { group } => deq_q::<S, I8>(s, group.size(), row, out),
        RowFormat::Int4 { group } => deq_q::<S, U4>(s, group.size(), row, out),
        RowFormat::Int2 { group } => deq_q::<S, U2>(s, group.size(), row, out),
    }
}

/// Scores of `q` against every row of `rows` (`out.len()` rows of `rb` bytes).
#[inline(always)]
pub(crate) fn dot_many<S: Simd>(
    s: S,
    format: RowFormat,
    q: &[f32],
    rows: &[u8],
    rb: usize,
    out: &mut [f32],
) {
    debug_assert_eq!(rows.len(), rb * out.len(), "rows length");
    macro_rules! each {
        ($kernel:expr) => {
            for (o, row) in out.iter_mut().zip(rows.chunks_exact(rb)) {
                *o = $kernel(row);
            }
        };
    }
    match format {
        RowFormat::F32 => each!(|r| dot_f::<S, F32>(s, q, r)),
        RowFormat::F16 => each!(|r| dot_f::<S, F16>(s, q, r)),
        RowFormat::Bf16 => each!(|r| dot_f::<S, Bf16>(s, q, r)),
        RowFormat::Int8 { group } => each!(|r| dot_q::<S, I8>(s, group.size(), q, r)),
        RowFormat::Int4 { group } => each!(|r| dot_q::<S, U4>(s, group.size(), q, r)),
        RowFormat::Int2 { group } => each!(|r| dot_q::<S, U2>(s, group.size(), q, r)),
    }
}

/// `acc += sum_t weights[t] * x̂_t` over `weights.len()` rows of `rb` bytes.
#[inline(always)]
pub(crate) fn axpy_many<S: Simd>(
    s: S,
    format: RowFormat,
    weights: &[f32],
    rows: &[u8],
    rb: usize,
    acc: &mut [f32],
) {
    debug_assert_eq!(rows.len(), rb * weights.len(), "rows length");
    macro_rules! each {
        ($kernel:expr) => {
            for (&w, row) in weights.iter().zip(rows.chunks_exact(rb)) {
                $kernel(w, row);
            }
        };
    }
    match format {
        RowFormat::F32 => each!(|w, r| axpy_f::<S, F32>(s, w, r, acc)),
        RowFormat::F16 => each!(|w, r| axpy_f::<S, F16>(s, w, r, acc)),
        RowFormat::Bf16 => each!(|w, r| axpy_f::<S, Bf16>(s, w, r, acc)),
        RowFormat::Int8 { group } => each!(|w, r| axpy_q::<S, I8>(s, group.size(), w, r, acc)),
        RowFormat::Int4 { group } => each!(|w, r| axpy_q::<S, U4>(s, group.size(), w, r, acc)),
        RowFormat::Int2 { group } => each!(|w, r| axpy_q::<S, U2>(s, group.size(), w, r, acc)),
    }
}

/// `out[r] = x̂[r]` for consecutive rows of `rb` bytes, `out` holding rows of `d`.
#[inline(always)]
pub(crate) fn dequantize_rows<S: Simd>(
    s: S,
    format: RowFormat,
    rows: &[u8],
    rb: usize,
    out: &mut [f32],
    d: usize,
) {
    debug_assert_eq!(rows.len() / rb, out.len() / d, "rows and out differ");
    macro_rules! each {
        ($kernel:expr) => {
            for (row, o) in rows.chunks_exact(rb).zip(out.chunks_exact_mut(d)) {
                $kernel(row, o);
            }
        };
    }
    match format {
        RowFormat::F32 => each!(|r, o| deq_f::<S, F32>(s, r, o)),
        RowFormat::F16 => each!(|r, o| deq_f::<S, F16>(s, r, o)),
        RowFormat::Bf16 => each!(|r, o| deq_f::<S, Bf16>(s, r, o)),
        RowFormat::Int8 { group } => each!(|r, o| deq_q::<S, I8>(s, group.size(), r, o)),
        RowFormat::Int4 { group } => each!(|r, o| deq_q::<S, U4>(s, group.size(), r, o)),
        RowFormat::Int2 { group } => each!(|r, o| deq_q::<S, U2>(s, group.size(), r, o)),
    }
}
