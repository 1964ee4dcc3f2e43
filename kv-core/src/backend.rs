//! The trait a device implements to store K/V and attend over it.

use candle_core::{Device, Tensor};
use std::num::NonZeroUsize;

use crate::{memory, BlockId, KvDType, KvError, ModelShape, Result, Slot};

use crate::blocks::MAX_BLOCKS;

/// What a backend allocates: block pools for every layer, in one layout.
///
/// ```
/// use kv_core::{KvDType, ModelShape, StorageSpec};
/// let spec = StorageSpec::new(ModelShape::preset("smollm2-135m")?, KvDType::F16, 16, 512)?;
/// assert_eq!(spec.capacity_tokens(), 8192);
/// assert_eq!(spec.bytes()?, 180 << 20);
/// # Ok::<(), kv_core::KvError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSpec {
    /// Layers and heads.
    pub shape: ModelShape,
    /// Row layout.
    pub dtype: KvDType,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks per layer pool.
    pub num_blocks: usize,
}

impl StorageSpec {
    /// Starts a spec for `shape` in `dtype` whose sizes are named as they are set; the pool
    /// is sized by a block count or by a memory budget.
    ///
    /// ```
    /// use kv_core::{KvDType, ModelShape, StorageSpec};
    /// let shape = ModelShape::preset("smollm2-135m")?;
    /// let spec = StorageSpec::builder(shape, KvDType::F16).block_size(16).num_blocks(512).build()?;
    /// assert_eq!(spec.capacity_tokens(), 8192);
    /// let by_bytes = StorageSpec::builder(shape, KvDType::F16).memory_budget(180 << 20).build()?;
    /// assert_eq!(by_bytes, spec); // block size 16 unless set
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    pub fn builder(shape: ModelShape, dtype: KvDType) -> StorageSpecBuilder {
        StorageSpecBuilder {
            shape,
            dtype,
            block_size: None,
            size: None,
        }
    }

