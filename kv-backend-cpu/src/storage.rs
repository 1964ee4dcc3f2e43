//! Host block pools: where K and V rows live, and how one row is encoded.
//!
//! Each layer has one pool for K and one for V, laid out head-major,
//! `[kv_heads][num_blocks][block_size][row]`: one region per KV head, in which the rows of
//! consecutive block ids follow each other. A sequence whose blocks were handed out in order
//! (the common case for a fresh one) thus keeps each head's rows in one long stream, which
//! the hardware prefetchers follow far better than short runs scattered between the other
//! heads' rows. Copy-on-write copies a block as `kv_heads` ranges ([`Geometry::copy_block`]).
//!
//! A row is `row_units` units of a [`RowCodec`]'s unit type. For the float layouts a unit is
//! one element (`row_units == head_dim`). The quantized layouts (INT8/INT4 with group
//! scales, KIVI key blocks, from `kv-quant`) are byte pools of the same shape held by
//! [`crate::quant::QuantPools`], one more [`PoolSet`] variant with its own attention loop
//! over the fused kernels.

use half::{bf16, f16};
use kv_core::{BlockId, KvDType, KvError, Result, Slot, StorageSpec};

use crate::kernels;

/// How one K or V row is stored and computed with: the only type-specific part of the
/// backend.
pub(crate) trait RowCodec: Send + Sync + 'static {
    /// What a row is made of.
    type Unit: Copy + Default + Send + Sync + 'static;
    /// The layout this codec stores.
    const DTYPE: KvDType;
    /// Units in one row of `head_dim` elements.
    fn row_units(head_dim: usize) -> usize;
    /// Whether `x` survives encoding as a finite value (f16 overflows above 65504).
    fn representable(x: f32) -> bool;
    /// Encodes one row of `head_dim` f32 values into `row_units` units.
    fn encode(src: &[f32], dst: &mut [Self::Unit]);
    /// Decodes one stored row into `head_dim` f32 values.
    fn decode(src: &[Self::Unit], dst: &mut [f32]);
    /// Bytes of one unit in an exported block.
    const UNIT_BYTES: usize;
    /// Appends `u`'s little-endian bytes (block export).
    fn put_le(u: Self::Unit, out: &mut Vec<u8>);
    /// A unit from exactly [`RowCodec::UNIT_BYTES`] little-endian bytes (block import).
    fn get_le(bytes: &[u8]) -> Self::Unit;
}

/// Rows of f32, stored as they come.
pub(crate) struct F32Rows;
/// Rows rounded to IEEE half precision.
pub(crate) struct F16Rows;
/// Rows rounded to bfloat16.
pub(crate) struct Bf16Rows;

impl RowCodec for F32Rows {
    type Unit = f32;
    const UNIT_BYTES: usize = 4;
    fn put_le(u: f32, out: &mut Vec<u8>) {
        out.extend_from_slice(&u.to_le_bytes());
    }
    fn get_le(bytes: &[u8]) -> f32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&bytes[..4]);
        f32::from_le_bytes(b)
    }
    const DTYPE: KvDType = KvDType::F32;
    fn row_units(head_dim: usize) -> usize {
        head_dim
    }
    fn representable(x: f32) -> bool {
        x.is_finite()
    }
    fn encode(src: &[f32], dst: &mut [f32]) {
        kernels::copy_f32(src, dst)
    }
    fn decode(src: &[f32], dst: &mut [f32]) {
        kernels::copy_f32(src, dst)
    }
}

impl RowCodec for F16Rows {
    type Unit = f16;
    const UNIT_BYTES: usize = 2;
    fn put_le(u: f16, out: &mut Vec<u8>) {
        out.extend_from_slice(&u.to_le_bytes());
    }
    fn get_le(bytes: &[u8]) -> f16 {
        let mut b = [0u8; 2];
        b.copy_from_slice(&bytes[..2]);
        f16::from_le_bytes(b)
    }
    const DTYPE: KvDType = KvDType::F16;
    fn row_units(head_dim: usize) -> usize {
        head_dim
    }
    fn representable(x: f32) -> bool {
        f16::from_f32(x).is_finite()
    }
    fn encode(src: &[f32], dst: &mut [f16]) {
        kernels::encode_f16(src, dst)
    }
    fn decode(src: &[f16], dst: &mut [f32]) {
        kernels::decode_f16(src, dst)
    }
}

