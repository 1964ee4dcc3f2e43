//! A pre-flight walk over a GGUF header before candle's reader sees the file.
//!
//! candle trusts parts of a header that an attacker controls: `general.alignment = 0`
//! divides by zero, tensor dimensions are multiplied without a check, and duplicate names
//! silently replace each other. [`check_gguf_bytes`] and [`check_gguf_file`] read the
//! header themselves, one bounded field at a time, and refuse anything a real model never
//! holds, naming the key or tensor, the value and the byte offset. Nothing is allocated in
//! proportion to a number read from the file before that number is checked against the
//! limits below and against the bytes left in the file.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::{ModelError, Result};

/// Most tensors a GGUF file may declare (the largest real models hold a few thousand).
pub const MAX_TENSORS: u64 = 1 << 16;
/// Most metadata entries a GGUF file may declare (real files hold tens).
pub const MAX_METADATA: u64 = 1 << 16;
/// Longest metadata key or tensor name, in bytes (ggml's own limit for names is 64).
pub const MAX_NAME_BYTES: u64 = 1 << 10;
/// Longest metadata string value, in bytes (chat templates and embedded tokenizer JSON
/// stay far below).
pub const MAX_STRING_BYTES: u64 = 1 << 26;
/// Most elements of one metadata array (vocabularies and merge lists hold at most a few
/// hundred thousand).
pub const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Deepest nesting of arrays inside arrays (real files use none).
pub const MAX_ARRAY_DEPTH: usize = 2;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_TENSOR_DIMS: u32 = 4;
/// Most elements of one tensor (2^40: a terabyte of 8-bit weights).
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 40;
/// Largest `general.alignment` accepted (the default is 32).
pub const MAX_ALIGNMENT: u64 = 1 << 16;

/// GGUF's default alignment of tensor data when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
const MAGIC: &[u8; 4] = b"GGUF";

/// What a header that passed [`check_gguf_bytes`] or [`check_gguf_file`] declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufSummary {
    /// Format version (2 or 3).
    pub version: u32,
    /// Tensors in the directory.
    pub tensor_count: u64,
    /// Metadata entries.
    pub metadata_count: u64,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    /// Byte offset where tensor data starts.
    pub tensor_data_offset: u64,
    /// Bytes the file needs to hold every tensor (the end of the last one).
    pub data_end: u64,
}

/// Checks the GGUF header in `bytes` (the whole file, or at least every byte up to the end
/// of its tensor data): the entry point fuzzers and tests call.
///
/// ```
/// let e = kv_model::check_gguf_bytes(b"GGUF\x03\x00\x00\x00").unwrap_err();
/// assert!(e.to_string().contains("tensor count"), "{e}");
/// ```
///
/// # Errors
/// [`ModelError::MalformedGguf`] naming the first field that is truncated, out of bounds or
/// inconsistent, with its value and byte offset.
pub fn check_gguf_bytes(bytes: &[u8]) -> Result<GgufSummary> {
    Walker::new(bytes, bytes.len() as u64, PathBuf::from("<bytes>")).walk()
}

/// Checks the GGUF header of the file at `path` with bounded reads (the weights are not
/// read). The file must be a regular file.
///
/// ```no_run
/// let summary = kv_model::check_gguf_file(kv_model::default_model_path())?;
/// assert!(summary.tensor_count > 0);
/// # Ok::<(), kv_model::ModelError>(())
/// ```
///
/// # Errors
/// [`ModelError::ModelNotFound`], [`ModelError::Io`], [`ModelError::NotARegularFile`], and
/// those of [`check_gguf_bytes`].
pub fn check_gguf_file(path: impl AsRef<Path>) -> Result<GgufSummary> {
    let path = path.as_ref();
    let file = crate::files::open_regular(path)?;
    check_open_file(&file, path)
}

/// Walks the header of an already opened regular file from its current start (offset 0).
pub(crate) fn check_open_file(file: &File, path: &Path) -> Result<GgufSummary> {
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    Walker::new(BufReader::new(file), len, path.to_path_buf()).walk()
}