    /// Checks and builds a spec from positional sizes: tokens per block, then blocks.
    /// [`StorageSpec::builder`] names them.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for a zero block size or count, more blocks than block
    /// ids can number, more tokens per block than slot offsets can number, a layout that
    /// does not fit the head dimension, or a block size that is not a multiple of the
    /// layout's [`KvDType::block_tokens`] (32 for KIVI); [`KvError::Overflow`] when the
    /// capacity in tokens does not fit `usize` or in bytes does not fit `u64`.
    pub fn new(
        shape: ModelShape,
        dtype: KvDType,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(KvError::InvalidArgument {
                what: "storage spec",
                detail: format!(
                    "block size {block_size} and block count {num_blocks} must be at least 1"
                ),
            });
        }
        if num_blocks > MAX_BLOCKS {
            return Err(KvError::InvalidArgument {
                what: "block count",
                detail: format!(
                    "{num_blocks} blocks exceed the {MAX_BLOCKS} that block ids can number"
                ),
            });
        }
        if block_size > u32::MAX as usize {
            return Err(KvError::InvalidArgument {
                what: "block size",
                detail: format!("{block_size} tokens per block exceed the slot offsets' range"),
            });
        }
        dtype.row_bytes(shape.head_dim())?;
        if !block_size.is_multiple_of(dtype.block_tokens()) {
            return Err(KvError::InvalidArgument {
                what: "block size",
                detail: format!(
                    "the {dtype} layout quantizes keys over {} tokens, so blocks must hold a \
                     multiple of {} tokens, not {block_size}",
                    dtype.block_tokens(),
                    dtype.block_tokens()
                ),
            });
        }
        let spec = Self {
            shape,
            dtype,
            block_size,
            num_blocks,
        };
        // Both sizes are checked here, so that `capacity_tokens` of a spec built by `new`
        // is exact and `bytes` fails only for a hand-built spec.
        spec.bytes()?;
        Ok(spec)
    }

    /// The largest spec of `block_size`-token blocks whose [`StorageSpec::bytes`] fits in
    /// `budget_bytes`: size a cache by memory, as mistral.rs's `--pa-memory-mb` does,
    /// rather than by a block count.
    ///
    /// KIVI layouts need, on top, one f16 residual window per layer for each block being
    /// filled ([`memory::residual_window_bytes`]); leave room for them in the budget.
    ///
    /// ```
    /// use kv_core::{KvDType, ModelShape, StorageSpec};
    /// let shape = ModelShape::preset("smollm2-135m")?; // 23,040 bytes a token in f16
    /// let spec = StorageSpec::from_memory_budget(shape, KvDType::F16, 16, 512 << 20)?;
    /// assert_eq!(spec.num_blocks, 1456); // 16 tokens take 360 KiB; 1456 of them 511.9 MiB
    /// assert!(spec.bytes()? <= 512 << 20);
    /// // 100 KiB does not hold one block of 16 tokens.
    /// assert!(StorageSpec::from_memory_budget(shape, KvDType::F16, 16, 100 << 10).is_err());
    /// # Ok::<(), kv_core::KvError>(())
    /// ```
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when the budget does not hold one block, when it holds
    /// more blocks than block ids can number, and for what [`StorageSpec::new`] refuses.
    pub fn from_memory_budget(
        shape: ModelShape,
        dtype: KvDType,
        block_size: usize,
        budget_bytes: u64,
    ) -> Result<Self> {
        // Checks the block size and layout with one block before dividing by its size.
        let one = Self::new(shape, dtype, block_size, 1)?;
        let block_bytes = one.bytes()?;
        let blocks = budget_bytes.checked_div(block_bytes).unwrap_or(0);
        if blocks == 0 {
            return Err(KvError::InvalidArgument {
                what: "memory budget",
                detail: format!(
                    "{} holds no block: one block of {block_size} tokens takes {} in {dtype}",
                    memory::format_bytes(budget_bytes),
                    memory::format_bytes(block_bytes)
                ),
            });
        }
        let num_blocks = usize::try_from(blocks)
            .ok()
            .filter(|&n| n <= MAX_BLOCKS)
            .ok_or_else(|| KvError::InvalidArgument {
                what: "memory budget",
                detail: format!(
                    "{} holds {blocks} blocks of {block_size} tokens, more than the \
                     {MAX_BLOCKS} that block ids can number; use larger blocks",
                    memory::format_bytes(budget_bytes)
                ),
            })?;
        Self::new(shape, dtype, block_size, num_blocks)
    }

    /// Tokens the storage holds.
    ///
    /// Exact for every spec built by [`StorageSpec::new`], which refuses capacities that
    /// overflow `usize`. A spec built field by field is not checked: for one whose product
    /// overflows this answers `usize::MAX`, a capacity no allocation reaches, and
    /// [`StorageSpec::bytes`] reports the overflow.
    pub fn capacity_tokens(&self) -> usize {
        self.checked_capacity().unwrap_or(usize::MAX)
    }

    /// `block_size x num_blocks`, or the overflow error.
    fn checked_capacity(&self) -> Result<usize> {
        self.block_size
            .checked_mul(self.num_blocks)
            .ok_or_else(|| KvError::Overflow {
                what: "storage capacity",
                detail: format!(
                    "{} blocks of {} tokens is more than usize::MAX tokens",
                    self.num_blocks, self.block_size
                ),
            })
    }

    /// Bytes the storage holds, exactly [`memory::cache_bytes`] of its capacity.
    ///
    /// # Errors
    /// When the layout does not fit the head dimension; [`KvError::Overflow`] when the
    /// capacity in tokens or bytes does not fit its integer type.
    pub fn bytes(&self) -> Result<u64> {
        memory::cache_bytes(&self.shape, self.dtype, self.checked_capacity()?)
    }
}

/// Names the sizes of a [`StorageSpec`] as they are set; see [`StorageSpec::builder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageSpecBuilder {
    shape: ModelShape,
    dtype: KvDType,
    block_size: Option<usize>,
    size: Option<PoolSize>,
}

