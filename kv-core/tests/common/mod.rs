//! A simulated backend for the bookkeeping tests: each slot holds what its K/V would
//! depend on, `(cache salt, token ids up to and including this one)`. A block reused for the
//! wrong prefix, the wrong namespace, a missed copy or a write into a shared block all show
//! up as a sequence reading back something other than its own tokens.
#![allow(dead_code)]

use kv_core::{BlockId, CacheManager, SeqId, Slot};

/// What a slot's K/V stands for.
pub type Kv = (u64, Vec<u32>);

/// Per-slot contents of a paged pool.
#[derive(Debug, Clone)]
pub struct SimStorage {
    block_size: usize,
    slots: Vec<Option<Kv>>,
}

impl SimStorage {
    pub fn new(block_size: usize, num_blocks: usize) -> Self {
        Self {
            block_size,
            slots: vec![None; block_size * num_blocks],
        }
    }

    /// `CacheBackend::copy_blocks`.
    pub fn copy(&mut self, copies: &[(BlockId, BlockId)]) {
        let bs = self.block_size;
        for &(from, to) in copies {
            let (from, to) = (from.index() * bs, to.index() * bs);
            for i in 0..bs {
                self.slots[to + i] = self.slots[from + i].clone();
            }
        }
    }

    /// Writes the K/V of `tokens[start..start + slots.len()]` (a sequence's full token list).
    pub fn write(&mut self, slots: &[Slot], salt: u64, tokens: &[u32], start: usize) {
        for (i, slot) in slots.iter().enumerate() {
            let pos = start + i;
            self.slots[slot.flat(self.block_size)] = Some((salt, tokens[..=pos].to_vec()));
        }
    }

    /// Writes arbitrary contents into one slot (a rewrite in place, e.g. re-rotated sinks).
    pub fn write_content(&mut self, slot: Slot, kv: Kv) {
        self.slots[slot.flat(self.block_size)] = Some(kv);
    }

    pub fn read(&self, slot: Slot) -> Option<&Kv> {
        self.slots.get(slot.flat(self.block_size))?.as_ref()
    }

    /// `seq` reads back exactly the K/V of `tokens` in namespace `salt`.
    pub fn check_sequence(
        &self,
        m: &CacheManager,
        seq: SeqId,
        salt: u64,
        tokens: &[u32],
    ) -> Result<(), String> {
        let table = m.table(seq).map_err(|e| e.to_string())?;
        check_table(self, table, m.block_size(), seq, salt, tokens)
    }

    /// Every indexed block holds the K/V of its indexed token ids, at one block-aligned
    /// position of one prefix in one namespace.
    pub fn check_index(&self, m: &CacheManager) -> Result<(), String> {
        let bs = m.block_size();
        for b in (0..m.total_blocks() as u32).map(BlockId::new) {
            let Some(ids) = m.indexed_tokens(b) else {
                if m.is_indexed(b) {
                    return Err(format!("block {b} is indexed without token ids"));
                }
                continue;
            };
            let mut first: Option<(u64, usize)> = None;
            for (j, &id) in ids.iter().enumerate() {
                let slot = Slot {
                    block: b,
                    offset: j as u32,
                };
                let Some((salt, prefix)) = self.read(slot) else {
                    return Err(format!("indexed block {b} has an unwritten slot {j}"));
                };
                if prefix.last() != Some(&id) {
                    return Err(format!(
                        "indexed block {b} slot {j} holds {prefix:?}, index says token {id}"
                    ));
                }
                let (salt0, start) = *first.get_or_insert((*salt, prefix.len() - 1 - j));
                if *salt != salt0 || prefix.len() != start + j + 1 || start % bs != 0 {
                    return Err(format!("indexed block {b} mixes prefixes or namespaces"));
                }
            }
        }
        Ok(())
    }
}

pub fn check_table(
    store: &SimStorage,
    table: &kv_core::BlockTable,
    block_size: usize,
    seq: SeqId,
    salt: u64,
    tokens: &[u32],
) -> Result<(), String> {
    if table.len() != tokens.len() {
        return Err(format!(
            "sequence {seq} holds {} tokens, expected {}",
            table.len(),
            tokens.len()
        ));
    }
    for i in 0..tokens.len() {
        let slot = table
            .slot(i, block_size)
            .ok_or_else(|| format!("sequence {seq} has no slot for token {i}"))?;
        let want = (salt, tokens[..=i].to_vec());
        if store.read(slot) != Some(&want) {
            return Err(format!(
                "sequence {seq} token {i} at {slot:?} reads {:?}, expected {want:?}",
                store.read(slot)
            ));
        }
    }
    Ok(())
}

/// `seq` reads back exactly `expect`, one entry per cache index.
pub fn check_contents(
    store: &SimStorage,
    m: &CacheManager,
    seq: SeqId,
    expect: &[Kv],
) -> Result<(), String> {
    let bs = m.block_size();
    let table = m.table(seq).map_err(|e| e.to_string())?;
    if table.len() != expect.len() {
        return Err(format!(
            "sequence {seq} holds {} tokens, expected {}",
            table.len(),
            expect.len()
        ));
    }
    for (i, want) in expect.iter().enumerate() {
        let slot = table
            .slot(i, bs)
            .ok_or_else(|| format!("sequence {seq} has no slot for token {i}"))?;
        if store.read(slot) != Some(want) {
            return Err(format!(
                "sequence {seq} token {i} at {slot:?} reads {:?}, expected {want:?}",
                store.read(slot)
            ));
        }
    }
    Ok(())
}

/// Reference counts, derived from the public view only: sequence tables plus the index.
pub fn check_holders(m: &CacheManager) -> Result<(), String> {
    let total = m.total_blocks();
    let mut seq_holders = vec![0u32; total];
    for seq in m.sequences() {
        for &b in m.table(seq).map_err(|e| e.to_string())?.blocks() {
            seq_holders[b.index()] += 1;
        }
    }
    let mut used = 0;
    let mut cached = 0;
    for (b, &h) in seq_holders.iter().enumerate() {
        let indexed = m.is_indexed(BlockId::new(b as u32));
        let want = h + u32::from(indexed);
        if m.ref_count(BlockId::new(b as u32)) != want {
            return Err(format!(
                "block {b}: ref count {} but {h} sequence holders{}",
                m.ref_count(BlockId::new(b as u32)),
                if indexed { " and the index" } else { "" }
            ));
        }
        used += usize::from(h > 0);
        cached += usize::from(h == 0 && indexed);
    }
    if m.used_blocks() != used || m.cached_blocks() != cached {
        return Err(format!(
            "used/cached {}/{} but holders say {used}/{cached}",
            m.used_blocks(),
            m.cached_blocks()
        ));
    }
    if m.free_blocks() + m.used_blocks() != total {
        return Err(format!(
            "free {} + used {} != total {total}",
            m.free_blocks(),
            m.used_blocks()
        ));
    }
    let stats = m.stats();
    if stats.empty_blocks + stats.cached_blocks + stats.used_blocks != total {
        return Err(format!("stats do not add up: {stats:?}"));
    }
    m.audit()
}
