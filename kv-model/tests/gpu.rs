//! The model on the GPU (feature `cuda`): greedy generation with the cache on the device
//! equals generation without a cache, and the GPU's logits agree with the CPU path's.
//!
//! The model is written by the test: SmolLM2-135M's shape (30 layers, 576 wide, GQA 9:3,
//! 49152 tokens) with random Q4_1 weights (`tests/common/gguf.rs`), because the GPU machine
//! receives at most 64 MiB and the real file is ~90 MB. With `KV_MODEL_PATH` set the real
//! model is checked too.
//!
//! Without a GPU every test prints `SKIPPED <test>: no device (<why>)` and returns; with
//! `KV_REQUIRE_GPU` set (the GPU bundle's `run.sh` sets it) a missing device fails instead.
//!
//! Tolerances (logits of the synthetic model have a spread of about 14):
//! - f32 weights on the GPU (exact activations, cuBLAS in f32) against the CPU's block
//!   kernels: every logit within 2e-2 (summation order only), top-1 equal on every row;
//! - Q4_1 blocks on the GPU (candle's quantized kernels, activations rounded to 8 bits per
//!   row as Q8_1) against the CPU: every logit within 5% of the row's largest magnitude,
//!   top-1 equal on at least 90% of the rows.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use kv_attention::PagedCache;
use kv_backend_cuda::CudaBackend;
use kv_core::{CacheBackend, KvDType, StorageSpec};
use kv_model::{CacheLayout, GenerateOptions, Logits, Model, ModelError, WeightFormat};

/// The GPU, or `None` after printing why the test is skipped.
fn gpu(test: &str) -> Option<CudaBackend> {
    match kv_model::cuda_backend(0) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(
                std::env::var_os("KV_REQUIRE_GPU").is_none(),
                "{test}: KV_REQUIRE_GPU is set but there is no device: {e}"
            );
            println!("SKIPPED {test}: no device ({e})");
            None
        }
    }
}

/// The synthetic SmolLM2-shape Q4_1 model, written once per process.
fn synthetic() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kv-gpu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("smollm2-shape-q4_1.gguf");
        let g = common::gguf::q4_1_llama(&common::gguf::SMOLLM2, 7);
        common::gguf::write_gguf(&g, &path).unwrap();
        path
    })
}

/// The models to check: the synthetic one, and the real one when `KV_MODEL_PATH` is set.
fn models() -> Vec<PathBuf> {
    let mut v = vec![synthetic().clone()];
    if let Some(p) = std::env::var_os("KV_MODEL_PATH") {
        v.push(PathBuf::from(p));
    }
    v
}

/// Token ids spread over the vocabulary (deterministic).
fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + seed * 40_503) % vocab as u64) as u32)
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Compares GPU logits with the CPU's row by row; returns (max abs diff, max |logit|,
/// rows whose top-1 agree).
fn compare(gpu: &[Vec<f32>], cpu: &[Vec<f32>]) -> (f32, f32, usize) {
    assert_eq!(gpu.len(), cpu.len());
    let (mut diff, mut scale, mut agree) = (0f32, 0f32, 0);
    for (g, c) in gpu.iter().zip(cpu) {
        assert_eq!(g.len(), c.len());
        assert!(g.iter().all(|x| x.is_finite()), "non-finite GPU logits");
        for (a, b) in g.iter().zip(c) {
            diff = diff.max((a - b).abs());
            scale = scale.max(b.abs());
        }
        agree += usize::from(argmax(g) == argmax(c));
    }
    (diff, scale, agree)
}

fn check_agreement(what: &str, format: WeightFormat, gpu: &[Vec<f32>], cpu: &[Vec<f32>]) {
    let (diff, scale, agree) = compare(gpu, cpu);
    let n = gpu.len();
    println!("{what} {format:?}: max |gpu - cpu| {diff:.3e} (largest logit {scale:.2}), top-1 {agree}/{n}");
    match format {
        WeightFormat::Quantized => {
            assert!(diff <= 0.05 * scale, "{what}: {diff} > 5% of {scale}");
            assert!(
                agree * 10 >= n * 9,
                "{what}: top-1 agrees on {agree} of {n} rows"
            );
        }
        _ => {
            assert!(diff <= 2e-2, "{what}: {diff} > 2e-2");
            assert_eq!(agree, n, "{what}: top-1 differs");
        }
    }
}

