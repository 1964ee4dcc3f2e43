//! The Rust peer of `cargo xtask bench`: what candle-transformers and candle-nn do on the
//! same work, in lines `BENCH key=value ...` that xtask reads.
//!
//! - `section=peer-prefill` / `section=peer-decode`: candle-transformers'
//!   `quantized_llama::ModelWeights` (its own KV cache, weights kept quantized) on the GGUF
//!   file, at the same prompt length and depths as kv's end-to-end section, with the same
//!   token ids (a fixed pseudo-random sequence; speed does not depend on which ids).
//! - `section=kvcache`: one decode-attention step of one SmolLM2 layer (9 query heads, 3 KV
//!   heads of 64) at n cached tokens: candle-nn's `KvCache` append plus the attention
//!   candle-transformers computes over it, next to kv's CPU backend (write one token,
//!   attend) in f32 and f16.
//!
//! Usage: `candle-peer --model FILE [--threads N] [--prompt N] [--depths 0,1024,4064]
//! [--decode N] [--attn-tokens 1024,4096] [--attn-steps N] [--skip-kvcache]`.
//! Set `RAYON_NUM_THREADS` to the same thread count: candle's matmuls read it.
//! `CANDLE_DEQUANTIZE_ALL=1` (read by candle) expands the weights to f32 at load, as kv does
//! by default; without it candle multiplies by the file's Q4_1 blocks. Lines say which
//! (`weights=f32|quantized`).

use std::error::Error;
use std::fs::File;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_transformers::models::quantized_llama::ModelWeights;
use kv_backend_cpu::bench::token_ids;
use kv_backend_cpu::CpuBackend;
use kv_core::{
    AttentionBatch, BlockId, CacheBackend, KvDType, ModelShape, SeqAttention, Slot, StorageSpec,
};

type Res<T> = Result<T, Box<dyn Error>>;

struct Args {
    model: Option<String>,
    threads: usize,
    prompt: usize,
    depths: Vec<usize>,
    decode: usize,
    attn_tokens: Vec<usize>,
    attn_steps: usize,
    kvcache: bool,
}

