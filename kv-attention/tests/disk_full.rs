//! The disk tier when the disk is full, for real: this test runs itself again in a child
//! process whose file size limit the kernel enforces (`ulimit -f`, RLIMIT_FSIZE, with
//! SIGXFSZ ignored so a write past it fails with EFBIG instead of killing the process).
//! The child fills the store, sees a clean typed error, and checks that nothing changed;
//! the parent then reopens the directory without the limit and checks the same from outside.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kv_attention::store::{BlockStore, DiskStore, StoreError};
use kv_core::content::BlockKey;

/// Set in the child: the store's directory.
const CHILD_DIR: &str = "KV_DISK_FULL_DIR";
/// The child's file size limit: 8 blocks of 512 bytes (`ulimit -f` counts 512-byte blocks).
const LIMIT_BLOCKS: u64 = 8;
const LIMIT_BYTES: usize = 512 * LIMIT_BLOCKS as usize;

fn key(i: u8) -> BlockKey {
    BlockKey([i; 16])
}

/// What the store holds before the failed write.
fn kept() -> Vec<(BlockKey, Vec<u8>)> {
    vec![(key(1), vec![1; 1000]), (key(2), vec![2; LIMIT_BYTES])]
}

/// Files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The child's part: runs only under the limit, in the directory the parent named.
#[test]
fn child_fills_the_disk_tier() {
    let Some(dir) = std::env::var_os(CHILD_DIR).map(PathBuf::from) else {
        return; // Run directly: the parent test below is the one that does the work.
    };
    let mut store = DiskStore::open(&dir, 1 << 20).unwrap();
    for (k, v) in kept() {
        store.put(&k, &v).unwrap();
    }
    let files = listing(&dir);
    let bytes = store.bytes();
    // One byte past the kernel's limit: the write fails part way.
    let err = store.put(&key(3), &vec![3; LIMIT_BYTES + 1]).unwrap_err();
    match &err {
        StoreError::Full {
            store,
            size,
            source,
            ..
        } => {
            assert_eq!(store, "disk");
            assert_eq!(*size, LIMIT_BYTES as u64 + 1);
            assert_eq!(source.raw_os_error(), Some(27), "EFBIG: {source}");
        }
        other => panic!("expected StoreError::Full, got {other:?}"),
    }
    assert!(err.to_string().contains("no room"), "{err}");
    // Nothing lost, nothing half-written visible, the accounting unchanged.
    assert_eq!(listing(&dir), files);
    assert_eq!(store.bytes(), bytes);
    assert!(!store.contains(&key(3)).unwrap());
    for (k, v) in kept() {
        assert_eq!(store.get(&k).unwrap(), Some(v));
    }
    // Replacing a value with one too large keeps the old one.
    assert!(matches!(
        store.put(&key(1), &vec![9; LIMIT_BYTES + 1]),
        Err(StoreError::Full { .. })
    ));
    assert_eq!(store.get(&key(1)).unwrap(), Some(vec![1; 1000]));
    // The store goes on: a value that fits is stored.
    store.put(&key(4), &[4; 100]).unwrap();
    println!("child done");
}

#[test]
fn a_full_disk_is_a_clean_error_and_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("kv-disk-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let me = std::env::current_exe().unwrap();
    // `trap '' XFSZ` makes SIGXFSZ ignored, which exec keeps; `ulimit -f` sets RLIMIT_FSIZE.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {LIMIT_BLOCKS} && exec \"$0\" \"$@\""
        ))
        .arg(&me)
        .args([
            "child_fills_the_disk_tier",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("child done"),
        "child failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // From outside, without the limit: exactly the values put, each whole.
    let mut store = DiskStore::open(&dir, 1 << 20).unwrap();
    let mut names = listing(&dir);
    names.retain(|n| n.contains(".tmp-"));
    assert!(names.is_empty(), "temporary files left: {names:?}");
    for (k, v) in kept() {
        assert_eq!(store.get(&k).unwrap(), Some(v));
    }
    assert_eq!(store.get(&key(3)).unwrap(), None);
    assert_eq!(store.get(&key(4)).unwrap(), Some(vec![4; 100]));
    assert_eq!(store.bytes(), 1000 + LIMIT_BYTES as u64 + 100);
    std::fs::remove_dir_all(&dir).unwrap();
}
