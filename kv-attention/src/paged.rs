use std::collections::HashMap;

use candle_core::Tensor;
use kv_core::{
    memory, AttentionBatch, BlockId, CacheBackend, CacheManager, CacheStats, KvError, Preempted,
    PrefixMatch, Result, SeqAttention, SeqId, Slot, StorageSpec,
};

use crate::sliding::{Place, Sliding, SlidingLayers};

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
    /// With a sliding-window group ([`PagedCache::with_sliding_window`]): what its layers
    /// hold and what freeing their old blocks saves. The fields above then count both
    /// groups: each group's tokens and blocks at its own bytes per token.
    pub sliding: Option<SlidingUsage>,
}

/// What the sliding-window layers of a [`PagedCache`] hold ([`CacheUsage::sliding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlidingUsage {
    /// Layers in the group.
    pub layers: usize,
    /// Their window in tokens.
    pub window: usize,
    /// Tokens the group holds over all sequences (each sequence's last tokens).
    pub tokens: usize,
    /// Bytes of the group's blocks held.
    pub bytes_reserved: u64,
    /// Bytes of the group's pool.
    pub bytes_allocated: u64,
    /// Blocks of the group let go of as windows slid, since the cache was made.
    pub freed_blocks: u64,
    /// What the blocks held would take if these layers kept every token as the global
    /// ones do (an all-global cache: the global group's blocks at every layer's bytes).
    pub bytes_all_global: u64,
    /// `bytes_all_global` minus what both groups hold: the saving.
    pub bytes_saved: u64,
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
    /// The global group's pools as allocated: `spec` with only the global layers when
    /// there is a sliding group, `spec` itself otherwise.
    global_spec: StorageSpec,
    /// The sliding-window group, when the cache has one.
    sliding: Option<Sliding<B::Storage>>,
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
            global_spec: spec,
            sliding: None,
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
            global_spec: spec,
            sliding: None,
        })
    }

    /// A cache of two groups (vLLM's hybrid allocator): the layers `sliding` marks attend
    /// only to their last `W` tokens and keep them in a pool of their own
    /// (`sliding.num_blocks()` blocks), whose sequences let go of every block wholly older
    /// than the window as it slides; the other layers keep every token in a pool of
    /// `spec.num_blocks` blocks. `spec` describes the model (every layer); `prefix_salt`
    /// turns prefix reuse on, as in [`PagedCache::with_prefix_cache`].
    ///
    /// The caller's side does not change, with two rules: a sliding layer attends with the
    /// batch [`PagedCache::sliding_seq_attention`] describes, windowed
    /// ([`AttentionBatch::with_window`], at most `W`), and every reserved token is
    /// attended before its sequence's next [`reserve`](Self::reserve) (blocks slide out at
    /// that reserve). Writes take the slots `reserve` returned, for every layer.
    ///
    /// What cannot work with freed blocks is refused: a [`truncate`](Self::truncate) to a
    /// length whose next query would read freed keys (truncating to 0 always works),
    /// StreamingLLM's [`evict_window`](Self::evict_window), and saving or loading blocks
    /// ([`export_blocks`](Self::export_blocks), [`import_blocks`](Self::import_blocks)).
    /// A prompt reuses the most full blocks whose keys both groups still hold for its
    /// first new query ([`create_with_prefix`](Self::create_with_prefix)): the global
    /// group's from position 0, the sliding group's only from the window's start on. The
    /// sliding group keeps each sequence's hash chain across the blocks it lets go of
    /// ([`kv_core::CacheManager::drop_front`]), so the blocks it still holds (or that wait
    /// in its LRU queue) stay findable after the window slid; a prefix whose window blocks
    /// were evicted from the smaller pool is recomputed from the last block that rule
    /// allows.
    ///
    /// ```
    /// use std::num::NonZeroUsize;
    /// use kv_attention::{PagedCache, SlidingLayers};
    /// # use kv_core::{KvDType, ModelShape, StorageSpec};
    /// # fn demo<B: kv_core::CacheBackend>(backend: B) -> kv_core::Result<()> {
    /// let shape = ModelShape::builder().layers(6).q_heads(4).kv_heads(1).head_dim(64).build()?;
    /// let spec = StorageSpec::builder(shape, KvDType::F16).block_size(16).num_blocks(64).build()?;
    /// let w = NonZeroUsize::new(32).unwrap();
    /// let per_seq = SlidingLayers::blocks_per_sequence(w, 16, 1)?;
    /// let sliding = SlidingLayers::new(w, (0..6).map(|l| l != 5).collect(), per_seq)?;
    /// let mut cache = PagedCache::with_sliding_window(backend, spec, sliding, None)?;
    /// let seq = cache.create_sequence();
    /// for _ in 0..100 {
    ///     let slots = cache.reserve(seq, 1)?; // write every layer's K/V here, then attend
    /// #   let _ = slots;
    /// }
    /// assert_eq!(cache.len(seq)?, 100);
    /// assert!(cache.sliding_len(seq)? <= 48); // the window, in whole blocks
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when `sliding` does not list every layer of
    /// `spec.shape`, or for a layout with an f16 residual (`kivi4-r128`...);
    /// [`KvError::Overflow`] for pools whose size does not fit a `u64`; what
    /// [`CacheBackend::allocate`] returns.
    pub fn with_sliding_window(
        backend: B,
        spec: StorageSpec,
        sliding: SlidingLayers,
        prefix_salt: Option<u64>,
    ) -> Result<Self> {
        spec.bytes()?;
        let (global_spec, sliding_spec) = Sliding::<B::Storage>::split(&spec, &sliding)?;
        let manager = |blocks| match prefix_salt {
            Some(salt) => CacheManager::with_prefix_cache(spec.block_size, blocks, salt),
            None => CacheManager::new(spec.block_size, blocks),
        };
        let global_manager = manager(spec.num_blocks)?;
        let sliding_manager = manager(sliding.num_blocks())?;
        let storage = backend.allocate(&global_spec)?;
        let sliding_storage = backend.allocate(&sliding_spec)?;
        Ok(Self {
            backend,
            storage,
            manager: global_manager,
            spec,
            residual: HashMap::new(),
            global_spec,
            sliding: Some(Sliding {
                places: Sliding::<B::Storage>::places(&sliding),
                config: sliding,
                spec: sliding_spec,
                storage: sliding_storage,
                manager: sliding_manager,
                seqs: HashMap::new(),
                slots: HashMap::new(),
                reserved: HashMap::new(),
                freed_blocks: 0,
            }),
        })
    }

    /// The sliding-window layers, when the cache has that group.
    pub fn sliding_layers(&self) -> Option<&SlidingLayers> {
        self.sliding.as_ref().map(|s| &s.config)
    }

    /// The sliding group's bookkeeping, when the cache has one (read-only).
    pub fn sliding_manager(&self) -> Option<&CacheManager> {
        self.sliding.as_ref().map(|s| &s.manager)
    }

    /// The sliding group's pools, when the cache has one.
    pub fn sliding_storage(&self) -> Option<&B::Storage> {
        self.sliding.as_ref().map(|s| &s.storage)
    }

    /// Tokens the sliding layers of `seq` hold: its length less the blocks freed as the
    /// window slid (its length without a sliding group).
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn sliding_len(&self, seq: SeqId) -> Result<usize> {
        match &self.sliding {
            Some(s) => s.manager.len(s.seq(seq)?),
            None => self.manager.len(seq),
        }
    }

    /// The attention description of `seq`'s sliding layers with its last `n_queries`
    /// tokens as queries: what a sliding layer attends with (windowed). Cache indices there
    /// are positions less the tokens freed, for keys and queries alike, so the causal mask
    /// and the window select exactly the keys they select by position.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::InvalidArgument`] without a sliding group
    /// or for a bad `n_queries`.
    pub fn sliding_seq_attention(&self, seq: SeqId, n_queries: usize) -> Result<SeqAttention> {
        let s = self
            .sliding
            .as_ref()
            .ok_or_else(|| KvError::InvalidArgument {
                what: "sliding attention",
                detail: "this cache has no sliding-window group".into(),
            })?;
        s.manager.seq_attention(s.seq(seq)?, n_queries)
    }

    /// Where layer `layer`'s K/V lives (its own index without a sliding group).
    fn place(&self, layer: usize) -> Place {
        match &self.sliding {
            Some(s) => s
                .places
                .get(layer)
                .copied()
                .unwrap_or(Place::Global(usize::MAX)),
            None => Place::Global(layer),
        }
    }

    /// Refuses what a cache with a sliding group cannot do.
    fn refuse_sliding(&self, what: &str) -> Result<()> {
        if self.sliding.is_some() {
            return Err(KvError::Unsupported {
                backend: self.backend.name().to_string(),
                what: format!("{what} on a cache with a sliding-window group"),
            });
        }
        Ok(())
    }

    /// Registers the sliding sequence `local` for `seq` (no-op without a group).
    fn pair(&mut self, seq: SeqId, local: Option<SeqId>) {
        if let (Some(s), Some(local)) = (&mut self.sliding, local) {
            s.seqs.insert(seq, local);
        }
    }

    /// Drops `seq`'s sliding sequence and slot records.
    fn unpair(&mut self, seq: SeqId) -> Result<()> {
        if let Some(s) = &mut self.sliding {
            let local = s.seq(seq)?;
            s.forget_slots(seq);
            s.manager.free(local)?;
            s.seqs.remove(&seq);
        }
        Ok(())
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
        let local = self.sliding.as_mut().map(|s| s.manager.create_sequence());
        self.pair(seq, local);
        self.track(seq, 0);
        seq
    }

    /// Starts a sequence reusing the cached K/V of the longest full-block prefix of `prompt`
    /// (never its last token) and returns it with the number of tokens reused: compute,
    /// write and commit only `prompt[reused..]`. See
    /// [`CacheManager::create_with_prefix_salted`].
    pub fn create_with_prefix(&mut self, prompt: &[u32]) -> (SeqId, usize) {
        self.create_with_prefix_salted(prompt, 0)
    }

    /// [`PagedCache::create_with_prefix`] in the namespace `cache_salt` (tenant, adapter).
    ///
    /// With a sliding group, the rule is: reuse the most full blocks `n` such that the
    /// global group's index holds blocks `0..n` and the sliding group's holds the blocks a
    /// query at `n * block_size` reads (from `n * block_size + 1 - W` on,
    /// [`CacheManager::window_prefix_match`]); the sliding sequence then starts with the
    /// blocks before those freed. The rest is computed, so the result is that of no reuse.
    /// The global group is asked for that prefix only (its lookup counters then count it
    /// plus one token as the prompt).
    pub fn create_with_prefix_salted(&mut self, prompt: &[u32], cache_salt: u64) -> (SeqId, usize) {
        let Some(s) = &mut self.sliding else {
            let (seq, reused) = self.manager.create_with_prefix_salted(prompt, cache_salt);
            self.track(seq, 0);
            return (seq, reused);
        };
        let bs = self.spec.block_size;
        let window = s.config.window().get();
        let global = self.manager.prefix_match(prompt, cache_salt).blocks;
        let (n, _) = s
            .manager
            .window_prefix_match(prompt, cache_salt, window, global);
        let (local_seq, _) = s
            .manager
            .create_with_window_prefix(prompt, cache_salt, window, n);
        // `n <= global` blocks, below the prompt's length: `..n * bs + 1` reuses exactly
        // `n` blocks.
        let ask = if n < global {
            &prompt[..n * bs + 1]
        } else {
            prompt
        };
        let (seq, reused) = self.manager.create_with_prefix_salted(ask, cache_salt);
        debug_assert_eq!(reused, n * bs);
        self.pair(seq, Some(local_seq));
        self.track(seq, 0);
        (seq, reused)
    }

    /// What a prompt would reuse now and the free blocks admitting it would take (the
    /// global group's blocks; with a sliding group, by the rule of
    /// [`PagedCache::create_with_prefix_salted`]).
    pub fn prefix_match(&self, prompt: &[u32], cache_salt: u64) -> PrefixMatch {
        let found = self.manager.prefix_match(prompt, cache_salt);
        let common = self.sliding.as_ref().map_or(found.tokens, |s| {
            let window = s.config.window().get();
            s.manager
                .window_prefix_match(prompt, cache_salt, window, found.blocks)
                .0
                * self.spec.block_size
        });
        if common >= found.tokens {
            return found;
        }
        // `common` is whole blocks below the prompt's length.
        let mut m = self.manager.prefix_match(&prompt[..common + 1], cache_salt);
        m.blocks_needed =
            m.revived_blocks + (prompt.len() - m.tokens).div_ceil(self.spec.block_size);
        m
    }

    /// Records the ids of `seq`'s next reserved tokens once their K/V is written in every
    /// layer; full blocks enter the prefix index. See [`CacheManager::commit`].
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`], [`kv_core::KvError::OutOfRange`]; nothing
    /// changes on error.
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let Some(s) = &mut self.sliding else {
            return self.manager.commit(seq, tokens);
        };
        let local = s.seq(seq)?;
        self.manager.commit(seq, tokens)?;
        // The sliding sequence has committed as many ids as the global one (in text order,
        // those of tokens it already let go of included: they carry its hash chain on).
        s.manager.commit(local, tokens)
    }

    /// Pauses `seq`, freeing its blocks, and returns its committed ids to resume it with
    /// later. See [`CacheManager::preempt`].
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`].
    pub fn preempt(&mut self, seq: SeqId) -> Result<Preempted> {
        self.settle_private(seq, 0)?;
        if let Some(s) = &self.sliding {
            s.seq(seq)?;
        }
        let preempted = self.manager.preempt(seq)?;
        self.unpair(seq)?;
        self.residual.remove(&seq);
        Ok(preempted)
    }

    /// Block counts (used, shared, cached, empty) and prefix-cache counters of the global
    /// group (every layer without a sliding group).
    pub fn stats(&self) -> CacheStats {
        self.manager.stats()
    }

    /// [`PagedCache::stats`] of the sliding group, when the cache has one.
    pub fn sliding_stats(&self) -> Option<CacheStats> {
        self.sliding.as_ref().map(|s| s.manager.stats())
    }

    /// A new sequence sharing `seq`'s tokens (copy-on-write).
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`].
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let local = match &mut self.sliding {
            Some(s) => Some(s.manager.fork(s.seq(seq)?)?),
            None => None,
        };
        let child = match self.manager.fork(seq) {
            Ok(child) => child,
            Err(e) => {
                if let (Some(s), Some(local)) = (&mut self.sliding, local) {
                    // Cannot fail: `local` was just made.
                    let _ = s.manager.free(local);
                }
                return Err(e);
            }
        };
        self.pair(child, local);
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
        if let Some(s) = &mut self.sliding {
            // Blocks no query from `before` on reads leave first, making room.
            let local = s.seq(seq)?;
            s.slide(local, before)?;
        }
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
        if let Some(s) = &mut self.sliding {
            let local = s.seq(seq)?;
            let storage = &mut s.storage;
            match s
                .manager
                .reserve_and_copy(local, n, |copies| backend.copy_blocks(storage, copies))
            {
                Ok(l) => s.record_slots(seq, &reserved.slots, &l.slots),
                Err(e) => {
                    // Cannot fail: `seq` exists and `before` is within its length.
                    let _ = self.manager.truncate(seq, before);
                    return Err(e);
                }
            }
        }
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

    /// Whether [`PagedCache::truncate`] to `len` can keep `seq`'s tokens before `len`:
    /// always without a sliding group or for `len == 0`; with one, only while the sliding
    /// layers still hold every key a query at `len` reads (from `len + 1 - W` on).
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn can_truncate(&self, seq: SeqId, len: usize) -> Result<bool> {
        let total = self.manager.len(seq)?;
        let Some(s) = &self.sliding else {
            return Ok(len <= total);
        };
        let evicted = s.manager.evicted_tokens(s.seq(seq)?)?;
        let first_read = len
            .saturating_add(1)
            .saturating_sub(s.config.window().get());
        Ok(len <= total && (len == 0 || evicted <= first_read))
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
        if let Some(s) = &mut self.sliding {
            let local = s.seq(seq)?;
            let evicted = s.manager.evicted_tokens(local)?;
            let first_read = (len + 1).saturating_sub(s.config.window().get());
            if len == 0 && evicted > 0 {
                // Start the sliding side afresh: nothing before position 0 is needed.
                let fresh = s.manager.create_sequence();
                s.manager.free(local)?;
                s.seqs.insert(seq, fresh);
            } else if evicted > first_read {
                return Err(KvError::InvalidArgument {
                    what: "truncate",
                    detail: format!(
                        "sequence {seq}'s sliding-window layers freed its first {evicted} \
                         tokens; at length {len} the next query reads from position \
                         {first_read}: recompute it in a new sequence"
                    ),
                });
            } else {
                s.manager.truncate(local, len - evicted)?;
            }
            s.forget_slots(seq);
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
        self.refuse_sliding("StreamingLLM eviction")?;
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
        if let Some(s) = &self.sliding {
            s.seq(seq)?;
        }
        self.manager.free(seq)?;
        self.unpair(seq)?;
        self.residual.remove(&seq);
        Ok(())
    }

    /// Stores one layer's K/V (`[slots.len(), kv_heads, head_dim]`) into `slots`.
    ///
    /// With a sliding group the slots are always those [`PagedCache::reserve`] returned
    /// (from each sequence's last reserve); a sliding layer writes the same tokens into its
    /// own group.
    ///
    /// # Errors
    /// What [`CacheBackend::write`] returns; [`KvError::InvalidArgument`] for a sliding
    /// layer and a slot no sequence's last reserve handed out; [`KvError::OutOfRange`] for
    /// a layer past the model's with a sliding group.
    pub fn write(&mut self, layer: usize, slots: &[Slot], k: &Tensor, v: &Tensor) -> Result<()> {
        match (self.place(layer), &mut self.sliding) {
            (Place::Sliding(i), Some(s)) => {
                let local = s.translate(slots)?;
                self.backend.write(&mut s.storage, i, &local, k, v)
            }
            (Place::Global(usize::MAX), Some(_)) => Err(self.no_layer(layer)),
            (Place::Global(i), _) | (Place::Sliding(i), None) => {
                self.backend.write(&mut self.storage, i, slots, k, v)
            }
        }
    }

    fn no_layer(&self, layer: usize) -> KvError {
        KvError::OutOfRange {
            what: "layer",
            index: layer,
            len: self.spec.shape.n_layers(),
        }
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
    ///
    /// With a sliding group, a sliding layer attends with the batch of
    /// [`PagedCache::sliding_seq_attention`] and a window of at most the group's:
    /// [`KvError::InvalidArgument`] otherwise (its freed keys would be read).
    pub fn attend(&self, layer: usize, q: &Tensor, batch: &AttentionBatch) -> Result<Tensor> {
        match (self.place(layer), &self.sliding) {
            (Place::Sliding(i), Some(s)) => {
                let w = s.config.window();
                if batch.window.is_none_or(|b| b > w) {
                    return Err(KvError::InvalidArgument {
                        what: "attention batch",
                        detail: format!(
                            "layer {layer} keeps only its last {w} tokens; its batch needs \
                             a window of at most {w}, got {:?}",
                            batch.window.map(|b| b.get())
                        ),
                    });
                }
                self.backend.attend(&s.storage, i, q, batch)
            }
            (Place::Global(usize::MAX), Some(_)) => Err(self.no_layer(layer)),
            (Place::Global(i), _) | (Place::Sliding(i), None) => {
                self.backend.attend(&self.storage, i, q, batch)
            }
        }
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
        let bs = self.spec.block_size as u64;
        let per_block = per_token as u64 * bs;
        let Some(s) = &self.sliding else {
            return CacheUsage {
                tokens,
                bytes_used: per_token as u64 * tokens as u64,
                bytes_reserved: per_block * self.manager.used_blocks() as u64,
                bytes_allocated: per_block * self.spec.num_blocks as u64,
                bytes_per_token: per_token,
                sliding: None,
            };
        };
        // Each group's pools were checked at construction in the same way.
        let per_token_of = |spec: &StorageSpec| {
            memory::bytes_per_token(&spec.shape, spec.dtype).unwrap_or(0) as u64
        };
        let (global, local) = (per_token_of(&self.global_spec), per_token_of(&s.spec));
        let local_tokens: usize = s
            .manager
            .sequences()
            .filter_map(|q| s.manager.len(q).ok())
            .sum();
        let global_reserved = global * bs * self.manager.used_blocks() as u64;
        let local_reserved = local * bs * s.manager.used_blocks() as u64;
        let all_global = per_block * self.manager.used_blocks() as u64;
        CacheUsage {
            tokens,
            bytes_used: global * tokens as u64 + local * local_tokens as u64,
            bytes_reserved: global_reserved + local_reserved,
            bytes_allocated: global * bs * self.spec.num_blocks as u64
                + local * bs * s.spec.num_blocks as u64,
            bytes_per_token: per_token,
            sliding: Some(SlidingUsage {
                layers: s.config.sliding_layers(),
                window: s.config.window().get(),
                tokens: local_tokens,
                bytes_reserved: local_reserved,
                bytes_allocated: local * bs * s.spec.num_blocks as u64,
                freed_blocks: s.freed_blocks,
                bytes_all_global: all_global,
                bytes_saved: all_global.saturating_sub(global_reserved + local_reserved),
            }),
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
        self.refuse_sliding("saving blocks")?;
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
    /// [`kv_core::KvError::Unsupported`] on a cache with a sliding-window group (a global
    /// block holds only the global layers; [`PagedCache::export_groups`] saves both); what
    /// the backend's export returns (an id out of range among them).
    pub fn export_block(&self, block: kv_core::BlockId) -> Result<Vec<u8>> {
        self.refuse_sliding("saving blocks")?;
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
        self.refuse_sliding("loading blocks")?;
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

/// One of the two cache groups of a [`PagedCache`] with a sliding-window group (a
/// one-group cache has only the global one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Group {
    Global,
    Sliding,
}

/// A sequence's saved K/V in both groups of a [`PagedCache`]
/// ([`PagedCache::export_groups`]): every full block of the global group, and the full
/// blocks the sliding group still holds, which start at block `sliding_first` (the ones
/// before it were freed as the window slid). Without a sliding group, `sliding` is empty
/// and `sliding_first` is the number of global blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupBlocks {
    /// Exported bytes of blocks `0..n` of the global group (every layer without a sliding
    /// group).
    pub global: Vec<Vec<u8>>,
    /// Index of the first block `sliding` holds (in blocks from position 0).
    pub sliding_first: usize,
    /// Exported bytes of blocks `sliding_first..n` of the sliding group.
    pub sliding: Vec<Vec<u8>>,
}

impl<B: CacheBackend> PagedCache<B> {
    /// The first full block the sliding layers must hold for a sequence of `n_blocks` full
    /// blocks to go on: the block holding the first key its next query reads
    /// (`n * block_size + 1 - W`). 0 without a sliding group.
    fn window_first_block(&self, n_blocks: usize) -> usize {
        let bs = self.spec.block_size;
        self.sliding.as_ref().map_or(0, |s| {
            n_blocks
                .saturating_mul(bs)
                .saturating_add(1)
                .saturating_sub(s.config.window().get())
                / bs
        })
    }

    /// The blocks of the first `n_blocks` full blocks of `seq`'s committed tokens in each
    /// group: what [`PagedCache::import_groups`] restores exactly. With a sliding group, the
    /// sliding layers' blocks from the first one they still hold (never more than the
    /// window needs is lost: a query after the `n_blocks` blocks reads only those).
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`]; [`kv_core::KvError::InvalidArgument`] when
    /// `seq` has fewer committed tokens, or when its sliding layers already freed keys a
    /// query after `n_blocks` blocks reads (a length it has gone past by more than the
    /// window allows); what the backend's export returns.
    pub fn export_groups(&self, seq: SeqId, n_blocks: usize) -> Result<GroupBlocks> {
        let Some(s) = &self.sliding else {
            return Ok(GroupBlocks {
                global: self.export_blocks(seq, n_blocks)?,
                sliding_first: n_blocks,
                sliding: Vec::new(),
            });
        };
        let bs = self.spec.block_size;
        let committed = self.manager.tokens(seq)?.len();
        if n_blocks.checked_mul(bs).is_none_or(|n| n > committed) {
            return Err(KvError::InvalidArgument {
                what: "exported blocks",
                detail: format!(
                    "{n_blocks} blocks of {bs} tokens asked, sequence {seq} has {committed} \
                     committed tokens"
                ),
            });
        }
        let local = s.seq(seq)?;
        let first = s.manager.evicted_tokens(local)? / bs;
        if first > self.window_first_block(n_blocks) {
            return Err(KvError::InvalidArgument {
                what: "exported blocks",
                detail: format!(
                    "sequence {seq}'s sliding-window layers freed its first {first} blocks; \
                     a query after {n_blocks} blocks reads keys from block {}",
                    self.window_first_block(n_blocks)
                ),
            });
        }
        self.export_from(seq, n_blocks, first)
    }

    /// Blocks `0..n_blocks` of the global group and `first..n_blocks` of the sliding one
    /// (`first` at least the first block the twin holds, at most `n_blocks`, and
    /// `n_blocks` full blocks committed: the callers check).
    fn export_from(&self, seq: SeqId, n_blocks: usize, first: usize) -> Result<GroupBlocks> {
        let s = self
            .sliding
            .as_ref()
            .ok_or(KvError::UnknownSequence { id: seq })?;
        let local = s.seq(seq)?;
        let held = s.manager.evicted_tokens(local)? / self.spec.block_size;
        let export = |storage: &B::Storage, blocks: &[BlockId]| -> Result<Vec<Vec<u8>>> {
            blocks
                .iter()
                .map(|&b| {
                    let mut out = Vec::new();
                    self.backend.export_block(storage, b, &mut out)?;
                    Ok(out)
                })
                .collect()
        };
        let global = export(
            &self.storage,
            &self.manager.table(seq)?.blocks()[..n_blocks],
        )?;
        // `held <= first <= n_blocks`, and the twin holds every block from `held` through
        // the sequence's end, so its blocks `first - held..n_blocks - held` exist.
        let table = s.manager.table(local)?;
        let sliding = export(&s.storage, &table.blocks()[first - held..n_blocks - held])?;
        Ok(GroupBlocks {
            global,
            sliding_first: first,
            sliding,
        })
    }

    /// Like [`PagedCache::export_groups`], for a sequence that may have gone past
    /// `n_blocks`: the global group's blocks `0..n_blocks` and the sliding group's blocks
    /// it still holds among them (from its first held block, or none), without the check
    /// that they cover what a query after `n_blocks` reads. What the tiers store: a
    /// restore of a prefix of `m <= n_blocks` blocks uses them when they cover
    /// `window_first_block(m)..m` ([`crate::TieredCache`]).
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`]; [`kv_core::KvError::Unsupported`] on a cache
    /// without a sliding group ([`PagedCache::export_blocks`] serves those);
    /// [`kv_core::KvError::InvalidArgument`] when `seq` has fewer committed tokens; what
    /// the backend's export returns.
    pub fn export_held_groups(&self, seq: SeqId, n_blocks: usize) -> Result<GroupBlocks> {
        let Some(s) = &self.sliding else {
            return Err(KvError::Unsupported {
                backend: self.backend.name().to_string(),
                what: "exporting held groups on a cache without a sliding-window group".into(),
            });
        };
        let bs = self.spec.block_size;
        let committed = self.manager.tokens(seq)?.len();
        if n_blocks.checked_mul(bs).is_none_or(|n| n > committed) {
            return Err(KvError::InvalidArgument {
                what: "exported blocks",
                detail: format!(
                    "{n_blocks} blocks of {bs} tokens asked, sequence {seq} has {committed} \
                     committed tokens"
                ),
            });
        }
        let held = s.manager.evicted_tokens(s.seq(seq)?)? / bs;
        self.export_from(seq, n_blocks, held.min(n_blocks))
    }

    /// The bookkeeping of `group` (`None` for the sliding group of a one-group cache).
    pub(crate) fn group_manager(&self, group: Group) -> Option<&CacheManager> {
        match group {
            Group::Global => Some(&self.manager),
            Group::Sliding => self.sliding_manager(),
        }
    }

    /// The blocks `seq`'s sliding twin holds and the text block the first of them holds
    /// (`None` without a sliding group).
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub(crate) fn sliding_table(&self, seq: SeqId) -> Result<Option<(usize, Vec<BlockId>)>> {
        let Some(s) = &self.sliding else {
            return Ok(None);
        };
        let local = s.seq(seq)?;
        let first = s.manager.evicted_tokens(local)? / self.spec.block_size;
        Ok(Some((first, s.manager.table(local)?.blocks().to_vec())))
    }

    /// The bytes of `block` of `group`, whatever the cache's groups: what the tiers write
    /// down when that group's pool is about to evict it.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for the sliding group of a one-group cache; what the
    /// backend's export returns.
    pub(crate) fn export_group_block(&self, group: Group, block: BlockId) -> Result<Vec<u8>> {
        let storage = match (group, &self.sliding) {
            (Group::Global, _) => &self.storage,
            (Group::Sliding, Some(s)) => &s.storage,
            (Group::Sliding, None) => {
                return Err(KvError::InvalidArgument {
                    what: "exported block",
                    detail: "a one-group cache has no sliding-window group".into(),
                })
            }
        };
        let mut out = Vec::new();
        self.backend.export_block(storage, block, &mut out)?;
        Ok(out)
    }

    /// The sliding group's blocks that reserving `appends` could allocate: an upper bound,
    /// counted before each twin lets go of the blocks behind its window (0 without a
    /// sliding group).
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; the manager's errors.
    pub(crate) fn sliding_blocks_needed_batch(&self, appends: &[(SeqId, usize)]) -> Result<usize> {
        let Some(s) = &self.sliding else {
            return Ok(0);
        };
        let locals = appends
            .iter()
            .map(|&(seq, n)| Ok((s.seq(seq)?, n)))
            .collect::<Result<Vec<_>>>()?;
        s.manager.blocks_needed_batch(&locals)
    }

    /// The first full block a sliding layer reads for a query after `n_blocks` full
    /// blocks (`(n * block_size + 1 - W) / block_size`); 0 without a sliding group.
    pub fn window_first_block_after(&self, n_blocks: usize) -> usize {
        self.window_first_block(n_blocks)
    }

    /// Checks that blocks shaped as [`PagedCache::export_groups`] returns them can be
    /// imported: `n_blocks` global blocks, the sliding group's `sliding` blocks from block
    /// `sliding_first` to the end and covering what the next query reads (none, and
    /// `sliding_first == n_blocks`, without a sliding group).
    ///
    /// # Errors
    /// [`kv_core::KvError::InvalidArgument`] naming what does not line up.
    pub fn check_groups(
        &self,
        n_blocks: usize,
        sliding_first: usize,
        sliding: usize,
    ) -> Result<()> {
        let bad = |detail: String| {
            Err(KvError::InvalidArgument {
                what: "imported groups",
                detail,
            })
        };
        match &self.sliding {
            None if sliding != 0 || sliding_first != n_blocks => bad(format!(
                "{sliding} sliding-window blocks for a cache without a sliding-window group"
            )),
            None => Ok(()),
            Some(_) if sliding_first.checked_add(sliding) != Some(n_blocks) => bad(format!(
                "sliding-window blocks {sliding_first}..{} do not end at block {n_blocks}",
                sliding_first.saturating_add(sliding)
            )),
            Some(_) if sliding_first > self.window_first_block(n_blocks) => bad(format!(
                "the sliding-window blocks start at block {sliding_first}; a query after \
                 {n_blocks} blocks reads keys from block {}",
                self.window_first_block(n_blocks)
            )),
            Some(_) => Ok(()),
        }
    }

    /// Fills the empty sequence `seq` from exported blocks of both groups (what
    /// [`PagedCache::export_groups`] returned) and commits `tokens` (full blocks), so it
    /// continues exactly as the exported sequence did: the sliding layers hold the same
    /// blocks, after the same freed ones. All or nothing: on error `seq` is empty again.
    ///
    /// # Errors
    /// [`kv_core::KvError::InvalidArgument`] when `seq` is not empty or the counts do not
    /// line up ([`PagedCache::check_groups`]); what [`PagedCache::reserve`] and
    /// [`CacheBackend::import_block`] return (a block of another size among them).
    pub fn import_groups(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        global: &[&[u8]],
        sliding_first: usize,
        sliding: &[&[u8]],
    ) -> Result<()> {
        if self.sliding.is_none() {
            self.check_groups(global.len(), sliding_first, sliding.len())?;
            return self.import_blocks(seq, tokens, global);
        }
        let bs = self.spec.block_size;
        let n = global.len();
        self.check_groups(n, sliding_first, sliding.len())?;
        let len = self.manager.len(seq)?;
        if len != 0 || n.checked_mul(bs) != Some(tokens.len()) {
            return Err(KvError::InvalidArgument {
                what: "imported groups",
                detail: format!(
                    "{} tokens for {n} blocks of {bs} into a sequence of {len} tokens (it \
                     must be empty)",
                    tokens.len()
                ),
            });
        }
        let result = self.fill_groups(seq, tokens, global, sliding_first, sliding);
        if result.is_err() {
            // Cannot fail: `seq` exists, and 0 is within its length.
            let _ = self.truncate(seq, 0);
        }
        result
    }

    /// [`PagedCache::import_groups`] once checked (a two-group cache, `seq` empty).
    fn fill_groups(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        global: &[&[u8]],
        sliding_first: usize,
        sliding: &[&[u8]],
    ) -> Result<()> {
        let bs = self.spec.block_size;
        let (backend, storage) = (&self.backend, &mut self.storage);
        let reserved = self
            .manager
            .reserve_and_copy(seq, tokens.len(), |c| backend.copy_blocks(storage, c))?;
        for (i, bytes) in global.iter().enumerate() {
            backend.import_block(storage, reserved.slots[i * bs].block, bytes)?;
        }
        let s = self
            .sliding
            .as_mut()
            .ok_or(KvError::UnknownSequence { id: seq })?;
        if s.manager.len(s.seq(seq)?)? != 0 || s.manager.evicted_tokens(s.seq(seq)?)? != 0 {
            // A twin that slid before (the sequence was truncated to 0 and kept it): start
            // afresh.
            let fresh = s.manager.create_sequence();
            s.manager.free(s.seq(seq)?)?;
            s.seqs.insert(seq, fresh);
        }
        let local = s.seq(seq)?;
        // The freed leading blocks: reserved and let go of one at a time (nothing is
        // committed yet, so each goes back to the free list at once).
        for _ in 0..sliding_first {
            s.manager.reserve(local, bs)?;
            s.manager.drop_front(local, 1)?;
        }
        let storage = &mut s.storage;
        let held = s.manager.reserve_and_copy(local, sliding.len() * bs, |c| {
            backend.copy_blocks(storage, c)
        })?;
        for (i, bytes) in sliding.iter().enumerate() {
            backend.import_block(storage, held.slots[i * bs].block, bytes)?;
        }
        s.forget_slots(seq);
        self.manager.commit(seq, tokens)?;
        s.manager.commit(local, tokens)
    }

    /// Brings stored blocks into the groups' prefix indexes, held by no sequence: cached,
    /// as a finished sequence's blocks are, so every prompt that reuses them shares one
    /// copy (a tier's restore on a two-group cache, where one prompt may need only the
    /// window blocks another prompt's restore did not bring). Each run `(group, first,
    /// blocks)` holds the exported bytes of that group's blocks `first..` of `text` (all
    /// within `text`'s whole blocks). All or nothing: on an error nothing is indexed, and
    /// the error comes with the run and block that failed. A block the index already
    /// holds is imported and let go of again.
    pub(crate) fn stage_blocks(
        &mut self,
        text: &[u32],
        runs: &[(Group, usize, Vec<&[u8]>)],
    ) -> std::result::Result<(), (usize, usize, KvError)> {
        let bs = self.spec.block_size;
        let Self {
            backend,
            manager,
            storage,
            sliding,
            ..
        } = self;
        let mut held: Vec<(Group, SeqId)> = Vec::with_capacity(runs.len());
        let mut failure = None;
        for (r, (group, first, blocks)) in runs.iter().enumerate() {
            let (manager, storage) = match (group, sliding.as_mut()) {
                (Group::Global, _) => (&mut *manager, &mut *storage),
                (Group::Sliding, Some(s)) => (&mut s.manager, &mut s.storage),
                (Group::Sliding, None) => {
                    let detail = "a one-group cache has no sliding-window group".into();
                    failure = Some((
                        r,
                        0,
                        KvError::InvalidArgument {
                            what: "staged blocks",
                            detail,
                        },
                    ));
                    break;
                }
            };
            let end = first
                .checked_add(blocks.len())
                .and_then(|b| b.checked_mul(bs));
            if end.is_none_or(|e| e > text.len()) {
                let detail = format!(
                    "blocks {first}..{} of {bs} beyond a text of {} tokens",
                    first.saturating_add(blocks.len()),
                    text.len()
                );
                failure = Some((
                    r,
                    0,
                    KvError::InvalidArgument {
                        what: "staged blocks",
                        detail,
                    },
                ));
                break;
            }
            let seq = match manager.create_after(&text[..first * bs], 0) {
                Ok(seq) => seq,
                Err(e) => {
                    failure = Some((r, 0, e));
                    break;
                }
            };
            held.push((*group, seq));
            let slots = match manager
                .reserve_and_copy(seq, blocks.len() * bs, |c| backend.copy_blocks(storage, c))
            {
                Ok(reserved) => reserved.slots,
                Err(e) => {
                    failure = Some((r, 0, e));
                    break;
                }
            };
            if let Some((i, e)) = blocks.iter().enumerate().find_map(|(i, bytes)| {
                backend
                    .import_block(storage, slots[i * bs].block, bytes)
                    .err()
                    .map(|e| (i, e))
            }) {
                failure = Some((r, i, e));
                break;
            }
        }
        for (r, &(group, seq)) in held.iter().enumerate() {
            let manager = match (group, sliding.as_mut()) {
                (Group::Sliding, Some(s)) => &mut s.manager,
                _ => &mut *manager,
            };
            if failure.is_none() {
                let (_, first, blocks) = &runs[r];
                if let Err(e) = manager.commit(seq, &text[first * bs..(first + blocks.len()) * bs])
                {
                    failure = Some((r, 0, e));
                }
            }
            // Cannot fail: `seq` was just created. Committed blocks stay cached, the others
            // go back to the free list.
            let _ = manager.free(seq);
        }
        failure.map_or(Ok(()), Err)
    }
}

