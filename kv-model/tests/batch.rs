//! Many sequences on the real SmolLM2-135M-Instruct model: forks, prefix hits, batched
//! decoding and preemption must all give the greedy tokens of a plain, one-sequence run.
//!
//! Ignored by default like the other real-model tests; run with
//! `cargo test --release -p kv-model --test batch -- --ignored`. Caches are f32 and there
//! are no stop tokens, so every run is exactly `TOKENS` long and comparisons are exact.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;

use kv_attention::PagedCache;
use kv_backend_cpu::CpuBackend;
use kv_core::{KvDType, SeqId, StorageSpec};
use kv_model::{BatchOptions, CacheLayout, GenerateOptions, Logits, Model, Sampler, Tokenizer};

/// Tokens generated per sequence.
const TOKENS: usize = 20;

/// A long shared preamble, as a system prompt would be.
const SHARED: &str = "You are a careful assistant for a small museum of maritime history. \
    Visitors ask about ships, harbours, navigation and the lives of sailors. Answer in two \
    or three plain sentences, avoid jargon, and say so when you are not sure.";

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

fn chat(text: &str) -> Vec<u32> {
    let (_, tokenizer) = model();
    let template = tokenizer.chat_template().unwrap();
    tokenizer.encode(&template.render(text).unwrap()).unwrap()
}

/// Greedy tokens of `prompt` alone, from the single-sequence path with its own cache.
fn alone(prompt: &[u32]) -> Vec<u32> {
    let (model, _) = model();
    let layout = CacheLayout {
        dtype: KvDType::F32,
        block_size: 16,
    };
    let options = GenerateOptions {
        max_tokens: TOKENS,
        ..GenerateOptions::default()
    };
    model
        .generate(CpuBackend::new(), layout, prompt, &options, |_| Ok(()))
        .unwrap()
        .tokens
}

fn prefix_cache(block_size: usize, blocks: usize) -> PagedCache<CpuBackend> {
    let (model, _) = model();
    let spec = StorageSpec::new(model.shape(), KvDType::F32, block_size, blocks).unwrap();
    PagedCache::with_prefix_cache(CpuBackend::new(), spec, 7).unwrap()
}

/// Runs `input` through `seq`, commits it and returns the greedy next token.
fn step(cache: &mut PagedCache<CpuBackend>, seq: SeqId, input: &[u32]) -> u32 {
    let (model, _) = model();
    let logits = model
        .forward_batch(&[(seq, input)], cache, Logits::Last)
        .unwrap();
    cache.commit(seq, input).unwrap();
    let row: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
    Sampler::new(kv_model::SamplingConfig::greedy())
        .unwrap()
        .sample(&row)
        .unwrap()
}

/// Decodes from `first` (sampled, not yet in the cache) until `TOKENS` tokens.
fn decode(cache: &mut PagedCache<CpuBackend>, seq: SeqId, first: u32) -> Vec<u32> {
    let mut tokens = vec![first];
    while tokens.len() < TOKENS {
        let next = step(cache, seq, &[*tokens.last().unwrap()]);
        tokens.push(next);
    }
    tokens
}

#[test]
#[ignore = "needs the model file; run with --ignored in release"]
fn fork_prefix_hit_and_recompute_give_the_same_tokens() {
    let a_prompt = chat(&format!("{SHARED} Who built the first lighthouse?"));
    let b_prompt = chat(&format!("{SHARED} What did sailors eat on long voyages?"));
    let shared = a_prompt
        .iter()
        .zip(&b_prompt)
        .take_while(|(x, y)| x == y)
        .count();
    assert!(shared >= 48, "the prompts share only {shared} tokens");

    let mut cache = prefix_cache(16, 64);
    let (a, reused) = cache.create_with_prefix(&a_prompt);
    assert_eq!(reused, 0, "nothing is cached yet");
    let first = step(&mut cache, a, &a_prompt);
    // The fork shares every block of `a`, the partly filled last one included; whichever
    // writes first copies it.
    let c = cache.fork(a).unwrap();
    let a_tokens = decode(&mut cache, a, first);
    let c_tokens = decode(&mut cache, c, first);
    let want_a = alone(&a_prompt);
    assert_eq!(a_tokens, want_a, "the prefilled sequence");
    assert_eq!(c_tokens, want_a, "the fork");
    cache.free(a).unwrap();
    cache.free(c).unwrap();

    let (b, reused) = cache.create_with_prefix(&b_prompt);
    assert_eq!(reused, shared / 16 * 16, "whole shared blocks are reused");
    assert!(reused >= 48);
    let first = step(&mut cache, b, &b_prompt[reused..]);
    assert_eq!(
        decode(&mut cache, b, first),
        alone(&b_prompt),
        "the prefix hit"
    );
    assert_eq!(cache.stats().prefix_hit_tokens, reused as u64);
    cache.free(b).unwrap();
    assert_eq!(cache.manager().audit(), Ok(()));
}