/// How a [`StorageSpecBuilder`] sizes the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolSize {
    Blocks(usize),
    Bytes(u64),
}

impl StorageSpecBuilder {
    /// Tokens per block. Unless set: 16, or the layout's [`KvDType::block_tokens`] when
    /// larger (32 for KIVI).
    pub fn block_size(self, tokens: usize) -> Self {
        Self {
            block_size: Some(tokens),
            ..self
        }
    }
    /// Blocks per layer pool (replaces a memory budget set before).
    pub fn num_blocks(self, blocks: usize) -> Self {
        Self {
            size: Some(PoolSize::Blocks(blocks)),
            ..self
        }
    }
    /// As many blocks as fit in `bytes` ([`StorageSpec::from_memory_budget`]; replaces a
    /// block count set before).
    pub fn memory_budget(self, bytes: u64) -> Self {
        Self {
            size: Some(PoolSize::Bytes(bytes)),
            ..self
        }
    }
    /// Checks and builds the spec.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when neither a block count nor a budget was set, and
    /// what [`StorageSpec::new`] or [`StorageSpec::from_memory_budget`] refuses.
    pub fn build(self) -> Result<StorageSpec> {
        let block_size = self
            .block_size
            .unwrap_or_else(|| 16usize.max(self.dtype.block_tokens()));
        match self.size {
            Some(PoolSize::Blocks(n)) => StorageSpec::new(self.shape, self.dtype, block_size, n),
            Some(PoolSize::Bytes(b)) => {
                StorageSpec::from_memory_budget(self.shape, self.dtype, block_size, b)
            }
            None => Err(KvError::InvalidArgument {
                what: "storage spec",
                detail: "set a block count (num_blocks) or a memory budget (memory_budget)".into(),
            }),
        }
    }
}

/// One sequence's part of an attention call: its blocks, its length, and how many of its
/// last tokens are queries (1 for decode, the new tokens for prefill).
///
/// Query `i` sits at position `kv_len - n_queries + i` and sees keys `0..=` its position
/// (causal by position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqAttention {
    blocks: Vec<BlockId>,
    kv_len: usize,
    n_queries: usize,
}

impl SeqAttention {
    /// Checks and builds one sequence's attention description.
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when `n_queries` is zero or exceeds `kv_len`.
    pub fn new(blocks: Vec<BlockId>, kv_len: usize, n_queries: usize) -> Result<Self> {
        if n_queries == 0 || n_queries > kv_len {
            return Err(KvError::InvalidArgument {
                what: "queries",
                detail: format!(
                    "{n_queries} queries over {kv_len} cached tokens; need 1..={kv_len}"
                ),
            });
        }
        Ok(Self {
            blocks,
            kv_len,
            n_queries,
        })
    }
    /// Blocks holding the sequence, in order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }
    /// Tokens of context, queries included.
    pub fn kv_len(&self) -> usize {
        self.kv_len
    }
    /// Query rows this sequence contributes.
    pub fn n_queries(&self) -> usize {
        self.n_queries
    }
    /// Position of the first query.
    pub fn first_query_position(&self) -> usize {
        self.kv_len - self.n_queries
    }
    /// Slot of cached token `index` (must be below `kv_len`).
    pub fn slot(&self, index: usize, block_size: usize) -> Option<Slot> {
        if index >= self.kv_len {
            return None;
        }
        let block = *self.blocks.get(index / block_size)?;
        Some(Slot {
            block,
            offset: (index % block_size) as u32,
        })
    }
}