impl RowCodec for Bf16Rows {
    type Unit = bf16;
    const UNIT_BYTES: usize = 2;
    fn put_le(u: bf16, out: &mut Vec<u8>) {
        out.extend_from_slice(&u.to_le_bytes());
    }
    fn get_le(bytes: &[u8]) -> bf16 {
        let mut b = [0u8; 2];
        b.copy_from_slice(&bytes[..2]);
        bf16::from_le_bytes(b)
    }
    const DTYPE: KvDType = KvDType::BF16;
    fn row_units(head_dim: usize) -> usize {
        head_dim
    }
    fn representable(x: f32) -> bool {
        bf16::from_f32(x).is_finite()
    }
    fn encode(src: &[f32], dst: &mut [bf16]) {
        kernels::encode_bf16(src, dst)
    }
    fn decode(src: &[bf16], dst: &mut [f32]) {
        kernels::decode_bf16(src, dst)
    }
}

/// Index arithmetic of the pools, shared by every codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub row_units: usize,
}

impl Geometry {
    /// Units of one KV head in one block: the contiguous piece a block is copied in.
    pub fn head_block_units(&self) -> usize {
        self.block_size * self.row_units
    }
    /// First unit of the row of `head` at `offset` inside `block`. Callers have checked
    /// that all three are in range.
    pub fn row_start(&self, block: usize, head: usize, offset: usize) -> usize {
        ((head * self.num_blocks + block) * self.block_size + offset) * self.row_units
    }
    /// Copies block `from` (every head) over block `to` in `pool`, a pool of this geometry.
    /// Both are in range (checked by the caller).
    pub fn copy_block<U: Copy>(&self, pool: &mut [U], from: usize, to: usize) {
        if from == to {
            return;
        }
        let hb = self.head_block_units();
        for h in 0..self.kv_heads {
            let src = self.row_start(from, h, 0);
            pool.copy_within(src..src + hb, self.row_start(to, h, 0));
        }
    }
}

/// Which of a layer's two pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    K,
    V,
}

/// One layer's K and V pools.
pub(crate) struct LayerPools<U> {
    pub k: Vec<U>,
    pub v: Vec<U>,
}

/// The pools of every layer for one codec.
pub(crate) struct Pools<C: RowCodec> {
    pub geom: Geometry,
    pub layers: Vec<LayerPools<C::Unit>>,
}

/// A zeroed vector of `len` units, or a typed error instead of an abort when the memory
/// cannot be had.
pub(crate) fn zeroed<U: Copy + Default>(len: usize) -> Result<Vec<U>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|e| KvError::InvalidArgument {
            what: "storage spec",
            detail: format!(
                "cannot allocate a pool of {} bytes: {e}",
                len.saturating_mul(std::mem::size_of::<U>())
            ),
        })?;
    v.resize(len, U::default());
    Ok(v)
}

