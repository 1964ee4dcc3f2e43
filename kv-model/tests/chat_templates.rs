//! Real chat templates (llama.cpp's `models/templates/*.jinja`, from the models' own
//! `tokenizer_config.json`) rendered with minijinja: the exact text each model expects.
//!
//! Needs the files: `cargo xtask fetch-vocab`, then `KV_VOCAB_DIR=~/.cache/kv/llama-vocab
//! cargo test -p kv-model --test chat_templates -- --ignored` (test-all does both).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use kv_model::{ChatMessage, ChatTemplate, ModelError, Tokenizer};

fn dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("KV_VOCAB_DIR")
            .expect("set KV_VOCAB_DIR to the directory `cargo xtask fetch-vocab` fills"),
    )
}

fn template(name: &str, bos: &str, eos: &str) -> ChatTemplate {
    let path = dir().join("templates").join(format!("{name}.jinja"));
    let source =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ChatTemplate::from_jinja(&source, bos, eos).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A system prompt and two user turns around an assistant reply.
fn with_system() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello!"),
        ChatMessage::new("user", "Name a color."),
    ]
}

fn without_system() -> Vec<ChatMessage> {
    with_system().split_off(1)
}

fn render(t: &ChatTemplate, messages: &[ChatMessage]) -> String {
    t.render_messages(messages, true).unwrap()
}

#[test]
#[ignore = "needs llama.cpp's templates: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn llama3_1() {
    let t = template(
        "meta-llama-Llama-3.1-8B-Instruct",
        "<|begin_of_text|>",
        "<|eot_id|>",
    );
    assert_eq!(
        render(&t, &with_system()),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
         Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    // Without add_generation_prompt the text ends with the last turn.
    assert!(t
        .render_messages(&with_system(), false)
        .unwrap()
        .ends_with("Name a color.<|eot_id|>"));
}

#[test]
#[ignore = "needs llama.cpp's templates: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn llama3_2_prints_todays_date() {
    let t = template(
        "meta-llama-Llama-3.2-3B-Instruct",
        "<|begin_of_text|>",
        "<|eot_id|>",
    );
    let text = render(&t, &without_system());
    // strftime_now("%d %b %Y"): "07 Dec 2026".
    let date = text
        .split("Today Date: ")
        .nth(1)
        .and_then(|r| r.split('\n').next())
        .unwrap();
    let parts: Vec<&str> = date.split(' ').collect();
    assert_eq!(parts.len(), 3, "{date:?}");
    assert_eq!(parts[0].len(), 2);
    assert!(parts[2].parse::<u32>().unwrap() >= 2024);
    assert!(text.ends_with(
        "<|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    ));
}

#[test]
#[ignore = "needs llama.cpp's templates: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn qwen2_5_and_qwen3() {
    let t = template("Qwen-Qwen2.5-7B-Instruct", "", "<|im_end|>");
    let turns = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
                 <|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(
        render(&t, &with_system()),
        format!("<|im_start|>system\nYou are terse.<|im_end|>\n{turns}")
    );
    // Qwen 2.5 puts in its own system prompt when there is none.
    assert_eq!(
        render(&t, &without_system()),
        format!(
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
             assistant.<|im_end|>\n{turns}"
        )
    );
    let t = template("Qwen-Qwen3-0.6B", "", "<|im_end|>");
    assert_eq!(render(&t, &without_system()), turns);
}

#[test]
#[ignore = "needs llama.cpp's templates: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn gemma2_refuses_a_system_turn() {
    let t = template("google-gemma-2-2b-it", "<bos>", "<eos>");
    assert_eq!(
        render(&t, &without_system()),
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
         <start_of_turn>user\nName a color.<end_of_turn>\n<start_of_turn>model\n"
    );
    let err = t.render_messages(&with_system(), true).unwrap_err();
    assert!(matches!(err, ModelError::ChatTemplate { .. }));
    assert!(
        err.to_string().contains("System role not supported"),
        "{err}"
    );
}

#[test]
#[ignore = "needs llama.cpp's templates: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn mistral_nemo_and_phi3_5() {
    let t = template("mistralai-Mistral-Nemo-Instruct-2407", "<s>", "</s>");
    // The system prompt goes into the last user turn.
    assert_eq!(
        render(&t, &with_system()),
        "<s>[INST]Hi[/INST]Hello!</s>[INST]You are terse.\n\nName a color.[/INST]"
    );
    let t = template("microsoft-Phi-3.5-mini-instruct", "<s>", "<|endoftext|>");
    assert_eq!(
        render(&t, &with_system()),
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n\
         <|user|>\nName a color.<|end|>\n<|assistant|>\n"
    );
}

#[test]
#[ignore = "needs llama.cpp's templates: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn every_template_compiles() {
    let mut failed = Vec::new();
    let mut count = 0;
    for entry in std::fs::read_dir(dir().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        count += 1;
        if let Err(e) = ChatTemplate::from_jinja(&source, "<s>", "</s>") {
            failed.push(format!("{}: {e}", path.display()));
        }
    }
    println!("{} of {count} templates compile", count - failed.len());
    assert!(count > 50);
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
#[ignore = "needs llama.cpp's templates: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn rendered_llama3_prompt_tokenizes_to_special_tokens_with_one_bos() {
    let tokenizer = Tokenizer::from_gguf_file(dir().join("ggml-vocab-llama-bpe.gguf")).unwrap();
    let (bos, eos) = tokenizer.special_texts();
    assert_eq!(bos, "<|begin_of_text|>");
    let t = template("meta-llama-Llama-3.1-8B-Instruct", bos, eos);
    // `encode`, as chat and generate tokenize a rendered prompt: the vocabulary adds BOS
    // (llama-bpe, as in llama.cpp) unless the template already wrote it.
    let ids = tokenizer.encode(&render(&t, &with_system())).unwrap();
    let id = |s: &str| tokenizer.token_to_id(s).unwrap();
    assert_eq!(ids[0], id("<|begin_of_text|>"));
    assert_eq!(
        ids.iter()
            .filter(|&&i| i == id("<|begin_of_text|>"))
            .count(),
        1
    );
    assert_eq!(ids.iter().filter(|&&i| i == id("<|eot_id|>")).count(), 4);
    assert_eq!(
        ids.iter()
            .filter(|&&i| i == id("<|start_header_id|>"))
            .count(),
        5
    );
}

#[test]
#[ignore = "needs llama.cpp's templates: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn every_template_renders_a_plain_conversation() {
    let mut failed = Vec::new();
    let mut count = 0;
    for entry in std::fs::read_dir(dir().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        // Needs the caller's `functions` and `datetime` variables.
        if path.ends_with("fireworks-ai-llama-3-firefunction-v2.jinja") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let t = ChatTemplate::from_jinja(&source, "<s>", "</s>").unwrap();
        count += 1;
        match t.render_messages(&without_system(), true) {
            Ok(text) if text.contains("Name a color.") => {}
            Ok(text) => failed.push(format!("{}: {text:?}", path.display())),
            Err(e) => failed.push(format!("{}: {e}", path.display())),
        }
    }
    println!("{} of {count} templates render", count - failed.len());
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
