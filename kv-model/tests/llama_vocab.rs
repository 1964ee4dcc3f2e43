//! The tokenizers against llama.cpp's own test vectors: `ggml-vocab-NAME.gguf` (a
//! vocabulary-only GGUF file) with `.inp` (inputs separated by `\n__ggml_vocab_test__\n`)
//! and `.out` (one line of ids per input, made without BOS/EOS).
//!
//! Needs the files: `cargo xtask fetch-vocab`, then `KV_VOCAB_DIR=~/.cache/kv/llama-vocab
//! cargo test -p kv-model --test llama_vocab -- --ignored` (test-all does both).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use kv_model::Tokenizer;

fn vocab_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("KV_VOCAB_DIR")
            .expect("set KV_VOCAB_DIR to the directory `cargo xtask fetch-vocab` fills"),
    )
}

/// Every case of vocabulary `name` whose ids differ from llama.cpp's, and the case count.
fn mismatches(name: &str) -> (Vec<String>, usize) {
    let dir = vocab_dir();
    let file = dir.join(format!("ggml-vocab-{name}.gguf"));
    let tokenizer =
        Tokenizer::from_gguf_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let mut inputs: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    // The file ends with a separator.
    if inputs.last() == Some(&"") {
        inputs.pop();
    }
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        inputs.len(),
        expected.len(),
        "{name}: .inp and .out disagree"
    );
    assert!(inputs.len() > 10, "{name}: only {} cases", inputs.len());
    let mut failed = Vec::new();
    for (text, want) in inputs.iter().zip(&expected) {
        let got = tokenizer.encode_with(text, false, false).unwrap();
        if &got != want {
            failed.push(format!("{text:?}: got {got:?}, llama.cpp {want:?}"));
        }
    }
    (failed, inputs.len())
}

fn assert_all_match(name: &str) {
    let (failed, total) = mismatches(name);
    println!("{name}: {} of {total} cases match", total - failed.len());
    assert!(
        failed.is_empty(),
        "{name}: {} of {total} cases differ:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
#[ignore = "needs llama.cpp's vocabularies: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn llama_spm_matches_llama_cpp() {
    assert_all_match("llama-spm");
}

#[test]
#[ignore = "needs llama.cpp's vocabularies: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn llama_bpe_matches_llama_cpp() {
    assert_all_match("llama-bpe");
}

#[test]
#[ignore = "needs llama.cpp's vocabularies: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn qwen2_matches_llama_cpp() {
    assert_all_match("qwen2");
}

#[test]
#[ignore = "needs llama.cpp's vocabularies: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn gpt2_matches_llama_cpp() {
    assert_all_match("gpt-2");
}

#[test]
#[ignore = "needs llama.cpp's vocabularies: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn other_vocabularies_match_llama_cpp() {
    for name in [
        "phi-3",
        "falcon",
        "starcoder",
        "refact",
        "command-r",
        "mpt",
        "qwen35",
    ] {
        assert_all_match(name);
    }
}

#[test]
#[ignore = "needs llama.cpp's vocabularies: KV_VOCAB_DIR (cargo xtask fetch-vocab)"]
fn special_tokens_and_bos_follow_the_file() {
    let dir = vocab_dir();
    let spm = Tokenizer::from_gguf_file(dir.join("ggml-vocab-llama-spm.gguf")).unwrap();
    // Llama 2: BOS <s> = 1 added, EOS </s> = 2 not.
    assert_eq!(spm.bos_to_add(), Some(1));
    assert_eq!(
        spm.encode_with("Hello", true, true).unwrap(),
        vec![1, 15043]
    );
    assert_eq!(spm.decode(&[1, 15043, 2]).unwrap(), "Hello");
    // Parsed, "</s>" is EOS; as text it is pieces.
    assert_eq!(spm.encode_with("</s>", false, true).unwrap(), vec![2]);
    assert!(spm.encode_with("</s>", false, false).unwrap().len() > 1);

    let bpe = Tokenizer::from_gguf_file(dir.join("ggml-vocab-llama-bpe.gguf")).unwrap();
    let bos = bpe.token_to_id("<|begin_of_text|>").unwrap();
    // This file has a BOS id but no add_bos_token key: llama.cpp's default for byte-level
    // BPE is not to add it, except for the Llama 3 family's pre-tokenizers (llama-bpe
    // here; llama-vocab.cpp), as its llama-tokenize shows on a model with this metadata.
    assert_eq!(bpe.bos(), Some(bos));
    assert_eq!(bpe.bos_to_add(), Some(bos));
    // llama_tokenize with add_special adds BOS even before a written one; `encode` (what
    // chat and generate use) does not double it.
    assert_eq!(
        bpe.encode_with("<|begin_of_text|>Hello world", true, true)
            .unwrap(),
        vec![bos, bos, 9906, 1917]
    );
    assert_eq!(
        bpe.encode("<|begin_of_text|>Hello world").unwrap(),
        vec![bos, 9906, 1917]
    );
    assert_eq!(bpe.encode("Hello world").unwrap(), vec![bos, 9906, 1917]);
    let qwen = Tokenizer::from_gguf_file(dir.join("ggml-vocab-qwen2.gguf")).unwrap();
    assert_eq!(qwen.bos_to_add(), None);
    assert_eq!(
        bpe.decode(&bpe.encode("Hello, wörld! 12345").unwrap())
            .unwrap(),
        "Hello, wörld! 12345"
    );
}
