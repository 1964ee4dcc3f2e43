//! Round-trip error bounds of every format (property tests and the hard cases), at every
//! instruction-set level this CPU has.

mod common;

use common::*;
use half::{bf16, f16};
use kv_quant::{
    hadamard_in_place, Group, Isa, Kernels, KiviBits, KiviKeyFormat, QuantError, RowFormat,
};
use proptest::prelude::*;

/// Quantizes `x` at `isa`, dequantizes, and checks every element against the documented
/// bound (re-derived here from the bytes), the crate's `error_bound`, and the documented
/// relation between stored scales and the data.
fn check_round_trip(isa: Isa, fmt: RowFormat, x: &[f32]) -> Result<(), TestCaseError> {
    let k = Kernels::new(isa).expect("available level");
    let mut row = vec![0u8; fmt.row_bytes(x.len()).expect("valid head_dim")];
    k.quantize_row(fmt, x, &mut row).expect("storable row");
    let mut x_hat = vec![0.0f32; x.len()];
    k.dequantize_row(fmt, &row, &mut x_hat).expect("valid row");
    let crate_bound = fmt.error_bound(&row).expect("valid row");

    match fmt {
        RowFormat::F32 => prop_assert_eq!(&x_hat, &x.to_vec()),
        RowFormat::F16 => {
            for (a, b) in x.iter().zip(&x_hat) {
                prop_assert_eq!(*b, f16::from_f32(*a).to_f32());
            }
        }
        RowFormat::Bf16 => {
            for (a, b) in x.iter().zip(&x_hat) {
                prop_assert_eq!(*b, bf16::from_f32(*a).to_f32());
            }
        }
        _ => {
            let mut i = 0;
            for (g, s, m, levels) in groups_of(fmt, &row) {
                let bound = documented_bound(s, m, levels);
                let xg = &x[i..i + g];
                // How the stored parameters relate to the data (layout module docs).
                let (lo, hi, amax) = xg.iter().fold((f64::MAX, f64::MIN, 0.0f64), |acc, &v| {
                    let v = f64::from(v);
                    (acc.0.min(v), acc.1.max(v), acc.2.max(v.abs()))
                });
                if levels == 0.0 {
                    prop_assert!(
                        s >= amax / 127.0 * (1.0 - 1e-15),
                        "scale {s} below {amax}/127"
                    );
                    prop_assert!(s <= amax / 127.0 * (1.0 + 2f64.powi(-10)) + 2f64.powi(-24));
                } else {
                    prop_assert!(m <= lo, "min {m} above the data minimum {lo}");
                    prop_assert!(lo - m <= lo.abs() * 2f64.powi(-10) + 2f64.powi(-24));
                    let ideal = (hi - m) / levels;
                    prop_assert!(s >= ideal * (1.0 - 1e-15), "scale {s} below {ideal}");
                    prop_assert!(s <= ideal * (1.0 + 2f64.powi(-10)) + 2f64.powi(-24));
                }
                for (j, (&a, &b)) in xg.iter().zip(&x_hat[i..i + g]).enumerate() {
                    let err = (f64::from(a) - f64::from(b)).abs();
                    prop_assert!(
                        err <= bound,
                        "{fmt} at {isa}: element {} = {a} stored as {b}: error {err} > bound {bound} (s {s}, m {m})",
                        i + j
                    );
                }
                i += g;
            }
        }
    }
    let worst = x
        .iter()
        .zip(&x_hat)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs())
        .fold(0.0, f64::max);
    prop_assert!(
        worst <= crate_bound,
        "{fmt}: error {worst} > error_bound {crate_bound}"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn every_element_within_the_format_bound((fmt, x) in row_case()) {
        for isa in Isa::available() {
            check_round_trip(isa, fmt, &x)?;
        }
    }

    #[test]
    fn nan_and_infinity_are_rejected_and_never_stored(
        (fmt, mut x) in row_case(),
        pos in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
    ) {
        let i = pos.index(x.len());
        x[i] = bad;
        for isa in Isa::available() {
            let mut row = vec![0xa5u8; fmt.row_bytes(x.len()).expect("valid")];
            let err = Kernels::new(isa).expect("available").quantize_row(fmt, &x, &mut row);
            match err {
                Err(QuantError::NonFinite { index, value }) => {
                    prop_assert_eq!(index, i);
                    prop_assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => prop_assert!(false, "{fmt} at {isa}: {other:?}"),
            }
            prop_assert!(row.iter().all(|&b| b == 0xa5), "{fmt} at {isa}: output was written");
        }
    }

    #[test]
    fn kivi_every_element_within_the_channel_bound(
        bits in prop::sample::select(vec![KiviBits::B2, KiviBits::B4]),
        tokens in 1usize..=40,
        d32 in 1usize..=3,
        seed in any::<u64>(),
        outliers in 0usize..=3,
        scale_exp in -20i32..=4,
    ) {
        let head_dim = 32 * d32;
        let fmt = KiviKeyFormat::new(bits, tokens);
        let scale = 2f32.powi(scale_exp);
        let keys: Vec<f32> = outlier_keys(tokens, head_dim, outliers, seed)
            .into_iter()
            .map(|v| v * scale)
            .collect();
        let mut block = vec![0u8; fmt.block_bytes(head_dim).expect("valid")];
        fmt.quantize_block(&keys, head_dim, &mut block).expect("storable");
        let mut k_hat = vec![0.0f32; keys.len()];
        fmt.dequantize_block(&block, head_dim, &mut k_hat).expect("valid");
        let levels = f64::from(bits.levels());
        let crate_bound = fmt.error_bound(&block, head_dim).expect("valid");
        for c in 0..head_dim {
            // Layout: scales at 0, minimums at 2 head_dim, f16 little-endian.
            let s = f16::from_le_bytes([block[2 * c], block[2 * c + 1]]).to_f64();
            let mo = 2 * head_dim + 2 * c;
            let m = f16::from_le_bytes([block[mo], block[mo + 1]]).to_f64();
            let bound = documented_bound(s, m, levels);
            prop_assert!(bound <= crate_bound);
            for t in 0..tokens {
                let i = t * head_dim + c;
                let err = (f64::from(keys[i]) - f64::from(k_hat[i])).abs();
                prop_assert!(err <= bound, "t {t} c {c}: {} -> {}: {err} > {bound}", keys[i], k_hat[i]);
            }
        }
    }

    #[test]
    fn hadamard_preserves_norms_and_dot_products_and_is_an_involution(
        log_n in 0u32..=9,
        seed in any::<u64>(),
    ) {
        let n = 1usize << log_n;
        let mut rng = SplitMix(seed);
        let a: Vec<f32> = (0..n).map(|_| rng.normal() * 3.0).collect();
        let b: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let (mut ha, mut hb) = (a.clone(), b.clone());
        hadamard_in_place(&mut ha).expect("power of two");
        hadamard_in_place(&mut hb).expect("power of two");
        let (dot, mag) = exact_dot(&a, &b);
        let (hdot, _) = exact_dot(&ha, &hb);
        let (norm, _) = exact_dot(&a, &a);
        let (hnorm, _) = exact_dot(&ha, &ha);
        // log2(n) butterfly stages and one scaling, each a relative f32 rounding.
        let rel = f64::from(log_n + 2) * 4.0 * U * (n as f64).sqrt();
        prop_assert!((hnorm - norm).abs() <= rel * 4.0 * norm + 1e-30, "{hnorm} vs {norm}");
        let scale = (norm * exact_dot(&b, &b).0).sqrt();
        prop_assert!((hdot - dot).abs() <= rel * 4.0 * (scale + mag), "{hdot} vs {dot}");
        let mut back = ha.clone();
        hadamard_in_place(&mut back).expect("power of two");
        for (x, y) in a.iter().zip(&back) {
            prop_assert!((x - y).abs() as f64 <= rel * 4.0 * norm.sqrt() + 1e-30, "{x} vs {y}");
        }
    }
}

fn quantized_formats() -> impl Iterator<Item = RowFormat> {
    RowFormat::ALL.into_iter().filter(|f| f.is_quantized())
}

#[test]
fn all_zero_rows_are_stored_exactly() {
    for isa in Isa::available() {
        for fmt in RowFormat::ALL {
            let x = vec![0.0f32; 128];
            check_round_trip(isa, fmt, &x).expect("within bound");
            let k = Kernels::new(isa).expect("available");
            let mut row = vec![0xffu8; fmt.row_bytes(128).expect("valid")];
            k.quantize_row(fmt, &x, &mut row).expect("storable");
            let mut out = vec![1.0f32; 128];
            k.dequantize_row(fmt, &row, &mut out).expect("valid");
            assert!(out.iter().all(|&v| v == 0.0), "{fmt} at {isa}");
            assert!(fmt.error_bound(&row).expect("valid") < 1e-6, "{fmt}");
        }
    }
}

#[test]
fn one_huge_outlier() {
    let mut rng = SplitMix(7);
    for isa in Isa::available() {
        for fmt in quantized_formats() {
            let mut x: Vec<f32> = (0..128).map(|_| rng.normal() * 1e-3).collect();
            x[77] = 3.0e4;
            check_round_trip(isa, fmt, &x).expect("within bound");
            // The outlier itself comes back within its group's bound; other groups keep
            // their fine scale.
            let row = quant(fmt, &x);
            let x_hat = dequant(fmt, &row, 128);
            let g = fmt.group().expect("quantized").size();
            if g < 128 {
                let err = (x[0] - x_hat[0]).abs();
                assert!(
                    err < 1e-3,
                    "{fmt}: first group error {err} despite outlier elsewhere"
                );
            }
        }
    }
}

#[test]
fn negative_only_and_positive_only_rows() {
    let mut rng = SplitMix(11);
    for isa in Isa::available() {
        for fmt in RowFormat::ALL {
            let neg: Vec<f32> = (0..128).map(|_| -1.0 - 4.0 * rng.uniform()).collect();
            let pos: Vec<f32> = neg.iter().map(|v| -v).collect();
            check_round_trip(isa, fmt, &neg).expect("within bound");
            check_round_trip(isa, fmt, &pos).expect("within bound");
        }
    }
}

#[test]
fn tiny_values_are_not_flushed_when_a_scale_can_hold_them() {
    for isa in Isa::available() {
        for fmt in RowFormat::ALL {
            for magnitude in [1e-6f32, 1e-20, 1e-40, f32::from_bits(1)] {
                let x: Vec<f32> = (0..128)
                    .map(|i| magnitude * ((i % 7) as f32 - 3.0))
                    .collect();
                check_round_trip(isa, fmt, &x).expect("within bound");
            }
        }
        // 1e-6 is well above the smallest f16 scale (2^-24): INT8 keeps its shape.
        let fmt = RowFormat::Int8 { group: Group::G32 };
        let x: Vec<f32> = (0..32).map(|i| 1e-6 * (i as f32 - 16.0)).collect();
        let x_hat = dequant(fmt, &quant(fmt, &x), 32);
        assert!(
            x_hat.iter().filter(|&&v| v != 0.0).count() >= 30,
            "{x_hat:?}"
        );
    }
}

#[test]
fn constant_rows_and_narrow_ranges_far_from_zero() {
    for isa in Isa::available() {
        for fmt in RowFormat::ALL {
            check_round_trip(isa, fmt, &[3.3f32; 128]).expect("within bound");
            check_round_trip(isa, fmt, &[-1234.5f32; 128]).expect("within bound");
            // The documented case where the f16 minimum costs range: [1000.3, 1000.8].
            let x: Vec<f32> = (0..128)
                .map(|i| 1000.3 + 0.5 * (i as f32 / 127.0))
                .collect();
            check_round_trip(isa, fmt, &x).expect("within bound");
        }
    }
}

#[test]
fn values_beyond_the_format_range_are_rejected() {
    let cases: [(RowFormat, f32); 7] = [
        (RowFormat::F16, 65520.0),
        (RowFormat::F16, -7.0e4),
        (RowFormat::Bf16, f32::MAX),
        (RowFormat::Int8 { group: Group::G32 }, 1.0e7),
        (RowFormat::Int4 { group: Group::G32 }, -7.0e4),
        (RowFormat::Int4 { group: Group::G64 }, 1.0e7),
        (RowFormat::Int2 { group: Group::G32 }, 1.0e6),
    ];
    for isa in Isa::available() {
        let k = Kernels::new(isa).expect("available");
        for (fmt, v) in cases {
            let mut x = vec![0.5f32; 128];
            x[40] = v;
            let mut row = vec![0x5au8; fmt.row_bytes(128).expect("valid")];
            let got = k.quantize_row(fmt, &x, &mut row);
            assert_eq!(
                got,
                Err(QuantError::OutOfRange {
                    format: fmt.name(),
                    index: 40,
                    value: v
                }),
                "{fmt} at {isa}"
            );
            assert!(
                row.iter().all(|&b| b == 0x5a),
                "{fmt} at {isa}: output written"
            );
        }
        // The largest values that do fit are stored.
        for (fmt, v) in [
            (RowFormat::F16, 65519.0f32),
            (RowFormat::Int8 { group: Group::G32 }, 8.0e6),
            (RowFormat::F32, f32::MAX),
            (RowFormat::Bf16, 3.38e38),
        ] {
            let mut x = vec![0.5f32; 128];
            x[3] = -v;
            check_round_trip(isa, fmt, &x).expect("storable and within bound");
        }
    }
}

#[test]
fn kivi_rejects_nan_and_leaves_the_block_untouched() {
    let fmt = KiviKeyFormat::new(KiviBits::B4, 8);
    let mut keys = outlier_keys(8, 64, 2, 3);
    keys[5 * 64 + 9] = f32::NAN;
    let mut block = vec![0x11u8; fmt.block_bytes(64).expect("valid")];
    match fmt.quantize_block(&keys, 64, &mut block) {
        Err(QuantError::NonFinite { index, .. }) => assert_eq!(index, 5 * 64 + 9),
        other => panic!("{other:?}"),
    }
    assert!(block.iter().all(|&b| b == 0x11));
    keys[5 * 64 + 9] = -1.0e6; // minimum below -65504: no f16 minimum fits
    assert!(matches!(
        fmt.quantize_block(&keys, 64, &mut block),
        Err(QuantError::OutOfRange { index, .. }) if index == 5 * 64 + 9
    ));
    assert!(block.iter().all(|&b| b == 0x11));
}

/// Mean squared error of keys stored per token (int4-g32) versus per channel (KIVI 4-bit)
/// on keys with outlier channels: the reason the KIVI layout exists.
#[test]
fn per_channel_keys_beat_per_token_on_outlier_channels() {
    let (tokens, head_dim) = (256, 64);
    let keys = outlier_keys(tokens, head_dim, 4, 42);
    let mse = |k_hat: &[f32]| {
        keys.iter()
            .zip(k_hat)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            / keys.len() as f64
    };
    let fmt = RowFormat::Int4 { group: Group::G32 };
    let per_token: Vec<f32> = keys
        .chunks_exact(head_dim)
        .flat_map(|k| dequant(fmt, &quant(fmt, k), head_dim))
        .collect();
    let kivi = KiviKeyFormat::new(KiviBits::B4, 32);
    let mut per_channel = vec![0.0f32; keys.len()];
    let mut block = vec![0u8; kivi.block_bytes(head_dim).expect("valid")];
    for (k, out) in keys
        .chunks_exact(32 * head_dim)
        .zip(per_channel.chunks_exact_mut(32 * head_dim))
    {
        kivi.quantize_block(k, head_dim, &mut block)
            .expect("storable");
        kivi.dequantize_block(&block, head_dim, out).expect("valid");
    }
    let (a, b) = (mse(&per_token), mse(&per_channel));
    assert!(
        b < a / 2.0,
        "per-channel MSE {b} not well below per-token {a}"
    );
}
