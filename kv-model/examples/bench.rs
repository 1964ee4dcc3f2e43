//! The measurement program behind `cargo xtask bench`: every number kv's report shows, in
//! one run, as lines `BENCH section=... key=value ...` on stdout (progress on stderr).
//!
//! Sections:
//! - `probe`, `attn`: the memory-read probe (the limit) and one decode-attention step per
//!   layout at several context lengths, for a SmolLM2 layer and a Llama-2-7B layer
//!   ([`kv_backend_cpu::bench`]).
//! - `nocache`: time per generated token on the model at context n, recomputing the whole
//!   sequence (no cache) and with the cache (one token through the model).
//! - `prefill`, `decode`, `prefill-depth`: end to end on the model per layout: prompt
//!   tokens/s into an empty cache, decode tokens/s at several depths (tokens already in
//!   the cache), and prompt tokens/s on top of a long cached context; again with
//!   activations rounded to 8 bits (`weights=blocks-q8`, f16 cache: the named option).
//!   Each decode round reads the memory probe just before its steps (same threads, same
//!   buffer size as `probe`), so the share of the physical limit is taken per round
//!   (`tokens_per_probe_gb`: the median over rounds of tokens/s per GB/s of that round's
//!   probe; `cpu_tokens_per_probe_gb`: the same per CPU second of each, which a loaded
//!   machine's other processes do not move) rather than against a probe read minutes apart.
//! - `weights`: the decode matrix-vector kernel (one activation row) of each GGUF block type
//!   kv keeps in blocks, on a 1536x576 matrix (SmolLM2's gate/up; 1536x768 where the block
//!   is 256 weights), in weight bytes read per second and as a ratio to Q4_1's, the types
//!   alternating within each round; once in cache (`section=weights`: one matrix called
//!   repeatedly) and once streamed from DRAM (`section=weights-memory`: copies totalling
//!   64 MiB called in turn, as a decode step reads its weights). No model needed.
//! - `weight-rows` (not in the default list): one matmul of SmolLM2's decode shapes
//!   (576x576, 1536x576, 576x1536; Q4_1 and Q8_0) at 1 to 128 activation rows, per path
//!   (`auto`: what kv runs with exact activations; `matvec`, `strips`, `panels`: each
//!   kernel; `q8`: activations rounded to 8 bits and the interleaved integer kernel,
//!   rounding and transposition included), in seconds per call and per row: the
//!   crossovers between the paths. No model needed.
//! - `batch`: batched decode on the model: 1, 4, 16 and 64 sequences of 64-token prompts
//!   (a shared 48-token prefix with the prefix cache, or all distinct), 64 new tokens
//!   each; decode tokens/s over all sequences (prefill time taken out, prefill reported
//!   apart) and the ratio to 1 sequence in the same run; with exact activations and
//!   rounded to 8 bits (`activations=exact|q8`).
//!
//! `cargo run --release -p kv-model --example bench -- [--quick] [--model FILE]
//! [--threads N] [--sections attn,weights,weight-rows,nocache,e2e,store,batch]`. Set `RAYON_NUM_THREADS` to the same thread
//! count: candle's matmuls read it.

use std::error::Error;
use std::process::ExitCode;
use std::time::Instant;

use kv_attention::PagedCache;
use kv_backend_cpu::bench::{
    memory_read_probe, token_ids, DecodeBench, MemoryProbe, BENCH_MIN_CACHE_BYTES,
};
use kv_backend_cpu::CpuBackend;
use kv_core::candle::{Device, Tensor, D};
use kv_core::{KvDType, ModelShape, StorageSpec};
use kv_model::{Activations, Logits, Model, WeightFormat};

type Res<T> = Result<T, Box<dyn Error>>;

/// The layouts measured, in report order.
const LAYOUTS: [&str; 9] = [
    "f32",
    "f16",
    "bf16",
    "int8-g32",
    "int4-g32",
    "int4h-g32",
    "kivi4",
    "kivi2",
    "kivi2-r128",
];

/// Tokens per cache block in the model sections: a multiple of KIVI's 32-token key block.
const BLOCK: usize = 32;

/// How much to measure: the full run or the quick one that proves the harness.
struct Sizes {
    probe_bytes: usize,
    attn_tokens: Vec<usize>,
    /// K/V each attention point holds at least (over identical layers).
    attn_min_bytes: u64,
    /// Seconds of timed steps per attention point (at least 3 steps).
    attn_seconds: f64,
    nocache_n: Vec<usize>,
    nocache_steps: usize,
    /// Seconds after which no further recompute run starts for the same n.
    nocache_budget_s: f64,
    cached_steps: usize,
    prompt: usize,
    depths: Vec<usize>,
    decode: usize,
    /// Tokens already cached when a second prompt of `prompt` tokens is prefilled (a long
    /// conversation's next turn); `None` skips it.
    prefill_depth: Option<usize>,
    /// Interleaved rounds per attention point and per decode depth, over all layouts
    /// (each reports its median round).
    rounds: usize,
    /// With the weights expanded to f32 at load (4x the bytes per step of the file's
    /// blocks), f16 cache: prompt length and decode steps at depth 0.
    f32_prompt: usize,
    f32_decode: usize,
    /// Tokens of the prefix saved to and restored from each block tier.
    store_tokens: usize,
}

