//! Strategies and independent re-statements of the documented layouts and bounds, shared by
//! the integration tests. Nothing here calls the crate's own bound code: the tests read the
//! bytes as the docs describe them and apply the documented formulas themselves.
#![allow(dead_code)] // each test binary uses a different subset

use half::f16;
use kv_quant::RowFormat;
use proptest::prelude::*;

/// f32 unit roundoff.
pub const U: f64 = 1.0 / 16_777_216.0;

/// Any row format.
pub fn formats() -> impl Strategy<Value = RowFormat> {
    prop::sample::select(RowFormat::ALL.to_vec())
}

/// A valid head_dim for `fmt`: 1..=4 groups for quantized formats, 1..=300 for floats
/// (so the SIMD tails are exercised).
pub fn head_dim_for(fmt: RowFormat) -> BoxedStrategy<usize> {
    match fmt.group() {
        Some(g) => (1usize..=4).prop_map(move |k| k * g.size()).boxed(),
        None => (1usize..=300).boxed(),
    }
}

/// Row values of length `n` that every format can store: a random magnitude from f32
/// subnormals up to 256, an optional common offset (rows of one sign), an optional outlier
/// up to 100x the magnitude, and some exact zeros.
pub fn values(n: usize) -> impl Strategy<Value = Vec<f32>> {
    (
        prop_oneof![4 => -24i32..=8, 1 => -140i32..=-110],
        prop::collection::vec(-1.0f32..=1.0, n),
        prop_oneof![2 => Just(0.0f32), 1 => -3.0f32..=3.0],
        prop::option::of((0..n, -100.0f32..=100.0)),
        prop::collection::vec(0u8..8, n),
    )
        .prop_map(|(e, base, offset, outlier, zeros)| {
            let scale = 2f32.powi(e);
            let mut x: Vec<f32> = base
                .iter()
                .zip(&zeros)
                .map(|(&b, &z)| if z == 0 { 0.0 } else { (b + offset) * scale })
                .collect();
            if let Some((i, v)) = outlier {
                x[i] = v * scale;
            }
            x
        })
}

/// A format with a matching row of values.
pub fn row_case() -> impl Strategy<Value = (RowFormat, Vec<f32>)> {
    formats().prop_flat_map(|f| {
        head_dim_for(f).prop_flat_map(move |n| values(n).prop_map(move |x| (f, x)))
    })
}

/// A format with a row of values and a query (or weights) of the same length.
pub fn row_and_query() -> impl Strategy<Value = (RowFormat, Vec<f32>, Vec<f32>)> {
    formats().prop_flat_map(|f| {
        head_dim_for(f).prop_flat_map(move |n| {
            (values(n), prop::collection::vec(-4.0f32..=4.0, n)).prop_map(move |(x, q)| (f, x, q))
        })
    })
}

fn f16_at(b: &[u8]) -> f64 {
    f16::from_le_bytes([b[0], b[1]]).to_f64()
}

/// Per group of a quantized row, read as the docs lay it out:
/// `(elements, scale, min, levels)`; `levels` is 0 for symmetric INT8.
pub fn groups_of(fmt: RowFormat, row: &[u8]) -> Vec<(usize, f64, f64, f64)> {
    let (g, header, bits, levels) = match fmt {
        RowFormat::Int8 { group } => (group.size(), 2, 8, 0.0),
        RowFormat::Int4 { group } => (group.size(), 4, 4, 15.0),
        RowFormat::Int2 { group } => (group.size(), 4, 2, 3.0),
        _ => return Vec::new(),
    };
    let gbytes = header + g * bits / 8;
    row.chunks_exact(gbytes)
        .map(|gb| {
            let s = f16_at(&gb[0..2]);
            let m = if header == 4 { f16_at(&gb[2..4]) } else { 0.0 };
            (g, s, m, levels)
        })
        .collect()
}

/// The documented per-element bound of a group with stored scale `s`, minimum `m`.
pub fn documented_bound(s: f64, m: f64, levels: f64) -> f64 {
    if levels == 0.0 {
        s * (0.5 + 2f64.powi(-17))
    } else {
        s * (0.5 + 2f64.powi(-19)) + U * (m.abs() + levels * s)
    }
}

/// Exact (f64) dot product and the magnitude `sum |a b|` that rounding bounds scale with.
pub fn exact_dot(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(d, m), (&x, &y)| {
        let p = f64::from(x) * f64::from(y);
        (d + p, m + p.abs())
    })
}

/// Dequantizes with the scalar reference.
pub fn dequant(fmt: RowFormat, row: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    kv_quant::Kernels::scalar()
        .dequantize_row(fmt, row, &mut out)
        .expect("valid row");
    out
}

/// Quantizes with the scalar reference.
pub fn quant(fmt: RowFormat, x: &[f32]) -> Vec<u8> {
    let mut row = vec![0u8; fmt.row_bytes(x.len()).expect("valid head_dim")];
    kv_quant::Kernels::scalar()
        .quantize_row(fmt, x, &mut row)
        .expect("storable row");
    row
}

/// Synthetic keys with outlier channels, `tokens x head_dim`, deterministic from `seed`:
/// most channels N(mu_c, 1) with small mu_c, `outliers` channels with |mu| 10..20 and a
/// wider spread, as measured in real models' keys.
pub fn outlier_keys(tokens: usize, head_dim: usize, outliers: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    // Outlier channels spread evenly: 3, 3 + step, 3 + 2 step, ...
    let step = (head_dim / outliers.max(1)).max(4);
    let is_outlier = |c: usize| c % step == 3 && c / step < outliers;
    let channel: Vec<(f32, f32)> = (0..head_dim)
        .map(|c| {
            if is_outlier(c) {
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
    (0..tokens * head_dim)
        .map(|i| {
            let (mu, sd) = channel[i % head_dim];
            mu + sd * rng.normal()
        })
        .collect()
}

/// A tiny deterministic generator for fixed test data.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}
