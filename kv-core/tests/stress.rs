//! Many threads sharing one `SharedCacheManager`: bounded in count (4 threads x 500
//! operations), no timing assertions. Threads share prompts, so they hit each other's cached
//! blocks, and the pool is small, so appends evict and fail. Each thread checks that its own
//! sequences read back exactly their tokens after every operation; at the end every block is
//! accounted for.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use common::{check_holders, check_table, SimStorage};
use kv_core::{BlockId, CacheManager, KvError, SeqId, SharedCacheManager};

const THREADS: u64 = 4;
const OPS: usize = 500;
const BLOCK_SIZE: usize = 4;
const NUM_BLOCKS: usize = 96;

/// xorshift64*: deterministic per thread, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn lock(store: &Mutex<SimStorage>) -> MutexGuard<'_, SimStorage> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Worker {
    cache: SharedCacheManager,
    store: Arc<Mutex<SimStorage>>,
    /// This thread's sequences and their tokens (all committed).
    seqs: BTreeMap<SeqId, Vec<u32>>,
    rng: Rng,
}

type Check = Result<(), String>;

impl Worker {
    /// Reserves, copies (under the manager's lock), writes and commits `new` tokens.
    fn reserve(&mut self, seq: SeqId, new: &[u32]) -> Result<bool, String> {
        let store = Arc::clone(&self.store);
        let reserved = self.cache.reserve_and_copy(seq, new.len(), |copies| {
            lock(&store).copy(copies);
            Ok(())
        });
        match reserved {
            Err(KvError::CacheFull { .. }) => Ok(false),
            Err(e) => Err(e.to_string()),
            Ok(a) => {
                let tokens = self.seqs.get_mut(&seq).ok_or("lost a sequence")?;
                let start = tokens.len();
                tokens.extend_from_slice(new);
                lock(&self.store).write(&a.slots, 0, tokens, start);
                self.cache.commit(seq, new).map_err(|e| e.to_string())?;
                Ok(true)
            }
        }
    }

    fn verify(&self, seq: SeqId) -> Check {
        let table = self.cache.table(seq).map_err(|e| e.to_string())?;
        let tokens = &self.seqs[&seq];
        check_table(&lock(&self.store), &table, BLOCK_SIZE, seq, 0, tokens)
    }

    fn pick(&mut self) -> Option<SeqId> {
        let n = self.seqs.len();
        (n > 0).then(|| {
            *self
                .seqs
                .keys()
                .nth(self.rng.below(n))
                .expect("below length")
        })
    }

    fn step(&mut self, prompts: &[Vec<u32>]) -> Check {
        let touched = match self.rng.below(10) {
            0..=2 => {
                // A request: a shared prompt plus a private tail.
                let mut prompt = prompts[self.rng.below(prompts.len())].clone();
                prompt.extend((0..self.rng.below(6)).map(|_| self.rng.below(3) as u32));
                let (seq, reused) = self.cache.create_with_prefix(&prompt);
                self.seqs.insert(seq, prompt[..reused].to_vec());
                if !self.reserve(seq, &prompt[reused..])? {
                    // Admission failed: drop the request, keep the cache as it was.
                    self.cache.free(seq).map_err(|e| e.to_string())?;
                    self.seqs.remove(&seq);
                    None
                } else {
                    Some(seq)
                }
            }
            3..=5 => match self.pick() {
                Some(seq) => {
                    let new: Vec<u32> = (0..1 + self.rng.below(5))
                        .map(|_| self.rng.below(3) as u32)
                        .collect();
                    if !self.reserve(seq, &new)? {
                        // The batch runner's policy: pause the newest sequence.
                        let newest = *self.seqs.keys().last().ok_or("no sequence")?;
                        let paused = self.cache.preempt(newest).map_err(|e| e.to_string())?;
                        let tokens = self.seqs.remove(&newest).ok_or("lost a sequence")?;
                        if paused.tokens != tokens || paused.uncommitted != 0 {
                            return Err(format!("preempt returned {paused:?}"));
                        }
                    }
                    self.seqs.contains_key(&seq).then_some(seq)
                }
                None => None,
            },
            6 => match self.pick() {
                Some(seq) => {
                    let child = self.cache.fork(seq).map_err(|e| e.to_string())?;
                    let tokens = self.seqs[&seq].clone();
                    self.seqs.insert(child, tokens);
                    Some(child)
                }
                None => None,
            },
            7 => match self.pick() {
                Some(seq) => {
                    let tokens = self.seqs.get_mut(&seq).ok_or("lost a sequence")?;
                    let len = self.rng.below(tokens.len() + 1);
                    self.cache.truncate(seq, len).map_err(|e| e.to_string())?;
                    tokens.truncate(len);
                    Some(seq)
                }
                None => None,
            },
            _ => {
                if let Some(seq) = self.pick() {
                    self.cache.free(seq).map_err(|e| e.to_string())?;
                    self.seqs.remove(&seq);
                }
                None
            }
        };
        if let Some(seq) = touched {
            self.verify(seq)?;
        }
        Ok(())
    }

