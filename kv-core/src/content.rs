//! Stable content addresses of cache blocks, for caches that outlive the process.
//!
//! A block's K/V depends on every token before it, on the model that computed it and on the
//! layout it is stored in. [`block_key`] hashes exactly that, with xxh3-128 over a fixed
//! little-endian encoding: the parent block's key, the model's [`Fingerprint`], the layout's
//! name, the block size and the block's token ids. The same block gets the same key in every
//! process, on every machine and with every Rust version (unlike std's `DefaultHasher`, which
//! promises none of that), so keys can name blocks in files, on disk and in a shared store.
//!
//! ```
//! use kv_core::content::{block_key, Fingerprint};
//! use kv_core::KvDType;
//! let model = Fingerprint::of_parts(&[("arch", b"llama"), ("weights", b"...")]);
//! let first = block_key(None, &[1, 2, 3, 4], &model, KvDType::F16);
//! let second = block_key(Some(first), &[5, 6, 7, 8], &model, KvDType::F16);
//! assert_ne!(first, second);
//! // A block's key names its whole prefix: another first block, another second key.
//! let other = block_key(None, &[1, 2, 3, 9], &model, KvDType::F16);
//! assert_ne!(block_key(Some(other), &[5, 6, 7, 8], &model, KvDType::F16), second);
//! // Keys print as 32 hex digits and parse back.
//! assert_eq!(second.to_string().parse::<kv_core::content::BlockKey>(), Ok(second));
//! ```
//!
//! The hash is not cryptographic: a shared store trusts the engines that write to it, and
//! every stored value carries a checksum for corruption, not for forgery.

use std::fmt;
use std::str::FromStr;

use xxhash_rust::xxh3::Xxh3;

use crate::KvDType;

/// Domain tag of block keys; a new encoding gets a new tag.
const BLOCK_TAG: &[u8] = b"kv-block-key-v1";
/// Domain tag of fingerprints.
const FINGERPRINT_TAG: &[u8] = b"kv-fingerprint-v1";

/// 128 bits identifying a model and cache configuration whose K/V are interchangeable:
/// architecture, shape, layout, block size, tokenizer, weight tensor infos. Blocks saved
/// under one fingerprint are never used under another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 16]);

impl Fingerprint {
    /// Hashes named parts (each name and value length-prefixed, in order), so that no two
    /// different lists of parts give the same input bytes.
    pub fn of_parts(parts: &[(&str, &[u8])]) -> Self {
        let mut h = Xxh3::new();
        h.update(FINGERPRINT_TAG);
        h.update(&(parts.len() as u64).to_le_bytes());
        for (name, value) in parts {
            write_bytes(&mut h, name.as_bytes());
            write_bytes(&mut h, value);
        }
        Self(h.digest128().to_le_bytes())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// The content address of one full cache block: see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub [u8; 16]);

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// A string that is not 32 hex digits, given where a [`BlockKey`] was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a block key is 32 hex digits, not {0:?}")]
pub struct ParseKeyError(String);

impl FromStr for BlockKey {
    type Err = ParseKeyError;
    fn from_str(s: &str) -> Result<Self, ParseKeyError> {
        let bad = || ParseKeyError(s.chars().take(40).collect());
        let b = s.as_bytes();
        if b.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16).ok_or_else(bad);
            out[i] = (digit(pair[0])? << 4 | digit(pair[1])?) as u8;
        }
        Ok(Self(out))
    }
}

/// The key of the full block holding `tokens`, after the prefix whose last block's key is
/// `parent` (`None` for a sequence's first block), computed by the model `fingerprint` and
/// stored in `layout`. The block size is the number of tokens.
pub fn block_key(
    parent: Option<BlockKey>,
    tokens: &[u32],
    fingerprint: &Fingerprint,
    layout: KvDType,
) -> BlockKey {
    let mut h = Xxh3::new();
    h.update(BLOCK_TAG);
    match parent {
        None => h.update(&[0]),
        Some(p) => {
            h.update(&[1]);
            h.update(&p.0);
        }
    }
    h.update(&fingerprint.0);
    write_bytes(&mut h, layout.to_string().as_bytes());
    h.update(&(tokens.len() as u64).to_le_bytes());
    for &t in tokens {
        h.update(&t.to_le_bytes());
    }
    BlockKey(h.digest128().to_le_bytes())
}

