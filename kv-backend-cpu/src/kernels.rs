//! The arithmetic of the attention loop: the portable reference, the choice of instruction
//! set, and the kernels the loop calls.
//!
//! Two levels of functions live here.
//!
//! - **Row math** (public): converting a row between f32 and its stored format, the dot
//!   product of an f32 query with an f32 row, the weighted add of an f32 row into an
//!   accumulator. Plain, obviously right Rust; the storage uses the conversions, and they
//!   are the reference the fast kernels are tested against.
//! - **Kernels** (crate-internal), each taking an [`Isa`]: scores of a group of query heads
//!   against a run of stored rows, with every row loaded once for all heads of the group;
//!   the weighted sum of a run of stored rows into those heads' accumulators; the max and
//!   exp-and-sum of the online softmax; and, for prefill, the query-tile x key-tile
//!   products over f32 tiles. [`Isa::Scalar`] runs the portable versions below, which
//!   widen a row in chunks of 64 elements (with `half`'s slice conversions) and use
//!   the row math; [`Isa::Avx2`] and [`Isa::Avx512`] run the versions in the `simd` module,
//!   written once over the vector width on kv-quant's SIMD layer, which read f16 and bf16
//!   rows directly and widen them in registers.
//!
//! The instruction set is chosen at run time ([`Isa::best`], from kv-quant's SIMD layer,
//! which reads the workspace's one switch `KV_ISA`); a level the CPU lacks is never run,
//! whatever a caller asks for, because the SIMD kernels are reached only through kv-quant's
//! level tokens, which exist only on a CPU with the level's features. Tests run every
//! kernel at every level the CPU has and compare it with the scalar one.
//!
//! Every function takes slices meant to be of matching lengths; a longer one is cut to the
//! shorter, which the backend never relies on.
//!
//! ```
//! use half::f16;
//! use kv_backend_cpu::kernels;
//! let row = [f16::from_f32(0.5), f16::from_f32(-1.0), f16::from_f32(2.0)];
//! let mut wide = [0.0f32; 3];
//! kernels::decode_f16(&row, &mut wide);
//! assert_eq!(kernels::dot_f32(&[1.0, 2.0, 3.0], &wide), 4.5);
//! let mut acc = [0.0f32; 3];
//! kernels::axpy_f32(2.0, &wide, &mut acc);
//! assert_eq!(acc, [1.0, -2.0, 4.0]);
//! assert!(kernels::Isa::best().is_available());
//! ```

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use kv_quant::simd::Simd;

use crate::simd;

/// Independent partial sums in [`dot_f32`]: they break the serial dependency on one
/// accumulator so the compiler can keep several multiply-adds in flight (and vectorise),
/// which it may not do for a single float sum because float addition is not associative.
const LANES: usize = 8;

/// Dot product of an f32 query with an f32 row.
pub fn dot_f32(q: &[f32], row: &[f32]) -> f32 {
    let n = q.len().min(row.len());
    let (q, row) = (&q[..n], &row[..n]);
    let q_chunks = q.chunks_exact(LANES);
    let r_chunks = row.chunks_exact(LANES);
    let tail: f32 = q_chunks
        .remainder()
        .iter()
        .zip(r_chunks.remainder())
        .map(|(&a, &b)| a * b)
        .sum();
    let mut lanes = [0.0f32; LANES];
    for (qc, rc) in q_chunks.zip(r_chunks) {
        for ((lane, &a), &b) in lanes.iter_mut().zip(qc).zip(rc) {
            *lane += a * b;
        }
    }
    // Pairwise sum of the lanes keeps the rounding error of the final reduction small.
    let [a, b, c, d, e, f, g, h] = lanes;
    ((a + b) + (c + d)) + ((e + f) + (g + h)) + tail
}

/// `acc += w * row`.
pub fn axpy_f32(w: f32, row: &[f32], acc: &mut [f32]) {
    for (a, &r) in acc.iter_mut().zip(row) {
        *a += w * r;
    }
}

/// `acc *= s`: rescales an accumulator when the running maximum of the online softmax
/// grows, and normalises it at the end.
pub fn scale(acc: &mut [f32], s: f32) {
    for a in acc {
        *a *= s;
    }
}

/// Copies an f32 row into f32 storage (and back out: the f32 layout stores rows as given).
pub fn copy_f32(src: &[f32], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    dst[..n].copy_from_slice(&src[..n]);
}

/// Rounds an f32 row to f16 (round to nearest, ties to even).
pub fn encode_f16(src: &[f32], dst: &mut [f16]) {
    let n = src.len().min(dst.len());
    dst[..n].convert_from_f32_slice(&src[..n]);
}

