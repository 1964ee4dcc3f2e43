//! Decode attention against the memory limit.
//!
//! One decode step reads every cached K and V row once, so its speed is stated as bytes of
//! K/V read per second (criterion's `thrpt`), next to a plain read of a 256 MiB array by the
//! same number of threads (`memory_read`). The ratio of the two is how close the kernel comes
//! to the hardware; measure them in one run, as here, on an otherwise idle machine.
//!
//! Shapes: one SmolLM2-135M layer (9 query heads sharing 3 KV heads, head dim 64) and one
//! Llama-2-7B layer (32 x 32 heads, head dim 128); 1k, 4k and 16k cached tokens; the f32,
//! f16 and bf16 layouts and the quantized ones (int8-g32, int4-g32, int4h-g32, kivi4), so
//! that a layout's time compares with f16's in the same run; 1 and 2 threads.
//!
//! ```text
//! cargo bench -p kv-backend-cpu --bench decode -- --quick
//! cargo bench -p kv-backend-cpu --bench decode -- 'decode/smollm2/f16'   # a subset
//! ```

// criterion_group! and criterion_main! generate functions without docs.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kv_backend_cpu::bench::{DecodeBench, MemoryProbe};
use kv_core::{KiviBits, KvDType, ModelShape, QuantGroup};

/// Bytes the memory probe reads: far above any last-level cache.
const PROBE_BYTES: usize = 256 << 20;
const THREADS: [usize; 2] = [1, 2];
const TOKENS: [usize; 3] = [1024, 4096, 16384];
const LAYOUTS: [KvDType; 7] = [
    KvDType::F32,
    KvDType::F16,
    KvDType::BF16,
    KvDType::Int8 {
        group: QuantGroup::G32,
    },
    KvDType::Int4 {
        group: QuantGroup::G32,
    },
    KvDType::Int4Hadamard {
        group: QuantGroup::G32,
    },
    KvDType::kivi(KiviBits::B4),
];

fn shapes() -> [(&'static str, ModelShape); 2] {
    let shape = |q, kv, d| match ModelShape::new(1, q, kv, d) {
        Ok(s) => s,
        Err(e) => panic!("bench shape: {e}"),
    };
    [
        ("smollm2", shape(9, 3, 64)),
        ("llama2-7b", shape(32, 32, 128)),
    ]
}

fn memory_read(c: &mut Criterion) {
    let probe = match MemoryProbe::new(PROBE_BYTES) {
        Ok(p) => p,
        Err(e) => panic!("memory probe: {e}"),
    };
    let mut group = c.benchmark_group("memory_read");
    group.throughput(Throughput::Bytes(probe.bytes() as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    for threads in THREADS {
        group.bench_with_input(
            BenchmarkId::new("256MiB", format!("t{threads}")),
            &threads,
            |b, &t| b.iter(|| probe.read(t)),
        );
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    for (name, shape) in shapes() {
        for dtype in LAYOUTS {
            let mut group = c.benchmark_group(format!("decode/{name}/{dtype}"));
            group.sample_size(20);
            group.warm_up_time(Duration::from_millis(300));
            for tokens in TOKENS {
                for threads in THREADS {
                    let bench = match DecodeBench::new(shape, dtype, tokens, threads) {
                        Ok(b) => b,
                        Err(e) => panic!("decode bench {name} {dtype} {tokens}: {e}"),
                    };
                    group.throughput(Throughput::Bytes(bench.kv_bytes_per_step()));
                    group.bench_function(
                        BenchmarkId::new(format!("{tokens}"), format!("t{threads}")),
                        // Steps from a pool thread, as a model's decode loop runs them.
                        |b| {
                            bench.install(|| {
                                b.iter(|| match bench.step() {
                                    Ok(out) => out,
                                    Err(e) => panic!("decode step: {e}"),
                                })
                            })
                        },
                    );
                }
            }
            group.finish();
        }
    }
}

criterion_group!(benches, memory_read, decode);
criterion_main!(benches);
