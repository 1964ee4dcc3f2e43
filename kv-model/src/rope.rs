//! Rotary position embedding in llama.cpp's two forms.
//!
//! GGUF Llama files store the Q and K projection rows permuted so that the two halves of a
//! rotated pair sit next to each other: element `2i` pairs with `2i + 1` ("normal" mode).
//! Rotating `(x[2i], x[2i+1])` by the angle `p * base^(-2i/d)` therefore reproduces the
//! original model's "rotate half" RoPE exactly. Qwen 2/3 and Gemma 3 files keep the
//! Hugging Face layout unpermuted, so for them (NeoX mode, [`crate::config::Family::rope_halves`])
//! element `i` pairs with `i + d/2`. Using the wrong form silently produces a broken model.
//!
//! Angles come from a table that grows with use: it covers the positions already asked for
//! (rounded up to a power of two, at least [`FIRST_ROWS`]), never more than the model's
//! context length, so a model claiming a 10M-token context costs nothing up front. A
//! position past the context (only the sliding window reaches one: every other path
//! refuses tokens past the context before RoPE, with [`crate::ModelError::ContextOverflow`])
//! has its angles computed in f64 on the spot, exactly as the table's were.

use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device, Tensor, D};

use crate::{LlamaConfig, ModelError, Result};

/// Rows the table starts with the first time it is used.
const FIRST_ROWS: usize = 256;

/// Cosine and sine of every (position, pair) angle, computed as positions are used.
#[derive(Debug)]
pub(crate) struct Rope {
    /// `[rows, rope_dim / 2]` each; empty until the first call.
    table: Mutex<Option<(Tensor, Tensor)>>,
    /// Per pair: `scale * base^(-2i/rope_dim) / factor_i`, the angle per position.
    inv_freq: Vec<f64>,
    rope_dim: usize,
    /// NeoX pairs `(i, i + rope_dim/2)` instead of interleaved `(2i, 2i + 1)`.
    halves: bool,
    /// The context length: the table never grows past it.
    positions: usize,
    device: Device,
}

impl Rope {
    /// RoPE for `config.context_length` positions; no table yet. `freq_factors` (Llama
    /// 3.1's `rope_freqs.weight`) divide the frequency of each pair when present.
    pub(crate) fn new(
        config: &LlamaConfig,
        freq_factors: Option<&[f32]>,
        device: &Device,
    ) -> Result<Self> {
        Self::with_base(
            config,
            config.rope_freq_base,
            config.rope_position_scale,
            freq_factors,
            device,
        )
    }

    /// RoPE of the sliding-window layers: their own base
    /// ([`LlamaConfig::rope_freq_base_local`]), no scaling.
    pub(crate) fn local(config: &LlamaConfig, device: &Device) -> Result<Self> {
        Self::with_base(config, config.rope_freq_base_local, 1.0, None, device)
    }