/// Rounds an f32 row to bf16 (round to nearest, ties to even).
pub fn encode_bf16(src: &[f32], dst: &mut [bf16]) {
    let n = src.len().min(dst.len());
    dst[..n].convert_from_f32_slice(&src[..n]);
}

/// Widens an f16 row to f32 (exact).
pub fn decode_f16(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    src[..n].convert_to_f32_slice(&mut dst[..n]);
}

/// Widens a bf16 row to f32 (exact).
pub fn decode_bf16(src: &[bf16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    src[..n].convert_to_f32_slice(&mut dst[..n]);
}

/// The instruction-set levels, shared with the whole workspace: kv-quant's one SIMD layer
/// ([`kv_quant::simd`]) detects the CPU and reads the one switch, `KV_ISA`.
pub use kv_quant::simd::Isa;

/// Asks the CPU to start loading `data` into its caches (a hint; no value changes). The
/// decode loop has the next tile's rows prefetched while it computes with the current one:
/// a sequence's blocks may be scattered, and even over one contiguous head-major stream,
/// turning it off made the decode step 2-3.5x slower (this machine, 4096 tokens).
pub(crate) fn prefetch<T>(data: &[T]) {
    kv_quant::simd::Prefetch::all(data);
}

/// Elements the portable kernels widen a row by at a time (a stack buffer).
pub(crate) const CHUNK: usize = 64;

/// A stored element type: widened to f32 one at a time or a slice at a time.
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    /// The value as f32 (exact for every stored format).
    fn widen(self) -> f32;
    /// `dst[i] = src[i].widen()` over the shorter of the two.
    fn widen_slice(src: &[Self], dst: &mut [f32]);
}

impl Widen for f32 {
    #[inline]
    fn widen(self) -> f32 {
        self
    }
    fn widen_slice(src: &[f32], dst: &mut [f32]) {
        copy_f32(src, dst)
    }
}

impl Widen for f16 {
    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn widen_slice(src: &[f16], dst: &mut [f32]) {
        decode_f16(src, dst)
    }
}

impl Widen for bf16 {
    #[inline]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn widen_slice(src: &[bf16], dst: &mut [f32]) {
        decode_bf16(src, dst)
    }
}

/// A stored element type every kernel level reads directly: its whole vectors of
/// `S::LANES` elements, and one widened to f32 in registers.
pub(crate) trait Elem: Widen + bytemuck::Pod {
    /// `S::LANES` elements as the SIMD layer loads them.
    type Vector<S: Simd>: Copy;
    /// The whole vectors at the start of `row` (the rest is left to a tail).
    fn vectors<S: Simd>(row: &[Self]) -> &[Self::Vector<S>];
    /// One vector widened to f32 (exact).
    fn load<S: Simd>(s: S, v: &Self::Vector<S>) -> S::F32;
}

impl Elem for f32 {
    type Vector<S: Simd> = S::Lanes;
    #[inline(always)]
    fn vectors<S: Simd>(row: &[f32]) -> &[S::Lanes] {
        S::lanes(row).0
    }
    #[inline(always)]
    fn load<S: Simd>(s: S, v: &S::Lanes) -> S::F32 {
        s.load(v)
    }
}

impl Elem for f16 {
    type Vector<S: Simd> = S::Halves;
    #[inline(always)]
    fn vectors<S: Simd>(row: &[f16]) -> &[S::Halves] {
        S::halves(bytemuck::cast_slice(row)).0
    }
    #[inline(always)]
    fn load<S: Simd>(s: S, v: &S::Halves) -> S::F32 {
        s.load_f16(v)
    }
}

impl Elem for bf16 {
    type Vector<S: Simd> = S::Halves;
    #[inline(always)]
    fn vectors<S: Simd>(row: &[bf16]) -> &[S::Halves] {
        S::halves(bytemuck::cast_slice(row)).0
    }
    #[inline(always)]
    fn load<S: Simd>(s: S, v: &S::Halves) -> S::F32 {
        s.load_bf16(v)
    }
}

/// Scores of query heads against stored rows: `scores[h * stride + r] = q[h] . rows[r]`,
/// where `q` holds `q.len() / d` query rows of `d` and `rows` holds `rows.len() / d` stored
/// rows. Each stored row is read once for all heads. `ahead` (rows of `d`, possibly none)
/// is what the caller reads next: the kernel asks for it to be cached as it goes.
pub(crate) fn score_rows<E: Elem>(
    isa: Isa,
    q: &[f32],
    d: usize,
    rows: &[E],
    scores: &mut [f32],
    stride: usize,
    ahead: &[E],
) {
    let fits = rows_fit(d, q.len(), rows.len(), stride, scores.len());
    debug_assert!(
        fits,
        "score_rows: the slices do not hold the heads and rows"
    );
    if !fits {
        return;
    }
    isa.run(simd::ScoreRows {
        q,
        d,
        rows,
        scores,
        stride,
        ahead,
    })
}

