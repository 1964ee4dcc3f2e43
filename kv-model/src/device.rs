//! The model on a device other than the CPU (an NVIDIA GPU with the `cuda` feature).
//!
//! The decoder itself is [`Model::run`](crate::Model): every step of it is a candle op, and
//! the CPU-only shortcuts (one-pass RMSNorm and SwiGLU, this crate's block kernels) each
//! have a device branch, so on `Device::Cuda` the weights, activations, norms, RoPE tables
//! and residual stream stay in device memory. What this module adds:
//! - [`load_on`]: the model on a device, GGUF weights kept as the file's quantized blocks
//!   in device memory (candle's `QMatMul` on CUDA) unless `--weights f32` asks for them
//!   expanded;
//! - [`greedy_token`]: greedy sampling on the device, so a decode step copies one token id
//!   (and two floats that prove the logits finite) to the host instead of the vocabulary's
//!   logits; with temperature, [`crate::Sampler::sample_rows`] samples there too (feature
//!   `cuda`: kv-backend-cuda's `kv_sample` kernel), copying back a status and a token;
//! - with `cuda`, [`cuda_backend`]: the GPU as a cache backend, or a typed error naming why
//!   not.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::{LlamaConfig, Model, ModelError, Result, Tokenizer, WeightFormat};

/// The weight format a model on `device` is loaded with: on the CPU, `format` as given; on
/// another device, [`WeightFormat::Blocks`] (this crate's CPU kernels) becomes
/// [`WeightFormat::Quantized`]: the file's blocks in device memory, multiplied by candle's
/// quantized kernels for that device.
///
/// ```
/// use candle_core::Device;
/// use kv_model::{device_weight_format, WeightFormat};
/// assert_eq!(device_weight_format(&Device::Cpu, WeightFormat::Blocks), WeightFormat::Blocks);
/// ```
pub fn device_weight_format(device: &Device, format: WeightFormat) -> WeightFormat {
    match format {
        WeightFormat::Blocks if !device.is_cpu() => WeightFormat::Quantized,
        other => other,
    }
}

/// [`crate::load_with`] onto `device`, with the format [`device_weight_format`] picks.
///
/// ```no_run
/// let device = candle_core::Device::Cpu;
/// let (model, _tokenizer) =
///     kv_model::load_on(kv_model::default_model_path(), &device, kv_model::WeightFormat::Blocks)?;
/// assert!(model.device().is_cpu());
/// # Ok::<(), kv_model::ModelError>(())
/// ```
///
/// # Errors
/// As [`crate::load`], and candle's errors from the device (out of memory).
pub fn load_on(
    path: impl AsRef<Path>,
    device: &Device,
    format: WeightFormat,
) -> Result<(Model, Tokenizer)> {
    let path = path.as_ref();
    let (content, map) = crate::mapped::GgufMap::open(path)?;
    LlamaConfig::from_metadata(&content.metadata)?;
    let tokenizer = Tokenizer::from_metadata(&content.metadata)?;
    let format = device_weight_format(device, format);
    let model = Model::from_content(&content, &map, path, device, format)?;
    Ok((model, tokenizer))
}

/// The greedy token of `logits` (`[1, vocab]` or `[vocab]`, any device), computed where
/// the logits are: argmax, maximum and the count of NaNs in one small tensor, one copy of
/// three floats to the host.
///
/// Same answer as a greedy [`crate::Sampler`] on the host values, ties aside (the device's
/// argmax may pick another of equal logits), and the same errors.
///
/// # Errors
/// [`ModelError::NonFiniteLogits`] when a logit is NaN or `+inf`;
/// [`ModelError::InvalidArgument`] for no logits or all `-inf`.
pub fn greedy_token(logits: &Tensor) -> Result<u32> {
    let row = logits.flatten_all()?;
    let tokens = greedy_rows(&row.unsqueeze(0)?)?;
    Ok(tokens[0])
}

/// [`greedy_token`] of every row of `logits` (`[rows, vocab]`, any device): one copy of
/// three floats per row, as a batch's decode step needs.
///
/// # Errors
/// As [`greedy_token`], for the first row at fault.
pub fn greedy_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let rows = logits.to_dtype(DType::F32)?;
    let (n_rows, n) = rows.dims2()?;
    if n == 0 {
        return Err(ModelError::InvalidArgument {
            what: "logits",
            expected: "at least one value".into(),
            got: "none".into(),
        });
    }
    let best = rows.argmax_keepdim(D::Minus1)?;
    let max = rows.max_keepdim(D::Minus1)?;
    // NaN is the one value unequal to itself: counted exactly, whatever max does with it.
    let nans = rows
        .ne(&rows)?
        .to_dtype(DType::F32)?
        .sum_keepdim(D::Minus1)?;
    // Token ids below 2^24 are exact in f32: one copy; a larger vocabulary reads the ids apart.
    let (ids, stats) = if n < (1 << 24) {
        let v = Tensor::cat(&[best.to_dtype(DType::F32)?, max, nans], 1)?.to_vec2::<f32>()?;
        let ids = v.iter().map(|r| r[0] as u32).collect::<Vec<_>>();
        (ids, v.into_iter().map(|r| (r[1], r[2])).collect::<Vec<_>>())
    } else {
        let v = Tensor::cat(&[max, nans], 1)?.to_vec2::<f32>()?;
        let ids = best.flatten_all()?.to_vec1::<u32>()?;
        (ids, v.into_iter().map(|r| (r[0], r[1])).collect())
    };
    debug_assert_eq!(ids.len(), n_rows);
    for &(max, nans) in &stats {
        if nans > 0.0 || max == f32::INFINITY {
            return Err(ModelError::NonFiniteLogits);
        }
        if max == f32::NEG_INFINITY {
            return Err(ModelError::InvalidArgument {
                what: "logits",
                expected: "at least one finite value".into(),
                got: format!("{n} values, none finite"),
            });
        }
    }
    Ok(ids)
}

