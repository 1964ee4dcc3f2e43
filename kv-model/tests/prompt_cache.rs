//! `--prompt-cache` on the real model (ignored: `KV_MODEL_PATH`, release): a second run
//! with the same prefix loads it, prefills only the rest and generates the same greedy
//! tokens as a run without a file; a file from another model or with a flipped bit is
//! reported and not used, with the same tokens again. Also through the `kv` binary.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use kv_attention::PagedCache;
use kv_backend_cpu::CpuBackend;
use kv_core::content::Fingerprint;
use kv_core::{KiviBits, KvDType, QuantGroup, StorageSpec};
use kv_model::{CacheLayout, GenerateOptions, Logits, Model, Sampler, Tokenizer};

const SYSTEM: &str = "You are a careful assistant. Answer in plain English, briefly, and \
    never invent facts. If a question is ambiguous, say so. Examples: Q: What is 2 + 2? \
    A: 4. Q: Which planet is largest? A: Jupiter. Q: Who wrote Hamlet? A: Shakespeare.";

fn model_path() -> PathBuf {
    match std::env::var_os("KV_MODEL_PATH") {
        Some(p) => PathBuf::from(p),
        None => panic!("set KV_MODEL_PATH to the SmolLM2 GGUF"),
    }
}

/// What the tests share: the model, 12 greedy tokens, and two prompts sharing the system
/// prompt (`common` tokens).
struct Setup {
    path: PathBuf,
    model: Model,
    tokenizer: Tokenizer,
    options: GenerateOptions,
    a: Vec<u32>,
    b: Vec<u32>,
    common: usize,
}

fn setup() -> Setup {
    let path = model_path();
    let model = Model::load(&path).unwrap();
    let tokenizer = Tokenizer::from_gguf_file(&path).unwrap();
    let options = GenerateOptions {
        max_tokens: 12,
        ..GenerateOptions::default()
    };
    let a = tokenizer
        .encode(&format!("{SYSTEM} Q: What is the capital of France? A:"))
        .unwrap();
    let b = tokenizer
        .encode(&format!("{SYSTEM} Q: Name a large ocean. A:"))
        .unwrap();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(common > 48, "the prompts share {common} tokens");
    Setup {
        path,
        model,
        tokenizer,
        options,
        a,
        b,
        common,
    }
}

fn temp_file(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-prompt-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(format!("{tag}.kvc"));
    let _ = std::fs::remove_file(&f);
    f
}

