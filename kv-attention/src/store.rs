//! Tiers of cache blocks beyond the device: host memory and local disk, keyed by content
//! address ([`kv_core::content::block_key`]).
//!
//! A [`BlockStore`] keeps opaque values by [`BlockKey`]; [`TieredCache`] stores each block as
//! a [`cache_file::encode_value`] (fingerprint, key, checksum, bytes), so a value from
//! another model, a wrong key or a flipped bit is detected when it is read and the block is
//! recomputed instead. A store that fails (a full disk, a server gone) costs only the
//! prefill it would have saved: [`TieredCache`] counts the error and goes on.
//!
//! ```
//! use kv_attention::store::{BlockStore, HostStore};
//! use kv_core::content::BlockKey;
//! let mut host = HostStore::new(1 << 20);
//! host.put(&BlockKey([1; 16]), b"block bytes")?;
//! assert_eq!(host.get(&BlockKey([1; 16]))?.as_deref(), Some(&b"block bytes"[..]));
//! assert!(!host.contains(&BlockKey([2; 16]))?);
//! # Ok::<(), kv_attention::store::StoreError>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kv_core::content::{chain_keys, BlockKey, Fingerprint};
use kv_core::{BlockId, CacheBackend, Preempted, SeqId, Slot};

use crate::cache_file::{self, CacheFileError};
use crate::paged::Group;
use crate::PagedCache;

/// Why a store operation failed. The store is unchanged by a failed `put` or `delete`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A value larger than the store's whole budget.
    #[error("a value of {size} bytes does not fit the {store} store's budget of {budget} bytes")]
    TooLarge {
        /// The store's name.
        store: String,
        /// Bytes of the value.
        size: u64,
        /// The budget.
        budget: u64,
    },
    /// Reading or writing a file failed (a full disk: nothing half-written is visible).
    #[error(transparent)]
    File(#[from] CacheFileError),
    /// The disk (or a size limit: a quota, `RLIMIT_FSIZE`) had no room for a value. The
    /// value was not stored, nothing else was evicted, and no part of it is visible.
    #[error("the {store} store has no room for a value of {size} bytes at {path}: {source}")]
    Full {
        /// The store's name.
        store: String,
        /// Bytes of the value.
        size: u64,
        /// The file that could not be written.
        path: PathBuf,
        /// The system's error (ENOSPC, EFBIG, EDQUOT).
        source: std::io::Error,
    },
    /// A directory operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// The store cannot be reached (a server down or gone).
    #[error("store {store} unavailable: {reason}")]
    Unavailable {
        /// The store's name.
        store: String,
        /// Why.
        reason: String,
    },
}

/// Key-value storage of block values, with batched forms that a remote store overrides
/// (one round trip for many keys). Values are opaque bytes.
pub trait BlockStore: Send {
    /// Short name for reports.
    fn name(&self) -> &str;
    /// The value under `key`, if any.
    ///
    /// # Errors
    /// When the store cannot be read.
    fn get(&mut self, key: &BlockKey) -> Result<Option<Vec<u8>>, StoreError>;
    /// Stores `value` under `key`, replacing any value there; may evict others to stay
    /// within a budget.
    ///
    /// # Errors
    /// [`StoreError::TooLarge`]; when the store cannot be written (nothing changed then).
    fn put(&mut self, key: &BlockKey, value: &[u8]) -> Result<(), StoreError>;
    /// Whether a value is stored under `key`.
    ///
    /// # Errors
    /// When the store cannot be read.
    fn contains(&mut self, key: &BlockKey) -> Result<bool, StoreError>;
    /// Removes `key`'s value; answers whether there was one.
    ///
    /// # Errors
    /// When the store cannot be written.
    fn delete(&mut self, key: &BlockKey) -> Result<bool, StoreError>;
    /// [`get`](Self::get) for many keys, answers in order.
    ///
    /// # Errors
    /// The first failure.
    fn get_many(&mut self, keys: &[BlockKey]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    /// [`put`](Self::put) for many values, in order.
    ///
    /// # Errors
    /// The first failure (the values before it are stored).
    fn put_many(&mut self, items: &[(BlockKey, Vec<u8>)]) -> Result<(), StoreError> {
        items.iter().try_for_each(|(k, v)| self.put(k, v))
    }
    /// [`contains`](Self::contains) for many keys, answers in order.
    ///
    /// # Errors
    /// The first failure.
    fn contains_many(&mut self, keys: &[BlockKey]) -> Result<Vec<bool>, StoreError> {
        keys.iter().map(|k| self.contains(k)).collect()
    }
}

/// Least-recently-used bookkeeping under a byte budget, shared by the host and disk stores.
#[derive(Debug, Default)]
struct Lru {
    /// Size and last-use tick of each key.
    entries: HashMap<BlockKey, (u64, u64)>,
    by_tick: BTreeMap<u64, BlockKey>,
    clock: u64,
    bytes: u64,
}

impl Lru {
    fn touch(&mut self, key: &BlockKey) {
        if let Some((_, tick)) = self.entries.get_mut(key) {
            self.by_tick.remove(tick);
            *tick = self.clock;
            self.by_tick.insert(self.clock, *key);
            self.clock += 1;
        }
    }
    fn insert(&mut self, key: BlockKey, size: u64) {
        self.remove(&key);
        self.entries.insert(key, (size, self.clock));
        self.by_tick.insert(self.clock, key);
        self.clock += 1;
        self.bytes += size;
    }
    fn remove(&mut self, key: &BlockKey) -> bool {
        match self.entries.remove(key) {
            Some((size, tick)) => {
                self.by_tick.remove(&tick);
                self.bytes -= size;
                true
            }
            None => false,
        }
    }
    /// Keys to evict, oldest first, so that `extra` more bytes fit in `budget` (`key`
    /// itself, about to be replaced, is not counted).
    fn victims(&self, key: &BlockKey, extra: u64, budget: u64) -> Vec<BlockKey> {
        let mut bytes = self.bytes - self.entries.get(key).map_or(0, |e| e.0);
        let mut out = Vec::new();
        for k in self.by_tick.values() {
            if bytes + extra <= budget {
                break;
            }
            if k != key {
                bytes -= self.entries.get(k).map_or(0, |e| e.0);
                out.push(*k);
            }
        }
        out
    }
}

/// Blocks in host memory, least recently used evicted first under a byte budget.
#[derive(Debug)]
pub struct HostStore {
    budget: u64,
    values: HashMap<BlockKey, Vec<u8>>,
    lru: Lru,
}

impl HostStore {
    /// An empty store that holds at most `budget` bytes of values.
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            values: HashMap::new(),
            lru: Lru::default(),
        }
    }
    /// Bytes of values held.
    pub fn bytes(&self) -> u64 {
        self.lru.bytes
    }
    /// Values held.
    pub fn len(&self) -> usize {
        self.values.len()
    }
    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
    /// The keys held, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &BlockKey> + '_ {
        self.values.keys()
    }
}