impl Sizes {
    fn full() -> Self {
        Self {
            probe_bytes: 512 << 20,
            attn_tokens: vec![1024, 4096, 16384],
            attn_min_bytes: BENCH_MIN_CACHE_BYTES,
            attn_seconds: 0.4,
            nocache_n: vec![64, 128, 256, 512, 1024, 2048],
            nocache_steps: 3,
            nocache_budget_s: 20.0,
            cached_steps: 8,
            prompt: 512,
            // The last depth ends its 32 decode steps at 4096, candle-transformers'
            // longest sequence, so the peer can be measured at the same depths.
            depths: vec![0, 1024, 4064],
            decode: 32,
            // llama-bench's `-p 512 -d 4096`.
            prefill_depth: Some(4096),
            rounds: 5,
            f32_prompt: 64,
            f32_decode: 8,
            store_tokens: 4096,
        }
    }

    fn quick() -> Self {
        Self {
            probe_bytes: 32 << 20,
            attn_tokens: vec![256, 1024],
            attn_min_bytes: 4 << 20,
            attn_seconds: 0.02,
            nocache_n: vec![16, 32, 64],
            nocache_steps: 1,
            nocache_budget_s: 1.0,
            cached_steps: 2,
            prompt: 32,
            depths: vec![0, 64, 128],
            decode: 3,
            prefill_depth: Some(128),
            rounds: 1,
            f32_prompt: 8,
            f32_decode: 2,
            store_tokens: 128,
        }
    }
}

struct Args {
    quick: bool,
    model: Option<String>,
    /// Gemma 3 270M for the `gemma` section (run only when given).
    gemma: Option<String>,
    threads: usize,
    sections: Vec<String>,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        quick: false,
        model: None,
        gemma: None,
        threads: 2,
        sections: vec![
            "attn".into(),
            "nocache".into(),
            "e2e".into(),
            "weights".into(),
            "store".into(),
            "batch".into(),
        ],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--quick" => a.quick = true,
            "--model" => a.model = Some(it.next().ok_or("--model needs a file")?),
            "--gemma" => a.gemma = Some(it.next().ok_or("--gemma needs a file")?),
            "--threads" => {
                let v = it.next().ok_or("--threads needs a number")?;
                a.threads = v
                    .parse::<usize>()
                    .map_err(|e| format!("--threads {v:?}: {e}"))?
                    .max(1);
            }
            "--sections" => {
                let v = it.next().ok_or("--sections needs a list")?;
                a.sections = v.split(',').map(str::to_string).collect();
            }
            other => return Err(format!("unknown flag {other:?}").into()),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    match parse_args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: &Args) -> Res<()> {
    let sizes = if a.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    // The model's kernels run on rayon's global pool: `--threads` of them.
    rayon::ThreadPoolBuilder::new()
        .num_threads(a.threads)
        .build_global()
        .map_err(|e| format!("cannot start {} threads: {e}", a.threads))?;
    let on = |s: &str| a.sections.iter().any(|x| x == s);
    println!(
        "BENCH section=run quick={} threads={} rayon_threads={}",
        a.quick,
        a.threads,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    if on("attn") {
        attention(&sizes, a.threads)?;
    }
    if on("weights") {
        rayon::scope(|_| weight_kernels(a.quick));
    }
    if on("weight-rows") {
        rayon::scope(|_| weight_rows(a.quick));
    }
    if on("nocache") || on("e2e") || on("store") || on("batch") {
        // On a worker of rayon's global pool, as `kv` runs: the kernels' parallel loops then
        // share work with the calling thread instead of handing it over and sleeping.
        let sections = |_: &rayon::Scope<'_>| {
            model_sections(
                a,
                &sizes,
                &ModelSections {
                    nocache: on("nocache"),
                    e2e: on("e2e"),
                    store: on("store"),
                    batch: on("batch"),
                },
            )
            .map_err(|e| e.to_string())
        };
        rayon::scope(sections)?;
    }
    if let Some(path) = &a.gemma {
        rayon::scope(|_| gemma_window(a.quick, path).map_err(|e| e.to_string()))?;
    }
    Ok(())
}

