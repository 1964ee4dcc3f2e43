//! Host-side logic of the CUDA backend, in plain Rust so the CPU tests it: which layouts the
//! kernels store and how, where a row lives in the one device allocation, which rows a
//! write stores, how copy-on-write moves are batched into launches, and how an attention
//! call is cut into thread blocks (split-K for decode, query tiles for prefill) with the
//! table that merges their partial results.
//!
//! Every array handed to a kernel is `u32`; every conversion into it is checked
//! ([`KvError::Overflow`]), and every size is computed with checked arithmetic.

use kv_core::{AttentionBatch, BlockId, KvDType, KvError, QuantGroup, Result, Slot, StorageSpec};

/// Row formats as the kernels number them (`kernels/common.cuh`: `FMT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Fmt {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    Int8 = 3,
    Int4 = 4,
    /// KIVI2's values.
    Int2 = 5,
    /// KIVI keys: no rows but 32-token key blocks quantized per channel, with f16 windows
    /// while they fill (`kernels/kivi.cu`); the row kernels leave them alone.
    Kivi = 6,
}

/// How a supported [`KvDType`] is stored by the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GpuLayout {
    /// Format of K rows.
    pub k: Fmt,
    /// Format of V rows.
    pub v: Fmt,
    /// Elements per quantization group (0 for the float formats).
    pub group: u32,
    /// Keys rotated by the normalized Hadamard transform before they are stored.
    pub rotate_k: bool,
    /// Code width of KIVI key blocks (2 or 4), 0 for the row layouts.
    pub kivi_bits: u32,
    /// KIVI's residual R (`kivi*-rR`): tokens within R of a query are read in f16; 0 for
    /// the other layouts.
    pub residual: u32,
}

impl GpuLayout {
    /// The kernels' layout of `dtype`, or `None` for a layout they do not store (none of
    /// kv-core's today; `KvDType` may grow).
    pub(crate) fn of(dtype: KvDType) -> Option<Self> {
        let g = |g: QuantGroup| g.size() as u32;
        let same = |f: Fmt, group: u32, rotate_k: bool| GpuLayout {
            k: f,
            v: f,
            group,
            rotate_k,
            kivi_bits: 0,
            residual: 0,
        };
        match dtype {
            KvDType::F32 => Some(same(Fmt::F32, 0, false)),
            KvDType::F16 => Some(same(Fmt::F16, 0, false)),
            KvDType::BF16 => Some(same(Fmt::Bf16, 0, false)),
            KvDType::Int8 { group } => Some(same(Fmt::Int8, g(group), false)),
            KvDType::Int4 { group } => Some(same(Fmt::Int4, g(group), false)),
            KvDType::Int4Hadamard { group } => Some(same(Fmt::Int4, g(group), true)),
            // KIVI's keys are quantized per channel over 32-token blocks with an f16 window
            // while a block fills (and, with a residual, until settled, with the block's
            // values in f16 too); values are rows in groups of 32.
            KvDType::Kivi { bits, .. } => {
                let (v, kivi_bits) = match bits {
                    kv_core::KiviBits::B4 => (Fmt::Int4, 4),
                    kv_core::KiviBits::B2 => (Fmt::Int2, 2),
                };
                Some(GpuLayout {
                    k: Fmt::Kivi,
                    v,
                    group: 32,
                    rotate_k: false,
                    kivi_bits,
                    residual: u32::try_from(dtype.residual_tokens()).ok()?,
                })
            }
            _ => None,
        }
    }
}

/// The scalar arguments every row kernel (`kv_write`, `kv_read`, `kv_attend`) takes after
/// its buffers, in the kernels' order: where a layer's rows are in the pool and how they
/// are stored. Computed once per call, with every conversion to the kernels' 32-bit
/// integers checked, so the launches cannot disagree on them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowArgs {
    pub layer: u32,
    pub kv_heads: u32,
    pub num_blocks: u32,
    pub block_size: u32,
    pub head_dim: u32,
    pub row_bytes: u32,
    /// [`Fmt`] of K rows, as the kernels number it.
    pub k_fmt: i32,
    /// [`Fmt`] of V rows.
    pub v_fmt: i32,
    /// Elements per quantization group (0 for the float formats).
    pub group: u32,
    /// 1 when keys are stored rotated by the normalized Hadamard transform.
    pub rotate: i32,
    /// The normalized Hadamard transform's factor, `1 / sqrt(head_dim)`.
    pub hadamard: f32,
}

