//! The prefix index: full blocks found by a hash chain over the token ids before them.
//!
//! A block's K/V depends on every token before it, not only its own, so a block is keyed by
//! `hash(parent block's hash, this block's token ids, salts)`: equal hashes mean equal whole
//! prefixes. Only full blocks whose K/V the caller says is written
//! ([`crate::CacheManager::commit`]) are indexed, and an indexed block is never
//! written again: the index holds a reference on it, so a write into it goes through
//! copy-on-write like any other shared block.
//!
//! Blocks that only the index holds are *cached*: no sequence reads them, but a later prompt
//! with the same prefix can take them back. They sit in an LRU queue and are evicted, oldest
//! first, when an allocation finds no empty block.

use std::collections::{BTreeMap, HashMap};
use xxhash_rust::xxh3::Xxh3;

use crate::BlockId;

/// Identifies a whole token prefix ending at a block boundary.
///
/// 128 bits of xxh3-128 over a fixed little-endian encoding, the same in every process and
/// build (std's `DefaultHasher` promises neither). Two different prefixes share a block only if both
/// their chain hashes collide *and* the block's own token ids are equal (each entry keeps
/// its ids and they are compared on lookup). The hash is not cryptographic: deployments
/// that isolate tenants give each tenant its own `cache_salt` rather than relying on
/// collision resistance.
pub(crate) type ChainHash = u128;

/// One indexed block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    hash: ChainHash,
    parent: Option<ChainHash>,
    tokens: Box<[u32]>,
    /// Position in the LRU queue while only the index holds the block.
    lru_tick: Option<u64>,
}

/// Full blocks by chain hash, plus the LRU queue of the ones no sequence holds.
///
/// This type only keeps the maps consistent with each other; the reference the index holds
/// on each block lives in the [`crate::BlockAllocator`] and is taken and dropped by
/// [`crate::CacheManager`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrefixIndex {
    /// Mixed into every hash: identifies the model and layout whose K/V the blocks hold.
    salt: u64,
    by_hash: HashMap<ChainHash, BlockId>,
    /// Indexed entry of each block, by block id.
    entries: Vec<Option<Entry>>,
    /// Cached blocks (held by the index alone), oldest first.
    lru: BTreeMap<u64, BlockId>,
    clock: u64,
}

impl PrefixIndex {
    pub(crate) fn new(num_blocks: usize, salt: u64) -> Self {
        Self {
            salt,
            by_hash: HashMap::new(),
            entries: vec![None; num_blocks],
            lru: BTreeMap::new(),
            clock: 0,
        }
    }

    pub(crate) fn salt(&self) -> u64 {
        self.salt
    }

    /// The chain hash of a full block of `tokens` following the prefix `parent` (`None` for
    /// the first block), in the namespace `cache_salt`.
    pub(crate) fn hash(
        &self,
        parent: Option<ChainHash>,
        cache_salt: u64,
        tokens: &[u32],
    ) -> ChainHash {
        let mut h = Xxh3::new();
        h.update(b"kv-prefix-chain-v1");
        h.update(&self.salt.to_le_bytes());
        h.update(&cache_salt.to_le_bytes());
        match parent {
            None => h.update(&[0]),
            Some(p) => {
                h.update(&[1]);
                h.update(&p.to_le_bytes());
            }
        }
        h.update(&(tokens.len() as u64).to_le_bytes());
        for &t in tokens {
            h.update(&t.to_le_bytes());
        }
        h.digest128()
    }

    /// The block indexed under `hash`, if its entry also has this parent and these tokens.
    pub(crate) fn lookup(
        &self,
        hash: ChainHash,
        parent: Option<ChainHash>,
        tokens: &[u32],
    ) -> Option<BlockId> {
        let &block = self.by_hash.get(&hash)?;
        let entry = self.entry(block)?;
        (entry.parent == parent && *entry.tokens == *tokens).then_some(block)
    }

    /// The block indexed under `hash`, unverified.
    pub(crate) fn block_of(&self, hash: ChainHash) -> Option<BlockId> {
        self.by_hash.get(&hash).copied()
    }

    fn entry(&self, block: BlockId) -> Option<&Entry> {
        self.entries.get(block.index())?.as_ref()
    }

    pub(crate) fn is_indexed(&self, block: BlockId) -> bool {
        self.entry(block).is_some()
    }

    /// Token ids of an indexed block.
    pub(crate) fn tokens(&self, block: BlockId) -> Option<&[u32]> {
        self.entry(block).map(|e| &*e.tokens)
    }

    /// Indexes `block` under `hash`. The caller checked that neither is indexed yet.
    pub(crate) fn insert(
        &mut self,
        block: BlockId,
        hash: ChainHash,
        parent: Option<ChainHash>,
        tokens: &[u32],
    ) {
        if let Some(slot) = self.entries.get_mut(block.index()) {
            *slot = Some(Entry {
                hash,
                parent,
                tokens: tokens.into(),
                lru_tick: None,
            });
            self.by_hash.insert(hash, block);
        }
    }

