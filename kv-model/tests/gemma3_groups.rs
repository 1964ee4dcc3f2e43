//! `kv chat` and `kv batch` on the real Gemma 3 270M with its two cache groups: the 15
//! local layers free their blocks as their 512-token window slides, the 3 global layers keep
//! every token. Each must give what recomputing gives, and save what `kv generate` saves.
//!
//! Ignored by default; run in release with `KV_GEMMA_PATH` set
//! (`cargo test --release -p kv-model --test gemma3_groups -- --ignored`).
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kv_backend_cpu::CpuBackend;
use kv_core::{KvDType, StorageSpec};
use kv_model::{
    BatchOptions, CacheLayout, ChatMessage, ChatOptions, ChatSession, ChatTemplate,
    GenerateOptions, Model, SamplingConfig, StopReason, Tokenizer,
};

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

/// The file's chat template, else the built-in Gemma turn format (this GGUF has none).
fn template() -> &'static ChatTemplate {
    static BUILTIN: OnceLock<ChatTemplate> = OnceLock::new();
    let tokenizer = &model().1;
    tokenizer.chat_template().unwrap_or_else(|| {
        BUILTIN.get_or_init(|| {
            let (bos, eos) = tokenizer.special_texts();
            ChatTemplate::builtin("gemma", bos, eos).unwrap()
        })
    })
}

const LAYOUT: CacheLayout = CacheLayout {
    dtype: KvDType::F32,
    block_size: 16,
};

const MAX_TOKENS: usize = 12;

/// A first turn long enough (~700 tokens) that the window slides within the conversation.
fn turns() -> [String; 3] {
    let story = "The river runs past the old mill, and the miller counts the sacks of grain \
                 that the farmers bring in autumn. "
        .repeat(30);
    [
        format!("{story}\nIn one sentence: what does the miller do?"),
        "What season is it in the story?".into(),
        "Name one thing the farmers bring.".into(),
    ]
}

fn chat_options(tokenizer: &Tokenizer) -> ChatOptions {
    ChatOptions {
        max_tokens: MAX_TOKENS,
        sampling: SamplingConfig::greedy(),
        stop_tokens: tokenizer.stop_tokens().to_vec(),
        context_tokens: 4096,
        ..ChatOptions::default()
    }
}

/// Each turn's reply tokens when every turn is generated from an empty cache, with its
/// prompt length.
fn recomputed(turns: &[String]) -> Vec<(Vec<u32>, usize)> {
    let (model, tokenizer) = model();
    let template = template();
    let mut messages = Vec::new();
    let mut out = Vec::new();
    for user in turns {
        messages.push(ChatMessage::new("user", user.as_str()));
        let prompt = tokenizer
            .encode(&template.render_messages(&messages, true).unwrap())
            .unwrap();
        let options = GenerateOptions {
            max_tokens: MAX_TOKENS,
            stop_tokens: tokenizer.stop_tokens().to_vec(),
            ..GenerateOptions::default()
        };
        let run = model
            .generate(CpuBackend::new(), LAYOUT, &prompt, &options, |_| Ok(()))
            .unwrap();
        let text = match run.stop {
            StopReason::StopToken(_) => &run.tokens[..run.tokens.len() - 1],
            StopReason::MaxTokens => &run.tokens[..],
        };
        messages.push(ChatMessage::new(
            "assistant",
            tokenizer.decode(text).unwrap().as_str(),
        ));
        out.push((run.tokens, prompt.len()));
    }
    out
}

