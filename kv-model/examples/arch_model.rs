//! Writes a small synthetic GGUF of one architecture with a real llama.cpp vocabulary's
//! tokenizer metadata, so kv and llama.cpp tokenize the same text and run the same
//! weights (`cargo xtask arch-peer` compares them).
//!
//! ```text
//! cargo run --release -p kv-model --example arch_model -- ARCH TYPE VOCAB.gguf OUT.gguf
//! ```
//! ARCH: llama, llama3, qwen2, qwen3; TYPE: f32, f16, q8_0.
#[path = "../tests/common/gguf.rs"]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a test helper: its asserts are its checks
mod gguf;

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [arch, ty, vocab, out] = args.as_slice() else {
        eprintln!("usage: arch_model ARCH TYPE VOCAB.gguf OUT.gguf (ARCH: llama, llama3, qwen2, qwen3; TYPE: f32, f16, q8_0)");
        return ExitCode::FAILURE;
    };
    let Some(arch) = gguf::Arch::parse(arch) else {
        eprintln!("arch_model: unknown architecture {arch:?} (llama, llama3, qwen2, qwen3)");
        return ExitCode::FAILURE;
    };
    let ty = match ty.as_str() {
        "f32" => gguf::F32,
        "f16" => gguf::F16,
        "q8_0" => gguf::Q8_0,
        other => {
            eprintln!("arch_model: unknown type {other:?} (f32, f16, q8_0)");
            return ExitCode::FAILURE;
        }
    };
    let kvs = match gguf::vocab_kvs(Path::new(vocab)) {
        Ok(kvs) => kvs,
        Err(e) => {
            eprintln!("arch_model: {e}");
            return ExitCode::FAILURE;
        }
    };
    let model = gguf::arch_model(arch, &kvs, ty, 15);
    if let Err(e) = gguf::write_gguf(&model, Path::new(out)) {
        eprintln!("arch_model: writing {out}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