#[test]
#[ignore = "needs the real model: KV_MODEL_PATH, release"]
fn second_run_prefills_only_the_suffix_with_the_same_tokens() {
    let Setup {
        path,
        model,
        tokenizer,
        options,
        a,
        b,
        common,
    } = setup();
    for layout in [
        CacheLayout::default(),
        CacheLayout {
            dtype: KvDType::Int4 {
                group: QuantGroup::G32,
            },
            block_size: 16,
        },
        CacheLayout {
            dtype: KvDType::kivi(KiviBits::B4),
            block_size: 32,
        },
    ] {
        let bs = layout.block_size;
        let file = temp_file(&layout.dtype.to_string());
        let fp = kv_model::model_fingerprint(&path, &model, &tokenizer, layout, "cpu").unwrap();
        let plain = |p: &[u32]| {
            model
                .generate(CpuBackend::new(), layout, p, &options, |_| Ok(()))
                .unwrap()
                .tokens
        };
        let cached = |p: &[u32], fp: Fingerprint| {
            model
                .generate_with_prompt_cache(
                    CpuBackend::new(),
                    layout,
                    fp,
                    &file,
                    p,
                    &options,
                    |_| Ok(()),
                )
                .unwrap()
        };
        // The exact reference of a run with the file: the cache states that wrote the
        // file, replayed. Each step truncates the sequence to `from` tokens and prefills
        // `prompt[from..]`, as the run that saved the blocks did and as the run that loads
        // them does; then greedy decoding. Loaded K/V is bit for bit what was saved, so the
        // tokens must be equal. (Against one prefill of the whole prompt, activations can
        // round differently, since matrix kernels differ by row count, and a 4-bit layout
        // can turn that into another greedy token.)
        let replay = |steps: &[(&[u32], usize)]| -> Vec<u32> {
            let longest = steps.iter().map(|(p, _)| p.len()).max().unwrap();
            let blocks = (longest + options.max_tokens).div_ceil(bs);
            let spec = StorageSpec::new(model.shape(), layout.dtype, bs, blocks).unwrap();
            let mut cache = PagedCache::new(CpuBackend::new(), spec).unwrap();
            let seq = cache.create_sequence();
            let mut logits = None;
            for &(p, from) in steps {
                if cache.len(seq).unwrap() > from {
                    cache.truncate(seq, from).unwrap();
                }
                logits = Some(
                    model
                        .forward(&p[from..], &mut cache, seq, Logits::Last)
                        .unwrap(),
                );
            }
            let mut logits = logits.unwrap();
            let mut sampler = Sampler::new(options.sampling).unwrap();
            let mut out = Vec::new();
            while out.len() < options.max_tokens {
                let l: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
                let t = sampler.sample(&l).unwrap();
                out.push(t);
                logits = model.forward(&[t], &mut cache, seq, Logits::Last).unwrap();
            }
            out
        };
        let (s2, s3) = (common / bs * bs, (b.len() - 1) / bs * bs);
        let (want_a, want_b) = (plain(&a), plain(&b));
        let f16 = layout.dtype == KvDType::F16;
        // First run: nothing to load; the prompt's full blocks are saved.
        let (run, report) = cached(&a, fp);
        assert_eq!(run.tokens, want_a, "{layout:?}");
        assert_eq!((report.loaded_tokens, report.load_error), (0, None));
        assert_eq!(report.saved_tokens, a.len() / bs * bs);
        // Another question after the same system prompt: the shared full blocks load.
        let (run, report) = cached(&b, fp);
        assert_eq!(report.loaded_tokens, common / bs * bs, "{layout:?}");
        assert_eq!(run.tokens, replay(&[(&a, 0), (&b, s2)]), "{layout:?}");
        if f16 {
            // And, for f16 on these prompts, the tokens of one whole prefill.
            assert_eq!(run.tokens, want_b);
        }
        assert!(report.loaded_bytes > 0);
        // The same prompt again (the file now holds b's blocks): all but the last token's
        // block of what b shares with a.
        let (run, report) = cached(&b, fp);
        assert_eq!(report.loaded_tokens, s3, "{layout:?}");
        assert_eq!(
            run.tokens,
            replay(&[(&a, 0), (&b, s2), (&b, s3)]),
            "{layout:?}"
        );
        assert_eq!(report.saved_tokens, 0, "nothing new to save");
        // Another model's fingerprint: refused, recomputed, same tokens.
        let other = Fingerprint::of_parts(&[("another model", b"")]);
        let bytes = std::fs::read(&file).unwrap();
        let (run, report) = cached(&b, other);
        assert_eq!(run.tokens, want_b);
        assert_eq!(report.loaded_tokens, 0);
        assert!(report.load_error.unwrap().contains("another model"));
        // A flipped bit in the block data: detected by its checksum, same tokens.
        let mut flipped = bytes.clone();
        let at = flipped.len() - 100;
        flipped[at] ^= 0x10;
        std::fs::write(&file, &flipped).unwrap();
        let (run, report) = cached(&b, fp);
        assert_eq!(run.tokens, want_b);
        assert_eq!(report.loaded_tokens, 0);
        assert!(
            report.load_error.unwrap().contains("checksum"),
            "{layout:?}"
        );
        // ...and the run saved a good file again over it.
        let (run, report) = cached(&b, fp);
        assert_eq!(report.loaded_tokens, s3);
        assert_eq!(run.tokens, replay(&[(&b, 0), (&b, s3)]));
        std::fs::remove_file(&file).unwrap();
    }
}