impl BlockStore for HostStore {
    fn name(&self) -> &str {
        "host"
    }
    fn get(&mut self, key: &BlockKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.lru.touch(key);
        Ok(self.values.get(key).cloned())
    }
    fn put(&mut self, key: &BlockKey, value: &[u8]) -> Result<(), StoreError> {
        let size = value.len() as u64;
        if size > self.budget {
            return Err(StoreError::TooLarge {
                store: "host".into(),
                size,
                budget: self.budget,
            });
        }
        for victim in self.lru.victims(key, size, self.budget) {
            self.lru.remove(&victim);
            self.values.remove(&victim);
        }
        self.values.insert(*key, value.to_vec());
        self.lru.insert(*key, size);
        Ok(())
    }
    fn contains(&mut self, key: &BlockKey) -> Result<bool, StoreError> {
        Ok(self.values.contains_key(key))
    }
    fn delete(&mut self, key: &BlockKey) -> Result<bool, StoreError> {
        self.lru.remove(key);
        Ok(self.values.remove(key).is_some())
    }
}

/// Blocks as files in a directory (`<key>.kvb`), least recently used deleted first under a
/// byte budget. Files are written atomically ([`cache_file::write_atomic`]), so a crash
/// leaves whole values or none; temporary files a crash left behind are removed when the
/// store opens. Reads go through a memory map.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
    budget: u64,
    lru: Lru,
}

const EXT: &str = "kvb";

impl DiskStore {
    /// Opens (creating it if needed) the store in `dir`, indexing the values already there
    /// (oldest modification first in the LRU order) and removing leftover temporary files.
    /// Values beyond the budget are deleted, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directory cannot be created or listed.
    pub fn open(dir: &Path, budget: u64) -> Result<Self, StoreError> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { op, path, source }
        };
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io("list", dir))? {
            let entry = entry.map_err(io("list", dir))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp-") {
                // A write that a crash interrupted: never visible, now gone.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(key) = name
                .strip_suffix(&format!(".{EXT}"))
                .and_then(|hex| hex.parse::<BlockKey>().ok())
            else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                let modified = meta.modified().ok();
                found.push((modified, key, meta.len()));
            }
        }
        found.sort();
        let mut store = Self {
            dir: dir.to_path_buf(),
            budget,
            lru: Lru::default(),
        };
        for (_, key, size) in found {
            store.lru.insert(key, size);
        }
        let over: Vec<BlockKey> = store.lru.victims(&BlockKey([0; 16]), 0, budget);
        for key in over {
            store.remove_file(&key)?;
        }
        Ok(store)
    }

    fn path(&self, key: &BlockKey) -> PathBuf {
        self.dir.join(format!("{key}.{EXT}"))
    }

    fn remove_file(&mut self, key: &BlockKey) -> Result<bool, StoreError> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(StoreError::Io {
                    op: "remove",
                    path,
                    source,
                })
            }
        }
        Ok(self.lru.remove(key))
    }

    /// Bytes of values held.
    pub fn bytes(&self) -> u64 {
        self.lru.bytes
    }
}

impl BlockStore for DiskStore {
    fn name(&self) -> &str {
        "disk"
    }
    fn get(&mut self, key: &BlockKey) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.path(key);
        match cache_file::read_mapped(&path) {
            Ok(bytes) => {
                self.lru.touch(key);
                Ok(Some(bytes))
            }
            Err(CacheFileError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                // Deleted by another process sharing the directory: forget it.
                self.lru.remove(key);
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
    fn put(&mut self, key: &BlockKey, value: &[u8]) -> Result<(), StoreError> {
        let size = value.len() as u64;
        if size > self.budget {
            return Err(StoreError::TooLarge {
                store: "disk".into(),
                size,
                budget: self.budget,
            });
        }
        // Written first: a failed write (a full disk) evicts nothing and shows nothing
        // (`write_atomic` removes its temporary file).
        cache_file::write_atomic(&self.path(key), value).map_err(|e| match e {
            CacheFileError::Io { path, source, .. } if is_no_room(&source) => StoreError::Full {
                store: "disk".into(),
                size,
                path,
                source,
            },
            e => e.into(),
        })?;
        for victim in self.lru.victims(key, size, self.budget) {
            self.remove_file(&victim)?;
        }
        self.lru.insert(*key, size);
        Ok(())
    }
    fn contains(&mut self, key: &BlockKey) -> Result<bool, StoreError> {
        Ok(self.lru.entries.contains_key(key) && self.path(key).is_file())
    }
    fn delete(&mut self, key: &BlockKey) -> Result<bool, StoreError> {
        self.remove_file(key)
    }
}

/// Whether `e` says a file could not grow: no space, a file size limit, a quota.
fn is_no_room(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::StorageFull | ErrorKind::FileTooLarge | ErrorKind::QuotaExceeded
    )
}

/// A run of consecutive stored blocks of one cache group a restore brings in: the group,
/// its first block, and the tier, key and value of each.
type StagedRun = (Group, usize, Vec<(usize, BlockKey, Vec<u8>)>);

/// What the tiers did for a [`TieredCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    /// Blocks found in a tier and restored.
    pub hits: u64,
    /// Blocks looked for in the tiers and not found (then prefilled).
    pub misses: u64,
    /// Tokens restored from the tiers instead of prefilled.
    pub tokens_loaded: u64,
    /// Bytes read from the tiers (values restored).
    pub bytes_loaded: u64,
    /// Bytes written to the tiers.
    pub bytes_saved: u64,
    /// Values refused when read: another model, another key, a bad checksum, bytes the
    /// backend would not import. Each was deleted from its tier and recomputed.
    pub rejected: u64,
    /// Store operations that failed (a store down, a full disk); the cache went on.
    pub store_errors: u64,
    /// Blocks copied down to the first tier when the device evicted them (or at
    /// [`TieredCache::flush`]).
    pub blocks_spilled: u64,
    /// Blocks a tier was not asked for because prefilling them was estimated cheaper
    /// (see [`TieredCache`]'s restore rule).
    pub restores_skipped: u64,
    /// On a cache with a sliding-window group: sliding-group blocks restored (each beside
    /// the global blocks counted in `hits`; [`TieredCache`]'s "Two cache groups").
    pub window_blocks_loaded: u64,
    /// On a cache with a sliding-window group: bytes of `bytes_saved` that hold
    /// sliding-group blocks.
    pub window_bytes_saved: u64,
}