    fn with_base(
        config: &LlamaConfig,
        base: f32,
        scale: f32,
        freq_factors: Option<&[f32]>,
        device: &Device,
    ) -> Result<Self> {
        let half = config.rope_dim / 2;
        if let Some(f) = freq_factors {
            if f.len() != half {
                return Err(ModelError::TensorShape {
                    name: "rope_freqs.weight".into(),
                    expected: format!("[{half}]"),
                    got: format!("[{}]", f.len()),
                });
            }
            if f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(ModelError::BadMetadata {
                    key: "rope_freqs.weight".into(),
                    expected: "positive finite factors".into(),
                    got: "a zero, negative or non-finite factor".into(),
                });
            }
        }
        let base = f64::from(base);
        let scale = f64::from(scale);
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = base.powf(-2.0 * i as f64 / config.rope_dim as f64);
                scale * f / freq_factors.map_or(1.0, |ff| f64::from(ff[i]))
            })
            .collect();
        Ok(Self {
            table: Mutex::new(None),
            inv_freq,
            rope_dim: config.rope_dim,
            halves: config.family.rope_halves(),
            positions: config.context_length,
            device: device.clone(),
        })
    }

    /// Rows the table holds now (0 before the first call): for tests.
    #[cfg(test)]
    fn table_rows(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.as_ref().map_or(0, |(c, _)| c.dims()[0])
    }

    /// Cosines and sines for positions `start..end` (`end <= self.positions`), from the
    /// table, grown first if it is too short.
    fn rows(&self, start: usize, end: usize) -> Result<(Tensor, Tensor)> {
        let half = self.rope_dim / 2;
        // A panic elsewhere cannot leave the table half-written: it is replaced whole.
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let have = table.as_ref().map_or(0, |(c, _)| c.dims()[0]);
        if end > have {
            let want = end
                .checked_next_power_of_two()
                .unwrap_or(end)
                .max(FIRST_ROWS)
                .min(self.positions)
                .max(end);
            let (cos, sin) = angles(&self.inv_freq, have..want);
            let cos = Tensor::from_vec(cos, (want - have, half), &self.device)?;
            let sin = Tensor::from_vec(sin, (want - have, half), &self.device)?;
            *table = Some(match table.take() {
                Some((c, s)) => (Tensor::cat(&[c, cos], 0)?, Tensor::cat(&[s, sin], 0)?),
                None => (cos, sin),
            });
        }
        match table.as_ref() {
            Some((c, s)) => Ok((
                c.narrow(0, start, end - start)?,
                s.narrow(0, start, end - start)?,
            )),
            None => Err(ModelError::ContextOverflow {
                what: "position",
                needed: end,
                context: 0,
            }),
        }
    }

    /// Rotates `x` (`[tokens, heads, head_dim]`, f32) whose tokens sit at positions
    /// `start..start + tokens`.
    pub(crate) fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let n = x.dim(0)?;
        let half = self.rope_dim / 2;
        let (cos, sin) = match start.checked_add(n) {
            Some(end) if end <= self.positions => self.rows(start, end)?,
            Some(end) => {
                let (cos, sin) = angles(&self.inv_freq, start..end);
                (
                    Tensor::from_vec(cos, (n, half), x.device())?,
                    Tensor::from_vec(sin, (n, half), x.device())?,
                )
            }
            None => {
                return Err(ModelError::ContextOverflow {
                    what: "position",
                    needed: usize::MAX,
                    context: self.positions,
                })
            }
        };
        self.rotate(x, &cos, &sin)
    }

    /// Rotates every row of `x` (`[tokens, heads, head_dim]`, f32) by the angles of one
    /// `position`: moves keys rotated at `p` to `p + position` (rotations compose).
    pub(crate) fn shift(&self, x: &Tensor, position: usize) -> Result<Tensor> {
        let n = x.dim(0)?;
        let half = self.rope_dim / 2;
        let (cos, sin) = angles(&self.inv_freq, position..position + 1);
        let cos = Tensor::from_vec(cos.repeat(n), (n, half), x.device())?;
        let sin = Tensor::from_vec(sin.repeat(n), (n, half), x.device())?;
        self.rotate(x, &cos, &sin)
    }

    /// Rotates row `t` of `x` by the angles in row `t` of `cos`/`sin` (`[tokens, half]`).
    ///
    /// On the CPU one loop over the elements ([`Rope::rotate_host`]); elsewhere the
    /// tensor operations of [`Rope::rotate_ops`]. Both compute `a cos - b sin` and
    /// `a sin + b cos` with each product rounded once, so they agree bit for bit.
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            self.rotate_host(x, cos, sin)
        } else {
            self.rotate_ops(x, cos, sin)
        }
    }

    /// [`Rope::rotate`] as plain loops over host memory: a decode step rotates Q and K of
    /// every layer, and as a dozen tensor operations (each a new tensor, the pairs
    /// gathered by strided copies) that was ~5% of a SmolLM2 decode step's CPU time on
    /// the thread the other threads wait for (`perf`, `docs/measurements.md`).
    fn rotate_host(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (n, heads, head_dim) = x.dims3()?;
        let half = self.rope_dim / 2;
        let cos = cos.flatten_all()?.to_vec1::<f32>()?;
        let sin = sin.flatten_all()?.to_vec1::<f32>()?;
        if cos.len() != n * half || sin.len() != n * half || self.rope_dim > head_dim {
            return Err(candle_core::Error::Msg(format!(
                "rope: {} angles for {n} tokens of {half} pairs, rope_dim {} of head_dim \
                 {head_dim}",
                cos.len(),
                self.rope_dim
            ))
            .into());
        }
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        let halves = self.halves;
        // (a, b) of pair `i`: the two halves (NeoX), or interleaved elements.
        let pair = |i: usize| {
            if halves {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            }
        };
        for (t, rows) in v.chunks_exact_mut(heads * head_dim).enumerate() {
            let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
            for row in rows.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (pa, pb) = pair(i);
                    let (a, b) = (row[pa], row[pb]);
                    // The products rounded before the sum, as the tensor operations do.
                    let (ac, bs, as_, bc) = (a * c[i], b * s[i], a * s[i], b * c[i]);
                    row[pa] = ac - bs;
                    row[pb] = as_ + bc;
                }
            }
        }
        Ok(Tensor::from_vec(v, (n, heads, head_dim), x.device())?)
    }

    /// [`Rope::rotate`] as tensor operations: any device.
    fn rotate_ops(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (n, heads, head_dim) = x.dims3()?;
        let half = self.rope_dim / 2;
        let cos = cos.reshape((n, 1, half))?;
        let sin = sin.reshape((n, 1, half))?;
        let rotated = x.narrow(2, 0, self.rope_dim)?;
        // (a, b) of each pair: interleaved elements, or the two halves (NeoX).
        let (a, b) = if self.halves {
            (rotated.narrow(2, 0, half)?, rotated.narrow(2, half, half)?)
        } else {
            let pairs = rotated.reshape((n, heads, half, 2))?;
            (
                pairs.narrow(3, 0, 1)?.squeeze(3)?,
                pairs.narrow(3, 1, 1)?.squeeze(3)?,
            )
        };
        let new_a = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
        let new_b = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
        let out = if self.halves {
            Tensor::cat(&[new_a, new_b], D::Minus1)?
        } else {
            Tensor::stack(&[new_a, new_b], D::Minus1)?.reshape((n, heads, self.rope_dim))?
        };
        if self.rope_dim == head_dim {
            Ok(out)
        } else {
            let pass = x.narrow(2, self.rope_dim, head_dim - self.rope_dim)?;
            Ok(Tensor::cat(&[out, pass], 2)?)
        }
    }
}

