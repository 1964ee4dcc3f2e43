//! `kv ppl` on the real SmolLM2-135M-Instruct model: the quantized cache layouts really are
//! what attention reads, and INT8 keeps the model's perplexity.
//!
//! Ignored by default (they need the model); `cargo xtask test-all` runs them in release
//! mode with `--ignored`.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kv_attention::PagedCache;
use kv_backend_cpu::CpuBackend;
use kv_core::{KvDType, StorageSpec};
use kv_model::ppl::PerplexityOptions;
use kv_model::{Logits, Model, Tokenizer};

fn model() -> &'static (Model, Tokenizer) {
    static MODEL: OnceLock<(Model, Tokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = kv_model::default_model_path();
        kv_model::load(&path).unwrap_or_else(|e| {
            panic!(
                "cannot load {}: {e}; run `cargo xtask fetch-model`",
                path.display()
            )
        })
    })
}

/// The evaluation text: the shared corpus's GPL when it is there, else this repository's
/// architecture notes (any English text does for these loose bounds).
fn text_tokens() -> Vec<u32> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = ["../shared/corpus/gpl-3.txt", "ARCHITECTURE.md"]
        .iter()
        .find_map(|p| std::fs::read_to_string(root.join(p)).ok())
        .expect("an evaluation text");
    model().1.encode(&text).unwrap()
}

fn dtype(name: &str) -> KvDType {
    name.parse().unwrap()
}

/// Logits of every position of `tokens` run through a fresh cache in `dtype`, 32 tokens
/// per forward pass.
fn logits_through_cache(tokens: &[u32], dtype: KvDType) -> Vec<f32> {
    let (model, _) = model();
    let spec = StorageSpec::new(model.shape(), dtype, 32, tokens.len().div_ceil(32)).unwrap();
    let mut cache = PagedCache::new(CpuBackend::new(), spec).unwrap();
    let seq = cache.create_sequence();
    let mut out = Vec::new();
    for part in tokens.chunks(32) {
        let logits = model.forward(part, &mut cache, seq, Logits::All).unwrap();
        out.extend(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

#[test]
#[ignore = "needs the SmolLM2 model file (cargo xtask fetch-model); run in release"]
fn quantized_caches_really_change_the_logits() {
    let tokens: Vec<u32> = text_tokens().into_iter().take(96).collect();
    let f16 = logits_through_cache(&tokens, KvDType::F16);
    for name in ["int8-g32", "int4-g32", "kivi4"] {
        let q = logits_through_cache(&tokens, dtype(name));
        let diff = f16
            .iter()
            .zip(&q)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // Not silently f16: every quantized layout moves the logits ...
        assert!(diff > 1e-3, "{name}: logits equal f16's (max diff {diff})");
        // ... and keeps them finite. Closeness is int8's promise only (logits are O(10));
        // per-token int4 keys move single logits by more on this small model, which is what
        // `kv ppl` measures and reports.
        assert!(diff.is_finite(), "{name}: max diff {diff}");
        if name.starts_with("int8") {
            assert!(diff < 10.0, "{name}: max diff {diff}");
        }
    }
}

#[test]
#[ignore = "needs the SmolLM2 model file (cargo xtask fetch-model); run in release"]
fn int8_keeps_the_perplexity_of_f16() {
    let (model, tokenizer) = model();
    let tokens = text_tokens();
    let options = PerplexityOptions {
        ctx: 256,
        layouts: vec![KvDType::F16, dtype("int8-g32"), dtype("kivi2")],
        block_size: 32,
        batch: 64,
        max_chunks: Some(3),
    };
    let report = model
        .perplexity(
            &CpuBackend::new(),
            &tokens,
            tokenizer.bos_to_add(),
            &options,
            |_| {},
        )
        .unwrap();
    println!("{report}");
    assert_eq!(report.chunks, 3);
    assert_eq!(report.scored, 3 * 127);
    let f16 = report.get(KvDType::F16).unwrap();
    assert!(f16.perplexity > 1.0 && f16.perplexity < 100.0, "{report}");
    let int8 = report.get(dtype("int8-g32")).unwrap();
    // Loose bounds for a short text (the full-text numbers are in the README).
    assert!(int8.change.abs() < 0.02, "{report}");
    assert!(int8.mean_kl > 0.0 && int8.mean_kl < 1e-2, "{report}");
    assert!(int8.top1 > 0.9, "{report}");
    assert!(!int8.is_unsuitable());
    // 2-bit keys and values are a real change: measurably different from f16.
    let kivi2 = report.get(dtype("kivi2")).unwrap();
    assert!(kivi2.mean_kl > int8.mean_kl, "{report}");
}
