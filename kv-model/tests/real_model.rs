//! Tests on the real SmolLM2-135M-Instruct model (`kv_model::default_model_path()`).
//!
//! They are ignored by default so that `cargo test` stays fast and needs no download;
//! `cargo xtask test-all` fetches the model and runs them in release mode with
//! `cargo test --release -p kv-model -- --ignored`.
//!
//! What they hold (the invariants of DESIGN.md for the model):
//! - greedy tokens with a cache (f32 and f16) equal those without one;
//! - at every step the cached logits match a full recompute within a stated tolerance;
//! - the bytes the cache reports equal `kv_core::memory::cache_bytes`;
//! - block sizes 1, 16 and 256 give the tokens of one contiguous block holding everything;
//! - user errors that need the model (prompt longer than the context) are one-line
//!   messages and a non-zero exit.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::OnceLock;

use candle_core::Tensor;
use kv_backend_cpu::CpuBackend;
use kv_core::{memory, KvDType};
use kv_model::{
    CacheLayout, CacheReport, GenerateOptions, Generation, Logits, Model, StopReason, Tokenizer,
};

/// Three prompts of different kinds, each answered with a long reply.
const PROMPTS: [&str; 3] = [
    "What is the capital of France? Tell me about its history.",
    "Write a short poem about the sea.",
    "Explain step by step how to compute 17 * 24.",
];

/// Tokens generated per run. No stop tokens, so every run is exactly this long.
const TOKENS: usize = 64;

/// Largest |cached - recomputed| logit over the vocabulary at any step, f32 cache.
///
/// The model runs with the default `WeightFormat` (GGUF blocks, exact f32 activations), so
/// the two paths differ only in f32 rounding order: attention (the backend's paged online
/// softmax against candle's dense softmax) and the weight kernel (one-row matrix-vector
/// against the many-row GEMM). Logits are O(10); observed differences are about 1e-4.
const F32_LOGIT_TOLERANCE: f32 = 1e-3;

/// The same for an f16 cache: K and V rounded to 11 significant bits add a relative error
/// of up to 2^-11 to every cached element; observed differences are about 2e-2.
const F16_LOGIT_TOLERANCE: f32 = 0.1;

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

fn chat_prompt(text: &str) -> Vec<u32> {
    let (_, tokenizer) = model();
    let template = tokenizer.chat_template().unwrap();
    tokenizer.encode(&template.render(text).unwrap()).unwrap()
}

fn greedy(keep_logits: bool) -> GenerateOptions {
    GenerateOptions {
        max_tokens: TOKENS,
        keep_logits,
        ..GenerateOptions::default()
    }
}

fn cached(prompt: &[u32], dtype: KvDType, block_size: usize, keep_logits: bool) -> Generation {
    let (model, _) = model();
    let layout = CacheLayout { dtype, block_size };
    let run = model
        .generate(
            CpuBackend::new(),
            layout,
            prompt,
            &greedy(keep_logits),
            |_| Ok(()),
        )
        .unwrap();
    assert_eq!(run.tokens.len(), TOKENS);
    assert_eq!(run.stop, StopReason::MaxTokens);
    run
}

