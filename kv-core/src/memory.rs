//! Exact cache memory: `2 x layers x kv_heads x tokens x row_bytes(head_dim)`.
//!
//! `row_bytes` is `head_dim x bytes per element` for float layouts, and includes the group
//! scales (and minimums) for quantized ones. For SmolLM2-135M (30 layers, 3 KV heads, head
//! dim 64) one token costs 23,040 bytes in f16, 12,240 in `int8-g32` (68-byte rows), 7,200
//! in `int4-g32` and `kivi4` (40-byte rows) and 4,320 in `kivi2`.
//!
//! # The KIVI residual window
//!
//! [`KvDType::Kivi`] quantizes the keys of a 32-token block per channel, which needs all 32
//! tokens. Until a block is full its keys are kept in f16, in a *residual window* of 32 f16
//! rows per KV head, in each layer: [`residual_window_bytes`]. [`cache_bytes`] counts every
//! token at its quantized size (scales amortised over the full block); a cache holds, on top
//! of that, one window per layer for each 32-token key block being filled: in ordinary use
//! one per sequence (its last, partial block), that is
//! `n_layers x residual_window_bytes` per sequence (360 KiB for SmolLM2-135M: the keys of
//! 32 tokens in f16). Backends allocate a window when a block starts filling and free it
//! once the block is quantized (the CPU backend keeps it until attention has read the
//! tokens that filled it, then frees it at the layer's next write), and report both parts (the CPU backend's
//! `CpuStorage::allocated_bytes` is `StorageSpec::bytes` plus its live windows).
//!
//! A layout with a residual `R` (`kivi2-r128`, see [`crate::KiviResidual`]) keeps the last
//! `R` tokens of a sequence in f16, K and V: its windows hold the values too (twice the
//! bytes), and a window lives until every sequence holding its block has moved `R` tokens
//! past it, so a decoding sequence holds `(R + block_size) / 32` windows per layer at most:
//! [`sequence_window_bytes`] (SmolLM2-135M, `kivi2-r128`, blocks of 32: 3.52 MiB, the f16
//! K/V of 160 tokens, next to 4,320 bytes per token quantized).

use crate::{KvDType, KvError, ModelShape, Result};

/// Bytes one token occupies in the cache across all layers, K and V.
///
/// ```
/// use kv_core::{memory, KvDType, ModelShape};
/// let smollm2 = ModelShape::preset("smollm2-135m")?;
/// assert_eq!(memory::bytes_per_token(&smollm2, KvDType::F16)?, 23_040);
/// # Ok::<(), kv_core::KvError>(())
/// ```
///
/// # Errors
/// When the layout does not fit the head dimension (see [`KvDType::row_bytes`]);
/// [`KvError::Overflow`] when the product does not fit `usize` (a shape no memory holds).
pub fn bytes_per_token(shape: &ModelShape, dtype: KvDType) -> Result<usize> {
    let row = dtype.row_bytes(shape.head_dim())?;
    [shape.n_layers(), shape.n_kv_heads(), row]
        .into_iter()
        .try_fold(2usize, usize::checked_mul)
        .ok_or_else(|| KvError::Overflow {
            what: "bytes per token",
            detail: format!(
                "2 x {} layers x {} KV heads x {row} bytes per {dtype} row is more than \
                 usize::MAX",
                shape.n_layers(),
                shape.n_kv_heads()
            ),
        })
}

