//! Rough throughput of the read-path kernels at every instruction-set level this CPU has:
//! nanoseconds per row for `dot` and `axpy` over a block of rows, and per token for KIVI
//! block scores. A sanity check that the SIMD levels pay, not a benchmark suite: each
//! number is the fastest of 5 timings (so that other work on a shared machine inflates it
//! less than a mean would), no other statistics. Run it in release mode:
//!
//! ```text
//! cargo run -p kv-quant --example kernel_speed --release
//! ```

use std::hint::black_box;
use std::time::Instant;

use kv_quant::{Group, Isa, Kernels, KiviBits, KiviKeyFormat, QuantError, RowFormat};

const HEAD_DIM: usize = 64;
const ROWS: usize = 4096;
const PASSES: usize = 200;

/// Deterministic, non-trivial data.
fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32
                / (1u32 << 24) as f32
                - 0.5
        })
        .collect()
}

/// Nanoseconds per row of one pass of `pass` over the `ROWS` rows: the fastest of
/// `REPEATS` timings of `PASSES / REPEATS` passes each, so that other work on a shared
/// machine inflates it less than a mean would.
fn best_of(mut pass: impl FnMut() -> Result<(), QuantError>) -> Result<f64, QuantError> {
    const REPEATS: usize = 5;
    let mut best = f64::INFINITY;
    for _ in 0..REPEATS {
        let start = Instant::now();
        for _ in 0..PASSES / REPEATS {
            pass()?;
        }
        let ns = start.elapsed().as_nanos() as f64 / (PASSES / REPEATS * ROWS) as f64;
        best = best.min(ns);
    }
    Ok(best)
}

fn main() -> Result<(), QuantError> {
    let x = data(ROWS * HEAD_DIM, 1);
    let q = data(HEAD_DIM, 2);
    let weights = data(ROWS, 3);
    println!("head_dim {HEAD_DIM}, {ROWS} rows, {PASSES} passes; ns per row (best of 5)");
    println!("{:<12} {:<8} {:>8} {:>8}", "format", "isa", "dot", "axpy");
    for format in [
        RowFormat::F32,
        RowFormat::F16,
        RowFormat::Bf16,
        RowFormat::Int8 { group: Group::G32 },
        RowFormat::Int4 { group: Group::G32 },
        RowFormat::Int2 { group: Group::G32 },
    ] {
        let rb = format.row_bytes(HEAD_DIM)?;
        let mut rows = vec![0u8; rb * ROWS];
        for (v, r) in x.chunks_exact(HEAD_DIM).zip(rows.chunks_exact_mut(rb)) {
            format.quantize_row(v, r)?;
        }
        for isa in Isa::available() {
            let k = Kernels::new(isa)?;
            let mut scores = vec![0.0f32; ROWS];
            let dot_ns = best_of(|| {
                k.dot_many(format, black_box(&q), black_box(&rows), &mut scores)?;
                black_box(&scores);
                Ok(())
            })?;
            let mut acc = vec![0.0f32; HEAD_DIM];
            let axpy_ns = best_of(|| {
                k.axpy_many(format, black_box(&weights), black_box(&rows), &mut acc)?;
                black_box(&acc);
                Ok(())
            })?;
            println!(
                "{:<12} {:<8} {:>8.1} {:>8.1}",
                format.name(),
                isa.name(),
                dot_ns,
                axpy_ns
            );
        }
    }

    // A GQA group (SmolLM2: 3 query heads per KV head) against runs of 32 rows, the
    // decode step's shape: `dot_heads` / `axpy_heads`, ns per row for all 3 heads.
    const HEADS: usize = 3;
    const RUN: usize = 32;
    let qh = data(HEADS * HEAD_DIM, 4);
    let wh = data(HEADS * RUN, 5);
    println!();
    println!("{HEADS} heads, runs of {RUN} rows; ns per row for all heads (best of 5)");
    println!("{:<12} {:<8} {:>8} {:>8}", "format", "isa", "dot", "axpy");
    for format in [
        RowFormat::F16,
        RowFormat::Int8 { group: Group::G32 },
        RowFormat::Int4 { group: Group::G32 },
    ] {
        let rb = format.row_bytes(HEAD_DIM)?;
        let mut rows = vec![0u8; rb * ROWS];
        for (v, r) in x.chunks_exact(HEAD_DIM).zip(rows.chunks_exact_mut(rb)) {
            format.quantize_row(v, r)?;
        }
        for isa in Isa::available() {
            let k = Kernels::new(isa)?;
            let mut scores = vec![0.0f32; HEADS * RUN];
            let dot_ns = best_of(|| {
                for run in rows.chunks_exact(rb * RUN) {
                    k.dot_heads(
                        format,
                        HEAD_DIM,
                        black_box(&qh),
                        black_box(run),
                        &mut scores,
                        RUN,
                    )?;
                    black_box(&scores);
                }
                Ok(())
            })?;
            let mut acc = vec![0.0f32; HEADS * HEAD_DIM];
            let axpy_ns = best_of(|| {
                for run in rows.chunks_exact(rb * RUN) {
                    k.axpy_heads(
                        format,
                        HEAD_DIM,
                        black_box(&wh),
                        RUN,
                        black_box(run),
                        &mut acc,
                    )?;
                    black_box(&acc);
                }
                Ok(())
            })?;
            println!(
                "{:<12} {:<8} {:>8.1} {:>8.1}",
                format.name(),
                isa.name(),
                dot_ns,
                axpy_ns
            );
        }
    }

    println!();
    println!(
        "{:<12} {:<8} {:>8} {:>8}",
        "keys", "isa", "score", "3 heads"
    );
    for bits in [KiviBits::B4, KiviBits::B2] {
        let fmt = KiviKeyFormat::new(bits, 32);
        let bb = fmt.block_bytes(HEAD_DIM)?;
        let mut blocks = vec![0u8; bb * (ROWS / 32)];
        for (k, b) in x
            .chunks_exact(32 * HEAD_DIM)
            .zip(blocks.chunks_exact_mut(bb))
        {
            fmt.quantize_block(k, HEAD_DIM, b)?;
        }
        for isa in Isa::available() {
            let k = Kernels::new(isa)?;
            let mut scores = vec![0.0f32; 32];
            let ns = best_of(|| {
                for b in blocks.chunks_exact(bb) {
                    k.kivi_scores(fmt, black_box(&q), black_box(b), &mut scores)?;
                    black_box(&scores);
                }
                Ok(())
            })?;
            let mut scores = vec![0.0f32; HEADS * 32];
            let heads_ns = best_of(|| {
                for b in blocks.chunks_exact(bb) {
                    k.kivi_scores_heads(
                        fmt,
                        HEAD_DIM,
                        black_box(&qh),
                        black_box(b),
                        &mut scores,
                        32,
                    )?;
                    black_box(&scores);
                }
                Ok(())
            })?;
            println!(
                "{:<12} {:<8} {:>8.1} {:>8.1}",
                fmt.to_string(),
                isa.name(),
                ns,
                heads_ns
            );
        }
    }
    Ok(())
}
