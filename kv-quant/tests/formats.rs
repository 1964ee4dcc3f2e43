//! Sizes, byte layouts, names, and the argument checks of the public API.

mod common;

use common::*;
use half::f16;
use kv_quant::layout::{Int2G32, Int4G32, Int8G32, Int8G64};
use kv_quant::{Group, Isa, Kernels, KiviBits, KiviKeyFormat, QuantError, RowFormat};

#[test]
fn row_bytes_table() {
    use Group::*;
    use RowFormat::*;
    // (format, head_dim 64, head_dim 128); None = head_dim not a multiple of the group.
    let table: [(RowFormat, Option<usize>, usize); 12] = [
        (F32, Some(256), 512),
        (F16, Some(128), 256),
        (Bf16, Some(128), 256),
        (Int8 { group: G32 }, Some(64 + 2 * 2), 136),
        (Int8 { group: G64 }, Some(64 + 2), 132),
        (Int8 { group: G128 }, None, 130),
        (Int4 { group: G32 }, Some(32 + 2 * 4), 80),
        (Int4 { group: G64 }, Some(32 + 4), 72),
        (Int4 { group: G128 }, None, 68),
        (Int2 { group: G32 }, Some(16 + 2 * 4), 48),
        (Int2 { group: G64 }, Some(16 + 4), 40),
        (Int2 { group: G128 }, None, 36),
    ];
    for (fmt, d64, d128) in table {
        assert_eq!(fmt.row_bytes(64).ok(), d64, "{fmt} @64");
        assert_eq!(fmt.row_bytes(128).ok(), Some(d128), "{fmt} @128");
        // And the inverse.
        assert_eq!(fmt.head_dim_of(d128), Ok(128), "{fmt}");
    }
    // SmolLM2-135M per token: 30 layers x 3 KV heads x (K + V) rows of head_dim 64.
    let per_token = |f: RowFormat| 30 * 3 * 2 * f.row_bytes(64).expect("valid");
    assert_eq!(per_token(F16), 23_040);
    assert_eq!(per_token(Int8 { group: G32 }), 12_240);
    assert_eq!(per_token(Int4 { group: G32 }), 7_200);
}

#[test]
fn invalid_head_dims_are_typed_errors() {
    let fmt = RowFormat::Int4 { group: Group::G64 };
    assert_eq!(
        fmt.row_bytes(96),
        Err(QuantError::InvalidHeadDim {
            format: "int4-g64",
            head_dim: 96,
            multiple_of: 64
        })
    );
    assert!(matches!(
        RowFormat::F16.row_bytes(0),
        Err(QuantError::InvalidHeadDim { head_dim: 0, .. })
    ));
    assert!(matches!(
        RowFormat::F32.row_bytes(usize::MAX / 2),
        Err(QuantError::SizeOverflow { .. })
    ));
    assert!(
        RowFormat::F16.row_bytes(7).is_ok(),
        "float rows take any head_dim"
    );
    assert!(matches!(
        RowFormat::Int8 { group: Group::G32 }.head_dim_of(35),
        Err(QuantError::LengthMismatch {
            expected: 34,
            got: 35,
            ..
        })
    ));
}

#[test]
fn names_round_trip() {
    for fmt in RowFormat::ALL {
        assert_eq!(fmt.name().parse::<RowFormat>(), Ok(fmt));
        assert_eq!(fmt.to_string(), fmt.name());
        assert_eq!(fmt.name().to_uppercase().parse::<RowFormat>(), Ok(fmt));
    }
    assert!(matches!(
        "int3".parse::<RowFormat>(),
        Err(QuantError::UnknownFormat { .. })
    ));
    assert_eq!(
        KiviKeyFormat::new(KiviBits::B2, 32).to_string(),
        "kivi2-t32"
    );
}

#[test]
fn int8_bytes_follow_the_documented_layout() {
    let fmt = RowFormat::Int8 { group: Group::G32 };
    let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.25).collect();
    let row = quant(fmt, &x);
    let groups: &[Int8G32] = bytemuck::cast_slice(&row);
    assert_eq!(groups.len(), 2);
    for (g, xg) in groups.iter().zip(x.chunks_exact(32)) {
        let amax = xg.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        // Scale: the f16 at bytes 0..2, little-endian, rounded up from max|x| / 127.
        let s = f16::from_le_bytes(g.scale).to_f32();
        assert_eq!(s, g.scale());
        assert!(s >= amax / 127.0 && s < amax / 127.0 * 1.001);
        // The largest element maps to +-127, and codes are element-ordered.
        let top = xg.iter().position(|v| v.abs() == amax).expect("exists");
        assert_eq!(g.codes[top].unsigned_abs(), 127);
        for (i, &v) in xg.iter().enumerate() {
            assert_eq!(i32::from(g.codes[i]), (v / s).round_ties_even() as i32);
            assert_eq!(g.get(i), Some(s * f32::from(g.codes[i])));
        }
    }
    // The same bytes read as a wider group type is a different, still valid, layout.
    assert!(
        bytemuck::try_cast_slice::<u8, Int8G64>(&row).is_err(),
        "68 is not 66k"
    );
}

