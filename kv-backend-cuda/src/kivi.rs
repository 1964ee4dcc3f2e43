//! Host bookkeeping of KIVI key blocks for the device write path: which 32-token key blocks
//! have an f16 window, which slots of it were written, and which blocks a write completes.
//!
//! It follows the CPU backend's contract (kv-backend-cpu's `quant.rs`), so both backends
//! quantize the same blocks from the same keys:
//! - a write to a key block without a window opens one holding the block's stored keys,
//!   dequantized, so the slots it leaves alone still read what they held;
//! - a write to slot 0 of a key block starts it afresh (only that slot counts as written);
//! - when every slot of a window has been written, the block is quantized from it
//!   (`kivi.cu`: `kv_kivi_quantize`); the window is kept until the layer has been attended
//!   (the queries of the tokens that filled the block read it in f16) and the next write
//!   after that frees it.
//!
//! `copy_blocks` copies a block's filling windows with it ([`plan_kivi_copy`]).
//!
//! [`pack_kivi_write`] turns a planned write into the lists the window kernels of `kivi.cu`
//! take, with each open key block's window in a per-layer device window pool
//! ([`WindowSlots`]).
//!
//! [`KiviLayer`] is one layer's state as `device.rs` keeps it: the window states and their
//! places in the layer's device window pool, the table the attend kernel reads them by,
//! `copy_blocks`' window copies and `settle_blocks`.
//!
//! Plain Rust, tested on the CPU.

use std::collections::BTreeMap;

use kv_core::{KvError, Result, Slot};

/// A key block: (cache block id, key block index inside it).
pub(crate) type KeyBlock = (u32, u32);

/// The state of one key block's window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Window {
    /// Bit `j` set: slot `j` of the key block was written since it started filling.
    pub filled: u64,
    /// `Some(n)`: the block was quantized when the layer had been attended `n` times; the
    /// window is freed by the first write after a later attend.
    pub quantized_at: Option<u64>,
}

/// What one write of keys does to a layer's windows, in launch order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KiviWrite {
    /// Windows freed first (quantized blocks the layer's attention has read since).
    pub free: Vec<KeyBlock>,
    /// Key blocks that get a window, filled from their stored keys dequantized, before the
    /// rows are stored.
    pub open: Vec<KeyBlock>,
    /// Key blocks quantized from their windows after the rows are stored, in order.
    pub quantize: Vec<KeyBlock>,
    /// The layer's windows once the write is done (committed by the caller only when
    /// every launch succeeded: a refused write leaves them as they were).
    pub windows: BTreeMap<KeyBlock, Window>,
}

/// [`plan_kivi_write_in`] for a layout without a residual.
#[cfg(test)]
pub(crate) fn plan_kivi_write(
    windows: &BTreeMap<KeyBlock, Window>,
    attends: u64,
    slots: &[Slot],
    block_tokens: usize,
) -> Result<KiviWrite> {
    plan_kivi_write_in(windows, attends, slots, block_tokens, false)
}

/// Plans a write of keys to `slots` (already validated against the storage) of a layer
/// whose windows are `windows` and that has been attended `attends` times, with
/// `block_tokens` tokens per key block. With `residual` (`kivi*-rR`) a quantized block's
/// window serves the queries within R tokens of it and stays until the block is settled;
/// without, the first write after an attend frees it.
///
/// # Errors
/// [`KvError::Unsupported`] for key blocks of more than 64 tokens (the slot mask is a
/// `u64`); [`KvError::Overflow`] for a block id beyond `u32`.
pub(crate) fn plan_kivi_write_in(
    windows: &BTreeMap<KeyBlock, Window>,
    attends: u64,
    slots: &[Slot],
    block_tokens: usize,
    residual: bool,
) -> Result<KiviWrite> {
    if block_tokens == 0 || block_tokens > 64 {
        return Err(KvError::Unsupported {
            backend: "cuda".into(),
            what: format!("KIVI key blocks of {block_tokens} tokens (1 to 64 are tracked)"),
        });
    }
    let full = if block_tokens == 64 {
        u64::MAX
    } else {
        (1u64 << block_tokens) - 1
    };
    let mut plan = KiviWrite {
        windows: windows.clone(),
        ..KiviWrite::default()
    };
    plan.windows.retain(|&kb, w| match w.quantized_at {
        Some(at) if attends > at && !residual => {
            plan.free.push(kb);
            false
        }
        _ => true,
    });
    let mut touched = Vec::new();
    for s in slots {
        let block = crate::plan::to_u32("block id", s.block.index())?;
        let offset = s.offset as usize;
        // `block_tokens` <= 64, so both fit u32 (the key block index is below the offset).
        let (kb, j) = ((offset / block_tokens) as u32, offset % block_tokens);
        let w = plan.windows.entry((block, kb)).or_insert_with(|| {
            plan.open.push((block, kb));
            Window::default()
        });
        // Its rows are the keys a quantized block was made from: writing makes it a
        // filling window again.
        w.quantized_at = None;
        if j == 0 {
            w.filled = 0;
        }
        w.filled |= 1u64 << j;
        touched.push((block, kb));
    }
    touched.sort_unstable();
    touched.dedup();
    for kb in touched {
        if let Some(w) = plan.windows.get_mut(&kb) {
            if w.filled == full {
                w.quantized_at = Some(attends);
                plan.quantize.push(kb);
            }
        }
    }
    Ok(plan)
}

