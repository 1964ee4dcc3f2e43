//! The real SmolLM2-135M requantized into the types a Q4_K_M file mixes (ignored: run in
//! release with the model present).
//!
//! Every projection whose rows are whole 256-weight super-blocks (`ffn_down`, 1536 columns)
//! becomes Q4_K, Q5_K or Q6_K by layer; the 576-column ones Q5_0 or Q5_1 (llama.cpp falls
//! back the same way for rows that are not whole super-blocks). The model must then run on
//! kv's own block kernels and agree with the same file expanded to f32: logits within the
//! f32 summation tolerance, and greedy tokens with the cache equal to those without.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::path::PathBuf;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;
use kv_backend_cpu::CpuBackend;
use kv_model::{CacheLayout, GenerateOptions, Logits, Model, WeightFormat};

/// The GGUF type each tensor is requantized to.
fn target_type(name: &str, cols: usize) -> Option<GgmlDType> {
    if !name.starts_with("blk.") && name != "token_embd.weight" {
        return None;
    }
    if name.contains("norm") {
        return None;
    }
    let layer: usize = name
        .split('.')
        .nth(1)
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    Some(if cols.is_multiple_of(256) {
        [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K][layer % 3]
    } else {
        [GgmlDType::Q5_0, GgmlDType::Q5_1][layer % 2]
    })
}

fn requantized_file() -> PathBuf {
    let src = kv_model::default_model_path();
    let mut file = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut tensors = Vec::new();
    let mut kinds = std::collections::BTreeMap::new();
    for name in content.tensor_infos.keys() {
        let t = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let cols = *t.shape().dims().last().unwrap();
        let t = match target_type(name, cols) {
            Some(ty) => {
                *kinds.entry(format!("{ty:?}")).or_insert(0) += 1;
                QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), ty).unwrap()
            }
            None => t,
        };
        tensors.push((name.clone(), t));
    }
    for ty in ["Q4K", "Q5K", "Q6K", "Q5_0", "Q5_1"] {
        assert!(kinds.contains_key(ty), "no tensor of {ty}: {kinds:?}");
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &refs).unwrap();
    let path = std::env::temp_dir().join(format!("kv-kquant-{}.gguf", std::process::id()));
    std::fs::write(&path, out.get_ref()).unwrap();
    path
}

#[test]
#[ignore = "needs the real model (cargo xtask fetch-model); run in release"]
fn k_quant_mix_runs_on_block_kernels_and_matches_f32() {
    let path = requantized_file();
    let (blocks, tokenizer) = kv_model::load(&path).unwrap();
    let f32 = Model::load_with(&path, &Device::Cpu, WeightFormat::F32).unwrap();
    let prompt = tokenizer
        .encode("The capital of France is Paris. The capital of Italy is")
        .unwrap();

    // Same weights, two multiplication paths: logits of every position agree to f32
    // summation error (the weights are dequantized bit for bit alike).
    let a: Vec<f32> = blocks
        .forward_uncached(&prompt, Logits::All)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = f32
        .forward_uncached(&prompt, Logits::All)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-2, "largest logit difference {worst}");

    // Greedy decoding on the block kernels: with the cache as without.
    let options = GenerateOptions {
        max_tokens: 24,
        ..GenerateOptions::default()
    };
    let cached = blocks
        .generate(
            CpuBackend::new(),
            CacheLayout::default(),
            &prompt,
            &options,
            |_| Ok(()),
        )
        .unwrap();
    let uncached = blocks
        .generate_uncached(&prompt, &options, |_| Ok(()))
        .unwrap();
    assert_eq!(cached.tokens, uncached.tokens);
    std::fs::remove_file(&path).unwrap();
}
