//! Size and length arithmetic at the edges: an overflow is a typed error, never a wrapped or
//! saturated number compared against a real length.
#![allow(clippy::unwrap_used)]

use kv_quant::{Group, Isa, Kernels, KiviBits, KiviKeyFormat, QuantError, RowFormat};

#[test]
fn row_bytes_is_exact_or_an_overflow() {
    // A head dim near usize::MAX that is a multiple of every group.
    let huge = usize::MAX / 128 * 128;
    for fmt in RowFormat::ALL {
        match fmt.row_bytes(huge) {
            // Only formats that store fewer bytes than elements fit, and then exactly.
            Ok(bytes) => {
                let gb = fmt.group_bytes().unwrap();
                let g = fmt.group().unwrap().size();
                assert!(gb < g, "{fmt}");
                assert_eq!(bytes, huge / g * gb, "{fmt}");
            }
            Err(QuantError::SizeOverflow { head_dim, .. }) => assert_eq!(head_dim, huge),
            Err(e) => panic!("{fmt}: {e}"),
        }
    }
    // The edge of f32: usize::MAX / 4 elements fit, one more does not.
    let edge = usize::MAX / 4;
    assert_eq!(RowFormat::F32.row_bytes(edge).unwrap(), edge * 4);
    assert!(matches!(
        RowFormat::F32.row_bytes(edge + 1),
        Err(QuantError::SizeOverflow { .. })
    ));
}

#[test]
fn head_dim_of_a_huge_row_overflows_instead_of_wrapping() {
    // 4-bit and 2-bit rows hold more elements than bytes: the element count of a row near
    // usize::MAX bytes does not fit usize.
    for fmt in [
        RowFormat::Int4 { group: Group::G32 },
        RowFormat::Int2 { group: Group::G32 },
    ] {
        let gb = fmt.group_bytes().unwrap();
        let row_len = usize::MAX / gb * gb;
        assert!(
            matches!(
                fmt.head_dim_of(row_len),
                Err(QuantError::LengthOverflow { what: "row", .. })
            ),
            "{fmt}"
        );
        // The largest row whose element count fits is exact.
        let groups = usize::MAX / 32;
        assert_eq!(fmt.head_dim_of(groups * gb).unwrap(), groups * 32, "{fmt}");
    }
    // Formats with at least a byte per element never overflow.
    let f16_len = usize::MAX / 2 * 2;
    assert_eq!(RowFormat::F16.head_dim_of(f16_len).unwrap(), f16_len / 2);
}

#[test]
fn kivi_sizes_overflow_as_errors() {
    let huge = KiviKeyFormat::new(KiviBits::B4, usize::MAX);
    assert!(matches!(
        huge.block_bytes(64),
        Err(QuantError::SizeOverflow { .. })
    ));
    // The block's bytes fit (16 bytes of codes a token for head_dim 32) but its keys
    // (32 floats a token) do not: the keys' length is refused, not saturated.
    let tokens = usize::MAX / 20;
    let format = KiviKeyFormat::new(KiviBits::B4, tokens);
    assert_eq!(format.block_bytes(32).unwrap(), tokens * 16 + 128);
    let mut out = [0u8; 4];
    assert!(matches!(
        format.quantize_block(&[0.0; 32], 32, &mut out),
        Err(QuantError::LengthOverflow { what: "keys", .. })
    ));
    let mut floats = [0.0f32; 4];
    // The block's length is checked first: a short block is a mismatch.
    assert!(matches!(
        format.dequantize_block(&out, 32, &mut floats),
        Err(QuantError::LengthMismatch { what: "block", .. })
    ));
}

#[test]
fn strided_outputs_with_absurd_strides_are_refused() {
    let kernels = Kernels::new(Isa::Scalar).unwrap();
    let fmt = RowFormat::Int8 { group: Group::G32 };
    let rb = fmt.row_bytes(32).unwrap();
    let rows = vec![0u8; rb];
    let q = [0.5f32; 64]; // two heads
    let mut scores = [0.0f32; 4];
    let err = kernels
        .dot_heads(fmt, 32, &q, &rows, &mut scores, usize::MAX)
        .unwrap_err();
    assert!(
        matches!(err, QuantError::LengthOverflow { what: "scores", .. }),
        "{err}"
    );
    let mut acc = [0.0f32; 64];
    let err = kernels
        .axpy_heads(fmt, 32, &[1.0; 4], usize::MAX, &rows, &mut acc)
        .unwrap_err();
    assert!(
        matches!(
            err,
            QuantError::LengthOverflow {
                what: "weights",
                ..
            }
        ),
        "{err}"
    );
    // Scores and weights are untouched.
    assert_eq!(scores, [0.0; 4]);
    assert_eq!(acc, [0.0; 64]);
}
