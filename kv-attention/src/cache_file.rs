//! Saved cache blocks: the versioned on-disk format, also the wire format of the tiers.
//!
//! A cache file holds a token prefix and the blocks holding its K/V, exactly as the backend
//! stores them ([`kv_core::CacheBackend::export_block`]): quantized layouts stay quantized,
//! restoring never re-quantizes. Layout (all integers little-endian):
//!
//! ```text
//! header   magic "KVCACHE\0", version u32, fingerprint [16], backend name (u16 len + bytes),
//!          layout name (u16 len + bytes), block size u32, layers u32, q heads u32,
//!          kv heads u32, head dim u32, tokens u64, blocks u64, header checksum u64
//! tokens   tokens x u32, checksum u64
//! table    blocks x (key [16], offset u64, length u64, checksum u64), checksum u64
//! data     the blocks' bytes at their offsets
//! ```
//!
//! Checksums are xxh3-64. Files are written atomically ([`write_file`]: a temporary file in
//! the same directory, fsync, rename, fsync of the directory), so a reader sees the old file
//! or the new one, never half of one. [`CacheFile::open`] maps the file with memmap2 and
//! checks every count, length and offset against the file's size before using it, and
//! every checksum before handing out the bytes it covers: a wrong version, fingerprint or
//! checksum, a truncated or hostile file, is a [`CacheFileError`], never a panic.
//!
//! [`encode_value`] / [`decode_value`] are the same idea for one block in a store: the
//! value carries its fingerprint, key and checksum.
//!
//! ```
//! use kv_attention::cache_file::{self, BlockSet, CacheFile, Header};
//! use kv_core::content::{BlockKey, Fingerprint};
//! use kv_core::{KvDType, ModelShape};
//! let dir = std::env::temp_dir().join(format!("kv-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let header = Header {
//!     fingerprint: Fingerprint::of_parts(&[("model", b"demo")]),
//!     backend: "cpu".into(),
//!     dtype: KvDType::F16,
//!     block_size: 2,
//!     shape: ModelShape::new(1, 2, 1, 4)?,
//! };
//! let set = BlockSet {
//!     header: header.clone(),
//!     tokens: vec![1, 2],
//!     blocks: vec![(BlockKey([7; 16]), vec![1, 2, 3])],
//! };
//! let path = dir.join("prompt.kvc");
//! cache_file::write_file(&path, &set)?;
//! let file = CacheFile::open(&path, &header)?;
//! assert_eq!(file.tokens(), [1, 2]);
//! assert_eq!(file.block(0)?, (BlockKey([7; 16]), &[1u8, 2, 3][..]));
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kv_core::content::{BlockKey, Fingerprint};
use kv_core::{KvDType, ModelShape};
use memmap2::Mmap;
use xxhash_rust::xxh3::xxh3_64;

/// The first bytes of every cache file.
pub const MAGIC: [u8; 8] = *b"KVCACHE\0";
/// The first bytes of every stored block value.
pub const VALUE_MAGIC: [u8; 8] = *b"KVBLOCK\0";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Longest backend or layout name in a header.
const MAX_NAME: usize = 64;
/// Bytes of one block table entry.
const ENTRY_BYTES: usize = 16 + 8 + 8 + 8;

/// What is wrong with a cache file or stored value. Every variant means nothing was used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheFileError {
    /// Reading, writing, syncing or renaming failed (disk full, permissions...).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// Not a kv cache file (or value) at all.
    #[error("not a kv cache file: the magic bytes are {found:?}")]
    BadMagic {
        /// The first bytes found (up to 8).
        found: Vec<u8>,
    },
    /// Written by another version of the format.
    #[error("cache format version {found} (this build reads version {supported})")]
    Version {
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// Saved by another model or cache configuration: its K/V would be wrong here.
    #[error("saved for another model or cache configuration: {detail}")]
    Mismatch {
        /// Which field differs, with both values.
        detail: String,
    },
    /// The file ends before a part it announces.
    #[error("truncated: {what} needs {need} bytes at offset {at}, the data has {have}")]
    Truncated {
        /// The part.
        what: &'static str,
        /// Its offset.
        at: u64,
        /// Bytes it needs.
        need: u64,
        /// Bytes there are.
        have: u64,
    },
    /// A part whose bytes changed since they were written.
    #[error("checksum mismatch in {what}: the bytes were corrupted")]
    Checksum {
        /// The part.
        what: String,
    },
    /// A field with a value no writer produces.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// The field.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A block index past the end of the file's table.
    #[error("block {index} out of range ({len} blocks in the file)")]
    NoSuchBlock {
        /// The index asked for.
        index: usize,
        /// Blocks in the file.
        len: usize,
    },
}

