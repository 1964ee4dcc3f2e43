//! Prefix reuse, eviction, copy-on-write and capacity, one behaviour per test.

mod common;

use common::{check_holders, SimStorage};
use kv_core::{CacheManager, KvError, Result, SeqId, SharedCacheManager};

/// Creates a sequence through the prefix cache and computes the rest of `prompt` the way a
/// model would: reserve, write, commit.
fn admit(
    m: &mut CacheManager,
    store: &mut SimStorage,
    prompt: &[u32],
    salt: u64,
) -> Result<(SeqId, usize)> {
    let (seq, reused) = m.create_with_prefix_salted(prompt, salt);
    let a = m.reserve(seq, prompt.len() - reused)?;
    store.copy(&a.copies);
    store.write(&a.slots, salt, prompt, reused);
    m.commit(seq, &prompt[reused..])?;
    Ok((seq, reused))
}

fn reuse(m: &CacheManager, prompt: &[u32]) -> usize {
    m.prefix_match(prompt, 0).tokens
}

fn check(m: &CacheManager, store: &SimStorage) {
    check_holders(m).expect("bookkeeping consistent");
    store
        .check_index(m)
        .expect("indexed blocks hold their tokens");
}

#[test]
fn freed_prefix_is_reused_and_counted_free() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(4, 8, 1)?;
    let mut store = SimStorage::new(4, 8);
    let prompt: Vec<u32> = (0..10).collect();
    let (a, reused) = admit(&mut m, &mut store, &prompt, 0)?;
    assert_eq!(reused, 0);
    assert_eq!(m.stats().indexed_blocks, 2); // the partly filled third block is not
    m.free(a)?;
    assert_eq!(
        (m.cached_blocks(), m.used_blocks(), m.free_blocks()),
        (2, 0, 8)
    );

    let (b, reused) = admit(&mut m, &mut store, &prompt, 0)?;
    assert_eq!(reused, 8);
    assert_eq!(m.cached_blocks(), 0);
    assert_eq!(m.used_blocks(), 3);
    store
        .check_sequence(&m, b, 0, &prompt)
        .expect("reads its own tokens");
    let stats = m.stats();
    assert_eq!(
        (stats.prefix_query_tokens, stats.prefix_hit_tokens),
        (20, 8)
    );
    check(&m, &store);
    Ok(())
}

#[test]
fn eviction_is_least_recently_released_first() -> Result<()> {
    // 4 blocks of 2; three one-block prompts are cached, released in the order A, C, B.
    let mut m = CacheManager::with_prefix_cache(2, 4, 0)?;
    let mut store = SimStorage::new(2, 4);
    let (pa, pb, pc) = ([1, 1, 9], [2, 2, 9], [3, 3, 9]);
    let (a, _) = admit(&mut m, &mut store, &pa, 0)?;
    m.truncate(a, 2)?; // drop the partial block, keep the indexed one
    let (b, _) = admit(&mut m, &mut store, &pb, 0)?;
    m.truncate(b, 2)?;
    let (c, _) = admit(&mut m, &mut store, &pc, 0)?;
    m.truncate(c, 2)?;
    m.free(a)?;
    m.free(c)?;
    m.free(b)?;
    assert_eq!((m.cached_blocks(), m.free_blocks()), (3, 4));

    // The one empty block goes first: nothing is evicted.
    let d = m.create_sequence();
    m.reserve(d, 2)?;
    assert_eq!((reuse(&m, &pa), reuse(&m, &pb), reuse(&m, &pc)), (2, 2, 2));
    // Then the oldest cached: A, then C.
    m.reserve(d, 2)?;
    assert_eq!((reuse(&m, &pa), reuse(&m, &pb), reuse(&m, &pc)), (0, 2, 2));
    // Reusing B makes it the youngest when it is released again.
    let (e, reused) = m.create_with_prefix(&pb);
    assert_eq!(reused, 2);
    m.free(e)?;
    m.reserve(d, 2)?;
    assert_eq!((reuse(&m, &pa), reuse(&m, &pb), reuse(&m, &pc)), (0, 2, 0));
    assert_eq!(m.stats().evicted_blocks, 2);
    check(&m, &store);
    Ok(())
}

