//! A model-based proptest of a [`TieredCache`] on the CPU backend: random prompts sharing
//! prefixes are run, saved to the tiers and restored across "restarts" of the device cache,
//! while tiers go down, values get flipped bits and a foreign model writes into the shared
//! store. Whatever happens, every sequence's cached K/V equals what computing its prompt
//! from scratch stores, bit for bit, and what the tiers report adds up.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use kv_attention::cache_file;
use kv_attention::store::{BlockStore, HostStore, StoreError, TieredCache};
use kv_attention::PagedCache;
use kv_backend_cpu::CpuBackend;
use kv_core::candle::{Device, Tensor};
use kv_core::content::{BlockKey, Fingerprint};
use kv_core::{CacheBackend, KiviBits, KvDType, ModelShape, QuantGroup, Slot, StorageSpec};
use proptest::prelude::*;

/// A host store shared with the test, which can take it down or corrupt it.
#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<HostStore>>,
    down: Arc<Mutex<bool>>,
}

impl Shared {
    fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(HostStore::new(u64::MAX))),
            down: Arc::new(Mutex::new(false)),
        }
    }
    fn check(&self) -> Result<(), StoreError> {
        if *self.down.lock().unwrap() {
            return Err(StoreError::Unavailable {
                store: "shared".into(),
                reason: "down (test)".into(),
            });
        }
        Ok(())
    }
}

impl BlockStore for Shared {
    fn name(&self) -> &str {
        "shared"
    }
    fn get(&mut self, key: &BlockKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.check()?;
        self.inner.lock().unwrap().get(key)
    }
    fn put(&mut self, key: &BlockKey, value: &[u8]) -> Result<(), StoreError> {
        self.check()?;
        self.inner.lock().unwrap().put(key, value)
    }
    fn contains(&mut self, key: &BlockKey) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.lock().unwrap().contains(key)
    }
    fn delete(&mut self, key: &BlockKey) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.lock().unwrap().delete(key)
    }
}

const BS: usize = 4;

fn shape() -> ModelShape {
    ModelShape::new(2, 4, 2, 32).unwrap()
}