/// A cached device block whose content address is known: noted when its sequence was freed
/// or preempted, copied down a tier when the device evicts it.
#[derive(Debug, Clone, Copy)]
struct Noted {
    /// The chain hash the device's prefix index held it under then; a different one now
    /// means the block was evicted and reused.
    hash: u128,
    key: BlockKey,
}

/// A [`PagedCache`] backed by tiers: on a prefix miss in device memory it restores the
/// following full blocks from the first tier that has them before anything is prefilled,
/// and [`TieredCache::save`] writes a sequence's full blocks to every tier.
///
/// # Writing down
/// Blocks reach the tiers three ways: [`save`](Self::save) (write-through, every tier);
/// eviction: a sequence freed or preempted through [`free`](Self::free) or
/// [`preempt`](Self::preempt) leaves its full blocks cached on the device, and when an
/// allocation through [`reserve`](Self::reserve) (or [`make_room`](Self::make_room) before
/// one) is about to evict them they are copied down to the *first* tier (write-back); and
/// [`flush`](Self::flush), which copies down every such block still on the device. A
/// preempted sequence resumes with [`create_with_prefix`](Self::create_with_prefix) on its
/// tokens: what the device still caches is reused, what was evicted comes back from the
/// tier, the rest is recomputed.
///
/// # The restore rule
/// A run of `n` blocks is read from tier `t` only when reading is estimated cheaper than
/// prefilling: `n * block_bytes / read_rate(t) <= n * block_size / prefill_rate`, where
/// `read_rate(t)` is the tier's measured bytes per second over the reads that returned
/// values so far (round trips included) and `prefill_rate` the caller's measured prefill
/// tokens per second ([`set_prefill_rate`](Self::set_prefill_rate)). Until both are known the
/// blocks are read (that is how the rate gets measured). On a CPU, prefill costs
/// milliseconds per token and every tier wins; a fast GPU with a slow shared store is where
/// recomputing wins. Skipped blocks are counted in [`TierStats::restores_skipped`].
///
/// # Two cache groups
/// On a cache with a sliding-window group ([`PagedCache::with_sliding_window`]) a block of
/// each group is its own value, under its own key: the chain keys of the block's tokens
/// with a fingerprint of the model's and the group's ([`TieredCache::group_fingerprints`]:
/// the group, the window and which layers slide), so a value of one group never passes as
/// one of the other, of another window or of a one-group cache. [`save`](Self::save)
/// writes every full global block and the sliding blocks the sequence still holds. A
/// restore of `n` blocks needs the global blocks `0..n` and the sliding blocks a query
/// after them reads (`PagedCache::window_first_block_after(n)..n`): for the longest such
/// `n` beyond what the device reuses, the blocks the device lacks are read and brought
/// into its prefix indexes, held by no sequence, and the prompt then reuses them as any
/// cached prefix. So the prompts of a batch share what one of them restored, and a prompt
/// whose window starts a block earlier reads only that window block (a value that fails
/// stops the restore there and leaves its tier; what came before it stays cached). Write-back on
/// eviction covers both groups: [`free`](Self::free) and [`preempt`](Self::preempt) note
/// the full blocks each group's index holds for the sequence (the sliding group's: those
/// its window still holds), each under its group's key, and
/// [`make_room_for`](Self::make_room_for) (which [`reserve`](Self::reserve) calls) copies
/// down the noted blocks that either group's pool is about to evict, as
/// [`flush`](Self::flush) copies down all of them.
pub struct TieredCache<B: CacheBackend> {
    cache: PagedCache<B>,
    fingerprint: Fingerprint,
    /// The global and sliding groups' fingerprints on a two-group cache.
    groups: Option<(Fingerprint, Fingerprint)>,
    tiers: Vec<Box<dyn BlockStore>>,
    stats: TierStats,
    /// The last store error, for reports.
    last_error: Option<String>,
    /// Cached device blocks with known keys, by group and block id.
    noted: HashMap<(Group, BlockId), Noted>,
    /// The caller's measured prefill rate, tokens per second.
    prefill_tokens_per_s: Option<f64>,
    /// Per tier: bytes returned by reads that returned values, and their seconds.
    reads: Vec<(u64, f64)>,
    /// Per tier: a read rate given in advance, used until one is measured.
    rate_hints: Vec<Option<f64>>,
}

impl<B: CacheBackend> TieredCache<B> {
    /// Wraps `cache` (built for the model `fingerprint` names) with `tiers`, searched in
    /// order.
    pub fn new(
        cache: PagedCache<B>,
        fingerprint: Fingerprint,
        tiers: Vec<Box<dyn BlockStore>>,
    ) -> Self {
        let reads = vec![(0, 0.0); tiers.len()];
        let groups = Self::group_fingerprints(&cache, &fingerprint);
        Self {
            cache,
            fingerprint,
            groups,
            tiers,
            stats: TierStats::default(),
            last_error: None,
            noted: HashMap::new(),
            prefill_tokens_per_s: None,
            rate_hints: vec![None; reads.len()],
            reads,
        }
    }

    /// The fingerprints a two-group `cache` keys its global and sliding blocks under in
    /// the tiers: `fingerprint` with the group's name, the window and the layers that
    /// slide; `None` for a cache of one group (its blocks use `fingerprint` itself).
    pub fn group_fingerprints(
        cache: &PagedCache<B>,
        fingerprint: &Fingerprint,
    ) -> Option<(Fingerprint, Fingerprint)> {
        let s = cache.sliding_layers()?;
        let window = (s.window().get() as u64).to_le_bytes();
        let layers: Vec<u8> = (0..s.layers()).map(|l| u8::from(s.is_sliding(l))).collect();
        let of = |group: &str| {
            Fingerprint::of_parts(&[
                ("model", &fingerprint.0),
                ("cache group", group.as_bytes()),
                ("window", &window),
                ("sliding layers", &layers),
            ])
        };
        Some((of("global"), of("sliding")))
    }

    /// Gives the restore rule this engine's prefill rate (tokens per second, measured by the
    /// caller); a value that is not finite and positive is ignored.
    pub fn set_prefill_rate(&mut self, tokens_per_s: f64) {
        if tokens_per_s.is_finite() && tokens_per_s > 0.0 {
            self.prefill_tokens_per_s = Some(tokens_per_s);
        }
    }

    /// Gives the restore rule a read rate for tier `tier` known in advance (bytes per second,
    /// from `cargo xtask bench` for instance), used until the tier's own reads have been
    /// measured. An unknown tier or a value that is not finite and positive is ignored.
    pub fn set_tier_read_rate(&mut self, tier: usize, bytes_per_s: f64) {
        if let Some(hint) = self.rate_hints.get_mut(tier) {
            if bytes_per_s.is_finite() && bytes_per_s > 0.0 {
                *hint = Some(bytes_per_s);
            }
        }
    }