/// What a saved block set was computed by and for; a reader gives the one it expects, and
/// a file with any other is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The model (architecture, weights, tokenizer, ...) and cache configuration.
    pub fingerprint: Fingerprint,
    /// The backend whose byte order the blocks are in.
    pub backend: String,
    /// The storage layout.
    pub dtype: KvDType,
    /// Tokens per block.
    pub block_size: usize,
    /// Layers and heads.
    pub shape: ModelShape,
}

/// A token prefix and the exported blocks holding its K/V, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSet {
    /// Where the blocks come from.
    pub header: Header,
    /// The token ids the blocks hold (`blocks.len() x block_size` of them).
    pub tokens: Vec<u32>,
    /// Each block's content address and exported bytes.
    pub blocks: Vec<(BlockKey, Vec<u8>)>,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheFileError {
    let path = path.to_path_buf();
    move |source| CacheFileError::Io { op, path, source }
}

fn malformed(what: &'static str, detail: impl Into<String>) -> CacheFileError {
    CacheFileError::Malformed {
        what,
        detail: detail.into(),
    }
}

fn put_name(out: &mut Vec<u8>, what: &'static str, name: &str) -> Result<(), CacheFileError> {
    if name.len() > MAX_NAME {
        return Err(malformed(
            what,
            format!("{} bytes, at most {MAX_NAME}", name.len()),
        ));
    }
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

fn u32_of(what: &'static str, n: usize) -> Result<u32, CacheFileError> {
    u32::try_from(n).map_err(|_| malformed(what, format!("{n} does not fit 32 bits")))
}

fn encode_header(h: &Header, tokens: u64, blocks: u64) -> Result<Vec<u8>, CacheFileError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&h.fingerprint.0);
    put_name(&mut out, "backend name", &h.backend)?;
    put_name(&mut out, "layout name", &h.dtype.to_string())?;
    for (what, n) in [
        ("block size", h.block_size),
        ("layers", h.shape.n_layers()),
        ("q heads", h.shape.n_q_heads()),
        ("kv heads", h.shape.n_kv_heads()),
        ("head dim", h.shape.head_dim()),
    ] {
        out.extend_from_slice(&u32_of(what, n)?.to_le_bytes());
    }
    out.extend_from_slice(&tokens.to_le_bytes());
    out.extend_from_slice(&blocks.to_le_bytes());
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    Ok(out)
}

/// The file's bytes for `set`, checked: as many tokens as the blocks hold.
///
/// # Errors
/// [`CacheFileError::Malformed`] when the token count is not `blocks x block_size` or a
/// name or size does not fit its field.
pub fn encode(set: &BlockSet) -> Result<Vec<u8>, CacheFileError> {
    let want = set.blocks.len().checked_mul(set.header.block_size);
    if want != Some(set.tokens.len()) {
        return Err(malformed(
            "block set",
            format!(
                "{} tokens for {} blocks of {}",
                set.tokens.len(),
                set.blocks.len(),
                set.header.block_size
            ),
        ));
    }
    let mut out = encode_header(
        &set.header,
        set.tokens.len() as u64,
        set.blocks.len() as u64,
    )?;
    let tokens_at = out.len();
    for t in &set.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    let sum = xxh3_64(&out[tokens_at..]);
    out.extend_from_slice(&sum.to_le_bytes());
    let table_at = out.len();
    let table_len = set.blocks.len() * ENTRY_BYTES + 8;
    let mut offset = (table_at + table_len) as u64;
    for (key, bytes) in &set.blocks {
        out.extend_from_slice(&key.0);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&xxh3_64(bytes).to_le_bytes());
        offset += bytes.len() as u64;
    }
    let sum = xxh3_64(&out[table_at..]);
    out.extend_from_slice(&sum.to_le_bytes());
    for (_, bytes) in &set.blocks {
        out.extend_from_slice(bytes);
    }
    Ok(out)
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename over
/// `path`, fsync of the directory. On error the temporary file is removed and `path` is as
/// it was.
///
/// # Errors
/// [`CacheFileError::Io`] naming the step that failed (a full disk fails the write or the
/// sync).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CacheFileError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| malformed("path", format!("{} names no file", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io("rename into", path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // The rename is durable once the directory is synced.
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync directory", &dir))
}

