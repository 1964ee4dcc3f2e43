//! The Rust peer of `cargo xtask bench` and of the GPU bundle: what candle-transformers and
//! candle-nn do on the same work, in lines `BENCH key=value ...` that xtask reads.
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
//! Usage: `candle-peer --model FILE [--device cpu|cuda|cuda:N] [--threads N] [--prompt N]
//! [--depths 0,1024,4064] [--decode N] [--end-at-depth] [--json FILE]
//! [--attn-tokens 1024,4096] [--attn-steps N] [--skip-kvcache]`.
//! Set `RAYON_NUM_THREADS` to the same thread count: candle's matmuls read it.
//! `CANDLE_DEQUANTIZE_ALL=1` (read by candle) expands the weights to f32 at load, as kv does
//! by default; without it candle multiplies by the file's Q4_1 blocks. Lines say which
//! (`weights=f32|quantized`) and on which device (`device=cpu|cuda:N`).
//!
//! Two schedules:
//! - default (`cargo xtask bench`): the prompt as one pass from an empty cache (prefill),
//!   then at each depth D a cache of D tokens and `--decode` timed steps from there;
//! - `--end-at-depth` (the GPU bundle, the same as `kv-model/examples/gpu_model_bench.rs`):
//!   a warm-up pass, then at each depth D one timed pass of `--prompt` tokens after
//!   D - prompt cached ones, and, on a fresh cache, `--decode` timed steps after D - decode
//!   cached ones: both end with D tokens cached, so D = 4096 fits candle-transformers'
//!   4096 positions (`MAX_SEQ_LEN`).
//!
//! The device is synchronised before every clock read. `--device cuda` needs the `cuda`
//! feature; without a usable GPU the peer prints `SKIPPED: no device (...)` and exits
//! with status 2, as kv's GPU benches do.

use std::error::Error;
use std::fs::File;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_transformers::models::quantized_llama::{ModelWeights, MAX_SEQ_LEN};
use kv_backend_cpu::bench::token_ids;
use kv_backend_cpu::CpuBackend;
use kv_core::{
    AttentionBatch, BlockId, CacheBackend, KvDType, ModelShape, SeqAttention, Slot, StorageSpec,
};

type Res<T> = Result<T, Box<dyn Error>>;

/// Why the model cannot run on the device asked for.
#[derive(Debug, thiserror::Error)]
enum DeviceError {
    /// `--device cuda` in a build without the `cuda` feature.
    #[error("--device {0} needs a build with the `cuda` feature (cargo build --features cuda)")]
    NotBuilt(String),
    /// The CUDA device could not be opened (no GPU, no driver, a stub libcuda).
    #[error("no device: cuda:{ordinal}: {source}")]
    NoDevice {
        ordinal: usize,
        source: candle_core::Error,
    },
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    fn parse(s: &str) -> Res<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("--device cpu|cuda|cuda:N, not {s:?}").into()),
            },
        }
    }

    fn label(self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            Self::Cuda(n) => format!("cuda:{n}"),
        }
    }

    fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(_) if cfg!(not(feature = "cuda")) => {
                Err(DeviceError::NotBuilt(self.label()))
            }
            Self::Cuda(ordinal) => Device::new_cuda(ordinal)
                .map_err(|source| DeviceError::NoDevice { ordinal, source }),
        }
    }
}

struct Args {
    model: Option<String>,
    device: DeviceChoice,
    end_at_depth: bool,
    json: Option<String>,
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
        device: DeviceChoice::Cpu,
        end_at_depth: false,
        json: None,
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
        if flag == "--end-at-depth" {
            a.end_at_depth = true;
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
            "--device" => a.device = DeviceChoice::parse(&value)?,
            "--json" => a.json = Some(value.clone()),
            "--threads" => a.threads = number()?.max(1),
            "--prompt" => a.prompt = number()?.max(1),
            "--depths" => a.depths = parse_list(&value)?,
            "--decode" => a.decode = number()?.max(1),
            "--attn-tokens" => a.attn_tokens = parse_list(&value)?,
            "--attn-steps" => a.attn_steps = number()?.max(1),
            other => return Err(format!("unknown flag {other:?}").into()),
        }
    }
    if a.device != DeviceChoice::Cpu && a.kvcache {
        return Err(
            "the kvcache section compares with kv's CPU backend: with --device cuda add --skip-kvcache"
                .into(),
        );
    }
    if a.end_at_depth {
        if let Some(&d) = a.depths.iter().find(|&&d| d > MAX_SEQ_LEN) {
            return Err(format!(
                "depth {d}: candle-transformers' quantized Llama holds at most {MAX_SEQ_LEN} positions"
            )
            .into());
        }
    }
    if a.json.is_some() && !a.end_at_depth {
        return Err("--json writes the --end-at-depth schedule's rows: add --end-at-depth".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if matches!(
                e.downcast_ref::<DeviceError>(),
                Some(DeviceError::NoDevice { .. })
            ) =>
        {
            // The wording kv's GPU binaries use, which the bundle's run.sh counts.
            eprintln!("candle-peer: SKIPPED: {e}");
            ExitCode::from(2)
        }
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
        let device = a.device.open()?;
        if a.end_at_depth {
            end_at_depth(a, model, &device)?;
        } else {
            transformers(a, model, &device)?;
        }
    }
    Ok(())
}