    fn run(mut self, prompts: &[Vec<u32>]) -> Check {
        for i in 0..OPS {
            self.step(prompts).map_err(|e| format!("op {i}: {e}"))?;
            if i % 50 == 0 {
                for &seq in self.seqs.keys() {
                    self.verify(seq)?;
                }
                self.cache.audit()?;
            }
        }
        for &seq in self.seqs.keys() {
            self.verify(seq)?;
        }
        for seq in std::mem::take(&mut self.seqs).into_keys() {
            self.cache.free(seq).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

#[test]
fn threads_sharing_one_manager_account_for_every_block() -> Result<(), String> {
    let cache = SharedCacheManager::new(
        CacheManager::with_prefix_cache(BLOCK_SIZE, NUM_BLOCKS, 42).map_err(|e| e.to_string())?,
    );
    let store = Arc::new(Mutex::new(SimStorage::new(BLOCK_SIZE, NUM_BLOCKS)));
    // "System prompts" every thread uses, sharing their first blocks with each other.
    let prompts: Arc<Vec<Vec<u32>>> = Arc::new(vec![
        (0..13).map(|i| i % 3).collect(),
        (0..9).map(|i| i % 3).chain([2, 2, 2, 2]).collect(),
        vec![1; 10],
        (0..21).map(|i| (i * 7 % 5) as u32).collect(),
    ]);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let worker = Worker {
                cache: cache.clone(),
                store: Arc::clone(&store),
                seqs: BTreeMap::new(),
                rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1).wrapping_mul(0x1234_5678_9abc)),
            };
            let prompts = Arc::clone(&prompts);
            std::thread::spawn(move || worker.run(&prompts))
        })
        .collect();
    for (t, w) in workers.into_iter().enumerate() {
        w.join()
            .map_err(|_| format!("thread {t} panicked"))?
            .map_err(|e| format!("thread {t}: {e}"))?;
    }

    let m = cache.snapshot();
    check_holders(&m)?;
    lock(&store).check_index(&m)?;
    let stats = m.stats();
    assert_eq!(stats.sequences, 0);
    assert_eq!(stats.used_blocks, 0);
    assert_eq!(m.free_blocks(), NUM_BLOCKS);
    assert_eq!(stats.cached_blocks, stats.indexed_blocks);
    assert_eq!(stats.empty_blocks + stats.cached_blocks, NUM_BLOCKS);
    for b in (0..NUM_BLOCKS as u32).map(BlockId::new) {
        assert_eq!(m.ref_count(b), u32::from(m.is_indexed(b)), "block {b}");
    }
    assert!(
        stats.prefix_hit_tokens > 0,
        "threads reused each other's prefixes"
    );
    Ok(())
}
