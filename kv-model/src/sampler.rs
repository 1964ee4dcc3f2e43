//! Choosing the next token from logits: greedy, or sampling with temperature, top-k and
//! top-p from a seeded generator so runs are reproducible.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{ModelError, Result};

/// How to pick tokens. `temperature == 0` means greedy (argmax), which ignores the rest.
///
/// ```
/// use kv_model::{Sampler, SamplingConfig};
/// let mut greedy = Sampler::new(SamplingConfig::greedy())?;
/// assert_eq!(greedy.sample(&[0.1, 2.0, -1.0])?, 1);
///
/// let creative = SamplingConfig { temperature: 0.8, top_k: Some(40), top_p: Some(0.95), seed: 7 };
/// let mut sampler = Sampler::new(creative)?;
/// let token = sampler.sample(&[0.1, 2.0, -1.0])?;
/// assert!(token < 3);
/// # Ok::<(), kv_model::ModelError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Divides logits before the softmax; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the fewest most likely tokens whose probabilities sum to at least `p`.
    pub top_p: Option<f32>,
    /// Seed of the random generator: the same seed and logits give the same tokens.
    pub seed: u64,
}

impl SamplingConfig {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Whether this picks the argmax without randomness.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the values are usable.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] for a negative or non-finite temperature, `top_k` of
    /// 0, or `top_p` outside `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::InvalidArgument {
                what: "temperature",
                expected: "a finite number >= 0 (0 = greedy)".into(),
                got: self.temperature.to_string(),
            });
        }
        if self.top_k == Some(0) {
            return Err(ModelError::InvalidArgument {
                what: "top-k",
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ModelError::InvalidArgument {
                    what: "top-p",
                    expected: "a number in (0, 1]".into(),
                    got: p.to_string(),
                });
            }
        }
        Ok(())
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self::greedy()
    }
}

