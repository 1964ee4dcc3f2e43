//! Which tokens of which sequence live in which block.

use std::collections::BTreeMap;

use crate::{BlockAllocator, BlockId, BlockTable, KvError, Result, SeqAttention, Slot};

/// Identifies a sequence inside one [`CacheManager`].
pub type SeqId = u64;

/// What an append asks the caller to do on the backend, in this order: copy blocks
/// (copy-on-write of a shared, partly filled block), then write K/V into the slots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appended {
    /// One slot per appended token, in token order.
    pub slots: Vec<Slot>,
    /// `(from, to)` block copies to run with [`crate::CacheBackend::copy_blocks`] before the
    /// write.
    pub copies: Vec<(BlockId, BlockId)>,
}

/// The bookkeeping of a paged cache: sequences, their block tables, and the shared
/// allocator. It decides where tokens go; a [`crate::CacheBackend`] stores them.
///
/// ```
/// use kv_core::{CacheManager, KvError};
/// let mut cache = CacheManager::new(16, 4)?; // 4 blocks of 16 tokens
/// let seq = cache.create();
/// let prompt = cache.append(seq, 20)?; // two blocks
/// assert_eq!(prompt.slots.len(), 20);
/// assert!(matches!(cache.append(seq, 100), Err(KvError::CacheFull { needed: 6, free: 2 })));
/// assert_eq!(cache.len(seq)?, 20); // the failed append changed nothing
/// cache.truncate(seq, 5)?;
/// assert_eq!(cache.free_blocks(), 3);
/// cache.free(seq)?;
/// assert_eq!(cache.free_blocks(), 4);
/// # Ok::<(), KvError>(())
/// ```
#[derive(Debug, Clone)]
pub struct CacheManager {
    block_size: usize,
    allocator: BlockAllocator,
    sequences: BTreeMap<SeqId, BlockTable>,
    next_id: SeqId,
}

