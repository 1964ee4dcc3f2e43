//! End-to-end decode and prefill tokens/s of kv's model on the GPU, at several depths of
//! cached context, on a synthetic SmolLM2-shape Q4_1 model written here (or `--model`).
//!
//! ```text
//! cargo run --release -p kv-model --features cuda --example gpu_model_bench -- \
//!     [--model FILE] [--dir DIR] [--depths 0,1024,4096] [--prefill 256] [--decode 64] \
//!     [--dtype f16] [--weights quantized|f32] [--json FILE]
//! cargo run --release -p kv-model --features cuda --example gpu_model_bench -- \
//!     --write-model FILE
//! ```
//!
//! At each depth D two timed runs end with D tokens cached: one forward pass of
//! `--prefill` tokens after D - prefill cached ones (prefill tokens/s), and, on a fresh
//! sequence, `--decode` single-token steps after D - decode cached ones, each ending with
//! the greedy token on the host (decode tokens/s). The cached context is written first in
//! 512-token chunks, not timed. Ending at D (rather than starting there) is the schedule
//! of the candle peer (`xtask/candle-peer --end-at-depth`), whose model holds at most 4096
//! positions, so the GPU bundle compares both at D = 4096. The one token id copied back
//! per step is what synchronises with the device, so the times include all GPU work. A
//! warm-up pass at depth 0 runs first.
//!
//! `--write-model FILE` only writes the synthetic model (no device needed), so the bundle
//! runs kv and the peer on the same file. Without a GPU the bench says so and exits with
//! status 2.

#[path = "../tests/common/gguf.rs"]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a test helper: its asserts are its checks
mod gguf;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use kv_attention::PagedCache;
use kv_core::{CacheBackend, KvDType, StorageSpec};
use kv_model::{Logits, ModelError, WeightFormat};

struct Args {
    model: Option<PathBuf>,
    write_model: Option<PathBuf>,
    dir: PathBuf,
    depths: Vec<usize>,
    prefill: usize,
    decode: usize,
    dtype: KvDType,
    weights: WeightFormat,
    json: Option<PathBuf>,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        model: None,
        write_model: None,
        dir: std::env::temp_dir(),
        depths: vec![0, 1024, 4096],
        prefill: 256,
        decode: 64,
        dtype: KvDType::F16,
        weights: WeightFormat::Quantized,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
        match flag.as_str() {
            "--model" => a.model = Some(value()?.into()),
            "--write-model" => a.write_model = Some(value()?.into()),
            "--dir" => a.dir = value()?.into(),
            "--depths" => {
                a.depths = value()?
                    .split(',')
                    .map(|s| num(s.to_string()))
                    .collect::<Result<_, _>>()?
            }
            "--prefill" => a.prefill = num(value()?)?.max(1),
            "--decode" => a.decode = num(value()?)?.max(1),
            "--dtype" => a.dtype = value()?.parse().map_err(|e| format!("--dtype: {e}"))?,
            "--weights" => {
                a.weights = match value()?.as_str() {
                    "quantized" => WeightFormat::Quantized,
                    "f32" => WeightFormat::F32,
                    other => return Err(format!("--weights quantized|f32, not {other:?}")),
                }
            }
            "--json" => a.json = Some(value()?.into()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

/// One depth's rates.
struct Row {
    depth: usize,
    prefill_tps: f64,
    decode_tps: f64,
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((i * 2_654_435_761 + seed * 40_503) % vocab as u64) as u32)
        .collect()
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("gpu_model_bench: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(path) = &args.write_model {
        return match write_model(path) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gpu_model_bench: {e}");
                ExitCode::from(1)
            }
        };
    }
    let backend = match kv_model::cuda_backend(0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("gpu_model_bench: SKIPPED: no device ({e})");
            return ExitCode::from(2);
        }
    };
    match run(&args, backend) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpu_model_bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// Writes the synthetic SmolLM2-shape Q4_1 model (fixed seed: the same bytes every time).