/// Picks tokens from logits according to a [`SamplingConfig`], owning the seeded generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler whose generator starts from `config.seed`.
    ///
    /// # Errors
    /// What [`SamplingConfig::validate`] returns.
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            rng: StdRng::seed_from_u64(config.seed),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// The next uniform draw in `[0, 1)` from the seeded generator: what [`Sampler::sample`]
    /// draws once per sampled token (and device sampling sends with its launch), so the same
    /// seed means the same draws on the CPU and the GPU.
    pub fn draw(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// The next token for `logits` (`[vocab]` or `[1, vocab]`) where they are: on the CPU,
    /// [`Sampler::sample`] of the values; on a CUDA device (feature `cuda`), greedy takes the
    /// argmax there ([`crate::greedy_token`]) and sampling runs there too
    /// ([`Sampler::sample_rows`]), so one token id comes back instead of the logits.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use kv_model::{Sampler, SamplingConfig};
    /// let logits = Tensor::new(&[[0.1f32, 2.0, -1.0]], &Device::Cpu)?;
    /// let mut greedy = Sampler::new(SamplingConfig::greedy())?;
    /// assert_eq!(greedy.sample_tensor(&logits)?, 1);
    /// # Ok::<(), kv_model::ModelError>(())
    /// ```
    ///
    /// # Errors
    /// As [`Sampler::sample`] (the device's checks answer with the same errors), and
    /// candle's errors reading the tensor.
    pub fn sample_tensor(&mut self, logits: &Tensor) -> Result<u32> {
        let row = logits.flatten_all()?;
        if row.device().is_cpu() {
            return self.sample(&row.to_vec1::<f32>()?);
        }
        let tokens = self.sample_rows(&row.unsqueeze(0)?)?;
        tokens
            .first()
            .copied()
            .ok_or_else(|| ModelError::InvalidArgument {
                what: "logits",
                expected: "one row".into(),
                got: "none".into(),
            })
    }

    /// The next token of every row of `logits` (`[rows, vocab]`), in row order: one draw per
    /// row from this sampler's generator. On the CPU each row goes through
    /// [`Sampler::sample`]; on a CUDA device (feature `cuda`) greedy is
    /// [`crate::greedy_rows`] and sampling is one launch of kv-backend-cuda's `kv_sample` for
    /// all rows, copying back a status and a token per row. Other devices copy the rows.
    ///
    /// On the device the tokens follow the host's distribution exactly; for the same draw
    /// the token is the host's unless the draw falls within about 1e-8 (relative) of the
    /// edge between two tokens' cumulative probabilities (the device sums fixed-point masses,
    /// the host f64 in sorted order), or a top-p cut as close to its edge. A row the device
    /// refuses has still used its draw (the host draws after its checks).
    ///
    /// # Errors
    /// As [`Sampler::sample`], for the first row at fault.
    pub fn sample_rows(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        let (_, vocab) = logits.dims2()?;
        if vocab == 0 {
            return Err(ModelError::InvalidArgument {
                what: "logits",
                expected: "at least one finite value".into(),
                got: "0 values, none finite".into(),
            });
        }
        if logits.device().is_cuda() && self.config.is_greedy() {
            return crate::greedy_rows(logits);
        }
        #[cfg(feature = "cuda")]
        {
            if logits.device().is_cuda() {
                let draws: Vec<f64> = (0..logits.dim(0)?).map(|_| self.draw()).collect();
                return crate::device::sample_rows_with(logits, &self.config, &draws);
            }
        }
        let values: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
        values.iter().map(|row| self.sample(row)).collect()
    }

    /// The next token for `logits` (one per vocabulary entry).
    ///
    /// # Errors
    /// [`ModelError::NonFiniteLogits`] for NaN or `+inf` (`-inf` means "never");
    /// [`ModelError::InvalidArgument`] for no logits or all `-inf`.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let best = checked_argmax(logits)?;
        if self.config.is_greedy() {
            return Ok(best as u32);
        }
        let u = self.draw();
        Ok(self.pick(logits, u))
    }

    /// The token [`Sampler::sample`] picks from `logits` when its draw is `u` (in `[0, 1)`),
    /// without touching the generator: for checking another sampler (the device's) draw by
    /// draw.
    ///
    /// ```
    /// use kv_model::{Sampler, SamplingConfig};
    /// let config = SamplingConfig { temperature: 1.0, top_k: None, top_p: None, seed: 3 };
    /// let logits = [0.0f32, 3f32.ln()]; // probabilities 0.25 and 0.75
    /// let s = Sampler::new(config)?;
    /// assert_eq!(s.sample_with_draw(&logits, 0.2)?, 1);
    /// assert_eq!(s.sample_with_draw(&logits, 0.8)?, 0);
    /// # Ok::<(), kv_model::ModelError>(())
    /// ```
    ///
    /// # Errors
    /// As [`Sampler::sample`]; [`ModelError::InvalidArgument`] for `u` outside `[0, 1)`.
    pub fn sample_with_draw(&self, logits: &[f32], u: f64) -> Result<u32> {
        if !(0.0..1.0).contains(&u) {
            return Err(ModelError::InvalidArgument {
                what: "draw",
                expected: "a number in [0, 1)".into(),
                got: u.to_string(),
            });
        }
        let best = checked_argmax(logits)?;
        if self.config.is_greedy() {
            return Ok(best as u32);
        }
        Ok(self.pick(logits, u))
    }

    /// Sampling proper, for checked logits (finite or `-inf`, at least one finite) and a
    /// draw `u` in `[0, 1)`.
    fn pick(&self, logits: &[f32], u: f64) -> u32 {
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        // Most likely first; ties by lower id so the order does not depend on the sort.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if let Some(k) = self.config.top_k {
            if k < candidates.len() {
                candidates.select_nth_unstable_by(k - 1, order);
                candidates.truncate(k);
            }
        }
        candidates.sort_unstable_by(order);

        let t = f64::from(self.config.temperature);
        let max = f64::from(candidates[0].1);
        let mut probs: Vec<f64> = candidates
            .iter()
            .map(|&(_, l)| ((f64::from(l) - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);

        if let Some(top_p) = self.config.top_p {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= f64::from(top_p) {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = u * total;
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return candidates[i].0;
            }
            u -= p;
        }
        // Rounding left `u` just past the last bucket.
        candidates[probs.len() - 1].0
    }
}

/// The greedy token of `logits`, after the checks every sampling path makes first.
fn checked_argmax(logits: &[f32]) -> Result<usize> {
    if logits.iter().any(|l| l.is_nan() || *l == f32::INFINITY) {
        return Err(ModelError::NonFiniteLogits);
    }
    argmax(logits).ok_or_else(|| ModelError::InvalidArgument {
        what: "logits",
        expected: "at least one finite value".into(),
        got: format!("{} values, none finite", logits.len()),
    })
}