    /// Tier `tier`'s read rate in bytes per second: measured over its reads that returned
    /// values, else the one given by [`set_tier_read_rate`](Self::set_tier_read_rate).
    pub fn tier_read_rate(&self, tier: usize) -> Option<f64> {
        let &(bytes, secs) = self.reads.get(tier)?;
        if bytes > 0 && secs > 0.0 {
            Some(bytes as f64 / secs)
        } else {
            self.rate_hints.get(tier).copied().flatten()
        }
    }

    /// Whether reading `n` blocks from `tier` is estimated no dearer than prefilling them.
    fn worth_reading(&self, tier: usize, n: usize) -> bool {
        let (Some(prefill), Some(read)) = (self.prefill_tokens_per_s, self.tier_read_rate(tier))
        else {
            return true;
        };
        let bs = self.cache.spec().block_size;
        let block_bytes = self.cache.usage().bytes_per_token as f64 * bs as f64;
        let n = n as f64;
        n * block_bytes / read <= n * bs as f64 / prefill
    }
    /// The device cache.
    pub fn cache(&self) -> &PagedCache<B> {
        &self.cache
    }
    /// The device cache, to reserve, write, commit and attend.
    pub fn cache_mut(&mut self) -> &mut PagedCache<B> {
        &mut self.cache
    }
    /// What the tiers did so far.
    pub fn stats(&self) -> TierStats {
        self.stats
    }
    /// The last store error seen, if any.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    fn store_error(&mut self, e: StoreError) {
        self.stats.store_errors += 1;
        self.last_error = Some(e.to_string());
    }

    /// The content addresses of `tokens`' full blocks (of the global group's blocks on a
    /// two-group cache).
    pub fn keys(&self, tokens: &[u32]) -> Vec<BlockKey> {
        let fingerprint = self.groups.as_ref().map_or(&self.fingerprint, |g| &g.0);
        self.keys_under(fingerprint, tokens)
    }

    fn keys_under(&self, fingerprint: &Fingerprint, tokens: &[u32]) -> Vec<BlockKey> {
        let spec = self.cache.spec();
        chain_keys(tokens, spec.block_size, fingerprint, spec.dtype)
    }

    /// Asks the tiers in order for `wanted` (one batch per tier, each for what no earlier
    /// tier had, subject to the restore rule): per key, the tier that had it and its value.
    fn fetch(&mut self, wanted: &[BlockKey]) -> Vec<Option<(usize, Vec<u8>)>> {
        let mut found: Vec<Option<(usize, Vec<u8>)>> = vec![None; wanted.len()];
        for t in 0..self.tiers.len() {
            let missing: Vec<usize> = (0..wanted.len()).filter(|&i| found[i].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            if !self.worth_reading(t, missing.len()) {
                self.stats.restores_skipped += missing.len() as u64;
                continue;
            }
            let ask: Vec<BlockKey> = missing.iter().map(|&i| wanted[i]).collect();
            let start = Instant::now();
            match self.tiers[t].get_many(&ask) {
                Ok(values) => {
                    let bytes: u64 = values.iter().flatten().map(|v| v.len() as u64).sum();
                    if bytes > 0 {
                        self.reads[t].0 += bytes;
                        self.reads[t].1 += start.elapsed().as_secs_f64();
                    }
                    for (&i, v) in missing.iter().zip(values) {
                        found[i] = v.map(|v| (t, v));
                    }
                }
                Err(e) => self.store_error(e),
            }
        }
        found
    }

    /// Starts a sequence for `prompt`: reuses the device's cached prefix, then restores
    /// the following full blocks from the tiers (never the block of the last prompt
    /// token, whose logits are needed). Returns the sequence and the tokens reused or
    /// restored: compute, write and commit only `prompt[reused..]`.
    pub fn create_with_prefix(&mut self, prompt: &[u32]) -> (SeqId, usize) {
        if let Some(groups) = self.groups {
            return self.create_with_groups(prompt, groups);
        }
        let (seq, mut reused) = self.cache.create_with_prefix(prompt);
        let bs = self.cache.spec().block_size;
        let usable = prompt.len().saturating_sub(1) / bs;
        let first = reused / bs;
        if first >= usable || self.tiers.is_empty() || reused % bs != 0 {
            return (seq, reused);
        }
        let keys = self.keys(&prompt[..usable * bs]);
        let wanted = &keys[first..];
        let found = self.fetch(wanted);
        for (i, hit) in found.into_iter().enumerate() {
            let key = wanted[i];
            let Some((tier, value)) = hit else {
                self.stats.misses += (wanted.len() - i) as u64;
                break;
            };
            let k = first + i;
            let tokens = &prompt[k * bs..(k + 1) * bs];
            // The import takes one block: what that evicts goes down first.
            self.make_room(1);
            let imported = match cache_file::decode_value(&self.fingerprint, &key, &value) {
                Ok(bytes) => self.cache.import_blocks(seq, tokens, &[bytes]),
                Err(e) => Err(kv_core::KvError::InvalidArgument {
                    what: "stored block",
                    detail: e.to_string(),
                }),
            };
            if let Err(kv_core::KvError::CacheFull { .. }) = imported {
                // No room on the device: the value is fine, the rest is prefilled.
                self.stats.misses += (wanted.len() - i) as u64;
                break;
            }
            if imported.is_err() {
                // Never used: recomputed, and the bad value leaves its tier.
                self.stats.rejected += 1;
                if let Err(e) = self.tiers[tier].delete(&key) {
                    self.store_error(e);
                }
                self.stats.misses += (wanted.len() - i) as u64;
                break;
            }
            self.stats.hits += 1;
            self.stats.bytes_loaded += value.len() as u64;
            self.stats.tokens_loaded += bs as u64;
            reused += bs;
        }
        (seq, reused)
    }

    /// Writes `seq`'s full committed blocks to every tier that lacks them (a sequence that
    /// finished or is preempted: a later prompt with the same prefix, in this process or
    /// another sharing a tier, restores them instead of prefilling). Returns the values
    /// written. Store failures are counted, not returned: the cache goes on without them.
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`]; what the backend's export returns.
    pub fn save(&mut self, seq: SeqId) -> kv_core::Result<usize> {
        if let Some(groups) = self.groups {
            return self.save_groups(seq, groups);
        }
        let tokens = self.cache.manager().tokens(seq)?.to_vec();
        let keys = self.keys(&tokens);
        if keys.is_empty() || self.tiers.is_empty() {
            return Ok(0);
        }
        let mut blocks: Option<Vec<Vec<u8>>> = None;
        let mut written = 0;
        for t in 0..self.tiers.len() {
            let have = match self.tiers[t].contains_many(&keys) {
                Ok(h) => h,
                Err(e) => {
                    self.store_error(e);
                    continue;
                }
            };
            if have.iter().all(|&h| h) {
                continue;
            }
            let blocks = match &blocks {
                Some(b) => b,
                None => blocks.insert(self.cache.export_blocks(seq, keys.len())?),
            };
            let items: Vec<(BlockKey, Vec<u8>)> = keys
                .iter()
                .zip(blocks)
                .zip(&have)
                .filter(|(_, &h)| !h)
                .map(|((k, b), _)| (*k, cache_file::encode_value(&self.fingerprint, k, b)))
                .collect();
            let bytes: u64 = items.iter().map(|(_, v)| v.len() as u64).sum();
            match self.tiers[t].put_many(&items) {
                Ok(()) => {
                    written += items.len();
                    self.stats.bytes_saved += bytes;
                }
                Err(e) => self.store_error(e),
            }
        }
        Ok(written)
    }
}

/// The two cache groups' restore and save (see "Two cache groups" in the type's docs).
impl<B: CacheBackend> TieredCache<B> {
    /// [`create_with_prefix`](Self::create_with_prefix) on a two-group cache: the stored
    /// blocks the device lacks for the longest restorable prefix are brought into the
    /// device's prefix indexes first ([`stage_groups`](Self::stage_groups)), then the prompt
    /// reuses them like any cached prefix, so the prompts of a batch share them.
    fn create_with_groups(
        &mut self,
        prompt: &[u32],
        fingerprints: (Fingerprint, Fingerprint),
    ) -> (SeqId, usize) {
        let bs = self.cache.spec().block_size;
        let usable = prompt.len().saturating_sub(1) / bs;
        let have = self.cache.prefix_match(prompt, 0).tokens / bs;
        let restore = have < usable && !self.tiers.is_empty();
        if restore {
            self.stage_groups(&prompt[..usable * bs], have, fingerprints);
        }
        let (seq, reused) = self.cache.create_with_prefix(prompt);
        if restore {
            self.stats.tokens_loaded += reused.saturating_sub(have * bs) as u64;
            self.stats.misses += usable.saturating_sub(reused / bs) as u64;
        }
        (seq, reused)
    }

    /// Brings into the device's prefix indexes the stored blocks of both groups that the
    /// longest prefix of `text` (whole blocks) beyond the `have` the device reuses needs
    /// and the device lacks: the global blocks `0..n` and the sliding blocks a query after
    /// them reads (`PagedCache::window_first_block_after(n)..n`). A block the device
    /// already holds (another prompt's restore brought it, or it is still cached) is not
    /// read again. A value that fails stops the staging there and leaves its tier.
    fn stage_groups(
        &mut self,
        text: &[u32],
        have: usize,
        (global_fp, sliding_fp): (Fingerprint, Fingerprint),
    ) {
        let bs = self.cache.spec().block_size;
        let usable = text.len() / bs;
        let on_device = self.cache.manager().indexed_blocks_of(text, 0);
        let global_keys = self.keys_under(&global_fp, text);
        let global = self.fetch_missing(&global_keys, &on_device, 0..usable);
        let n_global = (0..usable)
            .take_while(|&k| on_device[k] || global[k].is_some())
            .count();
        if n_global <= have {
            return;
        }
        let lo = self.cache.window_first_block_after(n_global);
        let window_text = &text[..n_global * bs];
        let window_on_device = self
            .cache
            .sliding_manager()
            .map_or_else(Vec::new, |m| m.indexed_blocks_of(window_text, 0));
        let held = |k: usize| window_on_device.get(k).copied().unwrap_or(false);
        let sliding_keys = self.keys_under(&sliding_fp, window_text);
        let sliding = self.fetch_missing(&sliding_keys, &window_on_device, lo..n_global);
        // The longest prefix whose global blocks and the sliding blocks its next query
        // reads are all on the device or found.
        let restorable = (have + 1..=n_global).rev().find_map(|n| {
            let from = self.cache.window_first_block_after(n);
            let covered = from >= lo && (from..n).all(|k| held(k) || sliding[k].is_some());
            covered.then_some((n, from))
        });
        let Some((n, from)) = restorable else {
            return;
        };
        let count = |v: &[Option<(usize, Vec<u8>)>], r: std::ops::Range<usize>| {
            v[r].iter().filter(|x| x.is_some()).count()
        };
        self.make_room_in(count(&global, 0..n), count(&sliding, from..n));
        // Runs of consecutive found blocks, each group's in order.
        let mut runs: Vec<StagedRun> = Vec::new();
        for (group, keys, values, range) in [
            (Group::Global, &global_keys, global, 0..n),
            (Group::Sliding, &sliding_keys, sliding, from..n),
        ] {
            for (k, value) in values.into_iter().enumerate() {
                let Some((tier, value)) = value.filter(|_| range.contains(&k)) else {
                    continue;
                };
                match runs.last_mut() {
                    Some((g, first, run)) if *g == group && *first + run.len() == k => {
                        run.push((tier, keys[k], value));
                    }
                    _ => runs.push((group, k, vec![(tier, keys[k], value)])),
                }
            }
        }
        self.stage_runs(&text[..n * bs], &runs, (global_fp, sliding_fp));
    }

    /// Per block `k` in `range` of `keys` that `on_device` does not hold: what the tiers
    /// have of it (`None` elsewhere, all `keys.len()` long).
    fn fetch_missing(
        &mut self,
        keys: &[BlockKey],
        on_device: &[bool],
        range: std::ops::Range<usize>,
    ) -> Vec<Option<(usize, Vec<u8>)>> {
        let wanted: Vec<usize> = range
            .filter(|&k| !on_device.get(k).copied().unwrap_or(false))
            .collect();
        let asked: Vec<BlockKey> = wanted.iter().map(|&k| keys[k]).collect();
        let mut by_block = vec![None; keys.len()];
        for (k, value) in wanted.into_iter().zip(self.fetch(&asked)) {
            by_block[k] = value;
        }
        by_block
    }

    /// Decodes the values of `runs` and stages them all in one [`PagedCache::stage_blocks`]
    /// (all or nothing), counting them. A value that does not decode or that the backend
    /// refuses leaves its tier, and nothing is staged.
    fn stage_runs(
        &mut self,
        text: &[u32],
        runs: &[StagedRun],
        (global_fp, sliding_fp): (Fingerprint, Fingerprint),
    ) {
        let mut decoded: Vec<(Group, usize, Vec<&[u8]>)> = Vec::with_capacity(runs.len());
        let mut bad = None;
        'runs: for (r, (group, first, values)) in runs.iter().enumerate() {
            let fp = match group {
                Group::Global => &global_fp,
                Group::Sliding => &sliding_fp,
            };
            let mut bytes = Vec::with_capacity(values.len());
            for (i, (_, key, value)) in values.iter().enumerate() {
                match cache_file::decode_value(fp, key, value) {
                    Ok(b) => bytes.push(b),
                    Err(e) => {
                        bad = Some((r, i, e.to_string()));
                        break 'runs;
                    }
                }
            }
            decoded.push((*group, *first, bytes));
        }
        if bad.is_none() {
            match self.cache.stage_blocks(text, &decoded) {
                Ok(()) => {
                    for (group, _, values) in runs {
                        let n = values.len() as u64;
                        match group {
                            Group::Global => self.stats.hits += n,
                            Group::Sliding => self.stats.window_blocks_loaded += n,
                        }
                        let bytes: u64 = values.iter().map(|(_, _, v)| v.len() as u64).sum();
                        self.stats.bytes_loaded += bytes;
                    }
                }
                // No room on the device: the values are fine, the rest is prefilled.
                Err((_, _, kv_core::KvError::CacheFull { .. })) => {}
                Err((r, i, e)) => bad = Some((r, i, e.to_string())),
            }
        }
        if let Some((r, i, error)) = bad {
            // Never used: recomputed, and the bad value leaves its tier.
            self.stats.rejected += 1;
            self.last_error = Some(error);
            if let Some((tier, key, _)) = runs.get(r).and_then(|run| run.2.get(i)) {
                if let Err(e) = self.tiers[*tier].delete(key) {
                    self.store_error(e);
                }
            }
        }
    }

    /// [`save`](Self::save) on a two-group cache: the global blocks of every full committed
    /// block and the sliding blocks `seq` still holds among them, each under its group's
    /// key, to every tier lacking them.
    fn save_groups(
        &mut self,
        seq: SeqId,
        (global_fp, sliding_fp): (Fingerprint, Fingerprint),
    ) -> kv_core::Result<usize> {
        let bs = self.cache.spec().block_size;
        let tokens = self.cache.manager().tokens(seq)?.to_vec();
        let n = tokens.len() / bs;
        if n == 0 || self.tiers.is_empty() {
            return Ok(0);
        }
        let freed = self.cache.len(seq)? - self.cache.sliding_len(seq)?;
        let held_from = (freed / bs).min(n);
        let global_keys = self.keys_under(&global_fp, &tokens);
        let sliding_keys = self.keys_under(&sliding_fp, &tokens);
        let keys: Vec<BlockKey> = global_keys
            .iter()
            .chain(&sliding_keys[held_from..])
            .copied()
            .collect();
        let mut groups: Option<Vec<Vec<u8>>> = None;
        let mut written = 0;
        for t in 0..self.tiers.len() {
            let have = match self.tiers[t].contains_many(&keys) {
                Ok(h) => h,
                Err(e) => {
                    self.store_error(e);
                    continue;
                }
            };
            if have.iter().all(|&h| h) {
                continue;
            }
            let blocks = match &groups {
                Some(b) => b,
                None => {
                    let g = self.cache.export_held_groups(seq, n)?;
                    groups.insert(g.global.into_iter().chain(g.sliding).collect())
                }
            };
            let mut window_bytes = 0;
            let mut items = Vec::new();
            for (i, ((key, block), &h)) in keys.iter().zip(blocks).zip(&have).enumerate() {
                if h {
                    continue;
                }
                let fp = if i < n { &global_fp } else { &sliding_fp };
                let value = cache_file::encode_value(fp, key, block);
                if i >= n {
                    window_bytes += value.len() as u64;
                }
                items.push((*key, value));
            }
            let bytes: u64 = items.iter().map(|(_, v)| v.len() as u64).sum();
            match self.tiers[t].put_many(&items) {
                Ok(()) => {
                    written += items.len();
                    self.stats.bytes_saved += bytes;
                    self.stats.window_bytes_saved += window_bytes;
                }
                Err(e) => self.store_error(e),
            }
        }
        Ok(written)
    }
}

/// Writing blocks down when the device lets go of them.
impl<B: CacheBackend> TieredCache<B> {
    /// Notes the content addresses of `seq`'s committed full blocks that the device's prefix
    /// index holds, so they can be copied down when evicted: on a two-group cache, the
    /// global blocks and the sliding blocks the twin still holds, each under its group's
    /// keys. A sequence whose middle was evicted ([`PagedCache::evict_window`]) holds no
    /// plain prefix and is not noted.
    fn note(&mut self, seq: SeqId) -> kv_core::Result<()> {
        let cache = &self.cache;
        // Forget blocks evicted (or reused) since they were noted.
        self.noted.retain(|&(group, b), n| {
            cache.group_manager(group).and_then(|m| m.indexed_hash(b)) == Some(n.hash)
        });
        let manager = self.cache.manager();
        if self.tiers.is_empty() || manager.evicted_tokens(seq)? > 0 {
            return Ok(());
        }
        let tokens = manager.tokens(seq)?.to_vec();
        let global = manager.table(seq)?.blocks().to_vec();
        let keys = self.keys(&tokens);
        let mut noted = self.indexed(Group::Global, &global, 0, &tokens, &keys);
        if let (Some((_, sliding_fp)), Some((first, blocks))) =
            (self.groups, self.cache.sliding_table(seq)?)
        {
            let keys = self.keys_under(&sliding_fp, &tokens);
            noted.extend(self.indexed(Group::Sliding, &blocks, first, &tokens, &keys));
        }
        self.noted.extend(noted);
        Ok(())
    }

    /// Of `blocks` of `group` (holding the text's blocks from block `first` on), those its
    /// index holds for exactly the tokens `keys` name, with their notes.
    fn indexed(
        &self,
        group: Group,
        blocks: &[BlockId],
        first: usize,
        tokens: &[u32],
        keys: &[BlockKey],
    ) -> Vec<((Group, BlockId), Noted)> {
        let Some(manager) = self.cache.group_manager(group) else {
            return Vec::new();
        };
        let bs = self.cache.spec().block_size;
        let chunks = tokens.chunks_exact(bs).zip(keys).skip(first);
        blocks
            .iter()
            .zip(chunks)
            // The index must hold this block for exactly these tokens.
            .filter(|&(&block, (ids, _))| manager.indexed_tokens(block) == Some(ids))
            .filter_map(|(&block, (_, &key))| {
                let hash = manager.indexed_hash(block)?;
                Some(((group, block), Noted { hash, key }))
            })
            .collect()
    }

    /// Frees `seq` ([`PagedCache::free`]); its full blocks stay cached on the device and
    /// are copied down to the first tier when evicted.
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`].
    pub fn free(&mut self, seq: SeqId) -> kv_core::Result<()> {
        self.note(seq)?;
        self.cache.free(seq)
    }

    /// Preempts `seq` ([`PagedCache::preempt`]); its full blocks stay cached on the device
    /// and are copied down to the first tier when evicted, so resuming it with
    /// [`create_with_prefix`](Self::create_with_prefix) restores rather than recomputes
    /// them (see the restore rule in the type's docs).
    ///
    /// # Errors
    /// [`kv_core::KvError::UnknownSequence`].
    pub fn preempt(&mut self, seq: SeqId) -> kv_core::Result<Preempted> {
        self.note(seq)?;
        self.cache.preempt(seq)
    }

    /// Copies down to the first tier the noted blocks that an allocation of `n_blocks`
    /// blocks of the global group would evict now
    /// ([`kv_core::CacheManager::eviction_victims`]); call it before reserving directly on
    /// [`cache_mut`](Self::cache_mut) (on a two-group cache,
    /// [`make_room_for`](Self::make_room_for) covers both groups). Returns the blocks
    /// written. Store failures are counted, not returned.
    pub fn make_room(&mut self, n_blocks: usize) -> usize {
        self.make_room_in(n_blocks, 0)
    }

    /// [`make_room`](Self::make_room) for what reserving `appends` (sequence, tokens)
    /// allocates in each group: on a two-group cache the sliding group's pool too, counted
    /// before the windows slide (an upper bound: a block copied down early stays on the
    /// device as well). Returns the blocks written; an unknown sequence writes nothing
    /// (the reserve itself then fails).
    pub fn make_room_for(&mut self, appends: &[(SeqId, usize)]) -> usize {
        let global = self.cache.manager().blocks_needed_batch(appends);
        let sliding = self.cache.sliding_blocks_needed_batch(appends);
        match (global, sliding) {
            (Ok(g), Ok(s)) => self.make_room_in(g, s),
            _ => 0,
        }
    }

    /// Copies down the noted blocks that allocating `global` blocks of the global group
    /// and `sliding` of the sliding one would evict.
    fn make_room_in(&mut self, global: usize, sliding: usize) -> usize {
        if self.tiers.is_empty() {
            return 0;
        }
        let mut victims: Vec<(Group, BlockId)> = self
            .cache
            .manager()
            .eviction_victims(global)
            .into_iter()
            .map(|b| (Group::Global, b))
            .collect();
        if let Some(m) = self.cache.sliding_manager() {
            victims.extend(
                m.eviction_victims(sliding)
                    .into_iter()
                    .map(|b| (Group::Sliding, b)),
            );
        }
        self.spill(&victims)
    }

    /// [`PagedCache::reserve`] after [`make_room_for`](Self::make_room_for) for what it
    /// allocates.
    ///
    /// # Errors
    /// What [`PagedCache::reserve`] returns.
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> kv_core::Result<Vec<Slot>> {
        self.cache.manager().blocks_needed(seq, n)?;
        self.make_room_for(&[(seq, n)]);
        self.cache.reserve(seq, n)
    }

    /// Copies down to the first tier every noted block still cached on the device (a run
    /// that ends: another process, or this one after a restart, restores them). Returns the
    /// blocks written.
    pub fn flush(&mut self) -> usize {
        let mut blocks: Vec<(Group, BlockId)> = self.noted.keys().copied().collect();
        blocks.sort();
        self.spill(&blocks)
    }

    /// Writes `blocks` (those noted and still holding their prefix) to the first tier,
    /// skipping values it has, each encoded under its group's fingerprint.
    fn spill(&mut self, blocks: &[(Group, BlockId)]) -> usize {
        let mut items: Vec<(BlockKey, (Group, BlockId))> = Vec::new();
        for &(group, b) in blocks {
            let Some(noted) = self.noted.remove(&(group, b)) else {
                continue;
            };
            let hash = self
                .cache
                .group_manager(group)
                .and_then(|m| m.indexed_hash(b));
            if hash == Some(noted.hash) {
                items.push((noted.key, (group, b)));
            }
        }
        let Some(tier) = self.tiers.first_mut() else {
            return 0;
        };
        if items.is_empty() {
            return 0;
        }
        let keys: Vec<BlockKey> = items.iter().map(|(k, _)| *k).collect();
        let have = match tier.contains_many(&keys) {
            Ok(h) => h,
            Err(e) => {
                self.store_error(e);
                return 0;
            }
        };
        let mut values = Vec::new();
        let mut window_bytes = 0;
        for ((key, (group, block)), have) in items.into_iter().zip(have) {
            if have {
                continue;
            }
            let fingerprint = match (group, self.groups) {
                (_, None) => self.fingerprint,
                (Group::Global, Some((global, _))) => global,
                (Group::Sliding, Some((_, sliding))) => sliding,
            };
            match self.cache.export_group_block(group, block) {
                Ok(bytes) => {
                    let value = cache_file::encode_value(&fingerprint, &key, &bytes);
                    if group == Group::Sliding {
                        window_bytes += value.len() as u64;
                    }
                    values.push((key, value));
                }
                Err(e) => {
                    // A backend without export: nothing to write down, ever.
                    self.last_error = Some(e.to_string());
                    return 0;
                }
            }
        }
        let bytes: u64 = values.iter().map(|(_, v)| v.len() as u64).sum();
        let Some(tier) = self.tiers.first_mut() else {
            return 0;
        };
        match tier.put_many(&values) {
            Ok(()) => {
                self.stats.blocks_spilled += values.len() as u64;
                self.stats.bytes_saved += bytes;
                self.stats.window_bytes_saved += window_bytes;
                values.len()
            }
            Err(e) => {
                self.store_error(e);
                0
            }
        }
    }
}

