//! The quantized layouts: INT8/INT4 rows, INT4 with Hadamard-rotated keys, and KIVI key
//! blocks, stored in `kv-quant`'s byte formats and attended over with its fused kernels.
//!
//! # Pools
//!
//! Each layer has a K pool and a V pool of bytes. V rows, and K rows of the row layouts, are
//! laid out like the float pools, head-major, `[kv_heads][num_blocks][block_size][row bytes]`,
//! each row in a [`RowFormat`] with its scales. KIVI keys are stored per 32-token *key
//! block*: `[kv_heads][num_blocks][block_size / 32][key block bytes]` in
//! [`KiviKeyFormat`]'s layout (per-channel scales and minimums, then token-major codes).
//! Either way one cache block of one KV head is one contiguous range of each pool, of
//! `block_size x KvDType::row_bytes` bytes, following the same head's range of the previous
//! block id; the pools hold exactly what the memory accounting counts, and `copy_blocks`
//! copies a block as one range per head.
//!
//! # The KIVI residual window
//!
//! A key block can only be quantized per channel once its 32 tokens are there. Until then
//! its keys live in a *window*: 32 f16 rows per KV head (`half::f16`, read with the float
//! path's multi-head kernels as an f16 cache is; exported as little-endian bytes), allocated
//! when the block starts filling. The write that fills its last slot quantizes it; the
//! window stays (marked quantized) until attention has read the layer, and the next write
//! to the layer frees it. Which slots a window has seen is a bit mask:
//!
//! - a write to a slot sets its bit; a write to the first slot of a key block starts the
//!   block afresh (only that bit set), which is what reusing a freed cache block looks like;
//! - a write into a block that is already quantized (a freed block reused, a truncated
//!   sequence growing again) opens a window holding the block's dequantized keys, so its
//!   other slots still read what they held;
//! - when every bit is set the window is quantized from its f16 rows and dropped. A block
//!   whose quantization fails (it cannot for values f16 holds) keeps its window: still
//!   correct, only larger.
//!
//! Windows belong to the cache block, so `copy_blocks` copies them with it: a fork that
//! shares a partly filled block and writes to it (copy-on-write) gets its own window.
//!
//! Attention reads the cache as generation would, whatever the number of tokens written at
//! once: a query reads the keys of its own key block from the window, in f16 as written,
//! and those of earlier (full) blocks quantized, scored with [`Kernels::kivi_scores`]. That
//! is why a filled block keeps its window until it has been attended: the queries of the
//! tokens that filled it (a prefill writes them all before attending) must not read keys
//! quantized with scales that depend on later tokens. A prefill then gives what decoding the
//! same tokens one by one gives (a test holds the two equal), and no query sees the future.
//!
//! With a residual `R` the window also holds the block's values in f16 and stays until the
//! block is settled. A query at `p` reads the keys of the key blocks ending after `p - R`
//! and the values after `p - R` from the windows, each f16 row read once for its GQA
//! group's heads. A decode step's f16 values are the last rows it sees, so the quantized
//! value pass stops before them (the window costs no quantized work); where a query reads
//! f16 rows before quantized ones (a prefill, a prefix block without its window) their
//! weights are zeroed for the quantized pass instead. The window rows a decode task reads
//! are asked for by its earlier tiles' kernels, a key block's K or V rows per kernel call,
//! score and value passes alike (`WindowQueue`).
//!
//! # What may be written
//!
//! Every quantized layout takes what f16 takes: finite values below 65520 in magnitude.
//! That is what a KIVI window must hold, and it keeps every group's f16 scale and minimum in
//! range, so once [`QuantPools::check_values_of`] has passed, quantizing cannot fail and a
//! write is all or nothing.
//!
//! # Attention
//!
//! The float layouts' tasks and merge (`attend::split_attend`): one task per (sequence, KV
//! head, chunk of queries), and for decode and short appends per chunk of 512 keys too,
//! merged with the log-sum-exp rule, so results are bit-identical across thread counts and
//! a step over few KV heads still feeds every thread. Inside a task, an online softmax over
//! tiles of keys. A decode step reads every K and V row straight from its bytes with
//! kv-quant's multi-head kernels ([`Kernels::dot_heads`], [`Kernels::axpy_heads`]): the row
//! is unpacked once, in registers, for all query heads of its group. A prefill chunk
//! dequantizes a tile once into f32 and reads it with the float path's kernels. KIVI keys
//! are scored per query head with [`Kernels::kivi_scores`]. For the Hadamard layout each
//! query is rotated once per task, which leaves `q · k` unchanged.

use half::f16;
use kv_core::{AttentionBatch, BlockId, KvDType, KvError, Result, Slot, StorageSpec};
use kv_quant::{Group, Kernels, KiviBits, KiviKeyFormat, QuantError, RowFormat};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::attend::{sized, split_attend, with_scratch, Scratch, SplitShape, Task};
use crate::kernels;
use crate::storage::{zeroed, Geometry, Which};

/// Most key rows of a tile (the float path's tile size).
const TILE: usize = 64;

/// How keys are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyLayout {
    /// One self-contained row per token; rotated by the normalized Hadamard transform
    /// before it is quantized when `rotate`.
    Rows {
        /// The row format.
        format: RowFormat,
        /// Whether keys (and, at attention, queries) are rotated.
        rotate: bool,
    },
    /// KIVI key blocks, with f16 windows while they fill.
    Kivi(KiviKeyFormat),
}

/// The `kv-quant` formats of a quantized layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QuantLayout {
    pub keys: KeyLayout,
    pub values: RowFormat,
}

fn group(g: kv_core::QuantGroup) -> Group {
    match g {
        kv_core::QuantGroup::G32 => Group::G32,
        kv_core::QuantGroup::G64 => Group::G64,
        kv_core::QuantGroup::G128 => Group::G128,
    }
}

/// The formats `dtype` stores in, `None` for the float layouts (stored by
/// [`crate::storage::Pools`]) and any layout this backend does not know.
pub(crate) fn layout_of(dtype: KvDType) -> Option<QuantLayout> {
    let rows = |format, rotate| QuantLayout {
        keys: KeyLayout::Rows { format, rotate },
        values: format,
    };
    match dtype {
        KvDType::Int8 { group: g } => Some(rows(RowFormat::Int8 { group: group(g) }, false)),
        KvDType::Int4 { group: g } => Some(rows(RowFormat::Int4 { group: group(g) }, false)),
        KvDType::Int4Hadamard { group: g } => Some(rows(RowFormat::Int4 { group: group(g) }, true)),
        KvDType::Kivi { bits, .. } => {
            let (bits, values) = match bits {
                kv_core::KiviBits::B4 => (KiviBits::B4, RowFormat::Int4 { group: Group::G32 }),
                kv_core::KiviBits::B2 => (KiviBits::B2, RowFormat::Int2 { group: Group::G32 }),
            };
            Some(QuantLayout {
                keys: KeyLayout::Kivi(KiviKeyFormat::new(bits, dtype.block_tokens())),
                values,
            })
        }
        _ => None,
    }
}

/// A kernel error on arguments the pools computed themselves: a bug, reported as an error
/// rather than a panic.
fn internal(e: QuantError) -> KvError {
    KvError::InvalidArgument {
        what: "quantized storage",
        detail: format!("internal error, please report: {e}"),
    }
}

/// `src` rounded to f16 into `dst` (as many elements). Values beyond f16 saturate to
/// ±65504 (only dequantized keys can get there, by half a step).
fn encode_f16(src: &[f32], dst: &mut [f16]) {
    for (x, out) in src.iter().zip(dst) {
        *out = f16::from_f32(x.clamp(-65504.0, 65504.0));
    }
}

/// The f16 keys (and, with a residual, values) of a KIVI key block.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    /// Bit `j` set: slot `j` of the key block has been written since it started filling.
    filled: u64,
    /// Keys, `[kv_heads][block_tokens][head_dim]` f16: attention reads them with the
    /// float path's multi-head kernels, like an f16 cache.
    rows: Vec<f16>,
    /// Values in the same layout when the layout has a residual, else empty.
    values: Vec<f16>,
    /// The block is full and its quantized keys are in the pool. Without a residual the
    /// window is kept until attention has read the layer (and the next write frees it), so
    /// the queries of the tokens that filled the block read their own block in f16; with
    /// one it is kept until the block is settled.
    quantized: bool,
}

/// One layer's pools.
pub(crate) struct QuantLayer {
    k: Vec<u8>,
    v: Vec<u8>,
    /// KIVI: one entry per key block (`num_blocks x block_size / 32`), `Some` while it
    /// fills (and until the next write after it is quantized); empty for the row layouts.
    windows: Vec<Option<Window>>,
    /// KIVI: windows whose block a write quantized, with the layer's attend count then; a
    /// later write frees those that an attend has served since.
    retired: Vec<(usize, u64)>,
    /// Attend calls on this layer so far.
    attends: AtomicU64,
}

/// The pools of every layer in one quantized layout.
pub(crate) struct QuantPools {
    dtype: KvDType,
    layout: QuantLayout,
    kernels: Kernels,
    /// Index arithmetic of the K and V pools, `row_units` being bytes of a row (amortised
    /// over a key block for KIVI keys). For every layout both equal `KvDType::row_bytes`.
    kgeom: Geometry,
    vgeom: Geometry,
    /// Bytes of a K row (row layouts) and of a V row.
    k_row: usize,
    v_row: usize,
    /// KIVI: tokens and bytes of a key block, key blocks per cache block. Zero otherwise.
    kivi_tokens: usize,
    kivi_bytes: usize,
    key_blocks_per_block: usize,
    /// Bytes of one window's keys (its values take as many when `residual > 0`).
    window_bytes: usize,
    /// KIVI: tokens at the end of a sequence read in f16 besides the block being filled.
    residual: usize,
    layers: Vec<QuantLayer>,
}

