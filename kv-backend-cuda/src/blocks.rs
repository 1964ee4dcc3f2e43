//! The bytes of one cache block for `export_block` / `import_block`, in the CPU backend's
//! order: per layer the K bytes of every KV head, the V bytes of every KV head, then for
//! KIVI one record per key block: `0` (no window), or `1` (a window still filling) or `2`
//! (a quantized block's window that a residual layout keeps until settled), then the
//! filled-slot mask (u64 little-endian), the window's f16 keys and, with a residual, its
//! f16 values. Without a residual a quantized block's window is not exported: like a
//! copy, the block reads as stored.
//!
//! Parsing checks everything an import must refuse before anything is stored: lengths,
//! window flags and masks, and every stored row, key block and window decoding to finite
//! values. Plain Rust, tested on the CPU.

use kv_core::{KvError, Result};
use kv_quant::{Group, Kernels, KiviBits, KiviKeyFormat, RowFormat};

use crate::plan::{Fmt, GpuLayout};

/// The sizes of one block's export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub row_bytes: usize,
    /// KIVI key blocks per cache block (0 for the row layouts).
    pub key_blocks: usize,
    /// f16 elements of a window's keys (`kv_heads x 32 x head_dim`; 0 for row layouts).
    pub window_elems: usize,
    /// Whether windows also hold values and are exported once quantized (`kivi*-rR`).
    pub residual: bool,
}

impl BlockShape {
    /// Bytes of one layer's K (or V) part: every head's `block_size` rows.
    pub(crate) fn part_bytes(&self) -> Result<usize> {
        crate::plan::product(
            "block export",
            &[self.kv_heads, self.block_size, self.row_bytes],
        )
    }
}

/// A window as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockWindow {
    pub filled: u64,
    /// Flag 2: the block is quantized and the (residual) window kept.
    pub quantized: bool,
    /// f16 bits of the keys, `[kv_head][32][head_dim]`.
    pub keys: Vec<u16>,
    /// f16 bits of the values (residual layouts), shaped as the keys; empty otherwise.
    pub values: Vec<u16>,
}

/// One layer of a parsed export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockLayer<'a> {
    pub k: &'a [u8],
    pub v: &'a [u8],
    pub windows: Vec<Option<BlockWindow>>,
}

