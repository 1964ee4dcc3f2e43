//! Every SIMD level this CPU has, held to the scalar reference: identical bytes and
//! dequantized values, dot and axpy within their documented rounding bounds.
//!
//! Levels the CPU lacks are skipped with a note on stderr (`--nocapture` shows it); on a
//! machine with AVX-512 both the AVX2 and the AVX-512 paths are tested.

mod common;

use common::*;
use kv_quant::{Isa, Kernels, KiviBits, KiviKeyFormat, RowFormat};
use proptest::prelude::*;

/// The SIMD levels to test on this machine (says once which are skipped, and why).
fn simd_levels() -> Vec<Kernels> {
    static SAID: std::sync::Once = std::sync::Once::new();
    Isa::ALL
        .into_iter()
        .filter(|&i| i != Isa::Scalar)
        .filter_map(|i| match Kernels::new(i) {
            Ok(k) => Some(k),
            Err(e) => {
                SAID.call_once(|| eprintln!("skipping {i}: {e}"));
                None
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn quantize_writes_the_same_bytes_and_errors((fmt, mut x) in row_case(), poison in 0u8..10, at in any::<prop::sample::Index>()) {
        // Sometimes plant a value some formats reject, to compare the error paths too.
        let i = at.index(x.len());
        match poison {
            0 => x[i] = f32::NAN,
            1 => x[i] = 1.0e7,
            2 => x[i] = -7.0e4,
            _ => {}
        }
        let rb = fmt.row_bytes(x.len()).expect("valid");
        let mut want = vec![0x33u8; rb];
        let want_res = Kernels::scalar().quantize_row(fmt, &x, &mut want);
        for k in simd_levels() {
            let mut got = vec![0x33u8; rb];
            let got_res = k.quantize_row(fmt, &x, &mut got);
            // Debug text, because a NaN in the error does not compare equal to itself.
            prop_assert_eq!(format!("{got_res:?}"), format!("{want_res:?}"), "{} at {}", fmt, k.isa());
            prop_assert_eq!(&got, &want, "{} at {}", fmt, k.isa());
        }
    }

    /// Exact ties between two representable halves are rare in random data, so build them:
    /// midpoints of adjacent f16 values and f32s whose low 16 bits are exactly 0x8000 (bf16
    /// ties). Both must round to even, like `half`.
    #[test]
    fn half_conversions_round_ties_to_even(
        f16_bits in prop::collection::vec(0u16..0x7bff, 1..40),
        bf16_hi in prop::collection::vec(0u32..0x7f7f, 1..40),
        signs in any::<u64>(),
    ) {
        let sign = |i: usize| if signs >> (i % 64) & 1 == 1 { -1.0f32 } else { 1.0 };
        let f16_ties: Vec<f32> = f16_bits
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let lo = half::f16::from_bits(b).to_f32();
                let hi = half::f16::from_bits(b + 1).to_f32();
                sign(i) * (lo + hi) / 2.0
            })
            .collect();
        let bf16_ties: Vec<f32> = bf16_hi
            .iter()
            .enumerate()
            .map(|(i, &h)| sign(i) * f32::from_bits((h << 16) | 0x8000))
            .collect();
        for (fmt, x) in [(RowFormat::F16, &f16_ties), (RowFormat::Bf16, &bf16_ties)] {
            let want = quant(fmt, x);
            for k in simd_levels() {
                let mut got = vec![0u8; want.len()];
                k.quantize_row(fmt, x, &mut got).expect("storable");
                prop_assert_eq!(&got, &want, "{} at {}", fmt, k.isa());
            }
        }
    }

    #[test]
    fn dequantize_gives_the_same_values((fmt, x) in row_case()) {
        let row = quant(fmt, &x);
        let want = dequant(fmt, &row, x.len());
        for k in simd_levels() {
            let mut got = vec![f32::NAN; x.len()];
            k.dequantize_row(fmt, &row, &mut got).expect("valid");
            prop_assert_eq!(&got, &want, "{} at {}", fmt, k.isa());
        }
    }

    #[test]
    fn dot_is_within_rounding_of_the_exact_product((fmt, x, q) in row_and_query()) {
        let row = quant(fmt, &x);
        let x_hat = dequant(fmt, &row, x.len());
        let (exact, magnitude) = exact_dot(&q, &x_hat);
        // Any summation order of n products: |error| <= n u sum |q x̂| (+ underflow).
        let n = x.len() as f64;
        let tol = (n + 4.0) * U * magnitude + n * 1e-44;
        let reference = Kernels::scalar().dot(fmt, &q, &row).expect("valid");
        prop_assert!((f64::from(reference) - exact).abs() <= tol, "scalar {reference} vs {exact}");
        for k in simd_levels() {
            let got = k.dot(fmt, &q, &row).expect("valid");
            prop_assert!(
                (f64::from(got) - exact).abs() <= tol,
                "{} at {}: {} vs exact {} (tol {})", fmt, k.isa(), got, exact, tol
            );
        }
    }

    #[test]
    fn axpy_is_within_rounding_of_the_exact_update((fmt, x, acc0) in row_and_query(), w in -3.0f32..=3.0) {
        let row = quant(fmt, &x);
        let x_hat = dequant(fmt, &row, x.len());
        let mut reference = acc0.clone();
        Kernels::scalar().axpy(fmt, w, &row, &mut reference).expect("valid");
        let mut levels = vec![(Isa::Scalar, reference)];
        for k in simd_levels() {
            let mut got = acc0.clone();
            k.axpy(fmt, w, &row, &mut got).expect("valid");
            levels.push((k.isa(), got));
        }
        for (isa, got) in levels {
            for i in 0..x.len() {
                let exact = f64::from(acc0[i]) + f64::from(w) * f64::from(x_hat[i]);
                let tol = 2.0 * U * (f64::from(acc0[i]).abs() + (f64::from(w) * f64::from(x_hat[i])).abs()) + 1e-44;
                prop_assert!(
                    (f64::from(got[i]) - exact).abs() <= tol,
                    "{} at {}: element {} = {} vs exact {}", fmt, isa, i, got[i], exact
                );
            }
        }
    }

    #[test]
    fn many_rows_match_one_row_at_a_time((fmt, x, q) in row_and_query(), rows in 1usize..6) {
        let n = x.len();
        let one = quant(fmt, &x);
        let block: Vec<u8> = one.iter().copied().cycle().take(one.len() * rows).collect();
        let weights: Vec<f32> = (0..rows).map(|t| 0.25 * t as f32 - 0.5).collect();
        for k in Isa::available().into_iter().filter_map(|i| Kernels::new(i).ok()) {
            let single = k.dot(fmt, &q, &one).expect("valid");
            let mut scores = vec![0.0f32; rows];
            k.dot_many(fmt, &q, &block, &mut scores).expect("valid");
            prop_assert!(scores.iter().all(|&s| s == single));

            let mut acc_many = q.clone();
            k.axpy_many(fmt, &weights, &block, &mut acc_many).expect("valid");
            let mut acc_one = q.clone();
            for &w in &weights {
                k.axpy(fmt, w, &one, &mut acc_one).expect("valid");
            }
            prop_assert_eq!(&acc_many, &acc_one);
            prop_assert_eq!(acc_many.len(), n);


            // Distinct rows (x halved per row), unpacked in one call, as one at a time.
            let distinct: Vec<Vec<u8>> = (0..rows)
                .map(|r| quant(fmt, &x.iter().map(|v| v * 0.5f32.powi(r as i32)).collect::<Vec<_>>()))
                .collect();
            let tile: Vec<u8> = distinct.concat();
            let mut wide = vec![f32::NAN; n * rows];
            k.dequantize_rows(fmt, n, &tile, &mut wide).expect("valid");
            for (row, got) in distinct.iter().zip(wide.chunks_exact(n)) {
                let mut want = vec![f32::NAN; n];
                k.dequantize_row(fmt, row, &mut want).expect("valid");
                prop_assert_eq!(got, &want[..]);
            }
        }
    }

    /// Rows of arbitrary bytes (NaN and infinite scales included) must not crash any level,
    /// and dequantize to the same values (NaN where the reference has NaN).
    #[test]
    fn arbitrary_bytes_decode_identically(fmt in formats(), groups in 1usize..4, seed in any::<u64>()) {
        let n = fmt.group().map_or(groups * 13, |g| g.size() * groups);
        let rb = fmt.row_bytes(n).expect("valid");
        let mut rng = SplitMix(seed);
        let row: Vec<u8> = (0..rb).map(|_| rng.next_u64() as u8).collect();
        let want = dequant(fmt, &row, n);
        let q = vec![1.0f32; n];
        for k in simd_levels() {
            let mut got = vec![0.0f32; n];
            k.dequantize_row(fmt, &row, &mut got).expect("valid");
            for (a, b) in got.iter().zip(&want) {
                prop_assert!(a == b || (a.is_nan() && b.is_nan()), "{} at {}: {} vs {}", fmt, k.isa(), a, b);
            }
            let _ = k.dot(fmt, &q, &row).expect("valid");
            let mut acc = vec![0.0f32; n];
            k.axpy(fmt, 1.0, &row, &mut acc).expect("valid");
        }
    }

    #[test]
    fn kivi_scores_are_within_rounding_of_the_exact_scores(
        bits in prop::sample::select(vec![KiviBits::B2, KiviBits::B4]),
        tokens in 1usize..=40,
        d32 in prop::sample::select(vec![1usize, 2, 4, 8, 20]),
        outliers in 0usize..=4,
        seed in any::<u64>(),
    ) {
        // d32 = 20 (head_dim 640) crosses the 512-channel tile of the SIMD kernels.
        let head_dim = 32 * d32;
        let fmt = KiviKeyFormat::new(bits, tokens);
        let keys = outlier_keys(tokens, head_dim, outliers, seed);
        let mut rng = SplitMix(seed ^ 0xabc);
        let q: Vec<f32> = (0..head_dim).map(|_| rng.normal()).collect();
        let mut block = vec![0u8; fmt.block_bytes(head_dim).expect("valid")];
        fmt.quantize_block(&keys, head_dim, &mut block).expect("storable");
        let mut k_hat = vec![0.0f32; keys.len()];
        fmt.dequantize_block(&block, head_dim, &mut k_hat).expect("valid");

        // Per-token magnitude for the documented bound: sum |q| (|m| + s code) >= sum |q k̂|.
        let levels = f64::from(bits.levels());
        let f16_at = |o: usize| half::f16::from_le_bytes([block[o], block[o + 1]]).to_f64();
        let magnitude = |t: usize| -> f64 {
            (0..head_dim)
                .map(|c| {
                    let (s, m) = (f16_at(2 * c), f16_at(2 * head_dim + 2 * c));
                    let code = ((f64::from(k_hat[t * head_dim + c]) - m) / s.max(1e-30)).round().clamp(0.0, levels);
                    f64::from(q[c]).abs() * (m.abs() + s * code)
                })
                .sum()
        };
        for k in Isa::available().into_iter().filter_map(|i| Kernels::new(i).ok()) {
            let mut scores = vec![f32::NAN; tokens];
            k.kivi_scores(fmt, &q, &block, &mut scores).expect("valid");
            for t in 0..tokens {
                let (exact, _) = exact_dot(&q, &k_hat[t * head_dim..(t + 1) * head_dim]);
                let tol = (2.0 * head_dim as f64 + 8.0) * U * magnitude(t);
                prop_assert!(
                    (f64::from(scores[t]) - exact).abs() <= tol,
                    "{} at {} token {}: {} vs exact {} (tol {})", fmt, k.isa(), t, scores[t], exact, tol
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The multi-head kernels (a GQA group's heads against a run of rows, each row read
    /// once) at every level, scalar reference included, within the one-head bounds of the
    /// exact (f64) scores and weighted sums; nothing outside the strided outputs written.
    #[test]
    fn several_heads_score_and_accumulate_like_one_head_at_a_time(
        (fmt, x, q0) in row_and_query(),
        heads in 1usize..=9,
        rows in 1usize..=19,
        pad in 0usize..3,
        seed in any::<u64>(),
    ) {
        let d = x.len();
        let mut rng = SplitMix(seed);
        // Distinct rows: the row scaled and shifted per row (and stored).
        let stored: Vec<Vec<u8>> = (0..rows)
            .map(|r| {
                let f = 1.0 - 0.15 * r as f32;
                quant(fmt, &x.iter().map(|v| v * f + 0.01 * r as f32).collect::<Vec<_>>())
            })
            .collect();
        let x_hat: Vec<Vec<f32>> = stored.iter().map(|row| dequant(fmt, row, d)).collect();
        let block = stored.concat();
        let q: Vec<f32> = (0..heads * d).map(|i| q0[i % d] * (1.0 + 0.1 * (i / d) as f32)).collect();
        let stride = rows + pad;
        let w: Vec<f32> = (0..heads * stride).map(|_| rng.normal().abs() * 0.5).collect();
        let acc0: Vec<f32> = (0..heads * d).map(|_| rng.normal()).collect();
        for k in Isa::available().into_iter().filter_map(|i| Kernels::new(i).ok()) {
            let mut scores = vec![f32::NAN; heads * stride];
            k.dot_heads(fmt, d, &q, &block, &mut scores, stride).expect("valid");
            let mut acc = acc0.clone();
            k.axpy_heads(fmt, d, &w, stride, &block, &mut acc).expect("valid");
            for h in 0..heads {
                let qh = &q[h * d..(h + 1) * d];
                for (r, xr) in x_hat.iter().enumerate() {
                    let (exact, magnitude) = exact_dot(qh, xr);
                    let tol = (d as f64 + 4.0) * U * magnitude + d as f64 * 1e-44;
                    let got = scores[h * stride + r];
                    prop_assert!(
                        (f64::from(got) - exact).abs() <= tol,
                        "{} at {}: head {} row {}: {} vs exact {} (tol {})", fmt, k.isa(), h, r, got, exact, tol
                    );
                }
                for r in rows..stride {
                    prop_assert!(scores[h * stride + r].is_nan(), "{} at {}: wrote past the rows", fmt, k.isa());
                }
                for i in 0..d {
                    let a0 = f64::from(acc0[h * d + i]);
                    let terms: Vec<f64> = (0..rows)
                        .map(|r| f64::from(w[h * stride + r]) * f64::from(x_hat[r][i]))
                        .collect();
                    let exact = a0 + terms.iter().sum::<f64>();
                    let magnitude = a0.abs() + terms.iter().map(|t| t.abs()).sum::<f64>();
                    let tol = 2.0 * (rows as f64 + 1.0) * U * magnitude + rows as f64 * 1e-44;
                    let got = f64::from(acc[h * d + i]);
                    prop_assert!(
                        (got - exact).abs() <= tol,
                        "{} at {}: head {} element {}: {} vs exact {} (tol {})", fmt, k.isa(), h, i, got, exact, tol
                    );
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// KIVI blocks scored for several heads at once, at every level, within the one-head
    /// bound of the exact scores; nothing past the block's tokens written.
    #[test]
    fn kivi_blocks_score_several_heads_like_one_at_a_time(
        bits in prop::sample::select(vec![KiviBits::B2, KiviBits::B4]),
        tokens in 1usize..=40,
        d32 in prop::sample::select(vec![1usize, 2, 4, 8, 20]),
        heads in 1usize..=9,
        pad in 0usize..3,
        seed in any::<u64>(),
    ) {
        let head_dim = 32 * d32;
        let fmt = KiviKeyFormat::new(bits, tokens);
        let keys = outlier_keys(tokens, head_dim, 1, seed);
        let mut rng = SplitMix(seed ^ 0x5eed);
        let q: Vec<f32> = (0..heads * head_dim).map(|_| rng.normal()).collect();
        let mut block = vec![0u8; fmt.block_bytes(head_dim).expect("valid")];
        fmt.quantize_block(&keys, head_dim, &mut block).expect("storable");
        let mut k_hat = vec![0.0f32; keys.len()];
        fmt.dequantize_block(&block, head_dim, &mut k_hat).expect("valid");
        let levels = f64::from(bits.levels());
        let f16_at = |o: usize| half::f16::from_le_bytes([block[o], block[o + 1]]).to_f64();
        let stride = tokens + pad;
        for k in Isa::available().into_iter().filter_map(|i| Kernels::new(i).ok()) {
            let mut scores = vec![f32::NAN; heads * stride];
            k.kivi_scores_heads(fmt, head_dim, &q, &block, &mut scores, stride).expect("valid");
            for h in 0..heads {
                let qh = &q[h * head_dim..(h + 1) * head_dim];
                // sum |q| (|m| + s * levels) bounds sum |q k̂| and the partial sums.
                let magnitude: f64 = (0..head_dim)
                    .map(|c| f64::from(qh[c]).abs() * (f16_at(2 * head_dim + 2 * c).abs() + f16_at(2 * c) * levels))
                    .sum();
                for t in 0..tokens {
                    let (exact, _) = exact_dot(qh, &k_hat[t * head_dim..(t + 1) * head_dim]);
                    let tol = (2.0 * head_dim as f64 + 8.0) * U * magnitude;
                    let got = scores[h * stride + t];
                    prop_assert!(
                        (f64::from(got) - exact).abs() <= tol,
                        "{} at {} head {} token {}: {} vs exact {} (tol {})", fmt, k.isa(), h, t, got, exact, tol
                    );
                }
                for t in tokens..stride {
                    prop_assert!(scores[h * stride + t].is_nan());
                }
            }
        }
    }
}

#[test]
fn several_heads_refuse_inconsistent_lengths() {
    use kv_quant::{Group, QuantError};
    let fmt = RowFormat::Int4 { group: Group::G32 };
    let rows = vec![0u8; 3 * fmt.row_bytes(64).expect("valid")];
    let q = vec![1.0f32; 2 * 64];
    for k in Isa::available()
        .into_iter()
        .filter_map(|i| Kernels::new(i).ok())
    {
        let mut scores = vec![0.0f32; 2 * 4];
        // Fine: 2 heads, 3 rows, stride 4.
        k.dot_heads(fmt, 64, &q, &rows, &mut scores, 4)
            .expect("valid");
        let mismatch =
            |r: kv_quant::Result<()>| matches!(r, Err(QuantError::LengthMismatch { .. }));
        assert!(mismatch(k.dot_heads(
            fmt,
            64,
            &q[..100],
            &rows,
            &mut scores,
            4
        )));
        assert!(mismatch(k.dot_heads(
            fmt,
            64,
            &q,
            &rows[1..],
            &mut scores,
            4
        )));
        assert!(mismatch(k.dot_heads(fmt, 64, &q, &rows, &mut scores, 2)));
        assert!(mismatch(k.dot_heads(
            fmt,
            64,
            &q,
            &rows,
            &mut scores[..6],
            4
        )));
        let mut acc = vec![0.0f32; 2 * 64];
        assert!(mismatch(k.axpy_heads(
            fmt,
            64,
            &scores[..6],
            4,
            &rows,
            &mut acc
        )));
        assert!(mismatch(k.axpy_heads(
            fmt,
            64,
            &scores,
            4,
            &rows,
            &mut acc[..70]
        )));
        assert!(matches!(
            k.dot_heads(fmt, 48, &q, &rows, &mut scores, 4),
            Err(QuantError::InvalidHeadDim { .. })
        ));
    }
}

/// Every shape the SIMD `dot_heads` compiles for fixed dims (head dim 64 and 128, each
/// group size, 1 to 4 heads per block), and one run-time shape each side, against the
/// scalar reference: the proptest above reaches these only by chance.
#[test]
fn several_heads_score_every_compiled_shape() {
    use kv_quant::Group;
    let mut rng = SplitMix(7);
    for group in [Group::G32, Group::G64, Group::G128] {
        for fmt in [
            RowFormat::Int8 { group },
            RowFormat::Int4 { group },
            RowFormat::Int2 { group },
        ] {
            for d in [32, 64, 96, 128, 256] {
                let Ok(rb) = fmt.row_bytes(d) else { continue };
                // 11 rows: whole blocks of 2, 4 or 8 rows and a remainder for every block.
                let rows = 11;
                let x: Vec<f32> = (0..rows * d).map(|_| rng.normal()).collect();
                let block: Vec<u8> = x.chunks_exact(d).flat_map(|r| quant(fmt, r)).collect();
                assert_eq!(block.len(), rows * rb);
                for heads in 1..=5 {
                    let q: Vec<f32> = (0..heads * d).map(|_| rng.normal()).collect();
                    let mut want = vec![0.0f32; heads * rows];
                    Kernels::scalar()
                        .dot_heads(fmt, d, &q, &block, &mut want, rows)
                        .expect("valid");
                    for k in simd_levels() {
                        let mut got = vec![f32::NAN; heads * rows];
                        k.dot_heads(fmt, d, &q, &block, &mut got, rows)
                            .expect("valid");
                        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                            let tol = 1e-4 * (1.0 + w.abs()) * (d as f32).sqrt();
                            assert!(
                                (g - w).abs() <= tol,
                                "{fmt} d {d} heads {heads} at {}: score {i}: {g} vs {w}",
                                k.isa()
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Prefetching the next rows changes no result: the `_ahead` kernels equal the plain ones
/// bit for bit at every level, whatever `ahead` holds (none, fewer or more bytes than the
/// rows read, starting mid-line), KIVI key blocks too.
#[test]
fn prefetching_ahead_changes_no_result() {
    use kv_quant::Group;
    let mut rng = SplitMix(11);
    for fmt in [
        RowFormat::Int8 { group: Group::G32 },
        RowFormat::Int4 { group: Group::G64 },
        RowFormat::Int2 { group: Group::G32 },
    ] {
        for (d, heads) in [(64, 3), (128, 1), (128, 6), (96, 2)] {
            let Ok(rb) = fmt.row_bytes(d) else { continue };
            let rows = 13;
            let x: Vec<f32> = (0..2 * rows * d).map(|_| rng.normal()).collect();
            let all: Vec<u8> = x.chunks_exact(d).flat_map(|r| quant(fmt, r)).collect();
            let (block, next) = all.split_at(rows * rb);
            let q: Vec<f32> = (0..heads * d).map(|_| rng.normal()).collect();
            let w: Vec<f32> = (0..heads * rows).map(|_| rng.normal().abs()).collect();
            let acc0: Vec<f32> = (0..heads * d).map(|_| rng.normal()).collect();
            for k in Isa::available()
                .into_iter()
                .filter_map(|i| Kernels::new(i).ok())
            {
                let mut want = vec![0.0f32; heads * rows];
                k.dot_heads(fmt, d, &q, block, &mut want, rows)
                    .expect("valid");
                let mut want_acc = acc0.clone();
                k.axpy_heads(fmt, d, &w, rows, block, &mut want_acc)
                    .expect("valid");
                for ahead in [&next[..0], &next[3..5 * rb + 7], &next[1..], &all[..]] {
                    let mut got = vec![0.0f32; heads * rows];
                    k.dot_heads_ahead(fmt, d, &q, block, &mut got, rows, ahead)
                        .expect("valid");
                    assert_eq!(got, want, "{fmt} d {d} at {}", k.isa());
                    let mut acc = acc0.clone();
                    k.axpy_heads_ahead(fmt, d, &w, rows, block, &mut acc, ahead)
                        .expect("valid");
                    assert_eq!(acc, want_acc, "{fmt} d {d} at {}", k.isa());
                }
            }
        }
    }
    // KIVI key blocks, with `ahead` far longer than the codes read (a window's f16 rows).
    for bits in [KiviBits::B2, KiviBits::B4] {
        for (d, heads, tokens) in [(64, 3, 32), (128, 1, 32), (128, 6, 19), (640, 2, 32)] {
            let fmt = KiviKeyFormat::new(bits, tokens);
            let keys: Vec<f32> = (0..tokens * d).map(|_| rng.normal()).collect();
            let mut block = vec![0u8; fmt.block_bytes(d).expect("valid")];
            fmt.quantize_block(&keys, d, &mut block).expect("storable");
            let q: Vec<f32> = (0..heads * d).map(|_| rng.normal()).collect();
            let later: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
            for k in Isa::available()
                .into_iter()
                .filter_map(|i| Kernels::new(i).ok())
            {
                let mut want = vec![0.0f32; heads * tokens];
                k.kivi_scores_heads(fmt, d, &q, &block, &mut want, tokens)
                    .expect("valid");
                for ahead in [&later[..0], &later[3..77], &later[1..], &block[..]] {
                    let mut got = vec![0.0f32; heads * tokens];
                    k.kivi_scores_heads_ahead(fmt, d, &q, &block, &mut got, tokens, ahead)
                        .expect("valid");
                    assert_eq!(got, want, "kivi {bits:?} d {d} at {}", k.isa());
                }
            }
        }
    }
}

#[test]
fn every_simd_level_of_this_cpu_is_under_test() {
    // Guards the filter above: on an x86-64 CPU with AVX2 the AVX2 path must be among
    // the tested levels, whatever higher level the CPU also has.
    let levels: Vec<Isa> = simd_levels().iter().map(|k| k.isa()).collect();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
    {
        assert!(levels.contains(&Isa::Avx2), "{levels:?}");
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        assert!(levels.contains(&Isa::Avx512), "{levels:?}");
    }
    assert!(!levels.contains(&Isa::Scalar));
}
