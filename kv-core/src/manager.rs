//! Which tokens of which sequence live in which block, and which full blocks are kept for
//! reuse by later prompts.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::prefix::{ChainHash, PrefixIndex};
use crate::{BlockAllocator, BlockId, BlockTable, KvError, Result, SeqAttention, Slot};

/// Identifies a sequence inside one [`CacheManager`]. Ids are never reused.
///
/// A newtype, so a sequence id cannot be passed where a block id, a length or a token is
/// meant. Displays as its number.
///
/// ```
/// use kv_core::{CacheManager, SeqId};
/// let mut cache = CacheManager::new(16, 4)?;
/// let (a, b) = (cache.create_sequence(), cache.create_sequence());
/// assert_ne!(a, b);
/// assert_eq!(format!("{b}"), "1");
/// assert!(cache.len(SeqId::from_raw(7)).is_err()); // never handed out
/// # Ok::<(), kv_core::KvError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(u64);

impl SeqId {
    /// The id with number `raw`, for logs, persistence and tests; a manager knows only
    /// the ids it handed out.
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }
    /// The id's number.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What an append asks the caller to do on the backend, in this order: copy blocks
/// (copy-on-write of a shared, partly filled block), then write K/V into the slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reserved {
    /// One slot per reserved token, in token order.
    pub slots: Vec<Slot>,
    /// `(from, to)` block copies to run with [`crate::CacheBackend::copy_blocks`] before the
    /// write.
    pub copies: Vec<(BlockId, BlockId)>,
}

/// What [`CacheManager::preempt`] hands back so a paused sequence can be recomputed later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preempted {
    /// The committed token ids, in order ([`CacheManager::commit`]).
    pub tokens: Vec<u32>,
    /// Tokens that were reserved but never committed: their ids were never given to the
    /// manager, so the caller recomputes them from its own record (usually the tokens of a
    /// step that was in flight).
    pub uncommitted: usize,
    /// The namespace the sequence's blocks were indexed in; resume with the same one.
    pub cache_salt: u64,
}

/// What a prompt would reuse from the prefix cache right now ([`CacheManager::prefix_match`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Prompt tokens whose K/V would be reused (whole blocks, never the last token).
    pub tokens: usize,
    /// Blocks shared with the cache.
    pub blocks: usize,
    /// Reused blocks that no sequence holds now: taking them back lowers
    /// [`CacheManager::free_blocks`].
    pub revived_blocks: usize,
    /// [`CacheManager::free_blocks`] consumed by admitting the whole prompt: the revived
    /// blocks plus fresh blocks for the tokens after the reused prefix. The prompt fits when
    /// this is at most `free_blocks()`.
    pub blocks_needed: usize,
}

/// A snapshot of where the blocks are, for reports (`kv batch`) and tests.
///
/// `empty_blocks + cached_blocks + used_blocks == total_blocks` always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Blocks held by at least one sequence.
    pub used_blocks: usize,
    /// Blocks held by two or more sequences (forks, prefix hits).
    pub shared_blocks: usize,
    /// Indexed blocks no sequence holds: reusable by a prompt, evictable by an allocation.
    pub cached_blocks: usize,
    /// Blocks holding nothing.
    pub empty_blocks: usize,
    /// Blocks in the prefix index, held by sequences or not.
    pub indexed_blocks: usize,
    /// Live sequences.
    pub sequences: usize,
    /// Prompt tokens looked up in the prefix cache since the manager was made.
    pub prefix_query_tokens: u64,
    /// Of those, tokens whose K/V was reused.
    pub prefix_hit_tokens: u64,
    /// Cached blocks evicted to make room since the manager was made.
    pub evicted_blocks: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    prefix_query_tokens: u64,
    prefix_hit_tokens: u64,
    evicted_blocks: u64,
}

/// One sequence: where its tokens live and which of their ids the manager knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Sequence {
    table: BlockTable,
    /// Ids of the first tokens, whose K/V the caller said is written; at most `table.len()`.
    tokens: Vec<u32>,
    /// Chain hash of each full block of the text whose ids were committed, from position
    /// 0 on: the blocks dropped by [`CacheManager::drop_front`] included, so the chain goes
    /// on past them (only with the prefix cache on, and empty once
    /// [`CacheManager::evict_window`] ran).
    hashes: Vec<ChainHash>,
    /// The prefix-cache namespace this sequence reads and indexes in.
    cache_salt: u64,
    /// Tokens dropped from the front ([`CacheManager::drop_front`]) or the middle
    /// ([`CacheManager::evict_window`]): the text position of cache index `i` (after any
    /// sinks) is `i + evicted`.
    evicted: usize,
    /// Whether [`CacheManager::evict_window`] ran. Its blocks then hold K/V computed over
    /// tokens that are no longer in front of them, so the sequence stops feeding the prefix
    /// index (`hashes` stays empty). [`CacheManager::drop_front`] alone keeps the blocks
    /// held exact, and the chain going.
    streamed: bool,
    /// Tokens [`CacheManager::drop_front`] dropped before their ids were committed: the
    /// first `unseen` ids the next commits give are theirs (they extend the hash chain
    /// only). While it is non-zero `tokens` is empty.
    unseen: usize,
    /// Ids of the last dropped block whose other ids are still `unseen`, waiting to be
    /// hashed (fewer than a block; only while the chain is kept).
    pending: Vec<u32>,
}

/// The bookkeeping of a paged cache: sequences, their block tables, the shared allocator
/// and (optionally) the prefix index. It decides where tokens go; a
/// [`crate::CacheBackend`] stores them.
///
/// ```
/// use kv_core::{CacheManager, KvError};
/// let mut cache = CacheManager::new(16, 4)?; // 4 blocks of 16 tokens
/// let seq = cache.create_sequence();
/// let prompt = cache.reserve(seq, 20)?; // two blocks
/// assert_eq!(prompt.slots.len(), 20);
/// assert!(matches!(cache.reserve(seq, 100), Err(KvError::CacheFull { needed: 6, free: 2 })));
/// assert_eq!(cache.len(seq)?, 20); // the failed append changed nothing
/// cache.truncate(seq, 5)?;
/// assert_eq!(cache.free_blocks(), 3);
/// cache.free(seq)?;
/// assert_eq!(cache.free_blocks(), 4);
/// # Ok::<(), KvError>(())
/// ```
///
/// # Block states
/// Every block is in exactly one state:
/// - *empty*: no holder;
/// - *used*: held by at least one sequence (and perhaps also indexed);
/// - *cached*: held by the prefix index alone. Its K/V is kept for a later prompt with the
///   same prefix, but an allocation that finds no empty block evicts it, least recently
///   released first. So cached blocks count as free: [`CacheManager::free_blocks`] is
///   empty + cached, and `free_blocks() + used_blocks() == total_blocks()`.
///
/// A block's reference count ([`CacheManager::ref_count`]) is the number of sequence
/// tables listing it plus one if the index holds it. A block with more than one holder is
/// never written: a write into it copies it first ([`Reserved::copies`]).
///
/// # Sharing across threads
/// The manager is plain data (`Send + Sync`) mutated through `&mut self`. To share one
/// between threads use [`crate::SharedCacheManager`], which puts it behind one mutex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheManager {
    block_size: usize,
    allocator: BlockAllocator,
    sequences: BTreeMap<SeqId, Sequence>,
    next_id: u64,
    prefix: Option<PrefixIndex>,
    counters: Counters,
}

impl CacheManager {
    /// A manager of `num_blocks` blocks holding `block_size` tokens each, without prefix
    /// reuse: blocks go back to the empty pool as soon as no sequence holds them.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when either is zero or the block count does not fit a
    /// [`BlockId`].
    pub fn new(block_size: usize, num_blocks: usize) -> Result<Self> {
        if block_size == 0 || block_size > u32::MAX as usize {
            return Err(KvError::InvalidArgument {
                what: "block_size",
                detail: format!("{block_size} is not in 1..=2^32-1"),
            });
        }
        if num_blocks == 0 || num_blocks > u32::MAX as usize {
            return Err(KvError::InvalidArgument {
                what: "num_blocks",
                detail: format!("{num_blocks} is not in 1..=2^32-1"),
            });
        }
        Ok(Self {
            block_size,
            allocator: BlockAllocator::new(num_blocks),
            sequences: BTreeMap::new(),
            next_id: 0,
            prefix: None,
            counters: Counters::default(),
        })
    }