/// [`encode`] then [`write_atomic`].
///
/// # Errors
/// As those two.
pub fn write_file(path: &Path, set: &BlockSet) -> Result<(), CacheFileError> {
    write_atomic(path, &encode(set)?)
}

/// A bounds-checked reader over a byte slice.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, what: &'static str, n: usize) -> Result<&'a [u8], CacheFileError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.at..end];
                self.at = end;
                Ok(s)
            }
            None => Err(CacheFileError::Truncated {
                what,
                at: self.at as u64,
                need: n as u64,
                have: (self.data.len() - self.at) as u64,
            }),
        }
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CacheFileError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(what, N)?);
        Ok(out)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, CacheFileError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, CacheFileError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, CacheFileError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn name(&mut self, what: &'static str) -> Result<&'a str, CacheFileError> {
        let n = usize::from(self.u16(what)?);
        if n > MAX_NAME {
            return Err(malformed(what, format!("{n} bytes, at most {MAX_NAME}")));
        }
        std::str::from_utf8(self.take(what, n)?).map_err(|e| malformed(what, e.to_string()))
    }
}

fn check_magic(data: &[u8], magic: &[u8; 8]) -> Result<(), CacheFileError> {
    if data.get(..8) != Some(&magic[..]) {
        return Err(CacheFileError::BadMagic {
            found: data.iter().take(8).copied().collect(),
        });
    }
    Ok(())
}

fn check_version(r: &mut Reader<'_>) -> Result<(), CacheFileError> {
    let found = r.u32("version")?;
    if found != VERSION {
        return Err(CacheFileError::Version {
            found,
            supported: VERSION,
        });
    }
    Ok(())
}

/// Compares what a file says it holds with what the reader expects, field by field.
fn check_header(r: &mut Reader<'_>, want: &Header) -> Result<(u64, u64), CacheFileError> {
    let start = r.at;
    check_magic(r.data, &MAGIC)?;
    r.take("magic", 8)?;
    check_version(r)?;
    let fingerprint = Fingerprint(r.array("fingerprint")?);
    let backend = r.name("backend name")?;
    let layout = r.name("layout name")?;
    let mut sizes = [0u32; 5];
    for (s, what) in
        sizes
            .iter_mut()
            .zip(["block size", "layers", "q heads", "kv heads", "head dim"])
    {
        *s = r.u32(what)?;
    }
    let tokens = r.u64("token count")?;
    let blocks = r.u64("block count")?;
    let covered = &r.data[start..r.at];
    if r.u64("header checksum")? != xxh3_64(covered) {
        return Err(CacheFileError::Checksum {
            what: "header".into(),
        });
    }
    let mismatch = |field: &str, found: String, expected: String| CacheFileError::Mismatch {
        detail: format!("{field} is {found} in the file, {expected} here"),
    };
    if fingerprint != want.fingerprint {
        return Err(mismatch(
            "the model fingerprint",
            fingerprint.to_string(),
            want.fingerprint.to_string(),
        ));
    }
    if backend != want.backend {
        return Err(mismatch(
            "the backend",
            backend.into(),
            want.backend.clone(),
        ));
    }
    let layout_here = want.dtype.to_string();
    if layout != layout_here {
        return Err(mismatch("the layout", layout.into(), layout_here));
    }
    let shape = &want.shape;
    for (found, expected, field) in [
        (sizes[0], want.block_size, "the block size"),
        (sizes[1], shape.n_layers(), "the layer count"),
        (sizes[2], shape.n_q_heads(), "the query head count"),
        (sizes[3], shape.n_kv_heads(), "the KV head count"),
        (sizes[4], shape.head_dim(), "the head dim"),
    ] {
        if found as usize != expected {
            return Err(mismatch(field, found.to_string(), expected.to_string()));
        }
    }
    Ok((tokens, blocks))
}

