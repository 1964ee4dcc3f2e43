//! Hostile GGUF files and arguments: every case gives one typed error (one line from the
//! `kv` binary), never a panic, and stays within a memory limit.
//!
//! The malformed files are made from a small synthetic Llama GGUF written here (so the
//! normal suite needs no download), and, in the `#[ignore]`d tests, from the real model's
//! header (`KV_MODEL_PATH`, release). Each file is tried against the library entry points
//! in-process ([`kv_model::check_gguf_bytes`], [`kv_model::LlamaConfig::from_gguf_file`],
//! [`kv_model::load`]) and against `kv mem`, `kv generate`, `kv ppl` and `kv batch` in child
//! processes whose address space is limited (Linux), killed if they run too long.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::gguf::*;

/// Address-space limit of every `kv` child: far above what the tiny model needs, far below
/// what a size read from a hostile file could ask for.
const CHILD_MEMORY: u64 = 2 << 30;
/// Longest a child may run before it counts as hung.
const CHILD_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The synthetic model: a one-layer Llama with a byte-level vocabulary.

const HIDDEN: u64 = 8;
const FF: u64 = 16;
const HEADS: u64 = 2;
const KV_HEADS: u64 = 1;
const HEAD_DIM: u64 = HIDDEN / HEADS;
const CONTEXT: u32 = 64;

fn f32_data(n: u64, seed: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = ((i * 2_654_435_761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5;
            (x * 0.5).to_le_bytes()
        })
        .collect()
}