/// Weighted sum of stored rows into accumulators:
/// `acc[h] += sum_r w[h * stride + r] * rows[r]`, where `acc` holds `acc.len() / d` rows
/// of `d` and `rows` holds `rows.len() / d` stored rows; `ahead` as for [`score_rows`].
pub(crate) fn accumulate_rows<E: Elem>(
    isa: Isa,
    w: &[f32],
    stride: usize,
    d: usize,
    rows: &[E],
    acc: &mut [f32],
    ahead: &[E],
) {
    let fits = rows_fit(d, acc.len(), rows.len(), stride, w.len());
    debug_assert!(
        fits,
        "accumulate_rows: the slices do not hold the heads and rows"
    );
    if !fits {
        return;
    }
    isa.run(simd::AccumulateRows {
        w,
        stride,
        d,
        rows,
        acc,
        ahead,
    })
}

/// Largest element (`-inf` for none; NaN elements are skipped, like `f32::max`).
pub(crate) fn max(isa: Isa, s: &[f32]) -> f32 {
    isa.run(simd::Max(s))
}

/// Portable [`max`].
pub(crate) fn max_scalar(s: &[f32]) -> f32 {
    s.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `s[i] = exp(s[i] - m)` for every element; returns the sum. The SIMD levels use a
/// polynomial `exp` accurate to a few ulp.
pub(crate) fn exp_sum(isa: Isa, s: &mut [f32], m: f32) -> f32 {
    isa.run(simd::ExpSum(s, m))
}

/// Portable [`exp_sum`].
pub(crate) fn exp_sum_scalar(s: &mut [f32], m: f32) -> f32 {
    let mut sum = 0.0;
    for x in s {
        *x = (*x - m).exp();
        sum += *x;
    }
    sum
}

/// Scores of a tile of queries against a tile of keys stored transposed:
/// `s[l * s_ld + j] = sum_k q[l * q_ld + k] * kt[k * kt_ld + j]` for `l < lanes`,
/// `j < cols`, `k < d`. `cols` is a multiple of 8 (pad the key tile with zero columns).
#[allow(clippy::too_many_arguments)]
pub(crate) fn qk_tile(
    isa: Isa,
    q: &[f32],
    q_ld: usize,
    lanes: usize,
    d: usize,
    kt: &[f32],
    kt_ld: usize,
    cols: usize,
    s: &mut [f32],
    s_ld: usize,
) {
    let fits = qk_fits(q, q_ld, lanes, d, kt, kt_ld, cols, s, s_ld);
    debug_assert!(fits, "qk_tile: the slices do not hold the tile");
    if !fits {
        return;
    }
    isa.run(simd::QkTile {
        q,
        q_ld,
        lanes,
        d,
        kt,
        kt_ld,
        cols,
        s,
        s_ld,
    })
}

/// Portable [`qk_tile`].
pub(crate) fn qk_tile_scalar(t: simd::QkTile<'_>) {
    let simd::QkTile {
        q,
        q_ld,
        lanes,
        d,
        kt,
        kt_ld,
        cols,
        s,
        s_ld,
    } = t;
    for l in 0..lanes {
        // In bounds: `qk_fits` in `qk_tile`.
        let (Some(qr), Some(sr)) = (
            q.get(l * q_ld..l * q_ld + d),
            s.get_mut(l * s_ld..l * s_ld + cols),
        ) else {
            return;
        };
        sr.fill(0.0);
        for (k, &a) in qr.iter().enumerate() {
            if let Some(kr) = kt.get(k * kt_ld..k * kt_ld + cols) {
                axpy_f32(a, kr, sr);
            }
        }
    }
}

/// A tile of weights times a tile of value rows added into accumulators:
/// `acc[l * acc_ld + c] += sum_r p[l * p_ld + r] * v[r * v_ld + c]` for `l < lanes`,
/// `r < rows`, `c < cols`. `cols` is a multiple of 8 (pad the rows with zero columns).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pv_tile(
    isa: Isa,
    p: &[f32],
    p_ld: usize,
    lanes: usize,
    rows: usize,
    v: &[f32],
    v_ld: usize,
    cols: usize,
    acc: &mut [f32],
    acc_ld: usize,
) {
    let fits = pv_fits(p, p_ld, lanes, rows, v, v_ld, cols, acc, acc_ld);
    debug_assert!(fits, "pv_tile: the slices do not hold the tile");
    if !fits {
        return;
    }
    isa.run(simd::PvTile {
        p,
        p_ld,
        lanes,
        rows,
        v,
        v_ld,
        cols,
        acc,
        acc_ld,
    })
}

