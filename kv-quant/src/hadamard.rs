//! A fixed orthogonal rotation: the normalized Walsh–Hadamard transform.

use crate::error::{QuantError, Result};

/// Applies the normalized fast Walsh–Hadamard transform to `x` in place (Sylvester order:
/// `H_1 = [1]`, `H_2n = [[H_n, H_n], [H_n, -H_n]]`, scaled by `1 / sqrt(n)`).
///
/// Why: `H / sqrt(n)` is orthogonal and symmetric, so it is its own inverse and
/// `(H q / sqrt n) · (H k / sqrt n) = q · k`. Rotating both queries and keys leaves attention
/// scores unchanged while spreading an outlier channel's energy over all channels, which
/// shrinks the range a per-token INT4/INT2 scale must cover. It costs `n log2 n` additions
/// per vector. `examples/quant_error.rs` measures what it buys for each layout.
///
/// Applying it twice returns the input up to f32 rounding (the normalized transform is an
/// involution); norms and dot products are preserved likewise.
///
/// ```
/// use kv_quant::hadamard_in_place;
///
/// let mut q = [1.0f32, 2.0, 3.0, 4.0];
/// let mut k = [0.5f32, -1.0, 0.0, 8.0];
/// let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
/// let before = dot(&q, &k);
/// hadamard_in_place(&mut q)?;
/// hadamard_in_place(&mut k)?;
/// assert!((dot(&q, &k) - before).abs() < 1e-4);
/// assert!(hadamard_in_place(&mut [0.0f32; 6]).is_err());
/// # Ok::<(), kv_quant::QuantError>(())
/// ```
///
/// # Errors
/// [`QuantError::NotPowerOfTwo`] unless `x.len()` is a power of two (1 included).
pub fn hadamard_in_place(x: &mut [f32]) -> Result<()> {
    let n = x.len();
    if !n.is_power_of_two() {
        return Err(QuantError::NotPowerOfTwo { len: n });
    }
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (s, d) = (*u + *v, *u - *v);
                *u = s;
                *v = d;
            }
        }
        h *= 2;
    }
    let scale = 1.0 / (n as f32).sqrt();
    for v in x.iter_mut() {
        *v *= scale;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_sylvester_matrix() {
        // H_8 entry (i, j) is (-1)^popcount(i & j) in Sylvester order.
        for j in 0..8 {
            let mut e = [0.0f32; 8];
            e[j] = 1.0;
            hadamard_in_place(&mut e).expect("power of two");
            for (i, v) in e.iter().enumerate() {
                let sign = if (i & j).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                };
                assert!((v - sign / 8f32.sqrt()).abs() < 1e-6, "({i}, {j}): {v}");
            }
        }
    }

    #[test]
    fn rejects_other_lengths() {
        for n in [0usize, 3, 6, 12, 96] {
            let mut x = vec![1.0f32; n];
            assert_eq!(
                hadamard_in_place(&mut x),
                Err(QuantError::NotPowerOfTwo { len: n })
            );
            assert!(x.iter().all(|&v| v == 1.0), "input untouched");
        }
        let mut one = [3.5f32];
        hadamard_in_place(&mut one).expect("1 is a power of two");
        assert_eq!(one, [3.5]);
    }
}