#[test]
fn int4_and_int2_bytes_follow_the_documented_layout() {
    let x: Vec<f32> = (0..32).map(|i| -2.0 + 0.125 * i as f32).collect();
    let row = quant(RowFormat::Int4 { group: Group::G32 }, &x);
    let g: &Int4G32 = bytemuck::from_bytes(&row);
    assert_eq!(f16::from_le_bytes(g.min).to_f32(), -2.0);
    assert_eq!(g.min(), -2.0);
    // Range 3.875 over 15 steps, rounded up to f16.
    let s = g.scale();
    assert!((3.875 / 15.0..3.875 / 15.0 * 1.001).contains(&s), "{s}");
    for i in 0..32 {
        let code = ((x[i] + 2.0) / s).round_ties_even() as u8;
        let byte = row[4 + i / 2];
        let nibble = if i % 2 == 0 { byte & 0xf } else { byte >> 4 };
        assert_eq!(nibble, code, "element {i}: low nibble first");
        assert_eq!(g.code(i), Some(code));
    }

    let row = quant(RowFormat::Int2 { group: Group::G32 }, &x);
    let g: &Int2G32 = bytemuck::from_bytes(&row);
    for i in 0..32 {
        let crumb = (row[4 + i / 4] >> (2 * (i % 4))) & 3;
        assert_eq!(Some(crumb), g.code(i), "element {i}");
        assert_eq!(g.get(i), Some(g.min() + g.scale() * f32::from(crumb)));
    }
}

#[test]
fn float_rows_are_little_endian_elements() {
    let x = [1.0f32, -2.5, 65504.0, 1e-7];
    let row = quant(RowFormat::F16, &x);
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(row[2 * i..2 * i + 2], f16::from_f32(v).to_le_bytes());
    }
    let row = quant(RowFormat::Bf16, &x);
    for (i, &v) in x.iter().enumerate() {
        assert_eq!(row[2 * i..2 * i + 2], half::bf16::from_f32(v).to_le_bytes());
    }
    let row = quant(RowFormat::F32, &x);
    assert_eq!(row[4..8], (-2.5f32).to_le_bytes());
}

#[test]
fn kivi_block_sizes_and_layout() {
    // 4 D + T D b / 8.
    for (bits, t, d, bytes) in [
        (KiviBits::B4, 32, 64, 256 + 32 * 32),
        (KiviBits::B2, 32, 64, 256 + 32 * 16),
        (KiviBits::B4, 64, 64, 256 + 64 * 32),
        (KiviBits::B2, 128, 128, 512 + 128 * 32),
    ] {
        let fmt = KiviKeyFormat::new(bits, t);
        assert_eq!(fmt.block_bytes(d), Ok(bytes), "{fmt} d {d}");
        assert_eq!(fmt.bytes_per_token(d), Ok(bytes as f64 / t as f64));
    }
    assert_eq!(
        KiviKeyFormat::new(KiviBits::B4, 32).bytes_per_token(64),
        Ok(40.0)
    );
    assert_eq!(
        KiviKeyFormat::new(KiviBits::B2, 32).bytes_per_token(64),
        Ok(24.0)
    );

    // Channel c of token t: code at byte 4D + t * D b / 8 + c b / 8, low bits first.
    let (t_n, d) = (4, 32);
    let fmt = KiviKeyFormat::new(KiviBits::B4, t_n);
    // Channel c takes values c + t * 0.5 over tokens t: min c, range 1.5.
    let keys: Vec<f32> = (0..t_n * d)
        .map(|i| (i % d) as f32 + (i / d) as f32 * 0.5)
        .collect();
    let mut block = vec![0u8; fmt.block_bytes(d).expect("valid")];
    fmt.quantize_block(&keys, d, &mut block).expect("storable");
    for c in 0..d {
        let s = f16::from_le_bytes([block[2 * c], block[2 * c + 1]]).to_f32();
        let m = f16::from_le_bytes([block[2 * d + 2 * c], block[2 * d + 2 * c + 1]]).to_f32();
        assert_eq!(m, c as f32, "channel {c} min");
        assert!((0.1..0.1001).contains(&s), "channel {c} scale {s}");
        for t in 0..t_n {
            let byte = block[4 * d + t * d / 2 + c / 2];
            let code = if c % 2 == 0 { byte & 0xf } else { byte >> 4 };
            assert_eq!(
                code,
                ((t as f32 * 0.5) / s).round_ties_even() as u8,
                "t {t} c {c}"
            );
        }
    }
}

