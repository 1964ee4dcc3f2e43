//! The per-row arithmetic of the attention loop, as plain functions over slices.
//!
//! Everything the backend does to a cached row goes through these functions: converting a
//! row between f32 and its stored format, the dot product of an f32 query with an f32 row,
//! and the weighted add of an f32 row into an f32 accumulator. A half-precision row is
//! widened to f32 once and then used by every query head of its KV head's group, which
//! costs one conversion per row instead of one per (row, head); so only the f32 forms of
//! dot and axpy sit in the inner loop.
//!
//! They are the portable fallback. SIMD versions (AVX2/F16C, NEON) will sit next to them
//! behind run-time feature detection and must agree with them, so these stay simple and
//! obviously right rather than fast. The f16 and bf16 conversions go through `half`'s
//! slice conversions, which already use F16C where the CPU has it: detected once per
//! slice, where `half`'s per-element conversion detects it once per element.
//!
//! Every function takes slices meant to be of equal length; a longer one is cut to the
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
//! ```

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

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
}
