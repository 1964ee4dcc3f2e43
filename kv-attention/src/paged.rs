use std::collections::HashMap;

use candle_core::Tensor;
use kv_core::{
    memory, AttentionBatch, BlockId, CacheBackend, CacheManager, CacheStats, Preempted,
    PrefixMatch, Result, SeqAttention, SeqId, Slot, StorageSpec,
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
/// Every change to the bookkeeping goes through this type so the storage follows it:
/// copy-on-write copies run on the backend inside [`PagedCache::reserve`], and a failed
/// copy leaves the bookkeeping as it was. With the prefix cache on
/// ([`PagedCache::with_prefix_cache`]) a request's life is: [`PagedCache::create_with_prefix`]
/// (reuses cached blocks), [`PagedCache::reserve`] the rest, write each layer's K/V,
/// [`PagedCache::commit`] the token ids (indexes the full blocks), and per decode step
/// reserve / write / commit one token.
///
/// ```
/// use kv_attention::PagedCache;
/// # use kv_core::{KvDType, ModelShape, StorageSpec};
/// # fn demo<B: kv_core::CacheBackend>(backend: B) -> kv_core::Result<()> {
/// let shape = ModelShape::builder().layers(2).q_heads(4).kv_heads(2).head_dim(64).build()?;
/// let spec = StorageSpec::builder(shape, KvDType::F16).block_size(16).num_blocks(64).build()?;
/// let mut cache = PagedCache::new(backend, spec)?;
/// let seq = cache.create_sequence();
/// let slots = cache.reserve(seq, 10)?; // then write each layer's K/V into them
/// assert_eq!(slots.len(), 10);
/// # Ok(()) }
/// ```
///
/// # Residual layouts
///
/// With a layout that keeps the last `R` tokens of a sequence in f16 (`kivi2-r128`, see
/// [`kv_core::KiviResidual`]) this type also tells the backend when blocks leave the
/// residual for good ([`CacheBackend::settle_blocks`]): at a sequence's next
/// [`reserve`](Self::reserve), the blocks whose tokens are all `R` or more behind its next
/// query, when every sequence holding them is that far past them too; at
/// [`free`](Self::free) and [`preempt`](Self::preempt), the blocks no other sequence holds.
/// A query reserved with [`reserve`](Self::reserve) must be attended before its sequence's
/// next reserve (the order of every decode loop). A block shared by sequences that have not
/// all moved past it keeps its f16 copy until they have, and a sequence truncated back
/// within `R` of a settled block, or a prompt reusing cached blocks, reads them as stored:
/// quantized.
pub struct PagedCache<B: CacheBackend> {
    backend: B,
    storage: B::Storage,
    manager: CacheManager,
    spec: StorageSpec,
    /// Residual layouts only: per sequence, its earliest query that may not have attended
    /// yet and how many of its leading blocks are settled.
    residual: HashMap<SeqId, Residual>,
}

/// A sequence's residual bookkeeping (see [`PagedCache`]'s docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Residual {
    /// Position of the sequence's earliest query that may still be to attend: its length
    /// before its last reserve.
    horizon: usize,
    /// Leading blocks of its table known settled.
    settled: usize,
}

impl<B: CacheBackend> PagedCache<B> {
    /// Allocates `spec` on `backend`.
    ///
    /// # Errors
    /// [`kv_core::KvError::Overflow`] for a spec (built field by field) whose size does not
    /// fit a `u64`; what [`CacheBackend::allocate`] returns.
    pub fn new(backend: B, spec: StorageSpec) -> Result<Self> {
        // A spec built field by field is checked here: its size must fit a u64 (so
        // `usage` is exact).
        spec.bytes()?;
        let storage = backend.allocate(&spec)?;
        let manager = CacheManager::new(spec.block_size, spec.num_blocks)?;
        Ok(Self {
            backend,
            storage,
            manager,
            spec,
            residual: HashMap::new(),
        })
    }