fn three_prompts() -> Vec<Vec<u32>> {
    [
        "What is the capital of France?",
        "Write a short poem about the sea and the wind over it at night.",
        "Explain how to compute 17 * 24.",
    ]
    .iter()
    .map(|p| chat(p))
    .collect()
}

fn options() -> BatchOptions {
    BatchOptions {
        max_tokens: TOKENS,
        ..BatchOptions::default()
    }
}

#[test]
#[ignore = "needs the model file; run with --ignored in release"]
fn batched_generation_matches_each_prompt_alone() {
    let (model, _) = model();
    let prompts = three_prompts();
    let mut cache = prefix_cache(16, 64);
    let run = model
        .generate_batch(&mut cache, &prompts, &options())
        .unwrap();
    assert_eq!(run.peak_batch, 3, "all three decoded in one pass");
    assert_eq!(run.preemptions(), 0);
    for (i, (prompt, seq)) in prompts.iter().zip(&run.sequences).enumerate() {
        assert_eq!(seq.tokens, alone(prompt), "prompt {i}");
    }
    // The chat template's preamble is shared: later prompts hit the prefix cache.
    assert!(run.reused_tokens() > 0);
    assert_eq!(run.stats.used_blocks, 0, "every sequence was freed");
    assert_eq!(cache.manager().audit(), Ok(()));
}

/// 64 sequences in one batch: the projections run the panel GEMM rather than the
/// one-sequence matrix-vector kernel, so the sums differ from a sequence run alone in
/// order only; the greedy tokens must still be the same.
#[test]
#[ignore = "needs the model file; run with --ignored in release"]
fn sixty_four_sequences_match_each_prompt_alone() {
    let (model, _) = model();
    let topics = [
        "ships",
        "harbours",
        "compasses",
        "knots",
        "lighthouses",
        "tides",
        "sails",
        "anchors",
    ];
    let prompts: Vec<Vec<u32>> = (0..64)
        .map(|i| {
            chat(&format!(
                "{SHARED} Question {i}: tell me one fact about {}.",
                topics[i % topics.len()]
            ))
        })
        .collect();
    let mut cache = prefix_cache(16, 64 * 8 + 16);
    let options = BatchOptions {
        max_tokens: TOKENS,
        max_batch: 64,
        ..BatchOptions::default()
    };
    let run = model
        .generate_batch(&mut cache, &prompts, &options)
        .unwrap();
    assert_eq!(run.peak_batch, 64, "all 64 decoded in one pass");
    assert_eq!(run.preemptions(), 0);
    for (i, (prompt, seq)) in prompts.iter().zip(&run.sequences).enumerate() {
        assert_eq!(seq.tokens, alone(prompt), "prompt {i}");
    }
    assert_eq!(cache.manager().audit(), Ok(()));
}

