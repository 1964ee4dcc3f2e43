//! CacheManager operation sequences: create, append (plain, copying, failing copies),
//! commit, fork, truncate, evict_window, free, preempt, prefix reuse, and the planning
//! queries, on a small pool with and without the prefix cache; plus the size formulas on
//! arbitrary shapes.
//!
//! After every operation: `free + used == total`, the manager's own audit passes, and a
//! failed operation left the manager exactly as it was. Planning answers agree with what
//! the operations then do (a reservation fits exactly when `reservable_tokens` says so).
#![no_main]

use arbitrary::Arbitrary;
use kv_core::{memory, CacheManager, KvDType, KvError, ModelShape, SeqId, StorageSpec};
use libfuzzer_sys::fuzz_target;

/// A sequence: an index into the live ones, or (past their number) a raw id that is
/// probably unknown.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Seq(u8);

#[derive(Arbitrary, Debug)]
enum Op {
    Create,
    CreateWithPrefix {
        prompt: Vec<u8>,
        salt: u8,
    },
    Append {
        seq: Seq,
        n: u16,
    },
    AppendHuge {
        seq: Seq,
        n: usize,
    },
    AppendAndCopy {
        seq: Seq,
        n: u8,
        copy_fails: bool,
    },
    Commit {
        seq: Seq,
        tokens: Vec<u8>,
    },
    CommitAll {
        seq: Seq,
        token: u8,
    },
    Fork {
        seq: Seq,
    },
    Truncate {
        seq: Seq,
        len: u16,
    },
    EvictWindow {
        seq: Seq,
        keep: u8,
        evict: u8,
    },
    EvictWindowAndCopy {
        seq: Seq,
        keep: u8,
        evict: u8,
        copy_fails: bool,
    },
    Free {
        seq: Seq,
    },
    Preempt {
        seq: Seq,
    },
    BlocksNeededBatch {
        appends: Vec<(Seq, u8)>,
    },
    Attention {
        seq: Seq,
        n_queries: u16,
    },
    Sizes(Sizes),
}

/// Arbitrary numbers for the size formulas.
#[derive(Arbitrary, Debug)]
struct Sizes {
    layers: usize,
    kv_heads: usize,
    group: u8,
    head_dim: usize,
    dtype: u8,
    tokens: usize,
    block_size: usize,
    num_blocks: usize,
}

#[derive(Arbitrary, Debug)]
struct Input {
    block_size: u8,
    num_blocks: u8,
    prefix_salt: Option<u64>,
    ops: Vec<Op>,
}

struct Run {
    cache: CacheManager,
    live: Vec<SeqId>,
}

impl Run {
    fn id(&self, seq: Seq) -> SeqId {
        let i = usize::from(seq.0);
        self.live
            .get(i)
            .copied()
            .unwrap_or(SeqId::from_raw(1_000 + u64::from(seq.0)))
    }

    fn forget(&mut self, id: SeqId) {
        self.live.retain(|&s| s != id);
    }

    fn check(&self) {
        let c = &self.cache;
        assert_eq!(c.free_blocks() + c.used_blocks(), c.total_blocks());
        if let Err(e) = c.audit() {
            panic!("audit: {e}");
        }
        let known: Vec<SeqId> = c.sequences().collect();
        let mut live = self.live.clone();
        live.sort_unstable();
        assert_eq!(known, live, "live sequences");
    }

    fn apply(&mut self, op: &Op) {
        let before = self.cache.clone();
        let result: Result<(), KvError> = self.step(op);
        if result.is_err() {
            assert!(
                self.cache == before,
                "{op:?} failed ({result:?}) but changed the cache"
            );
        }
        self.check();
    }

