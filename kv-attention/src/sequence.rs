//! One sequence, every layer: the shape of candle-nn's `KvCache` over a paged backend.

use candle_core::Tensor;
use kv_core::{
    AttentionBatch, CacheBackend, KvError, Result, SeqAttention, SeqId, Slot, StorageSpec,
};

use crate::PagedCache;

/// The KV cache of one sequence, for code written against candle-nn's `KvCache`: per layer,
/// append the step's K/V, then attend. Tensors use candle-transformers' attention layout,
/// `[batch = 1, heads, seq, head_dim]`.
///
/// Where candle-nn's `KvCache::append` hands back the whole K/V for the caller to attend
/// over, here the backend attends ([`SequenceCache::attend`]), so the cache can be paged
/// and quantized and K/V are never concatenated. Layers advance on their own: each has its
/// length, and the first layer to reach a position reserves its slot for all of them.
/// Under it is a [`PagedCache`] holding one sequence; [`SequenceCache::paged`] reaches it.
///
/// ```
/// use kv_attention::SequenceCache;
/// use kv_core::candle::{Device, Tensor};
/// use kv_core::{CacheBackend, KvDType, ModelShape, StorageSpec};
///
/// fn step<B: CacheBackend>(backend: B) -> Result<(), Box<dyn std::error::Error>> {
///     // 2 layers, 4 query heads over 2 KV heads of dim 8, room for 64 tokens.
///     let shape = ModelShape::builder().layers(2).q_heads(4).kv_heads(2).head_dim(8).build()?;
///     let spec = StorageSpec::builder(shape, KvDType::F16).num_blocks(4).build()?;
///     let mut cache = SequenceCache::new(backend, spec)?;
///     let dev = Device::Cpu;
///     for layer in 0..2 {
///         // A 5-token prompt: q [1, 4, 5, 8], k and v [1, 2, 5, 8].
///         let q = Tensor::randn(0f32, 1.0, (1, 4, 5, 8), &dev)?;
///         let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
///         let v = Tensor::randn(0f32, 1.0, (1, 2, 5, 8), &dev)?;
///         cache.append(layer, &k, &v)?;
///         let out = cache.attend(layer, &q)?; // causal, scale 1/sqrt(8)
///         assert_eq!(out.dims(), &[1, 4, 5, 8]);
///     }
///     assert_eq!(cache.len(), 5);
///     Ok(())
/// }
/// ```
pub struct SequenceCache<B: CacheBackend> {
    cache: PagedCache<B>,
    seq: SeqId,
    /// Tokens written to each layer; none exceeds the sequence's reserved length.
    layer_lens: Vec<usize>,
}

impl<B: CacheBackend> SequenceCache<B> {
    /// Allocates `spec` on `backend` for one sequence of up to
    /// [`StorageSpec::capacity_tokens`] tokens.
    ///
    /// # Errors
    /// What [`CacheBackend::allocate`] returns.
    pub fn new(backend: B, spec: StorageSpec) -> Result<Self> {
        let mut cache = PagedCache::new(backend, spec)?;
        let seq = cache.create_sequence();
        Ok(Self {
            cache,
            seq,
            layer_lens: vec![0; spec.shape.n_layers()],
        })
    }

    /// Tokens every layer holds (the shortest layer's length).
    pub fn len(&self) -> usize {
        self.layer_lens.iter().copied().min().unwrap_or(0)
    }

    /// True when no layer holds a token.
    pub fn is_empty(&self) -> bool {
        self.layer_lens.iter().all(|&n| n == 0)
    }

    /// Tokens `layer` holds, or `None` past the last layer.
    pub fn layer_len(&self, layer: usize) -> Option<usize> {
        self.layer_lens.get(layer).copied()
    }

    /// The paged cache underneath (its backend, storage and bookkeeping).
    pub fn paged(&self) -> &PagedCache<B> {
        &self.cache
    }

