//! `kv batch` and `kv generate` choose their prompts' wrapping the same way (one shared
//! function in main.rs): `--raw`, `--chat-template NAME|FILE`, else the file's own
//! template, else one typed error naming those options. Run on a small synthetic Llama
//! whose file has no `tokenizer.chat_template` (as Gemma 3 270M's GGUF), so the normal
//! suite needs no download.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::gguf::{self, Arch};

fn dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-batch-templates-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The model without a chat template, written once per test into its own file.
fn model(name: &str) -> PathBuf {
    let path = dir().join(format!("{name}.gguf"));
    let mut vocab = gguf::byte_vocab_kvs(300);
    // The vocabulary's one merge (`h i`) needs its token, or text with "hi" cannot encode.
    for (k, v) in &mut vocab {
        if let (true, gguf::Val::Arr(_, tokens)) = (k == "tokenizer.ggml.tokens", v) {
            *tokens.last_mut().unwrap() = gguf::Val::str("hi");
        }
    }
    let g = gguf::arch_model(Arch::Llama, &vocab, gguf::F32, 7);
    assert!(
        !g.kvs.iter().any(|(k, _)| k == "tokenizer.chat_template"),
        "the model must have no template of its own"
    );
    gguf::write_gguf(&g, &path).unwrap();
    path
}

fn kv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `prompt_tokens` of every sequence in a `--summary-json` file.
fn prompt_tokens(json: &Path) -> Vec<u64> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let seqs = v.get("sequences").and_then(|s| s.as_array());
    seqs.map(|s| {
        s.iter()
            .map(|q| q["prompt_tokens"].as_u64().unwrap())
            .collect()
    })
    .or_else(|| v["prompt_tokens"].as_u64().map(|n| vec![n]))
    .unwrap()
}

const PROMPTS: &str = "Name a colour.\n\nWhat is 2 + 2?\nHow far is the moon?\n";

/// A template of plain bytes (one token each in the byte vocabulary): `Q: ` before the
/// prompt and `\nA:` after, 6 tokens more than the raw text.
const TEMPLATE: &str = "Q: {{ messages[0]['content'] }}\nA:";

#[test]
fn batch_without_a_template_names_the_options_and_runs_with_raw_or_a_file() {
    let m = model("batch");
    let m = m.to_str().unwrap();
    let d = dir();
    let prompts = d.join("prompts.txt");
    std::fs::write(&prompts, PROMPTS).unwrap();
    let p = prompts.to_str().unwrap();
    let base = ["batch", "--model", m, "--prompts", p, "--max-tokens", "4"];

    // No template in the file and none chosen: one line naming both ways out.
    let out = kv(&base);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--chat-template NAME|FILE") && stderr.contains("--raw"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // --raw: the lines as they are, batched greedy tokens those of one at a time.
    let raw_json = d.join("raw.json");
    let mut args = base.to_vec();
    args.extend(["--raw", "--compare", "--summary-json"]);
    args.push(raw_json.to_str().unwrap());
    let stdout = ok(&kv(&args));
    assert!(stdout.contains("[1] What is 2 + 2?"), "{stdout}");
    assert!(stdout.contains("greedy tokens identical"), "{stdout}");
    let raw = prompt_tokens(&raw_json);
    let bytes: Vec<u64> = PROMPTS
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.len() as u64)
        .collect();
    assert_eq!(raw, bytes, "a raw prompt is its bytes, nothing added");

    // A Jinja file: every prompt wrapped in it (6 bytes more), and --compare still holds.
    let template = d.join("qa.jinja");
    std::fs::write(&template, TEMPLATE).unwrap();
    let file_json = d.join("file.json");
    let mut args = base.to_vec();
    args.extend(["--chat-template", template.to_str().unwrap(), "--compare"]);
    args.extend(["--summary-json", file_json.to_str().unwrap()]);
    let stdout = ok(&kv(&args));
    assert!(stdout.contains("greedy tokens identical"), "{stdout}");
    let wrapped = prompt_tokens(&file_json);
    let want: Vec<u64> = raw.iter().map(|n| n + 6).collect();
    assert_eq!(wrapped, want);

    // A built-in name works too; a name that is neither is one typed line.
    ok(&kv(&[&base[..], &["--chat-template", "chatml"]].concat()));
    let out = kv(&[&base[..], &["--chat-template", "no-such-template"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("neither"), "{stderr}");
    // --raw and a template together make no sense.
    let out = kv(&[&base[..], &["--raw", "--chat-template", "chatml"]].concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--chat-template"));
}

#[test]
fn generate_wraps_a_prompt_as_batch_does() {
    let m = model("generate");
    let m = m.to_str().unwrap();
    let d = dir();
    let template = d.join("qa-generate.jinja");
    std::fs::write(&template, TEMPLATE).unwrap();
    let prompt = "Name a colour.";
    let base = ["generate", "--model", m, "--prompt", prompt];
    let base = [&base[..], &["--max-tokens", "2", "--temperature", "0"]].concat();

    let out = kv(&base);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--chat-template NAME|FILE") && stderr.contains("--raw"),
        "{stderr}"
    );

    let count = |extra: &[&str], name: &str| {
        let json = d.join(name);
        let args = [
            &base[..],
            extra,
            &["--summary-json", json.to_str().unwrap()],
        ]
        .concat();
        ok(&kv(&args));
        prompt_tokens(&json)
    };
    let raw = count(&["--raw"], "g-raw.json");
    assert_eq!(raw, vec![prompt.len() as u64]);
    let wrapped = count(
        &["--chat-template", template.to_str().unwrap()],
        "g-file.json",
    );
    assert_eq!(wrapped, vec![prompt.len() as u64 + 6]);
}