#[test]
fn a_released_chain_is_evicted_from_its_end() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(2, 4, 0)?;
    let mut store = SimStorage::new(2, 4);
    let prompt = [5, 6, 7, 8, 9, 10, 11];
    let (a, _) = admit(&mut m, &mut store, &prompt, 0)?;
    m.free(a)?;
    assert_eq!(reuse(&m, &prompt), 6);
    let b = m.create_sequence();
    m.reserve(b, 4)?; // the empty block, then one eviction
    assert_eq!(reuse(&m, &prompt), 4, "the last block went first");
    m.reserve(b, 2)?;
    assert_eq!(reuse(&m, &prompt), 2);
    check(&m, &store);
    Ok(())
}

#[test]
fn cache_full_only_when_empty_plus_cached_is_not_enough() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(2, 4, 0)?;
    let mut store = SimStorage::new(2, 4);
    let (a, _) = admit(&mut m, &mut store, &[1, 2, 3, 4, 5, 6, 7, 8], 0)?;
    m.free(a)?;
    assert_eq!((m.cached_blocks(), m.free_blocks()), (4, 4));
    let b = m.create_sequence();
    let before = m.clone();
    assert!(matches!(
        m.reserve(b, 9),
        Err(KvError::CacheFull { needed: 5, free: 4 })
    ));
    assert_eq!(m, before, "a failed append evicts nothing");
    assert_eq!(m.reservable_tokens(b)?, 8);
    m.reserve(b, 8)?;
    assert_eq!(
        (m.cached_blocks(), m.free_blocks(), m.stats().evicted_blocks),
        (0, 0, 4)
    );
    check(&m, &store);
    Ok(())
}

#[test]
fn salts_separate_namespaces() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(2, 8, 7)?;
    assert_eq!(m.prefix_cache_salt(), Some(7));
    let mut store = SimStorage::new(2, 8);
    let prompt = [4, 4, 4, 4, 4];
    let (a, _) = admit(&mut m, &mut store, &prompt, 1)?;
    m.free(a)?;
    assert_eq!(m.prefix_match(&prompt, 1).tokens, 4);
    assert_eq!(m.prefix_match(&prompt, 0).tokens, 0);
    assert_eq!(m.prefix_match(&prompt, 2).tokens, 0);
    let (b, reused) = admit(&mut m, &mut store, &prompt, 2)?;
    assert_eq!(reused, 0);
    store
        .check_sequence(&m, b, 2, &prompt)
        .expect("own namespace");
    assert_eq!(
        m.stats().indexed_blocks,
        4,
        "both namespaces cached side by side"
    );
    check(&m, &store);
    // Without the prefix cache nothing is indexed or reused.
    let mut plain = CacheManager::new(2, 8)?;
    let mut plain_store = SimStorage::new(2, 8);
    assert_eq!(plain.prefix_cache_salt(), None);
    let (c, _) = admit(&mut plain, &mut plain_store, &prompt, 1)?;
    plain.free(c)?;
    assert_eq!(plain.create_with_prefix_salted(&prompt, 1).1, 0);
    assert_eq!(plain.stats().indexed_blocks, 0);
    check(&plain, &plain_store);
    Ok(())
}

#[test]
fn partial_blocks_and_whole_prompts_are_never_reused() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(4, 8, 0)?;
    let mut store = SimStorage::new(4, 8);
    let (a, _) = admit(&mut m, &mut store, &[1, 2, 3, 4, 5, 6], 0)?;
    let blocks = m.table(a)?.blocks().to_vec();
    assert!(m.is_indexed(blocks[0]) && !m.is_indexed(blocks[1]));
    m.free(a)?;
    assert_eq!(
        reuse(&m, &[1, 2, 3, 4, 5, 6, 7, 8, 9]),
        4,
        "partial block not reused"
    );

    let (b, _) = admit(&mut m, &mut store, &[1, 2, 3, 4, 5, 6, 7, 8], 0)?;
    m.free(b)?;
    assert_eq!(
        reuse(&m, &[1, 2, 3, 4, 5, 6, 7, 8]),
        4,
        "the last token is recomputed"
    );
    assert_eq!(reuse(&m, &[1, 2, 3, 4, 5, 6, 7, 8, 0]), 8);
    assert_eq!(reuse(&m, &[1, 2, 3, 4]), 0);
    assert_eq!(reuse(&m, &[]), 0);
    check(&m, &store);
    Ok(())
}

