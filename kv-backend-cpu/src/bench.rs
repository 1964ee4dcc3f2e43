//! Helpers for benchmarks: the memory-read probe that states the limit, and a ready-made
//! decode-attention workload whose K/V bytes per step are known.
//!
//! Decode attention at long context reads every cached K and V row once per step, so its
//! speed limit is memory bandwidth. [`memory_read_probe`] measures that limit on the running
//! machine (a plain parallel sum of a large array); [`DecodeBench`] measures the kernel on
//! the same terms (bytes of K/V read per second), so the ratio of the two says how close the
//! kernel is to the hardware. Both are used by `benches/decode.rs` and meant for the
//! workspace's `cargo xtask bench` harness.
//!
//! ```
//! use kv_backend_cpu::bench::{memory_read_probe, DecodeBench};
//! use kv_core::{KvDType, ModelShape};
//!
//! let limit = memory_read_probe(8 << 20, 1)?; // bytes/s of a plain read
//! let shape = ModelShape::new(1, 9, 3, 64)?; // one SmolLM2 layer
//! let bench = DecodeBench::new(shape, KvDType::F16, 256, 1)?;
//! let seconds = bench.time_steps(3)?; // mean seconds per decode step
//! let kernel = bench.kv_bytes_per_step() as f64 / seconds;
//! assert!(limit > 0.0 && kernel > 0.0);
//! # Ok::<(), kv_core::KvError>(())
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use kv_core::{
    AttentionBatch, BlockId, CacheBackend, KvDType, KvError, ModelShape, Result, SeqAttention,
    Slot, StorageSpec,
};

use crate::{CpuBackend, CpuStorage};

/// Timed passes of [`memory_read_probe`] after one untimed warm-up pass.
pub const PROBE_PASSES: usize = 5;

/// A buffer for measuring memory-read bandwidth: allocated and written once (so its pages
/// exist), then read whole by [`MemoryProbe::read`] as often as a benchmark likes.
pub struct MemoryProbe {
    words: Vec<u64>,
}

impl MemoryProbe {
    /// A probe over `bytes` bytes (rounded down to whole 8-byte words).
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for fewer than 8 bytes, or a buffer that cannot be
    /// allocated.
    pub fn new(bytes: usize) -> Result<Self> {
        let n = bytes / 8;
        if n == 0 {
            return Err(KvError::InvalidArgument {
                what: "memory probe",
                detail: format!("{bytes} bytes; need at least 8"),
            });
        }
        let mut words: Vec<u64> = Vec::new();
        words
            .try_reserve_exact(n)
            .map_err(|e| KvError::InvalidArgument {
                what: "memory probe",
                detail: format!("cannot allocate {bytes} bytes: {e}"),
            })?;
        words.extend((0..n as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        Ok(Self { words })
    }

    /// Bytes one [`MemoryProbe::read`] reads.
    pub fn bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Reads the whole buffer once, split into `threads` contiguous parts each summed by its
    /// own thread (at least one; never more threads than words); returns the sum so the
    /// read cannot be optimised away.
    pub fn read(&self, threads: usize) -> u64 {
        let part = self.words.len().div_ceil(threads.max(1));
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .words
                .chunks(part)
                .map(|chunk| s.spawn(move || sum_words(chunk)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        })
    }
}

impl std::fmt::Debug for MemoryProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryProbe")
            .field("bytes", &self.bytes())
            .finish()
    }
}

/// Bytes per second at which `threads` threads together read a buffer of `bytes` bytes
/// (each sums its own contiguous part): the memory-bandwidth limit a decode kernel is
/// compared with.
///
/// The buffer is read once untimed, then [`PROBE_PASSES`] times; the result is the median
/// pass. Use a buffer much larger than the last-level cache (256 MiB or more) to measure
/// DRAM rather than cache bandwidth, and the same thread count as the kernel it is compared
/// with.
///
/// # Errors
/// [`KvError::InvalidArgument`] for zero threads, a buffer smaller than 8 bytes per thread,
/// or a buffer that cannot be allocated.
pub fn memory_read_probe(bytes: usize, threads: usize) -> Result<f64> {
    if threads == 0 || bytes / 8 < threads {
        return Err(KvError::InvalidArgument {
            what: "memory probe",
            detail: format!(
                "{bytes} bytes over {threads} threads; need at least 8 bytes per thread"
            ),
        });
    }
    let probe = MemoryProbe::new(bytes)?;
    let pass = || {
        let start = Instant::now();
        std::hint::black_box(probe.read(threads));
        start.elapsed().as_secs_f64()
    };
    pass();
    let mut times: Vec<f64> = (0..PROBE_PASSES).map(|_| pass()).collect();
    times.sort_by(f64::total_cmp);
    let median = times[PROBE_PASSES / 2].max(f64::MIN_POSITIVE);
    Ok(probe.bytes() as f64 / median)
}