/// Cosine and sine of `position * inv_freq[i]` for each position, computed in f64.
fn angles(inv_freq: &[f64], positions: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>) {
    let n = positions.len() * inv_freq.len();
    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for p in positions {
        for f in inv_freq {
            let angle = p as f64 * f;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(head_dim: usize, rope_dim: usize) -> LlamaConfig {
        LlamaConfig {
            architecture: "llama".into(),
            n_layers: 1,
            hidden_size: head_dim * 2,
            intermediate_size: 4,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim,
            rope_dim,
            rope_freq_base: 10_000.0,
            rope_position_scale: 1.0,
            rms_norm_eps: 1e-5,
            context_length: 64,
            vocab_size: 10,
            family: crate::config::Family::Llama,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            sliding_window: None,
            sliding_window_pattern: 1,
            rope_freq_base_local: 10_000.0,
            llama3_rope: None,
        }
    }

    /// The rotation written out element by element, as llama.cpp's NORM mode (pairs
    /// `2i, 2i + 1`) and NEOX mode (pairs `i, i + rope_dim / 2`) define it.
    fn naive(x: &[f32], pos: usize, cfg: &LlamaConfig, factors: Option<&[f32]>) -> Vec<f32> {
        let mut out = x.to_vec();
        let half = cfg.rope_dim / 2;
        for i in 0..half {
            let theta = (pos as f64 * f64::from(cfg.rope_position_scale))
                * f64::from(cfg.rope_freq_base).powf(-2.0 * i as f64 / cfg.rope_dim as f64)
                / factors.map_or(1.0, |f| f64::from(f[i]));
            let (ia, ib) = if cfg.family.rope_halves() {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (a, b) = (f64::from(x[ia]), f64::from(x[ib]));
            out[ia] = (a * theta.cos() - b * theta.sin()) as f32;
            out[ib] = (a * theta.sin() + b * theta.cos()) as f32;
        }
        out
    }

    fn check(cfg: &LlamaConfig, factors: Option<&[f32]>) {
        // Inside the table, and past the context (computed on the spot; window mode only).
        check_at(cfg, factors, 9);
        check_at(cfg, factors, 62);
        check_at(cfg, factors, 10_000);
    }

    fn check_at(cfg: &LlamaConfig, factors: Option<&[f32]>, start: usize) {
        let dev = Device::Cpu;
        let rope = Rope::new(cfg, factors, &dev).unwrap();
        let (n, heads, d) = (5, 2, cfg.head_dim);
        let data: Vec<f32> = (0..n * heads * d)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let x = Tensor::from_vec(data.clone(), (n, heads, d), &dev).unwrap();
        let got = rope.apply(&x, start).unwrap();
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        for t in 0..n {
            for h in 0..heads {
                let off = (t * heads + h) * d;
                let want = naive(&data[off..off + d], start + t, cfg, factors);
                for (g, w) in got[off..off + d].iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "token {t} head {h}: {g} vs {w}");
                }
            }
        }
    }

    /// The host loop and the tensor operations agree bit for bit (interleaved, halves,
    /// partial rotation, several tokens at once).
    #[test]
    fn host_rotation_equals_the_tensor_operations_bit_for_bit() {
        let mut neox = config(16, 16);
        neox.family = crate::config::Family::Qwen2;
        let mut partial = config(16, 8);
        partial.family = crate::config::Family::Gemma3;
        for cfg in [config(16, 16), neox, partial, config(16, 12)] {
            let dev = Device::Cpu;
            let rope = Rope::new(&cfg, None, &dev).unwrap();
            let (n, heads, d) = (7, 3, cfg.head_dim);
            let data: Vec<f32> = (0..n * heads * d)
                .map(|i| ((i * 7919 % 113) as f32 - 56.0) / 9.0)
                .collect();
            let x = Tensor::from_vec(data, (n, heads, d), &dev).unwrap();
            let (cos, sin) = rope.rows(40, 40 + n).unwrap();
            let host = rope.rotate_host(&x, &cos, &sin).unwrap();
            let ops = rope.rotate_ops(&x, &cos, &sin).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|v| v.to_bits()).collect()
            };
            let (host, ops) = (bits(&host), bits(&ops));
            assert_eq!(
                host, ops,
                "rope_dim {} halves {}",
                cfg.rope_dim, rope.halves
            );
        }
    }

    #[test]
    fn interleaved_pairs_match_the_definition() {
        check(&config(8, 8), None);
    }

    #[test]
    fn neox_halves_match_the_definition() {
        let mut cfg = config(8, 8);
        cfg.family = crate::config::Family::Qwen2;
        check(&cfg, None);
        let mut cfg = config(8, 4);
        cfg.family = crate::config::Family::Gemma3;
        check(&cfg, Some(&[1.0, 3.0]));
    }

    #[test]
    fn partial_rotation_leaves_the_tail() {
        check(&config(8, 4), None);
    }

    #[test]
    fn frequency_factors_and_linear_scaling() {
        let mut cfg = config(8, 8);
        cfg.rope_position_scale = 0.5;
        check(&cfg, Some(&[1.0, 2.0, 4.0, 8.0]));
        assert!(Rope::new(&cfg, Some(&[1.0]), &Device::Cpu).is_err());
    }

    #[test]
    fn shift_composes_with_the_first_rotation() {
        let cfg = config(8, 8);
        let rope = Rope::new(&cfg, None, &Device::Cpu).unwrap();
        let data: Vec<f32> = (0..3 * 2 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
        let x = Tensor::from_vec(data, (3, 2, 8), &Device::Cpu).unwrap();
        // Rows at 4, 5, 6 shifted by 9000 are rows at 9004, 9005, 9006.
        let shifted = rope.shift(&rope.apply(&x, 4).unwrap(), 9000).unwrap();
        let direct = rope.apply(&x, 9004).unwrap();
        let diff: f32 = (shifted - direct)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn position_zero_is_identity_and_overflow_is_an_error() {
        let cfg = config(8, 8);
        let rope = Rope::new(&cfg, None, &Device::Cpu).unwrap();
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 8))
            .unwrap();
        let y = rope.apply(&x, 0).unwrap();
        let diff: f32 = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(diff, 0.0);
        let x = Tensor::zeros((2, 2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            rope.apply(&x, usize::MAX),
            Err(ModelError::ContextOverflow { .. })
        ));
    }

    #[test]
    fn the_table_grows_with_use_and_stops_at_the_context() {
        let mut cfg = config(8, 8);
        cfg.context_length = 10_000_000;
        let rope = Rope::new(&cfg, None, &Device::Cpu).unwrap();
        assert_eq!(rope.table_rows(), 0);
        let x = Tensor::zeros((3, 2, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        rope.apply(&x, 0).unwrap();
        assert_eq!(rope.table_rows(), FIRST_ROWS);
        rope.apply(&x, 300).unwrap();
        assert_eq!(rope.table_rows(), 512);
        // A context of 300 caps the table at 300 rows.
        cfg.context_length = 300;
        let rope = Rope::new(&cfg, None, &Device::Cpu).unwrap();
        rope.apply(&x, 290).unwrap();
        assert_eq!(rope.table_rows(), 300);
        // Grown tables hold the same angles as on-the-spot ones (checked against the
        // definition at positions on both sides of each growth).
        let mut cfg = config(8, 8);
        cfg.context_length = 10_000;
        for start in [0, 250, 254, 255, 256, 600] {
            check_at(&cfg, None, start);
        }
    }
}
