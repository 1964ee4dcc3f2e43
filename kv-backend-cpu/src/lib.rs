//! The CPU backend of the kv cache: K/V block pools in host memory and paged attention
//! with an online softmax, split over sequences and KV heads across threads.
//!
//! [`CpuBackend`] implements [`kv_core::CacheBackend`] for every layout of
//! [`KvDType::ALL`]: f32, f16 and bf16, and the quantized INT8, INT4 (plain or with
//! Hadamard-rotated keys) and KIVI layouts, stored in `kv-quant`'s byte formats (quantized
//! on write) and attended over with its fused kernels. It is the oracle other backends are
//! compared with, so it favours plain, checked code; the arithmetic of the float layouts
//! lives in [`kernels`], where every fast kernel (AVX2 or AVX-512, chosen at run time
//! by [`kernels::Isa::best`]) has a portable scalar twin that tests compare it with.
//! Decode attention over the float layouts splits one long sequence over threads by chunks
//! of keys (flash-decoding) and reads each cached row once for all query heads of its
//! group; prefill runs in query x key tiles. [`mod@bench`] holds the memory-read probe and a
//! decode workload for benchmarks.
//!
//! The crate has no `unsafe` code: its SIMD kernels are written once over the vector width
//! on kv-quant's SIMD layer ([`kv_quant::simd`]), whose level tokens make them safe.
//!
//! A small cache, filled through `kv_attention::PagedCache`'s bookkeeping:
//!
//! ```
//! use kv_attention::PagedCache;
//! use kv_backend_cpu::CpuBackend;
//! use kv_core::candle::{Device, Tensor};
//! use kv_core::{AttentionBatch, CacheBackend, KvDType, ModelShape, StorageSpec};
//!
//! // 1 layer, 4 query heads sharing 2 KV heads (GQA), head dim 8, 16 blocks of 4 tokens.
//! let shape = ModelShape::new(1, 4, 2, 8)?;
//! let spec = StorageSpec::new(shape, KvDType::F16, 4, 16)?;
//! let mut cache = PagedCache::new(CpuBackend::new(), spec)?;
//!
//! // Prefill: 6 tokens of K/V, [tokens, kv_heads, head_dim].
//! let seq = cache.create_sequence();
//! let slots = cache.reserve(seq, 6)?;
//! let k = Tensor::randn(0f32, 1.0, (6, 2, 8), &Device::Cpu)?;
//! let v = Tensor::randn(0f32, 1.0, (6, 2, 8), &Device::Cpu)?;
//! cache.write(0, &slots, &k, &v)?;
//!
//! // Attend from the last 6 positions (causal), [queries, q_heads, head_dim].
//! let q = Tensor::randn(0f32, 1.0, (6, 4, 8), &Device::Cpu)?;
//! let batch = AttentionBatch::new(vec![cache.seq_attention(seq, 6)?], 8);
//! let out = cache.attend(0, &q, &batch)?;
//! assert_eq!(out.dims(), &[6, 4, 8]);
//!
//! // The first query sees only the first token, so its output is that token's V (as
//! // stored, in f16) for both query heads of each KV head.
//! let (_, v_stored) = cache.backend().read(cache.storage(), 0, &slots[..1])?;
//! let first = out.narrow(0, 0, 1)?.to_vec3::<f32>()?;
//! let stored = v_stored.to_vec3::<f32>()?;
//! assert_eq!(first[0][0], stored[0][0]);
//! assert_eq!(first[0][3], stored[0][1]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod attend;
pub mod bench;
pub mod kernels;
mod quant;
mod simd;
mod storage;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use kv_core::{
    validate, AttentionBatch, BlockId, CacheBackend, KvDType, KvError, Result, Slot, StorageSpec,
};

pub use storage::CpuStorage;
use storage::{with_pools, PoolSet, Which};

/// The backend's name in messages and reports.
const NAME: &str = "cpu";

