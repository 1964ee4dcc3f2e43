//! The sliding-window cache group of a [`crate::PagedCache`]: the layers of a model that
//! attend only to their last `W` tokens (Gemma 3's local layers) keep their K/V in a pool of
//! their own, whose sequences free their blocks wholly older than the window as it slides
//! (vLLM's hybrid allocator has the same two groups).
//!
//! Positions stay exact without any backend change: a sliding sequence drops whole leading
//! blocks ([`CacheManager::drop_front`]), so its cache indices are its positions minus the
//! tokens dropped, the same shift for queries and keys. Causality
//! (`key <= query`) and the window (`query - key < W`) compare differences, which the shift
//! leaves alone, and RoPE was applied by the model with the true positions before the write.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use kv_core::{CacheManager, KvError, ModelShape, Result, SeqId, Slot, StorageSpec};

/// Which layers of a model attend through a sliding window, and the pool their group gets.
///
/// ```
/// use std::num::NonZeroUsize;
/// use kv_attention::SlidingLayers;
/// let w = NonZeroUsize::new(512).unwrap();
/// // Gemma 3 270M: 18 layers, every sixth global.
/// let layers: Vec<bool> = (0..18).map(|l| l % 6 != 5).collect();
/// let blocks = SlidingLayers::blocks_per_sequence(w, 16, 1)?; // decoding one token a step
/// assert_eq!(blocks, 33); // 528 tokens: the window, rounded out to whole blocks
/// let sliding = SlidingLayers::new(w, layers, blocks)?;
/// assert_eq!((sliding.sliding_layers(), sliding.global_layers()), (15, 3));
/// # Ok::<(), kv_core::KvError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlidingLayers {
    window: NonZeroUsize,
    sliding: Vec<bool>,
    num_blocks: usize,
}

impl SlidingLayers {
    /// Layer `l` attends through a window of `window` tokens when `sliding[l]`; the sliding
    /// group's pool has `num_blocks` blocks (of the cache's block size).
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] when no layer or every layer slides (a cache of one
    /// group is a plain [`crate::PagedCache`]), or `num_blocks` is 0.
    pub fn new(window: NonZeroUsize, sliding: Vec<bool>, num_blocks: usize) -> Result<Self> {
        let n = sliding.iter().filter(|&&s| s).count();
        if n == 0 || n == sliding.len() {
            return Err(KvError::InvalidArgument {
                what: "sliding layers",
                detail: format!(
                    "{n} of {} layers slide; a cache with two groups needs both kinds",
                    sliding.len()
                ),
            });
        }
        if num_blocks == 0 {
            return Err(KvError::InvalidArgument {
                what: "sliding blocks",
                detail: "the sliding group's pool needs at least one block".into(),
            });
        }
        Ok(Self {
            window,
            sliding,
            num_blocks,
        })
    }

    /// The most blocks one sequence of the sliding group holds while it reserves at most
    /// `chunk` tokens a step (a decode step is 1, a prefill the prompt): the keys the first
    /// new query still reads (`W - 1` before it), the new tokens, and the partly filled
    /// blocks at both ends: `floor((chunk + W - 2) / block_size) + 2`. The pool for `S`
    /// sequences at once needs `S` times that (forks share theirs).
    ///
    /// # Errors
    /// [`KvError::InvalidArgument`] for a zero block size or chunk;
    /// [`KvError::Overflow`] when the sum overflows.
    pub fn blocks_per_sequence(
        window: NonZeroUsize,
        block_size: usize,
        chunk: usize,
    ) -> Result<usize> {
        if block_size == 0 || chunk == 0 {
            return Err(KvError::InvalidArgument {
                what: "sliding blocks",
                detail: format!("block size {block_size} and chunk {chunk} must be positive"),
            });
        }
        chunk
            .checked_add(window.get() - 1)
            .map(|t| (t - 1) / block_size)
            .and_then(|b| b.checked_add(2))
            .ok_or_else(|| KvError::Overflow {
                what: "sliding blocks",
                detail: format!("window {window} plus chunk {chunk}"),
            })
    }

    /// Blocks one sequence's sliding layers hold at `tokens` tokens when its last step
    /// added one token (decoding): every block from the one holding position
    /// `tokens - W` (the first key the last query read) on,
    /// `ceil(tokens / block_size) - floor((tokens - W) / block_size)`.
    /// [`crate::CacheUsage::sliding`] reports this many blocks after such a step.
    ///
    /// ```
    /// use std::num::NonZeroUsize;
    /// use kv_attention::SlidingLayers;
    /// let w = NonZeroUsize::new(512).unwrap();
    /// assert_eq!(SlidingLayers::blocks_held(w, 16, 100), 7); // all of them
    /// assert_eq!(SlidingLayers::blocks_held(w, 16, 32_768), 32);
    /// ```
    pub fn blocks_held(window: NonZeroUsize, block_size: usize, tokens: usize) -> usize {
        let bs = block_size.max(1);
        tokens.div_ceil(bs) - tokens.saturating_sub(window.get()) / bs
    }

    /// Tokens a sliding layer sees before the query.
    pub fn window(&self) -> NonZeroUsize {
        self.window
    }
    /// Whether layer `layer` slides (false past the last layer).
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding.get(layer).copied().unwrap_or(false)
    }
    /// Layers listed.
    pub fn layers(&self) -> usize {
        self.sliding.len()
    }
    /// Layers with the window.
    pub fn sliding_layers(&self) -> usize {
        self.sliding.iter().filter(|&&s| s).count()
    }
    /// Layers keeping every token.
    pub fn global_layers(&self) -> usize {
        self.layers() - self.sliding_layers()
    }
    /// Blocks of the sliding group's pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
}

