//! How much each key layout distorts attention, on synthetic keys with outlier channels.
//!
//! ```text
//! cargo run -p kv-quant --example quant_error --release
//! ```
//!
//! Keys: `TOKENS x HEAD_DIM`, every channel `N(mu_c, sd_c)`; most channels have a small mean
//! and unit spread, `OUTLIERS` channels have |mean| 10..20 and spread 2..4, the pattern
//! measured in the keys of Llama-family models (and the reason for KIVI's per-channel
//! layout). Queries: `N(0, 1)`. Values (second table): `N(0, 1)`, no outlier channels.
//!
//! Per layout it prints bytes per token and head, the relative key MSE
//! `sum (k - k̂)^2 / sum k^2`, the score error `rms(q·k̂ - q·k)` relative to the spread of the
//! true scores across tokens (so a constant shift, which softmax ignores, would not count
//! if it were constant; quantization error is not), the largest absolute score error, and
//! the mean KL divergence of the attention distribution `softmax(q·k / sqrt(d))` from the
//! exact one. Scores are computed by the fused kernels, as attention would.
//!
//! Every KIVI block here is full: a real cache also keeps its newest `T - 1` keys per
//! sequence in f16 (the residual window), which only lowers the error.
//!
//! The data are synthetic and fixed (seeded); the point is the ranking of layouts, not the
//! exact numbers, which the model-level perplexity measurement (`kv ppl`) decides.

use kv_quant::{hadamard_in_place, Group, KiviBits, KiviKeyFormat, QuantError, RowFormat};

const HEAD_DIM: usize = 64;
const TOKENS: usize = 4096;
const QUERIES: usize = 64;
const OUTLIERS: usize = 4;

/// SplitMix64: a tiny seeded generator, so the example needs no dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// Keys with outlier channels, token-major.
fn synthetic_keys(rng: &mut Rng) -> Vec<f32> {
    let step = HEAD_DIM / OUTLIERS;
    let channels: Vec<(f32, f32)> = (0..HEAD_DIM)
        .map(|c| {
            if c % step == 3 {
                let sign = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
                (
                    sign * (10.0 + 10.0 * rng.uniform()),
                    2.0 + 2.0 * rng.uniform(),
                )
            } else {
                (0.5 * rng.normal(), 1.0)
            }
        })
        .collect();
    (0..TOKENS * HEAD_DIM)
        .map(|i| {
            let (mu, sd) = channels[i % HEAD_DIM];
            mu + sd * rng.normal()
        })
        .collect()
}

/// A key layout under test: how it stores all keys, and how it scores a query.
enum Layout {
    /// Per-token rows, optionally in the Hadamard-rotated basis.
    Rows { format: RowFormat, rotate: bool },
    /// KIVI blocks, optionally rotated.
    Kivi { format: KiviKeyFormat, rotate: bool },
}

impl Layout {
    fn name(&self) -> String {
        match self {
            Layout::Rows { format, rotate } => {
                format!("{format}{}", if *rotate { " + hadamard" } else { "" })
            }
            Layout::Kivi { format, rotate } => {
                format!("{format}{}", if *rotate { " + hadamard" } else { "" })
            }
        }
    }

    fn bytes_per_token(&self) -> Result<f64, QuantError> {
        match self {
            Layout::Rows { format, .. } => Ok(format.row_bytes(HEAD_DIM)? as f64),
            Layout::Kivi { format, .. } => format.bytes_per_token(HEAD_DIM),
        }
    }

