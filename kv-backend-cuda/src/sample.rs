//! Sampling on the device, host side: the checks and the scalar arguments of the
//! `kv_sample` kernel (`kernels/sample.cu`), and what its per-row answer means.
//!
//! The kernel samples each row of logits where they are, with the host sampler's
//! distribution (kv-model's `Sampler`: temperature softmax, top-k with ties by lower id,
//! top-p over the sorted probabilities), from a draw `u` in `[0, 1)` the host makes with its
//! seeded generator and sends with the launch: one `u32` status and one token id per row come
//! back instead of the row. No sort: each cut (the k-th token, the end of the nucleus, the
//! drawn token) is a weighted radix select over the tokens' bits, the probability masses in
//! fixed point so every sum is an exact integer (the same on every run).
//!
//! ```
//! use kv_backend_cuda::sample::{RowSample, SampleParams, SamplePlan};
//! let params = SampleParams { temperature: 0.8, top_k: Some(40), top_p: Some(0.95) };
//! let plan = SamplePlan::new(&params, 4, 49_152)?;
//! assert_eq!(plan.top_k, 40);
//! // The kernel's answer for one row: status 0 and the token.
//! assert_eq!(RowSample::decode(0, 17)?, RowSample::Token(17));
//! # Ok::<(), kv_core::KvError>(())
//! ```

use kv_core::KvError;

/// The largest vocabulary the kernel samples: token ids share a 56-bit key with the logit's
/// 32 bits, so they must fit 24 bits.
pub const MAX_VOCAB: usize = 1 << 24;

/// Threads per block (one block samples one row).
pub const THREADS: u32 = 512;

/// The kernel's status for a sampled row.
pub const STATUS_OK: u32 = 0;
/// The kernel's status for a row holding NaN or `+inf`.
pub const STATUS_NON_FINITE: u32 = 1;
/// The kernel's status for a row whose logits are all `-inf`.
pub const STATUS_NO_FINITE: u32 = 2;

/// How to sample, as kv-model's `SamplingConfig` says it (without the seed: the draws come
/// with each launch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// Divides the logits before the softmax; must be finite and above 0 (greedy decoding
    /// takes the argmax instead).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (at least 1).
    pub top_k: Option<usize>,
    /// Keep the fewest most likely tokens whose probabilities sum to at least `p`, in
    /// `(0, 1]`.
    pub top_p: Option<f32>,
}

/// The checked scalar arguments of one `kv_sample` launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplePlan {
    /// Rows, one block each.
    pub rows: u32,
    /// Logits per row.
    pub vocab: u32,
    /// The temperature's bits (the kernel takes the `f32`).
    pub temperature_bits: u32,
    /// Top-k, 0 for none (also when k covers the whole vocabulary).
    pub top_k: u32,
    /// Top-p's bits, 0.0 for none.
    pub top_p_bits: u32,
    /// Fraction bits of the fixed-point masses: `vocab` masses of at most `2^shift` each sum
    /// below `2^62`.
    pub shift: u32,
}

impl SamplePlan {
    /// Checks `params` and the shape `[rows, vocab]`.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for a temperature that is not finite and positive, a
    /// top-k of 0, a top-p outside `(0, 1]`, no rows, no logits or more than
    /// [`MAX_VOCAB`] per row, or more rows than a launch has blocks.
    pub fn new(params: &SampleParams, rows: usize, vocab: usize) -> Result<Self, KvError> {
        let bad = |what: &'static str, detail: String| KvError::InvalidArgument { what, detail };
        if !(params.temperature.is_finite() && params.temperature > 0.0) {
            return Err(bad(
                "temperature",
                format!(
                    "{} (device sampling needs a finite temperature > 0; 0 is greedy)",
                    params.temperature
                ),
            ));
        }
        if params.top_k == Some(0) {
            return Err(bad("top-k", "0 (at least 1)".into()));
        }
        if let Some(p) = params.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(bad("top-p", format!("{p} (a number in (0, 1])")));
            }
        }
        if vocab == 0 || vocab > MAX_VOCAB {
            return Err(bad(
                "logits",
                format!("{vocab} per row (1 to {MAX_VOCAB} for device sampling)"),
            ));
        }
        let max_rows = (1usize << 31) - 1;
        if rows == 0 || rows > max_rows {
            return Err(bad("logits", format!("{rows} rows (1 to {max_rows})")));
        }
        let top_k = match params.top_k {
            Some(k) if k < vocab => k as u32, // k < vocab <= 2^24
            _ => 0,
        };
        Ok(Self {
            rows: rows as u32,
            vocab: vocab as u32,
            temperature_bits: params.temperature.to_bits(),
            top_k,
            top_p_bits: params.top_p.unwrap_or(0.0).to_bits(),
            shift: mass_shift(vocab),
        })
    }
}