/// K and V of token `t` at position `p` after the prefix hashed `h`: a function of the
/// whole prefix, as a real model's are.
fn kv_of(prefix_hash: u64) -> Vec<f32> {
    let n = shape().n_kv_heads() * shape().head_dim();
    (0..n)
        .map(|i| {
            let x = prefix_hash
                .wrapping_mul(6364136223846793005)
                .wrapping_add((i as u64).wrapping_mul(1442695040888963407));
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn prefix_hashes(prompt: &[u32]) -> Vec<u64> {
    let mut h = 0xcbf29ce484222325u64;
    prompt
        .iter()
        .map(|&t| {
            h = (h ^ u64::from(t)).wrapping_mul(0x100000001b3);
            h
        })
        .collect()
}

/// Writes and commits `prompt[from..]` into `seq` as a model would.
fn compute<B: CacheBackend>(
    cache: &mut PagedCache<B>,
    seq: kv_core::SeqId,
    prompt: &[u32],
    from: usize,
) {
    let n = prompt.len() - from;
    if n == 0 {
        return;
    }
    let slots = cache.reserve(seq, n).unwrap();
    let hashes = prefix_hashes(prompt);
    let (kvh, d) = (shape().n_kv_heads(), shape().head_dim());
    for layer in 0..shape().n_layers() {
        let data: Vec<f32> = hashes[from..]
            .iter()
            .flat_map(|&h| kv_of(h ^ layer as u64))
            .collect();
        let k = Tensor::from_vec(data.clone(), (n, kvh, d), &Device::Cpu).unwrap();
        let v = Tensor::from_vec(
            data.iter().map(|x| -x).collect::<Vec<_>>(),
            (n, kvh, d),
            &Device::Cpu,
        )
        .unwrap();
        cache.write(layer, &slots, &k, &v).unwrap();
    }
    cache.commit(seq, &prompt[from..]).unwrap();
}

/// Every K and V value of `seq`, as stored, in f32 bits.
fn contents<B: CacheBackend>(cache: &PagedCache<B>, seq: kv_core::SeqId) -> Vec<u32> {
    let len = cache.len(seq).unwrap();
    let table = cache.manager().table(seq).unwrap();
    let bs = cache.spec().block_size;
    let slots: Vec<Slot> = (0..len).map(|i| table.slot(i, bs).unwrap()).collect();
    let mut out = Vec::new();
    for layer in 0..shape().n_layers() {
        let (k, v) = cache
            .backend()
            .read(cache.storage(), layer, &slots)
            .unwrap();
        for t in [k, v] {
            out.extend(
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits()),
            );
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    /// Run a prompt: one of 3 system prefixes, then a suffix.
    Run { system: u8, suffix: Vec<u32> },
    /// The device cache is lost (a restart); tiers stay.
    Restart,
    /// Take the shared store down or bring it back.
    Down(bool),
    /// Flip a bit in one stored value.
    Flip { which: usize, bit: usize },
    /// Another model writes its blocks under keys this model uses.
    Foreign { which: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..3, prop::collection::vec(0u32..5, 0..9)).prop_map(|(system, suffix)| Op::Run { system, suffix }),
        1 => Just(Op::Restart),
        1 => any::<bool>().prop_map(Op::Down),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(which, bit)| Op::Flip { which, bit }),
        1 => any::<usize>().prop_map(|which| Op::Foreign { which }),
    ]
}

/// System prompt `s` for blocks of `bs` tokens: two blocks and more, so that prompts share
/// full blocks whatever the block size.
fn system_prompt(s: u8, bs: usize) -> Vec<u32> {
    let len = 2 * bs + bs / 4 * usize::from(s) + 1;
    (0..len as u32)
        .map(|i| 1000 * (u32::from(s) + 1) + i)
        .collect()
}

fn run_ops(dtype: KvDType, ops: &[Op]) -> Result<(), TestCaseError> {
    let bs = BS.max(dtype.block_tokens());
    let spec = StorageSpec::new(shape(), dtype, bs, 12).unwrap();
    let fp = Fingerprint::of_parts(&[("model", b"proptest")]);
    let shared = Shared::new();
    let new_cache = || {
        TieredCache::new(
            PagedCache::with_prefix_cache(CpuBackend::new(), spec, 1).unwrap(),
            fp,
            vec![Box::new(shared.clone()) as Box<dyn BlockStore>],
        )
    };
    let mut tiered = new_cache();
    for op in ops {
        match op {
            Op::Run { system, suffix } => {
                let mut prompt = system_prompt(*system, bs);
                prompt.extend(suffix);
                let before = tiered.stats();
                let (seq, reused) = tiered.create_with_prefix(&prompt);
                prop_assert!(reused % bs == 0 && reused <= (prompt.len() - 1) / bs * bs);
                compute_tiered(&mut tiered, seq, &prompt, reused);
                // Bit for bit what computing the whole prompt stores.
                let mut fresh = PagedCache::new(CpuBackend::new(), spec).unwrap();
                let fseq = fresh.create_sequence();
                compute(&mut fresh, fseq, &prompt, 0);
                prop_assert_eq!(contents(tiered.cache(), seq), contents(&fresh, fseq));
                let after = tiered.stats();
                prop_assert_eq!(
                    after.tokens_loaded - before.tokens_loaded,
                    (after.hits - before.hits) * bs as u64
                );
                // Saved now, or (when the device evicts it) written down later.
                if suffix.len() % 2 == 0 {
                    tiered.save(seq).unwrap();
                }
                tiered.free(seq).unwrap();
                prop_assert!(tiered.cache().manager().audit().is_ok());
            }
            Op::Restart => tiered = new_cache(),
            Op::Down(d) => *shared.down.lock().unwrap() = *d,
            Op::Flip { which, bit } => {
                let mut store = shared.inner.lock().unwrap();
                let keys = stored_keys(&store);
                if let Some(key) = keys.get(which % keys.len().max(1)) {
                    let mut v = store.get(key).unwrap().unwrap();
                    let b = bit % (v.len() * 8);
                    v[b / 8] ^= 1 << (b % 8);
                    store.put(key, &v).unwrap();
                }
            }
            Op::Foreign { which } => {
                let mut store = shared.inner.lock().unwrap();
                let keys = stored_keys(&store);
                if let Some(key) = keys.get(which % keys.len().max(1)) {
                    let v = store.get(key).unwrap().unwrap();
                    // (A value already made foreign or flipped stays as it is.)
                    if let Ok(payload) = cache_file::decode_value(&fp, key, &v) {
                        let other = Fingerprint::of_parts(&[("model", b"another")]);
                        let foreign = cache_file::encode_value(&other, key, payload);
                        store.put(key, &foreign).unwrap();
                    }
                }
            }
        }
    }
    Ok(())
}

/// The keys the store holds, in a fixed order.
fn stored_keys(store: &HostStore) -> Vec<BlockKey> {
    let mut keys: Vec<BlockKey> = store.keys().copied().collect();
    keys.sort();
    keys
}

const LAYOUTS: [KvDType; 3] = [
    KvDType::F16,
    KvDType::Int8 {
        group: QuantGroup::G32,
    },
    KvDType::kivi(KiviBits::B4),
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn tiered_cache_matches_recompute(layout in 0usize..3, ops in prop::collection::vec(op(), 1..24)) {
        run_ops(LAYOUTS[layout], &ops)?;
    }
}

#[test]
fn a_restart_restores_from_the_tier_instead_of_prefilling() {
    let spec = StorageSpec::new(shape(), KvDType::F16, BS, 12).unwrap();
    let fp = Fingerprint::of_parts(&[("model", b"restart")]);
    let shared = Shared::new();
    let prompt: Vec<u32> = (0..13).collect();
    let mut first = TieredCache::new(
        PagedCache::with_prefix_cache(CpuBackend::new(), spec, 1).unwrap(),
        fp,
        vec![Box::new(shared.clone())],
    );
    let (seq, reused) = first.create_with_prefix(&prompt);
    assert_eq!(reused, 0);
    compute(first.cache_mut(), seq, &prompt, 0);
    assert_eq!(first.save(seq).unwrap(), 3);
    let mut second = TieredCache::new(
        PagedCache::with_prefix_cache(CpuBackend::new(), spec, 1).unwrap(),
        fp,
        vec![Box::new(shared.clone())],
    );
    let (seq2, reused) = second.create_with_prefix(&prompt);
    assert_eq!(reused, 12, "three blocks restored, the last token computed");
    let s = second.stats();
    assert_eq!((s.hits, s.tokens_loaded, s.rejected), (3, 12, 0));
    assert!(s.bytes_loaded > 0);
    compute(second.cache_mut(), seq2, &prompt, reused);
    assert_eq!(contents(first.cache(), seq), contents(second.cache(), seq2));
    // The store down: the engine goes on, recomputing, and counts the error.
    *shared.down.lock().unwrap() = true;
    let mut third = TieredCache::new(
        PagedCache::with_prefix_cache(CpuBackend::new(), spec, 1).unwrap(),
        fp,
        vec![Box::new(shared.clone())],
    );
    let (_, reused) = third.create_with_prefix(&prompt);
    assert_eq!(reused, 0);
    assert_eq!(third.stats().store_errors, 1);
    assert!(third.last_error().unwrap().contains("down"));
}

#[test]
fn a_full_device_restores_what_fits_and_keeps_the_rest_in_the_tier() {
    let fp = Fingerprint::of_parts(&[("model", b"full")]);
    let shared = Shared::new();
    let prompt: Vec<u32> = (0..25).collect();
    let big = StorageSpec::new(shape(), KvDType::F16, BS, 12).unwrap();
    let mut first = TieredCache::new(
        PagedCache::with_prefix_cache(CpuBackend::new(), big, 1).unwrap(),
        fp,
        vec![Box::new(shared.clone())],
    );
    let (seq, _) = first.create_with_prefix(&prompt);
    compute(first.cache_mut(), seq, &prompt, 0);
    assert_eq!(first.save(seq).unwrap(), 6);
    // A device of 3 blocks: 3 of the 6 saved blocks fit.
    let small = StorageSpec::new(shape(), KvDType::F16, BS, 3).unwrap();
    let mut second = TieredCache::new(
        PagedCache::with_prefix_cache(CpuBackend::new(), small, 1).unwrap(),
        fp,
        vec![Box::new(shared.clone())],
    );
    let (_, reused) = second.create_with_prefix(&prompt);
    assert_eq!(reused, 3 * BS);
    assert_eq!(
        second.stats().rejected,
        0,
        "a full device is not the values' fault"
    );
    assert_eq!(
        shared.inner.lock().unwrap().len(),
        6,
        "nothing deleted from the tier"
    );
}

/// Reserves `prompt[from..]` through the tiers (copying down what the device evicts for it),
/// then computes it as [`compute`] does.
fn compute_tiered(
    tiered: &mut TieredCache<CpuBackend>,
    seq: kv_core::SeqId,
    prompt: &[u32],
    from: usize,
) {
    let needed = tiered
        .cache()
        .manager()
        .blocks_needed(seq, prompt.len() - from)
        .unwrap();
    tiered.make_room(needed);
    compute(tiered.cache_mut(), seq, prompt, from);
}

/// What computing `prompt` from scratch stores.
fn fresh_contents(spec: StorageSpec, prompt: &[u32]) -> Vec<u32> {
    let mut fresh = PagedCache::new(CpuBackend::new(), spec).unwrap();
    let seq = fresh.create_sequence();
    compute(&mut fresh, seq, prompt, 0);
    contents(&fresh, seq)
}

#[test]
fn evicted_and_preempted_blocks_go_down_a_tier_and_come_back() {
    // A device of 6 blocks of 4 tokens; nothing is saved explicitly.
    let spec = StorageSpec::new(shape(), KvDType::F16, BS, 6).unwrap();
    let fp = Fingerprint::of_parts(&[("model", b"evict")]);
    let shared = Shared::new();
    let mut tiered = TieredCache::new(
        PagedCache::with_prefix_cache(CpuBackend::new(), spec, 1).unwrap(),
        fp,
        vec![Box::new(shared.clone())],
    );
    // A: 4 full blocks and one token, preempted (its blocks stay cached on the device).
    let a: Vec<u32> = (0..17).collect();
    let (seq_a, _) = tiered.create_with_prefix(&a);
    compute_tiered(&mut tiered, seq_a, &a, 0);
    let paused = tiered.preempt(seq_a).unwrap();
    assert_eq!(paused.tokens, a);
    assert_eq!(tiered.cache().stats().cached_blocks, 4);
    assert_eq!(shared.inner.lock().unwrap().len(), 0, "nothing written yet");
    // B takes 5 blocks: 2 empty ones and 3 of A's, which go down to the tier first.
    let b: Vec<u32> = (100..117).collect();
    let (seq_b, reused) = tiered.create_with_prefix(&b);
    assert_eq!(reused, 0);
    compute_tiered(&mut tiered, seq_b, &b, 0);
    assert_eq!(tiered.stats().blocks_spilled, 3);
    assert_eq!(shared.inner.lock().unwrap().len(), 3);
    assert_eq!(tiered.cache().stats().evicted_blocks, 3);
    tiered.free(seq_b).unwrap();
    // A resumes: the block still cached on the device is reused, the three evicted ones
    // come back from the tier instead of being recomputed, and the K/V equals computing A
    // from scratch, bit for bit.
    let before = tiered.stats();
    let (seq_a, reused) = tiered.create_with_prefix(&paused.tokens);
    assert_eq!(reused, 4 * BS);
    assert_eq!(tiered.stats().hits - before.hits, 3);
    compute_tiered(&mut tiered, seq_a, &a, reused);
    assert_eq!(contents(tiered.cache(), seq_a), fresh_contents(spec, &a));
    tiered.free(seq_a).unwrap();
    // At the end of a run, flush writes down what is still cached and not in the tier.
    let flushed = tiered.flush();
    assert!(flushed > 0);
    let s = tiered.stats();
    assert_eq!(shared.inner.lock().unwrap().len() as u64, s.blocks_spilled);
    // Nothing was lost: every full block of A and B is on the device or in the tier, and
    // after the flush in the tier.
    let mut store = shared.inner.lock().unwrap();
    for key in tiered.keys(&a).iter().chain(&tiered.keys(&b)) {
        assert!(store.contains(key).unwrap());
    }
    drop(store);
    assert_eq!(tiered.flush(), 0, "nothing left to write");
    assert!(tiered.cache().manager().audit().is_ok());
}

#[test]
fn a_restore_dearer_than_prefill_is_skipped() {
    let spec = StorageSpec::new(shape(), KvDType::F16, BS, 12).unwrap();
    let fp = Fingerprint::of_parts(&[("model", b"rule")]);
    let shared = Shared::new();
    let prompt: Vec<u32> = (0..13).collect();
    let new = || {
        TieredCache::new(
            PagedCache::with_prefix_cache(CpuBackend::new(), spec, 1).unwrap(),
            fp,
            vec![Box::new(shared.clone()) as Box<dyn BlockStore>],
        )
    };
    let mut first = new();
    let (seq, _) = first.create_with_prefix(&prompt);
    compute(first.cache_mut(), seq, &prompt, 0);
    assert_eq!(first.save(seq).unwrap(), 3);
    // One byte per second against a million tokens per second: prefilling wins.
    let mut slow_store = new();
    slow_store.set_tier_read_rate(0, 1.0);
    slow_store.set_prefill_rate(1e6);
    let (_, reused) = slow_store.create_with_prefix(&prompt);
    assert_eq!(reused, 0);
    let s = slow_store.stats();
    assert_eq!((s.hits, s.restores_skipped, s.misses), (0, 3, 3));
    // A megabyte per second against one token per second: reading wins, and the tier's
    // rate is then measured from the read.
    let mut slow_prefill = new();
    slow_prefill.set_tier_read_rate(0, 1e6);
    slow_prefill.set_prefill_rate(1.0);
    let (_, reused) = slow_prefill.create_with_prefix(&prompt);
    assert_eq!(reused, 12);
    assert_eq!(slow_prefill.stats().restores_skipped, 0);
    assert_ne!(
        slow_prefill.tier_read_rate(0),
        Some(1e6),
        "measured, not the hint"
    );
    // Without a prefill rate the rule cannot compare: the blocks are read.
    let mut unknown = new();
    unknown.set_tier_read_rate(0, 1.0);
    assert_eq!(unknown.create_with_prefix(&prompt).1, 12);
}

/// A two-group cache (layer 0 slides over 6 tokens, layer 1 is global) of 32 blocks per
/// group, backed by `shared`.
fn two_group_tiered(shared: &Shared) -> TieredCache<CpuBackend> {
    let spec = StorageSpec::new(shape(), KvDType::F16, BS, 32).unwrap();
    let window = std::num::NonZeroUsize::new(6).unwrap();
    let sliding = kv_attention::SlidingLayers::new(window, vec![true, false], 32).unwrap();
    let cache = PagedCache::with_sliding_window(CpuBackend::new(), spec, sliding, Some(1)).unwrap();
    let fp = Fingerprint::of_parts(&[("model", b"two groups")]);
    TieredCache::new(cache, fp, vec![Box::new(shared.clone())])
}

/// The prompts of a batch on a two-group cache restore each stored block once: the second
/// prompt shares the global blocks the first one's restore brought and reads from the tier
/// only the window blocks its shorter prefix needs (its window starts before the first
/// prompt's), as a one-group cache shares them.
#[test]
fn prompts_of_a_batch_share_what_a_two_group_restore_brought() {
    let shared = Shared::new();
    let a: Vec<u32> = (0..33).collect();
    let b: Vec<u32> = (0..24).chain([999]).collect();
    let mut first = two_group_tiered(&shared);
    for p in [&a, &b] {
        let (seq, reused) = first.create_with_prefix(p);
        compute(first.cache_mut(), seq, p, reused);
        first.save(seq).unwrap();
        first.free(seq).unwrap();
    }
    // B alone on a fresh device: what its restore reads.
    let mut alone = two_group_tiered(&shared);
    let (_, reused_alone) = alone.create_with_prefix(&b);
    let s_alone = alone.stats();
    assert_eq!(reused_alone, 24, "{s_alone:?}");
    // A then B on a fresh device: B reuses as much, reading no global block again.
    let mut batch = two_group_tiered(&shared);
    let (seq_a, reused_a) = batch.create_with_prefix(&a);
    assert_eq!(reused_a, 32, "{:?}", batch.stats());
    let after_a = batch.stats();
    let used_a = batch.cache().stats().used_blocks;
    let (seq_b, reused_b) = batch.create_with_prefix(&b);
    let s = batch.stats();
    assert_eq!(reused_b, reused_alone, "{s:?}");
    assert_eq!(s.hits, after_a.hits, "global blocks restored again: {s:?}");
    assert!(
        s.window_blocks_loaded - after_a.window_blocks_loaded <= s_alone.window_blocks_loaded,
        "{s:?}"
    );
    assert_eq!(
        batch.cache().stats().used_blocks,
        used_a,
        "B's prefix is A's blocks"
    );
    // Both go on from what they restored as if computed.
    compute(batch.cache_mut(), seq_a, &a, reused_a);
    compute(batch.cache_mut(), seq_b, &b, reused_b);
    assert!(batch.cache().manager().audit().is_ok());
}