impl<C: RowCodec> Pools<C> {
    fn allocate(spec: &StorageSpec) -> Result<Self> {
        let shape = spec.shape;
        let geom = Geometry {
            kv_heads: shape.n_kv_heads(),
            head_dim: shape.head_dim(),
            block_size: spec.block_size,
            num_blocks: spec.num_blocks,
            row_units: C::row_units(shape.head_dim()),
        };
        let len = [geom.kv_heads, geom.block_size, geom.row_units]
            .into_iter()
            .try_fold(geom.num_blocks, usize::checked_mul)
            .ok_or_else(|| KvError::InvalidArgument {
                what: "storage spec",
                detail: format!(
                    "{} blocks of {} tokens x {} KV heads x {} dims do not fit in memory",
                    geom.num_blocks, geom.block_size, geom.kv_heads, geom.head_dim
                ),
            })?;
        let layers = (0..shape.n_layers())
            .map(|_| {
                Ok(LayerPools {
                    k: zeroed(len)?,
                    v: zeroed(len)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { geom, layers })
    }

    fn bytes(&self) -> u64 {
        let units: usize = self.layers.iter().map(|l| l.k.len() + l.v.len()).sum();
        units as u64 * std::mem::size_of::<C::Unit>() as u64
    }

    /// Checks every value of `data` (a `[slots, kv_heads, head_dim]` input) before anything
    /// is stored, so that a write is all or nothing.
    pub fn check_values(what: &'static str, data: &[f32]) -> Result<()> {
        if let Some(&x) = data.iter().find(|x| !C::representable(**x)) {
            if !x.is_finite() {
                return Err(KvError::NonFinite { what });
            }
            return Err(KvError::InvalidArgument {
                what,
                detail: format!("{x} does not fit the {} cache layout", C::DTYPE),
            });
        }
        Ok(())
    }

    /// [`Pools::check_values`] for callers that hold a pool of unnamed codec.
    pub fn check_values_of(&self, what: &'static str, data: &[f32]) -> Result<()> {
        Self::check_values(what, data)
    }

    /// Stores `data` (`[slots.len(), kv_heads, head_dim]`, already shape- and
    /// value-checked) into `slots` (already range-checked) of one pool of `layer`. Cannot
    /// fail; returns a `Result` like the quantized pools' `store`.
    pub fn store(
        &mut self,
        layer: usize,
        which: Which,
        slots: &[Slot],
        data: &[f32],
    ) -> Result<()> {
        let g = self.geom;
        let Some(pools) = self.layers.get_mut(layer) else {
            return Ok(());
        };
        let pool = match which {
            Which::K => &mut pools.k,
            Which::V => &mut pools.v,
        };
        let d = g.head_dim;
        for (t, slot) in slots.iter().enumerate() {
            for h in 0..g.kv_heads {
                let src = (t * g.kv_heads + h) * d;
                let dst = g.row_start(slot.block.index(), h, slot.offset as usize);
                C::encode(&data[src..src + d], &mut pool[dst..dst + g.row_units]);
            }
        }
        Ok(())
    }

    /// Decoded K and V rows of `slots` (already range-checked) of `layer`, as
    /// `[slots.len(), kv_heads, head_dim]` f32. Cannot fail; returns a `Result` like the
    /// quantized pools' `read`.
    pub fn read(&self, layer: usize, slots: &[Slot]) -> Result<(Vec<f32>, Vec<f32>)> {
        let g = self.geom;
        let d = g.head_dim;
        let mut k = vec![0.0f32; slots.len() * g.kv_heads * d];
        let mut v = vec![0.0f32; slots.len() * g.kv_heads * d];
        if let Some(pools) = self.layers.get(layer) {
            for (t, slot) in slots.iter().enumerate() {
                for h in 0..g.kv_heads {
                    let src = g.row_start(slot.block.index(), h, slot.offset as usize);
                    let dst = (t * g.kv_heads + h) * d;
                    C::decode(&pools.k[src..src + g.row_units], &mut k[dst..dst + d]);
                    C::decode(&pools.v[src..src + g.row_units], &mut v[dst..dst + d]);
                }
            }
        }
        Ok((k, v))
    }

    /// Bytes of one block's export: every layer, K then V, each head's rows of the block.
    pub fn block_export_len(&self) -> Result<usize> {
        let g = self.geom;
        [2, g.kv_heads, g.head_block_units(), C::UNIT_BYTES]
            .into_iter()
            .try_fold(self.layers.len(), usize::checked_mul)
            .ok_or_else(|| KvError::Overflow {
                what: "block export size",
                detail: format!(
                    "{} layers x 2 x {} heads x {} units",
                    self.layers.len(),
                    g.kv_heads,
                    g.head_block_units()
                ),
            })
    }

    /// Appends block `block` (range-checked) as stored: per layer K then V, per KV head the
    /// block's rows, each unit little-endian.
    pub fn export_block(&self, block: usize, out: &mut Vec<u8>) -> Result<()> {
        let g = self.geom;
        let hb = g.head_block_units();
        out.try_reserve(self.block_export_len()?)
            .map_err(|e| KvError::InvalidArgument {
                what: "block export",
                detail: format!("cannot allocate the export buffer: {e}"),
            })?;
        for l in &self.layers {
            for pool in [&l.k, &l.v] {
                for h in 0..g.kv_heads {
                    let start = g.row_start(block, h, 0);
                    for &u in &pool[start..start + hb] {
                        C::put_le(u, out);
                    }
                }
            }
        }
        Ok(())
    }

    /// Overwrites block `block` (range-checked) with an export of this geometry, after
    /// checking its length and that every row decodes to finite values: all or nothing.
    pub fn import_block(&mut self, block: usize, bytes: &[u8]) -> Result<()> {
        let g = self.geom;
        let expected = self.block_export_len()?;
        if bytes.len() != expected {
            return Err(KvError::ShapeMismatch {
                what: "imported block",
                expected: format!("{expected} bytes"),
                got: format!("{} bytes", bytes.len()),
            });
        }
        let units: Vec<C::Unit> = bytes.chunks_exact(C::UNIT_BYTES).map(C::get_le).collect();
        let mut row = vec![0.0f32; g.head_dim];
        for stored in units.chunks_exact(g.row_units) {
            C::decode(stored, &mut row);
            if !row.iter().all(|x| x.is_finite()) {
                return Err(KvError::NonFinite {
                    what: "imported block",
                });
            }
        }
        let hb = g.head_block_units();
        let mut chunks = units.chunks_exact(hb);
        for l in &mut self.layers {
            for pool in [&mut l.k, &mut l.v] {
                for h in 0..g.kv_heads {
                    let start = g.row_start(block, h, 0);
                    if let Some(src) = chunks.next() {
                        pool[start..start + hb].copy_from_slice(src);
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies whole blocks (already range-checked) in every layer, in the order given.
    pub fn copy_blocks(&mut self, moves: &[(BlockId, BlockId)]) {
        let g = self.geom;
        for layer in &mut self.layers {
            for pool in [&mut layer.k, &mut layer.v] {
                for &(from, to) in moves {
                    g.copy_block(pool, from.index(), to.index());
                }
            }
        }
    }
}

/// The pools of one storage, in whichever layout it was allocated with.
pub(crate) enum PoolSet {
    F32(Pools<F32Rows>),
    F16(Pools<F16Rows>),
    BF16(Pools<Bf16Rows>),
    /// Every quantized layout (INT8, INT4, KIVI).
    Quant(crate::quant::QuantPools),
}

/// Runs `$body` with `$p` bound to the typed pools of a [`PoolSet`] (by reference or by
/// mutable reference, as `$set` is), so generic code is written once per operation.
///
/// The quantized pools offer the same `check_values_of`, `store`, `read`, `copy_blocks` and
/// `bytes` methods, so `$body` covers them too, unless a `quant $q => $qbody` arm says what
/// to do with them instead (attention, which has its own loop).
macro_rules! with_pools {
    ($set:expr, $p:ident => $body:expr) => {
        with_pools!($set, $p => $body, quant $p => $body)
    };
    ($set:expr, $p:ident => $body:expr, quant $q:ident => $qbody:expr) => {
        match $set {
            $crate::storage::PoolSet::F32($p) => $body,
            $crate::storage::PoolSet::F16($p) => $body,
            $crate::storage::PoolSet::BF16($p) => $body,
            $crate::storage::PoolSet::Quant($q) => $qbody,
        }
    };
}
pub(crate) use with_pools;

/// K/V block pools of every layer in host memory: what [`crate::CpuBackend`] allocates.
///
/// Each layer holds a K pool and a V pool laid out `[kv_heads][num_blocks][block_size][row]`,
/// so the rows of one KV head over consecutive block ids are contiguous.
pub struct CpuStorage {
    spec: StorageSpec,
    pub(crate) pools: PoolSet,
}

impl CpuStorage {
    /// Allocates zeroed pools for `spec`, or answers [`KvError::Unsupported`] for a layout
    /// the CPU backend does not store yet.
    pub(crate) fn allocate(spec: &StorageSpec) -> Result<Self> {
        let pools = match spec.dtype {
            KvDType::F32 => PoolSet::F32(Pools::allocate(spec)?),
            KvDType::F16 => PoolSet::F16(Pools::allocate(spec)?),
            KvDType::BF16 => PoolSet::BF16(Pools::allocate(spec)?),
            other => match crate::quant::layout_of(other) {
                Some(layout) => PoolSet::Quant(crate::quant::QuantPools::allocate(spec, layout)?),
                // KvDType is non-exhaustive: layouts added later land here until stored.
                None => {
                    return Err(KvError::Unsupported {
                        backend: crate::NAME.into(),
                        what: format!("the {other} cache layout"),
                    })
                }
            },
        };
        Ok(Self { spec: *spec, pools })
    }

    /// The spec the pools were allocated with.
    pub fn spec(&self) -> &StorageSpec {
        &self.spec
    }

    /// Bytes of host memory the pools hold: [`StorageSpec::bytes`], which is what the
    /// memory accounting promises, plus for KIVI layouts the residual windows of key blocks
    /// being filled ([`CpuStorage::residual_windows`] windows of
    /// [`kv_core::memory::residual_window_bytes`] each).
    ///
    /// ```
    /// use kv_backend_cpu::CpuBackend;
    /// use kv_core::candle::{Device, Tensor};
    /// use kv_core::{memory, CacheBackend, KvDType, ModelShape, Slot, StorageSpec};
    ///
    /// let shape = ModelShape::new(2, 4, 2, 64)?;
    /// let kivi4: KvDType = "kivi4".parse()?;
    /// let spec = StorageSpec::new(shape, kivi4, 32, 4)?;
    /// let backend = CpuBackend::new();
    /// let mut storage = backend.allocate(&spec)?;
    /// assert_eq!(storage.allocated_bytes(), spec.bytes()?);
    /// // 3 tokens of block 1 in layer 0: its keys wait in an f16 window.
    /// let block = kv_core::BlockId::new(1);
    /// let slots: Vec<Slot> = (0..3).map(|offset| Slot { block, offset }).collect();
    /// let kv = Tensor::ones((3, 2, 64), kv_core::candle::DType::F32, &Device::Cpu)?;
    /// backend.write(&mut storage, 0, &slots, &kv, &kv)?;
    /// assert_eq!(storage.residual_windows(), 1);
    /// let window = memory::residual_window_bytes(&shape, kivi4)? as u64;
    /// assert_eq!(storage.allocated_bytes(), spec.bytes()? + window);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn allocated_bytes(&self) -> u64 {
        with_pools!(&self.pools, p => p.bytes())
    }

    /// KIVI residual windows allocated now, over all layers (0 for other layouts): one per
    /// layer for each 32-token key block that is being filled and, with a residual
    /// (`kivi2-r128`), for each full one not settled yet
    /// ([`kv_core::CacheBackend::settle_blocks`]).
    pub fn residual_windows(&self) -> usize {
        match &self.pools {
            PoolSet::Quant(p) => p.open_windows(),
            _ => 0,
        }
    }

    /// Bytes of the residual windows allocated now (0 for layouts without windows):
    /// [`allocated_bytes`](Self::allocated_bytes) is `StorageSpec::bytes` plus these.
    pub fn residual_window_bytes(&self) -> u64 {
        match &self.pools {
            PoolSet::Quant(p) => p.window_bytes_held(),
            _ => 0,
        }
    }
}

impl std::fmt::Debug for CpuStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuStorage")
            .field("spec", &self.spec)
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::ModelShape;

    fn spec(dtype: KvDType) -> StorageSpec {
        let shape = ModelShape::new(2, 4, 2, 8).expect("valid shape");
        StorageSpec::new(shape, dtype, 4, 3).expect("valid spec")
    }

    #[test]
    fn rows_of_one_head_over_consecutive_blocks_are_contiguous() {
        let g = Geometry {
            kv_heads: 2,
            head_dim: 8,
            block_size: 4,
            num_blocks: 3,
            row_units: 8,
        };
        assert_eq!(g.row_start(0, 0, 1) - g.row_start(0, 0, 0), 8);
        assert_eq!(g.row_start(1, 0, 0), g.row_start(0, 0, 3) + 8);
        assert_eq!(g.row_start(0, 1, 0), g.row_start(2, 0, 3) + 8);
        assert_eq!(g.row_start(0, 1, 0), 3 * g.head_block_units());
        assert_eq!(g.row_start(2, 1, 3) + 8, 6 * g.head_block_units());
        // Copying a block moves each head's piece and nothing else.
        let mut pool: Vec<usize> = (0..6 * g.head_block_units()).collect();
        g.copy_block(&mut pool, 2, 0);
        for h in 0..2 {
            for r in 0..4 {
                let (to, from) = (g.row_start(0, h, r), g.row_start(2, h, r));
                assert_eq!(pool[to..to + 8], pool[from..from + 8]);
                let mid = g.row_start(1, h, r);
                assert_eq!(pool[mid], mid, "block 1 untouched");
            }
        }
    }

    #[test]
    fn allocation_matches_the_memory_accounting() {
        for &dt in KvDType::ALL {
            for (head_dim, block_size) in [(8, 4), (64, 32), (128, 64)] {
                let shape = ModelShape::new(2, 4, 2, head_dim).expect("valid shape");
                // Layouts that do not fit this head dim or block size are refused by the spec.
                let Ok(s) = StorageSpec::new(shape, dt, block_size, 3) else {
                    continue;
                };
                let storage = CpuStorage::allocate(&s).expect("allocates");
                assert_eq!(storage.allocated_bytes(), s.bytes().expect("fits"), "{dt}");
            }
        }
    }

    #[test]
    fn write_lands_in_the_documented_layout() {
        let s = spec(KvDType::F32);
        let mut storage = CpuStorage::allocate(&s).expect("allocates");
        let PoolSet::F32(pools) = &mut storage.pools else {
            panic!("f32 spec gave another layout");
        };
        // One token, two heads: head h holds 10*h + i.
        let k: Vec<f32> = (0..16).map(|i| (10 * (i / 8) + i % 8) as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        let slot = Slot {
            block: BlockId::new(2),
            offset: 1,
        };
        pools.store(1, Which::K, &[slot], &k).expect("stores");
        pools.store(1, Which::V, &[slot], &v).expect("stores");
        let g = pools.geom;
        let layer = &pools.layers[1];
        // block 2, head 1, offset 1 -> ((1*3 + 2)*4 + 1) * 8; head 0 -> ((0*3 + 2)*4 + 1) * 8
        assert_eq!(layer.k[(5 * 4 + 1) * 8..(5 * 4 + 1) * 8 + 8], k[8..]);
        assert_eq!(layer.v[(2 * 4 + 1) * 8..(2 * 4 + 1) * 8 + 8], v[..8]);
        let touched = layer.k.iter().filter(|x| **x != 0.0).count();
        assert_eq!(
            touched, 15,
            "only the two rows (one zero element) were written"
        );
        assert!(
            pools.layers[0].k.iter().all(|x| *x == 0.0),
            "other layer untouched"
        );
        pools.copy_blocks(&[(BlockId::new(2), BlockId::new(0))]);
        let hb = g.head_block_units();
        for h in 0..g.kv_heads {
            let (to, from) = (g.row_start(0, h, 0), g.row_start(2, h, 0));
            let l = &pools.layers[1];
            assert_eq!(l.k[to..to + hb], l.k[from..from + hb]);
            assert_eq!(l.v[to..to + hb], l.v[from..from + hb]);
        }
    }

    #[test]
    fn values_that_overflow_the_layout_are_refused() {
        assert!(Pools::<F16Rows>::check_values("k", &[1.0, 70000.0]).is_err());
        assert!(Pools::<F32Rows>::check_values("k", &[1.0, 70000.0]).is_ok());
        assert!(matches!(
            Pools::<Bf16Rows>::check_values("v", &[f32::NAN]),
            Err(KvError::NonFinite { what: "v" })
        ));
    }

    #[test]
    fn absurd_specs_are_a_typed_error_not_an_abort() {
        let shape = ModelShape::new(1, 8, 8, 128).expect("valid shape");
        // `StorageSpec::new` refuses a size that overflows; a spec built field by field
        // reaches the allocator unchecked, which must refuse it too.
        assert!(matches!(
            StorageSpec::new(shape, KvDType::F32, 1 << 30, u32::MAX as usize),
            Err(KvError::Overflow { .. })
        ));
        let s = StorageSpec {
            shape,
            dtype: KvDType::F32,
            block_size: 1 << 30,
            num_blocks: u32::MAX as usize,
        };
        assert!(matches!(
            CpuStorage::allocate(&s),
            Err(KvError::InvalidArgument { .. } | KvError::Overflow { .. })
        ));
    }
}
