//! Size arithmetic at the edges: every overflow is a typed error, never a wrapped number.
#![allow(clippy::unwrap_used)]

use kv_core::{memory, CacheManager, KvDType, KvError, ModelShape, StorageSpec};

#[test]
fn storage_spec_refuses_capacities_that_overflow() {
    let smol = ModelShape::preset("smollm2-135m").unwrap();
    // More tokens per block than slot offsets can number.
    assert!(matches!(
        StorageSpec::new(smol, KvDType::F16, usize::MAX, 2),
        Err(KvError::InvalidArgument { .. })
    ));
    // Tokens fit, bytes do not (23,040 bytes a token).
    let err = StorageSpec::new(smol, KvDType::F16, 1 << 31, 1 << 20).unwrap_err();
    assert!(
        matches!(
            err,
            KvError::Overflow {
                what: "cache bytes",
                ..
            }
        ),
        "{err}"
    );
    // A huge layer count overflows bytes per token.
    let deep = ModelShape::new(usize::MAX / 4, 9, 3, 64).unwrap();
    assert!(matches!(
        StorageSpec::new(deep, KvDType::F16, 16, 1),
        Err(KvError::Overflow {
            what: "bytes per token",
            ..
        })
    ));
    // The largest spec that fits is accepted and exact.
    let per_token = memory::bytes_per_token(&smol, KvDType::F16).unwrap() as u64;
    // (The largest block, so that the block count stays within what block ids number.)
    let block = u32::MAX as usize;
    let blocks = (u64::MAX / per_token / block as u64) as usize;
    let spec = StorageSpec::new(smol, KvDType::F16, block, blocks).unwrap();
    assert_eq!(spec.capacity_tokens(), block * blocks);
    assert_eq!(
        spec.bytes().unwrap(),
        block as u64 * blocks as u64 * per_token
    );
    assert!(StorageSpec::new(smol, KvDType::F16, block, blocks + 1).is_err());
}

#[test]
fn hand_built_spec_reports_the_overflow() {
    let smol = ModelShape::preset("smollm2-135m").unwrap();
    let spec = StorageSpec {
        shape: smol,
        dtype: KvDType::F16,
        block_size: usize::MAX,
        num_blocks: 3,
    };
    assert!(matches!(
        spec.bytes(),
        Err(KvError::Overflow {
            what: "storage capacity",
            ..
        })
    ));
    // Never a wrapped, small capacity.
    assert_eq!(spec.capacity_tokens(), usize::MAX);
}

#[test]
fn manager_append_of_usize_max_tokens_changes_nothing() {
    let mut cache = CacheManager::new(16, 8).unwrap();
    let seq = cache.create_sequence();
    cache.reserve(seq, 5).unwrap();
    let before = cache.clone();
    // 5 + n overflows: a typed error from the planner and from append.
    for n in [usize::MAX, usize::MAX - 4] {
        assert!(matches!(
            cache.blocks_needed(seq, n),
            Err(KvError::InvalidArgument {
                what: "append length",
                ..
            })
        ));
        assert!(cache.reserve(seq, n).is_err(), "{n}");
        assert_eq!(cache, before, "{n}");
    }
    // 5 + n fits: the count of blocks is exact and the cache is full.
    let n = usize::MAX - 5;
    assert_eq!(
        cache.blocks_needed(seq, n).unwrap(),
        usize::MAX.div_ceil(16) - 1
    );
    assert!(matches!(
        cache.reserve(seq, n),
        Err(KvError::CacheFull { free: 7, .. })
    ));
    assert_eq!(cache, before);
    cache.audit().unwrap();
}

#[test]
fn largest_block_size_is_counted_exactly() {
    // One block of 2^32 - 1 tokens: room and refusals are exact, nothing is allocated per
    // token before the check.
    let max = u32::MAX as usize;
    let mut small = CacheManager::new(max, 1).unwrap();
    let seq = small.create_sequence();
    let got = small.reservable_tokens(seq).unwrap();
    assert_eq!(got, max);
    assert!(small.reserve(seq, max + 1).is_err());
    small.audit().unwrap();
}