/// Many sequences attended in one call: their query rows are concatenated in `seqs` order.
///
/// ```
/// use std::num::NonZeroUsize;
/// use kv_core::{AttentionBatch, BlockId, SeqAttention};
///
/// let seq = SeqAttention::new(vec![BlockId::new(0)], 10, 1)?;
/// // A sliding-window layer (Gemma 3's local layers): the query at position 9 sees 7..=9.
/// let batch = AttentionBatch::new(vec![seq], 64).with_window(NonZeroUsize::new(3).unwrap());
/// assert_eq!(batch.first_visible_key(9), 7);
/// assert_eq!(batch.first_visible_key(1), 0);
/// # Ok::<(), kv_core::KvError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionBatch {
    /// Sequences in query-row order.
    pub seqs: Vec<SeqAttention>,
    /// Multiplies q.k before the softmax, usually `1 / sqrt(head_dim)`.
    pub scale: f32,
    /// A sliding window of `W` tokens: the query at position `p` sees only the keys at
    /// positions `p - W + 1 ..= p` (`(p - W, p]`, as llama.cpp's standard SWA mask and
    /// Gemma 3's local layers define it). `None`: every earlier key (global attention).
    pub window: Option<NonZeroUsize>,
}

impl AttentionBatch {
    /// A batch with the usual `1 / sqrt(head_dim)` scale and no window.
    pub fn new(seqs: Vec<SeqAttention>, head_dim: usize) -> Self {
        Self {
            seqs,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: None,
        }
    }

    /// The same batch attending through a sliding window of `window` tokens (see
    /// [`AttentionBatch::window`]).
    pub fn with_window(mut self, window: NonZeroUsize) -> Self {
        self.window = Some(window);
        self
    }

    /// The first key position a query at `position` sees: 0 without a window,
    /// `position + 1 - W` (at least 0) with one. Keys `first_visible_key(p)..=p` are visible.
    pub fn first_visible_key(&self, position: usize) -> usize {
        match self.window {
            None => 0,
            Some(w) => position.saturating_add(1).saturating_sub(w.get()),
        }
    }
    /// Query rows over all sequences.
    pub fn total_queries(&self) -> usize {
        self.seqs.iter().map(SeqAttention::n_queries).sum()
    }
    /// Checks that the batch fits the storage: a finite scale, and for every sequence blocks
    /// that exist and cover its length. Every backend's `attend` runs this (through
    /// [`crate::validate::attend`]) before reading a block.
    ///
    /// # Errors
    /// [`KvError::NonFinite`] for the scale; [`KvError::InvalidArgument`] (blocks that do
    /// not cover a sequence) or [`KvError::OutOfRange`] (a block past the end) naming the
    /// first offender.
    pub fn validate(&self, spec: &StorageSpec) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(KvError::NonFinite {
                what: "attention scale",
            });
        }
        for (i, s) in self.seqs.iter().enumerate() {
            let held = s.blocks.len().saturating_mul(spec.block_size);
            if held < s.kv_len {
                return Err(KvError::InvalidArgument {
                    what: "attention batch",
                    detail: format!(
                        "sequence {i} has {} tokens but {} blocks of {} hold only {held}",
                        s.kv_len,
                        s.blocks.len(),
                        spec.block_size,
                    ),
                });
            }
            if let Some(&b) = s.blocks.iter().find(|&&b| b.index() >= spec.num_blocks) {
                return Err(KvError::OutOfRange {
                    what: "block",
                    index: b.index(),
                    len: spec.num_blocks,
                });
            }
        }
        Ok(())
    }
}