    /// Forgets `block`'s entry (and its place in the LRU queue).
    pub(crate) fn remove(&mut self, block: BlockId) {
        if let Some(entry) = self.entries.get_mut(block.index()).and_then(Option::take) {
            self.by_hash.remove(&entry.hash);
            if let Some(tick) = entry.lru_tick {
                self.lru.remove(&tick);
            }
        }
    }

    /// Puts an indexed block that no sequence holds any more at the young end of the queue.
    pub(crate) fn push_cached(&mut self, block: BlockId) {
        let tick = self.clock;
        if let Some(entry) = self.entries.get_mut(block.index()).and_then(Option::as_mut) {
            if entry.lru_tick.is_none() {
                entry.lru_tick = Some(tick);
                self.lru.insert(tick, block);
                self.clock += 1;
            }
        }
    }

    /// Takes a block out of the queue because a sequence holds it again.
    pub(crate) fn take_cached(&mut self, block: BlockId) {
        if let Some(entry) = self.entries.get_mut(block.index()).and_then(Option::as_mut) {
            if let Some(tick) = entry.lru_tick.take() {
                self.lru.remove(&tick);
            }
        }
    }

    pub(crate) fn is_cached(&self, block: BlockId) -> bool {
        self.entry(block).is_some_and(|e| e.lru_tick.is_some())
    }

    /// The least recently used cached block.
    pub(crate) fn oldest_cached(&self) -> Option<BlockId> {
        self.lru.values().next().copied()
    }

    /// Cached blocks, least recently used first: the order allocations evict them in.
    pub(crate) fn cached_oldest_first(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.lru.values().copied()
    }

    /// The chain hash an indexed block is indexed under.
    pub(crate) fn hash_of(&self, block: BlockId) -> Option<ChainHash> {
        self.entry(block).map(|e| e.hash)
    }

    /// Blocks only the index holds.
    pub(crate) fn cached_len(&self) -> usize {
        self.lru.len()
    }

    /// Blocks indexed, held by sequences or not.
    pub(crate) fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Indexed blocks, in id order.
    pub(crate) fn indexed_blocks(&self) -> impl Iterator<Item = BlockId> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_some())
            .map(|(b, _)| BlockId::new(b as u32))
    }

    /// Checks that the hash map, the entries and the queue agree with each other.
    pub(crate) fn audit(&self, block_size: usize) -> std::result::Result<(), String> {
        let mut indexed = 0;
        for (b, entry) in self.entries.iter().enumerate() {
            let Some(e) = entry else { continue };
            indexed += 1;
            if self.by_hash.get(&e.hash) != Some(&(BlockId::new(b as u32))) {
                return Err(format!(
                    "block {b} is indexed but its hash does not find it"
                ));
            }
            if e.tokens.len() != block_size {
                return Err(format!(
                    "indexed block {b} holds {} token ids, not a full block of {block_size}",
                    e.tokens.len()
                ));
            }
            if let Some(tick) = e.lru_tick {
                if self.lru.get(&tick) != Some(&(BlockId::new(b as u32))) {
                    return Err(format!("cached block {b} is missing from the LRU queue"));
                }
            }
        }
        if indexed != self.by_hash.len() {
            return Err(format!(
                "{} hashes map to {indexed} indexed blocks",
                self.by_hash.len()
            ));
        }
        for (&tick, &b) in &self.lru {
            if self.entry(b).and_then(|e| e.lru_tick) != Some(tick) {
                return Err(format!("LRU queue lists block {b}, which is not cached"));
            }
            if tick >= self.clock {
                return Err(format!(
                    "LRU tick {tick} is not below the clock {}",
                    self.clock
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_salts_parents_and_tokens() {
        let a = PrefixIndex::new(1, 1);
        let b = PrefixIndex::new(1, 2);
        let h = a.hash(None, 0, &[1, 2]);
        assert_eq!(h, a.hash(None, 0, &[1, 2]), "deterministic");
        assert_ne!(h, b.hash(None, 0, &[1, 2]), "model salt");
        assert_ne!(h, a.hash(None, 7, &[1, 2]), "cache salt");
        assert_ne!(h, a.hash(Some(h), 0, &[1, 2]), "parent");
        assert_ne!(h, a.hash(None, 0, &[2, 1]), "token order");
        assert_ne!(
            a.hash(None, 0, &[]),
            a.hash(Some(0), 0, &[]),
            "no parent vs parent 0"
        );
    }

    #[test]
    fn lookup_verifies_parent_and_tokens() {
        let mut index = PrefixIndex::new(4, 0);
        let h = index.hash(None, 0, &[1, 2]);
        index.insert(BlockId::new(3), h, None, &[1, 2]);
        assert_eq!(index.lookup(h, None, &[1, 2]), Some(BlockId::new(3)));
        assert_eq!(index.lookup(h, Some(h), &[1, 2]), None);
        assert_eq!(index.lookup(h, None, &[1, 3]), None);
        assert_eq!(index.audit(2), Ok(()));
        index.push_cached(BlockId::new(3));
        assert_eq!(index.oldest_cached(), Some(BlockId::new(3)));
        index.remove(BlockId::new(3));
        assert_eq!(index.cached_len(), 0);
        assert_eq!(index.len(), 0);
        assert_eq!(index.audit(2), Ok(()));
    }
}