    /// Allocates `spec` on `backend` with prefix reuse: full blocks of committed tokens are
    /// indexed and kept after their sequences end, until memory is needed. `salt` names
    /// the model and layout (see [`CacheManager::with_prefix_cache`]).
    ///
    /// # Errors
    /// What [`CacheBackend::allocate`] returns.
    pub fn with_prefix_cache(backend: B, spec: StorageSpec, salt: u64) -> Result<Self> {
        spec.bytes()?;
        let manager = CacheManager::with_prefix_cache(spec.block_size, spec.num_blocks, salt)?;
        let storage = backend.allocate(&spec)?;
        Ok(Self {
            backend,
            storage,
            manager,
            spec,
            residual: HashMap::new(),
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
        let seq = self.manager.create_sequence();
        self.track(seq, 0);
        seq
    }

    /// Starts a sequence reusing the cached K/V of the longest full-block prefix of `prompt`
    /// (never its last token) and returns it with the number of tokens reused: compute,
    /// write and commit only `prompt[reused..]`. See
    /// [`CacheManager::create_with_prefix_salted`].
    pub fn create_with_prefix(&mut self, prompt: &[u32]) -> (SeqId, usize) {
        let (seq, reused) = self.manager.create_with_prefix(prompt);
        self.track(seq, 0);
        (seq, reused)
    }

    /// [`PagedCache::create_with_prefix`] in the namespace `cache_salt` (tenant, adapter).
    pub fn create_with_prefix_salted(&mut self, prompt: &[u32], cache_salt: u64) -> (SeqId, usize) {
        let (seq, reused) = self.manager.create_with_prefix_salted(prompt, cache_salt);
        self.track(seq, 0);
        (seq, reused)
    }

    /// What a prompt would reuse now and the free blocks admitting it would take.
    pub fn prefix_match(&self, prompt: &[u32], cache_salt: u64) -> PrefixMatch {
        self.manager.prefix_match(prompt, cache_salt)
    }

    /// Records the ids of `seq`'s next reserved tokens once their K/V is written in every
    /// layer; full blocks enter the prefix index. See [`CacheManager::commit`].
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`], [`kv_core::KvError::OutOfRange`]; nothing
    /// changes on error.
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        self.manager.commit(seq, tokens)
    }

    /// Pauses `seq`, freeing its blocks, and returns its committed ids to resume it with
    /// later. See [`CacheManager::preempt`].
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`].
    pub fn preempt(&mut self, seq: SeqId) -> Result<Preempted> {
        self.settle_private(seq, 0)?;
        let preempted = self.manager.preempt(seq)?;
        self.residual.remove(&seq);
        Ok(preempted)
    }

    /// Block counts (used, shared, cached, empty) and prefix-cache counters.
    pub fn stats(&self) -> CacheStats {
        self.manager.stats()
    }

    /// A new sequence sharing `seq`'s tokens (copy-on-write).
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`].
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let child = self.manager.fork(seq)?;
        let settled = self.residual.get(&seq).map_or(0, |r| r.settled);
        self.track(child, settled);
        Ok(child)
    }

    /// Tokens `seq` holds.
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`].
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        self.manager.len(seq)
    }

    /// Makes room for `n` more tokens of `seq` (copying shared blocks first) and returns
    /// the slots to write them to. With a residual layout, first settles the blocks that
    /// left the residual of every sequence holding them (see the type's docs).
    ///
    /// # Errors
    /// [`kv_core::KvError::CacheFull`] and the manager's other errors; nothing changes on
    /// error, except that blocks no query still to come reads in f16 may have been settled.
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> Result<Vec<Slot>> {
        let before = self.manager.len(seq)?;
        if self.has_residual() {
            let (plan, settled) = self.settle_plan(seq)?;
            if !plan.is_empty() {
                self.backend.settle_blocks(&mut self.storage, &plan)?;
            }
            self.residual.entry(seq).or_default().settled = settled;
        }
        let (backend, storage) = (&self.backend, &mut self.storage);
        let reserved = self
            .manager
            .reserve_and_copy(seq, n, |copies| backend.copy_blocks(storage, copies))?;
        if let Some(r) = self.residual.get_mut(&seq) {
            r.horizon = before;
        }
        Ok(reserved.slots)
    }

    /// Whether the layout keeps a residual in f16 that blocks must be settled out of.
    fn has_residual(&self) -> bool {
        self.spec.dtype.residual_tokens() > 0
    }

    /// Starts the residual bookkeeping of `seq` (a residual layout only): no query pending
    /// before its length, `settled` leading blocks settled.
    fn track(&mut self, seq: SeqId, settled: usize) {
        if self.has_residual() {
            if let Ok(len) = self.manager.len(seq) {
                self.residual.insert(
                    seq,
                    Residual {
                        horizon: len,
                        settled,
                    },
                );
            }
        }
    }

    /// Whether the block at index `index` of a table lies wholly `R` tokens or more before
    /// position `next`.
    fn is_past(&self, index: usize, next: usize) -> bool {
        index
            .checked_add(1)
            .and_then(|i| i.checked_mul(self.spec.block_size))
            .and_then(|end| end.checked_add(self.spec.dtype.residual_tokens()))
            .is_some_and(|end| end <= next)
    }

    /// Whether every sequence but `seq` that holds `block` is past it with its earliest
    /// query that may be pending.
    fn others_past(&self, seq: SeqId, block: BlockId) -> bool {
        let holders = self
            .manager
            .ref_count(block)
            .saturating_sub(u32::from(self.manager.is_indexed(block)));
        if holders <= 1 {
            return true;
        }
        self.manager.sequences().filter(|&s| s != seq).all(|s| {
            let Ok(table) = self.manager.table(s) else {
                return true;
            };
            match table.blocks().iter().position(|&b| b == block) {
                None => true,
                Some(index) => {
                    let horizon = self.residual.get(&s).map_or(0, |r| r.horizon);
                    self.is_past(index, horizon)
                }
            }
        })
    }

    /// The blocks of `seq` to settle before it reserves more tokens (every query of it
    /// before its length has attended) and its leading settled blocks after that.
    fn settle_plan(&self, seq: SeqId) -> Result<(Vec<BlockId>, usize)> {
        let next = self.manager.len(seq)?;
        let blocks = self.manager.table(seq)?.blocks();
        let start = self.residual.get(&seq).map_or(0, |r| r.settled);
        let (mut plan, mut settled) = (Vec::new(), start);
        for (index, &block) in blocks.iter().enumerate().skip(start) {
            if !self.is_past(index, next) {
                break;
            }
            if self.others_past(seq, block) {
                plan.push(block);
                if settled == index {
                    settled = index + 1;
                }
            }
        }
        Ok((plan, settled))
    }

    /// Settles the blocks of `seq` from index `from` on that no other sequence still needs
    /// (it is about to let go of them; the prefix index reads what they store).
    fn settle_private(&mut self, seq: SeqId, from: usize) -> Result<()> {
        if !self.has_residual() {
            return Ok(());
        }
        let plan: Vec<BlockId> = self
            .manager
            .table(seq)?
            .blocks()
            .iter()
            .skip(from)
            .copied()
            .filter(|&b| self.others_past(seq, b))
            .collect();
        if plan.is_empty() {
            return Ok(());
        }
        self.backend.settle_blocks(&mut self.storage, &plan)
    }

    /// Forgets `seq`'s tokens from `len` on (a block shared with others or the prefix
    /// index is copied before it is written again).
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`], [`kv_core::KvError::OutOfRange`].
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        if len > self.manager.len(seq)? {
            // The manager's error, before anything is settled.
            return self.manager.truncate(seq, len);
        }
        // The blocks it lets go of.
        self.settle_private(seq, len.div_ceil(self.spec.block_size))?;
        self.manager.truncate(seq, len)?;
        let block_size = self.spec.block_size;
        if let Some(r) = self.residual.get_mut(&seq) {
            r.horizon = r.horizon.min(len);
            // A block cut into is written again: it must be settled again later.
            r.settled = r.settled.min(len / block_size);
        }
        Ok(())
    }

    /// StreamingLLM eviction: keeps `seq`'s first `keep_blocks` blocks (the attention
    /// sinks), drops the `evict_blocks` full blocks after them and makes the kept front
    /// blocks private (copied on the backend when shared), so the caller can rewrite the
    /// sinks' K in place with [`PagedCache::write`]. See [`CacheManager::evict_window`].
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`], [`kv_core::KvError::OutOfRange`],
    /// [`kv_core::KvError::InvalidArgument`], [`kv_core::KvError::CacheFull`], the backend's
    /// copy errors; nothing changes on error.
    pub fn evict_window(
        &mut self,
        seq: SeqId,
        keep_blocks: usize,
        evict_blocks: usize,
    ) -> Result<()> {
        let (backend, storage) = (&self.backend, &mut self.storage);
        self.manager
            .evict_window_and_copy(seq, keep_blocks, evict_blocks, |copies| {
                backend.copy_blocks(storage, copies)
            })?;
        if let Some(r) = self.residual.get_mut(&seq) {
            // The blocks after the sinks moved down; count them again.
            r.settled = r.settled.min(keep_blocks);
        }
        Ok(())
    }

    /// Tokens dropped from `seq` by [`PagedCache::evict_window`] so far.
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`].
    pub fn evicted_tokens(&self, seq: SeqId) -> Result<usize> {
        self.manager.evicted_tokens(seq)
    }

    /// Ends `seq` and releases its blocks (indexed ones stay cached).
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`].
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.settle_private(seq, 0)?;
        self.manager.free(seq)?;
        self.residual.remove(&seq);
        Ok(())
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
    /// [`kv_core::KvError::UnknownSequence`], [`kv_core::KvError::InvalidArgument`].
    pub fn seq_attention(&self, seq: SeqId, n_queries: usize) -> Result<SeqAttention> {
        self.manager.seq_attention(seq, n_queries)
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
        // The spec's size was checked at construction (it fits a u64), and every count
        // below is at most its capacity, so these products cannot overflow.
        let per_token = memory::bytes_per_token(&self.spec.shape, self.spec.dtype).unwrap_or(0);
        let per_block = per_token as u64 * self.spec.block_size as u64;
        CacheUsage {
            tokens,
            bytes_used: per_token as u64 * tokens as u64,
            bytes_reserved: per_block * self.manager.used_blocks() as u64,
            bytes_allocated: per_block * self.spec.num_blocks as u64,
            bytes_per_token: per_token,
        }
    }
}