#[test]
fn uncommitted_tokens_are_never_indexed() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(2, 4, 0)?;
    let a = m.create_sequence();
    m.reserve(a, 4)?;
    m.commit(a, &[1, 2, 3])?; // the second block is written but not committed
    assert_eq!(m.stats().indexed_blocks, 1);
    let paused = m.preempt(a)?;
    assert_eq!(
        (paused.tokens.as_slice(), paused.uncommitted),
        (&[1, 2, 3][..], 1)
    );
    assert_eq!(m.cached_blocks(), 1);
    check_holders(&m).expect("consistent");
    Ok(())
}

#[test]
fn duplicate_computation_indexes_one_block() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(2, 8, 0)?;
    let mut store = SimStorage::new(2, 8);
    // Two requests with the same prompt admitted before either commits.
    let (a, ra) = m.create_with_prefix(&[1, 2, 3]);
    let (b, rb) = m.create_with_prefix(&[1, 2, 3]);
    assert_eq!((ra, rb), (0, 0));
    for seq in [a, b] {
        let w = m.reserve(seq, 3)?;
        store.write(&w.slots, 0, &[1, 2, 3], 0);
    }
    m.commit(a, &[1, 2, 3])?;
    m.commit(b, &[1, 2, 3])?;
    assert_eq!(m.stats().indexed_blocks, 1);
    m.free(a)?;
    m.free(b)?;
    assert_eq!((m.cached_blocks(), m.free_blocks()), (1, 8));
    check(&m, &store);
    Ok(())
}

#[test]
fn truncating_into_a_shared_indexed_block_copies_before_writing() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(4, 8, 0)?;
    let mut store = SimStorage::new(4, 8);
    let prompt = [1, 2, 3, 4, 5];
    let (a, _) = admit(&mut m, &mut store, &prompt, 0)?;
    let (b, reused) = admit(&mut m, &mut store, &prompt, 0)?;
    assert_eq!(reused, 4);
    let shared = m.table(a)?.blocks()[0];
    assert_eq!(m.ref_count(shared), 3); // a, b and the index

    // Speculative rollback of `a` into the shared, indexed block, then new tokens.
    m.truncate(a, 2)?;
    assert!(m.is_indexed(shared), "b still holds it: it stays indexed");
    let w = m.reserve(a, 3)?;
    assert_eq!(w.copies.len(), 1);
    assert_eq!(w.copies[0].0, shared);
    store.copy(&w.copies);
    let a_tokens = [1, 2, 7, 7, 7];
    store.write(&w.slots, 0, &a_tokens, 2);
    m.commit(a, &a_tokens[2..])?;
    store
        .check_sequence(&m, a, 0, &a_tokens)
        .expect("a sees its rewrite");
    store.check_sequence(&m, b, 0, &prompt).expect("b does not");
    assert_eq!(m.indexed_tokens(shared), Some(&[1, 2, 3, 4][..]));
    assert_eq!(reuse(&m, &[1, 2, 3, 4, 0]), 4);
    assert_eq!(
        reuse(&m, &[1, 2, 7, 7, 0]),
        4,
        "a's new block is indexed too"
    );
    check(&m, &store);
    Ok(())
}