/// Bytes a cache of `tokens` tokens occupies (for [`KvDType::Kivi`], without the residual
/// windows of blocks being filled: see [`residual_window_bytes`]).
///
/// ```
/// use kv_core::{memory, KvDType, ModelShape};
/// let llama2 = ModelShape::preset("llama-2-7b")?;
/// assert_eq!(memory::cache_bytes(&llama2, KvDType::F16, 4096)?, 2 << 30); // 2 GiB
/// # Ok::<(), kv_core::KvError>(())
/// ```
///
/// # Errors
/// As [`bytes_per_token`]; [`KvError::Overflow`] when the total does not fit `u64`
/// (`kv mem` with an absurd `--tokens` gets this, not a wrapped number).
///
/// ```
/// use kv_core::{memory, KvDType, KvError, ModelShape};
/// let llama2 = ModelShape::preset("llama-2-7b")?;
/// let huge = memory::cache_bytes(&llama2, KvDType::F16, usize::MAX);
/// assert!(matches!(huge, Err(KvError::Overflow { .. })));
/// # Ok::<(), kv_core::KvError>(())
/// ```
pub fn cache_bytes(shape: &ModelShape, dtype: KvDType, tokens: usize) -> Result<u64> {
    let per_token = bytes_per_token(shape, dtype)?;
    let overflow = || KvError::Overflow {
        what: "cache bytes",
        detail: format!(
            "{tokens} tokens x {per_token} bytes per token ({dtype}) is more than u64::MAX"
        ),
    };
    let per_token = u64::try_from(per_token).map_err(|_| overflow())?;
    let tokens_u64 = u64::try_from(tokens).map_err(|_| overflow())?;
    per_token.checked_mul(tokens_u64).ok_or_else(overflow)
}

/// Bytes of one f16 residual window in one layer: the keys of a [`KvDType::Kivi`] block
/// that is not full yet, `n_kv_heads x 32 tokens x head_dim x 2` bytes, and as much again
/// for its values when the layout has a residual (`kivi2-r128`). Zero for layouts that
/// store each row on its own (they need no window). See the [module docs](self).
///
/// ```
/// use kv_core::{memory, KvDType, ModelShape};
/// let smollm2 = ModelShape::preset("smollm2-135m")?;
/// let kivi4: KvDType = "kivi4".parse()?;
/// assert_eq!(memory::residual_window_bytes(&smollm2, kivi4)?, 3 * 32 * 64 * 2);
/// // One window per layer for a sequence whose last block is partly filled: 360 KiB.
/// assert_eq!(30 * memory::residual_window_bytes(&smollm2, kivi4)?, 360 << 10);
/// assert_eq!(memory::residual_window_bytes(&smollm2, KvDType::F16)?, 0);
/// // With a residual the window holds values too.
/// let r128: KvDType = "kivi2-r128".parse()?;
/// assert_eq!(memory::residual_window_bytes(&smollm2, r128)?, 2 * 3 * 32 * 64 * 2);
/// # Ok::<(), kv_core::KvError>(())
/// ```
///
/// # Errors
/// When the layout does not fit the head dimension (see [`KvDType::row_bytes`]);
/// [`KvError::Overflow`] when the window's size does not fit `usize`.
pub fn residual_window_bytes(shape: &ModelShape, dtype: KvDType) -> Result<usize> {
    dtype.row_bytes(shape.head_dim())?;
    if !matches!(dtype, KvDType::Kivi { .. }) {
        return Ok(0);
    }
    let parts = if dtype.residual_tokens() > 0 { 2 } else { 1 };
    [dtype.block_tokens(), shape.head_dim(), 2, parts]
        .into_iter()
        .try_fold(shape.n_kv_heads(), usize::checked_mul)
        .ok_or_else(|| KvError::Overflow {
            what: "residual window bytes",
            detail: format!(
                "{} KV heads x {} tokens x {} f16 elements is more than usize::MAX bytes",
                shape.n_kv_heads(),
                dtype.block_tokens(),
                shape.head_dim()
            ),
        })
}