impl CacheManager {
    /// A manager of `num_blocks` blocks holding `block_size` tokens each.
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
        if num_blocks == 0 || num_blocks > BlockId::MAX as usize {
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
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.allocator.total()
    }
    /// Blocks nobody holds.
    pub fn free_blocks(&self) -> usize {
        self.allocator.free_count()
    }
    /// Blocks held by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.allocator.used_count()
    }
    /// Sequences that hold `block`.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.allocator.ref_count(block)
    }
    /// Ids of live sequences, in creation order.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.sequences.keys().copied()
    }

    /// Starts an empty sequence.
    pub fn create(&mut self) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.sequences.insert(id, BlockTable::default());
        id
    }

    /// The block table of `seq`.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn table(&self, seq: SeqId) -> Result<&BlockTable> {
        self.sequences
            .get(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })
    }

    /// Tokens `seq` holds.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.table(seq)?.len())
    }

    /// Blocks an append of `n` tokens to `seq` would take from the free pool.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn blocks_needed(&self, seq: SeqId, n: usize) -> Result<usize> {
        let (fresh, cow) = self.plan(self.table(seq)?, n);
        Ok(fresh + usize::from(cow))
    }

    /// (new blocks for fresh tokens, whether the last block must be copied first)
    fn plan(&self, table: &BlockTable, n: usize) -> (usize, bool) {
        let len = table.len();
        let capacity = table.blocks().len() * self.block_size;
        let fresh = (len + n).saturating_sub(capacity).div_ceil(self.block_size);
        let partial = len % self.block_size != 0;
        let shared_tail = n > 0
            && partial
            && table
                .blocks()
                .last()
                .is_some_and(|&b| self.allocator.ref_count(b) > 1);
        (fresh, shared_tail)
    }

    /// Reserves room for `n` more tokens of `seq` and says where to write them.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::CacheFull`] when the free blocks do not
    /// suffice. Nothing changes on error.
    pub fn append(&mut self, seq: SeqId, n: usize) -> Result<Appended> {
        let table = self.table(seq)?;
        let (fresh, cow) = self.plan(table, n);
        let needed = fresh + usize::from(cow);
        if needed > self.allocator.free_count() {
            return Err(KvError::CacheFull {
                needed,
                free: self.allocator.free_count(),
            });
        }
        let mut new_blocks = self.allocator.allocate(needed)?;
        let mut copies = Vec::new();
        let table = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })?;
        if cow {
            let to = new_blocks.remove(0);
            let blocks = table.blocks_mut();
            let last = blocks.len() - 1;
            let from = std::mem::replace(&mut blocks[last], to);
            self.allocator.release(&[from])?;
            copies.push((from, to));
        }
        table.blocks_mut().extend(new_blocks);
        let start = table.len();
        table.set_len(start + n);
        let slots = (start..start + n)
            .map(|i| Slot {
                block: table.blocks()[i / self.block_size],
                offset: (i % self.block_size) as u32,
            })
            .collect();
        Ok(Appended { slots, copies })
    }

    /// Forgets every token of `seq` from `len` on (speculative-decoding rollback); blocks no
    /// longer needed are released.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::OutOfRange`] when `len` exceeds the length.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let table = self
            .sequences
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })?;
        if len > table.len() {
            return Err(KvError::OutOfRange {
                what: "truncate length",
                index: len,
                len: table.len(),
            });
        }
        let keep = len.div_ceil(self.block_size);
        let dropped = table.blocks_mut().split_off(keep);
        table.set_len(len);
        self.allocator.release(&dropped)
    }

    /// Ends `seq`, releasing its blocks.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn free(&mut self, seq: SeqId) -> Result<()> {
        let table = self
            .sequences
            .remove(&seq)
            .ok_or(KvError::UnknownSequence { id: seq })?;
        self.allocator.release(table.blocks())
    }

    /// A new sequence that shares every block of `seq`; the first write into a shared,
    /// partly filled block copies it ([`Appended::copies`]), so neither side sees the
    /// other's later tokens.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`].
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let table = self.table(seq)?.clone();
        self.allocator.retain(table.blocks())?;
        let id = self.next_id;
        self.next_id += 1;
        self.sequences.insert(id, table);
        Ok(id)
    }

    /// What attention needs to read `seq` when its last `n_queries` tokens are the queries.
    ///
    /// # Errors
    /// [`KvError::UnknownSequence`]; [`KvError::InvalidArgument`] when `n_queries` is zero
    /// or exceeds the length.
    pub fn attention(&self, seq: SeqId, n_queries: usize) -> Result<SeqAttention> {
        let table = self.table(seq)?;
        SeqAttention::new(table.blocks().to_vec(), table.len(), n_queries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_copies_shared_partial_block_on_write() {
        let mut m = CacheManager::new(4, 8).unwrap();
        let a = m.create();
        m.append(a, 6).unwrap(); // blocks [0, 1], block 1 half full
        let b = m.fork(a).unwrap();
        assert_eq!(m.ref_count(0), 2);
        assert_eq!(m.ref_count(1), 2);
        let wrote = m.append(b, 1).unwrap();
        assert_eq!(wrote.copies, vec![(1, 2)]);
        assert_eq!(
            wrote.slots,
            vec![Slot {
                block: 2,
                offset: 2
            }]
        );
        assert_eq!(m.ref_count(1), 1);
        // The parent's next write goes into its own block 1, no copy.
        let wrote = m.append(a, 1).unwrap();
        assert!(wrote.copies.is_empty());
        assert_eq!(
            wrote.slots,
            vec![Slot {
                block: 1,
                offset: 2
            }]
        );
        m.free(a).unwrap();
        m.free(b).unwrap();
        assert_eq!(m.free_blocks(), 8);
    }

    #[test]
    fn full_shared_block_needs_no_copy() {
        let mut m = CacheManager::new(4, 8).unwrap();
        let a = m.create();
        m.append(a, 4).unwrap();
        let b = m.fork(a).unwrap();
        let wrote = m.append(b, 1).unwrap();
        assert!(wrote.copies.is_empty());
        assert_eq!(m.ref_count(0), 2);
    }

    #[test]
    fn cache_full_changes_nothing_even_with_cow() {
        let mut m = CacheManager::new(4, 2).unwrap();
        let a = m.create();
        m.append(a, 6).unwrap();
        let b = m.fork(a).unwrap();
        let err = m.append(b, 1).unwrap_err();
        assert!(matches!(err, KvError::CacheFull { needed: 1, free: 0 }));
        assert_eq!(m.len(b).unwrap(), 6);
        assert_eq!(m.ref_count(1), 2);
    }

    #[test]
    fn errors_are_typed() {
        let mut m = CacheManager::new(4, 2).unwrap();
        assert!(matches!(
            m.append(7, 1),
            Err(KvError::UnknownSequence { id: 7 })
        ));
        let a = m.create();
        assert!(matches!(m.truncate(a, 1), Err(KvError::OutOfRange { .. })));
        assert!(m.attention(a, 1).is_err());
        assert!(CacheManager::new(0, 1).is_err());
        assert!(CacheManager::new(1, 0).is_err());
    }
}
