//! Model-based property tests of `CacheManager`: random programs of create, append (with
//! token ids), commit, fork, truncate, free, prefix-hit create, preempt/resume and batched
//! decode steps, sliding-window evictions (sinks rewritten in place), front drops of a
//! sliding-window layer (`drop_front`, committed or not) and window prefix hits
//! (`create_with_window_prefix`), checked after every step against a plain model of what
//! each sequence holds.
//!
//! After every step: `free + used == total`; reference counts equal the holders (sequence
//! tables plus the index) derived from the public view; the manager's own audit passes;
//! every live sequence reads back exactly its own tokens' K/V from a simulated storage that
//! applies the returned copies and writes; every indexed block holds the tokens it is
//! indexed under. Failing calls must leave the manager equal to a copy taken before them.

mod common;

use std::collections::BTreeMap;

use common::{check_contents, check_holders, Kv, SimStorage};
use kv_core::{CacheManager, KvError, SeqId};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Create,
    CreatePrefix {
        source: usize,
        take: usize,
        extra: Vec<u32>,
        salt: u64,
        fill: bool,
    },
    Append {
        seq: usize,
        tokens: Vec<u32>,
        commit: bool,
    },
    Commit {
        seq: usize,
    },
    Fork {
        seq: usize,
    },
    Truncate {
        seq: usize,
        percent: usize,
    },
    Free {
        seq: usize,
    },
    Preempt {
        seq: usize,
        resume: bool,
        next: u32,
    },
    Step {
        tokens: Vec<u32>,
        commit: bool,
    },
    Bad {
        kind: u8,
        seq: usize,
    },
    Evict {
        seq: usize,
        keep: usize,
        count: usize,
    },
    DropFront {
        seq: usize,
        count: usize,
    },
    CreateWindow {
        source: usize,
        take: usize,
        extra: Vec<u32>,
        salt: u64,
        window: usize,
        fill: bool,
    },
}

/// A small alphabet so prompts share prefixes often.
fn token() -> impl Strategy<Value = u32> {
    0u32..3
}

fn op() -> impl Strategy<Value = Op> {
    let seq = any::<usize>;
    let often = || prop::bool::weighted(0.8);
    let tokens = |n| prop::collection::vec(token(), n);
    prop_oneof![
        1 => Just(Op::Create),
        4 => (seq(), seq(), tokens(0..7), 0u64..2, often()).prop_map(
            |(source, take, extra, salt, fill)| Op::CreatePrefix { source, take, extra, salt, fill }
        ),
        6 => (seq(), tokens(0..7), often())
            .prop_map(|(seq, tokens, commit)| Op::Append { seq, tokens, commit }),
        1 => seq().prop_map(|seq| Op::Commit { seq }),
        3 => seq().prop_map(|seq| Op::Fork { seq }),
        3 => (seq(), 0usize..=100).prop_map(|(seq, percent)| Op::Truncate { seq, percent }),
        2 => seq().prop_map(|seq| Op::Free { seq }),
        1 => (seq(), any::<bool>(), token())
            .prop_map(|(seq, resume, next)| Op::Preempt { seq, resume, next }),
        2 => (tokens(1..4), often()).prop_map(|(tokens, commit)| Op::Step { tokens, commit }),
        1 => (0u8..8, seq()).prop_map(|(kind, seq)| Op::Bad { kind, seq }),
        3 => (seq(), 0usize..4).prop_map(|(seq, count)| Op::DropFront { seq, count }),
        3 => (seq(), seq(), tokens(0..7), 0u64..2, 1usize..10, often()).prop_map(
            |(source, take, extra, salt, window, fill)| Op::CreateWindow {
                source, take, extra, salt, window, fill
            }
        ),
        3 => (seq(), 0usize..3, 0usize..4)
            .prop_map(|(seq, keep, count)| Op::Evict { seq, keep, count }),
    ]
}

