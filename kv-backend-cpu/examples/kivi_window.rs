//! What a KIVI residual window costs a decode step: `kivi2-r128` against `kivi2` and
//! `kivi4-r128` against `kivi4`, one query over `tokens` cached tokens of one layer
//! (SmolLM2's and Llama-2-7B's shapes), set up as `quant_decode` does (blocks of 32, the
//! blocks the query is `R` past settled).
//!
//! Made for a loaded machine: many rounds, each timing one step of every layout back to
//! back, so that a load change falls on both layouts of a pair alike. A step that another
//! process interrupts only gets slower, so the low quantiles are the machine's own speed:
//! prints each layout's best, 10th percentile and median step, and for each pair the ratio
//! of those (and the median of the per-round ratios). On Linux the same figures follow for
//! the thread's CPU time per step (`CLOCK_THREAD_CPUTIME_ID`), which leaves out the time
//! the step waited while other processes ran on its core (one thread only: a pool's
//! threads are not counted).
//!
//! ```text
//! cargo run --release -p kv-backend-cpu --example kivi_window [-- TOKENS [THREADS [ROUNDS]]]
//! ```
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use kv_backend_cpu::CpuBackend;
use kv_core::candle::{Device, Tensor};
use kv_core::StorageSpec;
use kv_core::{AttentionBatch, BlockId, CacheBackend, KvDType, ModelShape, SeqAttention, Slot};

const BLOCK: usize = 32;
/// Layouts, in pairs: (without a window, with one).
const PAIRS: [(&str, &str); 2] = [("kivi2", "kivi2-r128"), ("kivi4", "kivi4-r128")];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args.next().map_or(Ok(4096), |a| a.parse())?;
    let threads: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(200), |a| a.parse())?;
    let backend = CpuBackend::with_threads(threads)?;
    for (name, shape) in [
        ("smollm2-135m layer", ModelShape::new(1, 9, 3, 64)?),
        ("llama-2-7b layer", ModelShape::new(1, 32, 32, 128)?),
    ] {
        println!("{name}, {tokens} tokens, {threads} thread(s), {rounds} rounds of one step each:");
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
        let batch = AttentionBatch::new(vec![SeqAttention::new(table.clone(), tokens, 1)?], d);
        let layouts: Vec<&str> = PAIRS.iter().flat_map(|&(a, b)| [a, b]).collect();
        let mut stores = Vec::new();
        for layout in &layouts {
            let dtype: KvDType = layout.parse()?;
            let spec = StorageSpec::new(shape, dtype, BLOCK, blocks)?;
            let mut storage = backend.allocate(&spec)?;
            backend.write(&mut storage, 0, &slots, &k, &v)?;
            // Blocks the query is `R` past hold no f16 copies (a decoding `PagedCache`
            // settles them).
            let past = tokens
                .saturating_sub(1)
                .saturating_sub(dtype.residual_tokens())
                / BLOCK;
            backend.settle_blocks(&mut storage, &table[..past])?;
            backend.attend(&storage, 0, &q, &batch)?; // warm up
            stores.push(storage);
        }
        // times[layout][round]: seconds per step; cpu[layout][round]: the thread's CPU
        // seconds per step.
        let mut times = vec![Vec::with_capacity(rounds); stores.len()];
        let mut cpu = vec![Vec::with_capacity(rounds); stores.len()];
        for _ in 0..rounds {
            for ((storage, t), c) in stores.iter().zip(&mut times).zip(&mut cpu) {
                let (start, cpu_start) = (Instant::now(), thread_cpu());
                std::hint::black_box(backend.attend(storage, 0, &q, &batch)?);
                t.push(start.elapsed().as_secs_f64());
                if let (Some(a), Some(b)) = (cpu_start, thread_cpu()) {
                    c.push(b - a);
                }
            }
        }
        report(&layouts, &times, "wall");
        if threads == 1 && cpu.iter().all(|c| c.len() == rounds) {
            report(&layouts, &cpu, "thread CPU");
        }
    }
    Ok(())
}

/// Prints each layout's best, 10th percentile and median of `times[layout][round]`
/// (seconds), and the ratios of each pair.
fn report(layouts: &[&str], times: &[Vec<f64>], what: &str) {
    println!("  {what} time:");
    let sorted: Vec<Vec<f64>> = times
        .iter()
        .map(|t| {
            let mut s = t.clone();
            s.sort_by(f64::total_cmp);
            s
        })
        .collect();
    for (layout, s) in layouts.iter().zip(&sorted) {
        println!(
            "  {layout:<11} best {:>8.1}  p10 {:>8.1}  median {:>8.1} us/step",
            s[0] * 1e6,
            quantile(s, 0.1) * 1e6,
            quantile(s, 0.5) * 1e6
        );
    }
    for (i, (a, b)) in PAIRS.iter().enumerate() {
        let (with, without) = (&sorted[2 * i + 1], &sorted[2 * i]);
        let mut ratios: Vec<f64> = times[2 * i + 1]
            .iter()
            .zip(&times[2 * i])
            .map(|(w, wo)| w / wo)
            .collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "  {b} / {a}: best {:.3}x  p10 {:.3}x  median {:.3}x  per-round median {:.3}x",
            with[0] / without[0],
            quantile(with, 0.1) / quantile(without, 0.1),
            quantile(with, 0.5) / quantile(without, 0.5),
            quantile(&ratios, 0.5),
        );
    }
}

/// The calling thread's CPU time in seconds (Linux; `None` elsewhere or on failure).
fn thread_cpu() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the call to fill; the clock id is
        // a constant Linux defines.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The `p` quantile of sorted `s` (nearest rank).
fn quantile(s: &[f64], p: f64) -> f64 {
    s[((s.len() - 1) as f64 * p).round() as usize]
}