#[test]
fn wrong_lengths_are_errors_not_panics() {
    let fmt = RowFormat::Int4 { group: Group::G32 };
    let k = Kernels::best();
    let x = vec![0.5f32; 64];
    let mut row = vec![0u8; 40];
    let mut short = vec![0u8; 39];
    let mut out = vec![0.0f32; 64];

    let mismatch = |r: kv_quant::Result<()>, what: &str| {
        assert!(
            matches!(&r, Err(QuantError::LengthMismatch { what: w, .. }) if *w == what),
            "{r:?}"
        );
    };
    mismatch(k.quantize_row(fmt, &x, &mut short), "out");
    mismatch(k.dequantize_row(fmt, &short, &mut out), "row");
    mismatch(k.dot(fmt, &x, &short).map(|_| ()), "row");
    mismatch(k.axpy(fmt, 1.0, &short, &mut out), "row");
    mismatch(k.dot_many(fmt, &x, &row[..39], &mut out[..1]), "rows");
    mismatch(k.axpy_many(fmt, &[1.0, 2.0], &row, &mut out), "rows");
    assert!(matches!(
        k.dot(fmt, &x[..33], &row),
        Err(QuantError::InvalidHeadDim { head_dim: 33, .. })
    ));
    assert!(matches!(
        fmt.error_bound(&row[..7]),
        Err(QuantError::LengthMismatch { .. })
    ));
    k.quantize_row(fmt, &x, &mut row).expect("valid");

    let kivi = KiviKeyFormat::new(KiviBits::B2, 16);
    let bytes = kivi.block_bytes(64).expect("valid");
    let mut block = vec![0u8; bytes];
    let keys = vec![0.0f32; 16 * 64];
    mismatch(kivi.quantize_block(&keys[1..], 64, &mut block), "keys");
    mismatch(kivi.quantize_block(&keys, 64, &mut block[1..]), "out");
    kivi.quantize_block(&keys, 64, &mut block).expect("valid");
    mismatch(kivi.scores(&x, &block, &mut out[..15]), "out");
    mismatch(kivi.scores(&x, &block[1..], &mut out[..16]), "block");
    mismatch(kivi.dequantize_block(&block, 64, &mut out), "out");
    assert!(matches!(
        kivi.scores(&x[..48], &block, &mut out[..16]),
        Err(QuantError::InvalidHeadDim {
            multiple_of: 32,
            ..
        })
    ));
    assert!(matches!(
        KiviKeyFormat::new(KiviBits::B4, 0).block_bytes(64),
        Err(QuantError::InvalidBlockTokens { block_tokens: 0 })
    ));
    // Absurd shapes are errors, not overflow panics.
    let huge = KiviKeyFormat::new(KiviBits::B2, usize::MAX / 16);
    assert!(matches!(
        huge.block_bytes(64),
        Err(QuantError::SizeOverflow { .. })
    ));
    assert!(huge.quantize_block(&keys, 64, &mut block).is_err());
}

#[test]
fn unavailable_levels_are_refused() {
    for isa in Isa::ALL {
        match Kernels::new(isa) {
            Ok(k) => assert!(isa.is_available() && k.isa() == isa),
            Err(e) => {
                assert!(!isa.is_available());
                assert_eq!(e, QuantError::IsaUnavailable { isa });
            }
        }
    }
    assert!(Isa::best().is_available());
    assert!(Isa::available().contains(&Isa::Scalar));
    assert!(Isa::available().contains(&Isa::best()) || std::env::var("KV_ISA").is_ok());
}

#[test]
fn synthetic_keys_have_the_outlier_channels_they_claim() {
    // Guards the measurement data: 4 outlier channels with |mean| >= 10, others small.
    let keys = outlier_keys(512, 64, 4, 1);
    let means: Vec<f32> = (0..64)
        .map(|c| keys.iter().skip(c).step_by(64).sum::<f32>() / 512.0)
        .collect();
    let big = means.iter().filter(|m| m.abs() > 8.0).count();
    assert_eq!(big, 4, "{means:?}");
}