/// What `copy_blocks` does to a layer's windows, as the CPU backend: moves apply in order,
/// and each gives every key block of the target the source's window if that one is still
/// filling (a quantized block's window only serves the queries that filled it; the copy
/// reads the block as stored) or, with `keep_quantized` (a residual layout, whose windows
/// serve every query within R tokens), if it has one at all, dropping the target's own.
///
/// Returns the windows after the moves and, in order, the window copies to run on the
/// device: `(source key block, target key block)`, the target's window taking the source's
/// rows and slot mask.
pub(crate) fn plan_kivi_copy(
    windows: &BTreeMap<KeyBlock, Window>,
    moves: &[(u32, u32)],
    key_blocks_per_block: u32,
    keep_quantized: bool,
) -> (BTreeMap<KeyBlock, Window>, Vec<(KeyBlock, KeyBlock)>) {
    let mut after = windows.clone();
    let mut copies = Vec::new();
    for &(from, to) in moves {
        if from == to {
            continue;
        }
        for kb in 0..key_blocks_per_block {
            match after.get(&(from, kb)).copied() {
                Some(w) if w.quantized_at.is_none() || keep_quantized => {
                    after.insert((to, kb), w);
                    copies.push(((from, kb), (to, kb)));
                }
                _ => {
                    after.remove(&(to, kb));
                }
            }
        }
    }
    (after, copies)
}

/// Which window of a layer's device window pool each open key block holds. The pool has
/// `capacity` windows of `[kv_head][block_tokens][head_dim]` f16 (`kivi.cu`'s `wins`); a
/// window index is what the window kernels take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct WindowSlots {
    /// The window each open key block holds.
    pub of: BTreeMap<KeyBlock, u32>,
    /// Windows of the pool no key block holds, the lowest handed out first.
    free: Vec<u32>,
    /// Windows in the pool.
    pub capacity: u32,
}

impl WindowSlots {
    /// An empty assignment over a pool of `capacity` windows (the device starts from the
    /// empty pool, `default`, and grows it).
    #[cfg(test)]
    pub(crate) fn new(capacity: u32) -> Self {
        WindowSlots {
            of: BTreeMap::new(),
            free: (0..capacity).rev().collect(),
            capacity,
        }
    }

    /// The lowest free window, or a new one past the end (the pool grows by one; the
    /// device grows its allocation before the launches that use it). Every key block
    /// holds at most one window, so the pool never outgrows the storage's key blocks.
    fn take(&mut self) -> Result<u32> {
        if let Some(w) = self.free.pop() {
            return Ok(w);
        }
        let w = self.capacity;
        self.capacity = w.checked_add(1).ok_or_else(|| KvError::Overflow {
            what: "KIVI windows",
            detail: format!("{w} windows + 1"),
        })?;
        Ok(w)
    }

    /// Returns the window of `kb` (if it holds one) to the free list, lowest first.
    fn release(&mut self, kb: &KeyBlock) {
        if let Some(w) = self.of.remove(kb) {
            self.free.push(w);
            self.free.sort_unstable_by(|a, b| b.cmp(a));
        }
    }
}