/// The reference model of one sequence: the ids it holds in cache order, how many are
/// committed, every id it was ever given (evicted ones too), and what each cache index must
/// read back.
#[derive(Debug, Clone)]
struct ModelSeq {
    tokens: Vec<u32>,
    committed: usize,
    salt: u64,
    history: Vec<u32>,
    expect: Vec<Kv>,
    /// Ids of tokens `drop_front` dropped before they were committed: the next commit
    /// gives them first.
    unseen: Vec<u32>,
}

impl ModelSeq {
    fn new(prompt: &[u32], salt: u64) -> Self {
        Self {
            tokens: prompt.to_vec(),
            committed: prompt.len(),
            salt,
            history: prompt.to_vec(),
            expect: (0..prompt.len())
                .map(|i| (salt, prompt[..=i].to_vec()))
                .collect(),
            unseen: Vec::new(),
        }
    }

    /// The ids committed so far in text order (those dropped from the middle included).
    fn committed_text(&self) -> &[u32] {
        &self.history[..self.history.len() - (self.tokens.len() - self.committed)]
    }
}

/// Marks a sink slot rewritten by the `epoch`-th eviction: K/V no plain prefix has.
const REWRITTEN: u32 = u32::MAX;

struct Harness {
    m: CacheManager,
    store: SimStorage,
    seqs: BTreeMap<SeqId, ModelSeq>,
    /// Token lists seen before, to build prompts that hit the cache.
    history: Vec<Vec<u32>>,
    prefix_on: bool,
}

type Check = Result<(), String>;

fn kv(e: KvError) -> String {
    e.to_string()
}

impl Harness {
    fn new(block_size: usize, num_blocks: usize, prefix_on: bool) -> Result<Self, String> {
        let m = if prefix_on {
            CacheManager::with_prefix_cache(block_size, num_blocks, 0xfeed)
        } else {
            CacheManager::new(block_size, num_blocks)
        }
        .map_err(kv)?;
        Ok(Self {
            m,
            store: SimStorage::new(block_size, num_blocks),
            seqs: BTreeMap::new(),
            history: Vec::new(),
            prefix_on,
        })
    }

    fn pick(&self, ix: usize) -> Option<SeqId> {
        let n = self.seqs.len();
        (n > 0).then(|| *self.seqs.keys().nth(ix % n).expect("index below length"))
    }

    fn remember(&mut self, tokens: &[u32]) {
        if !tokens.is_empty() {
            if self.history.len() >= 24 {
                self.history.remove(0);
            }
            self.history.push(tokens.to_vec());
        }
    }

    /// Appends `new` to `seq` as a caller would: copies, writes, then (maybe) commits.
    /// Checks that success is exactly what the capacity queries predicted.
    fn reserve(&mut self, seq: SeqId, new: &[u32], commit: bool) -> Result<bool, String> {
        let n = new.len();
        let appendable = self.m.reservable_tokens(seq).map_err(kv)?;
        let needed = self.m.blocks_needed(seq, n).map_err(kv)?;
        let free = self.m.free_blocks();
        let before = self.m.clone();
        match self.m.reserve(seq, n) {
            Err(KvError::CacheFull {
                needed: e_needed,
                free: e_free,
            }) => {
                if n <= appendable || needed <= free {
                    return Err(format!(
                        "append of {n} failed though {appendable} tokens / {free} blocks were free"
                    ));
                }
                if (e_needed, e_free) != (needed, free) {
                    return Err(format!(
                        "CacheFull says {e_needed}/{e_free}, queries said {needed}/{free}"
                    ));
                }
                if self.m != before {
                    return Err("a failed append changed the manager".into());
                }
                Ok(false)
            }
            Err(e) => Err(format!("append: {e}")),
            Ok(a) => {
                if n > appendable || needed > free {
                    return Err(format!(
                        "append of {n} succeeded beyond {appendable} tokens / {free} blocks"
                    ));
                }
                let after = self.m.free_blocks();
                if after + needed != free && after + needed != free + 1 {
                    return Err(format!(
                        "append took {} blocks, blocks_needed said {needed}",
                        free as isize - after as isize
                    ));
                }
                if a.slots.len() != n || a.copies.len() > 1 {
                    return Err(format!("append returned {a:?}"));
                }
                let s = self.seqs.get_mut(&seq).ok_or("model lost a sequence")?;
                let start = s.history.len();
                s.tokens.extend_from_slice(new);
                s.history.extend_from_slice(new);
                for i in start..s.history.len() {
                    s.expect.push((s.salt, s.history[..=i].to_vec()));
                }
                self.store.copy(&a.copies);
                self.store.write(&a.slots, s.salt, &s.history, start);
                if commit {
                    self.commit(seq)?;
                }
                Ok(true)
            }
        }
    }