#[test]
#[ignore = "needs the real model: KV_MODEL_PATH, release"]
fn kv_generate_prompt_cache_reports_the_loaded_tokens() {
    let file = temp_file("cli");
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_kv"))
            .args([
                "generate",
                "--max-tokens",
                "8",
                "--prompt",
                SYSTEM,
                "--prompt-cache",
            ])
            .arg(&file)
            .arg("--model")
            .arg(model_path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (text1, err1) = run();
    assert!(
        err1.contains("prompt cache") && err1.contains(": 0 of "),
        "{err1}"
    );
    let (text2, err2) = run();
    assert_eq!(text1, text2, "same greedy text");
    assert!(
        !err2.contains(": 0 of "),
        "the second run loaded tokens: {err2}"
    );
    std::fs::remove_file(&file).unwrap();
}

#[test]
#[ignore = "needs the real model: KV_MODEL_PATH, release"]
fn a_disk_store_restores_the_shared_prefix_with_the_same_tokens() {
    use kv_attention::store::{BlockStore, DiskStore};
    let Setup {
        path,
        model,
        tokenizer,
        options,
        a,
        b,
        common,
    } = setup();
    let layout = CacheLayout::default();
    let bs = layout.block_size;
    let fp = kv_model::model_fingerprint(&path, &model, &tokenizer, layout, "cpu").unwrap();
    let dir = std::env::temp_dir().join(format!("kv-disk-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let want_b = model
        .generate(CpuBackend::new(), layout, &b, &options, |_| Ok(()))
        .unwrap()
        .tokens;
    let run = |p: &[u32]| {
        let tier: Box<dyn BlockStore> = Box::new(DiskStore::open(&dir, 1 << 30).unwrap());
        model
            .generate_with_store(
                CpuBackend::new(),
                layout,
                fp,
                vec![tier],
                p,
                &options,
                |_| Ok(()),
            )
            .unwrap()
    };
    let (_, first) = run(&a);
    assert_eq!(first.reused_tokens, 0);
    assert!(first.stats.bytes_saved > 0);
    // Another process (here: another cache) with the same system prompt restores it.
    let (gen, second) = run(&b);
    assert_eq!(gen.tokens, want_b);
    assert_eq!(second.reused_tokens, common / bs * bs);
    assert_eq!(second.stats.hits as usize, common / bs);
    // A flipped bit in every stored block: all rejected, recomputed, same tokens.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        let mut bytes = std::fs::read(&p).unwrap();
        let at = bytes.len() - 7;
        bytes[at] ^= 1;
        std::fs::write(&p, bytes).unwrap();
    }
    let (gen, third) = run(&b);
    assert_eq!(gen.tokens, want_b);
    assert_eq!((third.reused_tokens, third.stats.rejected), (0, 1));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "needs the real model: KV_MODEL_PATH, release"]
fn kv_batch_store_restores_a_later_runs_prefixes_with_the_same_tokens() {
    let dir = std::env::temp_dir().join(format!("kv-batch-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.txt");
    let questions: Vec<String> = ["capital of France", "largest planet", "author of Hamlet"]
        .iter()
        .map(|q| format!("{SYSTEM} Q: What is the {q}? A:"))
        .collect();
    std::fs::write(&prompts, questions.join("\n")).unwrap();
    let store = format!("disk:{}", dir.join("blocks").display());
    // A cache of 12 blocks cannot hold three prompts: blocks are evicted (and written
    // down) and sequences preempted on the way.
    let run = |store: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kv"));
        cmd.args(["batch", "--max-tokens", "8", "--blocks", "12", "--prompts"])
            .arg(&prompts)
            .arg("--model")
            .arg(model_path());
        if let Some(s) = store {
            cmd.args(["--store", s]);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let replies: Vec<String> = stdout
            .lines()
            .filter(|l| l.trim_start().starts_with("->"))
            .map(str::to_string)
            .collect();
        let store_line = stdout
            .lines()
            .find(|l| l.starts_with("store "))
            .map(str::to_string);
        (replies, store_line)
    };
    let (plain, none) = run(None);
    assert_eq!(plain.len(), 3);
    assert!(none.is_none());
    let (first, line1) = run(Some(&store));
    let line1 = line1.unwrap();
    assert_eq!(first, plain, "same greedy tokens with the store");
    assert!(line1.contains("bytes written"), "{line1}");
    // The second run restores the system prompt's blocks the first one wrote down.
    let (second, line2) = run(Some(&store));
    let line2 = line2.unwrap();
    assert_eq!(second, plain);
    let hits: u64 = line2
        .split_once(" block hits")
        .and_then(|(head, _)| head.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(hits > 0, "{line2}");
    std::fs::remove_dir_all(&dir).unwrap();
}