/// Wrapping sum of `words` with independent partial sums, so the loop is bound by loads
/// rather than by one chain of adds (integer addition is associative, so the compiler
/// vectorises it freely).
fn sum_words(words: &[u64]) -> u64 {
    let chunks = words.chunks_exact(8);
    let mut acc = [0u64; 8];
    let tail = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, &w| a.wrapping_add(w));
    for c in chunks {
        for (a, &w) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(w);
        }
    }
    acc.iter().fold(tail, |a, &w| a.wrapping_add(w))
}

/// Tokens per block of a [`DecodeBench`] cache: the block size the model runner uses (KIVI
/// layouts take the next multiple of their 32-token key block).
pub const BENCH_BLOCK_SIZE: usize = 16;

/// Bytes of K/V a [`DecodeBench`] holds at least, over as many layers as it takes (up to
/// [`BENCH_MAX_LAYERS`]): well above any last-level cache, so that steps read from memory
/// as a model's do.
pub const BENCH_MIN_CACHE_BYTES: u64 = 96 << 20;

/// Most layers a [`DecodeBench`] cycles through.
pub const BENCH_MAX_LAYERS: usize = 64;

/// One decode-attention step over a long cached sequence: a layer of `shape` with `tokens`
/// cached tokens of K/V in `dtype`, one query row, on a backend with its own pool of
/// `threads` threads.
///
/// A model's decode step walks through all its layers, so a layer's K/V has left the CPU
/// caches by the time the next step reads it. The bench does the same: it fills enough
/// identical layers to hold [`BENCH_MIN_CACHE_BYTES`] (at most [`BENCH_MAX_LAYERS`]) and
/// each step attends over the next layer in turn, so even a short context (SmolLM2 at 16k
/// tokens is 12.6 MB per layer in f16) is read from memory rather than from the last-level
/// cache.
///
/// The sequence occupies blocks `0..` in order, as a fresh cache hands them out. K, V and
/// the query are fixed pseudo-random values in [-1, 1).
pub struct DecodeBench {
    backend: CpuBackend,
    storage: CpuStorage,
    q: Tensor,
    batch: AttentionBatch,
    kv_bytes: u64,
    layers: usize,
    next_layer: AtomicUsize,
}

impl DecodeBench {
    /// Allocates and fills the cache; `shape`'s layer count is ignored (the bench uses as
    /// many layers as [`BENCH_MIN_CACHE_BYTES`] needs).
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for zero tokens or threads, a layout the backend does not
    /// store, or a cache that cannot be allocated.
    pub fn new(shape: ModelShape, dtype: KvDType, tokens: usize, threads: usize) -> Result<Self> {
        Self::with_queries(shape, dtype, tokens, 1, threads)
    }

    /// Like [`DecodeBench::new`], with the last `queries` of the `tokens` cached tokens as
    /// queries (causal by position): `queries == tokens` is a whole prefill's attention,
    /// measured in [`DecodeBench::flops_per_step`] rather than in bytes.
    ///
    /// # Errors
    /// As [`DecodeBench::new`]; [`KvError::InvalidArgument`] unless
    /// `1 <= queries <= tokens`.
    pub fn with_queries(
        shape: ModelShape,
        dtype: KvDType,
        tokens: usize,
        queries: usize,
        threads: usize,
    ) -> Result<Self> {
        Self::with_min_bytes(
            shape,
            dtype,
            tokens,
            queries,
            threads,
            BENCH_MIN_CACHE_BYTES,
        )
    }