/// A device that stores K/V rows in block pools and computes attention over them.
///
/// The [`crate::CacheManager`] decides where tokens go; a backend only stores and computes.
/// Implementors prove themselves with `kv_attention::conformance::check`, which checks every
/// rule below; `kv-attention/examples/custom_backend.rs` is a complete backend in about 200
/// lines that passes it.
///
/// # The contract
///
/// **Storage.** [`allocate`](Self::allocate) builds pools for every layer of
/// [`StorageSpec::shape`], [`StorageSpec::num_blocks`] blocks of
/// [`StorageSpec::block_size`] token slots each, for K and for V, reading back as zero.
/// Token slot `(block, offset)` of a layer holds one K row and one V row of
/// `kv_heads x head_dim` elements, in the spec's [`KvDType`].
///
/// **Tensors.** Every tensor passed in or returned lives on [`device`](Self::device). K and
/// V are `[tokens, kv_heads, head_dim]`, queries and outputs `[tokens, q_heads, head_dim]`.
/// Inputs may have any float dtype (f32, f16, bf16, f64) and any strides (a transposed or
/// narrowed view, K and V as views of one fused projection): a backend converts, it does not
/// refuse. Outputs are contiguous f32.
///
/// **Heads.** Query head `h` reads KV head `h / (q_heads / kv_heads)`: with 6 query heads
/// over 2 KV heads, heads 0-2 read KV head 0 and heads 3-5 read KV head 1 (the layout of
/// Llama's and candle-transformers' `repeat_kv`). MHA (one KV head per query head) and MQA
/// (one KV head) are the two ends of the same rule.
///
/// **Positions.** In an [`AttentionBatch`], query `i` of a sequence with `kv_len` tokens
/// and `n_queries` queries sits at position `kv_len - n_queries + i` and sees the keys at
/// positions `0..=` its own (causal by position), softmax-weighted with scores
/// `scale * q . k`. A query's own token is visible: write a step's K/V before attending.
/// With a [`window`](AttentionBatch::window) of `W` tokens the query at `p` sees only
/// positions `p - W + 1 ..= p` ([`AttentionBatch::first_visible_key`]); keys before them
/// weigh exactly nothing (not a large negative score), and a backend need not read them.
///
/// **Errors and atomicity.** A call that fails returns the [`KvError`] variant listed under
/// its method and changes nothing: a bad slot, move or value after good ones must not leave
/// the good ones written. [`crate::validate`] performs every check that does not depend on
/// the values, with the variants below; call it first.
///
/// **Provided methods.** Only [`attend`](Self::attend) has a default: plain f64 attention
/// over what [`read`](Self::read) returns ([`crate::reference::attend_by_reading`]), exact
/// for the float and per-row quantized layouts and slow. It lets a backend that only stores
/// pass the conformance suite before it has kernels; override it for speed, and for any
/// layout whose attention must see something other than `read`'s rows (KIVI).
pub trait CacheBackend: Send + Sync {
    /// Block pools for all layers in one layout, resident on this backend's device.
    type Storage: Send + Sync;

    /// Short name for messages and reports.
    fn name(&self) -> &str;

    /// Where tensors passed in and returned live.
    fn device(&self) -> &Device;

    /// Whether this backend stores `dtype`. For a layout it does not, `allocate` answers
    /// [`KvError::Unsupported`] (the conformance suite then skips the layout and says why).
    fn supports(&self, dtype: KvDType) -> bool;

    /// Allocates pools for `spec` that read back as zero everywhere.
    ///
    /// # Errors
    /// [`KvError::Unsupported`] for a layout [`supports`](Self::supports) denies;
    /// [`KvError::BackendUnavailable`] or a tensor error when the memory cannot be had.
    fn allocate(&self, spec: &StorageSpec) -> Result<Self::Storage>;