impl RowArgs {
    /// The arguments for `layer` of a pool of geometry `g` storing `layout` rows of
    /// `head_dim` elements.
    ///
    /// # Errors
    /// [`KvError::Overflow`] when a count does not fit `u32`.
    pub(crate) fn new(
        g: &Geometry,
        layout: GpuLayout,
        head_dim: usize,
        layer: usize,
    ) -> Result<Self> {
        Ok(RowArgs {
            layer: to_u32("layer", layer)?,
            kv_heads: to_u32("kv heads", g.kv_heads)?,
            num_blocks: to_u32("block count", g.num_blocks)?,
            block_size: to_u32("block size", g.block_size)?,
            head_dim: to_u32("head dim", head_dim)?,
            row_bytes: to_u32("row bytes", g.row_bytes)?,
            k_fmt: layout.k as i32,
            v_fmt: layout.v as i32,
            group: layout.group,
            rotate: i32::from(layout.rotate_k),
            // Head dims are far below 2^24, so the f32 of one is exact.
            hadamard: 1.0 / (head_dim as f32).sqrt(),
        })
    }
}

/// Error flags the kernels raise (`kernels/common.cuh`: `FLAG_*`).
pub(crate) mod flags {
    pub const K_NONFINITE: u32 = 1;
    pub const V_NONFINITE: u32 = 2;
    pub const K_RANGE: u32 = 4;
    pub const V_RANGE: u32 = 8;
    pub const Q_NONFINITE: u32 = 16;
}

/// The error a write's flags stand for (non-finite before range, K before V, as the CPU
/// backend checks), or `Ok` when no flag is set.
pub(crate) fn write_error(flag_bits: u32, dtype: KvDType) -> Result<()> {
    let range = |what: &'static str| KvError::InvalidArgument {
        what,
        detail: format!(
            "a value does not fit the {dtype} cache layout (f16 and the quantized layouts hold \
             magnitudes below 65520, bf16 below 3.39e38; a rotated key must also fit)"
        ),
    };
    if flag_bits & flags::K_NONFINITE != 0 {
        Err(KvError::NonFinite { what: "k" })
    } else if flag_bits & flags::V_NONFINITE != 0 {
        Err(KvError::NonFinite { what: "v" })
    } else if flag_bits & flags::K_RANGE != 0 {
        Err(range("k"))
    } else if flag_bits & flags::V_RANGE != 0 {
        Err(range("v"))
    } else {
        Ok(())
    }
}

/// A `usize` as the `u32` a kernel takes, or the overflow error naming it.
pub(crate) fn to_u32(what: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| KvError::Overflow {
        what,
        detail: format!("{n} does not fit the kernels' 32-bit indices"),
    })
}

/// The product of `dims` (an element count of a buffer), or the overflow error naming
/// `what` and the dims.
pub(crate) fn product(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| KvError::Overflow {
            what,
            detail: format!("{dims:?} multiplied is more than usize::MAX"),
        })
}

fn mul(what: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| KvError::Overflow {
        what,
        detail: format!("{a} x {b} is more than usize::MAX"),
    })
}

/// Where rows live in a storage's one allocation:
/// `[layer][K, V][kv_head][block][slot][row bytes]`, head-major per layer as the CPU pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub row_bytes: usize,
}

impl Geometry {
    /// The geometry of `spec`, with its total size checked to fit `usize`.
    pub(crate) fn of(spec: &StorageSpec) -> Result<Self> {
        let g = Geometry {
            layers: spec.shape.n_layers(),
            kv_heads: spec.shape.n_kv_heads(),
            num_blocks: spec.num_blocks,
            block_size: spec.block_size,
            row_bytes: spec.dtype.row_bytes(spec.shape.head_dim())?,
        };
        g.total_bytes()?;
        Ok(g)
    }