/// Where a model layer's K/V lives: its group and its index among that group's layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Global(usize),
    Sliding(usize),
}

/// The sliding group's state inside a [`crate::PagedCache`].
pub(crate) struct Sliding<S> {
    pub(crate) config: SlidingLayers,
    /// Per model layer.
    pub(crate) places: Vec<Place>,
    /// The sliding layers' pools (`config.sliding_layers()` layers, `num_blocks` blocks).
    pub(crate) spec: StorageSpec,
    pub(crate) storage: S,
    pub(crate) manager: CacheManager,
    /// The sliding sequence of each sequence of the global group.
    pub(crate) seqs: HashMap<SeqId, SeqId>,
    /// Global slot -> (sequence, sliding slot) for the tokens of each sequence's last
    /// reserve: a write names its tokens by the slots `reserve` returned.
    pub(crate) slots: HashMap<Slot, (SeqId, Slot)>,
    /// The global slots of each sequence's last reserve (the keys it has in `slots`).
    pub(crate) reserved: HashMap<SeqId, Vec<Slot>>,
    /// Blocks let go of as windows slid, since the cache was made.
    pub(crate) freed_blocks: u64,
}

impl<S> Sliding<S> {
    /// The specs of the two groups' pools for a cache of `spec` (every layer) split as
    /// `config` says: (global, sliding).
    pub(crate) fn split(
        spec: &StorageSpec,
        config: &SlidingLayers,
    ) -> Result<(StorageSpec, StorageSpec)> {
        let shape = spec.shape;
        if config.layers() != shape.n_layers() {
            return Err(KvError::InvalidArgument {
                what: "sliding layers",
                detail: format!(
                    "{} layers listed for a model of {}",
                    config.layers(),
                    shape.n_layers()
                ),
            });
        }
        if spec.dtype.residual_tokens() > 0 {
            return Err(KvError::InvalidArgument {
                what: "sliding layers",
                detail: format!(
                    "layout {} keeps an f16 residual, which the sliding group does not settle",
                    spec.dtype.name()
                ),
            });
        }
        let group = |layers: usize, blocks: usize| -> Result<StorageSpec> {
            let shape = ModelShape::new(
                layers,
                shape.n_q_heads(),
                shape.n_kv_heads(),
                shape.head_dim(),
            )?;
            let s = StorageSpec::new(shape, spec.dtype, spec.block_size, blocks)?;
            s.bytes()?;
            Ok(s)
        };
        Ok((
            group(config.global_layers(), spec.num_blocks)?,
            group(config.sliding_layers(), config.num_blocks())?,
        ))
    }

    /// Places of every layer.
    pub(crate) fn places(config: &SlidingLayers) -> Vec<Place> {
        let (mut g, mut s) = (0, 0);
        (0..config.layers())
            .map(|l| {
                if config.is_sliding(l) {
                    s += 1;
                    Place::Sliding(s - 1)
                } else {
                    g += 1;
                    Place::Global(g - 1)
                }
            })
            .collect()
    }

    /// The sliding sequence of `seq`.
    pub(crate) fn seq(&self, seq: SeqId) -> Result<SeqId> {
        self.seqs
            .get(&seq)
            .copied()
            .ok_or(KvError::UnknownSequence { id: seq })
    }

    /// Lets `local` go of its blocks wholly before the first key a query at position
    /// `next` reads (`next + 1 - W`), committed or not: the manager keeps the hash chain
    /// across them ([`CacheManager::drop_front`]), so the blocks held stay indexable and
    /// a later prompt sharing the prefix finds them.
    pub(crate) fn slide(&mut self, local: SeqId, next: usize) -> Result<()> {
        let bs = self.spec.block_size;
        let evicted = self.manager.evicted_tokens(local)?;
        let first_read = (next + 1).saturating_sub(self.config.window.get());
        let drop = (first_read / bs).saturating_sub(evicted / bs);
        // One block at a time, front first: an indexed block let go of waits in the prefix
        // index's LRU queue, and this order makes the oldest positions leave it first. A
        // later prompt needs only the blocks its first query's window reads
        // (`PagedCache::create_with_prefix_salted`), the last ones of its prefix, so those
        // are kept longest.
        for _ in 0..drop {
            self.manager.drop_front(local, 1)?;
            self.freed_blocks += 1;
        }
        Ok(())
    }

    /// Forgets the slots of `seq`'s last reserve.
    pub(crate) fn forget_slots(&mut self, seq: SeqId) {
        for slot in self.reserved.remove(&seq).unwrap_or_default() {
            if self.slots.get(&slot).is_some_and(|&(s, _)| s == seq) {
                self.slots.remove(&slot);
            }
        }
    }

    /// Records the slots of `seq`'s new reserve (global and sliding, token by token).
    pub(crate) fn record_slots(&mut self, seq: SeqId, global: &[Slot], local: &[Slot]) {
        self.forget_slots(seq);
        for (&g, &l) in global.iter().zip(local) {
            self.slots.insert(g, (seq, l));
        }
        self.reserved.insert(seq, global.to_vec());
    }

    /// The sliding slots of the tokens `slots` (global slots of last reserves) name.
    pub(crate) fn translate(&self, slots: &[Slot]) -> Result<Vec<Slot>> {
        slots
            .iter()
            .map(|s| {
                self.slots
                    .get(s)
                    .map(|&(_, l)| l)
                    .ok_or_else(|| KvError::InvalidArgument {
                        what: "slots",
                        detail: format!(
                            "slot {}:{} was not handed out by a sequence's last reserve, so \
                             the sliding layers cannot place its token",
                            s.block, s.offset
                        ),
                    })
            })
            .collect()
    }
}
