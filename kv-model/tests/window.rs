//! The sliding window with attention sinks on the real SmolLM2-135M-Instruct model.
//!
//! Ignored by default like the other real-model tests; run in release with
//! `cargo test --release -p kv-model --test window -- --ignored`. Greedy, no stop tokens,
//! so every run is exactly `max_tokens` long and comparisons are exact.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;

use kv_backend_cpu::CpuBackend;
use kv_core::KvDType;
use kv_model::{
    CacheLayout, CacheReport, GenerateOptions, Generation, Model, Tokenizer, WindowConfig,
};

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

fn prompt() -> Vec<u32> {
    let (_, tokenizer) = model();
    let template = tokenizer.chat_template().unwrap();
    tokenizer
        .encode(
            &template
                .render("Write a long story about a lighthouse keeper.")
                .unwrap(),
        )
        .unwrap()
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        ..GenerateOptions::default()
    }
}

fn windowed(prompt: &[u32], layout: CacheLayout, window: WindowConfig, n: usize) -> Generation {
    let (model, _) = model();
    model
        .generate_windowed(
            CpuBackend::new(),
            layout,
            window,
            prompt,
            &greedy(n),
            |_| Ok(()),
        )
        .unwrap()
}

#[test]
#[ignore = "needs the SmolLM2 model file; run in release"]
fn window_without_eviction_is_plain_generation() {
    let (model, _) = model();
    let prompt = prompt();
    let layout = CacheLayout {
        dtype: KvDType::F32,
        block_size: 16,
    };
    let n = 24;
    let plain = model
        .generate(CpuBackend::new(), layout, &prompt, &greedy(n), |_| Ok(()))
        .unwrap();
    let window = WindowConfig {
        sinks: 16,
        window: prompt.len() + n,
    };
    let run = windowed(&prompt, layout, window, n);
    assert_eq!(run.tokens, plain.tokens);
    let CacheReport::Paged {
        window: Some(report),
        ..
    } = run.summary.cache
    else {
        panic!("no window report");
    };
    assert_eq!(report.evicted_tokens, 0);
}

#[test]
#[ignore = "needs the SmolLM2 model file; run in release"]
fn window_past_eviction_keeps_memory_flat_and_text_sensible() {
    let (model, tokenizer) = model();
    let prompt = prompt();
    let (sinks, window, bs) = (16, 64, 16);
    let layout = CacheLayout {
        dtype: KvDType::F16,
        block_size: bs,
    };
    let config = WindowConfig { sinks, window };
    let n = 150;
    let run = windowed(&prompt, layout, config, n);
    assert_eq!(run.tokens.len(), n);
    let CacheReport::Paged {
        window: Some(report),
        usage,
        ..
    } = run.summary.cache
    else {
        panic!("no window report");
    };
    // Far more tokens went through than the cache ever held: it evicted and stayed flat.
    let total = prompt.len() + n - 1; // the last token is sampled, never written
    assert_eq!(report.evicted_tokens + usage.tokens, total);
    assert!(report.evicted_tokens >= total - sinks - window - bs);
    assert!(report.peak_tokens < sinks + window + bs + 1);
    assert!(report.peak_blocks <= config.blocks_needed(bs, window.min(256)));

    // Before the first eviction the window changes nothing: the first tokens are those of
    // plain generation (until the cache first exceeds sinks + window tokens).
    let before = (sinks + window).checked_sub(prompt.len()).unwrap();
    assert!(before > 0);
    let plain = model
        .generate(CpuBackend::new(), layout, &prompt, &greedy(before), |_| {
            Ok(())
        })
        .unwrap();
    assert_eq!(run.tokens[..before], plain.tokens[..]);

    // After it, text still: mostly letters and spaces, not one token repeated.
    let late = &run.tokens[n - 60..];
    let text = tokenizer.decode(late).unwrap();
    let letters = text
        .chars()
        .filter(|c| c.is_alphabetic() || c.is_whitespace())
        .count();
    assert!(
        letters * 10 >= text.chars().count() * 8,
        "not prose after eviction: {text:?}"
    );
    let mut distinct = late.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() >= 15, "degenerate after eviction: {text:?}");
}