    /// Bytes of the whole allocation (equal to `StorageSpec::bytes`).
    pub(crate) fn total_bytes(&self) -> Result<usize> {
        let ranges = mul(
            "storage size",
            mul("storage size", self.layers, 2)?,
            self.kv_heads,
        )?;
        mul("storage size", ranges, self.range_bytes()?)
    }

    /// Bytes of one (layer, K or V, KV head) range: every block of one head.
    fn range_bytes(&self) -> Result<usize> {
        mul("storage size", self.num_blocks, self.block_bytes()?)
    }

    /// Bytes of one block of one KV head: what `copy_blocks` copies per range.
    pub(crate) fn block_bytes(&self) -> Result<usize> {
        mul("storage size", self.block_size, self.row_bytes)
    }

    /// Byte offset of a row; the kernels' `row_offset` computes the same (in u64).
    /// Arguments are in range (checked by `kv_core::validate`), so the offset is below
    /// [`Geometry::total_bytes`], which `Geometry::of` checked to fit `usize`.
    pub(crate) fn row_offset(
        &self,
        layer: usize,
        which: usize,
        head: usize,
        block: usize,
        slot: usize,
    ) -> usize {
        let r = (layer * 2 + which) * self.kv_heads + head;
        ((r * self.num_blocks + block) * self.block_size + slot) * self.row_bytes
    }

    /// Number of (layer, K or V, head) ranges: the second grid dimension of a copy.
    pub(crate) fn ranges(&self) -> Result<usize> {
        mul("storage ranges", self.layers * 2, self.kv_heads)
    }
}

/// The rows a write stores: for each slot written more than once only the last input row
/// (what a loop of single-row writes leaves), so no two threads store into one slot.
/// Returns `(input row, block, offset)` lists as the kernel takes them.
pub(crate) fn write_rows(slots: &[Slot]) -> Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let mut last = std::collections::HashMap::with_capacity(slots.len());
    for (i, s) in slots.iter().enumerate() {
        last.insert((s.block, s.offset), i);
    }
    let (mut src, mut blocks, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in slots.iter().enumerate() {
        if last.get(&(s.block, s.offset)) == Some(&i) {
            src.push(to_u32("write rows", i)?);
            blocks.push(to_u32("block id", s.block.index())?);
            offsets.push(s.offset);
        }
    }
    Ok((src, blocks, offsets))
}