#[test]
fn greedy_with_the_cache_on_the_gpu_equals_greedy_without() {
    let test = "greedy_with_the_cache_on_the_gpu_equals_greedy_without";
    if gpu(test).is_none() {
        return;
    }
    for path in models() {
        // Q4_1 on the device rounds activations to 8 bits, so near-ties could flip between
        // two mathematically equal computations: only the synthetic model (wide margins)
        // is held to token equality with those kernels.
        let formats: &[WeightFormat] = if &path == synthetic() {
            &[WeightFormat::F32, WeightFormat::Quantized]
        } else {
            &[WeightFormat::F32]
        };
        for &format in formats {
            let backend = gpu(test).unwrap();
            let (model, _) = kv_model::load_on(&path, backend.device(), format).unwrap();
            assert!(!model.device().is_cpu());
            let prompt = tokens(40, model.config().vocab_size, 1);
            let options = GenerateOptions {
                max_tokens: 24,
                ..GenerateOptions::default()
            };
            let layout = CacheLayout {
                dtype: KvDType::F32,
                block_size: 16,
            };
            let cached = model
                .generate(backend, layout, &prompt, &options, |_| Ok(()))
                .unwrap();
            let uncached = model
                .generate_uncached(&prompt, &options, |_| Ok(()))
                .unwrap();
            println!(
                "{} {format:?}: cached {:?}\n  {}",
                path.display(),
                cached.tokens,
                cached.summary
            );
            assert_eq!(cached.tokens.len(), 24);
            assert_eq!(
                cached.tokens,
                uncached.tokens,
                "{} {format:?}",
                path.display()
            );
        }
    }
}

#[test]
fn gpu_logits_agree_with_the_cpu_path() {
    let test = "gpu_logits_agree_with_the_cpu_path";
    if gpu(test).is_none() {
        return;
    }
    for path in models() {
        let cpu = Model::load(&path).unwrap();
        let seq_tokens = tokens(64, cpu.config().vocab_size, 2);
        let want = rows(&cpu.forward_uncached(&seq_tokens, Logits::All).unwrap());
        for format in [WeightFormat::F32, WeightFormat::Quantized] {
            let backend = gpu(test).unwrap();
            let (model, _) = kv_model::load_on(&path, backend.device(), format).unwrap();
            let what = path.display().to_string();
            // Uncached on the GPU: plain attention with candle's ops.
            let got = rows(&model.forward_uncached(&seq_tokens, Logits::All).unwrap());
            check_agreement(&format!("{what} uncached"), format, &got, &want);
            // Through the cache on the GPU: a 56-token prefill, then 8 decode steps.
            for dtype in [KvDType::F32, KvDType::F16] {
                let spec = StorageSpec::new(model.shape(), dtype, 16, 8).unwrap();
                let backend = gpu(test).unwrap();
                // The backend's own device must be the model's: load again on it.
                let (model, _) = kv_model::load_on(&path, backend.device(), format).unwrap();
                let mut cache = PagedCache::new(backend, spec).unwrap();
                let seq = cache.create_sequence();
                let mut got = rows(
                    &model
                        .forward(&seq_tokens[..56], &mut cache, seq, Logits::All)
                        .unwrap(),
                );
                for t in &seq_tokens[56..] {
                    let step = model.forward(&[*t], &mut cache, seq, Logits::Last).unwrap();
                    got.extend(rows(&step));
                }
                check_agreement(&format!("{what} cached {dtype}"), format, &got, &want);
            }
        }
    }
}

