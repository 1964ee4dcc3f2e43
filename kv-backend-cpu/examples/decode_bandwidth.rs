//! Prints decode-attention bandwidth next to the memory-read probe, measured in the same
//! run: a quick table where `benches/decode.rs` gives criterion's statistics.
//!
//! ```text
//! cargo run --release -p kv-backend-cpu --example decode_bandwidth            # full table
//! cargo run --release -p kv-backend-cpu --example decode_bandwidth -- 4096    # one length
//! cargo run --release -p kv-backend-cpu --example decode_bandwidth -- 4096 smollm2 f16 1
//! cargo run --release -p kv-backend-cpu --example decode_bandwidth -- prefill512
//! ```
//!
//! Arguments, all optional, in order: tokens (or `prefill<N>` for the attention of an
//! N-token prefill), shape (`smollm2` or `llama2-7b`), layout, threads; an empty argument
//! or `all` takes every choice. Each row times single steps and single probe passes and
//! shows the best and the median of each: on a shared machine the best is what the code
//! can do, the median what it did while sharing the cores. `%` divides kernel by probe,
//! best by best and median by median.

use std::time::Instant;

use kv_backend_cpu::bench::{DecodeBench, MemoryProbe};
use kv_core::{KvDType, ModelShape};

/// Best and median of `n` timings of `f`, in seconds.
fn timings(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[0], t[n / 2])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let first = std::env::args().nth(1);
    let prefill = first
        .as_deref()
        .and_then(|a| a.strip_prefix("prefill"))
        .map(str::parse::<usize>)
        .transpose()?;
    let tokens: Vec<usize> = match (&first, prefill) {
        (_, Some(n)) => vec![n],
        (Some(arg), None) => vec![arg.parse()?],
        (None, None) => vec![1024, 4096, 16384],
    };
    let args: Vec<String> = std::env::args().skip(2).collect();
    let pick = |i: usize, name: &str| {
        args.get(i)
            .is_none_or(|a| a.is_empty() || a == "all" || a == name)
    };
    let shapes: Vec<_> = [
        ("smollm2", ModelShape::new(1, 9, 3, 64)?),
        ("llama2-7b", ModelShape::new(1, 32, 32, 128)?),
    ]
    .into_iter()
    .filter(|(name, _)| pick(0, name))
    .collect();
    // Any layout by name (`int8-g32`, `kivi4`, ...); the float layouts by default.
    let dtypes: Vec<KvDType> = match args.get(1).filter(|a| !a.is_empty() && *a != "all") {
        Some(name) => vec![name.parse()?],
        None => vec![KvDType::F32, KvDType::F16, KvDType::BF16],
    };
    let threads_list: Vec<usize> = [1usize, 2]
        .into_iter()
        .filter(|t| pick(2, &t.to_string()))
        .collect();
    let probe = MemoryProbe::new(256 << 20)?;
    println!(
        "isa {}; GB/s best / median",
        kv_backend_cpu::kernels::Isa::best()
    );
    println!(
        "{:<10} {:<5} {:>6} {:>3} {:>9} {:>13} {:>13} {:>11}",
        "shape", "dtype", "tokens", "thr", "step_us", "kernel", "probe", "%"
    );
    for &threads in &threads_list {
        for &(name, shape) in &shapes {
            for &dtype in &dtypes {
                for &n in &tokens {
                    if prefill.is_some() {
                        let bench = DecodeBench::with_queries(shape, dtype, n, n, threads)?;
                        let (best, med) = timings(9, || {
                            std::hint::black_box(bench.step().ok());
                        });
                        let gflop = bench.flops_per_step() as f64 / 1e9;
                        println!(
                            "{name:<10} {:<5} prefill {n:>6} thr {threads}: {:>9.1} us, GFLOP/s {:.1} best / {:.1} median",
                            dtype.to_string(),
                            med * 1e6,
                            gflop / best,
                            gflop / med
                        );
                        continue;
                    }
                    let bench = DecodeBench::new(shape, dtype, n, threads)?;
                    let bytes = bench.kv_bytes_per_step() as f64;
                    // Enough steps for ~0.5 s of reading at 20 GB/s.
                    let steps = (10e9 / bytes).clamp(9.0, 3000.0) as usize;
                    probe.read(threads);
                    let (p_best, p_med) = timings(7, || {
                        std::hint::black_box(probe.read(threads));
                    });
                    bench.step()?;
                    let mut failed = None;
                    let timed = || {
                        timings(steps, || {
                            if let Err(e) = bench.step() {
                                failed = Some(e);
                            }
                        })
                    };
                    // Steps from a pool thread, as a model's decode loop runs them.
                    let (k_best, k_med) = bench.install(timed);
                    if let Some(e) = failed {
                        return Err(e.into());
                    }
                    let pb = probe.bytes() as f64;
                    let (kb, km, pbb, pbm) =
                        (bytes / k_best, bytes / k_med, pb / p_best, pb / p_med);
                    println!(
                        "{name:<10} {:<5} {n:>6} {threads:>3} {:>9.1} {:>6.2}/{:>6.2} {:>6.2}/{:>6.2} {:>4.0}%/{:>4.0}%",
                        dtype.to_string(),
                        k_med * 1e6,
                        kb / 1e9,
                        km / 1e9,
                        pbb / 1e9,
                        pbm / 1e9,
                        100.0 * kb / pbb,
                        100.0 * km / pbm
                    );
                }
            }
        }
    }
    Ok(())
}