/// Index of the largest finite value, the lowest index on ties.
fn argmax(values: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in values.iter().enumerate() {
        if v.is_finite() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32, top_k: Option<usize>, top_p: Option<f32>, seed: u64) -> Sampler {
        Sampler::new(SamplingConfig {
            temperature,
            top_k,
            top_p,
            seed,
        })
        .unwrap()
    }

    fn counts(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut c = vec![0; logits.len()];
        for _ in 0..draws {
            c[s.sample(logits).unwrap() as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = Sampler::new(SamplingConfig::greedy()).unwrap();
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, -2.0]).unwrap(), 1);
        assert_eq!(
            s.sample(&[f32::NEG_INFINITY, -5.0, f32::NEG_INFINITY])
                .unwrap(),
            1
        );
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = sampler(1.0, None, None, seed);
            (0..40)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn temperature_follows_the_softmax() {
        // p = softmax([0, ln 3]) = [0.25, 0.75].
        let logits = [0.0, 3f32.ln()];
        let c = counts(&mut sampler(1.0, None, None, 11), &logits, 20_000);
        let share = c[1] as f64 / 20_000.0;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
        // Temperature 0.5 squares the odds: [1/10, 9/10].
        let c = counts(&mut sampler(0.5, None, None, 12), &logits, 20_000);
        let share = c[1] as f64 / 20_000.0;
        assert!((share - 0.9).abs() < 0.02, "share {share}");
    }

    #[test]
    fn top_k_keeps_only_the_k_best() {
        let logits = [1.0, 5.0, 4.9, 4.8, 0.0];
        let c = counts(&mut sampler(5.0, Some(2), None, 1), &logits, 2_000);
        assert_eq!(c[0] + c[3] + c[4], 0, "{c:?}");
        assert!(c[1] > 0 && c[2] > 0, "{c:?}");
        let c = counts(&mut sampler(5.0, Some(1), None, 1), &logits, 200);
        assert_eq!(c[1], 200);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities 0.5, 0.3, 0.2 (temperature 1).
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let c = counts(&mut sampler(1.0, None, Some(0.45), 2), &logits, 500);
        assert_eq!(c, vec![500, 0, 0]);
        let c = counts(&mut sampler(1.0, None, Some(0.75), 2), &logits, 2_000);
        assert_eq!(c[2], 0, "{c:?}");
        let share = c[0] as f64 / 2_000.0;
        assert!((share - 0.625).abs() < 0.04, "renormalised share {share}");
    }

    #[test]
    fn draws_tensors_and_rows_pick_what_sample_picks() {
        let config = SamplingConfig {
            temperature: 0.9,
            top_k: Some(20),
            top_p: Some(0.8),
            seed: 9,
        };
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|r| {
                (0..100)
                    .map(|i| ((i * 37 + r * 11) % 23) as f32 * 0.2)
                    .collect()
            })
            .collect();
        let mut plain = Sampler::new(config).unwrap();
        let want: Vec<u32> = rows.iter().map(|r| plain.sample(r).unwrap()).collect();
        // The same draws, made apart and given back.
        let mut draws = Sampler::new(config).unwrap();
        let fixed = Sampler::new(config).unwrap();
        let by_draw: Vec<u32> = rows
            .iter()
            .map(|r| fixed.sample_with_draw(r, draws.draw()).unwrap())
            .collect();
        assert_eq!(by_draw, want);
        // A [rows, vocab] tensor (one draw per row, in order), and one row at a time.
        let flat: Vec<f32> = rows.concat();
        let t = Tensor::from_vec(flat, (6, 100), &candle_core::Device::Cpu).unwrap();
        assert_eq!(Sampler::new(config).unwrap().sample_rows(&t).unwrap(), want);
        let mut one = Sampler::new(config).unwrap();
        let each: Vec<u32> = (0..6)
            .map(|r| one.sample_tensor(&t.get(r).unwrap()).unwrap())
            .collect();
        assert_eq!(each, want);
        // Draws outside [0, 1) are refused.
        for u in [1.0, -0.5, f64::NAN] {
            assert!(fixed.sample_with_draw(&rows[0], u).is_err(), "{u}");
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut s = sampler(1.0, None, None, 0);
        assert!(matches!(
            s.sample(&[0.0, f32::NAN]),
            Err(ModelError::NonFiniteLogits)
        ));
        assert!(s.sample(&[]).is_err());
        assert!(s.sample(&[f32::NEG_INFINITY]).is_err());
        for bad in [
            SamplingConfig {
                temperature: -1.0,
                ..SamplingConfig::greedy()
            },
            SamplingConfig {
                temperature: f32::NAN,
                ..SamplingConfig::greedy()
            },
            SamplingConfig {
                top_k: Some(0),
                ..SamplingConfig::greedy()
            },
            SamplingConfig {
                top_p: Some(0.0),
                ..SamplingConfig::greedy()
            },
            SamplingConfig {
                top_p: Some(1.5),
                ..SamplingConfig::greedy()
            },
        ] {
            assert!(matches!(
                Sampler::new(bad),
                Err(ModelError::InvalidArgument { .. })
            ));
        }
    }
}