#[test]
fn truncating_into_an_indexed_block_held_alone_makes_it_private() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(4, 8, 0)?;
    let mut store = SimStorage::new(4, 8);
    let (a, _) = admit(&mut m, &mut store, &[1, 2, 3, 4, 5], 0)?;
    let block = m.table(a)?.blocks()[0];
    assert_eq!(m.ref_count(block), 2); // a and the index
    m.truncate(a, 3)?;
    assert!(!m.is_indexed(block), "the rejected tokens leave the index");
    assert_eq!(m.ref_count(block), 1);
    let w = m.reserve(a, 1)?;
    assert!(w.copies.is_empty(), "private again: written in place");
    store.write(&w.slots, 0, &[1, 2, 3, 9], 3);
    m.commit(a, &[9])?;
    assert_eq!(reuse(&m, &[1, 2, 3, 4, 5]), 0);
    assert_eq!(reuse(&m, &[1, 2, 3, 9, 5]), 4);
    check(&m, &store);
    Ok(())
}

#[test]
fn a_reused_block_is_never_written_by_a_fork() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(2, 8, 0)?;
    let mut store = SimStorage::new(2, 8);
    let (a, _) = admit(&mut m, &mut store, &[1, 2, 3, 4, 5], 0)?;
    let b = m.fork(a)?;
    m.truncate(b, 3)?;
    let w = m.reserve(b, 1)?;
    assert_eq!(w.copies.len(), 1, "the indexed block b cut into is copied");
    store.copy(&w.copies);
    store.write(&w.slots, 0, &[1, 2, 3, 0], 3);
    store
        .check_sequence(&m, a, 0, &[1, 2, 3, 4, 5])
        .expect("a unchanged");
    store
        .check_sequence(&m, b, 0, &[1, 2, 3, 0])
        .expect("b sees its own");
    check(&m, &store);
    Ok(())
}

#[test]
fn capacity_queries_agree_with_append() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(4, 6, 0)?;
    let a = m.create_sequence();
    m.reserve(a, 6)?; // one full block, one half full
    let forks: Vec<SeqId> = (0..3).map(|_| m.fork(a)).collect::<Result<_>>()?;
    // Four holders of a half-full block: the first three writers copy, the last writes in
    // place.
    let step: Vec<(SeqId, usize)> = std::iter::once(a)
        .chain(forks.iter().copied())
        .map(|s| (s, 1))
        .collect();
    assert_eq!(m.blocks_needed_batch(&step)?, 3);
    assert_eq!(m.blocks_needed(a, 1)?, 1);
    assert_eq!(m.free_blocks(), 4);
    assert_eq!(m.reservable_tokens(a)?, 2 + 3 * 4);
    for &(seq, n) in &step {
        m.reserve(seq, n)?;
    }
    assert_eq!(m.free_blocks(), 1);
    assert_eq!(m.reservable_tokens(a)?, 1 + 4);
    let fresh = m.create_sequence();
    assert_eq!(m.reservable_tokens(fresh)?, 4);
    assert_eq!(m.blocks_needed(fresh, 5)?, 2);
    assert!(matches!(
        m.reserve(fresh, 5),
        Err(KvError::CacheFull { needed: 2, free: 1 })
    ));
    check_holders(&m).expect("consistent");
    Ok(())
}

#[test]
fn preempted_sequence_resumes_from_its_cached_blocks() -> Result<()> {
    let mut m = CacheManager::with_prefix_cache(2, 4, 0)?;
    let mut store = SimStorage::new(2, 4);
    let (a, _) = admit(&mut m, &mut store, &[1, 2, 3, 4, 5], 0)?;
    let b = m.create_sequence();
    assert!(m.reserve(b, 4).is_err(), "full: a must pause");
    let paused = m.preempt(a)?;
    assert_eq!(paused.tokens, [1, 2, 3, 4, 5]);
    m.reserve(b, 2)?; // takes the empty block; a's cached blocks survive
    let mut prompt = paused.tokens.clone();
    prompt.push(6);
    assert_eq!(m.prefix_match(&prompt, paused.cache_salt).tokens, 4);
    let (resumed, reused) = admit(&mut m, &mut store, &prompt, paused.cache_salt)?;
    assert_eq!(reused, 4);
    store
        .check_sequence(&m, resumed, 0, &prompt)
        .expect("resumed intact");
    check(&m, &store);
    Ok(())
}

#[test]
fn managers_are_shareable_between_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<CacheManager>();
    shareable::<SharedCacheManager>();
}
