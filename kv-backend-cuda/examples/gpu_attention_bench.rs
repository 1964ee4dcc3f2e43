//! Decode attention on the GPU against a device-to-device copy probe measured in the same run.
//!
//! For each shape (a SmolLM2-135M layer: 9 query / 3 KV heads, head dim 64; a Llama-2-7B-like
//! layer: 32 / 32, head dim 128), each layout (f16, int8-g32, int4-g32, int4h-g32, kivi4,
//! kivi2), 1, 8 and 64 sequences and 4096 and 32768 tokens per sequence: one decode step
//! (one query per sequence, one ragged-batch `attend` call) over a pool filled through the
//! backend's own `write`. The time is the median of the timed steps, each after a 256 MiB
//! write that evicts the K/V rows from the L2 cache, and includes what one `attend` call
//! costs end to end (plan upload, both kernels, the flag read back). GB/s counts the K/V bytes
//! the step must read (every row of every sequence, once); the probe counts the bytes a
//! `memcpy_dtod` reads and writes. The last column is the step's GB/s as a share of the
//! probe's: the issue's target is >= 70% at >= 4096 tokens.
//!
//! A layout the backend does not support yet gets a row saying so; a case whose pool does
//! not fit the GPU gets a row with the allocation error. Without a GPU (or without a driver)
//! it prints `SKIPPED: no device` and the reason, and exits 0.
//!
//! ```text
//! cargo build --release -p kv-backend-cuda --features cuda --example gpu_attention_bench
//! target/release/examples/gpu_attention_bench [--seqs 1,8,64] [--tokens 4096,32768] [--steps 10]
//! ```
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::CudaDevice;
use kv_backend_cuda::{CudaBackend, CudaStorage};
use kv_core::candle::{DType, Device, Tensor};
use kv_core::{
    AttentionBatch, BlockId, CacheBackend, KvDType, ModelShape, SeqAttention, Slot, StorageSpec,
};

/// Tokens per cache block (every layout, KIVI included, accepts 32).
const BLOCK: usize = 32;
/// Rows per `write` call while filling a pool.
const FILL_ROWS: usize = 8192;
/// Bytes written between timed steps to evict the pool from the L2 cache (50 MiB on H100).
const FLUSH_BYTES: usize = 256 << 20;
/// Bytes the copy probe copies per round.
const PROBE_BYTES: usize = 1 << 30;

type BoxError = Box<dyn std::error::Error>;

struct Options {
    seqs: Vec<usize>,
    tokens: Vec<usize>,
    steps: usize,
}

fn list(arg: Option<String>, flag: &str) -> Result<Vec<usize>, BoxError> {
    let arg = arg.ok_or_else(|| format!("{flag} needs a value"))?;
    let values = arg
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {arg}: {e}"))?;
    if values.is_empty() || values.contains(&0) {
        return Err(format!("{flag} {arg}: give positive numbers").into());
    }
    Ok(values)
}

fn options() -> Result<Options, BoxError> {
    let mut o = Options {
        seqs: vec![1, 8, 64],
        tokens: vec![4096, 32768],
        steps: 10,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seqs" => o.seqs = list(args.next(), "--seqs")?,
            "--tokens" => o.tokens = list(args.next(), "--tokens")?,
            "--steps" => {
                o.steps = *list(args.next(), "--steps")?
                    .first()
                    .ok_or("--steps needs a value")?
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; use --seqs 1,8,64 --tokens 4096,32768 --steps 10"
                )
                .into())
            }
        }
    }
    Ok(o)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

/// The device-to-device copy bandwidth in GB/s (bytes read + written per second): the
/// median of 10 copies of 1 GiB after 2 unmeasured ones.
fn copy_probe(cuda: &CudaDevice) -> Result<f64, BoxError> {
    let stream = cuda.cuda_stream();
    let src: CudaSlice<u8> = stream.alloc_zeros(PROBE_BYTES)?;
    let mut dst: CudaSlice<u8> = stream.alloc_zeros(PROBE_BYTES)?;
    let mut times = Vec::new();
    for round in 0..12 {
        stream.synchronize()?;
        let t = Instant::now();
        stream.memcpy_dtod(&src, &mut dst)?;
        stream.synchronize()?;
        if round >= 2 {
            times.push(t.elapsed());
        }
    }
    Ok(2.0 * PROBE_BYTES as f64 / median(times).as_secs_f64() / 1e9)
}

/// Fills every slot of every block of `storage` with normal K and V rows, in writes of
/// `FILL_ROWS` rows (the same rows each time: the bytes read do not depend on the values).
///
/// KIVI keeps an f16 window for each key block a write fills until attention has read the
/// layer; with no attend during the fill, each write's full blocks are settled instead
/// (no query to come reads them in f16), all but each sequence's last block (of
/// `per_seq`), whose window the decode query inside it reads as in generation.
fn fill(
    backend: &CudaBackend,
    storage: &mut CudaStorage,
    blocks: usize,
    per_seq: usize,
) -> Result<(), BoxError> {
    let shape = backend.spec(storage).shape;
    let (kvh, d) = (shape.n_kv_heads(), shape.head_dim());
    let dev = backend.device();
    let k = Tensor::randn(0f32, 1.0, (FILL_ROWS, kvh, d), dev)?;
    let v = Tensor::randn(0f32, 1.0, (FILL_ROWS, kvh, d), dev)?;
    let total = blocks * BLOCK;
    let mut at = 0;
    while at < total {
        let n = FILL_ROWS.min(total - at);
        let slots: Vec<Slot> = (at..at + n)
            .map(|i| Slot {
                block: BlockId::new(u32::try_from(i / BLOCK).unwrap()),
                offset: u32::try_from(i % BLOCK).unwrap(),
            })
            .collect();
        let (kn, vn) = (k.narrow(0, 0, n)?, v.narrow(0, 0, n)?);
        backend.write(storage, 0, &slots, &kn, &vn)?;
        let settled: Vec<BlockId> = (at / BLOCK..(at + n) / BLOCK)
            .filter(|b| b % per_seq != per_seq - 1)
            .map(|b| BlockId::new(u32::try_from(b).unwrap()))
            .collect();
        backend.settle_blocks(storage, &settled)?;
        at += n;
    }
    Ok(())
}

