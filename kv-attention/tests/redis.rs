//! The Redis tier against a real `redis-server` (feature `redis`): `KV_REDIS_SERVER` or
//! one on `PATH` (`cargo xtask redis` installs Debian's when absent). Each test starts its
//! own server on 127.0.0.1 on a free port with a temporary directory, and the guard kills
//! it when the test ends, passing or failing.
#![cfg(feature = "redis")]
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use kv_attention::cache_file;
use kv_attention::redis_server::RedisServer;
use kv_attention::store::{BlockStore, RedisStore, StoreError};
use kv_core::content::{BlockKey, Fingerprint};

fn key(i: u8) -> BlockKey {
    BlockKey([i; 16])
}

fn store(server: &RedisServer) -> RedisStore {
    RedisStore::new(&server.url(), 60, Duration::from_secs(2)).unwrap()
}

#[test]
fn get_put_contains_delete_and_batches() {
    let server = RedisServer::start().unwrap();
    let mut s = store(&server);
    assert_eq!(s.get(&key(1)).unwrap(), None);
    s.put(&key(1), b"one").unwrap();
    assert_eq!(s.get(&key(1)).unwrap().as_deref(), Some(&b"one"[..]));
    assert!(s.contains(&key(1)).unwrap());
    let items: Vec<(BlockKey, Vec<u8>)> = (2..40).map(|i| (key(i), vec![i; 1000])).collect();
    s.put_many(&items).unwrap();
    let keys: Vec<BlockKey> = (0..41).map(key).collect();
    let got = s.get_many(&keys).unwrap();
    assert_eq!(got.len(), 41);
    assert_eq!(got[0], None);
    assert_eq!(got[1].as_deref(), Some(&b"one"[..]));
    for (i, v) in got.iter().enumerate().take(40).skip(2) {
        assert_eq!(v, &Some(vec![i as u8; 1000]));
    }
    assert_eq!(got[40], None);
    assert_eq!(
        s.contains_many(&[key(0), key(5), key(40)]).unwrap(),
        [false, true, false]
    );
    assert!(s.delete(&key(5)).unwrap());
    assert!(!s.delete(&key(5)).unwrap());
    // Every value carries a TTL.
    let client = redis::Client::open(server.url()).unwrap();
    let mut c = client.get_connection().unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("kv:block:{}", key(1)))
        .query(&mut c)
        .unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
}

#[test]
fn a_store_down_at_start_fails_fast_and_recovers() {
    let server = RedisServer::start().unwrap();
    let url = server.url();
    drop(server); // nothing listens there now
    let mut s = RedisStore::new(&url, 60, Duration::from_millis(500)).unwrap();
    let started = Instant::now();
    assert!(matches!(
        s.get(&key(1)),
        Err(StoreError::Unavailable { .. })
    ));
    assert!(matches!(
        s.put(&key(1), b"x"),
        Err(StoreError::Unavailable { .. })
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_server_killed_mid_run_errors_then_reconnects() {
    let mut server = RedisServer::start().unwrap();
    let mut s = store(&server);
    s.put(&key(1), b"before").unwrap();
    server.kill();
    assert!(matches!(
        s.get(&key(1)),
        Err(StoreError::Unavailable { .. })
    ));
    assert!(matches!(
        s.contains(&key(1)),
        Err(StoreError::Unavailable { .. })
    ));
    server.restart().unwrap();
    // A fresh server (nothing persisted): the store reconnects and works again.
    assert_eq!(s.get(&key(1)).unwrap(), None);
    s.put(&key(2), b"after").unwrap();
    assert!(s.contains(&key(2)).unwrap());
    drop(server);
}

#[test]
fn values_keep_their_checksum_and_fingerprint_through_redis() {
    let server = RedisServer::start().unwrap();
    let mut s = store(&server);
    let fp = Fingerprint::of_parts(&[("model", b"a")]);
    let value = cache_file::encode_value(&fp, &key(3), b"block bytes");
    s.put(&key(3), &value).unwrap();
    let back = s.get(&key(3)).unwrap().unwrap();
    assert_eq!(
        cache_file::decode_value(&fp, &key(3), &back).unwrap(),
        b"block bytes"
    );
    // Another model's fingerprint: never used.
    let other = Fingerprint::of_parts(&[("model", b"b")]);
    assert!(cache_file::decode_value(&other, &key(3), &back).is_err());
    // A flipped bit on the server: detected.
    let mut flipped = back.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 4;
    s.put(&key(3), &flipped).unwrap();
    let back = s.get(&key(3)).unwrap().unwrap();
    assert!(matches!(
        cache_file::decode_value(&fp, &key(3), &back),
        Err(cache_file::CacheFileError::Checksum { .. })
    ));
}