#[test]
#[ignore = "needs the model file; run with --ignored in release"]
fn a_small_cache_preempts_and_gives_the_same_tokens() {
    let (model, _) = model();
    let prompts = three_prompts();
    let bs = 4;
    let mut roomy = prefix_cache(bs, 256);
    let want = model
        .generate_batch(&mut roomy, &prompts, &options())
        .unwrap();
    assert_eq!(want.preemptions(), 0);

    // Two prompts fit at admission, but not once both have generated their tokens.
    let mut lens: Vec<usize> = prompts.iter().map(|p| p.len().div_ceil(bs)).collect();
    lens.sort_unstable();
    let blocks = lens[1] + lens[2] + 2;
    let largest = prompts
        .iter()
        // The last token is sampled but never written: a sequence holds prompt + TOKENS - 1.
        .map(|p| (p.len() + TOKENS - 1).div_ceil(bs))
        .max()
        .unwrap();
    assert!(blocks >= largest && blocks < lens[1] + lens[2] + 2 * TOKENS / bs);
    let mut small = prefix_cache(bs, blocks);
    let got = model
        .generate_batch(&mut small, &prompts, &options())
        .unwrap();
    assert!(got.preemptions() > 0, "the small cache never filled");
    for (i, (g, w)) in got.sequences.iter().zip(&want.sequences).enumerate() {
        assert_eq!(g.tokens, w.tokens, "prompt {i}");
    }
    assert!(got.peak_used_blocks <= blocks);
    assert_eq!(small.manager().audit(), Ok(()));

    // Too small for even one sequence: a typed error, and nothing left allocated.
    let mut tiny = prefix_cache(bs, largest - 1);
    let err = model
        .generate_batch(&mut tiny, &prompts, &options())
        .unwrap_err();
    assert!(
        matches!(
            err,
            kv_model::ModelError::Cache(kv_core::KvError::CacheFull { .. })
        ),
        "{err}"
    );
    assert_eq!(tiny.stats().used_blocks, 0);
    assert_eq!(tiny.manager().audit(), Ok(()));
}

#[test]
#[ignore = "needs the model file; run with --ignored in release"]
fn bad_batches_are_refused() {
    let (model, _) = model();
    let mut cache = prefix_cache(16, 8);
    let zero = BatchOptions {
        max_batch: 0,
        ..options()
    };
    assert!(model.generate_batch(&mut cache, &[vec![1]], &zero).is_err());
    assert!(model
        .generate_batch(&mut cache, &[vec![]], &options())
        .is_err());
    let seq = cache.create_sequence();
    assert!(model
        .forward_batch(
            &[(seq, &[1][..]), (seq, &[2][..])],
            &mut cache,
            Logits::Last
        )
        .is_err());
    assert!(model.forward_batch(&[], &mut cache, Logits::Last).is_err());
    assert_eq!(cache.len(seq).unwrap(), 0);
}

fn kv(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
#[ignore = "needs the model file; run with --ignored in release"]
fn cli_batch_compares_with_sequential() {
    let dir = std::env::temp_dir().join(format!("kv-batch-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prompts.txt");
    std::fs::write(&file, "What is 2 + 2?\n\nName a colour.\n").unwrap();
    let out = kv(&[
        "batch",
        "--prompts",
        file.to_str().unwrap(),
        "--max-tokens",
        "8",
        "--dtype",
        "f32",
        "--compare",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[1] Name a colour."), "{stdout}");
    assert!(stdout.contains("aggregate"), "{stdout}");
    assert!(stdout.contains("greedy tokens identical"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "needs the model file; run with --ignored in release"]
fn cli_batch_sizes_its_cache_by_memory() {
    let dir = std::env::temp_dir().join(format!("kv-batch-mib-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prompts.txt");
    std::fs::write(&file, "What is 2 + 2?\nName a colour.\n").unwrap();
    let run = |mib: &str| {
        kv(&[
            "batch",
            "--prompts",
            file.to_str().unwrap(),
            "--max-tokens",
            "8",
            "--dtype",
            "f32",
            "--cache-mib",
            mib,
        ])
    };
    // SmolLM2 in f32: 46,080 bytes a token, 720 KiB a 16-token block: 3 MiB hold 4 blocks,
    // fewer than both prompts at once need, so the batch preempts but finishes.
    let out = run("3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("4 total of 16 tokens"), "{stdout}");
    // No room for one block: a typed error naming the budget.
    let out = run("0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("memory budget"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_batch_refuses_an_empty_prompts_file_in_one_line() {
    let file = std::env::temp_dir().join(format!("kv-batch-empty-{}.txt", std::process::id()));
    std::fs::write(&file, "\n  \n").unwrap();
    let out = kv(&["batch", "--prompts", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("empty"), "{stderr}");
}