/// One bench case: the median time of a decode step of `seqs` sequences of `tokens` tokens,
/// with the output checked finite.
fn decode_step(
    backend: &CudaBackend,
    shape: ModelShape,
    dtype: KvDType,
    seqs: usize,
    tokens: usize,
    steps: usize,
    flush: &mut CudaSlice<u8>,
) -> Result<Duration, BoxError> {
    let per_seq = tokens.div_ceil(BLOCK);
    let blocks = seqs
        .checked_mul(per_seq)
        .ok_or("block count overflows usize")?;
    let spec = StorageSpec::new(shape, dtype, BLOCK, blocks)?;
    let mut storage = backend.allocate(&spec)?;
    fill(backend, &mut storage, blocks, per_seq)?;
    let batch = AttentionBatch::new(
        (0..seqs)
            .map(|s| {
                let ids = (s * per_seq..(s + 1) * per_seq)
                    .map(|b| BlockId::new(u32::try_from(b).unwrap()))
                    .collect();
                SeqAttention::new(ids, tokens, 1)
            })
            .collect::<Result<Vec<_>, _>>()?,
        shape.head_dim(),
    );
    let q = Tensor::randn(
        0f32,
        1.0,
        (seqs, shape.n_q_heads(), shape.head_dim()),
        backend.device(),
    )?;
    let stream = match backend.device() {
        Device::Cuda(c) => c.cuda_stream(),
        _ => return Err("the backend's device is not a CUDA device".into()),
    };
    // The output once, checked: a bench of wrong results measures nothing.
    let out = backend.attend(&storage, 0, &q, &batch)?;
    let values = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(bad) = values.iter().find(|x| !x.is_finite()) {
        return Err(format!("attend returned a non-finite value ({bad})").into());
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        stream.memset_zeros(flush)?;
        stream.synchronize()?;
        let t = Instant::now();
        let out = backend.attend(&storage, 0, &q, &batch)?;
        // attend reads its flag back (a sync); this makes the wait explicit.
        stream.synchronize()?;
        times.push(t.elapsed());
        drop(out);
    }
    Ok(median(times))
}

fn main() -> Result<(), BoxError> {
    let o = options()?;
    let backend = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            println!("SKIPPED: no device ({e})");
            return Ok(());
        }
    };
    let Device::Cuda(cuda) = backend.device().clone() else {
        return Err("the backend's device is not a CUDA device".into());
    };
    let probe = copy_probe(&cuda)?;
    println!(
        "kv-backend-cuda decode attention, kernels for {}; device-to-device copy probe: \
         {probe:.1} GB/s (read + written)\n",
        backend.arch()
    );
    println!("| shape | layout | seqs | tokens | K/V read (MiB) | step (us) | GB/s | % of probe |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let mut flush: CudaSlice<u8> = cuda.cuda_stream().alloc_zeros(FLUSH_BYTES)?;
    let layouts = ["f16", "int8-g32", "int4-g32", "int4h-g32", "kivi4", "kivi2"];
    for (name, shape) in [
        (
            "SmolLM2-135M layer (9/3, d64)",
            ModelShape::new(1, 9, 3, 64)?,
        ),
        (
            "Llama-2-7B layer (32/32, d128)",
            ModelShape::new(1, 32, 32, 128)?,
        ),
    ] {
        for layout in layouts {
            let dtype: KvDType = layout.parse()?;
            for &tokens in &o.tokens {
                for &seqs in &o.seqs {
                    let row = format!("| {name} | {layout} | {seqs} | {tokens} |");
                    if !backend.supports(dtype) {
                        println!("{row} not supported by the CUDA backend yet | | | |");
                        continue;
                    }
                    // K and V rows of every head of every token the step reads.
                    let bytes = dtype.row_bytes(shape.head_dim())? as f64
                        * 2.0
                        * shape.n_kv_heads() as f64
                        * (seqs * tokens) as f64;
                    match decode_step(&backend, shape, dtype, seqs, tokens, o.steps, &mut flush) {
                        Ok(t) => {
                            let gbs = bytes / t.as_secs_f64() / 1e9;
                            println!(
                                "{row} {:.1} | {:.1} | {gbs:.1} | {:.0}% |",
                                bytes / f64::from(1u32 << 20),
                                t.as_secs_f64() * 1e6,
                                100.0 * gbs / probe
                            );
                        }
                        Err(e) => println!("{row} failed: {e} | | | |"),
                    }
                }
            }
        }
    }
    Ok(())
}