/// The keys of every full block of `tokens` in blocks of `block_size`, in order (a partial
/// last block has none). A `block_size` of zero gives no keys.
pub fn chain_keys(
    tokens: &[u32],
    block_size: usize,
    fingerprint: &Fingerprint,
    layout: KvDType,
) -> Vec<BlockKey> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut keys: Vec<BlockKey> = Vec::with_capacity(tokens.len() / block_size);
    for chunk in tokens.chunks_exact(block_size) {
        let key = block_key(keys.last().copied(), chunk, fingerprint, layout);
        keys.push(key);
    }
    keys
}

/// Length-prefixed bytes.
fn write_bytes(h: &mut Xxh3, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys are a persistent format: these values must never change for a given input.
    /// (If the encoding has to change, change the domain tag and these values together.)
    /// The three values were computed independently from this module's documented encoding
    /// with the Python `xxhash` package's `xxh3_128`, not copied from this code's output.
    #[test]
    fn golden_values() {
        let fp = Fingerprint::of_parts(&[("arch", b"llama"), ("layers", &30u32.to_le_bytes())]);
        assert_eq!(fp.to_string(), GOLDEN_FINGERPRINT);
        let first = block_key(None, &[1, 2, 3, 4], &fp, KvDType::F16);
        assert_eq!(first.to_string(), GOLDEN_FIRST);
        let second = block_key(
            Some(first),
            &[5, 6, 7, 8],
            &fp,
            KvDType::Int4 {
                group: crate::QuantGroup::G32,
            },
        );
        assert_eq!(second.to_string(), GOLDEN_SECOND);
        // The underlying hash itself, pinned against the published xxh3-128 of "" (seed 0).
        assert_eq!(
            xxhash_rust::xxh3::xxh3_128(b""),
            0x99aa06d3014798d86001c324468d497f
        );
    }

    const GOLDEN_FINGERPRINT: &str = "08c500662945bc12b317163fca68b610";
    const GOLDEN_FIRST: &str = "5030fc1b66d1eec1b6fdcf29d36faaf2";
    const GOLDEN_SECOND: &str = "5c1531e1ad414911c2895425750edb48";

    #[test]
    fn keys_separate_every_input() {
        let fp = Fingerprint::of_parts(&[("m", b"a")]);
        let fp2 = Fingerprint::of_parts(&[("m", b"b")]);
        let k = block_key(None, &[1, 2], &fp, KvDType::F16);
        assert_eq!(k, block_key(None, &[1, 2], &fp, KvDType::F16));
        assert_ne!(
            k,
            block_key(None, &[1, 2], &fp2, KvDType::F16),
            "fingerprint"
        );
        assert_ne!(k, block_key(None, &[1, 2], &fp, KvDType::F32), "layout");
        assert_ne!(k, block_key(Some(k), &[1, 2], &fp, KvDType::F16), "parent");
        assert_ne!(k, block_key(None, &[2, 1], &fp, KvDType::F16), "order");
        assert_ne!(k, block_key(None, &[1, 2, 0], &fp, KvDType::F16), "length");
        // Parts are length-prefixed: moving a byte between name and value changes the hash.
        assert_ne!(
            Fingerprint::of_parts(&[("ab", b"c")]),
            Fingerprint::of_parts(&[("a", b"bc")])
        );
    }

    #[test]
    fn chain_keys_follow_block_key() {
        let fp = Fingerprint::of_parts(&[]);
        let keys = chain_keys(&[1, 2, 3, 4, 5], 2, &fp, KvDType::F32);
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], block_key(None, &[1, 2], &fp, KvDType::F32));
        assert_eq!(
            keys[1],
            block_key(Some(keys[0]), &[3, 4], &fp, KvDType::F32)
        );
        assert!(chain_keys(&[1], 0, &fp, KvDType::F32).is_empty());
    }

    #[test]
    fn keys_parse_back_and_refuse_junk() {
        let k = BlockKey([0xab; 16]);
        assert_eq!(k.to_string().parse::<BlockKey>(), Ok(k));
        assert!("xyz".parse::<BlockKey>().is_err());
        assert!("g".repeat(32).parse::<BlockKey>().is_err());
        assert!("é".repeat(16).parse::<BlockKey>().is_err());
    }
}
