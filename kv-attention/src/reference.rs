//! Plain attention with f64 accumulation: the oracle every backend is compared with.
//!
//! No paging, no online softmax, no threads: for each query and head, every visible score
//! is computed in f64, the softmax is taken over them with the maximum subtracted, and the
//! weighted sum of V is accumulated in f64. Slow and obviously right, which is its job.
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
use kv_core::{KvError, ModelShape, Result};

/// The head geometry of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub q_heads: usize,
    /// KV heads; divides `q_heads`.
    pub kv_heads: usize,
    /// Elements per head vector.
    pub head_dim: usize,
}

impl Heads {
    /// Checks and builds a head geometry.
    ///
    /// # Errors
    /// [`KvError::InvalidShape`] for zero sizes or `q_heads` not a multiple of `kv_heads`.
    pub fn new(q_heads: usize, kv_heads: usize, head_dim: usize) -> Result<Self> {
        let shape = ModelShape::new(1, q_heads, kv_heads, head_dim)?;
        Ok(Self::of(&shape))
    }

    /// The heads of a model shape.
    pub fn of(shape: &ModelShape) -> Self {
        Self {
            q_heads: shape.n_q_heads(),
            kv_heads: shape.n_kv_heads(),
            head_dim: shape.head_dim(),
        }
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// Rows of `len` elements, each `heads * head_dim` long, or a shape error.
    fn rows(&self, what: &'static str, len: usize, heads: usize) -> Result<usize> {
        let row = heads * self.head_dim;
        if row == 0 || !len.is_multiple_of(row) {
            return Err(KvError::ShapeMismatch {
                what,
                expected: format!("a multiple of {heads} heads x {} dims", self.head_dim),
                got: format!("{len} elements"),
            });
        }
        Ok(len / row)
    }
}

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

/// Causal attention of one sequence; returns `[n_queries, q_heads, head_dim]`.
///
/// `n_queries` and `kv_len` are read from the slice lengths; the queries are the last
/// `n_queries` positions of the context. Zero queries give an empty output.
///
/// # Errors
/// [`KvError::ShapeMismatch`] when a slice is not a whole number of rows or `k` and `v`
/// differ in length; [`KvError::InvalidArgument`] when there are more queries than cached
/// tokens; [`KvError::NonFinite`] for a non-finite scale.
pub fn attend(heads: Heads, q: &[f32], k: &[f32], v: &[f32], scale: f32) -> Result<Vec<f32>> {
    if heads.q_heads == 0 || heads.kv_heads == 0 || !heads.q_heads.is_multiple_of(heads.kv_heads) {
        return Err(KvError::InvalidShape {
            detail: format!(
                "{} query heads cannot share {} KV heads",
                heads.q_heads, heads.kv_heads
            ),
        });
    }
    if !scale.is_finite() {
        return Err(KvError::NonFinite {
            what: "attention scale",
        });
    }
    let n_q = heads.rows("q", q.len(), heads.q_heads)?;
    let kv_len = heads.rows("k", k.len(), heads.kv_heads)?;
    if v.len() != k.len() {
        return Err(KvError::ShapeMismatch {
            what: "v",
            expected: format!("{} elements, like k", k.len()),
            got: format!("{} elements", v.len()),
        });
    }
    if n_q > kv_len {
        return Err(KvError::InvalidArgument {
            what: "queries",
            detail: format!("{n_q} queries over {kv_len} cached tokens"),
        });
    }
    let d = heads.head_dim;
    let group = heads.group_size();
    let scale = scale as f64;
    let mut out = vec![0.0f32; q.len()];
    let mut scores = vec![0.0f64; kv_len];
    let mut acc = vec![0.0f64; d];
    for i in 0..n_q {
        let visible = kv_len - n_q + i + 1;
        for h in 0..heads.q_heads {
            let kvh = h / group;
            let qv = &q[(i * heads.q_heads + h) * d..][..d];
            for (t, s) in scores[..visible].iter_mut().enumerate() {
                let kv = &k[(t * heads.kv_heads + kvh) * d..][..d];
                let dot: f64 = qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum();
                *s = dot * scale;
            }
            let max = scores[..visible]
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            acc.fill(0.0);
            let mut sum = 0.0f64;
            for (t, &s) in scores[..visible].iter().enumerate() {
                let w = (s - max).exp();
                sum += w;
                let vv = &v[(t * heads.kv_heads + kvh) * d..][..d];
                for (a, &x) in acc.iter_mut().zip(vv) {
                    *a += w * x as f64;
                }
            }
            for (o, a) in out[(i * heads.q_heads + h) * d..][..d].iter_mut().zip(&acc) {
                *o = (a / sum) as f32;
            }
        }
    }
    Ok(out)
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
    fn two_tokens_by_hand() {
        // Scores q.k = [1, 3] at scale 0.5 -> [0.5, 1.5]; weights e^0.5, e^1.5 normalised.
        let heads = Heads::new(1, 1, 2).expect("shape");
        let q = [1.0, 1.0];
        let k = [1.0, 0.0, 1.0, 2.0];
        let v = [10.0, 0.0, 0.0, 10.0];
        let w1 = 1.0 / (1.0 + 1.0f64.exp()); // e^0.5 / (e^0.5 + e^1.5)
        let out = attend(heads, &q, &k, &v, 0.5).expect("attends");
        let want = [(10.0 * w1) as f32, (10.0 * (1.0 - w1)) as f32];
        assert!(close(&out, &want, 1e-6), "{out:?} vs {want:?}");
    }

    #[test]
    fn equal_scores_give_the_mean_of_the_visible_values() {
        // Identical keys: every visible token weighs the same, whatever the query.
        let heads = Heads::new(2, 1, 3).expect("shape");
        let kv_len = 5;
        let k = vec![0.7f32; kv_len * 3];
        let v: Vec<f32> = (0..kv_len * 3).map(|i| i as f32).collect();
        let q = vec![1.3f32; 5 * 2 * 3]; // prefill: every position is a query
        let out = attend(heads, &q, &k, &v, 1.0).expect("attends");
        for i in 0..kv_len {
            // Query i sees tokens 0..=i: element j of the mean is 3 * i / 2 + j.
            for h in 0..2 {
                let row = &out[(i * 2 + h) * 3..][..3];
                let want: Vec<f32> = (0..3).map(|j| 1.5 * i as f32 + j as f32).collect();
                assert!(close(row, &want, 1e-5), "query {i} head {h}: {row:?}");
            }
        }
    }

    #[test]
    fn causal_mask_hides_later_tokens() {
        // Token 2 has a huge score, but query 0 of a 2-query call sits at position 1.
        let heads = Heads::new(1, 1, 1).expect("shape");
        let k = [0.0, 0.0, 100.0];
        let v = [1.0, 3.0, 1000.0];
        let out = attend(heads, &[1.0, 1.0], &k, &v, 1.0).expect("attends");
        assert!(close(&out[..1], &[2.0], 1e-6), "{out:?}");
        assert!(close(&out[1..], &[1000.0], 1e-3), "{out:?}");
    }

    #[test]
    fn gqa_heads_read_their_group_and_mqa_shares_one() {
        // Two KV heads with constant values 1 and 2; four query heads -> groups [0,0,1,1].
        let heads = Heads::new(4, 2, 1).expect("shape");
        let k = [0.5, -0.5, 0.1, 0.2];
        let v = [1.0, 2.0, 1.0, 2.0];
        let out = attend(heads, &[1.0; 4], &k, &v, 1.0).expect("attends");
        assert!(close(&out, &[1.0, 1.0, 2.0, 2.0], 1e-6), "{out:?}");
        let mqa = Heads::new(3, 1, 1).expect("shape");
        let out = attend(mqa, &[1.0, -1.0, 0.0], &[0.0, 5.0], &[4.0, 8.0], 1.0).expect("mqa");
        assert!(
            out[0] > 7.9 && out[1] < 4.1 && (out[2] - 6.0).abs() < 1e-6,
            "{out:?}"
        );
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
    fn bad_shapes_are_typed_errors() {
        let heads = Heads::new(2, 1, 2).expect("shape");
        assert!(matches!(
            attend(heads, &[0.0; 3], &[0.0; 2], &[0.0; 2], 1.0),
            Err(KvError::ShapeMismatch { what: "q", .. })
        ));
        assert!(matches!(
            attend(heads, &[0.0; 4], &[0.0; 2], &[0.0; 4], 1.0),
            Err(KvError::ShapeMismatch { what: "v", .. })
        ));
        assert!(matches!(
            attend(heads, &[0.0; 8], &[0.0; 2], &[0.0; 2], 1.0),
            Err(KvError::InvalidArgument { .. })
        ));
        assert!(attend(heads, &[0.0; 4], &[0.0; 2], &[0.0; 2], f32::NAN).is_err());
        assert!(Heads::new(3, 2, 4).is_err());
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