fn parse_list(s: &str) -> Res<Vec<usize>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .map_err(|e| format!("{p:?}: {e}").into())
        })
        .collect()
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        model: None,
        threads: 2,
        prompt: 512,
        depths: vec![0, 1024, 4064],
        decode: 32,
        attn_tokens: vec![1024, 4096],
        attn_steps: 50,
        kvcache: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--skip-kvcache" {
            a.kvcache = false;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|e| format!("{flag} {value:?}: {e}"))
        };
        match flag.as_str() {
            "--model" => a.model = Some(value.clone()),
            "--threads" => a.threads = number()?.max(1),
            "--prompt" => a.prompt = number()?.max(1),
            "--depths" => a.depths = parse_list(&value)?,
            "--decode" => a.decode = number()?.max(1),
            "--attn-tokens" => a.attn_tokens = parse_list(&value)?,
            "--attn-steps" => a.attn_steps = number()?.max(1),
            other => return Err(format!("unknown flag {other:?}").into()),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("candle-peer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: &Args) -> Res<()> {
    eprintln!(
        "candle-peer: threads {} (RAYON_NUM_THREADS={})",
        a.threads,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    if a.kvcache {
        kvcache(a)?;
    }
    if let Some(model) = &a.model {
        transformers(a, model)?;
    }
    Ok(())
}

fn argmax(logits: &Tensor) -> Res<u32> {
    Ok(logits
        .flatten_all()?
        .argmax(D::Minus1)?
        .to_scalar::<u32>()?)
}

fn load(path: &str) -> Res<(ModelWeights, usize)> {
    let mut file = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let content = gguf_file::Content::read(&mut file)?;
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or("no token_embd.weight in the file")?;
    let model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    Ok((model, vocab))
}

/// Runs `ids` from position `start` in chunks of 512 tokens; returns the last logits.
fn extend(model: &mut ModelWeights, ids: &[u32], start: usize) -> Res<Tensor> {
    let mut logits = None;
    let mut pos = start;
    for chunk in ids.chunks(512) {
        let x = Tensor::new(chunk, &Device::Cpu)?.unsqueeze(0)?;
        logits = Some(model.forward(&x, pos)?);
        pos += chunk.len();
    }
    logits.ok_or_else(|| "nothing to run".into())
}

fn transformers(a: &Args, path: &str) -> Res<()> {
    let started = Instant::now();
    let weights = match std::env::var("CANDLE_DEQUANTIZE_ALL") {
        Ok(s) if !s.is_empty() && s != "0" => "f32",
        _ => "quantized",
    };
    let (mut model, vocab) = load(path)?;
    eprintln!(
        "candle-peer: candle-transformers quantized_llama loaded ({weights} weights) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let need = a.depths.iter().copied().max().unwrap_or(0).max(a.prompt) + a.decode + 1;
    let ids = token_ids(need, vocab);

    let mut best = f64::INFINITY;
    for _ in 0..2 {
        model.clear_kv_cache();
        let t = Instant::now();
        let logits = extend_one(&mut model, &ids[..a.prompt])?;
        std::hint::black_box(argmax(&logits)?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "BENCH section=peer-prefill impl=candle-transformers weights={weights} tokens={} secs={best:.6} tokens_per_s={:.3}",
        a.prompt,
        a.prompt as f64 / best
    );

    for &depth in &a.depths {
        model.clear_kv_cache();
        let (logits, mut pos) = if depth == 0 {
            (extend(&mut model, &ids[..1], 0)?, 1)
        } else {
            (extend(&mut model, &ids[..depth], 0)?, depth)
        };
        let mut token = argmax(&logits)?;
        let t = Instant::now();
        for _ in 0..a.decode {
            let x = Tensor::new(&[token], &Device::Cpu)?.unsqueeze(0)?;
            token = argmax(&model.forward(&x, pos)?)?;
            pos += 1;
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "BENCH section=peer-decode impl=candle-transformers weights={weights} depth={depth} steps={} secs={secs:.6} tokens_per_s={:.3}",
            a.decode,
            a.decode as f64 / secs
        );
    }
    Ok(())
}

/// The prompt as one forward pass, as a prefill is timed.
fn extend_one(model: &mut ModelWeights, ids: &[u32]) -> Res<Tensor> {
    let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    Ok(model.forward(&x, 0)?)
}

/// SmolLM2's attention shape: 9 query heads sharing 3 KV heads of 64.
const Q_HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;

fn random(dims: &[usize], seed: u64) -> Res<Tensor> {
    let n: usize = dims.iter().product();
    let mut state = seed;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
}

fn kvcache(a: &Args) -> Res<()> {
    for &n in &a.attn_tokens {
        let steps = a.attn_steps;
        let q = random(&[1, Q_HEADS, 1, HEAD_DIM], 1)?;
        let k_new = random(&[1, KV_HEADS, 1, HEAD_DIM], 2)?;
        let v_new = random(&[1, KV_HEADS, 1, HEAD_DIM], 3)?;

        // candle-nn: KvCache (preallocated, appended along the sequence axis), attention
        // as candle-transformers' quantized_llama computes it on the CPU.
        let mut cache = KvCache::new(2, n + steps + 2);
        cache.append(
            &random(&[1, KV_HEADS, n, HEAD_DIM], 4)?,
            &random(&[1, KV_HEADS, n, HEAD_DIM], 5)?,
        )?;
        let scale = (HEAD_DIM as f64).sqrt();
        let mut candle_step = || -> Res<Tensor> {
            let (k, v) = cache.append(&k_new, &v_new)?;
            let k = candle_transformers::utils::repeat_kv(k, Q_HEADS / KV_HEADS)?;
            let v = candle_transformers::utils::repeat_kv(v, Q_HEADS / KV_HEADS)?;
            let att = (q.matmul(&k.t()?)? / scale)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            Ok(att.matmul(&v.contiguous()?)?)
        };
        let candle_out = candle_step()?;
        let t = Instant::now();
        for _ in 0..steps {
            std::hint::black_box(candle_step()?);
        }
        let secs = t.elapsed().as_secs_f64() / steps as f64;
        println!(
            "BENCH section=kvcache impl=candle-nn dtype=f32 tokens={n} steps={steps} secs={secs:.9}"
        );

        for dtype in [KvDType::F32, KvDType::F16] {
            let secs = ours(a.threads, dtype, n, steps, &q, &k_new, &v_new, &candle_out)?;
            println!(
                "BENCH section=kvcache impl=kv dtype={dtype} tokens={n} steps={steps} secs={secs:.9}"
            );
        }
    }
    Ok(())
}

/// kv's CPU backend on the same step: write the new token's K/V into its slot, attend over
/// every cached token. Checks its first answer against candle's (same inputs in f32).
#[allow(clippy::too_many_arguments)]
fn ours(
    threads: usize,
    dtype: KvDType,
    n: usize,
    steps: usize,
    q: &Tensor,
    k_new: &Tensor,
    v_new: &Tensor,
    candle_out: &Tensor,
) -> Res<f64> {
    const BLOCK: usize = 16;
    let backend = CpuBackend::with_threads(threads)?;
    let shape = ModelShape::new(1, Q_HEADS, KV_HEADS, HEAD_DIM)?;
    let blocks = (n + steps + 2).div_ceil(BLOCK);
    let mut storage = backend.allocate(&StorageSpec::new(shape, dtype, BLOCK, blocks)?)?;
    let slot = |t: usize| Slot {
        block: (t / BLOCK) as BlockId,
        offset: (t % BLOCK) as u32,
    };
    // The same history candle holds: [1, kv, n, d] -> [n, kv, d].
    let k_old = random(&[1, KV_HEADS, n, HEAD_DIM], 4)?
        .squeeze(0)?
        .transpose(0, 1)?
        .contiguous()?;
    let v_old = random(&[1, KV_HEADS, n, HEAD_DIM], 5)?
        .squeeze(0)?
        .transpose(0, 1)?
        .contiguous()?;
    let slots: Vec<Slot> = (0..n).map(slot).collect();
    backend.write(&mut storage, 0, &slots, &k_old, &v_old)?;
    let q = q.reshape((1, Q_HEADS, HEAD_DIM))?;
    let k_new = k_new.reshape((1, KV_HEADS, HEAD_DIM))?;
    let v_new = v_new.reshape((1, KV_HEADS, HEAD_DIM))?;
    let table: Vec<BlockId> = (0..blocks as BlockId).collect();
    let mut len = n;
    let mut step = || -> Res<Tensor> {
        backend.write(&mut storage, 0, &[slot(len)], &k_new, &v_new)?;
        len += 1;
        let batch = AttentionBatch::new(vec![SeqAttention::new(table.clone(), len, 1)?], HEAD_DIM);
        Ok(backend.attend(&storage, 0, &q, &batch)?)
    };
    let first = step()?;
    if dtype == KvDType::F32 {
        let diff = (first.flatten_all()? - candle_out.flatten_all()?)?
            .abs()?
            .max(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if diff > 1e-3 {
            return Err(format!("kv and candle disagree by {diff} at {n} tokens").into());
        }
    }
    let t = Instant::now();
    for _ in 0..steps {
        std::hint::black_box(step()?);
    }
    Ok(t.elapsed().as_secs_f64() / steps as f64)
}
