//! The trait a device implements to store K/V and attend over it.

use candle_core::{Device, Tensor};

use crate::{memory, BlockId, KvDType, KvError, ModelShape, Result, Slot};

/// What a backend allocates: block pools for every layer, in one layout.
///
/// ```
/// use kv_core::{KvDType, ModelShape, StorageSpec};
/// let spec = StorageSpec::new(ModelShape::preset("smollm2-135m")?, KvDType::F16, 16, 512)?;
/// assert_eq!(spec.capacity_tokens(), 8192);
/// assert_eq!(spec.bytes()?, 180 << 20);
/// # Ok::<(), kv_core::KvError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSpec {
    /// Layers and heads.
    pub shape: ModelShape,
    /// Row layout.
    pub dtype: KvDType,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks per layer pool.
    pub num_blocks: usize,
}

impl StorageSpec {
    /// Checks and builds a spec.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for a zero block size or count, a layout that does not
    /// fit the head dimension, or a block size that is not a multiple of the layout's
    /// [`KvDType::block_tokens`] (32 for KIVI); [`KvError::Overflow`] when the capacity in
    /// tokens or in bytes does not fit its integer type.
    pub fn new(
        shape: ModelShape,
        dtype: KvDType,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(KvError::InvalidArgument {
                what: "storage spec",
                detail: format!(
                    "block size {block_size} and block count {num_blocks} must be at least 1"
                ),
            });
        }
        dtype.row_bytes(shape.head_dim())?;
        if !block_size.is_multiple_of(dtype.block_tokens()) {
            return Err(KvError::InvalidArgument {
                what: "block size",
                detail: format!(
                    "the {dtype} layout quantizes keys over {} tokens, so blocks must hold a \
                     multiple of {} tokens, not {block_size}",
                    dtype.block_tokens(),
                    dtype.block_tokens()
                ),
            });
        }
        let spec = Self {
            shape,
            dtype,
            block_size,
            num_blocks,
        };
        // Both sizes are checked here, so that `capacity_tokens` of a spec built by `new`
        // is exact and `bytes` fails only for a hand-built spec.
        spec.bytes()?;
        Ok(spec)
    }

    /// Tokens the storage holds.
    ///
    /// Exact for every spec built by [`StorageSpec::new`], which refuses capacities that
    /// overflow `usize`. A spec built field by field is not checked: for one whose product
    /// overflows this answers `usize::MAX`, a capacity no allocation reaches, and
    /// [`StorageSpec::bytes`] reports the overflow.
    pub fn capacity_tokens(&self) -> usize {
        self.checked_capacity().unwrap_or(usize::MAX)
    }

    /// `block_size x num_blocks`, or the overflow error.
    fn checked_capacity(&self) -> Result<usize> {
        self.block_size
            .checked_mul(self.num_blocks)
            .ok_or_else(|| KvError::Overflow {
                what: "storage capacity",
                detail: format!(
                    "{} blocks of {} tokens is more than usize::MAX tokens",
                    self.num_blocks, self.block_size
                ),
            })
    }

    /// Bytes the storage holds, exactly [`memory::cache_bytes`] of its capacity.
    ///
    /// # Errors
    /// When the layout does not fit the head dimension; [`KvError::Overflow`] when the
    /// capacity in tokens or bytes does not fit its integer type.
    pub fn bytes(&self) -> Result<u64> {
        memory::cache_bytes(&self.shape, self.dtype, self.checked_capacity()?)
    }
}

/// One sequence's part of an attention call: its blocks, its length, and how many of its
/// last tokens are queries (1 for decode, the new tokens for prefill).
///
/// Query `i` sits at position `kv_len - n_queries + i` and sees keys `0..=` its position
/// (causal by position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqAttention {
    blocks: Vec<BlockId>,
    kv_len: usize,
    n_queries: usize,
}

impl SeqAttention {
    /// Checks and builds one sequence's attention description.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when `n_queries` is zero or exceeds `kv_len`.
    pub fn new(blocks: Vec<BlockId>, kv_len: usize, n_queries: usize) -> Result<Self> {
        if n_queries == 0 || n_queries > kv_len {
            return Err(KvError::InvalidArgument {
                what: "queries",
                detail: format!(
                    "{n_queries} queries over {kv_len} cached tokens; need 1..={kv_len}"
                ),
            });
        }
        Ok(Self {
            blocks,
            kv_len,
            n_queries,
        })
    }
    /// Blocks holding the sequence, in order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }
    /// Tokens of context, queries included.
    pub fn kv_len(&self) -> usize {
        self.kv_len
    }
    /// Query rows this sequence contributes.
    pub fn n_queries(&self) -> usize {
        self.n_queries
    }
    /// Position of the first query.
    pub fn first_query_position(&self) -> usize {
        self.kv_len - self.n_queries
    }
    /// Slot of cached token `index` (must be below `kv_len`).
    pub fn slot(&self, index: usize, block_size: usize) -> Option<Slot> {
        if index >= self.kv_len {
            return None;
        }
        let block = *self.blocks.get(index / block_size)?;
        Some(Slot {
            block,
            offset: (index % block_size) as u32,
        })
    }
}

/// Many sequences attended in one call: their query rows are concatenated in `seqs` order.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionBatch {
    /// Sequences in query-row order.
    pub seqs: Vec<SeqAttention>,
    /// Multiplies q.k before the softmax, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
}

