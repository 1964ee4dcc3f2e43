//! Tests on the real Gemma 3 270M (Q4_K_M) from `cargo xtask fetch-model gemma3-270m`:
//! MQA (4 query heads on 1 KV head), head_dim 256, per-head Q/K norms, and 15 of its 18
//! layers attending through a 512-token sliding window with their own RoPE base.
//!
//! Ignored by default; `cargo xtask test-all` runs them in release with `KV_GEMMA_PATH`
//! set (`cargo test --release -p kv-model --test gemma3 -- --ignored`).
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kv_backend_cpu::CpuBackend;
use kv_core::KvDType;
use kv_model::{CacheLayout, GenerateOptions, Logits, Model, Tokenizer};

fn path() -> PathBuf {
    match std::env::var_os("KV_GEMMA_PATH") {
        Some(p) => PathBuf::from(p),
        None => panic!("set KV_GEMMA_PATH (cargo xtask fetch-model gemma3-270m prints it)"),
    }
}

fn model() -> &'static (Model, Tokenizer) {
    static MODEL: OnceLock<(Model, Tokenizer)> = OnceLock::new();
    MODEL.get_or_init(|| kv_model::load(path()).unwrap())
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
#[ignore = "needs Gemma 3 270M: KV_GEMMA_PATH, release"]
fn config_is_read_as_llama_cpp_reads_it() {
    let (model, _) = model();
    let c = model.config();
    assert_eq!(c.architecture, "gemma3");
    assert_eq!(
        (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim),
        (18, 4, 1, 256)
    );
    assert_eq!(c.sliding_window, Some(512));
    let global: Vec<usize> = (0..18).filter(|&l| c.layer_window(l).is_none()).collect();
    assert_eq!(global, [5, 11, 17]);
    assert_eq!(c.attention_scale, 1.0 / 16.0);
    assert_eq!(c.rope_freq_base, 1_000_000.0);
    assert_eq!(c.rope_freq_base_local, 10_000.0);
}

#[test]
#[ignore = "needs Gemma 3 270M: KV_GEMMA_PATH, release"]
fn greedy_text_is_sensible() {
    let (model, tokenizer) = model();
    let prompt = tokenizer
        .encode("The Eiffel Tower is located in the city of")
        .unwrap();
    let options = GenerateOptions {
        max_tokens: 12,
        ..GenerateOptions::default()
    };
    let layout = CacheLayout {
        dtype: KvDType::F16,
        block_size: 16,
    };
    let run = model
        .generate(CpuBackend::new(), layout, &prompt, &options, |_| Ok(()))
        .unwrap();
    let text = tokenizer.decode(&run.tokens).unwrap();
    eprintln!("Gemma 3: The Eiffel Tower is located in the city of{text}");
    assert!(text.contains("Paris"), "{text:?}");
}

/// A prompt past the 512-token window, then greedy decoding with the cache: every step's
/// logits equal one uncached pass over the whole text (teacher forcing), so the local
/// layers' window is applied the same way by the cache backend and by plain attention.
#[test]
#[ignore = "needs Gemma 3 270M: KV_GEMMA_PATH, release"]
fn cached_greedy_equals_recompute_past_the_window() {
    let (model, tokenizer) = model();
    let sentence = "The river runs past the old mill, and the miller counts the sacks of \
                    grain that the farmers bring in autumn. ";
    let mut prompt = tokenizer.encode(&sentence.repeat(30)).unwrap();
    prompt.truncate(560);
    assert!(prompt.len() > 512);
    let steps = 16;
    for dtype in [KvDType::F32, KvDType::F16] {
        let layout = CacheLayout {
            dtype,
            block_size: 16,
        };
        let options = GenerateOptions {
            max_tokens: steps,
            keep_logits: true,
            ..GenerateOptions::default()
        };
        let run = model
            .generate(CpuBackend::new(), layout, &prompt, &options, |_| Ok(()))
            .unwrap();
        let mut all = prompt.clone();
        all.extend(&run.tokens[..run.tokens.len() - 1]);
        let reference: Vec<f32> = model
            .forward_uncached(&all, Logits::All)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let vocab = model.config().vocab_size;
        let mut worst = 0f32;
        for (step, logits) in run.logits.iter().enumerate() {
            let row = &reference[(prompt.len() - 1 + step) * vocab..][..vocab];
            let diff = logits
                .iter()
                .zip(row)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            worst = worst.max(diff);
            assert_eq!(run.tokens[step], argmax(row), "{dtype} step {step}");
        }
        let tol = if dtype == KvDType::F32 { 1e-2 } else { 0.25 };
        assert!(worst < tol, "{dtype}: logits differ by {worst}");
        eprintln!("{dtype}: {steps} steps past the window, largest logit difference {worst:e}");
    }
}
