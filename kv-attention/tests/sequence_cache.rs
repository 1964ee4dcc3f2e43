//! `SequenceCache` against the reference, on the plain backend of
//! `examples/custom_backend.rs`, in candle-transformers' `[batch, heads, seq, dim]` layout.

#[path = "../examples/custom_backend.rs"]
mod custom_backend;

use custom_backend::VecBackend;
use kv_attention::{reference, SequenceCache};
use kv_core::candle::{Device, Tensor};
use kv_core::{KvDType, KvError, ModelShape, Result, StorageSpec};

const Q_HEADS: usize = 4;
const KV_HEADS: usize = 2;
const D: usize = 8;

fn cache(blocks: usize) -> Result<SequenceCache<VecBackend>> {
    let shape = ModelShape::new(2, Q_HEADS, KV_HEADS, D)?;
    SequenceCache::new(
        VecBackend::new(),
        StorageSpec::new(shape, KvDType::F32, 4, blocks)?,
    )
}

fn randn(heads: usize, n: usize) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, (1, heads, n, D), &Device::Cpu)?)
}

/// `[1, heads, n, d]` to the reference's `[n, heads, d]`.
fn rows(t: &Tensor) -> Result<Tensor> {
    Ok(t.squeeze(0)?.transpose(0, 1)?.contiguous()?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn prefill_then_decode_matches_the_reference_per_layer() -> Result<()> {
    let mut cache = cache(8)?;
    let mut history: Vec<(Vec<Tensor>, Vec<Tensor>)> = vec![(vec![], vec![]); 2];
    // A 6-token prompt, then three decode steps; the layers get different data.
    for n in [6, 1, 1, 1] {
        for (layer, (ks, vs)) in history.iter_mut().enumerate() {
            let (q, k, v) = (randn(Q_HEADS, n)?, randn(KV_HEADS, n)?, randn(KV_HEADS, n)?);
            cache.append(layer, &k, &v)?;
            ks.push(k);
            vs.push(v);
            let got = cache.attend(layer, &q)?;
            assert_eq!(got.dims(), &[1, Q_HEADS, n, D]);
            let (k_all, v_all) = (Tensor::cat(ks, 2)?, Tensor::cat(vs, 2)?);
            let want = reference::attend_tensors(
                &rows(&q)?,
                &rows(&k_all)?,
                &rows(&v_all)?,
                1.0 / (D as f32).sqrt(),
            )?;
            let diff = max_diff(&rows(&got)?, &want)?;
            assert!(diff < 1e-5, "layer {layer} after {n} tokens: {diff}");
        }
    }
    assert_eq!(cache.len(), 9);
    cache.reset()?;
    assert!(cache.is_empty());
    Ok(())
}

#[test]
fn bad_calls_are_typed_errors_and_change_nothing() -> Result<()> {
    let mut cache = cache(2)?; // 8 tokens
    cache.append(0, &randn(KV_HEADS, 3)?, &randn(KV_HEADS, 3)?)?;
    let batched = Tensor::randn(0f32, 1.0, (2, KV_HEADS, 1, D), &Device::Cpu)?;
    assert!(matches!(
        cache.append(0, &batched, &batched),
        Err(KvError::ShapeMismatch { what: "k", .. })
    ));
    assert!(matches!(
        cache.append(2, &randn(KV_HEADS, 1)?, &randn(KV_HEADS, 1)?),
        Err(KvError::OutOfRange { what: "layer", .. })
    ));
    assert!(matches!(
        cache.append(0, &randn(KV_HEADS, 6)?, &randn(KV_HEADS, 6)?),
        Err(KvError::CacheFull { .. })
    ));
    let nan = (randn(KV_HEADS, 5)? * f64::NAN)?; // reserves 2 tokens, then fails
    assert!(matches!(
        cache.append(1, &nan, &nan),
        Err(KvError::NonFinite { .. })
    ));
    // Layer 1 gave back what it reserved: the sequence still holds layer 0's 3 tokens.
    assert_eq!(cache.paged().usage().tokens, 3);
    assert_eq!((cache.layer_len(0), cache.layer_len(1)), (Some(3), Some(0)));
    assert!(matches!(
        cache.attend(0, &randn(Q_HEADS, 4)?),
        Err(KvError::InvalidArgument { .. })
    ));
    assert!(matches!(
        cache.attend(0, &randn(KV_HEADS, 1)?),
        Err(KvError::ShapeMismatch { what: "q", .. })
    ));
    Ok(())
}