/// Samples every row of `logits` (`[rows, vocab]` on a CUDA device) with `config`'s
/// temperature, top-k and top-p and one draw per row, in one kernel launch
/// (`kv_backend_cuda::sample_rows`): a status and a token come back per row, and the
/// statuses become the host [`crate::Sampler`]'s errors. [`crate::Sampler::sample_rows`] is
/// the entry point that makes the draws.
///
/// # Errors
/// [`ModelError::NonFiniteLogits`] for a row with NaN or `+inf`,
/// [`ModelError::InvalidArgument`] for a row with no finite logit or a greedy `config`, and
/// [`ModelError::Cache`] for what the kernel's checks refuse (wrong draw count, vocabulary
/// over 2^24) or a device failure.
#[cfg(feature = "cuda")]
pub(crate) fn sample_rows_with(
    logits: &Tensor,
    config: &crate::SamplingConfig,
    draws: &[f64],
) -> Result<Vec<u32>> {
    use kv_backend_cuda::sample::{RowSample, SampleParams};
    let params = SampleParams {
        temperature: config.temperature,
        top_k: config.top_k,
        top_p: config.top_p,
    };
    let n = logits.dim(D::Minus1)?;
    kv_backend_cuda::sample_rows(logits, &params, draws)?
        .into_iter()
        .map(|row| match row {
            RowSample::Token(t) => Ok(t),
            RowSample::NonFinite => Err(ModelError::NonFiniteLogits),
            RowSample::NoFinite => Err(ModelError::InvalidArgument {
                what: "logits",
                expected: "at least one finite value".into(),
                got: format!("{n} values, none finite"),
            }),
        })
        .collect()
}

/// The GPU `ordinal` as a cache backend (its [`CacheBackend::device`] is where the model
/// must be loaded), or [`ModelError::Cache`] with [`kv_core::KvError::BackendUnavailable`]
/// saying why not (no driver, no device): never a panic.
///
/// [`CacheBackend::device`]: kv_core::CacheBackend::device
///
/// ```no_run
/// use kv_core::CacheBackend;
/// let backend = kv_model::cuda_backend(0)?;
/// let (model, _tok) = kv_model::load_on(
///     kv_model::default_model_path(),
///     backend.device(),
///     kv_model::WeightFormat::Blocks,
/// )?;
/// # let _ = model;
/// # Ok::<(), kv_model::ModelError>(())
/// ```
///
/// # Errors
/// As above.
#[cfg(feature = "cuda")]
pub fn cuda_backend(ordinal: usize) -> Result<kv_backend_cuda::CudaBackend> {
    Ok(kv_backend_cuda::CudaBackend::new(ordinal)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Sampler, SamplingConfig};

    fn host_greedy(v: &[f32]) -> Result<u32> {
        Sampler::new(SamplingConfig::default())?.sample(v)
    }

    #[test]
    fn greedy_on_the_device_agrees_with_the_sampler() {
        let cases: Vec<Vec<f32>> = vec![
            vec![0.5, -1.0, 3.0, 2.9],
            vec![-2.0],
            vec![f32::NEG_INFINITY, -7.0, f32::NEG_INFINITY],
            (0..1000)
                .map(|i| ((i * 7919) % 1013) as f32 * 0.01)
                .collect(),
            vec![f32::MAX, -f32::MAX, 1.0],
        ];
        for v in cases {
            let t = Tensor::new(v.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            assert_eq!(greedy_token(&t).unwrap(), host_greedy(&v).unwrap(), "{v:?}");
        }
    }

    #[test]
    fn greedy_rows_equal_each_rows_greedy_token() {
        let v: Vec<f32> = (0..3 * 257)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 3.0)
            .collect();
        let t = Tensor::from_vec(v.clone(), (3, 257), &Device::Cpu).unwrap();
        let want: Vec<u32> = v.chunks(257).map(|r| host_greedy(r).unwrap()).collect();
        assert_eq!(greedy_rows(&t).unwrap(), want);
        let mut bad = v;
        bad[2 * 257 + 5] = f32::NAN;
        let t = Tensor::from_vec(bad, (3, 257), &Device::Cpu).unwrap();
        assert!(matches!(greedy_rows(&t), Err(ModelError::NonFiniteLogits)));
    }

    #[test]
    fn non_finite_logits_are_refused_as_the_sampler_refuses_them() {
        for v in [
            vec![0.0, f32::NAN, 1.0],
            vec![f32::INFINITY, 1.0],
            vec![f32::NAN],
        ] {
            let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
            assert!(
                matches!(greedy_token(&t), Err(ModelError::NonFiniteLogits)),
                "{v:?}"
            );
            assert!(
                matches!(host_greedy(&v), Err(ModelError::NonFiniteLogits)),
                "{v:?}"
            );
        }
        let t = Tensor::new(&[f32::NEG_INFINITY; 3], &Device::Cpu).unwrap();
        assert!(matches!(
            greedy_token(&t),
            Err(ModelError::InvalidArgument { .. })
        ));
        let t = Tensor::zeros(0, DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            greedy_token(&t),
            Err(ModelError::InvalidArgument { .. })
        ));
    }

    #[test]
    fn blocks_become_the_devices_quantized_kernels_off_the_cpu() {
        for f in [
            WeightFormat::Blocks,
            WeightFormat::F32,
            WeightFormat::Quantized,
        ] {
            assert_eq!(device_weight_format(&Device::Cpu, f), f);
        }
    }
}