/// Portable [`pv_tile`].
pub(crate) fn pv_tile_scalar(t: simd::PvTile<'_>) {
    let simd::PvTile {
        p,
        p_ld,
        lanes,
        rows,
        v,
        v_ld,
        cols,
        acc,
        acc_ld,
    } = t;
    for l in 0..lanes {
        // In bounds: `pv_fits` in `pv_tile`.
        let (Some(pr), Some(ar)) = (
            p.get(l * p_ld..l * p_ld + rows),
            acc.get_mut(l * acc_ld..l * acc_ld + cols),
        ) else {
            return;
        };
        for (r, &w) in pr.iter().enumerate() {
            if let Some(vr) = v.get(r * v_ld..r * v_ld + cols) {
                axpy_f32(w, vr, ar);
            }
        }
    }
}

/// Whether a [`score_rows`] / [`accumulate_rows`] call's slices hold what every level reads
/// and writes: `d > 0`, `per_head` (the query or accumulator rows) whole rows of `d`, `rows`
/// whole rows, `stride` at least the rows, and the strided score / weight rows of every
/// head inside `strided`. Every level checks this one predicate, so a caller's sizing bug
/// is the same (nothing written, and a `debug_assert!` in tests) at every level.
pub(crate) fn rows_fit(
    d: usize,
    per_head: usize,
    rows: usize,
    stride: usize,
    strided: usize,
) -> bool {
    if d == 0 || !per_head.is_multiple_of(d) || !rows.is_multiple_of(d) {
        return false;
    }
    let (heads, n) = (per_head / d, rows / d);
    if heads == 0 || n == 0 {
        return true;
    }
    let need = (heads - 1)
        .checked_mul(stride)
        .and_then(|x| x.checked_add(n));
    stride >= n && need.is_some_and(|need| strided >= need)
}

/// Whether a [`qk_tile`] call's slices hold what it reads and writes (sizes nonzero, `cols`
/// a multiple of 8): the check every level's tile kernels rely on.
#[allow(clippy::too_many_arguments)]
pub(crate) fn qk_fits(
    q: &[f32],
    q_ld: usize,
    lanes: usize,
    d: usize,
    kt: &[f32],
    kt_ld: usize,
    cols: usize,
    s: &[f32],
    s_ld: usize,
) -> bool {
    let holds = |len: usize, count: usize, ld: usize, width: usize| {
        (count - 1)
            .checked_mul(ld)
            .and_then(|x| x.checked_add(width))
            .is_some_and(|need| len >= need)
    };
    lanes > 0
        && d > 0
        && cols > 0
        && cols.is_multiple_of(8)
        && q_ld >= d
        && holds(q.len(), lanes, q_ld, d)
        && kt_ld >= cols
        && holds(kt.len(), d, kt_ld, cols)
        && s_ld >= cols
        && holds(s.len(), lanes, s_ld, cols)
}

/// [`qk_fits`] for [`pv_tile`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn pv_fits(
    p: &[f32],
    p_ld: usize,
    lanes: usize,
    rows: usize,
    v: &[f32],
    v_ld: usize,
    cols: usize,
    acc: &[f32],
    acc_ld: usize,
) -> bool {
    qk_fits(p, p_ld, lanes, rows, v, v_ld, cols, acc, acc_ld)
}

/// Widens stored rows (`rows.len() / d` of them) into f32 rows `dst[r * ld..][..d]`.
pub(crate) fn widen_rows<E: Widen>(rows: &[E], d: usize, dst: &mut [f32], ld: usize) {
    if d == 0 {
        return;
    }
    for (r, row) in rows.chunks_exact(d).enumerate() {
        if let Some(out) = dst.get_mut(r * ld..r * ld + d) {
            E::widen_slice(row, out);
        }
    }
}

/// Widens stored rows (`rows.len() / d` of them) into the columns `col0..` of a
/// transposed f32 tile: `dst[k * ld + col0 + r] = rows[r][k]`.
pub(crate) fn widen_rows_transposed<E: Widen>(
    rows: &[E],
    d: usize,
    dst: &mut [f32],
    ld: usize,
    col0: usize,
) {
    if d == 0 {
        return;
    }
    let mut buf = [0.0f32; CHUNK];
    for (r, row) in rows.chunks_exact(d).enumerate() {
        for (c, part) in row.chunks(CHUNK).enumerate() {
            let wide = &mut buf[..part.len()];
            E::widen_slice(part, wide);
            for (j, &x) in wide.iter().enumerate() {
                if let Some(slot) = dst.get_mut((c * CHUNK + j) * ld + col0 + r) {
                    *slot = x;
                }
            }
        }
    }
}

