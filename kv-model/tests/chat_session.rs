//! `kv chat` on the real SmolLM2-135M-Instruct model (ignored: run in release with the
//! model present, as `cargo xtask test-all` does).
//!
//! A three-turn session read from standard input must reuse the earlier turns' cache
//! (everything of the previous prompt is reused, only the new tokens are prefilled) and
//! give, with greedy sampling, the replies that recomputing each turn from scratch gives;
//! after a reset, a conversation repeating the first question reuses all of its prompt.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use kv_backend_cpu::CpuBackend;
use kv_model::{
    CacheLayout, ChatMessage, ChatOptions, ChatSession, GenerateOptions, SamplingConfig, StopReason,
};

const TURNS: [&str; 3] = [
    "What is the capital of France?",
    "What is it famous for?",
    "Name one river that flows through it.",
];

const MAX_TOKENS: usize = 48;

/// `[turn N] reused R, prefilled P, generated G tokens ...` -> (R, P, G).
fn parse_report(line: &str) -> Option<(usize, usize, usize)> {
    let rest = line.split_once("] reused ")?.1;
    let (reused, rest) = rest.split_once(", prefilled ")?;
    let (prefilled, rest) = rest.split_once(", generated ")?;
    let generated = rest.split_once(' ')?.0;
    Some((
        reused.parse().ok()?,
        prefilled.parse().ok()?,
        generated.parse().ok()?,
    ))
}

#[test]
#[ignore = "needs the real model (cargo xtask fetch-model); run in release"]
fn three_turn_stdin_session_reuses_earlier_turns_and_equals_recomputing() {
    let path = kv_model::default_model_path();
    let (model, tokenizer) = kv_model::load(&path).unwrap();
    let template = tokenizer.chat_template().unwrap();
    let stop_tokens = tokenizer.stop_tokens().to_vec();

    // The oracle: each turn rendered and generated from an empty cache, the conversation
    // carrying the oracle's own replies.
    let mut messages: Vec<ChatMessage> = Vec::new();
    let mut expected = Vec::new();
    let mut prompt_lens = Vec::new();
    for user in TURNS {
        messages.push(ChatMessage::new("user", user));
        let prompt = tokenizer
            .encode(&template.render_messages(&messages, true).unwrap())
            .unwrap();
        let options = GenerateOptions {
            max_tokens: MAX_TOKENS,
            stop_tokens: stop_tokens.clone(),
            ..GenerateOptions::default()
        };
        let run = model
            .generate(
                CpuBackend::new(),
                CacheLayout::default(),
                &prompt,
                &options,
                |_| Ok(()),
            )
            .unwrap();
        let text_tokens = match run.stop {
            StopReason::StopToken(_) => &run.tokens[..run.tokens.len() - 1],
            StopReason::MaxTokens => &run.tokens[..],
        };
        let reply = tokenizer.decode(text_tokens).unwrap();
        messages.push(ChatMessage::new("assistant", reply.as_str()));
        prompt_lens.push(prompt.len());
        expected.push((reply, run.tokens));
    }

    // The library session: same replies, same tokens, and the reuse it reports.
    let options = ChatOptions {
        max_tokens: MAX_TOKENS,
        sampling: SamplingConfig::greedy(),
        stop_tokens: stop_tokens.clone(),
        ..ChatOptions::default()
    };
    let mut session = ChatSession::new(
        &model,
        &tokenizer,
        template,
        CpuBackend::new(),
        CacheLayout::default(),
        options,
    )
    .unwrap();
    for (i, user) in TURNS.iter().enumerate() {
        let turn = session.turn(user, |_| Ok(())).unwrap();
        assert_eq!(turn.reply, expected[i].0, "turn {}", i + 1);
        assert_eq!(turn.tokens, expected[i].1, "turn {}", i + 1);
        let r = &turn.report;
        assert_eq!(r.prompt_tokens, prompt_lens[i]);
        assert_eq!(r.reused_tokens + r.prefilled_tokens, r.prompt_tokens);
        if i == 0 {
            assert_eq!(r.reused_tokens, 0);
        } else {
            // Everything of the previous prompt stays cached; only the reply's last token,
            // the template's closing of it and the new user turn are prefilled.
            assert!(
                r.reused_tokens >= prompt_lens[i - 1],
                "turn {}: reused {} of a previous prompt of {}",
                i + 1,
                r.reused_tokens,
                prompt_lens[i - 1]
            );
        }
    }
    assert_eq!(session.messages().len(), 2 * TURNS.len());

    // A new conversation in the same session asking the first question again: its prompt
    // is a prefix of what the cache holds, so all of it but the last token is reused, and
    // the reply is the first one.
    session.reset();
    assert!(session.messages().is_empty());
    let again = session.turn(TURNS[0], |_| Ok(())).unwrap();
    assert_eq!(again.report.turn, 1);
    assert_eq!(again.report.reused_tokens, prompt_lens[0] - 1);
    assert_eq!(again.report.prefilled_tokens, 1);
    assert_eq!(again.tokens, expected[0].1);

    // The binary, turns on standard input (not a terminal): replies on stdout, one line
    // each; per-turn reports on stderr.
    let mut child = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["chat", "--max-tokens", &MAX_TOKENS.to_string()])
        .arg("--model")
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("{}\n\n{}\n{}\n", TURNS[0], TURNS[1], TURNS[2]);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kv chat failed: {stderr}");
    let want: String = expected.iter().map(|(r, _)| format!("{r}\n")).collect();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    let reports: Vec<(usize, usize, usize)> = stderr.lines().filter_map(parse_report).collect();
    assert_eq!(reports.len(), 3, "{stderr}");
    for (i, &(reused, prefilled, generated)) in reports.iter().enumerate() {
        assert_eq!(reused + prefilled, prompt_lens[i], "{stderr}");
        assert_eq!(generated, expected[i].1.len(), "{stderr}");
        if i > 0 {
            assert!(reused >= prompt_lens[i - 1], "{stderr}");
        }
    }
}