/// The most f16 window bytes one decoding sequence holds, over all layers: windows of
/// [`residual_window_bytes`] for its last `(R + block_size) / 32` key blocks in each layer
/// with a residual of `R` tokens (blocks leave it whole, so a cache block of more than 32
/// tokens keeps up to a block more), one (the block being filled) without. Zero for layouts
/// without windows. Prefilling `n` tokens at once holds the windows of all `n` until the
/// next step, and blocks shared by several sequences keep theirs until every holder has
/// moved past them (see the [module docs](self)).
///
/// ```
/// use kv_core::{memory, KvDType, ModelShape};
/// let smollm2 = ModelShape::preset("smollm2-135m")?;
/// let r128: KvDType = "kivi2-r128".parse()?;
/// // 30 layers x 5 windows x (K and V of 32 tokens x 3 heads x 64 dims in f16).
/// assert_eq!(memory::sequence_window_bytes(&smollm2, r128, 32)?, 30 * 5 * 24_576);
/// assert_eq!(memory::sequence_window_bytes(&smollm2, "kivi2".parse()?, 32)?, 30 * 12_288);
/// assert_eq!(memory::sequence_window_bytes(&smollm2, KvDType::F16, 16)?, 0);
/// # Ok::<(), kv_core::KvError>(())
/// ```
///
/// # Errors
/// As [`residual_window_bytes`]; [`KvError::InvalidArgument`] for a KIVI layout and a
/// block size that is not a non-zero multiple of 32; [`KvError::Overflow`] when the total
/// does not fit `usize`.
pub fn sequence_window_bytes(
    shape: &ModelShape,
    dtype: KvDType,
    block_size: usize,
) -> Result<usize> {
    let window = residual_window_bytes(shape, dtype)?;
    if window == 0 {
        return Ok(0);
    }
    let key_block = dtype.block_tokens();
    if block_size == 0 || !block_size.is_multiple_of(key_block) {
        return Err(KvError::InvalidArgument {
            what: "block_size",
            detail: format!(
                "{block_size} does not fit the {dtype} layout: it must be a non-zero multiple \
                 of {key_block}"
            ),
        });
    }
    let residual = dtype.residual_tokens();
    let windows = if residual == 0 {
        1
    } else {
        residual
            .checked_add(block_size)
            .map(|t| t / key_block)
            .ok_or_else(|| KvError::Overflow {
                what: "sequence window bytes",
                detail: format!("a residual of {residual} plus blocks of {block_size} tokens"),
            })?
    };
    [windows, window]
        .into_iter()
        .try_fold(shape.n_layers(), usize::checked_mul)
        .ok_or_else(|| KvError::Overflow {
            what: "sequence window bytes",
            detail: format!(
                "{} layers x {windows} windows x {window} bytes is more than usize::MAX",
                shape.n_layers()
            ),
        })
}

