use candle_core::Tensor;
use kv_core::{
    memory, AttentionBatch, CacheBackend, CacheManager, Result, SeqAttention, SeqId, Slot,
    StorageSpec,
};

/// How much of a cache is in use, in tokens and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUsage {
    /// Tokens held over all sequences (shared blocks counted once per sequence).
    pub tokens: usize,
    /// Exactly [`memory::cache_bytes`] of `tokens`.
    pub bytes_used: u64,
    /// Bytes of the blocks held (a partly filled block counts whole).
    pub bytes_reserved: u64,
    /// Bytes the backend allocated for the whole pool.
    pub bytes_allocated: u64,
    /// Bytes one token takes, all layers, K and V.
    pub bytes_per_token: usize,
}

/// A backend's storage plus the bookkeeping that says where each sequence's tokens live.
///
/// ```
/// use kv_attention::PagedCache;
/// # use kv_core::{KvDType, ModelShape, StorageSpec};
/// # fn demo<B: kv_core::CacheBackend>(backend: B) -> kv_core::Result<()> {
/// let spec = StorageSpec::new(ModelShape::new(2, 4, 2, 64)?, KvDType::F16, 16, 64)?;
/// let mut cache = PagedCache::new(backend, spec)?;
/// let seq = cache.create_sequence();
/// let slots = cache.reserve(seq, 10)?; // then write each layer's K/V into them
/// assert_eq!(slots.len(), 10);
/// # Ok(()) }
/// ```
pub struct PagedCache<B: CacheBackend> {
    backend: B,
    storage: B::Storage,
    manager: CacheManager,
    spec: StorageSpec,
}

impl<B: CacheBackend> PagedCache<B> {
    /// Allocates `spec` on `backend`.
    ///
    /// # Errors
    /// What [`CacheBackend::allocate`] returns.
    pub fn new(backend: B, spec: StorageSpec) -> Result<Self> {
        let storage = backend.allocate(&spec)?;
        let manager = CacheManager::new(spec.block_size, spec.num_blocks)?;
        Ok(Self {
            backend,
            storage,
            manager,
            spec,
        })
    }

    /// The layout and size of the pools.
    pub fn spec(&self) -> &StorageSpec {
        &self.spec
    }
    /// The device code.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// The bookkeeping (read-only; change it through this type so storage follows).
    pub fn manager(&self) -> &CacheManager {
        &self.manager
    }
    /// The backend's pools.
    pub fn storage(&self) -> &B::Storage {
        &self.storage
    }

    /// Starts an empty sequence.
    pub fn create_sequence(&mut self) -> SeqId {
        self.manager.create()
    }

    /// A new sequence sharing `seq`'s tokens (copy-on-write).
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        self.manager.fork(seq)
    }

    /// Tokens `seq` holds.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        self.manager.len(seq)
    }

    /// Makes room for `n` more tokens of `seq` (copying shared blocks first) and returns
    /// the slots to write them to.
    ///
    /// # Errors
    /// [`KvError::CacheFull`] and the manager's other errors; nothing changes on error.
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> Result<Vec<Slot>> {
        let before = self.manager.clone();
        let appended = self.manager.append(seq, n)?;
        if !appended.copies.is_empty() {
            if let Err(e) = self
                .backend
                .copy_blocks(&mut self.storage, &appended.copies)
            {
                self.manager = before;
                return Err(e);
            }
        }
        Ok(appended.slots)
    }

    /// Forgets `seq`'s tokens from `len` on.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`], [`KvError::OutOfRange`].
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        self.manager.truncate(seq, len)
    }

    /// Ends `seq` and releases its blocks.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.manager.free(seq)
    }

    /// Stores one layer's K/V (`[slots.len(), kv_heads, head_dim]`) into `slots`.
    ///
    /// # Errors
    /// What [`CacheBackend::write`] returns.
    pub fn write(&mut self, layer: usize, slots: &[Slot], k: &Tensor, v: &Tensor) -> Result<()> {
        self.backend.write(&mut self.storage, layer, slots, k, v)
    }

    /// The attention description of `seq` with its last `n_queries` tokens as queries.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`], [`KvError::InvalidArgument`].
    pub fn seq_attention(&self, seq: SeqId, n_queries: usize) -> Result<SeqAttention> {
        self.manager.attention(seq, n_queries)
    }

    /// Attention of `q` over one layer for every sequence in `batch`.
    ///
    /// # Errors
    /// What [`CacheBackend::attend`] returns.
    pub fn attend(&self, layer: usize, q: &Tensor, batch: &AttentionBatch) -> Result<Tensor> {
        self.backend.attend(&self.storage, layer, q, batch)
    }

    /// Tokens and bytes in use now.
    pub fn usage(&self) -> CacheUsage {
        let tokens: usize = self
            .manager
            .sequences()
            .filter_map(|s| self.manager.len(s).ok())
            .sum();
        // The spec was checked at construction, so the layout fits the head dimension.
        let per_token = memory::bytes_per_token(&self.spec.shape, self.spec.dtype).unwrap_or(0);
        CacheUsage {
            tokens,
            bytes_used: per_token as u64 * tokens as u64,
            bytes_reserved: (per_token * self.spec.block_size) as u64
                * self.manager.used_blocks() as u64,
            bytes_allocated: (per_token * self.spec.capacity_tokens()) as u64,
            bytes_per_token: per_token,
        }
    }
}

impl<B: CacheBackend> std::fmt::Debug for PagedCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedCache")
            .field("backend", &self.backend.name())
            .field("spec", &self.spec)
            .field("manager", &self.manager)
            .finish()
    }
}