/// Cuts `moves` into launches that may each run all their copies at once: a move waits for
/// the next launch when its source or target is the target of a move already in the
/// current one (a chain `(1, 2), (2, 3)`, or a target written twice), or when its target
/// is the source of one (which would read a half-written block). Launches run in order, so
/// the result is that of applying the moves one after another. Self-moves are dropped.
pub(crate) fn copy_batches(moves: &[(BlockId, BlockId)]) -> Result<Vec<Vec<u32>>> {
    use std::collections::HashSet;
    let mut batches = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    let (mut sources, mut targets) = (HashSet::new(), HashSet::new());
    for &(from, to) in moves {
        if from == to {
            continue;
        }
        let conflict = targets.contains(&from) || targets.contains(&to) || sources.contains(&to);
        if conflict {
            batches.push(std::mem::take(&mut current));
            sources.clear();
            targets.clear();
        }
        sources.insert(from);
        targets.insert(to);
        current.push(to_u32("block id", from.index())?);
        current.push(to_u32("block id", to.index())?);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    Ok(batches)
}

/// Keys per split of a decode (or short append): the split-K chunk. A sequence of `n`
/// keys is read by `ceil(n / SPLIT_KEYS)` blocks in parallel.
pub(crate) const SPLIT_KEYS: usize = 512;
/// A sequence with at most this many queries is attended as decode (split over keys);
/// longer ones as prefill (query tiles, each over all its visible keys).
pub(crate) const DECODE_QUERIES: usize = 16;
/// Most query rows (queries x query heads) one thread block holds.
pub(crate) const MAX_ROWS: usize = 16;
/// Shared memory one block may use without opting in to more (48 KiB on every GPU).
pub(crate) const SHARED_LIMIT: usize = 48 * 1024;
/// Threads of one attention block (`kernels/attend.cu`: THREADS).
pub(crate) const ATTEND_THREADS: u32 = 128;
/// u32 fields of one sequence and of one work item (`kernels/attend.cu`).
pub(crate) const SEQ_FIELDS: usize = 4;
pub(crate) const ITEM_FIELDS: usize = 9;

/// Shared memory of an attention block of `rows` query rows and `tile` keys per tile.
pub(crate) fn attend_shared_bytes(rows: usize, tile: usize, head_dim: usize) -> Option<usize> {
    // qs and acc: rows x D; ks and vs: tile x D; scores: rows x tile; m, l, alpha: rows.
    let floats = rows
        .checked_mul(head_dim)?
        .checked_mul(2)?
        .checked_add(tile.checked_mul(head_dim)?.checked_mul(2)?)?
        .checked_add(rows.checked_mul(tile)?)?
        .checked_add(rows.checked_mul(3)?)?;
    floats.checked_mul(4)
}

/// Query rows per block and keys per tile for a head dimension: as many rows as
/// [`MAX_ROWS`] and the GQA group allow, then the largest tile of 64, 32, 16 or 8 keys that
/// fits shared memory (fewer rows when not even 8 keys do).
pub(crate) fn attend_tiling(group: usize, head_dim: usize) -> Result<(usize, usize)> {
    let group = group.max(1);
    // Row counts, largest first: whole groups of query heads (one or more queries), or
    // an equal share of one group when it is larger than a block.
    let candidates = (1..=MAX_ROWS).rev().filter(|&r| {
        if r >= group {
            r.is_multiple_of(group)
        } else {
            group.is_multiple_of(r)
        }
    });
    for rows in candidates {
        for tile in [64, 32, 16, 8] {
            if attend_shared_bytes(rows, tile, head_dim).is_some_and(|b| b <= SHARED_LIMIT) {
                return Ok((rows, tile));
            }
        }
    }
    Err(KvError::Unsupported {
        backend: "cuda".into(),
        what: format!(
            "head_dim {head_dim}: its attention tiles do not fit 48 KiB of shared memory"
        ),
    })
}

/// One attention call cut into thread blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AttendPlan {
    /// [`SEQ_FIELDS`] per sequence: table offset, kv_len, n_queries, first query row.
    pub seqs: Vec<u32>,
    /// Every sequence's block ids, concatenated.
    pub tables: Vec<u32>,
    /// [`ITEM_FIELDS`] per thread block (see `kernels/attend.cu`).
    pub items: Vec<u32>,
    /// Per (query row, query head): first partial row, count, stride.
    pub merge: Vec<u32>,
    /// Partial rows the items write (each `head_dim + 2` floats).
    pub partial_rows: usize,
    /// Query rows per block (shared memory is sized for this many).
    pub max_rows: usize,
    /// Keys per tile.
    pub tile: usize,
    /// Dynamic shared memory of one block.
    pub shared_bytes: usize,
}

