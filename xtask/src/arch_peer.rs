//! `cargo xtask arch-peer`: every architecture kv runs, checked against llama.cpp on small
//! synthetic models (no small real Qwen 2/3 or Llama 3 GGUF can be fetched here). Each model
//! (kv-model's `arch_model` example: a few layers, GQA, the architecture's own parts,
//! deterministic weights scaled so the model is confident) carries the tokenizer metadata of
//! the llama.cpp vocabulary its family ships with, so both engines tokenize the same text.
//! Both then continue a prompt greedily (llama.cpp's llama-simple, `kv generate
//! --temperature 0 --raw`) and score the same chunks of a text (`kv ppl --dtype f16
//! --bos-first`, llama-perplexity).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::llama_cpp::{check_dir, ensure_build, ensure_program, ppl_pair, PplPair, COMMIT};

/// (name, llama.cpp vocabulary) of the architectures the example writes.
const ARCHS: [(&str, &str); 4] = [
    ("llama", "ggml-vocab-llama-spm.gguf"),
    ("llama3", "ggml-vocab-llama-bpe.gguf"),
    ("qwen2", "ggml-vocab-qwen2.gguf"),
    ("qwen3", "ggml-vocab-qwen2.gguf"),
];
/// The weight types both engines read.
const TYPES: [&str; 3] = ["f32", "f16", "q8_0"];
/// The prompt both engines continue.
const PROMPT: &str = "The GNU General Public License is a free, copyleft license for";

/// What `cargo xtask arch-peer` was asked for.
pub struct Options {
    pub archs: Vec<String>,
    pub types: Vec<String>,
    /// Greedy tokens to generate.
    pub tokens: usize,
    pub ctx: usize,
    /// Perplexity chunks scored on both sides.
    pub chunks: usize,
    pub threads: usize,
    pub text: Option<PathBuf>,
    pub llama_cpp: Option<PathBuf>,
}

impl Options {
    /// Parses the arguments after `arch-peer`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Self {
            archs: ARCHS.iter().map(|a| a.0.to_string()).collect(),
            types: vec!["f16".into(), "q8_0".into()],
            tokens: 32,
            ctx: 128,
            chunks: 8,
            threads: 2,
            text: None,
            llama_cpp: None,
        };
        let mut it = args.iter();
        let positive = |flag: &str, v: &str, min: usize| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n >= min)
                .ok_or_else(|| format!("{flag} {v:?}: expected a number >= {min}"))
        };
        while let Some(a) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--arch" => {
                    o.archs = value()?.split(',').map(str::to_string).collect();
                    if let Some(bad) = o.archs.iter().find(|a| !ARCHS.iter().any(|k| k.0 == *a)) {
                        return Err(format!(
                            "--arch {bad:?}: expected one of {}",
                            ARCHS.map(|a| a.0).join(", ")
                        ));
                    }
                }
                "--types" => {
                    o.types = value()?.split(',').map(str::to_string).collect();
                    if let Some(bad) = o.types.iter().find(|t| !TYPES.contains(&t.as_str())) {
                        return Err(format!(
                            "--types {bad:?}: expected one of {}",
                            TYPES.join(", ")
                        ));
                    }
                }
                "--tokens" => o.tokens = positive(a, value()?, 1)?,
                "--ctx" => o.ctx = positive(a, value()?, 4)?,
                "--chunks" => o.chunks = positive(a, value()?, 1)?,
                "--threads" => o.threads = positive(a, value()?, 1)?,
                "--text" => o.text = Some(PathBuf::from(value()?)),
                "--llama-cpp" => o.llama_cpp = Some(PathBuf::from(value()?)),
                other => return Err(format!("arch-peer: unknown argument {other:?}")),
            }
        }
        Ok(o)
    }
}

/// How the two greedy continuations compare.
#[derive(Debug, PartialEq)]
pub enum Greedy {
    /// The same text (`n` bytes).
    Same(usize),
    /// They part at this byte; the text from there on, kv's and llama.cpp's.
    Differ(usize, String, String),
}