    /// The spec `storage` was allocated with (the same value, not a recomputed one).
    fn spec<'a>(&self, storage: &'a Self::Storage) -> &'a StorageSpec;

    /// Stores row `i` of K and V (`[slots.len(), kv_heads, head_dim]`, any float dtype, any
    /// strides) of `layer` into `slots[i]`, converting (or quantizing) to the storage
    /// layout. A slot written before is overwritten; other slots and layers are untouched.
    /// An empty `slots` with `[0, kv_heads, head_dim]` tensors is a no-op.
    ///
    /// # Errors
    /// Nothing is written on error.
    /// - [`KvError::OutOfRange`]: `layer`, a slot's block or a slot's offset past the end;
    /// - [`KvError::ShapeMismatch`]: K or V not `[slots.len(), kv_heads, head_dim]`;
    /// - [`KvError::InvalidArgument`]: a tensor on another device or of an integer dtype;
    ///   a finite value the layout cannot hold (f16 stops at 65504);
    /// - [`KvError::NonFinite`]: NaN or infinity anywhere in K or V.
    fn write(
        &self,
        storage: &mut Self::Storage,
        layer: usize,
        slots: &[Slot],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()>;

    /// Attention of `q` (`[batch.total_queries(), q_heads, head_dim]`, the queries of
    /// `batch.seqs` concatenated in order) over the cached K/V of `layer`; returns the same
    /// shape as `q`, in f32. See the contract above for head mapping and positions.
    ///
    /// The batch comes from the caller and must be validated against the storage before
    /// any block is read ([`crate::validate::attend`] does all of it).
    ///
    /// Provided: [`crate::reference::attend_by_reading`], f64 attention over what
    /// [`read`](Self::read) returns.
    ///
    /// # Errors
    /// - [`KvError::OutOfRange`]: `layer` or a block of the batch past the end;
    /// - [`KvError::InvalidArgument`]: a sequence whose blocks hold fewer than its `kv_len`
    ///   tokens; `q` on another device or of an integer dtype;
    /// - [`KvError::ShapeMismatch`]: `q` not `[total_queries, q_heads, head_dim]`;
    /// - [`KvError::NonFinite`]: a non-finite scale, or NaN or infinity in `q`.
    fn attend(
        &self,
        storage: &Self::Storage,
        layer: usize,
        q: &Tensor,
        batch: &AttentionBatch,
    ) -> Result<Tensor> {
        crate::reference::attend_by_reading(self, storage, layer, q, batch)
    }

    /// Copies whole blocks, every layer, K and V (copy-on-write of forked sequences).
    ///
    /// Moves are `(from, to)` and apply one after another in the order given, as a loop
    /// of single-block copies would: a chain `[(1, 2), (2, 3)]` leaves block 1's rows in
    /// both 2 and 3; one source may be copied to many targets; `(b, b)` changes nothing.
    /// Blocks not named as a target keep their rows. The [`crate::CacheManager`] only asks
    /// for copies into fresh blocks, but a backend must not rely on that.
    ///
    /// # Errors
    /// [`KvError::OutOfRange`] for a block past the end, in any move; nothing is copied then.
    fn copy_blocks(&self, storage: &mut Self::Storage, moves: &[(BlockId, BlockId)]) -> Result<()>;

    /// Tells the backend that every token of `blocks` is now at least
    /// [`KvDType::residual_tokens`] behind every query still to come of every sequence
    /// holding them, in every layer: the f16 copies a residual layout (`kivi2-r128`) keeps
    /// of them may go. From then on they read as stored, quantized, also for a query a
    /// later truncate moves back within `R` of them.
    ///
    /// The residual contract: a query at position `p` reads the keys of a 32-token block
    /// ending at `e` in f16 while `p < e + R` and the values of a token `t` in f16 while
    /// `p < t + R`, everything else quantized, as long as the block has not been settled.
    /// So a prefill computes what decoding the same tokens one by one does. A caller settles
    /// a block only once no query still to come needs it in f16 (`kv_attention::PagedCache`
    /// does it when it reserves the next tokens); a backend without windows ignores it.
    ///
    /// Provided: does nothing (a backend that keeps no f16 copies has nothing to drop).
    ///
    /// # Errors
    /// [`KvError::OutOfRange`] for a block past the end; nothing changes then.
    fn settle_blocks(&self, storage: &mut Self::Storage, blocks: &[BlockId]) -> Result<()> {
        crate::validate::blocks(self.spec(storage), blocks)
    }

    /// K and V of `layer` at `slots`, as stored (dequantized) in f32
    /// `[slots.len(), kv_heads, head_dim]`: for tests, export, persistence and the provided
    /// [`attend`](Self::attend). Slots may repeat and come in any order.
    ///
    /// # Errors
    /// [`KvError::OutOfRange`]: `layer`, a slot's block or a slot's offset past the end.
    fn read(
        &self,
        storage: &Self::Storage,
        layer: usize,
        slots: &[Slot],
    ) -> Result<(Tensor, Tensor)>;

    /// Whether [`export_block`](Self::export_block) and
    /// [`import_block`](Self::import_block) work on this backend (ask before saving a cache).
    fn supports_block_bytes(&self) -> bool {
        false
    }

    /// Appends the bytes of `block` (every layer, K and V, and any per-block state the
    /// layout keeps, such as a KIVI key block's f16 window) exactly as stored to `out`, so
    /// that [`import_block`](Self::import_block) on a storage of the same spec restores it
    /// bit for bit: quantized layouts stay quantized and are never re-quantized. The byte
    /// order is the backend's own; files and tiers keep it opaque and tag it with the
    /// backend's name and spec.
    ///
    /// Provided: [`KvError::Unsupported`], so backends without it keep compiling.
    ///
    /// # Errors
    /// [`KvError::OutOfRange`] for a block past the end (nothing appended);
    /// [`KvError::Unsupported`] where the backend cannot export.
    fn export_block(
        &self,
        storage: &Self::Storage,
        block: BlockId,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let _ = (storage, block, out);
        Err(KvError::Unsupported {
            backend: self.name().to_string(),
            what: "block export".into(),
        })
    }

    /// Overwrites `block` (every layer, K and V) with `bytes` from
    /// [`export_block`](Self::export_block) of a storage with the same spec.
    ///
    /// Provided: [`KvError::Unsupported`].
    ///
    /// # Errors
    /// Nothing is changed on error. [`KvError::OutOfRange`] for a block past the end;
    /// [`KvError::ShapeMismatch`] when `bytes` is not one block's export for this spec;
    /// [`KvError::InvalidArgument`] or [`KvError::NonFinite`] for bytes no export writes
    /// (a bad window flag, stored values that decode to NaN or infinity);
    /// [`KvError::Unsupported`] where the backend cannot import.
    fn import_block(
        &self,
        storage: &mut Self::Storage,
        block: BlockId,
        bytes: &[u8],
    ) -> Result<()> {
        let _ = (storage, block, bytes);
        Err(KvError::Unsupported {
            backend: self.name().to_string(),
            what: "block import".into(),
        })
    }
}