/// Where in the header a field belongs, for messages.
#[derive(Clone)]
enum Ctx<'a> {
    Header,
    Key(&'a str),
    KeyIndex(u64),
    Tensor(&'a str),
    TensorIndex(u64),
}

impl Ctx<'_> {
    fn name(&self) -> String {
        match self {
            Ctx::Header => "header".into(),
            Ctx::Key(k) => format!("metadata key {:?}", crate::escape::escape(k)),
            Ctx::KeyIndex(i) => format!("metadata entry {i}"),
            Ctx::Tensor(t) => format!("tensor {:?}", crate::escape::escape(t)),
            Ctx::TensorIndex(i) => format!("tensor entry {i}"),
        }
    }
}

struct Walker<R> {
    r: R,
    pos: u64,
    len: u64,
    path: PathBuf,
}

/// One tensor's directory entry, kept to check data bounds once the data offset is known.
struct TensorEntry {
    name: String,
    offset: u64,
    bytes: u64,
    /// Where the entry's offset field sits, for messages.
    at: u64,
}

impl<R: Read> Walker<R> {
    fn new(r: R, len: u64, path: PathBuf) -> Self {
        Self {
            r,
            pos: 0,
            len,
            path,
        }
    }

    fn err(&self, at: u64, ctx: &Ctx<'_>, detail: impl Into<String>) -> ModelError {
        ModelError::MalformedGguf {
            path: self.path.clone(),
            offset: at,
            what: ctx.name(),
            detail: detail.into(),
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn fill(&mut self, buf: &mut [u8], ctx: &Ctx<'_>, field: &str) -> Result<()> {
        let n = buf.len() as u64;
        if n > self.remaining() {
            return Err(self.err(
                self.pos,
                ctx,
                format!(
                    "{field}: file ends after {} of its {n} bytes",
                    self.remaining()
                ),
            ));
        }
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err(self.pos, ctx, format!("{field}: file ends inside it"))
            } else {
                ModelError::io(&self.path, e)
            }
        })?;
        self.pos += n;
        Ok(())
    }

    fn skip(&mut self, n: u64, ctx: &Ctx<'_>, field: &str) -> Result<()> {
        if n > self.remaining() {
            return Err(self.err(
                self.pos,
                ctx,
                format!(
                    "{field}: {n} bytes needed, {} left in the file",
                    self.remaining()
                ),
            ));
        }
        let mut buf = [0u8; 4096];
        let mut left = n;
        while left > 0 {
            let take = left.min(buf.len() as u64) as usize;
            self.fill(&mut buf[..take], ctx, field)?;
            left -= take as u64;
        }
        Ok(())
    }

    fn u8(&mut self, ctx: &Ctx<'_>, field: &str) -> Result<u8> {
        let mut b = [0u8; 1];
        self.fill(&mut b, ctx, field)?;
        Ok(b[0])
    }

    fn u32(&mut self, ctx: &Ctx<'_>, field: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.fill(&mut b, ctx, field)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, ctx: &Ctx<'_>, field: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.fill(&mut b, ctx, field)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A length-prefixed string no longer than `max` bytes, read into memory.
    fn string(&mut self, ctx: &Ctx<'_>, field: &str, max: u64) -> Result<String> {
        let at = self.pos;
        let n = self.string_len(ctx, field, max, at)?;
        let mut buf = vec![0u8; n as usize];
        self.fill(&mut buf, ctx, field)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// A length-prefixed string's length, checked against `max` and the bytes left.
    fn string_len(&mut self, ctx: &Ctx<'_>, field: &str, max: u64, at: u64) -> Result<u64> {
        let n = self.u64(ctx, &format!("{field} length"))?;
        if n > max {
            return Err(self.err(
                at,
                ctx,
                format!("{field} length {n} exceeds the limit of {max} bytes"),
            ));
        }
        if n > self.remaining() {
            return Err(self.err(
                at,
                ctx,
                format!(
                    "{field} length {n} exceeds the {} bytes left in the file",
                    self.remaining()
                ),
            ));
        }
        Ok(n)
    }

    fn walk(mut self) -> Result<GgufSummary> {
        let h = Ctx::Header;
        let mut magic = [0u8; 4];
        self.fill(&mut magic, &h, "magic")?;
        if &magic != MAGIC {
            return Err(self.err(
                0,
                &h,
                format!("magic {magic:02x?} is not \"GGUF\" (not a GGUF file)"),
            ));
        }
        let version = self.u32(&h, "version")?;
        if !(2..=3).contains(&version) {
            return Err(self.err(
                4,
                &h,
                format!("version {version} is not supported (2 or 3)"),
            ));
        }
        let tensor_count = self.u64(&h, "tensor count")?;
        if tensor_count > MAX_TENSORS {
            return Err(self.err(
                8,
                &h,
                format!("tensor count {tensor_count} exceeds the limit of {MAX_TENSORS}"),
            ));
        }
        let metadata_count = self.u64(&h, "metadata count")?;
        if metadata_count > MAX_METADATA {
            return Err(self.err(
                16,
                &h,
                format!("metadata count {metadata_count} exceeds the limit of {MAX_METADATA}"),
            ));
        }
        // Smallest entries: a key (8-byte length, no bytes), a type and a 1-byte value; a
        // tensor name (8 bytes), 4-byte dims count, 4-byte type, 8-byte offset.
        let least = metadata_count * 13 + tensor_count * 24;
        if least > self.remaining() {
            return Err(self.err(
                8,
                &h,
                format!(
                    "{tensor_count} tensors and {metadata_count} metadata entries need at least \
                     {least} bytes, {} left in the file",
                    self.remaining()
                ),
            ));
        }

        let mut alignment = DEFAULT_ALIGNMENT;
        let mut keys = HashSet::new();
        for i in 0..metadata_count {
            let at = self.pos;
            let key = self.string(&Ctx::KeyIndex(i), "key", MAX_NAME_BYTES)?;
            let ctx = Ctx::Key(&key);
            if key.is_empty() {
                return Err(self.err(at, &Ctx::KeyIndex(i), "the key is empty"));
            }
            let type_at = self.pos;
            let ty = self.u32(&ctx, "value type")?;
            if key == "general.alignment" {
                let value_at = self.pos;
                let a: u64 = match ty {
                    0 => self.u8(&ctx, "value")?.into(),
                    2 => {
                        let mut b = [0u8; 2];
                        self.fill(&mut b, &ctx, "value")?;
                        u16::from_le_bytes(b).into()
                    }
                    4 => self.u32(&ctx, "value")?.into(),
                    other => {
                        return Err(self.err(
                            type_at,
                            &ctx,
                            format!("value type {} (expected u32)", type_name(other)),
                        ))
                    }
                };
                if a == 0 || !a.is_power_of_two() || a > MAX_ALIGNMENT {
                    return Err(self.err(
                        value_at,
                        &ctx,
                        format!(
                            "alignment {a} is not a power of two between 1 and {MAX_ALIGNMENT}"
                        ),
                    ));
                }
                alignment = a;
            } else {
                self.value(ty, &ctx, type_at, 0)?;
            }
            if !keys.insert(key.clone()) {
                return Err(self.err(at, &ctx, "the key appears twice"));
            }
        }

        let mut names = HashSet::new();
        let mut tensors = Vec::new();
        for i in 0..tensor_count {
            let at = self.pos;
            let name = self.string(&Ctx::TensorIndex(i), "name", MAX_NAME_BYTES)?;
            if name.is_empty() {
                return Err(self.err(at, &Ctx::TensorIndex(i), "the name is empty"));
            }
            if names.contains(&name) {
                return Err(self.err(at, &Ctx::Tensor(&name), "the name appears twice"));
            }
            let entry = self.tensor(&name)?;
            names.insert(name);
            tensors.push(entry);
        }

        let header_end = self.pos;
        // A file without tensors needs no data section.
        let data_start = header_end
            .div_ceil(alignment)
            .checked_mul(alignment)
            .filter(|&s| s <= self.len || tensors.is_empty())
            .ok_or_else(|| {
                self.err(
                    header_end,
                    &Ctx::Header,
                    format!(
                        "tensor data would start past the end of the file ({} bytes)",
                        self.len
                    ),
                )
            })?;
        let mut data_end = data_start;
        for t in &tensors {
            let ctx = Ctx::Tensor(&t.name);
            if t.offset % alignment != 0 {
                return Err(self.err(
                    t.at,
                    &ctx,
                    format!(
                        "data offset {} is not a multiple of the alignment {alignment}",
                        t.offset
                    ),
                ));
            }
            let end = data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.bytes));
            match end {
                Some(end) if end <= self.len => data_end = data_end.max(end),
                _ => {
                    return Err(self.err(
                        t.at,
                        &ctx,
                        format!(
                            "data at offset {} ({} bytes) runs past the end of the file \
                             ({} bytes of data after the header)",
                            t.offset,
                            t.bytes,
                            self.len.saturating_sub(data_start)
                        ),
                    ))
                }
            }
        }
        Ok(GgufSummary {
            version,
            tensor_count,
            metadata_count,
            alignment,
            tensor_data_offset: data_start,
            data_end,
        })
    }

    /// One tensor directory entry after its name.
    fn tensor(&mut self, name: &str) -> Result<TensorEntry> {
        let ctx = Ctx::Tensor(name);
        let at = self.pos;
        let n_dims = self.u32(&ctx, "dimension count")?;
        if n_dims == 0 || n_dims > MAX_TENSOR_DIMS {
            return Err(self.err(
                at,
                &ctx,
                format!("{n_dims} dimensions (expected 1 to {MAX_TENSOR_DIMS})"),
            ));
        }
        let mut elements: u64 = 1;
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let dim_at = self.pos;
            let dim = self.u64(&ctx, "dimension")?;
            elements = match elements.checked_mul(dim) {
                Some(e) if dim > 0 && e <= MAX_TENSOR_ELEMENTS => e,
                _ => {
                    return Err(self.err(
                        dim_at,
                        &ctx,
                        format!(
                            "dimension {d} is {dim}: a tensor holds 1 to {MAX_TENSOR_ELEMENTS} \
                             elements"
                        ),
                    ))
                }
            };
            dims.push(dim);
        }
        let type_at = self.pos;
        let ty = self.u32(&ctx, "type")?;
        let Some((type_name, block, block_bytes)) = tensor_type(ty) else {
            return Err(self.err(
                type_at,
                &ctx,
                format!("tensor type {ty} is not one this reader supports"),
            ));
        };
        if dims[0] % block != 0 {
            return Err(self.err(
                type_at,
                &ctx,
                format!(
                    "rows of {} elements are not whole {type_name} blocks of {block}",
                    dims[0]
                ),
            ));
        }
        // elements <= 2^40 and block_bytes <= 292: no overflow.
        let bytes = elements / block * block_bytes;
        let offset_at = self.pos;
        let offset = self.u64(&ctx, "data offset")?;
        Ok(TensorEntry {
            name: name.to_string(),
            offset,
            bytes,
            at: offset_at,
        })
    }

    /// Skips one metadata value of type `ty`, checking its type and lengths.
    fn value(&mut self, ty: u32, ctx: &Ctx<'_>, type_at: u64, depth: usize) -> Result<()> {
        match ty {
            // Fixed-size scalars.
            0..=6 | 10..=12 => {
                let size = scalar_size(ty).unwrap_or(8);
                self.skip(size, ctx, "value")
            }
            7 => {
                let at = self.pos;
                match self.u8(ctx, "value")? {
                    0 | 1 => Ok(()),
                    b => Err(self.err(at, ctx, format!("boolean byte {b} is neither 0 nor 1"))),
                }
            }
            8 => {
                let at = self.pos;
                let n = self.string_len(ctx, "string", MAX_STRING_BYTES, at)?;
                self.skip(n, ctx, "string")
            }
            9 => {
                let at = self.pos;
                let elem = self.u32(ctx, "array element type")?;
                let len_at = self.pos;
                let len = self.u64(ctx, "array length")?;
                if len > MAX_ARRAY_LEN {
                    return Err(self.err(
                        len_at,
                        ctx,
                        format!("array length {len} exceeds the limit of {MAX_ARRAY_LEN}"),
                    ));
                }
                let least = match elem {
                    7 => Some(1),
                    8 | 9 => Some(8),
                    t => scalar_size(t),
                };
                let Some(least) = least else {
                    return Err(self.err(
                        at,
                        ctx,
                        format!("array element type {} is not a GGUF type", type_name(elem)),
                    ));
                };
                if len * least > self.remaining() {
                    return Err(self.err(
                        len_at,
                        ctx,
                        format!(
                            "array of {len} elements needs at least {} bytes, {} left in the file",
                            len * least,
                            self.remaining()
                        ),
                    ));
                }
                match elem {
                    7..=9 => {
                        if elem == 9 && depth + 1 > MAX_ARRAY_DEPTH {
                            return Err(self.err(
                                at,
                                ctx,
                                format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                            ));
                        }
                        for _ in 0..len {
                            self.value(elem, ctx, at, depth + 1)?;
                        }
                        Ok(())
                    }
                    _ => self.skip(len * least, ctx, "array"),
                }
            }
            other => Err(self.err(
                type_at,
                ctx,
                format!("value type {} is not a GGUF type", type_name(other)),
            )),
        }
    }
}

