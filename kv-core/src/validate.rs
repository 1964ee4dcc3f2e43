//! The argument checks every [`CacheBackend`](crate::CacheBackend) owes its callers, written
//! once so that each backend refuses the same calls with the same [`KvError`] variants.
//!
//! The trait's contract (see [`CacheBackend`](crate::CacheBackend)) says which error each
//! bad call gets; `kv_attention::conformance` checks it. A backend calls [`write()`] at the top
//! of its `write`, [`attend`] at the top of its `attend`, [`slots`] and [`layer`] in `read`
//! and [`moves`] in `copy_blocks`, before it touches its storage, so a refused call changes
//! nothing. What depends on the stored values (a NaN in K or V, which some layouts detect
//! only while converting) stays the backend's job; [`finite`] is there for the plain case.
//!
//! ```
//! use kv_core::candle::{Device, Tensor};
//! use kv_core::{validate, BlockId, KvDType, KvError, ModelShape, Slot, StorageSpec};
//!
//! let spec = StorageSpec::new(ModelShape::new(2, 4, 2, 8)?, KvDType::F32, 4, 3)?;
//! let slot = |block, offset| Slot { block: BlockId::new(block), offset };
//! let slots = [slot(0, 1), slot(3, 0)];
//! let k = Tensor::zeros((2, 2, 8), kv_core::candle::DType::F32, &Device::Cpu)?;
//! // Block 3 does not exist in a pool of 3 blocks: refused before anything is written.
//! let err = validate::write(&spec, &Device::Cpu, 0, &slots, &k, &k).unwrap_err();
//! assert!(matches!(err, KvError::OutOfRange { what: "slot block", index: 3, len: 3 }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use candle_core::{Device, Tensor};

use crate::{AttentionBatch, BlockId, KvError, Result, Slot, StorageSpec};

/// Checks that `layer` is below the spec's layer count.
///
/// # Errors
/// [`KvError::OutOfRange`] (`what: "layer"`).
pub fn layer(spec: &StorageSpec, layer: usize) -> Result<()> {
    let n = spec.shape.n_layers();
    if layer >= n {
        return Err(KvError::OutOfRange {
            what: "layer",
            index: layer,
            len: n,
        });
    }
    Ok(())
}

/// Checks that every slot names an existing block and an offset inside it.
///
/// # Errors
/// [`KvError::OutOfRange`] for the first bad slot (`what: "slot block"` or `"slot offset"`).
pub fn slots(spec: &StorageSpec, slots: &[Slot]) -> Result<()> {
    for s in slots {
        if s.block.index() >= spec.num_blocks {
            return Err(KvError::OutOfRange {
                what: "slot block",
                index: s.block.index(),
                len: spec.num_blocks,
            });
        }
        if s.offset as usize >= spec.block_size {
            return Err(KvError::OutOfRange {
                what: "slot offset",
                index: s.offset as usize,
                len: spec.block_size,
            });
        }
    }
    Ok(())
}

/// Checks that both blocks of every `(from, to)` move exist.
///
/// # Errors
/// [`KvError::OutOfRange`] (`what: "block"`) for the first block past the end.
pub fn moves(spec: &StorageSpec, moves: &[(BlockId, BlockId)]) -> Result<()> {
    if let Some(&b) = moves
        .iter()
        .flat_map(|(a, b)| [a, b])
        .find(|&&b| b.index() >= spec.num_blocks)
    {
        return Err(KvError::OutOfRange {
            what: "block",
            index: b.index(),
            len: spec.num_blocks,
        });
    }
    Ok(())
}

/// Checks that every block of `blocks` exists (the argument of
/// [`crate::CacheBackend::settle_blocks`]).
///
/// # Errors
/// [`KvError::OutOfRange`] (`what: "block"`) for the first block past the end.
pub fn blocks(spec: &StorageSpec, blocks: &[BlockId]) -> Result<()> {
    if let Some(b) = blocks.iter().find(|b| b.index() >= spec.num_blocks) {
        return Err(KvError::OutOfRange {
            what: "block",
            index: b.index(),
            len: spec.num_blocks,
        });
    }
    Ok(())
}

/// Checks that `t` is a float tensor on `device` with exactly the dimensions `dims`.
///
/// # Errors
/// [`KvError::InvalidArgument`] for another device or an integer dtype,
/// [`KvError::ShapeMismatch`] for other dimensions.
pub fn tensor(what: &'static str, t: &Tensor, dims: &[usize], device: &Device) -> Result<()> {
    if !t.device().same_device(device) {
        return Err(KvError::InvalidArgument {
            what,
            detail: format!(
                "tensor is on {:?}; this backend takes tensors on {:?}",
                t.device().location(),
                device.location()
            ),
        });
    }
    if !t.dtype().is_float() {
        return Err(KvError::InvalidArgument {
            what,
            detail: format!("dtype {:?} is not a float type", t.dtype()),
        });
    }
    if t.dims() != dims {
        return Err(KvError::ShapeMismatch {
            what,
            expected: format!("{dims:?}"),
            got: format!("{:?}", t.dims()),
        });
    }
    Ok(())
}

/// Everything about a [`CacheBackend::write`](crate::CacheBackend::write) call that does not
/// depend on the values: the layer, every slot, and K and V both float
/// `[slots.len(), kv_heads, head_dim]` tensors on `device` (any float dtype, any strides).
///
/// # Errors
/// As [`layer`], [`slots`] and [`tensor`], in that order.
pub fn write(
    spec: &StorageSpec,
    device: &Device,
    layer_index: usize,
    slot_list: &[Slot],
    k: &Tensor,
    v: &Tensor,
) -> Result<()> {
    layer(spec, layer_index)?;
    slots(spec, slot_list)?;
    let dims = [
        slot_list.len(),
        spec.shape.n_kv_heads(),
        spec.shape.head_dim(),
    ];
    tensor("k", k, &dims, device)?;
    tensor("v", v, &dims, device)
}