/// Plans `batch` (already validated against `spec`) over the kernels: per sequence, per KV
/// head, per chunk of its query heads (all of them unless shared memory is short), per tile
/// of queries, and for decode per [`SPLIT_KEYS`] keys.
pub(crate) fn plan_attend(spec: &StorageSpec, batch: &AttentionBatch) -> Result<AttendPlan> {
    let shape = spec.shape;
    let (q_heads, kv_heads, d) = (shape.n_q_heads(), shape.n_kv_heads(), shape.head_dim());
    let group = q_heads / kv_heads;
    let (max_rows, tile) = attend_tiling(group, d)?;
    let shared_bytes = attend_shared_bytes(max_rows, tile, d).unwrap_or(usize::MAX);
    // Heads per block, and queries per block when a block holds whole groups.
    let heads = group.min(max_rows);
    let queries_per_tile = (max_rows / heads).max(1);
    let total_q = batch.total_queries();
    let mut plan = AttendPlan {
        seqs: Vec::with_capacity(batch.seqs.len() * SEQ_FIELDS),
        tables: Vec::new(),
        items: Vec::new(),
        merge: vec![0; mul("merge table", mul("merge table", total_q, q_heads)?, 3)?],
        partial_rows: 0,
        max_rows,
        tile,
        shared_bytes,
    };
    let mut q_row0 = 0usize;
    for (si, s) in batch.seqs.iter().enumerate() {
        let table_off = plan.tables.len();
        let needed = s.kv_len().div_ceil(spec.block_size);
        for b in &s.blocks()[..needed.min(s.blocks().len())] {
            plan.tables.push(to_u32("block id", b.index())?);
        }
        plan.seqs.extend([
            to_u32("block table", table_off)?,
            to_u32("sequence length", s.kv_len())?,
            to_u32("queries", s.n_queries())?,
            to_u32("query rows", q_row0)?,
        ]);
        let nq_tile = if s.n_queries() <= DECODE_QUERIES {
            queries_per_tile.min(s.n_queries())
        } else {
            queries_per_tile
        };
        let first_pos = s.first_query_position();
        for kvh in 0..kv_heads {
            for head0 in (0..group).step_by(heads) {
                for q0 in (0..s.n_queries()).step_by(nq_tile) {
                    let nq = nq_tile.min(s.n_queries() - q0);
                    // Keys the last query of the tile sees.
                    let visible = first_pos + q0 + nq;
                    let split = if s.n_queries() <= DECODE_QUERIES {
                        SPLIT_KEYS
                    } else {
                        visible
                    };
                    let splits = visible.div_ceil(split);
                    let rows = nq * heads;
                    let first_partial = plan.partial_rows;
                    for k in 0..splits {
                        let (ks, ke) = (k * split, ((k + 1) * split).min(visible));
                        plan.items.extend([
                            to_u32("sequence", si)?,
                            to_u32("kv head", kvh)?,
                            to_u32("head", head0)?,
                            to_u32("heads", heads)?,
                            to_u32("query", q0)?,
                            to_u32("queries", nq)?,
                            to_u32("key", ks)?,
                            to_u32("key", ke)?,
                            to_u32("partial rows", plan.partial_rows)?,
                        ]);
                        plan.partial_rows =
                            plan.partial_rows.checked_add(rows).ok_or_else(|| {
                                KvError::Overflow {
                                    what: "partial rows",
                                    detail: "more than usize::MAX".into(),
                                }
                            })?;
                    }
                    for qi in 0..nq {
                        for hi in 0..heads {
                            let row = q_row0 + q0 + qi;
                            let head = kvh * group + head0 + hi;
                            let at = (row * q_heads + head) * 3;
                            plan.merge[at] =
                                to_u32("partial rows", first_partial + qi * heads + hi)?;
                            plan.merge[at + 1] = to_u32("splits", splits)?;
                            plan.merge[at + 2] = to_u32("partial rows", rows)?;
                        }
                    }
                }
            }
        }
        q_row0 += s.n_queries();
    }
    to_u32("partial rows", plan.partial_rows)?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::{ModelShape, SeqAttention};

    fn spec(q: usize, kv: usize, d: usize, dtype: KvDType, bs: usize, nb: usize) -> StorageSpec {
        let shape = ModelShape::new(2, q, kv, d).expect("shape");
        StorageSpec::new(shape, dtype, bs, nb).expect("spec")
    }

    #[test]
    fn layouts_cover_the_row_formats_and_kivi() {
        for &dtype in KvDType::ALL {
            let l = GpuLayout::of(dtype);
            match dtype {
                KvDType::Kivi { bits, .. } => {
                    let l = l.expect("kivi");
                    let (v, b) = match bits {
                        kv_core::KiviBits::B4 => (Fmt::Int4, 4),
                        kv_core::KiviBits::B2 => (Fmt::Int2, 2),
                    };
                    assert_eq!((l.k, l.v, l.group, l.kivi_bits), (Fmt::Kivi, v, 32, b));
                    assert_eq!(bits.bits(), b as usize);
                    assert_eq!(l.residual as usize, dtype.residual_tokens());
                }
                KvDType::Int4Hadamard { group } => {
                    let l = l.expect("int4h");
                    assert!(l.rotate_k && l.k == Fmt::Int4 && l.group as usize == group.size());
                }
                _ => assert!(!l.expect("row layout").rotate_k),
            }
        }
    }

    #[test]
    fn products_are_checked() {
        assert_eq!(product("x", &[3, 4, 5]).expect("fits"), 60);
        assert_eq!(product("x", &[]).expect("empty"), 1);
        assert_eq!(product("x", &[usize::MAX, 0]).expect("zero"), 0);
        let e = product("attention output", &[usize::MAX, 2, 1]).unwrap_err();
        assert!(
            matches!(
                e,
                KvError::Overflow {
                    what: "attention output",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn row_args_follow_the_pool_and_the_layout() {
        let s = spec(8, 2, 128, "int4h-g64".parse().expect("dtype"), 16, 5);
        let g = Geometry::of(&s).expect("geometry");
        let l = GpuLayout::of(s.dtype).expect("layout");
        let a = RowArgs::new(&g, l, 128, 1).expect("args");
        assert_eq!(
            (a.layer, a.kv_heads, a.num_blocks, a.block_size, a.head_dim),
            (1, 2, 5, 16, 128)
        );
        assert_eq!(a.row_bytes as usize, s.dtype.row_bytes(128).expect("row"));
        assert_eq!((a.k_fmt, a.v_fmt), (Fmt::Int4 as i32, Fmt::Int4 as i32));
        assert_eq!((a.group, a.rotate), (64, 1));
        assert_eq!(a.hadamard, 1.0 / 128f32.sqrt());
        let f = RowArgs::new(&g, GpuLayout::of(KvDType::F16).expect("f16"), 128, 0).expect("args");
        assert_eq!((f.k_fmt, f.group, f.rotate), (Fmt::F16 as i32, 0, 0));
        // A count beyond the kernels' 32-bit integers is refused, naming it.
        let big = Geometry {
            num_blocks: u32::MAX as usize + 1,
            ..g
        };
        let e = RowArgs::new(&big, l, 128, 0).unwrap_err();
        assert!(
            matches!(
                e,
                KvError::Overflow {
                    what: "block count",
                    ..
                }
            ),
            "{e}"
        );
        let e = RowArgs::new(&g, l, 128, u32::MAX as usize + 1).unwrap_err();
        assert!(matches!(e, KvError::Overflow { what: "layer", .. }), "{e}");
    }

    /// `kivi.cu` finds key block `kb` of a cache block where the row of its slot `32 kb`
    /// would be: that holds because a KIVI key block is exactly 32 rows of
    /// `KvDType::row_bytes`, which this checks against kv-quant's block size.
    #[test]
    fn a_kivi_key_block_is_32_rows() {
        use kv_core::KiviBits;
        use kv_quant::KiviKeyFormat;
        for (bits, qbits) in [
            (KiviBits::B4, kv_quant::KiviBits::B4),
            (KiviBits::B2, kv_quant::KiviBits::B2),
        ] {
            let dtype = KvDType::kivi(bits);
            assert_eq!(dtype.block_tokens(), 32);
            for d in (32..=256).step_by(32) {
                let block = KiviKeyFormat::new(qbits, 32).block_bytes(d).expect("block");
                assert_eq!(
                    dtype.row_bytes(d).expect("row") * 32,
                    block,
                    "{dtype}, d {d}"
                );
                let s = spec(2, 2, d, dtype, 64, 3);
                let g = Geometry::of(&s).expect("geometry");
                // Key block 1 of cache block 2 starts right after key block 0's bytes.
                assert_eq!(
                    g.row_offset(1, 0, 1, 2, 32),
                    g.row_offset(1, 0, 1, 2, 0) + block
                );
            }
        }
    }

    #[test]
    fn geometry_matches_the_spec_and_the_cpu_layout() {
        let s = spec(6, 2, 64, "int4-g32".parse().expect("dtype"), 16, 5);
        let g = Geometry::of(&s).expect("geometry");
        assert_eq!(
            g.total_bytes().expect("size") as u64,
            s.bytes().expect("bytes")
        );
        assert_eq!(g.row_bytes, 40);
        // Head-major within a layer's K pool: consecutive blocks of one head follow each other.
        assert_eq!(g.row_offset(0, 0, 0, 1, 0), 16 * 40);
        assert_eq!(g.row_offset(0, 0, 1, 0, 0), 5 * 16 * 40);
        // V of layer 0 follows K of layer 0; layer 1 follows both.
        assert_eq!(g.row_offset(0, 1, 0, 0, 0), 2 * 5 * 16 * 40);
        assert_eq!(g.row_offset(1, 0, 0, 0, 0), 2 * 2 * 5 * 16 * 40);
        let last = g.row_offset(1, 1, 1, 4, 15) + g.row_bytes;
        assert_eq!(last, g.total_bytes().expect("size"));
        assert_eq!(g.ranges().expect("ranges"), 8);
    }

    #[test]
    fn repeated_slots_keep_the_last_row() {
        let s = |b, o| Slot {
            block: BlockId::new(b),
            offset: o,
        };
        let (src, blocks, offsets) =
            write_rows(&[s(1, 0), s(2, 3), s(1, 0), s(0, 0)]).expect("rows");
        assert_eq!(src, [1, 2, 3]);
        assert_eq!(blocks, [2, 1, 0]);
        assert_eq!(offsets, [3, 0, 0]);
        assert_eq!(write_rows(&[]).expect("empty").0, Vec::<u32>::new());
    }

    #[test]
    fn copy_batches_split_only_dependent_moves() {
        let m = |a, b| (BlockId::new(a), BlockId::new(b));
        // Independent moves (one source to many targets too): one launch.
        assert_eq!(
            copy_batches(&[m(1, 4), m(1, 5), m(2, 6)]).expect("batches"),
            vec![vec![1, 4, 1, 5, 2, 6]]
        );
        // A chain: the second reads what the first writes.
        assert_eq!(
            copy_batches(&[m(1, 2), m(2, 3)]).expect("batches"),
            vec![vec![1, 2], vec![2, 3]]
        );
        // A target written twice: the later copy wins, in its own launch.
        assert_eq!(
            copy_batches(&[m(1, 3), m(2, 3)]).expect("batches"),
            vec![vec![1, 3], vec![2, 3]]
        );
        // Writing a block an earlier move still reads.
        assert_eq!(
            copy_batches(&[m(1, 2), m(3, 1)]).expect("batches"),
            vec![vec![1, 2], vec![3, 1]]
        );
        // Self-moves vanish.
        assert!(copy_batches(&[m(3, 3)]).expect("batches").is_empty());
    }

    #[test]
    fn flags_map_to_the_traits_errors() {
        let dt = KvDType::F16;
        assert!(write_error(0, dt).is_ok());
        assert!(matches!(
            write_error(flags::V_NONFINITE | flags::K_RANGE, dt),
            Err(KvError::NonFinite { what: "v" })
        ));
        assert!(matches!(
            write_error(flags::K_RANGE | flags::V_RANGE, dt),
            Err(KvError::InvalidArgument { what: "k", .. })
        ));
    }

    #[test]
    fn tiling_fits_shared_memory() {
        for group in [1, 3, 4, 8, 16, 32, 64] {
            for d in [32, 64, 128, 256, 512] {
                let (rows, tile) = attend_tiling(group, d).expect("tiling");
                let bytes = attend_shared_bytes(rows, tile, d).expect("bytes");
                assert!(bytes <= SHARED_LIMIT, "group {group} d {d}: {bytes}");
                // A block holds whole groups, or an equal share of one.
                assert!(
                    rows % group == 0 || group % rows == 0,
                    "group {group}: rows {rows}"
                );
            }
        }
        assert_eq!(attend_tiling(3, 64).expect("smollm2"), (15, 64));
        assert!(attend_tiling(1, 1 << 14).is_err());
    }

    /// Every (query row, head) is merged from partials that together cover exactly the keys
    /// its query sees, each key once.
    fn check_coverage(spec: &StorageSpec, batch: &AttentionBatch, plan: &AttendPlan) {
        let (q_heads, kv_heads) = (spec.shape.n_q_heads(), spec.shape.n_kv_heads());
        let group = q_heads / kv_heads;
        // Which (seq-local query, head) each partial row belongs to, and its key range.
        let mut owner = vec![None; plan.partial_rows];
        for it in plan.items.chunks_exact(ITEM_FIELDS) {
            let [seq, kvh, head0, nheads, q0, nq, ks, ke, prow] = it.try_into().expect("fields");
            assert!(nq as usize * nheads as usize <= plan.max_rows);
            for qi in 0..nq {
                for hi in 0..nheads {
                    let r = (prow + qi * nheads + hi) as usize;
                    assert!(owner[r].is_none(), "partial row {r} written twice");
                    owner[r] = Some((
                        seq,
                        q0 + qi,
                        kvh as usize * group + (head0 + hi) as usize,
                        ks,
                        ke,
                    ));
                }
            }
        }
        let mut row = 0usize;
        for (si, s) in batch.seqs.iter().enumerate() {
            for qi in 0..s.n_queries() {
                let pos = s.first_query_position() + qi;
                for h in 0..q_heads {
                    let at = ((row + qi) * q_heads + h) * 3;
                    let (first, count, stride) =
                        (plan.merge[at], plan.merge[at + 1], plan.merge[at + 2]);
                    let mut covered = 0usize;
                    let mut next_key = 0u32;
                    for k in 0..count {
                        let p = (first + k * stride) as usize;
                        let (seq, q, head, ks, ke) = owner[p].expect("partial row written");
                        assert_eq!((seq as usize, q as usize, head), (si, qi, h));
                        assert_eq!(ks, next_key, "splits are consecutive");
                        next_key = ke;
                        covered += (ke.min(pos as u32 + 1).saturating_sub(ks)) as usize;
                    }
                    assert!(
                        next_key as usize > pos,
                        "query {qi} of sequence {si} misses keys"
                    );
                    assert_eq!(covered, pos + 1);
                }
            }
            row += s.n_queries();
        }
        assert!(
            owner.iter().all(Option::is_some),
            "every partial row has an owner"
        );
    }

    #[test]
    fn attend_plans_cover_every_key_once() {
        let ids = |n: usize| {
            (0..n)
                .map(|i| BlockId::new((i as u32 * 7) % 97))
                .collect::<Vec<_>>()
        };
        type Case = (usize, usize, usize, &'static [(usize, usize)]);
        let cases: &[Case] = &[
            // (q_heads, kv_heads, head_dim, [(kv_len, n_queries)])
            (9, 3, 64, &[(1, 1), (1300, 1), (40, 3)]),
            (4, 4, 128, &[(200, 150), (17, 17)]),
            (32, 1, 64, &[(600, 2), (33, 20)]),
            (64, 1, 256, &[(5, 5)]),
        ];
        for &(q, kv, d, seqs) in cases {
            let spec = spec(q, kv, d, KvDType::F16, 16, 97);
            let batch = AttentionBatch::new(
                seqs.iter()
                    .map(|&(len, nq)| {
                        SeqAttention::new(ids(len.div_ceil(16)), len, nq).expect("seq")
                    })
                    .collect(),
                d,
            );
            batch.validate(&spec).expect("valid batch");
            let plan = plan_attend(&spec, &batch).expect("plan");
            check_coverage(&spec, &batch, &plan);
            assert!(plan.shared_bytes <= SHARED_LIMIT);
        }
    }

    #[test]
    fn decode_splits_over_keys_and_prefill_over_queries() {
        let spec = spec(9, 3, 64, KvDType::F16, 16, 400);
        let ids: Vec<BlockId> = (0..300).map(BlockId::new).collect();
        let decode = AttentionBatch::new(
            vec![SeqAttention::new(ids.clone(), 4096, 1).expect("seq")],
            64,
        );
        let plan = plan_attend(&spec, &decode).expect("plan");
        // 3 KV heads x 8 splits of 512 keys, each block reading one query's 3 heads.
        assert_eq!(plan.items.len() / ITEM_FIELDS, 3 * 8);
        let prefill =
            AttentionBatch::new(vec![SeqAttention::new(ids, 4096, 4096).expect("seq")], 64);
        let plan = plan_attend(&spec, &prefill).expect("plan");
        // 3 KV heads x 4096 / 5 query tiles of 5 queries (15 rows), no key splits.
        assert_eq!(plan.items.len() / ITEM_FIELDS, 3 * 4096usize.div_ceil(5));
    }
}
