//! Real chat templates (llama.cpp's `models/templates/*.jinja`, from the models' own
//! `tokenizer_config.json`) rendered with minijinja: the exact text each model expects.
//!
//! Needs the files: `cargo xtask fetch-vocab`, then `KV_VOCAB_DIR=~/.cache/kv/llama-vocab
//! cargo test -p kv-model --test chat_templates -- --ignored` (test-all does both).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use kv_model::{ChatMessage, ChatTemplate, ModelError};

fn template(name: &str, bos: &str, eos: &str) -> ChatTemplate {
    let dir = PathBuf::from(
        std::env::var_os("KV_VOCAB_DIR")
            .expect("set KV_VOCAB_DIR to the directory `cargo xtask fetch-vocab` fills"),
    );
    let path = dir.join("templates").join(format!("{name}.jinja"));
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
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
fn probe() {
    for name in [
        "meta-llama-Llama-3.1-8B-Instruct",
        "meta-llama-Llama-3.2-3B-Instruct",
        "Qwen-Qwen2.5-7B-Instruct",
        "Qwen-Qwen3-0.6B",
        "google-gemma-2-2b-it",
        "mistralai-Mistral-Nemo-Instruct-2407",
        "microsoft-Phi-3.5-mini-instruct",
        "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B",
        "HuggingFaceTB-SmolLM3-3B",
        "ibm-granite-granite-3.3-2B-Instruct",
    ] {
        let t = template(name, "<BOS>", "<EOS>");
        println!("=== {name}\n{:?}", t.render_messages(&with_system(), true));
        println!("--- no system\n{:?}", t.render_messages(&without_system(), true));
    }
}