impl<B: CacheBackend> std::fmt::Debug for PagedCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedCache")
            .field("backend", &self.backend.name())
            .field("spec", &self.spec)
            .field("manager", &self.manager)
            .field(
                "sliding",
                &self.sliding.as_ref().map(|s| (&s.config, &s.manager)),
            )
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
        fn export_block(&self, s: &Rows, block: BlockId, out: &mut Vec<u8>) -> Result<()> {
            let bs = s.spec.block_size;
            for layer in &s.k {
                for v in &layer[block.index() * bs..][..bs] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Ok(())
        }
        fn import_block(&self, s: &mut Rows, block: BlockId, bytes: &[u8]) -> Result<()> {
            let bs = s.spec.block_size;
            if bytes.len() != s.k.len() * bs * 4 {
                return Err(KvError::InvalidArgument {
                    what: "block bytes",
                    detail: format!("{} bytes", bytes.len()),
                });
            }
            for (l, layer) in s.k.iter_mut().enumerate() {
                for (i, v) in layer[block.index() * bs..][..bs].iter_mut().enumerate() {
                    let at = (l * bs + i) * 4;
                    *v = f32::from_le_bytes([
                        bytes[at],
                        bytes[at + 1],
                        bytes[at + 2],
                        bytes[at + 3],
                    ]);
                }
            }
            Ok(())
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

    /// A 6-layer cache, layers 0-4 sliding through a 6-token window, blocks of 4.
    fn sliding_cache(prefix: bool) -> Result<PagedCache<Recorder>> {
        let spec = StorageSpec::new(ModelShape::new(6, 1, 1, 1)?, KvDType::F32, 4, 16)?;
        let w = std::num::NonZeroUsize::new(6).unwrap_or(std::num::NonZeroUsize::MIN);
        let sliding = SlidingLayers::new(w, (0..6).map(|l| l != 5).collect(), 12)?;
        PagedCache::with_sliding_window(Recorder::new(), spec, sliding, prefix.then_some(9))
    }

    /// Writes token ids (as K) in every layer of `slots`.
    fn write_all(c: &mut PagedCache<Recorder>, slots: &[Slot], tokens: &[u32]) -> Result<()> {
        let k: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
        let k = Tensor::from_vec(k, (tokens.len(), 1, 1), &Device::Cpu)?;
        for layer in 0..6 {
            c.write(layer, slots, &k, &k)?;
        }
        Ok(())
    }

    /// The values a sliding layer's query at the end of `seq` reads, with their positions
    /// (its cache indices plus the tokens freed).
    fn window_keys(c: &PagedCache<Recorder>, seq: SeqId) -> Result<Vec<(usize, f32)>> {
        let attn = c.sliding_seq_attention(seq, 1)?;
        let freed = c.len(seq)? - c.sliding_len(seq)?;
        let batch = AttentionBatch::new(vec![attn.clone()], 1).with_window(
            c.sliding_layers()
                .map_or(std::num::NonZeroUsize::MIN, |s| s.window()),
        );
        let last = attn.kv_len() - 1;
        let slots: Vec<Slot> = (batch.first_visible_key(last)..=last)
            .filter_map(|i| attn.slot(i, 4))
            .collect();
        let storage = c
            .sliding_storage()
            .ok_or(KvError::UnknownSequence { id: seq })?;
        let k: Vec<f32> = c
            .backend()
            .read(storage, 2, &slots)?
            .0
            .flatten_all()?
            .to_vec1()?;
        Ok((batch.first_visible_key(last)..=last)
            .map(|i| i + freed)
            .zip(k)
            .collect())
    }

    fn audit(c: &PagedCache<Recorder>) {
        assert_eq!(c.manager().audit(), Ok(()));
        assert_eq!(c.sliding_manager().map(CacheManager::audit), Some(Ok(())));
    }

    #[test]
    fn sliding_group_frees_blocks_behind_the_window_and_keeps_what_queries_read() -> Result<()> {
        let mut c = sliding_cache(false)?;
        let a = c.create_sequence();
        // A prompt of 10 tokens at once: the sliding group holds all of it while it runs.
        let prompt: Vec<u32> = (100..110).collect();
        let slots = c.reserve(a, 10)?;
        write_all(&mut c, &slots, &prompt)?;
        assert_eq!(c.sliding_len(a)?, 10);
        for t in 110..150u32 {
            let slots = c.reserve(a, 1)?;
            write_all(&mut c, &slots, &[t])?;
            let len = c.len(a)?;
            // At most floor((1 + 6 - 2) / 4) + 2 = 3 blocks stay.
            assert!(c.sliding_len(a)? <= 12, "{} tokens held", c.sliding_len(a)?);
            let held = c.sliding_stats().map_or(0, |s| s.used_blocks);
            assert!(
                held <= SlidingLayers::blocks_per_sequence(
                    std::num::NonZeroUsize::new(6).unwrap_or(std::num::NonZeroUsize::MIN),
                    4,
                    1
                )?
            );
            // The window is exactly the last 6 positions, each with its own token.
            let want: Vec<(usize, f32)> = (len - 6..len).map(|p| (p, (100 + p) as f32)).collect();
            assert_eq!(window_keys(&c, a)?, want);
            audit(&c);
        }
        // The global layer kept everything.
        assert_eq!(
            read_global(&c, a)?,
            (100..150).map(|t| t as f32).collect::<Vec<_>>()
        );
        let usage = c.usage();
        let sliding = usage.sliding.ok_or(KvError::UnknownSequence { id: a })?;
        let blocks = c.sliding_stats().map_or(0, |s| s.used_blocks) as u64;
        // K and V, f32 of one element: 8 bytes a token and layer; 5 sliding layers.
        assert_eq!(sliding.bytes_reserved, blocks * 4 * 5 * 8);
        assert_eq!(sliding.bytes_all_global, 13 * 4 * 6 * 8);
        assert_eq!(usage.bytes_reserved, 13 * 4 * 8 + blocks * 4 * 5 * 8);
        assert_eq!(
            sliding.bytes_saved,
            sliding.bytes_all_global - usage.bytes_reserved
        );
        assert!(sliding.freed_blocks >= 9);
        Ok(())
    }

    #[test]
    fn both_groups_export_and_import_so_a_sequence_continues_identically() -> Result<()> {
        let mut c = sliding_cache(false)?;
        let a = c.create_sequence();
        for t in 0..40u32 {
            let slots = c.reserve(a, 1)?;
            write_all(&mut c, &slots, &[t])?;
            c.commit(a, &[t])?;
        }
        let tokens: Vec<u32> = (0..40).collect();
        // Back to 37 the next query reads from 32, still held; back to 36 it reads 31, freed.
        assert!(c.can_truncate(a, 37)? && c.can_truncate(a, 0)?);
        assert!(!c.can_truncate(a, 36)? && !c.can_truncate(a, 41)?);
        // A query at 40 reads from 35 (block 8); the twin freed blocks 0..8.
        let saved = c.export_groups(a, 10)?;
        assert_eq!((saved.global.len(), saved.sliding_first), (10, 8));
        assert_eq!(saved.sliding.len(), 2);
        // Nine blocks would need block 7, freed: a typed error, not a short window.
        assert!(matches!(
            c.export_groups(a, 9),
            Err(KvError::InvalidArgument { .. })
        ));

        let mut d = sliding_cache(false)?;
        let b = d.create_sequence();
        let global: Vec<&[u8]> = saved.global.iter().map(Vec::as_slice).collect();
        let sliding: Vec<&[u8]> = saved.sliding.iter().map(Vec::as_slice).collect();
        // Blocks that would leave the window short, or a second copy: refused, `b` empty.
        assert!(d
            .import_groups(b, &tokens, &global, 9, &sliding[1..])
            .is_err());
        assert!(d.import_groups(b, &tokens, &global, 7, &sliding).is_err());
        assert_eq!((d.len(b)?, d.sliding_len(b)?), (0, 0));
        d.import_groups(b, &tokens, &global, saved.sliding_first, &sliding)?;
        assert!(matches!(
            d.import_groups(b, &tokens, &global, 8, &sliding),
            Err(KvError::InvalidArgument { .. })
        ));
        assert_eq!((d.len(b)?, d.sliding_len(b)?), (40, 8));
        assert_eq!(d.manager().tokens(b)?, tokens.as_slice());
        audit(&d);
        // Both go on the same way: the same keys in the window and the global layer.
        for t in 40..60u32 {
            for (cache, seq) in [(&mut c, a), (&mut d, b)] {
                let slots = cache.reserve(seq, 1)?;
                write_all(cache, &slots, &[t])?;
                cache.commit(seq, &[t])?;
            }
            assert_eq!(window_keys(&c, a)?, window_keys(&d, b)?);
            audit(&d);
        }
        assert_eq!(read_global(&c, a)?, read_global(&d, b)?);

        // A one-group cache takes no sliding blocks.
        let mut one = cache(false)?;
        let e = one.create_sequence();
        assert!(one
            .import_groups(e, &tokens[..4], &[&[0u8; 32]], 0, &[&[0u8; 32]])
            .is_err());
        Ok(())
    }

    fn read_global(c: &PagedCache<Recorder>, seq: SeqId) -> Result<Vec<f32>> {
        let table = c.manager().table(seq)?;
        let slots: Vec<Slot> = (0..table.len()).filter_map(|i| table.slot(i, 4)).collect();
        Ok(c.backend()
            .read(c.storage(), 0, &slots)?
            .0
            .flatten_all()?
            .to_vec1()?)
    }

    #[test]
    fn sliding_group_forks_truncates_and_frees() -> Result<()> {
        let mut c = sliding_cache(false)?;
        let a = c.create_sequence();
        for t in 0..20u32 {
            let slots = c.reserve(a, 1)?;
            write_all(&mut c, &slots, &[t])?;
        }
        let b = c.fork(a)?;
        let (slots_a, slots_b) = (c.reserve(a, 1)?, c.reserve(b, 1)?);
        write_all(&mut c, &slots_a, &[1000])?;
        write_all(&mut c, &slots_b, &[2000])?;
        let a_keys: Vec<f32> = window_keys(&c, a)?.into_iter().map(|(_, k)| k).collect();
        let b_keys: Vec<f32> = window_keys(&c, b)?.into_iter().map(|(_, k)| k).collect();
        assert_eq!(a_keys, [15., 16., 17., 18., 19., 1000.]);
        assert_eq!(b_keys, [15., 16., 17., 18., 19., 2000.]);
        audit(&c);

        // Back one token: the query at 20 reads from 15, still held.
        c.truncate(a, 20)?;
        assert_eq!(c.len(a)?, 20);
        // Back to 10: its query would read position 5, freed long ago. Nothing changes.
        let before = (c.len(a)?, c.sliding_len(a)?);
        assert!(matches!(
            c.truncate(a, 10),
            Err(KvError::InvalidArgument {
                what: "truncate",
                ..
            })
        ));
        assert_eq!((c.len(a)?, c.sliding_len(a)?), before);
        // A write naming a slot of no last reserve is refused.
        assert!(matches!(
            write_all(&mut c, &slots_a, &[1]),
            Err(KvError::InvalidArgument { what: "slots", .. })
        ));
        // To 0 always works.
        c.truncate(a, 0)?;
        assert_eq!((c.len(a)?, c.sliding_len(a)?), (0, 0));
        c.free(b)?;
        c.free(a)?;
        audit(&c);
        assert_eq!(c.sliding_stats().map(|s| s.used_blocks), Some(0));
        assert_eq!(c.stats().used_blocks, 0);
        Ok(())
    }

    #[test]
    fn sliding_group_refuses_what_freed_blocks_break() -> Result<()> {
        let mut c = sliding_cache(false)?;
        let a = c.create_sequence();
        let slots = c.reserve(a, 8)?;
        write_all(&mut c, &slots, &[1, 2, 3, 4, 5, 6, 7, 8])?;
        assert!(matches!(
            c.evict_window(a, 0, 1),
            Err(KvError::Unsupported { .. })
        ));
        assert!(matches!(
            c.export_blocks(a, 1),
            Err(KvError::Unsupported { .. })
        ));
        let q = Tensor::zeros((1, 1, 1), candle_core::DType::F32, &Device::Cpu)?;
        let unwindowed = AttentionBatch::new(vec![c.sliding_seq_attention(a, 1)?], 1);
        assert!(matches!(
            c.attend(0, &q, &unwindowed),
            Err(KvError::InvalidArgument {
                what: "attention batch",
                ..
            })
        ));
        assert!(matches!(
            c.write(6, &slots, &q, &q),
            Err(KvError::OutOfRange { .. })
        ));
        let plain = cache(false)?;
        assert!(plain.sliding_seq_attention(a, 1).is_err());
        let spec = StorageSpec::new(ModelShape::new(2, 1, 1, 1)?, KvDType::F32, 4, 6)?;
        let w = std::num::NonZeroUsize::MIN;
        assert!(SlidingLayers::new(w, vec![true, true], 4).is_err());
        let wrong = SlidingLayers::new(w, vec![true, false, false], 4)?;
        assert!(PagedCache::with_sliding_window(Recorder::new(), spec, wrong, None).is_err());
        Ok(())
    }

    #[test]
    fn sliding_group_commits_ids_and_reuses_the_prefix_both_groups_hold() -> Result<()> {
        let mut c = sliding_cache(true)?;
        let prompt: Vec<u32> = (1..=9).collect();
        let (a, reused) = c.create_with_prefix(&prompt);
        assert_eq!(reused, 0);
        let slots = c.reserve(a, 9)?;
        write_all(&mut c, &slots, &prompt)?;
        c.commit(a, &prompt)?; // both groups index blocks [1..4] and [5..8]
        for t in 10..30u32 {
            let slots = c.reserve(a, 1)?;
            write_all(&mut c, &slots, &[t])?;
            c.commit(a, &[t])?;
            let freed = c.len(a)? - c.sliding_len(a)?;
            let local = c.sliding_manager().map(|m| m.sequences().last());
            let ids = match (c.sliding_manager(), local) {
                (Some(m), Some(Some(l))) => m.tokens(l)?.to_vec(),
                _ => Vec::new(),
            };
            assert_eq!(ids, c.manager().tokens(a)?[freed..]);
        }
        // The prompt's blocks are still indexed in both groups: reused.
        let (b, reused) = c.create_with_prefix(&prompt);
        assert_eq!(reused, 8);
        assert_eq!(c.sliding_len(b)?, 8);
        audit(&c);
        // A longer prompt: the global group holds 28 of its tokens, and the sliding group
        // the blocks a query at 28 reads (20..28: it kept indexing after its window slid,
        // the chain going on across the blocks it let go of): all 28 are reused.
        let long: Vec<u32> = (1..=29).collect();
        assert_eq!(c.prefix_match(&long, 0).tokens, 28);
        let (d, reused) = c.create_with_prefix(&long);
        assert_eq!((reused, c.len(d)?, c.sliding_len(d)?), (28, 28, 8));
        // It reads the same keys as the sequence that computed them.
        let slots = c.reserve(d, 1)?;
        write_all(&mut c, &slots, &[29])?;
        c.commit(d, &[29])?;
        let want: Vec<(usize, f32)> = (23..29).map(|p| (p, (p + 1) as f32)).collect();
        assert_eq!(window_keys(&c, d)?, want);
        assert_eq!(
            read_global(&c, d)?,
            (1..=29).map(|t| t as f32).collect::<Vec<_>>()
        );
        audit(&c);
        c.free(a)?;
        c.free(b)?;
        c.free(d)?;
        audit(&c);
        Ok(())
    }

    #[test]
    fn sliding_group_reuses_a_prefix_whose_early_window_blocks_are_gone() -> Result<()> {
        let mut c = sliding_cache(true)?;
        // Position p holds token p + 1: a prompt of 17 prefilled at once (both groups
        // index blocks 0..4), decoded to 30 tokens (the twin lets blocks 0..4 go: they stay
        // cached in its index), then freed.
        let prompt: Vec<u32> = (1..=17).collect();
        let (a, _) = c.create_with_prefix(&prompt);
        let slots = c.reserve(a, 17)?;
        write_all(&mut c, &slots, &prompt)?;
        c.commit(a, &prompt)?;
        for t in 18..=30u32 {
            let slots = c.reserve(a, 1)?;
            write_all(&mut c, &slots, &[t])?;
            c.commit(a, &[t])?;
        }
        c.free(a)?;
        // The twin indexed blocks 0..=6 (the decoded tokens' too), all cached once `a` is
        // freed: 5 blocks of its pool are empty. An unrelated prompt of 24 tokens takes
        // them and one cached block: the least recently used, block 0 of the first prompt.
        assert_eq!(
            c.sliding_manager().map(CacheManager::cached_blocks),
            Some(7)
        );
        let other: Vec<u32> = (1000..1024).collect();
        let (x, _) = c.create_with_prefix(&other);
        let slots = c.reserve(x, 24)?;
        write_all(&mut c, &slots, &other)?;
        c.free(x)?;
        let sliding_found = c
            .sliding_manager()
            .map_or(0, |m| m.prefix_match(&prompt, 0).tokens);
        assert_eq!(sliding_found, 0, "block 0 left the sliding index");
        // The first query after 16 tokens reads positions 11.. (blocks 2 and 3): held, so
        // 16 tokens are reused and the twin starts with blocks 0 and 1 freed.
        assert_eq!(c.prefix_match(&prompt, 0).tokens, 16);
        let (b, reused) = c.create_with_prefix(&prompt);
        assert_eq!((reused, c.len(b)?, c.sliding_len(b)?), (16, 16, 8));
        let slots = c.reserve(b, 1)?;
        write_all(&mut c, &slots, &[17])?;
        c.commit(b, &[17])?;
        let want: Vec<(usize, f32)> = (11..17).map(|p| (p, (p + 1) as f32)).collect();
        assert_eq!(window_keys(&c, b)?, want);
        assert_eq!(
            read_global(&c, b)?,
            (1..=17).map(|t| t as f32).collect::<Vec<_>>()
        );
        audit(&c);
        c.free(b)?;
        audit(&c);
        Ok(())
    }

    #[test]
    fn sliding_group_indexes_a_prompt_run_in_chunks_and_committed_at_the_end() -> Result<()> {
        let mut c = sliding_cache(true)?;
        // 21 tokens in chunks of 4, committed once at the end: by then the twin let go of
        // blocks 0..3 before their ids were known.
        let prompt: Vec<u32> = (1..=21).collect();
        let (a, _) = c.create_with_prefix(&prompt);
        for part in prompt.chunks(4) {
            let slots = c.reserve(a, part.len())?;
            write_all(&mut c, &slots, part)?;
        }
        assert_eq!(c.len(a)? - c.sliding_len(a)?, 12);
        c.commit(a, &prompt)?;
        audit(&c);
        c.free(a)?;
        // The same 20 tokens and another: a query at 20 reads 15.. (blocks 3 and 4), which
        // the twin indexed under their whole prefix, so all 20 are reused.
        let mut other: Vec<u32> = (1..=20).collect();
        other.push(99);
        assert_eq!(c.prefix_match(&other, 0).tokens, 20);
        let (b, reused) = c.create_with_prefix(&other);
        assert_eq!((reused, c.sliding_len(b)?), (20, 8));
        let slots = c.reserve(b, 1)?;
        write_all(&mut c, &slots, &[99])?;
        c.commit(b, &[99])?;
        let mut want: Vec<(usize, f32)> = (15..20).map(|p| (p, (p + 1) as f32)).collect();
        want.push((20, 99.0));
        assert_eq!(window_keys(&c, b)?, want);
        // A prompt that differs in a token the twin let go of shares no block with it.
        let mut changed = other.clone();
        changed[2] = 77;
        assert_eq!(c.prefix_match(&changed, 0).tokens, 0);
        audit(&c);
        c.free(b)?;
        audit(&c);
        Ok(())
    }

    #[test]
    fn a_tiered_two_group_cache_writes_evicted_blocks_of_both_groups_down() -> Result<()> {
        use crate::store::HostStore;
        use crate::TieredCache;
        use kv_core::content::Fingerprint;
        let fp = Fingerprint::of_parts(&[("test", b"two groups evicted")]);
        let tier = Box::new(HostStore::new(1 << 20));
        let mut t = TieredCache::new(sliding_cache(true)?, fp, vec![tier]);
        let prompt: Vec<u32> = (1..=21).collect();
        let (a, reused) = t.create_with_prefix(&prompt);
        assert_eq!(reused, 0);
        let slots = t.reserve(a, 21)?;
        write_all(t.cache_mut(), &slots, &prompt)?;
        t.cache_mut().commit(a, &prompt)?;
        t.free(a)?;
        assert_eq!(t.stats().blocks_spilled, 0);
        // 48 unrelated tokens at once: the global pool evicts one of the prompt's 5 cached
        // blocks, the sliding pool all 5 of its own; each goes down first, under its
        // group's key.
        let other: Vec<u32> = (1000..1048).collect();
        let (x, _) = t.create_with_prefix(&other);
        let slots = t.reserve(x, 48)?;
        write_all(t.cache_mut(), &slots, &other)?;
        let stats = t.stats();
        assert_eq!(stats.blocks_spilled, 6, "{stats:?}");
        assert!(stats.window_bytes_saved > 0 && stats.bytes_saved > stats.window_bytes_saved);
        t.free(x)?;
        // The global blocks still cached go down at the end of a run; then the prompt
        // comes back from the tier in both groups: 20 tokens.
        assert_eq!(t.flush(), 4);
        let (b, reused) = t.create_with_prefix(&prompt);
        assert_eq!(reused, 20, "{:?}", t.stats());
        assert_eq!(t.stats().window_blocks_loaded, 2);
        let slots = t.reserve(b, 1)?;
        write_all(t.cache_mut(), &slots, &[21])?;
        t.cache_mut().commit(b, &[21])?;
        let want: Vec<(usize, f32)> = (15..21).map(|p| (p, (p + 1) as f32)).collect();
        assert_eq!(window_keys(t.cache(), b)?, want);
        assert_eq!(
            read_global(t.cache(), b)?,
            (1..=21).map(|t| t as f32).collect::<Vec<_>>()
        );
        audit(t.cache());
        // A second prompt with the same prefix, while `b` runs: the restored blocks of both
        // groups are shared on the device, not restored again.
        let hits = t.stats().hits;
        let (c2, reused) = t.create_with_prefix(&prompt);
        assert_eq!(reused, 20, "{:?}", t.stats());
        assert_eq!(t.stats().hits, hits, "restored again: {:?}", t.stats());
        t.free(c2)?;
        Ok(())
    }
}