#[test]
fn the_device_sampler_picks_what_the_host_sampler_picks() {
    let test = "the_device_sampler_picks_what_the_host_sampler_picks";
    let Some(backend) = gpu(test) else {
        return;
    };
    let v: Vec<f32> = (0..49152u32)
        .map(|i| ((i * 7919) % 10007) as f32 * 1e-3)
        .collect();
    let t = Tensor::new(v.as_slice(), backend.device()).unwrap();
    let mut host = kv_model::Sampler::new(kv_model::SamplingConfig::default()).unwrap();
    assert_eq!(
        kv_model::greedy_token(&t).unwrap(),
        host.sample(&v).unwrap()
    );
    let mut bad = v.clone();
    bad[123] = f32::NAN;
    let t = Tensor::new(bad.as_slice(), backend.device()).unwrap();
    assert!(matches!(
        kv_model::greedy_token(&t),
        Err(ModelError::NonFiniteLogits)
    ));
}

#[test]
fn a_missing_gpu_is_a_typed_error() {
    // No machine has GPU 4095: the error is typed whether or not GPU 0 exists.
    match kv_model::cuda_backend(4095) {
        Err(ModelError::Cache(kv_core::KvError::BackendUnavailable { backend, reason })) => {
            assert_eq!(backend, "cuda");
            assert!(!reason.is_empty());
        }
        other => panic!("expected BackendUnavailable, got {other:?}"),
    }
}

/// A deterministic xorshift64 stream mapped to `[0, 1)`: the same rows on every run.
fn uniform(seed: u64) -> impl FnMut() -> f64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Device sampling (`Sampler::sample_rows`, one launch per batch of rows) against the host
/// sampler, draw by draw: the same seed gives the same draws, and each row's token must be
/// the host's for that draw. The one difference allowed is a draw within 1e-7 of the edge
/// between two tokens (the device sums fixed-point masses, the host f64 in sorted order): the
/// host must then give the device's token for the draw moved by 1e-7, and such rows must be
/// under 1%.
#[test]
fn device_sampling_picks_the_host_token_for_the_same_draw() {
    let test = "device_sampling_picks_the_host_token_for_the_same_draw";
    let Some(backend) = gpu(test) else {
        return;
    };
    let mut next = uniform(0x5eed_1234_abcd_0001);
    let (mut exact, mut edge) = (0usize, 0usize);
    for (case, &vocab) in [7usize, 1000, 49_152, 262_144].iter().enumerate() {
        for (j, config) in [
            (1.0f32, None, None),
            (0.7, Some(40), None),
            (0.8, None, Some(0.95f32)),
            (1.3, Some(50), Some(0.9)),
            (0.5, Some(1), None),
            (2.0, Some(vocab + 1), Some(1.0)),
        ]
        .into_iter()
        .enumerate()
        {
            let config = kv_model::SamplingConfig {
                temperature: config.0,
                top_k: config.1,
                top_p: config.2,
                seed: (case * 10 + j) as u64,
            };
            let rows = 16;
            // Spread logits; every fourth row has many ties (few distinct values) and -inf.
            let data: Vec<f32> = (0..rows * vocab)
                .map(|i| {
                    let r = next();
                    if (i / vocab) % 4 == 3 {
                        if i % 7 == 0 {
                            f32::NEG_INFINITY
                        } else {
                            (r * 8.0).floor() as f32
                        }
                    } else {
                        (r * 16.0 - 8.0) as f32
                    }
                })
                .collect();
            let t = Tensor::from_vec(data.clone(), (rows, vocab), backend.device()).unwrap();
            let mut device = kv_model::Sampler::new(config).unwrap();
            let got = device.sample_rows(&t).unwrap();
            let mut draws = kv_model::Sampler::new(config).unwrap();
            let host = kv_model::Sampler::new(config).unwrap();
            for (r, row) in data.chunks(vocab).enumerate() {
                let u = draws.draw();
                let want = host.sample_with_draw(row, u).unwrap();
                if got[r] == want {
                    exact += 1;
                    continue;
                }
                let near = [u - 1e-7, u + 1e-7]
                    .into_iter()
                    .filter(|u| (0.0..1.0).contains(u))
                    .any(|u| host.sample_with_draw(row, u).unwrap() == got[r]);
                assert!(
                    near,
                    "vocab {vocab} {config:?} row {r}: device {} host {want} (u {u})",
                    got[r]
                );
                edge += 1;
            }
        }
    }
    println!("{test}: {exact} rows exact, {edge} at a bucket edge");
    assert!(edge * 100 <= exact + edge, "{edge} edge rows");
}