/// The continuation in llama-simple's stdout: it prints every prompt token's piece (BOS
/// included, SentencePiece's leading space too), the generated pieces and a newline, so the
/// continuation starts after the prompt's first occurrence.
pub fn llama_continuation(stdout: &str, prompt: &str) -> Option<String> {
    let at = stdout.find(prompt)? + prompt.len();
    let rest = &stdout[at..];
    Some(rest.strip_suffix('\n').unwrap_or(rest).to_string())
}

/// Compares kv's continuation with llama.cpp's.
pub fn compare(kv: &str, llama: &str) -> Greedy {
    if kv == llama {
        return Greedy::Same(kv.len());
    }
    let at = kv
        .bytes()
        .zip(llama.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    let from = |s: &str| String::from_utf8_lossy(&s.as_bytes()[at.min(s.len())..]).into_owned();
    Greedy::Differ(at, from(kv), from(llama))
}

/// Runs `cmd`, returning stdout and stderr; fails with both when it fails.
fn output(what: &str, mut cmd: Command) -> Result<(String, String), String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{what}: could not start: {e}"))?;
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    if !out.status.success() {
        return Err(format!("{what} failed ({}):\n{so}{se}", out.status));
    }
    Ok((so, se))
}

/// `cargo xtask arch-peer`.
pub fn arch_peer(o: &Options) -> Result<(), String> {
    let started = std::time::Instant::now();
    let bin = match &o.llama_cpp {
        Some(dir) => check_dir(dir)?,
        None => ensure_build()?,
    };
    let simple = ensure_program(&bin, "llama-simple")?;
    let vocab = crate::vocab::ensure_vocab()?;
    let text = o.text.clone().unwrap_or_else(|| {
        crate::root()
            .join("..")
            .join("shared")
            .join("corpus")
            .join("gpl-3.txt")
    });
    if !text.is_file() {
        return Err(format!(
            "{}: no such text file (--text FILE)",
            text.display()
        ));
    }
    // One dev-profile build (dependencies and kernels at opt-level 3) for kv and the
    // writer: the tests build the same artifacts, and a correctness check needs no release.
    let mut build = crate::cargo();
    build.args([
        "build",
        "-p",
        "kv-model",
        "--bin",
        "kv",
        "--example",
        "arch_model",
    ]);
    crate::run(
        "build kv and the model writer (kv-model example arch_model)",
        build,
    )?;
    let debug = crate::root().join("target").join("debug");
    let (kv, writer) = (debug.join("kv"), debug.join("examples").join("arch_model"));
    let target = crate::root().join("target");
    let dir = crate::fetch::cache_dir("KV_ARCH_PEER_DIR", "arch-peer");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let threads = o.threads.to_string();
    let mut md = format!(
        "# Architectures: kv against llama.cpp {COMMIT} on synthetic models\n\n\
         Greedy: `{PROMPT}` continued for {} tokens by llama-simple and `kv generate \
         --temperature 0 --raw --dtype f16` (Q8_0 models: `--activations q8` in kv, as llama.cpp rounds activations for Q8_0 weights). Perplexity: `{}`, ctx {}, first {} chunks, `kv ppl \
         --dtype f16 --bos-first` and `llama-perplexity -c {} -b {}`; {threads} threads.\n\n\
         | model | vocabulary | greedy kv vs llama.cpp | kv ppl | llama.cpp ppl (+/-) | kv / llama.cpp - 1 |\n\
         |---|---|---|---:|---:|---:|\n",
        o.tokens,
        text.file_name()
            .map_or_else(|| text.display().to_string(), |n| n.to_string_lossy().into_owned()),
        o.ctx,
        o.chunks,
        o.ctx,
        o.ctx
    );
    let mut failures = Vec::new();
    for arch in &o.archs {
        let Some(&(_, vocab_file)) = ARCHS.iter().find(|a| a.0 == arch) else {
            continue;
        };
        for ty in &o.types {
            let model = dir.join(format!("{arch}-{ty}.gguf"));
            let mut write = Command::new(&writer);
            write
                .args([arch, ty])
                .arg(vocab.join(vocab_file))
                .arg(&model);
            output(&format!("write {}", model.display()), write)?;
            let name = format!("{arch} {ty}");
            // llama.cpp rounds activations to 8 bits (q8_0 blocks) to meet Q8_0 weights:
            // kv's `--activations q8` does the same.
            let act: &[&str] = if ty == "q8_0" {
                &["--activations", "q8"]
            } else {
                &[]
            };
            let n = o.tokens.to_string();
            let mut cmd = Command::new(&simple);
            cmd.arg("-m").arg(&model).args(["-n", &n, PROMPT]);
            let (llama_out, _) = output(&format!("llama-simple, {name}"), cmd)?;
            let llama = llama_continuation(&llama_out, PROMPT).ok_or_else(|| {
                format!("llama-simple, {name}: the prompt is not in its output {llama_out:?}")
            })?;
            let mut cmd = Command::new(&kv);
            cmd.args(["--threads", &threads, "generate", "--model"])
                .arg(&model)
                .args(["--prompt", PROMPT, "--raw", "--temperature", "0"])
                .args(["--max-tokens", &n, "--dtype", "f16"])
                .args(act);
            let (kv_out, _) = output(&format!("kv generate, {name}"), cmd)?;
            let kv_text = kv_out.strip_suffix('\n').unwrap_or(&kv_out);
            let greedy = match compare(kv_text, &llama) {
                Greedy::Same(bytes) => format!("identical ({bytes} bytes)"),
                Greedy::Differ(at, k, l) => {
                    failures.push(format!("{name}: greedy differs at byte {at}"));
                    format!("differ at byte {at}: kv {k:?} / llama.cpp {l:?}")
                }
            };
            println!("{name}: greedy {greedy}");
            let PplPair {
                kv_ppl,
                l_ppl,
                l_err,
                chunks,
                l_chunks,
                ..
            } = ppl_pair(
                &kv,
                &bin,
                &model,
                &text,
                o.ctx,
                o.threads,
                Some(o.chunks),
                act,
            )?;
            let rel = 100.0 * (kv_ppl / l_ppl - 1.0);
            if rel.abs() > 1.0 || l_chunks != Some(chunks) {
                failures.push(format!("{name}: perplexity {rel:+.2}%"));
            }
            let line = format!(
                "| {name} | {} | {greedy} | {kv_ppl:.4} | {l_ppl:.4} (+/- {l_err:.4}) | {rel:+.3}% |\n",
                vocab_file.trim_start_matches("ggml-vocab-").trim_end_matches(".gguf")
            );
            print!("{line}");
            md.push_str(&line);
        }
    }
    let out = target.join("kv-bench");
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let path = out.join("arch-peer.md");
    std::fs::write(&path, &md).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!(
        "\n{md}\narch-peer: {} ({:.0} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("arch-peer: {}", failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_continuation_follows_the_echoed_prompt() {
        let out = "<s> The GNU General Public License is a free, copyleft license for cats.\n";
        assert_eq!(llama_continuation(out, PROMPT).as_deref(), Some(" cats."));
        assert_eq!(llama_continuation("nothing", PROMPT), None);
    }

    #[test]
    fn comparisons_name_the_first_differing_byte() {
        assert_eq!(compare("abc", "abc"), Greedy::Same(3));
        assert_eq!(
            compare("abXd", "abYd"),
            Greedy::Differ(2, "Xd".into(), "Yd".into())
        );
        assert_eq!(
            compare("ab", "abc"),
            Greedy::Differ(2, String::new(), "c".into())
        );
    }

    #[test]
    fn options_are_checked() {
        let a = |s: &[&str]| Options::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert!(a(&["--arch", "gpt9"]).is_err());
        assert!(a(&["--types", "q4_k"]).is_err());
        assert!(a(&["--ctx", "2"]).is_err());
        let o = a(&["--arch", "qwen3", "--types", "f32", "--tokens", "5"]).unwrap();
        assert_eq!(
            (o.archs, o.types, o.tokens),
            (vec!["qwen3".to_string()], vec!["f32".to_string()], 5)
        );
    }
}