/// A byte count in binary units, exact where it can be (`2 GiB`, `180 MiB`, `22.5 KiB`).
///
/// ```
/// assert_eq!(kv_core::memory::format_bytes(2 << 30), "2 GiB");
/// assert_eq!(kv_core::memory::format_bytes(23_040), "22.5 KiB");
/// ```
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let digits = if value < 10.0 { 2 } else { 1 };
    let text = format!("{value:.digits$}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_arithmetic() {
        let gib = 1u64 << 30;
        let mib = 1u64 << 20;
        let l2 = ModelShape::preset("llama-2-7b").unwrap();
        assert_eq!(cache_bytes(&l2, KvDType::F16, 4096).unwrap(), 2 * gib);
        let l3 = ModelShape::preset("llama-3-8b").unwrap();
        assert_eq!(cache_bytes(&l3, KvDType::F16, 4096).unwrap(), 512 * mib);
        let smol = ModelShape::preset("smollm2-135m").unwrap();
        assert_eq!(cache_bytes(&smol, KvDType::F16, 8192).unwrap(), 180 * mib);
        assert_eq!(cache_bytes(&smol, KvDType::F32, 8192).unwrap(), 360 * mib);
        assert_eq!(cache_bytes(&smol, KvDType::BF16, 1).unwrap(), 23_040);
    }

    #[test]
    fn quantized_layouts_count_their_scales() {
        let smol = ModelShape::preset("smollm2-135m").unwrap();
        let per_token = |name: &str| bytes_per_token(&smol, name.parse().unwrap()).unwrap();
        assert_eq!(per_token("f16"), 23_040);
        // 2 x 30 layers x 3 heads x (64 codes + 2 f16 scales).
        assert_eq!(per_token("int8-g32"), 12_240);
        assert_eq!(per_token("int8-g64"), 180 * 66);
        // 2 x 30 x 3 x (32 bytes of nibbles + 2 x (scale + min)).
        assert_eq!(per_token("int4-g32"), 7_200);
        assert_eq!(per_token("int4-g64"), 180 * 36);
        assert_eq!(per_token("kivi4"), 7_200);
        assert_eq!(per_token("kivi2"), 4_320);
        // 128-element groups do not fit head dim 64.
        assert!(bytes_per_token(&smol, "int8-g128".parse().unwrap()).is_err());
        let l3 = ModelShape::preset("llama-3-8b").unwrap();
        assert_eq!(
            cache_bytes(&l3, "int8-g128".parse().unwrap(), 4096).unwrap(),
            (512u64 << 20) / 256 * 130
        );
        for d in KvDType::every() {
            let w = residual_window_bytes(&smol, d);
            let want = match (d.block_tokens(), d.residual_tokens()) {
                (1, _) => 0,
                (_, 0) => 12_288,
                _ => 24_576,
            };
            assert!(w.is_err() || w.unwrap() == want, "{d}");
            let s = sequence_window_bytes(&smol, d, 64);
            let windows = match (d.block_tokens(), d.residual_tokens()) {
                (1, _) => 0,
                (_, 0) => 1,
                (_, r) => (r + 64) / 32,
            };
            assert!(s.is_err() || s.unwrap() == 30 * windows * want, "{d}");
            if d.block_tokens() > 1 {
                for bad in [0, 16, 48] {
                    assert!(matches!(
                        sequence_window_bytes(&smol, d, bad),
                        Err(KvError::InvalidArgument {
                            what: "block_size",
                            ..
                        })
                    ));
                }
            }
        }
    }

    #[test]
    fn overflow_is_an_error_at_every_edge() {
        let smol = ModelShape::preset("smollm2-135m").unwrap();
        let per_token = bytes_per_token(&smol, KvDType::F16).unwrap() as u64;
        // The largest token count that fits u64 is exact; one more overflows.
        let most = usize::try_from(u64::MAX / per_token).unwrap();
        assert_eq!(
            cache_bytes(&smol, KvDType::F16, most).unwrap(),
            most as u64 * per_token
        );
        for tokens in [most + 1, usize::MAX] {
            assert!(matches!(
                cache_bytes(&smol, KvDType::F16, tokens),
                Err(KvError::Overflow {
                    what: "cache bytes",
                    ..
                })
            ));
        }
        // Zero tokens of any shape cost nothing, even one whose token is huge.
        assert_eq!(cache_bytes(&smol, KvDType::F32, 0).unwrap(), 0);

        // Huge layer counts: 2 x layers x heads x row overflows usize.
        let layers = usize::MAX / 2 / 3 / 128;
        let big = ModelShape::new(layers, 9, 3, 64).unwrap();
        assert_eq!(
            bytes_per_token(&big, KvDType::F16).unwrap(),
            2 * layers * 3 * 128
        );
        let bigger = ModelShape::new(layers + 1, 9, 3, 64).unwrap();
        let err = bytes_per_token(&bigger, KvDType::F16).unwrap_err();
        assert!(
            matches!(
                err,
                KvError::Overflow {
                    what: "bytes per token",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("{} layers", layers + 1)));
        // The error propagates through cache_bytes, whatever the token count.
        assert!(matches!(
            cache_bytes(&bigger, KvDType::F16, 1),
            Err(KvError::Overflow { .. })
        ));
        let max_layers = ModelShape::new(usize::MAX, usize::MAX, usize::MAX, 1).unwrap();
        assert!(matches!(
            bytes_per_token(&max_layers, KvDType::F32),
            Err(KvError::Overflow { .. })
        ));

        // The KIVI residual window: n_kv_heads x 32 x head_dim x 2.
        let kivi4: KvDType = "kivi4".parse().unwrap();
        let heads = usize::MAX / (32 * 64 * 2);
        let wide = ModelShape::new(1, heads, heads, 64).unwrap();
        assert_eq!(
            residual_window_bytes(&wide, kivi4).unwrap(),
            heads * 32 * 64 * 2
        );
        let wider = ModelShape::new(1, heads + 1, heads + 1, 64).unwrap();
        assert!(matches!(
            residual_window_bytes(&wider, kivi4),
            Err(KvError::Overflow { .. })
        ));
        // Layouts without a window never overflow it.
        assert_eq!(residual_window_bytes(&wider, KvDType::F16).unwrap(), 0);
    }

    #[test]
    fn formatting() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(180 << 20), "180 MiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(1100), "1.07 KiB");
        assert_eq!(format_bytes(23_040), "22.5 KiB");
    }
}