    fn commit(&mut self, seq: SeqId) -> Check {
        let s = self.seqs.get_mut(&seq).ok_or("model lost a sequence")?;
        let ids = [&s.unseen[..], &s.tokens[s.committed..]].concat();
        self.m.commit(seq, &ids).map_err(kv)?;
        s.committed = s.tokens.len();
        s.unseen.clear();
        let done = s.committed_text().to_vec();
        self.remember(&done);
        Ok(())
    }

    /// Creates a sequence from `prompt` through the prefix cache, checking the hit, then
    /// (if `fill`) reserves, writes and commits the rest of the prompt.
    /// A prompt that starts with `take` (wrapped) ids of the `source`-th (wrapped) earlier
    /// prompt, then `extra`: so that the index has prefixes to find.
    fn prompt_from(&self, source: usize, take: usize, extra: Vec<u32>) -> Vec<u32> {
        let mut prompt = if self.history.is_empty() {
            vec![]
        } else {
            let h = &self.history[source % self.history.len()];
            h[..take % (h.len() + 1)].to_vec()
        };
        prompt.extend(extra);
        prompt
    }

    fn create_prefix(&mut self, prompt: &[u32], salt: u64, fill: bool) -> Check {
        let bs = self.m.block_size();
        let predicted = self.m.prefix_match(prompt, salt);
        let free = self.m.free_blocks();
        let (seq, reused) = self.m.create_with_prefix_salted(prompt, salt);
        if reused != predicted.tokens || reused != predicted.blocks * bs {
            return Err(format!("reused {reused}, prefix_match said {predicted:?}"));
        }
        if reused % bs != 0 || (reused > 0 && reused >= prompt.len()) {
            return Err(format!(
                "reused {reused} of a {}-token prompt (block size {bs})",
                prompt.len()
            ));
        }
        if !self.prefix_on && reused != 0 {
            return Err("reuse without a prefix cache".into());
        }
        if self.m.free_blocks() + predicted.revived_blocks != free {
            return Err("revived blocks miscounted".into());
        }
        if self.m.tokens(seq).map_err(kv)? != &prompt[..reused] {
            return Err("reused tokens are not committed".into());
        }
        self.seqs
            .insert(seq, ModelSeq::new(&prompt[..reused], salt));
        if fill {
            let fits = predicted.blocks_needed <= free;
            let ok = self.reserve(seq, &prompt[reused..], true)?;
            if ok != fits {
                return Err(format!("admission fit {ok}, prefix_match predicted {fits}"));
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Check {
        match op.clone() {
            Op::Create => {
                let seq = self.m.create_sequence();
                self.seqs.insert(seq, ModelSeq::new(&[], 0));
            }
            Op::CreatePrefix {
                source,
                take,
                extra,
                salt,
                fill,
            } => {
                let prompt = self.prompt_from(source, take, extra);
                self.create_prefix(&prompt, salt, fill)?;
            }
            Op::Append {
                seq,
                tokens,
                commit,
            } => {
                if let Some(seq) = self.pick(seq) {
                    self.reserve(seq, &tokens, commit)?;
                }
            }
            Op::Commit { seq } => {
                if let Some(seq) = self.pick(seq) {
                    self.commit(seq)?;
                }
            }
            Op::Fork { seq } => {
                if let Some(seq) = self.pick(seq) {
                    let child = self.m.fork(seq).map_err(kv)?;
                    let s = self.seqs[&seq].clone();
                    self.seqs.insert(child, s);
                }
            }
            Op::Truncate { seq, percent } => {
                if let Some(seq) = self.pick(seq) {
                    let s = self.seqs.get_mut(&seq).ok_or("model lost a sequence")?;
                    let len = s.tokens.len() * percent / 100;
                    self.m.truncate(seq, len).map_err(kv)?;
                    let gone = s.tokens.len() - len;
                    s.tokens.truncate(len);
                    s.history.truncate(s.history.len() - gone);
                    s.expect.truncate(len);
                    s.committed = s.committed.min(len);
                }
            }
            Op::Free { seq } => {
                if let Some(seq) = self.pick(seq) {
                    self.m.free(seq).map_err(kv)?;
                    let s = self.seqs.remove(&seq).ok_or("model lost a sequence")?;
                    self.remember(s.committed_text());
                }
            }
            Op::Preempt { seq, resume, next } => {
                if let Some(seq) = self.pick(seq) {
                    let p = self.m.preempt(seq).map_err(kv)?;
                    let s = self.seqs.remove(&seq).ok_or("model lost a sequence")?;
                    if p.tokens != s.tokens[..s.committed]
                        || p.uncommitted != s.tokens.len() - s.committed
                        || p.cache_salt != s.salt
                    {
                        return Err(format!("preempt returned {p:?} for {s:?}"));
                    }
                    if self.m.table(seq).is_ok() {
                        return Err("a preempted sequence is still live".into());
                    }
                    if resume {
                        let mut prompt = p.tokens;
                        prompt.push(next);
                        self.create_prefix(&prompt, p.cache_salt, true)?;
                    }
                }
            }
            Op::Step { tokens, commit } => {
                let live: Vec<SeqId> = self.seqs.keys().copied().collect();
                let batch: Vec<(SeqId, usize)> = live.iter().map(|&s| (s, 1)).collect();
                let estimate = self.m.blocks_needed_batch(&batch).map_err(kv)?;
                let free = self.m.free_blocks();
                let mut taken = 0;
                let mut all_ok = true;
                for (i, &seq) in live.iter().enumerate() {
                    taken += self.m.blocks_needed(seq, 1).map_err(kv)?;
                    all_ok &= self.reserve(seq, &[tokens[i % tokens.len()]], commit)?;
                }
                if estimate <= free && !all_ok {
                    return Err(format!(
                        "a step estimated at {estimate} blocks failed with {free} free"
                    ));
                }
                if all_ok && taken != estimate {
                    return Err(format!("a step took {taken} blocks, estimated {estimate}"));
                }
            }
            Op::Bad { kind, seq } => self.bad(kind, seq)?,
            Op::Evict { seq, keep, count } => {
                if let Some(seq) = self.pick(seq) {
                    self.evict(seq, keep, count)?;
                }
            }
            Op::DropFront { seq, count } => {
                if let Some(seq) = self.pick(seq) {
                    self.drop_front(seq, count)?;
                }
            }
            Op::CreateWindow {
                source,
                take,
                extra,
                salt,
                window,
                fill,
            } => {
                let prompt = self.prompt_from(source, take, extra);
                self.create_window(&prompt, salt, window, fill)?;
            }
        }
        Ok(())
    }

    /// Drops the first `count` full blocks as a sliding-window layer does: the blocks held
    /// keep their K/V, and ids not committed yet come with the next commit.
    fn drop_front(&mut self, seq: SeqId, count: usize) -> Check {
        let bs = self.m.block_size();
        let s = self.seqs.get_mut(&seq).ok_or("model lost a sequence")?;
        let count = count.min(s.tokens.len() / bs);
        let hi = count * bs;
        let free = self.m.free_blocks();
        let freed = self.m.table(seq).map_err(kv)?.blocks()[..count]
            .iter()
            .filter(|&&b| self.m.ref_count(b) == 1 + u32::from(self.m.is_indexed(b)))
            .count();
        self.m.drop_front(seq, count).map_err(kv)?;
        if self.m.free_blocks() != free + freed {
            return Err(format!(
                "dropping {count} blocks moved free blocks {free} -> {}",
                self.m.free_blocks()
            ));
        }
        if s.committed >= hi {
            s.committed -= hi;
        } else {
            s.unseen.extend_from_slice(&s.tokens[s.committed..hi]);
            s.committed = 0;
        }
        s.tokens.drain(..hi);
        s.expect.drain(..hi);
        Ok(())
    }

    /// Creates a sequence keeping only a `window`-token window from `prompt` through the
    /// prefix cache, checking the hit against `window_prefix_match`, then (if `fill`)
    /// reserves, writes and commits the rest of the prompt.
    fn create_window(&mut self, prompt: &[u32], salt: u64, window: usize, fill: bool) -> Check {
        let bs = self.m.block_size();
        let (n, first) = self.m.window_prefix_match(prompt, salt, window, usize::MAX);
        let (seq, reused) = self
            .m
            .create_with_window_prefix(prompt, salt, window, usize::MAX);
        if reused != n * bs || (reused > 0 && reused >= prompt.len()) {
            return Err(format!(
                "reused {reused} of {}, window_prefix_match said ({n}, {first})",
                prompt.len()
            ));
        }
        if !self.prefix_on && reused != 0 {
            return Err("reuse without a prefix cache".into());
        }
        let lo = first * bs;
        if self.m.evicted_tokens(seq).map_err(kv)? != lo.min(reused) {
            return Err("a window hit starts at the wrong block".into());
        }
        let held = &prompt[lo.min(reused)..reused];
        let mut s = ModelSeq::new(held, salt);
        s.history = prompt[..reused].to_vec();
        s.expect = (lo.min(reused)..reused)
            .map(|i| (salt, prompt[..=i].to_vec()))
            .collect();
        self.seqs.insert(seq, s);
        if fill {
            self.reserve(seq, &prompt[reused..], true)?;
        }
        Ok(())
    }

    /// Drops `count` full blocks after the first `keep` and rewrites the kept front slots,
    /// as a windowed model does with its sinks. A copy that does not fit or a commit
    /// boundary inside the dropped blocks must fail and change nothing.
    fn evict(&mut self, seq: SeqId, keep: usize, count: usize) -> Check {
        let bs = self.m.block_size();
        let s = self.seqs.get_mut(&seq).ok_or("model lost a sequence")?;
        let full = s.tokens.len() / bs;
        let keep = keep.min(full);
        let count = count.min(full - keep);
        let (lo, hi) = (keep * bs, (keep + count) * bs);
        let free = self.m.free_blocks();
        // Dropped blocks that only this sequence (and perhaps the index) holds become free.
        let freed = self.m.table(seq).map_err(kv)?.blocks()[keep..keep + count]
            .iter()
            .filter(|&&b| self.m.ref_count(b) == 1 + u32::from(self.m.is_indexed(b)))
            .count();
        let before = self.m.clone();
        let refused = (s.committed > lo && s.committed < hi) || (count > 0 && !s.unseen.is_empty());
        let copies = match self.m.evict_window(seq, keep, count) {
            Ok(c) => c,
            Err(KvError::InvalidArgument { .. }) if refused && self.m == before => return Ok(()),
            Err(KvError::CacheFull { .. }) if self.m == before => return Ok(()),
            Err(e) => return Err(format!("evict_window({keep}, {count}): {e}")),
        };
        if refused {
            return Err("eviction inside the committed or unseen ids succeeded".into());
        }
        if self.m.free_blocks() + copies.len() != free + freed {
            return Err(format!(
                "eviction of {count} blocks with {} copies moved free blocks {free} -> {}",
                copies.len(),
                self.m.free_blocks()
            ));
        }
        if count == 0 {
            // Nothing evicted, nothing made private: no rewrite may follow.
            return if copies.is_empty() && self.m == before {
                Ok(())
            } else {
                Err("evicting 0 blocks changed the manager".into())
            };
        }
        self.store.copy(&copies);
        s.tokens.drain(lo..hi);
        s.expect.drain(lo..hi);
        if s.committed >= hi {
            s.committed -= hi - lo;
        }
        // The caller rewrites the sinks (re-rotated keys) after the copies.
        let table = self.m.table(seq).map_err(kv)?;
        for i in 0..lo {
            let slot = table.slot(i, bs).ok_or("no slot for a kept token")?;
            let content = (
                s.salt,
                vec![REWRITTEN, s.history.len() as u32, i as u32, REWRITTEN],
            );
            self.store.write_content(slot, content.clone());
            s.expect[i] = content;
        }
        Ok(())
    }

    /// Invalid calls: a typed error and no change.
    fn bad(&mut self, kind: u8, ix: usize) -> Check {
        let unknown = SeqId::from_raw(self.seqs.keys().last().map_or(0, |s| s.raw() + 1000));
        let live = self.pick(ix);
        let before = self.m.clone();
        let got = match (kind, live) {
            (0, _) => self.m.reserve(unknown, 1).map(|_| ()),
            (1, Some(s)) => self.m.truncate(s, self.seqs[&s].tokens.len() + 1),
            (2, Some(s)) => {
                let m = &self.seqs[&s];
                let too_many = vec![0; m.unseen.len() + m.tokens.len() - m.committed + 1];
                self.m.commit(s, &too_many)
            }
            (3, _) => self.m.free(unknown),
            (4, _) => self.m.fork(unknown).map(|_| ()),
            (5, Some(s)) => self.m.blocks_needed_batch(&[(s, 1), (s, 2)]).map(|_| ()),
            (6, Some(s)) => {
                let full = self.seqs[&s].tokens.len() / self.m.block_size();
                self.m.evict_window(s, full, 1).map(|_| ())
            }
            (7, Some(s)) => {
                let full = self.seqs[&s].tokens.len() / self.m.block_size();
                self.m.drop_front(s, full + 1)
            }
            _ => return Ok(()),
        };
        match got {
            Ok(()) => Err(format!("bad call {kind} succeeded")),
            Err(
                KvError::UnknownSequence { .. }
                | KvError::OutOfRange { .. }
                | KvError::InvalidArgument { .. },
            ) => {
                if self.m == before {
                    Ok(())
                } else {
                    Err(format!("bad call {kind} changed the manager"))
                }
            }
            Err(e) => Err(format!("bad call {kind} gave {e}")),
        }
    }

    fn check(&self) -> Check {
        check_holders(&self.m)?;
        let live: Vec<SeqId> = self.m.sequences().collect();
        if live.iter().ne(self.seqs.keys()) {
            return Err(format!(
                "manager has {live:?}, model {:?}",
                self.seqs.keys()
            ));
        }
        for (&seq, s) in &self.seqs {
            if self.m.tokens(seq).map_err(kv)? != &s.tokens[..s.committed] {
                return Err(format!("sequence {seq}: committed ids differ"));
            }
            check_contents(&self.store, &self.m, seq, &s.expect)?;
        }
        self.store.check_index(&self.m)?;
        if !self.prefix_on && (self.m.stats().indexed_blocks != 0 || self.m.cached_blocks() != 0) {
            return Err("blocks indexed without a prefix cache".into());
        }
        Ok(())
    }
}

fn run(block_size: usize, num_blocks: usize, prefix_on: bool, ops: &[Op]) -> Check {
    let mut h = Harness::new(block_size, num_blocks, prefix_on)?;
    for (i, op) in ops.iter().enumerate() {
        h.apply(op).map_err(|e| format!("step {i} {op:?}: {e}"))?;
        h.check()
            .map_err(|e| format!("after step {i} {op:?}: {e}"))?;
    }
    // Freeing everything leaves every block empty or cached.
    for seq in h.seqs.keys().copied().collect::<Vec<_>>() {
        h.m.free(seq).map_err(kv)?;
        h.seqs.remove(&seq);
        h.check()?;
    }
    if h.m.used_blocks() != 0 || h.m.free_blocks() != h.m.total_blocks() {
        return Err(format!("blocks leaked: {:?}", h.m.stats()));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn manager_matches_model(
        block_size in 1usize..=4,
        num_blocks in 1usize..=20,
        prefix_on in prop::bool::weighted(0.85),
        ops in prop::collection::vec(op(), 1..64),
    ) {
        run(block_size, num_blocks, prefix_on, &ops).map_err(TestCaseError::fail)?;
    }
}

/// A sliding-window layer's program: a prompt committed, its front dropped, more tokens
/// dropped before their commit, then a window hit on the whole text and a plain one.
#[test]
fn scripted_window_program_matches_model() -> Result<(), String> {
    let ops = vec![
        Op::CreatePrefix {
            source: 0,
            take: 0,
            extra: vec![1, 2, 1, 2, 0, 1, 2],
            salt: 0,
            fill: true,
        },
        Op::DropFront { seq: 0, count: 1 },
        Op::Append {
            seq: 0,
            tokens: vec![0, 0, 1, 2, 2],
            commit: false,
        },
        Op::DropFront { seq: 0, count: 3 },
        Op::Commit { seq: 0 },
        Op::Bad { kind: 7, seq: 0 },
        Op::Free { seq: 0 },
        Op::CreateWindow {
            source: 1,
            take: 100,
            extra: vec![1],
            salt: 0,
            window: 3,
            fill: true,
        },
        Op::DropFront { seq: 0, count: 2 },
        Op::Step {
            tokens: vec![2, 0],
            commit: true,
        },
        Op::CreatePrefix {
            source: 1,
            take: 9,
            extra: vec![0],
            salt: 0,
            fill: true,
        },
        Op::Evict {
            seq: 0,
            keep: 1,
            count: 1,
        },
    ];
    for (bs, nb) in [(1, 16), (2, 10), (3, 8), (4, 6)] {
        run(bs, nb, true, &ops)?;
        run(bs, nb, false, &ops)?;
    }
    Ok(())
}

/// A fixed program that exercises the paths random programs reach only sometimes, so a
/// regression there fails on every run.
#[test]
fn scripted_program_matches_model() -> Result<(), String> {
    let ops = vec![
        Op::CreatePrefix {
            source: 0,
            take: 0,
            extra: vec![1, 2, 1, 2, 0, 1, 2],
            salt: 0,
            fill: true,
        },
        Op::Fork { seq: 0 },
        Op::Truncate {
            seq: 0,
            percent: 60,
        }, // into a shared indexed block
        Op::Append {
            seq: 0,
            tokens: vec![2, 2, 2],
            commit: true,
        }, // must copy it
        Op::Free { seq: 1 },
        Op::CreatePrefix {
            source: 0,
            take: 7,
            extra: vec![0],
            salt: 0,
            fill: true,
        },
        Op::CreatePrefix {
            source: 0,
            take: 7,
            extra: vec![0],
            salt: 1,
            fill: true,
        },
        Op::Step {
            tokens: vec![1],
            commit: true,
        },
        Op::Preempt {
            seq: 0,
            resume: true,
            next: 2,
        },
        Op::Truncate {
            seq: 1,
            percent: 50,
        },
        Op::Step {
            tokens: vec![2, 0],
            commit: false,
        },
        Op::Commit { seq: 2 },
        Op::Bad { kind: 1, seq: 0 },
        Op::Bad { kind: 2, seq: 1 },
        Op::Fork { seq: 1 },
        Op::Append {
            seq: 1,
            tokens: vec![0, 1, 2, 0, 1, 2, 0, 1],
            commit: true,
        },
        Op::Evict {
            seq: 1,
            keep: 1,
            count: 2,
        }, // sinks shared with the fork and the index: copied
        Op::Step {
            tokens: vec![1],
            commit: true,
        },
        Op::Evict {
            seq: 1,
            keep: 1,
            count: 1,
        }, // now private: rewritten in place
        Op::Bad { kind: 6, seq: 1 },
        Op::CreatePrefix {
            source: 0,
            take: 20,
            extra: vec![2],
            salt: 0,
            fill: true,
        },
    ];
    for (bs, nb) in [(1, 12), (2, 8), (3, 6), (4, 4)] {
        run(bs, nb, true, &ops)?;
        run(bs, nb, false, &ops)?;
    }
    Ok(())
}
