//! Fixed-size blocks with reference counts, and the table that maps a sequence onto them.

use crate::{KvError, Result};

/// Index of a block in a backend's pools.
///
/// A newtype, so a block id cannot be passed where a sequence id, an offset or a count is
/// meant. Displays as its number.
///
/// ```
/// use kv_core::{BlockId, Slot};
/// let slot = Slot { block: BlockId::new(3), offset: 5 };
/// assert_eq!(slot.flat(16), 3 * 16 + 5);
/// assert_eq!(format!("block {}", slot.block), "block 3");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BlockId(u32);

impl BlockId {
    /// The id of block `index`.
    pub const fn new(index: u32) -> Self {
        Self(index)
    }
    /// The block's index in its pools, for indexing.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
    /// The block's number.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl From<u32> for BlockId {
    fn from(index: u32) -> Self {
        Self(index)
    }
}

impl std::fmt::Display for BlockId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Blocks a pool may have: every block needs an id that fits a `u32`.
pub(crate) const MAX_BLOCKS: usize = u32::MAX as usize;

/// Where one token's K/V row lives: a block and the position inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    /// The block.
    pub block: BlockId,
    /// Position inside the block, below the block size.
    pub offset: u32,
}

impl Slot {
    /// The slot's index in a flat array of `block_size`-sized blocks.
    pub fn flat(&self, block_size: usize) -> usize {
        self.block.index() * block_size + self.offset as usize
    }
}

/// Hands out blocks and counts who holds them; a block returns to the free list when its
/// last holder lets go.
///
/// ```
/// use kv_core::BlockAllocator;
/// let mut blocks = BlockAllocator::new(4);
/// let got = blocks.allocate(3)?;
/// assert_eq!(blocks.free_count(), 1);
/// assert!(blocks.allocate(2).is_err()); // all or nothing
/// assert_eq!(blocks.free_count(), 1);
/// blocks.release(&got)?;
/// assert_eq!(blocks.free_count(), 4);
/// # Ok::<(), kv_core::KvError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockAllocator {
    ref_counts: Vec<u32>,
    /// Free blocks; the lowest ids are handed out first (popped from the end).
    free: Vec<BlockId>,
}

impl BlockAllocator {
    /// An allocator over blocks `0..total`.
    pub fn new(total: usize) -> Self {
        let total = total.min(MAX_BLOCKS);
        Self {
            ref_counts: vec![0; total],
            free: (0..total as u32).rev().map(BlockId).collect(),
        }
    }

    /// Blocks managed.
    pub fn total(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks nobody holds.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Blocks somebody holds.
    pub fn used_count(&self) -> usize {
        self.total() - self.free_count()
    }

    /// Holders of `block` (0 when free).
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts.get(block.index()).copied().unwrap_or(0)
    }

    /// Takes `n` free blocks, each with one holder.
    ///
    /// # Errors
    /// [`KvError::CacheFull`] when fewer than `n` are free; nothing is taken then.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>> {
        if n > self.free.len() {
            return Err(KvError::CacheFull {
                needed: n,
                free: self.free.len(),
            });
        }
        let taken = self.free.split_off(self.free.len() - n);
        for &b in &taken {
            self.ref_counts[b.index()] = 1;
        }
        Ok(taken.into_iter().rev().collect())
    }

    /// Adds a holder to each block (a fork sharing them).
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when a block is free or out of range; nothing changes.
    pub fn retain(&mut self, blocks: &[BlockId]) -> Result<()> {
        self.check_held(blocks)?;
        for &b in blocks {
            self.ref_counts[b.index()] += 1;
        }
        Ok(())
    }

    /// Drops one holder of each block; blocks left without holders become free.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when a block is already free or out of range (a double
    /// free); nothing changes.
    pub fn release(&mut self, blocks: &[BlockId]) -> Result<()> {
        self.check_held(blocks)?;
        // A block listed twice must have two holders.
        let mut drops = std::collections::HashMap::<BlockId, u32>::new();
        for &b in blocks {
            *drops.entry(b).or_default() += 1;
        }
        if let Some((&b, &n)) = drops.iter().find(|(&b, &n)| self.ref_counts[b.index()] < n) {
            return Err(KvError::InvalidArgument {
                what: "block release",
                detail: format!(
                    "block {b} released {n} times but held {} times",
                    self.ref_counts[b.index()]
                ),
            });
        }
        for &b in blocks {
            let rc = &mut self.ref_counts[b.index()];
            *rc -= 1;
            if *rc == 0 {
                self.free.push(b);
            }
        }
        Ok(())
    }

    /// Checks the allocator's own invariants: the free list holds every block without
    /// holders exactly once and nothing else. Returns the first problem found, in words.
    ///
    /// Cheap enough for tests to call after every step; [`crate::CacheManager::audit`]
    /// builds on it.
    ///
    /// # Errors
    /// A description of the first inconsistency.
    pub fn audit(&self) -> std::result::Result<(), String> {
        let mut listed = vec![false; self.total()];
        for &b in &self.free {
            match listed.get_mut(b.index()) {
                None => return Err(format!("free list holds block {b} out of range")),
                Some(true) => return Err(format!("block {b} is on the free list twice")),
                Some(seen) => *seen = true,
            }
        }
        for (b, (&rc, &on_free_list)) in self.ref_counts.iter().zip(&listed).enumerate() {
            if (rc == 0) != on_free_list {
                return Err(format!(
                    "block {b} has {rc} holders but is {}on the free list",
                    if on_free_list { "" } else { "not " }
                ));
            }
        }
        Ok(())
    }

    fn check_held(&self, blocks: &[BlockId]) -> Result<()> {
        for &b in blocks {
            match self.ref_counts.get(b.index()) {
                None => {
                    return Err(KvError::OutOfRange {
                        what: "block",
                        index: b.index(),
                        len: self.total(),
                    })
                }
                Some(0) => {
                    return Err(KvError::InvalidArgument {
                        what: "block",
                        detail: format!("block {b} is free"),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// The blocks one sequence occupies, in order, and how many tokens it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    len: usize,
}

impl BlockTable {
    /// Blocks in order; token `i` lives in `blocks()[i / block_size]`.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the sequence holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The slot of token `index`.
    pub fn slot(&self, index: usize, block_size: usize) -> Option<Slot> {
        if index >= self.len {
            return None;
        }
        let block = *self.blocks.get(index / block_size)?;
        Some(Slot {
            block,
            offset: (index % block_size) as u32,
        })
    }
    pub(crate) fn blocks_mut(&mut self) -> &mut Vec<BlockId> {
        &mut self.blocks
    }
    pub(crate) fn set_len(&mut self, len: usize) {
        self.len = len;
    }
}
