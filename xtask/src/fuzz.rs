//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` and runs each for a bounded
//! time, failing with the reproducer's path when one crashes; `--make-seeds` rewrites the
//! committed GGUF seed corpus from a synthetic file.
//!
//! The build goes to `~/.cache/kv/fuzz-target` (outside the clone, so repeated CI runs are
//! incremental) and the growing corpus to `~/.cache/kv/fuzz-corpus/<target>`; the committed
//! seeds in `fuzz/seeds/<target>` are read, never written. Reproducers land in
//! `fuzz/artifacts/<target>/` (ignored by git).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::{cargo, root, run};

/// Every fuzz target, in the order they run.
pub const TARGETS: &[&str] = &["gguf", "tokenizer", "cache_ops"];

/// Parsed `cargo xtask fuzz` arguments.
#[derive(Debug)]
pub struct Options {
    seconds: u64,
    targets: Vec<String>,
    make_seeds: bool,
}

impl Options {
    /// `[--seconds N] [--make-seeds] [TARGET...]`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut options = Options {
            seconds: 60,
            targets: Vec::new(),
            make_seeds: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--seconds" => {
                    let value = args.next().ok_or("--seconds needs a number")?;
                    options.seconds = value
                        .parse()
                        .ok()
                        .filter(|s| (1..=86_400).contains(s))
                        .ok_or_else(|| {
                            format!("--seconds {value:?}: expected 1..=86400 seconds")
                        })?;
                }
                "--make-seeds" => options.make_seeds = true,
                t if TARGETS.contains(&t) => options.targets.push(t.to_string()),
                other => {
                    return Err(format!(
                        "fuzz: unknown argument {other:?}; targets: {}",
                        TARGETS.join(", ")
                    ))
                }
            }
        }
        if options.targets.is_empty() {
            options.targets = TARGETS.iter().map(|t| t.to_string()).collect();
        }
        Ok(options)
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(".cache")
        .join("kv")
}

/// `cargo +nightly fuzz ...` in `fuzz/`, building into the persistent cache.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly")
        .arg("fuzz")
        .current_dir(root().join("fuzz"))
        .env("CARGO_TARGET_DIR", cache_dir().join("fuzz-target"))
        // rustup's proxy picks the toolchain from `+nightly`; the outer cargo's own
        // variables would point it back at stable.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// Installs cargo-fuzz when `cargo fuzz` is absent.
fn ensure_cargo_fuzz() -> Result<(), String> {
    let present = cargo_fuzz()
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    let mut install = cargo();
    install.args(["install", "cargo-fuzz", "--locked"]);
    run("install cargo-fuzz (absent)", install)
}

/// What one target's run did.
struct Outcome {
    target: String,
    seconds: f64,
    runs: Option<u64>,
    coverage: Option<u64>,
    crash: Option<PathBuf>,
}

/// Runs the fuzz targets; see the module docs.
pub fn fuzz(options: &Options) -> Result<(), String> {
    if options.make_seeds {
        return seeds::write_all(&root().join("fuzz").join("seeds"));
    }
    ensure_cargo_fuzz()?;
    let started = Instant::now();
    // `cargo fuzz build` takes one target or none (all of them).
    let all = options.targets.len() == TARGETS.len();
    let builds: Vec<Option<&String>> = if all {
        vec![None]
    } else {
        options.targets.iter().map(Some).collect()
    };
    for target in builds {
        let mut build = cargo_fuzz();
        build.args(["build", "--debug-assertions"]);
        build.args(target);
        run(
            "build the fuzz targets (nightly, sanitizers, debug assertions)",
            build,
        )?;
    }
    let build_seconds = started.elapsed().as_secs_f64();

    let mut outcomes = Vec::new();
    for target in &options.targets {
        outcomes.push(run_target(target, options.seconds)?);
    }

    println!("\nfuzz: build {build_seconds:.0} s");
    println!(
        "{:<10} {:>8} {:>12} {:>6}  result",
        "target", "seconds", "runs", "cov"
    );
    let show = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
    for o in &outcomes {
        println!(
            "{:<10} {:>8.0} {:>12} {:>6}  {}",
            o.target,
            o.seconds,
            show(o.runs),
            show(o.coverage),
            o.crash
                .as_ref()
                .map_or("no crash".to_string(), |p| format!("CRASH {}", p.display()))
        );
    }
    let crashes: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.crash.as_ref().map(|p| {
                format!(
                    "{}: {} (reproduce: cd fuzz && cargo +nightly fuzz run --debug-assertions {} {})",
                    o.target,
                    p.display(),
                    o.target,
                    p.display()
                )
            })
        })
        .collect();
    if crashes.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "fuzzing found crashes:\n  {}",
            crashes.join("\n  ")
        ))
    }
}