fn argmax(logits: &Tensor) -> Res<u32> {
    Ok(logits
        .flatten_all()?
        .argmax(D::Minus1)?
        .to_scalar::<u32>()?)
}

fn load(path: &str, device: &Device) -> Res<(ModelWeights, usize)> {
    let mut file = File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let content = gguf_file::Content::read(&mut file)?;
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or("no token_embd.weight in the file")?;
    let model = ModelWeights::from_gguf(content, &mut file, device)?;
    Ok((model, vocab))
}

/// Runs `ids` from position `start` in chunks of 512 tokens; returns the last logits.
fn extend(model: &mut ModelWeights, ids: &[u32], start: usize, device: &Device) -> Res<Tensor> {
    let mut logits = None;
    let mut pos = start;
    for chunk in ids.chunks(512) {
        let x = Tensor::new(chunk, device)?.unsqueeze(0)?;
        logits = Some(model.forward(&x, pos)?);
        pos += chunk.len();
    }
    logits.ok_or_else(|| "nothing to run".into())
}

/// The weight format candle loads (`CANDLE_DEQUANTIZE_ALL`), as the lines name it.
fn weights() -> &'static str {
    match std::env::var("CANDLE_DEQUANTIZE_ALL") {
        Ok(s) if !s.is_empty() && s != "0" => "f32",
        _ => "quantized",
    }
}

/// Loads the model on `device` and says so.
fn load_logged(a: &Args, path: &str, device: &Device) -> Res<(ModelWeights, usize)> {
    let started = Instant::now();
    let loaded = load(path, device)?;
    device.synchronize()?;
    eprintln!(
        "candle-peer: candle-transformers quantized_llama loaded on {} ({} weights) in {:.1} s",
        a.device.label(),
        weights(),
        started.elapsed().as_secs_f64()
    );
    Ok(loaded)
}

fn transformers(a: &Args, path: &str, device: &Device) -> Res<()> {
    let weights = weights();
    let dev = a.device.label();
    let (mut model, vocab) = load_logged(a, path, device)?;
    let need = a.depths.iter().copied().max().unwrap_or(0).max(a.prompt) + a.decode + 1;
    let ids = token_ids(need, vocab);

    let mut best = f64::INFINITY;
    for _ in 0..2 {
        model.clear_kv_cache();
        device.synchronize()?;
        let t = Instant::now();
        let logits = extend_one(&mut model, &ids[..a.prompt], 0, device)?;
        std::hint::black_box(argmax(&logits)?);
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "BENCH section=peer-prefill impl=candle-transformers device={dev} weights={weights} tokens={} secs={best:.6} tokens_per_s={:.3}",
        a.prompt,
        a.prompt as f64 / best
    );

    for &depth in &a.depths {
        model.clear_kv_cache();
        let (logits, pos) = if depth == 0 {
            (extend(&mut model, &ids[..1], 0, device)?, 1)
        } else {
            (extend(&mut model, &ids[..depth], 0, device)?, depth)
        };
        let token = argmax(&logits)?;
        let secs = decode(&mut model, token, pos, a.decode, device)?;
        println!(
            "BENCH section=peer-decode impl=candle-transformers device={dev} weights={weights} depth={depth} steps={} secs={secs:.6} tokens_per_s={:.3}",
            a.decode,
            a.decode as f64 / secs
        );
    }
    Ok(())
}

/// The prompt as one forward pass from position `start`, as a prefill is timed.
fn extend_one(model: &mut ModelWeights, ids: &[u32], start: usize, device: &Device) -> Res<Tensor> {
    let x = Tensor::new(ids, device)?.unsqueeze(0)?;
    Ok(model.forward(&x, start)?)
}

