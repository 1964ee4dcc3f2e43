//! Prefill and decode tokens/s of each weight format, measured in the same run so the ratio
//! survives a shared machine:
//!
//! ```text
//! cargo run --release -p kv-model --example weight_speed            # 512-token prefill
//! cargo run --release -p kv-model --example weight_speed -- 128 5   # prompt tokens, rounds
//! cargo run --release -p kv-model --example weight_speed -- kernels  # matvec per ISA level
//! ```
//!
//! `kernels` needs no model: it times the decode matrix-vector product of SmolLM2-135M's
//! shapes at each instruction-set level this CPU has, levels alternating within each round,
//! and prints each level's median time per round and its speed-up over AVX2.
//!
//! Loads the default model (`KV_MODEL_PATH` or the cache directory) once per format, then
//! alternates between them for several rounds: each round prefills the prompt into an f16
//! cache and decodes 32 single-token steps after it. Prints the best and the median round
//! of each format and the ratios to f32 (the former default): the best is what the code can
//! do, the median what it did while sharing the cores. Runs on a rayon worker, as the `kv`
//! binary does.

use std::time::Instant;

use kv_attention::PagedCache;
use kv_backend_cpu::CpuBackend;
use kv_core::{KvDType, StorageSpec};
use kv_model::{Logits, Model, WeightFormat};

const DECODE_STEPS: usize = 32;

fn round(model: &Model, prompt: &[u32]) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let blocks = (prompt.len() + DECODE_STEPS).div_ceil(16) + 1;
    let spec = StorageSpec::new(model.shape(), KvDType::F16, 16, blocks)?;
    let mut cache = PagedCache::new(CpuBackend::new(), spec)?;
    let seq = cache.create_sequence();
    let t = Instant::now();
    model.forward(prompt, &mut cache, seq, Logits::Last)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for i in 0..DECODE_STEPS {
        model.forward(&[prompt[i % prompt.len()]], &mut cache, seq, Logits::Last)?;
    }
    Ok((prefill, t.elapsed().as_secs_f64()))
}

/// Best and median of `xs` (seconds).
fn best_median(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[0], xs[xs.len() / 2])
}

/// SmolLM2-135M's projections at decode: (name, type, rows, cols).
const SHAPES: [(&str, &str, usize, usize); 4] = [
    ("q/o 576x576", "q4_1", 576, 576),
    ("gate/up 1536x576", "q4_1", 1536, 576),
    ("down 576x1536", "q4_1", 576, 1536),
    ("head 49152x576", "q8_0", 49152, 576),
];

fn kernels(rounds: usize) {
    let levels = ["scalar", "avx2", "avx512"];
    println!(
        "matvec per call, median of 200 (head: 20) calls, {} threads; x avx2 per round",
        rayon::current_num_threads()
    );
    for (name, ty, rows, cols) in SHAPES {
        for n in [1, 2] {
            let reps = if rows > 10_000 { 20 } else { 200 };
            let mut line = format!("{name:<17} {ty} n={n}:");
            let mut ratios = vec![Vec::new(); levels.len()];
            let mut base_us = Vec::new();
            for _ in 0..rounds {
                let times: Vec<Option<f64>> = levels
                    .iter()
                    .map(|l| kv_model::matmul_seconds(l, ty, rows, cols, n, reps))
                    .collect();
                let Some(base) = times[1] else { continue };
                base_us.push(format!("{:.0}", base * 1e6));
                for (r, t) in ratios.iter_mut().zip(&times) {
                    if let Some(t) = t {
                        r.push(base / t);
                    }
                }
            }
            line += &format!(" avx2 us [{}]", base_us.join(" "));
            for (l, r) in levels.iter().zip(&ratios) {
                let r: Vec<String> = r.iter().map(|v| format!("{v:.2}")).collect();
                line += &format!("  {l} [{}]", r.join(" "));
            }
            println!("{line}");
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("kernels") {
        let rounds = std::env::args().nth(2).map_or(Ok(3), |a| a.parse())?;
        rayon::scope(|_| kernels(rounds));
        return Ok(());
    }
    let mut args = std::env::args().skip(1);
    let prompt_len: usize = args.next().map_or(Ok(512), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let path =
        std::env::var_os("KV_MODEL_PATH").map_or_else(kv_model::default_model_path, Into::into);
    rayon::scope(|_| -> Result<(), String> {
        let formats = [WeightFormat::F32, WeightFormat::Blocks];
        let models = formats
            .iter()
            .map(|&f| Model::load_with(&path, &candle_core::Device::Cpu, f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let vocab = models[0].config().vocab_size as u32;
        let prompt: Vec<u32> = (0..prompt_len as u32)
            .map(|i| (i * 7919 + 17) % vocab)
            .collect();
        let mut times = vec![(Vec::new(), Vec::new()); formats.len()];
        for _ in 0..rounds.max(1) {
            for (m, t) in models.iter().zip(&mut times) {
                let (p, d) = round(m, &prompt).map_err(|e| e.to_string())?;
                t.0.push(p);
                t.1.push(d);
            }
        }
        println!(
            "{prompt_len}-token prefill, {DECODE_STEPS} decode steps after it, {} rounds, {} threads",
            rounds.max(1),
            rayon::current_num_threads()
        );
        println!("weights   prefill tok/s (best, median)   decode tok/s (best, median)   x f32 (best, median)");
        let rate = |n: usize, (b, m): (f64, f64)| (n as f64 / b, n as f64 / m);
        let base_p = rate(prompt_len, best_median(times[0].0.clone()));
        let base_d = rate(DECODE_STEPS, best_median(times[0].1.clone()));
        for (f, t) in formats.iter().zip(&times) {
            let p = rate(prompt_len, best_median(t.0.clone()));
            let d = rate(DECODE_STEPS, best_median(t.1.clone()));
            println!(
                "{:<9} {:>8.1} {:>8.1}                {:>8.1} {:>8.1}             prefill {:.2} {:.2}, decode {:.2} {:.2}",
                format!("{f:?}"),
                p.0,
                p.1,
                d.0,
                d.1,
                p.0 / base_p.0,
                p.1 / base_p.1,
                d.0 / base_d.0,
                d.1 / base_d.1
            );
        }
        Ok(())
    })?;
    Ok(())
}