/// Saving and restoring whole blocks (cache files and tiers).
impl<B: CacheBackend> PagedCache<B> {
    /// The exported bytes ([`CacheBackend::export_block`]) of the blocks holding the first
    /// `n_blocks` full blocks of `seq`'s committed tokens, in order.
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`]; [`kv_core::KvError::InvalidArgument`] when
    /// `seq` has fewer committed tokens; what the backend's export returns.
    pub fn export_blocks(&self, seq: SeqId, n_blocks: usize) -> Result<Vec<Vec<u8>>> {
        let bs = self.spec.block_size;
        let committed = self.manager.tokens(seq)?.len();
        if n_blocks.checked_mul(bs).is_none_or(|n| n > committed) {
            return Err(kv_core::KvError::InvalidArgument {
                what: "exported blocks",
                detail: format!(
                    "{n_blocks} blocks of {bs} tokens asked, sequence {seq} has {committed} \
                     committed tokens"
                ),
            });
        }
        let table = self.manager.table(seq)?;
        table.blocks()[..n_blocks]
            .iter()
            .map(|&b| {
                let mut out = Vec::new();
                self.backend.export_block(&self.storage, b, &mut out)?;
                Ok(out)
            })
            .collect()
    }

    /// The exported bytes of one block by id (a cached block about to be evicted, for
    /// [`crate::TieredCache`] to copy down a tier).
    ///
    /// # Errors
    /// What the backend's export returns (an id out of range among them).
    pub fn export_block(&self, block: kv_core::BlockId) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.backend.export_block(&self.storage, block, &mut out)?;
        Ok(out)
    }

    /// Appends whole blocks to `seq` from exported bytes and commits their `tokens`, as if
    /// they had been computed and written here (they enter the prefix index). `seq`'s
    /// length must be a multiple of the block size with every token committed, and
    /// `tokens` must hold `blocks.len()` full blocks. All or nothing: on error `seq` is
    /// truncated back to where it was.
    ///
    /// # Errors
    /// [`kv_core::KvError::InvalidArgument`] for lengths that do not line up; what
    /// [`PagedCache::reserve`] and [`CacheBackend::import_block`] return.
    pub fn import_blocks(&mut self, seq: SeqId, tokens: &[u32], blocks: &[&[u8]]) -> Result<()> {
        let bs = self.spec.block_size;
        let before = self.manager.len(seq)?;
        let committed = self.manager.tokens(seq)?.len();
        if before % bs != 0
            || committed != before
            || blocks.len().checked_mul(bs) != Some(tokens.len())
        {
            return Err(kv_core::KvError::InvalidArgument {
                what: "imported blocks",
                detail: format!(
                    "{} tokens for {} blocks of {bs} onto a sequence of {before} tokens \
                     ({committed} committed)",
                    tokens.len(),
                    blocks.len()
                ),
            });
        }
        let slots = self.reserve(seq, tokens.len())?;
        let result = (|| {
            for (i, bytes) in blocks.iter().enumerate() {
                self.backend
                    .import_block(&mut self.storage, slots[i * bs].block, bytes)?;
            }
            self.manager.commit(seq, tokens)
        })();
        if result.is_err() {
            // Cannot fail: `seq` exists and `before` is below its length.
            let _ = self.manager.truncate(seq, before);
        }
        result
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use candle_core::{Device, Tensor};
    use kv_core::{BlockId, KvDType, KvError, ModelShape};

    use super::*;

    /// Stores one f32 per slot and layer (the first element of K); enough to see which
    /// token's K/V a slot holds and whether copies ran.
    struct Recorder {
        device: Device,
        fail_copies: AtomicBool,
    }

    struct Rows {
        spec: StorageSpec,
        /// `[layer][flat slot]`.
        k: Vec<Vec<f32>>,
    }

    impl Recorder {
        fn new() -> Self {
            Self {
                device: Device::Cpu,
                fail_copies: AtomicBool::new(false),
            }
        }
    }

    impl CacheBackend for Recorder {
        type Storage = Rows;
        fn name(&self) -> &str {
            "recorder"
        }
        fn device(&self) -> &Device {
            &self.device
        }
        fn supports(&self, dtype: KvDType) -> bool {
            dtype == KvDType::F32
        }
        fn allocate(&self, spec: &StorageSpec) -> Result<Rows> {
            Ok(Rows {
                spec: *spec,
                k: vec![vec![f32::NAN; spec.capacity_tokens()]; spec.shape.n_layers()],
            })
        }
        fn spec<'a>(&self, storage: &'a Rows) -> &'a StorageSpec {
            &storage.spec
        }
        fn write(
            &self,
            s: &mut Rows,
            layer: usize,
            slots: &[Slot],
            k: &Tensor,
            _v: &Tensor,
        ) -> Result<()> {
            let first: Vec<f32> = k
                .narrow(1, 0, 1)?
                .narrow(2, 0, 1)?
                .flatten_all()?
                .to_vec1()?;
            let bs = s.spec.block_size;
            for (slot, value) in slots.iter().zip(first) {
                s.k[layer][slot.flat(bs)] = value;
            }
            Ok(())
        }
        fn attend(&self, _: &Rows, _: usize, _: &Tensor, _: &AttentionBatch) -> Result<Tensor> {
            Err(KvError::Unsupported {
                backend: "recorder".into(),
                what: "attention".into(),
            })
        }
        fn copy_blocks(&self, s: &mut Rows, moves: &[(BlockId, BlockId)]) -> Result<()> {
            if self.fail_copies.load(Ordering::Relaxed) {
                return Err(KvError::Unsupported {
                    backend: "recorder".into(),
                    what: "copies today".into(),
                });
            }
            let bs = s.spec.block_size;
            for layer in &mut s.k {
                for &(from, to) in moves {
                    let (from, to) = (from.index() * bs, to.index() * bs);
                    layer.copy_within(from..from + bs, to);
                }
            }
            Ok(())
        }
        fn read(&self, s: &Rows, layer: usize, slots: &[Slot]) -> Result<(Tensor, Tensor)> {
            let bs = s.spec.block_size;
            let k: Vec<f32> = slots.iter().map(|slot| s.k[layer][slot.flat(bs)]).collect();
            let k = Tensor::from_vec(k, (slots.len(), 1, 1), &self.device)?;
            Ok((k.clone(), k))
        }
    }

    fn cache(prefix: bool) -> Result<PagedCache<Recorder>> {
        let spec = StorageSpec::new(ModelShape::new(2, 1, 1, 1)?, KvDType::F32, 4, 6)?;
        if prefix {
            PagedCache::with_prefix_cache(Recorder::new(), spec, 9)
        } else {
            PagedCache::new(Recorder::new(), spec)
        }
    }

    /// Writes token ids as K in every layer of `slots`.
    fn write(c: &mut PagedCache<Recorder>, slots: &[Slot], tokens: &[u32]) -> Result<()> {
        let k: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
        let k = Tensor::from_vec(k, (tokens.len(), 1, 1), &Device::Cpu)?;
        for layer in 0..2 {
            c.write(layer, slots, &k, &k)?;
        }
        Ok(())
    }

    fn read_back(c: &PagedCache<Recorder>, seq: SeqId) -> Result<Vec<Vec<f32>>> {
        let table = c.manager().table(seq)?;
        let slots: Vec<Slot> = (0..table.len())
            .filter_map(|i| table.slot(i, c.spec().block_size))
            .collect();
        (0..2)
            .map(|layer| {
                Ok(c.backend()
                    .read(c.storage(), layer, &slots)?
                    .0
                    .flatten_all()?
                    .to_vec1()?)
            })
            .collect()
    }

    #[test]
    fn prefix_hit_reads_the_cached_kv() -> Result<()> {
        let mut c = cache(true)?;
        let prompt = [3, 1, 4, 1, 5, 9, 2];
        let (a, reused) = c.create_with_prefix(&prompt);
        assert_eq!(reused, 0);
        let slots = c.reserve(a, prompt.len())?;
        write(&mut c, &slots, &prompt)?;
        c.commit(a, &prompt)?;
        c.free(a)?;
        assert_eq!(c.stats().cached_blocks, 1);

        let (b, reused) = c.create_with_prefix(&prompt);
        assert_eq!(reused, 4);
        let slots = c.reserve(b, prompt.len() - reused)?;
        write(&mut c, &slots, &prompt[reused..])?;
        c.commit(b, &prompt[reused..])?;
        let want: Vec<f32> = prompt.iter().map(|&t| t as f32).collect();
        assert_eq!(read_back(&c, b)?, vec![want.clone(), want]);
        assert_eq!(c.manager().audit(), Ok(()));
        Ok(())
    }

    #[test]
    fn fork_copies_on_the_backend_and_a_failed_copy_changes_nothing() -> Result<()> {
        for prefix in [false, true] {
            let mut c = cache(prefix)?;
            let a = c.create_sequence();
            let slots = c.reserve(a, 6)?;
            write(&mut c, &slots, &[1, 2, 3, 4, 5, 6])?;
            c.commit(a, &[1, 2, 3, 4, 5, 6])?;
            let b = c.fork(a)?;

            c.backend().fail_copies.store(true, Ordering::Relaxed);
            let before = c.manager().clone();
            assert!(matches!(c.reserve(b, 1), Err(KvError::Unsupported { .. })));
            assert_eq!(c.manager(), &before);

            c.backend().fail_copies.store(false, Ordering::Relaxed);
            let slots = c.reserve(b, 1)?;
            write(&mut c, &slots, &[7])?;
            let slots = c.reserve(a, 1)?;
            write(&mut c, &slots, &[8])?;
            assert_eq!(read_back(&c, a)?[1], [1., 2., 3., 4., 5., 6., 8.]);
            assert_eq!(read_back(&c, b)?[1], [1., 2., 3., 4., 5., 6., 7.]);

            let paused = c.preempt(b)?;
            assert_eq!((paused.tokens.len(), paused.uncommitted), (6, 1));
            assert_eq!(c.manager().audit(), Ok(()));
        }
        Ok(())
    }
}