/// A three-turn chat keeps two cache groups: each turn equals recomputing it, reuses all
/// of the previous prompt, and the local layers hold less than every token. Saved after two
/// turns and resumed in a new session, the third turn is the same again.
#[test]
#[ignore = "needs Gemma 3 270M: KV_GEMMA_PATH, release"]
fn chat_with_window_layers_equals_recompute_and_resumes_identically() {
    let (model, tokenizer) = model();
    let template = template();
    let turns = turns();
    let expected = recomputed(&turns);
    let session = || {
        ChatSession::new(
            model,
            tokenizer,
            template,
            CpuBackend::new(),
            LAYOUT,
            chat_options(tokenizer),
        )
        .unwrap()
    };
    let mut chat = session();
    let mut saved = None;
    let dir = std::env::temp_dir().join(format!("kv-gemma-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("conversation.json");
    let fp = kv_model::model_fingerprint(&path(), model, tokenizer, LAYOUT, "cpu").unwrap();
    for (i, user) in turns.iter().enumerate() {
        let turn = chat.turn(user, |_| Ok(())).unwrap();
        let r = &turn.report;
        eprintln!("{r}");
        assert_eq!(turn.tokens, expected[i].0, "turn {}", i + 1);
        assert_eq!(r.prompt_tokens, expected[i].1);
        if i > 0 {
            assert!(
                r.reused_tokens >= expected[i - 1].1,
                "turn {}: reused {}",
                i + 1,
                r.reused_tokens
            );
        }
        let usage = chat.cache_usage();
        let sliding = usage.sliding.unwrap();
        eprintln!("{}", kv_model::window_saving(&usage).unwrap());
        assert!(sliding.freed_blocks > 0 && sliding.bytes_saved > 0);
        assert!(sliding.tokens < chat.cached_tokens().len());
        if i == 1 {
            saved = Some(chat.save(&file, fp).unwrap());
        }
    }
    let saved = saved.unwrap();

    let mut resumed = session();
    assert_eq!(resumed.resume(&file, fp).unwrap(), saved);
    let third = resumed.turn(&turns[2], |_| Ok(())).unwrap();
    eprintln!("resumed: {}", third.report);
    assert_eq!(third.tokens, expected[2].0);
    assert!(third.report.reused_tokens >= saved.tokens);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `kv batch`'s cache on Gemma 3: sequences sharing a prefix past the window and one of
/// their own, decoded together with the local layers' blocks freed, give each the tokens
/// it gives alone.
#[test]
#[ignore = "needs Gemma 3 270M: KV_GEMMA_PATH, release"]
fn batch_with_window_layers_equals_each_alone() {
    let (model, tokenizer) = model();
    let story = "The river runs past the old mill, and the miller counts the sacks of grain \
                 that the farmers bring in autumn. "
        .repeat(30);
    let prompts: Vec<Vec<u32>> = [
        format!("{story} Who counts the sacks?"),
        format!("{story} What runs past the mill?"),
        "The Eiffel Tower is located in the city of".to_string(),
    ]
    .iter()
    .map(|t| tokenizer.encode(t).unwrap())
    .collect();
    assert!(prompts[0].len() > 600);
    let options = BatchOptions {
        max_tokens: MAX_TOKENS,
        stop_tokens: Vec::new(),
        max_batch: 3,
    };
    let blocks: usize = prompts
        .iter()
        .map(|p| (p.len() + MAX_TOKENS).div_ceil(LAYOUT.block_size))
        .sum();
    let spec = StorageSpec::new(model.shape(), LAYOUT.dtype, LAYOUT.block_size, blocks).unwrap();
    let longest = prompts.iter().map(Vec::len).max().unwrap() + MAX_TOKENS;
    let mut cache = model
        .new_batch_cache(CpuBackend::new(), spec, longest, 3, 7)
        .unwrap();
    assert!(cache.sliding_layers().is_some());
    let run = model
        .generate_batch(&mut cache, &prompts, &options)
        .unwrap();
    eprintln!("{run}");
    for (i, prompt) in prompts.iter().enumerate() {
        let alone = model
            .generate(
                CpuBackend::new(),
                LAYOUT,
                prompt,
                &GenerateOptions {
                    max_tokens: MAX_TOKENS,
                    ..GenerateOptions::default()
                },
                |_| Ok(()),
            )
            .unwrap();
        assert_eq!(run.sequences[i].tokens, alone.tokens, "sequence {i}");
    }
    let window = run.window.unwrap().sliding.unwrap();
    assert!(window.freed_blocks > 0 && window.bytes_saved > 0);
}

/// The window layers' prefix reuse after their window slid, on the real model (numbers in
/// docs/measurements.md, "winprefix"): a follow-up prompt (the first sequence, prompt and
/// reply, then a new turn) in a second `kv batch` run on the same cache, and sequences
/// preempted under memory pressure and resumed. Prints what was reused and prefilled; the
/// follow-up's tokens must equal generating it alone.
#[test]
#[ignore = "needs Gemma 3 270M: KV_GEMMA_PATH, release"]
fn batch_reuses_what_was_decoded_after_the_window_slid() {
    let (model, tokenizer) = model();
    let template = template();
    let story = |i: usize| {
        let town = ["mill", "harbor", "market"][i % 3];
        let text = format!(
            "The {town} opens at dawn, and the keeper counts the carts of goods that the \
             farmers bring from the hills. "
        )
        .repeat(24);
        format!("{text} In one paragraph: what happens at the {town}?")
    };
    let encode = |user: &str| {
        let messages = vec![ChatMessage::new("user", user)];
        tokenizer
            .encode(&template.render_messages(&messages, true).unwrap())
            .unwrap()
    };
    let first = encode(&story(0));
    let options = BatchOptions {
        max_tokens: 96,
        stop_tokens: Vec::new(),
        max_batch: 1,
    };
    let spec = StorageSpec::new(model.shape(), LAYOUT.dtype, LAYOUT.block_size, 160).unwrap();
    let mut cache = model
        .new_batch_cache(CpuBackend::new(), spec, first.len() + 2 * 96 + 16, 1, 7)
        .unwrap();
    let run = model
        .generate_batch(&mut cache, std::slice::from_ref(&first), &options)
        .unwrap();
    let reply = &run.sequences[0].tokens;
    // The first sequence as written (prompt, then every reply token but the last), then
    // a new turn.
    let mut follow_up: Vec<u32> = first
        .iter()
        .chain(&reply[..reply.len() - 1])
        .copied()
        .collect();
    follow_up.extend(tokenizer.encode("\nAnd what happens after that?").unwrap());
    let again = model
        .generate_batch(&mut cache, std::slice::from_ref(&follow_up), &options)
        .unwrap();
    let s = &again.sequences[0];
    eprintln!(
        "MEASURE follow-up: first prompt {} + reply {}, follow-up {} tokens: reused {}, \
         prefilled {}",
        first.len(),
        reply.len(),
        s.prompt_tokens,
        s.reused_tokens,
        s.prefilled_tokens
    );
    let alone = model
        .generate(
            CpuBackend::new(),
            LAYOUT,
            &follow_up,
            &GenerateOptions {
                max_tokens: 96,
                ..GenerateOptions::default()
            },
            |_| Ok(()),
        )
        .unwrap();
    assert_eq!(s.tokens, alone.tokens);

    // Three prompts decoding together in a cache too small for all of them to finish: the
    // newest is preempted and resumed with what it decoded.
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| encode(&story(i))).collect();
    let longest = prompts.iter().map(Vec::len).max().unwrap() + 96;
    let need: usize = prompts.iter().map(|p| p.len().div_ceil(16)).sum();
    let spec = StorageSpec::new(model.shape(), LAYOUT.dtype, LAYOUT.block_size, need + 6).unwrap();
    let mut cache = model
        .new_batch_cache(CpuBackend::new(), spec, longest, 3, 9)
        .unwrap();
    let options = BatchOptions {
        max_batch: 3,
        ..options
    };
    let run = model
        .generate_batch(&mut cache, &prompts, &options)
        .unwrap();
    eprintln!("{run}");
    let prefilled: usize = run.sequences.iter().map(|s| s.prefilled_tokens).sum();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    eprintln!(
        "MEASURE preemption: {} preemptions, prompts {prompt_tokens} tokens, prefilled {prefilled}",
        run.preemptions()
    );
    assert_eq!(cache.manager().audit(), Ok(()));
    assert_eq!(
        cache.sliding_manager().map(kv_core::CacheManager::audit),
        Some(Ok(()))
    );
}