    /// Appends K and V (`[1, kv_heads, n, head_dim]`, any float dtype) to `layer`: its
    /// tokens `len..len + n`.
    ///
    /// # Errors
    /// [`KvError::OutOfRange`] for a layer past the end; [`KvError::ShapeMismatch`] for
    /// tensors not `[1, kv_heads, n, head_dim]` alike; [`KvError::CacheFull`] past the
    /// capacity; what [`CacheBackend::write`] returns. Nothing changes on error.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        let start = self.layer_len(layer).ok_or(KvError::OutOfRange {
            what: "layer",
            index: layer,
            len: self.layer_lens.len(),
        })?;
        let shape = self.cache.spec().shape;
        let (k, n) = to_rows("k", k, shape.n_kv_heads(), shape.head_dim())?;
        let (v, n_v) = to_rows("v", v, shape.n_kv_heads(), shape.head_dim())?;
        if n_v != n {
            return Err(KvError::ShapeMismatch {
                what: "v",
                expected: format!("{n} tokens, like k"),
                got: format!("{n_v} tokens"),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let end = start.checked_add(n).ok_or(KvError::InvalidArgument {
            what: "append",
            detail: format!("{start} + {n} tokens overflow"),
        })?;
        let reserved = self.cache.len(self.seq)?;
        if end > reserved {
            self.cache.reserve(self.seq, end - reserved)?;
        }
        let written = self.slots(start, end).and_then(|slots| {
            self.cache.write(layer, &slots, &k, &v)?;
            Ok(())
        });
        match written {
            Ok(()) => {
                self.layer_lens[layer] = end;
                Ok(())
            }
            Err(e) => {
                // Give back what this call reserved; the other layers never reached it.
                if end > reserved {
                    self.cache.truncate(self.seq, reserved)?;
                }
                Err(e)
            }
        }
    }

    /// Causal attention of `q` (`[1, q_heads, n, head_dim]`, the last `n` tokens of
    /// `layer`) over `layer`'s tokens, with scale `1 / sqrt(head_dim)`; returns f32
    /// `[1, q_heads, n, head_dim]`.
    ///
    /// # Errors
    /// [`KvError::OutOfRange`] for a layer past the end; [`KvError::ShapeMismatch`] for `q`
    /// not `[1, q_heads, n, head_dim]`; [`KvError::InvalidArgument`] for more queries than
    /// the layer holds tokens (or none); what [`CacheBackend::attend`] returns.
    pub fn attend(&self, layer: usize, q: &Tensor) -> Result<Tensor> {
        let kv_len = self.layer_len(layer).ok_or(KvError::OutOfRange {
            what: "layer",
            index: layer,
            len: self.layer_lens.len(),
        })?;
        let shape = self.cache.spec().shape;
        let (q, n) = to_rows("q", q, shape.n_q_heads(), shape.head_dim())?;
        let blocks = self.cache.manager().table(self.seq)?.blocks().to_vec();
        let seq = SeqAttention::new(blocks, kv_len, n)?;
        let batch = AttentionBatch::new(vec![seq], shape.head_dim());
        let out = self.cache.attend(layer, &q, &batch)?;
        Ok(out.transpose(0, 1)?.unsqueeze(0)?.contiguous()?)
    }

    /// Forgets every token of every layer, keeping the storage (candle-nn's `reset`).
    ///
    /// # Errors
    /// The bookkeeping's errors, which a consistent cache does not produce.
    pub fn reset(&mut self) -> Result<()> {
        self.cache.truncate(self.seq, 0)?;
        self.layer_lens.fill(0);
        Ok(())
    }

    fn slots(&self, start: usize, end: usize) -> Result<Vec<Slot>> {
        let table = self.cache.manager().table(self.seq)?;
        let bs = self.cache.spec().block_size;
        (start..end)
            .map(|i| {
                table.slot(i, bs).ok_or(KvError::OutOfRange {
                    what: "token",
                    index: i,
                    len: table.len(),
                })
            })
            .collect()
    }
}

impl<B: CacheBackend> std::fmt::Debug for SequenceCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceCache")
            .field("backend", &self.cache.backend().name())
            .field("layer_lens", &self.layer_lens)
            .finish()
    }
}

/// `[1, heads, n, head_dim]` viewed as the backend's `[n, heads, head_dim]` (no copy), with
/// `n`.
fn to_rows(
    what: &'static str,
    t: &Tensor,
    heads: usize,
    head_dim: usize,
) -> Result<(Tensor, usize)> {
    match *t.dims() {
        [1, h, n, d] if h == heads && d == head_dim => Ok((t.squeeze(0)?.transpose(0, 1)?, n)),
        _ => Err(KvError::ShapeMismatch {
            what,
            expected: format!("[1, {heads}, tokens, {head_dim}] (batch, heads, seq, head_dim)"),
            got: format!("{:?}", t.dims()),
        }),
    }
}