#[test]
fn report_lines_parse() {
    assert_eq!(
        parse_report("[turn 2] reused 41, prefilled 18, generated 25 tokens in 0.412 s"),
        Some((41, 18, 25))
    );
    assert_eq!(parse_report("error: something"), None);
}

#[test]
fn bad_chat_options_fail_before_the_model_loads() {
    for (flags, needle) in [
        (&["--max-tokens", "0"][..], "--max-tokens"),
        (&["--context", "0"][..], "--context"),
        (&["--block-size", "0"][..], "--block-size"),
        (&["--temperature", "-1"][..], "temperature"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kv"))
            .arg("chat")
            .args(flags)
            .args(["--model", "/nonexistent/model.gguf"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} succeeded");
        assert!(stderr.contains(needle), "{flags:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flags:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
#[ignore = "needs the real model (cargo xtask fetch-model); run in release"]
fn a_saved_conversation_resumes_with_its_cache_and_the_same_replies() {
    use kv_attention::cache_file::CacheFileError;
    use kv_core::KvDType;
    use kv_model::ModelError;

    let path = kv_model::default_model_path();
    let (model, tokenizer) = kv_model::load(&path).unwrap();
    let template = tokenizer.chat_template().unwrap();
    let layout = CacheLayout::default();
    let fp = kv_model::model_fingerprint(&path, &model, &tokenizer, layout, "cpu").unwrap();
    let options = ChatOptions {
        max_tokens: MAX_TOKENS,
        sampling: SamplingConfig::greedy(),
        stop_tokens: tokenizer.stop_tokens().to_vec(),
        ..ChatOptions::default()
    };
    let session = |layout: CacheLayout| {
        ChatSession::new(
            &model,
            &tokenizer,
            template,
            CpuBackend::new(),
            layout,
            options.clone(),
        )
        .unwrap()
    };
    // The oracle: three turns without a stop.
    let mut straight = session(layout);
    let replies: Vec<Vec<u32>> = TURNS
        .iter()
        .map(|t| straight.turn(t, |_| Ok(())).unwrap().tokens)
        .collect();

    let dir = std::env::temp_dir().join(format!("kv-chat-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("conversation.json");
    let mut first = session(layout);
    for t in &TURNS[..2] {
        first.turn(t, |_| Ok(())).unwrap();
    }
    let saved = first.save(&file, fp).unwrap();
    assert_eq!(saved.messages, 4);
    assert!(saved.tokens > 0 && saved.tokens <= first.cached_tokens().len());
    drop(first);

    // Another session (as another process would) resumes: the third turn prefills only
    // what is new and replies as the uninterrupted conversation did.
    let mut resumed = session(layout);
    let loaded = resumed.resume(&file, fp).unwrap();
    assert_eq!(loaded, saved);
    assert_eq!(resumed.messages().len(), 4);
    let third = resumed.turn(TURNS[2], |_| Ok(())).unwrap();
    assert_eq!(third.tokens, replies[2]);
    assert_eq!(third.report.turn, 3);
    assert!(
        third.report.reused_tokens >= saved.tokens,
        "{:?}",
        third.report
    );

    // Another model's fingerprint: a typed error, the session untouched.
    let mut other = session(layout);
    let foreign = kv_core::content::Fingerprint::of_parts(&[("another model", b"")]);
    let err = other.resume(&file, foreign).unwrap_err();
    assert!(matches!(err, ModelError::SavedChatInvalid { .. }), "{err}");
    assert!(other.messages().is_empty() && other.cached_tokens().is_empty());
    // Another layout under the same fingerprint value: the K/V file's header refuses it.
    let mut int8 = session(CacheLayout {
        dtype: KvDType::Int8 {
            group: kv_core::QuantGroup::G32,
        },
        block_size: layout.block_size,
    });
    let err = int8.resume(&file, fp).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::SavedChat {
                source: CacheFileError::Mismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(int8.messages().is_empty() && int8.cached_tokens().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}