/// The host state of one layer's KIVI key blocks: which have windows and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KiviLayer {
    /// The windows' states.
    pub windows: BTreeMap<KeyBlock, Window>,
    /// Which window of the layer's device pool each holds.
    pub slots: WindowSlots,
}

/// Table entry of a key block without a window (`common.cuh`: `KIVI_NO_WINDOW`).
pub(crate) const NO_WINDOW: u32 = u32::MAX;
/// Set in a table entry when the key block is quantized and keeps its window only for the
/// queries inside it (`common.cuh`: `KIVI_QUANTIZED`).
pub(crate) const QUANTIZED: u32 = 1 << 31;

impl KiviLayer {
    /// The window table the attend kernel takes: one entry per key block of the layer,
    /// `block * key_blocks_per_block + key block`: [`NO_WINDOW`], or the window index, with
    /// [`QUANTIZED`] set for a quantized block's kept window.
    ///
    /// # Errors
    /// [`KvError::Overflow`] when the table's size overflows or a window index reaches the
    /// flag bit.
    pub(crate) fn table(&self, num_blocks: usize, key_blocks_per_block: u32) -> Result<Vec<u32>> {
        let len = crate::plan::product(
            "KIVI window table",
            &[num_blocks, key_blocks_per_block as usize],
        )?;
        let mut table = vec![NO_WINDOW; len];
        for (&(block, kb), w) in &self.windows {
            let Some(&index) = self.slots.of.get(&(block, kb)) else {
                continue;
            };
            if index >= QUANTIZED {
                return Err(KvError::Overflow {
                    what: "KIVI windows",
                    detail: format!("window {index} reaches the table's flag bit"),
                });
            }
            let at = block as usize * key_blocks_per_block as usize + kb as usize;
            if let Some(e) = table.get_mut(at) {
                *e = if w.quantized_at.is_some() {
                    index | QUANTIZED
                } else {
                    index
                };
            }
        }
        Ok(table)
    }

    /// The window `read` takes a slot's key from: the window of its key block while that
    /// one is still filling, else [`NO_WINDOW`] (a full block reads as stored, quantized,
    /// as on the CPU backend).
    pub(crate) fn read_window(&self, slot: &Slot, block_tokens: usize) -> Result<u32> {
        let block = crate::plan::to_u32("block id", slot.block.index())?;
        let kb = crate::plan::to_u32("key block", slot.offset as usize / block_tokens)?;
        Ok(match self.windows.get(&(block, kb)) {
            Some(w) if w.quantized_at.is_none() => self
                .slots
                .of
                .get(&(block, kb))
                .copied()
                .unwrap_or(NO_WINDOW),
            _ => NO_WINDOW,
        })
    }

    /// Drops the windows of the quantized key blocks of `blocks` (every token of them is
    /// behind every query to come: `settle_blocks`); a block still filling keeps its window.
    pub(crate) fn settle(&mut self, blocks: &[u32], key_blocks_per_block: u32) {
        for &block in blocks {
            for kb in 0..key_blocks_per_block {
                if self
                    .windows
                    .get(&(block, kb))
                    .is_some_and(|w| w.quantized_at.is_some())
                {
                    self.windows.remove(&(block, kb));
                    self.slots.release(&(block, kb));
                }
            }
        }
    }

    /// `import_block` for this layer: the windows of cache block `block`'s key blocks
    /// replaced by `windows` (one per key block: its slot mask and whether its block is
    /// quantized, or `None`), a quantized one as if quantized at attend count `attends`.
    /// Returns the layer after and, per imported window, its key block and window index.
    ///
    /// # Errors
    /// [`KvError::Overflow`] when the window count overflows `u32`.
    pub(crate) fn plan_import(
        &self,
        block: u32,
        windows: &[Option<(u64, bool)>],
        attends: u64,
    ) -> Result<(KiviLayer, Vec<(u32, u32)>)> {
        let mut after = self.clone();
        let mut fills = Vec::new();
        for (kb, w) in windows.iter().enumerate() {
            let kb = crate::plan::to_u32("key block", kb)?;
            after.windows.remove(&(block, kb));
            after.slots.release(&(block, kb));
            if let Some((filled, quantized)) = *w {
                let index = after.slots.take()?;
                after.slots.of.insert((block, kb), index);
                after.windows.insert(
                    (block, kb),
                    Window {
                        filled,
                        quantized_at: quantized.then_some(attends),
                    },
                );
                fills.push((kb, index));
            }
        }
        Ok((after, fills))
    }