/// Bytes of a fixed-size GGUF scalar type.
fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn type_name(ty: u32) -> String {
    const NAMES: [&str; 13] = [
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64",
        "f64",
    ];
    match NAMES.get(ty as usize) {
        Some(n) => (*n).to_string(),
        None => format!("{ty}"),
    }
}

/// The tensor types candle reads: name, elements per block, bytes per block.
fn tensor_type(ty: u32) -> Option<(&'static str, u64, u64)> {
    Some(match ty {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        30 => ("BF16", 1, 2),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn block_sizes_match_candle() {
        for (ty, dt) in [
            (0, GgmlDType::F32),
            (1, GgmlDType::F16),
            (2, GgmlDType::Q4_0),
            (3, GgmlDType::Q4_1),
            (6, GgmlDType::Q5_0),
            (7, GgmlDType::Q5_1),
            (8, GgmlDType::Q8_0),
            (9, GgmlDType::Q8_1),
            (10, GgmlDType::Q2K),
            (11, GgmlDType::Q3K),
            (12, GgmlDType::Q4K),
            (13, GgmlDType::Q5K),
            (14, GgmlDType::Q6K),
            (15, GgmlDType::Q8K),
            (30, GgmlDType::BF16),
        ] {
            let (_, block, bytes) = tensor_type(ty).unwrap();
            assert_eq!(block as usize, dt.block_size(), "{dt:?}");
            assert_eq!(bytes as usize, dt.type_size(), "{dt:?}");
        }
        assert!(tensor_type(4).is_none());
    }

    #[test]
    fn empty_and_foreign_bytes_are_refused() {
        for bytes in [&b""[..], b"GGU", b"GGML\x03\0\0\0", b"GGUF\x01\0\0\0"] {
            let e = check_gguf_bytes(bytes).unwrap_err();
            assert!(matches!(e, ModelError::MalformedGguf { .. }), "{e}");
        }
    }

    #[test]
    fn an_empty_valid_header_passes() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let s = check_gguf_bytes(&b).unwrap();
        assert_eq!((s.tensor_count, s.alignment), (0, 32));
        // 24 header bytes round up to 32: past the end, which is fine without tensors.
        assert_eq!(s.tensor_data_offset, 32);
    }
}
