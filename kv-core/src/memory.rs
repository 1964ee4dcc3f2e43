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
/// that is not full yet, `n_kv_heads x 32 tokens x head_dim x 2` bytes. Zero for layouts
/// that store each row on its own (they need no window). See the [module docs](self).
///
/// ```
/// use kv_core::{memory, KvDType, ModelShape};
/// let smollm2 = ModelShape::preset("smollm2-135m")?;
/// let kivi4: KvDType = "kivi4".parse()?;
/// assert_eq!(memory::residual_window_bytes(&smollm2, kivi4)?, 3 * 32 * 64 * 2);
/// // One window per layer for a sequence whose last block is partly filled: 360 KiB.
/// assert_eq!(30 * memory::residual_window_bytes(&smollm2, kivi4)?, 360 << 10);
/// assert_eq!(memory::residual_window_bytes(&smollm2, KvDType::F16)?, 0);
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
    [dtype.block_tokens(), shape.head_dim(), 2]
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
        for &d in KvDType::ALL {
            let w = residual_window_bytes(&smol, d);
            let want = if d.block_tokens() > 1 { 12_288 } else { 0 };
            assert!(w.is_err() || w.unwrap() == want, "{d}");
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