/// Everything about a [`CacheBackend::attend`](crate::CacheBackend::attend) call that does
/// not depend on the values: the layer, the batch against the storage
/// ([`AttentionBatch::validate`]: finite scale, blocks that exist and cover each sequence)
/// and `q` a float `[batch.total_queries(), q_heads, head_dim]` tensor on `device`.
///
/// # Errors
/// As [`layer`], [`AttentionBatch::validate`] and [`tensor`], in that order.
pub fn attend(
    spec: &StorageSpec,
    device: &Device,
    layer_index: usize,
    q: &Tensor,
    batch: &AttentionBatch,
) -> Result<()> {
    layer(spec, layer_index)?;
    batch.validate(spec)?;
    let dims = [
        batch.total_queries(),
        spec.shape.n_q_heads(),
        spec.shape.head_dim(),
    ];
    tensor("q", q, &dims, device)
}

/// Checks that `data` holds no NaN or infinity, which a cache never stores or attends with.
///
/// # Errors
/// [`KvError::NonFinite`] naming `what`.
pub fn finite(what: &'static str, data: &[f32]) -> Result<()> {
    if data.iter().any(|x| !x.is_finite()) {
        return Err(KvError::NonFinite { what });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::{KvDType, ModelShape, SeqAttention};

    fn spec() -> Result<StorageSpec> {
        StorageSpec::new(ModelShape::new(2, 4, 2, 8)?, KvDType::F32, 4, 3)
    }

    #[test]
    fn each_bad_write_gets_its_variant() -> Result<()> {
        let spec = spec()?;
        let dev = Device::Cpu;
        let good = [Slot {
            block: BlockId::new(2),
            offset: 3,
        }];
        let kv = Tensor::zeros((1, 2, 8), DType::F32, &dev)?;
        write(&spec, &dev, 1, &good, &kv, &kv)?;
        let past_offset = [Slot {
            block: BlockId::new(0),
            offset: 4,
        }];
        assert!(matches!(
            write(&spec, &dev, 0, &past_offset, &kv, &kv),
            Err(KvError::OutOfRange {
                what: "slot offset",
                ..
            })
        ));
        assert!(matches!(
            write(&spec, &dev, 2, &good, &kv, &kv),
            Err(KvError::OutOfRange { what: "layer", .. })
        ));
        let wrong_heads = Tensor::zeros((1, 4, 8), DType::F32, &dev)?;
        assert!(matches!(
            write(&spec, &dev, 0, &good, &kv, &wrong_heads),
            Err(KvError::ShapeMismatch { what: "v", .. })
        ));
        let ints = Tensor::zeros((1, 2, 8), DType::U32, &dev)?;
        assert!(matches!(
            write(&spec, &dev, 0, &good, &ints, &kv),
            Err(KvError::InvalidArgument { what: "k", .. })
        ));
        // Half precision and a transposed view are accepted.
        let half = kv.to_dtype(DType::F16)?;
        let strided = Tensor::zeros((2, 1, 8), DType::F32, &dev)?.transpose(0, 1)?;
        write(&spec, &dev, 0, &good, &half, &strided)?;
        Ok(())
    }

    #[test]
    fn attend_checks_layer_batch_and_q() -> Result<()> {
        let spec = spec()?;
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 4, 8), DType::F32, &dev)?;
        let ok = AttentionBatch::new(
            vec![SeqAttention::new(
                vec![BlockId::new(2), BlockId::new(0)],
                5,
                2,
            )?],
            8,
        );
        attend(&spec, &dev, 1, &q, &ok)?;
        assert!(matches!(
            attend(&spec, &dev, 0, &q.narrow(0, 0, 1)?, &ok),
            Err(KvError::ShapeMismatch { what: "q", .. })
        ));
        let short = AttentionBatch::new(vec![SeqAttention::new(vec![BlockId::new(2)], 5, 2)?], 8);
        assert!(matches!(
            attend(&spec, &dev, 0, &q, &short),
            Err(KvError::InvalidArgument { .. })
        ));
        let missing = AttentionBatch::new(
            vec![SeqAttention::new(
                vec![BlockId::new(2), BlockId::new(3)],
                5,
                2,
            )?],
            8,
        );
        assert!(matches!(
            attend(&spec, &dev, 0, &q, &missing),
            Err(KvError::OutOfRange { index: 3, .. })
        ));
        let mut nan_scale = ok.clone();
        nan_scale.scale = f32::NAN;
        assert!(matches!(
            attend(&spec, &dev, 0, &q, &nan_scale),
            Err(KvError::NonFinite { .. })
        ));
        Ok(())
    }

    #[test]
    fn moves_and_values() -> Result<()> {
        let spec = spec()?;
        moves(
            &spec,
            &[
                (BlockId::new(0), BlockId::new(2)),
                (BlockId::new(2), BlockId::new(2)),
            ],
        )?;
        assert!(matches!(
            moves(
                &spec,
                &[
                    (BlockId::new(0), BlockId::new(1)),
                    (BlockId::new(1), BlockId::new(3))
                ]
            ),
            Err(KvError::OutOfRange { index: 3, .. })
        ));
        finite("k", &[0.0, -1.0, f32::MAX])?;
        assert!(matches!(
            finite("k", &[0.0, f32::NEG_INFINITY]),
            Err(KvError::NonFinite { what: "k" })
        ));
        Ok(())
    }
}