macro_rules! forward_backend {
    ($($ty:ty),*) => {$(
        impl<B: CacheBackend + ?Sized> CacheBackend for $ty {
            type Storage = B::Storage;
            fn name(&self) -> &str { (**self).name() }
            fn device(&self) -> &Device { (**self).device() }
            fn supports(&self, dtype: KvDType) -> bool { (**self).supports(dtype) }
            fn allocate(&self, spec: &StorageSpec) -> Result<Self::Storage> { (**self).allocate(spec) }
            fn spec<'a>(&self, storage: &'a Self::Storage) -> &'a StorageSpec { (**self).spec(storage) }
            fn write(&self, storage: &mut Self::Storage, layer: usize, slots: &[Slot], k: &Tensor, v: &Tensor) -> Result<()> {
                (**self).write(storage, layer, slots, k, v)
            }
            fn attend(&self, storage: &Self::Storage, layer: usize, q: &Tensor, batch: &AttentionBatch) -> Result<Tensor> {
                (**self).attend(storage, layer, q, batch)
            }
            fn copy_blocks(&self, storage: &mut Self::Storage, moves: &[(BlockId, BlockId)]) -> Result<()> {
                (**self).copy_blocks(storage, moves)
            }
            fn settle_blocks(&self, storage: &mut Self::Storage, blocks: &[BlockId]) -> Result<()> {
                (**self).settle_blocks(storage, blocks)
            }
            fn read(&self, storage: &Self::Storage, layer: usize, slots: &[Slot]) -> Result<(Tensor, Tensor)> {
                (**self).read(storage, layer, slots)
            }
            fn supports_block_bytes(&self) -> bool { (**self).supports_block_bytes() }
            fn export_block(&self, storage: &Self::Storage, block: BlockId, out: &mut Vec<u8>) -> Result<()> {
                (**self).export_block(storage, block, out)
            }
            fn import_block(&self, storage: &mut Self::Storage, block: BlockId, bytes: &[u8]) -> Result<()> {
                (**self).import_block(storage, block, bytes)
            }
        }
    )*};
}

forward_backend!(&B, Box<B>, std::sync::Arc<B>);