    /// Like [`DecodeBench::with_queries`], holding at least `min_bytes` of K/V (over at most
    /// [`BENCH_MAX_LAYERS`] layers) instead of [`BENCH_MIN_CACHE_BYTES`]: a quick run that
    /// only proves a harness works can skip filling 96 MiB per point (its steps then read
    /// from the CPU caches).
    ///
    /// # Errors
    /// As [`DecodeBench::with_queries`].
    pub fn with_min_bytes(
        shape: ModelShape,
        dtype: KvDType,
        tokens: usize,
        queries: usize,
        threads: usize,
        min_bytes: u64,
    ) -> Result<Self> {
        if tokens == 0 {
            return Err(KvError::InvalidArgument {
                what: "bench tokens",
                detail: "a decode step needs at least one cached token".into(),
            });
        }
        let (kvh, d) = (shape.n_kv_heads(), shape.head_dim());
        let kv_bytes = 2 * (tokens * kvh) as u64 * dtype.row_bytes(d)? as u64;
        let layers = min_bytes
            .div_ceil(kv_bytes)
            .clamp(1, BENCH_MAX_LAYERS as u64) as usize;
        let shape = ModelShape::new(layers, shape.n_q_heads(), kvh, d)?;
        let backend = CpuBackend::with_threads(threads)?;
        let block_size = BENCH_BLOCK_SIZE.next_multiple_of(dtype.block_tokens());
        let blocks = tokens.div_ceil(block_size);
        let spec = StorageSpec::new(shape, dtype, block_size, blocks)?;
        let mut storage = backend.allocate(&spec)?;
        let mut rng = SplitMix(0x5EED);
        // Written a bounded number of tokens at a time, so the f32 staging tensors stay
        // small next to the cache itself.
        let step = (1 << 20) / (kvh * d).max(1) + 1;
        for start in (0..tokens).step_by(step) {
            let n = step.min(tokens - start);
            let slots: Vec<Slot> = (start..start + n)
                .map(|t| Slot {
                    block: BlockId::new((t / block_size) as u32),
                    offset: (t % block_size) as u32,
                })
                .collect();
            let k = rng.tensor(&[n, kvh, d])?;
            let v = rng.tensor(&[n, kvh, d])?;
            for layer in 0..layers {
                backend.write(&mut storage, layer, &slots, &k, &v)?;
            }
        }
        let table: Vec<BlockId> = (0..blocks as u32).map(BlockId::new).collect();
        // A residual layout keeps f16 copies of the last tokens only: settle the blocks
        // the first query is past, as a decoding `PagedCache` would have.
        let residual = dtype.residual_tokens();
        if residual > 0 {
            let past = tokens.saturating_sub(queries).saturating_sub(residual) / block_size;
            backend.settle_blocks(&mut storage, &table[..past.min(table.len())])?;
        }
        let batch = AttentionBatch::new(vec![SeqAttention::new(table, tokens, queries)?], d);
        let q = rng.tensor(&[queries, shape.n_q_heads(), d])?;
        Ok(Self {
            backend,
            storage,
            q,
            batch,
            kv_bytes,
            layers,
            next_layer: AtomicUsize::new(0),
        })
    }

    /// Bytes of K and V one step reads: every cached row of every KV head of one layer,
    /// once.
    pub fn kv_bytes_per_step(&self) -> u64 {
        self.kv_bytes
    }

    /// Floating-point operations of one step: a multiply and an add for each element of
    /// q.k and of the weighted sum of V, over every (query head, visible key) pair.
    pub fn flops_per_step(&self) -> u64 {
        let spec = self.storage.spec();
        let pairs: u64 = self
            .batch
            .seqs
            .iter()
            .map(|s| {
                let (first, n) = (s.first_query_position() as u64, s.n_queries() as u64);
                n * (first + 1) + n * (n - 1) / 2
            })
            .sum();
        4 * pairs * (spec.shape.n_q_heads() * spec.shape.head_dim()) as u64
    }

    /// Runs `f` on the bench's pool ([`CpuBackend::install`]), as a model's decode loop
    /// runs: steps called inside it take their tasks on the calling thread without a
    /// hand-over.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.backend.install(f)
    }

    /// Identical layers the bench cycles through.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Runs one attention step over the next layer; returns its output
    /// `[queries, q_heads, head_dim]` (the same for every layer).
    ///
    /// # Errors
    /// Whatever [`CacheBackend::attend`] answers (nothing, for a bench built by `new`).
    pub fn step(&self) -> Result<Tensor> {
        let layer = self.next_layer.fetch_add(1, Ordering::Relaxed) % self.layers;
        self.backend
            .attend(&self.storage, layer, &self.q, &self.batch)
    }

    /// Mean seconds per step over `steps` steps, after one untimed step, run on the bench's
    /// pool.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for zero steps; errors of [`DecodeBench::step`].
    pub fn time_steps(&self, steps: usize) -> Result<f64> {
        if steps == 0 {
            return Err(KvError::InvalidArgument {
                what: "bench steps",
                detail: "time at least one step".into(),
            });
        }
        // On a pool thread, as a model's decode loop runs (`CpuBackend::install`).
        self.install(|| {
            self.step()?;
            let start = Instant::now();
            for _ in 0..steps {
                std::hint::black_box(self.step()?);
            }
            Ok(start.elapsed().as_secs_f64() / steps as f64)
        })
    }
}

