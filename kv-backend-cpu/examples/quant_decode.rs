//! Decode attention over the quantized layouts against f16, in one run.
//!
//! One decode step (one query row) over `tokens` cached tokens of one layer, for each
//! layout, with the same block size (32, which every layout accepts) and the same data.
//! The layouts are timed in interleaved rounds (so that load from other processes falls on
//! all of them alike) and each reports its best round. Prints the mean time per step and the bytes of K/V it reads, then the time of a 512-token
//! causal prefill attention (512 queries over the first 512 tokens; best of 5 after a
//! warm-up). Last, the SmolLM2
//! step with its K/V read from memory (the criterion bench's setting, `DecodeBench`).
//! Run on an otherwise
//! idle machine:
//!
//! ```text
//! cargo run --release -p kv-backend-cpu --example quant_decode [-- TOKENS [THREADS]]
//! ```
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use kv_backend_cpu::bench::DecodeBench;
use kv_backend_cpu::CpuBackend;
use kv_core::candle::{Device, Tensor};
use kv_core::{
    memory, AttentionBatch, BlockId, CacheBackend, KvDType, ModelShape, SeqAttention, Slot,
    StorageSpec,
};

const BLOCK: usize = 32;
/// Timing rounds over all layouts; each layout reports its best.
const ROUNDS: usize = 7;
/// Decode steps per round.
const STEPS: usize = 40;
/// Timed prefills per layout (the best reported).
const PREFILL_RUNS: usize = 5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args.next().map_or(Ok(4096), |a| a.parse())?;
    let threads: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let backend = CpuBackend::with_threads(threads)?;
    let layouts = [
        "f16",
        "int8-g32",
        "int8-g64",
        "int4-g32",
        "int4h-g32",
        "kivi4",
        "kivi2",
        "kivi2-r128",
    ];
    for (name, shape) in [
        ("smollm2-135m layer", ModelShape::new(1, 9, 3, 64)?),
        ("llama-2-7b layer", ModelShape::new(1, 32, 32, 128)?),
    ] {
        println!("{name}, {tokens} tokens, {threads} thread(s), blocks of {BLOCK}:");
        let (kvh, d) = (shape.n_kv_heads(), shape.head_dim());
        let k = Tensor::randn(0f32, 1.0, (tokens, kvh, d), &Device::Cpu)?;
        let v = Tensor::randn(0f32, 1.0, (tokens, kvh, d), &Device::Cpu)?;
        let q = Tensor::randn(0f32, 1.0, (1, shape.n_q_heads(), d), &Device::Cpu)?;
        let blocks = tokens.div_ceil(BLOCK);
        let slots: Vec<Slot> = (0..tokens)
            .map(|t| Slot {
                block: BlockId::new((t / BLOCK) as u32),
                offset: (t % BLOCK) as u32,
            })
            .collect();
        let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
        let batch = AttentionBatch::new(vec![SeqAttention::new(table, tokens, 1)?], d);
        // Every layout's storage first, then interleaved timing rounds: load from other
        // processes changes over seconds, and interleaving spreads it over all layouts
        // alike; each layout's best round is reported.
        let mut stores = Vec::new();
        for layout in layouts {
            let dtype: KvDType = layout.parse()?;
            let spec = StorageSpec::new(shape, dtype, BLOCK, blocks)?;
            let mut storage = backend.allocate(&spec)?;
            backend.write(&mut storage, 0, &slots, &k, &v)?;
            // A residual layout keeps f16 copies of the last tokens only, once the blocks
            // the query is past are settled (as a decoding `PagedCache` does).
            let past = tokens
                .saturating_sub(1)
                .saturating_sub(dtype.residual_tokens())
                / BLOCK;
            let settled: Vec<BlockId> = (0..past as u32).map(BlockId::new).collect();
            backend.settle_blocks(&mut storage, &settled)?;
            backend.attend(&storage, 0, &q, &batch)?; // warm up
            stores.push((layout, dtype, storage));
        }
        let mut best = vec![f64::INFINITY; stores.len()];
        for _ in 0..ROUNDS {
            for ((_, _, storage), best) in stores.iter().zip(&mut best) {
                let start = Instant::now();
                for _ in 0..STEPS {
                    std::hint::black_box(backend.attend(storage, 0, &q, &batch)?);
                }
                *best = best.min(start.elapsed().as_secs_f64() / STEPS as f64);
            }
        }
        let base = best[0];
        for ((layout, dtype, storage), secs) in stores.iter().zip(best) {
            let bytes = memory::cache_bytes(&shape, *dtype, tokens)?;
            // Prefill attention: 512 queries over the first 512 tokens.
            let n = tokens.min(512);
            let prefill = AttentionBatch::new(
                vec![SeqAttention::new(
                    (0..n.div_ceil(BLOCK) as u32).map(BlockId::new).collect(),
                    n,
                    n,
                )?],
                d,
            );
            let qn = Tensor::randn(0f32, 1.0, (n, shape.n_q_heads(), d), &Device::Cpu)?;
            // A warm-up call (the first prefill of the process grows the scratch buffers),
            // then the best of a few.
            std::hint::black_box(backend.attend(storage, 0, &qn, &prefill)?);
            let mut prefill_secs = f64::INFINITY;
            for _ in 0..PREFILL_RUNS {
                let start = Instant::now();
                std::hint::black_box(backend.attend(storage, 0, &qn, &prefill)?);
                prefill_secs = prefill_secs.min(start.elapsed().as_secs_f64());
            }
            println!(
                "  {layout:<10} {:>8.1} us/step  {:>5.2}x f16's time  {:>9} of K/V  {:>6.2} GB/s   \
                 prefill {n}: {:>7.1} ms",
                secs * 1e6,
                secs / base,
                memory::format_bytes(bytes),
                bytes as f64 / secs / 1e9,
                prefill_secs * 1e3
            );
        }
    }
    from_memory(tokens, threads, &layouts)?;
    Ok(())
}

/// The SmolLM2 step again with its K/V read from memory, as in a model (and in the
/// criterion bench): each layout's `DecodeBench` cycles through 96 MiB of identical layers.
/// Interleaved rounds, best round per layout, as above.
fn from_memory(
    tokens: usize,
    threads: usize,
    layouts: &[&str],
) -> Result<(), Box<dyn std::error::Error>> {
    let shape = ModelShape::new(1, 9, 3, 64)?;
    println!(
        "smollm2-135m layer from memory (96 MiB of layers), {tokens} tokens, {threads} thread(s):"
    );
    let mut benches = Vec::new();
    for layout in layouts {
        let dtype: KvDType = layout.parse()?;
        benches.push((layout, DecodeBench::new(shape, dtype, tokens, threads)?));
    }
    let mut best = vec![f64::INFINITY; benches.len()];
    for _ in 0..ROUNDS {
        for ((_, bench), best) in benches.iter().zip(&mut best) {
            *best = best.min(bench.time_steps(STEPS)?);
        }
    }
    for ((layout, bench), secs) in benches.iter().zip(&best) {
        println!(
            "  {layout:<10} {:>8.1} us/step  {:>5.2}x f16's time  {:>6.2} GB/s",
            secs * 1e6,
            secs / best[0],
            bench.kv_bytes_per_step() as f64 / secs / 1e9
        );
    }
    Ok(())
}