impl QuantPools {
    /// Zeroed pools for `spec`, whose layout is `layout` (from [`layout_of`]).
    pub(crate) fn allocate(spec: &StorageSpec, layout: QuantLayout) -> Result<Self> {
        let shape = spec.shape;
        let d = shape.head_dim();
        let row_bytes = spec.dtype.row_bytes(d)?;
        let v_row = layout.values.row_bytes(d).map_err(internal)?;
        let (k_row, kivi_tokens, kivi_bytes) = match layout.keys {
            KeyLayout::Rows { format, .. } => (format.row_bytes(d).map_err(internal)?, 0, 0),
            KeyLayout::Kivi(f) => (0, f.block_tokens, f.block_bytes(d).map_err(internal)?),
        };
        // The pools are sized by the accounting; the formats must agree with it.
        let agrees = v_row == row_bytes
            && match layout.keys {
                KeyLayout::Rows { .. } => k_row == row_bytes,
                KeyLayout::Kivi(_) => {
                    kivi_tokens > 0
                        && spec.block_size.is_multiple_of(kivi_tokens)
                        && kivi_bytes == kivi_tokens * row_bytes
                }
            };
        if !agrees {
            return Err(KvError::InvalidArgument {
                what: "storage spec",
                detail: format!(
                    "internal error, please report: the {} formats disagree with its row size \
                     {row_bytes} for head dim {d}",
                    spec.dtype
                ),
            });
        }
        let geom = |row_units| Geometry {
            kv_heads: shape.n_kv_heads(),
            head_dim: d,
            block_size: spec.block_size,
            num_blocks: spec.num_blocks,
            row_units,
        };
        let (kgeom, vgeom) = (
            geom(k_row.max(kivi_bytes / kivi_tokens.max(1))),
            geom(v_row),
        );
        let len = |g: Geometry| {
            [g.kv_heads, g.block_size, g.row_units]
                .into_iter()
                .try_fold(g.num_blocks, usize::checked_mul)
                .ok_or_else(|| KvError::InvalidArgument {
                    what: "storage spec",
                    detail: format!(
                        "{} blocks of {} tokens x {} KV heads x {} bytes do not fit in memory",
                        g.num_blocks, g.block_size, g.kv_heads, g.row_units
                    ),
                })
        };
        let (klen, vlen) = (len(kgeom)?, len(vgeom)?);
        let key_blocks_per_block = spec.block_size.checked_div(kivi_tokens).unwrap_or(0);
        let n_windows = spec.num_blocks * key_blocks_per_block;
        let layers = (0..shape.n_layers())
            .map(|_| {
                let mut windows = Vec::new();
                windows
                    .try_reserve_exact(n_windows)
                    .map_err(|e| KvError::InvalidArgument {
                        what: "storage spec",
                        detail: format!("cannot allocate {n_windows} window slots: {e}"),
                    })?;
                windows.resize(n_windows, None);
                Ok(QuantLayer {
                    k: zeroed(klen)?,
                    v: zeroed(vlen)?,
                    windows,
                    retired: Vec::new(),
                    attends: AtomicU64::new(0),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dtype: spec.dtype,
            layout,
            kernels: Kernels::best(),
            kgeom,
            vgeom,
            k_row,
            v_row,
            kivi_tokens,
            kivi_bytes,
            key_blocks_per_block,
            window_bytes: shape.n_kv_heads() * kivi_tokens * d * 2,
            residual: spec.dtype.residual_tokens(),
            layers,
        })
    }

    /// Bytes held: the pools, plus the windows.
    pub(crate) fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) as u64)
            .sum::<u64>()
            + self.window_bytes_held()
    }

    /// Elements (f16) of one window's keys, and of its values with a residual.
    fn window_len(&self) -> usize {
        self.window_bytes / 2
    }

    /// Bytes of the windows allocated now (keys, and values with a residual).
    pub(crate) fn window_bytes_held(&self) -> u64 {
        let per = if self.residual > 0 { 2 } else { 1 } * self.window_bytes;
        (self.open_windows() * per) as u64
    }

    /// Windows allocated now, over all layers.
    pub(crate) fn open_windows(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.windows.iter().flatten().count())
            .sum()
    }

    /// Checks every value of a write before anything is stored: the layouts take what f16
    /// takes (see the module docs).
    pub(crate) fn check_values_of(&self, what: &'static str, data: &[f32]) -> Result<()> {
        if let Some(&x) = data.iter().find(|x| !f16::from_f32(**x).is_finite()) {
            if !x.is_finite() {
                return Err(KvError::NonFinite { what });
            }
            return Err(KvError::InvalidArgument {
                what,
                detail: format!(
                    "{x} does not fit the {} cache layout (quantized layouts hold what f16 \
                     holds: magnitudes below 65520)",
                    self.dtype
                ),
            });
        }
        Ok(())
    }

    /// Stores `data` (`[slots.len(), kv_heads, head_dim]`, shape-, range- and value-checked)
    /// into one pool of `layer`. Rows are quantized into a scratch buffer first, so an error
    /// (which the value check rules out) changes nothing.
    pub(crate) fn store(
        &mut self,
        layer: usize,
        which: Which,
        slots: &[Slot],
        data: &[f32],
    ) -> Result<()> {
        let (format, rotate) = match (which, self.layout.keys) {
            (Which::V, _) => (self.layout.values, false),
            (Which::K, KeyLayout::Rows { format, rotate }) => (format, rotate),
            (Which::K, KeyLayout::Kivi(format)) => {
                return self.store_kivi_keys(layer, format, slots, data)
            }
        };
        let g = match which {
            Which::K => self.kgeom,
            Which::V => self.vgeom,
        };
        let (d, rb) = (g.head_dim, format.row_bytes(g.head_dim).map_err(internal)?);
        let mut scratch = vec![0u8; slots.len() * g.kv_heads * rb];
        let mut rotated = vec![0.0f32; d];
        for (src, dst) in data.chunks_exact(d).zip(scratch.chunks_exact_mut(rb)) {
            let src = if rotate {
                rotated.copy_from_slice(src);
                kv_quant::hadamard_in_place(&mut rotated).map_err(internal)?;
                &rotated[..]
            } else {
                src
            };
            let what = match which {
                Which::K => "k",
                Which::V => "v",
            };
            self.kernels
                .quantize_row(format, src, dst)
                .map_err(|e| match e {
                    QuantError::NonFinite { .. } => KvError::NonFinite { what },
                    // Only a rotated key can get here: its rotation may exceed what an f16
                    // scale spans although the key itself does not.
                    QuantError::OutOfRange { .. } => KvError::InvalidArgument {
                        what,
                        detail: format!("does not fit the {} cache layout: {e}", self.dtype),
                    },
                    e => internal(e),
                })?;
        }
        let l = self.layer_mut(layer)?;
        let pool = match which {
            Which::K => &mut l.k,
            Which::V => &mut l.v,
        };
        let mut rows = scratch.chunks_exact(rb);
        for slot in slots {
            for h in 0..g.kv_heads {
                let at = g.row_start(slot.block.index(), h, slot.offset as usize);
                if let Some(row) = rows.next() {
                    pool[at..at + rb].copy_from_slice(row);
                }
            }
        }
        match (which, self.layout.keys) {
            (Which::V, KeyLayout::Kivi(keys)) if self.residual > 0 => {
                self.store_window_values(layer, keys, slots, data)
            }
            _ => Ok(()),
        }
    }

    /// Opens the window of key block `kb` of cache block `block` in `layer`, holding the
    /// block's keys (and, with a residual, values) as the pools store them, dequantized:
    /// the slots a write leaves alone must still read what was last written to them.
    fn open_window(
        &mut self,
        layer: usize,
        format: KiviKeyFormat,
        block: usize,
        kb: usize,
    ) -> Result<()> {
        let (d, t_n, heads) = (self.kgeom.head_dim, self.kivi_tokens, self.kgeom.kv_heads);
        let mut block_f32 = vec![0.0f32; t_n * d];
        let mut rows = vec![f16::ZERO; self.window_len()];
        let l = self.layer(layer)?;
        for h in 0..heads {
            let at = self.kivi_start(block, kb, h);
            format
                .dequantize_block(&l.k[at..at + self.kivi_bytes], d, &mut block_f32)
                .map_err(internal)?;
            encode_f16(&block_f32, &mut rows[h * t_n * d..][..t_n * d]);
        }
        let mut values = Vec::new();
        if self.residual > 0 {
            values = vec![f16::ZERO; self.window_len()];
            for h in 0..heads {
                let at = self.vgeom.row_start(block, h, kb * t_n);
                self.kernels
                    .dequantize_rows(
                        self.layout.values,
                        d,
                        &l.v[at..at + t_n * self.v_row],
                        &mut block_f32,
                    )
                    .map_err(internal)?;
                encode_f16(&block_f32, &mut values[h * t_n * d..][..t_n * d]);
            }
        }
        let w = block * self.key_blocks_per_block + kb;
        self.layer_mut(layer)?.windows[w] = Some(Window {
            filled: 0,
            rows,
            values,
            quantized: false,
        });
        Ok(())
    }

    /// With a residual: the f16 values of a write into the windows of their key blocks
    /// (the keys' write, which comes first, opened them).
    fn store_window_values(
        &mut self,
        layer: usize,
        format: KiviKeyFormat,
        slots: &[Slot],
        data: &[f32],
    ) -> Result<()> {
        let (d, t_n, per) = (
            self.vgeom.head_dim,
            self.kivi_tokens,
            self.key_blocks_per_block,
        );
        let heads = self.vgeom.kv_heads;
        let mut incoming = vec![f16::ZERO; data.len()];
        encode_f16(data, &mut incoming);
        for (t, slot) in slots.iter().enumerate() {
            let (block, offset) = (slot.block.index(), slot.offset as usize);
            let (kb, j) = (offset / t_n, offset % t_n);
            let w = block * per + kb;
            if self.layer(layer)?.windows[w].is_none() {
                self.open_window(layer, format, block, kb)?;
            }
            if let Some(win) = self.layer_mut(layer)?.windows[w].as_mut() {
                for h in 0..heads {
                    let src = &incoming[(t * heads + h) * d..][..d];
                    win.values[(h * t_n + j) * d..][..d].copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    /// Drops the windows of the full key blocks of `blocks` (range-checked) in every
    /// layer: no query still to come reads them in f16 (see
    /// `kv_core::CacheBackend::settle_blocks`). A block still filling keeps its window.
    pub(crate) fn settle(&mut self, blocks: &[BlockId]) {
        let per = self.key_blocks_per_block;
        for layer in &mut self.layers {
            for block in blocks {
                for kb in 0..per {
                    let w = &mut layer.windows[block.index() * per + kb];
                    if w.as_ref().is_some_and(|w| w.quantized) {
                        *w = None;
                    }
                }
            }
        }
    }

    fn layer_mut(&mut self, layer: usize) -> Result<&mut QuantLayer> {
        let len = self.layers.len();
        self.layers.get_mut(layer).ok_or(KvError::OutOfRange {
            what: "layer",
            index: layer,
            len,
        })
    }

    fn layer(&self, layer: usize) -> Result<&QuantLayer> {
        self.layers.get(layer).ok_or(KvError::OutOfRange {
            what: "layer",
            index: layer,
            len: self.layers.len(),
        })
    }

    /// First byte of the KIVI key block `key_block` of cache block `block`, head `head`.
    fn kivi_start(&self, block: usize, key_block: usize, head: usize) -> usize {
        self.kgeom.row_start(block, head, 0) + key_block * self.kivi_bytes
    }

    /// KIVI keys: into the windows of their key blocks, quantizing every block whose last
    /// missing slot this write fills (see the module docs).
    fn store_kivi_keys(
        &mut self,
        layer: usize,
        format: KiviKeyFormat,
        slots: &[Slot],
        data: &[f32],
    ) -> Result<()> {
        let g = self.kgeom;
        let (d, t_n, per) = (g.head_dim, self.kivi_tokens, self.key_blocks_per_block);
        let mut incoming = vec![f16::ZERO; data.len()];
        encode_f16(data, &mut incoming);
        let full: u64 = if t_n >= 64 {
            u64::MAX
        } else {
            (1u64 << t_n) - 1
        };
        // Windows of quantized blocks that attention has read since have served their
        // queries.
        let l = self.layer_mut(layer)?;
        let attends = *l.attends.get_mut();
        for (w, at) in std::mem::take(&mut l.retired) {
            match &l.windows[w] {
                Some(win) if win.quantized && attends > at => l.windows[w] = None,
                Some(win) if win.quantized => l.retired.push((w, at)),
                _ => {}
            }
        }
        let mut touched = Vec::new();
        let mut block_f32 = vec![0.0f32; t_n * d];
        for (t, slot) in slots.iter().enumerate() {
            let (block, offset) = (slot.block.index(), slot.offset as usize);
            let (kb, j) = (offset / t_n, offset % t_n);
            let w = block * per + kb;
            if self.layer(layer)?.windows[w].is_none() {
                self.open_window(layer, format, block, kb)?;
            }
            let l = self.layer_mut(layer)?;
            if let Some(win) = l.windows[w].as_mut() {
                // Its rows are the keys the quantized block was made from.
                win.quantized = false;
                if j == 0 {
                    win.filled = 0;
                }
                for h in 0..g.kv_heads {
                    let src = &incoming[(t * g.kv_heads + h) * d..][..d];
                    win.rows[(h * t_n + j) * d..][..d].copy_from_slice(src);
                }
                win.filled |= 1 << j;
            }
            touched.push((block, kb));
        }
        touched.sort_unstable();
        touched.dedup();
        let mut quantized = vec![0u8; g.kv_heads * self.kivi_bytes];
        for (block, kb) in touched {
            let w = block * per + kb;
            let Some(win) = &self.layer(layer)?.windows[w] else {
                continue;
            };
            if win.filled != full || win.quantized {
                continue;
            }
            let mut ok = true;
            for (h, out) in quantized.chunks_exact_mut(self.kivi_bytes).enumerate() {
                kernels::decode_f16(&win.rows[h * t_n * d..][..t_n * d], &mut block_f32);
                ok &= format.quantize_block(&block_f32, d, out).is_ok();
            }
            if !ok {
                // Keep the window: the block stays in f16, which is still right.
                continue;
            }
            let starts: Vec<usize> = (0..g.kv_heads)
                .map(|h| self.kivi_start(block, kb, h))
                .collect();
            let (kivi_bytes, residual) = (self.kivi_bytes, self.residual);
            let l = self.layer_mut(layer)?;
            for (start, src) in starts.into_iter().zip(quantized.chunks_exact(kivi_bytes)) {
                l.k[start..start + src.len()].copy_from_slice(src);
            }
            if let Some(win) = l.windows[w].as_mut() {
                win.quantized = true;
                // With a residual the window serves later queries too, until settled.
                if residual == 0 {
                    let attends = *l.attends.get_mut();
                    l.retired.push((w, attends));
                }
            }
        }
        Ok(())
    }

    /// Dequantized K and V rows of `slots` (range-checked) of `layer`, as
    /// `[slots.len(), kv_heads, head_dim]` f32.
    pub(crate) fn read(&self, layer: usize, slots: &[Slot]) -> Result<(Vec<f32>, Vec<f32>)> {
        let g = self.vgeom;
        let d = g.head_dim;
        let l = self.layer(layer)?;
        let mut k = vec![0.0f32; slots.len() * g.kv_heads * d];
        let mut v = vec![0.0f32; slots.len() * g.kv_heads * d];
        let mut block_f32 = vec![0.0f32; self.kivi_tokens * d];
        // The KIVI block last dequantized, so reading a block's rows in order decodes it once.
        let mut decoded: Option<(usize, usize, usize)> = None;
        for (t, slot) in slots.iter().enumerate() {
            let (block, offset) = (slot.block.index(), slot.offset as usize);
            for h in 0..g.kv_heads {
                let out = (t * g.kv_heads + h) * d;
                let at = g.row_start(block, h, offset);
                let k_at = self.kgeom.row_start(block, h, offset);
                self.kernels
                    .dequantize_row(
                        self.layout.values,
                        &l.v[at..at + self.v_row],
                        &mut v[out..out + d],
                    )
                    .map_err(internal)?;
                let k_out = &mut k[out..out + d];
                match self.layout.keys {
                    KeyLayout::Rows { format, rotate } => {
                        self.kernels
                            .dequantize_row(format, &l.k[k_at..k_at + self.k_row], k_out)
                            .map_err(internal)?;
                        if rotate {
                            // The normalized transform is its own inverse.
                            kv_quant::hadamard_in_place(k_out).map_err(internal)?;
                        }
                    }
                    KeyLayout::Kivi(format) => {
                        let t_n = self.kivi_tokens;
                        let (kb, j) = (offset / t_n, offset % t_n);
                        let window = l.windows[block * self.key_blocks_per_block + kb].as_ref();
                        // A full block reads as stored, quantized, whether or not its
                        // window is still kept for the queries that read it in f16.
                        if let Some(win) = window.filter(|w| !w.quantized) {
                            kernels::decode_f16(&win.rows[(h * t_n + j) * d..][..d], k_out);
                        } else {
                            if decoded != Some((block, kb, h)) {
                                let at = self.kivi_start(block, kb, h);
                                format
                                    .dequantize_block(
                                        &l.k[at..at + self.kivi_bytes],
                                        d,
                                        &mut block_f32,
                                    )
                                    .map_err(internal)?;
                                decoded = Some((block, kb, h));
                            }
                            k_out.copy_from_slice(&block_f32[j * d..(j + 1) * d]);
                        }
                    }
                }
            }
        }
        Ok((k, v))
    }

    /// Bytes of one layer's K and V pools in one cache block.
    fn layer_block_bytes(&self) -> Result<(usize, usize)> {
        let (kg, vg) = (self.kgeom, self.vgeom);
        let overflow = || KvError::Overflow {
            what: "block export size",
            detail: format!("{} KV heads x {} bytes", kg.kv_heads, kg.head_block_units()),
        };
        let k = kg
            .kv_heads
            .checked_mul(kg.head_block_units())
            .ok_or_else(overflow)?;
        let v = vg
            .kv_heads
            .checked_mul(vg.head_block_units())
            .ok_or_else(overflow)?;
        Ok((k, v))
    }

    /// Appends block `block` (range-checked) as stored: per layer the K bytes of every head,
    /// the V bytes of every head, then for KIVI one record per key block: `0` (no window),
    /// or `1` (a window still filling) or `2` (a full block's window that a residual layout
    /// keeps until it is settled), then the filled-slot mask (u64 little-endian), the
    /// window's f16 keys and, with a residual, its f16 values. Without a residual a window
    /// already quantized is not exported: like a copy, the block reads as stored.
    pub(crate) fn export_block(&self, block: usize, out: &mut Vec<u8>) -> Result<()> {
        let (kg, vg) = (self.kgeom, self.vgeom);
        let per = self.key_blocks_per_block;
        for l in &self.layers {
            for h in 0..kg.kv_heads {
                let at = kg.row_start(block, h, 0);
                out.extend_from_slice(&l.k[at..at + kg.head_block_units()]);
            }
            for h in 0..vg.kv_heads {
                let at = vg.row_start(block, h, 0);
                out.extend_from_slice(&l.v[at..at + vg.head_block_units()]);
            }
            for kb in 0..per {
                match l.windows[block * per + kb]
                    .as_ref()
                    .filter(|w| !w.quantized || self.residual > 0)
                {
                    None => out.push(0),
                    Some(w) => {
                        out.push(if w.quantized { 2 } else { 1 });
                        out.extend_from_slice(&w.filled.to_le_bytes());
                        for x in w.rows.iter().chain(&w.values) {
                            out.extend_from_slice(&x.to_le_bytes());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Overwrites block `block` (range-checked) with an export of this layout and geometry.
    /// Everything is parsed and checked first (lengths, window flags and masks, every row
    /// and key block dequantizing to finite values), then stored: all or nothing.
    pub(crate) fn import_block(&mut self, block: usize, bytes: &[u8]) -> Result<()> {
        let (kg, vg) = (self.kgeom, self.vgeom);
        let d = vg.head_dim;
        let per = self.key_blocks_per_block;
        let (k_len, v_len) = self.layer_block_bytes()?;
        let short = |at: usize| KvError::ShapeMismatch {
            what: "imported block",
            expected: format!("more than {at} bytes for {} layers", self.layers.len()),
            got: format!("{} bytes", bytes.len()),
        };
        let non_finite = || KvError::NonFinite {
            what: "imported block",
        };
        // Per layer: its K bytes, its V bytes and its windows, all checked.
        type Parsed<'a> = (&'a [u8], &'a [u8], Vec<Option<Window>>);
        let mut parsed: Vec<Parsed<'_>> = Vec::new();
        let mut rest = bytes;
        let mut row = vec![0.0f32; d];
        let mut block_f32 = vec![0.0f32; self.kivi_tokens * d];
        let mask_limit: u64 = if self.kivi_tokens >= 64 {
            u64::MAX
        } else {
            (1u64 << self.kivi_tokens) - 1
        };
        for _ in 0..self.layers.len() {
            let at = bytes.len() - rest.len();
            let (k, r) = rest.split_at_checked(k_len).ok_or_else(|| short(at))?;
            let (v, r) = r.split_at_checked(v_len).ok_or_else(|| short(at))?;
            rest = r;
            for stored in v.chunks_exact(self.v_row) {
                self.kernels
                    .dequantize_row(self.layout.values, stored, &mut row)
                    .map_err(internal)?;
                if !row.iter().all(|x| x.is_finite()) {
                    return Err(non_finite());
                }
            }
            match self.layout.keys {
                KeyLayout::Rows { format, .. } => {
                    for stored in k.chunks_exact(self.k_row) {
                        self.kernels
                            .dequantize_row(format, stored, &mut row)
                            .map_err(internal)?;
                        if !row.iter().all(|x| x.is_finite()) {
                            return Err(non_finite());
                        }
                    }
                }
                KeyLayout::Kivi(format) => {
                    for stored in k.chunks_exact(self.kivi_bytes) {
                        format
                            .dequantize_block(stored, d, &mut block_f32)
                            .map_err(internal)?;
                        if !block_f32.iter().all(|x| x.is_finite()) {
                            return Err(non_finite());
                        }
                    }
                }
            }
            let mut windows = Vec::with_capacity(per);
            for _ in 0..per {
                let at = bytes.len() - rest.len();
                let (&flag, r) = rest.split_first().ok_or_else(|| short(at))?;
                rest = r;
                match flag {
                    0 => windows.push(None),
                    1 | 2 if flag == 1 || self.residual > 0 => {
                        let (mask, r) = rest.split_at_checked(8).ok_or_else(|| short(at))?;
                        let (rows, r) = r
                            .split_at_checked(self.window_bytes)
                            .ok_or_else(|| short(at))?;
                        let values_len = if self.residual > 0 {
                            self.window_bytes
                        } else {
                            0
                        };
                        let (values, r) =
                            r.split_at_checked(values_len).ok_or_else(|| short(at))?;
                        rest = r;
                        let mut m = [0u8; 8];
                        m.copy_from_slice(mask);
                        let filled = u64::from_le_bytes(m);
                        if filled & !mask_limit != 0 {
                            return Err(KvError::InvalidArgument {
                                what: "imported block",
                                detail: format!(
                                    "window mask {filled:#x} is not that of a key block of \
                                     {} tokens being filled",
                                    self.kivi_tokens
                                ),
                            });
                        }
                        if flag == 2 && filled != mask_limit {
                            return Err(KvError::InvalidArgument {
                                what: "imported block",
                                detail: format!(
                                    "a full block's window with mask {filled:#x} (all {} \
                                     slots expected)",
                                    self.kivi_tokens
                                ),
                            });
                        }
                        let parse = |bytes: &[u8]| -> Vec<f16> {
                            bytes
                                .chunks_exact(2)
                                .map(|b| f16::from_le_bytes([b[0], b[1]]))
                                .collect()
                        };
                        let (rows, values) = (parse(rows), parse(values));
                        if !rows.iter().chain(&values).all(|x| x.is_finite()) {
                            return Err(non_finite());
                        }
                        windows.push(Some(Window {
                            filled,
                            rows,
                            values,
                            quantized: flag == 2,
                        }));
                    }
                    other => {
                        return Err(KvError::InvalidArgument {
                            what: "imported block",
                            detail: format!(
                                "window flag {other} at byte {at} ({} expected)",
                                if self.residual > 0 {
                                    "0, 1 or 2"
                                } else {
                                    "0 or 1"
                                }
                            ),
                        })
                    }
                }
            }
            parsed.push((k, v, windows));
        }
        if !rest.is_empty() {
            return Err(KvError::ShapeMismatch {
                what: "imported block",
                expected: format!("{} bytes", bytes.len() - rest.len()),
                got: format!("{} bytes", bytes.len()),
            });
        }
        for (l, (k, v, windows)) in self.layers.iter_mut().zip(parsed) {
            for (h, src) in k.chunks_exact(kg.head_block_units()).enumerate() {
                let at = kg.row_start(block, h, 0);
                l.k[at..at + src.len()].copy_from_slice(src);
            }
            for (h, src) in v.chunks_exact(vg.head_block_units()).enumerate() {
                let at = vg.row_start(block, h, 0);
                l.v[at..at + src.len()].copy_from_slice(src);
            }
            for (kb, w) in windows.into_iter().enumerate() {
                l.windows[block * per + kb] = w;
            }
        }
        Ok(())
    }

    /// Copies whole cache blocks (range-checked) in every layer, in the order given,
    /// windows included.
    pub(crate) fn copy_blocks(&mut self, moves: &[(BlockId, BlockId)]) {
        let (kg, vg) = (self.kgeom, self.vgeom);
        let (per, residual) = (self.key_blocks_per_block, self.residual);
        for layer in &mut self.layers {
            for &(from, to) in moves {
                let (from, to) = (from.index(), to.index());
                if from == to {
                    continue;
                }
                kg.copy_block(&mut layer.k, from, to);
                vg.copy_block(&mut layer.v, from, to);
                for kb in 0..per {
                    // A retired window only serves the queries of the tokens that filled its
                    // block; the copy's block reads as stored. With a residual a window
                    // serves every query within the residual: it goes with its block.
                    layer.windows[to * per + kb] = layer.windows[from * per + kb]
                        .clone()
                        .filter(|w| !w.quantized || residual > 0);
                }
            }
        }
    }
}

/// The query side of one attend call: `[total_queries, q_heads, head_dim]` row-major.
pub(crate) struct QuantQueries<'a> {
    pub data: &'a [f32],
    pub q_heads: usize,
    pub scale: f32,
}

/// Attention of every query over `layer`; returns `[total_queries, q_heads, head_dim]`.
/// The batch, layer and query shape have been checked by the caller.
///
/// The work splits into the float path's tasks (`attend::split_attend`): (sequence, KV
/// head, chunk of queries) and, for decode and short appends, chunks of keys merged with
/// the log-sum-exp rule, so a step over few KV heads still feeds every thread and the
/// result does not depend on the thread count.
pub(crate) fn attend(
    pools: &QuantPools,
    layer: usize,
    queries: &QuantQueries<'_>,
    batch: &AttentionBatch,
    thread_pool: Option<&rayon::ThreadPool>,
) -> Result<Vec<f32>> {
    let g = pools.vgeom;
    let lp = pools.layer(layer)?;
    lp.attends.fetch_add(1, Ordering::Relaxed);
    let shape = SplitShape {
        kv_heads: g.kv_heads,
        q_heads: queries.q_heads,
        head_dim: g.head_dim,
        key_bytes: pools.kgeom.row_units + pools.v_row,
        // KIVI tiles start at key blocks.
        key_align: match pools.layout.keys {
            KeyLayout::Rows { .. } => 1,
            KeyLayout::Kivi(_) => pools.kivi_tokens,
        },
    };
    split_attend(batch, shape, thread_pool, |task, part| {
        run_task(pools, lp, queries, task, part)
    })
}

/// Runs one task (keys `k0..k1` for queries `begin..end`) into its partial result `part`,
/// `[max; lanes][sum; lanes][acc; lanes * head_dim]` (see `attend::split_attend`).
fn run_task(
    p: &QuantPools,
    lp: &QuantLayer,
    queries: &QuantQueries<'_>,
    task: &Task<'_>,
    part: &mut [f32],
) -> Result<()> {
    with_scratch(|s| run_task_in(p, lp, queries, task, part, s))
}

/// [`run_task`] with this thread's buffers.
fn run_task_in(
    p: &QuantPools,
    lp: &QuantLayer,
    queries: &QuantQueries<'_>,
    task: &Task<'_>,
    part: &mut [f32],
    scratch: &mut Scratch,
) -> Result<()> {
    let g = p.vgeom;
    let d = g.head_dim;
    let h = task.kv_head;
    let group = queries.q_heads / g.kv_heads;
    let n_q = task.end - task.begin;
    let lanes = n_q * group;
    let first_pos = task.seq.first_query_position() + task.begin;
    let kern = p.kernels;

    // The task's query rows, scaled, and rotated when the keys are.
    // Every element is written below.
    let q = sized(&mut scratch.q, lanes * d);
    for i in 0..n_q {
        let q_row = task.row_offset + task.begin + i;
        let src = (q_row * queries.q_heads + h * group) * d;
        let rows = queries
            .data
            .get(src..src + group * d)
            .ok_or_else(|| KvError::OutOfRange {
                what: "query row",
                index: q_row,
                len: queries.data.len() / (queries.q_heads * d).max(1),
            })?;
        for (dst, &x) in q[i * group * d..(i + 1) * group * d].iter_mut().zip(rows) {
            *dst = x * queries.scale;
        }
    }
    if let KeyLayout::Rows { rotate: true, .. } = p.layout.keys {
        for lane in q.chunks_exact_mut(d) {
            kv_quant::hadamard_in_place(lane).map_err(internal)?;
        }
    }
    if part.len() != lanes * (d + 2) {
        return Err(KvError::InvalidArgument {
            what: "attention task",
            detail: format!(
                "internal error, please report: partial result of {} floats for {lanes} lanes",
                part.len()
            ),
        });
    }
    let (max, rest) = part.split_at_mut(lanes);
    let (sum, acc) = rest.split_at_mut(lanes);
    max.fill(f32::NEG_INFINITY);
    sum.fill(0.0);
    acc.fill(0.0);
    // scores[lane * TILE + r]: score, then weight, of row r of the current tile.
    let scores = sized(&mut scratch.scores, lanes * TILE);
    scores.fill(0.0);
    // Written by the KIVI kernel before each read.
    let block_scores = sized(&mut scratch.block_scores, p.kivi_tokens);
    // One query (decode): its group's heads read each K and V row straight from the bytes,
    // the row unpacked once in registers for all of them (`Kernels::dot_heads`,
    // `axpy_heads`). Several queries (prefill): a tile is dequantized once into f32 (keys
    // transposed) and read with the float path's tile kernels, queries by keys and weights
    // by values blocked in registers (a 512-token prefill of a SmolLM2 layer, int4-g32:
    // 64 ms with one-lane fused kernels, 17 ms widened for multi-head row kernels, under
    // 3 ms with the tile kernels at AVX-512).
    let fused = n_q == 1;
    if !fused && !d.is_multiple_of(8) {
        // Every quantized format groups at least 32 elements, and the tile kernels take
        // whole 8-lane registers of columns.
        return Err(KvError::InvalidArgument {
            what: "attention task",
            detail: format!("internal error, please report: head dim {d} is not a multiple of 8"),
        });
    }
    // Rows dequantized into them before each read.
    let tile_f32 = sized(&mut scratch.wide, if fused { 0 } else { TILE * d });
    let kt = sized(&mut scratch.kt, if fused { 0 } else { TILE * d });
    // The float path's vectorised max and exp.
    let float_isa = kernels::Isa::best();
    // KIVI tiles start at key blocks (task chunks and cache blocks are whole key blocks),
    // so a tile holds whole key blocks of at most `TILE` tokens, or one larger block.
    let tile = match p.layout.keys {
        KeyLayout::Rows { .. } => TILE,
        KeyLayout::Kivi(_) => (TILE / p.kivi_tokens).max(1) * p.kivi_tokens.min(TILE),
    };

    let blocks = task.seq.blocks();
    let block_at = |index: usize| -> Result<usize> {
        Ok(blocks
            .get(index)
            .ok_or_else(|| KvError::OutOfRange {
                what: "block of sequence",
                index,
                len: blocks.len(),
            })?
            .index())
    };
    // The pools store a KV head's rows (and KIVI key blocks) of consecutive blocks back to
    // back, so a tile runs on over them: with the model's 16-token blocks that is 4x fewer
    // kernel calls and softmax updates, and the next tile, prefetched while this one
    // computes, far enough ahead to cover memory latency.
    // The tile starting at key t: (cache block, offset in it, end key).
    // One division per tile: past the first block, `end` is a block boundary and the
    // block index just counts on (a division per block was ~4% of the kernel thread's
    // samples in a 64-dim int8 decode step).
    let tile_at = |t: usize| -> Result<(usize, usize, usize)> {
        let limit = task.k1.min(t + tile);
        let (mut index, offset) = (t / g.block_size, t % g.block_size);
        let block = block_at(index)?;
        let mut end = limit.min(t - offset + g.block_size);
        let mut last = block;
        while end < limit {
            index += 1;
            let next = block_at(index)?;
            if next != last + 1 {
                break;
            }
            last = next;
            end = limit.min(end + g.block_size);
        }
        Ok((block, offset, end))
    };
    // KIVI decode: the residual's f16 window rows that the query reads in this task, for
    // the tiles before them to ask for (see `WindowQueue`).
    let kivi_decode = fused && matches!(p.layout.keys, KeyLayout::Kivi(_));
    let decode = DecodeQuery {
        p,
        lp,
        h,
        pos: first_pos,
        block_at: &block_at,
    };
    let mut queue = WindowQueue::default();
    if kivi_decode {
        queue.fill(&decode, (task.k0, task.k1))?;
    }
    let mut next = [Ahead::default(); AHEAD_BLOCKS];
    let mut t0 = task.k0;
    while t0 < task.k1 {
        let (block, offset, t1) = tile_at(t0)?;
        let rows = t1 - t0;
        // The next tile's rows lie in another run (or block) of the pools, too far ahead
        // for the hardware prefetchers: ask for them while this tile computes. Decode
        // spreads the requests over the kernels' rows (`*_heads_ahead`), which keeps them
        // few enough in flight to be served (a burst of a whole tile's lines before the
        // kernels ran left the first touch of a row waiting on memory); KIVI key blocks and
        // prefill tiles get theirs at once.
        let (mut k_next, mut v_next): (&[u8], &[u8]) = (&[], &[]);
        'ahead: {
            if t1 >= task.k1 {
                break 'ahead;
            }
            let (nb, no, nt1) = tile_at(t1)?;
            let v_at = g.row_start(nb, h, no);
            let v_rows = lp.v.get(v_at..v_at + (nt1 - t1) * p.v_row).unwrap_or(&[]);
            let k_rows = match p.layout.keys {
                KeyLayout::Rows { .. } => {
                    let k_at = p.kgeom.row_start(nb, h, no);
                    lp.k.get(k_at..k_at + (nt1 - t1) * p.k_row)
                }
                KeyLayout::Kivi(_) => {
                    let k_at = p.kivi_start(nb, no / p.kivi_tokens, h);
                    let key_blocks = (nt1 - t1).div_ceil(p.kivi_tokens);
                    lp.k.get(k_at..k_at + key_blocks * p.kivi_bytes)
                }
            }
            .unwrap_or(&[]);
            match (fused, p.layout.keys) {
                (true, KeyLayout::Rows { .. }) => (k_next, v_next) = (k_rows, v_rows),
                (true, KeyLayout::Kivi(_)) => {
                    // The tile's blocks have consecutive ids, so its key blocks' windows
                    // are consecutive entries (as its key blocks are one range of the pool).
                    let w0 = nb * p.key_blocks_per_block + no / p.kivi_tokens;
                    let windowed = lp
                        .windows
                        .get(w0..w0 + (nt1 - t1).div_ceil(p.kivi_tokens))
                        .is_none_or(|w| w.iter().any(Option::is_some));
                    if !windowed {
                        // Most tiles: every key and value in the pools. This runs once a
                        // tile, whose kernels take about a microsecond: kept to the least.
                        kernels::prefetch(k_rows);
                        v_next = v_rows;
                        break 'ahead;
                    }
                    // Only what the query reads: not the pools' key blocks and values it
                    // reads from the windows (the residual), nor windows it does not read.
                    let values_from = decode.ahead((t1, nt1), &mut next)?;
                    v_next = v_rows.get(..(values_from - t1) * p.v_row).unwrap_or(&[]);
                    for (i, n) in next.iter().enumerate() {
                        kernels::prefetch(n.k);
                        // The queue's rows are asked for by the tiles before them.
                        if t1 + i * p.kivi_tokens < queue.from {
                            kernels::prefetch(n.k16);
                            kernels::prefetch(n.v16);
                        }
                    }
                }
                (false, _) => {
                    kernels::prefetch(k_rows);
                    kernels::prefetch(v_rows);
                }
            }
        }
        // Query i sees key t when first_pos + i >= t.
        let first_seeing = |t: usize| t.saturating_sub(first_pos);
        let lane_range = first_seeing(t0) * group..lanes;

        match p.layout.keys {
            KeyLayout::Rows { format, .. } => {
                let at = p.kgeom.row_start(block, h, offset);
                let k = &lp.k[at..at + rows * p.k_row];
                if fused {
                    // One query sees every key of its task: all lanes score every row, in
                    // one call that prefetches the next tile's rows as it reads these.
                    kern.dot_heads_ahead(format, d, q, k, scores, TILE, k_next)
                        .map_err(internal)?;
                } else {
                    // Several lanes read each row: dequantize the tile once.
                    let wide = &mut tile_f32[..rows * d];
                    kern.dequantize_rows(format, d, k, wide).map_err(internal)?;
                    kernels::widen_rows_transposed(&wide[..], d, kt, TILE, 0);
                    kernels::qk_tile(
                        float_isa,
                        &q[lane_range.start * d..],
                        d,
                        lanes - lane_range.start,
                        d,
                        kt,
                        TILE,
                        rows.div_ceil(8) * 8,
                        &mut scores[lane_range.start * TILE..],
                        TILE,
                    );
                }
            }
            KeyLayout::Kivi(format) => {
                let t_n = p.kivi_tokens;
                // The tile's key blocks one at a time: `col` is where a block's keys sit
                // in the tile's score rows.
                let mut t = t0;
                while t < t1 {
                    let (col, block, offset) =
                        (t - t0, block_at(t / g.block_size)?, t % g.block_size);
                    let (kb, j) = (offset / t_n, offset % t_n);
                    let rows_here = (t1 - t).min(t_n - j);
                    // Lanes of the queries that see this block's first key.
                    let seeing = first_seeing(t) * group..lanes;
                    // As in generation, a query reads the keys of its own key block in f16
                    // (they are in its window) and those of earlier, full blocks quantized.
                    // Queries before `inside` sit in this block.
                    // With a residual R, also the queries before `block_end + R`.
                    let block_end = t - j + t_n + p.residual;
                    let inside =
                        (block_end.saturating_sub(first_pos).min(n_q) * group).max(seeing.start);
                    let window = lp.windows[block * p.key_blocks_per_block + kb].as_ref();
                    let (in_f16, quantized) = match window {
                        Some(w) if !w.quantized => (seeing.clone(), lanes..lanes),
                        Some(_) => (seeing.start..inside, inside..lanes),
                        None => (seeing.start..seeing.start, seeing.clone()),
                    };
                    if let Some(win) = window.filter(|_| !in_f16.is_empty()) {
                        // Every f16 row read once for all these lanes, as an f16 cache is.
                        kernels::score_rows(
                            float_isa,
                            &q[in_f16.start * d..in_f16.end * d],
                            d,
                            &win.rows[(h * t_n + j) * d..][..rows_here * d],
                            &mut scores[in_f16.start * TILE + col..],
                            TILE,
                            queue.take(t1),
                        );
                    }
                    if !quantized.is_empty() {
                        let at = p.kivi_start(block, kb, h);
                        let k = &lp.k[at..at + p.kivi_bytes];
                        if j == 0 && col + t_n <= TILE {
                            // The whole key block in this tile: every quantized lane at
                            // once, each token's codes unpacked once for all of them. At
                            // decode it asks for the next of the task's window rows as it
                            // reads the codes (the value pass asks for another).
                            kern.kivi_scores_heads_ahead(
                                format,
                                d,
                                &q[quantized.start * d..quantized.end * d],
                                k,
                                &mut scores[quantized.start * TILE + col..],
                                TILE,
                                bytemuck::cast_slice(queue.take(t1)),
                            )
                            .map_err(internal)?;
                        } else {
                            for lane in quantized {
                                let q_lane = &q[lane * d..(lane + 1) * d];
                                kern.kivi_scores(format, q_lane, k, block_scores)
                                    .map_err(internal)?;
                                scores[lane * TILE + col..][..rows_here]
                                    .copy_from_slice(&block_scores[j..j + rows_here]);
                            }
                        }
                    }
                    t += rows_here;
                }
            }
        }

        for i in first_seeing(t0)..n_q {
            let visible = rows.min(first_pos + i + 1 - t0);
            // Keys before the query's window (sliding-window layers) weigh nothing.
            let lo = task
                .first_visible(first_pos + i)
                .saturating_sub(t0)
                .min(visible);
            for lane in i * group..(i + 1) * group {
                scores[lane * TILE..lane * TILE + lo].fill(0.0);
                scores[lane * TILE + visible..lane * TILE + rows].fill(0.0);
                if lo == visible {
                    continue;
                }
                let s = &mut scores[lane * TILE + lo..lane * TILE + visible];
                let tile_max = kernels::max(float_isa, s);
                let new_max = max[lane].max(tile_max);
                if !new_max.is_finite() {
                    return Err(KvError::NonFinite {
                        what: "attention scores (q.k overflows f32)",
                    });
                }
                if new_max > max[lane] && max[lane] > f32::NEG_INFINITY {
                    let correction = (max[lane] - new_max).exp();
                    sum[lane] *= correction;
                    kernels::scale(&mut acc[lane * d..(lane + 1) * d], correction);
                }
                max[lane] = new_max;
                sum[lane] += kernels::exp_sum(float_isa, s, new_max);
                // Keys this query does not see weigh nothing in the tile product below
                // (zeroed above, around the visible ones).
            }
        }

        // Rows from `t0 + quantized_rows` on are left out of the quantized value pass below.
        let mut quantized_rows = rows;
        if p.residual > 0 && first_pos + 1 < t1 + p.residual {
            // Some query reads some of this tile's values in f16: add those. A decode
            // step's are the tile's last rows (those it sees): the quantized pass stops
            // before them. Other rows read in f16 get their weights zeroed for it.
            if fused {
                quantized_rows = f16_values_from(p, lp, first_pos, t0, t1, &block_at)? - t0;
            }
            window_values(
                p,
                lp,
                scores,
                acc,
                group,
                n_q,
                first_pos,
                h,
                (t0, t1),
                t0 + quantized_rows,
                &mut queue,
                &block_at,
            )?;
        }
        let at = g.row_start(block, h, offset);
        let v = &lp.v[at..at + quantized_rows * p.v_row];
        if fused {
            // Where the residual's rows come later in the task, they are what the value
            // pass asks for as it reads (3 to 5 times a tile's pool rows: asked for at once,
            // or in the last tiles only, they would leave the kernels waiting on memory);
            // the next tile's pool rows, fewer, are asked for at once instead.
            let mut ahead = v_next;
            if quantized_rows > 0 {
                let rows16 = queue.take(t1);
                if !rows16.is_empty() {
                    kernels::prefetch(v_next);
                    ahead = bytemuck::cast_slice(rows16);
                }
            } else {
                kernels::prefetch(v_next);
            }
            kern.axpy_heads_ahead(p.layout.values, d, scores, TILE, v, acc, ahead)
                .map_err(internal)?;
        } else {
            // Several lanes add each row: dequantize the tile once; the weights of keys a
            // query does not see are zero (above), so every lane takes the whole tile.
            kern.dequantize_rows(p.layout.values, d, v, &mut tile_f32[..rows * d])
                .map_err(internal)?;
            let l0 = first_seeing(t0) * group;
            kernels::pv_tile(
                float_isa,
                &scores[l0 * TILE..],
                TILE,
                lanes - l0,
                rows,
                &tile_f32[..rows * d],
                d,
                d,
                &mut acc[l0 * d..],
                d,
            );
        }
        t0 = t1;
    }
    Ok(())
}

/// Key blocks of a tile that [`DecodeQuery::ahead`] describes: a tile holds at most
/// [`TILE`] tokens, two 32-token key blocks.
const AHEAD_BLOCKS: usize = TILE / 32;

/// What a decode query reads of one key block of a tile, for the tile before it to ask for
/// while it computes: the block's quantized keys (`k`) or its window's f16 keys (`k16`),
/// and the f16 values it reads from the window (`v16`).
#[derive(Debug, Clone, Copy, Default)]
struct Ahead<'a> {
    k: &'a [u8],
    k16: &'a [f16],
    v16: &'a [f16],
}

/// One decode query of a task, as the prefetch hints see it: the pools and layer it reads,
/// its KV head `h`, its position `pos`, and the sequence's block table (`block_at`: the
/// cache block of a sequence block). [`DecodeQuery::ahead`] (the next tile's rows) and
/// [`WindowQueue::fill`] (the task's window rows) describe the same reads, so they share
/// it. Only hints come from it: no value depends on it.
#[derive(Clone, Copy)]
struct DecodeQuery<'a, 'b> {
    p: &'a QuantPools,
    lp: &'a QuantLayer,
    h: usize,
    pos: usize,
    block_at: &'b dyn Fn(usize) -> Result<usize>,
}

impl<'a> DecodeQuery<'a, '_> {
    /// [`f16_values_from`] over `t0..t1`, `t1` without a residual (every value read from
    /// the pool).
    fn values_from(&self, (t0, t1): (usize, usize)) -> Result<usize> {
        if self.p.residual > 0 {
            f16_values_from(self.p, self.lp, self.pos, t0, t1, self.block_at)
        } else {
            Ok(t1)
        }
    }

    /// Over the tile `t0..t1` (which starts at a key block): fills `out[i]` with what the
    /// query reads of the key block at `t0 + i * 32` (empty past the tile), and returns
    /// [`Self::values_from`]: the pool's value rows it reads are those before it.
    fn ahead(
        &self,
        (t0, t1): (usize, usize),
        out: &mut [Ahead<'a>; AHEAD_BLOCKS],
    ) -> Result<usize> {
        let values_from = self.values_from((t0, t1))?;
        for (i, a) in out.iter_mut().enumerate() {
            let t = t0 + i * self.p.kivi_tokens;
            *a = if t < t1 {
                self.ahead_of((t, t1), values_from)?
            } else {
                Ahead::default()
            };
        }
        Ok(values_from)
    }

    /// What the query reads of the key block of its KV head starting at `t` (tokens
    /// `t..t1` of it), as `run_task_in` reads it, given the first token whose value it reads
    /// in f16 (`values_from`, see [`f16_values_from`]).
    fn ahead_of(&self, (t, t1): (usize, usize), values_from: usize) -> Result<Ahead<'a>> {
        let (p, lp, h) = (self.p, self.lp, self.h);
        let (d, t_n, bs) = (p.vgeom.head_dim, p.kivi_tokens, p.vgeom.block_size);
        let mut a = Ahead::default();
        let (block, offset) = ((self.block_at)(t / bs)?, t % bs);
        let (kb, j) = (offset / t_n, offset % t_n);
        let window = lp
            .windows
            .get(block * p.key_blocks_per_block + kb)
            .and_then(Option::as_ref);
        // Keys from the window while the block fills and while the query is within the
        // residual after it; else the quantized block.
        match window {
            Some(w) if !w.quantized || t - j + t_n + p.residual > self.pos => {
                a.k16 = w.rows.get(h * t_n * d..(h + 1) * t_n * d).unwrap_or(&[]);
            }
            _ => {
                let at = p.kivi_start(block, kb, h);
                a.k = lp.k.get(at..at + p.kivi_bytes).unwrap_or(&[]);
            }
        }
        if let Some(w) = window.filter(|w| !w.values.is_empty()) {
            let (lo, hi) = (j + values_from.max(t) - t, (j + t1 - t).min(t_n));
            if lo < hi {
                a.v16 = w
                    .values
                    .get((h * t_n + lo) * d..(h * t_n + hi) * d)
                    .unwrap_or(&[]);
            }
        }
        Ok(a)
    }
}

/// Most rows a [`WindowQueue`] holds: the keys and values of the key blocks that the
/// longest residual (256 tokens) and the block being filled span.
const QUEUE_LEN: usize = 2 * (256 / 32 + 2);

/// The f16 window rows (keys or values of one key block of one KV head) that a decode
/// query reads in one task, in the order it reads them, each with the token its key block
/// starts at. Windows hold 3 to 5 times the bytes a token of the pools does: asked for all
/// at once in the tile before them, as the pools' rows are, they left the step waiting on
/// memory (the residual cost 2 to 5% of a Llama-2-7B layer's step at 4096 tokens). The
/// task's earlier tiles, which compute more than they read, ask for them instead, one per
/// kernel call (each quantized key block's scores and the tile's values), spread over the
/// bytes the kernel reads ([`WindowQueue::take`]): with the score kernels asking too, a
/// Llama-2-7B window is asked for within the task's first three tiles rather than in the
/// tiles just before it.
#[derive(Debug, Default)]
struct WindowQueue<'a> {
    rows: [(usize, &'a [f16]); QUEUE_LEN],
    len: usize,
    next: usize,
    /// The first token of the first key block the queue looks at: the windows the query
    /// reads from here on are in it (up to [`QUEUE_LEN`] rows).
    from: usize,
}

impl<'a> WindowQueue<'a> {
    /// The windows that the decode query `dq` reads in the task `k0..k1` (of whole key
    /// blocks from `k0`): those of the key blocks that end after `pos - R - 32`, the
    /// residual's (where a filling block's window lies before, the tile before it asks for
    /// it).
    fn fill(&mut self, dq: &DecodeQuery<'a, '_>, (k0, k1): (usize, usize)) -> Result<()> {
        let t_n = dq.p.kivi_tokens;
        let start = (dq.pos + 1).saturating_sub(dq.p.residual + t_n).max(k0);
        self.from = k0 + (start - k0) / t_n * t_n;
        if self.from >= k1 {
            return Ok(());
        }
        let values_from = dq.values_from((self.from, k1))?;
        for t in (self.from..k1).step_by(t_n) {
            let a = dq.ahead_of((t, k1), values_from)?;
            for rows in [a.k16, a.v16] {
                if !rows.is_empty() && self.len < QUEUE_LEN {
                    self.rows[self.len] = (t, rows);
                    self.len += 1;
                }
            }
        }
        Ok(())
    }

    /// The next rows of a key block from `after` on (empty when none is left); rows before
    /// it are passed over (the tile asking reads them itself).
    fn take(&mut self, after: usize) -> &'a [f16] {
        while let Some(&(t, rows)) = self.rows[..self.len].get(self.next) {
            self.next += 1;
            if t >= after {
                return rows;
            }
        }
        &[]
    }
}

/// For one query at `pos` (a decode step) over the tile `t0..t1`: the first token `f` such
/// that the query reads every value of `f..t1` that it sees (`..=pos`) in f16, so that the
/// quantized value pass can stop at `f` (at most `t1`, at least `t0`).
fn f16_values_from(
    p: &QuantPools,
    lp: &QuantLayer,
    pos: usize,
    t0: usize,
    t1: usize,
    block_at: &dyn Fn(usize) -> Result<usize>,
) -> Result<usize> {
    let (t_n, bs) = (p.kivi_tokens, p.vgeom.block_size);
    // The values within the residual (`pos + 1 - R..`), where their blocks have windows.
    let mut from = (pos + 1).saturating_sub(p.residual).clamp(t0, t1);
    let mut t = from - from % t_n;
    while t < t1 {
        let (block, offset) = (block_at(t / bs)?, t % bs);
        let end = (t - offset % t_n + t_n).min(t1);
        let has_values = lp.windows[block * p.key_blocks_per_block + offset / t_n]
            .as_ref()
            .is_some_and(|w| !w.values.is_empty());
        if !has_values {
            from = from.max(end);
        }
        t = end;
    }
    Ok(from.min((pos + 1).max(t0)).min(t1))
}

/// The residual's values of the tile `t0..t1` (whole key blocks) of KV head `h`: a query at
/// position `pos` reads the value of token `t` in f16 when `pos < t + residual` and the
/// block still has its window. Adds those rows, weighted by `scores`, to `acc`, and zeroes
/// the weights of those before `keep_from`, so that the tile's quantized pass (which reads
/// the rows before `keep_from`) adds only the others. Each key block's rows ask for the
/// next rows of `queue` past the tile (at decode) as they are read.
#[allow(clippy::too_many_arguments)]
fn window_values(
    p: &QuantPools,
    lp: &QuantLayer,
    scores: &mut [f32],
    acc: &mut [f32],
    group: usize,
    n_q: usize,
    first_pos: usize,
    h: usize,
    (t0, t1): (usize, usize),
    keep_from: usize,
    queue: &mut WindowQueue<'_>,
    block_at: &dyn Fn(usize) -> Result<usize>,
) -> Result<()> {
    let (d, t_n, bs) = (p.vgeom.head_dim, p.kivi_tokens, p.vgeom.block_size);
    let isa = kernels::Isa::best();
    let mut t = t0;
    while t < t1 {
        let (block, offset) = (block_at(t / bs)?, t % bs);
        let (kb, j) = (offset / t_n, offset % t_n);
        let rows_here = (t1 - t).min(t_n - j);
        let window = lp.windows[block * p.key_blocks_per_block + kb]
            .as_ref()
            .filter(|w| !w.values.is_empty());
        if let Some(win) = window {
            for i in 0..n_q {
                let pos = first_pos + i;
                // Rows this query sees (`..=pos`) within the residual (`pos + 1 - R..`).
                let lo = (pos + 1).saturating_sub(p.residual).max(t);
                let hi = (pos + 1).min(t + rows_here);
                if lo >= hi {
                    continue;
                }
                // Every f16 row read once for the query's lanes (its GQA group's heads).
                let (l0, l1) = (i * group, (i + 1) * group);
                kernels::accumulate_rows(
                    isa,
                    &scores[l0 * TILE + lo - t0..],
                    TILE,
                    d,
                    &win.values[(h * t_n + j + lo - t) * d..][..(hi - lo) * d],
                    &mut acc[l0 * d..l1 * d],
                    queue.take(t1),
                );
                if lo < keep_from {
                    for lane in l0..l1 {
                        scores[lane * TILE + lo - t0..][..keep_from.min(hi) - lo].fill(0.0);
                    }
                }
            }
        }
        t += rows_here;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::ModelShape;

    /// kv-core repeats kv-quant's size formulas (it cannot depend on it): hold them equal
    /// for every layout and head dimension, including which head dimensions fit.
    #[test]
    fn kv_core_sizes_equal_kv_quant_sizes() {
        for &dtype in KvDType::ALL {
            for d in [8usize, 32, 48, 64, 96, 128, 256] {
                let core = dtype.row_bytes(d).ok();
                let quant = match layout_of(dtype) {
                    None => {
                        let f = match dtype {
                            KvDType::F32 => RowFormat::F32,
                            KvDType::F16 => RowFormat::F16,
                            KvDType::BF16 => RowFormat::Bf16,
                            other => panic!("{other} has no kv-quant layout"),
                        };
                        f.row_bytes(d).ok()
                    }
                    Some(l) => {
                        let v = l.values.row_bytes(d).ok();
                        let k = match l.keys {
                            KeyLayout::Rows { format, rotate } => format
                                .row_bytes(d)
                                .ok()
                                .filter(|_| !rotate || d.is_power_of_two()),
                            KeyLayout::Kivi(f) => f.block_bytes(d).ok().map(|b| {
                                assert_eq!(b % f.block_tokens, 0, "{dtype} {d}");
                                assert_eq!(f.block_tokens, dtype.block_tokens());
                                b / f.block_tokens
                            }),
                        };
                        assert!(k.is_none() || v.is_none() || k == v, "{dtype} {d}");
                        k.and(v)
                    }
                };
                assert_eq!(core, quant, "{dtype} head_dim {d}");
            }
        }
    }

    /// A tile asks the queue for rows past itself: rows of key blocks before `after` are
    /// passed over (the tile reads them itself), the others come in order, then nothing.
    #[test]
    fn window_queue_hands_out_later_rows_in_order() {
        let rows: Vec<f16> = (0..6).map(|i| f16::from_f32(i as f32)).collect();
        let mut q = WindowQueue::default();
        for (i, t) in [32usize, 32, 64, 64, 96, 96].into_iter().enumerate() {
            q.rows[i] = (t, &rows[i..i + 1]);
        }
        q.len = 6;
        assert_eq!(q.take(64), &rows[2..3]);
        assert_eq!(q.take(64), &rows[3..4]);
        assert_eq!(q.take(128), &[] as &[f16]);
        assert_eq!(q.take(0), &[] as &[f16]);
    }

    fn pools(dtype: KvDType, block_size: usize) -> QuantPools {
        let shape = ModelShape::new(2, 4, 2, 64).expect("shape");
        let spec = StorageSpec::new(shape, dtype, block_size, 4).expect("spec");
        QuantPools::allocate(&spec, layout_of(dtype).expect("quantized")).expect("allocates")
    }

    fn rows(n: usize, seed: u32) -> Vec<f32> {
        (0..n * 2 * 64)
            .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    fn slots(block: u32, range: std::ops::Range<u32>) -> Vec<Slot> {
        let block = BlockId::new(block);
        range.map(|offset| Slot { block, offset }).collect()
    }

    #[test]
    fn kivi_keys_stay_in_f16_until_their_block_is_full() {
        let kivi4 = KvDType::kivi(kv_core::KiviBits::B4);
        let mut p = pools(kivi4, 64);
        let spec_bytes = p.bytes();
        let k = rows(40, 1);
        // 31 tokens: one window, exact f16 keys.
        p.store(0, Which::K, &slots(2, 0..31), &k[..31 * 128])
            .expect("store");
        assert_eq!(p.open_windows(), 1);
        assert_eq!(p.bytes(), spec_bytes + p.window_bytes as u64);
        let (read, _) = p.read(0, &slots(2, 0..31)).expect("read");
        for (a, b) in read.iter().zip(&k[..31 * 128]) {
            assert_eq!(*a, f16::from_f32(*b).to_f32());
        }
        // The 32nd token quantizes the block, whose window serves this write's queries
        // until the next write; 8 more tokens open the next key block's window.
        p.store(0, Which::K, &slots(2, 31..40), &k[31 * 128..])
            .expect("store");
        assert_eq!(p.open_windows(), 2);
        assert!(p.layers[0].windows[4].as_ref().is_some_and(|w| w.quantized));
        assert!(p.layers[0].windows[5]
            .as_ref()
            .is_some_and(|w| !w.quantized));
        let (read, _) = p.read(0, &slots(2, 0..40)).expect("read");
        let err = read
            .iter()
            .zip(&k)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // 4-bit per channel over values in [-2, 2): half a step is 2/15.
        assert!(err > 0.0 && err <= 4.0 / 15.0 / 2.0 * 1.01 + 2e-3, "{err}");
        // Copy-on-write of the partly filled block carries its filling window (not the
        // retired one, whose block is quantized).
        p.copy_blocks(&[(BlockId::new(2), BlockId::new(3))]);
        assert_eq!(p.open_windows(), 3);
        assert!(p.layers[0].windows[6].is_none());
        assert_eq!(
            p.read(0, &slots(3, 0..40)).expect("read"),
            (read.clone(), {
                let (_, v) = p.read(0, &slots(2, 0..40)).expect("read");
                v
            })
        );
        // Writing into the copy changes the copy only. The retired window lives on until
        // attention has read the layer; the next write after that frees it.
        p.store(0, Which::K, &slots(3, 40..41), &k[..128])
            .expect("store");
        assert_eq!(p.open_windows(), 3);
        p.layers[0].attends.fetch_add(1, Ordering::Relaxed); // what `attend` does
        p.store(0, Which::K, &slots(3, 41..42), &k[..128])
            .expect("store");
        assert_eq!(p.read(0, &slots(2, 0..40)).expect("read").0, read);
        assert_eq!(p.open_windows(), 2);
        assert!(p.layers[0].windows[4].is_none());
        // Refilling a quantized key block from its first slot starts it afresh; until the
        // other slots are rewritten they read what they held.
        let fresh = rows(32, 7);
        p.store(0, Which::K, &slots(2, 0..1), &fresh[..128])
            .expect("store");
        assert!(p.layers[0].windows[2 * 2].is_some());
        let (again, _) = p.read(0, &slots(2, 1..32)).expect("read");
        for (a, b) in again.iter().zip(&read[128..32 * 128]) {
            assert_eq!(*a, f16::from_f32(*b).to_f32());
        }
        p.store(0, Which::K, &slots(2, 1..32), &fresh[128..])
            .expect("store");
        assert!(p.layers[0].windows[4].as_ref().is_some_and(|w| w.quantized));
    }

    /// Generation writes one token and attends from it; a prefill writes many and attends
    /// from all. A KIVI query must read the cache the same way in both: the keys of its
    /// own 32-token block in f16, those of earlier blocks quantized.
    #[test]
    fn kivi_prefill_reads_the_cache_as_decoding_does() {
        use crate::CpuBackend;
        use kv_core::candle::{Device, Tensor};
        use kv_core::{CacheBackend, SeqAttention};

        let (n, qh, kvh, d) = (70usize, 4, 2, 64);
        let shape = ModelShape::new(1, qh, kvh, d).expect("shape");
        let kivi4 = KvDType::kivi(kv_core::KiviBits::B4);
        let spec = StorageSpec::new(shape, kivi4, 32, 3).expect("spec");
        let table = [2, 0, 1].map(BlockId::new).to_vec();
        let all: Vec<Slot> = (0..n)
            .map(|t| Slot {
                block: table[t / 32],
                offset: (t % 32) as u32,
            })
            .collect();
        let data = |len, seed| {
            let v: Vec<f32> = (0..len)
                .map(|i: usize| {
                    (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 500.0 - 2.0
                })
                .collect();
            v
        };
        let (k, v, q) = (
            data(n * kvh * d, 1),
            data(n * kvh * d, 2),
            data(n * qh * d, 3),
        );
        let t3 = |x: &[f32], rows, heads| {
            Tensor::from_vec(x.to_vec(), (rows, heads, d), &Device::Cpu).expect("tensor")
        };
        let backend = CpuBackend::with_threads(2).expect("threads");

        let mut prefill = backend.allocate(&spec).expect("allocates");
        backend
            .write(&mut prefill, 0, &all, &t3(&k, n, kvh), &t3(&v, n, kvh))
            .expect("write");
        let batch = AttentionBatch::new(
            vec![SeqAttention::new(table.clone(), n, n).expect("seq")],
            d,
        );
        let once: Vec<f32> = backend
            .attend(&prefill, 0, &t3(&q, n, qh), &batch)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
            .expect("attend");

        let mut decode = backend.allocate(&spec).expect("allocates");
        let (row_kv, row_q) = (kvh * d, qh * d);
        for t in 0..n {
            let (kt, vt) = (&k[t * row_kv..][..row_kv], &v[t * row_kv..][..row_kv]);
            backend
                .write(
                    &mut decode,
                    0,
                    &all[t..t + 1],
                    &t3(kt, 1, kvh),
                    &t3(vt, 1, kvh),
                )
                .expect("write");
            let step = AttentionBatch::new(
                vec![SeqAttention::new(table.clone(), t + 1, 1).expect("seq")],
                d,
            );
            let out: Vec<f32> = backend
                .attend(&decode, 0, &t3(&q[t * row_q..][..row_q], 1, qh), &step)
                .and_then(|t| Ok(t.flatten_all()?.to_vec1()?))
                .expect("attend");
            for (i, (a, b)) in out.iter().zip(&once[t * row_q..][..row_q]).enumerate() {
                assert!(
                    (a - b).abs() < 1e-5,
                    "token {t} element {i}: decode {a}, prefill {b}"
                );
            }
        }
        // And the quantized blocks hold the same bytes either way.
        let (kp, _) = backend.read(&prefill, 0, &all).expect("read");
        let (kd, _) = backend.read(&decode, 0, &all).expect("read");
        let flat = |t: Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("flat")
        };
        assert_eq!(flat(kp), flat(kd));
    }

    /// With a residual, a query reads the keys of the blocks ending within `R` tokens and
    /// the values of the last `R` tokens in f16. Decoding token by token, settling the
    /// blocks that every later query is `R` past (as `PagedCache` does), gives what one
    /// prefill gives; and the residual brings attention closer to the f32 cache.
    #[test]
    fn kivi_residual_prefill_equals_decode_with_settles() {
        use crate::CpuBackend;
        use kv_core::candle::{Device, Tensor};
        use kv_core::{CacheBackend, KiviBits, KiviResidual, SeqAttention};

        let (n, qh, kvh, d, bs) = (200usize, 4, 2, 64, 64);
        let shape = ModelShape::new(1, qh, kvh, d).expect("shape");
        let table = [3, 0, 2, 1].map(BlockId::new).to_vec();
        let all: Vec<Slot> = (0..n)
            .map(|t| Slot {
                block: table[t / bs],
                offset: (t % bs) as u32,
            })
            .collect();
        let data = |len: usize, seed: u32| -> Vec<f32> {
            (0..len)
                .map(|i| {
                    (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 500.0 - 2.0
                })
                .collect()
        };
        let (k, v, q) = (
            data(n * kvh * d, 11),
            data(n * kvh * d, 12),
            // Small queries: a smooth softmax, where every key's precision counts.
            data(n * qh * d, 13)
                .iter()
                .map(|x| x / 4.0)
                .collect::<Vec<_>>(),
        );
        let t3 = |x: &[f32], rows, heads| {
            Tensor::from_vec(x.to_vec(), (rows, heads, d), &Device::Cpu).expect("tensor")
        };
        let flat = |t: Tensor| -> Vec<f32> {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("flat")
        };
        let backend = CpuBackend::with_threads(2).expect("threads");
        let prefill = |dtype: KvDType| -> Vec<f32> {
            let spec = StorageSpec::new(shape, dtype, bs, 4).expect("spec");
            let mut st = backend.allocate(&spec).expect("allocates");
            backend
                .write(&mut st, 0, &all, &t3(&k, n, kvh), &t3(&v, n, kvh))
                .expect("write");
            let batch = AttentionBatch::new(
                vec![SeqAttention::new(table.clone(), n, n).expect("seq")],
                d,
            );
            flat(
                backend
                    .attend(&st, 0, &t3(&q, n, qh), &batch)
                    .expect("attend"),
            )
        };
        let exact = prefill(KvDType::F32);
        let (row_kv, row_q) = (kvh * d, qh * d);
        let mut errors = Vec::new();
        for residual in [KiviResidual::R0, KiviResidual::R32, KiviResidual::R128] {
            let r = residual.tokens();
            let dtype = KvDType::Kivi {
                bits: KiviBits::B2,
                residual,
            };
            let once = prefill(dtype);
            let spec = StorageSpec::new(shape, dtype, bs, 4).expect("spec");
            let mut st = backend.allocate(&spec).expect("allocates");
            for t in 0..n {
                // Before reserving token t: blocks ending `r` or more before it.
                let past = t.saturating_sub(r) / bs;
                backend
                    .settle_blocks(&mut st, &table[..past])
                    .expect("settle");
                if r > 0 {
                    // Windows held: the key blocks from the first block not settled on.
                    let held = st.residual_windows();
                    assert!(held <= (r + bs) / 32, "{dtype} token {t}: {held} windows");
                }
                let (kt, vt) = (&k[t * row_kv..][..row_kv], &v[t * row_kv..][..row_kv]);
                backend
                    .write(&mut st, 0, &all[t..t + 1], &t3(kt, 1, kvh), &t3(vt, 1, kvh))
                    .expect("write");
                let step = AttentionBatch::new(
                    vec![SeqAttention::new(table.clone(), t + 1, 1).expect("seq")],
                    d,
                );
                let out = flat(
                    backend
                        .attend(&st, 0, &t3(&q[t * row_q..][..row_q], 1, qh), &step)
                        .expect("attend"),
                );
                for (i, (a, b)) in out.iter().zip(&once[t * row_q..][..row_q]).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "{dtype} token {t} element {i}: decode {a}, prefill {b}"
                    );
                }
            }
            // The queries past the residual of the first blocks are where it matters.
            let tail = 160 * row_q..;
            let err = once[tail.clone()]
                .iter()
                .zip(&exact[tail])
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f32>();
            errors.push(err);
        }
        assert!(
            errors[0] > errors[1] && errors[1] > errors[2],
            "squared error vs f32 for R = 0, 32, 128: {errors:?}"
        );
    }

    #[test]
    fn writing_into_a_quantized_block_keeps_its_other_keys_readable() {
        let kivi2 = KvDType::kivi(kv_core::KiviBits::B2);
        let mut p = pools(kivi2, 32);
        let k = rows(32, 3);
        p.store(1, Which::K, &slots(0, 0..32), &k).expect("store");
        let (before, _) = p.read(1, &slots(0, 0..32)).expect("read");
        // After attention has read the layer (freeing the block's window at the next
        // write), a truncated sequence grows again from slot 20: slots 0..20 keep their keys.
        p.layers[1].attends.fetch_add(1, Ordering::Relaxed); // what `attend` does
        p.store(1, Which::K, &slots(0, 20..21), &k[..128])
            .expect("store");
        let (after, _) = p.read(1, &slots(0, 0..20)).expect("read");
        for (a, b) in after.iter().zip(&before[..20 * 128]) {
            assert_eq!(*a, f16::from_f32(*b).to_f32());
        }
    }

    #[test]
    fn hadamard_keys_read_back_unrotated() {
        let dtype = KvDType::Int4Hadamard {
            group: kv_core::QuantGroup::G32,
        };
        let mut p = pools(dtype, 16);
        // An outlier channel: rotation spreads it, and reading undoes the rotation.
        let mut k = rows(3, 5);
        for r in k.chunks_exact_mut(64) {
            r[7] = 30.0;
        }
        p.store(0, Which::K, &slots(1, 0..3), &k).expect("store");
        let (read, _) = p.read(0, &slots(1, 0..3)).expect("read");
        let err = read
            .iter()
            .zip(&k)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 2.0, "{err}");
        assert!((read[7] - 30.0).abs() < 2.0, "{}", read[7]);

        // Keys f16 holds whose rotation does not fit an f16 scale are refused, unwritten.
        let before = p.read(0, &slots(1, 0..3)).expect("read");
        let mut huge = rows(3, 9);
        // Rotated, this row is -480000 in one channel: beyond an f16 minimum.
        huge[64..96].fill(-60_000.0);
        huge[96..128].fill(60_000.0);
        assert!(matches!(
            p.store(0, Which::K, &slots(1, 0..3), &huge),
            Err(KvError::InvalidArgument { what: "k", .. })
        ));
        assert_eq!(p.read(0, &slots(1, 0..3)).expect("read"), before);
    }
}
