//! What a KIVI residual window costs a decode step: `kivi2-r128` against `kivi2` and
//! `kivi4-r128` against `kivi4`, one query over `tokens` cached tokens of a layer
//! (SmolLM2's and Llama-2-7B's shapes), each layout's cache built by
//! [`DecodeBench`](kv_backend_cpu::bench::DecodeBench) as the bench's attention section
//! builds it (blocks of 32, the blocks the query is `R` past settled as a decoding
//! `PagedCache` settles them).
//!
//! `MIB` is the K/V each layout holds, over identical layers that successive steps cycle
//! through (default 96, the bench's [`BENCH_MIN_CACHE_BYTES`]): a model's decode step reads
//! a layer's K/V once and then the other layers' and the weights, so every step reads from
//! memory. `MIB` = 0 keeps one layer per layout (this example before 2026-12-08): the
//! four layouts then total ~72 MiB on the Llama-2 layer, and a step may find part of its
//! layer in the last-level cache.
//!
//! Made for a loaded machine: many rounds, each timing `STEPS` steps (default 1) of every
//! layout back to back, so that a load change falls on both layouts of a pair alike. A step
//! that another process interrupts only gets slower, so the low quantiles are the
//! machine's own speed: prints each layout's best, 10th percentile and median step, and for
//! each pair the ratio of those (and the median of the per-round ratios). On Linux the same
//! figures follow for the thread's CPU time per step (`CLOCK_THREAD_CPUTIME_ID`), which
//! leaves out the time the step waited while other processes ran on its core (one thread
//! only: a pool's threads are not counted). Steps run on the backend's pool
//! ([`DecodeBench::install`](kv_backend_cpu::bench::DecodeBench::install)), as a model's
//! decode loop runs them.
//!
//! ```text
//! cargo run --release -p kv-backend-cpu --example kivi_window [-- TOKENS [THREADS [ROUNDS [MIB [STEPS]]]]]
//! ```
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use kv_backend_cpu::bench::{DecodeBench, BENCH_MIN_CACHE_BYTES};
use kv_core::{KvDType, ModelShape};

/// Layouts, in pairs: (without a window, with one).
const PAIRS: [(&str, &str); 2] = [("kivi2", "kivi2-r128"), ("kivi4", "kivi4-r128")];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tokens: usize = args.next().map_or(Ok(4096), |a| a.parse())?;
    let threads: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(200), |a| a.parse())?;
    let min_bytes: u64 = args.next().map_or(Ok(BENCH_MIN_CACHE_BYTES), |a| {
        a.parse::<u64>().map(|m| m << 20)
    })?;
    let steps: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    if rounds == 0 || steps == 0 {
        return Err("ROUNDS and STEPS must be at least 1".into());
    }
    for (name, shape) in [
        ("smollm2-135m layer", ModelShape::new(1, 9, 3, 64)?),
        ("llama-2-7b layer", ModelShape::new(1, 32, 32, 128)?),
    ] {
        let layouts: Vec<&str> = PAIRS.iter().flat_map(|&(a, b)| [a, b]).collect();
        let mut benches = Vec::new();
        for layout in &layouts {
            let dtype: KvDType = layout.parse()?;
            let bench = DecodeBench::with_min_bytes(shape, dtype, tokens, 1, threads, min_bytes)?;
            bench.time_steps(bench.layers())?; // warm up: every layer once
            benches.push(bench);
        }
        println!(
            "{name}, {tokens} tokens, {threads} thread(s), {} layer(s) per layout, {rounds} rounds of {steps} step(s) each:",
            benches[0].layers()
        );
        // times[layout][round]: seconds per step; cpu[layout][round]: the thread's CPU
        // seconds per step.
        let mut times = vec![Vec::with_capacity(rounds); benches.len()];
        let mut cpu = vec![Vec::with_capacity(rounds); benches.len()];
        for _ in 0..rounds {
            for ((bench, t), c) in benches.iter().zip(&mut times).zip(&mut cpu) {
                let (wall, thread) = bench.install(|| {
                    let (start, cpu_start) = (Instant::now(), thread_cpu());
                    for _ in 0..steps {
                        std::hint::black_box(bench.step()?);
                    }
                    let wall = start.elapsed().as_secs_f64();
                    let thread = cpu_start.zip(thread_cpu()).map(|(a, b)| b - a);
                    Ok::<_, kv_core::KvError>((wall, thread))
                })?;
                t.push(wall / steps as f64);
                if let Some(thread) = thread {
                    c.push(thread / steps as f64);
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