/// Gemma 3 270M with its 15 sliding-window layers freeing their blocks behind the 512-token
/// window (`free=true`) and with every layer keeping every token (`free=false`): prefill of
/// 512 tokens (best of two, fresh caches), decode at depths 0/1024/4096 (interleaved
/// rounds, each a fork of the filled sequence decoding `decode` tokens, median round), and
/// the cache's bytes at the deepest point (reserved by both groups, the pools allocated).
fn gemma_window(quick: bool, path: &str) -> Res<()> {
    let model = Model::load(path)?;
    let (prompt, depths, decode, rounds) = if quick {
        (32, vec![0, 64, 600], 2, 1)
    } else {
        (512, vec![0, 1024, 4096], 16, 3)
    };
    let dtype = KvDType::F16;
    let deepest = depths.iter().copied().max().unwrap_or(0).max(prompt);
    let capacity = deepest + decode + 1;
    let ids = token_ids(capacity, model.config().vocab_size);
    let chunk = 512;
    let make = |free: bool| -> Res<PagedCache<CpuBackend>> {
        let spec = StorageSpec::new(model.shape(), dtype, BLOCK, capacity.div_ceil(BLOCK))?;
        let cache = match model.sliding_layers(dtype, BLOCK, chunk, 2, spec.num_blocks)? {
            Some(sliding) if free => {
                PagedCache::with_sliding_window(CpuBackend::new(), spec, sliding, None)?
            }
            _ => PagedCache::new(CpuBackend::new(), spec)?,
        };
        Ok(cache)
    };
    // Prefill: fresh caches, the two modes alternating, the best of three each.
    let mut best = [f64::INFINITY; 2];
    for _ in 0..3 {
        for (i, free) in [false, true].into_iter().enumerate() {
            let mut cache = make(free)?;
            let seq = cache.create_sequence();
            let t = Instant::now();
            let logits = model.forward(&ids[..prompt], &mut cache, seq, Logits::Last)?;
            std::hint::black_box(argmax(&logits)?);
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    for (free, best) in [false, true].into_iter().zip(best) {
        println!(
            "BENCH section=gemma what=prefill free={free} layout={dtype} tokens={prompt} secs={best:.6} tokens_per_s={:.3}",
            prompt as f64 / best
        );
        eprintln!(
            "bench: gemma3 free={free}: prefill {prompt} at {:.1} tokens/s",
            prompt as f64 / best
        );
    }
    let mut caches = Vec::new();
    for free in [false, true] {
        let mut cache = make(free)?;
        let seq = cache.create_sequence();
        caches.push((free, cache, seq));
    }
    let mut peak = vec![(0u64, 0u64, 0u64); caches.len()];
    for &depth in &depths {
        let mut secs = vec![Vec::new(); caches.len()];
        for (_, cache, seq) in &mut caches {
            let have = cache.len(*seq)?;
            for part in ids[have..depth.max(1)].chunks(chunk) {
                model.forward(part, cache, *seq, Logits::Last)?;
            }
        }
        for _ in 0..rounds {
            for (i, (_, cache, seq)) in caches.iter_mut().enumerate() {
                let fork = cache.fork(*seq)?;
                let mut token = ids[cache.len(fork)?];
                let t = Instant::now();
                for _ in 0..decode {
                    token = argmax(&model.forward(&[token], cache, fork, Logits::Last)?)?;
                }
                secs[i].push(t.elapsed().as_secs_f64());
                let u = cache.usage();
                let all = u.sliding.map_or(u.bytes_reserved, |s| s.bytes_all_global);
                peak[i] = (
                    peak[i].0.max(u.bytes_reserved),
                    peak[i].1.max(all),
                    u.bytes_allocated,
                );
                cache.free(fork)?;
            }
        }
        for ((free, _, _), secs) in caches.iter().zip(secs) {
            let secs = median(secs);
            println!(
                "BENCH section=gemma what=decode free={free} layout={dtype} depth={depth} steps={decode} rounds={rounds} secs={secs:.6} tokens_per_s={:.3}",
                decode as f64 / secs
            );
            eprintln!(
                "bench: gemma3 free={free}: decode at depth {depth}: {:.1} tokens/s",
                decode as f64 / secs
            );
        }
    }
    for ((free, _, _), (reserved, all, allocated)) in caches.iter().zip(peak) {
        println!(
            "BENCH section=gemma what=memory free={free} layout={dtype} tokens={} peak_reserved_bytes={reserved} all_global_bytes={all} allocated_bytes={allocated}",
            deepest + decode
        );
    }
    Ok(())
}

/// Which of the sections that run the model to run.
struct ModelSections {
    nocache: bool,
    e2e: bool,
    store: bool,
    batch: bool,
}

/// The sections that run the model: no cache against the cache, end to end, tiers, batches.
fn model_sections(a: &Args, sizes: &Sizes, on: &ModelSections) -> Res<()> {
    let path = a
        .model
        .clone()
        .map(Into::into)
        .unwrap_or_else(kv_model::default_model_path);
    let started = Instant::now();
    let mut model = Model::load(&path)?;
    eprintln!(
        "bench: model loaded (the file's blocks) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if on.nocache {
        no_cache(sizes, &model)?;
    }
    if on.store {
        store_tiers(sizes, &model, a.threads)?;
    }
    if on.batch {
        // Exact activations, then rounded to 8 bits (the named option), in one run.
        batched_decode(a.quick, &model)?;
        model.set_activations(Activations::Q8);
        batched_decode(a.quick, &model)?;
        model.set_activations(Activations::Exact);
    }
    if on.e2e {
        let probe = RoundProbe::new(sizes.probe_bytes, a.threads)?;
        let layouts = LAYOUTS
            .iter()
            .map(|name| name.parse())
            .collect::<Result<Vec<KvDType>, _>>()?;
        end_to_end(sizes, &model, &probe, "blocks", &layouts)?;
        // The same blocks with activations rounded to 8 bits (the named option), f16 cache.
        model.set_activations(Activations::Q8);
        end_to_end(sizes, &model, &probe, "blocks-q8", &[KvDType::F16])?;
        drop(model);
        // The f32 expansion (kv's default before its own block kernels) for comparison
        // with the peer's f32 mode: a short prompt and depth 0 only.
        let model = Model::load_with(&path, &Device::Cpu, WeightFormat::F32)?;
        let short = Sizes {
            prompt: sizes.f32_prompt,
            depths: vec![0],
            decode: sizes.f32_decode,
            prefill_depth: None,
            rounds: 1,
            attn_tokens: Vec::new(),
            nocache_n: Vec::new(),
            ..*sizes
        };
        end_to_end(&short, &model, &probe, "f32", &[KvDType::F16])?;
    }
    Ok(())
}

/// The block types timed by the `weights` section, with their bytes per block of weights.
const WEIGHT_TYPES: [(&str, usize, usize); 8] = [
    ("q4_1", 20, 32),
    ("q4_0", 18, 32),
    ("q8_0", 34, 32),
    ("q5_0", 22, 32),
    ("q5_1", 24, 32),
    ("q4_k", 144, 256),
    ("q5_k", 176, 256),
    ("q6_k", 210, 256),
];

/// Bytes of weights the `weights-memory` lines stream per type: twice this machine's 32 MiB
/// L3 (and past any desktop's), so every call reads its matrix from DRAM.
const FROM_MEMORY_BYTES: usize = 64 << 20;

/// `weights` section: each type's decode kernel at the workspace's SIMD level, types
/// interleaved per round, the median round per type; on rayon's pool (`--threads`). Twice:
/// one matrix called repeatedly (in cache: the kernel's arithmetic, `section=weights`),
/// and copies of it totalling [`FROM_MEMORY_BYTES`] called in turn (streamed from DRAM,
/// as a model's decode reads its weights: `section=weights-memory`).
fn weight_kernels(quick: bool) {
    let (rounds, reps) = if quick { (1, 5) } else { (5, 100) };
    let rows = 1536;
    let isa = kv_quant::Isa::best().name();
    let cols_of = |block: usize| if block == 256 { 768 } else { 576 };
    for (section, min_bytes) in [("weights", 0), ("weights-memory", FROM_MEMORY_BYTES)] {
        let min_bytes = if quick { min_bytes / 8 } else { min_bytes };
        let mut secs: Vec<Vec<f64>> = vec![Vec::new(); WEIGHT_TYPES.len()];
        for _ in 0..rounds {
            for ((ty, _, block), s) in WEIGHT_TYPES.iter().zip(&mut secs) {
                let cols = cols_of(*block);
                let t = if min_bytes == 0 {
                    kv_model::matmul_seconds(isa, ty, rows, cols, 1, reps)
                } else {
                    kv_model::matmul_seconds_from_memory(isa, ty, rows, cols, reps, min_bytes)
                };
                if let Some(t) = t {
                    s.push(t);
                }
            }
        }
        let bytes_per_s = |i: usize| -> Option<(f64, f64, usize)> {
            let (_, bytes, block) = WEIGHT_TYPES[i];
            let cols = cols_of(block);
            let mut s = secs[i].clone();
            s.sort_by(f64::total_cmp);
            let t = *s.get(s.len() / 2)?;
            let total = rows * cols / block * bytes;
            Some((total as f64 / t, t, cols))
        };
        let Some((base, _, _)) = bytes_per_s(0) else {
            return;
        };
        for (i, (ty, _, _)) in WEIGHT_TYPES.iter().enumerate() {
            if let Some((bps, t, cols)) = bytes_per_s(i) {
                println!(
                    "BENCH section={section} type={ty} isa={isa} rows={rows} cols={cols} rounds={rounds} secs={t:.9} bytes_per_s={bps:.0} ratio_q4_1={:.3}",
                    bps / base
                );
            }
        }
    }
}

/// `weight-rows` section: SmolLM2's decode shapes at 1 to 128 activation rows, each path
/// where it applies, paths and row counts interleaved per round, the median round.
fn weight_rows(quick: bool) {
    let (rounds, reps) = if quick { (1, 3) } else { (3, 20) };
    let isa = kv_quant::Isa::best().name();
    let shapes = [(576, 576), (1536, 576), (576, 1536)];
    let ns = [1usize, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128];
    for ty in ["q4_1", "q8_0"] {
        for (rows, cols) in shapes {
            for n in ns {
                for path in ["auto", "matvec", "strips", "panels", "q8"] {
                    let mut t: Vec<f64> = (0..rounds)
                        .filter_map(|_| {
                            kv_model::matmul_path_seconds(path, isa, ty, rows, cols, n, reps)
                        })
                        .collect();
                    if t.is_empty() {
                        continue;
                    }
                    t.sort_by(f64::total_cmp);
                    let secs = t[t.len() / 2];
                    println!(
                        "BENCH section=weight-rows type={ty} isa={isa} rows={rows} cols={cols} n={n} path={path} rounds={rounds} secs={secs:.9} secs_per_row={:.9}",
                        secs / n as f64
                    );
                }
            }
        }
    }
}

/// `batch` section: batched greedy decode at 1, 4, 16 and 64 sequences, shared and
/// distinct prompts, decode apart from prefill, ratio to 1 sequence in the same run.
fn batched_decode(quick: bool, model: &Model) -> Res<()> {
    use kv_model::BatchOptions;
    let (prompt, new, shared) = if quick { (16, 8, 12) } else { (64, 64, 48) };
    let sizes: &[usize] = if quick { &[1, 4] } else { &[1, 4, 16, 64] };
    let vocab = model.config().vocab_size as u32;
    for prefix in ["shared", "distinct"] {
        let mut base = None;
        for &seqs in sizes {
            let prompts: Vec<Vec<u32>> = (0..seqs as u32)
                .map(|s| {
                    (0..prompt as u32)
                        .map(|i| {
                            let salt = if prefix == "shared" && (i as usize) < shared {
                                0
                            } else {
                                s + 1
                            };
                            (i * 7919 + salt * 104_729 + 17) % vocab
                        })
                        .collect()
                })
                .collect();
            let blocks = (seqs * (prompt + new)).div_ceil(BLOCK) + seqs + 1;
            let spec = StorageSpec::new(model.shape(), KvDType::F16, BLOCK, blocks)?;
            let mut cache = if prefix == "shared" {
                PagedCache::with_prefix_cache(CpuBackend::new(), spec, 7)?
            } else {
                PagedCache::new(CpuBackend::new(), spec)?
            };
            let options = BatchOptions {
                max_tokens: new,
                max_batch: seqs,
                ..BatchOptions::default()
            };
            let run = model.generate_batch(&mut cache, &prompts, &options)?;
            let prefill: f64 = run
                .sequences
                .iter()
                .map(|s| s.prefill_time.as_secs_f64())
                .sum();
            let decode_secs = (run.wall_time.as_secs_f64() - prefill).max(1e-9);
            let tokens = run.generated_tokens();
            let per_s = tokens as f64 / decode_secs;
            let base = *base.get_or_insert(per_s);
            let act = match model.activations() {
                Activations::Exact => "exact",
                Activations::Q8 => "q8",
            };
            println!(
                "BENCH section=batch prefix={prefix} activations={act} seqs={seqs} prompt={prompt} new={new} peak_batch={} reused_tokens={} prefill_secs={prefill:.6} prefill_tokens_per_s={:.3} decode_secs={decode_secs:.6} decode_tokens={tokens} decode_tokens_per_s={per_s:.3} ratio_1={:.3}",
                run.peak_batch,
                run.reused_tokens(),
                run.prefill_tokens_per_s(),
                per_s / base
            );
        }
    }
    Ok(())
}

fn attention(sizes: &Sizes, threads: usize) -> Res<()> {
    let probe = |when: &str| -> Res<()> {
        let bytes_per_s = memory_read_probe(sizes.probe_bytes, threads)?;
        println!(
            "BENCH section=probe when={when} buffer_bytes={} threads={threads} bytes_per_s={bytes_per_s:.0}",
            sizes.probe_bytes
        );
        eprintln!("bench: memory probe {:.2} GB/s", bytes_per_s / 1e9);
        Ok(())
    };
    probe("before")?;
    let shapes = [
        ("smollm2-135m", ModelShape::new(1, 9, 3, 64)?),
        ("llama-2-7b", ModelShape::new(1, 32, 32, 128)?),
    ];
    // At each shape and length every layout's bench is built first, then timed in
    // interleaved rounds, each reporting its median round: load from other processes
    // comes and goes over seconds, and interleaving spreads it over all layouts alike.
    for (shape_name, shape) in shapes {
        for &tokens in &sizes.attn_tokens {
            let mut benches = Vec::new();
            for name in LAYOUTS {
                let dtype: KvDType = name.parse()?;
                let bench = DecodeBench::with_min_bytes(
                    shape,
                    dtype,
                    tokens,
                    1,
                    threads,
                    sizes.attn_min_bytes,
                )?;
                let first = bench.time_steps(1)?;
                let steps = ((sizes.attn_seconds / first) as usize).clamp(3, 500);
                let per_round = steps.div_ceil(sizes.rounds).max(3);
                benches.push((name, bench, per_round, Vec::with_capacity(sizes.rounds)));
            }
            for _ in 0..sizes.rounds {
                for (_, bench, per_round, secs) in &mut benches {
                    secs.push(bench.time_steps(*per_round)?);
                }
            }
            for (name, bench, per_round, secs) in benches {
                let secs = median(secs);
                let bytes = bench.kv_bytes_per_step();
                println!(
                    "BENCH section=attn shape={shape_name} layout={name} tokens={tokens} steps={} rounds={} secs={secs:.9} kv_bytes={bytes} bytes_per_s={:.0}",
                    per_round * sizes.rounds,
                    sizes.rounds,
                    bytes as f64 / secs
                );
                eprintln!(
                    "bench: attention {shape_name} {name} {tokens}: {:.1} us/step, {:.2} GB/s",
                    secs * 1e6,
                    bytes as f64 / secs / 1e9
                );
            }
        }
    }
    probe("after")
}

fn argmax(logits: &Tensor) -> Res<u32> {
    Ok(logits
        .flatten_all()?
        .argmax(D::Minus1)?
        .to_scalar::<u32>()?)
}

/// A cache on rayon's global pool, as `kv generate` runs (the model sections run on a
/// worker of that pool, so attention and matmuls share its threads without hand-overs).
fn new_cache(model: &Model, dtype: KvDType, tokens: usize) -> Res<PagedCache<CpuBackend>> {
    let spec = StorageSpec::new(model.shape(), dtype, BLOCK, tokens.div_ceil(BLOCK))?;
    Ok(PagedCache::new(CpuBackend::new(), spec)?)
}

/// Brings `seq` to exactly `len` tokens of `ids` (truncating, or running the missing ones
/// in chunks of 512); returns the last logits when it ran anything.
fn fill(
    model: &Model,
    cache: &mut PagedCache<CpuBackend>,
    seq: kv_core::SeqId,
    ids: &[u32],
    len: usize,
) -> Res<Option<Tensor>> {
    let have = cache.len(seq)?;
    if have >= len {
        cache.truncate(seq, len)?;
        return Ok(None);
    }
    let mut logits = None;
    for start in (have..len).step_by(512) {
        let end = (start + 512).min(len);
        logits = Some(model.forward(&ids[start..end], cache, seq, Logits::Last)?);
    }
    Ok(logits)
}

/// Seconds of the faster of two prefills of `ids[depth..depth + prompt]` with `depth`
/// tokens cached (the cache truncated back to `depth` before each).
fn best_prefill(
    model: &Model,
    cache: &mut PagedCache<CpuBackend>,
    seq: kv_core::SeqId,
    ids: &[u32],
    depth: usize,
    prompt: usize,
) -> Res<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..2 {
        cache.truncate(seq, depth)?;
        let t = Instant::now();
        let logits = model.forward(&ids[depth..depth + prompt], cache, seq, Logits::Last)?;
        std::hint::black_box(argmax(&logits)?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// A prefix of `store_tokens` tokens (f16 cache) prefilled, then saved to each tier (host
/// memory, a disk directory, and with the `redis` feature a `redis-server` started here)
/// and restored from it into a fresh cache through `TieredCache`: seconds of each, and
/// bytes moved per second, with the memory-read probe measured in the same run. Best of
/// two of each.
fn store_tiers(sizes: &Sizes, model: &Model, threads: usize) -> Res<()> {
    use kv_attention::cache_file::encode_value;
    use kv_attention::store::{BlockStore, DiskStore, HostStore};
    use kv_attention::TieredCache;
    use kv_core::content::{chain_keys, Fingerprint};

    let n = sizes.store_tokens;
    let dtype = KvDType::F16;
    let ids = token_ids(n + 1, model.config().vocab_size);
    let fp = Fingerprint::of_parts(&[("bench", b"store section")]);
    let mut cache = new_cache(model, dtype, n + 1)?;
    let seq = cache.create_sequence();
    let mut prefill = f64::INFINITY;
    for _ in 0..2 {
        cache.truncate(seq, 0)?;
        let t = Instant::now();
        fill(model, &mut cache, seq, &ids, n)?;
        prefill = prefill.min(t.elapsed().as_secs_f64());
    }
    cache.commit(seq, &ids[..n])?;
    let keys = chain_keys(&ids[..n], BLOCK, &fp, dtype);
    let values: Vec<_> = keys
        .iter()
        .zip(cache.export_blocks(seq, keys.len())?)
        .map(|(k, b)| (*k, encode_value(&fp, k, &b)))
        .collect();
    let bytes: u64 = values.iter().map(|(_, v)| v.len() as u64).sum();
    drop(cache);
    let probe = memory_read_probe(sizes.probe_bytes, threads)?;
    println!(
        "BENCH section=probe when=store buffer_bytes={} threads={threads} bytes_per_s={probe:.0}",
        sizes.probe_bytes
    );
    let dir = std::env::temp_dir().join(format!("kv-bench-store-{}", std::process::id()));
    #[cfg(feature = "redis")]
    let mut redis = Some(kv_attention::redis_server::RedisServer::start()?);
    // A restart keeps the port: the URL stays.
    #[cfg(feature = "redis")]
    let redis_url = redis.as_ref().map(|r| r.url()).unwrap_or_default();
    let tiers: &[&str] = if cfg!(feature = "redis") {
        &["host", "disk", "redis"]
    } else {
        &["host", "disk"]
    };
    for &tier in tiers {
        let open = || -> Res<Box<dyn BlockStore>> {
            Ok(match tier {
                "host" => Box::new(HostStore::new(u64::MAX)),
                #[cfg(feature = "redis")]
                "redis" => Box::new(kv_attention::store::RedisStore::new(
                    &redis_url,
                    600,
                    std::time::Duration::from_secs(10),
                )?),
                _ => Box::new(DiskStore::open(&dir, u64::MAX)?),
            })
        };
        let (mut save, mut restore) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..2 {
            let _ = std::fs::remove_dir_all(&dir);
            #[cfg(feature = "redis")]
            if tier == "redis" {
                if let Some(r) = redis.as_mut() {
                    r.restart()?; // empty again
                }
            }
            let mut store = open()?;
            let t = Instant::now();
            store.put_many(&values)?;
            save = save.min(t.elapsed().as_secs_f64());
            if tier == "disk" {
                store = open()?;
            }
            let mut tiered = TieredCache::new(new_cache(model, dtype, n + 1)?, fp, vec![store]);
            let t = Instant::now();
            let (_, reused) = tiered.create_with_prefix(&ids[..n + 1]);
            restore = restore.min(t.elapsed().as_secs_f64());
            if reused != n {
                return Err(format!("the {tier} tier restored {reused} of {n} tokens").into());
            }
        }
        println!(
            "BENCH section=store tier={tier} layout={dtype} tokens={n} bytes={bytes} \
             prefill_secs={prefill:.6} save_secs={save:.6} restore_secs={restore:.6} \
             save_bytes_per_s={:.0} load_bytes_per_s={:.0} probe_bytes_per_s={probe:.0}",
            bytes as f64 / save,
            bytes as f64 / restore
        );
        eprintln!(
            "bench: {tier} tier: restore {:.3} s vs prefill {:.3} s ({:.1}x); load {:.2} GB/s \
             = {:.1}% of the memory probe's {:.2} GB/s",
            restore,
            prefill,
            prefill / restore,
            bytes as f64 / restore / 1e9,
            100.0 * bytes as f64 / restore / probe,
            probe / 1e9
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn no_cache(sizes: &Sizes, model: &Model) -> Res<()> {
    let max_n = sizes.nocache_n.iter().copied().max().unwrap_or(1);
    let ids = token_ids(max_n, model.config().vocab_size);
    let mut cache = new_cache(model, KvDType::F16, max_n)?;
    let seq = cache.create_sequence();
    for &n in &sizes.nocache_n {
        // A few runs, fewer when they are slow: the recompute at 2048 tokens takes minutes.
        let mut runs = Vec::with_capacity(sizes.nocache_steps);
        while runs.len() < sizes.nocache_steps
            && (runs.is_empty() || runs.iter().sum::<f64>() < sizes.nocache_budget_s)
        {
            let t = Instant::now();
            let logits = model.forward_uncached(&ids[..n], Logits::Last)?;
            std::hint::black_box(argmax(&logits)?);
            runs.push(t.elapsed().as_secs_f64());
        }
        let runs_done = runs.len();
        let uncached = median(runs);
        // The cached step that yields the same token: n - 1 tokens in the cache, the n-th
        // through the model.
        fill(model, &mut cache, seq, &ids, n - 1)?;
        let mut times = Vec::with_capacity(sizes.cached_steps);
        for _ in 0..sizes.cached_steps + 1 {
            cache.truncate(seq, n - 1)?;
            let t = Instant::now();
            let logits = model.forward(&ids[n - 1..n], &mut cache, seq, Logits::Last)?;
            std::hint::black_box(argmax(&logits)?);
            times.push(t.elapsed().as_secs_f64());
        }
        times.remove(0); // warm-up
        let cached = median(times);
        println!(
            "BENCH section=nocache n={n} uncached_runs={runs_done} uncached_secs={uncached:.6} cached_secs={cached:.6} ratio={:.3}",
            uncached / cached
        );
        eprintln!(
            "bench: context {n}: no cache {:.1} ms/token, cache {:.1} ms/token ({:.1}x)",
            uncached * 1e3,
            cached * 1e3,
            uncached / cached
        );
    }
    Ok(())
}

/// Timed passes of the memory probe before each end-to-end decode round (their median is the
/// round's probe): three 512 MiB passes take ~40 ms against ~100 ms of decode steps.
const ROUND_PROBE_PASSES: usize = 3;

/// The memory-read probe read in the same rounds as end-to-end decode. This VM's bandwidth
/// moves by half from one second to the next, so a decode rate divided by a probe read
/// minutes earlier says more about the VM than about kv. The buffer is allocated once
/// (sizes' `probe_bytes`, far larger than the L3) and read whole by the same thread count
/// as the model's kernels, as `memory_read_probe` does: still a strict limit.
struct RoundProbe {
    probe: MemoryProbe,
    threads: usize,
}

impl RoundProbe {
    fn new(bytes: usize, threads: usize) -> Res<Self> {
        let probe = MemoryProbe::new(bytes)?;
        // Untimed first pass: the pages are written already; this warms the TLB and threads.
        std::hint::black_box(probe.read(threads));
        Ok(Self { probe, threads })
    }

    /// Bytes per second (the median of [`ROUND_PROBE_PASSES`] passes), and the process's
    /// CPU seconds per byte read over all passes (`None` where that clock is missing).
    fn measure(&self) -> (f64, Option<f64>) {
        let cpu = process_cpu();
        let times: Vec<f64> = (0..ROUND_PROBE_PASSES)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(self.probe.read(self.threads));
                t.elapsed().as_secs_f64().max(f64::MIN_POSITIVE)
            })
            .collect();
        let bytes = (self.probe.bytes() * ROUND_PROBE_PASSES) as f64;
        let cpu_per_byte = cpu
            .zip(process_cpu())
            .map(|(a, b)| (b - a).max(f64::MIN_POSITIVE) / bytes);
        (self.probe.bytes() as f64 / median(times), cpu_per_byte)
    }
}

/// CPU seconds used so far by all of this process's threads (Linux; `None` elsewhere or on
/// failure). On a loaded machine the probe's and decode's threads are descheduled for
/// different shares of their wall time; per CPU second both count only the time they ran,
/// which on an idle machine is their wall time times the threads. Time rayon's workers spin
/// waiting for work counts against decode: a share taken this way errs low.
fn process_cpu() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the call to fill; the clock id is
        // a constant Linux defines.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// End to end on `model` for each of `layouts`: prefill tokens/s (best of 2), then decode
/// tokens/s at each depth. Decode interleaves the layouts in rounds at each depth (every
/// layout's cache filled to the depth first), and each reports its median round: load from
/// other processes comes and goes over seconds, and interleaving spreads it over all
/// layouts alike, so their ratios hold where single runs of 32 steps moved 10-20%. Each
/// layout's round starts with a `probe` reading; the decode line reports those readings
/// (median, max) and the median over rounds of that round's tokens/s per GB/s of its probe
/// (`tokens_per_probe_gb`): times the bytes a step reads, the share of the physical limit.
fn end_to_end(
    sizes: &Sizes,
    model: &Model,
    probe: &RoundProbe,
    weights: &str,
    layouts: &[KvDType],
) -> Res<()> {
    let deepest = sizes
        .depths
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(sizes.prompt);
    let capacity =
        (deepest + sizes.decode + 1).max(sizes.prefill_depth.map_or(0, |d| d + sizes.prompt));
    let ids = token_ids(capacity, model.config().vocab_size);
    let mut caches = Vec::new();
    for &dtype in layouts {
        let mut cache = new_cache(model, dtype, capacity)?;
        let seq = cache.create_sequence();
        let best = best_prefill(model, &mut cache, seq, &ids, 0, sizes.prompt)?;
        println!(
            "BENCH section=prefill layout={dtype} weights={weights} tokens={} secs={best:.6} tokens_per_s={:.3}",
            sizes.prompt,
            sizes.prompt as f64 / best
        );
        eprintln!(
            "bench: {dtype} ({weights} weights): prefill {} tokens at {:.1} tokens/s",
            sizes.prompt,
            sizes.prompt as f64 / best
        );
        caches.push((dtype, cache, seq));
    }

    // Depths in increasing order, so that each fill only extends the caches.
    let mut depths = sizes.depths.clone();
    depths.sort_unstable();
    for depth in depths {
        for (_, cache, seq) in &mut caches {
            fill(model, cache, *seq, &ids, depth)?;
        }
        let mut rounds = vec![Vec::with_capacity(sizes.rounds); caches.len()];
        let mut probes = vec![Vec::with_capacity(sizes.rounds); caches.len()];
        // Per round, tokens per CPU second over probe bytes per CPU second (see `process_cpu`).
        let mut cpu_shares = vec![Vec::with_capacity(sizes.rounds); caches.len()];
        for _ in 0..sizes.rounds {
            for ((((_, cache, seq), secs), bw), cpu_share) in caches
                .iter_mut()
                .zip(&mut rounds)
                .zip(&mut probes)
                .zip(&mut cpu_shares)
            {
                // Back to the depth; the step at position `depth` reads token ids[depth]
                // (at depth 0 that first token goes in untimed, from an empty cache).
                cache.truncate(*seq, depth)?;
                let mut token = ids[depth];
                if depth == 0 {
                    let logits = model.forward(&ids[..1], cache, *seq, Logits::Last)?;
                    token = argmax(&logits)?;
                }
                let (round_bw, probe_cpu_per_byte) = probe.measure();
                bw.push(round_bw);
                let (t, cpu) = (Instant::now(), process_cpu());
                for _ in 0..sizes.decode {
                    token = argmax(&model.forward(&[token], cache, *seq, Logits::Last)?)?;
                }
                secs.push(t.elapsed().as_secs_f64().max(f64::MIN_POSITIVE));
                if let (Some(a), Some(b), Some(p)) = (cpu, process_cpu(), probe_cpu_per_byte) {
                    // Tokens per decode CPU second over GB per probe CPU second.
                    let decode_cpu = (b - a).max(f64::MIN_POSITIVE);
                    cpu_share.push(sizes.decode as f64 / decode_cpu * p * 1e9);
                }
            }
        }
        for ((((dtype, _, _), secs), bw), cpu_share) in
            caches.iter().zip(rounds).zip(probes).zip(cpu_shares)
        {
            let cpu_field = if cpu_share.is_empty() {
                String::new()
            } else {
                format!(" cpu_tokens_per_probe_gb={:.6}", median(cpu_share))
            };
            let per_gb = median(
                secs.iter()
                    .zip(&bw)
                    .map(|(s, b)| sizes.decode as f64 / s / (b / 1e9))
                    .collect(),
            );
            let secs = median(secs);
            let bw_max = bw.iter().copied().fold(0.0, f64::max);
            let bw = median(bw);
            println!(
                "BENCH section=decode layout={dtype} weights={weights} depth={depth} steps={} rounds={} secs={secs:.6} tokens_per_s={:.3} probe_bytes_per_s={bw:.0} probe_max_bytes_per_s={bw_max:.0} tokens_per_probe_gb={per_gb:.6}{cpu_field}",
                sizes.decode,
                sizes.rounds,
                sizes.decode as f64 / secs
            );
            eprintln!(
                "bench: {dtype} ({weights} weights): decode at depth {depth}: {:.1} tokens/s \
                 (probe in the same rounds: median {:.1} GB/s, max {:.1}; {per_gb:.2} tokens/s per GB/s{cpu_field})",
                sizes.decode as f64 / secs,
                bw / 1e9,
                bw_max / 1e9
            );
        }
    }

    // A prompt on top of a long context: the tiled prefill attention reads every cached
    // token for each query tile, which is where llama.cpp's quantized caches slow down.
    if let Some(depth) = sizes.prefill_depth {
        for (dtype, cache, seq) in &mut caches {
            fill(model, cache, *seq, &ids, depth)?;
            let best = best_prefill(model, cache, *seq, &ids, depth, sizes.prompt)?;
            println!(
                "BENCH section=prefill-depth layout={dtype} weights={weights} depth={depth} tokens={} secs={best:.6} tokens_per_s={:.3}",
                sizes.prompt,
                sizes.prompt as f64 / best
            );
            eprintln!(
                "bench: {dtype} ({weights} weights): prefill {} tokens at depth {depth}: {:.1} tokens/s",
                sizes.prompt,
                sizes.prompt as f64 / best
            );
        }
    }
    Ok(())
}
