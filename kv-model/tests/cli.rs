//! The `kv` command line's answers to user mistakes: one line on stderr, a non-zero exit,
//! never a panic. None of these need the model file.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use candle_core::quantized::gguf_file::{self, Value};

fn kv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(args)
        // A directory without models, so no test depends on what is installed.
        .env(
            "KV_MODEL_DIR",
            std::env::temp_dir().join("kv-cli-test-no-models"),
        )
        .output()
        .unwrap()
}

/// Asserts a failure with exactly one line on stderr containing `needle`.
fn fails_with(out: &Output, needle: &str) -> String {
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert!(!out.status.success(), "succeeded; stderr {stderr:?}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr:?}");
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{needle:?} not in {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn missing_model_file() {
    let out = kv(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "hi",
    ]);
    let msg = fails_with(&out, "not found");
    assert!(msg.contains("/nonexistent/model.gguf"), "{msg}");
    // The default path too, with the hint to fetch it.
    let out = kv(&["generate", "--prompt", "hi"]);
    fails_with(&out, "fetch-model");
}

#[test]
fn threads_are_bounded() {
    for n in ["0", "100000"] {
        let out = kv(&[
            "--threads",
            n,
            "mem",
            "--preset",
            "llama-2-7b",
            "--tokens",
            "1",
        ]);
        fails_with(&out, "--threads");
    }
    let out = kv(&[
        "mem",
        "--preset",
        "llama-2-7b",
        "--tokens",
        "4096",
        "--threads",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn empty_prompt() {
    let out = kv(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "",
    ]);
    fails_with(&out, "prompt is empty");
}

#[test]
fn corrupt_model_file() {
    let path = temp_file("corrupt.gguf", b"this is not a gguf file at all, just text");
    let out = kv(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    fails_with(&out, "not a valid GGUF");
    let out = kv(&["mem", "--model", path.to_str().unwrap(), "--tokens", "10"]);
    fails_with(&out, "not a valid GGUF");
}

#[test]
fn unsupported_architecture() {
    let mut bytes = std::io::Cursor::new(Vec::new());
    let arch = Value::String("gpt2".into());
    gguf_file::write(&mut bytes, &[("general.architecture", &arch)], &[]).unwrap();
    let path = temp_file("gpt2.gguf", bytes.get_ref());
    let out = kv(&[
        "generate",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    fails_with(&out, "unsupported model architecture \"gpt2\"");
}

#[test]
fn bad_flags() {
    fails_with(&kv(&["generate", "--prompt", "x", "--dtype", "f8"]), "f8");
    fails_with(&kv(&["generate"]), "--prompt");
    fails_with(
        &kv(&["generate", "--prompt", "x", "--max-tokens", "-3"]),
        "-3",
    );
    fails_with(&kv(&["frobnicate"]), "frobnicate");
    fails_with(&kv(&["mem", "--tokens", "5"]), "--preset");
    fails_with(
        &kv(&[
            "generate",
            "--model",
            "/nonexistent",
            "--prompt",
            "x",
            "--temperature",
            "-1",
        ]),
        "temperature",
    );
    fails_with(
        &kv(&[
            "generate",
            "--model",
            "/nonexistent",
            "--prompt",
            "x",
            "--top-p",
            "2",
        ]),
        "top-p",
    );
}

#[test]
fn cuda_backend_without_cuda_is_explained() {
    // The backend is made before the model loads, so no model is needed to see this.
    let out = kv(&[
        "generate",
        "--backend",
        "cuda",
        "--model",
        "/nonexistent",
        "--prompt",
        "x",
    ]);
    fails_with(&out, "cuda");
}

#[test]
fn mem_preset_prints_the_published_numbers() {
    let out = kv(&[
        "mem",
        "--preset",
        "llama-2-7b",
        "--tokens",
        "4096",
        "--dtype",
        "f16",
    ]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("2 GiB"), "{stdout}");

    let out = kv(&["mem", "--preset", "smollm2-135m", "--tokens", "8192"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    for want in ["180 MiB", "360 MiB", "540 MiB", "f32", "f16", "bf16"] {
        assert!(stdout.contains(want), "no {want} in {stdout}");
    }
}

#[test]
fn help_succeeds() {
    let out = kv(&["generate", "--help"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("--no-cache") && stdout.contains("--block-size"),
        "{stdout}"
    );
}

#[test]
fn window_flags_are_checked_before_the_model_loads() {
    let out = kv(&["generate", "--prompt", "hi", "--sinks", "32"]);
    fails_with(&out, "--window");
    let out = kv(&["generate", "--prompt", "hi", "--window", "64", "--no-cache"]);
    fails_with(&out, "--no-cache");
}