fn tiny_model() -> Gguf {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(byte_chars().iter().map(|c| c.to_string()));
    tokens.push("hi".into());
    let vocab = tokens.len() as u64;
    let mut types = vec![3i32; 3];
    types.extend(std::iter::repeat_n(1, tokens.len() - 3));
    let kvs = vec![
        ("general.architecture".into(), Val::str("llama")),
        ("general.alignment".into(), Val::u32(ALIGN as u32)),
        ("llama.block_count".into(), Val::u32(1)),
        ("llama.context_length".into(), Val::u32(CONTEXT)),
        ("llama.embedding_length".into(), Val::u32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Val::u32(FF as u32)),
        ("llama.attention.head_count".into(), Val::u32(HEADS as u32)),
        (
            "llama.attention.head_count_kv".into(),
            Val::u32(KV_HEADS as u32),
        ),
        (
            "llama.rope.dimension_count".into(),
            Val::u32(HEAD_DIM as u32),
        ),
        ("llama.rope.freq_base".into(), Val::f32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Val::f32(1e-5),
        ),
        ("llama.vocab_size".into(), Val::u32(vocab as u32)),
        ("tokenizer.ggml.model".into(), Val::str("gpt2")),
        ("tokenizer.ggml.pre".into(), Val::str("gpt2")),
        (
            "tokenizer.ggml.tokens".into(),
            Val::Arr(8, tokens.iter().map(|t| Val::str(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Val::Arr(5, types.iter().map(|&t| Val::i32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Val::Arr(8, vec![Val::str("h i")]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Val::u32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Val::u32(2)),
        (
            "tokenizer.chat_template".into(),
            Val::str("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"),
        ),
    ];
    let mut seed = 0;
    let mut t = |name: &str, dims: &[u64]| {
        seed += 1;
        let n: u64 = dims.iter().product();
        let data = if name.contains("norm") {
            (0..n).flat_map(|_| 1f32.to_le_bytes()).collect()
        } else {
            f32_data(n, seed)
        };
        TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            ty: 0,
            size: data.len(),
            data,
        }
    };
    let tensors = vec![
        t("token_embd.weight", &[HIDDEN, vocab]),
        t("output_norm.weight", &[HIDDEN]),
        t("blk.0.attn_norm.weight", &[HIDDEN]),
        t("blk.0.attn_q.weight", &[HIDDEN, HEADS * HEAD_DIM]),
        t("blk.0.attn_k.weight", &[HIDDEN, KV_HEADS * HEAD_DIM]),
        t("blk.0.attn_v.weight", &[HIDDEN, KV_HEADS * HEAD_DIM]),
        t("blk.0.attn_output.weight", &[HEADS * HEAD_DIM, HIDDEN]),
        t("blk.0.ffn_norm.weight", &[HIDDEN]),
        t("blk.0.ffn_gate.weight", &[HIDDEN, FF]),
        t("blk.0.ffn_up.weight", &[HIDDEN, FF]),
        t("blk.0.ffn_down.weight", &[FF, HIDDEN]),
    ];
    Gguf { kvs, tensors }
}

// ---------------------------------------------------------------------------------------
// Cases.

/// Where a malformed file must fail.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fails {
    /// The header pre-flight: every entry point, `kv mem` included.
    Header,
    /// Reading the configuration: `kv mem` and every loader.
    Config,
    /// Loading the model or tokenizer (`kv mem` reads only the configuration and may pass).
    Load,
    /// Possibly nowhere (a type swap that happens to parse): only no panic, one line,
    /// bounded memory are required.
    Maybe,
}

struct Case {
    name: String,
    /// The file's first bytes; zeros follow up to `len` (written as a sparse hole).
    bytes: Vec<u8>,
    len: usize,
    fails: Fails,
}

impl Case {
    fn new(name: String, w: &Written, bytes: Vec<u8>, fails: Fails) -> Self {
        Case {
            name,
            bytes,
            len: w.len,
            fails,
        }
    }

    fn write_to(&self, path: &Path) {
        let mut f = std::fs::File::create(path).unwrap();
        std::io::Write::write_all(&mut f, &self.bytes[..self.bytes.len().min(self.len)]).unwrap();
        f.set_len(self.len as u64).unwrap();
    }
}

fn patch(bytes: &[u8], f: &Field, v: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[f.pos..f.pos + f.width].copy_from_slice(&v.to_le_bytes()[..f.width]);
    b
}

/// Structural cases from one written file: truncations, absurd counts and lengths, bad
/// types, dims and offsets.
fn structural_cases(w: &Written) -> Vec<Case> {
    let mut cases = Vec::new();
    let len = w.len;
    for &b in w.boundaries.iter().filter(|&&b| b < len) {
        let mut case = Case::new(
            format!("truncated at byte {b}"),
            w,
            w.bytes[..b.min(w.bytes.len())].to_vec(),
            Fails::Header,
        );
        case.len = b;
        cases.push(case);
    }
    let mut empty = Case::new("empty file".into(), w, Vec::new(), Fails::Header);
    empty.len = 0;
    cases.push(empty);
    let mut bad_magic = w.bytes.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    cases.push(Case::new("wrong magic".into(), w, bad_magic, Fails::Header));
    for version in [0u32, 1, 4, u32::MAX] {
        let mut b = w.bytes.clone();
        b[4..8].copy_from_slice(&version.to_le_bytes());
        cases.push(Case::new(format!("version {version}"), w, b, Fails::Header));
    }
    let mut seen_lengths = 0;
    for f in &w.fields {
        let values: Vec<(u64, Fails)> = match f.kind {
            FieldKind::Count => vec![
                (u64::MAX, Fails::Header),
                (1 << 40, Fails::Header),
                (1 << 20, Fails::Header),
                (len as u64, Fails::Header),
            ],
            FieldKind::Length => {
                // Every length is tried, but only the first few of the vocabulary's.
                seen_lengths += 1;
                if seen_lengths > 80 && !f.label.contains("array") {
                    continue;
                }
                vec![
                    (u64::MAX, Fails::Header),
                    (1 << 62, Fails::Header),
                    (len as u64, Fails::Header),
                ]
            }
            FieldKind::ValueType => vec![(13, Fails::Header), (u32::MAX as u64, Fails::Header)]
                .into_iter()
                .chain([(9, Fails::Maybe), (8, Fails::Maybe), (7, Fails::Maybe)])
                .collect(),
            FieldKind::ArrayType => vec![(13, Fails::Header), (9, Fails::Maybe), (0, Fails::Maybe)],
            FieldKind::Dims => vec![
                (0, Fails::Header),
                (5, Fails::Header),
                (u32::MAX as u64, Fails::Header),
            ],
            FieldKind::Dim => vec![
                (0, Fails::Header),
                (u64::MAX, Fails::Header),
                (1 << 41, Fails::Header),
                (1 << 30, Fails::Header),
            ],
            FieldKind::TensorType => vec![
                (4, Fails::Header),
                (u32::MAX as u64, Fails::Header),
                // Another real type: other byte sizes, which may still fit the file.
                (2, Fails::Maybe),
            ],
            FieldKind::Offset => vec![
                (u64::MAX, Fails::Header),
                (u64::MAX - 31, Fails::Header),
                (len as u64, Fails::Header),
                (1, Fails::Header), // misaligned
            ],
        };
        for (v, fails) in values {
            cases.push(Case::new(
                format!("{} = {v}", f.label),
                w,
                patch(&w.bytes, f, v),
                fails,
            ));
        }
    }
    cases
}

/// Metadata values set to 0, negative, huge and wrong-typed, and inconsistent shapes, each
/// written as a well-formed file.
fn metadata_cases(base: &Gguf, sizes: &[&str], floats: &[&str]) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |name: String, g: &Gguf, fails: Fails| {
        let w = g.write();
        cases.push(Case::new(name, &w, w.bytes.clone(), fails));
    };
    let wrong_types = || {
        vec![
            ("a string", Val::str("12")),
            ("a float", Val::f32(8.0)),
            ("a bool", Val::bool(true)),
            ("an array", Val::Arr(4, vec![Val::u32(8)])),
        ]
    };
    for key in sizes {
        let mut values = vec![
            ("0", Val::u32(0)),
            ("-1", Val::i32(-1)),
            ("i64::MIN", Val::i64(i64::MIN)),
            ("u64::MAX", Val::u64(u64::MAX)),
            ("2^40", Val::u64(1 << 40)),
            ("2^31", Val::u64(1 << 31)),
        ];
        values.extend(wrong_types());
        for (what, v) in values {
            let mut g = base.clone();
            g.set(key, v);
            add(format!("{key} = {what}"), &g, Fails::Config);
        }
        let mut g = base.clone();
        g.remove(key);
        // Optional keys have defaults; required ones are missing.
        let optional = key.contains("head_count_kv")
            || key.contains("dimension_count")
            || key.contains("vocab_size");
        add(
            format!("{key} removed"),
            &g,
            if optional {
                Fails::Maybe
            } else {
                Fails::Config
            },
        );
    }
    for key in floats {
        for (what, v) in [
            ("0", Val::f32(0.0)),
            ("-1", Val::f32(-1.0)),
            ("NaN", Val::f32(f32::NAN)),
            ("infinity", Val::f32(f32::INFINITY)),
            ("a string", Val::str("1e-5")),
            ("a bool", Val::bool(false)),
        ] {
            let mut g = base.clone();
            g.set(key, v);
            add(format!("{key} = {what}"), &g, Fails::Config);
        }
    }
    for (what, v) in [
        ("0", Val::u32(0)),
        ("3", Val::u32(3)),
        ("2^20", Val::u32(1 << 20)),
        ("u64 32", Val::u64(32)),
        ("a string", Val::str("32")),
    ] {
        let mut g = base.clone();
        g.set("general.alignment", v);
        add(format!("general.alignment = {what}"), &g, Fails::Header);
    }
    for (what, v) in [
        ("gpt2", Val::str("gpt2")),
        (
            "an escape sequence",
            Val::str("\u{1b}]0;pwned\u{7}\u{1b}[2J"),
        ),
        ("u32", Val::u32(1)),
    ] {
        let mut g = base.clone();
        g.set("general.architecture", v);
        add(format!("general.architecture = {what}"), &g, Fails::Config);
    }
    for key in ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"] {
        for (what, v) in [
            ("-1", Val::i32(-1)),
            ("u64::MAX", Val::u64(u64::MAX)),
            ("past the vocabulary", Val::u32(1 << 30)),
            ("a string", Val::str("1")),
        ] {
            let mut g = base.clone();
            g.set(key, v);
            add(format!("{key} = {what}"), &g, Fails::Load);
        }
    }
    for (what, v) in [
        ("empty", Val::Arr(8, vec![])),
        ("integers", Val::Arr(4, vec![Val::u32(1); 4])),
        ("a string", Val::str("a b c")),
    ] {
        let mut g = base.clone();
        g.set("tokenizer.ggml.tokens", v);
        // Without vocab_size the token list sizes the vocabulary: then the config fails too.
        add(format!("tokenizer.ggml.tokens {what}"), &g, Fails::Load);
    }
    let mut g = base.clone();
    g.set("tokenizer.ggml.model", Val::str("\u{1b}[31mllama"));
    add(
        "tokenizer.ggml.model with an escape".into(),
        &g,
        Fails::Load,
    );
    cases
}

/// Tensors of the wrong shape or with non-finite weights, in well-formed files.
fn tensor_cases(base: &Gguf) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut add = |name: &str, g: Gguf| {
        let w = g.write();
        cases.push(Case::new(name.into(), &w, w.bytes.clone(), Fails::Load));
    };
    let mut g = base.clone();
    let t = g.tensor_mut("blk.0.attn_q.weight");
    t.dims.reverse();
    t.dims[0] *= 2;
    t.data.extend(t.data.clone());
    t.size = t.data.len();
    add("attn_q of the wrong shape", g);
    let mut g = base.clone();
    g.tensors.retain(|t| t.name != "blk.0.ffn_down.weight");
    add("ffn_down missing", g);
    let mut g = base.clone();
    let t = g.tensor_mut("blk.0.ffn_norm.weight");
    t.data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    add("a NaN in ffn_norm", g);
    let mut g = base.clone();
    let t = g.tensor_mut("blk.0.attn_k.weight");
    t.data[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    add("an infinity in attn_k", g);
    let mut g = base.clone();
    g.set("llama.block_count", Val::u32(2));
    add("block_count 2 with one layer of tensors", g);
    let mut g = base.clone();
    g.set("llama.embedding_length", Val::u32(16));
    add("embedding_length inconsistent with the tensors", g);
    let mut g = base.clone();
    let t = g.tensor_mut("blk.0.attn_norm.weight");
    t.ty = 1; // F16: half the bytes, but the rows stay whole
    t.data.truncate(t.data.len() / 2);
    t.data.fill(0xff); // f16 0xffff is a NaN
    t.size = t.data.len();
    add("an F16 norm of NaNs", g);
    cases
}

// ---------------------------------------------------------------------------------------
// Running cases.

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct ChildResult {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    timed_out: bool,
}

/// Runs `kv args` with an address-space limit; kills it after `timeout`.
fn run_kv(args: &[&str], timeout: Duration) -> ChildResult {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kv"));
    cmd.args(args)
        .env("KV_MODEL_DIR", temp_dir().join("no-models"))
        .env("RAYON_NUM_THREADS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and calls only
        // setrlimit, which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: CHILD_MEMORY,
                    rlim_max: CHILD_MEMORY,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut s).ok();
        s
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut s).ok();
        s
    });
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > timeout {
            timed_out = true;
            child.kill().ok();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    ChildResult {
        code: status.code(),
        stdout: String::from_utf8_lossy(&out_thread.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err_thread.join().unwrap()).into_owned(),
        timed_out,
    }
}