/// Stores K/V in host memory and computes attention on the CPU.
///
/// Attention runs one task per (sequence, KV head, chunk of queries, chunk of keys for
/// decode) on a rayon pool: the global one for [`CpuBackend::new`], a private one for
/// [`CpuBackend::with_threads`]; the calling thread takes tasks too, alongside all but one
/// of the pool's threads. Results do not depend on the number of threads. Tensors
/// passed in must be on the CPU device and of a float dtype; they are read in place when
/// they are contiguous f32.
#[derive(Clone)]
pub struct CpuBackend {
    device: Device,
    threads: Option<Arc<rayon::ThreadPool>>,
}

impl CpuBackend {
    /// A backend that runs on rayon's global pool (all cores unless `RAYON_NUM_THREADS`
    /// says otherwise).
    pub fn new() -> Self {
        Self {
            device: Device::Cpu,
            threads: None,
        }
    }

    /// A backend with its own pool of `n` threads, so it neither competes with nor waits
    /// for other users of the global pool.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for `n == 0`; [`KvError::BackendUnavailable`] when the
    /// threads cannot be started.
    pub fn with_threads(n: usize) -> Result<Self> {
        if n == 0 {
            return Err(KvError::InvalidArgument {
                what: "threads",
                detail: "a CPU backend needs at least one thread".into(),
            });
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("kv-cpu-{i}"))
            .build()
            .map_err(|e| KvError::BackendUnavailable {
                backend: NAME,
                reason: format!("cannot start {n} threads: {e}"),
            })?;
        Ok(Self {
            device: Device::Cpu,
            threads: Some(Arc::new(pool)),
        })
    }

    /// Runs `f` on one of the threads attention runs on, and returns what it returns.
    ///
    /// A decode loop that calls [`CacheBackend::attend`] from outside the pool hands every
    /// call over to the pool and sleeps until it is done: two thread wake-ups per call, a
    /// large share of a short step. Run the loop inside `install` instead: the calling
    /// thread is then a pool thread and takes attention tasks itself.
    ///
    /// ```
    /// use kv_backend_cpu::CpuBackend;
    ///
    /// let backend = CpuBackend::with_threads(2)?;
    /// let on_pool = backend.install(|| std::thread::current().name().map(str::to_owned));
    /// assert!(on_pool.is_some_and(|name| name.starts_with("kv-cpu-")));
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.threads {
            Some(pool) => pool.install(f),
            None => rayon::scope(|_| f()),
        }
    }

    /// Threads attention runs on.
    pub fn threads(&self) -> usize {
        match &self.threads {
            Some(p) => p.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend")
            .field("threads", &self.threads())
            .field("own_pool", &self.threads.is_some())
            .finish()
    }
}

/// The elements of a tensor as row-major f32, seen without a copy when the tensor is a
/// contiguous f32 CPU tensor (the common case) and converted once otherwise.
///
/// The view takes the tensor's storage read lock only inside [`HostF32::with`], one tensor
/// at a time: K and V may share one storage (views of a fused projection), and a second
/// read lock taken on a storage by the same thread can deadlock against a waiting writer.
struct HostF32<'t> {
    tensor: &'t Tensor,
    converted: Option<Vec<f32>>,
}

impl<'t> HostF32<'t> {
    fn new(tensor: &'t Tensor) -> Result<Self> {
        let converted = if Self::viewable(tensor) {
            None
        } else {
            Some(
                tensor
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            )
        };
        Ok(Self { tensor, converted })
    }

    fn viewable(t: &Tensor) -> bool {
        t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous()
    }

    /// Runs `f` on the elements.
    fn with<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        if let Some(data) = &self.converted {
            return f(data);
        }
        let (storage, layout) = self.tensor.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) => {
                match data.get(a..b) {
                    Some(slice) => f(slice),
                    None => Err(KvError::InvalidArgument {
                        what: "tensor",
                        detail: format!("layout {a}..{b} exceeds its storage of {}", data.len()),
                    }),
                }
            }
            // A tensor's dtype, device and layout never change, so `viewable` said so.
            _ => Err(KvError::InvalidArgument {
                what: "tensor",
                detail: "storage is not the contiguous f32 CPU storage its layout promised".into(),
            }),
        }
    }
}

