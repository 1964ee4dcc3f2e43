//! Exact cache memory: `2 x layers x kv_heads x tokens x row_bytes(head_dim)`.
//!
//! `row_bytes` is `head_dim x bytes per element` for float layouts, and includes the group
//! scales for quantized ones.

use crate::{KvDType, ModelShape, Result};

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
/// When the layout does not fit the head dimension (see [`KvDType::row_bytes`]).
pub fn bytes_per_token(shape: &ModelShape, dtype: KvDType) -> Result<usize> {
    Ok(2 * shape.n_layers() * shape.n_kv_heads() * dtype.row_bytes(shape.head_dim())?)
}

/// Bytes a cache of `tokens` tokens occupies.
///
/// ```
/// use kv_core::{memory, KvDType, ModelShape};
/// let llama2 = ModelShape::preset("llama-2-7b")?;
/// assert_eq!(memory::cache_bytes(&llama2, KvDType::F16, 4096)?, 2 << 30); // 2 GiB
/// # Ok::<(), kv_core::KvError>(())
/// ```
///
/// # Errors
/// When the layout does not fit the head dimension (see [`KvDType::row_bytes`]).
pub fn cache_bytes(shape: &ModelShape, dtype: KvDType, tokens: usize) -> Result<u64> {
    Ok(bytes_per_token(shape, dtype)? as u64 * tokens as u64)
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
    fn formatting() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(180 << 20), "180 MiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(1100), "1.07 KiB");
        assert_eq!(format_bytes(23_040), "22.5 KiB");
    }
}