impl std::fmt::Debug for DecodeBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeBench")
            .field("spec", self.storage.spec())
            .field("tokens", &self.batch.seqs.first().map(SeqAttention::kv_len))
            .field("layers", &self.layers)
            .field("threads", &self.backend.threads())
            .field("kv_bytes_per_step", &self.kv_bytes)
            .finish()
    }
}

/// A small deterministic generator (SplitMix64) for bench data, so the crate needs no
/// random-number dependency.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 24 random bits to [-1, 1).
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn tensor(&mut self, dims: &[usize]) -> Result<Tensor> {
        let n = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.next_unit()).collect();
        Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
    }
}

/// Token ids for model benchmarks: a fixed pseudo-random sequence (SplitMix64) in
/// `1..vocab`, so that kv's bench program and the peers it is measured against feed the same
/// ids. Speed does not depend on which ids; a fixed sequence keeps runs comparable.
///
/// ```
/// let ids = kv_backend_cpu::bench::token_ids(4, 49_152);
/// assert_eq!(ids, kv_backend_cpu::bench::token_ids(4, 49_152));
/// assert!(ids.iter().all(|&t| (1..49_152).contains(&t)));
/// ```
pub fn token_ids(n: usize, vocab: usize) -> Vec<u32> {
    // At least ids 0 and 1, so the modulus below is never zero.
    let span = (vocab.max(2) - 1) as u64;
    let mut state = 0x5EED_u64;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (1 + z % span) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_refuses_what_it_cannot_measure() {
        assert!(matches!(
            memory_read_probe(1 << 20, 0),
            Err(KvError::InvalidArgument { .. })
        ));
        assert!(matches!(
            memory_read_probe(8, 2),
            Err(KvError::InvalidArgument { .. })
        ));
        assert!(memory_read_probe(1 << 16, 2).is_ok_and(|b| b.is_finite() && b > 0.0));
    }

    #[test]
    fn sum_words_is_the_wrapping_sum() {
        let w: Vec<u64> = (0..37u64).map(|i| i.wrapping_mul(u64::MAX / 7)).collect();
        let want = w.iter().fold(0u64, |a, &x| a.wrapping_add(x));
        assert_eq!(sum_words(&w), want);
    }

    #[test]
    fn decode_bench_counts_bytes_and_steps() -> Result<()> {
        let shape = ModelShape::new(4, 4, 2, 8)?;
        let b = DecodeBench::new(shape, KvDType::BF16, 40, 1)?;
        assert_eq!(b.kv_bytes_per_step(), 2 * 40 * 2 * 8 * 2);
        assert_eq!(b.layers(), BENCH_MAX_LAYERS);
        let long = DecodeBench::new(ModelShape::new(1, 1, 1, 64)?, KvDType::F32, 1 << 16, 1)?;
        assert_eq!(long.kv_bytes_per_step(), 32 << 20);
        assert_eq!(long.layers(), 3);
        // Every layer holds the same K/V, so every step answers the same.
        let first = b.step()?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(b.step()?.flatten_all()?.to_vec1::<f32>()?, first);
        // Fewer layers, the same data: the same answer.
        let small = DecodeBench::with_min_bytes(shape, KvDType::BF16, 40, 1, 1, 0)?;
        assert_eq!(small.layers(), 1);
        assert_eq!(small.step()?.flatten_all()?.to_vec1::<f32>()?, first);
        assert!(b.time_steps(2)? > 0.0);
        assert!(matches!(
            DecodeBench::new(shape, KvDType::F32, 0, 1),
            Err(KvError::InvalidArgument { .. })
        ));
        assert!(matches!(
            DecodeBench::with_queries(shape, KvDType::F32, 4, 5, 1),
            Err(KvError::InvalidArgument { .. })
        ));
        // 3 queries over 5 tokens see 3 + 4 + 5 keys; 4 heads of 8.
        let prefill = DecodeBench::with_queries(shape, KvDType::F32, 5, 3, 1)?;
        assert_eq!(prefill.flops_per_step(), 4 * 12 * 4 * 8);
        assert_eq!(prefill.step()?.dims(), &[3, 4, 8]);
        assert_eq!(b.flops_per_step(), 4 * 40 * 4 * 8);
        Ok(())
    }
}
