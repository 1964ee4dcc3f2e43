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

/// The per-layer cache policy on the real file: a prompt longer than twice the window,
/// prefilled in chunks and decoded with the local layers' blocks freed as the window slides,
/// gives the tokens and logits of recomputing the whole text; the cache reports the bytes of
/// 3 global layers holding every token and 15 local layers holding the blocks from
/// position `len - 512` on, and less than an all-global cache would hold.
#[test]
#[ignore = "needs Gemma 3 270M: KV_GEMMA_PATH, release"]
fn sliding_layers_free_their_blocks_and_greedy_still_equals_recompute() {
    use kv_attention::PagedCache;
    use kv_core::StorageSpec;

    let (model, tokenizer) = model();
    let sentence = "The lighthouse keeper wrote the weather in his log every evening, and \
                    the ships that passed the point in the fog. ";
    let mut prompt = tokenizer.encode(&sentence.repeat(60)).unwrap();
    prompt.truncate(1100);
    assert!(prompt.len() > 2 * 512);
    let (bs, steps, chunk) = (16, 8, 256);
    let spec = StorageSpec::new(
        model.shape(),
        KvDType::F32,
        bs,
        (prompt.len() + steps).div_ceil(bs),
    )
    .unwrap();
    let mut cache = model
        .new_cache(CpuBackend::new(), spec, chunk, true)
        .unwrap();
    let sliding = cache.sliding_layers().unwrap().clone();
    assert_eq!((sliding.sliding_layers(), sliding.global_layers()), (15, 3));
    // floor((256 + 510) / 16) + 2 blocks, far below the 70 of the whole text.
    assert_eq!(sliding.num_blocks(), 49);
    let seq = cache.create_sequence();
    let mut logits = None;
    for part in prompt.chunks(chunk) {
        logits = Some(model.forward(part, &mut cache, seq, Logits::Last).unwrap());
    }
    // Chunks after the first two slid the window: blocks were freed during the prefill.
    let freed_in_prefill = cache.usage().sliding.unwrap().freed_blocks;
    assert!(freed_in_prefill > 0);
    let mut tokens = Vec::new();
    let mut step_logits = Vec::new();
    for _ in 0..steps {
        let row: Vec<f32> = logits
            .take()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = argmax(&row);
        step_logits.push(row);
        tokens.push(next);
        logits = Some(
            model
                .forward(&[next], &mut cache, seq, Logits::Last)
                .unwrap(),
        );
    }
    let mut all = prompt.clone();
    all.extend(&tokens[..steps - 1]);
    let reference: Vec<f32> = model
        .forward_uncached(&all, Logits::All)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let vocab = model.config().vocab_size;
    let mut worst = 0f32;
    for (step, row) in step_logits.iter().enumerate() {
        let want = &reference[(prompt.len() - 1 + step) * vocab..][..vocab];
        assert_eq!(tokens[step], argmax(want), "step {step}");
        worst = row
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(worst, f32::max);
    }
    assert!(worst < 1e-2, "logits differ by {worst}");

    // The bytes, by the formula: one layer's K and V of one token is 2 x 256 f32 = 2 KiB.
    let len = prompt.len() + steps;
    assert_eq!(cache.len(seq).unwrap(), len);
    let per_layer_block = 2 * 256 * 4 * bs as u64;
    let global_blocks = len.div_ceil(bs) as u64;
    let held = (len.div_ceil(bs) - (len - 512) / bs) as u64;
    assert_eq!(cache.sliding_len(seq).unwrap(), len - (len - 512) / bs * bs);
    let usage = cache.usage();
    let s = usage.sliding.unwrap();
    assert_eq!(s.bytes_reserved, 15 * held * per_layer_block);
    assert_eq!(
        usage.bytes_reserved,
        (3 * global_blocks + 15 * held) * per_layer_block
    );
    assert_eq!(s.bytes_all_global, 18 * global_blocks * per_layer_block);
    assert_eq!(s.bytes_saved, s.bytes_all_global - usage.bytes_reserved);
    assert_eq!(s.freed_blocks, global_blocks - held);
    eprintln!(
        "{} tokens: {} reserved, {} all global ({} blocks freed, {freed_in_prefill} in the \
         prefill); largest logit difference {worst:e}",
        len, usage.bytes_reserved, s.bytes_all_global, s.freed_blocks
    );

    // The same run in one group keeps everything.
    let plain = PagedCache::new(CpuBackend::new(), spec).unwrap();
    assert!(plain.sliding_layers().is_none());
}