/// Appends one window record.
pub(crate) fn push_window(out: &mut Vec<u8>, w: Option<&BlockWindow>) {
    match w {
        None => out.push(0),
        Some(w) => {
            out.push(if w.quantized { 2 } else { 1 });
            out.extend_from_slice(&w.filled.to_le_bytes());
            for x in w.keys.iter().chain(&w.values) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// kv-quant's format of rows stored as `f` with groups of `group` elements; `None` for
/// KIVI keys (key blocks, not rows).
fn row_format(f: Fmt, group: u32) -> Result<Option<RowFormat>> {
    let group = || {
        Group::ALL
            .into_iter()
            .find(|g| g.size() == group as usize)
            .ok_or_else(|| KvError::InvalidArgument {
                what: "layout",
                detail: format!("no kv-quant group of {group} elements"),
            })
    };
    Ok(Some(match f {
        Fmt::F32 => RowFormat::F32,
        Fmt::F16 => RowFormat::F16,
        Fmt::Bf16 => RowFormat::Bf16,
        Fmt::Int8 => RowFormat::Int8 { group: group()? },
        Fmt::Int4 => RowFormat::Int4 { group: group()? },
        Fmt::Int2 => RowFormat::Int2 { group: group()? },
        Fmt::Kivi => return Ok(None),
    }))
}

/// Parses and checks an export of one block for a storage of `shape` in `layout`.
///
/// # Errors
/// [`KvError::ShapeMismatch`] when the length is not one block's export;
/// [`KvError::InvalidArgument`] for a bad window flag or mask; [`KvError::NonFinite`] for
/// a stored row, key block or window that decodes to NaN or infinity.
pub(crate) fn parse<'a>(
    shape: &BlockShape,
    layout: GpuLayout,
    bytes: &'a [u8],
) -> Result<Vec<BlockLayer<'a>>> {
    let internal = |e: kv_quant::QuantError| KvError::InvalidArgument {
        what: "imported block",
        detail: e.to_string(),
    };
    let part = shape.part_bytes()?;
    let short = |at: usize| KvError::ShapeMismatch {
        what: "imported block",
        expected: format!("more than {at} bytes for {} layers", shape.layers),
        got: format!("{} bytes", bytes.len()),
    };
    let non_finite = || KvError::NonFinite {
        what: "imported block",
    };
    let kernels = Kernels::best();
    let d = shape.head_dim;
    let mut row = vec![0.0f32; d];
    let kivi = match layout.kivi_bits {
        0 => None,
        2 => Some(KiviKeyFormat::new(KiviBits::B2, 32)),
        _ => Some(KiviKeyFormat::new(KiviBits::B4, 32)),
    };
    let mut block_f32 = vec![0.0f32; 32 * d];
    let window_bytes = crate::plan::product("window", &[shape.window_elems, 2])?;
    let mut layers = Vec::with_capacity(shape.layers);
    let mut rest = bytes;
    for _ in 0..shape.layers {
        let at = bytes.len() - rest.len();
        let (k, r) = rest.split_at_checked(part).ok_or_else(|| short(at))?;
        let (v, r) = r.split_at_checked(part).ok_or_else(|| short(at))?;
        rest = r;
        for (stored, fmt) in [(k, layout.k), (v, layout.v)] {
            match (row_format(fmt, layout.group)?, kivi) {
                (Some(f), _) => {
                    for r in stored.chunks_exact(shape.row_bytes) {
                        kernels.dequantize_row(f, r, &mut row).map_err(internal)?;
                        if !row.iter().all(|x| x.is_finite()) {
                            return Err(non_finite());
                        }
                    }
                }
                (None, Some(f)) => {
                    for b in stored.chunks_exact(32 * shape.row_bytes) {
                        f.dequantize_block(b, d, &mut block_f32).map_err(internal)?;
                        if !block_f32.iter().all(|x| x.is_finite()) {
                            return Err(non_finite());
                        }
                    }
                }
                (None, None) => {
                    return Err(KvError::InvalidArgument {
                        what: "layout",
                        detail: "KIVI keys without a code width".into(),
                    })
                }
            }
        }
        let mut windows = Vec::with_capacity(shape.key_blocks);
        for _ in 0..shape.key_blocks {
            let at = bytes.len() - rest.len();
            let (&flag, r) = rest.split_first().ok_or_else(|| short(at))?;
            rest = r;
            match flag {
                0 => windows.push(None),
                1 | 2 if flag == 1 || shape.residual => {
                    let (mask, r) = rest.split_at_checked(8).ok_or_else(|| short(at))?;
                    let (keys, r) = r.split_at_checked(window_bytes).ok_or_else(|| short(at))?;
                    let values_len = if shape.residual { window_bytes } else { 0 };
                    let (values, r) = r.split_at_checked(values_len).ok_or_else(|| short(at))?;
                    rest = r;
                    let mut m = [0u8; 8];
                    m.copy_from_slice(mask);
                    let filled = u64::from_le_bytes(m);
                    let full = u64::from(u32::MAX);
                    if filled & !full != 0 || (flag == 2 && filled != full) {
                        return Err(KvError::InvalidArgument {
                            what: "imported block",
                            detail: format!(
                                "window mask {filled:#x} with flag {flag} (32-token key blocks; \
                                 a quantized block's window has every slot)"
                            ),
                        });
                    }
                    let parse = |b: &[u8]| -> Vec<u16> {
                        b.chunks_exact(2)
                            .map(|p| u16::from_le_bytes([p[0], p[1]]))
                            .collect()
                    };
                    let (keys, values) = (parse(keys), parse(values));
                    // f16 exponent all ones: infinity or NaN.
                    if keys.iter().chain(&values).any(|&h| h & 0x7c00 == 0x7c00) {
                        return Err(non_finite());
                    }
                    windows.push(Some(BlockWindow {
                        filled,
                        quantized: flag == 2,
                        keys,
                        values,
                    }));
                }
                other => {
                    return Err(KvError::InvalidArgument {
                        what: "imported block",
                        detail: format!(
                            "window flag {other} at byte {at} ({} expected)",
                            if shape.residual {
                                "0, 1 or 2"
                            } else {
                                "0 or 1"
                            }
                        ),
                    })
                }
            }
        }
        layers.push(BlockLayer { k, v, windows });
    }
    if !rest.is_empty() {
        return Err(KvError::ShapeMismatch {
            what: "imported block",
            expected: format!("{} bytes", bytes.len() - rest.len()),
            got: format!("{} bytes", bytes.len()),
        });
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::KvDType;

    fn layout(name: &str) -> (GpuLayout, KvDType) {
        let dtype: KvDType = name.parse().expect("dtype");
        (GpuLayout::of(dtype).expect("layout"), dtype)
    }

    fn shape(dtype: KvDType, d: usize) -> BlockShape {
        let kivi = matches!(dtype, KvDType::Kivi { .. });
        BlockShape {
            layers: 2,
            kv_heads: 2,
            head_dim: d,
            block_size: 32,
            row_bytes: dtype.row_bytes(d).expect("row"),
            key_blocks: usize::from(kivi),
            window_elems: if kivi { 2 * 32 * d } else { 0 },
            residual: dtype.residual_tokens() > 0,
        }
    }

    /// An export of zeros (every layout stores zeros as finite values) with `window` as
    /// every layer's window record.
    fn export(s: &BlockShape, window: Option<&BlockWindow>) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..s.layers {
            out.resize(out.len() + 2 * s.part_bytes().expect("part"), 0);
            for _ in 0..s.key_blocks {
                push_window(&mut out, window);
            }
        }
        out
    }

    #[test]
    fn exports_parse_back_and_bad_ones_are_refused() {
        for name in ["f16", "int4-g32", "kivi4", "kivi2-r128"] {
            let (l, dtype) = layout(name);
            let s = shape(dtype, 64);
            let bytes = export(&s, None);
            let parsed = parse(&s, l, &bytes).expect(name);
            assert_eq!(parsed.len(), 2);
            assert_eq!(parsed[1].k.len(), s.part_bytes().expect("part"));
            // One byte short or long.
            for bad in [
                &bytes[..bytes.len() - 1],
                &[bytes.as_slice(), &[0]].concat()[..],
            ] {
                let e = parse(&s, l, bad).unwrap_err();
                assert!(matches!(e, KvError::ShapeMismatch { .. }), "{name}: {e}");
            }
            // A NaN where an f16 row, or a KIVI key block's first scale, is.
            if name == "f16" || name.starts_with("kivi") {
                let mut nan = bytes.clone();
                nan[0] = 0x00;
                nan[1] = 0x7e;
                let e = parse(&s, l, &nan).unwrap_err();
                assert!(matches!(e, KvError::NonFinite { .. }), "{name}: {e}");
            }
        }
    }

    #[test]
    fn kivi_window_records_are_checked() {
        let (l, dtype) = layout("kivi4");
        let s = shape(dtype, 64);
        let w = BlockWindow {
            filled: 0b11,
            quantized: false,
            keys: vec![0x3c00; s.window_elems],
            values: Vec::new(),
        };
        let bytes = export(&s, Some(&w));
        let parsed = parse(&s, l, &bytes).expect("filling window");
        assert_eq!(parsed[0].windows, vec![Some(w.clone())]);
        // Flag 2 only with a residual; masks beyond 32 slots; an infinite key.
        let q = BlockWindow {
            filled: u64::from(u32::MAX),
            quantized: true,
            ..w.clone()
        };
        let e = parse(&s, l, &export(&s, Some(&q))).unwrap_err();
        assert!(matches!(e, KvError::InvalidArgument { .. }), "{e}");
        let wide = BlockWindow {
            filled: 1 << 40,
            ..w.clone()
        };
        let e = parse(&s, l, &export(&s, Some(&wide))).unwrap_err();
        assert!(matches!(e, KvError::InvalidArgument { .. }), "{e}");
        let mut inf = w.clone();
        inf.keys[7] = 0x7c00;
        let e = parse(&s, l, &export(&s, Some(&inf))).unwrap_err();
        assert!(matches!(e, KvError::NonFinite { .. }), "{e}");

        // A residual layout: values too, and flag 2 with every slot.
        let (l, dtype) = layout("kivi2-r128");
        let s = shape(dtype, 64);
        let q = BlockWindow {
            filled: u64::from(u32::MAX),
            quantized: true,
            keys: vec![0x3c00; s.window_elems],
            values: vec![0xbc00; s.window_elems],
        };
        let kept = export(&s, Some(&q));
        let parsed = parse(&s, l, &kept).expect("kept window");
        assert_eq!(parsed[1].windows, vec![Some(q.clone())]);
        let partial = BlockWindow { filled: 7, ..q };
        let e = parse(&s, l, &export(&s, Some(&partial))).unwrap_err();
        assert!(matches!(e, KvError::InvalidArgument { .. }), "{e}");
    }
}