impl AttentionBatch {
    /// A batch with the usual `1 / sqrt(head_dim)` scale.
    pub fn new(seqs: Vec<SeqAttention>, head_dim: usize) -> Self {
        Self {
            seqs,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
    /// Query rows over all sequences.
    pub fn total_queries(&self) -> usize {
        self.seqs.iter().map(SeqAttention::n_queries).sum()
    }
    /// Checks that every sequence fits the storage: its blocks exist and cover its length.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] or [`KvError::OutOfRange`] naming the first offender.
    pub fn validate(&self, spec: &StorageSpec) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(KvError::NonFinite {
                what: "attention scale",
            });
        }
        for (i, s) in self.seqs.iter().enumerate() {
            if s.blocks.len() * spec.block_size < s.kv_len {
                return Err(KvError::InvalidArgument {
                    what: "attention batch",
                    detail: format!(
                        "sequence {i} has {} tokens but {} blocks of {} hold only {}",
                        s.kv_len,
                        s.blocks.len(),
                        spec.block_size,
                        s.blocks.len() * spec.block_size
                    ),
                });
            }
            if let Some(&b) = s.blocks.iter().find(|&&b| b as usize >= spec.num_blocks) {
                return Err(KvError::OutOfRange {
                    what: "block",
                    index: b as usize,
                    len: spec.num_blocks,
                });
            }
        }
        Ok(())
    }
}

/// A device that stores K/V rows in block pools and computes attention over them.
///
/// The [`crate::CacheManager`] decides where tokens go; a backend only stores and computes.
/// Tensors are candle tensors on [`CacheBackend::device`]; K and V are
/// `[tokens, kv_heads, head_dim]`, queries and outputs `[tokens, q_heads, head_dim]`.
/// Implementors prove themselves with `kv_attention::conformance::check`.
pub trait CacheBackend: Send + Sync {
    /// Block pools for all layers in one layout, resident on this backend's device.
    type Storage: Send + Sync;

    /// Short name for messages and reports.
    fn name(&self) -> &str;

    /// Where tensors passed in and returned live.
    fn device(&self) -> &Device;

    /// Whether this backend stores `dtype`; other calls with it answer
    /// [`KvError::Unsupported`].
    fn supports(&self, dtype: KvDType) -> bool;

    /// Allocates zeroed pools for `spec`.
    ///
    /// # Errors
    /// [`KvError::Unsupported`] for a layout the backend lacks; allocation failures.
    fn allocate(&self, spec: &StorageSpec) -> Result<Self::Storage>;

    /// The spec `storage` was allocated with.
    fn spec<'a>(&self, storage: &'a Self::Storage) -> &'a StorageSpec;

    /// Stores K and V (`[slots.len(), kv_heads, head_dim]`) of `layer` into `slots`,
    /// converting to the storage layout.
    ///
    /// # Errors
    /// Shape mismatches, slots or layer out of range, non-finite values; nothing is written
    /// on error.
    fn write(
        &self,
        storage: &mut Self::Storage,
        layer: usize,
        slots: &[Slot],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()>;

    /// Attention of `q` (`[batch.total_queries(), q_heads, head_dim]`) over the cached K/V
    /// of `layer`; returns the same shape as `q`, in f32.
    ///
    /// # Errors
    /// Shape mismatches, an invalid batch.
    fn attend(
        &self,
        storage: &Self::Storage,
        layer: usize,
        q: &Tensor,
        batch: &AttentionBatch,
    ) -> Result<Tensor>;

    /// Copies whole blocks, every layer, K and V (copy-on-write of forked sequences).
    ///
    /// # Errors
    /// Blocks out of range; nothing is copied on error.
    fn copy_blocks(&self, storage: &mut Self::Storage, moves: &[(BlockId, BlockId)]) -> Result<()>;

    /// K and V of `layer` at `slots`, dequantized to f32 `[slots.len(), kv_heads, head_dim]`:
    /// for tests, export and persistence.
    ///
    /// # Errors
    /// Slots or layer out of range.
    fn read(
        &self,
        storage: &Self::Storage,
        layer: usize,
        slots: &[Slot],
    ) -> Result<(Tensor, Tensor)>;
}

macro_rules! forward_backend {
    ($($ty:ty),*) => {$(
        impl<B: CacheBackend + ?Sized> CacheBackend for $ty {
            type Storage = B::Storage;
            fn name(&self) -> &str { (**self).name() }
            fn device(&self) -> &Device { (**self).device() }
            fn supports(&self, dtype: KvDType) -> bool { (**self).supports(dtype) }
            fn allocate(&self, spec: &StorageSpec) -> Result<Self::Storage> { (**self).allocate(spec) }
            fn spec<'a>(&self, storage: &'a Self::Storage) -> &'a StorageSpec { (**self).spec(storage) }
            fn write(&self, storage: &mut Self::Storage, layer: usize, slots: &[Slot], k: &Tensor, v: &Tensor) -> Result<()> {
                (**self).write(storage, layer, slots, k, v)
            }
            fn attend(&self, storage: &Self::Storage, layer: usize, q: &Tensor, batch: &AttentionBatch) -> Result<Tensor> {
                (**self).attend(storage, layer, q, batch)
            }
            fn copy_blocks(&self, storage: &mut Self::Storage, moves: &[(BlockId, BlockId)]) -> Result<()> {
                (**self).copy_blocks(storage, moves)
            }
            fn read(&self, storage: &Self::Storage, layer: usize, slots: &[Slot]) -> Result<(Tensor, Tensor)> {
                (**self).read(storage, layer, slots)
            }
        }
    )*};
}

forward_backend!(&B, Box<B>, std::sync::Arc<B>);