/// Fraction bits for the masses of `vocab` tokens: each mass is at most 1, so at most
/// `2^shift` in fixed point, and `vocab` of them must sum below `2^62`:
/// `shift = 62 - ceil(log2(vocab))` (38 bits at least for [`MAX_VOCAB`]).
pub fn mass_shift(vocab: usize) -> u32 {
    let ceil_log2 = vocab.max(1).next_power_of_two().trailing_zeros();
    62u32.saturating_sub(ceil_log2)
}

/// One row's answer from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSample {
    /// The sampled token.
    Token(u32),
    /// A logit was NaN or `+inf` (the host sampler's `NonFiniteLogits`).
    NonFinite,
    /// Every logit was `-inf` (the host sampler's "no finite value").
    NoFinite,
}

impl RowSample {
    /// The answer a row's `(status, token)` pair encodes.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for a status the kernel does not write (a corrupt copy).
    pub fn decode(status: u32, token: u32) -> Result<Self, KvError> {
        match status {
            STATUS_OK => Ok(Self::Token(token)),
            STATUS_NON_FINITE => Ok(Self::NonFinite),
            STATUS_NO_FINITE => Ok(Self::NoFinite),
            other => Err(KvError::InvalidArgument {
                what: "sample status",
                detail: format!("{other} (the kernel writes 0, 1 or 2)"),
            }),
        }
    }
}

/// Checks the draws of a launch: one per row, each in `[0, 1)`.
///
/// # Errors
/// [`KvError::ShapeMismatch`] for a count other than `rows`; [`KvError::InvalidArgument`]
/// for a draw outside `[0, 1)` (NaN included).
pub fn check_draws(draws: &[f64], rows: usize) -> Result<(), KvError> {
    if draws.len() != rows {
        return Err(KvError::ShapeMismatch {
            what: "draws",
            expected: format!("{rows} (one per row)"),
            got: draws.len().to_string(),
        });
    }
    if let Some(u) = draws.iter().find(|u| !(0.0..1.0).contains(*u)) {
        return Err(KvError::InvalidArgument {
            what: "draw",
            detail: format!("{u} (in [0, 1))"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> SampleParams {
        SampleParams {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn plans_pack_the_arguments() {
        let p = SamplePlan::new(&params(0.7, Some(40), Some(0.9)), 3, 49_152).unwrap();
        assert_eq!(
            p,
            SamplePlan {
                rows: 3,
                vocab: 49_152,
                temperature_bits: 0.7f32.to_bits(),
                top_k: 40,
                top_p_bits: 0.9f32.to_bits(),
                shift: 62 - 16,
            }
        );
        // k at or above the vocabulary, and no top-p, are "none" (0).
        let p = SamplePlan::new(&params(1.0, Some(10), None), 1, 10).unwrap();
        assert_eq!((p.top_k, p.top_p_bits), (0, 0));
        let p = SamplePlan::new(&params(1.0, Some(9), None), 1, 10).unwrap();
        assert_eq!(p.top_k, 9);
        let p = SamplePlan::new(&params(1.0, None, None), 1, MAX_VOCAB).unwrap();
        assert_eq!(p.shift, 38);
    }

    #[test]
    fn the_mass_shift_keeps_every_sum_below_2_pow_62() {
        for vocab in [1usize, 2, 3, 1000, 49_152, 262_144, 262_145, MAX_VOCAB] {
            let s = mass_shift(vocab);
            let most = (vocab as u128) << s;
            assert!(most <= 1u128 << 62, "{vocab}: {s}");
            // And no bit is wasted: twice the scale would overflow the bound.
            assert!(most << 1 > 1u128 << 62, "{vocab}: {s}");
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        for bad in [
            params(0.0, None, None),
            params(-1.0, None, None),
            params(f32::NAN, None, None),
            params(f32::INFINITY, None, None),
            params(1.0, Some(0), None),
            params(1.0, None, Some(0.0)),
            params(1.0, None, Some(1.5)),
            params(1.0, None, Some(f32::NAN)),
        ] {
            assert!(
                matches!(
                    SamplePlan::new(&bad, 1, 10),
                    Err(KvError::InvalidArgument { .. })
                ),
                "{bad:?}"
            );
        }
        let ok = params(1.0, None, None);
        for (rows, vocab) in [(0, 10), (1, 0), (1, MAX_VOCAB + 1), (1 << 31, 10)] {
            assert!(SamplePlan::new(&ok, rows, vocab).is_err(), "{rows}x{vocab}");
        }
    }

    #[test]
    fn draws_and_statuses_are_checked() {
        assert!(check_draws(&[0.0, 0.5, 0.999_999], 3).is_ok());
        assert!(matches!(
            check_draws(&[0.5], 2),
            Err(KvError::ShapeMismatch { .. })
        ));
        for u in [1.0, -0.1, f64::NAN] {
            assert!(check_draws(&[u], 1).is_err(), "{u}");
        }
        assert_eq!(RowSample::decode(1, 0).unwrap(), RowSample::NonFinite);
        assert_eq!(RowSample::decode(2, 0).unwrap(), RowSample::NoFinite);
        assert!(RowSample::decode(3, 0).is_err());
    }
}