fn tolerance(dtype: KvDType) -> f32 {
    match dtype {
        KvDType::F32 => F32_LOGIT_TOLERANCE,
        _ => F16_LOGIT_TOLERANCE,
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Checks a cached greedy run against a recompute without a cache, by teacher forcing.
///
/// One uncached forward pass over `prompt + tokens[..n-1]` with logits for every row gives,
/// at row `prompt.len() - 1 + i`, exactly what a no-cache generation computes at step `i`:
/// attention is causal, so a row never sees the tokens after it, and the weights act on
/// each row alone. If the argmax of every such row is the token the cached run chose, then
/// a step-by-step no-cache greedy run, fed the same prefixes, chooses the same tokens (by
/// induction over the steps). This costs one pass instead of 64 growing ones.
///
/// Also checks the cached logits of every step against those rows.
fn check_against_teacher_forcing(prompt: &[u32], run: &Generation, dtype: KvDType) {
    let (model, _) = model();
    let mut sequence = prompt.to_vec();
    sequence.extend_from_slice(&run.tokens[..run.tokens.len() - 1]);
    let all: Tensor = model.forward_uncached(&sequence, Logits::All).unwrap();
    let rows: Vec<Vec<f32>> = all.to_vec2().unwrap();
    assert_eq!(rows.len(), sequence.len());
    for (step, token) in run.tokens.iter().enumerate() {
        let row = &rows[prompt.len() - 1 + step];
        assert_eq!(
            argmax(row),
            *token,
            "{dtype} cache, step {step}: the recompute's greedy token differs"
        );
        let diff = max_abs_diff(&run.logits[step], row);
        assert!(
            diff <= tolerance(dtype),
            "{dtype} cache, step {step}: logits differ by {diff} > {}",
            tolerance(dtype)
        );
    }
}

#[test]
#[ignore = "needs the model: run via cargo xtask test-all (release)"]
fn cached_greedy_equals_step_by_step_recompute() {
    let (model, tokenizer) = model();
    // The slow path, for real: every step recomputes the whole sequence, so its cost grows
    // with the square of the length. A short system prompt keeps the prompt short (and
    // the test quick); the other tests use the template's default one.
    let template = tokenizer.chat_template().unwrap();
    let prompt = tokenizer
        .encode(
            &template
                .render_with_system(Some("Be brief."), PROMPTS[0])
                .unwrap(),
        )
        .unwrap();
    let reference = model
        .generate_uncached(&prompt, &greedy(true), |_| Ok(()))
        .unwrap();
    assert_eq!(reference.tokens.len(), TOKENS);
    assert_eq!(reference.summary.cache, CacheReport::None);
    assert_eq!(reference.summary.decode_steps, TOKENS - 1);

    for dtype in [KvDType::F32, KvDType::F16] {
        let run = cached(&prompt, dtype, 16, true);
        assert_eq!(
            run.tokens,
            reference.tokens,
            "{dtype} cache changed the tokens: {:?} vs {:?}",
            tokenizer.decode(&run.tokens),
            tokenizer.decode(&reference.tokens)
        );
        let mut worst = 0f32;
        for (step, (c, r)) in run.logits.iter().zip(&reference.logits).enumerate() {
            let diff = max_abs_diff(c, r);
            assert!(
                diff <= tolerance(dtype),
                "{dtype} cache, step {step}: logits differ by {diff} > {}",
                tolerance(dtype)
            );
            worst = worst.max(diff);
        }
        eprintln!("{dtype} cache: largest logit difference over {TOKENS} steps {worst:e}");
    }
}

#[test]
#[ignore = "needs the model: run via cargo xtask test-all (release)"]
fn cached_greedy_equals_recompute_on_more_prompts() {
    for text in &PROMPTS[1..] {
        let prompt = chat_prompt(text);
        let f32_run = cached(&prompt, KvDType::F32, 16, true);
        check_against_teacher_forcing(&prompt, &f32_run, KvDType::F32);
        let f16_run = cached(&prompt, KvDType::F16, 16, true);
        check_against_teacher_forcing(&prompt, &f16_run, KvDType::F16);
        assert_eq!(f16_run.tokens, f32_run.tokens, "prompt {text:?}");
    }
}

#[test]
#[ignore = "needs the model: run via cargo xtask test-all (release)"]
fn reported_cache_bytes_equal_the_formula() {
    let (model, _) = model();
    let prompt = chat_prompt(PROMPTS[1]);
    for (dtype, per_token) in [(KvDType::F32, 46_080), (KvDType::F16, 23_040)] {
        let run = cached(&prompt, dtype, 16, false);
        let CacheReport::Paged { usage, layout, .. } = &run.summary.cache else {
            panic!("a cached run reports its cache");
        };
        assert_eq!(layout.dtype, dtype);
        // The last token is sampled but never run through the model, so never cached.
        let tokens = prompt.len() + TOKENS - 1;
        assert_eq!(usage.tokens, tokens);
        assert_eq!(usage.bytes_per_token, per_token);
        assert_eq!(
            usage.bytes_used,
            memory::cache_bytes(&model.shape(), dtype, tokens).unwrap()
        );
        assert_eq!(run.summary.cache_bytes_in_use(), usage.bytes_used);
        assert_eq!(
            usage.bytes_reserved,
            memory::cache_bytes(&model.shape(), dtype, tokens.div_ceil(16) * 16).unwrap()
        );
        // Sized for prompt + max tokens, rounded up to whole blocks.
        let capacity = (prompt.len() + TOKENS).div_ceil(16) * 16;
        assert_eq!(
            usage.bytes_allocated,
            memory::cache_bytes(&model.shape(), dtype, capacity).unwrap()
        );
    }
}

#[test]
#[ignore = "needs the model: run via cargo xtask test-all (release)"]
fn block_sizes_do_not_change_the_tokens() {
    let prompt = chat_prompt(PROMPTS[2]);
    let whole = prompt.len() + TOKENS; // one contiguous block holds the whole sequence
    let contiguous = cached(&prompt, KvDType::F32, whole, false).tokens;
    for bs in [1, 16, 256] {
        let tokens = cached(&prompt, KvDType::F32, bs, false).tokens;
        assert_eq!(
            tokens, contiguous,
            "block size {bs} differs from one contiguous block"
        );
    }
}

#[test]
#[ignore = "needs the model: run via cargo xtask test-all (release)"]
fn tokenizer_round_trips_and_keeps_special_tokens_whole() {
    let (_, tokenizer) = model();
    for text in [
        "Hello, world!",
        "  leading spaces and\ttabs\nand new lines\n\n",
        "Numbers 12345 and 3.14159, dates 2024-06-01.",
        "Unicode: café, naïve, Ελληνικά, 日本語, emoji 🦀🚀",
        "fn main() { println!(\"{}\", 1 + 2); }",
    ] {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
        // Streaming yields the same text, however the characters split over tokens.
        let mut stream = tokenizer.stream();
        let mut streamed = String::new();
        for &id in &ids {
            streamed.extend(stream.push(id).unwrap());
        }
        streamed.extend(stream.finish().unwrap());
        assert_eq!(streamed, text);
    }
    // SmolLM splits numbers into single digits.
    assert_eq!(tokenizer.encode("12345").unwrap().len(), 5);

    let im_start = tokenizer.token_to_id("<|im_start|>").unwrap();
    let im_end = tokenizer.token_to_id("<|im_end|>").unwrap();
    assert_eq!((im_start, im_end), (1, 2));
    assert!(tokenizer.stop_tokens().contains(&im_end));
    assert!(tokenizer.stop_tokens().contains(&0)); // <|endoftext|>
    let template = tokenizer.chat_template().unwrap();
    let text = template.render("Hi").unwrap();
    // The file's own Jinja template renders the single ChatML turn kv always sent.
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tokenizer.encode(&text).unwrap();
    assert_eq!(ids[0], im_start);
    assert_eq!(ids.iter().filter(|&&i| i == im_start).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == im_end).count(), 2);
    // No BOS is added (add_bos_token is false) and control tokens never print.
    assert_eq!(tokenizer.decode(&ids).unwrap().matches("<|").count(), 0);
}

#[test]
#[ignore = "needs the model: run via cargo xtask test-all (release)"]
fn stop_tokens_end_generation() {
    let (model, tokenizer) = model();
    let prompt = chat_prompt("Say hello.");
    let options = GenerateOptions {
        max_tokens: 200,
        stop_tokens: tokenizer.stop_tokens().to_vec(),
        ..GenerateOptions::default()
    };
    let mut seen = Vec::new();
    let run = model
        .generate(
            CpuBackend::new(),
            CacheLayout::default(),
            &prompt,
            &options,
            |t| {
                seen.push(t);
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(seen, run.tokens, "the callback sees every token, in order");
    let StopReason::StopToken(stop) = run.stop else {
        panic!("a greeting should end before 200 tokens: {:?}", run.tokens);
    };
    assert_eq!(run.tokens.last(), Some(&stop));
    assert!(tokenizer.stop_tokens().contains(&stop));
}

#[test]
#[ignore = "needs the model: run via cargo xtask test-all (release)"]
fn seeded_sampling_is_reproducible() {
    let (model, _) = model();
    let prompt = chat_prompt(PROMPTS[1]);
    let options = |seed| GenerateOptions {
        max_tokens: 24,
        sampling: kv_model::SamplingConfig {
            temperature: 0.9,
            top_k: Some(50),
            top_p: Some(0.95),
            seed,
        },
        ..GenerateOptions::default()
    };
    let run = |seed| {
        model
            .generate(
                CpuBackend::new(),
                CacheLayout::default(),
                &prompt,
                &options(seed),
                |_| Ok(()),
            )
            .unwrap()
            .tokens
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
#[ignore = "needs the model: run via cargo xtask test-all (release)"]
fn context_overflow_is_a_typed_error_and_a_one_line_message() {
    let (model, _) = model();
    let context = model.config().context_length;
    let too_long = vec![28u32; context + 1];
    let err = model
        .generate(
            CpuBackend::new(),
            CacheLayout::default(),
            &too_long,
            &greedy(false),
            |_| Ok(()),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            kv_model::ModelError::ContextOverflow { what: "prompt", .. }
        ),
        "{err}"
    );
    let fits_alone = vec![28u32; context - 10];
    let err = model
        .generate_uncached(&fits_alone, &greedy(false), |_| Ok(()))
        .unwrap_err();
    assert!(
        matches!(
            err,
            kv_model::ModelError::ContextOverflow {
                what: "prompt plus max tokens",
                ..
            }
        ),
        "{err}"
    );

    // Through the command line: "hello " is one token, so this is past 8192 tokens.
    let prompt = "hello ".repeat(context + 100);
    let out = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args([
            "generate",
            "--raw",
            "--max-tokens",
            "4",
            "--prompt",
            &prompt,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("context"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
#[ignore = "needs the model: run via cargo xtask test-all (release)"]
fn cli_generates_and_summarises() {
    // The text alone on stdout, the summary on stderr; the prompt may come from stdin.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args([
            "generate",
            "--max-tokens",
            "12",
            "--dtype",
            "f32",
            "--threads",
            "2",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"What is the capital of France?\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let summary = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{summary}");
    assert!(
        text.split_whitespace().count() >= 3,
        "too little text: {text:?}"
    );
    assert!(!text.contains("tokens/s"), "statistics on stdout: {text:?}");
    assert!(
        summary.contains("cpu, f32, paged in blocks of 16 tokens"),
        "{summary}"
    );
    for field in [
        "prompt tokens",
        "generated tokens",
        "tokens/s",
        "per token",
        "f32",
    ] {
        assert!(summary.contains(field), "no {field:?} in {summary}");
    }
}
