//! Plain attention with f64 accumulation: the oracle every backend is compared with.
//!
//! No paging, no online softmax, no threads: for each query and head, every visible score
//! is computed in f64, the softmax is taken over them with the maximum subtracted, and the
//! weighted sum of V is accumulated in f64. Slow and obviously right, which is its job.
//! The one-sequence kernel [`attend`] is [`kv_core::reference::attend`], re-exported (the
//! provided [`kv_core::CacheBackend::attend`] runs it too); this module adds the batch and
//! tensor forms the conformance suite and model tests use.
//!
//! Layouts are row-major and match the backends': a sequence's queries are
//! `[n_queries, q_heads, head_dim]`, its keys and values `[kv_len, kv_heads, head_dim]`.
//! Query head `h` reads KV head `h / (q_heads / kv_heads)` (MHA, GQA and MQA alike), and
//! query `i` sits at position `kv_len - n_queries + i`, seeing keys `0..=` that position.
//!
//! ```
//! use kv_attention::reference::{self, Heads};
//! // One head of dim 2, two cached tokens, one query (decode) at position 1.
//! let heads = Heads::new(1, 1, 2)?;
//! let q = [1.0, 0.0];
//! let k = [0.0, 0.0, /* token 1 */ 2.0f32.ln(), 0.0];
//! let v = [1.0, 0.0, /* token 1 */ 0.0, 3.0];
//! // Scores 0 and ln 2, so weights 1/3 and 2/3.
//! let out = reference::attend(heads, &q, &k, &v, 1.0)?;
//! assert!((out[0] - 1.0 / 3.0).abs() < 1e-6 && (out[1] - 2.0).abs() < 1e-6);
//! # Ok::<(), kv_core::KvError>(())
//! ```

use candle_core::{DType, Tensor};
use kv_core::{KvError, Result};

/// The kernel lives in kv-core, where the provided [`kv_core::CacheBackend::attend`] uses
/// it; this crate builds its batch and tensor forms on it.
pub use kv_core::reference::{attend, attend_by_reading, Heads};

/// One sequence's queries, keys and values for [`attend_batch`].
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// `[n_queries, q_heads, head_dim]`.
    pub q: &'a [f32],
    /// `[kv_len, kv_heads, head_dim]`, the whole context including the queries' own tokens.
    pub k: &'a [f32],
    /// `[kv_len, kv_heads, head_dim]`.
    pub v: &'a [f32],
}

/// Causal attention of many sequences; their outputs concatenated in order, as a backend
/// returns them for an [`kv_core::AttentionBatch`].
///
/// # Errors
/// What [`attend`] returns for the first sequence that fails.
pub fn attend_batch(heads: Heads, seqs: &[SeqInput<'_>], scale: f32) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for s in seqs {
        out.extend(attend(heads, s.q, s.k, s.v, scale)?);
    }
    Ok(out)
}

/// [`attend`] on candle tensors of one sequence: `q` is `[n_queries, q_heads, head_dim]`,
/// `k` and `v` are `[kv_len, kv_heads, head_dim]`, of any float dtype and device. Returns an
/// f32 tensor shaped like `q` on `q`'s device.
///
/// For checking a model's attention against the cache without going through a backend.
///
/// # Errors
/// [`KvError::ShapeMismatch`] for tensors that are not 3-D with matching head dims or that
/// disagree in length; otherwise what [`attend`] returns.
pub fn attend_tensors(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    let dims3 = |what: &'static str, t: &Tensor| -> Result<(usize, usize, usize)> {
        t.dims3().map_err(|_| KvError::ShapeMismatch {
            what,
            expected: "[tokens, heads, head_dim]".into(),
            got: format!("{:?}", t.dims()),
        })
    };
    let (_, q_heads, d) = dims3("q", q)?;
    let (_, kv_heads, kd) = dims3("k", k)?;
    if kd != d || k.dims() != v.dims() {
        return Err(KvError::ShapeMismatch {
            what: "k and v",
            expected: format!("[kv_len, {kv_heads}, {d}] for both"),
            got: format!("k {:?}, v {:?}", k.dims(), v.dims()),
        });
    }
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let heads = Heads {
        q_heads,
        kv_heads,
        head_dim: d,
    };
    let out = attend(heads, &flat(q)?, &flat(k)?, &flat(v)?, scale)?;
    Ok(Tensor::from_vec(out, q.dims(), q.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn batch_concatenates_sequences() {
        let heads = Heads::new(1, 1, 1).expect("shape");
        let a = SeqInput {
            q: &[1.0],
            k: &[0.0, 0.0],
            v: &[2.0, 4.0],
        };
        let b = SeqInput {
            q: &[1.0, 1.0],
            k: &[0.0, 0.0],
            v: &[6.0, 8.0],
        };
        let out = attend_batch(heads, &[a, b], 1.0).expect("attends");
        assert!(close(&out, &[3.0, 6.0, 7.0], 1e-6), "{out:?}");
    }

    #[test]
    fn tensors_agree_with_slices() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (3, 4, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (5, 2, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (5, 2, 8), &dev)?;
        let got = attend_tensors(&q, &k.to_dtype(DType::F64)?, &v, 0.3)?;
        assert_eq!(got.dims(), &[3, 4, 8]);
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        let want = attend(
            Heads::new(4, 2, 8)?,
            &flat(&q)?,
            &flat(&k)?,
            &flat(&v)?,
            0.3,
        )?;
        assert!(close(&flat(&got)?, &want, 1e-6));
        assert!(attend_tensors(&q, &k, &v.narrow(0, 0, 4)?, 0.3).is_err());
        Ok(())
    }
}