    /// `copy_blocks` for this layer's windows, as the CPU backend ([`plan_kivi_copy`]):
    /// returns the layer after the moves and the window copies to launch in order,
    /// `(from window, to window)`. A target key block that gets a window keeps its own
    /// window index if it had one, else takes the lowest free one (growing the pool); one
    /// that loses its window gives it back.
    ///
    /// # Errors
    /// [`KvError::Overflow`] when the window count overflows `u32`.
    pub(crate) fn plan_copy(
        &self,
        moves: &[(u32, u32)],
        key_blocks_per_block: u32,
        keep_quantized: bool,
    ) -> Result<(KiviLayer, Vec<(u32, u32)>)> {
        let mut after = self.clone();
        let mut copies = Vec::new();
        for &(from, to) in moves {
            let (windows, kb_copies) = plan_kivi_copy(
                &after.windows,
                &[(from, to)],
                key_blocks_per_block,
                keep_quantized,
            );
            for kb in 0..key_blocks_per_block {
                if !windows.contains_key(&(to, kb)) {
                    after.slots.release(&(to, kb));
                }
            }
            for (src, dst) in kb_copies {
                let Some(&w_src) = after.slots.of.get(&src) else {
                    return Err(KvError::InvalidArgument {
                        what: "kivi copy plan",
                        detail: format!("key block {src:?} has a window state but no window"),
                    });
                };
                let w_dst = match after.slots.of.get(&dst) {
                    Some(&w) => w,
                    None => {
                        let w = after.slots.take()?;
                        after.slots.of.insert(dst, w);
                        w
                    }
                };
                copies.push((w_src, w_dst));
            }
            after.windows = windows;
        }
        Ok((after, copies))
    }
}

/// The device launches of one planned KIVI key write, as the kernels of `kivi.cu` take their
/// lists, and the window assignment once they have run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KiviLaunches {
    /// `kv_kivi_window_open`: the window of each opened key block ...
    pub open_windows: Vec<u32>,
    /// ... and its (cache block, key block) pair, flattened.
    pub open_blocks: Vec<u32>,
    /// `kv_kivi_window_store`, per stored key row: its input row, window and slot in the
    /// window.
    pub store_src: Vec<u32>,
    pub store_windows: Vec<u32>,
    pub store_slots: Vec<u32>,
    /// `kv_kivi_quantize`: the window of each completed key block and its (cache block,
    /// key block) pair, flattened.
    pub quantize_windows: Vec<u32>,
    pub quantize_blocks: Vec<u32>,
    /// The assignment after the write, committed by the caller only when every launch
    /// succeeded.
    pub slots: WindowSlots,
}