/// One block table entry, its offset and length checked against the data.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: BlockKey,
    offset: usize,
    len: usize,
    checksum: u64,
}

/// A cache file opened for reading: memory-mapped, header, tokens and table checked.
/// Block bytes are checksummed when asked for ([`CacheFile::block`]).
#[derive(Debug)]
pub struct CacheFile {
    data: Bytes,
    tokens: Vec<u32>,
    entries: Vec<Entry>,
}

/// The file's bytes: mapped, or owned (an empty file cannot be mapped, and tests parse
/// bytes in memory).
#[derive(Debug)]
enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// Maps `file` read-only.
#[allow(unsafe_code)]
fn map(file: &File, path: &Path) -> Result<Mmap, CacheFileError> {
    // SAFETY: the map is read-only and lives no longer than the `CacheFile` owning it. Cache
    // files are only ever replaced by rename ([`write_atomic`]), never written in place, so
    // the mapped inode does not change under us; a file truncated by another program while
    // mapped could fault, which no reader of memory-mapped files can prevent.
    unsafe { Mmap::map(file) }.map_err(io("map", path))
}

/// The bytes of the file at `path`, read through a memory map (an empty file without one).
///
/// # Errors
/// [`CacheFileError::Io`]; [`CacheFileError::Malformed`] for a path that is not a regular
/// file.
pub fn read_mapped(path: &Path) -> Result<Vec<u8>, CacheFileError> {
    let file = File::open(path).map_err(io("open", path))?;
    let meta = file.metadata().map_err(io("stat", path))?;
    if !meta.is_file() {
        return Err(malformed(
            "path",
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() == 0 {
        return Ok(Vec::new());
    }
    Ok(map(&file, path)?.to_vec())
}

impl CacheFile {
    /// Opens `path`, refusing it unless it was saved for `expected` (fingerprint, backend,
    /// layout, block size, shape).
    ///
    /// # Errors
    /// [`CacheFileError::Io`] when it cannot be read; the other variants for what is wrong
    /// with its contents.
    pub fn open(path: &Path, expected: &Header) -> Result<Self, CacheFileError> {
        let file = File::open(path).map_err(io("open", path))?;
        let meta = file.metadata().map_err(io("stat", path))?;
        if !meta.is_file() {
            return Err(malformed(
                "path",
                format!("{} is not a regular file", path.display()),
            ));
        }
        let data = if meta.len() == 0 {
            Bytes::Owned(Vec::new())
        } else {
            Bytes::Mapped(map(&file, path)?)
        };
        Self::parse(data, expected)
    }

    /// Parses a file's bytes held in memory, as [`CacheFile::open`] does.
    ///
    /// # Errors
    /// As [`CacheFile::open`], without the I/O.
    pub fn from_bytes(bytes: Vec<u8>, expected: &Header) -> Result<Self, CacheFileError> {
        Self::parse(Bytes::Owned(bytes), expected)
    }

    fn parse(data: Bytes, expected: &Header) -> Result<Self, CacheFileError> {
        let mut r = Reader { data: &data, at: 0 };
        let (n_tokens, n_blocks) = check_header(&mut r, expected)?;
        // Counts are checked against the bytes there are before anything is sized by them.
        let left = (data.len() - r.at) as u64;
        let token_bytes = n_tokens.checked_mul(4).filter(|&b| b <= left);
        let Some(token_bytes) = token_bytes else {
            return Err(CacheFileError::Truncated {
                what: "token ids",
                at: r.at as u64,
                need: n_tokens.saturating_mul(4),
                have: left,
            });
        };
        let want_tokens = n_blocks.checked_mul(expected.block_size as u64);
        if want_tokens != Some(n_tokens) {
            return Err(malformed(
                "token count",
                format!(
                    "{n_tokens} tokens for {n_blocks} blocks of {}",
                    expected.block_size
                ),
            ));
        }
        let raw = r.take("token ids", token_bytes as usize)?;
        if r.u64("token checksum")? != xxh3_64(raw) {
            return Err(CacheFileError::Checksum {
                what: "token ids".into(),
            });
        }
        let tokens: Vec<u32> = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let table_at = r.at;
        let left = (data.len() - r.at) as u64;
        let table_bytes = n_blocks
            .checked_mul(ENTRY_BYTES as u64)
            .filter(|&b| b <= left);
        let Some(table_bytes) = table_bytes else {
            return Err(CacheFileError::Truncated {
                what: "block table",
                at: r.at as u64,
                need: n_blocks.saturating_mul(ENTRY_BYTES as u64),
                have: left,
            });
        };
        let table = r.take("block table", table_bytes as usize)?;
        if r.u64("table checksum")? != xxh3_64(table) {
            return Err(CacheFileError::Checksum {
                what: "block table".into(),
            });
        }
        let data_start = r.at;
        let _ = table_at;
        let mut entries = Vec::with_capacity(n_blocks as usize);
        let mut t = Reader { data: table, at: 0 };
        for i in 0..n_blocks {
            let key = BlockKey(t.array("block key")?);
            let offset = t.u64("block offset")?;
            let len = t.u64("block length")?;
            let checksum = t.u64("block checksum")?;
            let end = offset.checked_add(len);
            if offset < data_start as u64 || end.is_none_or(|e| e > data.len() as u64) {
                return Err(CacheFileError::Truncated {
                    what: "block data",
                    at: offset,
                    need: len,
                    have: (data.len() as u64).saturating_sub(offset),
                });
            }
            if len == 0 {
                return Err(malformed("block length", format!("block {i} is empty")));
            }
            entries.push(Entry {
                key,
                offset: offset as usize,
                len: len as usize,
                checksum,
            });
        }
        Ok(Self {
            data,
            tokens,
            entries,
        })
    }

    /// The token ids the blocks hold.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Blocks in the file.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file holds no block.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Block `index`'s key and bytes, after checking its checksum.
    ///
    /// # Errors
    /// [`CacheFileError::NoSuchBlock`]; [`CacheFileError::Checksum`] for changed bytes.
    pub fn block(&self, index: usize) -> Result<(BlockKey, &[u8]), CacheFileError> {
        let e = self.entries.get(index).ok_or(CacheFileError::NoSuchBlock {
            index,
            len: self.entries.len(),
        })?;
        // Offsets and lengths were checked against the data when the file was opened.
        let bytes = &self.data[e.offset..e.offset + e.len];
        if xxh3_64(bytes) != e.checksum {
            return Err(CacheFileError::Checksum {
                what: format!("block {index}"),
            });
        }
        Ok((e.key, bytes))
    }
}

/// Bytes of a value's header before its payload.
const VALUE_HEADER: usize = 8 + 4 + 16 + 16 + 8 + 8;

/// One block as a store keeps it: magic, version, fingerprint, key, length, checksum,
/// then the exported bytes. [`decode_value`] checks all of it.
pub fn encode_value(fingerprint: &Fingerprint, key: &BlockKey, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(VALUE_HEADER + bytes.len());
    out.extend_from_slice(&VALUE_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&fingerprint.0);
    out.extend_from_slice(&key.0);
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxh3_64(bytes).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// The exported bytes of a stored value, if it is a well-formed value of this version for
/// `fingerprint` and `key` whose checksum holds.
///
/// # Errors
/// [`CacheFileError::BadMagic`], [`CacheFileError::Version`], [`CacheFileError::Mismatch`]
/// (another model or another key), [`CacheFileError::Truncated`],
/// [`CacheFileError::Malformed`] (trailing bytes), [`CacheFileError::Checksum`].
pub fn decode_value<'a>(
    fingerprint: &Fingerprint,
    key: &BlockKey,
    value: &'a [u8],
) -> Result<&'a [u8], CacheFileError> {
    check_magic(value, &VALUE_MAGIC)?;
    let mut r = Reader { data: value, at: 8 };
    check_version(&mut r)?;
    let fp = Fingerprint(r.array("fingerprint")?);
    if fp != *fingerprint {
        return Err(CacheFileError::Mismatch {
            detail: format!("the value's model fingerprint is {fp}, {fingerprint} here"),
        });
    }
    let k = BlockKey(r.array("block key")?);
    if k != *key {
        return Err(CacheFileError::Mismatch {
            detail: format!("the value holds block {k}, not {key}"),
        });
    }
    let len = r.u64("block length")?;
    let sum = r.u64("block checksum")?;
    let left = (value.len() - r.at) as u64;
    if len != left {
        return Err(if len > left {
            CacheFileError::Truncated {
                what: "block data",
                at: r.at as u64,
                need: len,
                have: left,
            }
        } else {
            malformed(
                "block value",
                format!("{} bytes after a {len}-byte block", left - len),
            )
        });
    }
    let bytes = &value[r.at..];
    if xxh3_64(bytes) != sum {
        return Err(CacheFileError::Checksum {
            what: format!("block {key}"),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            fingerprint: Fingerprint::of_parts(&[("m", b"test")]),
            backend: "cpu".into(),
            dtype: KvDType::F16,
            block_size: 2,
            shape: ModelShape::new(2, 4, 2, 8).expect("shape"),
        }
    }

    fn set(blocks: usize) -> BlockSet {
        BlockSet {
            header: header(),
            tokens: (0..blocks as u32 * 2).collect(),
            blocks: (0..blocks)
                .map(|b| (BlockKey([b as u8; 16]), vec![b as u8 + 1; 10 + b]))
                .collect(),
        }
    }

    fn dir() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "kv-cache-file-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn round_trip_through_a_file() {
        let d = dir();
        let path = d.join("a.kvc");
        let s = set(3);
        write_file(&path, &s).expect("write");
        let f = CacheFile::open(&path, &header()).expect("open");
        assert_eq!(f.tokens(), &s.tokens[..]);
        assert_eq!(f.len(), 3);
        for (i, (key, bytes)) in s.blocks.iter().enumerate() {
            assert_eq!(f.block(i).expect("block"), (*key, &bytes[..]));
        }
        assert!(matches!(
            f.block(3),
            Err(CacheFileError::NoSuchBlock { index: 3, len: 3 })
        ));
        // No temporary file is left beside it.
        let names: Vec<_> = fs::read_dir(&d).expect("dir").collect();
        assert_eq!(names.len(), 1);
        fs::remove_dir_all(&d).expect("cleanup");
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode(&set(2)).expect("encode");
        for n in 0..bytes.len() {
            let r = CacheFile::from_bytes(bytes[..n].to_vec(), &header())
                .and_then(|f| (0..f.len()).try_for_each(|i| f.block(i).map(|_| ())));
            assert!(
                r.is_err(),
                "a file cut at {n} of {} bytes was read",
                bytes.len()
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = encode(&set(2)).expect("encode");
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let r = CacheFile::from_bytes(b, &header())
                .and_then(|f| (0..f.len()).try_for_each(|i| f.block(i).map(|_| ())));
            assert!(r.is_err(), "bit {i} flipped went unnoticed");
        }
    }

    #[test]
    fn another_model_layout_or_version_is_refused() {
        let bytes = encode(&set(1)).expect("encode");
        let mut other = header();
        other.fingerprint = Fingerprint::of_parts(&[("m", b"other")]);
        assert!(matches!(
            CacheFile::from_bytes(bytes.clone(), &other),
            Err(CacheFileError::Mismatch { .. })
        ));
        let mut other = header();
        other.dtype = KvDType::F32;
        assert!(matches!(
            CacheFile::from_bytes(bytes.clone(), &other),
            Err(CacheFileError::Mismatch { .. })
        ));
        let mut other = header();
        other.block_size = 4;
        assert!(matches!(
            CacheFile::from_bytes(bytes.clone(), &other),
            Err(CacheFileError::Mismatch { .. })
        ));
        let mut v2 = bytes.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            CacheFile::from_bytes(v2, &header()),
            Err(CacheFileError::Version { found: 2, .. })
        ));
        assert!(matches!(
            CacheFile::from_bytes(b"GGUF\x03\0\0\0 and more".to_vec(), &header()),
            Err(CacheFileError::BadMagic { .. })
        ));
    }

    /// Headers whose checksum is made to match but whose counts lie: refused before any
    /// allocation is sized by them.
    #[test]
    fn hostile_counts_and_offsets_are_refused() {
        let s = set(1);
        let good = encode(&s).expect("encode");
        let head_len = encode_header(&s.header, 2, 1).expect("header").len();
        for (tokens, blocks) in [(u64::MAX, 1), (2, u64::MAX), (u64::MAX / 4, u64::MAX / 8)] {
            let mut b = encode_header(&s.header, tokens, blocks).expect("header");
            b.extend_from_slice(&good[head_len..]);
            let r = CacheFile::from_bytes(b, &header());
            assert!(
                matches!(
                    r,
                    Err(CacheFileError::Truncated { .. } | CacheFileError::Malformed { .. })
                ),
                "{r:?}"
            );
        }
        // A table entry pointing outside the file, with its checksum recomputed.
        let table_at = head_len + 2 * 4 + 8;
        for (offset, len) in [(u64::MAX - 1, 4u64), (0, 4), (good.len() as u64, 1)] {
            let mut b = good.clone();
            b[table_at + 16..table_at + 24].copy_from_slice(&offset.to_le_bytes());
            b[table_at + 24..table_at + 32].copy_from_slice(&len.to_le_bytes());
            let sum = xxh3_64(&b[table_at..table_at + ENTRY_BYTES]);
            b[table_at + ENTRY_BYTES..table_at + ENTRY_BYTES + 8]
                .copy_from_slice(&sum.to_le_bytes());
            let r = CacheFile::from_bytes(b, &header());
            assert!(matches!(r, Err(CacheFileError::Truncated { .. })), "{r:?}");
        }
    }

    #[test]
    fn values_carry_fingerprint_key_and_checksum() {
        let fp = header().fingerprint;
        let key = BlockKey([3; 16]);
        let v = encode_value(&fp, &key, b"payload");
        assert_eq!(decode_value(&fp, &key, &v).expect("decode"), b"payload");
        let other = Fingerprint::of_parts(&[]);
        assert!(matches!(
            decode_value(&other, &key, &v),
            Err(CacheFileError::Mismatch { .. })
        ));
        assert!(matches!(
            decode_value(&fp, &BlockKey([4; 16]), &v),
            Err(CacheFileError::Mismatch { .. })
        ));
        for i in 0..v.len() * 8 {
            let mut b = v.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode_value(&fp, &key, &b).is_err(), "bit {i}");
        }
        for n in 0..v.len() {
            assert!(decode_value(&fp, &key, &v[..n]).is_err(), "cut at {n}");
        }
        let mut long = v.clone();
        long.push(0);
        assert!(decode_value(&fp, &key, &long).is_err());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file() {
        let d = dir();
        let path = d.join("a.kvc");
        write_file(&path, &set(1)).expect("write");
        let before = fs::read(&path).expect("read");
        // Writing into a directory that does not exist fails before touching `path`.
        let bad = d.join("missing").join("a.kvc");
        assert!(matches!(
            write_file(&bad, &set(2)),
            Err(CacheFileError::Io { .. })
        ));
        assert_eq!(fs::read(&path).expect("read"), before);
        assert!(matches!(
            encode(&BlockSet {
                tokens: vec![1],
                ..set(1)
            }),
            Err(CacheFileError::Malformed { .. })
        ));
        fs::remove_dir_all(&d).expect("cleanup");
    }
}