/// The device's tokens follow the host's distribution: 20 000 draws on one row (temperature,
/// top-k and top-p all cutting), counted per token, against the probabilities the host
/// sampler's formula gives; Pearson's chi-square must stay under df + 6 sqrt(2 df) (a false
/// alarm about once in a million runs), and no token outside the kept set may appear.
#[test]
fn device_sampling_follows_the_distribution() {
    let test = "device_sampling_follows_the_distribution";
    let Some(backend) = gpu(test) else {
        return;
    };
    let vocab = 5000;
    let mut next = uniform(77);
    let row: Vec<f32> = (0..vocab).map(|_| (next() * 6.0) as f32).collect();
    let config = kv_model::SamplingConfig {
        temperature: 0.8,
        top_k: Some(60),
        top_p: Some(0.9),
        seed: 5,
    };
    // The host's probabilities: order, top-k, softmax, nucleus, renormalised.
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    order.truncate(60);
    let max = f64::from(row[order[0]]);
    let mut p: Vec<f64> = order
        .iter()
        .map(|&i| ((f64::from(row[i]) - max) / 0.8).exp())
        .collect();
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
    let mut cum = 0.0;
    let keep = p
        .iter()
        .position(|x| {
            cum += x;
            cum >= 0.9
        })
        .map_or(p.len(), |i| i + 1);
    p.truncate(keep);
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);

    let rows = 2000;
    let batch = Tensor::new(row.as_slice(), backend.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((rows, 1))
        .unwrap();
    let mut sampler = kv_model::Sampler::new(config).unwrap();
    let mut counts = vec![0usize; vocab];
    let draws = 10 * rows;
    for _ in 0..10 {
        for t in sampler.sample_rows(&batch).unwrap() {
            counts[t as usize] += 1;
        }
    }
    let mut chi2 = 0.0;
    for (k, &i) in order[..keep].iter().enumerate() {
        let expected = p[k] * draws as f64;
        let d = counts[i] as f64 - expected;
        chi2 += d * d / expected;
    }
    let inside: usize = order[..keep].iter().map(|&i| counts[i]).sum();
    assert_eq!(inside, draws, "tokens outside the kept {keep}");
    let df = (keep - 1) as f64;
    println!("{test}: {keep} tokens kept, chi-square {chi2:.1} (df {df})");
    assert!(
        chi2 < df + 6.0 * (2.0 * df).sqrt(),
        "chi-square {chi2} df {df}"
    );
}

/// NaN, `+inf` and all `-inf` are refused on the device with the host sampler's errors,
/// whichever row of a batch holds them.
#[test]
fn device_sampling_refuses_what_the_host_refuses() {
    let test = "device_sampling_refuses_what_the_host_refuses";
    let Some(backend) = gpu(test) else {
        return;
    };
    let config = kv_model::SamplingConfig {
        temperature: 1.0,
        top_k: Some(3),
        top_p: Some(0.9),
        seed: 1,
    };
    let good = [0.5f32, 1.0, -2.0, 0.0];
    for (bad, nonfinite) in [
        ([0.5f32, f32::NAN, 1.0, 0.0], true),
        ([f32::INFINITY, 0.0, 1.0, 0.0], true),
        ([f32::NEG_INFINITY; 4], false),
    ] {
        let mut host = kv_model::Sampler::new(config).unwrap();
        let host_err = host.sample(&bad).unwrap_err();
        let rows: Vec<f32> = good.iter().chain(bad.iter()).copied().collect();
        let t = Tensor::from_vec(rows, (2, 4), backend.device()).unwrap();
        let mut device = kv_model::Sampler::new(config).unwrap();
        let err = device.sample_rows(&t).unwrap_err();
        if nonfinite {
            assert!(matches!(host_err, ModelError::NonFiniteLogits));
            assert!(matches!(err, ModelError::NonFiniteLogits), "{err}");
        } else {
            assert!(matches!(host_err, ModelError::InvalidArgument { .. }));
            assert!(matches!(err, ModelError::InvalidArgument { .. }), "{err}");
        }
    }
}
