//! The architecture models that `cargo xtask arch-peer` runs in kv and llama.cpp
//! (tests/common/gguf.rs `arch_model`: `llama`, `llama` with Llama 3 RoPE factors, `qwen2`,
//! `qwen3`, each in F32, F16 and Q8_0), checked in kv alone: a whole-prompt prefill gives
//! the logits of feeding the prompt one token at a time, greedy decoding with the cache
//! picks the tokens of recomputing without one, and the model is confident (top-1 margins
//! well above the engines' rounding), so a peer comparison can tell a bug from noise.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::gguf::{self, Arch};
use kv_attention::PagedCache;
use kv_backend_cpu::CpuBackend;
use kv_core::{KvDType, StorageSpec};
use kv_model::{Logits, Model};

const PROMPT: [u32; 9] = [40, 301, 77, 5, 260, 118, 77, 42, 199];

/// The model in a file of its own: tests run in parallel threads of one process, and one
/// must never read a file another is still writing.
fn load(arch: Arch, ty: u32) -> Model {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("kv-arch-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path: PathBuf = dir.join(format!("{}-{ty}-{n}.gguf", arch.name()));
    let g = gguf::arch_model(arch, &gguf::byte_vocab_kvs(512), ty, 7);
    gguf::write_gguf(&g, &path).unwrap();
    let model = Model::load(&path).unwrap_or_else(|e| panic!("{}: {e}", arch.name()));
    // The model holds what it needs (mapped or read): the file can go.
    std::fs::remove_file(&path).unwrap();
    model
}

fn rows(t: candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn cache(model: &Model, dtype: KvDType) -> PagedCache<CpuBackend> {
    let spec = StorageSpec::new(model.shape(), dtype, 4, 64).unwrap();
    PagedCache::new(CpuBackend::new(), spec).unwrap()
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

/// Top-1 minus top-2 logit.
fn margin(row: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in row {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

fn names() -> impl Iterator<Item = (Arch, u32, &'static str)> {
    Arch::ALL.into_iter().flat_map(|a| {
        [(gguf::F32, "f32"), (gguf::F16, "f16"), (gguf::Q8_0, "q8_0")]
            .into_iter()
            .map(move |(ty, n)| (a, ty, n))
    })
}

#[test]
fn prefill_equals_token_by_token_decode() {
    for (arch, ty, tn) in names() {
        let model = load(arch, ty);
        let vocab = model.config().vocab_size;
        let mut c = cache(&model, KvDType::F32);
        let seq = c.create_sequence();
        let all = rows(model.forward(&PROMPT, &mut c, seq, Logits::All).unwrap());
        assert_eq!(all.len(), PROMPT.len() * vocab);
        let mut c = cache(&model, KvDType::F32);
        let seq = c.create_sequence();
        for (i, &t) in PROMPT.iter().enumerate() {
            let one = rows(model.forward(&[t], &mut c, seq, Logits::Last).unwrap());
            let want = &all[i * vocab..(i + 1) * vocab];
            let diff = one
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                diff < 2e-3,
                "{} {tn}: position {i} differs by {diff}",
                arch.name()
            );
            assert_eq!(
                argmax(&one),
                argmax(want),
                "{} {tn}: position {i}",
                arch.name()
            );
        }
    }
}

#[test]
fn greedy_with_the_cache_equals_without_and_the_models_are_confident() {
    const STEPS: usize = 24;
    for (arch, ty, tn) in names() {
        let model = load(arch, ty);
        let name = format!("{} {tn}", arch.name());
        // Without a cache: recompute the whole sequence each step.
        let mut plain = PROMPT.to_vec();
        let mut margins = Vec::new();
        for _ in 0..STEPS {
            let row = rows(model.forward_uncached(&plain, Logits::Last).unwrap());
            margins.push(margin(&row));
            plain.push(argmax(&row));
        }
        for dtype in [KvDType::F32, KvDType::F16] {
            let mut c = cache(&model, dtype);
            let seq = c.create_sequence();
            let mut row = rows(model.forward(&PROMPT, &mut c, seq, Logits::Last).unwrap());
            let mut cached = Vec::new();
            for _ in 0..STEPS {
                let next = argmax(&row);
                cached.push(next);
                row = rows(model.forward(&[next], &mut c, seq, Logits::Last).unwrap());
            }
            let want = &plain[PROMPT.len()..];
            match cached.iter().zip(want).position(|(a, b)| a != b) {
                None => {}
                // An f16 cache rounds K/V to 11 bits: it may flip a near tie, never more.
                Some(i) if dtype == KvDType::F16 && margins[i] < 0.02 => {}
                Some(i) => panic!(
                    "{name} {dtype}: greedy differs at step {i} (uncached top-1 margin {}): \
                     {cached:?} vs {want:?}",
                    margins[i]
                ),
            }
        }
        // Confident: the median step's top-1 leads by far more than rounding moves a logit,
        // and the continuation is not one token repeated.
        let mut sorted = margins.clone();
        sorted.sort_by(f32::total_cmp);
        let median = sorted[STEPS / 2];
        assert!(
            median > 0.5,
            "{name}: median top-1 margin {median} (flat model)"
        );
        let out = &plain[PROMPT.len()..];
        assert!(
            out.iter().any(|&t| t != out[0]),
            "{name}: degenerate {out:?}"
        );
    }
}