    fn append(&mut self, id: SeqId, n: usize) -> Result<(), KvError> {
        let len = self.cache.len(id);
        let room = self.cache.reservable_tokens(id);
        let needed = self.cache.blocks_needed(id, n);
        let free = self.cache.free_blocks();
        let result = self.cache.reserve(id, n);
        match (&result, len, room, needed) {
            (Ok(a), Ok(len), Ok(room), Ok(needed)) => {
                assert!(n <= room, "appended {n} > appendable {room}");
                assert!(needed <= free);
                assert_eq!(a.slots.len(), n);
                assert_eq!(self.cache.len(id).ok(), Some(len + n));
                let total = self.cache.total_blocks();
                let bs = self.cache.block_size();
                for s in &a.slots {
                    assert!(s.block.index() < total && (s.offset as usize) < bs);
                }
            }
            (Err(KvError::CacheFull { .. }), Ok(_), Ok(room), Ok(needed)) => {
                assert!(n > room, "refused {n} <= appendable {room}");
                assert!(needed > free);
            }
            (Err(_), ..) => {}
            (Ok(_), ..) => panic!("append succeeded where a query failed"),
        }
        result.map(|_| ())
    }

    fn step(&mut self, op: &Op) -> Result<(), KvError> {
        match op {
            Op::Create => {
                let id = self.cache.create_sequence();
                self.live.push(id);
            }
            Op::CreateWithPrefix { prompt, salt } => {
                let prompt: Vec<u32> = prompt.iter().map(|&t| u32::from(t % 4)).collect();
                let salt = u64::from(salt % 2);
                let plan = self.cache.prefix_match(&prompt, salt);
                let free = self.cache.free_blocks();
                let (id, reused) = self.cache.create_with_prefix_salted(&prompt, salt);
                self.live.push(id);
                assert_eq!(reused, plan.tokens);
                assert!(reused < prompt.len().max(1));
                assert_eq!(self.cache.len(id)?, reused);
                assert_eq!(self.cache.free_blocks(), free - plan.revived_blocks);
            }
            Op::Append { seq, n } => self.append(self.id(*seq), usize::from(*n))?,
            Op::AppendHuge { seq, n } => self.append(self.id(*seq), *n)?,
            Op::AppendAndCopy { seq, n, copy_fails } => {
                let id = self.id(*seq);
                self.cache.reserve_and_copy(id, usize::from(*n), |copies| {
                    assert!(!copies.is_empty());
                    if *copy_fails {
                        Err(KvError::InvalidArgument {
                            what: "copy",
                            detail: "injected failure".into(),
                        })
                    } else {
                        Ok(())
                    }
                })?;
            }
            Op::Commit { seq, tokens } => {
                let id = self.id(*seq);
                let tokens: Vec<u32> = tokens.iter().map(|&t| u32::from(t % 4)).collect();
                let before = self.cache.tokens(id)?.to_vec();
                self.cache.commit(id, &tokens)?;
                let after = self.cache.tokens(id)?;
                assert_eq!(&after[..before.len()], &before[..]);
                assert_eq!(&after[before.len()..], &tokens[..]);
            }
            Op::CommitAll { seq, token } => {
                let id = self.id(*seq);
                let pending = self.cache.len(id)? - self.cache.tokens(id)?.len();
                let tokens = vec![u32::from(token % 4); pending];
                self.cache.commit(id, &tokens)?;
            }
            Op::Fork { seq } => {
                let id = self.id(*seq);
                let child = self.cache.fork(id)?;
                self.live.push(child);
                assert_eq!(self.cache.table(child)?, self.cache.table(id)?);
                assert_eq!(self.cache.tokens(child)?, self.cache.tokens(id)?);
            }
            Op::Truncate { seq, len } => {
                let id = self.id(*seq);
                self.cache.truncate(id, usize::from(*len))?;
                assert_eq!(self.cache.len(id)?, usize::from(*len));
            }
            Op::EvictWindow { seq, keep, evict } => {
                let id = self.id(*seq);
                let len = self.cache.len(id)?;
                let (keep, evict) = (usize::from(*keep), usize::from(*evict));
                self.cache.evict_window(id, keep, evict)?;
                assert_eq!(self.cache.len(id)?, len - evict * self.cache.block_size());
            }
            Op::EvictWindowAndCopy {
                seq,
                keep,
                evict,
                copy_fails,
            } => {
                let id = self.id(*seq);
                let (keep, evict) = (usize::from(*keep), usize::from(*evict));
                self.cache.evict_window_and_copy(id, keep, evict, |_| {
                    if *copy_fails {
                        Err(KvError::InvalidArgument {
                            what: "copy",
                            detail: "injected failure".into(),
                        })
                    } else {
                        Ok(())
                    }
                })?;
            }
            Op::Free { seq } => {
                let id = self.id(*seq);
                self.cache.free(id)?;
                self.forget(id);
            }
            Op::Preempt { seq } => {
                let id = self.id(*seq);
                let len = self.cache.len(id)?;
                let tokens = self.cache.tokens(id)?.to_vec();
                let paused = self.cache.preempt(id)?;
                self.forget(id);
                assert_eq!(paused.tokens, tokens);
                assert_eq!(paused.uncommitted, len - tokens.len());
            }
            Op::BlocksNeededBatch { appends } => {
                let appends: Vec<(SeqId, usize)> = appends
                    .iter()
                    .map(|&(s, n)| (self.id(s), usize::from(n)))
                    .collect();
                let needed = self.cache.blocks_needed_batch(&appends)?;
                if needed <= self.cache.free_blocks() {
                    // The documented promise: the batch then fits, run in order.
                    let mut trial = self.cache.clone();
                    for &(id, n) in &appends {
                        if let Err(e) = trial.reserve(id, n) {
                            panic!("batch of {needed} blocks fits but append({id}, {n}): {e}");
                        }
                    }
                }
            }
            Op::Attention { seq, n_queries } => {
                let id = self.id(*seq);
                let len = self.cache.len(id)?;
                let n = usize::from(*n_queries);
                let ok = self.cache.seq_attention(id, n).is_ok();
                assert_eq!(ok, (1..=len).contains(&n));
            }
            Op::Sizes(sizes) => check_sizes(sizes),
        }
        Ok(())
    }
}