    /// A manager that also keeps full, committed blocks in a prefix index so later prompts
    /// starting with the same tokens reuse their K/V instead of recomputing it.
    ///
    /// `salt` goes into every block hash: give each model and layout (weights, dtype,
    /// RoPE settings...) its own, so hashes never match across caches whose K/V differ.
    ///
    /// ```
    /// use kv_core::CacheManager;
    /// let mut cache = CacheManager::with_prefix_cache(4, 16, 0x11a3a)?;
    /// let prompt = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
    ///
    /// // First request: nothing cached, compute everything.
    /// let (a, reused) = cache.create_with_prefix(&prompt);
    /// assert_eq!(reused, 0);
    /// let slots = cache.reserve(a, prompt.len())?.slots;
    /// // ... backend.write(K/V of the prompt at `slots`) for every layer, then:
    /// cache.commit(a, &prompt)?; // its two full blocks are now indexed
    /// cache.free(a)?; // they stay cached
    /// assert_eq!(cache.cached_blocks(), 2);
    ///
    /// // Second request with the same start: skip the prefill of 8 tokens.
    /// let (b, reused) = cache.create_with_prefix(&prompt);
    /// assert_eq!(reused, 8);
    /// assert_eq!(cache.len(b)?, 8);
    /// let rest = cache.reserve(b, prompt.len() - reused)?; // compute only these
    /// assert_eq!(rest.slots.len(), 2);
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    ///
    /// # Errors
    /// As [`CacheManager::new`].
    pub fn with_prefix_cache(block_size: usize, num_blocks: usize, salt: u64) -> Result<Self> {
        let mut manager = Self::new(block_size, num_blocks)?;
        manager.prefix = Some(PrefixIndex::new(num_blocks, salt));
        Ok(manager)
    }