impl<B: CacheBackend> std::fmt::Debug for TieredCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TieredCache")
            .field("cache", &self.cache)
            .field(
                "tiers",
                &self.tiers.iter().map(|t| t.name()).collect::<Vec<_>>(),
            )
            .field("stats", &self.stats)
            .finish()
    }
}

/// Blocks in Redis or Valkey (feature `redis`), shared by every engine that reaches the
/// server: pipelined batches (one round trip for a batch of gets, puts or checks), a TTL on
/// every value, keys `<prefix><block key in hex>`. The connection is made lazily with a
/// timeout and dropped on any error, so a server that comes back is used again; a server
/// that is down answers [`StoreError::Unavailable`] at once (until the connect timeout).
#[cfg(feature = "redis")]
pub struct RedisStore {
    client: redis::Client,
    conn: Option<redis::Connection>,
    prefix: String,
    ttl_secs: u64,
    timeout: std::time::Duration,
    url: String,
}

#[cfg(feature = "redis")]
impl RedisStore {
    /// A store on the server at `url` (`redis://HOST:PORT`), values living `ttl_secs`
    /// seconds (refreshed by each put), each operation bounded by `timeout`. Nothing is
    /// connected yet: a server that is down makes each operation fail, not this call.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] for a URL the client does not accept.
    pub fn new(url: &str, ttl_secs: u64, timeout: std::time::Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Unavailable {
            store: url.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            client,
            conn: None,
            prefix: "kv:block:".into(),
            ttl_secs: ttl_secs.max(1),
            timeout,
            url: url.to_string(),
        })
    }

    fn key(&self, key: &BlockKey) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Runs `f` on a connection, connecting first if needed; any error drops the
    /// connection.
    fn with<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let unavailable = |url: &str, e: redis::RedisError| StoreError::Unavailable {
            store: url.to_string(),
            reason: e.to_string(),
        };
        if self.conn.is_none() {
            let conn = self
                .client
                .get_connection_with_timeout(self.timeout)
                .map_err(|e| unavailable(&self.url, e))?;
            conn.set_read_timeout(Some(self.timeout))
                .and_then(|()| conn.set_write_timeout(Some(self.timeout)))
                .map_err(|e| unavailable(&self.url, e))?;
            self.conn = Some(conn);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(StoreError::Unavailable {
                store: self.url.clone(),
                reason: "no connection".into(),
            });
        };
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                self.conn = None;
                Err(unavailable(&self.url, e))
            }
        }
    }
}