/// [`KvError::OutOfRange`] for a block past the end of the pools.
fn check_block(spec: &StorageSpec, block: BlockId) -> Result<()> {
    if block.index() >= spec.num_blocks {
        return Err(KvError::OutOfRange {
            what: "block",
            index: block.index(),
            len: spec.num_blocks,
        });
    }
    Ok(())
}

impl CacheBackend for CpuBackend {
    type Storage = CpuStorage;

    fn name(&self) -> &str {
        NAME
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn supports(&self, dtype: KvDType) -> bool {
        matches!(dtype, KvDType::F32 | KvDType::F16 | KvDType::BF16)
            || quant::layout_of(dtype).is_some()
    }

    fn allocate(&self, spec: &StorageSpec) -> Result<CpuStorage> {
        CpuStorage::allocate(spec)
    }

    fn spec<'a>(&self, storage: &'a CpuStorage) -> &'a StorageSpec {
        storage.spec()
    }

    fn write(
        &self,
        storage: &mut CpuStorage,
        layer: usize,
        slots: &[Slot],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        validate::write(storage.spec(), &self.device, layer, slots, k, v)?;
        let (k, v) = (HostF32::new(k)?, HostF32::new(v)?);
        // Every check before the first store: a failed write changes nothing.
        k.with(|k| with_pools!(&storage.pools, p => p.check_values_of("k", k)))?;
        v.with(|v| with_pools!(&storage.pools, p => p.check_values_of("v", v)))?;
        k.with(|k| with_pools!(&mut storage.pools, p => p.store(layer, Which::K, slots, k)))?;
        v.with(|v| with_pools!(&mut storage.pools, p => p.store(layer, Which::V, slots, v)))
    }

    fn attend(
        &self,
        storage: &CpuStorage,
        layer: usize,
        q: &Tensor,
        batch: &AttentionBatch,
    ) -> Result<Tensor> {
        let spec = storage.spec();
        validate::attend(spec, &self.device, layer, q, batch)?;
        let q_heads = spec.shape.n_q_heads();
        let dims = [batch.total_queries(), q_heads, spec.shape.head_dim()];
        let out = HostF32::new(q)?.with(|data| {
            validate::finite("q", data)?;
            let queries = attend::Queries {
                data,
                q_heads,
                scale: batch.scale,
            };
            let threads = self.threads.as_deref();
            let isa = kernels::Isa::best();
            with_pools!(&storage.pools, p => attend::attend(p, layer, &queries, batch, threads, isa),
                quant p => quant::attend(p, layer, &quant::QuantQueries {
                    data: queries.data,
                    q_heads: queries.q_heads,
                    scale: queries.scale,
                }, batch, threads))
        })?;
        Ok(Tensor::from_vec(out, &dims[..], &self.device)?)
    }

    fn copy_blocks(&self, storage: &mut CpuStorage, moves: &[(BlockId, BlockId)]) -> Result<()> {
        validate::moves(storage.spec(), moves)?;
        with_pools!(&mut storage.pools, p => p.copy_blocks(moves));
        Ok(())
    }

    fn settle_blocks(&self, storage: &mut CpuStorage, blocks: &[BlockId]) -> Result<()> {
        validate::blocks(storage.spec(), blocks)?;
        if let PoolSet::Quant(p) = &mut storage.pools {
            p.settle(blocks);
        }
        Ok(())
    }

    fn supports_block_bytes(&self) -> bool {
        true
    }

    fn export_block(&self, storage: &CpuStorage, block: BlockId, out: &mut Vec<u8>) -> Result<()> {
        check_block(storage.spec(), block)?;
        with_pools!(&storage.pools, p => p.export_block(block.index(), out))
    }

    fn import_block(&self, storage: &mut CpuStorage, block: BlockId, bytes: &[u8]) -> Result<()> {
        check_block(storage.spec(), block)?;
        with_pools!(&mut storage.pools, p => p.import_block(block.index(), bytes))
    }

    fn read(&self, storage: &CpuStorage, layer: usize, slots: &[Slot]) -> Result<(Tensor, Tensor)> {
        let spec = storage.spec();
        validate::layer(spec, layer)?;
        validate::slots(spec, slots)?;
        let dims = [slots.len(), spec.shape.n_kv_heads(), spec.shape.head_dim()];
        let (k, v) = with_pools!(&storage.pools, p => p.read(layer, slots))?;
        Ok((
            Tensor::from_vec(k, &dims[..], &self.device)?,
            Tensor::from_vec(v, &dims[..], &self.device)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_core::{ModelShape, SeqAttention};

    fn setup(dtype: KvDType) -> Result<(CpuBackend, CpuStorage, StorageSpec)> {
        let backend = CpuBackend::new();
        let spec = StorageSpec::new(ModelShape::new(2, 6, 2, 16)?, dtype, 8, 40)?;
        let storage = backend.allocate(&spec)?;
        Ok((backend, storage, spec))
    }

    fn slots(blocks: &[BlockId], len: usize, bs: usize) -> Vec<Slot> {
        (0..len)
            .map(|t| Slot {
                block: blocks[t / bs],
                offset: (t % bs) as u32,
            })
            .collect()
    }

    fn everything(b: &CpuBackend, s: &CpuStorage) -> Result<Vec<f32>> {
        let spec = *s.spec();
        let all: Vec<Slot> = (0..spec.num_blocks as u32)
            .map(BlockId::new)
            .flat_map(|block| (0..spec.block_size as u32).map(move |offset| Slot { block, offset }))
            .collect();
        let mut out = Vec::new();
        for layer in 0..spec.shape.n_layers() {
            let (k, v) = b.read(s, layer, &all)?;
            out.extend(k.flatten_all()?.to_vec1::<f32>()?);
            out.extend(v.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    #[test]
    fn values_a_layout_cannot_hold_are_refused_and_nothing_is_written() -> Result<()> {
        let (b, mut s, _) = setup(KvDType::F16)?;
        let before = everything(&b, &s)?;
        let ok = Tensor::ones((2, 2, 16), DType::F32, &Device::Cpu)?;
        let huge = (Tensor::ones((2, 2, 16), DType::F32, &Device::Cpu)? * 1e5)?;
        let at = slots(&[BlockId::new(3)], 2, 8);
        assert!(matches!(
            b.write(&mut s, 0, &at, &ok, &huge),
            Err(KvError::InvalidArgument { what: "v", .. })
        ));
        let ints = Tensor::ones((2, 2, 16), DType::U32, &Device::Cpu)?;
        assert!(matches!(
            b.write(&mut s, 0, &at, &ints, &ok),
            Err(KvError::InvalidArgument { what: "k", .. })
        ));
        assert_eq!(everything(&b, &s)?, before);
        // The same values fit f32 storage.
        let (b32, mut s32, _) = setup(KvDType::F32)?;
        b32.write(&mut s32, 0, &at, &ok, &huge)?;
        let (_, v) = b32.read(&s32, 0, &at[1..])?;
        assert_eq!(v.flatten_all()?.to_vec1::<f32>()?, vec![1e5; 32]);
        Ok(())
    }

    #[test]
    fn empty_writes_and_reads_are_no_ops() -> Result<()> {
        let (b, mut s, _) = setup(KvDType::BF16)?;
        let empty = Tensor::zeros((0, 2, 16), DType::F32, &Device::Cpu)?;
        b.write(&mut s, 1, &[], &empty, &empty)?;
        let (k, v) = b.read(&s, 1, &[])?;
        assert_eq!((k.dims(), v.dims()), (&[0, 2, 16][..], &[0, 2, 16][..]));
        Ok(())
    }

    #[test]
    fn non_finite_queries_are_refused() -> Result<()> {
        let (b, mut s, _) = setup(KvDType::F32)?;
        let kv = Tensor::ones((3, 2, 16), DType::F32, &Device::Cpu)?;
        b.write(&mut s, 0, &slots(&[BlockId::new(5)], 3, 8), &kv, &kv)?;
        let batch = AttentionBatch::new(vec![SeqAttention::new(vec![BlockId::new(5)], 3, 1)?], 16);
        let q = (Tensor::ones((1, 6, 16), DType::F32, &Device::Cpu)? * f64::INFINITY)?;
        assert!(matches!(
            b.attend(&s, 0, &q, &batch),
            Err(KvError::NonFinite { what: "q" })
        ));
        Ok(())
    }

    #[test]
    fn k_and_v_may_be_views_of_one_fused_tensor() -> Result<()> {
        let (b, mut s, _) = setup(KvDType::F32)?;
        // [K|V, tokens, heads, dim] in one storage; K and V are offset views into it.
        let fused = Tensor::randn(0f32, 1.0, (2, 3, 2, 16), &Device::Cpu)?;
        let (k, v) = (fused.get(0)?, fused.get(1)?);
        let at = slots(&[BlockId::new(7)], 3, 8);
        b.write(&mut s, 0, &at, &k, &v)?;
        let (rk, rv) = b.read(&s, 0, &at)?;
        let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        assert_eq!(flat(&rk)?, flat(&k)?);
        assert_eq!(flat(&rv)?, flat(&v)?);
        assert_ne!(flat(&rk)?, flat(&rv)?);
        Ok(())
    }

    #[test]
    fn zero_threads_is_a_typed_error() {
        assert!(matches!(
            CpuBackend::with_threads(0),
            Err(KvError::InvalidArgument {
                what: "threads",
                ..
            })
        ));
    }

    /// A long ragged prefill (several query chunks and tiles per block) on scattered
    /// blocks, from queries that are an offset view, a half-precision copy, and a
    /// transposed view of the same values.
    #[test]
    fn results_do_not_depend_on_threads_or_query_tensor_layout() -> Result<()> {
        let (_, mut s, spec) = setup(KvDType::F32)?;
        let bs = spec.block_size;
        let lens = [150usize, 9];
        let tables: [Vec<BlockId>; 2] = [
            (0..19).map(|i| BlockId::new((i * 7 + 3) % 40)).collect(),
            vec![BlockId::new(4), BlockId::new(1)], // not among the first table's blocks
        ];
        let one = CpuBackend::with_threads(1)?;
        for (len, table) in lens.iter().zip(&tables) {
            let k = Tensor::randn(0f32, 1.0, (*len, 2, 16), &Device::Cpu)?;
            let v = Tensor::randn(0f32, 1.0, (*len, 2, 16), &Device::Cpu)?;
            one.write(&mut s, 1, &slots(table, *len, bs), &k, &v)?;
        }
        let batch = AttentionBatch::new(
            vec![
                SeqAttention::new(tables[0].clone(), 150, 140)?,
                SeqAttention::new(tables[1].clone(), 9, 9)?,
            ],
            16,
        );
        // 149 query rows, viewed from row 1 of a larger tensor (contiguous, offset start).
        let big = Tensor::randn(0f32, 2.0, (150, 6, 16), &Device::Cpu)?;
        let q = big.narrow(0, 1, 149)?;
        let flat = |t: Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        let want = flat(one.attend(&s, 1, &q.copy()?, &batch)?)?;
        assert_eq!(flat(one.attend(&s, 1, &q, &batch)?)?, want);
        assert_eq!(
            flat(CpuBackend::with_threads(3)?.attend(&s, 1, &q, &batch)?)?,
            want
        );
        let transposed = q.transpose(0, 1)?.contiguous()?.transpose(0, 1)?;
        assert_eq!(
            flat(CpuBackend::new().attend(&s, 1, &transposed, &batch)?)?,
            want
        );
        // An f64 query is converted (exactly, for these values), not refused.
        let from_f64 = flat(one.attend(&s, 1, &q.to_dtype(DType::F64)?, &batch)?)?;
        assert_eq!(from_f64, want);
        Ok(())
    }
}