/// Packs the launches of `plan` (from [`plan_kivi_write`] for the same `slots`) given the
/// layer's window assignment `assigned`: frees the windows of `plan.free`, gives each key
/// block of `plan.open` the lowest free window (growing the pool when none is free), then
/// lists the key rows to store (for a slot written twice, the last row, as
/// `plan::write_rows`) and the blocks to quantize.
///
/// # Errors
/// [`KvError::InvalidArgument`] when `plan` names a key block `assigned` does not hold (a
/// plan made for other windows); [`KvError::Overflow`] past `u32` windows. Nothing is
/// changed either way.
pub(crate) fn pack_kivi_write(
    assigned: &WindowSlots,
    plan: &KiviWrite,
    slots: &[Slot],
    block_tokens: usize,
) -> Result<KiviLaunches> {
    let mut out = KiviLaunches {
        slots: assigned.clone(),
        ..KiviLaunches::default()
    };
    let pool = &mut out.slots;
    for kb in &plan.free {
        if let Some(w) = pool.of.remove(kb) {
            pool.free.push(w);
        }
    }
    // Lowest first, so a pool that is reused stays compact and the order is deterministic.
    pool.free.sort_unstable_by(|a, b| b.cmp(a));
    for &kb in &plan.open {
        let w = pool.take()?;
        pool.of.insert(kb, w);
        out.open_windows.push(w);
        out.open_blocks.extend([kb.0, kb.1]);
    }
    let window_of = |kb: KeyBlock, of: &BTreeMap<KeyBlock, u32>| {
        of.get(&kb)
            .copied()
            .ok_or_else(|| KvError::InvalidArgument {
                what: "kivi write plan",
                detail: format!("key block {kb:?} has no window (a plan for other windows)"),
            })
    };
    let (src, blocks, offsets) = crate::plan::write_rows(slots)?;
    for ((&r, &b), &o) in src.iter().zip(&blocks).zip(&offsets) {
        let o = o as usize;
        // `block_tokens` <= 64 (the plan checked it), so both fit u32.
        let kb = (b, (o / block_tokens) as u32);
        out.store_windows.push(window_of(kb, &pool.of)?);
        out.store_src.push(r);
        out.store_slots.push((o % block_tokens) as u32);
    }
    for &kb in &plan.quantize {
        out.quantize_windows.push(window_of(kb, &pool.of)?);
        out.quantize_blocks.extend([kb.0, kb.1]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::BlockId;

    fn slots(block: u32, offsets: std::ops::Range<u32>) -> Vec<Slot> {
        offsets
            .map(|offset| Slot {
                block: BlockId::new(block),
                offset,
            })
            .collect()
    }

    #[test]
    fn a_prefill_quantizes_its_full_key_blocks_and_keeps_their_windows() {
        let p = plan_kivi_write(&BTreeMap::new(), 0, &slots(3, 0..40), 32).expect("plan");
        assert_eq!(p.open, vec![(3, 0), (3, 1)]);
        assert_eq!(p.quantize, vec![(3, 0)]);
        assert!(p.free.is_empty());
        assert_eq!(
            p.windows[&(3, 0)],
            Window {
                filled: u64::from(u32::MAX),
                quantized_at: Some(0)
            }
        );
        assert_eq!(p.windows[&(3, 1)].filled, 0xff);
        assert_eq!(p.windows[&(3, 1)].quantized_at, None);

        // A write before any attend keeps the quantized block's window (its queries have
        // not read it yet); the first write after an attend frees it.
        let q = plan_kivi_write(&p.windows, 0, &slots(3, 40..41), 32).expect("plan");
        assert!(q.free.is_empty() && q.windows.contains_key(&(3, 0)));
        let q = plan_kivi_write(&p.windows, 1, &slots(3, 40..41), 32).expect("plan");
        assert_eq!(q.free, vec![(3, 0)]);
        assert!(!q.windows.contains_key(&(3, 0)));
        assert_eq!(q.windows[&(3, 1)].filled, 0x1ff);
        assert!(q.open.is_empty() && q.quantize.is_empty());
    }

    #[test]
    fn decoding_one_token_at_a_time_quantizes_at_the_last_slot() {
        let mut windows = BTreeMap::new();
        for t in 0..32u32 {
            let p = plan_kivi_write(&windows, u64::from(t), &slots(0, t..t + 1), 32).expect("plan");
            assert_eq!(p.open.len(), usize::from(t == 0), "token {t}");
            assert_eq!(p.quantize, if t == 31 { vec![(0, 0)] } else { vec![] });
            windows = p.windows;
        }
        assert_eq!(windows[&(0, 0)].quantized_at, Some(31));
    }

    #[test]
    fn rewriting_a_quantized_block_reopens_it_from_its_stored_keys() {
        // Block 1's first key block was quantized and its window freed (a truncated
        // sequence now grows again from slot 5).
        let p = plan_kivi_write(&BTreeMap::new(), 7, &slots(1, 5..6), 32).expect("plan");
        assert_eq!(p.open, vec![(1, 0)]);
        assert_eq!(p.windows[&(1, 0)].filled, 1 << 5);
        assert!(p.quantize.is_empty());
        // Writing slot 0 starts the block afresh: slots 0..32 then complete it, even though
        // slot 5 was written before.
        let p = plan_kivi_write(&p.windows, 7, &slots(1, 0..32), 32).expect("plan");
        assert!(p.open.is_empty());
        assert_eq!(p.quantize, vec![(1, 0)]);
        // Overwriting a key of a full block whose window is still kept (no attend since)
        // quantizes it again from the window, the new key included, as the CPU backend does.
        let kept = plan_kivi_write(&p.windows, 7, &slots(1, 9..10), 32).expect("plan");
        assert!(kept.open.is_empty() && kept.free.is_empty());
        assert_eq!(kept.quantize, vec![(1, 0)]);
        assert_eq!(kept.windows[&(1, 0)].quantized_at, Some(7));
        // After an attend the same write frees the window and reopens it from the block.
        let later = plan_kivi_write(&p.windows, 8, &slots(1, 9..10), 32).expect("plan");
        assert_eq!(
            (later.free.clone(), later.open.clone()),
            (vec![(1, 0)], vec![(1, 0)])
        );
        assert_eq!(later.windows[&(1, 0)].filled, 1 << 9);
        assert!(later.quantize.is_empty());
    }

    #[test]
    fn repeated_slots_and_unordered_writes() {
        let mut s = slots(2, 0..32);
        s.reverse(); // slot 0 last: it resets the mask, so the block is not complete
        let p = plan_kivi_write(&BTreeMap::new(), 0, &s, 32).expect("plan");
        assert_eq!(p.windows[&(2, 0)].filled, 1);
        assert!(p.quantize.is_empty());
        let mut s = slots(2, 0..32);
        s.extend(slots(2, 3..4));
        let p = plan_kivi_write(&BTreeMap::new(), 0, &s, 32).expect("plan");
        assert_eq!(p.quantize, vec![(2, 0)]);
    }

    #[test]
    fn copies_take_filling_windows_and_drop_the_targets() {
        // Block 0: key block 0 quantized (window kept), key block 1 filling.
        let p = plan_kivi_write(&BTreeMap::new(), 0, &slots(0, 0..40), 32).expect("plan");
        // Block 5 has a filling window of its own that the copy replaces or drops.
        let mut windows = p.windows;
        windows.insert(
            (5, 0),
            Window {
                filled: 1,
                quantized_at: None,
            },
        );
        let (after, copies) = plan_kivi_copy(&windows, &[(0, 5), (5, 5)], 2, false);
        assert_eq!(copies, vec![((0, 1), (5, 1))]);
        assert!(
            !after.contains_key(&(5, 0)),
            "a quantized window is not copied"
        );
        assert_eq!(after[&(5, 1)], windows[&(0, 1)]);
        assert_eq!(
            after[&(0, 0)],
            windows[&(0, 0)],
            "the source keeps its windows"
        );
        // Moves apply in order: a chain carries the window along.
        let (after, copies) = plan_kivi_copy(&windows, &[(0, 6), (6, 7)], 2, false);
        assert_eq!(copies, vec![((0, 1), (6, 1)), ((6, 1), (7, 1))]);
        assert_eq!(after[&(7, 1)].filled, 0xff);
    }

    #[test]
    fn launches_take_the_lowest_free_windows_and_reuse_freed_ones() {
        let s = slots(3, 0..40);
        let p = plan_kivi_write(&BTreeMap::new(), 0, &s, 32).expect("plan");
        let l = pack_kivi_write(&WindowSlots::new(4), &p, &s, 32).expect("pack");
        assert_eq!(l.open_windows, vec![0, 1]);
        assert_eq!(l.open_blocks, vec![3, 0, 3, 1]);
        assert_eq!(l.store_src, (0..40).collect::<Vec<u32>>());
        let want_windows: Vec<u32> = (0..40).map(|i| u32::from(i >= 32)).collect();
        assert_eq!(l.store_windows, want_windows);
        assert_eq!(l.store_slots, (0..40).map(|i| i % 32).collect::<Vec<u32>>());
        assert_eq!(
            (l.quantize_windows.clone(), l.quantize_blocks.clone()),
            (vec![0], vec![3, 0])
        );
        // After an attend, the next write frees key block (3, 0)'s window; block 4's first
        // key block opens into it.
        let s2 = slots(4, 0..1);
        let p2 = plan_kivi_write(&p.windows, 1, &s2, 32).expect("plan");
        let l2 = pack_kivi_write(&l.slots, &p2, &s2, 32).expect("pack");
        assert_eq!(l2.open_windows, vec![0]);
        assert_eq!(l2.slots.of.get(&(3, 0)), None);
        assert_eq!(l2.slots.of.get(&(3, 1)), Some(&1));
        assert_eq!(l2.slots.of.get(&(4, 0)), Some(&0));
    }

    #[test]
    fn repeated_slots_store_their_last_row_once() {
        let mut s = slots(0, 0..2);
        s.push(Slot {
            block: BlockId::new(0),
            offset: 0,
        });
        let p = plan_kivi_write(&BTreeMap::new(), 0, &s, 32).expect("plan");
        let l = pack_kivi_write(&WindowSlots::new(1), &p, &s, 32).expect("pack");
        assert_eq!(l.store_src, vec![1, 2]);
        assert_eq!(l.store_slots, vec![1, 0]);
    }

    #[test]
    fn a_full_window_pool_grows_and_a_stale_plan_is_refused() {
        let s = slots(1, 0..64);
        let p = plan_kivi_write(&BTreeMap::new(), 0, &s, 32).expect("plan");
        let l = pack_kivi_write(&WindowSlots::new(1), &p, &s, 32).expect("pack");
        assert_eq!(l.open_windows, vec![0, 1]);
        assert_eq!(l.slots.capacity, 2);
        // A plan whose key blocks the assignment does not hold (made for other windows).
        let p2 = plan_kivi_write(&p.windows, 0, &slots(1, 5..6), 32).expect("plan");
        let e = pack_kivi_write(&WindowSlots::new(2), &p2, &slots(1, 5..6), 32).unwrap_err();
        assert!(matches!(e, KvError::InvalidArgument { .. }), "{e}");
    }

    /// One layer after writing `s` into an empty layer (no attend yet).
    fn layer_after(s: &[Slot]) -> KiviLayer {
        let p = plan_kivi_write(&BTreeMap::new(), 0, s, 32).expect("plan");
        let l = pack_kivi_write(&WindowSlots::default(), &p, s, 32).expect("pack");
        KiviLayer {
            windows: p.windows,
            slots: l.slots,
        }
    }

    #[test]
    fn the_window_table_marks_kept_windows_of_quantized_blocks() {
        // Block 2: key block 0 quantized (window 0 kept), key block 1 filling (window 1).
        let layer = layer_after(&slots(2, 0..40));
        let t = layer.table(4, 2).expect("table");
        assert_eq!(t.len(), 8);
        assert_eq!(t[4], QUANTIZED);
        assert_eq!(t[5], 1);
        assert!(t
            .iter()
            .enumerate()
            .all(|(i, &e)| i == 4 || i == 5 || e == NO_WINDOW));
        // read takes a filling block's keys from its window, a full one's as stored.
        let at = |offset| Slot {
            block: BlockId::new(2),
            offset,
        };
        assert_eq!(layer.read_window(&at(3), 32).expect("read"), NO_WINDOW);
        assert_eq!(layer.read_window(&at(35), 32).expect("read"), 1);
        assert_eq!(
            layer
                .read_window(
                    &Slot {
                        block: BlockId::new(0),
                        offset: 0
                    },
                    32
                )
                .expect("read"),
            NO_WINDOW
        );
    }

    #[test]
    fn settling_drops_the_quantized_blocks_windows_only() {
        let mut layer = layer_after(&slots(2, 0..40));
        layer.settle(&[0, 2], 2);
        assert!(!layer.windows.contains_key(&(2, 0)));
        assert!(!layer.slots.of.contains_key(&(2, 0)));
        assert_eq!(layer.slots.of.get(&(2, 1)), Some(&1));
        // The freed window is the next one handed out.
        let s = slots(3, 0..1);
        let p = plan_kivi_write(&layer.windows, 0, &s, 32).expect("plan");
        let l = pack_kivi_write(&layer.slots, &p, &s, 32).expect("pack");
        assert_eq!(l.open_windows, vec![0]);
        assert_eq!(l.slots.capacity, 2);
    }

    #[test]
    fn copies_give_targets_windows_and_take_them_back() {
        // Block 0: key block 0 quantized (window 0), key block 1 filling (window 1).
        let layer = layer_after(&slots(0, 0..40));
        let (after, copies) = layer.plan_copy(&[(0, 5), (5, 6)], 2, false).expect("copy");
        // Only the filling window is copied, into new windows, along the chain in order.
        assert_eq!(copies, vec![(1, 2), (2, 3)]);
        assert_eq!(after.slots.of.get(&(5, 1)), Some(&2));
        assert_eq!(after.slots.of.get(&(6, 1)), Some(&3));
        assert_eq!(after.windows[&(6, 1)], layer.windows[&(0, 1)]);
        assert!(!after.windows.contains_key(&(5, 0)));
        // Copying a block without windows over block 5 gives its window back; the next
        // copy reuses it.
        let (after, copies) = after.plan_copy(&[(3, 5), (0, 7)], 2, false).expect("copy");
        assert!(!after.slots.of.contains_key(&(5, 1)));
        assert_eq!(copies, vec![(1, 2)]);
        assert_eq!(after.slots.of.get(&(7, 1)), Some(&2));
        // A target with its own window keeps its index.
        let (again, copies) = after.plan_copy(&[(0, 7)], 2, false).expect("copy");
        assert_eq!(copies, vec![(1, 2)]);
        assert_eq!(again.slots, after.slots);
        // Windows and their places stay in step.
        for l in [&after, &again] {
            assert_eq!(
                l.windows.keys().collect::<Vec<_>>(),
                l.slots.of.keys().collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn residual_windows_stay_until_settled_and_travel_with_copies() {
        let s = slots(0, 0..40);
        let p = plan_kivi_write_in(&BTreeMap::new(), 0, &s, 32, true).expect("plan");
        assert_eq!(p.quantize, vec![(0, 0)]);
        // Attends do not free a residual window: only settle_blocks does.
        let q = plan_kivi_write_in(&p.windows, 5, &slots(0, 40..41), 32, true).expect("plan");
        assert!(q.free.is_empty());
        assert_eq!(q.windows[&(0, 0)].quantized_at, Some(0));
        let l = pack_kivi_write(&WindowSlots::default(), &p, &s, 32).expect("pack");
        let mut layer = KiviLayer {
            windows: p.windows,
            slots: l.slots,
        };
        // A copy takes the quantized block's window along too.
        let (after, copies) = layer.plan_copy(&[(0, 3)], 2, true).expect("copy");
        assert_eq!(copies, vec![(0, 2), (1, 3)]);
        assert_eq!(after.windows[&(3, 0)], layer.windows[&(0, 0)]);
        layer.settle(&[0], 2);
        assert_eq!(layer.windows.keys().collect::<Vec<_>>(), vec![&(0, 1)]);
    }

    #[test]
    fn imports_replace_the_blocks_windows() {
        // Block 0: key block 0 quantized (window 0), key block 1 filling (window 1).
        let layer = layer_after(&slots(0, 0..40));
        let (after, fills) = layer
            .plan_import(0, &[None, Some((0b101, false))], 3)
            .expect("import");
        // Both old windows go back; the import's one takes the lowest.
        assert_eq!(fills, vec![(1, 0)]);
        assert_eq!(after.windows.keys().collect::<Vec<_>>(), vec![&(0, 1)]);
        assert_eq!(after.windows[&(0, 1)].filled, 0b101);
        let (after, fills) = after
            .plan_import(4, &[Some((u64::from(u32::MAX), true)), None], 3)
            .expect("import");
        assert_eq!(fills, vec![(0, 1)]);
        assert_eq!(after.windows[&(4, 0)].quantized_at, Some(3));
        assert_eq!(
            after.windows.keys().collect::<Vec<_>>(),
            after.slots.of.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn key_blocks_beyond_the_mask_are_refused() {
        for t in [0, 65] {
            let e = plan_kivi_write(&BTreeMap::new(), 0, &slots(0, 0..1), t).unwrap_err();
            assert!(matches!(e, KvError::Unsupported { .. }), "{e}");
        }
        let p = plan_kivi_write(&BTreeMap::new(), 0, &slots(0, 0..64), 64).expect("plan");
        assert_eq!(p.quantize, vec![(0, 0)]);
    }
}