#[cfg(feature = "redis")]
impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("connected", &self.conn.is_some())
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

#[cfg(feature = "redis")]
impl BlockStore for RedisStore {
    fn name(&self) -> &str {
        "redis"
    }
    fn get(&mut self, key: &BlockKey) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get_many(std::slice::from_ref(key))?.pop().flatten())
    }
    fn put(&mut self, key: &BlockKey, value: &[u8]) -> Result<(), StoreError> {
        self.put_many(&[(*key, value.to_vec())])
    }
    fn contains(&mut self, key: &BlockKey) -> Result<bool, StoreError> {
        Ok(self
            .contains_many(std::slice::from_ref(key))?
            .pop()
            .unwrap_or(false))
    }
    fn delete(&mut self, key: &BlockKey) -> Result<bool, StoreError> {
        let k = self.key(key);
        let n: u64 = self.with(|c| redis::cmd("DEL").arg(&k).query(c))?;
        Ok(n > 0)
    }
    fn get_many(&mut self, keys: &[BlockKey]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("GET").arg(self.key(k));
        }
        let values: Vec<Option<Vec<u8>>> = self.with(|c| pipe.query(c))?;
        if values.len() != keys.len() {
            return Err(StoreError::Unavailable {
                store: self.url.clone(),
                reason: format!("{} answers to {} GETs", values.len(), keys.len()),
            });
        }
        Ok(values)
    }
    fn put_many(&mut self, items: &[(BlockKey, Vec<u8>)]) -> Result<(), StoreError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (k, v) in items {
            pipe.cmd("SET")
                .arg(self.key(k))
                .arg(v.as_slice())
                .arg("EX")
                .arg(self.ttl_secs)
                .ignore();
        }
        self.with(|c| pipe.query::<()>(c))
    }
    fn contains_many(&mut self, keys: &[BlockKey]) -> Result<Vec<bool>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("EXISTS").arg(self.key(k));
        }
        let found: Vec<u64> = self.with(|c| pipe.query(c))?;
        Ok(found.into_iter().map(|n| n > 0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> BlockKey {
        BlockKey([i; 16])
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kv-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn exercise(store: &mut dyn BlockStore) {
        store.put(&key(1), &[1; 40]).expect("put");
        store.put(&key(2), &[2; 40]).expect("put");
        assert_eq!(store.get(&key(1)).expect("get"), Some(vec![1; 40]));
        // Budget 100: a third value evicts the least recently used (2; 1 was just read).
        store.put(&key(3), &[3; 40]).expect("put");
        assert_eq!(
            store
                .contains_many(&[key(1), key(2), key(3)])
                .expect("contains"),
            [true, false, true]
        );
        assert!(matches!(
            store.put(&key(4), &[4; 101]),
            Err(StoreError::TooLarge { .. })
        ));
        assert!(
            store.contains(&key(1)).expect("contains"),
            "nothing evicted by a refusal"
        );
        assert!(store.delete(&key(1)).expect("delete"));
        assert!(!store.delete(&key(1)).expect("delete"));
        store
            .put_many(&[(key(5), vec![5; 10]), (key(3), vec![9; 20])])
            .expect("put_many");
        assert_eq!(
            store.get_many(&[key(3), key(5), key(6)]).expect("get_many"),
            [Some(vec![9; 20]), Some(vec![5; 10]), None]
        );
    }

    #[test]
    fn host_store_keeps_its_budget() {
        let mut host = HostStore::new(100);
        exercise(&mut host);
        assert_eq!(host.bytes(), 30);
    }

    #[test]
    fn disk_store_keeps_its_budget_and_survives_reopening() {
        let dir = temp_dir("disk");
        let mut disk = DiskStore::open(&dir, 100).expect("open");
        exercise(&mut disk);
        assert_eq!(disk.bytes(), 30);
        drop(disk);
        // A crash mid-write leaves a temporary file: never read, removed on open.
        fs::write(dir.join(format!(".{}.kvb.tmp-1-1", key(7))), b"half").expect("write");
        let mut disk = DiskStore::open(&dir, 100).expect("reopen");
        assert_eq!(disk.bytes(), 30);
        assert_eq!(disk.get(&key(5)).expect("get"), Some(vec![5; 10]));
        assert_eq!(fs::read_dir(&dir).expect("dir").count(), 2);
        // Reopened with a smaller budget: the oldest values go.
        drop(disk);
        let disk = DiskStore::open(&dir, 20).expect("reopen");
        assert!(disk.bytes() <= 20);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_disk_store_that_cannot_write_fails_cleanly() {
        let dir = temp_dir("gone");
        let mut disk = DiskStore::open(&dir, 100).expect("open");
        disk.put(&key(1), b"kept").expect("put");
        // The directory disappears (unmounted, deleted): the put fails with a typed
        // error and the accounting does not change.
        fs::remove_dir_all(&dir).expect("remove");
        let err = disk.put(&key(2), b"lost").unwrap_err();
        assert!(
            matches!(err, StoreError::File(CacheFileError::Io { .. })),
            "{err}"
        );
        assert_eq!(disk.bytes(), 4);
        assert_eq!(
            disk.get(&key(1)).expect("get"),
            None,
            "gone with its directory"
        );
    }
}