/// A clean failure: exit code 1, one line on stderr starting `error:`, no panic, no raw
/// control characters, nothing on stdout (validation before any output).
fn assert_clean_failure(r: &ChildResult, what: &str) {
    assert!(
        !r.timed_out,
        "{what}: still running after {CHILD_TIMEOUT:?}"
    );
    assert_eq!(
        r.code,
        Some(1),
        "{what}: exit {:?} (killed by a signal or a panic?), stderr {:?}",
        r.code,
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{what}: {:?}", r.stderr);
    assert!(r.stderr.starts_with("error: "), "{what}: {:?}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{what}: {:?}", r.stderr);
    assert!(
        !r.stderr.trim_end().chars().any(char::is_control),
        "{what}: raw control characters in {:?}",
        r.stderr
    );
    assert!(r.stdout.is_empty(), "{what}: printed {:?}", r.stdout);
}

/// Success or a clean failure, never a crash, a hang or a multi-line message.
fn assert_no_crash(r: &ChildResult, what: &str) {
    assert!(
        !r.timed_out,
        "{what}: still running after {CHILD_TIMEOUT:?}"
    );
    match r.code {
        Some(0) => {}
        Some(1) => {
            assert_eq!(r.stderr.lines().count(), 1, "{what}: {:?}", r.stderr);
            assert!(!r.stderr.contains("panicked"), "{what}: {:?}", r.stderr);
        }
        other => panic!("{what}: exit {other:?}, stderr {:?}", r.stderr),
    }
}

/// In-process entry points: typed errors where the case must fail, never a panic.
fn check_in_process(case: &Case, path: &Path) {
    let what = &case.name;
    let header = std::panic::catch_unwind(|| kv_model::check_gguf_bytes(&case.bytes))
        .unwrap_or_else(|_| panic!("{what}: check_gguf_bytes panicked"));
    let file = std::panic::catch_unwind(|| kv_model::check_gguf_file(path))
        .unwrap_or_else(|_| panic!("{what}: check_gguf_file panicked"));
    assert_eq!(
        header.is_ok(),
        file.is_ok(),
        "{what}: bytes and file disagree"
    );
    let config = std::panic::catch_unwind(|| kv_model::LlamaConfig::from_gguf_file(path))
        .unwrap_or_else(|_| panic!("{what}: LlamaConfig::from_gguf_file panicked"));
    let load = std::panic::catch_unwind(|| kv_model::load(path).map(|_| ()))
        .unwrap_or_else(|_| panic!("{what}: load panicked"));
    let one_line = |e: &kv_model::ModelError| {
        let s = e.to_string();
        assert!(!s.contains('\n') && !s.contains('\u{1b}'), "{what}: {s:?}");
    };
    for e in [
        header.as_ref().err(),
        config.as_ref().err(),
        load.as_ref().err(),
    ]
    .into_iter()
    .flatten()
    {
        one_line(e);
    }
    match case.fails {
        Fails::Header => {
            let e = header.expect_err(what);
            assert!(
                matches!(e, kv_model::ModelError::MalformedGguf { .. }),
                "{what}: {e}"
            );
            assert!(config.is_err() && load.is_err(), "{what}");
        }
        Fails::Config => {
            assert!(config.is_err(), "{what}: the configuration was accepted");
            assert!(load.is_err(), "{what}: the model loaded");
        }
        Fails::Load => assert!(load.is_err(), "{what}: the model loaded"),
        Fails::Maybe => {}
    }
}

/// Runs every command on a case's file under the memory limit.
fn check_commands(case: &Case, path: &Path, text: &Path, prompts: &Path) {
    let p = path.to_str().unwrap();
    let what = &case.name;
    let mem = run_kv(&["mem", "--model", p, "--tokens", "100"], CHILD_TIMEOUT);
    let generate = run_kv(
        &[
            "generate",
            "--model",
            p,
            "--prompt",
            "hi",
            "--raw",
            "--max-tokens",
            "3",
        ],
        CHILD_TIMEOUT,
    );
    let ppl = run_kv(
        &[
            "ppl",
            "--model",
            p,
            "--text",
            text.to_str().unwrap(),
            "--ctx",
            "16",
            "--dtype",
            "f16",
            "--block-size",
            "16",
        ],
        CHILD_TIMEOUT,
    );
    let batch = run_kv(
        &[
            "batch",
            "--model",
            p,
            "--prompts",
            prompts.to_str().unwrap(),
            "--max-tokens",
            "2",
        ],
        CHILD_TIMEOUT,
    );
    match case.fails {
        Fails::Header | Fails::Config => {
            assert_clean_failure(&mem, &format!("{what}: kv mem"));
        }
        Fails::Load | Fails::Maybe => assert_no_crash(&mem, &format!("{what}: kv mem")),
    }
    for (r, cmd) in [(&generate, "generate"), (&ppl, "ppl"), (&batch, "batch")] {
        if case.fails == Fails::Maybe {
            assert_no_crash(r, &format!("{what}: kv {cmd}"));
        } else {
            assert_clean_failure(r, &format!("{what}: kv {cmd}"));
        }
    }
}

fn inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "hi hi hi hi hi hi hi hi hi hi hi hi hi hi hi hi hi hi hi",
    )
    .unwrap();
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "hi\nhi hi\n").unwrap();
    (text, prompts)
}