/// The size formulas against the same products in u128: exact when they fit, an
/// overflow error when they do not.
fn check_sizes(s: &Sizes) {
    let q_heads = s.kv_heads.saturating_mul(usize::from(s.group % 8) + 1);
    let Ok(shape) = ModelShape::new(s.layers, q_heads, s.kv_heads, s.head_dim) else {
        return;
    };
    let dtype = KvDType::ALL[usize::from(s.dtype) % KvDType::ALL.len()];
    let Ok(row) = dtype.row_bytes(s.head_dim) else {
        return;
    };
    let wide = |x: usize| x as u128;
    // Three usize factors can overflow even u128: `None` is "does not fit".
    let per_token = [s.layers, s.kv_heads, row]
        .into_iter()
        .try_fold(2u128, |p, x| p.checked_mul(wide(x)));
    match memory::bytes_per_token(&shape, dtype) {
        Ok(b) => assert_eq!(Some(wide(b)), per_token),
        Err(e) => {
            assert!(matches!(e, KvError::Overflow { .. }), "{e}");
            assert!(per_token.is_none_or(|p| p > wide(usize::MAX)));
        }
    }
    let total = per_token.and_then(|p| p.checked_mul(wide(s.tokens)));
    match memory::cache_bytes(&shape, dtype, s.tokens) {
        Ok(b) => assert_eq!(Some(u128::from(b)), total),
        Err(e) => {
            assert!(matches!(e, KvError::Overflow { .. }), "{e}");
            // The per-token size overflowing is an error whatever the token count.
            let per_token_overflows = per_token.is_none_or(|p| p > wide(usize::MAX));
            assert!(per_token_overflows || total.is_none_or(|t| t > u128::from(u64::MAX)));
        }
    }
    if let Ok(spec) = StorageSpec::new(shape, dtype, s.block_size, s.num_blocks) {
        let capacity = wide(s.block_size) * wide(s.num_blocks);
        assert_eq!(wide(spec.capacity_tokens()), capacity);
        assert_eq!(
            spec.bytes().map(u128::from).ok(),
            per_token.and_then(|p| p.checked_mul(capacity))
        );
    }
}

fuzz_target!(|input: Input| {
    let block_size = usize::from(input.block_size % 16) + 1;
    let num_blocks = usize::from(input.num_blocks % 64) + 1;
    let cache = match input.prefix_salt {
        Some(salt) => CacheManager::with_prefix_cache(block_size, num_blocks, salt),
        None => CacheManager::new(block_size, num_blocks),
    };
    let Ok(cache) = cache else {
        panic!("block size {block_size} and {num_blocks} blocks are valid");
    };
    let mut run = Run {
        cache,
        live: Vec::new(),
    };
    for op in input.ops.iter().take(256) {
        run.apply(op);
    }
});