fn write_model(path: &std::path::Path) -> Result<(), ModelError> {
    let started = Instant::now();
    let g = gguf::q4_1_llama(&gguf::SMOLLM2, 11);
    gguf::write_gguf(&g, path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    println!(
        "wrote {} ({} MB) in {:.1} s",
        path.display(),
        std::fs::metadata(path).map(|m| m.len() >> 20).unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run(args: &Args, backend: kv_backend_cuda::CudaBackend) -> Result<(), ModelError> {
    let path = match &args.model {
        Some(p) => p.clone(),
        None => {
            let p = args.dir.join("kv-bench-smollm2-shape-q4_1.gguf");
            write_model(&p)?;
            p
        }
    };
    let started = Instant::now();
    let (model, _) = kv_model::load_on(&path, backend.device(), args.weights)?;
    println!(
        "loaded on {:?} with {:?} weights in {:.1} s",
        backend.device().location(),
        model.weight_format(),
        started.elapsed().as_secs_f64()
    );
    let vocab = model.config().vocab_size;
    // Every timed run ends at its depth: no sequence holds more than this.
    let deepest = args.depths.iter().copied().max().unwrap_or(0);
    let per_seq = deepest.max(args.prefill).max(args.decode);
    let block = 16;
    let spec = StorageSpec::new(
        model.shape(),
        args.dtype,
        block,
        per_seq.div_ceil(block) + 1,
    )?;
    let backend_location = match backend.device().location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    };
    let mut cache = PagedCache::new(backend, spec)?;
    let mut rows = Vec::new();
    // The first pass warms up (kernel loading, cuBLAS handles) and is not reported.
    for (i, &depth) in std::iter::once(&0).chain(&args.depths).enumerate() {
        // Prefill: the prompt after `depth - prefill` cached tokens.
        let seq = cache.create_sequence();
        let context = tokens(depth.saturating_sub(args.prefill), vocab, 3);
        for chunk in context.chunks(512) {
            model.forward(chunk, &mut cache, seq, Logits::Last)?;
        }
        let prompt = tokens(args.prefill, vocab, 5 + depth as u64);
        let t0 = Instant::now();
        let logits = model.forward(&prompt, &mut cache, seq, Logits::Last)?;
        std::hint::black_box(kv_model::greedy_token(&logits)?);
        let prefill = t0.elapsed().as_secs_f64();
        cache.free(seq)?;

        // Decode, on a fresh sequence: the steps after `depth - decode` cached tokens.
        let seq = cache.create_sequence();
        let context = tokens(depth.saturating_sub(args.decode), vocab, 3);
        let mut next = 1;
        for chunk in context.chunks(512) {
            let logits = model.forward(chunk, &mut cache, seq, Logits::Last)?;
            next = kv_model::greedy_token(&logits)?;
        }
        let t1 = Instant::now();
        for _ in 0..args.decode {
            let logits = model.forward(&[next], &mut cache, seq, Logits::Last)?;
            next = kv_model::greedy_token(&logits)?;
        }
        let decode = t1.elapsed().as_secs_f64();
        cache.free(seq)?;
        if i == 0 {
            continue;
        }
        let row = Row {
            depth,
            prefill_tps: args.prefill as f64 / prefill,
            decode_tps: args.decode as f64 / decode,
        };
        println!(
            "depth {:>5}: prefill {:>9.1} tokens/s ({} tokens), decode {:>8.1} tokens/s ({} steps)",
            row.depth, row.prefill_tps, args.prefill, row.decode_tps, args.decode
        );
        rows.push(row);
    }
    if let Some(json) = &args.json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"depth\":{},\"prefill_tokens_per_s\":{:.2},\"decode_tokens_per_s\":{:.2}}}",
                    r.depth, r.prefill_tps, r.decode_tps
                )
            })
            .collect();
        let text = format!(
            "{{\"impl\":\"kv\",\"device\":\"{}\",\"model\":{:?},\"weights\":\"{:?}\",\"dtype\":\"{}\",\"prefill\":{},\"decode\":{},\"rows\":[{}]}}\n",
            backend_location,
            path.display().to_string(),
            model.weight_format(),
            args.dtype,
            args.prefill,
            args.decode,
            items.join(",")
        );
        std::fs::write(json, text).map_err(|source| ModelError::Io {
            path: json.clone(),
            source,
        })?;
    }
    Ok(())
}