/// Runs one target for `seconds`, echoing libFuzzer's output.
fn run_target(target: &str, seconds: u64) -> Result<Outcome, String> {
    let fuzz_dir = root().join("fuzz");
    let corpus = cache_dir().join("fuzz-corpus").join(target);
    let seeds = fuzz_dir.join("seeds").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    for dir in [&corpus, &seeds, &artifacts] {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let before = artifact_files(&artifacts);
    println!("\n==> fuzz {target} for {seconds} s");
    let mut cmd = cargo_fuzz();
    cmd.args(["run", "--debug-assertions", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // Any one input over 2 GiB or 20 s is a bug: allocations sized by unchecked
        // counts and hangs are what this looks for.
        .arg("-rss_limit_mb=2048")
        .arg("-malloc_limit_mb=2048")
        .arg("-timeout=20")
        .arg("-print_final_stats=1")
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("fuzz {target}: could not start: {e}"))?;
    let (mut runs, mut coverage) = (None, None);
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            if let Some(n) = stat(&line, "stat::number_of_executed_units:") {
                runs = Some(n);
            }
            if let Some(n) = line
                .split_once(" cov: ")
                .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            {
                coverage = Some(n);
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("fuzz {target}: waiting: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let crash = if status.success() {
        None
    } else {
        let new: Vec<PathBuf> = artifact_files(&artifacts)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        Some(new.into_iter().next().unwrap_or_else(|| {
            // libFuzzer failed without writing an input (a build or start problem).
            artifacts.join(format!("(no reproducer written; exit {status})"))
        }))
    };
    Ok(Outcome {
        target: target.to_string(),
        seconds,
        runs,
        coverage,
        crash,
    })
}

fn stat(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?.trim().parse().ok()
}

fn artifact_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// The committed seed corpus: a small synthetic GGUF (a Llama config and a byte-level
/// BPE vocabulary, a few tiny tensors) and malformed variants of it, plus a few inputs for
/// the tokenizer target.
mod seeds {
    use std::path::Path;

    /// A GGUF metadata value, written as the format stores it.
    #[derive(Clone)]
    pub enum Val {
        U32(u32),
        I32(i32),
        U64(u64),
        F32(f32),
        Bool(bool),
        Str(String),
        /// An array of one element type, given as already-encoded elements.
        Array(u32, Vec<Val>),
        /// A value with an arbitrary type tag and payload (wrong or unknown types).
        Raw(u32, Vec<u8>),
    }

    impl Val {
        fn tag(&self) -> u32 {
            match self {
                Val::U32(_) => 4,
                Val::I32(_) => 5,
                Val::F32(_) => 6,
                Val::Bool(_) => 7,
                Val::Str(_) => 8,
                Val::Array(..) => 9,
                Val::U64(_) => 10,
                Val::Raw(t, _) => *t,
            }
        }

        fn payload(&self, out: &mut Vec<u8>) {
            match self {
                Val::U32(v) => out.extend(v.to_le_bytes()),
                Val::I32(v) => out.extend(v.to_le_bytes()),
                Val::U64(v) => out.extend(v.to_le_bytes()),
                Val::F32(v) => out.extend(v.to_le_bytes()),
                Val::Bool(v) => out.push(u8::from(*v)),
                Val::Str(s) => string(out, s),
                Val::Array(tag, items) => {
                    out.extend(tag.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for item in items {
                        item.payload(out);
                    }
                }
                Val::Raw(_, bytes) => out.extend(bytes),
            }
        }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A tensor directory entry and its data.
    #[derive(Clone)]
    pub struct Tensor {
        name: String,
        dims: Vec<u64>,
        ggml_type: u32,
        /// `None`: the next aligned offset.
        offset: Option<u64>,
    }

    /// A GGUF file before encoding.
    #[derive(Clone)]
    pub struct Gguf {
        magic: [u8; 4],
        version: u32,
        /// `None`: the real counts.
        tensor_count: Option<u64>,
        kv_count: Option<u64>,
        metadata: Vec<(String, Val)>,
        tensors: Vec<Tensor>,
    }

    impl Gguf {
        /// The bytes, and the offsets where each structural part starts (for truncation).
        fn encode(&self) -> (Vec<u8>, Vec<(String, usize)>) {
            let mut out = Vec::new();
            let mut marks = Vec::new();
            out.extend(self.magic);
            marks.push(("after-magic".to_string(), out.len()));
            out.extend(self.version.to_le_bytes());
            marks.push(("after-version".to_string(), out.len()));
            let tensors = self.tensor_count.unwrap_or(self.tensors.len() as u64);
            out.extend(tensors.to_le_bytes());
            let kvs = self.kv_count.unwrap_or(self.metadata.len() as u64);
            out.extend(kvs.to_le_bytes());
            marks.push(("after-counts".to_string(), out.len()));
            for (i, (key, val)) in self.metadata.iter().enumerate() {
                string(&mut out, key);
                if i == 0 {
                    marks.push(("after-first-key".to_string(), out.len()));
                }
                out.extend(val.tag().to_le_bytes());
                let start = out.len();
                val.payload(&mut out);
                if matches!(val, Val::Array(..)) && i < 20 {
                    marks.push((format!("mid-array-{key}"), (start + out.len()) / 2));
                }
            }
            marks.push(("after-metadata".to_string(), out.len()));
            let mut offset = 0u64;
            for (i, t) in self.tensors.iter().enumerate() {
                string(&mut out, &t.name);
                out.extend((t.dims.len() as u32).to_le_bytes());
                for d in &t.dims {
                    out.extend(d.to_le_bytes());
                }
                out.extend(t.ggml_type.to_le_bytes());
                out.extend(t.offset.unwrap_or(offset).to_le_bytes());
                if i == 0 {
                    marks.push(("after-first-tensor-info".to_string(), out.len()));
                }
                let bytes = elements(&t.dims).saturating_mul(4);
                offset = offset.saturating_add(bytes.div_ceil(32).saturating_mul(32));
            }
            marks.push(("after-tensor-infos".to_string(), out.len()));
            while out.len() % 32 != 0 {
                out.push(0);
            }
            for (i, t) in self.tensors.iter().enumerate() {
                let n = elements(&t.dims).min(1 << 12) as usize;
                for j in 0..n {
                    out.extend(((j % 7) as f32 * 0.25 - 0.5).to_le_bytes());
                }
                while out.len() % 32 != 0 {
                    out.push(0);
                }
                if i == 0 {
                    marks.push(("after-first-tensor-data".to_string(), out.len()));
                }
            }
            (out, marks)
        }

        fn set(&mut self, key: &str, val: Val) {
            match self.metadata.iter_mut().find(|(k, _)| k == key) {
                Some((_, v)) => *v = val,
                None => self.metadata.push((key.to_string(), val)),
            }
        }
    }

    /// Elements of a tensor, saturated (the generator writes at most 4,096 of them).
    fn elements(dims: &[u64]) -> u64 {
        dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// GPT-2's byte-level alphabet (the same mapping the tokenizer fuzz target uses).
    fn byte_char(b: u8) -> char {
        let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        if printable(b) {
            char::from(b)
        } else {
            let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
            char::from_u32(256 + rank).unwrap_or('?')
        }
    }

    /// A tiny Llama: 2 layers, 4 query heads and 2 KV heads of 16, a 262-token byte-level
    /// vocabulary with ChatML control tokens, and three f32 tensors.
    pub fn synthetic() -> Gguf {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
        let space = byte_char(b' ').to_string();
        let merges = [("h", "e"), ("l", "l"), ("he", "ll"), (space.as_str(), "w")];
        for (a, b) in merges {
            tokens.push(format!("{a}{b}"));
        }
        let mut types = vec![1u32; tokens.len()];
        for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
            tokens.push(special.to_string());
            types.push(3);
        }
        let n_vocab = tokens.len() as u32;
        let arch = |k: &str| format!("llama.{k}");
        let metadata = vec![
            ("general.architecture".into(), Val::Str("llama".into())),
            ("general.alignment".into(), Val::U32(32)),
            (arch("block_count"), Val::U32(2)),
            (arch("context_length"), Val::U32(256)),
            (arch("embedding_length"), Val::U32(64)),
            (arch("feed_forward_length"), Val::U32(128)),
            (arch("attention.head_count"), Val::U32(4)),
            (arch("attention.head_count_kv"), Val::U32(2)),
            (arch("rope.dimension_count"), Val::U32(16)),
            (arch("rope.freq_base"), Val::F32(10_000.0)),
            (arch("attention.layer_norm_rms_epsilon"), Val::F32(1e-5)),
            (arch("vocab_size"), Val::U32(n_vocab)),
            ("tokenizer.ggml.model".into(), Val::Str("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Val::Str("smollm".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Val::Array(8, tokens.into_iter().map(Val::Str).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Val::Array(5, types.into_iter().map(|t| Val::I32(t as i32)).collect()),
            ),
            (
                "tokenizer.ggml.merges".into(),
                Val::Array(
                    8,
                    merges
                        .iter()
                        .map(|(a, b)| Val::Str(format!("{a} {b}")))
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Val::U32(n_vocab - 2)),
            ("tokenizer.ggml.eos_token_id".into(), Val::U32(n_vocab - 1)),
            ("tokenizer.ggml.add_bos_token".into(), Val::Bool(false)),
            (
                "tokenizer.chat_template".into(),
                Val::Str(
                    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
                     {{ message['content'] }}<|im_end|>\n{% endfor %}"
                        .into(),
                ),
            ),
        ];
        let tensor = |name: &str, dims: &[u64]| Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type: 0,
            offset: None,
        };
        Gguf {
            magic: *b"GGUF",
            version: 3,
            tensor_count: None,
            kv_count: None,
            metadata,
            tensors: vec![
                tensor("token_embd.weight", &[64, 8]),
                tensor("output_norm.weight", &[64]),
                tensor("blk.0.attn_norm.weight", &[64]),
            ],
        }
    }

    /// Every seed: the synthetic file and its malformed variants, by name.
    pub fn gguf_seeds() -> Vec<(String, Vec<u8>)> {
        let base = synthetic();
        let (bytes, marks) = base.encode();
        let mut seeds = vec![("valid".to_string(), bytes.clone())];
        for (name, at) in &marks {
            seeds.push((format!("truncated-{name}"), bytes[..*at].to_vec()));
        }
        let mut variant = |name: &str, edit: &dyn Fn(&mut Gguf)| {
            let mut g = base.clone();
            edit(&mut g);
            seeds.push((name.to_string(), g.encode().0));
        };
        variant("bad-magic", &|g| g.magic = *b"GGUG");
        for v in [1u32, 2, 4, u32::MAX] {
            variant(&format!("version-{v}"), &|g| g.version = v);
        }
        variant("tensor-count-max", &|g| g.tensor_count = Some(u64::MAX));
        variant("kv-count-max", &|g| g.kv_count = Some(u64::MAX));
        variant("kv-count-plus-one", &|g| {
            g.kv_count = Some(g.metadata.len() as u64 + 1)
        });
        for (name, val) in [
            ("alignment-0", Val::U32(0)),
            ("alignment-3", Val::U32(3)),
            ("alignment-max", Val::U32(u32::MAX)),
            ("alignment-string", Val::Str("32".into())),
        ] {
            variant(name, &|g| g.set("general.alignment", val.clone()));
        }
        let keys = [
            "block_count",
            "context_length",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.dimension_count",
            "vocab_size",
        ];
        for key in keys {
            let full = format!("llama.{key}");
            for (label, val) in [
                ("zero", Val::U32(0)),
                ("max-u32", Val::U32(u32::MAX)),
                ("max-u64", Val::U64(u64::MAX)),
                ("negative", Val::I32(-1)),
                ("string", Val::Str("12".into())),
            ] {
                variant(&format!("{key}-{label}"), &|g| g.set(&full, val.clone()));
            }
        }
        variant("head-count-kv-3", &|g| {
            g.set("llama.attention.head_count_kv", Val::U32(3))
        });
        variant("rope-freq-base-nan", &|g| {
            g.set("llama.rope.freq_base", Val::F32(f32::NAN))
        });
        variant("rms-eps-negative", &|g| {
            g.set("llama.attention.layer_norm_rms_epsilon", Val::F32(-1.0))
        });
        variant("architecture-gpt2", &|g| {
            g.set("general.architecture", Val::Str("gpt2".into()))
        });
        variant("architecture-u32", &|g| {
            g.set("general.architecture", Val::U32(7))
        });
        variant("value-type-unknown", &|g| {
            g.set("llama.block_count", Val::Raw(99, vec![2, 0, 0, 0]))
        });
        variant("string-length-max", &|g| {
            g.set(
                "tokenizer.ggml.model",
                Val::Raw(8, u64::MAX.to_le_bytes().to_vec()),
            )
        });
        variant("array-length-max", &|g| {
            let mut raw = 8u32.to_le_bytes().to_vec();
            raw.extend(u64::MAX.to_le_bytes());
            g.set("tokenizer.ggml.merges", Val::Raw(9, raw))
        });
        variant("nested-array", &|g| {
            g.set(
                "tokenizer.ggml.merges",
                Val::Array(9, vec![Val::Array(8, vec![Val::Str("h e".into())])]),
            )
        });
        variant("tokens-empty", &|g| {
            g.set("tokenizer.ggml.tokens", Val::Array(8, Vec::new()))
        });
        variant("tokens-not-strings", &|g| {
            g.set("tokenizer.ggml.tokens", Val::Array(4, vec![Val::U32(1); 4]))
        });
        variant("merge-without-space", &|g| {
            g.set(
                "tokenizer.ggml.merges",
                Val::Array(8, vec![Val::Str("he".into())]),
            )
        });
        variant("merge-unknown-token", &|g| {
            g.set(
                "tokenizer.ggml.merges",
                Val::Array(8, vec![Val::Str("q\u{1f600} z".into())]),
            )
        });
        variant("eos-out-of-range", &|g| {
            g.set("tokenizer.ggml.eos_token_id", Val::U32(u32::MAX))
        });
        variant("token-type-short", &|g| {
            g.set(
                "tokenizer.ggml.token_type",
                Val::Array(5, vec![Val::I32(1)]),
            )
        });
        variant("tokenizer-model-llama", &|g| {
            g.set("tokenizer.ggml.model", Val::Str("llama".into()))
        });
        variant("tensor-dims-1000", &|g| {
            g.tensors[0].dims = vec![1; 1000];
        });
        variant("tensor-dim-max", &|g| {
            g.tensors[0].dims = vec![u64::MAX, u64::MAX];
        });
        variant("tensor-type-unknown", &|g| g.tensors[0].ggml_type = 999);
        variant("tensor-offset-past-end", &|g| {
            g.tensors[1].offset = Some(u64::MAX - 3)
        });
        variant("tensor-offset-unaligned", &|g| {
            g.tensors[1].offset = Some(7)
        });
        variant("tensor-name-control-chars", &|g| {
            g.tensors[0].name = "tok\u{1b}[31m\n\u{7}".into()
        });
        seeds
    }

    /// Inputs for the tokenizer target (its `Input` is derived by `arbitrary`, so any bytes
    /// do; these start it off near interesting text).
    fn tokenizer_seeds() -> Vec<(String, Vec<u8>)> {
        [
            ("hello", "\u{0}hello world 12345"),
            ("chatml", "\u{1}<|im_start|>user\nhi<|im_end|>\n"),
            (
                "unicode",
                "\u{0}caf\u{e9} \u{1f600}\u{200d}\u{1f9d1} \u{feff}",
            ),
            ("controls", "\u{1}\u{1b}[31m\r\n\t\u{7f}"),
        ]
        .into_iter()
        .map(|(name, text)| (name.to_string(), text.as_bytes().to_vec()))
        .collect()
    }

    /// Writes every seed under `dir/<target>/`.
    pub fn write_all(dir: &Path) -> Result<(), String> {
        for (target, seeds) in [("gguf", gguf_seeds()), ("tokenizer", tokenizer_seeds())] {
            let target_dir = dir.join(target);
            std::fs::create_dir_all(&target_dir)
                .map_err(|e| format!("creating {}: {e}", target_dir.display()))?;
            let mut total = 0;
            for (name, bytes) in &seeds {
                let path = target_dir.join(name);
                std::fs::write(&path, bytes)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                total += bytes.len();
            }
            println!(
                "{target}: {} seeds, {total} bytes, in {}",
                seeds.len(),
                target_dir.display()
            );
        }
        Ok(())
    }
}
