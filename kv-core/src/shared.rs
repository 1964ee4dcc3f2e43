//! One [`CacheManager`] used from many threads.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::{
    BlockId, BlockTable, CacheManager, CacheStats, Preempted, PrefixMatch, Reserved, Result,
    SeqAttention, SeqId,
};

/// A [`CacheManager`] behind one mutex; cloning is cheap and every clone is the same cache.
///
/// Each method locks once, so each is atomic and keeps the manager's all-or-nothing
/// guarantee; [`SharedCacheManager::with`] runs several calls as one (check, then append).
///
/// Why one lock around the whole manager rather than finer locks: every operation is a few
/// microseconds of bookkeeping with no device work, and its invariants span the allocator,
/// the block tables and the prefix index at once (an append may evict a cached block that
/// another thread's prompt was about to reuse). One lock keeps those invariants trivially
/// true, and its cost is small next to the attention a step runs. The manager itself stays
/// plain data (`Send + Sync`, `&mut self` to change it) so single-threaded users pay for no
/// lock.
///
/// One rule comes with sharing: apply an append's copy-on-write copies before anyone else
/// can allocate, or the source block may be evicted and reused first. Use
/// [`SharedCacheManager::reserve_and_copy`], which runs the copy under the lock.
///
/// ```
/// use kv_core::{CacheManager, SharedCacheManager};
/// let cache = SharedCacheManager::new(CacheManager::with_prefix_cache(16, 64, 0)?);
/// let workers: Vec<_> = (0..4u32)
///     .map(|t| {
///         let cache = cache.clone();
///         std::thread::spawn(move || -> kv_core::Result<()> {
///             let seq = cache.create_sequence();
///             cache.reserve_and_copy(seq, 20, |_copies| Ok(()))?;
///             cache.commit(seq, &[t; 20])?;
///             cache.free(seq)
///         })
///     })
///     .collect();
/// for w in workers {
///     w.join().expect("worker panicked")?;
/// }
/// assert_eq!(cache.used_blocks(), 0);
/// assert_eq!(cache.cached_blocks(), 4); // each worker's full block stays cached
/// # Ok::<(), kv_core::KvError>(())
/// ```
#[derive(Debug, Clone)]
pub struct SharedCacheManager {
    inner: Arc<Mutex<CacheManager>>,
}

impl From<CacheManager> for SharedCacheManager {
    fn from(manager: CacheManager) -> Self {
        Self::new(manager)
    }
}

impl SharedCacheManager {
    /// Shares `manager`.
    pub fn new(manager: CacheManager) -> Self {
        Self {
            inner: Arc::new(Mutex::new(manager)),
        }
    }

    /// A poisoned lock is taken anyway: a panic can only come from a closure given to
    /// [`SharedCacheManager::with`], between manager calls, and every manager call leaves
    /// the bookkeeping consistent.
    fn lock(&self) -> MutexGuard<'_, CacheManager> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` with the lock held: several calls as one atomic step. `f` gets the manager
    /// itself; calling back into this `SharedCacheManager` from `f` would deadlock.
    ///
    /// ```
    /// # use kv_core::{CacheManager, SharedCacheManager};
    /// # let cache = SharedCacheManager::new(CacheManager::new(4, 8)?);
    /// # let seq = cache.create_sequence();
    /// let slots = cache.with(|m| {
    ///     let n = m.reservable_tokens(seq)?.min(6);
    ///     m.reserve(seq, n)
    /// })?;
    /// assert_eq!(slots.slots.len(), 6);
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    pub fn with<R>(&self, f: impl FnOnce(&mut CacheManager) -> R) -> R {
        f(&mut self.lock())
    }

    /// A copy of the manager as it is now.
    pub fn snapshot(&self) -> CacheManager {
        self.lock().clone()
    }