/// Portable [`score_rows`]: each row is widened [`CHUNK`] elements at a time into a stack
/// buffer and dotted with every head.
pub(crate) fn scalar_score_rows<E: Widen>(
    q: &[f32],
    d: usize,
    rows: &[E],
    scores: &mut [f32],
    stride: usize,
) {
    if d == 0 {
        return;
    }
    let heads = q.len() / d;
    let mut buf = [0.0f32; CHUNK];
    for (r, row) in rows.chunks_exact(d).enumerate() {
        if r >= stride {
            return;
        }
        for h in 0..heads {
            if let Some(x) = scores.get_mut(h * stride + r) {
                *x = 0.0;
            }
        }
        for (c, part) in row.chunks(CHUNK).enumerate() {
            let wide = &mut buf[..part.len()];
            E::widen_slice(part, wide);
            for h in 0..heads {
                let qh = &q[h * d + c * CHUNK..][..wide.len()];
                if let Some(x) = scores.get_mut(h * stride + r) {
                    *x += dot_f32(qh, wide);
                }
            }
        }
    }
}

/// Portable [`accumulate_rows`]: each row is widened [`CHUNK`] elements at a time into a
/// stack buffer and added into every head's accumulator with its weight.
pub(crate) fn scalar_accumulate_rows<E: Widen>(
    w: &[f32],
    stride: usize,
    d: usize,
    rows: &[E],
    acc: &mut [f32],
) {
    if d == 0 {
        return;
    }
    let heads = acc.len() / d;
    let mut buf = [0.0f32; CHUNK];
    for (r, row) in rows.chunks_exact(d).enumerate() {
        if r >= stride {
            return;
        }
        for (c, part) in row.chunks(CHUNK).enumerate() {
            let wide = &mut buf[..part.len()];
            E::widen_slice(part, wide);
            for h in 0..heads {
                let Some(&wt) = w.get(h * stride + r) else {
                    return;
                };
                axpy_f32(wt, wide, &mut acc[h * d + c * CHUNK..][..wide.len()]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_dot(q: &[f32], k: &[f32]) -> f64 {
        q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum()
    }

    #[test]
    fn dot_matches_f64_for_every_length_around_the_lane_count() {
        for n in 0..=2 * LANES + 3 {
            let q: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let k: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() - 0.3).collect();
            assert!(
                (dot_f32(&q, &k) as f64 - naive_dot(&q, &k)).abs() < 1e-5,
                "n={n}"
            );
            // A shorter row is a shorter dot, not a panic.
            if n > 0 {
                let short = dot_f32(&q, &k[..n - 1]) as f64;
                assert!((short - naive_dot(&q[..n - 1], &k[..n - 1])).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn axpy_and_scale_are_elementwise() {
        let mut acc = vec![1.0f32, 2.0, 3.0];
        axpy_f32(0.5, &[2.0, 4.0, -6.0], &mut acc);
        assert_eq!(acc, [2.0, 4.0, 0.0]);
        scale(&mut acc, 0.5);
        assert_eq!(acc, [1.0, 2.0, 0.0]);
    }

    use crate::bench::SplitMix;

    fn random(rng: &mut SplitMix, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| rng.next_unit() * amp).collect()
    }

    /// Rows stored as `E` and the same rows widened back, so references see the exact
    /// stored values.
    fn stored<E: Elem>(rng: &mut SplitMix, n: usize, from: fn(f32) -> E) -> (Vec<E>, Vec<f32>) {
        let rows: Vec<E> = random(rng, n, 2.0).into_iter().map(from).collect();
        let wide = rows.iter().map(|x| x.widen()).collect();
        (rows, wide)
    }

    /// Every SIMD level against the scalar kernel and an f64 reference, for stored rows of
    /// type `E`, every head count up to 9 and head dims that exercise every tail.
    fn check_score_and_accumulate<E: Elem>(from: fn(f32) -> E) {
        let mut rng = SplitMix(11);
        for &d in &[1usize, 5, 8, 13, 16, 24, 33, 64, 100, 128, 200] {
            for heads in 1..=9 {
                for &n in &[1usize, 3, 16, 21] {
                    let q = random(&mut rng, heads * d, 1.0);
                    let (rows, wide) = stored(&mut rng, n * d, from);
                    let stride = n + 3;
                    let w = random(&mut rng, heads * stride, 1.0);
                    let acc0 = random(&mut rng, heads * d, 1.0);
                    let mut want = vec![f32::NAN; heads * stride];
                    scalar_score_rows(&q, d, &rows, &mut want, stride);
                    let mut want_acc = acc0.clone();
                    scalar_accumulate_rows(&w, stride, d, &rows, &mut want_acc);
                    for h in 0..heads {
                        for r in 0..n {
                            let exact = naive_dot(&q[h * d..][..d], &wide[r * d..][..d]);
                            let got = want[h * stride + r] as f64;
                            assert!((got - exact).abs() <= 1e-5 * d as f64, "scalar d={d}");
                        }
                        for j in 0..d {
                            let exact: f64 = acc0[h * d + j] as f64
                                + (0..n)
                                    .map(|r| w[h * stride + r] as f64 * wide[r * d + j] as f64)
                                    .sum::<f64>();
                            let got = want_acc[h * d + j] as f64;
                            assert!((got - exact).abs() <= 1e-5 * n as f64, "scalar acc d={d}");
                        }
                    }
                    for &isa in &Isa::available() {
                        let mut got = vec![f32::NAN; heads * stride];
                        score_rows(isa, &q, d, &rows, &mut got, stride, &rows);
                        let mut got_acc = acc0.clone();
                        accumulate_rows(isa, &w, stride, d, &rows, &mut got_acc, &[]);
                        for h in 0..heads {
                            for r in 0..n {
                                let (a, b) = (got[h * stride + r], want[h * stride + r]);
                                assert!(
                                    (a - b).abs() <= 2e-5 * d as f32,
                                    "{isa} score d={d} heads={heads} n={n}: {a} vs {b}"
                                );
                            }
                            // Gaps between score rows stay untouched.
                            assert!(got[h * stride + n..(h + 1) * stride]
                                .iter()
                                .all(|x| x.is_nan()));
                        }
                        for (a, b) in got_acc.iter().zip(&want_acc) {
                            assert!(
                                (a - b).abs() <= 2e-5 * n as f32,
                                "{isa} accumulate d={d} heads={heads} n={n}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_level_scores_and_accumulates_f32_rows_like_the_scalar_kernel() {
        check_score_and_accumulate::<f32>(|x| x);
    }

    #[test]
    fn every_level_scores_and_accumulates_f16_rows_like_the_scalar_kernel() {
        check_score_and_accumulate::<f16>(f16::from_f32);
    }

    #[test]
    fn every_level_scores_and_accumulates_bf16_rows_like_the_scalar_kernel() {
        check_score_and_accumulate::<bf16>(bf16::from_f32);
    }

    #[test]
    fn every_level_takes_max_and_exp_sum_like_the_scalar_kernel() {
        let mut rng = SplitMix(5);
        for n in [0usize, 1, 7, 8, 9, 31, 64] {
            // Scores from far below the maximum (underflow to 0) up to it.
            let mut s = random(&mut rng, n, 50.0);
            s.iter_mut().for_each(|x| *x -= 45.0);
            if n > 3 {
                s[3] = -200.0;
            }
            let m = max(Isa::Scalar, &s);
            let mut want = s.clone();
            let want_sum = exp_sum(Isa::Scalar, &mut want, m);
            for &isa in &Isa::available() {
                assert_eq!(max(isa, &s), m, "{isa} n={n}");
                let mut got = s.clone();
                let sum = exp_sum(isa, &mut got, m);
                assert!(
                    (sum - want_sum).abs() <= 4e-7 * want_sum.max(1.0),
                    "{isa} n={n}"
                );
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 3e-7 * b + f32::MIN_POSITIVE,
                        "{isa} n={n} [{i}]: {a} vs {b}"
                    );
                }
                if n > 3 {
                    assert_eq!(got[3], 0.0, "{isa}: exp underflows to exactly 0");
                }
            }
        }
        for &isa in &Isa::available() {
            // NaN propagates into the sum, where the attention loop looks for it.
            let mut s = vec![0.0, f32::NAN, -1.0];
            assert!(exp_sum(isa, &mut s, 0.0).is_nan(), "{isa}");
            let mut s = vec![f32::NEG_INFINITY; 9];
            assert_eq!(exp_sum(isa, &mut s, 0.0), 0.0, "{isa}");
            assert_eq!(max(isa, &[]), f32::NEG_INFINITY, "{isa}");
        }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        for &isa in &Isa::available() {
            let xs: Vec<f32> = (0..=20_000).map(|i| -87.0 * i as f32 / 20_000.0).collect();
            let mut e = xs.clone();
            exp_sum(isa, &mut e, 0.0);
            for (x, y) in xs.iter().zip(&e) {
                let exact = (*x as f64).exp();
                assert!(
                    ((*y as f64) - exact).abs() <= 4e-7 * exact,
                    "{isa}: exp({x}) = {y}"
                );
            }
        }
    }

    #[test]
    fn every_level_multiplies_tiles_like_the_scalar_kernel() {
        let mut rng = SplitMix(9);
        for &d in &[1usize, 7, 16, 64, 128] {
            for lanes in [1usize, 2, 3, 4, 5, 9] {
                for cols in [8usize, 16, 24, 64] {
                    let (q_ld, kt_ld, s_ld) = (d + 1, 64, 72);
                    let q = random(&mut rng, lanes * q_ld, 1.0);
                    let kt = random(&mut rng, d * kt_ld, 1.0);
                    let mut want = vec![f32::NAN; lanes * s_ld];
                    qk_tile(
                        Isa::Scalar,
                        &q,
                        q_ld,
                        lanes,
                        d,
                        &kt,
                        kt_ld,
                        cols,
                        &mut want,
                        s_ld,
                    );
                    for l in 0..lanes {
                        for j in 0..cols {
                            let exact: f64 = (0..d)
                                .map(|k| q[l * q_ld + k] as f64 * kt[k * kt_ld + j] as f64)
                                .sum();
                            assert!((want[l * s_ld + j] as f64 - exact).abs() <= 1e-5 * d as f64);
                        }
                    }
                    let rows = cols - 3;
                    let dp = d.div_ceil(8) * 8;
                    let (v_ld, acc_ld) = (dp + 8, dp);
                    let v = random(&mut rng, rows * v_ld, 1.0);
                    let acc0 = random(&mut rng, lanes * acc_ld, 1.0);
                    let mut want_acc = acc0.clone();
                    pv_tile(
                        Isa::Scalar,
                        &want,
                        s_ld,
                        lanes,
                        rows,
                        &v,
                        v_ld,
                        dp,
                        &mut want_acc,
                        acc_ld,
                    );
                    for &isa in &Isa::available() {
                        let mut got = vec![f32::NAN; lanes * s_ld];
                        qk_tile(isa, &q, q_ld, lanes, d, &kt, kt_ld, cols, &mut got, s_ld);
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            let ok = (a.is_nan() && b.is_nan()) || (a - b).abs() <= 2e-5 * d as f32;
                            assert!(
                                ok,
                                "{isa} qk d={d} lanes={lanes} cols={cols} [{i}]: {a} vs {b}"
                            );
                        }
                        let mut got_acc = acc0.clone();
                        pv_tile(
                            isa,
                            &want,
                            s_ld,
                            lanes,
                            rows,
                            &v,
                            v_ld,
                            dp,
                            &mut got_acc,
                            acc_ld,
                        );
                        for (a, b) in got_acc.iter().zip(&want_acc) {
                            assert!((a - b).abs() <= 1e-4 * rows as f32, "{isa} pv d={d}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn widening_into_tiles_is_exact_and_transposes() {
        let mut rng = SplitMix(3);
        let d = 13;
        let (rows, wide) = stored(&mut rng, 5 * d, f16::from_f32);
        let mut tile = vec![0.0f32; 5 * 16];
        widen_rows(&rows, d, &mut tile, 16);
        let mut kt = vec![0.0f32; d * 8];
        widen_rows_transposed(&rows, d, &mut kt, 8, 2);
        for r in 0..5 {
            assert_eq!(tile[r * 16..r * 16 + d], wide[r * d..(r + 1) * d]);
            assert!(tile[r * 16 + d..(r + 1) * 16].iter().all(|&x| x == 0.0));
            for k in 0..d {
                assert_eq!(kt[k * 8 + 2 + r], wide[r * d + k]);
            }
        }
        // Rows wider than the widening buffer.
        let d = CHUNK + 9;
        let (rows, wide) = stored(&mut rng, 2 * d, bf16::from_f32);
        let mut kt = vec![0.0f32; d * 2];
        widen_rows_transposed(&rows, d, &mut kt, 2, 0);
        for k in 0..d {
            assert_eq!([kt[k * 2], kt[k * 2 + 1]], [wide[k], wide[d + k]]);
        }
    }

    #[test]
    fn isa_levels_are_named_detected_and_ordered() {
        let available = Isa::available();
        assert_eq!(available.first(), Some(&Isa::Scalar));
        assert!(Isa::best().is_available());
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
            assert_eq!(Isa::from_name(&isa.name().to_uppercase()), Some(isa));
            assert_eq!(available.contains(&isa), isa.is_available());
        }
        assert_eq!(Isa::from_name("avx9000"), None);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            Isa::Avx2.is_available(),
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            Isa::Avx512.is_available(),
            Isa::Avx2.is_available()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
        );
    }

    #[test]
    fn conversions_round_to_nearest_and_widen_exactly() {
        let src = [1.0f32, 1.0 + 1.0 / 4096.0, -65504.0, 3.0e-8, 1.0 / 3.0];
        let mut h = [f16::ZERO; 5];
        encode_f16(&src, &mut h);
        let mut back = [0.0f32; 5];
        decode_f16(&h, &mut back);
        // f16 steps by 2^-10 near 1, so 1 + 2^-12 rounds back down to 1.
        assert_eq!(back[..3], [1.0, 1.0, -65504.0]);
        assert_eq!(back[3], 2f32.powi(-24)); // nearest f16 subnormal
        assert_eq!(back[4], f16::from_f32(1.0 / 3.0).to_f32());
        let mut b = [bf16::ZERO; 5];
        encode_bf16(&src, &mut b);
        decode_bf16(&b, &mut back);
        assert_eq!(back[0], 1.0);
        assert_eq!(back[2], -65536.0); // 65504 needs 11 significant bits; bf16 keeps 8
        assert_eq!(back[4], bf16::from_f32(1.0 / 3.0).to_f32());
        let mut f = [0.0f32; 5];
        copy_f32(&src, &mut f);
        assert_eq!(f, src);
    }
    /// A kernel call whose slices are too short is the same at every level: the shared
    /// predicate rejects it before any level runs, so nothing is written (and debug builds,
    /// these tests included, stop at the `debug_assert!` that names the kernel).
    #[test]
    fn short_slices_are_rejected_alike_at_every_level() {
        let d = 16;
        let q = vec![0.5f32; 2 * d];
        let rows = vec![1.0f32; 4 * d];
        // Two heads of 4 rows at stride 4 need 8 scores; 7 is one short.
        assert!(rows_fit(d, q.len(), rows.len(), 4, 8));
        assert!(!rows_fit(d, q.len(), rows.len(), 4, 7));
        assert!(
            !rows_fit(d, q.len(), rows.len(), 3, 100),
            "stride below the rows"
        );
        assert!(
            !rows_fit(d, q.len() - 1, rows.len(), 4, 8),
            "partial query row"
        );
        assert!(!rows_fit(0, 0, 0, 0, 0));
        assert!(rows_fit(d, 0, rows.len(), 4, 0), "no heads: nothing to do");
        assert!(
            !rows_fit(d, 2 * d, d, usize::MAX, usize::MAX),
            "overflowing stride"
        );
        let (q_ld, kt_ld, s_ld) = (d, 8, 8);
        let kt = vec![0.0f32; d * kt_ld];
        assert!(qk_fits(&q, q_ld, 2, d, &kt, kt_ld, 8, &[0.0; 16], s_ld));
        assert!(!qk_fits(&q, q_ld, 2, d, &kt, kt_ld, 8, &[0.0; 15], s_ld));
        assert!(
            !qk_fits(&q, q_ld, 2, d, &kt, kt_ld, 12, &[0.0; 32], 16),
            "cols % 8"
        );
        assert!(!qk_fits(
            &q,
            q_ld,
            2,
            d,
            &kt[1..],
            kt_ld,
            8,
            &[0.0; 16],
            s_ld
        ));
        for isa in Isa::available() {
            let mut scores = vec![f32::NAN; 7];
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                score_rows(isa, &q, d, &rows, &mut scores, 4, &[]);
            }));
            assert_eq!(run.is_err(), cfg!(debug_assertions), "{isa}");
            assert!(scores.iter().all(|x| x.is_nan()), "{isa}: nothing written");
            let mut s = vec![f32::NAN; 15];
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                qk_tile(isa, &q, q_ld, 2, d, &kt, kt_ld, 8, &mut s, s_ld);
            }));
            assert_eq!(run.is_err(), cfg!(debug_assertions), "{isa}");
            assert!(s.iter().all(|x| x.is_nan()), "{isa}: nothing written");
            // Weights for 2 heads at stride 4 need 8; 7 is one short.
            let mut acc = vec![f32::NAN; 2 * d];
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                accumulate_rows(isa, &[1.0; 7], 4, d, &rows, &mut acc, &[]);
            }));
            assert_eq!(run.is_err(), cfg!(debug_assertions), "{isa}");
            assert!(acc.iter().all(|x| x.is_nan()), "{isa}: nothing written");
            // 2 lanes of 8 value rows: the value tile holds 4.
            let mut acc = vec![f32::NAN; 16];
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pv_tile(isa, &q, q_ld, 2, 8, &kt[..4 * 8], 8, 8, &mut acc, 8);
            }));
            assert_eq!(run.is_err(), cfg!(debug_assertions), "{isa}");
            assert!(acc.iter().all(|x| x.is_nan()), "{isa}: nothing written");
        }
    }
}