    /// Stores `keys`, then returns the dequantized keys (in the original basis) and the
    /// scores of every query against every key as computed by the fused kernels.
    fn run(&self, keys: &[f32], queries: &[f32]) -> Result<(Vec<f32>, Vec<f32>), QuantError> {
        let rotate = matches!(
            self,
            Layout::Rows { rotate: true, .. } | Layout::Kivi { rotate: true, .. }
        );
        // Rotating both keys and queries leaves exact scores unchanged.
        let basis = |v: &[f32]| -> Result<Vec<f32>, QuantError> {
            let mut v = v.to_vec();
            if rotate {
                for row in v.chunks_exact_mut(HEAD_DIM) {
                    hadamard_in_place(row)?;
                }
            }
            Ok(v)
        };
        let k_rot = basis(keys)?;
        let q_rot = basis(queries)?;
        let mut k_hat = vec![0.0f32; keys.len()];
        let mut scores = vec![0.0f32; QUERIES * TOKENS];
        match self {
            Layout::Rows { format, .. } => {
                let rb = format.row_bytes(HEAD_DIM)?;
                let mut store = vec![0u8; rb * TOKENS];
                for (k, row) in k_rot.chunks_exact(HEAD_DIM).zip(store.chunks_exact_mut(rb)) {
                    format.quantize_row(k, row)?;
                }
                for (row, out) in store.chunks_exact(rb).zip(k_hat.chunks_exact_mut(HEAD_DIM)) {
                    format.dequantize_row(row, out)?;
                }
                for (q, s) in q_rot
                    .chunks_exact(HEAD_DIM)
                    .zip(scores.chunks_exact_mut(TOKENS))
                {
                    format.dot_many(q, &store, s)?;
                }
            }
            Layout::Kivi { format, .. } => {
                let t = format.block_tokens;
                let bb = format.block_bytes(HEAD_DIM)?;
                let mut store = vec![0u8; bb * (TOKENS / t)];
                for (k, block) in k_rot
                    .chunks_exact(t * HEAD_DIM)
                    .zip(store.chunks_exact_mut(bb))
                {
                    format.quantize_block(k, HEAD_DIM, block)?;
                }
                for (block, out) in store
                    .chunks_exact(bb)
                    .zip(k_hat.chunks_exact_mut(t * HEAD_DIM))
                {
                    format.dequantize_block(block, HEAD_DIM, out)?;
                }
                for (q, s) in q_rot
                    .chunks_exact(HEAD_DIM)
                    .zip(scores.chunks_exact_mut(TOKENS))
                {
                    for (block, st) in store.chunks_exact(bb).zip(s.chunks_exact_mut(t)) {
                        format.scores(q, block, st)?;
                    }
                }
            }
        }
        if rotate {
            // Back to the original basis (the normalized transform is its own inverse).
            for row in k_hat.chunks_exact_mut(HEAD_DIM) {
                hadamard_in_place(row)?;
            }
        }
        Ok((k_hat, scores))
    }
}

/// Exact scores in f64.
fn exact_scores(keys: &[f32], queries: &[f32]) -> Vec<f64> {
    queries
        .chunks_exact(HEAD_DIM)
        .flat_map(|q| {
            keys.chunks_exact(HEAD_DIM).map(move |k| {
                q.iter()
                    .zip(k)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum::<f64>()
            })
        })
        .collect()
}