    /// [`CacheManager::create_sequence`].
    pub fn create_sequence(&self) -> SeqId {
        self.lock().create_sequence()
    }
    /// [`CacheManager::create_with_prefix`].
    pub fn create_with_prefix(&self, prompt: &[u32]) -> (SeqId, usize) {
        self.lock().create_with_prefix(prompt)
    }
    /// [`CacheManager::create_with_prefix_salted`].
    pub fn create_with_prefix_salted(&self, prompt: &[u32], cache_salt: u64) -> (SeqId, usize) {
        self.lock().create_with_prefix_salted(prompt, cache_salt)
    }
    /// [`CacheManager::prefix_match`].
    pub fn prefix_match(&self, prompt: &[u32], cache_salt: u64) -> PrefixMatch {
        self.lock().prefix_match(prompt, cache_salt)
    }
    /// [`CacheManager::reserve`]. With other threads allocating, prefer
    /// [`SharedCacheManager::reserve_and_copy`] unless `copies` are known to be empty.
    ///
    /// # Errors
    /// As [`CacheManager::reserve`].
    pub fn reserve(&self, seq: SeqId, n: usize) -> Result<Reserved> {
        self.lock().reserve(seq, n)
    }
    /// [`CacheManager::reserve_and_copy`], with `copy` run under the lock (so `copy` must
    /// not call back into this manager: that would deadlock).
    ///
    /// # Errors
    /// As [`CacheManager::reserve_and_copy`]; nothing changes on error.
    pub fn reserve_and_copy(
        &self,
        seq: SeqId,
        n: usize,
        copy: impl FnOnce(&[(BlockId, BlockId)]) -> Result<()>,
    ) -> Result<Reserved> {
        self.lock().reserve_and_copy(seq, n, copy)
    }
    /// [`CacheManager::commit`].
    ///
    /// # Errors
    /// As [`CacheManager::commit`].
    pub fn commit(&self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        self.lock().commit(seq, tokens)
    }
    /// [`CacheManager::fork`].
    ///
    /// # Errors
    /// As [`CacheManager::fork`].
    pub fn fork(&self, seq: SeqId) -> Result<SeqId> {
        self.lock().fork(seq)
    }
    /// [`CacheManager::truncate`].
    ///
    /// # Errors
    /// As [`CacheManager::truncate`].
    pub fn truncate(&self, seq: SeqId, len: usize) -> Result<()> {
        self.lock().truncate(seq, len)
    }
    /// [`CacheManager::free`].
    ///
    /// # Errors
    /// As [`CacheManager::free`].
    pub fn free(&self, seq: SeqId) -> Result<()> {
        self.lock().free(seq)
    }
    /// [`CacheManager::preempt`].
    ///
    /// # Errors
    /// As [`CacheManager::preempt`].
    pub fn preempt(&self, seq: SeqId) -> Result<Preempted> {
        self.lock().preempt(seq)
    }
    /// [`CacheManager::len`].
    ///
    /// # Errors
    /// As [`CacheManager::len`].
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        self.lock().len(seq)
    }
    /// [`CacheManager::tokens`], copied out of the lock.
    ///
    /// # Errors
    /// As [`CacheManager::tokens`].
    pub fn tokens(&self, seq: SeqId) -> Result<Vec<u32>> {
        self.lock().tokens(seq).map(<[u32]>::to_vec)
    }
    /// [`CacheManager::table`], copied out of the lock.
    ///
    /// # Errors
    /// As [`CacheManager::table`].
    pub fn table(&self, seq: SeqId) -> Result<BlockTable> {
        self.lock().table(seq).cloned()
    }
    /// [`CacheManager::seq_attention`].
    ///
    /// # Errors
    /// As [`CacheManager::seq_attention`].
    pub fn seq_attention(&self, seq: SeqId, n_queries: usize) -> Result<SeqAttention> {
        self.lock().seq_attention(seq, n_queries)
    }
    /// [`CacheManager::blocks_needed`].
    ///
    /// # Errors
    /// As [`CacheManager::blocks_needed`].
    pub fn blocks_needed(&self, seq: SeqId, n: usize) -> Result<usize> {
        self.lock().blocks_needed(seq, n)
    }
    /// [`CacheManager::blocks_needed_batch`].
    ///
    /// # Errors
    /// As [`CacheManager::blocks_needed_batch`].
    pub fn blocks_needed_batch(&self, appends: &[(SeqId, usize)]) -> Result<usize> {
        self.lock().blocks_needed_batch(appends)
    }
    /// [`CacheManager::reservable_tokens`].
    ///
    /// # Errors
    /// As [`CacheManager::reservable_tokens`].
    pub fn reservable_tokens(&self, seq: SeqId) -> Result<usize> {
        self.lock().reservable_tokens(seq)
    }
    /// [`CacheManager::block_size`].
    pub fn block_size(&self) -> usize {
        self.lock().block_size()
    }
    /// [`CacheManager::total_blocks`].
    pub fn total_blocks(&self) -> usize {
        self.lock().total_blocks()
    }
    /// [`CacheManager::free_blocks`].
    pub fn free_blocks(&self) -> usize {
        self.lock().free_blocks()
    }
    /// [`CacheManager::used_blocks`].
    pub fn used_blocks(&self) -> usize {
        self.lock().used_blocks()
    }
    /// [`CacheManager::cached_blocks`].
    pub fn cached_blocks(&self) -> usize {
        self.lock().cached_blocks()
    }
    /// [`CacheManager::ref_count`].
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.lock().ref_count(block)
    }
    /// [`CacheManager::sequences`], collected.
    pub fn sequences(&self) -> Vec<SeqId> {
        self.lock().sequences().collect()
    }
    /// [`CacheManager::stats`].
    pub fn stats(&self) -> CacheStats {
        self.lock().stats()
    }
    /// [`CacheManager::audit`].
    ///
    /// # Errors
    /// As [`CacheManager::audit`].
    pub fn audit(&self) -> std::result::Result<(), String> {
        self.lock().audit()
    }
}
