//! `kv tokenize`: ids on one line, pieces with --pieces, BOS/EOS only with --add-special,
//! on vocabulary-only GGUF files (no tensors).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use candle_core::quantized::gguf_file::{self, Value};

fn kv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout_of(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {stderr}");
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A SentencePiece vocabulary-only GGUF file: no tensors, no architecture.
fn vocab_file() -> PathBuf {
    let s = |x: &str| Value::String(x.into());
    let tokens = [
        "<unk>", "<s>", "</s>", "<0x0A>", "▁", "h", "i", "▁h", "▁hi", "hi",
    ];
    let scores = [0.0, 0.0, 0.0, 0.0, -5.0, -4.0, -4.0, -2.0, -1.0, -3.0f32];
    let types = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1];
    let metadata = [
        ("tokenizer.ggml.model", s("llama")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(scores.iter().map(|&x| Value::F32(x)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.add_eos_token", Value::Bool(true)),
    ];
    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut bytes = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut bytes, &refs, &[]).unwrap();
    let dir = std::env::temp_dir().join(format!("kv-tokenize-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vocab.gguf");
    std::fs::write(&path, bytes.get_ref()).unwrap();
    path
}

#[test]
fn prints_ids_pieces_and_specials_only_when_asked() {
    let vocab = vocab_file();
    let m = vocab.to_str().unwrap();
    assert_eq!(
        stdout_of(&kv(&["tokenize", "--model", m, "--text", "hi hi"])),
        "8 8\n"
    );
    assert_eq!(
        stdout_of(&kv(&[
            "tokenize",
            "--model",
            m,
            "--text",
            "hi hi",
            "--add-special"
        ])),
        "1 8 8 2\n"
    );
    // Control tokens written in the text are parsed, as llama-tokenize does by default.
    assert_eq!(
        stdout_of(&kv(&["tokenize", "--model", m, "--text", "</s>hi\n"])),
        "2 8 3\n"
    );
    assert_eq!(
        stdout_of(&kv(&[
            "tokenize", "--model", m, "--text", "hi\n", "--pieces"
        ])),
        "     8 -> ' hi'\n     3 -> '\n'\n"
    );
    let file = vocab.with_file_name("input.txt");
    std::fs::write(&file, "hi").unwrap();
    assert_eq!(
        stdout_of(&kv(&[
            "tokenize",
            "--model",
            m,
            "--file",
            file.to_str().unwrap()
        ])),
        "8\n"
    );
    assert_eq!(
        stdout_of(&kv(&["tokenize", "--model", m, "--text", ""])),
        "\n"
    );
}

#[test]
fn bad_input_is_one_line() {
    let vocab = vocab_file();
    let m = vocab.to_str().unwrap();
    for args in [
        vec!["tokenize", "--model", m],
        vec!["tokenize", "--model", m, "--text", "a", "--file", "b"],
        vec!["tokenize", "--model", m, "--file", "/no/such/input.txt"],
        vec!["tokenize", "--model", "/no/such/vocab.gguf", "--text", "a"],
    ] {
        let out = kv(&args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
#[ignore = "needs llama.cpp's vocabularies: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn tokenizes_llama_cpp_vocabulary_files() {
    let dir = PathBuf::from(std::env::var_os("KV_VOCAB_DIR").unwrap());
    let spm = dir.join("ggml-vocab-llama-spm.gguf");
    let m = spm.to_str().unwrap();
    assert_eq!(
        stdout_of(&kv(&["tokenize", "--model", m, "--text", "Hello world"])),
        "15043 3186\n"
    );
    assert_eq!(
        stdout_of(&kv(&[
            "tokenize",
            "--model",
            m,
            "--text",
            "Hello world",
            "--add-special"
        ])),
        "1 15043 3186\n"
    );
}