fn synthetic_cases() -> Vec<Case> {
    let base = tiny_model();
    let w = base.write();
    let mut cases = structural_cases(&w);
    cases.extend(metadata_cases(
        &base,
        &[
            "llama.block_count",
            "llama.context_length",
            "llama.embedding_length",
            "llama.feed_forward_length",
            "llama.attention.head_count",
            "llama.attention.head_count_kv",
            "llama.rope.dimension_count",
            "llama.vocab_size",
        ],
        &[
            "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon",
        ],
    ));
    cases.extend(tensor_cases(&base));
    cases
}

// ---------------------------------------------------------------------------------------
// Tests on the synthetic model (no download).

#[test]
fn the_synthetic_model_is_valid_and_runs() {
    let dir = temp_dir();
    let path = dir.join("valid.gguf");
    std::fs::write(&path, tiny_model().write().bytes).unwrap();
    let summary = kv_model::check_gguf_file(&path).unwrap();
    assert_eq!(summary.tensor_count, 11);
    let (model, tokenizer) = kv_model::load(&path).unwrap();
    assert_eq!(model.config().context_length, CONTEXT as usize);
    assert_eq!(tokenizer.encode("hi").unwrap().len(), 1);
    // Every command works on it (the arguments `check_commands` uses): the malformed
    // cases fail because of their flaw.
    let (text, prompts) = inputs(&dir);
    let (p, t, pr) = (
        path.to_str().unwrap(),
        text.to_str().unwrap(),
        prompts.to_str().unwrap(),
    );
    for args in [
        vec!["mem", "--model", p, "--tokens", "100"],
        vec![
            "generate",
            "--model",
            p,
            "--prompt",
            "hi",
            "--raw",
            "--max-tokens",
            "3",
        ],
        vec![
            "generate",
            "--model",
            p,
            "--prompt",
            "hi",
            "--max-tokens",
            "3",
        ],
        vec![
            "ppl",
            "--model",
            p,
            "--text",
            t,
            "--ctx",
            "16",
            "--dtype",
            "f16",
            "--block-size",
            "16",
        ],
        vec!["batch", "--model", p, "--prompts", pr, "--max-tokens", "2"],
        vec![
            "window-ppl",
            "--model",
            p,
            "--text",
            t,
            "--window",
            "8",
            "--sinks",
            "4",
            "--chunk",
            "4",
            "--block-size",
            "4",
        ],
    ] {
        let r = run_kv(&args, CHILD_TIMEOUT);
        assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn malformed_synthetic_files_fail_cleanly_in_process() {
    let dir = temp_dir().join("in-process");
    std::fs::create_dir_all(&dir).unwrap();
    let cases = synthetic_cases();
    assert!(cases.len() > 200, "{} cases", cases.len());
    let count = |f: Fails| cases.iter().filter(|c| c.fails == f).count();
    eprintln!(
        "{} malformed synthetic files: {} fail the header pre-flight, {} the configuration, \
         {} the model or tokenizer load, {} may parse",
        cases.len(),
        count(Fails::Header),
        count(Fails::Config),
        count(Fails::Load),
        count(Fails::Maybe)
    );
    for (i, case) in cases.iter().enumerate() {
        let path = dir.join(format!("case-{i}.gguf"));
        case.write_to(&path);
        check_in_process(case, &path);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn malformed_synthetic_files_fail_cleanly_in_every_command() {
    let dir = temp_dir().join("commands");
    std::fs::create_dir_all(&dir).unwrap();
    let (text, prompts) = inputs(&dir);
    for (i, case) in synthetic_cases().iter().enumerate() {
        let path = dir.join(format!("case-{i}.gguf"));
        case.write_to(&path);
        check_commands(case, &path, &text, &prompts);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn messages_escape_control_characters_from_the_file() {
    let mut g = tiny_model();
    g.set("general.architecture", Val::str("\u{1b}]0;pwned\u{7}"));
    let path = temp_dir().join("escape.gguf");
    std::fs::write(&path, g.write().bytes).unwrap();
    let r = run_kv(
        &["mem", "--model", path.to_str().unwrap(), "--tokens", "1"],
        CHILD_TIMEOUT,
    );
    assert_clean_failure(&r, "escaped architecture");
    assert!(r.stderr.contains("\\u{1b}]0;pwned"), "{:?}", r.stderr);
}

#[test]
fn non_finite_weights_are_blamed_on_the_model_file() {
    let dir = temp_dir();
    // A NaN stored in a weight: found at load, naming the tensor.
    let mut g = tiny_model();
    g.tensor_mut("blk.0.attn_q.weight").data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let path = dir.join("nan.gguf");
    std::fs::write(&path, g.write().bytes).unwrap();
    let e = kv_model::load(&path).unwrap_err();
    assert!(
        matches!(&e, kv_model::ModelError::NonFiniteWeights { what } if what.contains("attn_q")),
        "{e}"
    );
    // Finite weights so large that the first forward pass overflows: found in the pass,
    // reported as the model file's problem, not the cache's.
    let mut g = tiny_model();
    // The largest finite f32 in every query weight: normalized inputs of magnitude above 1
    // overflow the products, while K and V stay ordinary.
    let t = g.tensor_mut("blk.0.attn_q.weight");
    t.data = t
        .data
        .chunks(4)
        .flat_map(|_| f32::MAX.to_le_bytes())
        .collect();
    let path = dir.join("overflow.gguf");
    std::fs::write(&path, g.write().bytes).unwrap();
    let r = run_kv(
        &[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "hi",
            "--raw",
            "--max-tokens",
            "2",
        ],
        CHILD_TIMEOUT,
    );
    assert_clean_failure(&r, "overflowing weights");
    assert!(r.stderr.contains("model file is corrupt"), "{:?}", r.stderr);
    assert!(!r.stderr.contains("cache:"), "{:?}", r.stderr);
}

#[test]
fn a_ten_million_token_context_costs_nothing_up_front() {
    let mut g = tiny_model();
    g.set("llama.context_length", Val::u32(10_000_000));
    let path = temp_dir().join("long-context.gguf");
    std::fs::write(&path, g.write().bytes).unwrap();
    let started = Instant::now();
    // Under the 2 GiB limit: a precomputed RoPE table for 10M positions alone would take
    // 10M x 2 pairs x 8 bytes, and SmolLM2's 32 pairs 2.6 GB.
    let r = run_kv(
        &[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            "hi",
            "--raw",
            "--max-tokens",
            "2",
        ],
        CHILD_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(started.elapsed() < Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------
// Hostile arguments.

/// The synthetic model, written once per test process.
fn model_file() -> PathBuf {
    let path = temp_dir().join("args-model.gguf");
    if !path.exists() {
        let tmp = temp_dir().join(format!("args-model-{:?}.tmp", std::thread::current().id()));
        std::fs::write(&tmp, tiny_model().write().bytes).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

#[test]
fn no_arguments_shows_the_subcommands() {
    let r = run_kv(&[], CHILD_TIMEOUT);
    assert_eq!(r.code, Some(2));
    for sub in ["generate", "mem", "ppl", "window-ppl", "batch"] {
        assert!(r.stderr.contains(sub), "{sub} missing: {}", r.stderr);
    }
}

#[test]
fn absurd_arguments_fail_before_any_work() {
    let model = model_file();
    let m = model.to_str().unwrap();
    let dir = temp_dir();
    let (text, prompts) = inputs(&dir);
    let (t, pr) = (text.to_str().unwrap(), prompts.to_str().unwrap());
    let long_prompts = dir.join("long-prompts.txt");
    std::fs::write(&long_prompts, format!("hi\n{}\n", "hi ".repeat(200))).unwrap();
    let lp = long_prompts.to_str().unwrap();
    let max = u64::MAX.to_string();
    let big = (1u64 << 50).to_string();
    let long_prompt = "hi ".repeat(100);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["mem", "--preset", "llama-2-7b", "--tokens", &max],
            "--tokens",
        ),
        (vec!["mem", "--model", m, "--tokens", &max], "--tokens"),
        (
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "hi",
                "--max-tokens",
                "0",
            ],
            "max-tokens",
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "hi",
                "--max-tokens",
                &big,
            ],
            "--max-tokens",
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "hi",
                "--block-size",
                "0",
            ],
            "block-size",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "hi", "--window", "0"],
            "window",
        ),
        (
            vec![
                "generate", "--model", m, "--prompt", "hi", "--window", &max, "--sinks", "16",
            ],
            "sinks",
        ),
        (
            vec![
                "generate", "--model", m, "--prompt", "hi", "--window", "1000000",
            ],
            "window",
        ),
        (
            vec![
                "generate", "--model", m, "--prompt", "hi", "--window", "8", "--sinks", "3",
            ],
            "sinks",
        ),
        (
            vec![
                "generate", "--model", m, "--prompt", "hi", "--window", "40", "--sinks", "32",
            ],
            "window",
        ),
        (
            vec!["generate", "--model", m, "--prompt", &long_prompt, "--raw"],
            "context",
        ),
        (
            vec!["generate", "--model", m, "--prompt", "hi", "--top-k", "0"],
            "top-k",
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--prompt",
                "hi",
                "--temperature",
                "NaN",
            ],
            "temperature",
        ),
        (
            vec!["batch", "--model", m, "--prompts", lp, "--max-tokens", "2"],
            "prompt 2",
        ),
        (
            vec!["batch", "--model", m, "--prompts", pr, "--max-tokens", &big],
            "--prompts",
        ),
        (
            vec![
                "batch",
                "--model",
                m,
                "--prompts",
                pr,
                "--max-tokens",
                "2",
                "--blocks",
                &big,
            ],
            "--blocks",
        ),
        (
            vec!["batch", "--model", m, "--prompts", pr, "--block-size", "0"],
            "block-size",
        ),
        (
            vec!["batch", "--model", m, "--prompts", pr, "--max-batch", "0"],
            "max-batch",
        ),
        (vec!["ppl", "--model", m, "--text", t, "--ctx", &big], "ctx"),
        (vec!["ppl", "--model", m, "--text", t, "--ctx", "0"], "ctx"),
        (
            vec!["ppl", "--model", m, "--text", t, "--batch", "0"],
            "batch",
        ),
        (
            vec![
                "ppl", "--model", m, "--text", t, "--ctx", "16", "--chunks", "0",
            ],
            "chunks",
        ),
        (
            vec![
                "window-ppl",
                "--model",
                m,
                "--text",
                t,
                "--window",
                "8",
                "--sinks",
                "0",
                "--chunk",
                "4",
                "--block-size",
                "4",
                "--tokens",
                "0",
            ],
            "tokens",
        ),
        (
            vec![
                "window-ppl",
                "--model",
                m,
                "--text",
                t,
                "--window",
                "8",
                "--sinks",
                "0",
                "--chunk",
                &big,
                "--block-size",
                "4",
            ],
            "--chunk",
        ),
        (
            vec![
                "window-ppl",
                "--model",
                m,
                "--text",
                t,
                "--window",
                "16",
                "--sinks",
                "0",
                "--chunk",
                "16",
                "--block-size",
                "4",
                "--tokens",
                "10",
            ],
            "--chunk",
        ),
        (
            vec![
                "window-ppl",
                "--model",
                m,
                "--text",
                t,
                "--window",
                &max,
                "--sinks",
                "4",
                "--chunk",
                "4",
                "--block-size",
                "4",
            ],
            "sinks",
        ),
        (
            vec![
                "window-ppl",
                "--model",
                m,
                "--text",
                t,
                "--window",
                "60",
                "--sinks",
                "4",
                "--chunk",
                "4",
                "--block-size",
                "4",
            ],
            "window",
        ),
        (
            vec![
                "window-ppl",
                "--model",
                m,
                "--text",
                t,
                "--window",
                "8",
                "--sinks",
                "4",
                "--chunk",
                "4",
                "--block-size",
                "0",
            ],
            "block-size",
        ),
    ];
    for (args, needle) in &cases {
        let r = run_kv(args, CHILD_TIMEOUT);
        let what = format!("kv {}", args.join(" "));
        assert_clean_failure(&r, &what);
        assert!(
            r.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: {needle:?} not in {:?}",
            r.stderr
        );
    }
}

#[test]
fn a_huge_max_tokens_with_a_window_allocates_nothing_up_front() {
    let model = model_file();
    let r = run_kv(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--raw",
            "--window",
            "16",
            "--ignore-stop",
            "--max-tokens",
            &(1u64 << 60).to_string(),
        ],
        Duration::from_secs(3),
    );
    // Still generating when killed: no up-front allocation aborted it.
    assert!(r.timed_out, "exit {:?}: {}", r.code, r.stderr);
    assert!(!r.stdout.is_empty());
}

#[cfg(unix)]
#[test]
fn only_regular_files_are_opened() {
    let dir = temp_dir();
    let fifo = dir.join("fifo");
    if !fifo.exists() {
        let ok = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(ok.success());
    }
    let f = fifo.to_str().unwrap();
    let d = dir.to_str().unwrap();
    let model = model_file();
    let m = model.to_str().unwrap();
    for (args, needle) in [
        (vec!["mem", "--model", f, "--tokens", "1"], "FIFO"),
        (vec!["generate", "--model", f, "--prompt", "hi"], "FIFO"),
        (
            vec!["generate", "--model", d, "--prompt", "hi"],
            "directory",
        ),
        (vec!["ppl", "--model", m, "--text", f], "FIFO"),
        (vec!["window-ppl", "--model", m, "--text", d], "directory"),
        (vec!["batch", "--model", m, "--prompts", f], "FIFO"),
        (
            vec!["batch", "--model", m, "--prompts", "/dev/zero"],
            "device",
        ),
    ] {
        let r = run_kv(&args, Duration::from_secs(10));
        assert_clean_failure(&r, &format!("kv {}", args.join(" ")));
        assert!(r.stderr.contains(needle), "{args:?}: {:?}", r.stderr);
    }
    let e = kv_model::load(&fifo).unwrap_err();
    assert!(
        matches!(e, kv_model::ModelError::NotARegularFile { .. }),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------
// The real model's header (KV_MODEL_PATH, release): cargo test --release -p kv-model
// --test hostile -- --ignored

/// Elements per block and bytes per block of the tensor types SmolLM2's files use.
fn block_of(ty: u32) -> (u64, u64) {
    match ty {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        8 => (32, 34),
        12 => (256, 144),
        14 => (256, 210),
        other => panic!("tensor type {other} in the real model"),
    }
}

/// Parses a GGUF file into the writer's form: metadata values kept as raw bytes, tensor
/// data left as zeros of the right size (written as a sparse hole).
fn parse_real(bytes: &[u8]) -> Gguf {
    struct R<'a> {
        b: &'a [u8],
        pos: usize,
    }
    impl R<'_> {
        fn take(&mut self, n: usize) -> &[u8] {
            let s = &self.b[self.pos..self.pos + n];
            self.pos += n;
            s
        }
        fn u32(&mut self) -> u32 {
            u32::from_le_bytes(self.take(4).try_into().unwrap())
        }
        fn u64(&mut self) -> u64 {
            u64::from_le_bytes(self.take(8).try_into().unwrap())
        }
        fn bytes(&mut self) -> Vec<u8> {
            let n = self.u64() as usize;
            self.take(n).to_vec()
        }
        fn payload(&mut self, ty: u32) -> Val {
            match ty {
                8 => Val::Str(self.bytes()),
                9 => {
                    let t = self.u32();
                    let n = self.u64() as usize;
                    Val::Arr(t, (0..n).map(|_| self.payload(t)).collect())
                }
                t => {
                    let size = match t {
                        0 | 1 | 7 => 1,
                        2 | 3 => 2,
                        4..=6 => 4,
                        _ => 8,
                    };
                    Val::Scalar(t, self.take(size).to_vec())
                }
            }
        }
    }
    let mut r = R { b: bytes, pos: 8 };
    let (nt, nk) = (r.u64(), r.u64());
    let mut kvs = Vec::new();
    for _ in 0..nk {
        let k = String::from_utf8(r.bytes()).unwrap();
        let ty = r.u32();
        kvs.push((k, r.payload(ty)));
    }
    let mut tensors = Vec::new();
    for _ in 0..nt {
        let name = String::from_utf8(r.bytes()).unwrap();
        let nd = r.u32();
        let dims: Vec<u64> = (0..nd).map(|_| r.u64()).collect();
        let ty = r.u32();
        let _offset = r.u64();
        let (block, size) = block_of(ty);
        let n: u64 = dims.iter().product();
        tensors.push(TensorSpec {
            name,
            dims,
            ty,
            data: Vec::new(),
            size: (n / block * size) as usize,
        });
    }
    Gguf { kvs, tensors }
}

/// At most `n` cases, spread evenly over `cases` (the real header has thousands of fields).
fn spread(cases: Vec<Case>, n: usize) -> Vec<Case> {
    let step = cases.len().div_ceil(n).max(1);
    cases.into_iter().step_by(step).collect()
}

#[test]
#[ignore = "needs the real model: KV_MODEL_PATH, release"]
fn malformed_real_headers_fail_cleanly() {
    let Some(path) = std::env::var_os("KV_MODEL_PATH") else {
        panic!("set KV_MODEL_PATH to the SmolLM2 GGUF");
    };
    let bytes = std::fs::read(&path).unwrap();
    let base = parse_real(&bytes);
    let w = base.write();
    assert_eq!(w.len, bytes.len(), "the rewrite changes the file's size");
    assert_eq!(
        &w.bytes[..],
        &bytes[..w.bytes.len()],
        "the rewrite changes the header"
    );
    let (truncated, other): (Vec<Case>, Vec<Case>) = structural_cases(&w)
        .into_iter()
        .partition(|c| c.name.starts_with("truncated"));
    let mut cases = spread(truncated, 50);
    cases.extend(spread(other, 120));
    let sizes: Vec<String> = [
        "block_count",
        "context_length",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.dimension_count",
    ]
    .iter()
    .map(|k| format!("llama.{k}"))
    .collect();
    let size_refs: Vec<&str> = sizes.iter().map(String::as_str).collect();
    cases.extend(metadata_cases(
        &base,
        &size_refs,
        &[
            "llama.rope.freq_base",
            "llama.attention.layer_norm_rms_epsilon",
        ],
    ));
    let dir = temp_dir().join("real");
    std::fs::create_dir_all(&dir).unwrap();
    let (text, prompts) = inputs(&dir);
    let mut counted = 0;
    for (i, case) in cases.iter().enumerate() {
        let p = dir.join(format!("case-{i}.gguf"));
        case.write_to(&p);
        check_in_process_header_only(case, &p);
        let r = run_kv(
            &["mem", "--model", p.to_str().unwrap(), "--tokens", "100"],
            CHILD_TIMEOUT,
        );
        match case.fails {
            Fails::Header | Fails::Config => {
                assert_clean_failure(&r, &format!("{}: kv mem", case.name))
            }
            _ => assert_no_crash(&r, &format!("{}: kv mem", case.name)),
        }
        // The loaders on the metadata cases (the structural ones fail in the same
        // pre-flight as `kv mem`).
        if case.fails != Fails::Header {
            check_commands(case, &p, &text, &prompts);
        }
        std::fs::remove_file(&p).unwrap();
        counted += 1;
    }
    eprintln!("{counted} malformed real-header cases");
}

/// The header entry points only (loading the real weights per case would take minutes).
fn check_in_process_header_only(case: &Case, path: &Path) {
    let what = &case.name;
    let header = std::panic::catch_unwind(|| kv_model::check_gguf_file(path))
        .unwrap_or_else(|_| panic!("{what}: check_gguf_file panicked"));
    let config = std::panic::catch_unwind(|| kv_model::LlamaConfig::from_gguf_file(path))
        .unwrap_or_else(|_| panic!("{what}: LlamaConfig::from_gguf_file panicked"));
    let tokenizer = std::panic::catch_unwind(|| kv_model::Tokenizer::from_gguf_file(path))
        .unwrap_or_else(|_| panic!("{what}: Tokenizer::from_gguf_file panicked"));
    match case.fails {
        Fails::Header => {
            assert!(
                header.is_err() && config.is_err() && tokenizer.is_err(),
                "{what}"
            )
        }
        Fails::Config => assert!(config.is_err(), "{what}"),
        _ => {}
    }
}

#[test]
#[ignore = "needs the real model: KV_MODEL_PATH, release"]
fn a_real_model_claiming_ten_million_tokens_of_context_starts_at_once() {
    let Some(path) = std::env::var_os("KV_MODEL_PATH") else {
        panic!("set KV_MODEL_PATH to the SmolLM2 GGUF");
    };
    let mut bytes = std::fs::read(&path).unwrap();
    // The u32 value after the key "llama.context_length" and its type.
    let key = b"llama.context_length";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key")
        + key.len();
    assert_eq!(&bytes[at..at + 4], &4u32.to_le_bytes(), "a u32 value");
    bytes[at + 4..at + 8].copy_from_slice(&10_000_000u32.to_le_bytes());
    let long = temp_dir().join("real-10m-context.gguf");
    std::fs::write(&long, &bytes).unwrap();
    drop(bytes);
    let started = Instant::now();
    let r = run_kv(
        &[
            "generate",
            "--model",
            long.to_str().unwrap(),
            "--prompt",
            "Hi",
            "--max-tokens",
            "4",
        ],
        CHILD_TIMEOUT,
    );
    let secs = started.elapsed().as_secs_f64();
    std::fs::remove_file(&long).unwrap();
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    // Before: 2.6 GB and 20 s of RoPE tables. Now the run fits the 2 GiB limit, and the
    // time is the model's load and four tokens.
    assert!(secs < 15.0, "{secs:.1} s");
    eprintln!("10M-token context: generate of 4 tokens in {secs:.2} s");
}