/// `softmax(s / sqrt(d))` of one query's scores.
fn softmax(s: impl Iterator<Item = f64> + Clone) -> Vec<f64> {
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let max = s.clone().fold(f64::MIN, f64::max);
    let e: Vec<f64> = s.map(|v| ((v - max) * scale).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

struct Metrics {
    rel_mse: f64,
    score_rel_rms: f64,
    score_max_abs: f64,
    kl: f64,
}

fn measure(keys: &[f32], k_hat: &[f32], exact: &[f64], scores: &[f32]) -> Metrics {
    let (err2, sig2) = keys.iter().zip(k_hat).fold((0.0, 0.0), |(e, s), (&a, &b)| {
        (e + f64::from(a - b).powi(2), s + f64::from(a).powi(2))
    });
    let (mut se2, mut spread2, mut max_abs, mut kl) = (0.0, 0.0, 0.0f64, 0.0);
    for (ex, got) in exact.chunks_exact(TOKENS).zip(scores.chunks_exact(TOKENS)) {
        let mean = ex.iter().sum::<f64>() / TOKENS as f64;
        for (&e, &g) in ex.iter().zip(got) {
            let d = f64::from(g) - e;
            se2 += d * d;
            spread2 += (e - mean).powi(2);
            max_abs = max_abs.max(d.abs());
        }
        let p = softmax(ex.iter().copied());
        let p_hat = softmax(got.iter().map(|&v| f64::from(v)));
        kl += p
            .iter()
            .zip(&p_hat)
            .filter(|(&a, _)| a > 0.0)
            .map(|(&a, &b)| a * (a / b.max(1e-300)).ln())
            .sum::<f64>();
    }
    Metrics {
        rel_mse: err2 / sig2,
        score_rel_rms: (se2 / spread2).sqrt(),
        score_max_abs: max_abs,
        kl: kl / QUERIES as f64,
    }
}

fn main() -> Result<(), QuantError> {
    let mut rng = Rng(0x5eed);
    let keys = synthetic_keys(&mut rng);
    let queries: Vec<f32> = (0..QUERIES * HEAD_DIM).map(|_| rng.normal()).collect();
    let exact = exact_scores(&keys, &queries);

    let g32 = Group::G32;
    let kivi = |bits, t| KiviKeyFormat::new(bits, t);
    let layouts = [
        Layout::Rows {
            format: RowFormat::F16,
            rotate: false,
        },
        Layout::Rows {
            format: RowFormat::Int8 { group: g32 },
            rotate: false,
        },
        Layout::Rows {
            format: RowFormat::Int8 { group: g32 },
            rotate: true,
        },
        Layout::Rows {
            format: RowFormat::Int4 { group: g32 },
            rotate: false,
        },
        Layout::Rows {
            format: RowFormat::Int4 { group: Group::G64 },
            rotate: false,
        },
        Layout::Rows {
            format: RowFormat::Int4 { group: g32 },
            rotate: true,
        },
        Layout::Rows {
            format: RowFormat::Int4 { group: Group::G64 },
            rotate: true,
        },
        Layout::Kivi {
            format: kivi(KiviBits::B4, 32),
            rotate: false,
        },
        Layout::Kivi {
            format: kivi(KiviBits::B4, 128),
            rotate: false,
        },
        Layout::Kivi {
            format: kivi(KiviBits::B4, 32),
            rotate: true,
        },
        Layout::Rows {
            format: RowFormat::Int2 { group: g32 },
            rotate: false,
        },
        Layout::Rows {
            format: RowFormat::Int2 { group: g32 },
            rotate: true,
        },
        Layout::Kivi {
            format: kivi(KiviBits::B2, 32),
            rotate: false,
        },
        Layout::Kivi {
            format: kivi(KiviBits::B2, 32),
            rotate: true,
        },
    ];

    println!(
        "keys: {TOKENS} tokens x head_dim {HEAD_DIM}, {OUTLIERS} outlier channels; {QUERIES} N(0,1) queries; kernels: {}",
        kv_quant::Isa::best()
    );
    println!(
        "{:<24} {:>9} {:>12} {:>13} {:>12} {:>12}",
        "key layout", "B/token", "rel MSE", "score err/sd", "max |err|", "attn KL"
    );
    for layout in &layouts {
        let (k_hat, scores) = layout.run(&keys, &queries)?;
        let m = measure(&keys, &k_hat, &exact, &scores);
        println!(
            "{:<24} {:>9.1} {:>12.3e} {:>13.3e} {:>12.3e} {:>12.3e}",
            layout.name(),
            layout.bytes_per_token()?,
            m.rel_mse,
            m.score_rel_rms,
            m.score_max_abs,
            m.kl
        );
    }

    // Values have no outlier channels; per-token rows are the layout for them.
    let values: Vec<f32> = (0..TOKENS * HEAD_DIM).map(|_| rng.normal()).collect();
    println!();
    println!("{:<24} {:>9} {:>12}", "value layout", "B/token", "rel MSE");
    for format in [
        RowFormat::F16,
        RowFormat::Int8 { group: g32 },
        RowFormat::Int4 { group: g32 },
        RowFormat::Int4 { group: Group::G64 },
        RowFormat::Int2 { group: g32 },
    ] {
        let rb = format.row_bytes(HEAD_DIM)?;
        let (mut row, mut v_hat) = (vec![0u8; rb], vec![0.0f32; HEAD_DIM]);
        let (mut err2, mut sig2) = (0.0f64, 0.0f64);
        for v in values.chunks_exact(HEAD_DIM) {
            format.quantize_row(v, &mut row)?;
            format.dequantize_row(&row, &mut v_hat)?;
            for (&a, &b) in v.iter().zip(&v_hat) {
                err2 += f64::from(a - b).powi(2);
                sig2 += f64::from(a).powi(2);
            }
        }
        println!("{:<24} {:>9} {:>12.3e}", format.name(), rb, err2 / sig2);
    }
    Ok(())
}