/// `steps` greedy decode steps from `token` at position `pos`, each ending with the token
/// on the host; returns the seconds they took (device synchronised at both clock reads).
fn decode(
    model: &mut ModelWeights,
    mut token: u32,
    mut pos: usize,
    steps: usize,
    device: &Device,
) -> Res<f64> {
    device.synchronize()?;
    let t = Instant::now();
    for _ in 0..steps {
        let x = Tensor::new(&[token], device)?.unsqueeze(0)?;
        token = argmax(&model.forward(&x, pos)?)?;
        pos += 1;
    }
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64())
}

/// One depth's rates in the `--end-at-depth` schedule.
struct Row {
    depth: usize,
    prefill_tps: f64,
    decode_tps: f64,
}

/// Cached tokens before a timed run of `len` tokens that ends at `depth`.
fn context_before(depth: usize, len: usize) -> usize {
    depth.saturating_sub(len)
}

/// The GPU bundle's schedule (see the crate docs): per depth, a timed prefill and timed
/// decode steps that both end with `depth` tokens cached; a warm-up pass at depth 0 first
/// (kernel loading, cuBLAS handles) is not reported.
fn end_at_depth(a: &Args, path: &str, device: &Device) -> Res<()> {
    let weights = weights();
    let dev = a.device.label();
    let (mut model, vocab) = load_logged(a, path, device)?;
    let deepest = a.depths.iter().copied().max().unwrap_or(0);
    let need = deepest.max(a.prompt).max(a.decode) + 1;
    let ids = token_ids(need, vocab);
    let mut rows = Vec::new();
    for (i, &depth) in std::iter::once(&0).chain(&a.depths).enumerate() {
        // Prefill: the prompt after `depth - prompt` cached tokens.
        model.clear_kv_cache();
        let before = context_before(depth, a.prompt);
        if before > 0 {
            extend(&mut model, &ids[..before], 0, device)?;
        }
        let prompt = &ids[before..before + a.prompt];
        device.synchronize()?;
        let t = Instant::now();
        let logits = extend_one(&mut model, prompt, before, device)?;
        std::hint::black_box(argmax(&logits)?);
        device.synchronize()?;
        let prefill = t.elapsed().as_secs_f64();

        // Decode, on a fresh cache: the steps after `depth - decode` cached tokens.
        model.clear_kv_cache();
        let before = context_before(depth, a.decode);
        let token = if before > 0 {
            argmax(&extend(&mut model, &ids[..before], 0, device)?)?
        } else {
            ids[0]
        };
        let decode_s = decode(&mut model, token, before, a.decode, device)?;
        if i == 0 {
            continue;
        }
        let row = Row {
            depth,
            prefill_tps: a.prompt as f64 / prefill,
            decode_tps: a.decode as f64 / decode_s,
        };
        println!(
            "BENCH section=peer-prefill impl=candle-transformers device={dev} weights={weights} depth={depth} tokens={} secs={prefill:.6} tokens_per_s={:.3}",
            a.prompt, row.prefill_tps
        );
        println!(
            "BENCH section=peer-decode impl=candle-transformers device={dev} weights={weights} depth={depth} steps={} secs={decode_s:.6} tokens_per_s={:.3}",
            a.decode, row.decode_tps
        );
        rows.push(row);
    }
    if let Some(json) = &a.json {
        std::fs::write(json, rows_json(a, path, weights, &rows))
            .map_err(|e| format!("writing {json}: {e}"))?;
    }
    Ok(())
}

/// The rows as JSON in the schema of `gpu_model_bench --json`, plus who measured them.
fn rows_json(a: &Args, path: &str, weights: &str, rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"depth\":{},\"prefill_tokens_per_s\":{:.2},\"decode_tokens_per_s\":{:.2}}}",
                r.depth, r.prefill_tps, r.decode_tps
            )
        })
        .collect();
    format!(
        "{{\"impl\":\"candle-transformers\",\"device\":\"{}\",\"model\":{:?},\"weights\":\"{weights}\",\"prefill\":{},\"decode\":{},\"rows\":[{}]}}\n",
        a.device.label(),
        path,
        a.prompt,
        a.decode,
        items.join(",")
    )
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
    // Block ids are u32: checked once here, so the slots and the table below fit.
    u32::try_from(blocks).map_err(|_| format!("{blocks} blocks do not fit a block id"))?;
    let slot = |t: usize| Slot {
        block: BlockId::new((t / BLOCK) as u32),
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
    let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
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