    /// The model/layout salt when the prefix cache is on, `None` when it is off.
    pub fn prefix_cache_salt(&self) -> Option<u64> {
        self.prefix.as_ref().map(PrefixIndex::salt)
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.allocator.total()
    }
    /// Blocks an allocation can take now: empty blocks plus cached ones (indexed, held by no
    /// sequence), which are evicted on demand. `free_blocks() + used_blocks()` is always
    /// `total_blocks()`.
    pub fn free_blocks(&self) -> usize {
        self.allocator.free_count() + self.cached_blocks()
    }
    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.allocator
            .used_count()
            .saturating_sub(self.cached_blocks())
    }
    /// Blocks held by the prefix index alone: reusable by [`CacheManager::create_with_prefix`]
    /// and counted in [`CacheManager::free_blocks`]. Always 0 without the prefix cache.
    pub fn cached_blocks(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixIndex::cached_len)
    }
    /// Holders of `block`: the sequence tables listing it, plus one when the prefix index
    /// holds it. 0 for an empty block or an id out of range.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.allocator.ref_count(block)
    }
    /// Whether `block` is in the prefix index (held by sequences or only cached).
    pub fn is_indexed(&self, block: BlockId) -> bool {
        self.prefix.as_ref().is_some_and(|p| p.is_indexed(block))
    }
    /// The token ids an indexed block holds the K/V of, `None` when it is not indexed.
    pub fn indexed_tokens(&self, block: BlockId) -> Option<&[u32]> {
        self.prefix.as_ref()?.tokens(block)
    }
    /// The chain hash `block` is indexed under (its whole prefix and the salt), `None` when
    /// it is not indexed. It stays the same while the block stays indexed, so a caller that
    /// noted it can tell later whether the block still holds the same prefix or was evicted
    /// and reused (a tiered cache checks this before copying a block down).
    pub fn indexed_hash(&self, block: BlockId) -> Option<u128> {
        self.prefix.as_ref()?.hash_of(block)
    }
    /// The cached blocks an allocation of `n` blocks would evict now, in the order it would
    /// evict them (least recently used first): none while the empty pool has `n` blocks.
    /// A tiered cache copies them down before the allocation overwrites them.
    ///
    /// ```
    /// use kv_core::CacheManager;
    /// let mut cache = CacheManager::with_prefix_cache(2, 3, 0)?;
    /// let seq = cache.create_sequence();
    /// cache.reserve(seq, 4)?;
    /// cache.commit(seq, &[1, 2, 3, 4])?;
    /// cache.free(seq)?; // two blocks cached, one empty
    /// assert!(cache.eviction_victims(1).is_empty());
    /// assert_eq!(cache.eviction_victims(2).len(), 1);
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    pub fn eviction_victims(&self, n: usize) -> Vec<BlockId> {
        let short = n.saturating_sub(self.allocator.free_count());
        match &self.prefix {
            Some(index) if short > 0 => index.cached_oldest_first().take(short).collect(),
            _ => Vec::new(),
        }
    }
    /// Ids of live sequences, in creation order.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.sequences.keys().copied()
    }

    /// Where the blocks are, plus prefix-cache counters.
    pub fn stats(&self) -> CacheStats {
        let mut seq_holders = vec![0u32; self.total_blocks()];
        for s in self.sequences.values() {
            for &b in s.table.blocks() {
                if let Some(h) = seq_holders.get_mut(b.index()) {
                    *h += 1;
                }
            }
        }
        CacheStats {
            total_blocks: self.total_blocks(),
            used_blocks: self.used_blocks(),
            shared_blocks: seq_holders.iter().filter(|&&h| h >= 2).count(),
            cached_blocks: self.cached_blocks(),
            empty_blocks: self.allocator.free_count(),
            indexed_blocks: self.prefix.as_ref().map_or(0, PrefixIndex::len),
            sequences: self.sequences.len(),
            prefix_query_tokens: self.counters.prefix_query_tokens,
            prefix_hit_tokens: self.counters.prefix_hit_tokens,
            evicted_blocks: self.counters.evicted_blocks,
        }
    }

    /// Starts an empty sequence (prefix-cache namespace 0).
    pub fn create_sequence(&mut self) -> SeqId {
        self.insert_sequence(Sequence::default())
    }

    fn insert_sequence(&mut self, s: Sequence) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sequences.insert(id, s);
        id
    }

    fn seq(&self, seq: SeqId) -> Result<&Sequence> {
        self.sequences
            .get(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })
    }

    /// The block table of `seq`.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn table(&self, seq: SeqId) -> Result<&BlockTable> {
        Ok(&self.seq(seq)?.table)
    }

    /// Tokens `seq` holds (reserved by [`CacheManager::reserve`], committed or not).
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.table(seq)?.len())
    }

    /// The committed token ids of `seq` ([`CacheManager::commit`]); a prefix of its
    /// tokens.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn tokens(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(seq)?.tokens)
    }

    /// Blocks an append of `n` tokens to `seq` would take from the free pool (fresh blocks
    /// plus a copy of a shared, partly filled last block).
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::InvalidArgument`] when the length would
    /// overflow.
    pub fn blocks_needed(&self, seq: SeqId, n: usize) -> Result<usize> {
        let (fresh, cow) = self.plan(&self.seq(seq)?.table, n)?;
        Ok(fresh + usize::from(cow))
    }

    /// Blocks a batch of appends (one `(sequence, tokens)` per sequence, e.g. one decode
    /// step) takes from the free pool when run in order. Less than the sum of
    /// [`CacheManager::blocks_needed`] when forks share a partly filled last block: only the
    /// first writer copies it. The batch fits when this is at most
    /// [`CacheManager::free_blocks`].
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::InvalidArgument`] when a sequence is listed
    /// twice or a length would overflow.
    pub fn blocks_needed_batch(&self, appends: &[(SeqId, usize)]) -> Result<usize> {
        let mut seen = HashSet::new();
        let mut copied: HashMap<BlockId, u32> = HashMap::new();
        let mut total = 0usize;
        for &(seq, n) in appends {
            if !seen.insert(seq) {
                return Err(KvError::InvalidArgument {
                    what: "batch",
                    detail: format!("sequence {seq} is listed twice"),
                });
            }
            let table = &self.seq(seq)?.table;
            let (fresh, cow) = self.plan(table, n)?;
            let mut needed = fresh;
            if cow {
                // An earlier copy in this batch released one holder of the same block.
                let last = table.blocks()[table.blocks().len() - 1];
                let gone = copied.entry(last).or_default();
                if self.allocator.ref_count(last).saturating_sub(*gone) > 1 {
                    needed += 1;
                    *gone += 1;
                }
            }
            total = total.saturating_add(needed);
        }
        Ok(total)
    }

    /// The most tokens [`CacheManager::reserve`] can add to `seq` right now.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn reservable_tokens(&self, seq: SeqId) -> Result<usize> {
        let table = &self.seq(seq)?.table;
        let room = table.blocks().len() * self.block_size - table.len();
        let free = self.free_blocks();
        let blocks_for_new = if self.tail_is_shared(table) {
            // The first token already costs the copy of the last block.
            match free.checked_sub(1) {
                Some(f) => f,
                None => return Ok(0),
            }
        } else {
            free
        };
        Ok(room.saturating_add(blocks_for_new.saturating_mul(self.block_size)))
    }

    /// True when the last block is partly filled and has other holders, so the next write
    /// must copy it.
    fn tail_is_shared(&self, table: &BlockTable) -> bool {
        !table.len().is_multiple_of(self.block_size)
            && table
                .blocks()
                .last()
                .is_some_and(|&b| self.allocator.ref_count(b) > 1)
    }

    /// (new blocks for fresh tokens, whether the last block must be copied first)
    fn plan(&self, table: &BlockTable, n: usize) -> Result<(usize, bool)> {
        let len = table.len();
        let end = len.checked_add(n).ok_or_else(|| KvError::InvalidArgument {
            what: "append length",
            detail: format!("{len} + {n} tokens overflows"),
        })?;
        let capacity = table.blocks().len() * self.block_size;
        let fresh = end.saturating_sub(capacity).div_ceil(self.block_size);
        Ok((fresh, n > 0 && self.tail_is_shared(table)))
    }

    /// Reserves room for `n` more tokens of `seq` and says where to write them. Blocks come
    /// from the empty pool first, then by evicting cached prefix blocks, least recently
    /// used first.
    ///
    /// The new tokens are *reserved*, not committed: tell the manager their ids with
    /// [`CacheManager::commit`] once their K/V is written, so full blocks can be
    /// reused by later prompts.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::CacheFull`] when free blocks (empty plus
    /// cached) do not suffice; [`KvError::InvalidArgument`] when the length would overflow.
    /// Nothing changes on error.
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> Result<Reserved> {
        let (fresh, cow) = self.plan(&self.seq(seq)?.table, n)?;
        let mut new_blocks = self.take_blocks(fresh + usize::from(cow))?;
        let block_size = self.block_size;
        let s = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })?;
        let mut copies = Vec::new();
        if cow {
            let to = new_blocks.remove(0);
            let blocks = s.table.blocks_mut();
            let last = blocks.len() - 1;
            let from = std::mem::replace(&mut blocks[last], to);
            copies.push((from, to));
        }
        s.table.blocks_mut().extend(new_blocks);
        let start = s.table.len();
        s.table.set_len(start + n);
        let slots = (start..start + n)
            .map(|i| Slot {
                block: s.table.blocks()[i / block_size],
                offset: (i % block_size) as u32,
            })
            .collect();
        for &(from, _) in &copies {
            self.release(&[from])?;
        }
        Ok(Reserved { slots, copies })
    }

    /// [`CacheManager::reserve`], then `copy` runs the block copies on the backend; when it
    /// fails the manager is put back as it was and its error returned, so a failed
    /// copy-on-write changes nothing either.
    ///
    /// Use this where the copies must happen before anyone else can allocate: the source of
    /// a copy keeps its other holders, but once they let go it may be evicted and reused.
    /// [`crate::SharedCacheManager::reserve_and_copy`] runs it under the lock for that reason.
    /// The manager is cloned (to roll back) only when a copy is needed.
    ///
    /// # Errors
    /// What [`CacheManager::reserve`] or `copy` returns; nothing changes on error.
    pub fn reserve_and_copy(
        &mut self,
        seq: SeqId,
        n: usize,
        copy: impl FnOnce(&[(BlockId, BlockId)]) -> Result<()>,
    ) -> Result<Reserved> {
        let (_, cow) = self.plan(&self.seq(seq)?.table, n)?;
        let before = cow.then(|| self.clone());
        let reserved = self.reserve(seq, n)?;
        if !reserved.copies.is_empty() {
            if let Err(e) = copy(&reserved.copies) {
                if let Some(before) = before {
                    *self = before;
                }
                return Err(e);
            }
        }
        Ok(reserved)
    }

    /// Tells the manager the ids of the next `tokens.len()` reserved tokens of `seq`, whose
    /// K/V the caller has written. Blocks that become full of committed tokens enter the
    /// prefix index (when it is on), where later prompts can find them.
    ///
    /// Committing after the write, not at append time, means an index hit never reads K/V
    /// that is still being computed or whose write failed. A sequence never committed just
    /// never feeds the index. When a block with the same prefix is already indexed (two
    /// requests computed it at once) this one is left out of the index.
    ///
    /// Ids come in text order. After [`CacheManager::drop_front`] dropped blocks whose ids
    /// were not committed yet, the first ids given are still theirs: they are not stored,
    /// but they extend the hash chain, so the blocks held after them are indexed under
    /// their whole prefix. (After [`CacheManager::evict_window`] the ids are those of the
    /// tokens held, in cache order, and nothing is indexed.)
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::OutOfRange`] when more tokens are committed
    /// than are reserved (or were dropped uncommitted). Nothing changes on error.
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32]) -> Result<()> {
        let Self {
            sequences,
            prefix,
            allocator,
            block_size,
            ..
        } = self;
        let bs = *block_size;
        let s = sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })?;
        let (dropped, held) = tokens.split_at(tokens.len().min(s.unseen));
        let end = s.tokens.len().saturating_add(held.len());
        if end > s.table.len() {
            return Err(KvError::OutOfRange {
                what: "committed tokens",
                index: s.evicted - s.unseen + end,
                len: s.evicted + s.table.len(),
            });
        }
        s.unseen -= dropped.len();
        s.tokens.extend_from_slice(held);
        let Some(index) = prefix else {
            return Ok(());
        };
        if s.streamed {
            // A StreamingLLM sequence's blocks are not a plain prefix any more.
            return Ok(());
        }
        for &id in dropped {
            s.pending.push(id);
            if s.pending.len() == bs {
                let hash = index.hash(s.hashes.last().copied(), s.cache_salt, &s.pending);
                s.hashes.push(hash);
                s.pending.clear();
            }
        }
        if s.unseen > 0 || s.hashes.len() * bs < s.evicted {
            // Still inside the dropped ids (or their chain was never known).
            return Ok(());
        }
        // Text block `k` is held at table index `k - first`, its ids at `k * bs - evicted`.
        let first = s.evicted / bs;
        for k in s.hashes.len()..(s.evicted + s.tokens.len()) / bs {
            let parent = k.checked_sub(1).map(|j| s.hashes[j]);
            let at = k * bs - s.evicted;
            let chunk = &s.tokens[at..at + bs];
            let hash = index.hash(parent, s.cache_salt, chunk);
            s.hashes.push(hash);
            let Some(&block) = s.table.blocks().get(k - first) else {
                continue;
            };
            if index.block_of(hash).is_none() && !index.is_indexed(block) {
                // The index becomes one more holder, so nobody writes the block again.
                allocator.retain(&[block])?;
                index.insert(block, hash, parent, chunk);
            }
        }
        Ok(())
    }

    /// Forgets every token of `seq` from `len` on (speculative-decoding rollback); blocks no
    /// longer needed are released (indexed ones stay cached).
    ///
    /// When `len` cuts into an indexed block, that block's contents stay valid for the
    /// index, so it is never written in place: if only this sequence and the index hold it,
    /// it leaves the index (the cut-off tokens were rejected; nobody will ask for them) and
    /// becomes private again; if other sequences hold it too, it stays indexed and the next
    /// append copies it.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::OutOfRange`] when `len` exceeds the length.
    /// Nothing changes on error.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let bs = self.block_size;
        let s = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })?;
        if len > s.table.len() {
            return Err(KvError::OutOfRange {
                what: "truncate length",
                index: len,
                len: s.table.len(),
            });
        }
        let keep = len.div_ceil(bs);
        let dropped = s.table.blocks_mut().split_off(keep);
        s.table.set_len(len);
        s.tokens.truncate(len);
        s.hashes.truncate((s.evicted + len) / bs);
        let tail = (!len.is_multiple_of(bs)).then(|| s.table.blocks()[keep - 1]);
        self.release(&dropped)?;
        if let Some(tail) = tail {
            if self.is_indexed(tail) && self.allocator.ref_count(tail) == 2 {
                self.unindex(tail)?;
            }
        }
        Ok(())
    }

    /// StreamingLLM's sliding window: keeps the first `keep_blocks` blocks of `seq` (the
    /// attention sinks) and drops the `evict_blocks` full blocks after them, so the tokens
    /// after the dropped ones move down to contiguous cache indices. Returns the block
    /// copies to run before the kept front blocks are rewritten: the caller rewrites the
    /// sinks' K (re-rotated to their new distance from the window), so each kept front
    /// block is made private first: copied when another sequence holds it, taken out of the
    /// prefix index when only the index shares it.
    ///
    /// From the first call on, the sequence no longer feeds the prefix index: its blocks
    /// hold K/V computed over tokens that are no longer in front of them, which a later
    /// prompt with the same ids must not reuse. Committed ids of the dropped tokens are
    /// forgotten ([`CacheManager::tokens`] stays the ids of the tokens held, in cache
    /// order), and [`CacheManager::evicted_tokens`] counts the dropped tokens.
    ///
    /// ```
    /// use kv_core::CacheManager;
    /// let mut cache = CacheManager::new(4, 8)?;
    /// let seq = cache.create_sequence();
    /// cache.reserve(seq, 18)?; // blocks 0..5, the last one half full
    /// let copies = cache.evict_window(seq, 1, 2)?; // keep block 0, drop blocks 1 and 2
    /// assert!(copies.is_empty()); // nobody else holds block 0
    /// assert_eq!(cache.len(seq)?, 10);
    /// let kept: Vec<u32> = cache.table(seq)?.blocks().iter().map(|b| b.get()).collect();
    /// assert_eq!(kept, [0, 3, 4]);
    /// assert_eq!(cache.evicted_tokens(seq)?, 8);
    /// assert_eq!(cache.free_blocks(), 5);
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::OutOfRange`] when the dropped blocks are
    /// not all full blocks of `seq`; [`KvError::InvalidArgument`] when committed ids end
    /// inside the dropped blocks (the ids of the kept tokens after them would be lost) or
    /// when ids of tokens [`CacheManager::drop_front`] dropped are still to be committed;
    /// [`KvError::CacheFull`] when copying shared front blocks needs more free blocks.
    /// Nothing changes on error. Evicting 0 blocks changes nothing.
    pub fn evict_window(
        &mut self,
        seq: SeqId,
        keep_blocks: usize,
        evict_blocks: usize,
    ) -> Result<Vec<(BlockId, BlockId)>> {
        let bs = self.block_size;
        let s = self.seq(seq)?;
        let full = s.table.len() / bs;
        let end = keep_blocks.saturating_add(evict_blocks);
        if end > full {
            return Err(KvError::OutOfRange {
                what: "evicted block",
                index: end,
                len: full,
            });
        }
        let committed = s.tokens.len();
        if committed > keep_blocks * bs && committed < end * bs {
            return Err(KvError::InvalidArgument {
                what: "window eviction",
                detail: format!(
                    "{committed} committed ids end inside the evicted tokens {}..{}",
                    keep_blocks * bs,
                    end * bs
                ),
            });
        }
        if evict_blocks == 0 {
            return Ok(Vec::new());
        }
        if s.unseen > 0 {
            return Err(KvError::InvalidArgument {
                what: "window eviction",
                detail: format!(
                    "the ids of {} tokens dropped from the front are still to be committed",
                    s.unseen
                ),
            });
        }
        let front: Vec<BlockId> = s.table.blocks()[..keep_blocks].to_vec();
        // Front blocks other sequences hold are copied; those only the index shares leave it.
        let shared: Vec<usize> = (0..keep_blocks)
            .filter(|&i| {
                let b = front[i];
                let rc = self.allocator.ref_count(b);
                rc > 1 + u32::from(self.is_indexed(b))
            })
            .collect();
        let fresh = self.take_blocks(shared.len())?;
        // Nothing below fails: every block named exists and is held by `seq`.
        let s = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })?;
        let mut copies = Vec::with_capacity(shared.len());
        for (&i, &to) in shared.iter().zip(&fresh) {
            copies.push((front[i], to));
            s.table.blocks_mut()[i] = to;
        }
        let dropped: Vec<BlockId> = s
            .table
            .blocks_mut()
            .splice(keep_blocks..end, std::iter::empty())
            .collect();
        let len = s.table.len();
        s.table.set_len(len - evict_blocks * bs);
        if committed >= end * bs {
            s.tokens.drain(keep_blocks * bs..end * bs);
        }
        s.hashes.clear();
        s.pending.clear();
        s.streamed = true;
        s.evicted += evict_blocks * bs;
        let private_front: Vec<BlockId> = s.table.blocks()[..keep_blocks].to_vec();
        let released: Vec<BlockId> = copies.iter().map(|&(from, _)| from).collect();
        self.release(&released)?;
        self.release(&dropped)?;
        for b in private_front {
            if self.is_indexed(b) {
                self.unindex(b)?;
            }
        }
        Ok(copies)
    }

    /// A sliding-window layer's eviction: drops the first `blocks` full blocks of `seq`,
    /// whose keys no query to come reads (the model's own window excludes them). Unlike
    /// [`CacheManager::evict_window`] nothing is recomputed over a shortened context, so the
    /// blocks held still hold exactly the K/V of their tokens after the whole prefix: the
    /// sequence keeps its hash chain (the dropped blocks' hashes included) and its full
    /// blocks committed later enter the prefix index as before, while the dropped ones
    /// that were indexed wait in the index's LRU queue. A later prompt sharing the prefix
    /// finds them with [`CacheManager::window_prefix_match`].
    ///
    /// Blocks may go before their ids are committed (a prompt run in chunks and committed
    /// at the end): the next [`CacheManager::commit`] then starts with those ids, in text
    /// order. Cache index `i` is text position `i + evicted_tokens()`.
    ///
    /// ```
    /// use kv_core::CacheManager;
    /// let mut m = CacheManager::with_prefix_cache(2, 8, 0)?;
    /// let seq = m.create_sequence();
    /// m.reserve(seq, 6)?;
    /// m.drop_front(seq, 2)?; // positions 0..4 leave the window before the commit
    /// m.commit(seq, &[1, 2, 3, 4, 5, 6])?; // every id, dropped ones first
    /// assert_eq!(m.tokens(seq)?, &[5, 6]); // the ids held
    /// m.free(seq)?;
    /// // Block 2 (positions 4..6) is indexed under its whole prefix: a 2-token window
    /// // reading from position 5 on finds it.
    /// assert_eq!(m.window_prefix_match(&[1, 2, 3, 4, 5, 6, 7], 0, 2, 3), (3, 2));
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::OutOfRange`] when `seq` has fewer than
    /// `blocks` full blocks. Nothing changes on error; dropping 0 blocks changes nothing.
    pub fn drop_front(&mut self, seq: SeqId, blocks: usize) -> Result<()> {
        let bs = self.block_size;
        let chain = self.prefix.is_some();
        let s = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })?;
        let full = s.table.len() / bs;
        if blocks > full {
            return Err(KvError::OutOfRange {
                what: "dropped block",
                index: blocks,
                len: full,
            });
        }
        if blocks == 0 {
            return Ok(());
        }
        let gone = blocks * bs;
        let dropped: Vec<BlockId> = s.table.blocks_mut().drain(..blocks).collect();
        let len = s.table.len();
        s.table.set_len(len - gone);
        let committed = s.tokens.len();
        if committed >= gone {
            s.tokens.drain(..gone);
        } else {
            // Committed ids end inside the dropped tokens: those of the last partly
            // committed block wait for the rest (its full blocks are hashed already).
            if chain && !s.streamed {
                s.pending
                    .extend_from_slice(&s.tokens[committed / bs * bs..committed]);
            }
            s.unseen += gone - committed;
            s.tokens.clear();
        }
        s.evicted += gone;
        self.release(&dropped)
    }

    /// [`CacheManager::evict_window`], then `copy` runs the block copies on the backend;
    /// when it fails the manager is put back as it was and its error returned. The manager
    /// is cloned (to roll back) only when sinks are kept, the only case with copies.
    ///
    /// # Errors
    /// What [`CacheManager::evict_window`] or `copy` returns; nothing changes on error.
    pub fn evict_window_and_copy(
        &mut self,
        seq: SeqId,
        keep_blocks: usize,
        evict_blocks: usize,
        copy: impl FnOnce(&[(BlockId, BlockId)]) -> Result<()>,
    ) -> Result<Vec<(BlockId, BlockId)>> {
        let before = (keep_blocks > 0).then(|| self.clone());
        let copies = self.evict_window(seq, keep_blocks, evict_blocks)?;
        if !copies.is_empty() {
            if let Err(e) = copy(&copies) {
                if let Some(before) = before {
                    *self = before;
                }
                return Err(e);
            }
        }
        Ok(copies)
    }

    /// Tokens [`CacheManager::evict_window`] and [`CacheManager::drop_front`] have dropped
    /// from `seq` so far: the position of a token in the text is its cache index plus this
    /// (for tokens after the sinks).
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn evicted_tokens(&self, seq: SeqId) -> Result<usize> {
        Ok(self.seq(seq)?.evicted)
    }

    /// Ends `seq`, releasing its blocks; its indexed blocks stay cached for later prompts.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        self.remove_sequence(seq).map(|_| ())
    }

    /// Pauses `seq` to make room: releases its blocks like [`CacheManager::free`] and
    /// returns what is needed to recompute it.
    ///
    /// This is the batch runner's answer to a full cache: rather than failing a step, pause
    /// the newest sequence (the one that has waited least), and when blocks are free again
    /// resume it with [`CacheManager::create_with_prefix_salted`] on
    /// [`Preempted::tokens`] (plus any token sampled but not yet reserved) and
    /// recompute what was not reused. Its committed full blocks stay cached, so a resume
    /// before they are evicted recomputes little. Resuming gives a new [`SeqId`].
    ///
    /// ```
    /// use kv_core::CacheManager;
    /// let mut cache = CacheManager::with_prefix_cache(2, 8, 0)?;
    /// let seq = cache.create_sequence();
    /// cache.reserve(seq, 5)?;
    /// cache.commit(seq, &[1, 2, 3, 4, 5])?;
    /// let paused = cache.preempt(seq)?;
    /// assert_eq!(paused.tokens, [1, 2, 3, 4, 5]);
    /// assert_eq!(cache.used_blocks(), 0);
    /// let next = 6; // sampled from the last logits before the pause
    /// let mut prompt = paused.tokens.clone();
    /// prompt.push(next);
    /// let (resumed, reused) = cache.create_with_prefix_salted(&prompt, paused.cache_salt);
    /// assert_eq!(reused, 4); // recompute tokens 4.. (the partly filled block was not kept)
    /// # let _ = resumed;
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn preempt(&mut self, seq: SeqId) -> Result<Preempted> {
        let s = self.remove_sequence(seq)?;
        Ok(Preempted {
            uncommitted: s.table.len() - s.tokens.len(),
            tokens: s.tokens,
            cache_salt: s.cache_salt,
        })
    }

    fn remove_sequence(&mut self, seq: SeqId) -> Result<Sequence> {
        let blocks = self.seq(seq)?.table.blocks().to_vec();
        self.release(&blocks)?;
        self.sequences
            .remove(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })
    }

    /// A new sequence that shares every block of `seq`; the first write into a shared,
    /// partly filled block copies it ([`Reserved::copies`]), so neither side sees the
    /// other's later tokens. The fork inherits the committed ids and namespace.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let s = self.seq(seq)?.clone();
        self.retain(s.table.blocks())?;
        Ok(self.insert_sequence(s))
    }

    /// [`CacheManager::create_with_prefix_salted`] in namespace 0.
    pub fn create_with_prefix(&mut self, prompt: &[u32]) -> (SeqId, usize) {
        self.create_with_prefix_salted(prompt, 0)
    }

    /// Starts a sequence whose first tokens reuse the longest chain of indexed full blocks
    /// matching `prompt`, and returns it with the number of tokens reused. Those tokens are
    /// already held and committed: the caller appends, computes and commits only
    /// `prompt[reused..]`.
    ///
    /// Only full blocks are reused, and never the whole prompt: at least its last token is
    /// left to compute, because the logits that pick the next token come from running it
    /// (vLLM does the same). `cache_salt` separates namespaces (tenants, adapters): blocks
    /// indexed under one salt are never reused under another. Without the prefix cache
    /// this is [`CacheManager::create_sequence`] with nothing reused.
    ///
    /// Never fails: reused blocks are taken back from the index, and cached ones stop being
    /// evictable (they leave [`CacheManager::free_blocks`]; see
    /// [`CacheManager::prefix_match`] to know the cost beforehand).
    pub fn create_with_prefix_salted(&mut self, prompt: &[u32], cache_salt: u64) -> (SeqId, usize) {
        let (mut blocks, mut hashes) = self.match_prefix(prompt, cache_salt);
        if self.retain(&blocks).is_err() {
            // Unreachable while the index holds what it lists; fall back to no reuse.
            blocks.clear();
            hashes.clear();
        }
        let reused = blocks.len() * self.block_size;
        if self.prefix.is_some() {
            self.counters.prefix_query_tokens += prompt.len() as u64;
            self.counters.prefix_hit_tokens += reused as u64;
        }
        let mut table = BlockTable::default();
        *table.blocks_mut() = blocks;
        table.set_len(reused);
        let id = self.insert_sequence(Sequence {
            table,
            tokens: prompt[..reused].to_vec(),
            hashes,
            cache_salt,
            ..Sequence::default()
        });
        (id, reused)
    }

    /// What [`CacheManager::create_with_prefix_salted`] would reuse for `prompt` now, and
    /// the free blocks admitting the whole prompt would take. Changes nothing.
    pub fn prefix_match(&self, prompt: &[u32], cache_salt: u64) -> PrefixMatch {
        let (blocks, _) = self.match_prefix(prompt, cache_salt);
        let revived = self
            .prefix
            .as_ref()
            .map_or(0, |p| blocks.iter().filter(|&&b| p.is_cached(b)).count());
        let tokens = blocks.len() * self.block_size;
        PrefixMatch {
            tokens,
            blocks: blocks.len(),
            revived_blocks: revived,
            blocks_needed: revived + (prompt.len() - tokens).div_ceil(self.block_size),
        }
    }

    /// For a sequence that keeps only its last `window` tokens' keys (a sliding-window
    /// group): the most full blocks `n` (at most `max_blocks`, never covering `prompt`'s last
    /// token) whose blocks from `first = (n * block_size + 1 - window) / block_size` on are
    /// all indexed. A query at position `n * block_size` reads keys from
    /// `n * block_size + 1 - window` on, so blocks before `first` need not be held. Returns
    /// `(n, first)`; `(0, 0)` without the prefix cache. Changes nothing.
    ///
    /// ```
    /// use kv_core::CacheManager;
    /// let mut m = CacheManager::with_prefix_cache(4, 8, 0)?;
    /// let seq = m.create_sequence();
    /// m.reserve(seq, 12)?;
    /// m.commit(seq, &(0..12).collect::<Vec<u32>>())?;
    /// m.free(seq)?;
    /// // Three blocks indexed; a 6-token window reads from block 1 at position 12.
    /// let prompt: Vec<u32> = (0..14).collect();
    /// assert_eq!(m.window_prefix_match(&prompt, 0, 6, usize::MAX), (3, 1));
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    pub fn window_prefix_match(
        &self,
        prompt: &[u32],
        cache_salt: u64,
        window: usize,
        max_blocks: usize,
    ) -> (usize, usize) {
        match self.window_blocks(prompt, cache_salt, window, max_blocks) {
            Some((n, first, _, _)) => (n, first),
            None => (0, 0),
        }
    }

    /// The blocks behind [`CacheManager::window_prefix_match`]: `(n, first, blocks
    /// first..n, hashes of blocks 0..n)`; `None` when nothing is reusable.
    fn window_blocks(
        &self,
        prompt: &[u32],
        cache_salt: u64,
        window: usize,
        max_blocks: usize,
    ) -> Option<(usize, usize, Vec<BlockId>, Vec<ChainHash>)> {
        let index = self.prefix.as_ref()?;
        let bs = self.block_size;
        let reusable = (prompt.len().saturating_sub(1) / bs).min(max_blocks);
        // Every block's chain hash follows from the tokens; which of them the index holds.
        let mut hashes: Vec<ChainHash> = Vec::with_capacity(reusable);
        let mut found: Vec<Option<BlockId>> = Vec::with_capacity(reusable);
        for chunk in prompt.chunks_exact(bs).take(reusable) {
            let parent = hashes.last().copied();
            let hash = index.hash(parent, cache_salt, chunk);
            found.push(index.lookup(hash, parent, chunk));
            hashes.push(hash);
        }
        (1..=reusable).rev().find_map(|n| {
            let first = (n * bs + 1).saturating_sub(window) / bs;
            let blocks: Option<Vec<BlockId>> = found[first..n].iter().copied().collect();
            blocks.map(|b| (n, first, b, hashes[..n].to_vec()))
        })
    }

    /// Which full blocks of `prompt` the prefix index holds, block by block from position
    /// 0 (whether or not the blocks before them are held: a sliding-window group keeps only
    /// the blocks its window reads). Empty without a prefix cache.
    ///
    /// ```
    /// use kv_core::CacheManager;
    /// let mut m = CacheManager::with_prefix_cache(4, 8, 0)?;
    /// // Only the second block of the text 1..=8 is indexed (see `create_after`).
    /// let seq = m.create_after(&[1, 2, 3, 4], 0)?;
    /// m.reserve(seq, 4)?;
    /// m.commit(seq, &[5, 6, 7, 8])?;
    /// assert_eq!(m.indexed_blocks_of(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 0), [false, true]);
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    pub fn indexed_blocks_of(&self, prompt: &[u32], cache_salt: u64) -> Vec<bool> {
        let Some(index) = &self.prefix else {
            return Vec::new();
        };
        let mut parent = None;
        prompt
            .chunks_exact(self.block_size)
            .map(|chunk| {
                let hash = index.hash(parent, cache_salt, chunk);
                let held = index.lookup(hash, parent, chunk).is_some();
                parent = Some(hash);
                held
            })
            .collect()
    }

    /// Starts an empty sequence placed after `prefix` (whole blocks) without holding any of
    /// its blocks: it keeps their hash chain, so the blocks it reserves and commits next
    /// are indexed as the continuation of `prefix`. This is how stored blocks come back
    /// into the prefix index (a tier's restore): reserve, import, commit, free; the blocks
    /// stay cached for the prompts that reuse them, shared by all of them. Counts no prefix
    /// lookup.
    ///
    /// ```
    /// use kv_core::CacheManager;
    /// let mut m = CacheManager::with_prefix_cache(4, 8, 0)?;
    /// let prompt: Vec<u32> = (0..13).collect();
    /// // Blocks 1 and 2 come from elsewhere; block 0 is not on this device.
    /// let seq = m.create_after(&prompt[..4], 0)?;
    /// m.reserve(seq, 8)?;
    /// m.commit(seq, &prompt[4..12])?;
    /// m.free(seq)?;
    /// assert_eq!(m.cached_blocks(), 2);
    /// assert_eq!(m.prefix_match(&prompt, 0).tokens, 0); // block 0 is missing
    /// // A 4-token window after block 2 reads block 2 only: all of it is reusable.
    /// assert_eq!(m.window_prefix_match(&prompt, 0, 4, usize::MAX), (3, 2));
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] without a prefix cache, or when `prefix` is not whole
    /// blocks.
    pub fn create_after(&mut self, prefix: &[u32], cache_salt: u64) -> Result<SeqId> {
        let bs = self.block_size;
        let Some(index) = &self.prefix else {
            return Err(KvError::InvalidArgument {
                what: "sequence after a prefix",
                detail: "the cache has no prefix index to chain blocks in".into(),
            });
        };
        if !prefix.len().is_multiple_of(bs) {
            return Err(KvError::InvalidArgument {
                what: "sequence after a prefix",
                detail: format!(
                    "a prefix of {} tokens is not whole blocks of {bs}",
                    prefix.len()
                ),
            });
        }
        let mut hashes: Vec<ChainHash> = Vec::with_capacity(prefix.len() / bs);
        for chunk in prefix.chunks_exact(bs) {
            hashes.push(index.hash(hashes.last().copied(), cache_salt, chunk));
        }
        Ok(self.insert_sequence(Sequence {
            hashes,
            cache_salt,
            evicted: prefix.len(),
            ..Sequence::default()
        }))
    }

    /// Starts a sequence keeping only its last `window` tokens' keys (a sliding-window
    /// group's), reusing what [`CacheManager::window_prefix_match`] finds for `prompt` (at
    /// most `max_blocks` blocks): it holds blocks `first..n`, as if the ones before had been
    /// dropped by [`CacheManager::drop_front`] (its cache indices are positions less
    /// `first * block_size`), and keeps the hash chain of all `n`, so what it commits
    /// after is indexed too. Returns it with the tokens reused (`n * block_size`); with
    /// `first == 0` it is [`CacheManager::create_with_prefix_salted`]'s sequence.
    pub fn create_with_window_prefix(
        &mut self,
        prompt: &[u32],
        cache_salt: u64,
        window: usize,
        max_blocks: usize,
    ) -> (SeqId, usize) {
        let bs = self.block_size;
        let found = match self.window_blocks(prompt, cache_salt, window, max_blocks) {
            // A failing retain is unreachable while the index holds what it lists; it falls
            // back to no reuse.
            Some(f) if self.retain(&f.2).is_ok() => Some(f),
            _ => None,
        };
        let (n, first, blocks, hashes) = found.unwrap_or((0, 0, Vec::new(), Vec::new()));
        let reused = n * bs;
        if self.prefix.is_some() {
            self.counters.prefix_query_tokens += prompt.len() as u64;
            self.counters.prefix_hit_tokens += reused as u64;
        }
        let mut table = BlockTable::default();
        *table.blocks_mut() = blocks;
        table.set_len(reused - first * bs);
        let id = self.insert_sequence(Sequence {
            table,
            tokens: prompt[first * bs..reused].to_vec(),
            hashes,
            cache_salt,
            evicted: first * bs,
            ..Sequence::default()
        });
        (id, reused)
    }

    /// The indexed blocks (and their hashes) holding the longest reusable prefix of
    /// `prompt`, never covering its last token.
    fn match_prefix(&self, prompt: &[u32], cache_salt: u64) -> (Vec<BlockId>, Vec<ChainHash>) {
        let (mut blocks, mut hashes) = (Vec::new(), Vec::new());
        let Some(index) = &self.prefix else {
            return (blocks, hashes);
        };
        let reusable = prompt.len().saturating_sub(1) / self.block_size;
        for chunk in prompt.chunks_exact(self.block_size).take(reusable) {
            let parent = hashes.last().copied();
            let hash = index.hash(parent, cache_salt, chunk);
            match index.lookup(hash, parent, chunk) {
                Some(b) => {
                    blocks.push(b);
                    hashes.push(hash);
                }
                None => break,
            }
        }
        (blocks, hashes)
    }

    /// What attention needs to read `seq` when its last `n_queries` tokens are the queries.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::InvalidArgument`] when `n_queries` is zero
    /// or exceeds the length.
    pub fn seq_attention(&self, seq: SeqId, n_queries: usize) -> Result<SeqAttention> {
        let table = self.table(seq)?;
        SeqAttention::new(table.blocks().to_vec(), table.len(), n_queries)
    }

    /// Takes `n` blocks with one holder each: empty ones first, then evicted cached ones,
    /// least recently used first.
    fn take_blocks(&mut self, n: usize) -> Result<Vec<BlockId>> {
        let free = self.free_blocks();
        if n > free {
            return Err(KvError::CacheFull { needed: n, free });
        }
        while self.allocator.free_count() < n {
            let Some(victim) = self.prefix.as_ref().and_then(PrefixIndex::oldest_cached) else {
                break;
            };
            self.unindex(victim)?;
            self.counters.evicted_blocks += 1;
        }
        self.allocator.allocate(n)
    }

    /// Drops the index's entry for `block` and the reference it held.
    fn unindex(&mut self, block: BlockId) -> Result<()> {
        if let Some(index) = &mut self.prefix {
            if index.is_indexed(block) {
                self.allocator.release(&[block])?;
                index.remove(block);
            }
        }
        Ok(())
    }

    /// Adds a sequence holder to each block; cached ones leave the LRU queue.
    fn retain(&mut self, blocks: &[BlockId]) -> Result<()> {
        self.allocator.retain(blocks)?;
        if let Some(index) = &mut self.prefix {
            for &b in blocks {
                index.take_cached(b);
            }
        }
        Ok(())
    }

    /// Drops a sequence holder from each block (given in sequence order); indexed blocks
    /// left to the index alone join the LRU queue, the last block of the sequence as the
    /// oldest: evicting from the end of a chain keeps its start reusable, and the start is
    /// what other prompts share.
    fn release(&mut self, blocks: &[BlockId]) -> Result<()> {
        self.allocator.release(blocks)?;
        if let Some(index) = &mut self.prefix {
            for &b in blocks.iter().rev() {
                if index.is_indexed(b) && self.allocator.ref_count(b) == 1 {
                    index.push_cached(b);
                }
            }
        }
        Ok(())
    }

    /// The hash chain of a sequence that kept it (no StreamingLLM eviction): one hash per
    /// full block of the text committed so far (dropped blocks included), the ids of a
    /// partly committed dropped block pending, and the hashes of the blocks held matching
    /// their ids.
    fn audit_chain(
        &self,
        index: &PrefixIndex,
        id: SeqId,
        s: &Sequence,
    ) -> std::result::Result<(), String> {
        let bs = self.block_size;
        let text = s.evicted - s.unseen + s.tokens.len();
        if s.hashes.len() != text / bs {
            return Err(format!(
                "sequence {id} has {} block hashes for {} committed blocks",
                s.hashes.len(),
                text / bs
            ));
        }
        let pending = if s.unseen > 0 { text % bs } else { 0 };
        if s.pending.len() != pending {
            return Err(format!(
                "sequence {id} has {} pending ids, {pending} expected",
                s.pending.len()
            ));
        }
        // The held committed ids start at text position `evicted`.
        let first = s.evicted / bs;
        for (j, chunk) in s.tokens.chunks_exact(bs).enumerate() {
            let k = first + j;
            let parent = k.checked_sub(1).map(|p| s.hashes[p]);
            if index.hash(parent, s.cache_salt, chunk) != s.hashes[k] {
                return Err(format!("sequence {id} has a stale block hash"));
            }
        }
        Ok(())
    }

    /// Checks every invariant of the bookkeeping and describes the first one broken:
    /// the allocator's free list holds exactly the blocks without holders; each block's
    /// reference count equals the sequence tables listing it plus one if indexed; cached
    /// blocks are exactly the indexed blocks no sequence holds; each table has
    /// `ceil(len / block_size)` blocks; committed ids never exceed the length; and each
    /// sequence's chain hashes match its committed ids.
    ///
    /// For tests and debugging; O(blocks + tokens).
    ///
    /// # Errors
    /// A description of the first inconsistency.
    pub fn audit(&self) -> std::result::Result<(), String> {
        self.allocator.audit()?;
        let total = self.total_blocks();
        let mut holders = vec![0u32; total];
        for (&id, s) in &self.sequences {
            if id.0 >= self.next_id {
                return Err(format!(
                    "sequence {id} is not below the next id {}",
                    self.next_id
                ));
            }
            let len = s.table.len();
            if s.table.blocks().len() != len.div_ceil(self.block_size) {
                return Err(format!(
                    "sequence {id} holds {len} tokens in {} blocks of {}",
                    s.table.blocks().len(),
                    self.block_size
                ));
            }
            if s.tokens.len() > len {
                return Err(format!(
                    "sequence {id} has {} committed ids but {len} tokens",
                    s.tokens.len()
                ));
            }
            for &b in s.table.blocks() {
                match holders.get_mut(b.index()) {
                    Some(h) => *h += 1,
                    None => return Err(format!("sequence {id} lists block {b} out of range")),
                }
            }
            if s.unseen > 0 && !s.tokens.is_empty() {
                return Err(format!(
                    "sequence {id} holds committed ids while {} dropped ones are unseen",
                    s.unseen
                ));
            }
            if s.unseen > s.evicted {
                return Err(format!(
                    "sequence {id} has {} unseen ids of {} dropped tokens",
                    s.unseen, s.evicted
                ));
            }
            match &self.prefix {
                None if !s.hashes.is_empty() || !s.pending.is_empty() => {
                    return Err(format!("sequence {id} has hashes without a prefix cache"))
                }
                None => {}
                Some(_) if s.streamed && !(s.hashes.is_empty() && s.pending.is_empty()) => {
                    return Err(format!("windowed sequence {id} still has block hashes"))
                }
                Some(_) if s.streamed => {}
                Some(index) => self.audit_chain(index, id, s)?,
            }
        }
        if let Some(index) = &self.prefix {
            index.audit(self.block_size)?;
            for (&id, s) in &self.sequences {
                if s.streamed {
                    continue;
                }
                // Each held full block the index holds is indexed under its own chain hash:
                // an index hit reads exactly the K/V of the prefix the hash names.
                let first = s.evicted / self.block_size;
                for (i, &b) in s.table.blocks().iter().enumerate() {
                    let Some(h) = index.hash_of(b) else {
                        continue;
                    };
                    if let Some(&mine) = s.hashes.get(first + i) {
                        if mine != h {
                            return Err(format!(
                                "sequence {id} holds block {b} indexed under another prefix"
                            ));
                        }
                    }
                }
            }
            for b in index.indexed_blocks() {
                holders[b.index()] += 1;
                let only_index = self.allocator.ref_count(b) == 1;
                if only_index != index.is_cached(b) {
                    return Err(format!(
                        "indexed block {b} has {} holders but is {}in the LRU queue",
                        self.allocator.ref_count(b),
                        if index.is_cached(b) { "" } else { "not " }
                    ));
                }
            }
        }
        for (b, &h) in holders.iter().enumerate() {
            let rc = self.allocator.ref_count(BlockId::new(b as u32));
            if rc != h {
                return Err(format!(
                    "block {b} has reference count {rc} but {h} holders"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[u32]) -> Vec<BlockId> {
        raw.iter().copied().map(BlockId::new).collect()
    }

    #[test]
    fn fork_copies_shared_partial_block_on_write() -> Result<()> {
        let mut m = CacheManager::new(4, 8)?;
        let a = m.create_sequence();
        m.reserve(a, 6)?; // blocks [0, 1], block 1 half full
        let b = m.fork(a)?;
        assert_eq!(m.ref_count(BlockId::new(0)), 2);
        assert_eq!(m.ref_count(BlockId::new(1)), 2);
        let wrote = m.reserve(b, 1)?;
        assert_eq!(wrote.copies, vec![(BlockId::new(1), BlockId::new(2))]);
        assert_eq!(
            wrote.slots,
            vec![Slot {
                block: BlockId::new(2),
                offset: 2
            }]
        );
        assert_eq!(m.ref_count(BlockId::new(1)), 1);
        // The parent's next write goes into its own block 1, no copy.
        let wrote = m.reserve(a, 1)?;
        assert!(wrote.copies.is_empty());
        assert_eq!(
            wrote.slots,
            vec![Slot {
                block: BlockId::new(1),
                offset: 2
            }]
        );
        m.free(a)?;
        m.free(b)?;
        assert_eq!(m.free_blocks(), 8);
        assert_eq!(m.audit(), Ok(()));
        Ok(())
    }

    #[test]
    fn full_shared_block_needs_no_copy() -> Result<()> {
        let mut m = CacheManager::new(4, 8)?;
        let a = m.create_sequence();
        m.reserve(a, 4)?;
        let b = m.fork(a)?;
        let wrote = m.reserve(b, 1)?;
        assert!(wrote.copies.is_empty());
        assert_eq!(m.ref_count(BlockId::new(0)), 2);
        Ok(())
    }

    #[test]
    fn cache_full_changes_nothing_even_with_cow() -> Result<()> {
        let mut m = CacheManager::new(4, 2)?;
        let a = m.create_sequence();
        m.reserve(a, 6)?;
        let b = m.fork(a)?;
        let before = m.clone();
        let err = m.reserve(b, 1);
        assert!(matches!(
            err,
            Err(KvError::CacheFull { needed: 1, free: 0 })
        ));
        assert_eq!(m, before);
        assert_eq!(m.reservable_tokens(b)?, 0);
        assert_eq!(m.reservable_tokens(a)?, 0);
        Ok(())
    }

    #[test]
    fn errors_are_typed_and_change_nothing() -> Result<()> {
        let mut m = CacheManager::with_prefix_cache(4, 2, 0)?;
        assert!(matches!(
            m.reserve(SeqId(7), 1),
            Err(KvError::UnknownSequence { id: SeqId(7) })
        ));
        let a = m.create_sequence();
        m.reserve(a, 2)?;
        let before = m.clone();
        assert!(matches!(m.truncate(a, 3), Err(KvError::OutOfRange { .. })));
        assert!(matches!(
            m.commit(a, &[1, 2, 3]),
            Err(KvError::OutOfRange {
                index: 3,
                len: 2,
                ..
            })
        ));
        assert!(matches!(
            m.reserve(a, usize::MAX),
            Err(KvError::InvalidArgument { .. })
        ));
        assert!(matches!(
            m.blocks_needed_batch(&[(a, 1), (a, 1)]),
            Err(KvError::InvalidArgument { .. })
        ));
        assert!(matches!(
            m.free(SeqId(9)),
            Err(KvError::UnknownSequence { id: SeqId(9) })
        ));
        assert!(matches!(
            m.preempt(SeqId(9)),
            Err(KvError::UnknownSequence { id: SeqId(9) })
        ));
        assert!(matches!(
            m.fork(SeqId(9)),
            Err(KvError::UnknownSequence { id: SeqId(9) })
        ));
        assert!(m.seq_attention(a, 3).is_err());
        assert_eq!(m, before);
        assert!(CacheManager::new(0, 1).is_err());
        assert!(CacheManager::new(1, 0).is_err());
        assert!(CacheManager::with_prefix_cache(1, 0, 0).is_err());
        Ok(())
    }

    #[test]
    fn failed_copy_rolls_back() -> Result<()> {
        let mut m = CacheManager::new(4, 4)?;
        let a = m.create_sequence();
        m.reserve(a, 2)?;
        let b = m.fork(a)?;
        let before = m.clone();
        let err = m.reserve_and_copy(b, 1, |_| {
            Err(KvError::Unsupported {
                backend: "test".into(),
                what: "copy".into(),
            })
        });
        assert!(matches!(err, Err(KvError::Unsupported { .. })));
        assert_eq!(m, before);
        let mut seen = Vec::new();
        let ok = m.reserve_and_copy(b, 1, |c| {
            seen.extend_from_slice(c);
            Ok(())
        })?;
        assert_eq!(seen, ok.copies);
        assert_eq!(seen.len(), 1);
        Ok(())
    }
    #[test]
    fn evict_window_drops_middle_blocks() -> Result<()> {
        let mut m = CacheManager::new(2, 8)?;
        let a = m.create_sequence();
        m.reserve(a, 9)?; // blocks 0..5, last one half full
        let before = m.clone();
        // Errors first: past the full blocks, and nothing changed.
        assert!(matches!(
            m.evict_window(a, 2, 3),
            Err(KvError::OutOfRange {
                index: 5,
                len: 4,
                ..
            })
        ));
        assert!(matches!(
            m.evict_window(SeqId(9), 0, 1),
            Err(KvError::UnknownSequence { id: SeqId(9) })
        ));
        assert_eq!(m, before);
        let copies = m.evict_window(a, 1, 2)?;
        assert!(copies.is_empty());
        assert_eq!(m.table(a)?.blocks(), ids(&[0, 3, 4]));
        assert_eq!(m.len(a)?, 5);
        assert_eq!(m.evicted_tokens(a)?, 4);
        assert_eq!(m.free_blocks(), 5);
        assert_eq!(m.ref_count(BlockId::new(1)), 0);
        assert_eq!(m.ref_count(BlockId::new(2)), 0);
        // Slots stay contiguous in cache index: the next token goes after the old tail.
        let next = m.reserve(a, 1)?.slots;
        assert_eq!(
            next,
            vec![Slot {
                block: BlockId::new(4),
                offset: 1
            }]
        );
        assert_eq!(m.seq_attention(a, 1)?.kv_len(), 6);
        // No sinks: the window alone.
        m.evict_window(a, 0, 1)?;
        assert_eq!(m.table(a)?.blocks(), ids(&[3, 4]));
        assert_eq!(m.evicted_tokens(a)?, 6);
        assert_eq!(m.audit(), Ok(()));
        m.free(a)?;
        assert_eq!(m.free_blocks(), 8);
        Ok(())
    }

    #[test]
    fn evict_window_copies_shared_sinks_and_leaves_the_index() -> Result<()> {
        let mut m = CacheManager::with_prefix_cache(2, 12, 0)?;
        let a = m.create_sequence();
        m.reserve(a, 8)?;
        m.commit(a, &[1, 2, 3, 4, 5, 6, 7, 8])?;
        assert!(m.is_indexed(BlockId::new(0)) && m.is_indexed(BlockId::new(1)));
        let b = m.fork(a)?;
        // Block 0 is held by a, b and the index: a's sinks must be copied before a rewrite.
        let copies = m.evict_window(a, 1, 2)?;
        assert_eq!(copies.len(), 1);
        let (from, to) = copies[0];
        assert_eq!(from, BlockId::new(0));
        assert_eq!(m.table(a)?.blocks(), &[to, BlockId::new(3)]);
        assert_eq!(m.ref_count(to), 1);
        assert_eq!(m.ref_count(BlockId::new(0)), 2); // b and the index
        assert_eq!(m.tokens(a)?, &[1, 2, 7, 8]);
        assert_eq!(m.table(b)?.blocks(), ids(&[0, 1, 2, 3]));
        // Later commits of a windowed sequence index nothing.
        let indexed = m.stats().indexed_blocks;
        m.reserve(a, 2)?;
        m.commit(a, &[9, 10])?;
        assert_eq!(m.stats().indexed_blocks, indexed);
        // b alone with the index: its sinks are not copied, they leave the index.
        m.free(a)?;
        let copies = m.evict_window(b, 1, 1)?;
        assert!(copies.is_empty());
        assert!(!m.is_indexed(BlockId::new(0)));
        assert_eq!(m.ref_count(BlockId::new(0)), 1);
        assert!(m.is_indexed(BlockId::new(1))); // the dropped block keeps valid K/V for its prefix
        assert_eq!(m.audit(), Ok(()));
        Ok(())
    }

    #[test]
    fn failed_sink_copy_rolls_back_the_eviction() -> Result<()> {
        let mut m = CacheManager::new(2, 8)?;
        let a = m.create_sequence();
        m.reserve(a, 6)?;
        let _b = m.fork(a)?; // block 0 is shared: a's eviction must copy it
        let before = m.clone();
        let err = m.evict_window_and_copy(a, 1, 1, |_| {
            Err(KvError::Unsupported {
                backend: "test".into(),
                what: "copy".into(),
            })
        });
        assert!(matches!(err, Err(KvError::Unsupported { .. })));
        assert_eq!(m, before);
        let mut seen = Vec::new();
        let copies = m.evict_window_and_copy(a, 1, 1, |c| {
            seen.extend_from_slice(c);
            Ok(())
        })?;
        assert_eq!(copies.len(), 1);
        assert_eq!(seen, copies);
        assert_eq!(m.len(a)?, 4);
        assert_eq!(m.audit(), Ok(()));
        Ok(())
    }

    #[test]
    fn evict_window_refuses_a_commit_boundary_inside_the_dropped_blocks() -> Result<()> {
        let mut m = CacheManager::with_prefix_cache(2, 8, 0)?;
        let a = m.create_sequence();
        m.reserve(a, 8)?;
        m.commit(a, &[1, 2, 3])?;
        let before = m.clone();
        assert!(matches!(
            m.evict_window(a, 1, 2),
            Err(KvError::InvalidArgument { .. })
        ));
        assert_eq!(m, before);
        // A copy that does not fit fails whole too.
        let mut m = CacheManager::new(2, 3)?;
        let a = m.create_sequence();
        m.reserve(a, 6)?;
        let _b = m.fork(a)?;
        let before = m.clone();
        assert!(matches!(
            m.evict_window(a, 1, 1),
            Err(KvError::CacheFull { needed: 1, free: 0 })
        ));
        assert_eq!(m, before);
        Ok(())
    }

    #[test]
    fn drop_front_keeps_the_hash_chain_going() -> Result<()> {
        let mut m = CacheManager::with_prefix_cache(2, 16, 0)?;
        let a = m.create_sequence();
        m.reserve(a, 4)?;
        m.commit(a, &[1, 2, 3, 4])?;
        m.drop_front(a, 1)?;
        // The dropped block waits in the LRU queue, still indexed; one block is held.
        assert!(m.is_indexed(BlockId::new(0)) && m.ref_count(BlockId::new(0)) == 1);
        assert_eq!((m.evicted_tokens(a)?, m.tokens(a)?), (2, &[3u32, 4][..]));
        m.reserve(a, 4)?;
        m.commit(a, &[5, 6, 7, 8])?;
        assert_eq!(m.audit(), Ok(()));
        // Blocks committed after the drop are indexed under their whole prefix.
        let held = m.table(a)?.blocks().to_vec();
        assert_eq!(m.indexed_tokens(held[2]), Some(&[7u32, 8][..]));
        m.free(a)?;
        let prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(m.prefix_match(&prompt, 0).tokens, 8);
        assert_eq!(m.window_prefix_match(&prompt, 0, 3, usize::MAX), (4, 3));
        // Another first block: another chain, nothing found.
        assert_eq!(m.prefix_match(&[0, 2, 3, 4, 5, 6, 7, 8, 9], 0).tokens, 0);
        assert_eq!(
            m.window_prefix_match(&[0, 2, 3, 4, 5, 6, 7, 8, 9], 0, 3, 9),
            (0, 0)
        );
        Ok(())
    }

    #[test]
    fn ids_of_blocks_dropped_before_their_commit_still_chain() -> Result<()> {
        let mut m = CacheManager::with_prefix_cache(2, 8, 0)?;
        let a = m.create_sequence();
        m.reserve(a, 7)?; // blocks 0..4, the last one half full
        m.drop_front(a, 3)?; // nothing committed yet
        assert_eq!((m.len(a)?, m.evicted_tokens(a)?), (1, 6));
        assert_eq!(m.free_blocks(), 7);
        // A commit ending inside the dropped ids: they wait, nothing is held.
        m.commit(a, &[1, 2, 3])?;
        assert_eq!(m.audit(), Ok(()));
        assert!(m.tokens(a)?.is_empty());
        // One more id than dropped and held: refused, nothing changes.
        let before = m.clone();
        assert!(matches!(
            m.commit(a, &[4, 5, 6, 7, 0]),
            Err(KvError::OutOfRange { .. })
        ));
        assert_eq!(m, before);
        m.commit(a, &[4, 5, 6, 7])?;
        assert_eq!(m.tokens(a)?, &[7]);
        m.reserve(a, 1)?;
        m.commit(a, &[8])?;
        assert_eq!(m.audit(), Ok(()));
        let block = m.table(a)?.blocks()[0];
        assert_eq!(m.indexed_tokens(block), Some(&[7u32, 8][..]));
        // Only the held block is indexed: a window of 2 at position 8 reads block 3 alone.
        assert_eq!(m.stats().indexed_blocks, 1);
        let prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(m.window_prefix_match(&prompt, 0, 2, usize::MAX), (4, 3));
        assert_eq!(m.window_prefix_match(&prompt, 0, 4, usize::MAX), (0, 0));
        let (b, reused) = m.create_with_window_prefix(&prompt, 0, 2, usize::MAX);
        assert_eq!(
            (reused, m.evicted_tokens(b)?, m.tokens(b)?),
            (8, 6, &[7u32, 8][..])
        );
        // The reused sequence goes on indexing: its next full block joins the chain.
        m.reserve(b, 2)?;
        m.commit(b, &[9, 10])?;
        assert_eq!(m.stats().indexed_blocks, 2);
        assert_eq!(m.audit(), Ok(()));
        Ok(())
    }

    #[test]
    fn drop_front_errors_change_nothing_and_streaming_stops_the_chain() -> Result<()> {
        let mut m = CacheManager::with_prefix_cache(2, 8, 0)?;
        let a = m.create_sequence();
        m.reserve(a, 5)?;
        let before = m.clone();
        assert!(matches!(
            m.drop_front(a, 3),
            Err(KvError::OutOfRange {
                index: 3,
                len: 2,
                ..
            })
        ));
        assert!(matches!(
            m.drop_front(SeqId(9), 1),
            Err(KvError::UnknownSequence { .. })
        ));
        m.drop_front(a, 0)?;
        assert_eq!(m, before);
        m.drop_front(a, 1)?;
        // StreamingLLM's eviction cannot follow while dropped ids are to come.
        let before = m.clone();
        assert!(matches!(
            m.evict_window(a, 0, 1),
            Err(KvError::InvalidArgument { .. })
        ));
        assert_eq!(m, before);
        m.commit(a, &[1, 2, 3, 4])?;
        m.evict_window(a, 0, 1)?;
        // From then on nothing of it is indexed.
        let indexed = m.stats().indexed_blocks;
        m.reserve(a, 3)?;
        m.commit(a, &[5, 6, 7, 8])?;
        assert_eq!(m.stats().indexed_blocks, indexed);
        assert_eq!(m.audit(), Ok(()));
        // Without a prefix cache the dropped ids are skipped all the same.
        let mut m = CacheManager::new(2, 8)?;
        let a = m.create_sequence();
        m.reserve(a, 5)?;
        m.drop_front(a, 2)?;
        m.commit(a, &[1, 2, 3, 4, 5])?;
        assert_eq!(m.tokens(a)?, &[5]);
        assert_eq!(m.audit(), Ok(()));
        Ok(())
    }
}
