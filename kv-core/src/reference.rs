//! Plain attention with f64 accumulation: the one oracle every backend is compared with,
//! and the provided [`CacheBackend::attend`] of backends that only store.
//!
//! No paging, no online softmax, no threads: for each query and head, every visible score
//! is computed in f64, the softmax is taken over them with the maximum subtracted, and the
//! weighted sum of V is accumulated in f64. Slow and obviously right, which is its job.
//! `kv_attention::reference` builds its batch and tensor forms on [`attend`].
//!
//! Layouts are row-major and match the backends': a sequence's queries are
//! `[n_queries, q_heads, head_dim]`, its keys and values `[kv_len, kv_heads, head_dim]`.
//! Query head `h` reads KV head `h / (q_heads / kv_heads)` (MHA, GQA and MQA alike), and
//! query `i` sits at position `kv_len - n_queries + i`, seeing keys `0..=` that position.
//!
//! ```
//! use kv_core::reference::{self, Heads};
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
use std::num::NonZeroUsize;

use crate::{validate, AttentionBatch, CacheBackend, KvError, ModelShape, Result, Slot};

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
    attend_windowed(heads, q, k, v, scale, None)
}

/// [`attend`] through a sliding window: with `Some(W)` the query at position `p` sees only
/// the keys at `p - W + 1 ..= p` (see [`crate::AttentionBatch::window`]); `None` is
/// [`attend`].
///
/// ```
/// use std::num::NonZeroUsize;
/// use kv_core::reference::{attend_windowed, Heads};
/// // One head of one element: keys 0, 0, 0 with values 1, 2, 3; a window of 2 makes the
/// // last query (position 2) the mean of values 2 and 3.
/// let out = attend_windowed(Heads::new(1, 1, 1)?, &[1.0], &[0.0; 3], &[1.0, 2.0, 3.0], 1.0,
///                           NonZeroUsize::new(2))?;
/// assert!((out[0] - 2.5).abs() < 1e-6);
/// # Ok::<(), kv_core::KvError>(())
/// ```
///
/// # Errors
/// As [`attend`].
pub fn attend_windowed(
    heads: Heads,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    window: Option<NonZeroUsize>,
) -> Result<Vec<f32>> {
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
        // The first key the window lets this query see (0 without a window).
        let lo = window.map_or(0, |w| visible.saturating_sub(w.get()));
        for h in 0..heads.q_heads {
            let kvh = h / group;
            let qv = &q[(i * heads.q_heads + h) * d..][..d];
            for (t, s) in scores[..visible].iter_mut().enumerate().skip(lo) {
                let kv = &k[(t * heads.kv_heads + kvh) * d..][..d];
                let dot: f64 = qv.iter().zip(kv).map(|(&a, &b)| a as f64 * b as f64).sum();
                *s = dot * scale;
            }
            let max = scores[lo..visible]
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            acc.fill(0.0);
            let mut sum = 0.0f64;
            for (t, &s) in scores[..visible].iter().enumerate().skip(lo) {
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

/// Attention over a backend's storage computed from what [`CacheBackend::read`] returns:
/// the provided [`CacheBackend::attend`], public so a backend with fast kernels for some
/// layouts can fall back to it for the others.
///
/// It checks the call with [`validate::attend`], refuses a non-finite `q`, reads each
/// sequence's context back (one `read` per sequence) and runs [`attend`] on it. Its result
/// is exact for every layout whose attention reads the rows `read` returns: the float
/// layouts and the per-row quantized ones. A layout whose attention sees something else
/// (KIVI's keys, read in f16 inside the 32-token block being filled) needs its own kernel.
///
/// # Errors
/// What [`validate::attend`] and [`CacheBackend::read`] return; [`KvError::NonFinite`] for
/// NaN or infinity in `q`.
pub fn attend_by_reading<B: CacheBackend + ?Sized>(
    backend: &B,
    storage: &B::Storage,
    layer: usize,
    q: &Tensor,
    batch: &AttentionBatch,
) -> Result<Tensor> {
    let spec = *backend.spec(storage);
    validate::attend(&spec, backend.device(), layer, q, batch)?;
    let heads = Heads::of(&spec.shape);
    let q_data = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    validate::finite("q", &q_data)?;
    let row_q = heads.q_heads * heads.head_dim;
    let mut out = Vec::with_capacity(q_data.len());
    let mut first = 0;
    for seq in &batch.seqs {
        let slots: Vec<Slot> = (0..seq.kv_len())
            .map(|i| seq.slot(i, spec.block_size))
            .collect::<Option<_>>()
            .ok_or_else(|| KvError::InvalidArgument {
                what: "attention batch",
                detail: "a sequence's blocks do not cover its length".into(),
            })?;
        let (k, v) = backend.read(storage, layer, &slots)?;
        let flat = |t: Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let rows = first..first + seq.n_queries() * row_q;
        let queries = q_data.get(rows).ok_or_else(|| KvError::ShapeMismatch {
            what: "q",
            expected: format!("{} query rows", batch.total_queries()),
            got: format!("{} elements", q_data.len()),
        })?;
        out.extend(attend_windowed(
            heads,
            queries,
            &flat(k)?,
            &flat(v)?,
            batch.scale,
            batch.window,
        )?);
        first += seq.n_queries() * row_q;
    }
    Ok(Tensor::from_vec(out, q.dims(), backend.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn window_hides_keys_older_than_w() {
        // Equal keys: each query's output is the mean of the values it sees. Position p
        // with window 3 sees p-2..=p.
        let heads = Heads::new(1, 1, 1).expect("shape");
        let v: Vec<f32> = (0..6).map(|i| (i * i) as f32).collect();
        let w = NonZeroUsize::new(3);
        let out = attend_windowed(heads, &[1.0; 6], &[0.5; 6], &v, 1.0, w).expect("attends");
        for (p, o) in out.iter().enumerate() {
            let seen = &v[p.saturating_sub(2)..=p];
            let mean = seen.iter().sum::<f32>() / seen.len() as f32;
            assert!((o - mean).abs() < 1e-5, "position {p}: {o} vs {mean}");
        }
        // A window at least as long as the context changes nothing.
        let all = attend(heads, &[1.0; 6], &[0.5; 6], &v, 1.0).expect("attends");
        let wide = attend_windowed(heads, &[1.0; 6], &[0.5; 6], &v, 1.0, NonZeroUsize::new(6))
            .expect("attends");
        assert_eq!(all, wide);
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
}
